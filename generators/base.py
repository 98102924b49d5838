"""The generator protocol: prompts, per-image seeds and sampling settings in; images plus metadata out.

Every backend (one file each in this package) implements :class:`Generator`. Backends are deterministic per seed:
the image for ``(prompt, seed)`` is the same whatever the batch it was drawn in, so a sampling run can be sharded,
interrupted and extended without changing any image.

Beyond ``generate``, a backend declares what else it can do in ``capabilities`` (the names in
:data:`CAPABILITIES`), and callers ask (:func:`require`) instead of probing attributes. Each capability is a small
set of methods, so a new model family is one file that implements the capabilities its architecture has: an
image-token model implements ``image_tokens`` and ``token_scores`` (what the controlled-generation probe, the
synthetic data and the preference trainers need), a model with separable language and vision parts implements
``components`` (the component swap), and so on.

What changed to fit a second unified family (Emu3, beside Janus), so that the next one (a Chameleon-class image
generator, or ``GlmImageForConditionalGeneration``) is one file:

* **Image tokens are codebook ids** ``(B, T)`` in ``[0, codebook_size)`` for every family. How a family lays them
  out in its language model (Janus: separate generation embeddings and head; Emu3: ordinary vocabulary entries, a
  line-break token after each row of the grid and end tokens) is the family's *layout*, a subclass of
  :class:`generators.sequence.ImageTokenLayout` (``prompt_ids``, teacher-forced ``logits``, seeded ``sample``,
  ``decode``) that works on any model of the family. ``token_scores`` promises it as ``layout``: the trainers
  score, sample and decode their PEFT-wrapped policy through it, instead of calling Janus functions and a
  Janus-only forward.
* **Understanding is a method**, ``answer(questions, seeds, ...)``, that samples answers through the model's own
  chat path with a blank image, instead of the probe reading ``model``/``tokenizer`` in the Janus chat layout.
* **Shared machinery** lives in :mod:`generators.sequence`: :class:`~generators.sequence.ImageTokenGenerator`
  turns a layout into the ``image_tokens``/``token_scores`` methods (batching, guidance, adapters, components),
  :class:`~generators.sequence.TokenSampling` holds the sampling settings every image-token backend has.

A new image-token family therefore subclasses the two classes (its layout and its generator with a ``Settings``
dataclass), implements the further capabilities its architecture has, and registers the backend in
:mod:`generators.backends`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from generators.config import ConfigError, UserError, from_dict, option, to_dict


@dataclass
class GeneratedImage:
    """One generated image and what produced it."""

    prompt: str
    seed: int
    image: Image.Image
    tokens: list[int] | None = None  # codebook ids, for autoregressive (image-token) models


@dataclass
class GeneratorConfig:
    """Which generator to load and how to sample from it."""

    backend: str = option(help="generator backend (registry name): janus, emu3, diffusers, lab")
    model: str = option(
        "", help="hub id or local directory for from_pretrained; 'tiny' builds a seeded tiny model in-process"
    )
    revision: str | None = option(None, help="hub revision (branch, tag or commit) to pin the weights")
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", help="weights and compute dtype")
    device: str = option(
        "auto", help="torch device: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps"
    )
    batch_size: int = option(8, help="images per forward batch (CFG doubles it internally)")
    adapter: str | None = option(None, help="PEFT adapter directory applied to the model (LoRA from `debias train`)")
    merge_adapter: bool = option(False, help="merge the adapter into the base weights (faster sampling)")
    trust_remote_code: bool = option(False, help="allow custom modelling code from the hub (off: security)")
    sampling: dict[str, Any] = option(
        default_factory=dict, help="backend sampling settings (see each backend's Settings dataclass)"
    )

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"config key 'generator.batch_size': must be >= 1, got {self.batch_size}")


IMAGE_TOKENS = "image_tokens"
TOKEN_SCORES = "token_scores"
UNDERSTANDING = "understanding"
COMPONENTS = "components"
IMAGE_ENCODERS = "image_encoders"

# What each capability promises: the methods and attributes a backend that declares it implements.
CAPABILITIES: dict[str, str] = {
    IMAGE_TOKENS: "discrete image tokens: sample_tokens(prompts, seeds) -> (B, T) codebook ids drawn from each image's "
                  "own seed, decode(tokens) -> images, encode(prompts), num_image_tokens, codebook_size",
    TOKEN_SCORES: "teacher-forced scoring of given image tokens: logprobs(prompts, tokens, guidance_scale) -> (B, T), "
                  "token_distribution(prompts, tokens) -> (B, T, V) sampling distributions, and layout (a "
                  "generators.sequence.ImageTokenLayout: prompt rows, scoring, sampling and decoding on any model of "
                  "the family, e.g. a PEFT-wrapped policy)",
    UNDERSTANDING: "answers questions about an image: answer(questions, seeds, template=..., max_new_tokens=..., "
                   "temperature=..., top_k=..., top_p=..., blank=..., mean=..., std=..., batch_size=...) -> texts, "
                   "sampled from each answer's own seed through the model's chat path with a blank image",
    COMPONENTS: "separable language and vision sides: components() -> {'language': [...], 'vision': [...]} module "
                "paths under module_root(), component_roles",
    IMAGE_ENCODERS: "image encoders to probe: image_encoders() -> {name: description}, "
                    "embed_images(images, encoder, pool, batch_size) -> (n, d)",
}


@runtime_checkable
class Generator(Protocol):
    """What every backend provides. ``identity()`` keys the run store: same identity + prompt + seed = same image.

    Attributes:
        config: The generator config it was built from.
        settings: Its backend's sampling settings with every default applied (a dataclass).
        capabilities: The names of :data:`CAPABILITIES` it implements beyond ``generate``.
    """

    config: GeneratorConfig
    settings: Any
    capabilities: frozenset[str]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedImage]:
        """One image per ``(prompts[i], seeds[i])``, computed in batches of ``config.batch_size``."""
        ...

    def identity(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the images (model, revision, adapter, settings)."""
        ...


