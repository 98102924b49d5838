"""Distributional alignment (debias/train/align.py): OT targets against oracles, the loss, the sampler, training."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from audit.classify import ClipClassifier
from debias.train.align import (
    AlignObjective,
    align_loss,
    largest_remainder_counts,
    load_prompts,
    ot_assign,
    ot_targets,
    sample_images,
)
from debias.train.diffusion import DiffusionParts, DiffusionTrainConfig, add_lora, run_diffusion_train
from generators.base import to_pil
from generators.config import ConfigError, UserError
from generators.tiny import tiny_diffusion_pipeline

PROMPT = "A photo of the face of a nurse, a person"
SIDE = 16  # tiny pipeline at 16 px (8x8 latents): ~4x cheaper than its native 32 px, still a real SD pipeline
STEPS = 4  # sampling steps, in training and when measuring
GUIDANCE = 5.0
MALE, FEMALE = 0, 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads; on 2 shared cores spinning OpenMP workers cost ~10x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _classifier(**overrides) -> ClipClassifier:
    # logit_scale 100 (real CLIP's) instead of the random tiny model's 14: probabilities spread out of 0.5 +- 0.03.
    return ClipClassifier({"model": "tiny", "device": "cpu", "attributes": ["gender"], "logit_scale": 100.0,
                           **overrides})


def _pipe():
    return tiny_diffusion_pipeline(0, sample_size=SIDE)


def _measured_share(pipe, clf, n: int = 32) -> float:
    """Hard share of 'female' over fixed held-out seeds, sampled and classified exactly as the audit does."""
    gens = [torch.Generator().manual_seed(1000 + s) for s in range(n)]
    out = pipe(prompt=[PROMPT] * n, generator=gens, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               height=SIDE, width=SIDE, output_type="np").images
    probs = clf.classify(to_pil(out, value_range=(0.0, 1.0)))["gender"]
    return float((probs.argmax(1) == FEMALE).mean())


def _sample(pipe) -> np.ndarray:
    gens = [torch.Generator().manual_seed(7)]
    return pipe(prompt=[PROMPT], generator=gens, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIDE,
                width=SIDE, output_type="np").images


def _config(**kw) -> dict:
    base = dict(objective="align", align_prompts=[PROMPT], resolution=SIDE, steps=1, batch_size=1, rank=4, alpha=4.0,
                lr=0.1, align_batch_size=8, align_inference_steps=STEPS, align_guidance_scale=GUIDANCE)
    return {**base, **kw}


# --------------------------------------------------------------------------------------------- OT targets


def test_largest_remainder_counts_by_hand():
    assert largest_remainder_counts([0.5, 0.5], 7).tolist() == [4, 3]  # tie of remainders: first class
    assert largest_remainder_counts([0.25] * 4, 10).tolist() == [3, 3, 2, 2]
    assert largest_remainder_counts([0.7, 0.2, 0.1], 4).tolist() == [3, 1, 0]  # 2.8, 0.8, 0.4
    assert largest_remainder_counts([0.1, 0.9], 30).tolist() == [3, 27]  # 0.1 * 30 is 3.0000000000000004
    assert largest_remainder_counts([0.0, 1.0], 5).tolist() == [0, 5]


def test_ot_assign_moves_the_cheapest_images_where_argmax_would_not():
    # Every image leans female, so argmax labels all 4 female; a uniform target needs 2 male: the OT moves the two
    # that are closest to male (p_female 0.7 and 0.6), in whatever order the batch comes.
    p_female = np.array([0.7, 0.9, 0.6, 0.8])
    probs = np.stack([1 - p_female, p_female], axis=1)
    assert (probs.argmax(1) == FEMALE).all()
    assert ot_assign(probs, [0.5, 0.5]).tolist() == [MALE, FEMALE, MALE, FEMALE]
    # 3 of 4 male: only the most female-leaning image stays female
    assert ot_assign(probs, counts=[3, 1]).tolist() == [MALE, FEMALE, MALE, MALE]


def test_ot_assign_is_the_exact_optimum_with_three_classes():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.5, 0.5, 0.5], size=6)
    counts = [3, 2, 1]
    cost = lambda labels: sum(np.linalg.norm(probs[i] - np.eye(3)[k]) for i, k in enumerate(labels))  # noqa: E731
    best = min(cost(lab) for lab in set(itertools.permutations([0, 0, 0, 1, 1, 2])))  # all 60 labelings
    got = ot_assign(probs, counts=counts)
    assert np.bincount(got, minlength=3).tolist() == counts
    assert cost(got) == pytest.approx(best, abs=1e-12)


def test_ot_assign_gives_exact_counts_under_ties():
    probs = np.full((7, 2), 0.5)  # every assignment costs the same
    first = ot_assign(probs, [0.5, 0.5])
    assert np.bincount(first, minlength=2).tolist() == [4, 3]
    assert ot_assign(probs, [0.5, 0.5]).tolist() == first.tolist()  # deterministic
    rng = np.random.default_rng(1)
    for n, shares in [(10, [0.25] * 4), (9, [0.6, 0.3, 0.1]), (5, [0.0, 1.0])]:
        probs = rng.dirichlet(np.ones(len(shares)), size=n)
        assert np.bincount(ot_assign(probs, shares), minlength=len(shares)).tolist() == \
            largest_remainder_counts(shares, n).tolist()
    with pytest.raises(UserError, match="counts"):
        ot_assign(np.full((3, 2), 0.5), counts=[1, 1])


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_expected_ot_targets_match_the_binomial_oracle(share):
    # Two classes: the image ranked r-th most female is sent to female iff the iid target batch has >= r female
    # points, so q_i(female) = P(Binomial(N, share) >= r) -- the closed form the authors' code uses.
    n = 8
    p_female = np.linspace(0.9, 0.55, n)[np.random.default_rng(2).permutation(n)]
    probs = np.stack([1 - p_female, p_female], axis=1)
    targets, confidence = ot_targets(probs, [1 - share, share], draws=4000, rng=np.random.default_rng(3))
    rank = np.argsort(np.argsort(-p_female)) + 1
    q_female = binom.sf(rank - 1, n, share)
    np.testing.assert_allclose(confidence, np.maximum(q_female, 1 - q_female), atol=0.03)
    sure = np.abs(q_female - 0.5) > 0.05
    assert (targets[sure] == (q_female[sure] > 0.5)).all()
    if share == 0.5:  # C = 0.8 keeps the 3 most extreme images of each side, drops the 2 in the middle
        assert ((confidence >= 0.8) == (np.abs(rank - 4.5) > 1)).all()
    fixed, ones = ot_targets(probs, [1 - share, share], draws=0, rng=np.random.default_rng(0))
    assert fixed.tolist() == ot_assign(probs, [1 - share, share]).tolist() and (ones == 1).all()


# --------------------------------------------------------------------------------------------- loss


def test_align_loss_by_hand():
    log_probs = torch.log(torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    targets, confidence = torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.8, 0.5])
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    ref_classes = torch.tensor([1, 0, 1])
    loss, stats = align_loss(log_probs, targets, confidence, 0.8, emb, ref, ref_classes, semantic_weight=2.0,
                             change_factor=0.2)
    ce = (-math.log(0.2) - math.log(0.6)) / 3  # image 3 is below C: no CE, but the mean divides by N = 3
    # 1 - cos: 0, 1 - 1/sqrt(2), 1; weights: image 1 changes class (0.2), image 2 keeps it (1), image 3 unused (0.2)
    semantic = (0.2 * 0.0 + 1.0 * (1 - 2 ** -0.5) + 0.2 * 1.0) / 3
    assert loss.item() == pytest.approx(ce + 2.0 * semantic, rel=1e-6)
    assert stats["used"] == pytest.approx(2 / 3) and stats["ce"] == pytest.approx(ce * 3 / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------- model pieces


def test_sampler_reproduces_the_pipeline_and_the_classifier_head_matches_the_audit():
    pipe, clf = _pipe(), _classifier()
    for guidance in (GUIDANCE, 1.0):  # with and without classifier-free guidance
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        want = pipe(prompt=[PROMPT] * 3, generator=gens, num_inference_steps=STEPS, guidance_scale=guidance,
                    height=SIDE, width=SIDE, output_type="np").images
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        latents = pipe.prepare_latents(3, 4, SIDE, SIDE, torch.float32, torch.device("cpu"), gens)
        with torch.no_grad():
            got = sample_images(pipe, [PROMPT] * 3, latents, STEPS, guidance, 0)
        np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)
    # the differentiable head = the audit's probabilities (16 px images upsampled to the tiny CLIP's 32 px: the
    # kernels differ slightly; 8-bit rounding on the PIL side)
    audit = clf.classify(to_pil(want, value_range=(0.0, 1.0)))["gender"]
    x = got.clone().requires_grad_(True)
    log_probs = clf.class_log_probs(clf.embed_tensor_images(x), "gender")
    np.testing.assert_allclose(log_probs.exp().detach().numpy(), audit, atol=0.02)
    log_probs[:, FEMALE].sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(UserError, match="race"):
        clf.class_log_probs(torch.zeros(1, 32), "race")


def test_gradient_reaches_lora_only_and_the_classifier_is_left_as_found():
    pipe, clf = _pipe(), _classifier()
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).requires_grad_(False)
    config = DiffusionTrainConfig(**_config(align_batch_size=4))
    add_lora(pipe.unet, "unet", config)
    with torch.no_grad():  # B != 0, so the adapter changes samples and the semantic term is not trivially 0
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    objective = AlignObjective(config, pipe, DiffusionParts.from_pipeline(pipe), clf, GUIDANCE, None, (0, 0))
    loss, stats = objective.loss([PROMPT], torch.Generator().manual_seed(0))
    loss.backward()
    objective.close()
    lora = {n: p.grad for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    for comp in ("unet", "vae", "text_encoder"):
        assert all(p.grad is None for n, p in getattr(pipe, comp).named_parameters() if ".lora_" not in n)
    assert all(p.grad is None and p.requires_grad for p in clf.model.parameters())
    assert stats["semantic"] > 0 and {"ce", "used", "share_male", "share_female"} <= set(stats)


def test_a_run_trains_only_lora_and_saves_a_loadable_adapter(tmp_path):
    pipe, clf = _pipe(), _classifier()
    base = {n: p.detach().clone() for c in ("unet", "vae", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}
    clf_before = [p.detach().clone() for p in clf.model.parameters()]
    config = _config(lora_target="text_encoder", align_batch_size=4, align_steps=2)
    start = tiny_diffusion_pipeline(0, sample_size=SIDE)
    add_lora(start.text_encoder, "text_encoder", DiffusionTrainConfig(**config))
    init = {n: p.detach().clone() for n, p in start.text_encoder.named_parameters() if ".lora_" in n}

    adapter = run_diffusion_train(config, pipe, tmp_path / "run", classifier=clf)

    after = {n: p.detach() for n, p in pipe.text_encoder.named_parameters() if ".lora_" in n}
    assert after.keys() == init.keys() and any(not torch.equal(init[n], after[n]) for n in init)
    for c in ("unet", "vae", "text_encoder"):
        for n, p in getattr(pipe, c).named_parameters():
            if ".lora_" not in n:
                assert torch.equal(base[n.replace(".base_layer", "")], p), f"base weight {c}.{n} changed"
    assert all(torch.equal(a, b) for a, b in zip(clf_before, clf.model.parameters()))
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1] and math.isfinite(log[0]["loss"])
    record = json.loads((adapter / "train_config.json").read_text())
    assert record["align"]["guidance_scale"] == GUIDANCE and "weights_sha256" in record["align"]["classifier"]

    fresh = tiny_diffusion_pipeline(0, sample_size=SIDE)
    fresh.load_lora_weights(str(adapter))  # how DiffusersGenerator applies an adapter
    np.testing.assert_allclose(_sample(fresh), _sample(pipe), atol=1e-6)
    assert np.abs(_sample(fresh) - _sample(start)).max() > 1e-4


def test_a_generator_config_run_samples_with_its_guidance_and_is_reused(tmp_path):
    clf = _classifier()
    gen = {"backend": "diffusers", "model": "tiny", "device": "cpu", "sampling": {"guidance_scale": 3.0}}
    config = _config(align_batch_size=2, align_inference_steps=2, align_guidance_scale=None)
    adapter = run_diffusion_train(config, gen, tmp_path, classifier=clf)
    record = json.loads((adapter / "train_config.json").read_text())
    assert record["align"]["guidance_scale"] == 3.0  # what the audit of this generator samples with
    stamp = (adapter / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    assert run_diffusion_train(config, gen, tmp_path, classifier=clf) == adapter  # same run: reused
    assert (adapter / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"train\.output_dir"):  # another classifier is another run
        run_diffusion_train(config, gen, tmp_path, classifier=_classifier(seed=1))
    with pytest.raises(UserError, match=r"train\.output_dir"):  # so is another guidance scale
        run_diffusion_train(config, {**gen, "sampling": {"guidance_scale": 7.5}}, tmp_path, classifier=clf)


# --------------------------------------------------------------------------------------------- training


def test_alignment_moves_the_measured_share_toward_the_target(tmp_path):
    # Planted skew: the seeded tiny pipeline + tiny CLIP call ~97% of the held-out samples female. Measured like an
    # audit (pipeline call, PIL, classifier) on seeds the training never draws. Control: the same budget aimed at
    # "all female" must NOT move the share down, so the movement comes from the target, not from drift of a randomly
    # perturbed model towards the middle.
    clf = _classifier()
    before = _measured_share(_pipe(), clf)
    assert before >= 0.85

    shares = {}
    for name, target in [("uniform", "uniform"), ("control", {"male": 0.0, "female": 1.0})]:
        pipe = _pipe()
        run_diffusion_train(_config(steps=12, align_target=target), pipe, tmp_path / name, classifier=clf)
        shares[name] = _measured_share(pipe, clf)
    # Measured with the trainer's per-item noise: 0.97 -> 0.81 (uniform) vs 1.00 (control) after 12 steps; 8 steps
    # gave 0.94, 16 gave 0.88. The size of the move depends on the seed in this random tiny world, its sign does not.
    assert shares["uniform"] <= before - 0.1, shares
    assert shares["control"] >= before - 0.05, shares


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change,key", [
    ({"align_confidence": 1.5}, "train.align_confidence"),
    ({"align_steps": 9}, "train.align_steps"),
    ({"align_batch_size": 1}, "train.align_batch_size"),
    ({"align_target": {"male": 0.7, "female": 0.7}}, "train.align_target"),
    ({"align_target": "balanced"}, "train.align_target"),
    ({"dataset": "/some/ds"}, "train.align_prompts"),
    ({"align_prompts": None}, "train.align_prompts"),
    ({"align_attribute": "race"}, "train.align_attribute"),
    ({"align_target": {"male": 1.0}}, "train.align_target"),
    ({"classifier": None}, "train.objective"),
])
def test_bad_align_input_is_one_clear_message_and_writes_nothing(tmp_path, change, key):
    change = dict(change)
    classifier = change.pop("classifier", "default")
    clf = _classifier() if classifier == "default" else classifier
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run_diffusion_train(_config(**change), {"backend": "diffusers", "model": "tiny", "device": "cpu"}, out,
                            classifier=clf)
    assert "\n" not in str(err.value)
    assert not out.exists()
    # align-only keys are refused on other objectives
    with pytest.raises(ConfigError, match=r"train\.align_prompts"):
        DiffusionTrainConfig(objective="sft", align_prompts=[PROMPT])


def test_prompts_come_from_the_dataset_prompt_column(tmp_path):
    import datasets

    rows = ["a photo of a nurse, a person", "a photo of a pilot, a person", "a photo of a nurse, a person"]
    datasets.Dataset.from_dict({"prompt": rows, "group": ["male", "female", "female"]}).save_to_disk(str(tmp_path))
    prompts, fingerprint = load_prompts(DiffusionTrainConfig(objective="align", dataset=str(tmp_path)))
    assert prompts == rows[:2]  # distinct, in order of first appearance
    assert fingerprint == load_prompts(DiffusionTrainConfig(objective="align", align_prompts=rows[:2]))[1]
    with pytest.raises(ConfigError, match=r"train\.dataset"):
        load_prompts(DiffusionTrainConfig(objective="align", dataset=str(tmp_path / "missing")))
