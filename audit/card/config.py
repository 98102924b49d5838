"""The card's settings (config section ``card:``) and the constants its parts share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from audit.compositional import CompositionalConfig
from generators.config import ConfigError, from_dict, option

FORMAT = "debias-classifier-card"
VERSION = 1
FILENAME = "classifier_card.json"

# Occupation pairs of the association check: (female-stereotyped, male-stereotyped).
STEREOTYPE_PAIRS: tuple[tuple[str, str], ...] = (
    ("nurse", "doctor"), ("secretary", "manager"), ("housekeeper", "homeowner"), ("receptionist", "executive"),
    ("librarian", "scientist"),
)
DEFAULT_OBJECTS = ("chair", "car", "tree", "cup", "house", "bicycle", "lamp", "book")
MAN_WOMAN = ("a photo of a man", "a photo of a woman")
BUILTIN_KINDS = ("solid", "gradient", "noise", "shapes")


@dataclass
class CardConfig:
    """The classifier bias card written next to every audit (config section ``card:``)."""

    enabled: bool = option(True, help="measure the classifier's own bias and show it in the audit report")
    person_free: Literal["auto", "builtin", "generator"] = option(
        "auto", help="person-free images: builtin (colours, gradients, noise, shapes), generator ('a photo of a "
                     "{object}' from the audited generator, plus builtin), auto (generator when it can draw objects: "
                     "not the lab world or a tiny random model)",
    )
    n_builtin: int = option(64, help="built-in person-free images (split over solid, gradient, noise, shapes)")
    objects: list[str] = option(default_factory=lambda: list(DEFAULT_OBJECTS),
                                help="objects for generated person-free images")
    object_template: str = option("a photo of a {object}", help="prompt of generated person-free images")
    images_per_object: int = option(4, help="generated images per object (seeds 0..N-1)")
    representation_prompts: list[str] = option(
        default_factory=list, help="the two prompts compared on person-free images; default 'a photo of a man' / "
                                   "'a photo of a woman' (lab world: its gender prompts)",
    )
    labelled: str | None = option(
        "auto", help="labelled faces for association bias and accuracy: a folder root/<attribute>/<class>/, a "
                     ".csv/.jsonl manifest, a datasets folder or hf:<name>; 'lab' renders lab-world people; auto: "
                     "lab for a lab-world classifier, else none",
    )
    labelled_attribute: str = option("gender", help="attribute of the association gap (its classes must include "
                                                    "female_class and male_class)")
    female_class: str = option("female", help="class of the labelled attribute the first occupation is tied to")
    male_class: str = option("male", help="the other class")
    n_labelled: int = option(64, help="lab renders per gender; cap on images per class of a labelled set")
    occupation_pairs: list[list[str]] = option(
        default_factory=list, help="[female-stereotyped, male-stereotyped] pairs; default nurse/doctor, "
                                   "secretary/manager, housekeeper/homeowner, receptionist/executive, "
                                   "librarian/scientist (lab world: pairs of its occupations)",
    )
    occupation_template: str = option("a photo of a {}", help="zero-shot prompt of an occupation ('{}')")
    warn_fraction: float = option(0.5, help="warn when the classifier's bias >= this fraction of the measured share "
                                            "deviation")
    warn_floor: float = option(0.02, help="classifier bias below this never warns")
    flag_threshold: float = option(0.2, help="card-only flag: |bias| at or above this is flagged on its own")
    cache_dir: str | None = option(None, help="extra folder caching cards by classifier identity across runs")
    alpha: float = option(0.05, help="1 - confidence level of the card's intervals")
    seed: int = option(0, help="seed of the built-in images and lab renders")
    compositional: CompositionalConfig = option(default_factory=CompositionalConfig,
                                                help="attribute-binding check (bag-of-words test)")

    def __post_init__(self):
        if isinstance(self.compositional, dict):  # built in code with a plain mapping, as from YAML
            self.compositional = from_dict(CompositionalConfig, self.compositional, prefix="card.compositional")
        for key in ("n_builtin", "images_per_object", "n_labelled"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'card.{key}': must be >= 1, got {getattr(self, key)}")
        if "{object}" not in self.object_template:
            raise ConfigError(f"config key 'card.object_template': {self.object_template!r} needs an {{object}} "
                              "placeholder, e.g. 'a photo of a {object}'")
        if self.occupation_template.count("{}") != 1:
            raise ConfigError(f"config key 'card.occupation_template': {self.occupation_template!r} needs exactly "
                              "one '{}', e.g. 'a photo of a {}'")
        if self.representation_prompts and len(self.representation_prompts) != 2:
            raise ConfigError(f"config key 'card.representation_prompts': give exactly two prompts (e.g. 'a photo "
                              f"of a man', 'a photo of a woman'), got {self.representation_prompts!r}")
        for i, pair in enumerate(self.occupation_pairs):
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ConfigError(f"config key 'card.occupation_pairs[{i}]': expected two different occupations "
                                  f"[female-stereotyped, male-stereotyped], got {pair!r}")
        if not 0 < self.warn_fraction:
            raise ConfigError(f"config key 'card.warn_fraction': must be > 0, got {self.warn_fraction}")
        if not 0 <= self.warn_floor < 1:
            raise ConfigError(f"config key 'card.warn_floor': must be in [0, 1), got {self.warn_floor}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'card.alpha': must be in (0, 1), got {self.alpha}")
        if self.female_class == self.male_class:
            raise ConfigError("config keys 'card.female_class' and 'card.male_class' must differ")

