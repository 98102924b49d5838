"""What every image-token family shares: padding, positions, seeded sampling, and the generator built on a layout.

A family (Janus in :mod:`generators.janus_sequence`, Emu3 in :mod:`generators.emu3_sequence`) describes how its
prompts and image tokens are laid out by subclassing :class:`ImageTokenLayout`; :class:`ImageTokenGenerator` turns
a layout into a backend with the ``image_tokens`` and ``token_scores`` capabilities (:mod:`generators.base`), and
the trainers (``debias.train``) score, sample and decode their PEFT-wrapped policy through the same layout.

* Image tokens are codebook ids ``(B, T)`` in ``[0, codebook_size)``, whatever ids the family's language model
  reads them as (Janus: separate generation embeddings; Emu3: ordinary vocabulary entries plus line breaks).
* Batches are left-padded with ``pad``, attention 0 on the padding, and ``position_ids = cumsum(mask) - 1``
  (clamped at 0), so a row's positions do not depend on its padding.
* Classifier-free guidance combines raw logits as ``uncond + g * (cond - uncond)``.
* Sampling draws each image's (or answer's) random numbers from a generator seeded with its own seed and picks
  tokens by inverse-CDF lookup, so a sample does not depend on the batch it was drawn in (``model.generate``
  samples the whole batch from the global RNG).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from generators.base import (
    GeneratedImage, base_identity, check_adapter, check_prompts_and_seeds, check_weights, generator_provenance,
    resolve_device, resolve_dtype,
)
from generators.config import ConfigError, option



@dataclass
class TokenSampling:
    """The sampling settings every image-token backend has (keys of ``generator.sampling``); a backend's Settings
    extend them."""

    guidance_scale: float = option(5.0, help="classifier-free guidance scale; 1 disables CFG")
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


def unwrap(model):
    """The model under a PEFT wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if is_peft_model(model) else model


def is_peft_model(model) -> bool:
    """True for a PEFT-wrapped model. Without peft imported there can be none, so peft (slow to import) stays
    off the sampling path."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def load_adapter(model, adapter: str | None, merge: bool):
    """``model`` with the PEFT adapter folder ``adapter`` applied (and merged into the weights when ``merge``)."""
    if not adapter:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter)
    return model.merge_and_unload() if merge else model


# ------------------------------------------------------------------------------------------------ padding


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to one width: ``(input_ids, attention_mask)`` with attention 0 on the padding."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, r in enumerate(rows):
        if len(r):
            input_ids[n, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[n, width - len(r):] = 1
    return input_ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: ``(cumsum(mask) - 1).clamp(min=0)``."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------- sampling


def guided(logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on stacked ``[cond; uncond]`` rows: ``uncond + g * (cond - uncond)`` (B rows).

    With ``guidance_scale == 1`` the rows are the conditional ones alone and are returned as they are."""
    if guidance_scale == 1.0:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering: dropped entries become ``-inf``; ``top_k=0`` / ``top_p=1`` keep all.

    This is the distribution sampling draws from (after dividing by the temperature), so probes that need
    "exactly the distribution a token was drawn from" apply it to teacher-forced logits too.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def seeded_uniforms(seeds: Sequence[int], n: int, device) -> torch.Tensor:
    """``(B, n)`` float64 uniforms; row i comes only from a generator seeded with ``seeds[i]``."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds]).to(device)


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row by inverse-CDF lookup of ``uniforms`` (B,) in the filtered, tempered softmax of ``logits``.

    Inverse-CDF sampling from per-row uniform streams keeps every sample independent of its batch-mates.
    """
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1).double()
    cdf = probs.cumsum(-1)
    u = (uniforms * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def next_tokens(logits: torch.Tensor, uniforms: torch.Tensor, settings) -> torch.Tensor:
    """The next image token of each row from stacked ``[cond; uncond]`` logits (``settings``: ``guidance_scale``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``): guided, then drawn with ``uniforms`` or the argmax."""
    logits = guided(logits.float(), settings.guidance_scale)
    if settings.do_sample:
        return draw(logits, uniforms, settings.temperature, settings.top_k, settings.top_p)
    return logits.argmax(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(B, T)`` log-probabilities of ``tokens`` under tempered ``(B, T, V)`` logits."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_text_tokens(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: Sequence[int], max_new_tokens: int,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
    **prefill: Any,
) -> torch.Tensor:
    """Sample text continuations through the language head with a KV cache (the understanding path).

    The prefill runs the full model forward with ``prefill`` (e.g. ``pixel_values``, and Emu3's ``image_sizes``),
    so image placeholders in ``input_ids`` are filled by the model's own image path; row i uses only random numbers
    drawn from ``seeds[i]``.

    Args:
        model: a multimodal causal LM (optionally PEFT-wrapped) whose forward returns ``logits``.
        input_ids, attention_mask: ``(B, L)`` left-padded rows (:func:`left_pad`), on the model's device.
        seeds: one seed per row.
        max_new_tokens: most tokens generated per row.
        temperature, top_k, top_p: as in :func:`draw`.
        eos_id: a row stops at this token; later positions hold ``pad_id``.
        pad_id: filler after a row has stopped.
        **prefill: further inputs of the first forward (``None`` values are dropped: a text-only prompt).

    Returns:
        ``(B, n)`` new token ids, ``n <= max_new_tokens`` (the loop ends once every row has stopped).
    """
    from transformers import DynamicCache

    lm = unwrap(model)
    device = input_ids.device
    uniforms = seeded_uniforms(seeds, max_new_tokens, device)
    cache = DynamicCache()
    position = positions(attention_mask)
    extra = {k: v for k, v in prefill.items() if v is not None}
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position,
             past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
    position = position[:, -1:]
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=device)
    new = []
    for t in range(max_new_tokens):
        nxt = draw(out.logits[:, -1].float(), uniforms[:, t], temperature, top_k, top_p).masked_fill(done, pad_id)
        new.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(input_ids), 1))], dim=1)
        position = position + 1
        out = lm(input_ids=nxt.unsqueeze(-1), attention_mask=attention_mask, position_ids=position,
                 past_key_values=cache, use_cache=True)
    return torch.stack(new, dim=1)


