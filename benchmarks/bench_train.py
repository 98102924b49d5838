"""Training stages: time and peak memory of each stage of ``debias train`` (method ``sft+bpo``, the default recipe).

Model: a seeded tiny ``JanusForConditionalGeneration`` saved to a folder and loaded from it as a user's model would
be (language model = a Llama of ``--hidden`` x ``--layers``, ``--patches``^2 image tokens, ``--codebook`` codes),
LoRA r 8, fp32, CPU unless a GPU is visible. Data: a balanced set in the ``debias synth`` format (2 genders x
``--rows`` rows per prompt, random image tokens). The stages run through :func:`debias.train.run.run_train`, which
records each stage's peak memory (``train_result.json``): the process RSS sampled during the stage and, on a GPU,
``torch.cuda.max_memory_allocated``. The second stage loads a fresh base model after the first stage's model is
released, so its peak stays near the first's instead of adding a second copy of the weights.

Prints one JSON object. Run: ``python -m benchmarks.bench_train [--hidden 1024] [--layers 6] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# The smallest sizes that still run every code path (the test suite runs the benchmarks with these).
FAST = ["--hidden", "32", "--layers", "1", "--patches", "4", "--codebook", "64", "--steps", "2", "--rows", "2"]


def build(args, root: Path) -> tuple[Path, Path, int]:
    """The model folder and the balanced data set; returns ``(model_dir, dataset_dir, weights_mib)``."""
    import datasets
    import numpy as np
    from PIL import Image

    from generators.tiny import tiny_janus

    model, tokenizer = tiny_janus(seed=0, hidden_size=args.hidden, num_layers=args.layers,
                                  num_patches=args.patches, codebook_size=args.codebook)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rng = np.random.default_rng(0)
    blank = Image.new("RGB", (8, 8))
    rows: dict[str, list] = {k: [] for k in ("prompt", "explicit_prompt", "attribute", "group", "seed",
                                             "confidence", "image", "tokens")}
    for prompt in ("A photo of the face of a nurse, a person", "A photo of the face of a pilot, a person"):
        for group in ("male", "female"):
            for n in range(args.rows):
                for key, value in (("prompt", prompt), ("explicit_prompt", prompt.replace("person", group)),
                                   ("attribute", "gender"), ("group", group), ("seed", n), ("confidence", 0.9),
                                   ("image", blank),
                                   ("tokens", rng.integers(0, args.codebook, args.patches**2).tolist())):
                    rows[key].append(value)
    data_dir = root / "data"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(data_dir))
    return model_dir, data_dir, weights_mib


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--patches", type=int, default=8, help="image side in tokens (tokens = patches^2)")
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per stage")
    parser.add_argument("--rows", type=int, default=16, help="images per prompt and gender in the data set")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from debias.train.config import TrainConfig
    from debias.train.run import run_train
    from generators.base import GeneratorConfig
    from generators.config import from_dict

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        model_dir, data_dir, weights_mib = build(args, Path(tmp))
        train = from_dict(TrainConfig, {
            "method": "sft+bpo", "dataset": str(data_dir), "batch_size": 4, "logging_steps": 10**6,
            "save_steps": 10**6, "lora": {"r": 8, "alpha": 16},
            "sft": {"max_steps": args.steps, "learning_rate": 1e-3}, "bpo": {"max_steps": args.steps},
        }, prefix="train")
        generator = GeneratorConfig(backend="janus", model=str(model_dir), device=device, batch_size=8,
                                    sampling={"guidance_scale": 1.0})
        t0 = time.perf_counter()
        run_train(train, generator, Path(tmp) / "run")
        total = time.perf_counter() - t0
        result = json.loads((Path(tmp) / "run" / "train_result.json").read_text())
        stages = {}
        for name in train.stages:
            log = json.loads((Path(tmp) / "run" / name / "log_history.json").read_text())
            runtime = next((e["train_runtime"] for e in log if "train_runtime" in e), None)
            stages[name] = {"train_runtime_s": runtime, **result["peak_memory"][name]}
    out = {
        "benchmark": "train_stages",
        "model": f"tiny Janus (LM Llama hidden {args.hidden} x {args.layers} layers, {args.patches**2} image tokens, "
                 f"codebook {args.codebook}), LoRA r 8, loaded from a folder",
        "device": device,
        "weights_mib": round(weights_mib, 1),
        "steps_per_stage": args.steps,
        "stages": stages,
        # stage 2 over stage 1: about 1 when a single model is alive at a time
        "rss_peak_ratio_bpo_to_sft": stages["bpo"]["rss_peak_mib"] / stages["sft"]["rss_peak_mib"],
        "total_s": round(total, 2),
    }
    if device == "cuda":
        out["cuda_peak_ratio_bpo_to_sft"] = (stages["bpo"]["cuda_max_allocated_mib"]
                                             / stages["sft"]["cuda_max_allocated_mib"])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
