"""``debias locate``: run any subset of the locate probes on one generator and write one report.

Output folder::

    OUT/locate.json        everything: config, audit summary, each probe's result
    OUT/locate.html        self-contained report (one section per probe)
    OUT/locate.md          Markdown summary
    OUT/<probe>.json       each probe's result alone (understanding, vision, controlled, swap), with its own
                           <probe>.html / <probe>.md page
    OUT/audit/             the generation audit the probes compare against (unless locate.audit names one)
    OUT/swap/<cell>/       the four audited cells of the component swap
    OUT/stages/<probe>-<key>.json   each finished probe's result, keyed by everything it depends on (its settings,
                           the generator's identity, the experiment, the audit it reads): a re-run, or a run killed
                           between probes, reuses them and redoes only what is missing

Config: the experiment (generator, prompts, images_per_prompt, classifier, metrics) plus a ``locate`` section
(:class:`LocateConfig`), both in one experiment YAML (see ``configs/experiments/locate-smoke-janus.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from debias.locate.controlled import ControlledConfig, controlled_probe
from debias.locate.swap import SwapConfig, component_swap
from debias.locate.understanding import UnderstandingConfig, alignment_table, understanding_probe
from debias.locate.vision_probe import VisionProbeConfig, vision_probe
from generators.config import ConfigError, UserError, did_you_mean, from_dict, load_yaml, option, to_dict

PROBES = ("understanding", "vision", "controlled", "swap")


@dataclass
class LocateConfig:
    """Which locate probes to run and how (the ``locate`` section of a locate config)."""

    probes: list[str] = option(default_factory=lambda: ["understanding", "vision", "controlled"],
                               help="probes to run, any of: understanding, vision, controlled, swap")
    audit: str | None = option(None, help="metrics.json (or its run folder) of an audit of this generator; "
                                          "audited into OUT/audit when a probe needs one and this is empty")
    understanding: UnderstandingConfig = option(default_factory=UnderstandingConfig, help="understanding probe")
    vision: VisionProbeConfig = option(default_factory=VisionProbeConfig, help="vision-encoder probe")
    controlled: ControlledConfig = option(default_factory=ControlledConfig, help="controlled-generation probe")
    swap: SwapConfig = option(default_factory=SwapConfig, help="component swap")

    def __post_init__(self):
        # Python callers may pass plain mappings for the probe sections, as YAML does.
        for name, cls in (("understanding", UnderstandingConfig), ("vision", VisionProbeConfig),
                          ("controlled", ControlledConfig), ("swap", SwapConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, from_dict(cls, dict(value), prefix=f"locate.{name}"))
            elif not isinstance(value, cls):
                raise ConfigError(f"config key 'locate.{name}': expected a mapping of {cls.__name__} fields, "
                                  f"got {value!r}")
        if not self.probes:
            raise ConfigError(f"config key 'locate.probes': name at least one of {list(PROBES)}")
        for p in self.probes:
            if p not in PROBES:
                raise ConfigError(f"config key 'locate.probes': unknown probe {p!r}{did_you_mean(p, PROBES)}; "
                                  f"use {list(PROBES)}")
        if len(set(self.probes)) != len(self.probes):
            raise ConfigError(f"config key 'locate.probes': a probe is listed twice in {self.probes}")


def read_audit(source: str | Path, key: str = "config key 'locate.audit'") -> dict:
    """The ``metrics.json`` of an audit (the file, or the run folder holding it); raises naming ``key`` when it is
    missing, unreadable or not an audit's metrics."""
    from audit.store import read_json

    p = Path(source)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise UserError(f"{key}: '{source}' is not a metrics.json or a run folder with one; run `debias audit` "
                        "first, or leave it empty to audit now")
    metrics = read_json(p)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("attributes"), dict):
        raise UserError(f"{key}: '{p}' is not an audit's metrics.json (unreadable, or no 'attributes'); re-run "
                        f"`debias audit` into that folder")
    return metrics


