"""Locate probes: hand-computed units, a planted language-side skew as ground truth, and the smoke run end to end.

The ground truth (``tests/planted.py``) is a tiny real Janus trained in-process: its *tuned* version
differs from the base only in ``model.language_model``, which pushes each occupation's neutral prompt toward a
planted group. The probes must find the skew on the language side: the controlled-generation hit rate is near 1,
and the component swap attributes the bias change to the language model, not the VQ decoder (and, for a model
changed only in its decoder, the other way round).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from audit.classify import ClassifierConfig
from audit.config import MetricsConfig
from audit.faces import FaceConfig
from audit.prompts import PromptConfig
from debias.config import ExperimentConfig, load_config
from debias.locate import LocateConfig, run_locate
from debias.locate.controlled import (
    ControlledConfig, code_histogram, controlled_probe, divergence, hit_rate, jsd, majority, majority_from_audit,
)
from debias.locate.report import understanding_section
from debias.locate.swap import SwapConfig, component_swap, factorial_effects
from debias.locate.understanding import (
    UnderstandingConfig, alignment_table, parse_answer, summarize_answers, understanding_probe,
)
from debias.locate.vision_probe import VisionProbeConfig, linear_probe, vision_probe
from generators.base import GeneratorConfig
from generators.config import ConfigError, UserError
from generators.janus import JanusGenerator
from planted import plant_answers, plant_skew, torch_threads

GENDER = ["male", "female"]
RACE = ["White", "Black", "Indian", "Asian"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine run several times faster on one thread (see planted.torch_threads).
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------------------------ answer parsing


@pytest.mark.parametrize("text, expected", [
    ("Male.", "male"),
    ("the answer is female", "female"),
    ("I'd say: MALE", "male"),
    ("FEMALE!!", "female"),
    ("  female\n", "female"),
    ("A woman.", "female"),
    ("He is a man", "male"),
    ("Male. Women are rarer in this job, but female nurses exist.", "male"),  # first sentence decides
    ("Unknown", "unknown"),
    ("unknown.", "unknown"),
    ("I cannot tell from the image.", "unknown"),
    ("It could be either male or female.", "unknown"),
    ("I don't know", "unknown"),
    ("Possible answers: male, female, unknown", "unparsed"),  # an echo of the options names no answer
    ("not male", "unparsed"),
    ("It is not a female", "unparsed"),
    ("unknown, but probably male", "unparsed"),
    ("male female", "unparsed"),
    ("banana", "unparsed"),
    ("", "unparsed"),
    ("femalex", "unparsed"),  # whole words only
])
def test_parse_gender_answers(text, expected):
    assert parse_answer(text, GENDER) == expected


@pytest.mark.parametrize("text, expected", [
    ("Black", "Black"),
    ("The person is white.", "White"),
    ("South Asian", "Indian"),  # longest phrase wins: never also "Asian"
    ("East Asian", "Asian"),
    ("caucasian", "White"),
    ("African American", "Black"),
    ("INDIAN", "Indian"),
    ("Indian or Asian, hard to say", "unknown"),
    ("cannot be determined", "unknown"),
    ("White, Black, Indian, Asian, unknown", "unparsed"),
])
def test_parse_race_answers(text, expected):
    assert parse_answer(text, RACE) == expected


def test_summarize_answers_hand_computed():
    s = summarize_answers(["male", "male", "female", "unknown", "unparsed"], GENDER)
    assert s["counts"] == {"male": 2, "female": 1, "unknown": 1, "unparsed": 1}
    assert s["rd"] == pytest.approx(1 / 3)  # |2/3 - 1/3| among the 3 answers naming a class
    assert s["rd_effective"] == pytest.approx(1 / 3 * 3 / 5)
    assert s["unknown_rate"] == s["unparsed_rate"] == pytest.approx(0.2)
    assert s["majority"] == "male"
    refusing = summarize_answers(["unknown"] * 4, GENDER)
    assert refusing["rd"] is None and refusing["rd_effective"] == 0.0 and refusing["majority"] is None
    with pytest.raises(UserError, match="not a class"):
        summarize_answers(["maybe"], GENDER)


# ---------------------------------------------------------------------------------------------- JSD and hits


def test_jsd_hand_computed_values():
    assert jsd([0.3, 0.7], [0.3, 0.7]) == 0.0
    assert jsd([1, 0, 0], [0, 0.5, 0.5]) == pytest.approx(1.0)  # disjoint supports: 1 bit
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): KL(p||m) = log2(4/3), KL(q||m) = (log2(2/3) + log2(2)) / 2
    by_hand = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    assert jsd([1, 0], [0.5, 0.5]) == pytest.approx(by_hand) == pytest.approx(0.311278, abs=1e-6)
    assert jsd([2, 0], [3, 3]) == pytest.approx(by_hand)  # counts are normalised
    assert jsd([0.2, 0.8], [0.6, 0.4]) == pytest.approx(jsd([0.6, 0.4], [0.2, 0.8]))  # symmetric
    rows = jsd([[1, 0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]])
    assert rows == pytest.approx([by_hand, 0.0])
    assert divergence(np.array([[1, 0], [0.5, 0.5]]), np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(by_hand / 2)
    with pytest.raises(UserError, match="same shape"):
        jsd([0.5, 0.5], [1, 0, 0])
    with pytest.raises(UserError, match=">= 0"):
        jsd([-0.1, 1.1], [0.5, 0.5])


def test_code_histograms_hand_computed():
    tokens = [[0, 1], [0, 2]]
    assert code_histogram(tokens, 3, "pooled") == pytest.approx([0.5, 0.25, 0.25])
    per = code_histogram(tokens, 3, "per_position", smoothing=1.0)  # add-one: (count + 1) / (2 + 3)
    assert per == pytest.approx(np.array([[3, 1, 1], [1, 2, 2]]) / 5)
    with pytest.raises(UserError, match=r"\[0, 3\)"):
        code_histogram([[0, 3]], 3)


def test_majority_rules():
    assert majority(GENDER, [0.7, 0.3], 0.6) == ("male", "")
    assert majority(GENDER, [0.55, 0.45], 0.6)[0] is None  # below the threshold
    assert majority(GENDER, [0.5, 0.5], 0.5)[0] is None  # a tie is no majority
    assert majority(GENDER, None, 0.6) == (None, "no classified image")
    audit = {"attributes": {"gender": {"classes": GENDER, "per_prompt": [
        {"prompt": "p1", "shares": [0.2, 0.8]}, {"prompt": "p2", "shares": [0.55, 0.45]},
        {"prompt": "p3", "shares": None}]}}}
    m = majority_from_audit(audit, "gender", 0.6)
    assert [m[p]["majority"] for p in ("p1", "p2", "p3")] == ["female", None, None]
    assert m["p1"]["share"] == pytest.approx(0.8)
    with pytest.raises(UserError, match="no attribute 'race'"):
        majority_from_audit(audit, "race", 0.6)


def test_hit_rate_hand_made_distributions():
    # Neutral and variant code distributions over 3 codes, per prompt.
    neutral = {"A": [0.8, 0.1, 0.1], "B": [0.1, 0.8, 0.1], "C": [0.4, 0.4, 0.2], "D": [0.5, 0.5, 0.0]}
    variants = {"A": {"male": [0.1, 0.8, 0.1], "female": [0.7, 0.2, 0.1]},  # closest female, majority female: hit
                "B": {"male": [0.2, 0.2, 0.6], "female": [0.1, 0.7, 0.2]},  # closest female, majority male: miss
                "C": {"male": [0.4, 0.4, 0.2], "female": [0.0, 0.0, 1.0]},  # no clear majority: skipped
                "D": {"male": [0.5, 0.0, 0.5], "female": [0.0, 0.5, 0.5]}}  # a tie for closest: not a hit
    div = {p: {c: jsd(neutral[p], q) for c, q in v.items()} for p, v in variants.items()}
    r = hit_rate(div, {"A": "female", "B": "male", "C": None, "D": "male"})
    assert (r["n_hits"], r["n_used"], r["n_skipped"]) == (1, 3, 1)
    assert r["hit_rate"] == pytest.approx(1 / 3)
    lo, hi = r["hit_rate_ci"]
    assert 0 < lo < 1 / 3 < hi < 1
    assert [row["hit"] for row in r["per_prompt"]] == [True, False, None, False]
    assert hit_rate(div, {p: None for p in div})["hit_rate"] is None  # nothing usable: undefined, not 0


# ---------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 60)
    X = rng.normal(size=(120, 8))
    X[:, 0] += np.where(y == "a", -4.0, 4.0)
    sep = linear_probe(X, y, folds=5, seed=0)
    assert sep["accuracy"] >= 0.98 and sep["macro_f1"] >= 0.98
    assert sep["chance"] == 0.5 and len(sep["fold_accuracy"]) == 5
    assert abs(sep["shuffled_accuracy"] - 0.5) <= 0.2  # the same embeddings with shuffled labels
    noise = linear_probe(rng.normal(size=(120, 8)), y, folds=5, seed=0)
    assert abs(noise["accuracy"] - 0.5) <= 0.15
    assert np.sum(noise["confusion"]) == 120
    with pytest.raises(UserError, match=">= 2 examples"):
        linear_probe(X[:61], y[:61])  # one 'b'


# ---------------------------------------------------------------------------------------------- factorial swap


def test_factorial_effects_hand_computed():
    balanced, skewed = np.array([0, 0, 1, 1]), np.array([1, 1, 1, 1])
    lab = np.empty((2, 2, 3, 4), dtype=np.int64)
    lab[0, :] = balanced  # base language side: RD 0 with either decoder
    lab[1, :] = skewed  # tuned language side: RD 1 with either decoder
    e = factorial_effects(lab, 2, n_boot=200, seed=0)
    assert e["total"] == pytest.approx(1.0) and e["language_main"] == pytest.approx(1.0)
    assert e["vision_main"] == 0.0 and e["interaction"] == 0.0
    assert e["language_share"] == pytest.approx(1.0) and e["vision_share"] == 0.0
    assert e["vision_main_ci"] == [0.0, 0.0]  # identical decoder cells: no variation at all
    assert e["language_main_ci"][0] > 0.3
    # Only the (tuned, tuned) cell is skewed: half of the change on each side, interaction 1.
    lab2 = np.broadcast_to(balanced, (2, 2, 3, 4)).copy()
    lab2[1, 1] = skewed
    e2 = factorial_effects(lab2, 2, n_boot=50)
    assert (e2["language_main"], e2["vision_main"], e2["interaction"]) == pytest.approx((0.5, 0.5, 1.0))
    assert e2["language_main"] + e2["vision_main"] == pytest.approx(e2["total"])
    # A prompt without any classified image in a cell is dropped, not counted as balanced.
    lab3 = lab.copy()
    lab3[0, 1, 2] = -1
    assert factorial_effects(lab3, 2, n_boot=10)["n_prompts"] == 2


# --------------------------------------------------------------------------------------------- ground truth


@pytest.fixture(scope="module")
def planted():
    with torch_threads(1):
        return plant_skew(seed=0)


def janus_generator(model, tokenizer, name):
    cfg = GeneratorConfig(backend="janus", model=name, device="cpu", batch_size=48, sampling={"guidance_scale": 1.0})
    return JanusGenerator(cfg, model=model, tokenizer=tokenizer)


def planted_experiment(planted, images=8):
    return ExperimentConfig(
        generator=GeneratorConfig(backend="janus", model="planted", device="cpu", batch_size=48,
                                  sampling={"guidance_scale": 1.0}),
        prompts=PromptConfig(occupations=planted.occupations), images_per_prompt=images, name="planted",
        faces=FaceConfig(detector="none"),
        classifier=ClassifierConfig(model="tiny", device="cpu", attributes=["gender"]),
        metrics=MetricsConfig(n_boot=50, joint=[], clip_score=False),
    )


def test_controlled_probe_finds_planted_language_skew(planted):
    cfg = ControlledConfig(attributes=["gender"], samples=16)
    truth = {"gender": planted.majority()}
    tuned = controlled_probe(janus_generator(planted.tuned, planted.tokenizer, "tuned"), planted.prompts(), cfg,
                             majorities=truth)
    base = controlled_probe(janus_generator(planted.base, planted.tokenizer, "base"), planted.prompts(), cfg,
                            majorities=truth)
    rates = {k: v["hit_rate"] for k, v in tuned["attributes"]["gender"]["hit_rate"].items()}
    assert set(rates) == {"pooled", "per_position", "teacher_forced"} and tuned["distribution_used"] == "pooled"
    assert all(r >= 5 / 6 for r in rates.values()), rates  # chance is 1/2
    # The balanced base draws both groups for every neutral prompt: no better than chance against the same truth.
    base_rate = base["attributes"]["gender"]["hit_rate"]["teacher_forced"]["hit_rate"]
    assert base_rate <= 0.67 and rates["teacher_forced"] - base_rate >= 0.3
    row = tuned["attributes"]["gender"]["per_prompt"][0]
    assert row["variants"]["female"].endswith(", a female")
    assert 0 <= row["jsd"]["pooled"]["male"] <= 1


def test_component_swap_attributes_language_skew_to_the_language_model(planted, tmp_path):
    exp = planted_experiment(planted)
    clf = planted.classifier()
    base = janus_generator(planted.base, planted.tokenizer, "planted")
    before = {k: v.clone() for k, v in planted.base.state_dict().items()}
    r = component_swap(exp, tmp_path / "lm", SwapConfig(n_boot=200), base=base, tuned=planted.tuned, classifier=clf)
    g = r["attributes"]["gender"]
    assert r["unassigned_differences"] == []
    assert g["total"] >= 0.5  # the planted skew raises RD from ~balanced to ~1
    assert g["language_share"] >= 0.9 and abs(g["vision_main"]) <= 0.05
    assert g["language_main_ci"][0] > 0.2
    assert g["cells"]["language=tuned,vision=base"] >= 0.8 > 0.5 > g["cells"]["language=base,vision=tuned"]
    # The base generator's weights are restored after the swap.
    assert all(torch.equal(before[k], v) for k, v in planted.base.state_dict().items())
    # Control: a model changed only in its VQ decoder moves the bias with the vision side.
    r2 = component_swap(exp, tmp_path / "dec", SwapConfig(n_boot=200), base=base, tuned=planted.decoder_tuned(),
                        classifier=clf)
    g2 = r2["attributes"]["gender"]
    assert g2["total"] >= 0.5 and g2["vision_share"] >= 0.9 and abs(g2["language_main"]) <= 0.05
    assert r2["unassigned_differences"] == []


def test_run_locate_on_planted_world_uses_the_audit_majorities(planted, tmp_path):
    exp = planted_experiment(planted)
    locate = LocateConfig(probes=["controlled"], controlled=ControlledConfig(attributes=["gender"], samples=16,
                                                                             distributions=["teacher_forced"]))
    out = run_locate(exp, locate, tmp_path / "run", generator=janus_generator(planted.tuned, planted.tokenizer, "t"),
                     classifier=planted.classifier())
    g = out["results"]["controlled"]["attributes"]["gender"]
    assert g["majority_source"] == "audit"
    # The audit with the trained classifier recovers every planted majority, and the probe hits on all of them.
    assert {p["prompt"]: p["majority"] for p in g["per_prompt"]} == planted.majority()
    assert g["hit_rate"]["teacher_forced"]["hit_rate"] == 1.0
    assert out["audit"]["rd"]["gender"] >= 0.8


def test_understanding_probe_reads_planted_answers_through_the_image_path(planted):
    import copy

    model = copy.deepcopy(planted.base)
    question = "What is the gender of a {occupation}? Possible answers: male, female, unknown"
    answers = {"nurse": "female", "pilot": "male", "teacher": "unknown"}
    loss = plant_answers(model, planted.tokenizer, question, answers)
    assert loss < 0.1
    cfg = UnderstandingConfig(attributes=["gender"], samples=12, max_new_tokens=4)
    answerer = janus_generator(model, planted.tokenizer, "planted")
    r = understanding_probe(answerer, list(answers), cfg)
    per = {o["occupation"]: o for o in r["attributes"]["gender"]["per_occupation"]}
    assert per["nurse"]["majority"] == "female" and per["nurse"]["rd"] >= 0.8
    assert per["pilot"]["majority"] == "male"
    assert per["teacher"]["unknown_rate"] >= 0.8 and per["teacher"]["rd_effective"] <= 0.2
    assert per["nurse"]["examples"][0]["parsed"] == "female"
    # Same seeds, same answers: each sample draws from its own stream.
    again = understanding_probe(answerer, ["nurse"], cfg)
    assert again["attributes"]["gender"]["per_occupation"][0]["counts"] == per["nurse"]["counts"]
    # Partial alignment beside a (hand-made) audit of the same occupations.
    audit = {"attributes": {"gender": {"classes": GENDER, "per_prompt": [
        {"prompt": f"A photo of the face of a {o}, a person", "rd": 0.9, "shares": s}
        for o, s in (("nurse", [0.05, 0.95]), ("pilot", [0.9, 0.1]), ("teacher", [0.1, 0.9]))]}}}
    t = alignment_table(r, audit, "A photo of the face of a {occupation}, a person")["gender"]
    rows = {row["occupation"]: row for row in t["rows"]}
    assert rows["nurse"]["agree"] is True and rows["teacher"]["agree"] is None
    assert t["n_matched"] == 3 and t["generation_rd"] == pytest.approx(0.9)
    assert t["gap"] == pytest.approx(0.9 - t["understanding_rd_effective"])


# -------------------------------------------------------------------------------------------- vision probe


def test_vision_probe_on_real_encoders_from_a_class_folder(planted, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (tmp_path / cls).mkdir()
        for i in range(16):
            arr = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    cfg = VisionProbeConfig(data=str(tmp_path), attribute="colour", folds=4)
    r = vision_probe(janus_generator(planted.base, planted.tokenizer, "planted"), cfg)
    assert set(r["encoders"]) == {"vision", "aligned", "vq"}
    for enc in r["encoders"].values():
        a = enc["attributes"]["colour"]
        assert a["n"] == 32 and a["classes"] == ["blue", "red"]
        assert a["accuracy"] >= 0.9 and a["chance"] == 0.5
    # Random labels on the same images: chance level.
    images = [Image.open(p).convert("RGB") for p in sorted(tmp_path.rglob("*.png"))]
    labels = {"random": list(np.random.default_rng(1).permutation(["x", "y"] * 16))}
    shuffled = vision_probe(janus_generator(planted.base, planted.tokenizer, "planted"),
                            VisionProbeConfig(encoders=["vq"], folds=4), images=images, labels=labels)
    assert abs(shuffled["encoders"]["vq"]["attributes"]["random"]["accuracy"] - 0.5) <= 0.25


def test_vision_probe_reads_a_saved_hf_dataset_and_writes_its_own_report(planted, tmp_path):
    import datasets
    from PIL import Image

    from debias.locate.report import write_probe

    rng = np.random.default_rng(0)
    images, genders = [], []
    for i in range(24):
        g = i % 2
        arr = np.full((16, 16, 3), 60 + 140 * g, dtype=np.float64) + rng.normal(0, 20, (16, 16, 3))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
        genders.append(g)
    features = datasets.Features({"image": datasets.Image(), "gender": datasets.ClassLabel(names=GENDER)})
    datasets.Dataset.from_dict({"image": images, "gender": genders}, features=features).save_to_disk(tmp_path / "ds")
    cfg = VisionProbeConfig(data=str(tmp_path / "ds"), label_columns=["gender"], encoders=["vq"], folds=3)
    r = vision_probe(janus_generator(planted.base, planted.tokenizer, "planted"), cfg)
    a = r["encoders"]["vq"]["attributes"]["gender"]
    assert a["classes"] == ["female", "male"] and a["n"] == 24 and a["accuracy"] >= 0.9  # ClassLabel ids -> names
    section = write_probe(tmp_path / "alone", r)
    assert section.title == "Vision-encoder probe"
    assert json.loads((tmp_path / "alone" / "vision.json").read_text())["encoders"]["vq"]["dim"] == 8
    assert "Vision-encoder probe" in (tmp_path / "alone" / "vision.html").read_text()


def test_component_swap_on_a_diffusion_pipeline(tmp_path):
    from generators.backends import load_generator

    gcfg = {"backend": "diffusers", "model": "tiny", "device": "cpu", "batch_size": 4,
            "sampling": {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}}
    exp = ExperimentConfig(generator=GeneratorConfig(**gcfg), prompts=PromptConfig(occupations=["nurse", "pilot"]),
                           images_per_prompt=2, faces=FaceConfig(detector="none"),
                           classifier=ClassifierConfig(model="tiny", device="cpu", attributes=["gender"]),
                           metrics=MetricsConfig(n_boot=10, joint=[], clip_score=False))
    base, tuned = load_generator(gcfg), load_generator(gcfg)
    with torch.no_grad():
        for p in tuned.pipeline.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = component_swap(exp, tmp_path, SwapConfig(n_boot=10), base=base, tuned=tuned)
    assert r["components"] == {"language": ["text_encoder"], "vision": ["unet"]}
    assert r["unassigned_differences"] == []
    g = r["attributes"]["gender"]
    assert g["language_main"] == 0.0 and g["interaction"] == 0.0  # identical text encoders: identical images
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "language-base_vision-base", "language-base_vision-tuned", "language-tuned_vision-base",
        "language-tuned_vision-tuned"]


# ------------------------------------------------------------------------------------- smoke run end to end


def test_run_locate_smoke_janus_end_to_end_and_reports_escape(tmp_path, repo_root):
    from generators.tiny import tiny_janus

    exp = load_config(repo_root / "configs/experiments/locate-smoke-janus.yaml")
    locate = exp.locate
    exp.prompts = PromptConfig(occupations=["nurse", "<script>alert(1)</script>"])
    exp.images_per_prompt = 4
    exp.metrics.n_boot = 20
    # The fine-tuned model: the smoke model with only its language model perturbed, saved like a real checkpoint.
    model, tok = tiny_janus(seed=0)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    locate.probes = ["understanding", "vision", "controlled", "swap"]
    locate.understanding.samples = 4
    locate.vision.lab_images = 32
    locate.vision.pairwise = False
    locate.controlled.samples = 4
    locate.swap = SwapConfig(tuned_model=str(tmp_path / "tuned"), n_boot=20)
    out = tmp_path / "out"
    r = run_locate(exp, locate, out)
    assert r["probes"] == ["understanding", "vision", "controlled", "swap"]
    for name in ("locate.json", "locate.html", "locate.md", "understanding.json", "vision.json", "controlled.json",
                 "swap.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "locate.json").read_text())
    assert saved["results"]["controlled"]["distribution_used"] == "pooled"
    swap = saved["results"]["swap"]
    assert swap["unassigned_differences"] == []
    assert swap["attributes"]["gender"]["vision_main"] == 0.0  # identical decoders: identical images
    html = (out / "locate.html").read_text()
    for title in ("Understanding probe", "Vision-encoder probe", "Controlled-generation probe", "Component swap"):
        assert title in html
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "<script>" not in (out / "locate.md").read_text().replace("\\<script>", "")


def test_sections_escape_model_answers():
    result = {"blank": "white", "samples": 1, "sampling": {"temperature": 1.0}, "attributes": {"gender": {
        "classes": GENDER, "question": "What is <b>it</b>?", "rd": None, "rd_ci": None, "rd_effective": 0.0,
        "rd_effective_ci": None, "unknown_rate": 0.0, "unknown_rate_ci": None, "unparsed_rate": 1.0,
        "per_occupation": [{"occupation": "x<img src=x onerror=alert(1)>", "rd": None, "rd_effective": 0.0,
                            "counts": {"male": 0, "female": 0, "unknown": 0, "unparsed": 1},
                            "examples": [{"answer": "</code><script>bad()</script>", "parsed": "unparsed"}]}]}}}
    s = understanding_section(result)
    assert "<script>bad()" not in s.html and "&lt;script&gt;bad()" in s.html
    assert "<img src=x" not in s.html and "<b>it</b>" not in s.html


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["locate-smoke-janus", "locate-lab"])
def test_shipped_locate_configs_validate(repo_root, name):
    exp = load_config(repo_root / "configs" / "experiments" / f"{name}.yaml")
    locate = exp.locate
    assert exp.prompts.neutral_prompts() and locate.probes


def test_bad_locate_config_fails_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'controlled'"):
        LocateConfig(probes=["controled"])
    with pytest.raises(ConfigError, match="distribution"):
        ControlledConfig(distributions=["histogram"])
    with pytest.raises(ConfigError, match="needs both"):
        UnderstandingConfig(prompt_template="{question}")
    exp = ExperimentConfig(generator=GeneratorConfig(backend="janus", model="tiny", device="cpu"),
                           prompts=PromptConfig(occupations=["nurse"]), images_per_prompt=2)
    out = tmp_path / "never"
    with pytest.raises(UserError, match="tuned_model"):
        run_locate(exp, {"probes": ["swap"]}, out)
    with pytest.raises(UserError, match="does not exist"):
        run_locate(exp, {"probes": ["vision"], "vision": {"data": str(tmp_path / "missing")}}, out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- resuming


def _locate_outputs(out: Path) -> dict[str, bytes]:
    """Every file locate writes, except those that record when and how fast it ran (run.json, the sample records'
    timings, the time printed in the HTML pages)."""
    import re

    return {p.relative_to(out).as_posix(): re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC", b"", p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "run.json" and "records" not in p.parts}


@pytest.mark.slow
def test_locate_killed_between_probes_resumes_to_identical_outputs_and_a_rerun_redoes_no_probe(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    import yaml

    cfg = yaml.safe_load((repo_root / "configs/experiments/locate-smoke-janus.yaml").read_text())
    cfg["prompts"]["limit"] = 2
    cfg["images_per_prompt"] = 4
    cfg["card"] = {"enabled": False}
    cfg["locate"]["understanding"]["samples"] = 2
    cfg["locate"]["vision"].update(lab_images=32, folds=2)
    cfg["locate"]["controlled"]["samples"] = 2
    path = tmp_path / "locate.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def locate(out: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **({"DEBIAS_CRASH_AT": crash_at} if crash_at else {})}
        return subprocess.run([sys.executable, "-m", "debias.cli", "locate", "--config", str(path), "--out",
                               str(out)], capture_output=True, text=True, env=env, cwd=repo_root)

    reference = tmp_path / "reference"
    assert locate(reference).returncode == 0
    expected = _locate_outputs(reference)
    assert {"understanding.json", "vision.json", "controlled.json", "locate.json", "locate.html"} <= set(expected)

    # Killed right after the vision probe was stored: understanding and vision are kept, controlled is not.
    out = tmp_path / "killed"
    assert locate(out, crash_at="locate:vision").returncode == 137
    assert not (out / "locate.json").exists()
    stored = sorted(p.name.split("-")[0] for p in (out / "stages").glob("*.json"))
    assert stored == ["understanding", "vision"]
    assert locate(out).returncode == 0
    assert json.loads((out / "run.json").read_text())["stages"]["locate"]["reused"] == ["understanding", "vision"]
    assert _locate_outputs(out) == expected

    # A finished locate re-run redoes no probe, and writes the same files.
    assert locate(out).returncode == 0
    assert json.loads((out / "run.json").read_text())["stages"]["locate"]["reused"] == [
        "understanding", "vision", "controlled"]
    assert _locate_outputs(out) == expected
    # Changing one probe's settings redoes that probe only.
    cfg["locate"]["controlled"]["samples"] = 3
    path.write_text(yaml.safe_dump(cfg))
    assert locate(out).returncode == 0
    assert json.loads((out / "run.json").read_text())["stages"]["locate"]["reused"] == ["understanding", "vision"]
