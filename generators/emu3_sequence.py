"""The Emu3 sequence layout: how Emu3 lays out image-generation prompts, guidance rows, image tokens and questions.

Emu3 (``transformers.Emu3ForConditionalGeneration``) is one causal LM whose vocabulary holds the VQ codebook: code
``c`` is the token ``<|visual token{c:06d}|>``, read by the ordinary input embeddings and scored by the ordinary
``lm_head``. The layout follows transformers' own Emu3 image generation (``Emu3Processor`` with
``return_for_image_generation=True``, and the ``prefix_allowed_tokens_fn`` of its docs and tests):

* Prompt: ``[bos] + tokens(template(prompt)) + [<|image start|>] + tokens("{H}*{W}") + [<|image token|>]``, with
  ``H x W`` the token grid of ``ratio`` and ``image_area`` (:func:`image_grid`).
* Image body: each of the H rows is W visual tokens followed by the line-break token ``<|extra_200|>``; after the
  last row come ``<|extra_201|>`` (end of frame), ``<|image end|>`` and ``<|extra_204|>`` (end of sequence). The
  line breaks and end tokens are forced, so only the H x W visual tokens are sampled, each from the distribution
  restricted to the visual tokens: the constrained decoding transformers' ``prefix_allowed_tokens_fn`` enforces.
* Classifier-free guidance pairs every prompt with the negative prompt laid out the same way (the BAAI/Emu3-Gen
  model card builds it with the same image-generation arguments) and combines raw logits as
  ``uncond + g * (cond - uncond)``; transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` combines
  log-softmaxed scores, which differ from raw logits by one constant per row: the same distribution over the
  allowed tokens, the same argmax. Both rows go through one left-padded batch (positions skip the padding).
* Questions about an image (the understanding path): ``[bos] + template`` with ``{image}`` =
  ``[<|image start|>] + tokens("{h}*{w}") + [<|image token|>] + h (w + 1) x <image> + [<|extra_201|>,
  <|image end|>]``, as ``Emu3Processor`` expands ``<image>``; the model's VQ encoder fills the placeholders.

Padding, positions and the seeded sampling conventions are :mod:`generators.sequence`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from generators.errors import UserError
from generators.sequence import (
    ImageTokenLayout, decode_answer, guided, left_pad, next_tokens, positions, sample_text_tokens, seeded_uniforms,
    unwrap,
)

RATIO = re.compile(r"^([1-9]\d*):([1-9]\d*)$")


def image_grid(ratio: str, image_area: int, spatial_factor: int) -> tuple[int, int]:
    """``(H, W)`` image tokens for an aspect ``ratio`` ("W:H") and a pixel ``image_area``: transformers'
    ``Emu3Processor.calculate_generate_size`` (whose factor 8 is the Emu3 VQ's downsampling; here the model's own)."""
    m = RATIO.match(ratio)
    if m is None:
        raise ValueError(f"ratio must be 'W:H' with positive integers, got {ratio!r}")
    width, height = int(m.group(1)), int(m.group(2))
    target = (image_area / (width * height)) ** 0.5
    return int(round(height * target / spatial_factor)), int(round(width * target / spatial_factor))


def _token_id(tokenizer, attribute: str, token: str) -> int:
    """The id of a named special token of the tokenizer (``tokenizer.<attribute>``), else of ``token``."""
    name = getattr(tokenizer, attribute, None) or token
    tid = tokenizer.convert_tokens_to_ids(name)
    if tid is None or tid == tokenizer.unk_token_id:
        raise UserError(f"config key 'generator.model': its tokenizer has no Emu3 token {name!r} ({attribute}); "
                        "load an Emu3 checkpoint saved with its processor (e.g. BAAI/Emu3-Gen-hf)")
    return int(tid)


@dataclass(frozen=True)
class Emu3Ids:
    """The special token ids of the layout."""

    bos: int
    eos: int
    pad: int
    boi: int  # <|image start|>
    eoi: int  # <|image end|>
    eof: int  # <|extra_201|>: end of the (one-frame) image
    eol: int  # <|extra_200|>: end of a row of the grid
    wrapper: int  # <|image token|>: after the size, before the image body
    image: int  # <image>: a placeholder the VQ encoder's tokens fill (understanding)

    @classmethod
    def of(cls, model, tokenizer) -> "Emu3Ids":
        """Read the ids from the tokenizer's named special tokens and the model's vocabulary map."""
        vocab = unwrap(model).vocabulary_mapping
        gen = unwrap(model).generation_config
        pick = lambda own, fallback: int(own if own is not None else fallback)  # noqa: E731
        return cls(
            bos=pick(gen.bos_token_id, tokenizer.bos_token_id), eos=pick(gen.eos_token_id, tokenizer.eos_token_id),
            pad=pick(gen.pad_token_id, tokenizer.pad_token_id),
            boi=_token_id(tokenizer, "boi_token", "<|image start|>"),
            eoi=_token_id(tokenizer, "eoi_token", "<|image end|>"),
            eof=_token_id(tokenizer, "eof_token", "<|extra_201|>"),
            eol=int(vocab.eol_token_id), wrapper=_token_id(tokenizer, "image_wrapper_token", "<|image token|>"),
            image=int(vocab.image_token_id),
        )


def visual_ids(model) -> torch.Tensor:
    """``(V,)`` language-model ids of the codebook's codes (``<|visual token{c:06d}|>`` for code c)."""
    img2bpe = unwrap(model).vocabulary_mapping.img2bpe
    return torch.tensor([img2bpe[c] for c in range(len(img2bpe))], dtype=torch.long)


