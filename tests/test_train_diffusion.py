"""LoRA trainer for diffusion pipelines (debias/train/diffusion.py) on a seeded tiny Stable Diffusion pipeline."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from debias.train.diffusion import (
    DiffusionParts,
    DiffusionTrainConfig,
    add_lora,
    build_pairs,
    images_to_pixels,
    run_diffusion_train,
)
from generators.config import UserError
from generators.tiny import tiny_diffusion_pipeline

PROMPTS = ["A photo of the face of a nurse, a person", "A photo of the face of a pilot, a person"]
GROUPS = ["male", "female"]
RES = 32  # the tiny pipeline's native size


def _image(rng: np.random.Generator, group: str):
    from PIL import Image

    # Group-dependent colour plus noise, so the two groups' images differ systematically (as real faces would).
    base = np.array([200, 80, 60] if group == "female" else [60, 90, 200], dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 30, size=(RES, RES, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models gain nothing from intra-op threads, and on 2 shared cores two spinning OpenMP threads made
    # this module ~10x slower (measured); the setting is restored for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    import datasets

    rng = np.random.default_rng(0)
    rows = {"prompt": [], "group": [], "seed": [], "confidence": [], "image": []}
    for prompt in PROMPTS:
        for n in range(2):
            for group in GROUPS:
                rows["prompt"].append(prompt)
                rows["group"].append(group)
                rows["seed"].append(n)
                rows["confidence"].append(0.9)
                rows["image"].append(_image(rng, group))
    features = datasets.Features({"prompt": datasets.Value("string"), "group": datasets.Value("string"),
                                  "seed": datasets.Value("int64"), "confidence": datasets.Value("float32"),
                                  "image": datasets.Image()})
    path = tmp_path_factory.mktemp("balanced") / "ds"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def _config(dataset_dir, **kw) -> DiffusionTrainConfig:
    base = dict(dataset=str(dataset_dir), resolution=RES, steps=3, batch_size=2, rank=4, alpha=8.0, lr=1e-2)
    return DiffusionTrainConfig(**{**base, **kw})


def _sample(pipe, seed: int = 7) -> np.ndarray:
    return pipe(prompt=[PROMPTS[0]], generator=[torch.Generator().manual_seed(seed)], num_inference_steps=3,
                guidance_scale=5.0, height=RES, width=RES, output_type="np").images


def _base_weights(pipe) -> dict[str, torch.Tensor]:
    """Every non-LoRA weight, under its name without peft's ``.base_layer`` wrapper."""
    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        for name, p in getattr(pipe, comp).named_parameters():
            if ".lora_" not in name:
                out[f"{comp}.{name.replace('.base_layer', '')}"] = p.detach().clone()
    return out


def _lora_weights(pipe, comp: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in getattr(pipe, comp).named_parameters() if ".lora_" in n}


