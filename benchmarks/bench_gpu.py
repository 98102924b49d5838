"""Throughput at real model sizes on an accelerator: Janus-Pro sampling, CLIP classification, one LoRA training step.

Random weights (the speed and memory of a model do not depend on its values), built in-process from configs of the
published sizes, so nothing is downloaded:

- **Sampling** (``janus-pro-1b``: Llama 2048 x 24 layers; ``janus-pro-7b``: 4096 x 30; both with the SigLIP-L
  vision tower, the 16,384-code VQ model and 576 image tokens of 384 px images; vocabulary 102,400), bf16, batch
  ``--batch`` (16) with classifier-free guidance (32 sequences per step): images/s and peak memory of our loop
  (:class:`generators.janus.JanusGenerator`: its own KV-cached loop, per-image RNG streams, VQ decode) against
  transformers' ``generate(generation_mode="image")`` + ``decode_image_tokens`` on the same model and batch, and
  against the memory-bandwidth bound: every decode step reads all language-model weights once, so a step takes at
  least ``weight bytes / bandwidth`` (the bandwidth measured here by a large device-to-device copy).
- **Classification**: CLIP ViT-L/14 (vision 1024 x 24 layers, patch 14, 224 px; text 768 x 12) through our
  :class:`audit.classify.ClipClassifier` (preprocessing, both attributes' zero-shot heads) against a bare batched
  ``get_image_features`` forward on already preprocessed pixels: images/s.
- **Training**: one SFT step (image-token negative log-likelihood) and one BPO step (balanced preference loss on two
  images per prompt, :func:`debias.losses.balanced_preference_loss`) of a LoRA (r 32 on q, k, v, o, gate, up,
  down of the language model) on the 7B, bf16, AdamW: seconds per step and peak memory.

``--tiny`` runs the same code at tiny sizes on the CPU (what the test runs; the numbers then only show the
script works). Prints one JSON object; ``--markdown PATH`` also writes the table with the date and device.

Run: ``python -m benchmarks.bench_gpu [--tiny] [--models janus-pro-1b janus-pro-7b] [--batch 16]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date

import torch

SIZES = {
    "janus-pro-1b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=5632, num_attention_heads=16),
    "janus-pro-7b": dict(hidden_size=4096, num_hidden_layers=30, intermediate_size=11008, num_attention_heads=32),
}
VOCAB = 102_400
PROMPT = "A photo of the face of a cardiologist, a person"


FAST = ["--tiny"]  # `make bench --fast` and the test suite: tiny models on the CPU

def device_and_dtype(tiny: bool) -> tuple[str, torch.dtype]:
    if torch.cuda.is_available() and not tiny:
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def timed(fn, device: str, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large copy (read + write counted), the practical memory bandwidth."""
    n = (1 << 28) if device == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * x.element_size() / seconds


