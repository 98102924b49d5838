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

# Sane upper bounds: values above them are typos, and would otherwise fail deep inside torch or fill the memory.
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (the synth data set) and seed torch generators
MAX_BATCH_SIZE = 65536
MAX_IMAGE_SIDE = 16384  # pixels; 16k x 16k RGB is already 800 MB per image
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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

    backend: str = option(help="generator backend (registry name): janus, diffusers, lab")
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
    allow_pickle: bool = option(False, help="allow pickled weights (pytorch_model.bin, *.pt): loading a pickle can "
                                            "run code, so only safetensors load unless this is true")
    sampling: dict[str, Any] = option(
        default_factory=dict, help="backend sampling settings (see each backend's Settings dataclass)"
    )

    def __post_init__(self):
        check_range("generator.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_device_name(self.device, "generator.device")


IMAGE_TOKENS = "image_tokens"
TOKEN_SCORES = "token_scores"
UNDERSTANDING = "understanding"
COMPONENTS = "components"
IMAGE_ENCODERS = "image_encoders"

# What each capability promises: the methods and attributes a backend that declares it implements.
CAPABILITIES: dict[str, str] = {
    IMAGE_TOKENS: "discrete image tokens: sample_tokens(prompts, seeds) -> (B, T) ids drawn from each image's own "
                  "seed, decode(tokens) -> images, encode(prompts), num_image_tokens, codebook_size",
    TOKEN_SCORES: "teacher-forced scoring of given image tokens: logprobs(prompts, tokens, guidance_scale) -> (B, T), "
                  "token_distribution(prompts, tokens) -> (B, T, V) sampling distributions",
    UNDERSTANDING: "answers questions about an image: model and tokenizer in the Janus chat layout, and its "
                   "image_processor (or None)",
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


def require(generator: Generator | type, capability: str, needed_by: str, backend: str | None = None) -> None:
    """Raise a :class:`UserError` unless ``generator`` declares ``capability``.

    Args:
        generator: The generator a stage is about to use, or its backend class (to check before loading it).
        capability: A name in :data:`CAPABILITIES`.
        needed_by: What needs it, e.g. ``"the controlled-generation probe"`` (the error starts with it).
        backend: The backend's config name (default: the generator's ``config.backend``).
    """
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    if capability not in generator.capabilities:
        have = ", ".join(sorted(generator.capabilities)) or "none"
        cls = generator if isinstance(generator, type) else type(generator)
        backend = backend or generator.config.backend
        raise UserError(f"{needed_by} needs a generator with {capability} ({CAPABILITIES[capability]}); backend "
                        f"'{backend}' ({cls.__name__}) has: {have}")


def parse_settings(cls: type, config: GeneratorConfig):
    """Validate ``config.sampling`` against a backend's Settings dataclass (errors name ``generator.sampling.KEY``)."""
    return from_dict(cls, config.sampling, prefix="generator.sampling")


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``lo <= value <= hi`` (either bound may be None)."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = (f"between {lo} and {hi}" if lo is not None and hi is not None
                 else f">= {lo}" if lo is not None else f"<= {hi}")
        raise ConfigError(f"config key '{key}': must be {bound}, got {value}")


def check_device_name(device: str, key: str) -> None:
    """Raise a :class:`ConfigError` unless ``device`` is ``auto`` or parses as a torch device (``cpu``, ``cuda:1``)."""
    import torch

    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"config key '{key}': {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or "
                          "mps") from None


