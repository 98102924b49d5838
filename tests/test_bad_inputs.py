"""The bad-input corpus: every subcommand, every class of bad input a new user (or an attacker) hands the toolkit.

Each case must exit with code 2 and print exactly one line on stderr, without a traceback, naming the config key
or the file at fault; the ``--out`` folder must be absent afterwards, or unchanged when it existed before. Most
cases fail before any model loads (in-process, fast); a few run as real subprocesses, where library warnings would
show up on stderr ahead of the error line if the CLI let them.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from PIL import Image

from debias.cli import main

NAN, INF = float("nan"), float("inf")
SMOKE: dict[str, Any] = {
    "generator": {"backend": "janus", "model": "tiny", "device": "cpu", "batch_size": 2,
                  "sampling": {"guidance_scale": 2.0}},
    "prompts": {"occupations": ["nurse"]},
    "images_per_prompt": 2,
    "faces": {"detector": "none"},
    "classifier": {"model": "tiny", "device": "cpu"},
    "metrics": {"n_boot": 10, "clip_score": False},
    "card": {"enabled": False},
    "train": {"method": "sft", "batch_size": 2, "sft": {"max_steps": 1}},
    "locate": {"probes": ["controlled"], "controlled": {"samples": 2}},
}
TINY_SD = {"backend": "diffusers", "model": "tiny", "device": "cpu", "batch_size": 2,
           "sampling": {"num_inference_steps": 2}}


# ------------------------------------------------------------------------------------------------------ helpers


def merged(base: dict, changes: dict) -> dict:
    """``base`` with dotted-key ``changes`` applied (a value of None deletes the key)."""
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return out


def config(tmp: Path, name: str = "c.yaml", **changes) -> str:
    """Write the smoke experiment with ``changes`` (``__`` in a keyword stands for a dot) and return its path."""
    path = tmp / name
    path.write_text(yaml.safe_dump(merged(SMOKE, {k.replace("__", "."): v for k, v in changes.items()})))
    return str(path)


def png(path: Path, size=(8, 8), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def truncated_png(path: Path) -> Path:
    png(path, (64, 64), (10, 20, 30))
    Image.effect_noise((64, 64), 40).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims ``side`` x ``side`` pixels (a decompression bomb), a few bytes on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def manifest(folder: Path, rows: list, name: str = "manifest.jsonl", images: bool = True) -> str:
    """An images folder with ``rows`` (dicts, or raw lines) in its manifest; each listed file that does not exist
    is created as a small PNG (when ``images``)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        if isinstance(row, dict):
            f = row.get("file")
            if images and isinstance(f, str) and not (folder / f).exists() and ".." not in f and not f.startswith("/"):
                png(folder / f)
            lines.append(json.dumps(row))
        else:
            lines.append(row)
    (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder)


def image_folder(folder: Path, files: dict[str, Callable[[Path], Any]]) -> str:
    """``DIR/<prompt>/<file>`` images made by the given writers."""
    for rel, write in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        write(folder / rel)
    return str(folder)


def pickled_janus(folder: Path) -> str:
    """A real tiny Janus saved with pickled weights only (``pytorch_model.bin``), loadable with allow_pickle."""
    from generators.tiny import tiny_janus

    if not (folder / "pytorch_model.bin").is_file():
        model, tokenizer = tiny_janus(seed=0)
        model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def pickled_clip(folder: Path) -> str:
    """A real tiny CLIP saved with pickled weights only, loadable with allow_pickle."""
    from audit.classify import tiny_clip

    if not (folder / "pytorch_model.bin").is_file():
        model, processor = tiny_clip(seed=0)
        model.config.save_pretrained(folder)
        processor.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def pickled_pipeline(folder: Path) -> str:
    """A real tiny Stable Diffusion pipeline whose UNet alone is saved as a pickle."""
    from generators.tiny import tiny_diffusion_pipeline

    if not (folder / "unet" / "diffusion_pytorch_model.bin").is_file():
        pipe = tiny_diffusion_pipeline(seed=0)
        pipe.save_pretrained(folder)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(pipe.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    return str(folder)


def pickled_adapter(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    return str(folder)


def balanced_dataset(folder: Path) -> str:
    """A real (tiny) balanced data set in the synth format: one prompt, two genders, two images each."""
    import datasets

    from generators.janus import JanusGenerator
    from generators.base import GeneratorConfig

    if folder.is_dir():
        return str(folder)
    gen = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", batch_size=4))
    prompt = "A photo of the face of a nurse, a person"
    rows = {k: [] for k in ("prompt", "explicit_prompt", "attribute", "group", "seed", "confidence", "image",
                            "tokens")}
    for group, seeds in (("male", [0, 1]), ("female", [100, 101])):
        for image in gen.generate([prompt.replace("person", group)] * 2, seeds):
            for key, value in (("prompt", prompt), ("explicit_prompt", prompt.replace("person", group)),
                               ("attribute", "gender"), ("group", group), ("seed", image.seed),
                               ("confidence", 0.9), ("image", image.image), ("tokens", image.tokens)):
                rows[key].append(value)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "explicit_prompt": datasets.Value("string"),
        "attribute": datasets.Value("string"), "group": datasets.Value("string"), "seed": datasets.Value("int64"),
        "confidence": datasets.Value("float32"), "image": datasets.Image(),
        "tokens": datasets.Sequence(datasets.Value("int64"))})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return str(folder)


