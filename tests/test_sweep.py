"""Guidance sweep: one audit per scale on the seeded tiny Janus, gathered in sweep.json and the sweep.md table."""

from __future__ import annotations

import json
import re

import pytest

from debias.config import load_config
from debias.sweep import run_guidance_sweep
from generators.config import UserError


def test_sweep_audits_each_scale_and_writes_one_table(tmp_path, repo_root):
    config = load_config(repo_root / "configs/experiments/smoke-janus.yaml", {"images_per_prompt": 2})
    config.metrics.n_boot = 20
    table = run_guidance_sweep(config, tmp_path, [1, 2.5], progress=False)
    assert [r["guidance_scale"] for r in table["rows"]] == [1.0, 2.5]
    for scale, row in zip(("1", "2.5"), table["rows"]):
        metrics = json.loads((tmp_path / f"g{scale}" / "metrics.json").read_text())
        assert row["gender_rd"] == metrics["attributes"]["gender"]["rd"]
    lines = (tmp_path / "sweep.md").read_text().splitlines()
    assert (tmp_path / "sweep.md").read_text() == table["markdown"] + "\n"
    assert json.loads((tmp_path / "sweep.json").read_text()) == table
    assert lines[0] == ("| guidance | gender RD (lower is better) | race RD (lower is better) | "
                        "gender_race RD (lower is better) | CLIP score |")
    assert lines[1] == "|---:|---:|---:|---:|---:|"
    rd, (lo, hi) = table["rows"][1]["gender_rd"], table["rows"][1]["gender_rd_ci"]
    assert lines[3].startswith(f"| 2.5 | {rd:.3f} [{lo:.3f}, {hi:.3f}] |")
    assert re.fullmatch(r"\| 1 \|( \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|){3} \d+\.\d{2} \|", lines[2])
    with pytest.raises(UserError, match="--guidance: give one or more scales >= 1"):
        run_guidance_sweep(config, tmp_path / "bad", [0.5])
