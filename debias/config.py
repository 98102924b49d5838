"""The experiment config: one YAML file per experiment, one section per stage (see configs/experiments/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from audit.card import CardConfig
from audit.classify import ClassifierConfig
from audit.faces import FaceConfig
from audit.prompts import PromptConfig
from audit.run import MetricsConfig
from debias.locate.run import LocateConfig
from debias.synth import SynthConfig
from debias.train.config import TrainConfig
from generators.base import GeneratorConfig
from generators.config import ConfigError, from_dict, load_yaml, option
from generators.resources import named_config


@dataclass
class ExperimentConfig:
    """Everything one run needs; each command reads the sections it uses."""

    generator: GeneratorConfig = option(help="the text-to-image model under audit")
    prompts: PromptConfig = option(default_factory=PromptConfig, help="the neutral prompts to audit")
    images_per_prompt: int = option(160, help="images per prompt (the paper uses 160)")
    seed_offset: int = option(0, help="first seed; prompt p uses seeds seed_offset .. seed_offset+N-1")
    name: str = option("", help="free-text name of the experiment, shown in reports")
    faces: FaceConfig = option(default_factory=FaceConfig, help="face detection and cropping before classification")
    classifier: ClassifierConfig = option(default_factory=ClassifierConfig, help="the CLIP demographic classifier")
    metrics: MetricsConfig = option(default_factory=MetricsConfig, help="how bias is measured")
    card: CardConfig = option(default_factory=CardConfig, help="classifier bias card written next to every audit")
    synth: SynthConfig = option(default_factory=SynthConfig, help="balanced training data made by the generator")
    train: TrainConfig = option(default_factory=TrainConfig, help="LoRA fine-tuning of the language model")
    locate: LocateConfig = option(default_factory=LocateConfig, help="probes that locate where the bias comes from")

    def __post_init__(self):
        if self.images_per_prompt < 1:
            raise ConfigError(f"config key 'images_per_prompt': must be a positive integer, got {self.images_per_prompt}")
        if self.seed_offset < 0:
            raise ConfigError(f"config key 'seed_offset': must be >= 0, got {self.seed_offset}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_offset, self.seed_offset + self.images_per_prompt))


def named_section(kind: str, value):
    """A section given as a name in ``configs/<kind>/`` or a YAML path is replaced by that file's mapping."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    return load_yaml(path if path.is_file() else named_config(kind, value))


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read an experiment YAML, apply top-level ``overrides`` (from CLI flags), validate strictly.

    ``generator:`` and ``classifier:`` may name a file in ``configs/generators/`` / ``configs/classifiers/``.
    """
    data = load_yaml(path)
    for key, kind in (("generator", "generators"), ("classifier", "classifiers")):
        if key in data:
            data[key] = named_section(kind, data[key])
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(ExperimentConfig, data)
