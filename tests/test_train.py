"""The Janus trainers (debias.train) on a tiny real Janus: SFT, BPO, the frequency objective, resume, launch."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from debias.train.common import adapter_state, on_tokens, save_adapter
from debias.train.config import TrainConfig
from generators.base import GeneratorConfig
from generators.config import ConfigError, UserError, from_dict

PROMPTS = ["A photo of the face of a nurse, a person", "A photo of the face of a pilot, a person"]
GROUPS = {"gender": ["male", "female"], "race": ["White", "Black", "Indian", "Asian"]}
IMAGES_PER_GROUP = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they oversubscribe (10x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw) -> GeneratorConfig:
    return GeneratorConfig(backend="janus", model=kw.pop("model", "tiny"), device="cpu", batch_size=16,
                           sampling={"guidance_scale": 1.0}, **kw)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A balanced data set in the synth format: 2 neutral prompts x (2 genders + 4 races) x 2 images."""
    import datasets

    from generators.janus import JanusGenerator

    gen = JanusGenerator(tiny_config())
    rows = {k: [] for k in ("prompt", "explicit_prompt", "attribute", "group", "seed", "confidence", "image", "tokens")}
    for neutral in PROMPTS:
        for attribute, groups in GROUPS.items():
            for group in groups:
                explicit = neutral.replace("person", group)
                # distinct seeds per group: this random tiny model barely reads the prompt, so equal seeds would
                # give every group the same image
                seeds = [100 * groups.index(group) + n for n in range(IMAGES_PER_GROUP)]
                for image in gen.generate([explicit] * IMAGES_PER_GROUP, seeds):
                    for key, value in (("prompt", neutral), ("explicit_prompt", explicit), ("attribute", attribute),
                                       ("group", group), ("seed", image.seed), ("confidence", 0.9),
                                       ("image", image.image), ("tokens", image.tokens)):
                        rows[key].append(value)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "explicit_prompt": datasets.Value("string"),
        "attribute": datasets.Value("string"), "group": datasets.Value("string"), "seed": datasets.Value("int64"),
        "confidence": datasets.Value("float32"), "image": datasets.Image(),
        "tokens": datasets.Sequence(datasets.Value("int64")),
    })
    path = tmp_path_factory.mktemp("data") / "balanced"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path), num_proc=None)
    return path


@pytest.fixture(scope="module")
def table(dataset_dir):
    from debias.train.data import load_balanced_dataset, select_rows

    return select_rows(load_balanced_dataset(dataset_dir))


def train_config(dataset_dir, **kw) -> TrainConfig:
    data = {"dataset": str(dataset_dir), "batch_size": 4, "logging_steps": 1, "save_steps": 2,
            "lora": {"r": 4, "alpha": 8}, "sft": {"max_steps": 3, "learning_rate": 1e-2}}
    for key, value in kw.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return from_dict(TrainConfig, data, prefix="train")


# ---------------------------------------------------------------------------------------------------------- pairs


