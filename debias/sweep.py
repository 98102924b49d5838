"""Guidance sweep: the same prompts and seeds audited at several classifier-free guidance scales.

Guidance is a bias knob, not only a quality one: on the lab world a higher scale amplified the planted skew, so
audits record their scale and this sweep makes the dependence one command.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

from audit.report import render_markdown
from audit.store import atomic_write_bytes, atomic_write_json, check_writable
from generators.config import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"


def run_guidance_sweep(config, out: str | Path, scales: Sequence[float], progress: bool = True,
                       classifier=None) -> dict[str, Any]:
    """Audit ``config`` once per guidance scale into ``out/g<scale>``; write ``sweep.json`` and ``sweep.md``."""
    from audit.classify import ClipClassifier
    from audit.run import run_audit

    out = check_writable(out)
    for s in scales:
        if not math.isfinite(s):
            raise UserError(f"--guidance: {s} is not a finite number; use a finite number >= 1 for each scale")
    if not scales or any(s < 1 for s in scales):
        raise UserError(f"--guidance: give one or more scales >= 1 (1 disables guidance), got {list(scales)}")
    configs = []
    for scale in scales:
        cfg = copy.deepcopy(config)
        cfg.generator.sampling = {**cfg.generator.sampling, "guidance_scale": float(scale)}
        cfg.check()  # every scale's config, before the first audit starts
        configs.append(cfg)
    classifier = classifier or ClipClassifier(config.classifier)
    rows = []
    for scale, cfg in zip(scales, configs):
        metrics = run_audit(cfg, out / f"g{scale:g}", progress=progress, classifier=classifier)
        row: dict[str, Any] = {"guidance_scale": float(scale)}
        for name, block in metrics["attributes"].items():
            row[f"{name}_rd"], row[f"{name}_rd_ci"] = block["rd"], block["rd_ci"]
        row["clip_score"] = (metrics.get("quality") or {}).get("clip_score")
        rows.append(row)
    attrs = [k[:-3] for k in rows[0] if k.endswith("_rd")]
    md = render_markdown("sweep.md.j2", TEMPLATES, rows=rows, attrs=attrs)
    table = {"rows": rows, "markdown": md.removesuffix("\n")}
    atomic_write_json(out / "sweep.json", table)
    atomic_write_bytes(out / "sweep.md", md.encode())
    return table