def check_locate(experiment_config, config: LocateConfig, generator=None, tuned=None) -> None:
    """Every problem a probe would hit, raised before any output is written.

    Without ``generator`` (before loading it) the backend's declared capabilities are checked; with the loaded
    generator, its image encoders too. ``tuned`` is the swap's tuned generator or model, when one is handed in.
    """
    from generators.backends import GENERATORS
    from generators.base import IMAGE_ENCODERS, IMAGE_TOKENS, UNDERSTANDING, require

    if generator is None:
        generator = GENERATORS.get(experiment_config.generator.backend)

    backend = experiment_config.generator.backend if isinstance(generator, type) else None
    if "understanding" in config.probes:
        if not experiment_config.prompts.occupation_list():
            raise UserError("the understanding probe needs occupations: set prompts.occupations or "
                            "prompts.occupations_file in the experiment config")
        require(generator, UNDERSTANDING, "the understanding probe (drop 'understanding' from locate.probes otherwise)",
                backend)
    if "controlled" in config.probes:
        from debias.locate.controlled import NEEDED_BY

        require(generator, IMAGE_TOKENS, NEEDED_BY, backend)
    answerer = config.understanding.model
    if "understanding" in config.probes and answerer and not Path(answerer).exists() and (
            answerer.startswith((".", "/", "~")) or answerer.count("/") != 1):
        raise UserError(f"config key 'locate.understanding.model': '{answerer}' does not exist; pass a model folder "
                        "or a hub id (org/name), or leave it empty to ask the generator itself")
    if "vision" in config.probes:
        config.vision.check_data()
        if isinstance(generator, type):
            require(generator, IMAGE_ENCODERS, "the vision-encoder probe (drop 'vision' from locate.probes otherwise)",
                    backend)
        else:
            config.vision.check_encoders(generator)
    if "swap" in config.probes and tuned is None and not (config.swap.tuned_model or config.swap.tuned_adapter):
        raise UserError("the component swap needs the fine-tuned model: set locate.swap.tuned_model or "
                        "locate.swap.tuned_adapter")
    if "swap" in config.probes:
        from dataclasses import replace

        from generators.backends import check_generator_config
        from generators.base import COMPONENTS

        require(generator, COMPONENTS, "the component swap (drop 'swap' from locate.probes otherwise)", backend)
        if tuned is None:  # the tuned side loads like the base (see swap.load_tuned): the same checks
            gcfg = experiment_config.generator
            if config.swap.tuned_adapter:
                check_generator_config(replace(gcfg, adapter=config.swap.tuned_adapter, merge_adapter=True))
            else:
                check_generator_config(replace(gcfg, model=config.swap.tuned_model))
    if config.audit:
        read_audit(config.audit)
    if "controlled" in config.probes:
        from audit.prompts import explicit_prompt, groups

        for a in config.controlled.attributes:
            groups(a)
        # Explicit variants replace the neutral word; fail now if a prompt has none.
        for p in experiment_config.prompts.neutral_prompts():
            explicit_prompt(p, "x", experiment_config.prompts.neutral_word)


def _answerer(experiment_config, config: LocateConfig, generator):
    """The generator that answers the understanding questions: ``locate.understanding.model`` loaded like the
    generator (its backend and sampling settings; no adapter: one trained for the generation checkpoint does not
    apply to another), or the generator itself."""
    if not config.understanding.model:
        return generator
    from dataclasses import replace

    from generators.backends import load_generator

    return load_generator(replace(experiment_config.generator, model=config.understanding.model, adapter=None,
                                  merge_adapter=False))


