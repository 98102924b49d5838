"""Sharing: a fixed model as an adapter folder with a Hub model card, an audit as a `datasets` data set; both read
back the way a recipient would read them (huggingface_hub's card parser, PEFT, load_from_disk, load_dataset)."""

import json
import subprocess
import sys

import pytest
import torch

from generators.config import UserError

pytestmark = pytest.mark.slow  # one tiny training run and two audits, shared by the tests (about a minute)

PROMPTS = ["nurse", "pilot"]


def audit_config(**generator):
    from debias.config import ExperimentConfig
    from generators.config import from_dict

    return from_dict(ExperimentConfig, {
        "name": "share-test",
        "generator": {"backend": "janus", "model": "tiny", "device": "cpu", "batch_size": 4,
                      "sampling": {"guidance_scale": 1.0}, **generator},
        "prompts": {"occupations": PROMPTS}, "images_per_prompt": 4, "faces": {"detector": "none"},
        "classifier": {"model": "tiny", "attributes": ["gender", "race"], "abstain_threshold": 0.51},
        "metrics": {"n_boot": 50}, "card": {"enabled": False},
    })


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A real fix on the tiny Janus: SFT for 2 steps on a balanced set, then audits before and after, compared."""
    import datasets
    from PIL import Image

    from audit.compare import run_compare
    from audit.run import run_audit
    from debias.train.config import TrainConfig
    from debias.train.run import run_train
    from generators.config import from_dict

    root = tmp_path_factory.mktemp("share")
    rows = {k: [] for k in ("prompt", "explicit_prompt", "attribute", "group", "seed", "confidence", "image",
                            "tokens")}
    g = torch.Generator().manual_seed(0)
    for occupation in PROMPTS:
        prompt = f"A photo of the face of a {occupation}, a person"
        for group in ("male", "female"):
            for seed in range(2):
                for k, v in (("prompt", prompt), ("explicit_prompt", prompt.replace("person", group)),
                             ("attribute", "gender"), ("group", group), ("seed", seed), ("confidence", 0.9),
                             ("image", Image.new("RGB", (8, 8))),
                             ("tokens", torch.randint(0, 64, (16,), generator=g).tolist())):
                    rows[k].append(v)
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(root / "data"))
    train = from_dict(TrainConfig, {"method": "sft", "dataset": str(root / "data"), "batch_size": 4,
                                    "lora": {"r": 4, "alpha": 8}, "sft": {"max_steps": 2, "learning_rate": 1e-2}},
                      prefix="train")
    adapter = run_train(train, audit_config().generator, root / "train")
    before = run_audit(audit_config(), root / "before", progress=False)
    after = run_audit(audit_config(adapter=str(adapter)), root / "after", progress=False)
    run_compare(root / "before", root / "after", root / "compare")
    return root, adapter, before, after


def test_model_card_reads_back_as_hub_metadata_and_the_folder_loads_as_the_adapter(fixed):
    from huggingface_hub import ModelCard

    from debias.share import write_model_card
    from generators.janus import JanusGenerator

    root, adapter, before, after = fixed
    out = write_model_card(adapter, root / "model", root / "before", root / "after", compare=root / "compare")
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-to-image"
    assert "debias-t2i" in meta["tags"] and "base_model" not in meta  # a built-in tiny model is no hub id
    # every attribute with an RD in both audits (at threshold 0.51 the tiny classifier abstains on every race)
    measured = [n for n in before["attributes"] if before["attributes"][n]["rd"] is not None
                and after["attributes"][n]["rd"] is not None]
    assert "gender" in measured and sorted(meta["debias_audit"]) == sorted(measured)
    for attribute in measured:
        numbers = meta["debias_audit"][attribute]
        assert numbers["before"] == before["attributes"][attribute]["rd"]
        assert numbers["after"] == after["attributes"][attribute]["rd"]
        assert numbers["after_ci"] == after["attributes"][attribute]["rd_ci"]
        assert numbers["p_value"] is not None
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["gender_rd"] == round(after["attributes"]["gender"]["rd"], 4)
    lo, hi = before["attributes"]["gender"]["rd_ci"]
    assert f"| gender | {before['attributes']['gender']['rd']:.3f} [{lo:.3f}, {hi:.3f}] |" in card.text
    assert "method: sft" in card.text and "max_steps: 2" in card.text  # the training config
    assert f"torch {torch.__version__}" in card.text  # package versions
    assert "no classifier bias card was measured" in card.text  # card.enabled was false in these audits

    # The folder is the adapter: loading it gives the same model as loading the training run's adapter.
    cfg = audit_config().generator
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    prompts = ["A photo of the face of a nurse, a person"] * 2
    from dataclasses import replace

    shared = JanusGenerator(replace(cfg, adapter=str(out))).logprobs(prompts, tokens)
    trained = JanusGenerator(replace(cfg, adapter=str(adapter))).logprobs(prompts, tokens)
    assert torch.equal(shared, trained)


def test_audit_exports_as_a_dataset_that_load_from_disk_and_parquet_read_back(fixed, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    from audit.export import PARQUET, export_audit

    root, _, before, _ = fixed
    out = export_audit(root / "before", tmp_path / "export", images=True)
    predictions = json.loads((root / "before" / "predictions.json").read_text())
    disk = datasets.load_from_disk(str(out))
    parquet = datasets.load_dataset("parquet", data_files=str(out / PARQUET), split="train")
    for ds in (disk, parquet):
        assert len(ds) == len(predictions) == 8
        assert ds.features["pred_gender"].names == ["male", "female"]
        assert ds.features["pred_race"].names == ["White", "Black", "Indian", "Asian"]
        assert ds["key"] == [p["key"] for p in predictions] and ds["seed"] == [p["seed"] for p in predictions]
        assert ds["nsfw"] == [None] * 8  # no safety checker ran on this Janus model
        for row, pred in zip(ds, predictions):
            assert row["face"] is True and abs(sum(row["probs_gender"]) - 1) < 1e-5
            assert row["pred_gender"] == (-1 if pred["gender"] is None else ["male", "female"].index(pred["gender"]))
            assert row["abstain_gender"] == (pred["gender"] is None)  # threshold 0.51: some faces abstain
            assert row["image"].size == (8, 8)
    assert any(disk["abstain_gender"]) or any(p is not None for p in disk["pred_gender"])
    # the shares the audit reported are the shares of the exported predictions
    nurse = [r for r in disk if "nurse" in r["prompt"] and r["pred_gender"] >= 0]
    block = next(p for p in before["attributes"]["gender"]["per_prompt"] if "nurse" in p["prompt"])
    if nurse:
        assert block["shares"][1] == pytest.approx(sum(r["pred_gender"] == 1 for r in nurse) / len(nurse))
    card = DatasetCard.load(out / "README.md")
    assert card.data.to_dict()["configs"][0]["data_files"][0]["path"] == PARQUET
    assert "| gender |" in card.text and "generator" in card.text


def test_cli_export_and_card_write_the_folder_then_report_a_failed_push(fixed, tmp_path):
    root, adapter, _, _ = fixed
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "debias.cli"]
    res = subprocess.run([*cmd, "export", str(root / "after"), "--out", str(tmp_path / "plain")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
    assert (tmp_path / "plain" / "data" / "train-00000-of-00001.parquet").is_file()
    res = subprocess.run([*cmd, "export", str(root / "after"), "--out", str(tmp_path / "ds"), "--push-to-hub",
                          "someone/audit"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and (tmp_path / "ds" / "README.md").is_file()
    assert res.stderr.strip().count("\n") == 0 and "--push-to-hub someone/audit: the upload failed" in res.stderr
    assert f"the folder '{tmp_path / 'ds'}' is complete" in res.stderr
    res = subprocess.run([*cmd, "card", "--adapter", str(adapter), "--before", str(root / "before"), "--after",
                          str(root / "after"), "--out", str(tmp_path / "model")], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "model").iterdir()}


def test_card_names_the_missing_input():
    from debias.share import write_model_card

    with pytest.raises(UserError, match=r"--adapter 'nope': no adapter_config.json \(PEFT\) or "
                                        r"pytorch_lora_weights.safetensors \(diffusers\) there"):
        write_model_card("nope", "out", "b", "a")