def not_a_run(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an audit")
    return str(folder)


def corrupt_run(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text('{"attributes": {"gender": ')
    (folder / "predictions.json").write_text("[]")
    return str(folder)


def labelled_folder(folder: Path) -> str:
    for cls in ("male", "female"):
        for i in range(2):
            png(folder / "gender" / cls / f"{i}.png", color=(40 * i, 90, 120))
    return str(folder)


def text_file(path: Path, text: str = "x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """``argv(tmp, out)`` builds the command line (writing any input files); ``expect`` must be in the message."""

    id: str
    argv: Callable[[Path, str], list[str]]
    expect: str | Callable[[Path], str]
    subprocess: bool = False
    skip: Callable[[], str | None] | None = None


def cmd(name: str, *extra: str, quiet: bool = True):
    def build(tmp: Path, out: str, changes: dict | None = None) -> list[str]:
        return [name, "--config", config(tmp, **(changes or {})), "--out", out, *(["--quiet"] if quiet else []),
                *extra]
    return build


def sample(extra: tuple = (), **changes):
    return lambda tmp, out: cmd("sample", *extra)(tmp, out, changes)


def audit(extra: Callable[[Path], list[str]] | tuple = (), **changes):
    return lambda tmp, out: cmd("audit")(tmp, out, changes) + (list(extra(tmp)) if callable(extra) else list(extra))


def audit_images(make: Callable[[Path], str], **changes):
    return audit(lambda tmp: ["--images", make(tmp)], **changes)


def synth(extra: tuple = (), **changes):
    return lambda tmp, out: cmd("synth", *extra)(tmp, out, changes)


def sweep(*scales: str, **changes):
    return lambda tmp, out: cmd("sweep", "--guidance", *scales)(tmp, out, changes)


def locate(extra: Callable[[Path], list[str]] | None = None, **changes):
    return lambda tmp, out: cmd("locate", quiet=False)(tmp, out, changes) + (extra(tmp) if extra else [])


def train(*sets: str, **changes):
    return lambda tmp, out: cmd("train", quiet=False)(tmp, out, changes) + [a for s in sets for a in ("--set", s)]


def check(**changes):
    return lambda tmp, out: ["config", "--check", config(tmp, **changes)]


def file_out(tmp: Path) -> str:
    return text_file(tmp / "out", "a file where the run folder should go")


def no_cuda() -> str | None:
    return "this machine has CUDA" if torch.cuda.is_available() else None


CASES = [
    # --- sample: the config file itself
    Case("sample-config-not-utf8", lambda tmp, out: [
        "sample", "--config", str((tmp / "latin1.yaml").write_bytes(b"name: caf\xe9\nimages_per_prompt: 2\n")
                                  and tmp / "latin1.yaml"), "--out", out], "latin1.yaml", subprocess=True),
    Case("sample-config-key-twice", lambda tmp, out: [
        "sample", "--config", text_file(tmp / "twice.yaml", yaml.safe_dump(SMOKE) + "images_per_prompt: 3\n"),
        "--out", out], "images_per_prompt"),
    Case("sample-config-is-a-list", lambda tmp, out: [
        "sample", "--config", text_file(tmp / "list.yaml", "- generator\n- prompts\n"), "--out", out], "list.yaml"),
    Case("sample-config-missing", lambda tmp, out: [
        "sample", "--config", str(tmp / "nope.yaml"), "--out", out], "nope.yaml"),
    Case("sample-config-is-a-folder", lambda tmp, out: [
        "sample", "--config", str(tmp), "--out", out], str),
    # --- sample: NaN, infinity and absurd sizes
    Case("sample-guidance-nan", sample(generator__sampling__guidance_scale=NAN), "generator.sampling.guidance_scale"),
    Case("sample-guidance-inf", sample(generator__sampling__guidance_scale=INF), "generator.sampling.guidance_scale"),
    Case("sample-temperature-nan", sample(generator__sampling__temperature=NAN), "generator.sampling.temperature"),
    Case("sample-temperature-inf", sample(generator__sampling__temperature=INF), "generator.sampling.temperature"),
    Case("sample-top-p-nan", sample(generator__sampling__top_p=NAN), "generator.sampling.top_p"),
    Case("sample-temperature-nan-by-set", sample(("--set", "generator.sampling.temperature=.nan")),
         "generator.sampling.temperature"),
    Case("sample-10e12-images", sample(images_per_prompt=10**12), "images_per_prompt"),
    Case("sample-10e12-images-by-flag", sample(("--images-per-prompt", str(10**12))), "images_per_prompt"),
    Case("sample-seed-2^70", sample(seed_offset=2**70), "seed_offset"),
    Case("sample-negative-seed", sample(seed_offset=-1), "seed_offset"),
    Case("sample-batch-10e9", sample(generator__batch_size=10**9), "generator.batch_size"),
    Case("sample-unknown-sampling-key", sample(generator__sampling__guidanse_scale=2.0), "guidanse_scale"),
    Case("sample-unknown-backend", sample(generator__backend="janos"), "janos"),
    # --- sample: devices
    Case("sample-device-banana", sample(generator__device="banana"), "generator.device"),
    Case("sample-device-cuda-without-cuda", sample(generator__device="cuda"), "generator.device", skip=no_cuda),
    Case("sample-device-cuda-index", sample(generator__device="cuda:7"), "generator.device", skip=no_cuda),
    # --- sample: model folders and weights
    Case("sample-model-folder-missing", sample(generator__model="/nonexistent/janus-model"), "generator.model"),
    Case("sample-model-folder-empty", lambda tmp, out: (tmp / "empty").mkdir() or sample(
        generator__model=str(tmp / "empty"))(tmp, out), "generator.model"),
    Case("sample-model-folder-no-config", lambda tmp, out: text_file(tmp / "m" / "notes.txt") and sample(
        generator__model=str(tmp / "m"))(tmp, out), "config.json"),
    Case("sample-model-is-a-file", lambda tmp, out: sample(generator__model=text_file(tmp / "model.bin"))(tmp, out),
         "generator.model"),
    Case("sample-model-pickle-only", lambda tmp, out: sample(
        generator__model=pickled_janus(tmp / "pickled"))(tmp, out), "generator.allow_pickle", subprocess=True),
    Case("sample-diffusers-unet-pickled", lambda tmp, out: sample(generator=merged(
        TINY_SD, {"model": pickled_pipeline(tmp / "sd")}))(tmp, out), "in unet"),
    Case("sample-lab-world-missing", sample(generator={"backend": "lab", "model": "/nonexistent/world"}),
         "/nonexistent/world"),
    Case("sample-adapter-missing", sample(generator__adapter="/nonexistent/adapter"), "generator.adapter"),
    Case("sample-adapter-not-peft", lambda tmp, out: text_file(tmp / "ad" / "weights.txt") and sample(
        generator__adapter=str(tmp / "ad"))(tmp, out), "generator.adapter"),
    Case("sample-adapter-pickle-only", lambda tmp, out: sample(
        generator__adapter=pickled_adapter(tmp / "adapter"))(tmp, out), "generator.allow_pickle"),
    # --- sample: files the prompts name, the run folder
    Case("sample-occupations-file-missing", sample(prompts={"occupations_file": "nope/missing-occupations.yaml"}),
         "missing-occupations.yaml"),
    Case("sample-prompt-set-missing", sample(prompts={"prompt_sets": ["nope/missing-set.yaml"]}), "missing-set.yaml"),
    Case("sample-template-without-placeholder", sample(prompts__template="A photo of a doctor"), "prompts.template"),
    Case("sample-bad-set-syntax", sample(("--set", "images_per_prompt")), "--set"),
    Case("sample-out-is-a-file", lambda tmp, out: sample()(tmp, file_out(tmp)), "--out"),

    # --- audit: what depends on the classifier's classes, checked before sampling
    Case("audit-target-sum", audit(metrics__target={"gender": [0.6, 0.3]}), "metrics.target.gender"),
    Case("audit-target-length", audit(metrics__target={"gender": [0.5, 0.25, 0.25]}), "metrics.target.gender"),
    Case("audit-target-negative", audit(metrics__target={"gender": [1.5, -0.5]}), "metrics.target.gender"),
    Case("audit-target-unknown-attribute", audit(metrics__target={"age": [0.5, 0.5]}), "metrics.target.age"),
    Case("audit-target-nan", audit(metrics__target={"gender": [NAN, 0.5]}), "metrics.target.gender[0]"),
    Case("audit-joint-unknown-attribute", audit(metrics__joint=[["gender", "age"]]), "metrics.joint[0]"),
    Case("audit-calibration-missing", audit(metrics__calibration="/nonexistent/calibration.json"),
         "metrics.calibration"),
    Case("audit-calibration-not-json", lambda tmp, out: audit(
        metrics__calibration=text_file(tmp / "calibration.json", "{not json"))(tmp, out), "metrics.calibration"),
    Case("audit-alpha-nan", audit(metrics__alpha=NAN), "metrics.alpha"),
    Case("audit-n-boot-huge", audit(metrics__n_boot=10**12), "metrics.n_boot"),
    # --- audit: classifier and faces
    Case("audit-logit-scale-inf", audit(classifier__logit_scale=INF), "classifier.logit_scale"),
    Case("audit-abstain-nan", audit(classifier__abstain_threshold=NAN), "classifier.abstain_threshold"),
    Case("audit-classifier-pickle-only", lambda tmp, out: audit(
        classifier__model=pickled_clip(tmp / "clip"))(tmp, out), "classifier.allow_pickle"),
    Case("audit-classifier-folder-missing", audit(classifier__model="/nonexistent/clip"), "classifier.model"),
    Case("audit-classifier-device-banana", audit(classifier__device="banana"), "classifier.device"),
    Case("audit-face-margin-nan", audit(faces__margin=NAN), "faces.margin"),
    Case("audit-face-output-size-huge", audit(faces__output_size=10**9), "faces.output_size"),
    Case("audit-card-labelled-missing", audit(card={"enabled": True, "labelled": "/nonexistent/faces"}),
         "card.labelled"),
    # --- audit: the adapter flag
    Case("audit-adapter-missing", audit(("--adapter", "/nonexistent/adapter")), "generator.adapter"),
    Case("audit-adapter-is-a-file", audit(lambda tmp: ["--adapter", text_file(tmp / "adapter.txt")]),
         "generator.adapter"),
    # --- audit: diffusers sampling settings
    Case("audit-diffusers-extra-unknown", audit(generator=merged(TINY_SD, {"sampling.extra": {"guidanse_rescale": 0.5}})),
         "generator.sampling.extra.guidanse_rescale", subprocess=True),
    Case("audit-diffusers-extra-set-by-backend", audit(generator=merged(TINY_SD, {"sampling.extra": {"prompt": "x"}})),
         "generator.sampling.extra.prompt"),
    Case("audit-diffusers-extra-nan", audit(generator=merged(TINY_SD, {"sampling.extra": {"eta": NAN}})),
         "generator.sampling.extra.eta"),
    Case("audit-diffusers-guidance-nan", audit(generator=merged(TINY_SD, {"sampling.guidance_scale": NAN})),
         "generator.sampling.guidance_scale"),
    Case("audit-diffusers-side-800k", audit(generator=merged(TINY_SD, {"sampling.height": 800000})),
         "generator.sampling.height"),
    Case("audit-diffusers-steps-huge", audit(generator=merged(TINY_SD, {"sampling.num_inference_steps": 10**9})),
         "generator.sampling.num_inference_steps"),
    Case("audit-diffusers-scheduler-unknown", audit(generator=merged(TINY_SD, {"sampling.scheduler": "DDIMSchedular"})),
         "generator.sampling.scheduler"),
    # --- audit --images: the folder, its manifest and its files
    Case("images-folder-missing", audit(("--images", "/nonexistent/images")), "--images"),
    Case("images-folder-empty", audit(lambda tmp: ["--images", str((tmp / "imgs").mkdir() or tmp / "imgs")]),
         "--images"),
    Case("images-truncated-png", audit_images(lambda tmp: image_folder(tmp / "imgs", {"a nurse/0.png": truncated_png})),
         "0.png", subprocess=True),
    Case("images-text-named-png", audit_images(lambda tmp: image_folder(
        tmp / "imgs", {"a nurse/fake.png": lambda p: p.write_text("not an image")})), "fake.png"),
    Case("images-20k-square-bomb", audit_images(lambda tmp: image_folder(tmp / "imgs", {"a nurse/bomb.png": bomb_png})),
         "bomb.png", subprocess=True),
    Case("images-bad-jsonl-line", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "a.png", "prompt": "a nurse"}, '{"file": "b.png", "prompt": '])), "line 2"),
    Case("images-seed-not-integer", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "a.png", "prompt": "a nurse", "seed": "x"}])), "'seed'"),
    Case("images-seed-float", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "a.png", "prompt": "a nurse", "seed": 1.5}])), "'seed'"),
    Case("images-seed-negative", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "a.png", "prompt": "a nurse", "seed": -1}])), "'seed'"),
    Case("images-seed-2^70", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "a.png", "prompt": "a nurse", "seed": 2**70}])), "'seed'"),
    Case("images-json-array", audit_images(lambda tmp: manifest(tmp / "imgs", [
        "[", '  {"file": "a.png", "prompt": "a nurse"}', "]"])), "line 1"),
    Case("images-json-array-one-line", audit_images(lambda tmp: png(tmp / "imgs" / "a.png") and manifest(
        tmp / "imgs", ['[{"file": "a.png", "prompt": "a nurse"}]'])), "line 1"),
    Case("images-path-outside", audit_images(lambda tmp: png(tmp / "outside.png") and manifest(
        tmp / "imgs", [{"file": "../outside.png", "prompt": "a nurse"}])), "../outside.png"),
    Case("images-absolute-path-outside", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": str(png(tmp / "elsewhere.png")), "prompt": "a nurse"}])), "elsewhere.png"),
    Case("images-duplicate-prompt-seed", audit_images(lambda tmp: manifest(tmp / "imgs", [
        {"file": "a.png", "prompt": "a nurse", "seed": 0}, {"file": "b.png", "prompt": "a nurse", "seed": 0}])),
        "listed twice"),
    Case("images-same-file-three-times", audit_images(lambda tmp: manifest(tmp / "imgs", [
        {"file": "a.png", "prompt": "a nurse"}] * 3)), "listed twice"),
    Case("images-row-without-prompt", audit_images(lambda tmp: manifest(tmp / "imgs", [{"file": "a.png"}])),
         "'prompt'"),
    Case("images-prompt-not-text", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "a.png", "prompt": 5}])), "'prompt'"),
    Case("images-file-missing", audit_images(lambda tmp: manifest(
        tmp / "imgs", [{"file": "gone.png", "prompt": "a nurse"}], images=False)), "gone.png"),
    Case("images-csv-float-seed", audit_images(lambda tmp: png(tmp / "imgs" / "a.png") and text_file(
        tmp / "imgs" / "manifest.csv", "file,prompt,seed\na.png,a nurse,1.5\n") and str(tmp / "imgs")), "'seed'"),
    Case("images-csv-no-prompt-column", audit_images(lambda tmp: png(tmp / "imgs" / "a.png") and text_file(
        tmp / "imgs" / "manifest.csv", "file,caption\na.png,a nurse\n") and str(tmp / "imgs")), "manifest.csv"),
    Case("images-card-from-generator", audit_images(
        lambda tmp: image_folder(tmp / "imgs", {"a nurse/0.png": png}),
        card={"enabled": True, "person_free": "generator"}), "card.person_free"),

    # --- synth
    Case("synth-per-cell-0", synth(("--per-cell", "0")), "synth.per_cell"),
    Case("synth-per-cell-10e12", synth(("--per-cell", str(10**12))), "synth.per_cell"),
    Case("synth-min-confidence-nan", synth(synth__min_confidence=NAN), "synth.min_confidence"),
    Case("synth-target-sum", synth(synth__target=[0.9, 0.3]), "synth.target"),
    Case("synth-seed-2^70", synth(synth__seed_offset=2**70), "synth.seed_offset"),
    Case("synth-class-not-in-classifier", synth(classifier__attributes=["race"]), "synth.attribute"),
    Case("synth-prompts-without-person", synth(synth__prompts={"prompts": ["a red car"]}), "a red car"),

    # --- sweep
    Case("sweep-guidance-nan", sweep("nan"), "--guidance"),
    Case("sweep-guidance-inf", sweep("2", "inf"), "--guidance"),
    Case("sweep-guidance-below-1", sweep("0.5"), "--guidance"),
    Case("sweep-temperature-nan-in-config", sweep("2", generator__sampling__temperature=NAN),
         "generator.sampling.temperature"),
    Case("sweep-top-k-negative-in-config", sweep("1.5", "3", generator__sampling__top_k=-1), "generator.sampling.top_k"),

    # --- calibrate
    # --- export and card: the folders they package
    Case("export-run-missing", lambda tmp, out: ["export", str(tmp / "norun"), "--out", out], "norun"),
    Case("export-not-a-run", lambda tmp, out: ["export", str((tmp / "empty").mkdir() or tmp / "empty"), "--out", out],
         "metrics.json"),
    Case("card-adapter-missing", lambda tmp, out: [
        "card", "--adapter", str(tmp / "noad"), "--before", str(tmp), "--after", str(tmp), "--out", out], "noad"),
    Case("card-adapter-not-an-adapter", lambda tmp, out: [
        "card", "--adapter", str(tmp), "--before", str(tmp), "--after", str(tmp), "--out", out],
         "adapter_config.json"),
    Case("calibrate-unknown-classifier", lambda tmp, out: [
        "calibrate", "--classifier", "clip-vit-larg", "--data", labelled_folder(tmp / "faces"), "--out", out],
        "clip-vit-larg"),
    Case("calibrate-data-missing", lambda tmp, out: [
        "calibrate", "--classifier", "tiny", "--data", "/nonexistent/faces", "--out", out], "/nonexistent/faces"),
    Case("calibrate-bad-manifest-line", lambda tmp, out: [
        "calibrate", "--classifier", "tiny", "--data", text_file(tmp / "faces.jsonl", '{"image": "a.png",\n'),
        "--out", out], "faces.jsonl"),
    Case("calibrate-classifier-logit-scale-inf", lambda tmp, out: [
        "calibrate", "--classifier", text_file(tmp / "clf.yaml", "model: tiny\ndevice: cpu\nlogit_scale: .inf\n"),
        "--data", labelled_folder(tmp / "faces"), "--out", out], "classifier.logit_scale"),
    Case("calibrate-classifier-pickle-only", lambda tmp, out: [
        "calibrate", "--classifier", text_file(tmp / "clf.yaml", yaml.safe_dump(
            {"model": pickled_clip(tmp / "clip"), "device": "cpu"})),
        "--data", labelled_folder(tmp / "faces"), "--out", out], "classifier.allow_pickle"),
    Case("calibrate-out-is-a-file", lambda tmp, out: [
        "calibrate", "--classifier", "tiny", "--data", labelled_folder(tmp / "faces"), "--out", file_out(tmp)],
        "out"),

    # --- compare
    Case("compare-before-not-a-run", lambda tmp, out: [
        "compare", not_a_run(tmp / "before"), not_a_run(tmp / "after"), "--out", out], "before"),
    Case("compare-before-missing", lambda tmp, out: [
        "compare", str(tmp / "gone"), not_a_run(tmp / "after"), "--out", out], "gone"),
    Case("compare-metrics-truncated", lambda tmp, out: [
        "compare", corrupt_run(tmp / "before"), corrupt_run(tmp / "after"), "--out", out], "metrics.json"),

    # --- locate
    Case("locate-audit-not-a-run", locate(lambda tmp: ["--audit", not_a_run(tmp / "notarun")]), "--audit"),
    Case("locate-audit-truncated-metrics", locate(lambda tmp: ["--audit", corrupt_run(tmp / "run")]), "metrics.json"),
    Case("locate-config-audit-missing", locate(locate__audit="/nonexistent/audit"), "locate.audit"),
    Case("locate-unknown-probe", locate(locate__probes=["understand"]), "locate.probes"),
    Case("locate-swap-without-tuned-model", locate(locate__probes=["swap"]), "locate.swap.tuned_model"),
    Case("locate-vision-data-missing", locate(locate__probes=["vision"], locate__vision={"data": "/nonexistent/set"}),
         "locate.vision.data"),
    Case("locate-controlled-on-diffusers", locate(generator=TINY_SD), "locate.probes", subprocess=True),
    Case("locate-understanding-without-occupations", locate(
        locate__probes=["understanding"], prompts={"prompts": ["a photo of a person"]}), "prompts.occupations"),

    # --- train
    Case("train-dataset-missing", train("dataset=/nonexistent/dataset"), "/nonexistent/dataset"),
    Case("train-no-dataset", train(), "train.dataset"),
    Case("train-unknown-method", train("method=sft+dpo"), "train.method"),
    Case("train-learning-rate-nan", train("sft.learning_rate=.nan"), "train.sft.learning_rate"),
    Case("train-freq-target-nan", train("freq.target=[.nan, 0.5]"), "train.freq.target[0]"),
    Case("train-resume-checkpoint-missing", train("dataset=x", "resume_from_checkpoint=/nonexistent/checkpoint-2"),
         "train.resume_from_checkpoint"),
    Case("train-resume-checkpoint-incomplete", lambda tmp, out: text_file(
        tmp / "stage" / "checkpoint-2" / "adapter_model.safetensors") and train(
        f"dataset={balanced_dataset(tmp / 'data')}", f"resume_from_checkpoint={tmp / 'stage' / 'checkpoint-2'}")(
        tmp, out), "incomplete"),
    Case("train-init-adapter-missing", train("dataset=x", "init_adapter=/nonexistent/adapter"), "train.init_adapter"),
    Case("train-fp16-on-cpu", train("dataset=x", "precision=fp16"), "train.precision", skip=no_cuda),
    Case("train-generator-temperature-nan", train("dataset=x", generator__sampling__temperature=NAN),
         "generator.sampling.temperature"),

    # --- demo and methods (the lab experiment with --set)
    Case("demo-images-per-prompt-0", lambda tmp, out: ["demo", "--out", out, "--quiet", "--set",
                                                       "images_per_prompt=0"], "images_per_prompt"),
    Case("demo-guidance-nan", lambda tmp, out: ["demo", "--out", out, "--quiet", "--set",
                                                "generator.sampling.guidance_scale=.nan"],
         "generator.sampling.guidance_scale"),
    Case("demo-out-is-a-file", lambda tmp, out: ["demo", "--out", file_out(tmp), "--quiet"], "--out"),
    Case("methods-negative-images", lambda tmp, out: ["methods", "--out", out, "--quiet", "--set",
                                                      "images_per_prompt=-1"], "images_per_prompt"),
    Case("methods-out-is-a-file", lambda tmp, out: ["methods", "--out", file_out(tmp), "--quiet"], "--out"),

    # --- lab build
    Case("lab-build-out-is-a-file", lambda tmp, out: ["lab", "build", "--out", file_out(tmp), "--quick"], "out"),

    # --- config --check agrees with what audit rejects
    Case("check-guidance-nan", check(generator__sampling__guidance_scale=NAN), "generator.sampling.guidance_scale"),
    Case("check-temperature-inf", check(generator__sampling__temperature=INF), "generator.sampling.temperature"),
    Case("check-unknown-sampling-key", check(generator__sampling__guidanse_scale=2.0), "guidanse_scale"),
    Case("check-target-sum", check(metrics__target={"gender": [0.6, 0.3]}), "metrics.target.gender"),
    Case("check-calibration-missing", check(metrics__calibration="/nonexistent/calibration.json"),
         "metrics.calibration"),
    Case("check-model-pickle-only", lambda tmp, out: check(generator__model=pickled_janus(tmp / "pickled"))(tmp, out),
         "generator.allow_pickle"),
    Case("check-device-banana", check(generator__device="banana"), "generator.device"),
    Case("check-config-not-utf8", lambda tmp, out: [
        "config", "--check", str((tmp / "bad.yaml").write_bytes(b"\xff\xfe\x00") and tmp / "bad.yaml")], "bad.yaml"),
]


# ----------------------------------------------------------------------------------------------------- running


def snapshot(path: Path) -> dict | bytes | None:
    """What is at ``path`` (file bytes, or relative path -> bytes for a folder), to tell whether it changed."""
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        return None
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _timeout(signum, frame):
    raise TimeoutError("the command ran for more than 300 s on bad input")


def run_case(case: Case, tmp: Path, capsys) -> tuple[int, str, Path]:
    out = tmp / "out"
    argv = case.argv(tmp, str(out))
    before = snapshot(out)
    if case.subprocess:
        res = subprocess.run([sys.executable, "-m", "debias.cli", *argv], capture_output=True, text=True, timeout=300)
        rc, err = res.returncode, res.stderr
    else:
        capsys.readouterr()
        old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(300)
        try:
            rc = main(argv)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        err = capsys.readouterr().err
    assert snapshot(out) == before, "--out was created or changed"
    return rc, err, tmp


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, repo_root, monkeypatch):
    if case.skip and (reason := case.skip()):
        pytest.skip(reason)
    monkeypatch.chdir(repo_root)
    rc, err, tmp = run_case(case, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err[-2000:]}"
    expect = case.expect(tmp) if callable(case.expect) else case.expect
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"


def test_the_corpus_is_large_and_covers_every_subcommand():
    from debias.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    covered = {c.id.split("-")[0] for c in CASES}
    aliases = {"images": "audit", "check": "config"}
    assert len(CASES) >= 60
    assert commands <= {aliases.get(c, c) for c in covered}, commands - {aliases.get(c, c) for c in covered}


def test_pickle_only_models_load_only_when_allowed(tmp_path):
    """The refused folders are real models: with allow_pickle they load and give the tiny models' exact outputs."""
    import numpy as np

    from audit.classify import ClipClassifier
    from generators.backends import load_generator
    from generators.config import UserError

    janus = {"backend": "janus", "device": "cpu", "batch_size": 2, "sampling": {"guidance_scale": 2.0}}
    path = pickled_janus(tmp_path / "janus")
    with pytest.raises(UserError, match=r"only pickled weights \(pytorch_model.bin\).*generator.allow_pickle: true"):
        load_generator({**janus, "model": path})
    loaded = load_generator({**janus, "model": path, "allow_pickle": True}).generate(["a nurse"] * 2, [0, 1])
    tiny = load_generator({**janus, "model": "tiny"}).generate(["a nurse"] * 2, [0, 1])
    assert [g.tokens for g in loaded] == [g.tokens for g in tiny]

    sd = {**TINY_SD, "model": pickled_pipeline(tmp_path / "sd")}
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin in unet.*generator.allow_pickle: true"):
        load_generator(sd)
    loaded = load_generator({**sd, "allow_pickle": True}).generate(["a nurse"], [3])[0].image
    tiny = load_generator(TINY_SD).generate(["a nurse"], [3])[0].image
    assert loaded.tobytes() == tiny.tobytes()

    clip = pickled_clip(tmp_path / "clip")
    with pytest.raises(UserError, match="classifier.allow_pickle: true"):
        ClipClassifier({"model": clip, "device": "cpu"})
    images = [Image.new("RGB", (32, 32), (30 * i, 80, 160)) for i in range(3)]
    probs = ClipClassifier({"model": clip, "device": "cpu", "allow_pickle": True}).classify(images)
    expected = ClipClassifier({"model": "tiny", "device": "cpu"}).classify(images)
    assert all(np.allclose(probs[a], expected[a], atol=1e-6) for a in expected)
