"""Emu3 backend (`transformers.Emu3ForConditionalGeneration`): image tokens are ordinary vocabulary entries.

The sequence layout (prompt rows with the image size, the line-break-per-row body, negative-prompt guidance rows,
teacher-forced logits, per-image seeded constrained sampling, questions about an image) lives in
:mod:`generators.emu3_sequence`; this module is the backend class and its sampling settings.

Emu3 ships separate checkpoints for generation (``BAAI/Emu3-Gen-hf``) and understanding (``BAAI/Emu3-Chat-hf``);
one backend serves both (``locate.understanding.model`` names the chat checkpoint for the understanding probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
from generators.emu3_sequence import RATIO, Emu3Ids, Emu3Layout, image_grid, sample_answers, visual_ids
from generators.sequence import ImageTokenGenerator, TokenSampling, unwrap

# The BAAI/Emu3-Gen model card's negative prompt (its guidance rows).
CARD_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, "
    "low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)


@dataclass
class Emu3Settings(TokenSampling):
    """Sampling settings of the Emu3 backend (keys of ``generator.sampling``); defaults from the BAAI/Emu3-Gen card."""

    guidance_scale: float = option(3.0, help="classifier-free guidance scale against the negative prompt; 1 disables "
                                             "CFG (Emu3-Gen card: 3)")
    top_k: int = option(2048, help="keep the k most likely image tokens; 0 keeps all (Emu3-Gen card: 2048)")
    negative_prompt: str = option(CARD_NEGATIVE_PROMPT, help="text of the guidance rows (Emu3-Gen card's by "
                                                             "default; empty = no text)")
    ratio: str = option("1:1", help="aspect ratio W:H of the generated image")
    image_area: int = option(518400, help="pixel area of the generated image; with ratio it sets the token grid "
                                          "(transformers' Emu3Processor; 518400 = 720 x 720, 90 x 90 tokens)")

    def __post_init__(self):
        super().__post_init__()
        if not RATIO.match(self.ratio):
            raise ConfigError(f"config key 'generator.sampling.ratio': must be 'W:H' with positive integers, e.g. "
                              f"'1:1' or '16:9', got {self.ratio!r}")
        if self.image_area < 1:
            raise ConfigError(f"config key 'generator.sampling.image_area': must be >= 1, got {self.image_area}")


class Emu3Generator(ImageTokenGenerator):
    """Emu3 text-to-image generation behind the :class:`generators.base.Generator` protocol.

    Every capability of :data:`generators.base.CAPABILITIES`: image tokens from one causal LM whose vocabulary holds
    the VQ codebook, their teacher-forced scores (the stock causal-LM path: ordinary embeddings, ``lm_head``),
    the understanding (chat) path, separable language and vision sides, and two image encoders (the VQ encoder's
    latents and the language model's embeddings of its tokens).

    Args:
        config: ``model`` is a hub id (``BAAI/Emu3-Gen-hf``), a local directory (model and processor saved with
            ``save_pretrained``), or ``tiny`` (a seeded tiny model built in-process).
        model, processor: pass already-loaded objects (an ``Emu3Processor``) instead of loading ``config.model``.
    """

    Settings = Emu3Settings
    capabilities = frozenset({IMAGE_TOKENS, TOKEN_SCORES, UNDERSTANDING, COMPONENTS, IMAGE_ENCODERS})
    # The image tokens' embeddings and output rows are part of the text vocabulary (model.text_model.embed_tokens,
    # lm_head), so the generation side cannot be split from the text model as Janus' generation head can; the VQ
    # model is the separable vision side (its encoder only reads images for understanding).
    COMPONENTS = {"language": ["model.text_model", "lm_head"], "vision": ["model.vqmodel"]}
    component_roles = {
        "language": "the causal language model with its vocabulary, visual tokens included (text model, lm_head)",
        "vision": "the VQ tokenizer/decoder that turns image tokens into pixels",
    }
    ENCODERS = {
        "vq": "VQ encoder (vqmodel.encode), latents before quantisation",
        "embedded": "the language model's input embeddings of the VQ tokens (what the language model reads)",
    }

    def __init__(self, config: GeneratorConfig, model=None, processor=None):
        self.config = config
        self.settings: Emu3Settings = parse_settings(Emu3Settings, config)
        self._resolve(config, model)
        if model is None:
            model, processor = self._load(config, self.dtype)
        elif processor is None:
            raise ConfigError("Emu3Generator: pass the processor (Emu3Processor) together with the model")
        self.model = self._prepare(config, model)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        root = unwrap(self.model)
        s = self.settings
        grid = image_grid(s.ratio, s.image_area, root.model.vqmodel.vision_spatial_factor)
        if min(grid) < 1:
            f = root.model.vqmodel.vision_spatial_factor
            raise ConfigError(f"config key 'generator.sampling.image_area': {s.image_area} pixels at ratio {s.ratio} "
                              f"give a {grid[0]} x {grid[1]} token grid; raise it (one token is {f} x {f} pixels)")
        self.ids = Emu3Ids.of(root, self.tokenizer)
        self.layout = Emu3Layout(self.tokenizer, self.ids, grid, visual_ids(root), s.prompt_template,
                                 s.negative_prompt, self.image_processor)

    @staticmethod
    def _load(config: GeneratorConfig, dtype: str):
        if config.model == "tiny":
            from generators.tiny import tiny_emu3

            model, processor = tiny_emu3(seed=0)
            return model.to(torch_dtype(dtype)), processor
        if not config.model:
            raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
        from transformers import AutoProcessor, Emu3ForConditionalGeneration

        check_weights(config.model, "generator.model", config.allow_pickle, marker="config.json")
        # Safetensors only unless pickles are allowed: a hub repo with only pickled weights then fails to load.
        kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
        try:
            model = Emu3ForConditionalGeneration.from_pretrained(
                config.model, dtype=torch_dtype(dtype), variant=config.variant,
                use_safetensors=None if config.allow_pickle else True, **kwargs)
            processor = AutoProcessor.from_pretrained(config.model, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(f"config key 'generator.model': cannot load {config.model!r} ({first_line(err)}); pass "
                            "a local folder with safetensors weights or a hub id reachable from here") from None
        return model, processor

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of every generated image: the token grid times the VQ's upsampling."""
        f = unwrap(self.model).model.vqmodel.spatial_scale_factor
        return self.layout.grid[0] * f, self.layout.grid[1] * f

    def answer(self, questions: Sequence[str], seeds: Sequence[int], *, template: str = "{image}{question}",
               max_new_tokens: int = 12, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               blank: str = "white", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               batch_size: int = 32) -> list[str]:
        """One sampled answer per (question, seed) about a blank image (see
        :func:`generators.emu3_sequence.sample_answers`); ``mean``/``std`` default to the model's image processor."""
        return sample_answers(self.model, self.tokenizer, self.image_processor, questions, seeds, template,
                              max_new_tokens, temperature, top_k, top_p, blank, mean, std, batch_size)

    def image_encoders(self) -> dict[str, str]:
        return dict(self.ENCODERS)

    @torch.no_grad()
    def embed_images(self, images: Sequence, encoder: str, pool: str = "mean", batch_size: int = 32,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
        """``(n, d)`` float32 embeddings of PIL ``images`` from one of :meth:`image_encoders`.

        Images are resized to the smallest square the image processor keeps (``sqrt(min_pixels)``, what the
        understanding path reads) and normalised with ``mean``/``std`` (default: the image processor's).
        """
        if encoder not in self.ENCODERS:
            raise UserError(f"config key 'locate.vision.encoders': backend '{self.config.backend}' has no encoder "
                            f"{encoder!r}; available: {list(self.ENCODERS)}")
        root = unwrap(self.model)
        ip = self.image_processor
        side = int(math.isqrt(int(ip.min_pixels)))
        side -= side % root.model.vqmodel.vision_spatial_factor
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = images_to_tensor(chunk, side, mean=list(mean or ip.image_mean),
                                 std=list(std or ip.image_std)).to(self.device, root.dtype)
            sizes = torch.tensor([[side, side]] * len(chunk), device=self.device)
            if encoder == "vq":
                latents = root.model.vqmodel.encode(x, sizes).last_hidden_state[:, 0]  # (n, C, h, w): one frame
                e = pool_embeddings(latents, pool, channels_first=True)
            else:
                tokens = torch.stack(root.model.get_image_features(x, sizes).pooler_output)  # (n, h (w + 1), D)
                e = pool_embeddings(tokens, pool, channels_first=False)
            out.append(e.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
