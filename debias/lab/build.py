"""Builder of the lab world: trains a tiny Janus and a tiny CLIP on rendered people with a planted skew.

Run ``python -m debias.lab.build --out DIR [--world janus|diffusion] [--quick] [--config configs/lab/world.yaml]
[--overwrite] [--threads N]`` (also ``debias lab build``).
The shipped world is ``generators/lab/weights`` (:data:`generators.lab.WEIGHTS`), built with
``--out generators/lab/weights --threads 2`` on an idle 2-core machine in ~12 min; ``--quick`` builds a reduced world
in ~30 s for CI. On a shared, busy machine pass ``--threads 1``: two busy-waiting torch threads then run several times
slower than one.
``python -m debias.lab.build --verify-only --out DIR`` re-runs only the evaluation and verification on a built world
and rewrites its ``build_info.json`` (weights and ``world.yaml`` untouched).

Output layout::

    DIR/janus/        JanusForConditionalGeneration (safetensors), its word-level tokenizer and a JanusProcessor
    DIR/clip/         CLIPModel + CLIPProcessor (CLIPImageProcessorPil for 32x32 input, word-level CLIPTokenizer)
    DIR/world.yaml    the resolved config the weights were built from (with the chosen zero-shot templates)
    DIR/build_info.json  steps, losses, phase times, seed, VQ reconstruction error, CLIP zero-shot accuracy,
                      planted vs measured shares per occupation, explicit-prompt adherence, guidance effect,
                      and the world's fit: the generator's own shares from a large sample (verify.generator_own)

Stages (all seeded from ``seed`` in the config), one module each:

1. **VQ tokenizer** (:mod:`debias.lab.vq`): the ``JanusVQVAE`` inside the Janus model, trained as a cosine-quantised
   autoencoder.
2. **Image tokens** (:func:`debias.lab.train_janus.token_pool`): a pool of renders per (occupation, gender, race)
   cell is tokenised once (64 tokens each).
3. **Tiny Janus language model** (:mod:`debias.lab.train_janus`), trained with teacher forcing on (caption, image
   tokens) in the sequence layout of :mod:`generators.janus_sequence`, plus optionally the understanding answers.
4. **Tiny CLIP** (:mod:`debias.lab.train_clip`) trained contrastively on renders and VQ reconstructions.
5. **Verification** (:mod:`debias.lab.verify`), with the audit's own sampler and classifier.

The world's schema, captions and tokenizers are in :mod:`debias.lab.world`.

**The diffusion world** (``--world diffusion``, :mod:`debias.lab.train_sd`): a tiny ``StableDiffusionPipeline``
(AutoencoderKL trained on the renders, UNet2DConditionModel, the lab CLIP's frozen text tower and tokenizer, an
Euler-ancestral sampler) trained on the same renders and caption mix, sampled by the registry backend ``lab-sd``
(``configs/generators/lab-sd.yaml``, audited with ``configs/experiments/lab-sd.yaml``). It writes only::

    DIR/sd/              the pipeline (save_pretrained, safetensors) + DIR/sd/world.yaml (its resolved config)
    DIR/sd/build_info.json  VAE/UNet losses, phase times, and the verification with the audit's own sampler and
                         classifier: per-occupation female share and race shares vs planted (within 0.1, Wilson
                         interval covers), explicit-prompt adherence, at the guidance and steps of lab-sd.yaml

It reuses ``DIR/clip`` (and that world's zero-shot templates) when present, so the shipped world's Janus files and
``DIR/build_info.json`` are untouched; in an empty ``DIR`` it trains the CLIP first (on renders and VAE
reconstructions) and writes ``DIR/clip`` and ``DIR/world.yaml`` too. ``--verify-only --world diffusion`` re-runs
only its verification. The shipped one was built with ``--world diffusion --out generators/lab/weights --threads 1``;
``--quick`` builds a reduced one for CI in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from debias.lab.train_clip import make_clip, train_clip
from debias.lab.train_janus import make_janus, token_pool, train_janus
from debias.lab.verify import evaluate, reverify, verify_world
from debias.lab.vq import decode_tokens, train_vq
from debias.lab.world import (
    DEFAULT_CONFIG, IMAGE_SIZE, NUM_PATCHES, WorldConfig, clip_tokenizer, clip_words, load_world_config,
)
from generators.config import UserError, to_dict
from generators.lab.render import GENDERS, OCCUPATIONS, RACES

WORLDS = ("janus", "diffusion")  # --world: the Janus world (default) or the diffusion world (debias.lab.train_sd)


def build(out: str | Path, cfg: WorldConfig, quick: bool = False, overwrite: bool = False,
          log=print) -> dict:
    """Build the lab world into ``out`` (atomically: written to a sibling temp folder, then renamed).

    Args:
        out: output folder; must not exist or be empty unless ``overwrite``.
        cfg: the (already quick-merged) world config.
        quick: only recorded in build_info (the caller applied the overrides).
        overwrite: replace an existing non-empty ``out``.
        log: callable for progress lines.

    Returns:
        The build_info record (also written to ``out/build_info.json``).
    """
    from transformers import JanusImageProcessorPil, JanusProcessor

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it or choose a new folder")
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    info: dict[str, Any] = {"seed": cfg.seed, "quick": quick, "torch_threads": torch.get_num_threads()}

    def lap(name, t0):
        times[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    model, tokenizer = make_janus(cfg)
    info["vq"] = train_vq(model, cfg, rng, log)
    t = lap("vq", t)

    pool = token_pool(model, cfg, rng)
    info["vq"]["codes_used_in_pool"] = int(torch.unique(pool[[OCCUPATIONS.index(o) for o in cfg.occupations]]).numel())
    t = lap("tokenise_pool", t)

    info["janus"] = train_janus(model, tokenizer, pool, cfg, rng, log)
    t = lap("janus", t)

    # VQ reconstructions of a slice of the pool, with their attributes, for CLIP training.
    bank_x, bank_a = [], []
    k = min(cfg.vq.pool_per_cell, 16)
    for o in cfg.occupations:
        for gi in range(len(GENDERS)):
            for ri in range(len(RACES)):
                bank_x.append(decode_tokens(model, pool[OCCUPATIONS.index(o), gi, ri, :k]))
                bank_a += [(gi, ri, OCCUPATIONS.index(o))] * k
    recon_bank = (np.concatenate(bank_x), np.array(bank_a))
    clip_tok = clip_tokenizer(clip_words(cfg))
    clip, clip_processor = make_clip(cfg, clip_tok)
    info["clip"] = train_clip(clip, clip_tok, cfg, rng, recon_bank, log)
    info["clip"]["params"] = sum(p.numel() for p in clip.parameters())
    t = lap("clip", t)

    measured = evaluate(model, clip, clip_processor, cfg, log)  # also picks the zero-shot templates
    info["vq"].update(measured["vq"])
    info["clip"]["zero_shot"] = measured["zero_shot"]
    t = lap("evaluate", t)

    info["verify"] = verify_world(model, tokenizer, clip, clip_processor, cfg, log)
    lap("verify", t)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "janus").mkdir(parents=True)
        model.save_pretrained(tmp / "janus")
        tokenizer.save_pretrained(tmp / "janus")
        JanusProcessor(image_processor=JanusImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            background_color=[255, 255, 255]), tokenizer=tokenizer, num_image_tokens=NUM_PATCHES**2,
        ).save_pretrained(tmp / "janus")
        clip.save_pretrained(tmp / "clip")
        clip_processor.save_pretrained(tmp / "clip")
        import yaml

        (tmp / "world.yaml").write_text(
            "# Resolved lab-world config these weights were built from (written by debias.lab.build).\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        times["total"] = round(time.perf_counter() - t_start, 2)
        info["times_s"] = times
        info["janus_params"] = sum(p.numel() for p in model.parameters())
        info["weights_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        info["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built the lab world into {out} in {times['total']:.0f} s ({info['weights_bytes'] / 1e6:.1f} MB)")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m debias.lab.build --out DIR [--quick] [--config PATH] [--overwrite]``, or
    ``--out DIR --verify-only``."""
    ap = argparse.ArgumentParser(prog="python -m debias.lab.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. generators/lab/weights)")
    ap.add_argument("--world", default="janus",
                    help=f"which world to build: {' or '.join(WORLDS)} (default janus). diffusion writes DIR/sd (a "
                         "tiny StableDiffusionPipeline) beside DIR/janus and DIR/clip, reusing DIR/clip when present")
    ap.add_argument("--quick", action="store_true", help="reduced world for CI (well under a minute)")
    ap.add_argument("--config", default=None, help=f"world config (default {DEFAULT_CONFIG})")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--verify-only", action="store_true",
                    help="train nothing: re-run the evaluation and verification on the world already in --out (with "
                         "its own world.yaml) and rewrite its build_info.json")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default). On a shared, busy machine 1 is much faster than 2: "
                         "busy-waiting worker threads lose their time slices")
    args = ap.parse_args(argv)
    if args.world not in WORLDS:
        print(f"error: --world must be one of {', '.join(WORLDS)}, got {args.world!r}", file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"error: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    if args.verify_only and (args.quick or args.config or args.overwrite):
        print("error: --verify-only re-measures the world in --out with its own world.yaml; drop --quick, --config "
              "and --overwrite", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(m):
        print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True)

    try:
        if args.world == "diffusion":
            from debias.lab.train_sd import build_sd, reverify_sd

            if args.verify_only:
                reverify_sd(args.out, log=log)
            else:
                build_sd(args.out, load_world_config(args.config, quick=args.quick), quick=args.quick,
                         overwrite=args.overwrite, log=log)
        elif args.verify_only:
            reverify(args.out, log=log)
        else:
            cfg = load_world_config(args.config, quick=args.quick)
            build(args.out, cfg, quick=args.quick, overwrite=args.overwrite, log=log)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