def size_ids(tokenizer, grid: tuple[int, int]) -> list[int]:
    """``tokens("{H}*{W}")``: the size text between ``<|image start|>`` and ``<|image token|>``."""
    return tokenizer(f"{grid[0]}*{grid[1]}", add_special_tokens=False).input_ids


@dataclass
class Emu3Layout(ImageTokenLayout):
    """The Emu3 image-generation layout of one tokenizer, grid, template and negative prompt, on any Emu3 model (see
    :class:`generators.sequence.ImageTokenLayout`).

    Attributes:
        tokenizer: the Emu3 tokenizer.
        ids: :class:`Emu3Ids`.
        grid: ``(H, W)`` image tokens.
        visual: ``(V,)`` language-model ids of the codes (:func:`visual_ids`).
        template: the prompt template (``{prompt}``).
        negative_prompt: the text of the guidance rows.
        image_processor: the processor whose ``postprocess`` turns decoded pixels into images.
    """

    tokenizer: object
    ids: Emu3Ids
    grid: tuple[int, int]
    visual: torch.Tensor
    template: str = "{prompt}"
    negative_prompt: str = ""
    image_processor: object = None

    @property
    def pad_id(self) -> int:
        return self.ids.pad

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def codebook_size(self) -> int:
        return len(self.visual)

    def row(self, text: str) -> list[int]:
        """An image-generation row for ``text`` as it is (no template)."""
        ids = self.ids
        return [ids.bos, *self.tokenizer(text, add_special_tokens=False).input_ids, ids.boi,
                *size_ids(self.tokenizer, self.grid), ids.wrapper]

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.row(self.template.format(prompt=prompt))

    def with_negative(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The prompt rows stacked over as many negative-prompt rows, left-padded to one width."""
        neg = torch.tensor(self.row(self.negative_prompt), dtype=torch.long, device=input_ids.device)
        width = max(input_ids.shape[1], len(neg))
        B = input_ids.shape[0]
        ids = input_ids.new_full((2 * B, width), self.ids.pad)
        mask = attention_mask.new_zeros((2 * B, width))
        ids[:B, width - input_ids.shape[1]:], mask[:B, width - input_ids.shape[1]:] = input_ids, attention_mask
        ids[B:, width - len(neg):], mask[B:, width - len(neg):] = neg, 1
        return ids, mask

    def body(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, H (W + 1))`` language-model ids of codes ``(B, H W)``: each row of the grid, then a line break."""
        h, w = self.grid
        rows = self.visual.to(image_tokens.device)[image_tokens].view(-1, h, w)
        eol = rows.new_full((rows.shape[0], h, 1), self.ids.eol)
        return torch.cat([rows, eol], dim=2).flatten(1)

    def __post_init__(self):
        v = self.visual
        # Emu3's vocabulary holds the codes as one contiguous block: then lm_head's rows for them are a view.
        first = int(v[0])
        self._block = (first, first + len(v)) if torch.equal(v, torch.arange(first, first + len(v))) else None

    def visual_logits(self, emu3, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., V)`` logits of the visual tokens alone: the rows of ``lm_head`` for the codebook.

        The weight rows are read directly, so the full-vocabulary logits are never formed; LoRA on ``lm_head``
        itself would be bypassed (the trainers' LoRA scope is the decoder's projections).
        """
        weight = emu3.lm_head.weight
        weight = weight[self._block[0]:self._block[1]] if self._block else weight[self.visual.to(weight.device)]
        return F.linear(hidden, weight)

    def visual_positions(self) -> torch.Tensor:
        """Indices of the visual tokens within :meth:`body` (every position but the line breaks)."""
        h, w = self.grid
        return torch.tensor([r * (w + 1) + c for r in range(h) for c in range(w)], dtype=torch.long)

    def logits(self, model, input_ids, attention_mask, image_tokens, guidance_scale: float = 1.0):
        emu3 = unwrap(model)
        if guidance_scale != 1.0:
            input_ids, attention_mask = self.with_negative(input_ids, attention_mask)
            image_tokens = torch.cat([image_tokens, image_tokens])
        body = self.body(image_tokens)[:, :-1]  # the last line break is never read
        ids = torch.cat([input_ids, body], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(body.shape)], dim=1)
        hidden = emu3.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        at = input_ids.shape[1] - 1 + self.visual_positions().to(hidden.device)
        return guided(self.visual_logits(emu3, hidden[:, at]), guidance_scale)

    @torch.no_grad()
    def sample(self, model, input_ids, attention_mask, seeds, settings):
        from transformers import DynamicCache

        emu3 = unwrap(model)
        device = emu3.get_input_embeddings().weight.device
        B = input_ids.shape[0]
        cfg = settings.guidance_scale != 1.0
        if cfg:
            input_ids, attention_mask = self.with_negative(input_ids, attention_mask)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        h, w = self.grid
        uniforms = seeded_uniforms(seeds, h * w, device)
        visual = self.visual.to(device)
        lm = emu3.model.text_model
        cache = DynamicCache()
        out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                 past_key_values=cache, use_cache=True)
        position = positions(attention_mask)[:, -1:]
        codes = torch.empty((B, h * w), dtype=torch.long, device=device)
        t = 0
        for k in range(h * (w + 1) - 1):  # the final line break is forced and never read
            if k % (w + 1) == w:
                token = torch.full((B,), self.ids.eol, dtype=torch.long, device=device)
            else:
                code = next_tokens(self.visual_logits(emu3, out.last_hidden_state[:, -1]), uniforms[:, t], settings)
                codes[:, t] = code
                t += 1
                if t == h * w:
                    break
                token = visual[code]
            step = token.repeat(2) if cfg else token
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], 1)
            position = position + 1
            out = lm(input_ids=step.unsqueeze(-1), attention_mask=attention_mask, position_ids=position,
                     past_key_values=cache, use_cache=True)
        return codes

    def sequence(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The generated part of transformers' layout: :meth:`body` + end of frame, end of image, end of sequence."""
        tail = torch.tensor([self.ids.eof, self.ids.eoi, self.ids.eos], device=image_tokens.device)
        body = self.body(image_tokens)
        return torch.cat([body, tail.expand(body.shape[0], 3)], dim=1)

    @torch.no_grad()
    def decode(self, model, image_tokens):
        # One image at a time: convolution kernels round differently for other batch sizes, and an image's pixels
        # must not depend on its batch.
        emu3 = unwrap(model)
        images = []
        for row in self.sequence(image_tokens):
            pixels = emu3.decode_image_tokens(image_tokens=row[None], height=self.grid[0], width=self.grid[1])
            images += self.image_processor.postprocess(list(pixels.float().cpu()),
                                                       return_tensors="PIL.Image.Image")["pixel_values"]
        return images


# ------------------------------------------------------------------------------------------- understanding


def blank_inputs(image_processor, color: str = "white", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> dict:
    """``pixel_values`` ``(1, 3, S, S)`` and ``image_sizes`` of a blank square image through the model's own image
    processor (S: the smallest side it keeps, ``sqrt(min_pixels)`` rounded to its spatial factor)."""
    from PIL import Image

    side = int(math.isqrt(int(image_processor.min_pixels)))
    value = {"white": 255, "black": 0, "gray": 128}[color]
    kwargs = {k: list(v) for k, v in (("image_mean", mean), ("image_std", std)) if v}
    return dict(image_processor(images=[Image.new("RGB", (side, side), (value,) * 3)], return_tensors="pt", **kwargs))


def question_ids(tokenizer, ids: Emu3Ids, question: str, image_grid_hw: tuple[int, int],
                 template: str = "{image}{question}") -> list[int]:
    """``[bos] + template`` with ``{image}`` expanded as ``Emu3Processor`` expands ``<image>`` for an image of
    ``image_grid_hw`` tokens; text segments are tokenised apart, so no special token is ever split."""
    h, w = image_grid_hw
    image = [ids.boi, *size_ids(tokenizer, image_grid_hw), ids.wrapper, *[ids.image] * (h * (w + 1)), ids.eof,
             ids.eoi]
    out = [ids.bos]
    for i, part in enumerate(template.split("{image}")):
        if i:
            out += image
        text = part.replace("{question}", question)
        if text:
            out += tokenizer(text, add_special_tokens=False).input_ids
    return out


@torch.no_grad()
def sample_answers(model, tokenizer, image_processor, questions: Sequence[str], seeds: Sequence[int],
                   template: str = "{image}{question}", max_new_tokens: int = 12, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, blank: str = "white", mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, batch_size: int = 32) -> list[str]:
    """One answer per (question, seed) about a blank image, through the model's own image path (decoded texts).

    The blank goes through the model's image processor and VQ encoder once; its token embeddings fill the
    placeholders of every row (``mm_encoder_outputs``, what the forward computes from ``pixel_values``).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    emu3 = unwrap(model)
    device = emu3.get_input_embeddings().weight.device
    ids = Emu3Ids.of(emu3, tokenizer)
    inputs = blank_inputs(image_processor, blank, mean, std)
    sizes = inputs["image_sizes"].to(device)
    factor = emu3.model.vqmodel.vision_spatial_factor
    grid = (int(sizes[0, 0]) // factor, int(sizes[0, 1]) // factor)
    features = emu3.model.get_image_features(inputs["pixel_values"].to(device, emu3.dtype), sizes).pooler_output[0]
    eos = tokenizer.eos_token_id
    cache_ids: dict[str, list[int]] = {}
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs, ss = list(questions[start:start + batch_size]), list(seeds[start:start + batch_size])
        rows = [cache_ids.setdefault(q, question_ids(tokenizer, ids, q, grid, template)) for q in qs]
        input_ids, mask = left_pad(rows, ids.pad)
        image = BaseModelOutputWithPooling(pooler_output=tuple([features] * len(rows)))
        gen = sample_text_tokens(
            emu3, input_ids.to(device), mask.to(device), ss, max_new_tokens, temperature, top_k, top_p,
            eos_id=eos, pad_id=ids.pad, mm_encoder_outputs={"image": image},
        ).cpu().tolist()
        answers += [decode_answer(tokenizer, row, eos) for row in gen]
    return answers
