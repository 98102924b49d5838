"""Verification of a built lab world, measured with the code the audit runs.

* **Evaluation** (:func:`evaluate`) on fresh renders: VQ reconstruction error and the lab CLIP's zero-shot accuracy,
  on renders and on their VQ reconstructions, for every candidate template (a build keeps the best one).
* **Verification** (:func:`verify_world`): images sampled by the real sampler (:class:`generators.janus.JanusGenerator`
  configured as ``configs/generators/lab.yaml``, at each of ``verify.guidance_scales``) on the audit's seeds
  ``0..n-1`` per prompt, decoded to 8-bit images as the audit stores them, and classified by
  :class:`audit.classify.ClipClassifier` configured as the classifier of ``configs/experiments/lab.yaml`` with the
  world's templates (the audit's ``faces.detector: none`` passes whole images). Planted vs measured shares per
  occupation, explicit-prompt adherence, the effect of guidance, and the exact answer distribution of the
  understanding questions.
* **World fit** (:func:`generator_own`): the generator's *own* shares per occupation, from a large sample taken as the
  audit takes it (``configs/generators/lab.yaml`` at its guidance scale, the audit's classifier) on seeds far from
  the audit's. An audit estimates exactly these classifier-labelled shares, so its intervals must cover them at the
  nominal rate; their distance from the planted shares is the world's fit (how well the tiny generator learned the
  skew it was trained on), a property of the build, not of the audit.

:func:`reverify` re-runs both on a world folder and rewrites its ``build_info.json``
(``python -m debias.lab.build --verify-only --out DIR``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from audit.classify import ClipClassifier
from debias.lab.vq import decode_tokens, encode_images, to_pixels
from debias.lab.world import WorldConfig, caption, load_world_config, random_attrs
from generators.base import GeneratorConfig, to_pil
from generators.config import UserError, from_dict, load_yaml
from generators.janus import JanusGenerator
from generators.janus_sequence import blank_pixel_values, question_ids
from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch
from generators.resources import named_config

AUDIT_EXPERIMENT = "lab"  # configs/experiments/lab.yaml: its classifier section
AUDIT_GENERATOR = "lab"  # configs/generators/lab.yaml
GENERATOR_OWN_SEED = 1_000_000  # first seed of the generator-own sample, far from the audit's seeds 0..n-1


def world_classifier(cfg: WorldConfig, clip, processor, attributes: dict | None = None) -> ClipClassifier:
    """The audit's classifier on the world's CLIP: ``classifier`` of ``configs/experiments/lab.yaml``, with the
    world's attributes and templates (or ``attributes`` given as ``{name: {classes, templates}}``)."""
    section = load_yaml(named_config("experiments", AUDIT_EXPERIMENT))["classifier"]
    if attributes is None:
        attributes = {a: {"classes": list(s.classes), "templates": list(s.templates)}
                      for a, s in cfg.classifier.items()}
    return ClipClassifier({**section, "attributes": attributes}, model=clip, processor=processor)


def world_generator(model, tokenizer, guidance_scale: float) -> JanusGenerator:
    """The real sampler on the world's Janus: ``configs/generators/lab.yaml`` at ``guidance_scale``."""
    data = load_yaml(named_config("generators", AUDIT_GENERATOR))
    data["sampling"] = {**(data.get("sampling") or {}), "guidance_scale": guidance_scale}
    return JanusGenerator(from_dict(GeneratorConfig, data, prefix="generator"), model=model, tokenizer=tokenizer)


def labels(classifier: ClipClassifier, images) -> dict[str, np.ndarray]:
    """Hard labels per attribute (argmax, or -1 where the classifier abstains), as the audit computes them."""
    return classifier.predict(classifier.classify(images))


