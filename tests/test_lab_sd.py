"""The diffusion lab world: the quick build loads back as a real StableDiffusionPipeline, the shipped ``lab-sd``
generator samples reproducibly through the config path and takes diffusers LoRA adapters, bad input fails with one
line, and the shipped weights carry the planted skew (recorded, and on a fresh sample)."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

from generators.lab.render import GENDERS

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "generators" / "lab" / "weights"
SD = WEIGHTS / "sd"
PACKAGE_GLOBS = ("*.json", "*.yaml", "*.safetensors", "*.txt")  # pyproject's generators.lab package-data


def _config(**over):
    from generators.config import load_yaml
    from generators.resources import named_config

    data = load_yaml(named_config("generators", "lab-sd"))
    data.update(over)
    return data


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    """A --quick diffusion world built through the command line into an empty folder (so it trains its CLIP)."""
    from debias.lab.build import main

    out = tmp_path_factory.mktemp("lab-sd") / "world"
    assert main(["--world", "diffusion", "--out", str(out), "--quick", "--threads", "1"]) == 0
    return out


def test_quick_build_loads_back_as_a_stable_diffusion_pipeline(quick_world):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = quick_world / "sd"
    assert (quick_world / "clip" / "model.safetensors").is_file() and (quick_world / "world.yaml").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 4
    # The text encoder is the world CLIP's text tower, weight for weight.
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(quick_world / "clip")
    for k, v in clip.text_model.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[k], v, rtol=0, atol=0)
    files = [p.relative_to(sd) for p in sd.rglob("*") if p.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only
    assert all(any(fnmatch(f.name, g) for g in PACKAGE_GLOBS) for f in files), files  # all would ship in a wheel
    info = json.loads((sd / "build_info.json").read_text())
    assert info["quick"] and {"vae", "unet", "latent_pool", "verify", "total"} <= set(info["times_s"])
    assert info["verify"]["n_occupations"] == 8 and "explicit_adherence" in info["verify"]
    # A second build into the same folder refuses without --overwrite (one line, names the fix).
    from debias.lab.build import main

    assert main(["--world", "diffusion", "--out", str(quick_world), "--quick"]) == 2


def test_bad_world_flag_is_one_clear_error(tmp_path, capsys):
    from debias.cli import main as cli_main
    from debias.lab.build import main

    assert main(["--world", "banana", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--world" in err and "banana" in err and "diffusion" in err
    assert cli_main(["lab", "build", "--world", "banana", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--world" in err and "banana" in err
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.fixture(scope="module")
def shipped():
    from generators.backends import load_generator

    return load_generator(_config(batch_size=8))


def test_shipped_generator_loads_through_the_config_and_is_seeded(shipped):
    from generators.lab.diffusion import LabDiffusionGenerator

    assert isinstance(shipped, LabDiffusionGenerator)
    prompts = ["A photo of the face of a nurse, a person"] * 3 + ["A photo of the face of a pilot, a female"]
    a = shipped.generate(prompts, [0, 1, 0, 5])
    b = shipped.generate(prompts, [0, 1, 0, 5])
    assert all(im.image.size == (32, 32) for im in a)
    px = [np.asarray(im.image) for im in a]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.image), np.asarray(y.image))
    np.testing.assert_array_equal(px[0], px[2])  # same prompt and seed, other batch position
    assert not np.array_equal(px[0], px[1])
    ident = shipped.identity()
    assert ident["backend"] == "lab-sd" and ident["model"] == "lab" and len(ident["weights"]) >= 16


def test_adapter_loads_through_the_diffusers_path(shipped, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from generators.backends import load_generator

    pipe = StableDiffusionPipeline.from_pretrained(SD, use_safetensors=True)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter visibly changes the UNet (a trained fix would too).
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True)
    tuned = load_generator(_config(batch_size=8, adapter=str(tmp_path)))
    prompts, seeds = ["A photo of the face of a doctor, a person"] * 2, [3, 4]
    base = [np.asarray(im.image, np.float32) for im in shipped.generate(prompts, seeds)]
    out = [np.asarray(im.image, np.float32) for im in tuned.generate(prompts, seeds)]
    assert max(np.abs(x - y).mean() for x, y in zip(base, out)) > 1.0  # 8-bit units
    assert tuned.identity() != shipped.identity()


def _recorded():
    return json.loads((SD / "build_info.json").read_text())["verify"]


def test_shipped_world_recorded_recovery_meets_the_acceptance():
    from generators.config import load_yaml
    from generators.resources import named_config

    v = _recorded()
    sampling = load_yaml(named_config("generators", "lab-sd"))["sampling"]
    # Recorded at the settings the audit uses.
    assert v["guidance_scale"] == sampling["guidance_scale"]
    assert v["num_inference_steps"] == sampling["num_inference_steps"]
    assert v["n_occupations"] == 8 and v["n_per_occupation"] >= 100
    # "Most occupations": the shipped build has 7 of 8 within 0.1 and 5 of 8 covered (a majority).
    assert v["female_within_0.1"] >= 5 and v["female_covered"] >= 5
    assert v["explicit_adherence"]["mean_gender"] >= 0.9
    assert v["explicit_adherence"]["mean_race"] >= 0.6


def test_fresh_sample_of_the_shipped_world_agrees_with_the_recorded_shares(shipped):
    """Nurse (planted P(female) 0.85) and engineer (0.10), 64 images each on seeds the build never used.

    The fresh share must agree with the build's recorded share (100 images) within 3 standard errors of the
    difference of two binomial shares, and the two occupations must stay far apart, so a world that ignored the
    prompt, or a record that was not measured on these weights, fails. The seeds are fixed: deterministic.
    """
    from debias.lab.train_sd import sd_classifier
    from debias.lab.verify import labels
    from debias.lab.world import load_world_config
    from transformers import CLIPModel, CLIPProcessor

    cfg = load_world_config(SD / "world.yaml")
    recorded = _recorded()
    clip = CLIPModel.from_pretrained(WEIGHTS / "clip").eval()
    processor = CLIPProcessor.from_pretrained(WEIGHTS / "clip")
    classifier = sd_classifier(cfg, clip, processor)
    n, seeds = 64, list(range(50_000, 50_064))
    fresh = {}
    for occupation in ("nurse", "engineer"):
        images = shipped.generate([f"A photo of the face of a {occupation}, a person"] * n, seeds)
        fresh[occupation] = float((labels(classifier, [im.image for im in images])["gender"]
                                   == GENDERS.index("female")).mean())
        p = recorded["per_occupation"][occupation]["measured_p_female"]
        se = np.sqrt(max(p * (1 - p), 0.05) * (1 / n + 1 / recorded["n_per_occupation"]))
        assert abs(fresh[occupation] - p) <= 3 * se, (occupation, fresh[occupation], p)
    assert fresh["nurse"] - fresh["engineer"] >= 0.4, fresh


def test_missing_world_names_the_diffusion_build(tmp_path):
    from generators.backends import load_generator
    from generators.config import ConfigError

    with pytest.raises(ConfigError, match="--world diffusion"):
        load_generator(_config(model=str(tmp_path)))