def _lora_init_snapshot(comp: str, config: DiffusionTrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights the trainer starts from: the same seeded init on a fresh copy of the pipeline."""
    pipe = tiny_diffusion_pipeline(0)
    add_lora(getattr(pipe, comp), comp, config)
    return _lora_weights(pipe, comp)


# --------------------------------------------------------------------------------------------- pairs and losses


def test_pairs_cover_every_cross_group_pair_once_by_index():
    groups4 = ["White", "Black", "Indian", "Asian"]
    rng = np.random.default_rng(1)
    rows = [(p, g) for p in ("x", "y") for g in groups4 for _ in range(2)]
    rows = [rows[i] for i in rng.permutation(len(rows))]  # pairing must not depend on row order
    prompts, groups = [r[0] for r in rows], [r[1] for r in rows]
    pairs = build_pairs(prompts, groups)
    expected = {(i, j) for i, j in itertools.combinations(range(len(rows)), 2)
                if prompts[i] == prompts[j] and groups[i] != groups[j]}
    got = [tuple(map(int, p)) for p in pairs]
    assert len(got) == len(set(got)) == 2 * (math.comb(8, 2) - 4)  # 24 per prompt: all but same-group pairs
    assert set(got) == expected
    # all K(K-1)/2 = 6 race pairs occur for both prompts (the published code's cyclic pairing missed some)
    for prompt in ("x", "y"):
        seen = {frozenset((groups[i], groups[j])) for i, j in got if prompts[i] == prompt}
        assert seen == {frozenset(c) for c in itertools.combinations(groups4, 2)}
    # a confidence filter pairs only the kept rows
    kept = [i for i in range(len(rows)) if i % 3]
    assert all(i in kept and j in kept for i, j in build_pairs(prompts, groups, rows=kept).tolist())
    # DPO: only pairs with the preferred group, preferred image first
    dpo = build_pairs(prompts, groups, preferred="Black").tolist()
    assert len(dpo) == 2 * 2 * 6 and all(groups[i] == "Black" != groups[j] for i, j in dpo)


@pytest.fixture(scope="module")
def lora_parts():
    """A tiny pipeline with a UNet LoRA whose B matrices are non-zero, so the adapter changes predictions."""
    from peft import LoraConfig

    pipe = tiny_diffusion_pipeline(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pipe, DiffusionParts.from_pipeline(pipe)


def test_identical_images_of_both_groups_give_zero_balanced_loss(lora_parts):
    _, parts = lora_parts
    rng = np.random.default_rng(2)
    pixels = images_to_pixels([_image(rng, "female"), _image(rng, "male")], RES)
    for reference in ("none", "base"):
        loss, stats = parts.preference_loss("bpo", pixels, pixels.clone(), PROMPTS, torch.Generator().manual_seed(0),
                                            beta=2500.0, reference=reference)
        # D = 0 -> sigmoid = 1/2 -> log(1 + 0) = 0. The two copies sit in different rows of one batched UNet call,
        # whose CPU kernels may round rows differently (~1e-7 relative in err, ~1e-9 in the loss on some CPUs).
        assert abs(stats["D"]) / 2500.0 < 1e-6 and loss.item() < 1e-8
        dpo, dpo_stats = parts.preference_loss("dpo", pixels, pixels.clone(), PROMPTS,
                                               torch.Generator().manual_seed(0), beta=2500.0, reference=reference)
        assert abs(dpo_stats["D"]) / 2500.0 < 1e-6  # log 2 at D = 0; d loss / dD = -1/2 there
        assert dpo.item() == pytest.approx(math.log(2.0), abs=abs(dpo_stats["D"]) / 2 + 1e-6)
    # different images do give a positive loss, below its bound log(1.25)
    other = images_to_pixels([_image(rng, "male"), _image(rng, "female")], RES)
    loss, stats = parts.preference_loss("bpo", pixels, other, PROMPTS, torch.Generator().manual_seed(0),
                                        beta=2500.0, reference="none")
    assert 0.0 < loss.item() < math.log(1.25) and stats["D"] != 0.0


def test_base_reference_gives_a_fresh_adapter_no_bpo_gradient():
    # Why reference 'none' is the BPO default: with the adapter-disabled reference and B = 0, r_i = r_j = 0.
    from peft import LoraConfig

    pipe = tiny_diffusion_pipeline(0)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parts = DiffusionParts.from_pipeline(pipe)
    rng = np.random.default_rng(3)
    pi = images_to_pixels([_image(rng, "female")], RES)
    pj = images_to_pixels([_image(rng, "male")], RES)
    grads = {}
    for reference in ("base", "none"):
        pipe.unet.zero_grad()
        loss, _ = parts.preference_loss("bpo", pi, pj, PROMPTS[:1], torch.Generator().manual_seed(0), 1.0,
                                        reference)
        loss.backward()
        grads[reference] = sum(p.grad.abs().sum().item() for n, p in pipe.unet.named_parameters()
                               if "lora_B" in n and p.grad is not None)
    assert grads["base"] == 0.0 and grads["none"] > 0.0


# --------------------------------------------------------------------------------------------- full runs


@pytest.mark.parametrize("objective,target,extra", [
    ("sft", "unet", {}),
    ("bpo", "text_encoder", {"grad_accum": 2}),
    ("dpo", "unet", {"preferred_group": "female", "beta": 50.0}),
])
def test_training_moves_only_lora_and_the_adapter_round_trips(dataset_dir, tmp_path, objective, target, extra):
    config = _config(dataset_dir, objective=objective, lora_target=target, **extra)
    pipe = tiny_diffusion_pipeline(0)
    base_out = _sample(pipe)
    before = _base_weights(pipe)
    start = _lora_init_snapshot(target, config)

    adapter = run_diffusion_train(config, pipe, tmp_path / "run")

    after_lora = _lora_weights(pipe, target)
    assert after_lora.keys() == start.keys() and len(start) > 0
    unchanged = [n for n in start if torch.equal(start[n], after_lora[n])]
    assert not unchanged, f"LoRA weights that did not move: {unchanged[:3]}"
    after = _base_weights(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a base weight changed"

    trained_out = _sample(pipe)
    fresh = tiny_diffusion_pipeline(0)
    fresh.load_lora_weights(str(adapter))  # exactly how DiffusersGenerator applies an adapter
    loaded_out = _sample(fresh)
    assert np.abs(loaded_out - base_out).max() > 1e-3
    np.testing.assert_allclose(loaded_out, trained_out, atol=1e-6)

    log = [__import__("json").loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(math.isfinite(e["loss"]) for e in log)


def test_generator_config_run_is_reused_and_never_overwritten(dataset_dir, tmp_path):
    from safetensors.torch import load_file

    gen = {"backend": "diffusers", "model": "tiny", "device": "cpu"}
    config = {"dataset": str(dataset_dir), "objective": "bpo", "resolution": RES, "steps": 1, "batch_size": 2}
    adapter = run_diffusion_train(config, gen, tmp_path)
    stamp = (adapter / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    assert run_diffusion_train(config, gen, tmp_path) == adapter  # same run: reused, not retrained
    assert (adapter / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="train.output_dir"):
        run_diffusion_train({**config, "lr": 1e-3}, gen, tmp_path)
    # continue the adapter with another objective (SFT -> BPO style), into a new folder
    cont = run_diffusion_train({**config, "objective": "sft", "init_adapter": str(adapter), "lr": 1e-2}, gen,
                               tmp_path / "b")
    old, new = (load_file(d / "pytorch_lora_weights.safetensors") for d in (adapter, cont))
    assert old.keys() == new.keys() and all(not torch.equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize("change,key", [
    ({"dataset": "/nonexistent/ds"}, "train.dataset"),
    ({"objective": "dpo"}, "train.preferred_group"),
    ({"objective": "dpo", "preferred_group": "robot"}, "train.preferred_group"),
    ({"resolution": 36}, "train.resolution"),
    ({"min_confidence": 0.95}, "train.min_confidence"),
    ({"lora_target": "vae"}, "train.lora_target"),
    ({"init_adapter": "/nonexistent/adapter"}, "train.init_adapter"),
    ({"mixed_precision": "fp16"}, "train.mixed_precision"),
])
def test_bad_input_names_the_key_and_writes_nothing(dataset_dir, tmp_path, change, key):
    if key == "train.mixed_precision" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    config = {"dataset": str(dataset_dir), "resolution": RES, "steps": 1, **change}
    out = tmp_path / "run"
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        run_diffusion_train(config, {"backend": "diffusers", "model": "tiny", "device": "cpu"}, out)
    assert not out.exists()


def test_dataset_without_pairs_is_rejected_for_preference(tmp_path):
    import datasets

    rng = np.random.default_rng(4)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS, "group": ["male", "female"],
                                     "image": [_image(rng, "male"), _image(rng, "female")]},
                                    features=datasets.Features({"prompt": datasets.Value("string"),
                                                                "group": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="train.objective"):
        run_diffusion_train({"dataset": str(tmp_path / "ds"), "objective": "bpo", "resolution": RES},
                            tiny_diffusion_pipeline(0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_adapter_for_another_component_is_rejected_before_training(dataset_dir, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "te").mkdir()
    save_file({"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              str(tmp_path / "te" / "pytorch_lora_weights.safetensors"))
    pipe = tiny_diffusion_pipeline(0)
    with pytest.raises(UserError, match=r"train\.init_adapter.*lora_target"):
        run_diffusion_train(_config(dataset_dir, init_adapter=str(tmp_path / "te")), pipe, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not getattr(pipe.unet, "peft_config", None)
