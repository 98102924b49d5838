"""`debias synth` / `debias train` on a diffusion pipeline (tiny SD): stages, resume, 1 vs 2 processes, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generators.config import to_dict

SMOKE = "train-smoke-sd"  # configs/experiments/train-smoke-sd.yaml
PROMPTS = ["A photo of the face of a nurse, a person", "A photo of the face of a pilot, a person"]
GROUPS = ["male", "female"]
RES = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads; on 2 shared cores extra threads oversubscribe (10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(rng: np.random.Generator, group: str):
    from PIL import Image

    base = np.array([200, 80, 60] if group == "female" else [60, 90, 200], dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, size=(RES, RES, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """8 rows: 2 neutral prompts x 2 groups x 2 images (8 cross-group pairs), the columns `debias synth` writes."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {"prompt": [], "group": [], "seed": [], "confidence": [], "image": []}
    for prompt in PROMPTS:
        for n in range(2):
            for group in GROUPS:
                for key, value in (("prompt", prompt), ("group", group), ("seed", n), ("confidence", 0.9),
                                   ("image", _image(rng, group))):
                    rows[key].append(value)
    features = datasets.Features({"prompt": datasets.Value("string"), "group": datasets.Value("string"),
                                  "seed": datasets.Value("int64"), "confidence": datasets.Value("float32"),
                                  "image": datasets.Image()})
    path = tmp_path_factory.mktemp("balanced") / "dataset"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def _experiment(dataset, **train) -> dict:
    """The smoke config as resolved data (what `debias train` hands main_train), with train keys replaced."""
    from debias.config import load_config

    data = to_dict(load_config(SMOKE, {"train.dataset": str(dataset)}))
    for key, value in train.items():
        node = data["train"]
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


def _lora(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "pytorch_lora_weights.safetensors"))


def _cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "debias.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


# ------------------------------------------------------------------------------------ synth -> train -> re-audit