def require(generator: Generator, capability: str, needed_by: str) -> None:
    """Raise a :class:`UserError` unless ``generator`` declares ``capability``.

    Args:
        generator: The generator a stage is about to use.
        capability: A name in :data:`CAPABILITIES`.
        needed_by: What needs it, e.g. ``"the controlled-generation probe"`` (the error starts with it).
    """
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    if capability not in generator.capabilities:
        have = ", ".join(sorted(generator.capabilities)) or "none"
        raise UserError(f"{needed_by} needs a generator with {capability} ({CAPABILITIES[capability]}); backend "
                        f"'{generator.config.backend}' ({type(generator).__name__}) has: {have}")


def parse_settings(cls: type, config: GeneratorConfig):
    """Validate ``config.sampling`` against a backend's Settings dataclass (errors name ``generator.sampling.KEY``)."""
    return from_dict(cls, config.sampling, prefix="generator.sampling")


def resolve_device(device: str) -> str:
    """The torch device a ``device`` option names: ``auto`` is cuda if available, else mps if available, else cpu;
    anything else (``cpu``, ``cuda:1``, ...) is returned as given."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def directory_hash(path: str | Path) -> str:
    """Content hash of a directory (e.g. a PEFT adapter), so a retrained adapter never reuses stale images."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter '{path}' does not exist; pass the directory written by `debias train`")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() if p != path else b"")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def base_identity(config: GeneratorConfig, settings: Any) -> dict[str, Any]:
    """The identity fields shared by all backends."""
    return {
        "backend": config.backend,
        "model": config.model,
        "revision": config.revision,
        "dtype": config.dtype,
        "adapter": config.adapter,
        "adapter_hash": directory_hash(config.adapter) if config.adapter else None,
        "settings": to_dict(settings) if dataclasses.is_dataclass(settings) else settings,
    }


def images_to_tensor(images: Sequence[Image.Image], size: int, value_range: tuple[float, float] = (0.0, 1.0),
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """PIL images -> ``(B, 3, size, size)`` float tensor, bicubic-resized; scaled to ``value_range``, or
    normalised with ``mean``/``std`` (of [0, 1] pixels) when given."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
                    for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if mean is not None:
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    lo, hi = value_range
    return x * (hi - lo) + lo


def pool_embeddings(h, pool: str, channels_first: bool):
    """One vector per image from token outputs ``(B, N, D)`` or conv latents ``(B, D, H, W)``: ``mean`` over
    tokens / grid cells, or ``flatten`` (keeps the spatial layout)."""
    if pool == "flatten":
        return h.flatten(1)
    return h.mean(dim=(2, 3)) if channels_first else h.mean(dim=1)


def to_pil(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> list[Image.Image]:
    """(B, H, W, 3) floats in ``value_range`` -> RGB PIL images."""
    lo, hi = value_range
    arr = (np.asarray(images, dtype=np.float32) - lo) / (hi - lo)
    arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def check_prompts_and_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise UserError(f"generate: got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    for s in seeds:
        if not isinstance(s, (int, np.integer)) or s < 0:
            raise UserError(f"generate: seed {s!r} is not a non-negative integer")
