"""``run_train``: validate everything, then run the configured stages in order, each continuing the last adapter.

Run folder layout (``out_dir``)::

    train_config.yaml           the resolved train + generator config
    <stage>/stage.json          what the stage is trained from (a key over config, data and the previous stage)
    <stage>/checkpoint-N/       resumable Trainer checkpoints (adapter, optimiser, scheduler, RNG)
    <stage>/adapter/            the stage's final LoRA adapter (PEFT format) + train_info.json
    <stage>/log_history.json    the Trainer's log lines; <stage>/monitor.json the RD checks (if enabled)
    <stage>/memory.json         the stage's peak memory (process RSS; CUDA max allocated on a GPU)
    train_result.json           the final adapter path, the stages run and each run stage's peak memory

Re-running with ``train.resume`` skips stages whose adapter exists (same key) and resumes the others from their
latest checkpoint; a stage folder made from a different config is an error, never silently overwritten. Adapters
are written to a temporary folder and renamed, so a crash never leaves a half-written adapter that looks finished.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from debias.train.common import Classify
from debias.train.config import TrainConfig
from debias.train.memory import PeakMemory
from generators.backends import check_generator_config
from generators.base import GeneratorConfig, check_adapter, directory_hash
from generators.config import UserError, to_dict

# Fields that do not change what a stage learns: changing them must not invalidate finished stages.
_NOT_IN_KEY = {
    "resume", "resume_from_checkpoint", "logging_steps", "report_to", "save_steps", "save_total_limit",
    "num_processes", "accelerate_config", "output_dir", "monitor", "classifier", "sft", "bpo", "freq", "method",
    "diffusion",
}


@dataclass
class StagePlan:
    name: str
    folder: Path
    key: str
    skip: bool = False
    resume_from: str | None = None


@dataclass
class TrainPlan:
    """Everything validated before anything is written (see :func:`plan_training`)."""

    train: TrainConfig
    generator_config: GeneratorConfig
    out_dir: Path
    generator: Any
    table: Any = None
    init_adapter: str | None = None
    classify: Classify | None = None
    classes: list[str] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    freq_prompts: list[str] = field(default_factory=list)
    monitor_prompts: list[str] = field(default_factory=list)
    stages: list[StagePlan] = field(default_factory=list)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _load_generator(generator_config: GeneratorConfig):
    """The generator with its base weights on the CPU (Trainer moves them); trainers need image-token scoring."""
    from generators.backends import load_generator
    from generators.base import IMAGE_TOKENS, TOKEN_SCORES, require

    gen = load_generator(dataclasses.replace(generator_config, device="cpu", adapter=None, merge_adapter=False))
    for capability in (IMAGE_TOKENS, TOKEN_SCORES):
        require(gen, capability, "`debias train` (its trainers fine-tune an image-token language model)")
    return gen


def complete_checkpoint(path: str | Path) -> bool:
    """Whether a Trainer checkpoint folder was saved to the end: the Trainer writes ``trainer_state.json`` last
    (after the weights, optimizer, scheduler and RNG states), so a readable one marks a complete save."""
    from audit.store import read_json

    state = read_json(Path(path) / "trainer_state.json")
    return isinstance(state, dict) and "global_step" in state


def last_complete_checkpoint(folder: Path, stage: str) -> str | None:
    """The latest complete ``checkpoint-N`` of a stage folder; incomplete ones (a kill during the save) are removed
    with a note on stderr, so neither this resume nor a later one picks them."""
    from audit.store import say

    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    for path in found:
        if complete_checkpoint(path):
            return str(path)
        say(f"stage '{stage}': {path} is incomplete (the run stopped while saving it); removing it")
        shutil.rmtree(path, ignore_errors=True)
    return None



def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_training(train: TrainConfig, generator_config: GeneratorConfig, out_dir: str | Path,
                  classify: Classify | None = None, load_model: bool = True) -> TrainPlan:
    """Check every input and the run folder, load the generator and data; write nothing.

    ``load_model=False`` (the launching process) skips the checks that need the model's weights.

    Raises:
        UserError: naming the config key, the bad value and the fix.
    """
    from debias.train.data import check_tokens, columns, load_balanced_dataset, select_rows
    from debias.train.config import check_method
    from debias.train.diffusion import is_diffusers_backend
    from generators.sequence import unwrap

    if is_diffusers_backend(generator_config.backend):
        raise UserError(f"generator backend '{generator_config.backend}' is a diffusion pipeline: train it with "
                        "debias.train.diffusion_stages.run_diffusion_stages (what `debias train` runs for it)")
    check_method(train, False, generator_config.backend)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out '{out_dir}' is a file; pass a folder for the training run")
    if train.precision == "fp16":
        import torch

        if generator_config.device == "cpu" or not torch.cuda.is_available():
            raise UserError("config key 'train.precision': fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 "
                            "on the CPU")
    if train.needs_dataset and not train.dataset:
        raise UserError(
            f"config key 'train.dataset' is required for method '{train.method}': the balanced data set folder "
            "(e.g. written by `debias synth`)"
        )
    check_generator_config(generator_config)
    init_adapter = train.init_adapter or generator_config.adapter
    if init_adapter:
        check_adapter(init_adapter, "train.init_adapter" if train.init_adapter else "generator.adapter",
                      generator_config.allow_pickle)
    if train.resume_from_checkpoint and not Path(train.resume_from_checkpoint).is_dir():
        raise UserError(
            f"config key 'train.resume_from_checkpoint': '{train.resume_from_checkpoint}' does not exist; pass a "
            "<stage>/checkpoint-N folder of an earlier run, or leave it unset"
        )
    if train.resume_from_checkpoint and not complete_checkpoint(train.resume_from_checkpoint):
        raise UserError(
            f"config key 'train.resume_from_checkpoint': '{train.resume_from_checkpoint}' is incomplete (no readable "
            "trainer_state.json: the run stopped while saving it); pass an earlier checkpoint-N, or leave it unset"
        )

    table = None
    if train.dataset and (train.needs_dataset or train.monitor.every_steps):
        table = select_rows(load_balanced_dataset(train.dataset), train.attributes, train.min_confidence)
    plan = TrainPlan(train=train, generator_config=generator_config, out_dir=out_dir, generator=None, table=table,
                     init_adapter=init_adapter, classify=classify)

    if train.needs_classifier:
        if classify is None:
            raise UserError(
                f"method '{train.method}'{' and train.monitor' if train.monitor.every_steps else ''} need a "
                "classifier: set config key 'train.classifier' ('module:function') or pass classify= to run_train"
            )
        plan.classes = list(train.classes) or [str(k) for k in range(len(train.freq.target))]
        if not plan.classes:
            raise UserError(
                "config key 'train.classes' is required for freq and the monitor: the class names in the order the "
                "classifier returns them, e.g. [male, female]"
            )
        plan.target = list(train.freq.target) or [1.0 / len(plan.classes)] * len(plan.classes)
    dataset_prompts = list(dict.fromkeys(columns(table, ["prompt"])["prompt"])) if table is not None else []
    plan.freq_prompts = list(train.freq.prompts) or dataset_prompts
    plan.monitor_prompts = list(train.monitor.prompts) or (dataset_prompts or plan.freq_prompts)[:4]
    if train.monitor.every_steps and not plan.monitor_prompts:
        raise UserError("config key 'train.monitor.prompts': list the neutral prompts to check (no data set given)")

    if load_model:
        plan.generator = gen = _load_generator(generator_config)
        if table is not None:
            check_tokens(columns(table, ["tokens"])["tokens"], gen.num_image_tokens, gen.codebook_size,
                         "train.dataset")
        if not init_adapter:
            from debias.train.common import check_lora_targets

            check_lora_targets(unwrap(gen.model), train.lora)

    plan.stages = _plan_stages(plan)
    return plan


def _plan_stages(plan: TrainPlan) -> list[StagePlan]:
    train = plan.train
    base = {k: v for k, v in to_dict(train).items() if k not in _NOT_IN_KEY}
    gen = plan.generator_config
    previous = _digest(
        base, {"model": gen.model, "revision": gen.revision, "dtype": gen.dtype, "sampling": gen.sampling},
        str(Path(train.dataset).resolve()) if train.dataset else None,
        directory_hash(plan.init_adapter) if plan.init_adapter else None,
    )
    keys = []
    for name in train.stages:
        previous = _digest(previous, name, to_dict(train.stage_options(name)))
        keys.append((name, previous))
    return plan_stage_folders(plan.out_dir, keys, train.resume, train.resume_from_checkpoint,
                              lambda folder: (folder / "adapter" / "adapter_config.json").is_file())


def plan_stage_folders(out_dir: Path, keys: list[tuple[str, str]], resume: bool, explicit: str | None,
                       finished) -> list[StagePlan]:
    """The stage folders ``out_dir/<stage>`` of a run, each keyed by what it is trained from (``keys``: stage name
    and key, in order): a finished stage (``finished(folder)``) is skipped, an unfinished one resumes from
    ``explicit`` (the first unfinished one only) or its latest complete checkpoint; a folder made from another key
    is an error, never overwritten. Shared by the Janus and the diffusion trainers."""
    from audit.store import read_json

    stages = []
    for name, key in keys:
        folder = out_dir / name
        stage = StagePlan(name=name, folder=folder, key=key)
        stamp = folder / "stage.json"
        if stamp.is_file():
            saved = read_json(stamp)
            recorded = saved.get("key") if isinstance(saved, dict) else None
            if recorded is None:
                raise UserError(f"--out '{out_dir}': '{stamp}' is unreadable, so what stage '{name}' was trained "
                                f"from is unknown; delete '{folder}' to retrain it, or pass a new --out")
            if recorded != key:
                raise UserError(
                    f"--out '{out_dir}': stage '{name}' there was trained from a different config or data "
                    f"(key {recorded} != {key}); pass a new --out, or delete '{folder}' to retrain it"
                )
        # Only trained outputs count (checkpoints, the adapter): under several processes the main one may already
        # have written stage.json while the others are still planning.
        trained = folder.is_dir() and any(p.name.startswith("checkpoint-") or p.name == "adapter"
                                          for p in folder.iterdir())
        if trained and not resume:
            raise UserError(
                f"--out '{out_dir}': stage '{name}' already has outputs and config key 'train.resume' is false; "
                "pass a new --out or set train.resume: true"
            )
        if finished(folder):
            stage.skip = True
        elif explicit:
            stage.resume_from, explicit = explicit, None
        elif folder.is_dir():
            stage.resume_from = last_complete_checkpoint(folder, name)
        stages.append(stage)
    return stages


def _training_args(config_cls, plan: TrainPlan, stage: StagePlan, **extra):
    train = plan.train
    options = train.stage_options(stage.name)
    return config_cls(
        output_dir=str(stage.folder),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        bf16=train.precision == "bf16",
        fp16=train.precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        optim=train.optim,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        report_to=list(train.report_to),
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        use_cpu=plan.generator_config.device == "cpu",
        ddp_find_unused_parameters=False,  # every LoRA weight is on the image-token path
        dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(),
        **extra,
    )


def _policy(plan: TrainPlan, adapter: str | None):
    """(generator, model, peft_config) for a stage: a base model with ``adapter`` loaded trainable.

    The first stage to run takes the planned generator and the plan lets go of it; later stages load a fresh base
    (a stage's LoRA layers are injected into its model in place). With the previous stage's model released first
    (see :func:`execute`), one generator is alive at a time: for a 7B model, 15 GB of bf16 weights, not 30.
    """
    from debias.train.common import lora_config

    gen, plan.generator = plan.generator, None
    gen = gen or _load_generator(plan.generator_config)
    if adapter:
        from peft import PeftModel

        return gen, PeftModel.from_pretrained(gen.model, adapter, is_trainable=True), None
    return gen, gen.model, lora_config(plan.train.lora)


def _build_trainer(plan: TrainPlan, stage: StagePlan, gen, model, peft_config):
    from trl import DPOConfig, SFTConfig

    from debias.train.data import bpo_pairs, sft_examples

    train = plan.train
    common = dict(processing_class=gen.tokenizer, layout=gen.layout, peft_config=peft_config)
    if stage.name == "sft":
        from debias.train.sft import ImageTokenSFTTrainer

        args = _training_args(SFTConfig, plan, stage)
        return ImageTokenSFTTrainer(model, args, sft_examples(plan.table, train.use_weights), **common)
    if stage.name == "bpo":
        from debias.train.bpo import ImageTokenBPOTrainer

        args = _training_args(DPOConfig, plan, stage, beta=train.bpo.beta)
        pairs = bpo_pairs(plan.table, order=train.bpo.prefer or None)
        return ImageTokenBPOTrainer(model, args, pairs, loss=train.bpo.loss, prefer_first=bool(train.bpo.prefer),
                                    **common)
    from debias.train.freq import ImageTokenFreqTrainer, prompt_dataset

    f = train.freq
    args = _training_args(SFTConfig, plan, stage)
    rows = prompt_dataset(plan.freq_prompts, min_rows=train.batch_size * max(1, args.world_size))
    return ImageTokenFreqTrainer(
        model, args, rows, prompts=plan.freq_prompts, classify=plan.classify, target=plan.target,
        settings=gen.settings, clip=f.clip, decay=f.decay, prior=f.prior, init_samples=f.init_samples,
        baseline=f.baseline, seed_offset=f.seed_offset, class_names=plan.classes, **common,
    )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_train_config(out_dir: Path, train: TrainConfig, generator_config: GeneratorConfig) -> None:
    """``OUT/train_config.yaml``: the resolved train + generator config of the run (main process only)."""
    import yaml

    if _is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"train": to_dict(train), "generator": to_dict(generator_config)}
        tmp = out_dir / ".train_config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, out_dir / "train_config.yaml")


def execute(plan: TrainPlan) -> Path:
    """Run the planned stages (see :func:`run_train`); returns the final adapter folder."""
    train = plan.train
    write_train_config(plan.out_dir, train, plan.generator_config)

    adapter = plan.init_adapter
    memory: dict[str, dict] = {}
    for stage in plan.stages:
        stage_adapter = stage.folder / "adapter"
        if stage.skip:
            adapter = str(stage_adapter)
            continue
        peak = PeakMemory(plan.generator_config.device).start()
        gen, model, peft_config = _policy(plan, adapter)
        if _is_main():
            stage.folder.mkdir(parents=True, exist_ok=True)
            _write_json(stage.folder / "stage.json", {"stage": stage.name, "key": stage.key, "init_adapter": adapter})
        trainer = _build_trainer(plan, stage, gen, model, peft_config)
        if train.monitor.every_steps:
            from debias.train.callbacks import GroupShareCallback

            m = train.monitor
            GroupShareCallback(
                plan.monitor_prompts, plan.classify, plan.classes, gen.layout, gen.settings, m.every_steps,
                m.images_per_prompt, m.attribute, history_path=stage.folder / "monitor.json",
            ).attach(trainer)
        result = trainer.train(resume_from_checkpoint=stage.resume_from)

        tmp = stage.folder / ".adapter.tmp"
        if trainer.is_world_process_zero() and tmp.exists():
            shutil.rmtree(tmp)
        trainer.save_model(str(tmp))  # every process: FSDP / ZeRO-3 gather the weights collectively
        if trainer.is_world_process_zero():
            # Only the trained adapter: TRL's frozen "ref" copy (dpo / ipo) is not part of the result, and the
            # pickled TrainingArguments are not shipped with it (adapters load from safetensors, never pickles).
            shutil.rmtree(tmp / "ref", ignore_errors=True)
            (tmp / "training_args.bin").unlink(missing_ok=True)
            info = {
                "stage": stage.name, "method": train.method, "key": stage.key, "init_adapter": adapter,
                "loss": train.bpo.loss if stage.name == "bpo" else stage.name,
                "global_step": trainer.state.global_step, "train_loss": result.training_loss,
                "world_size": trainer.args.world_size, "base_model": plan.generator_config.model,
            }
            _write_json(tmp / "train_info.json", info)
            if stage_adapter.exists():
                shutil.rmtree(stage_adapter)
            os.replace(tmp, stage_adapter)
            _write_json(stage.folder / "log_history.json", trainer.state.log_history)
        trainer.accelerator.wait_for_everyone()
        adapter = str(stage_adapter)
        # Release this stage's model before the next one loads its own (the trainer and callbacks form cycles).
        del trainer, model, gen
        gc.collect()
        memory[stage.name] = peak.stop()
        if _is_main():
            _write_json(stage.folder / "memory.json", memory[stage.name])

    if _is_main():
        _write_json(plan.out_dir / "train_result.json", {"adapter": adapter, "stages": train.stages,
                                                         "peak_memory": memory})
    return Path(adapter)


def run_train(train_config: TrainConfig, generator_config: GeneratorConfig, out_dir: str | Path,
              classify: Classify | None = None) -> Path:
    """Fine-tune the generator's language model with LoRA as ``train_config.method`` says, on this process.

    Stages (``sft``, ``bpo``, ``freq``) run in order; each continues the previous stage's adapter (the first
    continues ``train.init_adapter`` / ``generator.adapter`` or starts a new one). Under ``accelerate launch`` /
    ``torchrun`` every process calls this and the Trainers split the data (see :func:`debias.train.launch.main_train`
    for the re-launching entry point).

    Args:
        train_config: the ``train:`` section.
        generator_config: the ``generator:`` section (an image-token backend, e.g. janus or emu3; its ``sampling``
            settings are used for on-policy sampling and the monitor; ``device: cpu`` trains on the CPU).
        out_dir: run folder (layout in this module's docstring).
        classify: ``classify(images: list[PIL.Image]) -> (N,) class indices or (N, K) probabilities``, needed by
            ``freq`` and ``train.monitor``; a callable with ``on_tokens = True`` receives ``(N, T)`` image tokens.

    Returns:
        The final adapter folder (PEFT format; load with ``generator.adapter``).

    Raises:
        UserError: on bad input, before anything is written.
    """
    return execute(plan_training(train_config, generator_config, out_dir, classify))
