"""The audit's own config: which generator, which prompts, how many images, and how they are classified and scored.

:class:`AuditConfig` is everything ``run_audit`` reads. The experiment config of :mod:`debias.config` extends it with
the sections of the later stages (synth, train, locate), so one YAML file drives a whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

from audit import sequential
from audit.card import CardConfig
from audit.classify import ClassifierConfig
from audit.faces import FaceConfig
from audit.prompts import PromptConfig
from generators.base import MAX_SEED, GeneratorConfig, check_range
from generators.config import ConfigError, UserError, did_you_mean, option

MAX_IMAGES_PER_PROMPT = 1_000_000  # a typo beyond this would materialise billions of seeds before failing
MAX_BOOT = 1_000_000


@dataclass
class MetricsConfig:
    """How bias is measured from the classifier's outputs."""

    target: dict[str, list[float]] = option(
        default_factory=dict, help="target shares per attribute (e.g. gender: [0.5, 0.5]); uniform when absent"
    )
    interval: Literal["wilson", "jeffreys"] = option("wilson", help="per-class share interval")
    alpha: float = option(0.05, help="1 - confidence level of every interval")
    n_boot: int = option(1000, help="bootstrap replicates of every aggregate interval (prompts resampled with their "
                                    "images)")
    seed: int = option(0, help="bootstrap seed")
    joint: list[list[str]] | None = option(
        None, help="attribute pairs also measured jointly, e.g. [[gender, race]] (8 cells); default: gender x race "
                   "when the classifier has both"
    )
    calibration: str | None = option(
        None, help="calibration.json from `debias calibrate`: adds confusion-corrected shares"
    )
    clip_score: bool = option(True, help="compute the CLIP score between each image and its prompt (quality)")

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'metrics.alpha': must be in (0, 1), got {self.alpha}")
        check_range("metrics.n_boot", self.n_boot, 1, MAX_BOOT)
        for i, pair in enumerate(self.joint or []):
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ConfigError(f"config key 'metrics.joint[{i}]': expected two different attribute names, "
                                  f"got {pair}")

    def joint_pairs(self, attributes: Iterable[str]) -> list[tuple[str, str]]:
        """The attribute pairs measured jointly, given the classifier's attributes.

        Raises:
            ConfigError: for a pair in ``metrics.joint`` naming an attribute the classifier does not have (the
                default pair is left out instead when the classifier lacks gender or race).
        """
        names = list(attributes)
        if self.joint is None:
            return [("gender", "race")] if {"gender", "race"} <= set(names) else []
        for i, pair in enumerate(self.joint):
            for name in pair:
                if name not in names:
                    raise ConfigError(f"config key 'metrics.joint[{i}]': the classifier has no attribute {name!r}"
                                      f"{did_you_mean(name, names)}; its attributes: {', '.join(names)}")
        return [(a, b) for a, b in self.joint]

    def check(self, classes: Mapping[str, Sequence[str]]) -> None:
        """Check the settings that depend on the classifier's attributes (``classes``: attribute -> class names)
        before anything is sampled: joint pairs, target shares (one per class, >= 0, summing to 1) and the
        calibration file (readable, with the same classes).

        Raises:
            ConfigError / UserError: naming the key, the bad value and the fix.
        """
        from audit.calibrate import load_calibration

        sizes = {name: len(c) for name, c in classes.items()}
        for a, b in self.joint_pairs(classes):
            sizes[f"{a}_{b}"] = sizes[a] * sizes[b]
        for name, shares in self.target.items():
            key = f"metrics.target.{name}"
            if name not in sizes:
                raise ConfigError(f"config key '{key}': the classifier has no attribute {name!r}"
                                  f"{did_you_mean(name, sizes)}; attributes: {', '.join(sizes)}")
            if len(shares) != sizes[name]:
                listed = classes.get(name) or f"{sizes[name]} joint cells"
                raise ConfigError(f"config key '{key}': has {len(shares)} shares but the classifier has "
                                  f"{sizes[name]} classes ({listed}); give one share per class")
            if min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
                raise ConfigError(f"config key '{key}': shares must be >= 0 and sum to 1, got {shares} (sum "
                                  f"{sum(shares):g})")
        if self.calibration:
            try:
                load_calibration(self.calibration, classes=classes)
            except UserError as err:  # it names the file; the key tells where it came from
                raise ConfigError(f"config key 'metrics.calibration': {err}") from None


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
        check_range("images_per_prompt.max", self.max, 1, MAX_IMAGES_PER_PROMPT)

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
        if isinstance(self.images_per_prompt, int):
            if self.images_per_prompt < 1:
                raise ConfigError(f"config key 'images_per_prompt': must be a positive integer, got "
                                  f"{self.images_per_prompt}")
            check_range("images_per_prompt", self.images_per_prompt, 1, MAX_IMAGES_PER_PROMPT)
        check_range("seed_offset", self.seed_offset, 0, MAX_SEED - self.max_images + 1)

    def check(self, images: bool = False, generator: bool = True) -> list[str]:
        """Everything the audit would reject, checked before any model loads or any folder is written.

        The generator's settings, device, model folder and adapter (:func:`generators.backends.check_generator_config`;
        skipped for an audit of an image folder, ``images``, and for a generator the caller already loaded,
        ``generator=False``), the prompts and every file they name, the classifier's
        device and weights, the metrics that depend on the classifier's classes (targets, joint pairs, the
        calibration file) and the card's inputs. ``debias config --check`` runs exactly this.

        Returns:
            The prompts to audit (none for an image folder: it brings its own).

        Raises:
            ConfigError / UserError: naming the key or file, the bad value and the fix.
        """
        from audit.card import validate_card_inputs
        from generators.backends import check_generator_config

        if generator and not images:
            check_generator_config(self.generator)
        prompts = [] if images else self.prompts.neutral_prompts()  # an image folder brings its own prompts
        self.classifier.check()
        self.metrics.check({name: spec.classes for name, spec in self.classifier.attribute_specs().items()})
        validate_card_inputs(self.card, has_generator=not images)
        return prompts

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
