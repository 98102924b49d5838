"""`--set KEY=VALUE` on every subcommand that reads an experiment config: each override reaches what it names."""

import json

import pytest

from debias.cli import main

SMOKE = "configs/experiments/smoke-janus.yaml"
LAB = "configs/experiments/lab.yaml"


def test_sample_and_audit_take_set_overrides(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert main(["sample", "--config", SMOKE, "--out", str(tmp_path / "s"), "--quiet",
                 "--set", "images_per_prompt=3", "--set", "prompts.limit=2"]) == 0
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["settings"]["images_by_prompt"] == {p: 3 for p in run["settings"]["images_by_prompt"]}
    assert len(run["settings"]["images_by_prompt"]) == 2 and run["settings"]["seeds"] == [0, 1, 2]
    # The short flag is sugar over the same override; --set wins when both are given.
    assert main(["audit", "--config", SMOKE, "--out", str(tmp_path / "a"), "--quiet", "--images-per-prompt", "5",
                 "--set", "images_per_prompt=2", "--set", "prompts.limit=1", "--set", "card.enabled=false",
                 "--set", "generator.sampling.guidance_scale=1.5"]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["run"]["guidance_scale"] == 1.5 and metrics["run"]["images_per_prompt"] == 2
    # The resolved sampling settings are recorded with their defaults applied, in run.json and metrics.json alike.
    assert metrics["run"]["sampling"]["top_k"] == 0 and metrics["run"]["sampling"]["guidance_scale"] == 1.5
    assert json.loads((tmp_path / "a" / "run.json").read_text())["settings"] == {
        k: metrics["run"][k] for k in json.loads((tmp_path / "a" / "run.json").read_text())["settings"]}


@pytest.mark.slow
def test_synth_train_and_locate_take_set_overrides(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    synth = tmp_path / "synth"
    assert main(["synth", "--config", LAB, "--out", str(synth), "--quiet", "--set", "synth.per_cell=2",
                 "--set", "synth.max_rounds=1", "--set", "synth.prompts.occupations=[nurse, pilot]",
                 "--set", "synth.min_confidence=0.5"]) == 0
    manifest = json.loads((synth / "synth.json").read_text())
    assert manifest["n_prompts"] == 2 and 0 < manifest["n_rows"] <= 2 * 2 * 2
    train = tmp_path / "train"
    # Keys of the train section may drop their prefix on `debias train`.
    assert main(["train", "--config", LAB, "--out", str(train), "--set", f"dataset={synth / 'dataset'}",
                 "--set", "method=sft", "--set", "sft.max_steps=1", "--set", "batch_size=2"]) == 0
    info = json.loads((train / "sft" / "adapter" / "train_info.json").read_text())
    assert info["global_step"] == 1
    locate = tmp_path / "locate"
    assert main(["locate", "--config", LAB, "--out", str(locate), "--set", "locate.probes=[understanding]",
                 "--set", "locate.understanding.samples=2", "--set", "prompts.occupations=[nurse]",
                 "--set", "images_per_prompt=2", "--set", "card.enabled=false"]) == 0
    result = json.loads((locate / "locate.json").read_text())
    assert result["probes"] == ["understanding"]
    assert [r["occupation"] for r in result["results"]["understanding"]["attributes"]["gender"]["per_occupation"]] == [
        "nurse"]


def test_bad_set_is_one_line_and_writes_nothing(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    out = tmp_path / "run"
    assert main(["sample", "--config", SMOKE, "--out", str(out), "--set", "images_per_prompt"]) == 2
    assert main(["audit", "--config", SMOKE, "--out", str(out), "--set", "generator.sampling.guidanse_scale=2"]) == 2
    assert main(["config", "--check", SMOKE, "--set", "images_per_prompt=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "debias sample: error: --set 'images_per_prompt': expected KEY=VALUE, e.g. --set images_per_prompt=16",
        "debias audit: error: config key 'generator.sampling.guidanse_scale' is unknown; did you mean "
        "'guidance_scale'?; known keys: do_sample, guidance_scale, prompt_template, temperature, top_k, top_p",
        "debias config: error: config key 'images_per_prompt': must be a positive integer, got 0",
    ]
    assert not out.exists()
