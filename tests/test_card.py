"""Classifier bias card: hand-computed metrics, the warning rule, a deliberately biased tiny CLIP, the lab world."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from audit.card import CardConfig, build_card, card_section, check_card, validate_card_inputs
from audit.card.data import builtin_person_free, lab_occupation_pairs, lab_representation_prompts
from audit.card.measures import (
    association_gap,
    head_deviation,
    measured_deviation,
    preference_rate,
    representation_bias,
    warn_rule,
)
from audit.classify import ClipClassifier, tiny_clip
from generators.config import ConfigError, UserError, from_dict

MAN_WOMAN_ATTRIBUTE = {"gender": {"classes": ["male", "female"], "templates": ["a photo of a {}"],
                                  "descriptions": {"male": ["man"], "female": ["woman"]}}}


# ----------------------------------------------------------------------------------------------- metrics by hand


def test_preference_rate_and_representation_bias_by_hand():
    # 3 wins, 1 tie (half), 1 loss out of 5 -> 3.5 / 5 = 0.7; bias 0.2.
    man = [0.3, 0.2, 0.5, 0.1, 0.0]
    woman = [0.1, 0.1, 0.4, 0.1, 0.2]
    assert preference_rate(man, woman) == pytest.approx(0.7)
    assert representation_bias(man, woman) == pytest.approx(0.2)
    assert representation_bias(woman, man) == pytest.approx(-0.2)
    assert np.isnan(preference_rate([], []))
    with pytest.raises(UserError, match="equal length"):
        preference_rate([1, 2], [1])


def test_head_deviation_by_hand():
    probs = [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]]  # argmax: 0, 0, 1, 0 -> shares 0.75 / 0.25
    d = head_deviation(probs)
    assert d["shares"] == [0.75, 0.25] and d["deviation"] == pytest.approx(0.25) and d["top_class"] == 0
    assert head_deviation(probs, target=[0.75, 0.25])["deviation"] == pytest.approx(0.0)


def test_association_gap_by_hand():
    # female: nurse chosen 3 of 4 -> 0.75; male: 1 of 4 -> 0.25; gap 0.5.
    choose = [1, 1, 1, 0, 1, 0, 0, 0]
    groups = ["female"] * 4 + ["male"] * 4
    r = association_gap(choose, groups, "female", "male")
    assert r["p_first"] == {"female": 0.75, "male": 0.25} and r["n"] == {"female": 4, "male": 4}
    assert r["gap"] == pytest.approx(0.5)
    lo, hi = r["gap_ci"]
    assert -1 <= lo < 0.5 < hi <= 1
    # Ties count one half.
    assert association_gap([0.5, 0.5, 0, 0], ["female", "female", "male", "male"], "female", "male")["gap"] == 0.5
    assert association_gap([1, 0], ["female", "female"], "female", "male")["gap"] is None


def test_measured_deviation_and_warn_rule_by_hand():
    attribute = {"classes": ["male", "female"], "per_prompt": [
        {"shares": [0.9, 0.1]}, {"shares": [0.4, 0.6]}, {"shares": None}]}
    # max_k |share_k - 0.5|: 0.4 and 0.1 -> mean 0.25 (the faceless prompt is left out).
    assert measured_deviation(attribute) == pytest.approx(0.25)
    assert measured_deviation({**attribute, "target": [0.9, 0.1]}) == pytest.approx((0.0 + 0.5) / 2)
    assert measured_deviation({"classes": ["a", "b"], "per_prompt": []}) is None
    # B >= 0.5 * D and B >= floor.
    assert warn_rule(0.13, 0.25) and not warn_rule(0.12, 0.25)
    assert warn_rule(-0.2, 0.3)
    assert not warn_rule(0.01, 0.0) and warn_rule(0.02, 0.0)
    assert warn_rule(0.05, None) and not warn_rule(None, 0.1)
    assert warn_rule(0.2, 0.25, fraction=0.8) and not warn_rule(0.19, 0.25, fraction=0.8)


def test_builtin_person_free_set_is_deterministic_and_mixed():
    a, kinds = builtin_person_free(12, seed=3)
    b, _ = builtin_person_free(12, seed=3)
    assert kinds.count("noise") == 3 and set(kinds) == {"solid", "gradient", "noise", "shapes"}
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert len(np.unique(np.asarray(a[0]).reshape(-1, 3), axis=0)) == 1  # a solid colour


def test_lab_occupation_pairs_follow_planted_skew():
    world = {"occupations": {"doctor": {"p_female": 0.2}, "nurse": {"p_female": 0.85}, "pilot": {"p_female": 0.1},
                             "teacher": {"p_female": 0.7}, "chef": {"p_female": 0.5}}}
    assert lab_occupation_pairs(world) == [["nurse", "doctor"], ["teacher", "pilot"]]


def test_card_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"card.object_template"):
        from_dict(CardConfig, {"object_template": "a photo"}, prefix="card")
    with pytest.raises(ConfigError, match=r"card.occupation_pairs\[0\]"):
        from_dict(CardConfig, {"occupation_pairs": [["nurse", "nurse"]]}, prefix="card")
    with pytest.raises(ConfigError, match="card.compositional.template"):
        from_dict(CardConfig, {"compositional": {"template": "two people"}}, prefix="card")
    with pytest.raises(UserError, match="card.labelled': '.*missing' does not exist"):
        validate_card_inputs(CardConfig(labelled=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="needs a generator"):
        validate_card_inputs(CardConfig(person_free="generator"), has_generator=False)


# ---------------------------------------------------------------------------------- a deliberately biased CLIP


@functools.lru_cache(maxsize=1)
def biased_clip(steps: int = 100, seed: int = 0):
    """A tiny CLIP trained so that person-free images match "a photo of a man" and female lab renders match "a photo
    of a nurse", male ones "a photo of a doctor", whatever they wear: a planted representation and association bias.

    The person-free training images use another seed than the card's builtin set, so the card measures held-out
    images; the renders are drawn fresh by the card too. Images are preprocessed once. ~2-3 s on one thread.
    """
    from generators.lab.render import render_batch, to_uint8

    model, processor = tiny_clip(seed=seed)
    texts = ["a photo of a man", "a photo of a woman", "a photo of a nurse", "a photo of a doctor"]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    rng = np.random.default_rng(seed)
    n = 256
    gender = rng.integers(0, 2, n)
    people = to_uint8(render_batch(n, {"gender": gender, "race": rng.integers(0, 4, n),
                                       "occupation": rng.integers(0, 8, n)}, rng))
    free, _ = builtin_person_free(128, seed=seed + 1000)
    pix_people = processor.image_processor(images=[Image.fromarray(a) for a in people],
                                           return_tensors="pt")["pixel_values"]
    pix_free = processor.image_processor(images=free, return_tensors="pt")["pixel_values"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        i = rng.integers(0, n, 12)
        j = rng.integers(0, len(free), 16)
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=torch.cat([pix_people[i], pix_free[j]])).logits_per_image
        # Gender texts: male and person-free -> man (0), female -> woman (1); occupation texts on people only:
        # female -> nurse (0), male -> doctor (1).
        g_target = torch.as_tensor(np.concatenate([gender[i], np.zeros(16, int)]))
        o_target = torch.as_tensor(1 - gender[i])
        loss = torch.nn.functional.cross_entropy(logits[:, :2], g_target) + \
            torch.nn.functional.cross_entropy(logits[:12, 2:], o_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, processor


def test_biased_tiny_classifier_is_flagged_by_the_card(tmp_path):
    model, processor = biased_clip()
    clf = ClipClassifier({"model": "tiny", "device": "cpu", "attributes": MAN_WOMAN_ATTRIBUTE}, model, processor)
    config = CardConfig(labelled="lab", occupation_pairs=[["nurse", "doctor"]], n_builtin=32, n_labelled=32,
                        compositional={"enabled": False})
    card = build_card(clf, config, run_dir=tmp_path)
    rep = card["representation"]["sets"]["builtin"]
    # Held-out person-free images: the planted default for "man" shows up as a large positive bias.
    assert rep["prompt_pair"]["prompts"] == ["a photo of a man", "a photo of a woman"]
    assert rep["prompt_pair"]["bias"] > 0.3 and rep["prompt_pair"]["bias_ci"][0] > 0
    assert rep["heads"]["gender"]["top_class"] == "male" and rep["heads"]["gender"]["deviation"] > 0.3
    assert rep["person_label_rate"] == 1.0  # abstain threshold 0: every person-free image gets a label
    # The planted nurse <-> female association, measured on renders that show neither occupation.
    row = card["association"]["pairs"][0]
    assert row["pair"] == ["nurse", "doctor"] and row["gap"] > 0.5 and row["gap_ci"][0] > 0
    assert row["n_images"] < 64  # nurses and doctors left out
    # The classifier learned gender from the renders, so accuracy is measured on them too.
    assert card["accuracy"]["attributes"]["gender"]["accuracy"] > 0.8
    assert any("a photo of a man" in f for f in card["flags"]) and any("nurse" in f for f in card["flags"])
    # An audit that measured a nearly balanced gender split is warned: the classifier alone could shift it.
    balanced = {"attributes": {"gender": {"classes": ["male", "female"],
                                          "per_prompt": [{"shares": [0.55, 0.45]}, {"shares": [0.5, 0.5]}]}}}
    check = check_card(card, balanced)
    assert check["attributes"]["gender"]["warn"] and check["warnings"][0].startswith("gender:")
    assert check["attributes"]["gender"]["measured_deviation"] == pytest.approx(0.025)
    # The section shows the warning first, and escapes text.
    section = card_section(card, check)
    assert section.html.index("Warning.") < section.html.index("Representation bias")
    assert "+0." in section.html and "nurse / doctor" in section.html
    # Cached by identity: with the in-process memo cleared, a second build reads the run folder's stage file
    # (marked here) instead of recomputing; another classifier gets another key.
    from audit.card import cache

    cached = list((tmp_path / "stages").glob("card-*.json"))
    assert len(cached) == 1
    cache._MEMO.clear()
    cached[0].write_text(json.dumps({**json.loads(cached[0].read_text()), "marker": 1}))
    assert build_card(clf, config, run_dir=tmp_path)["marker"] == 1
    other = ClipClassifier({"model": "tiny", "device": "cpu", "attributes": MAN_WOMAN_ATTRIBUTE}, *tiny_clip(seed=9))
    assert build_card(other, config)["key"] != card["key"]


def test_labelled_folder_and_generated_person_free_images(tmp_path):
    """Association from a labelled folder (root/gender/<class>/*.png), person-free images from a real generator."""
    from generators.lab.render import render_batch, to_uint8
    from generators.backends import load_generator

    rng = np.random.default_rng(5)
    for k, cls in enumerate(["male", "female"]):
        (tmp_path / "faces" / "gender" / cls).mkdir(parents=True)
        arr = to_uint8(render_batch(10, {"gender": k, "race": rng.integers(0, 4, 10),
                                         "occupation": rng.integers(0, 8, 10)}, rng))
        for i, a in enumerate(arr):
            Image.fromarray(a).save(tmp_path / "faces" / "gender" / cls / f"{i}.png")
    model, processor = biased_clip()
    clf = ClipClassifier({"model": "tiny", "device": "cpu", "attributes": MAN_WOMAN_ATTRIBUTE}, model, processor)
    generator = load_generator({"backend": "janus", "model": "tiny", "device": "cpu", "batch_size": 2})
    config = CardConfig(labelled=str(tmp_path / "faces"), occupation_pairs=[["nurse", "doctor"]], n_builtin=8,
                        person_free="generator", objects=["chair", "cup"], images_per_object=2)
    card = build_card(clf, config, generator=generator, run_dir=tmp_path / "run")
    row = card["association"]["pairs"][0]
    assert row["n"] == {"male": 10, "female": 10} and row["gap"] > 0.5
    assert card["accuracy"]["attributes"]["gender"]["num_images"] == 20
    gen = card["representation"]["sets"]["generator"]
    assert gen["n_images"] == 4 and gen["objects"] == ["chair", "cup"] and "prompt_pair" in gen
    assert len(list((tmp_path / "run" / "card" / "samples").rglob("*.png"))) == 4  # stored, so a rerun reuses them


def test_tied_prompts_are_not_flagged_and_calibration_is_read(tmp_path):
    """On an untrained tiny CLIP with identical prompt-pair texts every image ties: the preference is exactly 0.5 and
    nothing about it is flagged. Accuracy and confusion come from a `debias calibrate` record when one is given."""
    model, processor = tiny_clip(seed=1)
    clf = ClipClassifier({"model": "tiny", "device": "cpu", "attributes": MAN_WOMAN_ATTRIBUTE}, model, processor)
    record = {"format": "debias-calibration", "version": 1, "classifier": {"model": "another"},
              "dataset": {"source": "labelled folder 'faces'"},
              "attributes": {"gender": {"classes": ["male", "female"], "num_images": 40, "accuracy": 0.9,
                                        "balanced_accuracy": 0.875, "per_class_recall": {"male": 1.0, "female": 0.75},
                                        "abstain_rate": 0.0, "confusion": [[1.0, 0.0], [0.25, 0.75]]}}}
    (tmp_path / "calibration.json").write_text(json.dumps(record))
    card = build_card(clf, CardConfig(representation_prompts=["a photo", "a photo"], labelled=None, n_builtin=16),
                      calibration=tmp_path)
    assert card["representation"]["sets"]["builtin"]["prompt_pair"]["bias"] == 0.0
    assert not any("prefers" in f for f in card["flags"])
    assert "skipped" in card["association"] and "skipped" in card["compositional"]
    acc = card["accuracy"]
    assert acc["attributes"]["gender"]["confusion"] == [[1.0, 0.0], [0.25, 0.75]]
    assert acc["same_classifier"] is False and "different classifier" in acc["note"]
    html = card_section(card).html
    assert "0.900" in html and "Warning." not in html
    with pytest.raises(UserError, match="metrics.calibration"):
        build_card(clf, CardConfig(n_builtin=4), calibration=tmp_path / "missing.json")


def test_disabled_card_writes_nothing_and_saved_sections_rebuild(tmp_path):
    from audit.card import saved_sections, write_card
    from audit.run import extra_sections
    from debias.config import load_config

    config = load_config("configs/experiments/cultural-smoke.yaml")
    metrics = {"attributes": {"gender": {"classes": ["male", "female"], "per_prompt": [
        {"prompt": "A photo of the face of a doctor in Nigeria, a person", "rd": 0.5, "shares": [0.75, 0.25]},
        {"prompt": "A photo of the face of a doctor in Japan, a person", "rd": 0.1, "shares": [0.45, 0.55]}]}}}
    sections = extra_sections(config, tmp_path, metrics, None, CardConfig(enabled=False))
    assert not (tmp_path / "classifier_card.json").exists() and "classifier_card" not in metrics
    assert [s.title for s in sections] == ["Groups: region, income, language"]
    assert metrics["groups"]["axes"]["region"]["metrics"]["rd.gender"]["disparity"] == pytest.approx(0.4)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    write_card(tmp_path, {"key": "k", "representation": {}, "association": {"skipped": "x"}, "accuracy": {},
                          "compositional": {"skipped": "y"}, "flags": []}, {"warnings": ["careful"], "attributes": {},
                                                                              "rule": "r"})
    rebuilt = saved_sections(tmp_path)
    assert [s.title for s in rebuilt] == ["Classifier bias card", "Groups: region, income, language"]
    assert "careful" in rebuilt[0].html


# --------------------------------------------------------------------------------------------------- lab world


def _lab_weights():
    from generators.lab import WEIGHTS

    return WEIGHTS


@pytest.mark.skipif(not (_lab_weights() / "clip" / "config.json").is_file(),
                    reason="lab world weights not built (python -m debias.lab.build --out generators/lab/weights)")
def test_card_on_the_lab_world():
    from generators.config import load_yaml

    world = load_yaml(_lab_weights() / "world.yaml")
    attrs = {a: {"classes": v["classes"], "templates": v["templates"]} for a, v in world["classifier"].items()}
    clf = ClipClassifier({"model": "lab", "device": "cpu", "attributes": attrs})
    card = build_card(clf, CardConfig(n_labelled=48, compositional={"n_items": 24}))
    assert card["settings"]["labelled"] == "lab" and card["settings"]["lab_world"]
    # Its own gender prompts, its own occupations; trained on known data, so gender accuracy is well above chance.
    assert card["representation"]["prompts"] == lab_representation_prompts(world)
    assert card["association"]["pairs"][0]["pair"] == ["nurse", "doctor"]
    assert all(r["gap"] is not None and -1 <= r["gap"] <= 1 for r in card["association"]["pairs"])
    assert card["accuracy"]["attributes"]["gender"]["accuracy"] > 0.7
    assert card["compositional"]["swap"]["n_items"] == 24 and card["compositional"]["verdict"]
    html = card_section(card, None).html
    assert "nurse / doctor" in html and "Compositional check" in html
