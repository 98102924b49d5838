"""The ``train:`` section of an experiment config (see ``configs/experiments/train-*.yaml``).

Every field is declared with :func:`generators.config.option`, so ``from_dict`` rejects unknown keys and wrong types
with the dotted key, and ``debias config --explain`` lists the help texts. Stage defaults follow the paper's code
(arXiv 2502.03429): LoRA r 32, alpha 32, dropout 0.1 on q,k,v,o,gate,up,down of the language model; SFT lr 1e-4,
cosine, warmup 0.03; BPO beta 1, lr 8e-7, continuing the SFT adapter, no SFT term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from generators.config import ConfigError, option, to_dict

METHODS = ("sft", "bpo", "sft+bpo", "freq", "sft+freq", "dpo", "sft+dpo", "align", "sft+align")
# Which methods each kind of generator trains: image-token models (Janus, Emu3) and diffusion pipelines.
TOKEN_METHODS = ("sft", "bpo", "sft+bpo", "freq", "sft+freq")
DIFFUSION_METHODS = ("sft", "bpo", "sft+bpo", "dpo", "sft+dpo", "align", "sft+align")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _positive(key: str, value: float, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"config key '{key}': must be {'>' if strict else '>='} 0, got {value}")


@dataclass
class LoraOptions:
    """LoRA adapter on the language model (the only trained weights)."""

    r: int = option(32, help="LoRA rank")
    alpha: int = option(32, help="LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.1, help="dropout on the LoRA input")
    target_modules: list[str] = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="names of the linear layers that get LoRA (matched as the last part of the module name)",
    )
    scope: str = option(
        "language_model",
        help="only modules inside a submodule of this name get LoRA (keeps the vision encoder, VQ model and "
             "generation head frozen and adapter-free); empty = anywhere",
    )

    def __post_init__(self):
        _positive("train.lora.r", self.r)
        _positive("train.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'train.lora.dropout': must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("config key 'train.lora.target_modules': list at least one module name, e.g. q_proj")


@dataclass
class StageOptions:
    """Optimiser schedule and length of one training stage."""

    learning_rate: float = option(1e-4, help="peak learning rate")
    lr_scheduler: str = option("cosine", help=f"learning-rate schedule: {', '.join(SCHEDULERS)}")
    warmup_ratio: float = option(0.03, help="fraction of the steps spent warming the learning rate up")
    epochs: float = option(1.0, help="passes over the stage's data (ignored when max_steps > 0)")
    max_steps: int = option(-1, help="optimiser steps of the stage; -1 = use epochs")

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.learning_rate", self.learning_rate)
        if self.lr_scheduler not in SCHEDULERS:
            from generators.config import did_you_mean

            raise ConfigError(
                f"config key '{prefix}.lr_scheduler': {self.lr_scheduler!r} is not one of {list(SCHEDULERS)}"
                f"{did_you_mean(self.lr_scheduler, SCHEDULERS)}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"config key '{prefix}.warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")
        _positive(f"{prefix}.epochs", self.epochs)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"config key '{prefix}.max_steps': must be -1 (use epochs) or > 0, got {self.max_steps}")


@dataclass
class SFTOptions(StageOptions):
    """Stage 1: maximise log p(image tokens | NEUTRAL prompt) on the balanced data set."""

    def __post_init__(self):
        self.check("train.sft")


@dataclass
class BPOOptions(StageOptions):
    """Stage 2: the balanced preference loss on pairs of different groups for the same neutral prompt."""

    learning_rate: float = option(8e-7, help="peak learning rate (paper's code: 8e-7)")
    loss: Literal["bpo", "dpo", "ipo"] = option(
        "bpo", help="bpo (balanced preference, no reference) or, for comparison, dpo / ipo with the stage's initial "
                    "model as reference"
    )
    beta: float = option(1.0, help="scale of the log-odds (bpo) or implicit-reward (dpo, ipo) difference")
    prefer: list[str] = option(
        default_factory=list,
        help="dpo/ipo only: groups in order of preference (in a pair, the earlier group is the chosen image); "
             "empty = in each pair the image the reference finds less likely is chosen (lifts the rarer group)",
    )

    def __post_init__(self):
        self.check("train.bpo")
        _positive("train.bpo.beta", self.beta)


@dataclass
class FreqOptions(StageOptions):
    """On-policy group-frequency objective (see ``debias.losses.reweighted_likelihood_loss``)."""

    max_steps: int = option(100, help="optimiser steps (each samples batch_size fresh images per device)")
    target: list[float] = option(
        default_factory=list, help="target share of each class in train.classes order; empty = uniform"
    )
    clip: float = option(5.0, help="weights target/share are clipped to [1/clip, clip]")
    decay: float = option(
        0.9, help="per-update decay of the running per-prompt class counts: lower tracks the model faster (less "
                  "overshoot at high learning rates) but is noisier; 1 = never forget"
    )
    prior: float = option(0.5, help="pseudo-count added to every class when estimating shares")
    init_samples: int = option(16, help="images per prompt sampled before training to seed the share estimate")
    baseline: bool = option(True, help="subtract 1 from the weights (variance reduction, zero gradient at target)")
    prompts: list[str] = option(
        default_factory=list, help="neutral training prompts; empty = the distinct prompts of train.dataset"
    )
    seed_offset: int = option(1_000_000, help="first sampling seed (kept away from audit seeds)")

    def __post_init__(self):
        self.check("train.freq")
        if self.clip < 1:
            raise ConfigError(f"config key 'train.freq.clip': must be >= 1, got {self.clip}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"config key 'train.freq.decay': must be in (0, 1], got {self.decay}")
        _positive("train.freq.prior", self.prior)
        _positive("train.freq.init_samples", self.init_samples, strict=False)
        if any(t < 0 for t in self.target) or (self.target and abs(sum(self.target) - 1) > 1e-6):
            raise ConfigError(
                f"config key 'train.freq.target': shares must be >= 0 and sum to 1, got {self.target}"
            )


@dataclass
class MonitorOptions:
    """Sample a few neutral prompts every N steps, classify them and log their RD (needs a classifier)."""

    every_steps: int = option(0, help="log the group shares and RD every N optimiser steps; 0 = off")
    prompts: list[str] = option(
        default_factory=list, help="neutral prompts to sample; empty = up to 4 prompts of the training data"
    )
    images_per_prompt: int = option(8, help="images per prompt per check (fixed seeds, so checks are comparable)")
    attribute: str = option("group", help="name used in the logged keys, e.g. gender -> monitor/rd_gender")

    def __post_init__(self):
        _positive("train.monitor.every_steps", self.every_steps, strict=False)
        _positive("train.monitor.images_per_prompt", self.images_per_prompt)


_STAGE_HELP = ("keys of DiffusionTrainConfig (debias/train/diffusion.py: lr, steps, batch_size, rank, beta, ...) "
               "for the {} stage, over train.diffusion.shared")


@dataclass
class DiffusionStages:
    """The stages of a DIFFUSION pipeline's training (generator backend diffusers or a subclass, e.g. lab-sd).

    Each stage section holds keys of :class:`debias.train.diffusion.DiffusionTrainConfig` (lr, steps, batch_size,
    rank, beta, ...), laid over ``shared``; ``debias train`` sets ``objective`` (the stage name), ``dataset``
    (train.dataset), ``output_dir`` (the stage folder) and ``init_adapter`` (train.init_adapter for the first stage,
    then the previous stage's adapter) itself. Checked when training plans the run, before anything is written.
    """

    shared: dict[str, Any] = option(
        default_factory=dict, help="DiffusionTrainConfig keys for every stage (e.g. resolution, lora_target, rank, "
                                   "alpha, batch_size, mixed_precision, seed); a stage's own keys win")
    sft: dict[str, Any] = option(default_factory=dict, help=_STAGE_HELP.format("sft (denoising loss)"))
    bpo: dict[str, Any] = option(default_factory=dict, help=_STAGE_HELP.format("bpo (balanced preference)"))
    dpo: dict[str, Any] = option(default_factory=dict, help=_STAGE_HELP.format("dpo (Diffusion-DPO, comparison)"))
    align: dict[str, Any] = option(
        default_factory=dict, help=_STAGE_HELP.format("align (distributional alignment, Shen et al. 2024; it uses "
                                                      "the experiment's classifier section as its classifier)"))


@dataclass
class TrainConfig:
    """How to fine-tune the generator's language model (LoRA) to remove demographic bias."""

    method: str = option(
        "sft+bpo", help=f"what to train: {', '.join(METHODS)} (stages run in order, each continuing the last adapter)"
    )
    dataset: str = option(
        "", help="balanced data set folder written by datasets' save_to_disk (e.g. by `debias synth`); "
                 "needed by sft and bpo, and by freq when train.freq.prompts is empty"
    )
    attributes: list[str] = option(
        default_factory=list, help="use only rows of these attributes (e.g. [gender]); empty = all"
    )
    min_confidence: float = option(0.0, help="drop rows whose classifier confidence is below this")
    use_weights: bool = option(
        True, help="SFT weighs each row by the data set's 'weight' column when it has one (synth balance: reweight)"
    )
    classes: list[str] = option(
        default_factory=list,
        help="class names in the order the classifier returns them (needed by freq and the monitor)",
    )
    classifier: str = option(
        "", help="'module:function' building the classify callable from the experiment config dict "
                 "(used by `debias train` for freq and the monitor); empty = none"
    )
    init_adapter: str | None = option(
        None, help="PEFT adapter folder to continue from; default: generator.adapter if set, else a new adapter"
    )
    lora: LoraOptions = option(default_factory=LoraOptions, help="the LoRA adapter")
    sft: SFTOptions = option(default_factory=SFTOptions, help="stage 1: supervised fine-tuning on balanced data")
    bpo: BPOOptions = option(default_factory=BPOOptions, help="stage 2: balanced preference optimisation")
    freq: FreqOptions = option(default_factory=FreqOptions, help="on-policy group-frequency objective")
    monitor: MonitorOptions = option(default_factory=MonitorOptions, help="periodic RD check while training")
    diffusion: DiffusionStages = option(
        default_factory=DiffusionStages, help="diffusion pipelines only: the sft / bpo / dpo stage settings (keys of "
                                              "DiffusionTrainConfig); lora, sft, bpo, freq above are for token models")
    batch_size: int = option(8, help="examples per device per micro-batch (bpo: pairs; freq: sampled images)")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimiser step")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", help="mixed precision of the forward/backward (bf16 / fp16 autocast; weights stay in generator.dtype)"
    )
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass to save memory")
    optim: str = option("adamw_torch", help="transformers optimizer name (adamw_torch, adafactor, ...)")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    seed: int = option(0, help="seed of the adapter initialisation and data order")
    logging_steps: int = option(10, help="log the loss every N optimiser steps")
    report_to: list[str] = option(
        default_factory=lambda: ["none"], help="logging integrations: none, tensorboard, wandb, mlflow, ..."
    )
    save_steps: int = option(500, help="write a resumable checkpoint every N steps")
    save_total_limit: int = option(2, help="checkpoints kept per stage")
    resume: bool = option(
        True, help="re-running continues: stages whose adapter exists are skipped, the others resume from their "
                   "latest checkpoint"
    )
    resume_from_checkpoint: str | None = option(
        None, help="checkpoint folder to resume the first unfinished stage from (default: its latest checkpoint)"
    )
    num_processes: int = option(1, help="processes (devices) to train on; > 1 re-launches under accelerate launch")
    accelerate_config: str | None = option(
        None, help="accelerate config: a name in configs/accelerate (single-gpu, multi-gpu-ddp, deepspeed-zero2, "
                   "fsdp) or a YAML path; setting it launches through `accelerate launch`"
    )
    output_dir: str = option("", help="run folder for checkpoints and adapters when no --out is given")

    def __post_init__(self):
        if self.method not in METHODS:
            from generators.config import did_you_mean

            raise ConfigError(
                f"config key 'train.method': {self.method!r} is not one of {list(METHODS)}"
                f"{did_you_mean(self.method, METHODS)}"
            )
        _positive("train.batch_size", self.batch_size)
        _positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("train.logging_steps", self.logging_steps)
        _positive("train.save_steps", self.save_steps)
        _positive("train.save_total_limit", self.save_total_limit)
        _positive("train.num_processes", self.num_processes)
        _positive("train.max_grad_norm", self.max_grad_norm)
        _positive("train.weight_decay", self.weight_decay, strict=False)
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"config key 'train.min_confidence': must be in [0, 1], got {self.min_confidence}")
        if self.freq.target and self.classes and len(self.freq.target) != len(self.classes):
            raise ConfigError(
                f"config key 'train.freq.target': {len(self.freq.target)} shares for {len(self.classes)} classes "
                f"({self.classes}); give one share per class"
            )

    @property
    def stages(self) -> list[str]:
        """The stages of :attr:`method`, in training order."""
        return self.method.split("+")

    @property
    def needs_dataset(self) -> bool:
        """Whether :attr:`dataset` must be given (sft, bpo, or freq without its own prompts)."""
        return any(s in ("sft", "bpo") for s in self.stages) or ("freq" in self.stages and not self.freq.prompts)

    @property
    def needs_classifier(self) -> bool:
        """Whether training needs a classify callable (freq, or the monitor switched on)."""
        return "freq" in self.stages or self.monitor.every_steps > 0

    def stage_options(self, stage: str) -> StageOptions:
        """The options section of a stage name (``sft``, ``bpo``, ``freq``)."""
        return {"sft": self.sft, "bpo": self.bpo, "freq": self.freq}[stage]


