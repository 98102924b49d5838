"""The Janus sequence layout: the one home of how Janus lays out prompts, guidance rows, image tokens and questions.

Used by sampling (:class:`generators.janus.JanusGenerator`), teacher-forced scoring and the trainers (through
:class:`JanusLayout`), the understanding probe (:func:`sample_answers`) and the lab-world builder. The padding,
positions, guidance and seeded-sampling conventions every family shares are in :mod:`generators.sequence`.

* Prompt: ``[bos] + tokens(template(prompt)) + [boi]``, followed by the image tokens.
* Text positions are embedded with ``get_input_embeddings()``, image tokens with
  ``prepare_embeddings_for_image_generation``; the hidden state at position ``Lp - 1 + t`` (``Lp`` = prompt
  length including ``boi``) predicts image token ``t`` through ``model.model.generation_head``.
* Classifier-free guidance adds an unconditional row in which every token but bos/boi is replaced by pad
  (attention kept), as transformers' own Janus ``generate`` does. ``benchmarks/bench_sampling.py`` measures the
  cost of the seeded loop against ``model.generate``.
* Questions about an image (the understanding path): ``[bos] + template`` with ``{image}`` =
  ``<begin_of_image>`` + N ``<image_placeholder>`` + ``<end_of_image>``, N the understanding tower's patch count;
  the tower's features of the given pixels fill the placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from generators.base import to_pil
from generators.sequence import (
    ImageTokenLayout, decode_answer, guided, left_pad, next_tokens, positions, sample_text_tokens, seeded_uniforms,
    token_logprobs, unwrap,
)


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


# ------------------------------------------------------------------------------------------------ prompts


def prompt_ids(tokenizer, prompt: str, ids: SpecialIds, template: str = "{prompt}") -> list[int]:
    """``[bos] + tokens(template(prompt)) + [boi]`` (no padding): one prompt row of the layout."""
    return [ids.bos, *tokenizer(template.format(prompt=prompt), add_special_tokens=False).input_ids, ids.boi]


def encode_prompts(tokenizer, prompts: Sequence[str], ids: SpecialIds, template: str = "{prompt}"):
    """:func:`prompt_ids` of each prompt, left-padded. Returns ``(input_ids, attention_mask)``."""
    return left_pad([prompt_ids(tokenizer, p, ids, template) for p in prompts], ids.pad)


def unconditional(input_ids: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """The CFG unconditional rows: every token but bos/boi replaced by pad (the mask is kept as is)."""
    keep = (input_ids == ids.bos) | (input_ids == ids.boi)
    return input_ids.masked_fill(~keep, ids.pad)


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
    return guided(janus.model.generation_head(hidden[:, input_ids.shape[1] - 1:]), guidance_scale)


def image_token_logprobs(
    model, input_ids, attention_mask, image_tokens, ids: SpecialIds | None = None, guidance_scale: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(B, T)`` log-probabilities of the given image tokens (teacher forced); see :func:`image_logits`."""
    logits = image_logits(model, input_ids, attention_mask, image_tokens, ids, guidance_scale)
    return token_logprobs(logits, image_tokens, temperature)


# ----------------------------------------------------------------------------------------------- sampling


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
        nxt = next_tokens(head(out.last_hidden_state[:, -1]), uniforms[:, t], settings)
        tokens[:, t] = nxt
        if t == n_tok - 1:
            break
        step = nxt.repeat(2) if cfg else nxt
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        position = position + 1
        out = lm(inputs_embeds=janus.prepare_embeddings_for_image_generation(step.unsqueeze(-1)),
                 attention_mask=attention_mask, position_ids=position, past_key_values=cache, use_cache=True)
    return tokens


@dataclass
class JanusLayout(ImageTokenLayout):
    """The Janus layout of one tokenizer and prompt template, on any Janus model (see
    :class:`generators.sequence.ImageTokenLayout`)."""

    tokenizer: object
    ids: SpecialIds
    num_image_tokens: int
    codebook_size: int
    template: str = "{prompt}"

    @classmethod
    def of(cls, model, tokenizer, template: str = "{prompt}") -> "JanusLayout":
        janus = unwrap(model)
        return cls(tokenizer, SpecialIds.of(janus, tokenizer), int(janus.config.vision_config.num_image_tokens),
                   int(janus.config.vq_config.num_embeddings), template)

    @property
    def pad_id(self) -> int:
        return self.ids.pad

    def prompt_ids(self, prompt: str) -> list[int]:
        return prompt_ids(self.tokenizer, prompt, self.ids, self.template)

    def logits(self, model, input_ids, attention_mask, image_tokens, guidance_scale: float = 1.0):
        return image_logits(model, input_ids, attention_mask, image_tokens, self.ids, guidance_scale)

    def sample(self, model, input_ids, attention_mask, seeds, settings):
        return sample_image_tokens(model, input_ids, attention_mask, seeds, settings, self.ids,
                                   self.num_image_tokens)

    @torch.no_grad()
    def decode(self, model, image_tokens):
        pixels = unwrap(model).decode_image_tokens(image_tokens)
        return to_pil(pixels.float().cpu().numpy())