def test_bpo_pairs_cover_all_group_pairs_per_prompt(table):
    from debias.train.data import bpo_pairs

    pairs = bpo_pairs(table)
    k_pairs = sum(len(g) * (len(g) - 1) // 2 for g in GROUPS.values())
    assert len(pairs) == len(PROMPTS) * k_pairs * IMAGES_PER_GROUP
    seen = {}
    for row in pairs:
        i, j = row["index_i"], row["index_j"]
        assert table[i]["prompt"] == table[j]["prompt"] == row["prompt"]
        assert table[i]["attribute"] == table[j]["attribute"] == row["attribute"]
        assert (table[i]["group"], table[j]["group"]) == (row["group_i"], row["group_j"])
        assert row["group_i"] != row["group_j"]
        assert row["tokens_i"] == table[i]["tokens"] and row["tokens_j"] == table[j]["tokens"]
        seen.setdefault((row["prompt"], row["attribute"]), set()).add(frozenset((row["group_i"], row["group_j"])))
    for prompt in PROMPTS:
        for attribute, groups in GROUPS.items():
            expected = {frozenset((a, b)) for n, a in enumerate(groups) for b in groups[n + 1:]}
            assert seen[(prompt, attribute)] == expected


def test_pairs_stay_aligned_through_the_trainer_dataloader(table, tmp_path):
    """After TRL's column handling, shuffling and collation, rows b and B+b are exactly pair b's recorded images."""
    from trl import DPOConfig

    from debias.train.bpo import ImageTokenBPOTrainer
    from debias.train.common import lora_config
    from debias.train.config import LoraOptions
    from debias.train.data import bpo_pairs
    from generators.janus import JanusGenerator
    from generators.janus_sequence import encode_prompts

    gen = JanusGenerator(tiny_config())
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=5, report_to="none", use_cpu=True,
                     activation_checkpointing=False, save_strategy="no")
    trainer = ImageTokenBPOTrainer(gen.model, args, bpo_pairs(table), gen.tokenizer, gen.layout,
                              peft_config=lora_config(LoraOptions(r=2, alpha=2)))
    tokens = torch.tensor(table["tokens"])
    prompts = table["prompt"]
    seen = 0
    for batch in trainer.get_train_dataloader():
        b = batch["pair_index"].shape[0]
        i, j = batch["pair_index"][:, 0], batch["pair_index"][:, 1]
        assert torch.equal(batch["image_tokens"][:b], tokens[i])
        assert torch.equal(batch["image_tokens"][b:], tokens[j])
        assert torch.equal(batch["input_ids"][:b], batch["input_ids"][b:])
        want_ids, want_mask = encode_prompts(gen.tokenizer, [prompts[n] for n in i.tolist()], gen.ids)
        width = want_ids.shape[1]
        assert torch.equal(batch["input_ids"][:b, -width:], want_ids)
        assert torch.equal(batch["attention_mask"][:b, -width:], want_mask)
        assert not batch["attention_mask"][:b, :-width].any()
        seen += b
    assert seen == len(trainer.train_dataset)


# ------------------------------------------------------------------------------------------------------------ SFT


def test_sft_trains_every_lora_weight_and_no_base_weight_and_saves_exactly(table, tmp_path):
    from peft import PeftModel
    from trl import SFTConfig

    from debias.train.common import lora_config
    from debias.train.config import LoraOptions
    from debias.train.data import sft_examples
    from debias.train.sft import ImageTokenSFTTrainer
    from generators.janus import JanusGenerator
    from generators.janus_sequence import image_logits
    from generators.tiny import tiny_janus

    gen = JanusGenerator(tiny_config())
    base = {n: p.detach().clone() for n, p in gen.model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                     learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     activation_checkpointing=False)
    trainer = ImageTokenSFTTrainer(gen.model, args, sft_examples(table), gen.tokenizer, gen.layout,
                              peft_config=lora_config(LoraOptions(r=4, alpha=8)))
    before = adapter_state(trainer.model)
    trainer.train()
    after = adapter_state(trainer.model)

    assert len(before) == 2 * 2 * 7  # 2 layers x (q,k,v,o,gate,up,down) x (A, B): language model only
    assert all("language_model" in n for n in before)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    for name, p in trainer.model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), base[original]), f"base weight {original} changed"
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    path = save_adapter(trainer.model, tmp_path / "adapter")
    trained = trainer.model.eval()
    fresh = PeftModel.from_pretrained(tiny_janus(seed=0)[0], str(path)).eval()
    input_ids, mask = gen.encode(PROMPTS)
    image_tokens = torch.tensor([table["tokens"][0], table["tokens"][1]])
    with torch.no_grad():
        expected = image_logits(trained, input_ids, mask, image_tokens)
        assert torch.equal(image_logits(fresh, input_ids, mask, image_tokens), expected)
        with trained.disable_adapter():
            assert not torch.equal(image_logits(trained, input_ids, mask, image_tokens), expected)
    # data weights (synth `balance: reweight`): each row's mean token log-likelihood is weighted
    batch = trainer.data_collator([{**trainer.train_dataset[n], "weight": w} for n, w in enumerate([0.0, 2.0, 1.0])])
    with torch.no_grad():
        logps = trainer._image_logps(trained, batch).mean(-1)
        assert torch.allclose(trainer.compute_loss(trained, batch), -(batch["weight"] * logps).mean())

    # the generator loads the same adapter by config
    loaded = JanusGenerator(tiny_config(adapter=str(path)))
    with torch.no_grad():
        assert torch.equal(loaded.logprobs(PROMPTS, image_tokens),
                           image_logits(trained, input_ids, mask, image_tokens).log_softmax(-1)
                           .gather(-1, image_tokens.unsqueeze(-1)).squeeze(-1))


