"""Diffusers backend: any text-to-image ``DiffusionPipeline`` loadable with ``from_pretrained``.

Each image gets its own ``torch.Generator`` seeded with its seed, so its initial latents do not depend on the batch.
The denoising math is batched, and CPU/GPU kernels round differently for different batch shapes (measured: about
1e-6 in [0, 1] pixel units, i.e. at most one 8-bit step on a few pixels); the run store therefore keeps every image
in the same batch composition across resumes, extensions and processes.

Pipelines that ship a safety checker (Stable Diffusion 1.x/2.x) return flagged images black. Each image's flag
(``nsfw_content_detected``) is kept with it, so the audit leaves flagged images out of the shares and reports their
rate instead of counting black squares as faces not found.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from generators.base import (
    COMPONENTS,
    IMAGE_ENCODERS,
    GeneratedImage,
    MAX_IMAGE_SIDE,
    GeneratorConfig,
    base_identity,
    check_adapter,
    check_prompts_and_seeds,
    check_range,
    check_weights,
    generator_provenance,
    images_to_tensor,
    parse_settings,
    pool_embeddings,
    resolve_device,
    resolve_dtype,
    to_pil,
    torch_dtype,
)
from generators.config import ConfigError, UserError, did_you_mean, option
from generators.errors import first_line


@dataclass
class DiffusersSettings:
    """Sampling settings of the diffusers backend (keys of ``generator.sampling``)."""

    num_inference_steps: int = option(50, help="denoising steps")
    guidance_scale: float = option(7.5, help="classifier-free guidance scale")
    negative_prompt: str | None = option(None, help="negative prompt (pipelines that support one)")
    height: int | None = option(None, help="image height in pixels; None uses the pipeline default")
    width: int | None = option(None, help="image width in pixels; None uses the pipeline default")
    scheduler: str | None = option(None, help="diffusers scheduler class to swap in, e.g. DPMSolverMultistepScheduler")
    extra: dict[str, Any] = option(default_factory=dict, help="further keyword arguments for the pipeline call")
    safety_checker: bool = option(
        True, help="keep the pipeline's NSFW safety checker if it ships one (SD 1.5): flagged images come back black, "
                   "are recorded and left out of the shares, and their rate is reported; false loads it without one"
    )

    def __post_init__(self):
        check_range("generator.sampling.num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        for key in ("height", "width"):
            v = getattr(self, key)
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"config key 'generator.sampling.{key}': must be a multiple of 8, got {v}")
            if v is not None:
                check_range(f"generator.sampling.{key}", v, 8, MAX_IMAGE_SIDE)
        for key in self.extra:
            if key in _SET_BY_US:
                raise ConfigError(f"config key 'generator.sampling.extra.{key}': the backend sets {key!r} itself"
                                  + (f"; use generator.sampling.{key}" if key in _SETTINGS else ""))


MAX_STEPS = 10000
# Pipeline call arguments the backend passes itself (from the settings, the prompts and the seeds).
_SETTINGS = ("num_inference_steps", "guidance_scale", "negative_prompt", "height", "width")
_SET_BY_US = (*_SETTINGS, "prompt", "generator", "output_type", "num_images_per_prompt")


def check_extra(pipeline_cls: type, extra: dict[str, Any]) -> None:
    """Raise a :class:`ConfigError` for a ``generator.sampling.extra`` key the pipeline's ``__call__`` does not name.

    Only named parameters count: pipelines take ``**kwargs`` for deprecated arguments and silently drop whatever
    else lands there, so a typo would change nothing and say nothing.
    """
    params = {n: p for n, p in inspect.signature(pipeline_cls.__call__).parameters.items()
              if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    known = sorted(n for n in params if n not in ("self", *_SET_BY_US))
    for key in extra:
        if key not in params:
            raise ConfigError(f"config key 'generator.sampling.extra.{key}': {pipeline_cls.__name__} takes no "
                              f"argument {key!r}{did_you_mean(key, known)}; known: {', '.join(known)}")


def pipeline_class(config: GeneratorConfig) -> type | None:
    """The pipeline class ``config.model`` loads, read from its ``model_index.json`` without loading any weights
    (None when it cannot be known without the hub: then :meth:`DiffusersGenerator.__init__` checks the loaded
    pipeline)."""
    import diffusers

    if config.model == "tiny":
        return diffusers.StableDiffusionPipeline
    index = Path(config.model).expanduser() / "model_index.json"
    if not index.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(config.model, "model_index.json", revision=config.revision)
        except Exception:  # not a valid hub id: from_pretrained reports it when it loads
            cached = None
        if not isinstance(cached, str):
            return None
        index = Path(cached)
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else None


def scheduler_class(name: str):
    """The diffusers scheduler class ``generator.sampling.scheduler`` names."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        names = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        raise ConfigError(f"config key 'generator.sampling.scheduler': unknown scheduler '{name}'"
                          f"{did_you_mean(name, names)}")
    return cls


