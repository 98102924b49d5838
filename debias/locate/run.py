"""``debias locate``: run any subset of the locate probes on one generator and write one report.

Output folder::

    OUT/locate.json        everything: config, audit summary, each probe's result
    OUT/locate.html        self-contained report (one section per probe)
    OUT/locate.md          Markdown summary
    OUT/<probe>.json       each probe's result alone (understanding, vision, controlled, swap), with its own
                           <probe>.html / <probe>.md page
    OUT/audit/             the generation audit the probes compare against (unless locate.audit names one)
    OUT/swap/<cell>/       the four audited cells of the component swap

Config: the experiment (generator, prompts, images_per_prompt, classifier, metrics) plus a ``locate`` section
(:class:`LocateConfig`), both in one experiment YAML (see ``configs/experiments/locate-smoke-janus.yaml``).
"""

from __future__ import annotations

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


def _read_audit(source: str) -> dict:
    p = Path(source)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise UserError(f"config key 'locate.audit': '{source}' is not a metrics.json or a run folder with one; run "
                        "`debias audit` first or leave it empty to audit now")
    return json.loads(p.read_text())


def _check(experiment_config, config: LocateConfig, generator, tuned) -> None:
    """Every problem a probe would hit, raised before any output is written."""
    from generators.base import IMAGE_TOKENS, UNDERSTANDING, require

    if "understanding" in config.probes:
        if not experiment_config.prompts.occupation_list():
            raise UserError("the understanding probe needs occupations: set prompts.occupations or "
                            "prompts.occupations_file in the experiment config")
        require(generator, UNDERSTANDING, "the understanding probe (drop 'understanding' from locate.probes otherwise)")
    if "controlled" in config.probes:
        from debias.locate.controlled import NEEDED_BY

        require(generator, IMAGE_TOKENS, NEEDED_BY)
    answerer = config.understanding.model
    if "understanding" in config.probes and answerer and not Path(answerer).exists() and (
            answerer.startswith((".", "/", "~")) or answerer.count("/") != 1):
        raise UserError(f"config key 'locate.understanding.model': '{answerer}' does not exist; pass a model folder "
                        "or a hub id (org/name), or leave it empty to ask the generator itself")
    if "vision" in config.probes:
        config.vision.check_data()
        config.vision.check_encoders(generator)
    if "swap" in config.probes and tuned is None and not (config.swap.tuned_model or config.swap.tuned_adapter):
        raise UserError("the component swap needs the fine-tuned model: set locate.swap.tuned_model or "
                        "locate.swap.tuned_adapter")
    if config.audit:
        _read_audit(config.audit)
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
    from audit.sample import write_run_metadata
    from audit.run import run_audit
    from audit.store import atomic_write_json, check_writable
    from debias.locate import report
    from generators.backends import load_generator

    if locate_config is None:
        locate_config = LocateConfig()
    elif isinstance(locate_config, Mapping):
        locate_config = from_dict(LocateConfig, dict(locate_config), prefix="locate")
    out = check_writable(out_dir)
    generator = generator or load_generator(experiment_config.generator)
    _check(experiment_config, locate_config, generator, tuned)

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
        audit_metrics, audit_source = _read_audit(locate_config.audit), str(locate_config.audit)
    elif "controlled" in probes or "understanding" in probes:
        audit_metrics = run_audit(experiment_config, out / "audit", generator=generator, classifier=get_classifier(),
                                  progress=progress, report=False)
        audit_source = "audit"
    model = experiment_config.generator.model or experiment_config.generator.backend
    results: dict[str, Any] = {}
    if "understanding" in probes:
        r = understanding_probe(_answerer(experiment_config, locate_config, generator),
                                experiment_config.prompts.occupation_list(), locate_config.understanding)
        r["model"] = locate_config.understanding.model or model
        r["alignment"] = (alignment_table(r, audit_metrics, experiment_config.prompts.template)
                          if audit_metrics else None)
        results["understanding"] = r
    if "vision" in probes:
        results["vision"] = vision_probe(generator, locate_config.vision)
    if "controlled" in probes:
        results["controlled"] = controlled_probe(
            generator, experiment_config.prompts.neutral_prompts(), locate_config.controlled,
            audit_metrics=audit_metrics, neutral_word=experiment_config.prompts.neutral_word,
            alpha=experiment_config.metrics.alpha)
    if "swap" in probes:
        results["swap"] = component_swap(experiment_config, out / "swap", locate_config.swap, base=generator,
                                         tuned=tuned, classifier=get_classifier(), progress=progress)
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
    write_run_metadata(out, experiment_config, " ".join(sys.argv), "locate", {"probes": probes})
    return summary


__all__ = ["LocateConfig", "PROBES", "run_locate"]