def resolve_device(device: str, key: str = "generator.device") -> str:
    """The torch device a ``device`` option names: ``auto`` is cuda if available, else mps if available, else cpu;
    anything else (``cpu``, ``cuda:1``, ...) is returned as given once this machine is known to have it.

    Raises:
        ConfigError: naming ``key`` for a name that is not a device, or a device this machine does not have.
    """
    import torch

    check_device_name(device, key)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = torch.device(device)
    if kind.type == "cuda" and (not torch.cuda.is_available() or (kind.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"config key '{key}': {device!r} is not available here (torch sees {have}); use auto or cpu")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config key '{key}': 'mps' is not available here; use auto or cpu")
    return device


def _looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (``name`` or ``org/name``)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or name.endswith("/")


def check_weights(model: str, key: str, allow_pickle: bool, marker: str | None = None,
                  allow_key: str | None = None) -> Path | None:
    """Check a local model folder before anything loads it; a hub id (``org/name``) passes through (None).

    Args:
        model: The config's model value.
        key: Its dotted config key (``generator.model``), for the messages.
        allow_pickle: Whether pickled weights may load (the config's ``allow_pickle``).
        marker: A file the folder must hold (``config.json``, ``model_index.json``, ``adapter_config.json``).
        allow_key: The option that allows pickles, named in the error (default: ``allow_pickle`` beside ``key``).

    Returns:
        The folder, or None for a hub id.

    Raises:
        UserError: for a path that does not exist, a file, an empty folder, a folder without ``marker`` or without
            weights, and a folder whose weights are pickles only (unless ``allow_pickle``): a pickle can run code
            when loaded, so it is refused before any loader sees it.
    """
    path = Path(model).expanduser()
    option_key = allow_key or key.rsplit(".", 1)[0] + ".allow_pickle"
    if not path.exists():
        if _looks_like_path(model):
            raise UserError(f"config key '{key}': cannot load '{model}' (no such folder); pass a local model folder "
                            "or a hub id (org/name)")
        return None
    if not path.is_dir():
        raise UserError(f"config key '{key}': '{model}' is a file, not a model folder; pass the folder "
                        "save_pretrained wrote")
    files = [p for p in path.rglob("*") if p.is_file()]
    if not files:
        raise UserError(f"config key '{key}': folder '{model}' is empty; pass the folder save_pretrained wrote")
    if marker and not (path / marker).is_file():
        raise UserError(f"config key '{key}': folder '{model}' has no {marker}; pass the folder save_pretrained "
                        "wrote")
    folders: dict[Path, set[str]] = {}
    for p in files:
        if p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES:
            folders.setdefault(p.parent, set()).add(p.suffix)
    if not folders:
        raise UserError(f"config key '{key}': folder '{model}' holds no weights (*.safetensors); pass the folder "
                        "save_pretrained wrote")
    pickled = sorted(d for d, kinds in folders.items() if ".safetensors" not in kinds)
    if pickled and not allow_pickle:
        name = next(p.name for p in sorted(pickled[0].iterdir()) if p.suffix in PICKLE_SUFFIXES)
        where = pickled[0].relative_to(path).as_posix()
        raise UserError(f"config key '{key}': '{model}' has only pickled weights "
                        f"({name}{'' if where == '.' else ' in ' + where}), and loading a pickle can run code; "
                        f"convert them to safetensors, or set {option_key}: true if you trust the file")
    return path


def check_adapter(adapter: str, key: str, allow_pickle: bool, peft: bool = True,
                  allow_key: str = "generator.allow_pickle") -> None:
    """Check an adapter before it is loaded: it exists, is a PEFT folder (``peft``) and its weights are
    safetensors unless ``allow_pickle`` (see :func:`check_weights`)."""
    path = Path(adapter).expanduser()
    if not path.exists():
        raise UserError(f"config key '{key}': adapter '{adapter}' does not exist; pass the adapter folder written "
                        "by `debias train` (<run>/<stage>/adapter)")
    if path.is_file():
        if peft or path.suffix != ".safetensors":
            raise UserError(f"config key '{key}': adapter '{adapter}' is a file; pass the adapter folder written "
                            "by `debias train` (<run>/<stage>/adapter)")
        return
    if peft and not (path / "adapter_config.json").is_file():
        raise UserError(f"config key '{key}': '{adapter}' is not a PEFT adapter folder (no adapter_config.json); "
                        "pass the <stage>/adapter folder written by `debias train`")
    check_weights(adapter, key, allow_pickle, allow_key=allow_key)


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
        if not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED:
            raise UserError(f"generate: seed {s!r} is not an integer in [0, {MAX_SEED}]")