def _sampled_labels(generator: JanusGenerator, classifier: ClipClassifier, prompts: Sequence[str],
                    n: int) -> dict[str, np.ndarray]:
    # Each prompt is repeated n times in a row and gets the audit's seeds 0..n-1.
    images = generator.generate(prompts, list(range(n)) * (len(prompts) // n))
    return labels(classifier, [im.image for im in images])


def choose_templates(clip, processor, cfg: WorldConfig, renders, recons, attrs, choose: bool = True) -> dict:
    """Measure every candidate template per attribute on renders and VQ reconstructions (PIL images).

    Args:
        clip, processor: the world's CLIP.
        cfg: the world; with ``choose`` its templates are replaced by the best candidate (on reconstructions, then
            renders), which is what the written ``world.yaml`` and the audit use.
        renders, recons: the evaluation images; ``attrs`` their attribute indices.

    Returns:
        Per attribute the chosen template and the accuracy of every candidate.
    """
    truth = {"gender": attrs["gender"], "race": attrs["race"]}
    base = world_classifier(cfg, clip, processor)
    embeddings = {"renders": base.image_embeddings(renders), "vq_reconstructions": base.image_embeddings(recons)}
    report = {}
    for a, spec in cfg.classifier.items():
        if a not in truth:
            continue
        scores = {}
        for tpl in dict.fromkeys([*spec.templates, *spec.candidates]):
            clf = world_classifier(cfg, clip, processor, {a: {"classes": list(spec.classes), "templates": [tpl]}})
            scores[tpl] = {k: float((clf.predict(clf.probabilities_from_embeddings(e))[a] == truth[a]).mean())
                           for k, e in embeddings.items()}
        if choose:
            spec.templates = [max(scores, key=lambda t: (scores[t]["vq_reconstructions"], scores[t]["renders"]))]
        report[a] = {"chosen": spec.templates[0], "accuracy": scores}
    return report


@torch.no_grad()
def evaluate(model, clip, processor, cfg: WorldConfig, log, choose: bool = True) -> dict:
    """VQ and CLIP evaluation on ``verify.n_clip_eval`` fresh renders (seeded ``seed + 1``).

    Returns:
        ``{"vq": reconstruction error, PSNR, codes used, stock-encode agreement, "zero_shot": template accuracies
        (:func:`choose_templates`) and the occupation accuracy on reconstructions}``.
    """
    n = cfg.verify.n_clip_eval
    eval_rng = np.random.default_rng(cfg.seed + 1)
    attrs = random_attrs(n, eval_rng, cfg.occupations)
    renders = render_batch(n, attrs, eval_rng)
    toks = encode_images(model, renders)
    recons = decode_tokens(model, toks)
    mse = float(((recons - renders) ** 2).mean())
    stock = model.model.vqmodel.encode(to_pixels(renders[:64])).image_tokens.view(min(n, 64), -1)
    vq = {"eval_recon_mse_0_1": mse, "eval_psnr_db": float(10 * np.log10(1.0 / mse)),
          "eval_codes_used": int(torch.unique(toks).numel()),
          "stock_encode_agrees": float((stock == toks[:64]).float().mean())}
    render_images, recon_images = to_pil(renders, (0.0, 1.0)), to_pil(recons, (0.0, 1.0))
    zero_shot = choose_templates(clip, processor, cfg, render_images, recon_images, attrs, choose)
    occupations = list(cfg.occupations)
    occ = world_classifier(cfg, clip, processor,
                           {"occupation": {"classes": occupations, "templates": ["a photo of a {}"]}})
    truth = np.array([occupations.index(OCCUPATIONS[i]) for i in attrs["occupation"]])
    zero_shot["occupation_accuracy_vq_reconstructions"] = float(
        (labels(occ, recon_images)["occupation"] == truth).mean())
    chosen = {a: v["accuracy"][v["chosen"]] for a, v in zero_shot.items() if isinstance(v, dict)}
    log(f"vq eval mse {mse:.5f}; clip zero-shot accuracy {json.dumps(chosen)}")
    return {"vq": vq, "zero_shot": zero_shot}


def generator_own(model, tokenizer, classifier: ClipClassifier, cfg: WorldConfig, log) -> dict:
    """The generator's own shares: ``verify.n_generator_own`` images per occupation sampled as the audit samples
    them (``configs/generators/lab.yaml``, its guidance scale) on seeds from :data:`GENERATOR_OWN_SEED`, classified
    by the audit's classifier (argmax).

    Returns:
        ``n_per_occupation``, ``guidance_scale``, ``per_occupation`` (planted and generator-own female share and race
        shares), and the world's fit: ``fit_mean_abs_p_female`` (mean over occupations of |planted - generator-own|
        female share), ``fit_max_abs_p_female`` and ``fit_mean_abs_race_share``.
    """
    n = cfg.verify.n_generator_own
    guidance = load_yaml(named_config("generators", AUDIT_GENERATOR))["sampling"]["guidance_scale"]
    generator = world_generator(model, tokenizer, guidance)
    seeds = list(range(GENERATOR_OWN_SEED, GENERATOR_OWN_SEED + n))
    per = {}
    for o in cfg.occupations:
        pred = labels(classifier, [im.image for im in generator.generate([caption(cfg, o)] * n, seeds)])
        spec = cfg.occupations[o]
        per[o] = {"planted_p_female": spec.p_female,
                  "generator_p_female": float((pred["gender"] == GENDERS.index("female")).mean()),
                  "planted_race": spec.race,
                  "generator_race": {c: float((pred["race"] == i).mean()) for i, c in enumerate(RACES)}}
    gerr = [abs(p["generator_p_female"] - p["planted_p_female"]) for p in per.values()]
    rerr = [abs(p["generator_race"][c] - p["planted_race"][c]) for p in per.values() for c in RACES]
    log(f"world fit (generator-own shares, {n} images per occupation): mean |planted - generator| P(female) "
        f"{np.mean(gerr):.3f} (max {np.max(gerr):.3f}), race share {np.mean(rerr):.3f}")
    return {"n_per_occupation": n, "guidance_scale": guidance, "first_seed": GENERATOR_OWN_SEED,
            "per_occupation": per, "fit_mean_abs_p_female": float(np.mean(gerr)),
            "fit_max_abs_p_female": float(np.max(gerr)), "fit_mean_abs_race_share": float(np.mean(rerr))}


def verify_world(model, tokenizer, clip, processor, cfg: WorldConfig, log) -> dict:
    """Sample, decode and classify: planted vs measured shares, explicit adherence, guidance effect, QA answers, and
    the world's fit (:func:`generator_own`)."""
    v = cfg.verify
    occs = list(cfg.occupations)
    classifier = world_classifier(cfg, clip, processor)
    result: dict[str, Any] = {
        "n_per_occupation": v.n_per_occupation,
        "classifier": f"audit.classify.ClipClassifier as configs/experiments/{AUDIT_EXPERIMENT}.yaml with the world's "
                      "templates, argmax",
        "sampling": f"generators.janus.JanusGenerator as configs/generators/{AUDIT_GENERATOR}.yaml at each guidance "
                    "scale, seeds 0..n-1 per prompt",
        "neutral": {}, "explicit_adherence": {"n_per_prompt": v.n_explicit},
    }
    n = v.n_explicit
    asks = [(o, gw, None) for o in occs for gw in GENDERS] + [(o, None, rw) for o in occs for rw in RACES]
    for g in v.guidance_scales:
        generator = world_generator(model, tokenizer, g)
        neutral = [caption(cfg, o) for o in occs for _ in range(v.n_per_occupation)]
        pred = _sampled_labels(generator, classifier, neutral, v.n_per_occupation)
        per = {}
        for k, o in enumerate(occs):
            sl = slice(k * v.n_per_occupation, (k + 1) * v.n_per_occupation)
            spec = cfg.occupations[o]
            per[o] = {"planted_p_female": spec.p_female,
                      "measured_p_female": float((pred["gender"][sl] == GENDERS.index("female")).mean()),
                      "planted_race": spec.race,
                      "measured_race": {c: float((pred["race"][sl] == i).mean()) for i, c in enumerate(RACES)}}
        gerr = [abs(p["measured_p_female"] - p["planted_p_female"]) for p in per.values()]
        rerr = [abs(p["measured_race"][c] - p["planted_race"][c]) for p in per.values() for c in RACES]
        result["neutral"][str(g)] = {"per_occupation": per, "mean_abs_err_p_female": float(np.mean(gerr)),
                                     "max_abs_err_p_female": float(np.max(gerr)),
                                     "occupations_within_0.1_p_female": int(sum(e <= 0.1 for e in gerr)),
                                     "mean_abs_err_race_share": float(np.mean(rerr))}
        log(f"verify g={g}: mean |measured - planted| P(female) {np.mean(gerr):.3f} (max {np.max(gerr):.3f}), "
            f"race share {np.mean(rerr):.3f}")
        # Explicit-prompt adherence: fraction of images classified as the requested group.
        pred = _sampled_labels(generator, classifier,
                               [caption(cfg, o, gender=gw, race=rw) for o, gw, rw in asks for _ in range(n)], n)
        hits: dict[str, list[float]] = {"gender": [], "race": []}
        per_prompt = {}
        for k, (o, gw, rw) in enumerate(asks):
            sl = slice(k * n, (k + 1) * n)
            a, want = ("gender", GENDERS.index(gw)) if gw else ("race", RACES.index(rw))
            frac = float((pred[a][sl] == want).mean())
            hits[a].append(frac)
            per_prompt[caption(cfg, o, gender=gw, race=rw)] = frac
        result["explicit_adherence"][str(g)] = {"mean_gender": float(np.mean(hits["gender"])),
                                                "mean_race": float(np.mean(hits["race"])), "per_prompt": per_prompt}
        log(f"explicit adherence g={g}: gender {np.mean(hits['gender']):.3f}, race {np.mean(hits['race']):.3f}")
    result["generator_own"] = generator_own(model, tokenizer, classifier, cfg, log)
    if cfg.understanding.questions and cfg.janus.qa_every > 0:
        qa = {a: {o: answer_distribution(model, tokenizer, cfg, a, o) for o in occs}
              for a in cfg.understanding.questions}
        result["understanding"] = {
            "format": "[<bos>, <begin_of_image>] + [<image_placeholder>] * 64 + [<end_of_image>] + question + answer "
                      "+ [<eos>], blank white image as pixel_values",
            "planted": cfg.understanding.answers,
            "mean_answer_probs": {a: {k: float(np.mean([d[k] for d in per.values()])) for k in next(iter(per.values()))}
                                  for a, per in qa.items()},
            "per_occupation": qa,
        }
        log(f"understanding answers (mean over occupations): {result['understanding']['mean_answer_probs']}")
    return result


@torch.no_grad()
def answer_distribution(model, tokenizer, cfg: WorldConfig, attribute: str, occupation: str) -> dict[str, float]:
    """Exact next-token probabilities of the allowed answers (renormalised), plus their raw total mass, for the
    understanding probe's input (:func:`generators.janus_sequence.question_ids`, blank white image)."""
    ids = question_ids(model, tokenizer, cfg.understanding.questions[attribute].format(occupation=occupation))
    x = torch.tensor([ids])
    logits = model(input_ids=x, pixel_values=blank_pixel_values(model, 1), attention_mask=torch.ones_like(x)).logits
    p = logits[0, -1].float().softmax(-1)
    opts = list(cfg.understanding.answers[attribute])
    mass = {a: float(p[tokenizer(a, add_special_tokens=False).input_ids[0]]) for a in opts}
    total = sum(mass.values())
    return {**{a: m / total for a, m in mass.items()}, "_mass_on_options": total}


def reverify(out: str | Path, log=print) -> dict:
    """Re-run the evaluation and verification on the world in ``out`` and rewrite its ``build_info.json``.

    The weights, ``world.yaml`` (templates included) and the training records are left as they are; the ``vq``
    evaluation fields, ``clip.zero_shot`` and ``verify`` are replaced, and ``reverified`` records how long the re-run
    took and with which versions.

    Raises:
        UserError: when ``out`` is not a built world.
    """
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, JanusForConditionalGeneration

    out = Path(out)
    missing = [p for p in ("janus", "clip", "world.yaml", "build_info.json") if not (out / p).exists()]
    if missing:
        raise UserError(f"--out {out}: not a built lab world (missing {missing}); build one with "
                        "`python -m debias.lab.build --out DIR`")
    cfg = load_world_config(out / "world.yaml")
    info = json.loads((out / "build_info.json").read_text())
    model = JanusForConditionalGeneration.from_pretrained(out / "janus").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "janus")
    clip, processor = CLIPModel.from_pretrained(out / "clip").eval(), CLIPProcessor.from_pretrained(out / "clip")
    t0 = time.perf_counter()
    measured = evaluate(model, clip, processor, cfg, log, choose=False)
    t1 = time.perf_counter()
    info["vq"].update(measured["vq"])
    info["clip"]["zero_shot"] = measured["zero_shot"]
    info["verify"] = verify_world(model, tokenizer, clip, processor, cfg, log)
    info["reverified"] = {"torch_threads": torch.get_num_threads(),
                          "times_s": {"evaluate": round(t1 - t0, 2), "verify": round(time.perf_counter() - t1, 2)},
                          "versions": {"torch": torch.__version__,
                                       "transformers": __import__("transformers").__version__}}
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    log(f"re-verified the lab world in {out}")
    return info
