"""``debias methods``: every fix method on a lab world, from the same balanced data, in one table.

All methods start from the same base model, train on the same synthetic set (or sample on-policy, for ``freq``),
and are audited on the same prompts and seeds, so the rows differ only by the objective.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Sequence

from audit.adherence import explicit_adherence
from audit.report import render_markdown
from audit.store import atomic_write_bytes, atomic_write_json, check_writable
from debias.config import load_config
from debias.demo import EXPLICIT_IMAGES, single_thread, train_fix, world_config

# The methods compared on each world (``train.method`` values of that world's trainer).
WORLD_METHODS = {"janus": ("sft", "sft+bpo", "bpo", "freq", "sft+freq"),
                 "diffusion": ("sft", "sft+bpo", "dpo", "align")}
TEMPLATES = Path(__file__).resolve().parent / "templates"


def run_methods(out: str | Path, methods: Sequence[str] | None = None, config_path: str | Path | None = None,
                progress: bool = True, overrides: dict | None = None, world: str = "janus") -> dict[str, Any]:
    """Train and audit each method; write ``methods.json`` and ``methods.md`` into ``out``.

    Args:
        out: The folder; one sub-folder per method.
        methods: ``train.method`` values to compare (default: the world's, :data:`WORLD_METHODS`).
        config_path: The experiment config (default: the world's).
        progress: Progress bars.
        overrides: Dotted config keys -> values applied to the experiment config (``debias methods --set``).
        world: ``janus`` or ``diffusion``.
    """
    from audit.classify import ClipClassifier
    from audit.run import run_audit
    from debias.synth import check_synth, run_synth
    from generators.backends import load_generator

    config_path = config_path or world_config(world)
    methods = methods or WORLD_METHODS[world]
    out = check_writable(out)
    config = load_config(config_path, overrides)
    config.check()  # every input before the first model loads
    check_synth(config)
    single_thread()
    generator = load_generator(config.generator)
    classifier = ClipClassifier(config.classifier)
    before = run_audit(config, out / "before", progress=progress, generator=generator, classifier=classifier)
    adherence = explicit_adherence(config, out / "explicit-before", generator, classifier, EXPLICIT_IMAGES, progress)
    synth = run_synth(config, out / "synth", generator=generator, classifier=classifier, progress=progress)

    def row(name: str, metrics: dict, adh: dict, seconds: float | None) -> dict:
        a = metrics["attributes"]
        return {"method": name, "gender_rd": a["gender"]["rd"], "gender_rd_ci": a["gender"]["rd_ci"],
                "race_rd": a["race"]["rd"], "race_rd_ci": a["race"]["rd_ci"],
                "explicit_gender": adh["gender"], "explicit_race": adh["race"],
                "clip_score": (metrics.get("quality") or {}).get("clip_score"), "train_s": seconds}

    rows = [row("base (before)", before, adherence, None)]
    for method in methods:
        train = copy.deepcopy(config.train)
        train.method, train.dataset = method, synth["dataset"]
        t0 = time.perf_counter()
        adapter = train_fix(train, config.generator, out / method / "train", classifier)
        seconds = time.perf_counter() - t0
        cfg = copy.deepcopy(config)
        cfg.generator.adapter = str(adapter)
        tuned = load_generator(cfg.generator)
        metrics = run_audit(cfg, out / method / "after", progress=progress, generator=tuned, classifier=classifier)
        adh = explicit_adherence(cfg, out / method / "explicit", tuned, classifier, EXPLICIT_IMAGES, progress)
        rows.append(row(method, metrics, adh, seconds))

    md = render_markdown("methods.md.j2", TEMPLATES, rows=rows)
    table = {"rows": rows, "markdown": md.removesuffix("\n"), "synth": {"n_rows": synth["n_rows"]}}
    atomic_write_json(out / "methods.json", table)
    atomic_write_bytes(out / "methods.md", md.encode())
    return table
