"""Entry point of ``debias train``: train in-process on one device, or re-launch under ``accelerate launch``.

``main_train`` reads the experiment YAML (``generator:`` and ``train:`` sections), applies overrides, and

* trains in this process (:func:`debias.train.run.run_train`) when ``train.num_processes`` is 1 and no
  ``train.accelerate_config`` is named, or when it already runs under a launcher (``accelerate launch``, ``torchrun``);
* otherwise checks the inputs here (so a bad config fails before any process starts) and runs
  ``accelerate launch --config_file configs/accelerate/<name>.yaml --num_processes N -m debias.train.launch ...``,
  which calls ``main_train`` again in every process.

Without a GPU, two processes work with the ``multi-gpu-ddp`` config (torchrun + gloo on the CPU); accelerate's
``--cpu --num_processes 2`` silently runs one process, so it is not used.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from debias.train.config import TrainConfig
from generators.config import ConfigError, UserError, from_dict, load_yaml

CHILD_ENV = "DEBIAS_TRAIN_LAUNCHED"


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Experiment data with ``overrides`` applied (a copy).

    Keys are dotted paths from the YAML root (``train.sft.max_steps``, ``generator.device``); a key whose first part
    is not a section of the file but is a ``train`` field (``method``, ``dataset``, ...) means ``train.<key>``.
    ``None`` values are ignored (unset CLI flags); dict values are merged into the section.
    """
    import dataclasses

    data = copy.deepcopy(data)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        parts = key.split(".")
        if parts[0] not in data and parts[0] in train_fields:
            parts = ["train", *parts]
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section (it holds {child!r})")
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return data


def load_train_configs(config_path: str | Path, overrides: dict | None = None):
    """``(data, TrainConfig, GeneratorConfig)`` from an experiment YAML plus overrides, strictly validated."""
    from generators.base import GeneratorConfig

    data = apply_overrides(load_yaml(config_path), overrides)
    if "generator" not in data:
        raise ConfigError(f"config file '{config_path}': the 'generator' section is required (the model to train)")
    if isinstance(data["generator"], str):  # a name in configs/generators/ or a YAML path, as in every experiment
        from debias.config import named_section

        data["generator"] = named_section("generators", data["generator"])
    generator = from_dict(GeneratorConfig, data["generator"], prefix="generator")
    train = from_dict(TrainConfig, data.get("train") or {}, prefix="train")
    return data, train, generator


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


def build_classifier(train: TrainConfig, data: dict):
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


def launch_command(train: TrainConfig, config_path: str | Path, out: str | Path, overrides: dict | None) -> list[str]:
    """The ``accelerate launch ... -m debias.train.launch ...`` command line for this training."""
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
        "-m", "debias.train.launch", "--config", str(Path(config_path).resolve()), "--out", str(Path(out).resolve()),
        "--overrides", json.dumps(overrides or {}),
    ]


def main_train(config_path: str, out: str | None, overrides: dict) -> None:
    """Train as the experiment config's ``train:`` section says (the ``debias train`` command).

    Args:
        config_path: experiment YAML with ``generator:`` and ``train:`` sections.
        out: run folder; ``None`` uses ``train.output_dir``.
        overrides: dotted keys -> values applied to the YAML first (see :func:`apply_overrides`).

    Raises:
        UserError: on bad input (before any process starts or anything is written), or when the launched
            processes exit with a user error.
        RuntimeError: when the launched processes fail otherwise.
    """
    from debias.train.run import plan_training, run_train

    data, train, generator = load_train_configs(config_path, overrides)
    out = out or train.output_dir
    if not out:
        raise UserError("no run folder: pass --out or set config key 'train.output_dir'")
    distributed = train.num_processes > 1 or train.accelerate_config is not None
    if not distributed or under_launcher():
        run_train(train, generator, out, classify=build_classifier(train, data))
        return

    # Check here what can be checked without loading the model, so bad input fails before processes start.
    # The classifier is only imported here (each process builds its own); a stand-in marks it as available.
    factory = _classifier_factory(train) if train.classifier else None
    plan_training(train, generator, out, classify=factory, load_model=False)
    command = launch_command(train, config_path, out, overrides)
    env = {**os.environ, CHILD_ENV: "1"}
    rc = subprocess.run(command, env=env).returncode
    if rc == 2:
        raise UserError("training under accelerate launch stopped on bad input (see the messages above)")
    if rc != 0:
        raise RuntimeError(f"training under accelerate launch failed with exit code {rc}: {' '.join(command)}")


def main(argv: list[str] | None = None) -> int:
    """``python -m debias.train.launch --config C --out O [--overrides JSON]`` (what ``accelerate launch`` runs)."""
    parser = argparse.ArgumentParser(prog="python -m debias.train.launch", description=main.__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--out", default=None, help="run folder")
    parser.add_argument("--overrides", default="{}", help="JSON object of dotted config keys")
    args = parser.parse_args(argv)
    try:
        main_train(args.config, args.out, json.loads(args.overrides))
    except UserError as err:
        print(f"debias train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
