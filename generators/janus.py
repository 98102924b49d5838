"""Janus / Janus-Pro backend (`transformers.JanusForConditionalGeneration`).

The sequence layout (prompt rows, left padding, positions, classifier-free guidance rows, teacher-forced image
logits, per-image seeded sampling) lives in :mod:`generators.janus_sequence`; this module is the backend class and
its sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from generators.base import (
    GeneratedImage,
    GeneratorConfig,
    base_identity,
    check_prompts_and_seeds,
    parse_settings,
    resolve_device,
    to_pil,
    torch_dtype,
)
from generators.config import ConfigError, option
from generators.janus_sequence import (
    SpecialIds, encode_prompts, image_token_logprobs, sample_image_tokens, unwrap,
)


@dataclass
class JanusSettings:
    """Sampling settings of the Janus backend (keys of ``generator.sampling``)."""

    guidance_scale: float = option(5.0, help="classifier-free guidance scale; 1 disables CFG (Janus-Pro card: 5)")
    temperature: float = option(1.0, help="softmax temperature of image-token sampling")
    top_k: int = option(0, help="keep the k most likely image tokens; 0 keeps all")
    top_p: float = option(1.0, help="nucleus sampling mass; 1 keeps all")
    do_sample: bool = option(True, help="sample image tokens; false takes the argmax (greedy)")
    prompt_template: str = option(
        "{prompt}", help="how a prompt is wrapped before tokenising, e.g. Janus-Pro's chat format; needs {prompt}"
    )

    def __post_init__(self):
        if self.guidance_scale < 1:
            raise ConfigError(
                f"config key 'generator.sampling.guidance_scale': must be >= 1 (1 disables CFG), got "
                f"{self.guidance_scale}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"config key 'generator.sampling.temperature': must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"config key 'generator.sampling.top_k': must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config key 'generator.sampling.top_p': must be in (0, 1], got {self.top_p}")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(
                f"config key 'generator.sampling.prompt_template': {self.prompt_template!r} has no '{{prompt}}'; "
                "add the placeholder where the prompt goes"
            )


class JanusGenerator:
    """Janus / Janus-Pro text-to-image generation behind the :class:`generators.base.Generator` protocol.

    Args:
        config: ``model`` is a hub id (e.g. ``deepseek-community/Janus-Pro-1B``), a local directory, or ``tiny``
            (a seeded tiny model built in-process).
        model, tokenizer: pass already-loaded objects instead of loading ``config.model`` (tests, trainers).
    """

    Settings = JanusSettings

    def __init__(self, config: GeneratorConfig, model=None, tokenizer=None):
        self.config = config
        self.settings: JanusSettings = parse_settings(JanusSettings, config)
        self.device = resolve_device(config.device)
        if model is None:
            model, tokenizer = self._load(config)
        elif tokenizer is None:
            raise ConfigError("JanusGenerator: pass the tokenizer together with the model")
        if config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config.adapter)
            if config.merge_adapter:
                model = model.merge_and_unload()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.ids = SpecialIds.of(unwrap(self.model), tokenizer)

    @staticmethod
    def _load(config: GeneratorConfig):
        if config.model == "tiny":
            from generators.tiny import tiny_janus

            return tiny_janus(seed=0)
        if not config.model:
            raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
        model = JanusForConditionalGeneration.from_pretrained(config.model, dtype=torch_dtype(config.dtype), **kwargs)
        return model, AutoTokenizer.from_pretrained(config.model, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        return unwrap(self.model).config.vision_config.num_image_tokens

    def encode(self, prompts: Sequence[str]):
        """``(input_ids, attention_mask)`` for prompts, with the configured template."""
        return encode_prompts(self.tokenizer, prompts, self.ids, self.settings.prompt_template)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedImage]:
        check_prompts_and_seeds(prompts, seeds)
        out: list[GeneratedImage] = []
        bs = self.config.batch_size
        for i in range(0, len(prompts), bs):
            p, s = list(prompts[i:i + bs]), list(seeds[i:i + bs])
            tokens = self.sample_tokens(p, s)
            for prompt, seed, img, tok in zip(p, s, self.decode(tokens), tokens.tolist()):
                out.append(GeneratedImage(prompt=prompt, seed=int(seed), image=img, tokens=tok))
        return out

    def sample_tokens(self, prompts: Sequence[str], seeds: Sequence[int], settings: JanusSettings | None = None):
        """``(B, T)`` image tokens for one batch (no splitting)."""
        input_ids, mask = self.encode(prompts)
        return sample_image_tokens(self.model, input_ids, mask, seeds, settings or self.settings, self.ids)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor):
        """Image tokens -> PIL images through the model's VQ decoder."""
        pixels = unwrap(self.model).decode_image_tokens(tokens.to(self.device))
        return to_pil(pixels.float().cpu().numpy())

    def logprobs(self, prompts: Sequence[str], image_tokens: torch.Tensor, guidance_scale: float = 1.0):
        """Teacher-forced ``(B, T)`` log-probs of ``image_tokens`` under ``prompts`` (CFG when scale != 1)."""
        input_ids, mask = self.encode(prompts)
        return image_token_logprobs(self.model, input_ids.to(self.device), mask.to(self.device),
                                    image_tokens.to(self.device), self.ids, guidance_scale,
                                    self.settings.temperature)

    def identity(self) -> dict:
        return base_identity(self.config, self.settings)