@pytest.mark.slow
def test_synth_train_and_reaudit_from_the_cli(tmp_path):
    """`debias synth` makes the dataset from the pipeline itself in the format the diffusion trainer reads;
    `debias train` (a subprocess) runs SFT then BPO on the SFT adapter; the audit with the adapter differs."""
    from debias.cli import main

    synth = tmp_path / "synth"
    assert main(["synth", "--config", SMOKE, "--out", str(synth), "--quiet"]) == 0
    ds = synth / "dataset"
    out = tmp_path / "train"
    done = _cli("train", "--config", SMOKE, "--out", str(out), "--set", f"train.dataset={ds}")
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((out / "train_result.json").read_text())
    assert result["adapter"] == str(out / "bpo" / "adapter") and result["stages"] == ["sft", "bpo"]
    assert json.loads((out / "bpo" / "stage.json").read_text())["init_adapter"] == str(out / "sft" / "adapter")
    sft, bpo = _lora(out / "sft" / "adapter"), _lora(out / "bpo" / "adapter")
    assert sft.keys() == bpo.keys() and all(k.startswith("unet.") for k in sft)
    assert any(not torch.equal(sft[k], bpo[k]) for k in sft), "BPO did not move the SFT adapter"
    assert any(k.endswith("lora.up.weight") and sft[k].abs().max() > 0 for k in sft), "SFT left B at its zero init"
    log = [json.loads(line) for line in (out / "bpo" / "adapter" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]

    # The re-audit: the same prompts and seeds with the final adapter loaded by DiffusersGenerator.
    for name, extra in (("before", []), ("after", ["--adapter", result["adapter"]])):
        assert main(["audit", "--config", SMOKE, "--out", str(tmp_path / name), "--quiet", *extra]) == 0
    after = json.loads((tmp_path / "after" / "metrics.json").read_text())
    assert after["run"]["generator"]["adapter"] == result["adapter"]
    from audit.store import RunStore

    def images(name: str) -> dict:
        store = RunStore(tmp_path / name)
        return {(r["prompt"], r["seed"]): np.asarray(store.image(r), np.float32) for r in store.records()}

    before, after = images("before"), images("after")
    assert before.keys() == after.keys() and len(before) == 8  # the same prompts and seeds
    diffs = [np.abs(before[k] - after[k]).max() for k in before]
    assert max(diffs) > 0, "the adapter changed no image"


# ------------------------------------------------------------------------------------------- 1 vs 2 processes


@pytest.mark.slow
def test_two_processes_give_the_same_update_as_one(dataset_dir, tmp_path, monkeypatch):
    """`accelerate launch` with 2 CPU processes (torchrun + gloo), per-process batch halved (the global batch held
    at 4), gives the 1-process adapter: every item's noise and timestep are functions of (seed, epoch, item), the
    two processes' shards of a global batch are the 1-process batch, and DDP averages their gradients.

    Tolerance. AdamW divides each gradient entry by sqrt(v) + eps: with eps 1e-8 the few entries whose gradient is
    itself ~1e-8 (fp32 reduction-order rounding of cancelling sums: 47 of 15360 measured) get updates that differ
    by up to 4 % of lr between the runs (relative difference of the whole update 6.5e-4). With eps 1e-4, above the
    gradients' rounding, AdamW is a smooth function of the gradient, and the SFT updates agree to 2.7e-6 (the
    largest entry differences are one float32 ulp of the weights); the BPO stage, which starts from the two SFT
    adapters and whose loss is a steep function of D (beta 100), agrees to 1.4e-4. A wrong split (per-process
    noise, other batches, unaveraged gradients) differs at O(0.1-1).
    """
    from debias.train.diffusion import DiffusionTrainConfig, add_lora
    from debias.train.launch import main_train
    from generators.tiny import tiny_diffusion_pipeline

    same = {"diffusion.shared.adam_epsilon": 1e-4, "diffusion.bpo.beta": 100.0, "diffusion.bpo.lr": 1e-2,
            "save_steps": 100}
    one = _experiment(dataset_dir, **same, **{"diffusion.shared.batch_size": 4})
    two = _experiment(dataset_dir, **same, **{"diffusion.shared.batch_size": 2, "num_processes": 2,
                                              "accelerate_config": "multi-gpu-ddp"})
    main_train(one, str(tmp_path / "one"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main_train(two, str(tmp_path / "two"))

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    shared = one["train"]["diffusion"]["shared"]
    pipe = tiny_diffusion_pipeline(0)
    add_lora(pipe.unet, "unet", DiffusionTrainConfig(rank=shared["rank"], alpha=shared["alpha"]))
    init = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)).items()}
    starts = {"sft": (init, init)}
    starts["bpo"] = tuple(_lora(tmp_path / run / "sft" / "adapter") for run in ("one", "two"))
    for stage, tolerance in (("sft", 2e-5), ("bpo", 1e-3)):
        a, b = _lora(tmp_path / "one" / stage / "adapter"), _lora(tmp_path / "two" / stage / "adapter")
        a0, b0 = starts[stage]
        assert a.keys() == b.keys() == init.keys()
        ua = torch.cat([(a[k] - a0[k]).flatten() for k in a])
        ub = torch.cat([(b[k] - b0[k]).flatten() for k in a])
        assert all((a[k] - a0[k]).abs().max() > 0 for k in a), f"{stage}: a LoRA tensor did not move"
        rel = ((ub - ua).norm() / ua.norm()).item()
        print(f"{stage}: relative difference of the LoRA update, 2 processes vs 1: {rel:.2e}")
        assert rel < tolerance, (stage, rel)
    record = json.loads((tmp_path / "two" / "sft" / "adapter" / "train_config.json").read_text())
    assert record["train"]["batch_size"] == 2


# ------------------------------------------------------------------------------------------------- resume