def janus_model(name: str, device: str, dtype: torch.dtype):
    """A random-weight Janus of size ``name`` (or tiny) on ``device``, with a byte-level tokenizer."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration

    from generators.tiny import byte_tokenizer, tiny_janus

    if name == "tiny":
        model, tokenizer = tiny_janus(seed=0, hidden_size=64, num_patches=8, codebook_size=256,
                                      channel_multiplier=(1, 2))
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    tokenizer = byte_tokenizer()
    config = JanusConfig(text_config=dict(model_type="llama", vocab_size=VOCAB, num_key_value_heads=SIZES[name][
        "num_attention_heads"], max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        **SIZES[name]), image_token_id=6)
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = JanusForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")})
    return model, tokenizer


def bench_sampling(name: str, args, device: str, dtype: torch.dtype, bandwidth: float) -> dict:
    from generators.base import GeneratorConfig
    from generators.janus import JanusGenerator

    peak_reset(device)
    model, tokenizer = janus_model(name, device, dtype)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    cfg = GeneratorConfig(backend="janus", model=name, device=device, dtype=dtype_name, batch_size=args.batch,
                          sampling={"guidance_scale": 5.0, "top_k": 0})
    gen = JanusGenerator(cfg, model=model, tokenizer=tokenizer)
    seeds = list(range(args.batch))
    ids, mask = gen.encode([PROMPT])
    ids, mask = ids.to(device), mask.to(device)

    def ours():
        gen.generate([PROMPT] * args.batch, seeds)

    def stock():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, generation_mode="image", guidance_scale=5.0,
                                 do_sample=True, top_k=0, num_return_sequences=args.batch)
            model.decode_image_tokens(out)

    t_ours = timed(ours, device, args.repeats)
    peak_ours = peak_gib(device)
    peak_reset(device)
    t_stock = timed(stock, device, args.repeats)
    peak_stock = peak_gib(device)
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if ".language_model." in f".{n}" or n.startswith("model.language_model"))
    steps = model.config.vq_config.num_patches ** 2
    step_floor = lm_bytes / bandwidth  # one read of the language model's weights per decode step
    bound = args.batch / (steps * step_floor)
    out = {"model": name, "params": sum(p.numel() for p in model.parameters()), "language_model_bytes": lm_bytes,
           "image_tokens": steps, "batch": args.batch, "cfg": True, "dtype": dtype_name,
           "ours_images_per_s": args.batch / t_ours, "generate_images_per_s": args.batch / t_stock,
           "ours_vs_generate": t_stock / t_ours, "bandwidth_bound_images_per_s": bound,
           "ours_fraction_of_bound": (args.batch / t_ours) / bound,
           "ours_peak_gib": peak_ours, "generate_peak_gib": peak_stock}
    del gen, model
    peak_reset(device)
    return out


def clip_model(tiny: bool, device: str, dtype: torch.dtype):
    """CLIP ViT-L/14 (or a tiny CLIP) with random weights and a 224 px (32 px) processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from audit.classify import tiny_clip
    from generators.tiny import byte_clip_tokenizer

    if tiny:
        model, processor = tiny_clip()
        return model.to(device=device, dtype=dtype).eval(), processor
    tokenizer = byte_clip_tokenizer()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}), tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_size=768,
                         intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768)
    torch.manual_seed(0)
    return CLIPModel(config).to(device=device, dtype=dtype).eval(), processor


def bench_classifier(args, device: str, dtype: torch.dtype) -> dict:
    import numpy as np
    from PIL import Image

    from audit.classify import ClipClassifier

    model, processor = clip_model(args.tiny, device, dtype)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    clf = ClipClassifier({"model": "bench", "device": device, "dtype": dtype_name, "batch_size": args.clip_batch,
                          "attributes": ["gender", "race"], "abstain_threshold": 0.0}, model=model,
                         processor=processor)
    rng = np.random.default_rng(0)
    side = 32 if args.tiny else 384  # the generator's output size; the processor resizes it
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.clip_batch)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)

    def bare():
        with torch.no_grad():
            model.get_image_features(pixel_values=pixels)

    t_ours = timed(lambda: clf.classify(images), device, args.repeats)
    t_bare = timed(bare, device, args.repeats)
    return {"model": "tiny-clip" if args.tiny else "clip-vit-large-patch14", "batch": args.clip_batch,
            "ours_images_per_s": args.clip_batch / t_ours, "bare_forward_images_per_s": args.clip_batch / t_bare,
            "ours_vs_bare": t_bare / t_ours}


