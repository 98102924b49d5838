"""Janus / Janus-Pro backend (`transformers.JanusForConditionalGeneration`).

The sequence layout (prompt rows, classifier-free guidance rows, teacher-forced image logits, per-image seeded
sampling, questions about an image) lives in :mod:`generators.janus_sequence`; this module is the backend class
and its sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from generators.base import (
    COMPONENTS,
    IMAGE_ENCODERS,
    IMAGE_TOKENS,
    TOKEN_SCORES,
    UNDERSTANDING,
    GeneratorConfig,
    check_weights,
    images_to_tensor,
    parse_settings,
    pool_embeddings,
    torch_dtype,
)
from generators.config import ConfigError, UserError, option
from generators.errors import first_line
from generators.janus_sequence import JanusLayout, SpecialIds, sample_answers
from generators.sequence import ImageTokenGenerator, TokenSampling, unwrap


@dataclass
class JanusSettings(TokenSampling):
    """Sampling settings of the Janus backend (keys of ``generator.sampling``)."""

    guidance_scale: float = option(5.0, help="classifier-free guidance scale; 1 disables CFG (Janus-Pro card: 5)")


class JanusGenerator(ImageTokenGenerator):
    """Janus / Janus-Pro text-to-image generation behind the :class:`generators.base.Generator` protocol.

    Every capability of :data:`generators.base.CAPABILITIES`: image tokens from one causal LM over a VQ codebook,
    their teacher-forced scores, the understanding (chat) path, separable language and vision sides, and three
    image encoders (the understanding tower, its aligner, the VQ encoder).

    Args:
        config: ``model`` is a hub id (e.g. ``deepseek-community/Janus-Pro-1B``), a local directory, or ``tiny``
            (a seeded tiny model built in-process).
        model, tokenizer: pass already-loaded objects instead of loading ``config.model`` (tests, trainers).
    """

    Settings = JanusSettings
    capabilities = frozenset({IMAGE_TOKENS, TOKEN_SCORES, UNDERSTANDING, COMPONENTS, IMAGE_ENCODERS})
    # Language side: everything that decides the image tokens; vision side: the VQ tokenizer/decoder that turns
    # them into pixels. The understanding tower (model.vision_model, model.aligner) plays no part in generation.
    COMPONENTS = {
        "language": ["model.language_model", "model.generation_embeddings", "model.generation_aligner",
                     "model.generation_head", "lm_head"],
        "vision": ["model.vqmodel"],
    }
    component_roles = {
        "language": "modules that decide the image tokens (language model and generation embeddings/head)",
        "vision": "the VQ tokenizer/decoder that turns image tokens into pixels",
    }
    ENCODERS = {
        "vision": "understanding vision tower (model.vision_model), last hidden state",
        "aligned": "understanding tower after the aligner (what the language model reads)",
        "vq": "generation VQ encoder (vqmodel.encoder + quant_conv), pre-quantisation latents",
    }

    def __init__(self, config: GeneratorConfig, model=None, tokenizer=None):
        self.config = config
        self.settings: JanusSettings = parse_settings(JanusSettings, config)
        self._resolve(config, model)
        if model is None:
            model, tokenizer = self._load(config, self.dtype)
        elif tokenizer is None:
            raise ConfigError("JanusGenerator: pass the tokenizer together with the model")
        self.model = self._prepare(config, model)
        self.tokenizer = tokenizer
        self.ids = SpecialIds.of(unwrap(self.model), tokenizer)
        self.layout = JanusLayout.of(self.model, tokenizer, self.settings.prompt_template)
        self.image_processor = self._image_processor(config.model)

    @staticmethod
    def _image_processor(model: str):
        """The model folder's own image processor (the understanding path's normalisation), or None."""
        path = Path(model or "")
        if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            return None
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError):  # a folder without a loadable image processor: callers use the default
            return None

    @staticmethod
    def _load(config: GeneratorConfig, dtype: str):
        if config.model == "tiny":
            from generators.tiny import tiny_janus

            model, tokenizer = tiny_janus(seed=0)
            return model.to(torch_dtype(dtype)), tokenizer
        if not config.model:
            raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
        check_weights(config.model, "generator.model", config.allow_pickle, marker="config.json")
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        # Safetensors only unless pickles are allowed: a hub repo with only pickled weights then fails to load.
        kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
        try:
            model = JanusForConditionalGeneration.from_pretrained(
                config.model, dtype=torch_dtype(dtype), variant=config.variant,
                use_safetensors=None if config.allow_pickle else True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(f"config key 'generator.model': cannot load {config.model!r} ({first_line(err)}); pass "
                            "a local folder with safetensors weights or a hub id reachable from here") from None
        return model, tokenizer

    def answer(self, questions: Sequence[str], seeds: Sequence[int], *, template: str = "{image}{question}",
               max_new_tokens: int = 12, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               blank: str = "white", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               batch_size: int = 32) -> list[str]:
        """One sampled answer per (question, seed) about a blank image (see
        :func:`generators.janus_sequence.sample_answers`). ``mean``/``std`` default to the model folder's image
        processor, else Janus-Pro's 0.5 / 0.5."""
        ip = self.image_processor
        mean = list(mean or getattr(ip, "image_mean", None) or [0.5] * 3)
        std = list(std or getattr(ip, "image_std", None) or [0.5] * 3)
        return sample_answers(self.model, self.tokenizer, questions, seeds, template, max_new_tokens, temperature,
                              top_k, top_p, blank, mean, std, batch_size)

    def image_encoders(self) -> dict[str, str]:
        return dict(self.ENCODERS)

    @torch.no_grad()
    def embed_images(self, images: Sequence, encoder: str, pool: str = "mean", batch_size: int = 32,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
        """``(n, d)`` float32 embeddings of PIL ``images`` from one of :meth:`image_encoders`.

        ``mean``/``std`` normalise the understanding tower's input (default 0.5 / 0.5, Janus-Pro's processor); the
        VQ encoder reads pixels in [-1, 1] at its decoded side.
        """
        if encoder not in self.ENCODERS:
            raise UserError(f"config key 'locate.vision.encoders': backend '{self.config.backend}' has no encoder "
                            f"{encoder!r}; available: {list(self.ENCODERS)}")
        root = unwrap(self.model)
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            if encoder in ("vision", "aligned"):
                vm = root.model.vision_model
                x = images_to_tensor(chunk, vm.config.image_size, mean=list(mean or [0.5] * 3),
                                     std=list(std or [0.5] * 3)).to(vm.device, vm.dtype)
                h = vm(pixel_values=x).last_hidden_state
                if encoder == "aligned":
                    h = root.model.aligner(h)
                e = pool_embeddings(h, pool, channels_first=False)
            else:
                vq = root.model.vqmodel
                side = vq.config.num_patches * 2 ** (len(vq.config.channel_multiplier) - 1)
                x = images_to_tensor(chunk, side, (-1.0, 1.0)).to(vq.device, vq.dtype)
                e = pool_embeddings(vq.quant_conv(vq.encoder(x)), pool, channels_first=True)
            out.append(e.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
