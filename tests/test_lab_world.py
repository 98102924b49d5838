"""The lab world: the renderer encodes its attributes, the shipped weights load and still carry the planted skew,
and the builder still builds (quick mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generators.lab.render import CLOTHES, GENDERS, OCCUPATIONS, RACES, TONES, render, render_batch
from generators.config import UserError

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "generators" / "lab" / "weights"


# ------------------------------------------------------------------------------------------- renderer


def test_render_is_deterministic_and_never_repeats():
    a = render_batch(32, {"gender": "female", "race": "Black", "occupation": "nurse"}, np.random.default_rng(3))
    b = render_batch(32, {"gender": "female", "race": "Black", "occupation": "nurse"}, np.random.default_rng(3))
    assert a.shape == (32, 32, 32, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    flat = a.reshape(32, -1)
    assert len({row.tobytes() for row in flat}) == 32  # same attributes, still no two renders equal
    assert render("male", "White", "doctor", np.random.default_rng(0)).shape == (32, 32, 3)


def _dark_beside_face(images):
    # Long hair (female) falls beside the face: dark pixels in the rows of the face, away from its centre.
    region = images[:, 12:22, :, :]
    cols = np.r_[0:11, 21:32]
    return (region[:, :, cols].max(-1) < 0.55).mean(axis=(1, 2))


def test_render_encodes_gender_by_hair():
    rng = np.random.default_rng(0)
    male = render_batch(64, {"gender": "male", "race": "White", "occupation": "doctor"}, rng)
    female = render_batch(64, {"gender": "female", "race": "White", "occupation": "doctor"}, rng)
    dm, df = _dark_beside_face(male), _dark_beside_face(female)
    assert df.min() > dm.max()  # separable per image, not only on average


def test_render_encodes_tone_by_face_colour():
    rng = np.random.default_rng(1)
    brightness = {}
    for race in RACES:
        imgs = render_batch(32, {"gender": "male", "race": race, "occupation": "chef"}, rng)
        patch = imgs[:, 10:15, 14:19].reshape(32, -1, 3)  # always inside the face (jitter is bounded)
        brightness[race] = np.median(patch, axis=1).mean(-1)
    order = ["White", "Asian", "Indian", "Black"]  # documented lightest -> darkest
    for hi, lo in zip(order, order[1:]):
        assert brightness[hi].min() > brightness[lo].max()
        assert np.mean(TONES[hi]) > np.mean(TONES[lo])


def test_render_encodes_occupation_by_clothing_colour():
    rng = np.random.default_rng(2)
    palette = np.array([CLOTHES[o][0] for o in OCCUPATIONS])
    for k, occ in enumerate(OCCUPATIONS):
        imgs = render_batch(16, {"gender": "male", "race": "Indian", "occupation": occ}, rng)
        clothes = np.median(imgs[:, 29:32, 9:23].reshape(16, -1, 3), axis=1)
        nearest = np.linalg.norm(clothes[:, None] - palette[None], axis=-1).argmin(1)
        assert (nearest == k).all(), occ


def test_render_rejects_bad_attributes():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="gender"):
        render_batch(2, {"gender": "robot", "race": "White", "occupation": "doctor"}, rng)
    with pytest.raises(UserError, match="one per image"):
        render_batch(3, {"gender": ["male", "female"], "race": "White", "occupation": "doctor"}, rng)
    with pytest.raises(UserError, match="lacks"):
        render_batch(1, {"gender": "male"}, rng)


def test_world_config_rejects_bad_values(tmp_path):
    from debias.lab.world import load_world_config
    from generators.config import ConfigError

    data = yaml.safe_load((ROOT / "configs/lab/world.yaml").read_text())
    data["occupations"]["doctor"]["p_female"] = 1.5
    bad = tmp_path / "w.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="p_female"):
        load_world_config(bad)
    data = yaml.safe_load((ROOT / "configs/lab/world.yaml").read_text())
    data["occupations"]["astronaut"] = data["occupations"]["doctor"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="astronaut"):
        load_world_config(bad)


# ------------------------------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def world():
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, JanusForConditionalGeneration

    from debias.lab.world import load_world_config

    janus = JanusForConditionalGeneration.from_pretrained(WEIGHTS / "janus").eval()
    tok = AutoTokenizer.from_pretrained(WEIGHTS / "janus")
    clip = CLIPModel.from_pretrained(WEIGHTS / "clip").eval()
    proc = CLIPProcessor.from_pretrained(WEIGHTS / "clip")
    cfg = load_world_config(WEIGHTS / "world.yaml")
    return dict(janus=janus, tok=tok, clip=clip, proc=proc, cfg=cfg)


def test_shipped_world_carries_the_repository_config(world):
    shipped = yaml.safe_load((WEIGHTS / "world.yaml").read_text())
    repo = yaml.safe_load((ROOT / "configs/lab/world.yaml").read_text())
    assert shipped["occupations"] == repo["occupations"]
    assert shipped["captions"] == repo["captions"]
    assert shipped["seed"] == repo["seed"]
    info = json.loads((WEIGHTS / "build_info.json").read_text())
    assert info["quick"] is False and info["seed"] == repo["seed"]
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size < 15e6  # Janus world ~7 MB + the diffusion world (sd/) ~6 MB


def test_shipped_models_are_configured_for_the_sequence_convention(world):
    janus, tok = world["janus"], world["tok"]
    gen = janus.generation_config
    assert (gen.bos_token_id, gen.pad_token_id, gen.eos_token_id) == (2, 0, 3)
    assert gen.generation_kwargs["boi_token_id"] == 4 == tok.convert_tokens_to_ids("<begin_of_image>")
    assert janus.config.vision_config.num_image_tokens == 64
    ids = tok("A photo of the face of a engineer, a Black female", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids


def test_vq_codebook_is_stored_unit_norm_and_stock_encode_agrees(world):
    from debias.lab.vq import decode_tokens, encode_images, to_pixels

    janus = world["janus"]
    cb = janus.model.vqmodel.quantize.embedding.weight
    torch.testing.assert_close(cb.norm(dim=1), torch.ones(len(cb)), rtol=0, atol=1e-4)
    imgs = render_batch(16, {"gender": ["male", "female"] * 8, "race": "Asian", "occupation": "teacher"},
                        np.random.default_rng(5))
    tokens = encode_images(janus, imgs)
    assert tokens.shape == (16, 64) and tokens.dtype == torch.long
    with torch.no_grad():
        stock = janus.model.vqmodel.encode(to_pixels(imgs)).image_tokens.view(16, -1)
    assert (stock == tokens).float().mean() > 0.99
    recon = decode_tokens(janus, tokens)
    assert recon.shape == imgs.shape and float(((recon - imgs) ** 2).mean()) < 0.02


def test_clip_processor_matches_training_pixels_and_pools_the_real_eos(world):
    from PIL import Image

    from debias.lab.train_clip import clip_pixels

    clip, proc = world["clip"], world["proc"]
    img = render("female", "Indian", "pilot", np.random.default_rng(4))
    u8 = (img * 255).round().astype(np.uint8)
    pv = proc(images=[Image.fromarray(u8)], return_tensors="pt").pixel_values
    assert pv.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pv, clip_pixels(u8[None] / 255.0), rtol=0, atol=1e-4)
    # The text embedding of a caption must not depend on how much padding follows it.
    short = proc.tokenizer(["a photo of a female"], return_tensors="pt")
    padded = proc.tokenizer(["a photo of a female"], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        a = clip.get_text_features(**short).pooler_output
        b = clip.get_text_features(**padded).pooler_output
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clip_zero_shot_classifies_fresh_renders(world):
    from debias.lab.verify import labels, world_classifier
    from generators.base import to_pil

    clip, cfg = world["clip"], world["cfg"]
    rng = np.random.default_rng(11)
    n = 64
    attrs = {"gender": rng.integers(0, 2, n), "race": rng.integers(0, 4, n),
             "occupation": rng.integers(0, len(OCCUPATIONS), n)}
    imgs = render_batch(n, attrs, rng)
    # The audit's classifier (configs/experiments/lab.yaml) with the world's templates, on 8-bit images.
    pred = labels(world_classifier(cfg, clip, world["proc"]), to_pil(imgs, (0.0, 1.0)))
    for attr in ("gender", "race"):
        spec = cfg.classifier[attr]
        assert list(spec.classes) == list(GENDERS if attr == "gender" else RACES)
        assert (pred[attr] == attrs[attr]).mean() >= 0.9, attr


def test_shipped_world_still_carries_the_planted_gender_skew(world):
    from debias.lab.verify import labels, world_classifier, world_generator
    from debias.lab.world import caption

    janus, tok, clip, cfg = world["janus"], world["tok"], world["clip"], world["cfg"]
    n = 48
    prompts = [caption(cfg, "doctor")] * n + [caption(cfg, "nurse")] * n
    # The real sampler and the audit's classifier, as the build's verification uses them.
    images = [im.image for im in world_generator(janus, tok, 1.0).generate(prompts, list(range(n)) * 2)]
    female = labels(world_classifier(cfg, clip, world["proc"]), images)["gender"] == GENDERS.index("female")
    doctor, nurse = female[:n].mean(), female[n:].mean()
    # Planted: doctor 0.2, nurse 0.85. With n = 48 the binomial sd is <= 0.072, so these bounds are > 3 sd wide.
    assert doctor < 0.45 < 0.6 < nurse, (doctor, nurse)


# -------------------------------------------------------------------------------------------- builder


@pytest.mark.slow
def test_quick_build_writes_loadable_weights(tmp_path):
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, JanusForConditionalGeneration

    out = tmp_path / "world"
    proc = subprocess.run([sys.executable, "-m", "debias.lab.build", "--quick", "--out", str(out), "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    janus = JanusForConditionalGeneration.from_pretrained(out / "janus")
    AutoTokenizer.from_pretrained(out / "janus")
    CLIPModel.from_pretrained(out / "clip")
    CLIPProcessor.from_pretrained(out / "clip")
    info = json.loads((out / "build_info.json").read_text())
    assert info["quick"] is True and "verify" in info and info["times_s"]["total"] > 0
    own = info["verify"]["generator_own"]  # the world's fit: the generator's own shares beside the planted ones
    assert own["n_per_occupation"] == 16 and set(own["per_occupation"]) == set(info["verify"]["neutral"]["1.0"][
        "per_occupation"])
    assert own["fit_mean_abs_p_female"] == pytest.approx(np.mean([abs(o["planted_p_female"] - o["generator_p_female"])
                                                                  for o in own["per_occupation"].values()]))
    assert janus.decode_image_tokens(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 32, 32, 3)
    # --verify-only re-measures the saved world with the same sampler and classifier: the same numbers, and the
    # weights are left alone.
    weights = {p: p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}
    proc = subprocess.run([sys.executable, "-m", "debias.lab.build", "--verify-only", "--out", str(out), "--threads",
                           "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again_info = json.loads((out / "build_info.json").read_text())
    assert again_info["verify"] == info["verify"] and again_info["clip"] == info["clip"]
    assert again_info["reverified"]["times_s"]["verify"] > 0
    assert weights and {p: p.read_bytes() for p in sorted(out.rglob("*.safetensors"))} == weights
    # A second build into the same non-empty folder is refused (nothing is overwritten by accident).
    again = subprocess.run([sys.executable, "-m", "debias.lab.build", "--quick", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
