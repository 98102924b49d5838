"""Builder of the lab world: trains a tiny Janus and a tiny CLIP on rendered people with a planted skew.

Run ``python -m debias.lab.build --out DIR [--quick] [--config configs/lab/world.yaml] [--overwrite] [--threads N]``.
The shipped world is ``generators/lab/weights`` (:data:`generators.lab.WEIGHTS`), built with ``--out generators/lab/weights --threads 2``
on an idle 2-core machine in ~12 min; ``--quick`` builds a reduced world in ~30 s for CI. On a shared, busy machine
pass ``--threads 1``: two busy-waiting torch threads then run several times slower than one.

Output layout::

    DIR/janus/        JanusForConditionalGeneration (safetensors), its word-level tokenizer and a JanusProcessor
    DIR/clip/         CLIPModel + CLIPProcessor (CLIPImageProcessorPil for 32x32 input, word-level CLIPTokenizer)
    DIR/world.yaml    the resolved config the weights were built from (with the chosen zero-shot templates)
    DIR/build_info.json  steps, losses, phase times, seed, VQ reconstruction error, CLIP zero-shot accuracy,
                      planted vs measured shares per occupation, explicit-prompt adherence, guidance effect

Stages (all seeded from ``seed`` in the config):

1. **VQ tokenizer.** The ``JanusVQVAE`` inside the Janus model is trained as an autoencoder with our own
   l2-normalised (cosine) straight-through quantiser, commitment loss and dead-code reset. The stock quantiser
   cannot be trained (it picks codes by distance to the un-normalised codebook while decode normalises them, and
   its forward decodes from indices so the encoder gets no reconstruction gradient). The trained codebook is stored
   unit-norm, so the stock ``decode_image_tokens`` (which normalises entries) reads it exactly, and even the stock
   ``vqmodel.encode`` picks the same codes as :func:`encode_images` (argmin of ``|h - c|^2`` over unit ``c`` is the
   argmax of the cosine).
2. **Image tokens.** A pool of renders per (occupation, gender, race) cell is tokenised once (64 tokens each).
3. **Tiny Janus language model** (plus the generation embedding/aligner/head) trained with teacher forcing on
   (caption, image tokens). Sequence convention (shared with ``generators/janus.py`` and the trainers)::

       input  = [<bos>] + tokens(caption) + [<begin_of_image>]  then the 64 image tokens
       batch  = left-padded with <pad>, attention 0 on the padding
       position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
       text positions: model.get_input_embeddings(); image tokens: model.prepare_embeddings_for_image_generation
       hidden state at position Lp-1+t (Lp = prompt length incl. <boi>) predicts image token t
       through model.model.generation_head

   Caption dropout (for classifier-free guidance) uses exactly the unconditional row transformers' Janus
   ``generate`` builds: ``[<bos>] + [<pad>] * len(tokens(caption)) + [<begin_of_image>]``, attention 1 on all of it.
   Optionally (``understanding``) the text head is trained to answer demographic questions about an occupation,
   through the real multimodal path with a blank white image, mostly with "unknown" (a partial-alignment world)::

       [<bos>] + [<begin_of_image>] + [<image_placeholder>] * 64 + [<end_of_image>] + tokens(question)
       + tokens(answer) + [<eos>],  pixel_values = blank white 32x32 image (all ones after mean/std 0.5)

   which is exactly ``[<bos>] + JanusProcessor(text="<image_placeholder>" + question, images=blank)`` with the
   processor saved in ``janus/``.
4. **Tiny CLIP** trained contrastively on renders and VQ reconstructions with captions that name any subset of the
   attributes (a multi-positive loss: every caption that is true of an image counts as its positive).
5. **Verification**: sample images per neutral prompt, decode, classify with the lab CLIP, compare with the planted
   shares; explicit-prompt adherence; effect of guidance; the answer distribution of the understanding questions.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch
from generators.config import ConfigError, UserError, from_dict, load_yaml, option, to_dict
from generators.resources import configs_dir

DEFAULT_CONFIG = configs_dir() / "lab" / "world.yaml"
IMAGE_SIZE = 32
NUM_PATCHES = 8  # 8 x 8 = 64 image tokens
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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


# -------------------------------------------------------------------------------------------- the models


def janus_config(cfg: WorldConfig, vocab_size: int):
    """The ``JanusConfig`` of the lab model (32 px images, 8x8 = 64 image tokens)."""
    from transformers import JanusConfig

    lm, vq = cfg.janus, cfg.vq
    return JanusConfig(
        text_config=dict(
            model_type="llama", vocab_size=vocab_size, hidden_size=lm.hidden_size,
            intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_heads, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=lm.vision_hidden_size, intermediate_size=lm.vision_hidden_size * 2, num_hidden_layers=1,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=IMAGE_SIZE // NUM_PATCHES,
            projection_dim=lm.hidden_size, num_image_tokens=NUM_PATCHES**2, mlp_ratio=2.0,
        ),
        vq_config=dict(
            embed_dim=vq.embed_dim, num_embeddings=vq.codebook_size, base_channels=vq.base_channels,
            channel_multiplier=list(vq.channel_multiplier), num_res_blocks=1, latent_channels=vq.latent_channels,
            num_patches=NUM_PATCHES, image_token_embed_dim=lm.hidden_size, projection_dim=lm.hidden_size,
        ),
        image_token_id=6,
    )


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens the sequence convention uses (bos, pad, eos, boi, eoi, image placeholder)."""
    c = tokenizer.convert_tokens_to_ids
    return dict(bos=tokenizer.bos_token_id, pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id,
                boi=c("<begin_of_image>"), eoi=c("<end_of_image>"), image=c("<image_placeholder>"))


