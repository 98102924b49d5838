"""Reproducing an audit later: dtype auto, weight variants, and per-model provenance (the hub snapshot commit, or a
content hash of a local folder) recorded in run.json / metrics.json and shown in the report."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from generators.base import GeneratorConfig, resolve_dtype
from generators.config import ConfigError, UserError


def test_dtype_auto_is_float32_on_the_cpu_and_half_precision_on_gpus():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "mps") == "float16"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float16", "cuda:1") == "float16"
    if torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    with pytest.raises(ConfigError, match=r"config key 'generator.dtype': float16 on the CPU is slow.*dtype: auto"):
        resolve_dtype("float16", "cpu")


def test_dtype_auto_on_the_cpu_keeps_the_float32_image_keys():
    """``auto`` resolves before anything is keyed: on the CPU it is the same run as an explicit float32."""
    from audit.store import content_key
    from generators.janus import JanusGenerator

    auto = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", dtype="auto"))
    explicit = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", dtype="float32"))
    assert auto.dtype == "float32" and auto.identity()["dtype"] == "float32"
    assert content_key(auto.identity(), "p", 0) == content_key(explicit.identity(), "p", 0)
    assert auto.provenance()["generator"]["dtype"] == "float32"


def test_variant_selects_the_weight_files_from_pretrained_reads(tmp_path):
    """A folder with only fp16-variant files (``model.fp16.safetensors``, as SD 1.5 ships beside fp32 ones)
    loads with ``variant: fp16`` and fails without it: the option reaches from_pretrained."""
    from generators.janus import JanusGenerator
    from generators.tiny import tiny_janus

    model, tokenizer = tiny_janus(seed=0)
    model.save_pretrained(tmp_path, variant="fp16")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.fp16.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    config = GeneratorConfig(backend="janus", model=str(tmp_path), device="cpu", variant="fp16")
    gen = JanusGenerator(config)
    assert gen.provenance()["generator"]["variant"] == "fp16" and gen.identity()["variant"] == "fp16"
    with pytest.raises(UserError, match=r"config key 'generator.model': cannot load .*no file named model.safetensors"):
        JanusGenerator(replace(config, variant=None))


def audit_yaml(path: Path, model: str) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "provenance", "generator": {"backend": "janus", "model": model, "device": "cpu", "batch_size": 2,
                                            "sampling": {"guidance_scale": 1.0}},
        "prompts": {"occupations": ["nurse"]}, "images_per_prompt": 2, "faces": {"detector": "none"},
        "classifier": {"model": "tiny"}, "metrics": {"n_boot": 20}, "card": {"enabled": False},
    }))
    return path


def models_of(run: Path) -> dict:
    meta, metrics = json.loads((run / "run.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert meta["settings"]["models"] == metrics["run"]["models"]  # one record, in both files
    return meta["settings"]["models"]


def test_local_model_folder_is_pinned_by_a_content_hash(tmp_path):
    """Two audits of the same local folder record the same hash; after the weights change, another one."""
    from audit.run import run_audit
    from debias.config import load_config
    from generators.tiny import tiny_janus

    folder = tmp_path / "model"
    model, tokenizer = tiny_janus(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = load_config(audit_yaml(tmp_path / "a.yaml", str(folder)))
    run_audit(config, tmp_path / "one", progress=False)
    run_audit(config, tmp_path / "two", progress=False)
    one, two = models_of(tmp_path / "one"), models_of(tmp_path / "two")
    assert one == two
    gen = one["generator"]
    assert gen["source"] == "local" and len(gen["revision"]) == 16
    assert (gen["dtype"], gen["device"], gen["variant"]) == ("float32", "cpu", None)
    assert one["classifier"]["source"] == "built-in" and one["classifier"]["revision"]
    assert one["face_detector"]["model"] == "none (whole image)"
    # the report header and run block show what the model resolved to
    html = (tmp_path / "one" / "report.html").read_text()
    assert gen["revision"] in html.split("</header>")[0] and "Resolved revision" in html
    md = (tmp_path / "one" / "report.md").read_text()
    assert f"**Model** `{folder}` @ `{gen['revision']}` (float32 on cpu)" in md

    edited, _ = tiny_janus(seed=1)  # retrained weights, same folder
    edited.save_pretrained(folder)
    run_audit(config, tmp_path / "three", progress=False)
    assert models_of(tmp_path / "three")["generator"]["revision"] != gen["revision"]


def test_the_opencv_detector_is_pinned_by_its_cascade_file():
    from audit.faces import FaceConfig, load_detector
    from generators.base import directory_hash

    detector = load_detector(FaceConfig(detector="opencv"))
    record = detector.provenance()
    assert record["model"] == "haarcascade_frontalface_default.xml" and record["source"] == "local"
    assert record["revision"] == directory_hash(detector.path) and record["runtime"].startswith("opencv ")


def test_hub_model_records_the_snapshot_commit_it_loaded_offline(tmp_path):
    """A hub id loads from the local hub cache (no network) and the audit records the snapshot's commit."""
    from generators.tiny import tiny_janus

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--debias-test--tiny-janus"
    model, tokenizer = tiny_janus(seed=0)
    model.save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    cfg = audit_yaml(tmp_path / "a.yaml", "debias-test/tiny-janus")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "debias.cli", "audit", "--config", str(cfg), "--out",
                          str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    gen = models_of(tmp_path / "run")["generator"]
    assert gen == {"model": "debias-test/tiny-janus", "source": "hub", "requested_revision": None,
                   "revision": commit, "dtype": "float32", "device": "cpu", "variant": None}
