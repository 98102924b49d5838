"""Janus / Janus-Pro backend (`transformers.JanusForConditionalGeneration`).

Sequence convention, shared by sampling, the teacher-forced log-prob path, the trainers and the lab world:
``[bos] + tokens(prompt) + [boi]`` followed by the image tokens; batches are left-padded with attention 0 on the
padding and ``position_ids = cumsum(attention_mask) - 1``. Classifier-free guidance uses an unconditional row in
which every token but bos/boi is replaced by pad (attention kept), as transformers' own ``generate`` does, and
combines raw logits as ``uncond + g * (cond - uncond)``.

Sampling runs its own cached decoding loop instead of ``model.generate``: each image draws its random numbers
from a generator seeded with its own seed, so an image does not depend on the batch it was drawn in (``generate``
samples the whole batch from the global RNG). ``benchmarks/bench_sampling.py`` measures the cost against
``model.generate`` on the same model and batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from generators.base import (
    COMPONENTS,
    IMAGE_ENCODERS,
    IMAGE_TOKENS,
    TOKEN_SCORES,
    UNDERSTANDING,
    GeneratedImage,
    GeneratorConfig,
    base_identity,
    check_prompts_and_seeds,
    images_to_tensor,
    parse_settings,
    pool_embeddings,
    resolve_device,
    to_pil,
    torch_dtype,
)
from generators.config import ConfigError, UserError, option


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


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    pad: int
    boi: int

    @classmethod
    def of(cls, model, tokenizer) -> "SpecialIds":
        gen = model.generation_config
        kwargs = getattr(gen, "generation_kwargs", None) or {}
        boi = kwargs.get("boi_token_id")
        if boi is None:
            boi = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "boi_token", "<begin_of_image>"))
        bos = gen.bos_token_id if gen.bos_token_id is not None else tokenizer.bos_token_id
        pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        return cls(bos=int(bos), pad=int(pad), boi=int(boi))


def unwrap(model):
    """The Janus model under a PEFT wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_prompts(tokenizer, prompts: Sequence[str], ids: SpecialIds, template: str = "{prompt}"):
    """Tokenise ``[bos] + prompt + [boi]`` for each prompt, left-padded. Returns ``(input_ids, attention_mask)``."""
    rows = [
        [ids.bos, *tokenizer(template.format(prompt=p), add_special_tokens=False).input_ids, ids.boi]
        for p in prompts
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), ids.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def unconditional(input_ids: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """The CFG unconditional rows: every token but bos/boi replaced by pad (the mask is kept as is)."""
    keep = (input_ids == ids.bos) | (input_ids == ids.boi)
    return input_ids.masked_fill(~keep, ids.pad)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def image_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
    ids: SpecialIds | None = None, guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced logits over the image codebook for each given image token.

    Args:
        model: ``JanusForConditionalGeneration`` (optionally PEFT-wrapped; gradients flow to LoRA weights).
        input_ids, attention_mask: ``(B, Lp)`` prompts from :func:`encode_prompts`.
        image_tokens: ``(B, T)`` codebook ids.
        ids: special token ids; needed when ``guidance_scale != 1``.
        guidance_scale: 1 gives the conditional logits; otherwise ``uncond + g * (cond - uncond)`` as in sampling.

    Returns:
        ``(B, T, codebook)`` logits; row t scores image token t given the prompt and tokens ``< t``.
    """
    janus = unwrap(model)
    cfg = guidance_scale != 1.0
    if cfg:
        if ids is None:
            raise ValueError("image_logits: pass `ids` (SpecialIds) when guidance_scale != 1")
        input_ids = torch.cat([input_ids, unconditional(input_ids, ids)])
        attention_mask = torch.cat([attention_mask, attention_mask])
        image_tokens = torch.cat([image_tokens, image_tokens])
    text = janus.get_input_embeddings()(input_ids)
    image = janus.prepare_embeddings_for_image_generation(image_tokens[:, :-1])
    embeds = torch.cat([text, image.to(text.dtype)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(image_tokens[:, :-1].shape)], dim=1)
    hidden = janus.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask)
    ).last_hidden_state
    logits = janus.model.generation_head(hidden[:, input_ids.shape[1] - 1:])
    if cfg:
        cond, uncond = logits.chunk(2)
        logits = uncond + guidance_scale * (cond - uncond)
    return logits


def image_token_logprobs(
    model, input_ids, attention_mask, image_tokens, ids: SpecialIds | None = None, guidance_scale: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(B, T)`` log-probabilities of the given image tokens (teacher forced); see :func:`image_logits`."""
    logits = image_logits(model, input_ids, attention_mask, image_tokens, ids, guidance_scale)
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, image_tokens.unsqueeze(-1)).squeeze(-1)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def sample_image_tokens(
    model, input_ids, attention_mask, seeds: Sequence[int], settings: JanusSettings, ids: SpecialIds,
    num_image_tokens: int | None = None,
) -> torch.Tensor:
    """Sample ``(B, T)`` image tokens with a KV cache; image i uses only random numbers drawn from ``seeds[i]``."""
    from transformers import DynamicCache

    janus = unwrap(model)
    n_tok = num_image_tokens or janus.config.vision_config.num_image_tokens
    device = janus.get_input_embeddings().weight.device
    B = input_ids.shape[0]
    cfg = settings.guidance_scale != 1.0
    if cfg:
        input_ids = torch.cat([input_ids, unconditional(input_ids, ids)])
        attention_mask = torch.cat([attention_mask, attention_mask])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Inverse-CDF sampling from per-image uniform streams keeps every image independent of its batch-mates.
    uniforms = torch.stack([torch.rand(n_tok, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                            for s in seeds]).to(device)
    lm, head = janus.model.language_model, janus.model.generation_head
    cache = DynamicCache()
    out = lm(inputs_embeds=janus.get_input_embeddings()(input_ids), attention_mask=attention_mask,
             position_ids=_positions(attention_mask), past_key_values=cache, use_cache=True)
    position = _positions(attention_mask)[:, -1:]
    tokens = torch.empty((B, n_tok), dtype=torch.long, device=device)
    for t in range(n_tok):
        logits = head(out.last_hidden_state[:, -1]).float()
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + settings.guidance_scale * (cond - uncond)
        if settings.do_sample:
            probs = _filter(logits / settings.temperature, settings.top_k, settings.top_p).softmax(-1).double()
            cdf = probs.cumsum(-1)
            u = (uniforms[:, t] * cdf[:, -1]).unsqueeze(-1)
            nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        else:
            nxt = logits.argmax(-1)
        tokens[:, t] = nxt
        if t == n_tok - 1:
            break
        step = nxt.repeat(2) if cfg else nxt
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        position = position + 1
        out = lm(inputs_embeds=janus.prepare_embeddings_for_image_generation(step.unsqueeze(-1)),
                 attention_mask=attention_mask, position_ids=position, past_key_values=cache, use_cache=True)
    return tokens


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
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return _filter(logits / s.temperature, s.top_k, s.top_p).softmax(-1)

    def components(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.COMPONENTS.items()}

    def module_root(self, model=None):
        """The Janus model whose modules :meth:`components` names: this generator's, or ``model`` (a generator's
        model of the same architecture; an unmerged PEFT model is merged into a copy)."""
        if model is None:
            return unwrap(self.model)
        from peft import PeftModel

        if isinstance(model, PeftModel):
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