# TrainConfig keys of the token-model trainers, and the DiffusionTrainConfig key that does the same for diffusion.
TOKEN_ONLY = {
    "lora": "rank / alpha / dropout / lora_target", "sft": "train.diffusion.sft", "bpo": "train.diffusion.bpo",
    "freq": None, "monitor": None, "classifier": None, "classes": None, "attributes": None, "use_weights": None,
    "batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "precision": "mixed_precision",
    "gradient_checkpointing": None, "optim": None, "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "seed": "seed", "min_confidence": "min_confidence", "logging_steps": None,
    "report_to": None,
}


def check_method(train: TrainConfig, diffusion: bool, backend: str) -> None:
    """The method and sections fit the kind of generator; keys of the other kind's trainer are refused, not
    silently ignored.

    Raises:
        ConfigError: naming the key and the fix.
    """
    from generators.config import did_you_mean

    methods = DIFFUSION_METHODS if diffusion else TOKEN_METHODS
    kind = f"a diffusion pipeline (backend '{backend}')" if diffusion else f"an image-token model (backend '{backend}')"
    if train.method not in methods:
        fix = "use train.bpo.loss: dpo for DPO on a token model" if train.method.endswith("dpo") else \
            f"choose one of {list(methods)}{did_you_mean(train.method, methods)}"
        raise ConfigError(f"config key 'train.method': {train.method!r} does not train {kind}; {fix}")
    if not diffusion:
        if to_dict(train.diffusion) != to_dict(type(train.diffusion)()):
            raise ConfigError(f"config key 'train.diffusion' is for diffusion pipelines; {kind} trains with "
                              "train.lora / train.sft / train.bpo: remove train.diffusion")
        return
    default = to_dict(TrainConfig())
    given = to_dict(train)
    for key, instead in TOKEN_ONLY.items():
        if given[key] != default[key]:
            where = (f"set {instead} in train.diffusion.shared or train.diffusion.<stage>" if instead and "." not in
                     instead else f"use {instead}" if instead else "diffusion training has no such setting")
            raise ConfigError(f"config key 'train.{key}' is for image-token models and {kind} ignores it; remove it "
                              f"({where})")
