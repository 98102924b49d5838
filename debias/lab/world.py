"""The lab world's definition: its config (``configs/lab/world.yaml``), captions and word-level tokenizers.

The world is a set of occupations with planted demographics (:class:`OccupationSpec`); the renderer
(:mod:`generators.lab.render`) draws people, and captions name an occupation and optionally a gender and a skin tone
(race class). Everything else in :mod:`debias.lab` (VQ, Janus and CLIP training, verification) reads a
:class:`WorldConfig`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from generators.config import ConfigError, from_dict, load_yaml, option
from generators.lab.render import GENDERS, OCCUPATIONS, RACES
from generators.resources import configs_dir

DEFAULT_CONFIG = configs_dir() / "lab" / "world.yaml"
IMAGE_SIZE = 32
NUM_PATCHES = 8  # 8 x 8 = 64 image tokens
FORMS = ("neutral", "gender", "race", "joint")

# --------------------------------------------------------------------------------------------------- config


@dataclass
class OccupationSpec:
    """Planted demographics of one occupation (what neutral prompts draw images from)."""

    p_female: float = option(help="planted probability that a neutral image of this occupation shows a female")
    race: dict[str, float] = option(help="planted tone (race) shares: White, Black, Indian, Asian; sum 1")

    def __post_init__(self):
        if not 0.0 <= self.p_female <= 1.0:
            raise ConfigError(f"config key 'occupations.*.p_female': must be in [0, 1], got {self.p_female}")
        if set(self.race) != set(RACES):
            raise ConfigError(f"config key 'occupations.*.race': give exactly the classes {list(RACES)}, "
                              f"got {sorted(self.race)}")
        if any(v < 0 for v in self.race.values()) or abs(sum(self.race.values()) - 1.0) > 1e-6:
            raise ConfigError(f"config key 'occupations.*.race': shares must be >= 0 and sum to 1, got {self.race}")


@dataclass
class CaptionSpec:
    """Caption forms of the Janus training data."""

    neutral: str = option("A photo of the face of a {occupation}, a person", help="neutral prompt template")
    explicit: str = option("A photo of the face of a {occupation}, a {group}",
                           help="explicit-demographic template; {group} is e.g. 'female', 'Black', 'Black female'")
    mix: dict[str, float] = option(default_factory=lambda: {"neutral": 0.4, "gender": 0.2, "race": 0.2,
                                                            "joint": 0.2},
                                   help="relative share of the caption forms neutral, gender, race, joint")
    dropout: float = option(0.1, help="share of captions dropped to the unconditional CFG row")

    def __post_init__(self):
        bad = set(self.mix) - set(FORMS)
        if bad or not self.mix or any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ConfigError(f"config key 'captions.mix': keys must be among {list(FORMS)} with non-negative "
                              f"weights, got {self.mix}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'captions.dropout': must be in [0, 1), got {self.dropout}")
        for key, tpl, need in (("neutral", self.neutral, ("{occupation}",)),
                               ("explicit", self.explicit, ("{occupation}", "{group}"))):
            for n in need:
                if n not in tpl:
                    raise ConfigError(f"config key 'captions.{key}': {tpl!r} lacks {n}")


@dataclass
class UnderstandingSpec:
    """Questions the text head learns to answer (the understanding probe), with planted answer shares."""

    questions: dict[str, str] = option(default_factory=dict, help="attribute -> question template with {occupation}")
    answers: dict[str, dict[str, float]] = option(default_factory=dict,
                                                  help="attribute -> {answer word: planted probability}")

    def __post_init__(self):
        if set(self.questions) != set(self.answers):
            raise ConfigError("config key 'understanding': questions and answers must name the same attributes, "
                              f"got {sorted(self.questions)} and {sorted(self.answers)}")
        for k, a in self.answers.items():
            if any(v < 0 for v in a.values()) or abs(sum(a.values()) - 1) > 1e-6:
                raise ConfigError(f"config key 'understanding.answers.{k}': shares must sum to 1, got {a}")


@dataclass
class VQSpec:
    """The JanusVQVAE image tokenizer and its training."""

    codebook_size: int = option(256, help="number of codebook entries")
    embed_dim: int = option(8, help="codebook vector size")
    base_channels: int = option(32, help="VQ conv width (>= 32 and a multiple of 32: GroupNorm 32)")
    channel_multiplier: list[int] = option(default_factory=lambda: [1, 1, 2],
                                           help="per-level width multipliers; 3 levels = 32 px / 8 = 8x8 tokens")
    latent_channels: int = option(32, help="channels of the latent before quant_conv")
    steps: int = option(400, help="training steps")
    batch_size: int = option(32, help="renders per step")
    lr: float = option(2e-3, help="Adam learning rate (cosine decay)")
    commitment: float = option(0.25, help="commitment loss weight (beta)")
    dead_code_every: int = option(25, help="reset codes unused in the last this-many steps to encoder outputs")
    pool_per_cell: int = option(100, help="renders tokenised per (occupation, gender, race) cell for LM training")
    local: bool = option(True, help="zero and freeze the VQ's attention and token-level residual branches, so each "
                                    "token describes its own patch (a token stream the tiny LM can model)")

    def __post_init__(self):
        if self.base_channels < 32 or self.base_channels % 32:
            raise ConfigError(f"config key 'vq.base_channels': must be a multiple of 32, got {self.base_channels}")
        if NUM_PATCHES * 2 ** (len(self.channel_multiplier) - 1) != IMAGE_SIZE:
            levels = int(math.log2(IMAGE_SIZE // NUM_PATCHES)) + 1
            raise ConfigError(f"config key 'vq.channel_multiplier': needs {levels} levels to map {IMAGE_SIZE} px to "
                              f"{NUM_PATCHES}x{NUM_PATCHES} tokens, got {self.channel_multiplier}")


@dataclass
class LMSpec:
    """The Janus language model and its training."""

    hidden_size: int = option(128, help="language model width")
    num_layers: int = option(4, help="language model layers")
    num_heads: int = option(4, help="attention heads")
    intermediate_size: int = option(256, help="MLP width")
    vision_hidden_size: int = option(32, help="understanding vision tower width (1 layer)")
    steps: int = option(3000, help="training steps")
    batch_size: int = option(32, help="(caption, image) rows per step")
    lr: float = option(2e-3, help="AdamW peak learning rate (linear warmup, cosine decay)")
    warmup: int = option(50, help="warmup steps")
    qa_every: int = option(8, help="one question-answer batch every this many steps (0: no understanding training)")
    qa_batch_size: int = option(16, help="rows per question-answer batch")


@dataclass
class ClipSpec:
    """The tiny CLIP classifier and its training."""

    hidden_size: int = option(64, help="width of both towers")
    num_layers: int = option(2, help="layers of both towers")
    num_heads: int = option(4, help="attention heads")
    intermediate_size: int = option(128, help="MLP width")
    projection_dim: int = option(64, help="joint embedding size")
    steps: int = option(400, help="training steps")
    batch_size: int = option(128, help="images per step")
    lr: float = option(2e-3, help="AdamW peak learning rate")
    captions: list[str] = option(default_factory=lambda: ["a photo of a {gender}"],
                                 help="caption forms; {gender}, {race}, {occupation} are filled in")


@dataclass
class ClassifierSpec:
    """Zero-shot classification of one attribute with the lab CLIP."""

    classes: list[str] = option(help="class words")
    templates: list[str] = option(help="prompt templates with {} for the class word (the builder picks the best)")
    candidates: list[str] = option(default_factory=list, help="templates the builder measures and chooses from")


@dataclass
class VerifySpec:
    """How the builder checks the built world."""

    n_per_occupation: int = option(100, help="images sampled per neutral prompt")
    n_explicit: int = option(24, help="images per explicit prompt (adherence)")
    guidance_scales: list[float] = option(default_factory=lambda: [1.0, 2.0, 4.0],
                                          help="CFG scales to measure the neutral shares at (1 = no CFG)")
    n_clip_eval: int = option(512, help="fresh renders for the CLIP / VQ evaluation")
    n_generator_own: int = option(2000, help="images per occupation for the generator's own shares (sampled and "
                                             "classified as the audit does, on seeds apart from the audit's)")


@dataclass
class DiffusionSpec:
    """The diffusion lab world (``--world diffusion``): a tiny Stable Diffusion pipeline and its training."""

    vae_channels: list[int] = option(default_factory=lambda: [16, 32, 32],
                                     help="AutoencoderKL block widths; 3 levels map 32 px to 8x8 latents")
    latent_channels: int = option(4, help="VAE latent channels (SD's 4)")
    vae_steps: int = option(300, help="VAE training steps")
    vae_batch_size: int = option(32, help="renders per VAE step")
    vae_lr: float = option(2e-3, help="VAE Adam learning rate (cosine decay)")
    vae_kl: float = option(1e-4, help="KL weight of the VAE loss (small: a sharp decoder; non-zero: a smooth latent)")
    pool_per_cell: int = option(64, help="renders encoded per (occupation, gender, race) cell for UNet training")
    unet_channels: list[int] = option(default_factory=lambda: [32, 64], help="UNet block widths (8x8 -> 4x4)")
    attention_head_dim: int = option(8, help="UNet attention head size")
    steps: int = option(1200, help="UNet training steps")
    batch_size: int = option(64, help="(caption, latent) rows per UNet step")
    lr: float = option(1e-3, help="UNet AdamW peak learning rate (linear warmup, cosine decay)")
    warmup: int = option(50, help="UNet warmup steps")
    ema: float = option(0.995, help="EMA decay of the UNet weights that are saved (0: no EMA)")
    train_timesteps: int = option(1000, help="DDPM training timesteps")
    beta_schedule: str = option("linear", help="DDPM beta schedule (diffusers name)")
    sampler: str = option("EulerAncestralDiscreteScheduler",
                          help="diffusers scheduler class saved in the pipeline for sampling (from the DDPM config)")
    verify_steps: int | None = option(None, help="denoising steps of the build's verification (None: those of "
                                                 "configs/generators/lab-sd.yaml; --quick uses fewer)")

    def __post_init__(self):
        if len(self.vae_channels) != 3 or any(c % 16 for c in self.vae_channels):
            raise ConfigError("config key 'diffusion.vae_channels': give 3 widths (32 px -> 8x8 latents), each a "
                              f"multiple of 16 (GroupNorm 16), got {self.vae_channels}")
        if len(self.unet_channels) < 1 or any(c % 16 for c in self.unet_channels):
            raise ConfigError(f"config key 'diffusion.unet_channels': widths must be multiples of 16 (GroupNorm 16), "
                              f"got {self.unet_channels}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"config key 'diffusion.ema': must be in [0, 1), got {self.ema}")


@dataclass
class WorldConfig:
    """Everything that defines the lab world (configs/lab/world.yaml)."""

    seed: int = option(1234, help="seed of every random choice of the build")
    occupations: dict[str, OccupationSpec] = option(default_factory=dict, help="planted demographics per occupation")
    captions: CaptionSpec = option(default_factory=CaptionSpec, help="caption forms")
    understanding: UnderstandingSpec = option(default_factory=UnderstandingSpec, help="understanding QA")
    vq: VQSpec = option(default_factory=VQSpec, help="VQ tokenizer")
    janus: LMSpec = option(default_factory=LMSpec, help="Janus language model")
    clip: ClipSpec = option(default_factory=ClipSpec, help="CLIP classifier")
    classifier: dict[str, ClassifierSpec] = option(default_factory=dict, help="zero-shot classification per attribute")
    verify: VerifySpec = option(default_factory=VerifySpec, help="verification")
    diffusion: DiffusionSpec = option(default_factory=DiffusionSpec, help="the diffusion world (--world diffusion)")
    quick: dict[str, Any] = option(default_factory=dict, help="overrides applied by --quick (deep-merged)")

    def __post_init__(self):
        if not self.occupations:
            raise ConfigError("config key 'occupations': give at least one occupation")
        bad = [o for o in self.occupations if o not in OCCUPATIONS]
        if bad:
            raise ConfigError(f"config key 'occupations': {bad} cannot be rendered; the renderer knows "
                              f"{list(OCCUPATIONS)}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_world_config(path: str | Path | None = None, quick: bool = False) -> WorldConfig:
    """Read a world config (default ``configs/lab/world.yaml``), applying its ``quick`` overrides if asked.

    Args:
        path: YAML file; ``None`` uses the repository's ``configs/lab/world.yaml``.
        quick: deep-merge the file's ``quick`` section over the rest (the reduced CI world).

    Returns:
        The validated :class:`WorldConfig`.

    Raises:
        ConfigError: on an unknown key, a wrong type or an invalid value, naming the key.
    """
    data = load_yaml(path or DEFAULT_CONFIG)
    if quick:
        data = _deep_merge(data, data.get("quick") or {})
    return from_dict(WorldConfig, data)


# ----------------------------------------------------------------------------------------------- captions


def group_words(gender: str | None = None, race: str | None = None) -> str:
    """The group word(s) that replace "person" in an explicit prompt, e.g. ``"Black female"``."""
    return " ".join(w for w in (race, gender) if w)


def caption(cfg: WorldConfig, occupation: str, gender: str | None = None, race: str | None = None) -> str:
    """The paper-template caption: neutral without attributes, explicit (``..., a Black female``) otherwise."""
    if gender is None and race is None:
        return cfg.captions.neutral.format(occupation=occupation)
    return cfg.captions.explicit.format(occupation=occupation, group=group_words(gender, race))


def janus_words(cfg: WorldConfig) -> list[str]:
    """Every word the Janus tokenizer needs: caption words, question/answer words and the tiny-model base words."""
    from generators.tiny import BASE_WORDS, prompt_words

    texts = []
    for o in cfg.occupations:
        texts.append(caption(cfg, o))
        texts += [caption(cfg, o, gender=g, race=r) for g in (*GENDERS, None) for r in (*RACES, None)]
        texts += [q.format(occupation=o) for q in cfg.understanding.questions.values()]
    for answers in cfg.understanding.answers.values():
        texts += list(answers)
    return [*BASE_WORDS, *prompt_words(texts)]


def janus_tokenizer(cfg: WorldConfig):
    """The word-level Janus tokenizer (``generators.tiny.word_tokenizer``) over :func:`janus_words`."""
    from generators.tiny import word_tokenizer

    return word_tokenizer(janus_words(cfg))


def clip_words(cfg: WorldConfig) -> list[str]:
    """Lower-cased words of every CLIP caption and zero-shot prompt the world uses."""
    from generators.tiny import prompt_words

    def strip(t):  # drop {placeholders}: their fillers are added below
        return re.sub(r"\{\w*\}", " ", t)

    texts = [strip(c) for c in (*cfg.clip.captions, cfg.captions.neutral, cfg.captions.explicit)]
    for spec in cfg.classifier.values():
        texts += [strip(t) for t in [*spec.templates, *spec.candidates]] + list(spec.classes)
    texts += [*GENDERS, *RACES, *cfg.occupations, "person"]
    return [w for w in prompt_words(texts) if w.isalpha()]


def clip_tokenizer(words: Sequence[str]):
    """A ``CLIPTokenizer`` that maps each of ``words`` to one token and any other text to byte-level pieces.

    It extends :func:`generators.tiny.byte_clip_tokenizer` (256 byte symbols, their end-of-word forms and
    ``<|startoftext|>`` / ``<|endoftext|>``) with BPE merge chains that assemble each word. Unknown words still
    tokenise (to characters), so CLIP scores of arbitrary prompts are defined. Pooling: ``<|endoftext|>`` is also
    the pad token, and the text config names its id as ``eos_token_id`` (not 2), so ``CLIPTextModel`` pools the
    first end-of-text position, i.e. the real end of the caption.
    """
    from transformers import CLIPTokenizer

    from generators.tiny import byte_clip_tokenizer

    vocab = dict(byte_clip_tokenizer().get_vocab())
    merges: list[tuple[str, str]] = []

    def add_chain(pieces: list[str]):
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in merges_set:
                merges.append((cur, p))
                merges_set.add((cur, p))
            cur = cur + p
            vocab.setdefault(cur, len(vocab))

    merges_set: set[tuple[str, str]] = set()
    words = sorted({w.lower() for w in words if w.isalpha() and w.isascii()}, key=lambda w: (-len(w), w))
    for w in words:
        if len(w) > 1:
            add_chain([*w[:-1], w[-1] + "</w>"])
    # Merge chains can collide (a pair from one chain occurs inside another word); append repair chains, at the
    # lowest priority, that join whatever pieces such a word still splits into, until every word is one token.
    for _ in range(10):
        tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)
        split = {w: tok.tokenize(w) for w in words}
        bad = {w: p for w, p in split.items() if len(p) > 1}
        if not bad:
            return tok
        for pieces in bad.values():
            add_chain(pieces)
    raise RuntimeError(f"clip_tokenizer: could not make single tokens of {sorted(bad)}")


# ------------------------------------------------------------------------------------------ shared by training


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def random_attrs(n: int, rng: np.random.Generator, occupations: Sequence[str]) -> dict[str, np.ndarray]:
    """Uniform gender, race and occupation indices (into the renderer's lists) for ``n`` renders."""
    return dict(gender=rng.integers(0, len(GENDERS), n), race=rng.integers(0, len(RACES), n),
                occupation=np.array([OCCUPATIONS.index(o) for o in rng.choice(list(occupations), n)]))