def bench_training(name: str, args, device: str, dtype: torch.dtype) -> dict:
    from peft import get_peft_model

    from debias.losses import balanced_preference_loss, mean_token_logprob
    from debias.train.common import lora_config
    from debias.train.config import LoraOptions
    from generators.janus_sequence import SpecialIds, encode_prompts, image_token_logprobs

    peak_reset(device)
    model, tokenizer = janus_model(name, device, dtype)
    ids = SpecialIds.of(model, tokenizer)
    model = get_peft_model(model, lora_config(LoraOptions(r=32, alpha=32, dropout=0.0)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    steps = model.base_model.model.config.vq_config.num_patches ** 2
    codes = model.base_model.model.config.vq_config.num_embeddings
    b = args.train_batch
    input_ids, mask = encode_prompts(tokenizer, [PROMPT] * b, ids)
    input_ids, mask = input_ids.to(device), mask.to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, codes, (b, steps), generator=g).to(device)

    def sft():
        opt.zero_grad(set_to_none=True)
        loss = -image_token_logprobs(model, input_ids, mask, tokens, ids).mean()
        loss.backward()
        opt.step()

    def bpo():
        # b // 2 prompts, two images each (rows i and i + b // 2), as the BPO trainer pairs them.
        opt.zero_grad(set_to_none=True)
        logp = mean_token_logprob(image_token_logprobs(model, input_ids, mask, tokens, ids))
        loss = balanced_preference_loss(logp[: b // 2], logp[b // 2:])
        loss.backward()
        opt.step()

    out = {"model": name, "lora_r": 32, "batch_sequences": b, "image_tokens": steps}
    for step_name, fn in (("sft", sft), ("bpo", bpo)):
        peak_reset(device)
        times = []
        for _ in range(1 + args.repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{step_name}_s_per_step"] = statistics.median(times[1:])
        out[f"{step_name}_peak_gib"] = peak_gib(device)
    del model, opt
    peak_reset(device)
    return out


def markdown(result: dict) -> str:
    lines = [f"Measured {result['date']} on {result['device']} ({result['dtype']}).", "",
             "| model | ours images/s | generate() images/s | ours / generate | bandwidth bound images/s | "
             "ours / bound | peak GiB (ours / generate) |", "|---|--:|--:|--:|--:|--:|--:|"]
    for s in result["sampling"]:
        peaks = "—" if s["ours_peak_gib"] is None else f"{s['ours_peak_gib']:.1f} / {s['generate_peak_gib']:.1f}"
        lines.append(f"| {s['model']} (batch {s['batch']}, CFG) | {s['ours_images_per_s']:.2f} | "
                     f"{s['generate_images_per_s']:.2f} | {s['ours_vs_generate']:.2f}x | "
                     f"{s['bandwidth_bound_images_per_s']:.2f} | {100 * s['ours_fraction_of_bound']:.0f}% | {peaks} |")
    c = result["classifier"]
    lines += ["", f"CLIP ({c['model']}, batch {c['batch']}): ours {c['ours_images_per_s']:.0f} images/s, bare "
                  f"forward {c['bare_forward_images_per_s']:.0f} images/s ({c['ours_vs_bare']:.2f}x)."]
    for t in result["training"]:
        peak = "" if t["sft_peak_gib"] is None else f", peak {t['sft_peak_gib']:.1f} / {t['bpo_peak_gib']:.1f} GiB"
        lines.append(f"LoRA r 32 on {t['model']} ({t['batch_sequences']} sequences): SFT {t['sft_s_per_step']:.2f} "
                     f"s/step, BPO {t['bpo_s_per_step']:.2f} s/step{peak}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (tests the script)")
    ap.add_argument("--models", nargs="*", default=list(SIZES), help="sampling models")
    ap.add_argument("--train-model", default="janus-pro-7b", help="model of the LoRA steps")
    ap.add_argument("--batch", type=int, default=16, help="images per sampling batch")
    ap.add_argument("--clip-batch", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=4, help="sequences per training step (2 BPO pairs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        # `make bench` on a CPU machine: say so in the result instead of timing real-size models on the CPU.
        result = {"benchmark": "gpu", "skipped": "no CUDA device here; run it on a GPU machine (--tiny checks the "
                                                 "script on the CPU)"}
        print(json.dumps(result))
        return result
    if args.tiny:
        args.models, args.train_model = ["tiny"], "tiny"
        args.batch, args.clip_batch, args.train_batch, args.repeats = min(args.batch, 4), 8, 4, 1
    device, dtype = device_and_dtype(args.tiny)
    bandwidth = copy_bandwidth(device)
    result = {"benchmark": "gpu", "date": date.today().isoformat(), "tiny": args.tiny,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
              "copy_bandwidth_gb_s": bandwidth / 1e9,
              "sampling": [bench_sampling(m, args, device, dtype, bandwidth) for m in args.models],
              "classifier": bench_classifier(args, device, dtype),
              "training": [bench_training(args.train_model, args, device, dtype)]}
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
