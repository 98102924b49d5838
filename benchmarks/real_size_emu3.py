"""Real-size Emu3-Gen with random weights: built from the real config, loaded through the config path, one image.

The architecture is BAAI/Emu3-Gen-hf's (text: vocabulary 184,622, hidden 4096, intermediate 14336, 32 heads, 8
key-value heads, positions 9216, RoPE theta 1e6 - transformers' ``Emu3TextConfig`` defaults, the values of the
BAAI/Emu3-Gen / Emu3-Chat config.json; VQ: BAAI/Emu3-VisionTokenizer's config.json, codebook 32768, embed_dim 4,
z_channels 4, ch 256, ch_mult [1, 2, 2, 4], 2 res blocks, attention at level 3, temporal factor 4 - transformers'
``Emu3VQVAEConfig`` defaults) with fewer decoder layers (``--layers``) and random weights. It is saved with
``save_pretrained`` (model and processor), loaded by ``load_generator`` from a generator config that names the
folder, and samples one image on the CPU with the Emu3-Gen card's sampling (CFG 3 against its negative prompt,
top-k 2048). Each stage runs in its own process, so the reported peak RSS of sampling is sampling's alone.

    python -m benchmarks.real_size_emu3 --out /tmp/emu3-real --layers 2 --image-area 518400
    python -m benchmarks.real_size_emu3 --small --out /tmp/emu3-small      # the test suite's version, in-process

Prints one JSON object. Not part of ``benchmarks/run.py`` (minutes and ~5 GB of disk at real size).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# BAAI/Emu3-Gen-hf's text and VQ configs (see the module docstring); only the layer count is reduced.
REAL_TEXT = dict(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=9216, rms_norm_eps=1e-5)
REAL_VQ = dict(codebook_size=32768, embed_dim=4, latent_channels=4, base_channels=256, channel_multiplier=[1, 2, 2, 4],
               num_res_blocks=2, attn_resolutions=[3], hidden_size=1024, num_attention_heads=1,
               temporal_downsample_factor=4)
# The understanding path's smallest image (Emu3ImageProcessor's min_pixels 512 x 512).
REAL_IMAGE_SIDE = 512
# A small architecture of the same kinds (for the test suite): 2 x 2 tokens, 16 x 16 px images.
SMALL_TEXT = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5)
SMALL_VQ = dict(codebook_size=128, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                num_res_blocks=1, attn_resolutions=[3], hidden_size=32, num_attention_heads=1,
                temporal_downsample_factor=2)
SMALL_IMAGE_SIDE = 32


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build(out: Path, layers: int, small: bool, dtype: str, seed: int = 0) -> dict:
    """Build the architecture with random weights and save model + processor to ``out``."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    from generators.base import torch_dtype
    from generators.tiny import emu3_generation_config, emu3_processor

    text, vq, side = (SMALL_TEXT, SMALL_VQ, SMALL_IMAGE_SIDE) if small else (REAL_TEXT, REAL_VQ, REAL_IMAGE_SIDE)
    t0 = time.perf_counter()
    processor = emu3_processor(vq["codebook_size"], side, vocab_size=text["vocab_size"])
    tok = processor.tokenizer
    config = Emu3Config(
        text_config={**text, "num_hidden_layers": layers, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vq_config=vq, vocabulary_map=tok.get_vocab(),
    )
    torch.manual_seed(seed)
    torch.set_default_dtype(torch_dtype(dtype))  # random init straight in the saved dtype: half the memory in bf16
    try:
        model = Emu3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.generation_config = emu3_generation_config(tok)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "params_text": sum(p.numel() for p in model.model.text_model.parameters()),
        "params_lm_head": model.lm_head.weight.numel(),
        "params_vq": sum(p.numel() for p in model.model.vqmodel.parameters()),
        "layers": layers, "dtype": dtype, "build_s": round(built, 1), "save_s": round(time.perf_counter() - t0, 1),
        "saved_gb": round(sum(f.stat().st_size for f in out.iterdir()) / 1024**3, 2), "build_peak_rss_gb": _rss_gb(),
    }


def sample(out: Path, image_area: int, dtype: str) -> dict:
    """Load the saved folder through a generator config and sample one image (seed 0), timing LM and VQ apart."""
    import torch

    from generators.backends import load_generator

    torch.manual_seed(0)
    t0 = time.perf_counter()
    generator = load_generator({
        "backend": "emu3", "model": str(out), "dtype": dtype, "device": "cpu", "batch_size": 1,
        "sampling": {"guidance_scale": 3.0, "top_k": 2048, "image_area": image_area},
    })
    loaded = time.perf_counter() - t0
    rss_loaded = _rss_gb()
    prompt = "A photo of the face of a nurse, a person"
    t0 = time.perf_counter()
    tokens = generator.sample_tokens([prompt], [0])
    sampled = time.perf_counter() - t0
    rss_sampled = _rss_gb()
    t0 = time.perf_counter()
    image = generator.decode(tokens)[0]
    decoded = time.perf_counter() - t0
    h, w = generator.layout.grid
    return {
        "image_area": image_area, "grid": [h, w], "tokens": h * w, "steps": h * (w + 1) - 1,
        "image_size": [image.size[1], image.size[0]], "load_s": round(loaded, 1), "sample_s": round(sampled, 1),
        "s_per_step": round(sampled / max(1, h * (w + 1) - 1), 4), "decode_s": round(decoded, 1),
        "rss_after_load_gb": round(rss_loaded, 2), "rss_after_sample_gb": round(rss_sampled, 2),
        "peak_rss_gb": round(_rss_gb(), 2), "threads": torch.get_num_threads(),
    }


def _stage_in_subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_size_emu3", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the saved model")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the real model has 32)")
    p.add_argument("--image-area", type=int, default=None, help="pixel area of the image (default: real 518400, "
                                                                 "small 256)")
    p.add_argument("--dtype", default=None, help="bfloat16 (real default) or float32 (small default)")
    p.add_argument("--small", action="store_true", help="a small architecture of the same kinds, in-process")
    p.add_argument("--stage", choices=["build", "sample"], default=None, help="run one stage in this process")
    args = p.parse_args(argv)
    out = Path(args.out)
    dtype = args.dtype or ("float32" if args.small else "bfloat16")
    area = args.image_area or (256 if args.small else 518400)
    if args.stage == "build" or (args.small and args.stage is None):
        out.mkdir(parents=True, exist_ok=True)
        result = build(out, args.layers, args.small, dtype)
        if args.stage is None:
            result.update(sample(out, area, dtype))
    elif args.stage == "sample":
        result = sample(out, area, dtype)
    else:
        common = ["--out", str(out), "--layers", str(args.layers), "--dtype", dtype, "--image-area", str(area)]
        result = {**_stage_in_subprocess([*common, "--stage", "build"]),
                  **_stage_in_subprocess([*common, "--stage", "sample"])}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
