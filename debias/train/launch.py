"""Entry point of ``debias train``: train in-process on one device, or re-launch under ``accelerate launch``.

``main_train`` takes the resolved experiment (``generator:`` and ``train:`` sections; the CLI reads the YAML and its
``--set`` overrides), and

* trains in this process (:func:`debias.train.run.run_train`) when ``train.num_processes`` is 1 and no
  ``train.accelerate_config`` is named, or when it already runs under a launcher (``accelerate launch``, ``torchrun``);
* otherwise checks the inputs here (so a bad config fails before any process starts) and runs
  ``accelerate launch --config_file configs/accelerate/<name>.yaml --num_processes N -m debias.train.launch ...``,
  which calls ``main_train`` again in every process on the same resolved config (a JSON file).

Without a GPU, two processes work with the ``multi-gpu-ddp`` config (torchrun + gloo on the CPU); accelerate's
``--cpu --num_processes 2`` silently runs one process, so it is not used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from debias.train.config import TrainConfig
from generators.base import GeneratorConfig
from generators.config import ConfigError, UserError, from_dict

CHILD_ENV = "DEBIAS_TRAIN_LAUNCHED"


def train_sections(data: Mapping[str, Any]) -> tuple[TrainConfig, GeneratorConfig]:
    """The ``train:`` and ``generator:`` sections of a resolved experiment (``to_dict`` of the experiment config)."""
    if not isinstance(data.get("generator"), Mapping):
        raise ConfigError("config key 'generator' is required: the model to train (a mapping or a name in "
                          "configs/generators/)")
    return (from_dict(TrainConfig, data.get("train") or {}, prefix="train"),
            from_dict(GeneratorConfig, data["generator"], prefix="generator"))


def _audit_classifier(data: Mapping[str, Any]):
    """The experiment's ``classifier:`` section as the audit builds it."""
    from audit.classify import ClassifierConfig, ClipClassifier

    return ClipClassifier(from_dict(ClassifierConfig, data.get("classifier") or {}, prefix="classifier"))


def resolve_accelerate_config(name: str) -> Path:
    """A named config of ``configs/accelerate`` (``multi-gpu-ddp``) or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    from generators.resources import config_names, configs_dir

    named = configs_dir() / "accelerate" / f"{name.removesuffix('.yaml')}.yaml"
    if named.is_file():
        return named
    available = config_names("accelerate")
    from generators.config import did_you_mean

    raise ConfigError(
        f"config key 'train.accelerate_config': {name!r} is neither a YAML file nor one of {available}"
        f"{did_you_mean(name, available)}"
    )


def build_classifier(train: TrainConfig, data: Mapping[str, Any]):
    """The classify callable named by ``train.classifier`` (``'module:function'``, called with the experiment data)."""
    if not train.classifier:
        return None
    return _classifier_factory(train)(data)


def _classifier_factory(train: TrainConfig):
    module, _, attr = train.classifier.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"config key 'train.classifier': cannot import {train.classifier!r} ({err}); give 'module:function'"
        ) from None


def under_launcher() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` (or the re-launched child)."""
    return bool(os.environ.get(CHILD_ENV)) or "LOCAL_RANK" in os.environ


def launch_command(train: TrainConfig, resolved: str | Path, out: str | Path) -> list[str]:
    """The ``accelerate launch ... -m debias.train.launch ...`` command line for this training.

    Args:
        train: The ``train:`` section (processes, accelerate config, precision).
        resolved: JSON file of the resolved experiment every process reads (so all of them train on exactly the
            config the parent validated).
        out: The run folder.
    """
    config_file = resolve_accelerate_config(train.accelerate_config or (
        "multi-gpu-ddp" if train.num_processes > 1 else "single-gpu"))
    # The accelerate of this interpreter's environment first (a venv not on PATH), then PATH, then the module.
    exe = Path(sys.executable).parent / "accelerate"
    found = str(exe) if exe.is_file() else shutil.which("accelerate")
    accelerate = [found, "launch"] if found else [sys.executable, "-m", "accelerate.commands.launch"]
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[train.precision]
    return [
        *accelerate, "--config_file", str(config_file), "--num_processes", str(train.num_processes),
        "--mixed_precision", precision,
        "-m", "debias.train.launch", "--resolved", str(Path(resolved).resolve()), "--out", str(Path(out).resolve()),
    ]


def main_train(data: Mapping[str, Any], out: str | None) -> None:
    """Train as the experiment's ``train:`` section says (the ``debias train`` command).

    Args:
        data: The resolved experiment config as plain data (``to_dict`` of :class:`debias.config.ExperimentConfig`,
            named sections and ``--set`` overrides applied); the ``train.classifier`` factory receives it.
        out: run folder; ``None`` uses ``train.output_dir``.

    Raises:
        UserError: on bad input (before any process starts or anything is written), or when the launched
            processes exit with a user error.
        RuntimeError: when the launched processes fail otherwise.
    """
    from debias.train.diffusion_stages import is_diffusion, plan_diffusion, run_diffusion_stages
    from debias.train.run import plan_training, run_train

    train, generator = train_sections(data)
    out = out or train.output_dir
    if not out:
        raise UserError("no run folder: pass --out or set config key 'train.output_dir'")
    # The generator's kind picks the trainer: diffusion pipelines (backend diffusers or a subclass, e.g. lab-sd)
    # train their UNet / text encoder in an accelerate loop, image-token models their language model on TRL.
    diffusion = is_diffusion(generator)
    # The alignment stage classifies its samples with the experiment's (audit's) classifier.
    align_classifier = _audit_classifier(data) if diffusion and "align" in train.stages else None
    distributed = train.num_processes > 1 or train.accelerate_config is not None
    if not distributed or under_launcher():
        if diffusion:
            run_diffusion_stages(train, generator, out, align_classifier)
        else:
            run_train(train, generator, out, classify=build_classifier(train, data))
        return

    # Check here what can be checked without loading the model, so bad input fails before processes start.
    # The classifier is only imported here (each process builds its own); a stand-in marks it as available.
    if diffusion:
        plan_diffusion(train, generator, out, align_classifier)
    else:
        factory = _classifier_factory(train) if train.classifier else None
        plan_training(train, generator, out, classify=factory, load_model=False)
    with tempfile.TemporaryDirectory(prefix="debias-train-") as tmp:
        resolved = Path(tmp) / "experiment.json"
        resolved.write_text(json.dumps(dict(data), default=str))
        command = launch_command(train, resolved, out)
        rc = subprocess.run(command, env={**os.environ, CHILD_ENV: "1"}).returncode
    if rc == 2:
        raise UserError("training under accelerate launch stopped on bad input (see the messages above)")
    if rc != 0:
        raise RuntimeError(f"training under accelerate launch failed with exit code {rc}: {' '.join(command)}")


def main(argv: list[str] | None = None) -> int:
    """``python -m debias.train.launch --resolved JSON --out O`` (what ``accelerate launch`` runs in each process)."""
    parser = argparse.ArgumentParser(prog="python -m debias.train.launch", description=main.__doc__)
    parser.add_argument("--resolved", required=True, help="JSON file of the resolved experiment config")
    parser.add_argument("--out", default=None, help="run folder")
    args = parser.parse_args(argv)
    try:
        main_train(json.loads(Path(args.resolved).read_text()), args.out)
    except UserError as err:
        print(f"debias train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