def to_pixels(images) -> torch.Tensor:
    """Renders ``(B, H, W, 3)`` in [0, 1] (numpy or torch, or a list of PIL images) to ``(B, 3, H, W)`` in [-1, 1]."""
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not torch.is_tensor(images) else images.float()
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f"expected images of shape (B, H, W, 3) in [0, 1], got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2) * 2 - 1


def _vq_latent(vqmodel, pixels: torch.Tensor) -> torch.Tensor:
    """Unit-norm encoder latents ``(B, D, 8, 8)``."""
    return F.normalize(vqmodel.quant_conv(vqmodel.encoder(pixels)), dim=1)


@torch.no_grad()
def encode_images(model, images, batch_size: int = 256) -> torch.Tensor:
    """Tokenise images with the lab VQ: the same normalised (cosine) encode the tokenizer was trained with.

    Args:
        model: ``JanusForConditionalGeneration`` (or its ``JanusVQVAE``).
        images: ``(B, 32, 32, 3)`` in [0, 1] (numpy / torch) or a list of PIL images.
        batch_size: images per encoder forward.

    Returns:
        ``(B, 64)`` LongTensor of codebook ids (row-major over the 8x8 grid, as ``decode_image_tokens`` expects).
    """
    vq = model.model.vqmodel if hasattr(model, "model") else model
    was_training = vq.training
    vq.eval()
    codebook = F.normalize(vq.quantize.embedding.weight, dim=1)
    pixels = to_pixels(images)
    out = []
    for i in range(0, len(pixels), batch_size):
        z = _vq_latent(vq, pixels[i:i + batch_size])
        out.append(torch.einsum("bdhw,kd->bhwk", z, codebook).argmax(-1).flatten(1))
    vq.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, NUM_PATCHES**2), dtype=torch.long)


