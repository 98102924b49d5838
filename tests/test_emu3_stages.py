"""Every stage on the tiny Emu3: the trainers (LoRA on its decoder, through its layout), and audit, synth, train,
compare and locate through the CLI on the shipped smoke configs; sampling across processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from debias.cli import main
from debias.train.common import adapter_state
from generators.backends import load_generator
from test_store import snapshot

SMOKE = "configs/experiments/smoke-emu3.yaml"
LOCATE = "configs/experiments/locate-smoke-emu3.yaml"
PROMPTS = ["A photo of the face of a nurse, a person", "A photo of the face of a pilot, a person"]


def tiny_emu3_generator(**kw):
    return load_generator({"backend": "emu3", "model": "tiny", "device": "cpu", "batch_size": 8,
                           "sampling": {"guidance_scale": 1.0, "image_area": 1024}, **kw})


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A balanced data set in the synth format from the tiny Emu3: 2 prompts x 2 genders x 2 images."""
    import datasets

    gen = tiny_emu3_generator()
    rows = {k: [] for k in ("prompt", "explicit_prompt", "attribute", "group", "seed", "confidence", "image", "tokens")}
    for neutral in PROMPTS:
        for n, group in enumerate(["male", "female"]):
            explicit = neutral.replace("person", group)
            for image in gen.generate([explicit] * 2, [100 * n, 100 * n + 1]):
                for key, value in (("prompt", neutral), ("explicit_prompt", explicit), ("attribute", "gender"),
                                   ("group", group), ("seed", image.seed), ("confidence", 0.9),
                                   ("image", image.image), ("tokens", image.tokens)):
                    rows[key].append(value)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "explicit_prompt": datasets.Value("string"),
        "attribute": datasets.Value("string"), "group": datasets.Value("string"), "seed": datasets.Value("int64"),
        "confidence": datasets.Value("float32"), "image": datasets.Image(),
        "tokens": datasets.Sequence(datasets.Value("int64")),
    })
    path = tmp_path_factory.mktemp("emu3-data") / "balanced"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def table(dataset_dir):
    from debias.train.data import load_balanced_dataset, select_rows

    return select_rows(load_balanced_dataset(dataset_dir))


def _base_unchanged(peft_model, base: dict) -> None:
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), base[original]), f"base weight {original} changed"


def test_sft_then_bpo_train_every_lora_weight_of_the_decoder_and_no_base_weight(table, tmp_path):
    from peft import PeftModel
    from trl import DPOConfig, SFTConfig

    from debias.train.bpo import ImageTokenBPOTrainer
    from debias.train.common import lora_config, save_adapter
    from debias.train.config import LoraOptions
    from debias.train.data import bpo_pairs, sft_examples
    from debias.train.sft import ImageTokenSFTTrainer
    from generators.tiny import tiny_emu3

    gen = tiny_emu3_generator()
    base = {n: p.detach().clone() for n, p in gen.model.named_parameters()}
    common = dict(report_to="none", use_cpu=True, save_strategy="no", activation_checkpointing=False, logging_steps=1)
    lora = lora_config(LoraOptions(r=4, alpha=8, scope="text_model"))
    sft = ImageTokenSFTTrainer(gen.model, SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                                                    max_steps=3, learning_rate=1e-2, **common),
                               sft_examples(table), gen.tokenizer, gen.layout, peft_config=lora)
    before = adapter_state(sft.model)
    sft.train()
    after_sft = adapter_state(sft.model)
    assert len(before) == 2 * 2 * 7  # 2 layers x (q,k,v,o,gate,up,down) x (A, B): the decoder only
    assert all(".text_model.layers." in n for n in before)
    assert all(not torch.equal(before[n], after_sft[n]) for n in before)
    _base_unchanged(sft.model, base)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in sft.state.log_history if "loss" in e)

    # The balanced preference stage continues the SFT adapter: again every LoRA weight moves, no base weight.
    bpo = ImageTokenBPOTrainer(sft.model, DPOConfig(output_dir=str(tmp_path / "bpo"), per_device_train_batch_size=2,
                                                    max_steps=2, learning_rate=1e-3, beta=1.0, **common),
                               bpo_pairs(table), gen.tokenizer, gen.layout)
    bpo.train()
    after_bpo = adapter_state(bpo.model)
    assert after_bpo.keys() == after_sft.keys()
    assert all(not torch.equal(after_sft[n], after_bpo[n]) for n in after_sft)
    _base_unchanged(bpo.model, base)
    assert all(e["loss"] > 0 for e in bpo.state.log_history if "loss" in e)

    # The trained scores are the generator's: an adapter saved and loaded by config scores the same.
    path = save_adapter(bpo.model, tmp_path / "adapter")
    trained = bpo.model.eval()
    tokens = torch.tensor(table["tokens"][:2])
    ids, mask = gen.encode(PROMPTS)
    loaded = tiny_emu3_generator(adapter=str(path))
    fresh = PeftModel.from_pretrained(tiny_emu3(seed=0)[0], str(path)).eval()
    with torch.no_grad():
        expected = gen.layout.logprobs(trained, ids, mask, tokens)
        assert torch.allclose(loaded.logprobs(PROMPTS, tokens), expected, atol=1e-6)
        assert torch.allclose(gen.layout.logprobs(fresh, ids, mask, tokens), expected, atol=1e-6)