# ------------------------------------------------------------------------------------------- understanding


def num_image_placeholders(model) -> int:
    """Image placeholder tokens per image: the understanding vision tower's patch count."""
    vc = unwrap(model).config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def question_ids(model, tokenizer, question: str, template: str = "{image}{question}") -> list[int]:
    """Token ids of ``[bos] + template`` with ``{image}`` = ``<begin_of_image>`` + N placeholders + ``<end_of_image>``.

    Text segments are tokenised separately (no special tokens added) and the image block is inserted as ids, so
    the tokenizer never splits the special tokens.
    """
    janus = unwrap(model)
    ids = SpecialIds.of(janus, tokenizer)
    eoi = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "eoi_token", None) or "<end_of_image>")
    image = [ids.boi, *[int(janus.config.image_token_id)] * num_image_placeholders(janus), int(eoi)]
    out = [ids.bos]
    for i, part in enumerate(template.split("{image}")):
        if i:
            out += image
        text = part.replace("{question}", question)
        if text:
            out += tokenizer(text, add_special_tokens=False).input_ids
    return out


def answer_rows(model, tokenizer, pairs: Sequence[tuple[str, str]], template: str = "{image}{question}"):
    """Teacher-forced rows that answer questions about an image: ``(input_ids, attention_mask, labels)``.

    Each row is :func:`question_ids` followed by ``tokens(answer) + [<eos>]``, left-padded; labels cover the answer
    and ``<eos>`` only (-100 elsewhere). Used to plant answers (the lab world, the tests' ground truth).
    """
    rows, n_answer = [], []
    for question, answer in pairs:
        tail = [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(question_ids(model, tokenizer, question, template) + tail)
        n_answer.append(len(tail))
    input_ids, mask = left_pad(rows, tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, -100)
    for i, k in enumerate(n_answer):
        labels[i, -k:] = input_ids[i, -k:]
    return input_ids, mask, labels


def blank_pixel_values(model, n: int, color: str = "white", mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None):
    """``(n, 3, S, S)`` pixel values of a blank image for the understanding vision tower (S = its image size)."""
    size = unwrap(model).config.vision_config.image_size
    value = {"white": 1.0, "black": 0.0, "gray": 0.5}[color]
    mean = torch.tensor(list(mean or [0.5] * 3), dtype=torch.float32)
    std = torch.tensor(list(std or [0.5] * 3), dtype=torch.float32)
    # A constant image is unchanged by resizing, so normalising the constant is exactly what a processor does.
    pixel = (value - mean) / std
    return pixel.view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()


def sample_answers(model, tokenizer, questions: Sequence[str], seeds: Sequence[int],
                   template: str = "{image}{question}", max_new_tokens: int = 12, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, blank: str = "white", mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, batch_size: int = 32) -> list[str]:
    """One answer per (question, seed) about a blank image, through the model's multimodal path (decoded texts).

    Args:
        model: ``JanusForConditionalGeneration`` (optionally PEFT-wrapped).
        tokenizer: its tokenizer.
        questions: question texts (already filled), one per answer.
        seeds: one seed per answer; answer i only uses random numbers drawn from ``seeds[i]``.
        template, max_new_tokens, temperature, top_k, top_p, blank, batch_size: see
            ``debias.locate.understanding.UnderstandingConfig``.
        mean, std: pixel normalisation of the understanding tower (default 0.5 / 0.5, Janus-Pro's processor).
    """
    janus = unwrap(model)
    device = janus.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    cache_ids: dict[str, list[int]] = {}
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs, ss = list(questions[start:start + batch_size]), list(seeds[start:start + batch_size])
        rows = [cache_ids.setdefault(q, question_ids(janus, tokenizer, q, template)) for q in qs]
        input_ids, mask = left_pad(rows, pad)
        pixels = blank_pixel_values(janus, len(rows), blank, mean, std).to(device, janus.dtype)
        gen = sample_text_tokens(
            janus, input_ids.to(device), mask.to(device), ss, max_new_tokens, temperature, top_k, top_p,
            eos_id=eos, pad_id=pad, pixel_values=pixels,
        ).cpu().tolist()
        answers += [decode_answer(tokenizer, row, eos) for row in gen]
    return answers

