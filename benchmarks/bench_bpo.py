"""BPO training-step cost: our ``ImageTokenBPOTrainer`` vs TRL's stock ``DPOTrainer`` on the same tiny Janus and batch.

Model: one seeded tiny ``JanusForConditionalGeneration`` (language model = a Llama of ``--hidden`` x ``--layers``;
``--patches``^2 image tokens, ``--codebook`` codes), LoRA r 8 on q,k,v,o,gate,up,down of the language model,
per-device batch ``--pairs`` pairs, fp32, CPU unless a GPU is visible. Variants:

* ``bpo``: ours, balanced preference loss (one forward of 2 x pairs sequences through the generation head);
* ``ours_dpo``: ours with the DPO loss (adds the reference forward with the adapter disabled);
* ``stock_dpo``: ``trl.DPOTrainer`` unchanged on the SAME Janus model through its text path (``lm_head``), with text
  prompt/chosen/rejected of the same token lengths (prompt + image-token count), sigmoid loss, reference = adapter
  disabled. It is the like-for-like baseline for ``ours_dpo``; ``bpo`` skips the reference forward.

Each variant runs in its own subprocess (so ``ru_maxrss`` is its own peak), ``--repeats`` times interleaved; the
step time is the median over the steps after ``--warmup`` of the median run. Prints one JSON line with per-step
seconds, ratios to ``stock_dpo``, and peak memory: process peak RSS and its growth during training (MiB; torch's
CPU allocations are invisible to ``tracemalloc``), and ``torch.cuda.max_memory_allocated`` on a GPU.

Run: ``python -m benchmarks.bench_bpo [--pairs 8] [--steps 12] [--hidden 64] [--patches 8] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("bpo", "ours_dpo", "stock_dpo")
# The smallest sizes that still run every code path (the test suite runs the benchmarks with these).
FAST = ["--pairs", "2", "--steps", "2", "--warmup", "1", "--hidden", "32", "--patches", "4", "--codebook", "64",
        "--repeats", "1"]


def _model(args):
    import torch

    from generators.tiny import tiny_janus

    model, tokenizer = tiny_janus(seed=0, hidden_size=args.hidden, num_layers=args.layers,
                                  num_patches=args.patches, codebook_size=args.codebook)
    model.train()
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def _lora():
    from debias.train.common import lora_config
    from debias.train.config import LoraOptions

    return lora_config(LoraOptions(r=8, alpha=16, dropout=0.0))


def run_variant(variant: str, args) -> dict:
    """Train ``variant`` for warmup + steps optimiser steps in this process; per-step times and peak memory."""
    import random

    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from generators.janus_sequence import JanusLayout

    torch.set_num_threads(args.threads)
    model, tokenizer = _model(args)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports + model: not the trainer's
    layout = JanusLayout.of(model, tokenizer)
    n_tok = args.patches**2
    rows = args.pairs * (args.warmup + args.steps)
    rng = random.Random(0)
    prompts = [f"A photo of the face of a worker number {n % 7}, a person" for n in range(rows)]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    out = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, report_to="none", save_strategy="no", activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), logging_steps=10**6, disable_tqdm=True, beta=0.1, seed=0,
    )
    if variant == "stock_dpo":
        letters = "abcdefghijklmnopqrstuvwxyz"
        # Byte-level tokenizer: one token per ASCII letter; the trainer appends EOS, giving n_tok completion tokens.
        data = datasets.Dataset.from_dict({
            "prompt": prompts,
            "chosen": ["".join(rng.choice(letters) for _ in range(n_tok - 1)) for _ in range(rows)],
            "rejected": ["".join(rng.choice(letters) for _ in range(n_tok - 1)) for _ in range(rows)],
        })
        trainer = DPOTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=_lora(), callbacks=[Timer()])
    else:
        from debias.train.bpo import ImageTokenBPOTrainer

        codes = args.codebook
        data = datasets.Dataset.from_dict({
            "prompt": prompts,
            "index_i": list(range(rows)), "index_j": list(range(rows, 2 * rows)),
            "tokens_i": [[rng.randrange(codes) for _ in range(n_tok)] for _ in range(rows)],
            "tokens_j": [[rng.randrange(codes) for _ in range(n_tok)] for _ in range(rows)],
        })
        loss = "bpo" if variant == "bpo" else "dpo"
        trainer = ImageTokenBPOTrainer(model, config, data, tokenizer, layout, loss=loss, prefer_first=True,
                                       peft_config=_lora(), callbacks=[Timer()])
    trainer.train()
    steady = times[args.warmup:]
    result = {
        "step_s": statistics.median(steady),
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mib": rss_before,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "seq_len": len(trainer.train_dataset[0]["prompt_ids"]) + n_tok,
    }
    if torch.cuda.is_available():
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--patches", type=int, default=8, help="image side in tokens (tokens = patches^2)")
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one run, JSON out
    args = parser.parse_args(argv)
    if args.variant:
        print("BENCH_JSON " + json.dumps(run_variant(args.variant, args)))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(args.threads)}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so background load affects every variant alike
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_bpo", *forwarded, "--variant", variant],
                                  env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
            if proc.returncode != 0 or not line:
                raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(line[0].removeprefix("BENCH_JSON ")))
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {
            "step_s": statistics.median(r["step_s"] for r in results),
            "rss_peak_mib": max(r["rss_peak_mib"] for r in results),
            # growth of the peak RSS during trainer setup + training (0 when it stayed below the import/model peak)
            "rss_training_growth_mib": max(r["rss_peak_mib"] - r["rss_before_train_mib"] for r in results),
            **({"cuda_peak_mib": max(r["cuda_peak_mib"] for r in results)} if "cuda_peak_mib" in results[0] else {}),
        }
    stock = summary["stock_dpo"]["step_s"]
    print(json.dumps({
        "benchmark": "bpo_step",
        "model": f"tiny Janus (LM Llama hidden {args.hidden} x {args.layers} layers), LoRA r 8 on the LM; "
                 f"stock DPOTrainer on the same model's text path",
        "device": runs["bpo"][0]["device"],
        "pairs_per_step": args.pairs,
        "sequence_tokens": runs["bpo"][0]["seq_len"],
        "image_tokens": args.patches**2,
        "variants": summary,
        "ratio_bpo_to_stock_dpo": summary["bpo"]["step_s"] / stock,
        "ratio_ours_dpo_to_stock_dpo": summary["ours_dpo"]["step_s"] / stock,
        "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