def test_lora_scope_of_another_family_is_refused_with_the_decoder_named(dataset_dir, tmp_path):
    from debias.train.config import TrainConfig
    from debias.train.run import plan_training
    from generators.base import GeneratorConfig
    from generators.config import UserError, from_dict

    train = from_dict(TrainConfig, {"dataset": str(dataset_dir), "method": "sft"}, prefix="train")
    gcfg = GeneratorConfig(backend="emu3", model="tiny", device="cpu", sampling={"image_area": 1024})
    with pytest.raises(UserError, match=r"inside 'language_model' match no module of the model; they sit under "
                                        r"\['text_model'\]"):
        plan_training(train, gcfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_frequency_objective_and_monitor_sample_through_the_emu3_layout(tmp_path):
    from debias.train.common import on_tokens
    from debias.train.config import TrainConfig
    from debias.train.run import run_train
    from generators.base import GeneratorConfig
    from generators.config import from_dict

    @on_tokens
    def lower_half(tokens):
        return (tokens < 32).float().mean(1).lt(0.5).long().numpy()

    config = from_dict(TrainConfig, {
        "method": "freq", "classes": ["low", "high"], "batch_size": 4, "logging_steps": 1,
        "lora": {"r": 4, "alpha": 8, "scope": "text_model"},
        "freq": {"prompts": PROMPTS, "max_steps": 2, "learning_rate": 1e-3, "init_samples": 2},
        "monitor": {"every_steps": 1, "images_per_prompt": 2},
    }, prefix="train")
    gcfg = GeneratorConfig(backend="emu3", model="tiny", device="cpu", sampling={"image_area": 1024})
    adapter = run_train(config, gcfg, tmp_path / "run", classify=lower_half)
    logged = [e for e in json.loads((tmp_path / "run" / "freq" / "log_history.json").read_text()) if "loss" in e]
    assert len(logged) == 2 and all("freq/share_low" in e and "monitor/rd_group" in e for e in logged)
    assert [c["step"] for c in json.loads((tmp_path / "run" / "freq" / "monitor.json").read_text())] == [0, 1, 2]
    assert (adapter / "adapter_model.safetensors").is_file()


def test_extending_an_emu3_run_keeps_its_images(tmp_path, repo_root):
    """A resumed or extended run samples only the new seeds, and every image equals a fresh run's."""
    from audit.sample import run_sample
    from debias.config import load_config

    small = {"prompts.limit": 2, "generator.batch_size": 2}
    run_sample(load_config(repo_root / SMOKE, {**small, "images_per_prompt": 2}), tmp_path / "run", progress=False)
    first = snapshot(tmp_path / "run")
    run_sample(load_config(repo_root / SMOKE, {**small, "images_per_prompt": 4}), tmp_path / "run", progress=False)
    run_sample(load_config(repo_root / SMOKE, {**small, "images_per_prompt": 4}), tmp_path / "fresh", progress=False)
    extended, fresh = snapshot(tmp_path / "run"), snapshot(tmp_path / "fresh")
    assert len(first) == 4 and extended.keys() == fresh.keys() and len(fresh) == 8
    assert all(extended[k] == first[k] for k in first)
    assert all(extended[k][1] == fresh[k][1] for k in fresh)


def documented_commands(*configs: str) -> list[list[str]]:
    """The ``debias ...`` lines of the configs' header comments (what README documents), as argument lists."""
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return [shlex.split(line.split("#", 1)[1])[1:] for c in configs
            for line in (root / c).read_text().splitlines() if line.startswith("#   debias ")]


@pytest.mark.slow
def test_every_stage_runs_on_the_emu3_smoke_configs(tmp_path, repo_root, monkeypatch):
    # The documented commands exactly, run from a folder that sees the repository's configs (runs/ lands there).
    (tmp_path / "configs").symlink_to(repo_root / "configs")
    monkeypatch.chdir(tmp_path)
    commands = documented_commands(SMOKE, LOCATE)
    assert [c[0] for c in commands] == ["audit", "synth", "train", "audit", "compare", "locate"]
    for args in commands:
        assert main(args) == 0, args
    runs = tmp_path / "runs"

    metrics = json.loads((runs / "emu3-audit" / "metrics.json").read_text())
    assert metrics["run"]["generator"]["backend"] == "emu3" and metrics["run"]["sampling"]["top_k"] == 2048
    assert set(metrics["attributes"]) >= {"gender", "race"}
    manifest = json.loads((runs / "emu3-synth" / "synth.json").read_text())
    assert manifest["n_rows"] == 8 and not manifest["shortfalls"]  # 2 prompts x 2 genders x 2 images
    adapter = runs / "emu3-train" / "bpo" / "adapter"
    info = json.loads((adapter / "train_info.json").read_text())
    assert info["init_adapter"] == "runs/emu3-train/sft/adapter" and info["global_step"] == 2
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"].startswith(
        r"(.*\.)?text_model\.")
    assert json.loads((runs / "emu3-after" / "metrics.json").read_text())["run"]["generator"]["adapter_hash"]
    result = json.loads((runs / "emu3-compare" / "compare.json").read_text())
    assert result["matching"]["n_matched"] == 32 and result["matching"]["unmatched_before"] == 0

    out = json.loads((runs / "emu3-locate" / "locate.json").read_text())
    assert out["probes"] == ["understanding", "vision", "controlled", "swap"]
    results = out["results"]
    assert set(results["vision"]["encoders"]) == {"vq", "embedded"}
    assert results["understanding"]["attributes"]["gender"]["per_occupation"][0]["n"] == 8
    assert results["controlled"]["distribution_used"] == "pooled"
    swap = results["swap"]
    assert swap["components"] == {"language": ["model.text_model", "lm_head"], "vision": ["model.vqmodel"]}
    # The adapter changed the text model only: nothing outside the two sides, and the same decoder in every cell.
    assert swap["unassigned_differences"] == []
    assert swap["fingerprints"]["vision"]["base"] == swap["fingerprints"]["vision"]["tuned"]
    assert swap["fingerprints"]["language"]["base"] != swap["fingerprints"]["language"]["tuned"]
    assert swap["attributes"]["gender"]["vision_main"] == 0.0


@pytest.mark.slow
def test_two_process_sampling_gives_the_same_emu3_images(tmp_path, repo_root):
    from audit.sample import run_sample
    from debias.config import load_config

    overrides = {"prompts.limit": 3, "images_per_prompt": 4, "generator.batch_size": 3}
    run_sample(load_config(repo_root / SMOKE, overrides), tmp_path / "one", progress=False)
    sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "debias.cli", "sample", "--config", str(repo_root / SMOKE), "--out", str(tmp_path / "two"),
           "--quiet", *sets]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 12
    assert all(one[k][1] == two[k][1] for k in one)
