"""The Janus sequence layout: the one home of how prompts, guidance rows, positions and image tokens are laid out.

Used by sampling (:class:`generators.janus.JanusGenerator`), teacher-forced scoring and the trainers
(``debias.train``: prompt ids and left padding in the collators), the locate probes and the lab-world builder.

* Prompt: ``[bos] + tokens(template(prompt)) + [boi]``, followed by the image tokens.
* Batches are left-padded with ``pad``, attention 0 on the padding, and ``position_ids = cumsum(mask) - 1``
  (clamped at 0), so a row's positions do not depend on its padding.
* Text positions are embedded with ``get_input_embeddings()``, image tokens with
  ``prepare_embeddings_for_image_generation``; the hidden state at position ``Lp - 1 + t`` (``Lp`` = prompt
  length including ``boi``) predicts image token ``t`` through ``model.model.generation_head``.
* Classifier-free guidance adds an unconditional row in which every token but bos/boi is replaced by pad
  (attention kept), as transformers' own Janus ``generate`` does, and combines raw logits as
  ``uncond + g * (cond - uncond)``.
* Sampling draws each image's (or answer's) random numbers from a generator seeded with its own seed and picks
  tokens by inverse-CDF lookup, so a sample does not depend on the batch it was drawn in (``model.generate``
  samples the whole batch from the global RNG). ``benchmarks/bench_sampling.py`` measures the cost of this loop
  against ``model.generate``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids of the layout: begin of sequence, padding, begin of image."""

    bos: int
    pad: int
    boi: int

    @classmethod
    def of(cls, model, tokenizer) -> "SpecialIds":
        """Read the ids from the model's generation config, falling back to the tokenizer's."""
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
    return model.get_base_model() if is_peft_model(model) else model


def is_peft_model(model) -> bool:
    """True for a PEFT-wrapped model. Without peft imported there can be none, so peft (slow to import) stays
    off the sampling path."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# ------------------------------------------------------------------------------------------------ prompts


def prompt_ids(tokenizer, prompt: str, ids: SpecialIds, template: str = "{prompt}") -> list[int]:
    """``[bos] + tokens(template(prompt)) + [boi]`` (no padding): one prompt row of the layout."""
    return [ids.bos, *tokenizer(template.format(prompt=prompt), add_special_tokens=False).input_ids, ids.boi]


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


def encode_prompts(tokenizer, prompts: Sequence[str], ids: SpecialIds, template: str = "{prompt}"):
    """:func:`prompt_ids` of each prompt, left-padded. Returns ``(input_ids, attention_mask)``."""
    return left_pad([prompt_ids(tokenizer, p, ids, template) for p in prompts], ids.pad)


def unconditional(input_ids: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """The CFG unconditional rows: every token but bos/boi replaced by pad (the mask is kept as is)."""
    keep = (input_ids == ids.bos) | (input_ids == ids.boi)
    return input_ids.masked_fill(~keep, ids.pad)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: ``(cumsum(mask) - 1).clamp(min=0)``."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------ scoring


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
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)
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


# ----------------------------------------------------------------------------------------------- sampling


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


@torch.no_grad()
def sample_image_tokens(
    model, input_ids, attention_mask, seeds: Sequence[int], settings, ids: SpecialIds,
    num_image_tokens: int | None = None,
) -> torch.Tensor:
    """Sample ``(B, T)`` image tokens with a KV cache; image i uses only random numbers drawn from ``seeds[i]``.

    Args:
        model: ``JanusForConditionalGeneration`` (optionally PEFT-wrapped).
        input_ids, attention_mask: ``(B, Lp)`` prompts from :func:`encode_prompts`.
        seeds: one seed per row.
        settings: the sampling settings, :class:`generators.janus.JanusSettings` (``guidance_scale``,
            ``temperature``, ``top_k``, ``top_p``, ``do_sample``).
        ids: special token ids (the unconditional rows).
        num_image_tokens: tokens per image (default: the model's grid).
    """
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
    uniforms = seeded_uniforms(seeds, n_tok, device)
    lm, head = janus.model.language_model, janus.model.generation_head
    cache = DynamicCache()
    out = lm(inputs_embeds=janus.get_input_embeddings()(input_ids), attention_mask=attention_mask,
             position_ids=positions(attention_mask), past_key_values=cache, use_cache=True)
    position = positions(attention_mask)[:, -1:]
    tokens = torch.empty((B, n_tok), dtype=torch.long, device=device)
    for t in range(n_tok):
        logits = head(out.last_hidden_state[:, -1]).float()
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + settings.guidance_scale * (cond - uncond)
        if settings.do_sample:
            nxt = draw(logits, uniforms[:, t], settings.temperature, settings.top_k, settings.top_p)
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


@torch.no_grad()
def sample_text_tokens(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: Sequence[int], max_new_tokens: int,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
    pixel_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample text continuations through the language head with a KV cache (the understanding path).

    The prefill runs the full model forward, so image placeholders in ``input_ids`` are filled from
    ``pixel_values`` by the vision tower; row i uses only random numbers drawn from ``seeds[i]``.

    Args:
        model: ``JanusForConditionalGeneration`` (optionally PEFT-wrapped).
        input_ids, attention_mask: ``(B, L)`` left-padded rows (:func:`left_pad`), on the model's device.
        seeds: one seed per row.
        max_new_tokens: most tokens generated per row.
        temperature, top_k, top_p: as in :func:`draw`.
        eos_id: a row stops at this token; later positions hold ``pad_id``.
        pad_id: filler after a row has stopped.
        pixel_values: images for the placeholders (``None``: a text-only prompt).

    Returns:
        ``(B, n)`` new token ids, ``n <= max_new_tokens`` (the loop ends once every row has stopped).
    """
    from transformers import DynamicCache

    janus = unwrap(model)
    device = input_ids.device
    uniforms = seeded_uniforms(seeds, max_new_tokens, device)
    cache = DynamicCache()
    position = positions(attention_mask)
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = janus(input_ids=input_ids, attention_mask=attention_mask, position_ids=position,
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
        out = janus(input_ids=nxt.unsqueeze(-1), attention_mask=attention_mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
    return torch.stack(new, dim=1)