def test_rerun_skips_finished_stages_and_a_killed_stage_resumes_to_the_same_adapter(dataset_dir, tmp_path):
    from debias.train.launch import main_train

    sets = {"diffusion.sft.steps": 5, "save_steps": 2}
    data = _experiment(dataset_dir, **sets)
    out = tmp_path / "run"
    main_train(data, str(out))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    main_train(data, str(out))  # both stages finished: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps

    # The same training killed (as SIGKILL would) while it writes the SFT checkpoint of step 4.
    killed = tmp_path / "killed"
    args = ["train", "--config", SMOKE, "--out", str(killed), "--set", f"train.dataset={dataset_dir}",
            *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]
    done = _cli(*args, env={"DEBIAS_CRASH_AT": "train:checkpoint-4"})
    assert done.returncode == 137, done.stderr[-2000:]
    sft = killed / "sft"
    assert (sft / "checkpoint-2" / "trainer_state.json").is_file() and (sft / "checkpoint-4").is_dir()
    assert not (sft / "checkpoint-4" / "trainer_state.json").exists() and not (sft / "adapter").exists()
    main_train(data, str(killed))  # resumes SFT from checkpoint-2, then runs BPO
    assert not (sft / "checkpoint-4").exists() or (sft / "checkpoint-4" / "trainer_state.json").is_file()
    for stage in ("sft", "bpo"):
        want, got = _lora(out / stage / "adapter"), _lora(killed / stage / "adapter")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), stage
    log = [json.loads(line)["step"] for line in (sft / "adapter" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]

    # Another config never overwrites the finished run.
    from generators.config import UserError

    with pytest.raises(UserError, match="stage 'sft' there was trained from a different config"):
        main_train(_experiment(dataset_dir, **{"diffusion.sft.steps": 4, "diffusion.sft.lr": 1e-3}), str(out))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("override,message", [
    ("diffusion.sft.lr=-1", "config key 'train.diffusion.sft.lr': got -1.0; set it to a positive number, e.g. 1e-4"),
    ("diffusion.shared.rank=0", "config key 'train.diffusion.shared.rank': got 0; set it to a positive integer"),
    ("diffusion.bpo.rnak=4", "config key 'train.diffusion.bpo.rnak' is unknown; did you mean 'rank'?"),
    ("diffusion.sft.dataset=x", "config key 'train.diffusion.sft.dataset' is set by `debias train` from "
                                "train.dataset; remove it"),
    ("method=sft+freq", "config key 'train.method': 'sft+freq' does not train a diffusion pipeline"),
    ("batch_size=2", "config key 'train.batch_size' is for image-token models"),
    ("method=dpo", "config key 'train.diffusion.dpo.preferred_group'"),
])
def test_bad_config_value_exits_2_with_one_line_and_writes_nothing(dataset_dir, tmp_path, capsys, override,
                                                                   message):
    from debias.cli import main

    out = tmp_path / "run"
    sets = ["--set", f"train.dataset={dataset_dir}", "--set", override]
    if override == "method=dpo":
        sets += ["--set", "diffusion.dpo.preferred_group=robot"]
    assert main(["train", "--config", SMOKE, "--out", str(out), *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("debias train: error: "), err
    assert message in err, err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------- SDXL


def tiny_sdxl_pipeline(seed: int = 0):
    """A seeded tiny ``StableDiffusionXLPipeline`` (random weights): two CLIP text encoders (the second with a
    projection, whose pooled output and the size/crop ids condition the UNet through ``text_time``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from generators.tiny import byte_clip_tokenizer

    tok = byte_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=RES // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=32)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, hidden_act="gelu", projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer_2=byte_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("target", ["unet", "text_encoder"])
def test_sdxl_trains_one_step_and_the_adapter_loads(dataset_dir, tmp_path, target):
    from debias.train.diffusion import DiffusionTrainConfig, run_diffusion_train

    def sample(pipe):
        return pipe(prompt=[PROMPTS[0]], generator=[torch.Generator().manual_seed(3)], num_inference_steps=2,
                    guidance_scale=5.0, height=RES, width=RES, output_type="np").images

    pipe = tiny_sdxl_pipeline()
    base = sample(pipe)
    frozen = {n: p.detach().clone() for n, p in pipe.text_encoder_2.named_parameters()}
    config = DiffusionTrainConfig(dataset=str(dataset_dir), objective="bpo", lora_target=target, resolution=RES,
                                  steps=1, batch_size=2, rank=4, alpha=8.0, lr=1e-2)
    adapter = run_diffusion_train(config, pipe, tmp_path / "run")
    trained = sample(pipe)
    assert np.abs(trained - base).max() > 1e-3, "one step changed nothing"
    assert all(torch.equal(frozen[n], p) for n, p in pipe.text_encoder_2.named_parameters())
    fresh = tiny_sdxl_pipeline()
    fresh.load_lora_weights(str(adapter))
    np.testing.assert_allclose(sample(fresh), trained, atol=1e-6)


# ------------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["train-smoke-sd", "train-sd15", "train-sdxl", "lab-sd"])
def test_shipped_diffusion_train_configs_give_valid_stages(name):
    """Every stage section of the shipped diffusion configs is a valid DiffusionTrainConfig (no model, no data)."""
    from debias.config import load_config
    from debias.train.diffusion_stages import check_method, stage_config

    path = Path(__file__).resolve().parents[1] / "configs" / "experiments" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    train = load_config(path).train
    check_method(train, True, "diffusers")
    for stage in ("sft", "bpo", "dpo"):
        config = stage_config(train, stage)
        assert config.objective == stage and config.dataset == train.dataset
    assert train.stages[-1] == "bpo" and {"sft", "bpo", "dpo"} <= set(raw["train"]["diffusion"])
