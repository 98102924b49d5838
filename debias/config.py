"""The experiment config: one YAML file per experiment, one section per stage (see configs/experiments/)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from audit.config import AuditConfig
from debias.locate.run import LocateConfig
from debias.synth import SynthConfig
from debias.train.config import TrainConfig
from generators.config import option, read_config
from generators.resources import config_file


@dataclass
class ExperimentConfig(AuditConfig):
    """The audit's config plus the sections of the later stages; each command reads the sections it uses."""

    synth: SynthConfig = option(default_factory=SynthConfig, help="balanced training data made by the generator")
    train: TrainConfig = option(default_factory=TrainConfig, help="LoRA fine-tuning of the language model")
    locate: LocateConfig = option(default_factory=LocateConfig, help="probes that locate where the bias comes from")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, *,
                bare: str | None = None) -> ExperimentConfig:
    """Read an experiment YAML with dotted-key ``overrides`` (``--set``) applied; validated strictly.

    Args:
        path: The YAML file, or the name of one in ``configs/experiments/`` (``lab``); ``generator:`` and
            ``classifier:`` may name a file in ``configs/generators/`` / ``configs/classifiers/``.
        overrides: Dotted keys -> values (``generator.sampling.guidance_scale``).
        bare: A section whose keys may be given without its prefix (``debias train --set method=sft`` means
            ``train.method``), for keys that are not top-level keys of the experiment.
    """
    if bare and overrides:
        top = {f.name for f in dataclasses.fields(ExperimentConfig)}
        inner = {f.name for f in dataclasses.fields(_section_type(bare))}
        overrides = {(f"{bare}.{k}" if k.split(".")[0] not in top and k.split(".")[0] in inner else k): v
                     for k, v in overrides.items()}
    return read_config(ExperimentConfig, config_file(path, "experiments", "--config"), overrides)


def _section_type(name: str) -> type:
    return typing.get_type_hints(ExperimentConfig)[name]