@torch.no_grad()
def decode_tokens(model, tokens: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Image tokens ``(B, 64)`` -> ``(B, 32, 32, 3)`` float images in [0, 1] via the stock ``decode_image_tokens``."""
    out = [((model.decode_image_tokens(tokens[i:i + batch_size]) + 1) / 2).clamp(0, 1)
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


def _cosine_lr(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _random_attrs(n: int, rng: np.random.Generator, occupations: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(gender=rng.integers(0, len(GENDERS), n), race=rng.integers(0, len(RACES), n),
                occupation=np.array([OCCUPATIONS.index(o) for o in rng.choice(list(occupations), n)]))


def localise_vq(vq) -> list[str]:
    """Turn the VQ's global paths into identities: zero and freeze the attention output projections and the
    second convolution of the residual blocks that run at token resolution (mid blocks, the decoder's first level).

    Why: with attention (and deep stacks at 8x8) the trained encoder spreads global attributes (skin tone, gender)
    over many tokens, background ones included, in an entangled code that the tiny language model learns slowly.
    With these branches at zero tokens are more local. Measured at an equal budget (LM bs 32 x 2400 steps, same
    seed): explicit-gender adherence 0.88 vs 0.70 and a lower image-token loss; race adherence barely changed
    (0.37 vs 0.33). The architecture is unchanged, so stock Janus code loads and decodes it.

    Returns:
        Names of the frozen parameters.
    """
    frozen = []
    targets = [vq.encoder.mid.block_1.conv2, vq.encoder.mid.block_2.conv2, vq.decoder.mid.block_1.conv2,
               vq.decoder.mid.block_2.conv2, *(blk.conv2 for blk in vq.decoder.up[0].block)]
    targets += [m.proj_out for m in vq.modules() if type(m).__name__ == "JanusVQVAEAttnBlock"]
    names = {id(p): n for n, p in vq.named_parameters()}
    for module in targets:
        for p in module.parameters():
            with torch.no_grad():
                p.zero_()
            p.requires_grad_(False)
            frozen.append(names[id(p)])
    return frozen


def train_vq(model, cfg: WorldConfig, rng: np.random.Generator, log) -> dict:
    """Train the model's ``JanusVQVAE`` as a cosine-quantised autoencoder on fresh renders; store the codebook.

    Returns:
        Training record: final reconstruction loss, codebook usage, dead codes reset.
    """
    spec = cfg.vq
    vq = model.model.vqmodel
    frozen = localise_vq(vq) if spec.local else []
    vq.train()
    # Initialise the codebook from encoder outputs of the (random) encoder, so codes start where the data is.
    with torch.no_grad():
        x = to_pixels(render_batch(256, _random_attrs(256, rng, cfg.occupations), rng))
        z0 = _vq_latent(vq, x).permute(0, 2, 3, 1).reshape(-1, spec.embed_dim)
        init = z0[torch.randperm(len(z0))[:spec.codebook_size]] + 0.01 * torch.randn(spec.codebook_size, spec.embed_dim)
    codebook = torch.nn.Parameter(F.normalize(init, dim=1))
    params = [p for n, p in vq.named_parameters() if not n.startswith("quantize.") and p.requires_grad]
    opt = torch.optim.Adam([{"params": params}, {"params": [codebook]}], lr=spec.lr)
    usage = torch.zeros(spec.codebook_size)
    resets, rec_hist = 0, []
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * _cosine_lr(step, spec.steps, 20)
        x = to_pixels(render_batch(spec.batch_size, _random_attrs(spec.batch_size, rng, cfg.occupations), rng))
        z = _vq_latent(vq, x)
        B, D, H, W = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, D)
        cb = F.normalize(codebook, dim=1)
        idx = (zf.detach() @ cb.detach().T).argmax(1)
        q = cb[idx]
        codebook_loss = ((q - zf.detach()) ** 2).sum(1).mean()
        commit_loss = ((zf - q.detach()) ** 2).sum(1).mean()
        zq = (zf + (q - zf).detach()).view(B, H, W, D).permute(0, 3, 1, 2)
        recon = vq.decoder(vq.post_quant_conv(zq))
        rec = F.mse_loss(recon, x)
        loss = rec + 0.1 * (codebook_loss + spec.commitment * commit_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx, minlength=spec.codebook_size).float()
        rec_hist.append(rec.item())
        if (step + 1) % spec.dead_code_every == 0:
            dead = (usage == 0).nonzero().flatten()
            if len(dead) and step < spec.steps * 0.9:
                # Re-seed unused codes on random current latents (jittered), the standard dead-code restart.
                with torch.no_grad():
                    pick = zf.detach()[torch.randint(0, len(zf), (len(dead),))]
                    codebook.data[dead] = F.normalize(pick + 0.02 * torch.randn_like(pick), dim=1)
                resets += len(dead)
            usage.zero_()
        if step % 100 == 0 or step == spec.steps - 1:
            log(f"vq step {step:4d}  recon mse {rec.item():.4f}  commit {commit_loss.item():.4f}")
    with torch.no_grad():
        # Stored unit-norm: stock decode normalises anyway, and stock encode then agrees with encode_images.
        vq.quantize.embedding.weight.copy_(F.normalize(codebook.detach(), dim=1))
    vq.eval()
    for p in vq.parameters():
        p.requires_grad_(True)
    return {"steps": spec.steps, "final_recon_mse_minus1_1": float(np.mean(rec_hist[-20:])),
            "dead_codes_reset": int(resets), "local": spec.local, "frozen_zero_params": len(frozen)}


# ------------------------------------------------------------------------------------- language model data


class WorldSampler:
    """Draws (caption, image tokens) training rows from the planted world, using a pre-tokenised render pool."""

    def __init__(self, cfg: WorldConfig, pool: torch.Tensor, tokenizer, rng: np.random.Generator):
        self.cfg, self.pool, self.tok, self.rng = cfg, pool, tokenizer, rng
        self.ids = special_ids(tokenizer)
        self.occupations = list(cfg.occupations)
        forms = [f for f in FORMS if cfg.captions.mix.get(f, 0) > 0]
        w = np.array([cfg.captions.mix[f] for f in forms], float)
        self.forms, self.form_p = forms, w / w.sum()
        self._cache: dict[str, list[int]] = {}

    def text_ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._cache[text]

    def planted(self, occupation: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Gender and race indices drawn from the occupation's planted distribution."""
        spec = self.cfg.occupations[occupation]
        g = (self.rng.random(n) < spec.p_female).astype(int)
        r = self.rng.choice(len(RACES), n, p=[spec.race[c] for c in RACES])
        return g, r

    def rows(self, n: int) -> tuple[list[list[int]], torch.Tensor, list[str]]:
        """``n`` prompt rows ``[bos] + text + [boi]`` (unconditional ones padded), their image tokens and forms."""
        prompts, images, forms = [], [], []
        for _ in range(n):
            o = self.occupations[self.rng.integers(len(self.occupations))]
            drop = self.rng.random() < self.cfg.captions.dropout
            # Unconditional rows draw from the neutral world, so CFG's "unconditional" is the planted marginal.
            form = "neutral" if drop else self.forms[self.rng.choice(len(self.forms), p=self.form_p)]
            g, r = (x[0] for x in self.planted(o, 1))
            if form in ("gender", "joint"):
                g = int(self.rng.integers(len(GENDERS)))
            if form in ("race", "joint"):
                r = int(self.rng.integers(len(RACES)))
            text = caption(self.cfg, o, gender=GENDERS[g] if form in ("gender", "joint") else None,
                           race=RACES[r] if form in ("race", "joint") else None)
            t = self.text_ids(text)
            if drop:
                t = [self.ids["pad"]] * len(t)
            prompts.append([self.ids["bos"], *t, self.ids["boi"]])
            cell = self.pool[OCCUPATIONS.index(o), g, r]
            images.append(cell[self.rng.integers(len(cell))])
            forms.append("uncond" if drop else form)
        return prompts, torch.stack(images), forms


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to a common length: ``(input_ids, attention_mask)`` with attention 0 on the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[bos] + tokens(prompt) + [boi]`` per prompt, left-padded: ``(input_ids, attention_mask)``."""
    ids = special_ids(tokenizer)
    rows = [[ids["bos"], *tokenizer(p, add_special_tokens=False).input_ids, ids["boi"]] for p in prompts]
    return left_pad(rows, ids["pad"])


def unconditional(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """CFG unconditional rows: every token but bos/boi replaced by pad; the attention mask stays as it was."""
    ids = special_ids(tokenizer)
    keep = (input_ids == ids["bos"]) | (input_ids == ids["boi"])
    return input_ids.masked_fill(~keep, ids["pad"])


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: ``(cumsum(mask) - 1).clamp(min=0)``."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def image_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor):
    """Teacher-forced ``(B, T, codebook)`` logits; row t scores image token t given the prompt and tokens < t."""
    text = model.get_input_embeddings()(input_ids)
    image = model.prepare_embeddings_for_image_generation(image_tokens[:, :-1])
    embeds = torch.cat([text, image.to(text.dtype)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(image_tokens[:, :-1].shape)], dim=1)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=positions(mask)).last_hidden_state
    return model.model.generation_head(hidden[:, input_ids.shape[1] - 1:])


def qa_rows(cfg: WorldConfig, tokenizer, n: int, rng: np.random.Generator):
    """Question-answer rows for the text head: ``(input_ids, attention_mask, labels)``.

    Sequence: ``[<bos>, <begin_of_image>] + [<image_placeholder>] * 64 + [<end_of_image>] + tokens(question)
    + tokens(answer) + [<eos>]``; labels cover the answer and <eos> only. The image is a blank white picture
    (:func:`blank_pixels`), fed through the real vision tower.
    """
    ids = special_ids(tokenizer)
    attrs = list(cfg.understanding.questions)
    rows, answers = [], []
    for _ in range(n):
        a = attrs[rng.integers(len(attrs))]
        o = list(cfg.occupations)[rng.integers(len(cfg.occupations))]
        opts = cfg.understanding.answers[a]
        ans = list(opts)[rng.choice(len(opts), p=np.array(list(opts.values())) / sum(opts.values()))]
        prefix = understanding_prefix(cfg, tokenizer, a, o)
        tail = [*tokenizer(ans, add_special_tokens=False).input_ids, ids["eos"]]
        rows.append(prefix + tail)
        answers.append(len(tail))
    input_ids, mask = left_pad(rows, ids["pad"])
    labels = torch.full_like(input_ids, -100)
    for i, k in enumerate(answers):
        labels[i, -k:] = input_ids[i, -k:]
    return input_ids, mask, labels


def understanding_prefix(cfg: WorldConfig, tokenizer, attribute: str, occupation: str) -> list[int]:
    """Token ids of an understanding question up to (excluding) the answer; see :func:`qa_rows`."""
    ids = special_ids(tokenizer)
    q = cfg.understanding.questions[attribute].format(occupation=occupation)
    return [ids["bos"], ids["boi"], *[ids["image"]] * NUM_PATCHES**2, ids["eoi"],
            *tokenizer(q, add_special_tokens=False).input_ids]


def blank_pixels(n: int) -> torch.Tensor:
    """``n`` blank white images as Janus pixel values (mean 0.5 / std 0.5 normalisation: all ones)."""
    return torch.ones(n, 3, IMAGE_SIZE, IMAGE_SIZE)


def train_janus(model, tokenizer, pool: torch.Tensor, cfg: WorldConfig, rng: np.random.Generator, log) -> dict:
    """Train the language model and generation modules (teacher forcing), plus the QA text head if configured."""
    spec = cfg.janus
    sampler = WorldSampler(cfg, pool, tokenizer, rng)
    trainable = [p for n, p in model.named_parameters()
                 if not n.startswith("model.vqmodel.") and not n.startswith("model.vision_model.")]
    for n, p in model.named_parameters():
        p.requires_grad_(not (n.startswith("model.vqmodel.") or n.startswith("model.vision_model.")))
    opt = torch.optim.AdamW(trainable, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses, qa_losses = [], []
    do_qa = spec.qa_every > 0 and bool(cfg.understanding.questions)
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * _cosine_lr(step, spec.steps, spec.warmup)
        prompts, images, _ = sampler.rows(spec.batch_size)
        input_ids, mask = left_pad(prompts, sampler.ids["pad"])
        logits = image_logits(model, input_ids, mask, images)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), images.reshape(-1))
        total = loss
        if do_qa and step % spec.qa_every == 0:
            q_ids, q_mask, labels = qa_rows(cfg, tokenizer, spec.qa_batch_size, rng)
            out = model(input_ids=q_ids, pixel_values=blank_pixels(len(q_ids)), attention_mask=q_mask,
                        position_ids=positions(q_mask))
            qa = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100)
            total = total + qa
            qa_losses.append(qa.item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == spec.steps - 1:
            log(f"janus step {step:4d}  image-token loss {np.mean(losses[-50:]):.4f}"
                + (f"  qa loss {np.mean(qa_losses[-10:]):.4f}" if qa_losses else ""))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": spec.steps, "batch_size": spec.batch_size,
            "final_image_token_loss": float(np.mean(losses[-50:])),
            "final_qa_loss": float(np.mean(qa_losses[-10:])) if qa_losses else None,
            "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]}


@torch.no_grad()
def sample_image_tokens(model, tokenizer, prompts: Sequence[str], guidance_scale: float = 1.0,
                        temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain sampling (top_k=0) of ``(B, 64)`` image tokens with a KV cache, following the sequence convention.

    Args:
        model: the lab ``JanusForConditionalGeneration``.
        tokenizer: its tokenizer.
        prompts: one prompt per image.
        guidance_scale: 1 disables CFG; otherwise logits are ``uncond + g * (cond - uncond)`` per step.
        temperature: softmax temperature.
        generator: torch generator for the draws.
    """
    from transformers import DynamicCache

    input_ids, mask = encode_prompts(tokenizer, prompts)
    B = len(prompts)
    cfg_on = guidance_scale != 1.0
    if cfg_on:
        input_ids = torch.cat([input_ids, unconditional(input_ids, tokenizer)])
        mask = torch.cat([mask, mask])
    lm, head = model.model.language_model, model.model.generation_head
    cache = DynamicCache()
    out = lm(inputs_embeds=model.get_input_embeddings()(input_ids), attention_mask=mask,
             position_ids=positions(mask), past_key_values=cache, use_cache=True)
    pos = positions(mask)[:, -1:]
    n_tok = model.config.vision_config.num_image_tokens
    tokens = torch.empty((B, n_tok), dtype=torch.long)
    for t in range(n_tok):
        logits = head(out.last_hidden_state[:, -1]).float()
        if cfg_on:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(-1)
        tokens[:, t] = nxt
        if t == n_tok - 1:
            break
        step_ids = nxt.repeat(2) if cfg_on else nxt
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        out = lm(inputs_embeds=model.prepare_embeddings_for_image_generation(step_ids[:, None]), attention_mask=mask,
                 position_ids=pos, past_key_values=cache, use_cache=True)
    return tokens


@torch.no_grad()
def answer_distribution(model, tokenizer, cfg: WorldConfig, attribute: str, occupation: str) -> dict[str, float]:
    """Exact next-token probabilities of the allowed answers (renormalised), plus their raw total mass."""
    ids = understanding_prefix(cfg, tokenizer, attribute, occupation)
    x = torch.tensor([ids])
    logits = model(input_ids=x, pixel_values=blank_pixels(1), attention_mask=torch.ones_like(x)).logits[0, -1]
    p = logits.float().softmax(-1)
    opts = list(cfg.understanding.answers[attribute])
    mass = {a: float(p[tokenizer(a, add_special_tokens=False).input_ids[0]]) for a in opts}
    total = sum(mass.values())
    return {**{a: m / total for a, m in mass.items()}, "_mass_on_options": total}


# -------------------------------------------------------------------------------------------------- CLIP


def clip_pixels(images: np.ndarray) -> torch.Tensor:
    """``(B, 32, 32, 3)`` images in [0, 1] to CLIP pixel values, as ``CLIPImageProcessorPil`` does at 32 px."""
    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def make_clip(cfg: WorldConfig, tokenizer):
    """A seeded tiny ``CLIPModel`` (32 px, patch 4) and its ``CLIPProcessor``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    s = cfg.clip
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=s.projection_dim),
        vision_config=dict(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                           num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, image_size=IMAGE_SIZE,
                           patch_size=4, projection_dim=s.projection_dim),
        projection_dim=s.projection_dim,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _clip_caption(cfg: WorldConfig, form: str, g: int, r: int, o: int) -> tuple[str, tuple[int, int, int]]:
    """Fill a caption form; also return which attributes it names (-1 = not named)."""
    named = ("{gender}" in form or "{group}" in form, "{race}" in form, "{occupation}" in form)
    text = form.format(gender=GENDERS[g], race=RACES[r], occupation=OCCUPATIONS[o])
    return text, (g if named[0] else -1, r if named[1] else -1, o if named[2] else -1)


def train_clip(model, tokenizer, cfg: WorldConfig, rng: np.random.Generator, recon_bank, log) -> dict:
    """Contrastive training with multi-positive targets: a caption is a positive of every image it is true of.

    Half of each batch are fresh renders, half VQ reconstructions (``recon_bank``: images and attribute indices),
    so the classifier also works on what the generator decodes.
    """
    s = cfg.clip
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.05)
    model.train()
    losses = []
    bank_x, bank_a = recon_bank
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr * _cosine_lr(step, s.steps, 20)
        n_fresh = s.batch_size // 2
        a = _random_attrs(n_fresh, rng, cfg.occupations)
        fresh = render_batch(n_fresh, a, rng)
        pick = rng.integers(0, len(bank_x), s.batch_size - n_fresh)
        imgs = np.concatenate([fresh, bank_x[pick]])
        attrs = np.concatenate([np.stack([a["gender"], a["race"], a["occupation"]], 1), bank_a[pick]])
        texts, named = [], []
        for g, r, o in attrs:
            t, nm = _clip_caption(cfg, s.captions[rng.integers(len(s.captions))], g, r, o)
            texts.append(t)
            named.append(nm)
        named_t = torch.tensor(named)
        attrs_t = torch.as_tensor(attrs)
        # consistent[i, j]: caption j is true of image i (every attribute it names matches).
        consistent = ((named_t[None] == -1) | (named_t[None] == attrs_t[:, None])).all(-1).float()
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=clip_pixels(imgs))
        logits = out.logits_per_image
        li = -(consistent / consistent.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        lt = -(consistent.T / consistent.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = (li + lt) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == s.steps - 1:
            log(f"clip step {step:4d}  loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return {"steps": s.steps, "batch_size": s.batch_size, "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def zero_shot(model, tokenizer, images: np.ndarray, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``(N, K)`` zero-shot class probabilities (text embeddings averaged over templates, as in CLIP)."""
    texts = [t.format(c) for c in classes for t in templates]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    te = F.normalize(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
                     .pooler_output, dim=-1)
    te = F.normalize(te.view(len(classes), len(templates), -1).mean(1), dim=-1)
    probs = []
    for i in range(0, len(images), 512):
        ie = F.normalize(model.get_image_features(pixel_values=clip_pixels(images[i:i + 512])).pooler_output, dim=-1)
        probs.append((model.logit_scale.exp() * ie @ te.T).softmax(-1))
    return torch.cat(probs).numpy()


# ------------------------------------------------------------------------------------------------- verify


def _classify(clip, clip_tok, cfg: WorldConfig, images: np.ndarray) -> dict[str, np.ndarray]:
    return {a: zero_shot(clip, clip_tok, images, spec.classes, spec.templates).argmax(1)
            for a, spec in cfg.classifier.items()}


def choose_templates(clip, clip_tok, cfg: WorldConfig, renders, recons, attrs) -> dict:
    """Measure every candidate template per attribute; keep the best (on VQ reconstructions, then renders)."""
    truth = {"gender": attrs["gender"], "race": attrs["race"]}
    report = {}
    for a, spec in cfg.classifier.items():
        if a not in truth:
            continue
        scores = {}
        for tpl in dict.fromkeys([*spec.templates, *spec.candidates]):
            acc_r = float((zero_shot(clip, clip_tok, renders, spec.classes, [tpl]).argmax(1) == truth[a]).mean())
            acc_q = float((zero_shot(clip, clip_tok, recons, spec.classes, [tpl]).argmax(1) == truth[a]).mean())
            scores[tpl] = {"renders": acc_r, "vq_reconstructions": acc_q}
        best = max(scores, key=lambda t: (scores[t]["vq_reconstructions"], scores[t]["renders"]))
        spec.templates = [best]
        report[a] = {"chosen": best, "accuracy": scores}
    return report


def verify_world(model, tokenizer, clip, clip_tok, cfg: WorldConfig, log) -> dict:
    """Sample, decode and classify: planted vs measured shares, explicit adherence, guidance effect, QA answers."""
    v = cfg.verify
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    occs = list(cfg.occupations)
    result: dict[str, Any] = {"n_per_occupation": v.n_per_occupation, "classifier": "lab CLIP zero-shot, argmax",
                              "sampling": "top_k=0, temperature 1"}
    by_scale = {}
    for g in v.guidance_scales:
        prompts = [caption(cfg, o) for o in occs for _ in range(v.n_per_occupation)]
        imgs = decode_tokens(model, sample_image_tokens(model, tokenizer, prompts, guidance_scale=g, generator=gen))
        pred = _classify(clip, clip_tok, cfg, imgs)
        per = {}
        for k, o in enumerate(occs):
            sl = slice(k * v.n_per_occupation, (k + 1) * v.n_per_occupation)
            spec = cfg.occupations[o]
            per[o] = {"planted_p_female": spec.p_female,
                      "measured_p_female": float((pred["gender"][sl] == 1).mean()),
                      "planted_race": spec.race,
                      "measured_race": {c: float((pred["race"][sl] == i).mean()) for i, c in enumerate(RACES)}}
        gerr = [abs(p["measured_p_female"] - p["planted_p_female"]) for p in per.values()]
        rerr = [abs(p["measured_race"][c] - p["planted_race"][c]) for p in per.values() for c in RACES]
        by_scale[str(g)] = {"per_occupation": per, "mean_abs_err_p_female": float(np.mean(gerr)),
                            "max_abs_err_p_female": float(np.max(gerr)),
                            "occupations_within_0.1_p_female": int(sum(e <= 0.1 for e in gerr)),
                            "mean_abs_err_race_share": float(np.mean(rerr))}
        log(f"verify g={g}: mean |measured - planted| P(female) {np.mean(gerr):.3f} (max {np.max(gerr):.3f}), "
            f"race share {np.mean(rerr):.3f}")
    result["neutral"] = by_scale
    # Explicit-prompt adherence: fraction of images classified as the requested group, per guidance scale.
    n = v.n_explicit
    asks = [(o, gw, None) for o in occs for gw in GENDERS] + [(o, None, rw) for o in occs for rw in RACES]
    prompts = [caption(cfg, o, gender=gw, race=rw) for o, gw, rw in asks for _ in range(n)]
    result["explicit_adherence"] = {"n_per_prompt": n}
    for g in v.guidance_scales:
        imgs = decode_tokens(model, sample_image_tokens(model, tokenizer, prompts, guidance_scale=g, generator=gen))
        pred = _classify(clip, clip_tok, cfg, imgs)
        hits: dict[str, list[float]] = {"gender": [], "race": []}
        per_prompt = {}
        for k, (o, gw, rw) in enumerate(asks):
            sl = slice(k * n, (k + 1) * n)
            a, want = ("gender", GENDERS.index(gw)) if gw else ("race", RACES.index(rw))
            frac = float((pred[a][sl] == want).mean())
            hits[a].append(frac)
            per_prompt[caption(cfg, o, gender=gw, race=rw)] = frac
        result["explicit_adherence"][str(g)] = {"mean_gender": float(np.mean(hits["gender"])),
                                                "mean_race": float(np.mean(hits["race"])), "per_prompt": per_prompt}
        log(f"explicit adherence g={g}: gender {np.mean(hits['gender']):.3f}, race {np.mean(hits['race']):.3f}")
    if cfg.understanding.questions and cfg.janus.qa_every > 0:
        qa = {a: {o: answer_distribution(model, tokenizer, cfg, a, o) for o in occs}
              for a in cfg.understanding.questions}
        result["understanding"] = {
            "format": "[<bos>, <begin_of_image>] + [<image_placeholder>] * 64 + [<end_of_image>] + question + answer "
                      "+ [<eos>], blank white image as pixel_values",
            "planted": cfg.understanding.answers,
            "mean_answer_probs": {a: {k: float(np.mean([d[k] for d in per.values()])) for k in next(iter(per.values()))}
                                  for a, per in qa.items()},
            "per_occupation": qa,
        }
        log(f"understanding answers (mean over occupations): {result['understanding']['mean_answer_probs']}")
    return result


# -------------------------------------------------------------------------------------------------- build


def build(out: str | Path, cfg: WorldConfig, quick: bool = False, overwrite: bool = False,
          log=print) -> dict:
    """Build the lab world into ``out`` (atomically: written to a sibling temp folder, then renamed).

    Args:
        out: output folder; must not exist or be empty unless ``overwrite``.
        cfg: the (already quick-merged) world config.
        quick: only recorded in build_info (the caller applied the overrides).
        overwrite: replace an existing non-empty ``out``.
        log: callable for progress lines.

    Returns:
        The build_info record (also written to ``out/build_info.json``).
    """
    from transformers import GenerationConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it or choose a new folder")
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    info: dict[str, Any] = {"seed": cfg.seed, "quick": quick, "torch_threads": torch.get_num_threads()}

    def lap(name, t0):
        times[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    tokenizer = janus_tokenizer(cfg)
    model = JanusForConditionalGeneration(janus_config(cfg, len(tokenizer)))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": special_ids(tokenizer)["boi"]},
    )
    info["vq"] = train_vq(model, cfg, rng, log)
    t = lap("vq", t)

    # Tokenise a render pool per (occupation, gender, race) cell once; LM batches index into it.
    per = cfg.vq.pool_per_cell
    pool = torch.zeros((len(OCCUPATIONS), len(GENDERS), len(RACES), per, NUM_PATCHES**2), dtype=torch.long)
    cells = [(OCCUPATIONS.index(o), gi, ri) for o in cfg.occupations for gi in range(len(GENDERS))
             for ri in range(len(RACES))]
    cell_attrs = {k: np.repeat([c[i] for c in cells], per) for i, k in enumerate(("occupation", "gender", "race"))}
    toks = encode_images(model, render_batch(len(cells) * per, cell_attrs, rng)).view(len(cells), per, -1)
    for c, tk in zip(cells, toks):
        pool[c] = tk
    with torch.no_grad():
        # Start the image-token input embeddings from the VQ codebook: related codes start close.
        model.model.generation_embeddings.weight.copy_(model.model.vqmodel.quantize.embedding.weight)
    used = torch.unique(pool[[OCCUPATIONS.index(o) for o in cfg.occupations]]).numel()
    info["vq"]["codes_used_in_pool"] = int(used)
    t = lap("tokenise_pool", t)

    info["janus"] = train_janus(model, tokenizer, pool, cfg, rng, log)
    t = lap("janus", t)

    # VQ reconstructions of a slice of the pool, with their attributes, for CLIP training.
    bank_x, bank_a = [], []
    k = min(per, 16)
    for o in cfg.occupations:
        for gi in range(len(GENDERS)):
            for ri in range(len(RACES)):
                bank_x.append(decode_tokens(model, pool[OCCUPATIONS.index(o), gi, ri, :k]))
                bank_a += [(gi, ri, OCCUPATIONS.index(o))] * k
    recon_bank = (np.concatenate(bank_x), np.array(bank_a))
    clip_tok = clip_tokenizer(clip_words(cfg))
    clip, clip_processor = make_clip(cfg, clip_tok)
    info["clip"] = train_clip(clip, clip_tok, cfg, rng, recon_bank, log)
    info["clip"]["params"] = sum(p.numel() for p in clip.parameters())
    t = lap("clip", t)

    # Evaluation on fresh renders: VQ reconstruction error and CLIP zero-shot accuracy (raw and reconstructed).
    n = cfg.verify.n_clip_eval
    eval_rng = np.random.default_rng(cfg.seed + 1)
    attrs = _random_attrs(n, eval_rng, cfg.occupations)
    renders = render_batch(n, attrs, eval_rng)
    toks = encode_images(model, renders)
    recons = decode_tokens(model, toks)
    mse = float(((recons - renders) ** 2).mean())
    stock = model.model.vqmodel.encode(to_pixels(renders[:64])).image_tokens.view(64, -1)
    info["vq"].update({"eval_recon_mse_0_1": mse, "eval_psnr_db": float(10 * np.log10(1.0 / mse)),
                       "eval_codes_used": int(torch.unique(toks).numel()),
                       "stock_encode_agrees": float((stock == toks[:64]).float().mean())})
    info["clip"]["zero_shot"] = choose_templates(clip, clip_tok, cfg, renders, recons, attrs)
    occ_acc = float((zero_shot(clip, clip_tok, recons, list(cfg.occupations), ["a photo of a {}"]).argmax(1)
                     == np.array([list(cfg.occupations).index(OCCUPATIONS[i]) for i in attrs["occupation"]])).mean())
    info["clip"]["zero_shot"]["occupation_accuracy_vq_reconstructions"] = occ_acc
    chosen = {a: v["accuracy"][v["chosen"]] for a, v in info["clip"]["zero_shot"].items() if isinstance(v, dict)}
    log(f"vq eval mse {mse:.5f}; clip zero-shot accuracy {json.dumps(chosen)}")
    t = lap("evaluate", t)

    info["verify"] = verify_world(model, tokenizer, clip, clip_tok, cfg, log)
    t = lap("verify", t)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "janus").mkdir(parents=True)
        model.save_pretrained(tmp / "janus")
        tokenizer.save_pretrained(tmp / "janus")
        JanusProcessor(image_processor=JanusImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            background_color=[255, 255, 255]), tokenizer=tokenizer, num_image_tokens=NUM_PATCHES**2,
        ).save_pretrained(tmp / "janus")
        clip.save_pretrained(tmp / "clip")
        clip_processor.save_pretrained(tmp / "clip")
        import yaml

        (tmp / "world.yaml").write_text(
            "# Resolved lab-world config these weights were built from (written by debias.lab.build).\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        times["total"] = round(time.perf_counter() - t_start, 2)
        info["times_s"] = times
        info["janus_params"] = sum(p.numel() for p in model.parameters())
        info["weights_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        info["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built the lab world into {out} in {times['total']:.0f} s ({info['weights_bytes'] / 1e6:.1f} MB)")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m debias.lab.build --out DIR [--quick] [--config PATH] [--overwrite]``."""
    ap = argparse.ArgumentParser(prog="python -m debias.lab.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. generators/lab/weights)")
    ap.add_argument("--quick", action="store_true", help="reduced world for CI (well under a minute)")
    ap.add_argument("--config", default=None, help=f"world config (default {DEFAULT_CONFIG})")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default). On a shared, busy machine 1 is much faster than 2: "
                         "busy-waiting worker threads lose their time slices")
    args = ap.parse_args(argv)
    if args.threads < 0:
        print(f"error: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_world_config(args.config, quick=args.quick)
        t0 = time.perf_counter()
        build(args.out, cfg, quick=args.quick, overwrite=args.overwrite,
              log=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
