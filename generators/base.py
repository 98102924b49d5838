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
    nsfw: bool | None = None  # the pipeline's safety checker flagged (and blackened) it; None: no checker ran


@dataclass
class GeneratorConfig:
    """Which generator to load and how to sample from it."""

    backend: str = option(help="generator backend (registry name): janus, emu3, diffusers, lab")
    model: str = option(
        "", help="hub id or local directory for from_pretrained; 'tiny' builds a seeded tiny model in-process"
    )
    revision: str | None = option(
        None, help="hub revision (branch, tag or commit) to pin the weights; every run records the commit it used"
    )
    variant: str | None = option(
        None, help="weights variant to load, e.g. fp16: the half-size files SD 1.5 and SDXL ship beside the fp32 ones"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "float32", help="weights and compute dtype; auto: bfloat16 on a CUDA GPU that supports it, float16 on other "
                        "GPUs and MPS, float32 on the CPU"
    )
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
        device, dtype: The resolved torch device and dtype name (``auto`` resolved, see :func:`resolve_dtype`).
        batch_invariant: True when an image's bytes do not depend on the batch it is drawn in; otherwise the run
            store computes whole seed blocks, so resumed and extended runs match.
    """

    config: GeneratorConfig
    settings: Any
    capabilities: frozenset[str]
    device: str
    dtype: str
    batch_invariant: bool

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedImage]:
        """One image per ``(prompts[i], seeds[i])``, computed in batches of ``config.batch_size``."""
        ...

    def identity(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the images (model, revision, adapter, settings)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What the run records about the weights it used: :func:`generator_provenance` (resolved revision or
        content hash, dtype, device, variant of the generator and its adapter)."""
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


def resolve_dtype(dtype: str, device: str, key: str = "generator.dtype") -> str:
    """The dtype a ``dtype`` option names on a resolved ``device``.

    ``auto`` is bfloat16 on a CUDA GPU that supports it (Ampere and newer; the dtype Janus-Pro and FLUX ship in),
    float16 on older CUDA GPUs and on MPS, and float32 on the CPU, where half precision is slow and several kernels
    lack it. An explicit ``float16`` on the CPU is refused for the same reason.

    Raises:
        ConfigError: for float16 on the CPU, naming ``key``.
    """
    import torch

    kind = device.split(":")[0]
    if dtype == "auto":
        if kind == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float16" if kind == "mps" else "float32"
    if dtype == "float16" and kind == "cpu":
        raise ConfigError(f"config key '{key}': float16 on the CPU is slow and several CPU kernels lack it; use "
                          "dtype: auto (float32 on the CPU, half precision on a GPU), float32 or bfloat16")
    return dtype


_HASHES: dict[tuple, str] = {}


def directory_hash(path: str | Path) -> str:
    """Content hash of a file or directory (an adapter, a local model folder): file names and bytes, streamed.

    Memoised per process on the files' names, sizes and modification times, so a multi-GB local model is read
    once per run, not once per stage.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter '{path}' does not exist; pass the directory written by `debias train`")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    signature = (str(path.resolve()), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if signature not in _HASHES:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(path).as_posix().encode() if p != path else b"")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        _HASHES[signature] = h.hexdigest()[:16]
    return _HASHES[signature]


def weights_fingerprint(modules: Any) -> str:
    """SHA-256 over the parameter and buffer names, shapes and values of a module (or a mapping of named modules,
    e.g. a pipeline's components): pins weights that have no file or hub commit (built in-process, handed in)."""
    import torch

    if isinstance(modules, torch.nn.Module):
        modules = {"": modules}
    digest = hashlib.sha256()
    for prefix, module in sorted(modules.items()):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update((f"{prefix}.{name}" if prefix else name).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def hub_commit(repo_id: str, revision: str | None = None,
               files: Sequence[str] = ("config.json", "model_index.json")) -> str | None:
    """The commit of the hub snapshot ``from_pretrained`` loaded ``repo_id`` at ``revision`` from.

    Read from the local hub cache, where the load put (or found) the files, so it works offline and costs no
    request: ``.../models--org--name/snapshots/<commit>/config.json``. None when no such file is cached.
    """
    import re

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        try:
            cached = try_to_load_from_cache(repo_id, name, revision=revision)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(cached, str):
            return Path(cached).parent.name
    return None


def model_provenance(name: str, *, dtype: str | None, device: str | None, location: str | Path | None = None,
                     revision: str | None = None, variant: str | None = None, module: Any = None,
                     files: Sequence[str] = ("config.json", "model_index.json")) -> dict[str, Any]:
    """What a run records about one model it used, so the run can be reproduced later.

    Args:
        name: The model as configured (hub id, folder, built-in name).
        dtype, device, variant: As resolved for this run.
        location: Where the weights were read from, when it differs from ``name`` (the lab world's folder).
        revision: The revision the config asked for.
        module: The loaded module(s), fingerprinted when the weights have neither a folder nor a hub id.
        files: Files whose cached copy names the hub snapshot (see :func:`hub_commit`).

    Returns:
        ``model``, ``source`` (``local``: ``revision`` is a content hash of the folder; ``hub``: the snapshot
        commit, None if the cache does not name it; ``in-process``: a fingerprint of the weights' values),
        ``requested_revision``, ``revision``, ``dtype``, ``device`` and ``variant``.
    """
    where = Path(location if location is not None else name)
    if module is not None:
        source, resolved = "in-process", weights_fingerprint(module)[:16]
    elif name and where.exists():
        source, resolved = "local", directory_hash(where)
    elif "/" in name and not name.startswith((".", "/")):
        source, resolved = "hub", hub_commit(name, revision, files)
    else:
        source, resolved = "unknown", None
    return {"model": name, "source": source, "requested_revision": revision, "revision": resolved, "dtype": dtype,
            "device": device, "variant": variant}


def generator_provenance(generator: Any, location: str | Path | None = None, module: Any = None) -> dict[str, Any]:
    """``{"generator": record, "adapter": record}`` (adapter only when one is applied) of a loaded generator with
    ``config``, ``device`` and ``dtype`` (resolved) attributes; records as :func:`model_provenance`."""
    config = generator.config
    out = {"generator": model_provenance(config.model, dtype=generator.dtype, device=generator.device,
                                         location=location, revision=config.revision, variant=config.variant,
                                         module=module)}
    if config.adapter:
        out["adapter"] = {**model_provenance(config.adapter, dtype=generator.dtype, device=generator.device),
                          "merged": config.merge_adapter}
    return out


def base_identity(config: GeneratorConfig, settings: Any, dtype: str | None = None) -> dict[str, Any]:
    """The identity fields shared by all backends; ``dtype`` is the resolved one (``auto`` differs per device)."""
    identity = {
        "backend": config.backend,
        "model": config.model,
        "revision": config.revision,
        "dtype": dtype or config.dtype,
        "adapter": config.adapter,
        "adapter_hash": directory_hash(config.adapter) if config.adapter else None,
        "settings": to_dict(settings) if dataclasses.is_dataclass(settings) else settings,
    }
    if config.variant:  # only when set, so the keys of runs made before the option existed stay the same
        identity["variant"] = config.variant
    return identity


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
