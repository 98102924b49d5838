"""Stable Diffusion's safety checker in an audit: a tiny SD pipeline with a real StableDiffusionSafetyChecker whose
concept thresholds flag about half of the images. Flagged images come back black; the audit must record them,
leave them out of the shares, and report their rate per prompt and overall, saying whether the checker ran."""

import json

import numpy as np
import pytest
import torch

PROMPTS = ["nurse", "pilot"]
SEEDS = 4


def config(safety_checker: bool = True):
    from debias.config import ExperimentConfig
    from generators.config import from_dict

    return from_dict(ExperimentConfig, {
        "name": "nsfw", "generator": {"backend": "diffusers", "model": "tiny", "device": "cpu", "batch_size": 4,
                                      "sampling": {"num_inference_steps": 2, "height": 32, "width": 32,
                                                   "safety_checker": safety_checker}},
        "prompts": {"occupations": PROMPTS}, "images_per_prompt": SEEDS, "faces": {"detector": "none"},
        "classifier": {"model": "tiny"}, "metrics": {"n_boot": 20}, "card": {"enabled": False},
    })


@pytest.fixture(scope="module")
def flagged_pipeline():
    """The pipeline, with thresholds set at the median of the checker's own concept scores on the audit's images
    (computed with nothing flagged), and which (prompt, seed) it therefore flags."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    from generators.diffusers_backend import DiffusersGenerator
    from generators.tiny import tiny_diffusion_pipeline

    pipe = tiny_diffusion_pipeline(seed=0, safety_checker=True, nsfw_threshold=1.0)  # flags nothing yet
    cfg = config()
    gen = DiffusersGenerator(cfg.generator, pipeline=pipe)
    prompts = cfg.prompts.neutral_prompts()
    scores = {}
    checker = pipe.safety_checker
    for prompt in prompts:
        images = gen.generate([prompt] * SEEDS, list(range(SEEDS)))
        assert all(im.nsfw is False for im in images)
        pixels = pipe.feature_extractor([im.image for im in images], return_tensors="pt").pixel_values
        with torch.no_grad():
            emb = checker.visual_projection(checker.vision_model(pixels)[1])
            best = cosine_distance(emb, checker.concept_embeds).max(dim=1).values
        scores.update({(prompt, s): float(v) for s, v in enumerate(best)})
    threshold = float(np.median(list(scores.values())))
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
    flagged = {k for k, v in scores.items() if v - threshold > 0.0005}  # the checker rounds scores to 3 digits
    assert 0 < len(flagged) < len(scores)
    return pipe, flagged


def test_flagged_images_are_recorded_excluded_and_reported(flagged_pipeline, tmp_path):
    from audit.run import run_audit
    from audit.store import RunStore
    from generators.diffusers_backend import DiffusersGenerator

    pipe, flagged = flagged_pipeline
    cfg = config()
    metrics = run_audit(cfg, tmp_path, generator=DiffusersGenerator(cfg.generator, pipeline=pipe), progress=False)

    records = RunStore(tmp_path).records()
    assert {(r["prompt"], r["seed"]) for r in records if r["nsfw_content_detected"]} == flagged
    assert all(r["nsfw_content_detected"] is False for r in records if (r["prompt"], r["seed"]) not in flagged)
    for r in records:  # what the checker does to a flagged image: it comes back black
        black = not np.asarray(RunStore(tmp_path).image(r)).any()
        assert black == ((r["prompt"], r["seed"]) in flagged)

    nsfw = metrics["nsfw"]
    assert nsfw["checker"] is True and nsfw["n_flagged"] == len(flagged) and nsfw["n_checked"] == len(records)
    assert nsfw["nsfw_rate"] == pytest.approx(len(flagged) / len(records))
    for prompt in cfg.prompts.neutral_prompts():
        n = sum(1 for p, _ in flagged if p == prompt)
        assert nsfw["per_prompt"][prompt] == pytest.approx(n / SEEDS)
    # left out of the shares: each prompt's classified images are the unflagged ones
    for row in metrics["attributes"]["gender"]["per_prompt"]:
        kept = SEEDS - sum(1 for p, _ in flagged if p == row["prompt"])
        assert row["n_images"] == kept and row["n_classified"] == kept
    assert metrics["faces"]["n_images"] == len(records) - len(flagged)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert sorted((p["prompt"], p["seed"]) for p in predictions if p["nsfw"]) == sorted(flagged)
    assert all(p["gender"] is None and p["face"] is None for p in predictions if p["nsfw"])

    html, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    assert "NSFW-flagged rate" in html and "safety checker <b>on</b>" in html
    assert f"{len(flagged)} of {len(records)} images flagged" in html
    assert f"Safety checker: on; NSFW-flagged rate ↓ {nsfw['nsfw_rate']:.1%}" in md


def test_switched_off_checker_flags_nothing_and_the_report_says_so(flagged_pipeline, tmp_path):
    from audit.run import run_audit
    from generators.diffusers_backend import DiffusersGenerator
    from generators.tiny import tiny_diffusion_pipeline

    cfg = config(safety_checker=False)
    pipe = tiny_diffusion_pipeline(seed=0, safety_checker=True, nsfw_threshold=-1.0)  # would flag every image
    gen = DiffusersGenerator(cfg.generator, pipeline=pipe)
    assert gen.pipeline.safety_checker is None
    metrics = run_audit(cfg, tmp_path, generator=gen, progress=False)
    assert metrics["nsfw"]["checker"] is False and metrics["nsfw"]["nsfw_rate"] is None
    assert metrics["faces"]["n_images"] == len(PROMPTS) * SEEDS
    assert "safety checker <b>off / none</b>" in (tmp_path / "report.html").read_text()
    assert "Safety checker: off, or the pipeline has none." in (tmp_path / "report.md").read_text()
