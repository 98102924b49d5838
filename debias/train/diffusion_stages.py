"""``debias train`` for diffusion pipelines: the stages of ``train.method`` (sft, bpo, dpo, align), each a stage
folder.

The run folder follows :mod:`debias.train.run` (the Janus path): ``train_config.yaml``, ``<stage>/stage.json`` with
the stage's key (over the stage's settings, the data, the base model and the previous stage), ``<stage>/adapter``
(diffusers LoRA format, :func:`debias.train.diffusion.run_diffusion_train`), ``<stage>/checkpoint-N`` (resumable,
every ``train.save_steps``), ``<stage>/memory.json`` and ``train_result.json`` naming the final adapter. Re-running
skips finished stages, resumes an unfinished one from its latest complete checkpoint, and refuses a stage folder
made from another config (:func:`debias.train.run.plan_stage_folders`). Under ``accelerate launch`` every process
runs this and the accelerate loop splits the batches (:func:`debias.train.launch.main_train` re-launches).

Each stage's settings are a :class:`~debias.train.diffusion.DiffusionTrainConfig` built from
``train.diffusion.shared`` overlaid with ``train.diffusion.<stage>``; ``sft+bpo`` continues the SFT adapter in BPO.
The ``align`` stage (distributional alignment, :mod:`debias.train.align`) samples from the pipeline and needs the
audit's classifier; its identity is part of the stage key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from debias.train.config import TrainConfig, check_method  # noqa: F401 (check_method: re-exported)
from debias.train.run import (
    StagePlan, _digest, _is_main, _write_json, complete_checkpoint, plan_stage_folders, write_train_config,
)
from generators.base import GeneratorConfig, directory_hash
from generators.config import ConfigError, UserError, from_dict, to_dict

def is_diffusion(generator_config: GeneratorConfig) -> bool:
    """Whether the generator is a diffusers pipeline (backend ``diffusers`` or a subclass of its generator)."""
    from debias.train.diffusion import is_diffusers_backend

    return is_diffusers_backend(generator_config.backend)


# DiffusionTrainConfig keys `debias train` sets itself, and where the user sets what they stand for.
SET_BY_RUNNER = {
    "objective": "the stage name (train.method)",
    "dataset": "train.dataset",
    "output_dir": "--out or train.output_dir (each stage trains in OUT/<stage>)",
    "init_adapter": "train.init_adapter (the first stage; later stages continue the previous stage's adapter)",
}
def stage_config(train: TrainConfig, stage: str, init_adapter: str | None = None):
    """The :class:`~debias.train.diffusion.DiffusionTrainConfig` of one stage (shared keys, then the stage's)."""
    from debias.train.diffusion import DiffusionTrainConfig

    shared, own = dict(train.diffusion.shared), dict(getattr(train.diffusion, stage))
    for section, data in (("shared", shared), (stage, own)):
        for key in data:
            if key in SET_BY_RUNNER:
                raise ConfigError(f"config key 'train.diffusion.{section}.{key}' is set by `debias train` from "
                                  f"{SET_BY_RUNNER[key]}; remove it")
    merged = {**shared, **own, "objective": stage, "dataset": train.dataset, "init_adapter": init_adapter}
    try:
        return from_dict(DiffusionTrainConfig, merged, prefix=f"train.diffusion.{stage}")
    except ConfigError as err:
        raise in_section(err, train, stage) from None


def in_section(err: UserError, train: TrainConfig, stage: str) -> UserError:
    """``err`` with the keys DiffusionTrainConfig names (``train.<key>``) pointing at the section the key came from
    (``train.diffusion.<stage>.<key>`` or ``train.diffusion.shared.<key>``; dataset stays ``train.dataset``)."""
    from debias.train.diffusion import DiffusionTrainConfig

    own, shared = getattr(train.diffusion, stage), train.diffusion.shared
    message = str(err)
    for key in (f.name for f in dataclasses.fields(DiffusionTrainConfig)):
        if key in SET_BY_RUNNER and key != "objective":
            continue
        section = stage if key in own or key not in shared else "shared"
        for old in (f"'train.{key}'", f"'train.diffusion.{stage}.{key}'"):
            message = message.replace(old, f"'train.diffusion.{section}.{key}'")
    return type(err)(message)


@dataclass
class DiffusionPlan:
    """Everything validated before anything is written (see :func:`plan_diffusion`)."""

    train: TrainConfig
    generator_config: GeneratorConfig
    out_dir: Path
    init_adapter: str | None
    configs: dict[str, Any] = field(default_factory=dict)
    stages: list[StagePlan] = field(default_factory=list)
    classifier: Any = None


def plan_diffusion(train: TrainConfig, generator_config: GeneratorConfig, out_dir: str | Path,
                   classifier=None) -> DiffusionPlan:
    """Check the train section, the generator, the data of every stage and the run folder; write nothing.

    ``classifier``: the audit's :class:`audit.classify.ClipClassifier`, required by the ``align`` stage.

    Raises:
        UserError: naming the config key, the bad value and the fix.
    """
    from debias.train.diffusion import _load_data
    from generators.backends import check_generator_config
    from generators.base import check_adapter

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out '{out_dir}' is a file; pass a folder for the training run")
    check_method(train, True, generator_config.backend)
    if not train.dataset:
        raise UserError(f"config key 'train.dataset' is required for method '{train.method}': the balanced data set "
                        "folder (e.g. DIR/dataset written by `debias synth --out DIR`)")
    check_generator_config(generator_config)
    init_adapter = train.init_adapter or generator_config.adapter
    if init_adapter:
        check_adapter(init_adapter, "train.init_adapter" if train.init_adapter else "generator.adapter",
                      generator_config.allow_pickle, peft=False)
    if train.resume_from_checkpoint and not complete_checkpoint(train.resume_from_checkpoint):
        raise UserError(f"config key 'train.resume_from_checkpoint': '{train.resume_from_checkpoint}' is not a "
                        "complete checkpoint (no readable trainer_state.json); pass a <stage>/checkpoint-N folder of "
                        "an earlier run, or leave it unset")
    plan = DiffusionPlan(train=train, generator_config=generator_config, out_dir=out_dir, init_adapter=init_adapter,
                         classifier=classifier)
    for name in ("sft", "bpo", "dpo", "align"):  # unused sections are checked too: a typo there fails now, not later
        if name in train.stages or getattr(train.diffusion, name):
            plan.configs[name] = stage_config(train, name, init_adapter)
    if "align" in train.stages:
        from debias.train.align import check_classifier, load_prompts

        try:
            check_classifier(plan.configs["align"], classifier)
            load_prompts(plan.configs["align"])
        except UserError as err:
            raise in_section(err, train, "align") from None
    for name in train.stages:
        if name == "align":
            continue  # samples on-policy: only the data set's prompts are read (above)
        try:
            _load_data(plan.configs[name])  # columns, confidence filter, pairs, preferred group
        except UserError as err:
            raise in_section(err, train, name) from None

    gen = generator_config
    previous = _digest({"model": gen.model, "revision": gen.revision, "dtype": gen.dtype, "backend": gen.backend},
                       str(Path(train.dataset).resolve()), directory_hash(init_adapter) if init_adapter else None)
    keys = []
    for name in train.stages:
        settings = {k: v for k, v in to_dict(plan.configs[name]).items()
                    if k not in ("dataset", "output_dir", "init_adapter")}
        if name == "align":
            settings["classifier"] = classifier.identity()
        previous = _digest(previous, "diffusion", name, settings)
        keys.append((name, previous))
    plan.stages = plan_stage_folders(out_dir, keys, train.resume, train.resume_from_checkpoint,
                                     lambda folder: (folder / "adapter" / "train_config.json").is_file())
    return plan


def execute_diffusion(plan: DiffusionPlan) -> Path:
    """Run the planned stages; returns the final adapter folder."""
    import gc

    from debias.train.diffusion import run_diffusion_train
    from debias.train.memory import PeakMemory

    train = plan.train
    write_train_config(plan.out_dir, train, plan.generator_config)
    # The pipeline is loaded without the adapter: a stage continues it as train.init_adapter does.
    generator = dataclasses.replace(plan.generator_config, adapter=None, merge_adapter=False)
    adapter = plan.init_adapter
    memory: dict[str, dict] = {}
    for stage in plan.stages:
        if stage.skip:
            adapter = str(stage.folder / "adapter")
            continue
        config = dataclasses.replace(plan.configs[stage.name], init_adapter=adapter)
        peak = PeakMemory(generator.device).start()
        if _is_main():
            stage.folder.mkdir(parents=True, exist_ok=True)
            _write_json(stage.folder / "stage.json", {"stage": stage.name, "key": stage.key, "init_adapter": adapter})
        adapter = str(run_diffusion_train(config, generator, stage.folder, save_steps=train.save_steps,
                                          save_total_limit=train.save_total_limit, resume_from=stage.resume_from,
                                          classifier=plan.classifier if stage.name == "align" else None))
        gc.collect()
        memory[stage.name] = peak.stop()
        if _is_main():
            _write_json(stage.folder / "memory.json", memory[stage.name])
    if _is_main():
        _write_json(plan.out_dir / "train_result.json", {"adapter": adapter, "stages": train.stages,
                                                         "peak_memory": memory, "kind": "diffusion"})
    return Path(adapter)


def run_diffusion_stages(train: TrainConfig, generator_config: GeneratorConfig, out_dir: str | Path,
                         classifier=None) -> Path:
    """Train a diffusion pipeline as ``train.method`` says (the diffusion side of :func:`debias.train.run.run_train`).

    ``classifier``: the audit's :class:`audit.classify.ClipClassifier`, required by the ``align`` stage.

    Returns:
        The final adapter folder (diffusers LoRA format; load it with ``generator.adapter`` or
        ``debias audit --adapter``).

    Raises:
        UserError: on bad input, before anything is written.
    """
    return execute_diffusion(plan_diffusion(train, generator_config, out_dir, classifier))
