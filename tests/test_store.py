"""Run store: content keys, resume after SIGKILL, extension, multi-process sharding."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from audit.sample import run_sample, sample_to_store, seed_blocks
from audit.store import RunStore
from debias.config import load_config

SMOKE = {
    "generator": {"backend": "janus", "model": "tiny", "device": "cpu", "batch_size": 4,
                  "sampling": {"guidance_scale": 2.0}},
    "prompts": {"occupations": ["nurse", "senator", "butcher"]},
    "images_per_prompt": 12,
}


def write_config(path: Path, **overrides) -> Path:
    cfg = {**SMOKE, **overrides}
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(run: Path) -> dict:
    """key -> (record without timing, PNG bytes)."""
    out = {}
    for rec_path in sorted((run / "samples" / "records").glob("*.json")):
        rec = json.loads(rec_path.read_text())
        rec.pop("seconds")
        out[rec["key"]] = (rec, (run / rec["file"]).read_bytes())
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "debias.cli", *args]


def test_seed_blocks_follow_seed_index():
    assert seed_blocks([0, 1, 2, 3, 4, 5, 9], 4) == [[0, 1, 2, 3], [4, 5], [9]]
    assert seed_blocks([5, 4], 4) == [[4, 5]]


def test_rerun_skips_and_more_seeds_sample_only_new(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", images_per_prompt=4)
    store, keys = run_sample(load_config(cfg_path), tmp_path / "run", progress=False)
    first = snapshot(tmp_path / "run")
    assert len(first) == 12 == len(set(keys))
    mtimes = {k: store.record_path(k).stat().st_mtime_ns for k in keys}
    run_sample(load_config(cfg_path), tmp_path / "run", progress=False)
    assert {k: store.record_path(k).stat().st_mtime_ns for k in keys} == mtimes  # nothing rewritten
    store, more = run_sample(load_config(cfg_path, {"images_per_prompt": 6}), tmp_path / "run", progress=False)
    assert set(keys) < set(more) and len(more) == 18
    assert {k: store.record_path(k).stat().st_mtime_ns for k in keys} == mtimes  # old ones untouched
    rec = store.get(more[-1])
    assert rec["seed"] == 5 and rec["generator"]["backend"] == "janus" and len(rec["tokens"]) == 16
    assert store.verify(rec)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["stages"]["sample"]["images"] == 18 and meta["environment"]["versions"]["torch"]


def test_sigkill_at_random_point_then_resume_is_identical(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", images_per_prompt=24)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cli("sample", "--config", str(cfg), "--out", str(tmp_path / "ref"), "--quiet"),
                   check=True, env=env, capture_output=True)
    reference = snapshot(tmp_path / "ref")
    assert len(reference) == 72

    target = random.Random(os.getpid()).randint(1, 60)
    proc = subprocess.Popen(cli("sample", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "run" / "samples" / "records"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if records.is_dir() and len(list(records.glob("*.json"))) >= target:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(records.glob("*.json"))) if records.is_dir() else 0
    assert partial < 72, "the run finished before it could be killed; the test did not test resuming"

    subprocess.run(cli("sample", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"),
                   check=True, env=env, capture_output=True)
    resumed = snapshot(tmp_path / "run")
    assert resumed.keys() == reference.keys()
    for key, (rec, png) in reference.items():
        assert resumed[key][1] == png, f"image {key} differs after resume"
        assert resumed[key][0] == rec


@pytest.mark.slow
def test_two_process_accelerate_launch_gives_same_records(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", images_per_prompt=4)
    run_sample(load_config(cfg), tmp_path / "one", progress=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "debias.cli", "sample", "--config", str(cfg), "--out", str(tmp_path / "two"), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 12
    assert all(one[k][1] == two[k][1] for k in one)


class RecordingJanus:
    """A real tiny Janus generator that also records the seed batches it is asked for."""

    def __init__(self, dtype):
        from generators.base import GeneratorConfig
        from generators.janus import JanusGenerator

        self.inner = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", batch_size=4,
                                                    dtype=dtype, sampling={"guidance_scale": 2.0}))
        self.config, self.batches = self.inner.config, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, seeds):
        self.batches.append(list(seeds))
        return self.inner.generate(prompts, seeds)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_half_precision_computes_whole_seed_blocks(tmp_path, dtype):
    """bf16 kernels may round differently per batch shape: a partly requested block is still computed whole, so
    seeds 4 and 5 share their batch with 6 and 7 whether the run asked for 6 or 8 seeds. fp32 Janus is batch
    invariant and computes only the requested part of a block."""
    gen = RecordingJanus(dtype)
    assert gen.inner.model.dtype == getattr(torch, dtype) and gen.batch_invariant == (dtype == "float32")
    store = RunStore(tmp_path)
    keys = sample_to_store(gen, ["a nurse"], list(range(6)), store, progress=False)
    more = sample_to_store(gen, ["a nurse"], list(range(8)), store, progress=False)
    whole = dtype == "bfloat16"
    assert gen.batches == [[0, 1, 2, 3], [4, 5, 6, 7] if whole else [4, 5], [4, 5, 6, 7]]
    assert len(keys) == 6 and len(more) == 8
    assert sorted(r["seed"] for r in store.records()) == list(range(8))  # only requested images are stored


def bf16_config(path: Path, images: int) -> Path:
    return write_config(path, images_per_prompt=images, generator={**SMOKE["generator"], "dtype": "bfloat16"})


def test_bf16_killed_resumed_and_extended_runs_equal_an_uninterrupted_one(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = bf16_config(tmp_path / "full.yaml", 10)  # blocks of 4: the last one, seeds 8-9, is partial
    subprocess.run(cli("sample", "--config", str(full), "--out", str(tmp_path / "ref"), "--quiet"), check=True,
                   env=env, capture_output=True)
    reference = snapshot(tmp_path / "ref")
    assert len(reference) == 30 and all(r["generator"]["dtype"] == "bfloat16" for r, _ in reference.values())

    # extended: 6 seeds (a partial block 4-5), then 10
    run_sample(load_config(bf16_config(tmp_path / "six.yaml", 6)), tmp_path / "ext", progress=False)
    run_sample(load_config(full), tmp_path / "ext", progress=False)
    assert snapshot(tmp_path / "ext") == reference

    # killed with SIGKILL at a random point, then resumed
    target = random.Random(os.getpid()).randint(1, 25)
    proc = subprocess.Popen(cli("sample", "--config", str(full), "--out", str(tmp_path / "run"), "--quiet"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "run" / "samples" / "records"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if records.is_dir() and len(list(records.glob("*.json"))) >= target:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (len(list(records.glob("*.json"))) if records.is_dir() else 0) < 30, "finished before the kill"
    run_sample(load_config(full), tmp_path / "run", progress=False)
    assert snapshot(tmp_path / "run") == reference


def test_diffusers_extended_run_equals_an_uninterrupted_one(tmp_path):
    sd = {"backend": "diffusers", "model": "tiny", "device": "cpu", "batch_size": 4,
          "sampling": {"num_inference_steps": 2, "height": 32, "width": 32}}
    full = write_config(tmp_path / "full.yaml", generator=sd, images_per_prompt=7)
    run_sample(load_config(full), tmp_path / "ref", progress=False)
    run_sample(load_config(write_config(tmp_path / "five.yaml", generator=sd, images_per_prompt=5)),
               tmp_path / "ext", progress=False)
    run_sample(load_config(full), tmp_path / "ext", progress=False)
    reference = snapshot(tmp_path / "ref")
    assert len(reference) == 21 and snapshot(tmp_path / "ext") == reference


@pytest.mark.slow
def test_bf16_two_process_run_equals_one_process(tmp_path):
    cfg = bf16_config(tmp_path / "c.yaml", 6)
    run_sample(load_config(cfg), tmp_path / "one", progress=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "debias.cli", "sample", "--config", str(cfg), "--out", str(tmp_path / "two"), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert len(one) == 18 and one == two


BAD = [
    ({"generator": {"backend": "janos", "model": "tiny"}},
     "unknown generator backend 'janos'; did you mean 'janus'?; available: diffusers, emu3, janus, lab"),
    ({"generatr": {}}, "config key 'generatr' is unknown; did you mean 'generator'?"),
    ({"images_per_prompt": "many"}, "config key 'images_per_prompt': expected an integer, got 'many'"),
    ({"images_per_prompt": 0}, "config key 'images_per_prompt': must be a positive integer, got 0"),
    ({"prompts": {"template": "A photo of a doctor", "occupations": ["x"]}},
     "config key 'prompts.template': 'A photo of a doctor' has no '{occupation}' placeholder"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, override, message):
    from debias.cli import main

    cfg = write_config(tmp_path / "c.yaml", **override)
    out = tmp_path / "out"
    assert main(["sample", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    res = subprocess.run(cli("sample", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"debias sample: error: config file '{tmp_path / 'nope.yaml'}' does not exist; "
                                  "pass the path of a YAML file (see configs/)")
    assert not (tmp_path / "o").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    from debias.cli import main

    cfg = write_config(tmp_path / "c.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sample", "--config", str(cfg), "--out", str(blocker / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(["sample", "--config", str(cfg), "--out", str(blocker)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ stored bytes are verified

AUDIT = {**SMOKE, "prompts": {"occupations": ["nurse", "butcher"]}, "images_per_prompt": 4,
         "faces": {"detector": "none"}, "classifier": {"model": "tiny", "device": "cpu"},
         "metrics": {"n_boot": 20}, "card": {"enabled": False}}


def audit_run(tmp_path: Path, out: Path, capsys) -> tuple[str, dict]:
    """``debias audit`` in-process on the tiny smoke models; returns (stderr, key -> PNG bytes)."""
    from debias.cli import main

    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump(AUDIT))
    capsys.readouterr()
    assert main(["audit", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    return err, {p.name: p.read_bytes() for p in (out / "samples" / "images").rglob("*.png")}


@pytest.mark.parametrize("caches", ["kept", "deleted"])
def test_truncated_png_in_a_finished_run_is_regenerated_byte_identically(tmp_path, capsys, caches):
    import shutil

    out = tmp_path / "run"
    _, pngs = audit_run(tmp_path, out, capsys)
    metrics = (out / "metrics.json").read_bytes()
    victim = sorted((out / "samples" / "images").rglob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:100])
    if caches == "deleted":  # e.g. re-auditing with another classifier: nothing cached covers the damaged image
        shutil.rmtree(out / "stages")
    err, again = audit_run(tmp_path, out, capsys)
    assert "1 stored image(s) failed verification" in err and victim.name in err
    assert again == pngs  # the same seed gave the same bytes
    assert (out / "metrics.json").read_bytes() == metrics
    # A changed byte of the same length is caught by the hash, not only by the size.
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    err, again = audit_run(tmp_path, out, capsys)
    assert "failed verification" in err and again == pngs


def test_truncated_record_stage_cache_and_run_json_are_rebuilt(tmp_path, capsys):
    out = tmp_path / "run"
    _, pngs = audit_run(tmp_path, out, capsys)
    metrics = (out / "metrics.json").read_bytes()
    record = sorted((out / "samples" / "records").glob("*.json"))[0]
    reference = json.loads(record.read_text())
    record.write_text(record.read_text()[:40])
    cache = sorted((out / "stages").glob("classify-*.json"))[0]
    cache.write_text(cache.read_text()[:50])
    (out / "run.json").write_text('{"stages": {"sample": ')
    # A killed writer's temporary file (its process is gone) is cleaned up by the next run.
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = out / "stages" / f".{cache.name}.{dead.pid}.tmp"
    orphan.write_text("half a cache")
    err, again = audit_run(tmp_path, out, capsys)
    assert "failed verification" in err and "is unreadable" in err and "run.json" in err
    assert again == pngs and (out / "metrics.json").read_bytes() == metrics
    rebuilt = json.loads(record.read_text())
    assert {k: v for k, v in rebuilt.items() if k != "seconds"} == {
        k: v for k, v in reference.items() if k != "seconds"}
    assert json.loads(cache.read_text())["results"] and not orphan.exists()
    assert set(json.loads((out / "run.json").read_text())["stages"]) == {"sample", "audit"}


def test_a_damaged_imported_image_is_copied_again(tmp_path, capsys):
    from PIL import Image

    from debias.cli import main

    images = tmp_path / "images" / "a nurse"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(images / f"{i}.png")
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump(AUDIT))
    out = tmp_path / "run"
    args = ["audit", "--config", str(cfg), "--out", str(out), "--quiet", "--images", str(tmp_path / "images")]
    assert main(args) == 0
    stored = sorted((out / "samples" / "images").rglob("*.png"))
    reference = [p.read_bytes() for p in stored]
    stored[1].write_bytes(b"")
    capsys.readouterr()
    assert main(args) == 0
    assert "1 imported image(s) failed verification" in capsys.readouterr().err
    assert [p.read_bytes() for p in stored] == reference
