"""Janus / Janus-Pro backend (`transformers.JanusForConditionalGeneration`).

The sequence layout (prompt rows, left padding, positions, classifier-free guidance rows, teacher-forced image
logits, per-image seeded sampling) lives in :mod:`generators.janus_sequence`; this module is the backend class and
its sampling settings.
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
    GeneratedImage,
    GeneratorConfig,
    base_identity,
    check_adapter,
    check_prompts_and_seeds,
    check_weights,
    images_to_tensor,
    parse_settings,
    pool_embeddings,
    resolve_device,
    to_pil,
    torch_dtype,
)
from generators.config import ConfigError, UserError, option
from generators.janus_sequence import (
    SpecialIds, encode_prompts, filter_logits, image_logits, image_token_logprobs, is_peft_model, sample_image_tokens,
    unwrap,
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class JanusGenerator:
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
        self.device = resolve_device(config.device)
        if model is None:
            model, tokenizer = self._load(config)
        elif tokenizer is None:
            raise ConfigError("JanusGenerator: pass the tokenizer together with the model")
        if config.adapter:
            from peft import PeftModel

            check_adapter(config.adapter, "generator.adapter", config.allow_pickle)
            model = PeftModel.from_pretrained(model, config.adapter)
            if config.merge_adapter:
                model = model.merge_and_unload()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.ids = SpecialIds.of(unwrap(self.model), tokenizer)
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

    @classmethod
    def check_config(cls, config: GeneratorConfig, settings: JanusSettings) -> None:
        """What loading ``config`` would reject, without loading: the model folder, its weights and the adapter."""
        if config.model != "tiny":
            if not config.model:
                raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
            check_weights(config.model, "generator.model", config.allow_pickle, marker="config.json")
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle)

    @staticmethod
    def _load(config: GeneratorConfig):
        if config.model == "tiny":
            from generators.tiny import tiny_janus

            return tiny_janus(seed=0)
        if not config.model:
            raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
        check_weights(config.model, "generator.model", config.allow_pickle, marker="config.json")
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        # Safetensors only unless pickles are allowed: a hub repo with only pickled weights then fails to load.
        kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
        try:
            model = JanusForConditionalGeneration.from_pretrained(
                config.model, dtype=torch_dtype(config.dtype), use_safetensors=None if config.allow_pickle else True,
                **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(f"config key 'generator.model': cannot load {config.model!r} ({_first_line(err)}); pass "
                            "a local folder with safetensors weights or a hub id reachable from here") from None
        return model, tokenizer

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

    @property
    def codebook_size(self) -> int:
        return int(unwrap(self.model).config.vq_config.num_embeddings)

    @torch.no_grad()
    def token_distribution(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, V)``: at each position, the distribution the sampler draws that token from, teacher-forced on
        the given prefix (the configured guidance, temperature, top-k and top-p; one-hot of the argmax if greedy)."""
        s = self.settings
        input_ids, mask = self.encode(prompts)
        tokens = image_tokens.to(self.device)
        logits = image_logits(self.model, input_ids.to(self.device), mask.to(self.device), tokens, self.ids,
                              s.guidance_scale).float()
        if not s.do_sample:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return filter_logits(logits / s.temperature, s.top_k, s.top_p).softmax(-1)

    def components(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.COMPONENTS.items()}

    def module_root(self, model=None):
        """The Janus model whose modules :meth:`components` names: this generator's, or ``model`` (a generator's
        model of the same architecture; an unmerged PEFT model is merged into a copy)."""
        if model is None:
            return unwrap(self.model)
        if is_peft_model(model):
            import copy

            return copy.deepcopy(model).merge_and_unload()
        return model

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

    def identity(self) -> dict:
        return base_identity(self.config, self.settings)
