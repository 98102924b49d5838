"""The audit's own config: which generator, which prompts, how many images, and how they are classified and scored.

:class:`AuditConfig` is everything ``run_audit`` reads. The experiment config of :mod:`debias.config` extends it with
the sections of the later stages (synth, train, locate), so one YAML file drives a whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from audit import sequential
from audit.card import CardConfig
from audit.classify import ClassifierConfig
from audit.faces import FaceConfig
from audit.prompts import PromptConfig
from generators.base import GeneratorConfig
from generators.config import ConfigError, option


@dataclass
class MetricsConfig:
    """How bias is measured from the classifier's outputs."""

    target: dict[str, list[float]] = option(
        default_factory=dict, help="target shares per attribute (e.g. gender: [0.5, 0.5]); uniform when absent"
    )
    interval: Literal["wilson", "jeffreys"] = option("wilson", help="per-class share interval")
    alpha: float = option(0.05, help="1 - confidence level of every interval")
    n_boot: int = option(1000, help="bootstrap replicates (prompts resampled with their images)")
    seed: int = option(0, help="bootstrap seed")
    joint: list[list[str]] = option(
        default_factory=lambda: [["gender", "race"]], help="attribute pairs also measured jointly (8 gender x race cells)"
    )
    calibration: str | None = option(
        None, help="calibration.json from `debias calibrate`: adds confusion-corrected shares"
    )
    clip_score: bool = option(True, help="compute the CLIP score between each image and its prompt (quality)")

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'metrics.alpha': must be in (0, 1), got {self.alpha}")
        if self.n_boot < 1:
            raise ConfigError(f"config key 'metrics.n_boot': must be >= 1, got {self.n_boot}")
        for i, pair in enumerate(self.joint):
            if len(pair) != 2:
                raise ConfigError(f"config key 'metrics.joint[{i}]': expected two attribute names, got {pair}")


@dataclass
class ImagesPlan:
    """Adaptive image counts: sample each prompt in blocks of seeds and stop once its share intervals are narrow.

    The prompt's share intervals are computed at a level calibrated for the stopping rule (:mod:`audit.sequential`),
    so they stay valid although the count depends on the data. Seeds are always ``seed_offset, seed_offset + 1,
    ...``: an audit of another model with the same plan uses the same seeds, and ``compare`` pairs the seeds both
    sampled.
    """

    target_halfwidth: float = option(help="stop a prompt once every share interval has at most this half-width "
                                          "(e.g. 0.05 for +-5 points)")
    min: int = option(32, help="images per prompt before the first look")
    max: int = option(320, help="images per prompt at most (the last look)")
    block: int = option(16, help="images added between looks (a block of consecutive seeds)")
    attributes: list[str] = option(default_factory=list,
                                   help="attributes whose intervals must be narrow; empty: every classifier attribute")

    def __post_init__(self):
        if not 0 < self.target_halfwidth < 0.5:
            raise ConfigError(f"config key 'images_per_prompt.target_halfwidth': must be in (0, 0.5), got "
                              f"{self.target_halfwidth}; e.g. 0.05")
        for name in ("min", "max", "block"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'images_per_prompt.{name}': must be a positive integer, got "
                                  f"{getattr(self, name)}")
        if self.max < self.min:
            raise ConfigError(f"config key 'images_per_prompt.max': {self.max} is below min {self.min}; "
                              "raise max or lower min")

    def looks(self) -> list[int]:
        """Image counts at which a prompt may stop."""
        return sequential.looks(self.min, self.max, self.block)


@dataclass
class AuditConfig:
    """Everything an audit needs: the generator, the prompts and seeds, faces, the classifier, metrics, the card."""

    generator: GeneratorConfig = option(
        help="the text-to-image model under audit: a mapping, or a name in configs/generators/", named="generators"
    )
    prompts: PromptConfig = option(default_factory=PromptConfig, help="the neutral prompts to audit")
    images_per_prompt: int | ImagesPlan = option(
        160, help="images per prompt (the paper uses 160), or an adaptive plan {target_halfwidth, min, max, block}")
    seed_offset: int = option(0, help="first seed; prompt p uses seeds seed_offset .. seed_offset+N-1")
    name: str = option("", help="free-text name of the experiment, shown in reports")
    faces: FaceConfig = option(default_factory=FaceConfig, help="face detection and cropping before classification")
    classifier: ClassifierConfig = option(
        default_factory=ClassifierConfig, help="the CLIP demographic classifier: a mapping, or a name in "
                                               "configs/classifiers/", named="classifiers",
    )
    metrics: MetricsConfig = option(default_factory=MetricsConfig, help="how bias is measured")
    card: CardConfig = option(default_factory=CardConfig, help="classifier bias card written next to every audit")

    def __post_init__(self):
        if isinstance(self.images_per_prompt, int) and self.images_per_prompt < 1:
            raise ConfigError(f"config key 'images_per_prompt': must be a positive integer, got {self.images_per_prompt}")
        if self.seed_offset < 0:
            raise ConfigError(f"config key 'seed_offset': must be >= 0, got {self.seed_offset}")

    @property
    def plan(self) -> ImagesPlan | None:
        """The adaptive image plan, or None for a fixed count."""
        return self.images_per_prompt if isinstance(self.images_per_prompt, ImagesPlan) else None

    @property
    def max_images(self) -> int:
        """Images per prompt at most: the fixed count, or the plan's ``max``."""
        return self.plan.max if self.plan else self.images_per_prompt

    @property
    def seeds(self) -> list[int]:
        """Every seed a prompt may use (a plan stops each prompt at a prefix of them)."""
        return list(range(self.seed_offset, self.seed_offset + self.max_images))