class DiffusersGenerator:
    """Text-to-image diffusion pipelines behind the :class:`generators.base.Generator` protocol.

    Capabilities: separable language (text encoders) and vision (UNet or transformer) sides, and the VAE encoder
    as an image encoder. No image tokens: latents are continuous.

    Args:
        config: ``model`` is a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local directory, or
            ``tiny`` (a seeded tiny Stable Diffusion pipeline built in-process).
        pipeline: an already-built pipeline to wrap instead of loading ``config.model``.
    """

    Settings = DiffusersSettings
    capabilities = frozenset({COMPONENTS, IMAGE_ENCODERS})
    # Batched denoising rounds differently for other batch shapes (~1e-6): the run store computes seed blocks whole.
    batch_invariant = False
    batch_invariant = False  # batched denoising rounds differently per batch shape: the store computes whole blocks
    component_roles = {"language": "text encoder(s)",
                       "vision": "the denoiser (UNet or transformer) that turns text features into latents"}
    ENCODERS = {"vae": "the VAE encoder's latent mean"}

    def __init__(self, config: GeneratorConfig, pipeline=None):
        self.config = config
        self.settings: DiffusersSettings = parse_settings(DiffusersSettings, config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._in_process = pipeline is not None or config.model == "tiny"
        pipe = pipeline if pipeline is not None else self._load(config, self.dtype, self.settings.safety_checker)
        check_extra(type(pipe), self.settings.extra)
        if not self.settings.safety_checker and getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        if self.settings.scheduler:
            pipe.scheduler = scheduler_class(self.settings.scheduler).from_config(pipe.scheduler.config)
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle, peft=False)
            pipe.load_lora_weights(config.adapter, use_safetensors=None if config.allow_pickle else True)
            if config.merge_adapter:
                pipe.fuse_lora()
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe.to(self.device)

    @classmethod
    def check_config(cls, config: GeneratorConfig, settings: DiffusersSettings) -> None:
        """What loading ``config`` would reject, without loading: the pipeline folder and its weights, the
        scheduler name, ``extra`` keys the pipeline does not take, and the adapter."""
        if config.model != "tiny":
            if not config.model:
                raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
            check_weights(config.model, "generator.model", config.allow_pickle, marker="model_index.json")
        if settings.scheduler:
            scheduler_class(settings.scheduler)
        if settings.extra:
            pipe_cls = pipeline_class(config)
            if pipe_cls is not None:
                check_extra(pipe_cls, settings.extra)
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle, peft=False)

    @staticmethod
    def _load(config: GeneratorConfig, dtype: str, safety_checker: bool):
        if config.model == "tiny":
            from generators.tiny import tiny_diffusion_pipeline

            pipe = tiny_diffusion_pipeline(seed=0)
            return pipe if dtype == "float32" else pipe.to(dtype=torch_dtype(dtype))
        if not config.model:
            raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
        check_weights(config.model, "generator.model", config.allow_pickle, marker="model_index.json")
        from diffusers import DiffusionPipeline

        # Without the checker its weights are not even downloaded (pipelines that have none ignore the argument).
        off = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        try:
            return DiffusionPipeline.from_pretrained(
                config.model, revision=config.revision, torch_dtype=torch_dtype(dtype), variant=config.variant,
                trust_remote_code=config.trust_remote_code, use_safetensors=None if config.allow_pickle else True,
                **off,
            )
        except (OSError, ValueError) as err:
            first = first_line(err)
            raise UserError(f"config key 'generator.model': cannot load {config.model!r} ({first}); pass a local "
                            "pipeline folder with safetensors weights or a hub id reachable from here") from None

    def call_kwargs(self, n: int) -> dict[str, Any]:
        """Keyword arguments of the pipeline call for a batch of ``n`` images (prompts and generators aside)."""
        s = self.settings
        kwargs: dict[str, Any] = dict(num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                      output_type="np", **s.extra)
        if s.negative_prompt is not None:
            kwargs["negative_prompt"] = [s.negative_prompt] * n
        if s.height:
            kwargs["height"] = s.height
        if s.width:
            kwargs["width"] = s.width
        return kwargs

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedImage]:
        check_prompts_and_seeds(prompts, seeds)
        out: list[GeneratedImage] = []
        bs = self.config.batch_size
        gen_device = "cpu" if self.device == "mps" else self.device
        for i in range(0, len(prompts), bs):
            p, s = list(prompts[i:i + bs]), list(seeds[i:i + bs])
            generators = [torch.Generator(gen_device).manual_seed(int(x)) for x in s]
            result = self.pipeline(prompt=p, generator=generators, **self.call_kwargs(len(p)))
            # None: the pipeline ran no safety checker (none shipped, or switched off).
            flags = getattr(result, "nsfw_content_detected", None) or [None] * len(p)
            for prompt, seed, img, flag in zip(p, s, to_pil(result.images, value_range=(0.0, 1.0)), flags):
                out.append(GeneratedImage(prompt=prompt, seed=int(seed), image=img,
                                          nsfw=None if flag is None else bool(flag)))
        return out

    def components(self) -> dict[str, list[str]]:
        """Language: the text encoders the pipeline has; vision: its UNet or transformer. The VAE stays at base."""
        pipe = self.pipeline
        present = [n for n, c in pipe.components.items() if c is not None]
        return {"language": [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if n in present],
                "vision": [n for n in ("unet", "transformer") if n in present]}

    def module_root(self, pipeline=None):
        """The pipeline whose modules :meth:`components` names: this generator's, or ``pipeline``."""
        return self.pipeline if pipeline is None else pipeline

    def image_encoders(self) -> dict[str, str]:
        return dict(self.ENCODERS)

    @torch.no_grad()
    def embed_images(self, images: Sequence, encoder: str, pool: str = "mean", batch_size: int = 32,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
        """``(n, d)`` float32 VAE latent means of PIL ``images`` at the pipeline's default size (``mean``/``std``
        are unused: the VAE reads pixels in [-1, 1])."""
        if encoder not in self.ENCODERS:
            raise UserError(f"config key 'locate.vision.encoders': backend '{self.config.backend}' has no encoder "
                            f"{encoder!r}; available: {list(self.ENCODERS)}")
        pipe = self.pipeline
        vae = pipe.vae
        side = int(pipe.unet.config.sample_size * pipe.vae_scale_factor) if "unet" in pipe.components else 64
        out = []
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(images[i:i + batch_size], side, (-1.0, 1.0)).to(vae.device, vae.dtype)
            out.append(pool_embeddings(vae.encode(x).latent_dist.mean, pool, channels_first=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def identity(self) -> dict:
        return base_identity(self.config, self.settings, self.dtype)

    def provenance(self) -> dict:
        modules = {n: c for n, c in self.pipeline.components.items() if isinstance(c, torch.nn.Module)}
        return generator_provenance(self, module=modules if self._in_process else None)