def decode_answer(tokenizer, row: Sequence[int], eos: int | None) -> str:
    """A sampled answer's text: the tokens before the first ``eos``, special tokens dropped."""
    row = list(row)
    if eos is not None and eos in row:
        row = row[:row.index(eos)]
    return tokenizer.decode(row, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------- layout


class ImageTokenLayout:
    """How one model family lays out prompts and image tokens; every method works on any model of the family
    (the generator's own, or a PEFT-wrapped policy being trained, whose gradients then reach the LoRA weights).

    Attributes:
        pad_id: the padding token of prompt rows.
        num_image_tokens: image tokens T per image.
        codebook_size: V, image token ids lie in ``[0, V)``.
    """

    pad_id: int
    num_image_tokens: int
    codebook_size: int

    def prompt_ids(self, prompt: str) -> list[int]:
        """One prompt row (template applied, no padding): everything the image tokens follow."""
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``: :meth:`prompt_ids` of each prompt, left-padded."""
        return left_pad([self.prompt_ids(p) for p in prompts], self.pad_id)

    def logits(self, model, input_ids, attention_mask, image_tokens, guidance_scale: float = 1.0) -> torch.Tensor:
        """Teacher-forced ``(B, T, V)`` codebook logits: row t scores image token t given the prompt and tokens
        ``< t``, combined with the unconditional rows as in sampling when ``guidance_scale != 1``."""
        raise NotImplementedError

    def logprobs(self, model, input_ids, attention_mask, image_tokens, guidance_scale: float = 1.0,
                 temperature: float = 1.0) -> torch.Tensor:
        """``(B, T)`` teacher-forced log-probabilities of ``image_tokens`` (see :meth:`logits`)."""
        return token_logprobs(self.logits(model, input_ids, attention_mask, image_tokens, guidance_scale),
                              image_tokens, temperature)

    def sample(self, model, input_ids, attention_mask, seeds: Sequence[int], settings) -> torch.Tensor:
        """``(B, T)`` image tokens; image i uses only random numbers drawn from ``seeds[i]``. ``settings`` has
        ``guidance_scale``, ``do_sample``, ``temperature``, ``top_k`` and ``top_p``."""
        raise NotImplementedError

    def decode(self, model, image_tokens: torch.Tensor) -> list:
        """Image tokens -> PIL images through the model's VQ decoder."""
        raise NotImplementedError


class ImageTokenGenerator:
    """A :class:`generators.base.Generator` built on an :class:`ImageTokenLayout`: what every image-token backend
    shares (batching, the ``image_tokens`` and ``token_scores`` capability methods, adapters, components).

    A subclass sets ``self.config``, ``self.settings``, ``self.model``, ``self.tokenizer`` and ``self.layout`` and
    the class attributes ``COMPONENTS`` / ``component_roles`` (and whatever further capabilities it has).
    """

    COMPONENTS: dict[str, list[str]] = {}

    def _resolve(self, config, model) -> None:
        """Set the resolved ``dtype`` (``auto`` differs per device) before the weights load."""
        self.dtype = resolve_dtype(config.dtype, resolve_device(config.device))
        # Weights with no folder or hub snapshot to name them (built in-process, handed in) are fingerprinted.
        self._in_process = model is not None or config.model == "tiny"

    @classmethod
    def check_config(cls, config, settings) -> None:
        """What loading ``config`` would reject, without loading: the model folder, its weights and the adapter."""
        if config.model != "tiny":
            if not config.model:
                raise ConfigError("config key 'generator.model' is required: a hub id, a local directory or 'tiny'")
            check_weights(config.model, "generator.model", config.allow_pickle, marker="config.json")
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle)

    @staticmethod
    def _prepare(config, model):
        """``model`` with ``config.adapter`` applied (safetensors unless ``allow_pickle``), on ``config.device``, in
        eval mode."""
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle)
        return load_adapter(model, config.adapter, config.merge_adapter).to(resolve_device(config.device)).eval()

    @property
    def device(self) -> str:
        return str(unwrap(self.model).get_input_embeddings().weight.device)

    @property
    def batch_invariant(self) -> bool:
        """In float32 an image's tokens and pixels are the same whatever batch it is drawn in (each image draws
        from its own random stream; measured at real size for Janus-Pro-1B). In bfloat16 / float16 the kernels
        round differently for other batch shapes (Janus-Pro-1B, bf16: logits differ by ~0.05, greedy tokens within
        18 steps), so the run store computes every seed block whole."""
        return self.dtype == "float32"

    @property
    def num_image_tokens(self) -> int:
        return self.layout.num_image_tokens

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    def encode(self, prompts: Sequence[str]):
        """``(input_ids, attention_mask)`` for prompts, with the configured template."""
        return self.layout.encode(prompts)

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

    def sample_tokens(self, prompts: Sequence[str], seeds: Sequence[int], settings=None) -> torch.Tensor:
        """``(B, T)`` image tokens for one batch (no splitting)."""
        input_ids, mask = self.encode(prompts)
        return self.layout.sample(self.model, input_ids, mask, seeds, settings or self.settings)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list:
        """Image tokens -> PIL images through the model's VQ decoder."""
        return self.layout.decode(self.model, tokens.to(self.device))

    def logprobs(self, prompts: Sequence[str], image_tokens: torch.Tensor, guidance_scale: float = 1.0):
        """Teacher-forced ``(B, T)`` log-probs of ``image_tokens`` under ``prompts`` (CFG when scale != 1)."""
        input_ids, mask = self.encode(prompts)
        return self.layout.logprobs(self.model, input_ids.to(self.device), mask.to(self.device),
                                    image_tokens.to(self.device), guidance_scale, self.settings.temperature)

    @torch.no_grad()
    def token_distribution(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, V)``: at each position, the distribution the sampler draws that token from, teacher-forced on
        the given prefix (the configured guidance, temperature, top-k and top-p; one-hot of the argmax if greedy)."""
        s = self.settings
        input_ids, mask = self.encode(prompts)
        logits = self.layout.logits(self.model, input_ids.to(self.device), mask.to(self.device),
                                    image_tokens.to(self.device), s.guidance_scale).float()
        if not s.do_sample:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return filter_logits(logits / s.temperature, s.top_k, s.top_p).softmax(-1)

    def components(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.COMPONENTS.items()}

    def module_root(self, model=None):
        """The model whose modules :meth:`components` names: this generator's, or ``model`` (a model of the same
        architecture; an unmerged PEFT model is merged into a copy)."""
        if model is None:
            return unwrap(self.model)
        if is_peft_model(model):
            return copy.deepcopy(model).merge_and_unload()
        return model

    def identity(self) -> dict:
        return base_identity(self.config, self.settings, self.dtype)

    def provenance(self) -> dict:
        return generator_provenance(self, module=self.model if self._in_process else None)