# ------------------------------------------------------------------------------------------- run_train: SFT + BPO


@pytest.fixture(scope="module")
def sft_bpo_run(dataset_dir, tmp_path_factory):
    from debias.train.run import run_train

    out = tmp_path_factory.mktemp("runs") / "sft-bpo"
    config = train_config(dataset_dir, method="sft+bpo", bpo={"max_steps": 4, "learning_rate": 1e-4})
    return config, out, run_train(config, tiny_config(), out)


def _load_adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_bpo_continues_the_sft_adapter(sft_bpo_run):
    config, out, final = sft_bpo_run
    assert final == out / "bpo" / "adapter"
    info = json.loads((final / "train_info.json").read_text())
    assert info["init_adapter"] == str(out / "sft" / "adapter") and info["global_step"] == 4
    sft, bpo = _load_adapter_weights(out / "sft" / "adapter"), _load_adapter_weights(final)
    assert sft.keys() == bpo.keys()
    # BPO (lr 1e-4, 4 steps) moved every weight a little away from where SFT (lr 1e-2) left it; a new adapter
    # would start from B = 0, far from SFT's B.
    diffs = {k: (bpo[k] - sft[k]).abs().max().item() for k in sft}
    assert all(0 < d < 1e-3 for d in diffs.values())
    assert max(sft[k].abs().max().item() for k in sft if "lora_B" in k) > 1e-2
    history = json.loads((out / "bpo" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert all("bpo/abs_logodds_gap" in e for e in history if "loss" in e)
    assert json.loads((out / "train_result.json").read_text())["adapter"] == str(final)


def test_rerun_skips_finished_stages_and_resumes_from_checkpoints(sft_bpo_run):
    from debias.train.run import run_train

    config, out, final = sft_bpo_run
    stamp = (final / "adapter_model.safetensors").stat().st_mtime_ns
    assert run_train(config, tiny_config(), out) == final
    assert (final / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # not retrained

    # simulate a crash after checkpoint-2 of the BPO stage: resume trains steps 3-4 only, to the same adapter
    import shutil

    reference = _load_adapter_weights(final)
    shutil.rmtree(final)
    shutil.rmtree(out / "bpo" / "checkpoint-4")
    assert run_train(config, tiny_config(), out) == final
    history = json.loads((out / "bpo" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    resumed = _load_adapter_weights(final)
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-7) for k in reference)

    # a different config for an existing stage is refused, and nothing is touched
    changed = train_config(config.dataset, method="sft+bpo", bpo={"max_steps": 4, "learning_rate": 1e-3})
    with pytest.raises(UserError, match="stage 'bpo'.*different config"):
        run_train(changed, tiny_config(), out)
    assert (final / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("loss", ["bpo", "dpo"])
def test_preference_stage_with_gradient_checkpointing_bf16_and_accumulation_trains_every_module(
        dataset_dir, tmp_path, loss):
    from debias.train.run import run_train

    config = train_config(dataset_dir, method="bpo", precision="bf16", gradient_checkpointing=True,
                          gradient_accumulation_steps=2, attributes=["race"],
                          bpo={"max_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0, "loss": loss})
    adapter = run_train(config, tiny_config(), tmp_path / "run")
    weights = _load_adapter_weights(adapter)
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 14 and all(torch.isfinite(v).all() and v.abs().max() > 0 for v in lora_b.values())
    assert not (adapter / "ref").exists() and not (adapter / "training_args.bin").exists()
    history = [e for e in json.loads((tmp_path / "run" / "bpo" / "log_history.json").read_text()) if "loss" in e]
    if loss == "bpo":
        assert all(e["loss"] > 0 for e in history)  # pairs of different groups: unequal likelihoods
    else:
        # reference = the initial model: margin 0 and loss log 2 at the first step, then the rarer image gains
        assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and history[0]["rewards/margins"] == 0
        assert history[-1]["rewards/margins"] > 0


def test_sft_examples_normalise_data_weights(table):
    from debias.train.data import sft_examples

    weighted = table.add_column("weight", [float(n % 3) for n in range(len(table))])
    examples = sft_examples(weighted)
    assert sum(examples["weight"]) == pytest.approx(len(table))
    assert examples["weight"][0] == 0.0
    assert "weight" not in sft_examples(weighted, use_weights=False).column_names


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_key_and_writes_nothing(dataset_dir, tmp_path):
    from debias.train.run import run_train

    out = tmp_path / "run"
    with pytest.raises(UserError, match="train.dataset.*does not exist"):
        run_train(train_config(tmp_path / "missing"), tiny_config(), out)
    with pytest.raises(UserError, match="classifier"):
        run_train(train_config(dataset_dir, method="freq", classes=["a", "b"]), tiny_config(), out)
    with pytest.raises(UserError, match="train.init_adapter"):
        run_train(train_config(dataset_dir, init_adapter=str(tmp_path)), tiny_config(), out)
    with pytest.raises(UserError, match="image tokens"):  # a model with another image grid than the data
        run_train(train_config(dataset_dir), tiny_config(model=str(_other_grid_model(tmp_path))), out)
    assert not out.exists()
    with pytest.raises(ConfigError, match="train.method.*'sft\\+bpo'"):
        from_dict(TrainConfig, {"method": "sft+bop"}, prefix="train")
    with pytest.raises(ConfigError, match="train.bpo.betta"):
        from_dict(TrainConfig, {"bpo": {"betta": 1}}, prefix="train")


def _other_grid_model(tmp_path) -> Path:
    from generators.tiny import tiny_janus

    model, tokenizer = tiny_janus(seed=0, num_patches=2)  # 4 image tokens instead of 16
    path = tmp_path / "grid2"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ frequency objective


@on_tokens
def lower_half_majority(tokens: torch.Tensor):
    """A real (deterministic) classifier on image tokens: class 0 when most codes lie in the codebook's lower half."""
    return ((tokens < 32).float().mean(1) <= 0.5).long().numpy()


def _skewed_model(tmp_path) -> Path:
    """Tiny Janus with a planted skew: a sharper generation head whose bias favours the lower half of the codebook."""
    from generators.tiny import tiny_janus

    model, tokenizer = tiny_janus(seed=0)
    with torch.no_grad():
        head = model.model.generation_head
        head.proj_out.weight *= 10
        head.vision_head.weight *= 10
        head.vision_head.bias[:32] += 0.5
    path = tmp_path / "skewed"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _share_of_class0(config: GeneratorConfig, n: int = 256) -> float:
    """Share of class 0 over n images per prompt (different seeds per prompt: this random model barely reads them)."""
    from generators.janus import JanusGenerator

    gen = JanusGenerator(config)
    labels = [lower_half_majority(gen.sample_tokens([p] * n, list(range(5000 + k * n, 5000 + (k + 1) * n))))
              for k, p in enumerate(PROMPTS)]
    return float(sum((lab == 0).mean() for lab in labels) / len(labels))


def test_frequency_objective_moves_sampled_shares_toward_target(tmp_path):
    from debias.train.run import run_train

    model = _skewed_model(tmp_path)
    config = from_dict(TrainConfig, {
        "method": "freq", "classes": ["low", "high"], "batch_size": 16, "logging_steps": 1,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "freq": {"prompts": PROMPTS, "max_steps": 6, "learning_rate": 2e-3, "warmup_ratio": 0.0,
                 "lr_scheduler": "constant", "init_samples": 16},
        "monitor": {"every_steps": 2, "images_per_prompt": 8, "attribute": "lowhigh"},
    }, prefix="train")
    before = _share_of_class0(tiny_config(model=str(model)))
    adapter = run_train(config, tiny_config(model=str(model)), tmp_path / "run", classify=lower_half_majority)
    after = _share_of_class0(tiny_config(model=str(model), adapter=str(adapter)))
    assert before > 0.7  # the planted skew
    assert abs(after - 0.5) < abs(before - 0.5) - 0.1, (before, after)

    history = json.loads((tmp_path / "run" / "freq" / "log_history.json").read_text())
    logged = [e for e in history if "loss" in e]
    assert all("freq/share_low" in e and "freq/weight" in e for e in logged)
    assert any("monitor/rd_lowhigh" in e for e in logged)
    checks = json.loads((tmp_path / "run" / "freq" / "monitor.json").read_text())
    assert [c["step"] for c in checks] == [0, 2, 4, 6]
    assert all(0 <= c["monitor/rd_lowhigh"] <= 1 for c in checks)


# ---------------------------------------------------------------------------------------------------- launch


def test_overrides_apply_dotted_and_bare_train_keys(tmp_path):
    from debias.config import load_config
    from generators.config import apply_overrides

    data = {"generator": {"backend": "janus"}, "train": {"sft": {"max_steps": 5}}}
    out = apply_overrides(data, {"train.sft.max_steps": 2, "train.method": "sft", "train.dataset": None,
                                 "generator.device": "cpu"})
    assert out == {"generator": {"backend": "janus", "device": "cpu"}, "train": {"sft": {"max_steps": 2},
                                                                                 "method": "sft"}}
    assert data["train"]["sft"]["max_steps"] == 5  # the input is not modified
    # `debias train --set method=sft`: keys of the train section may drop their prefix.
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"generator": {"backend": "janus", "model": "tiny"},
                                    "train": {"sft": {"max_steps": 5}}}))
    config = load_config(path, {"sft.max_steps": 2, "method": "sft", "dataset": None, "generator.device": "cpu"},
                         bare="train")
    assert (config.train.sft.max_steps, config.train.method, config.generator.device) == (2, "sft", "cpu")


def test_main_train_relaunches_two_processes_under_accelerate(dataset_dir, tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (torchrun + gloo)."""
    from debias.config import load_config
    from debias.train.launch import launch_command, main_train
    from generators.config import to_dict

    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump({
        "generator": {"backend": "janus", "model": "tiny", "device": "cpu", "sampling": {"guidance_scale": 1.0}},
        "train": {"method": "sft", "dataset": str(dataset_dir), "batch_size": 2, "logging_steps": 1,
                  "lora": {"r": 2, "alpha": 2}, "sft": {"max_steps": 2, "learning_rate": 1e-3},
                  "num_processes": 2, "accelerate_config": "multi-gpu-ddp"},
    }))
    config = load_config(config_path)
    command = launch_command(config.train, tmp_path / "experiment.json", tmp_path / "out")
    assert "--config_file" in command and command[command.index("--num_processes") + 1] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each of the 2 processes: one thread (2 cores)
    main_train(to_dict(config), str(tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "sft" / "adapter" / "train_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 2
    assert (tmp_path / "out" / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_sft_then_bpo_keeps_one_generator_model_alive(dataset_dir, tmp_path):
    """Stage 2 of sft+bpo loads a fresh base model; the stage-1 model must be gone by then (2 x 15 GB for 7B).
    The monitor's classifier runs inside each stage's training loop: it counts the live Janus models there."""
    import gc

    from transformers import JanusForConditionalGeneration

    from debias.train.run import run_train

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, JanusForConditionalGeneration) for o in gc.get_objects())

    before = live()
    out = tmp_path / "run"
    seen: dict[str, list[int]] = {"sft": [], "bpo": []}

    def classify(images):
        stage = "bpo" if (out / "sft" / "adapter").is_dir() else "sft"
        seen[stage].append(live() - before)
        return torch.full((len(images), 2), 0.5)

    config = train_config(dataset_dir, method="sft+bpo", classes=["male", "female"],
                          bpo={"max_steps": 2, "learning_rate": 1e-4}, sft={"max_steps": 2},
                          monitor={"every_steps": 1, "images_per_prompt": 1, "prompts": PROMPTS[:1]})
    run_train(config, tiny_config(), out, classify=classify)
    assert seen["sft"] and seen["bpo"]
    assert set(seen["sft"]) == {1} and set(seen["bpo"]) == {1}, seen
    assert live() == before  # and none is left behind once training returns
    peaks = json.loads((out / "train_result.json").read_text())["peak_memory"]
    assert set(peaks) == {"sft", "bpo"}
    assert all(0 < p["rss_start_mib"] <= p["rss_peak_mib"] for p in peaks.values())
    assert json.loads((out / "bpo" / "memory.json").read_text()) == peaks["bpo"]


# ----------------------------------------------------------------------------- the smoke config, kill and resume


def test_resume_picks_the_last_complete_checkpoint_and_removes_incomplete_ones(tmp_path, capsys):
    from debias.train.run import last_complete_checkpoint

    stage = tmp_path / "sft"
    for step, state in ((2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, "truncated")):
        folder = stage / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if isinstance(state, dict):
            (folder / "trainer_state.json").write_text(json.dumps(state))
        elif state == "truncated":
            (folder / "trainer_state.json").write_text('{"global_st')
    (stage / "checkpoint-10").mkdir()  # killed before anything was written
    assert last_complete_checkpoint(stage, "sft") == str(stage / "checkpoint-4")
    assert sorted(p.name for p in stage.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    err = capsys.readouterr().err
    assert all(f"checkpoint-{n} is incomplete" in err for n in (6, 8, 10))
    (tmp_path / "bpo").mkdir()
    assert last_complete_checkpoint(tmp_path / "bpo", "bpo") is None


@pytest.mark.slow
def test_smoke_training_config_runs_and_a_kill_inside_a_checkpoint_save_resumes_to_the_same_adapter(tmp_path,
                                                                                                    repo_root):
    """`configs/experiments/train-smoke.yaml` with the commands its header (and the README) gives: synth, train, audit
    with the adapter; then the same training killed while it writes a checkpoint: the incomplete checkpoint is
    skipped, training resumes from the last complete one and ends with the adapter of the uninterrupted run."""
    import os
    import subprocess
    import sys

    config = str(repo_root / "configs" / "experiments" / "train-smoke.yaml")

    def cli(*args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **({"DEBIAS_CRASH_AT": crash_at} if crash_at else {})}
        # Run where the config's relative paths (train.dataset: runs/train-smoke-synth/dataset) point into tmp_path.
        return subprocess.run([sys.executable, "-m", "debias.cli", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path)

    for args in (("synth", "--config", config, "--out", "runs/train-smoke-synth", "--quiet"),
                 ("train", "--config", config, "--out", "runs/train-smoke"),
                 ("audit", "--config", config, "--out", "runs/train-smoke-after", "--adapter",
                  "runs/train-smoke/bpo/adapter", "--quiet")):
        done = cli(*args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    runs = tmp_path / "runs"
    final = runs / "train-smoke" / "bpo" / "adapter"
    assert json.loads((final / "train_info.json").read_text())["global_step"] == 4
    assert json.loads((runs / "train-smoke-after" / "metrics.json").read_text())["run"]["generator"]["adapter"]

    killed = cli("train", "--config", config, "--out", "runs/killed", crash_at="train:checkpoint-4")
    assert killed.returncode == 137
    sft = runs / "killed" / "sft"
    assert (sft / "checkpoint-2" / "trainer_state.json").is_file()
    assert (sft / "checkpoint-4").is_dir() and not (sft / "checkpoint-4" / "trainer_state.json").exists()
    assert not (sft / "adapter").exists()

    resumed = cli("train", "--config", config, "--out", "runs/killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-4 is incomplete" in resumed.stderr
    history = json.loads((sft / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    expected, got = _load_adapter_weights(final), _load_adapter_weights(runs / "killed" / "bpo" / "adapter")
    assert expected.keys() == got.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