def run_locate(experiment_config, locate_config: LocateConfig | Mapping | None, out_dir: str | Path,
               generator=None, classifier=None, *, tuned=None, audit_metrics: Mapping | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Run the configured locate probes; write ``locate.json``, ``locate.html``, ``locate.md`` and per-probe JSON.

    Args:
        experiment_config: :class:`debias.config.ExperimentConfig` (generator, prompts, classifier, ...).
        locate_config: :class:`LocateConfig` (or a mapping of its fields); defaults when None.
        out_dir: output folder (created; re-running overwrites the locate files, the audits resume).
        generator: the generator to probe (loaded from the config when None).
        classifier: the audit classifier (loaded from the config when needed and None).
        tuned: for the swap, the fine-tuned generator or model (instead of ``locate.swap.tuned_model``).
        audit_metrics: a ``run_audit`` metrics dict to compare against (instead of auditing or ``locate.audit``).
        progress: progress bars of the audits.

    Returns:
        The ``locate.json`` dict: ``probes``, ``config``, ``audit`` (source and RD per attribute), ``results``.

    Raises:
        UserError: bad config or input, checked before anything is written.
    """
    from audit.run import run_audit
    from audit.sample import write_run_metadata
    from audit.store import atomic_write_json, check_writable, crash_point
    from debias.locate import report
    from generators.backends import load_generator

    if locate_config is None:
        locate_config = LocateConfig()
    elif isinstance(locate_config, Mapping):
        locate_config = from_dict(LocateConfig, dict(locate_config), prefix="locate")
    out = check_writable(out_dir)
    # Every input before any model loads: the experiment, then what the probes need of the generator's backend.
    experiment_config.check(generator=generator is None)
    check_locate(experiment_config, locate_config, generator, tuned)
    generator = generator or load_generator(experiment_config.generator)
    check_locate(experiment_config, locate_config, generator, tuned)

    def get_classifier():
        nonlocal classifier
        if classifier is None:
            from audit.classify import ClipClassifier

            classifier = ClipClassifier(experiment_config.classifier)
        return classifier

    probes = [p for p in PROBES if p in locate_config.probes]
    out.mkdir(parents=True, exist_ok=True)
    audit_source = None
    if audit_metrics is not None:
        audit_source = "given"
    elif locate_config.audit:
        audit_metrics, audit_source = read_audit(locate_config.audit), str(locate_config.audit)
    elif "controlled" in probes or "understanding" in probes:
        audit_metrics = run_audit(experiment_config, out / "audit", generator=generator, classifier=get_classifier(),
                                  progress=progress, report=False)
        audit_source = "audit"
    model = experiment_config.generator.model or experiment_config.generator.backend
    stages = ProbeStages(out, experiment_config, locate_config, generator, tuned, audit_metrics)

    def run_probe(name: str) -> dict:
        if name == "understanding":
            r = understanding_probe(_answerer(experiment_config, locate_config, generator),
                                    experiment_config.prompts.occupation_list(), locate_config.understanding)
            return {**r, "model": locate_config.understanding.model or model}
        if name == "vision":
            return vision_probe(generator, locate_config.vision)
        if name == "controlled":
            return controlled_probe(
                generator, experiment_config.prompts.neutral_prompts(), locate_config.controlled,
                audit_metrics=audit_metrics, neutral_word=experiment_config.prompts.neutral_word,
                alpha=experiment_config.metrics.alpha)
        return component_swap(experiment_config, out / "swap", locate_config.swap, base=generator, tuned=tuned,
                              classifier=get_classifier(), progress=progress)

    results: dict[str, Any] = {}
    for name in probes:
        results[name] = stages.get(name)
        if results[name] is None:
            results[name] = stages.put(name, run_probe(name))
            crash_point(f"locate:{name}")
    if "understanding" in results:
        results["understanding"]["alignment"] = (
            alignment_table(results["understanding"], audit_metrics, experiment_config.prompts.template)
            if audit_metrics else None)
    # Each probe alone (<probe>.json / .html / .md), then everything in one report.
    sections = [report.write_probe(out, r, model=model) for r in results.values()]
    summary = {
        "probes": probes,
        "experiment": experiment_config.name,
        "model": model,
        "config": to_dict(locate_config),
        "audit": None if audit_metrics is None else {
            "source": audit_source,
            "rd": {a: b.get("rd") for a, b in (audit_metrics.get("attributes") or {}).items()},
        },
        "results": results,
    }
    atomic_write_json(out / "locate.json", summary)
    report.write_locate_report(out, sections, f"Locate: {experiment_config.name or model}", model, probes)
    write_run_metadata(out, experiment_config, " ".join(sys.argv), "locate",
                       {"probes": probes, "reused": stages.reused})
    return summary


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ProbeStages:
    """Finished probe results in ``OUT/stages``, keyed by everything a probe's result depends on.

    A key covers the probe's own settings, the generator's identity (model, adapter and weights hashes, sampling
    settings), the experiment (prompts, seeds, classifier, faces, metrics; not the other stages' sections), the audit
    metrics the probe reads and, for the swap, the tuned model. A result is stored as it is written to
    ``<probe>.json`` (a JSON round trip), so a reused result gives byte-identical reports. A swap against a tuned
    model handed in without an identity is never reused.
    """

    def __init__(self, out: Path, experiment_config, locate_config: LocateConfig, generator, tuned,
                 audit_metrics: Mapping | None):
        from generators.base import directory_hash

        exp = {k: v for k, v in to_dict(experiment_config).items() if k not in ("locate", "synth", "train", "name")}
        audit = _digest((audit_metrics or {}).get("attributes")) if audit_metrics else None
        base = {"generator": generator.identity(), "experiment": exp}
        swap = locate_config.swap
        if tuned is not None:
            tuned_id = tuned.identity() if hasattr(tuned, "identity") else None
        else:
            tuned_id = {p: (directory_hash(v) if v and Path(v).exists() else v)
                        for p, v in (("model", swap.tuned_model), ("adapter", swap.tuned_adapter))}
        self.folder = out / "stages"
        self.keys: dict[str, str | None] = {}
        for name in PROBES:
            inputs = {**base, "probe": name, "settings": to_dict(getattr(locate_config, name)),
                      "audit": audit if name in ("understanding", "controlled") else None}
            if name == "swap":
                inputs["tuned"] = tuned_id
            self.keys[name] = None if name == "swap" and tuned_id is None else _digest(inputs)
        self.reused: list[str] = []

    def _path(self, name: str) -> Path | None:
        key = self.keys[name]
        return None if key is None else self.folder / f"{name}-{key}.json"

    def get(self, name: str) -> dict | None:
        """The stored result of probe ``name`` for these inputs, or None (not run, or unreadable)."""
        from audit.store import read_json, say

        path = self._path(name)
        if path is None or not path.is_file():
            return None
        saved = read_json(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("result"), dict):
            say(f"probe stage '{path}' is unreadable (truncated or edited); running the {name} probe again")
            return None
        self.reused.append(name)
        return saved["result"]

    def put(self, name: str, result: dict) -> dict:
        """Store a fresh result; returns it as stored (JSON round trip)."""
        from audit.store import atomic_write_bytes

        result = json.loads(json.dumps(result, default=str))
        path = self._path(name)
        if path is not None:  # keys in the result's own order (the reports list them in that order)
            record = {"probe": name, "key": self.keys[name], "result": result}
            atomic_write_bytes(path, (json.dumps(record, indent=1, default=str) + "\n").encode())
        return result


__all__ = ["LocateConfig", "PROBES", "ProbeStages", "check_locate", "read_audit", "run_locate"]
