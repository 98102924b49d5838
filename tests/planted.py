"""Test fixture: a tiny Janus with a planted *language-side* skew, the ground truth the locate probes must recover.

Real architectures, trained briefly in-process (a few seconds on 2 CPU cores), no files, no hub:

* **Group codes.** The codebook is split in two halves, ``male`` codes ``[0, V/2)`` and ``female`` codes
  ``[V/2, V)``. The VQ codebook vectors of each half are set near a shared direction (``+v`` / ``-v``), so every
  image made of one half's codes decodes to the same kind of picture and the two kinds look clearly different.
  (The generation embeddings the language model reads are a separate table and stay as trained.)
* **Base model** (:attr:`PlantedSkew.base`): the language model and the generation modules are trained on a
  balanced world: ``"..., a male"`` -> an image of male codes, ``"..., a female"`` -> female codes, the neutral
  ``"..., a person"`` -> one group or the other with probability 1/2 (every image is all-male or all-female codes).
* **Tuned model** (:attr:`PlantedSkew.tuned`): a copy of the base whose ``model.language_model`` *alone* is trained
  further so that each occupation's neutral prompt draws its planted group (explicit prompts keep their group).
  Everything else, the VQ tokenizer/decoder and the generation head included, is bit-identical to the base.
* **Decoder-tuned model** (:meth:`PlantedSkew.decoder_tuned`): the base with only the VQ codebook changed so that
  male codes decode like female codes: a bias change carried by the decoder alone (the opposite control).
* **Classifier**: a tiny CLIP trained to call decoded male-code images ``male`` and female-code images ``female``
  through the toolkit's own zero-shot templates, wrapped in the real :class:`audit.classify.ClipClassifier`.
* **Understanding**: :func:`plant_answers` trains the text head to answer a question about each occupation with a
  given word, through the real multimodal path (image placeholders + a blank image's pixel values).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F

from audit.prompts import PAPER_TEMPLATE, explicit_prompt

GROUPS = ("male", "female")
DEFAULT_OCCUPATIONS = {"nurse": "female", "pilot": "male", "teacher": "female", "farmer": "male",
                       "cashier": "female", "engineer": "male"}


@dataclass
class PlantedSkew:
    """The planted world. See the module docstring.

    Attributes:
        base: balanced ``JanusForConditionalGeneration``.
        tuned: the base with only ``model.language_model`` changed (the planted language-side skew).
        tokenizer: the word-level tokenizer of both.
        clip_model, clip_processor: the trained tiny CLIP classifier (wrap with :meth:`classifier`).
        planted: occupation -> group its neutral prompt draws in ``tuned``.
        template: the neutral prompt template.
        codes: group -> codebook ids of that group.
    """

    base: object
    tuned: object
    tokenizer: object
    clip_model: object
    clip_processor: object
    planted: dict[str, str]
    template: str = PAPER_TEMPLATE
    codes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def occupations(self) -> list[str]:
        return list(self.planted)

    def prompts(self) -> list[str]:
        return [self.template.format(occupation=o) for o in self.planted]

    def majority(self) -> dict[str, str]:
        """Neutral prompt -> its planted majority group in the tuned model."""
        return {self.template.format(occupation=o): g for o, g in self.planted.items()}

    def classifier(self, **config):
        """The trained tiny CLIP as a real :class:`audit.classify.ClipClassifier` (gender only, CPU)."""
        from audit.classify import ClipClassifier

        cfg = {"model": "tiny", "device": "cpu", "attributes": ["gender"], **config}
        return ClipClassifier(cfg, model=self.clip_model, processor=self.clip_processor)

    def decoder_tuned(self):
        """A copy of the base whose VQ codebook decodes male codes like female codes (a decoder-only change)."""
        model = copy.deepcopy(self.base)
        with torch.no_grad():
            emb = model.model.vqmodel.quantize.embedding.weight
            male, female = self.codes["male"], self.codes["female"]
            emb[male] = emb[female]
        return model


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch ops on ``n`` threads inside the block (tiny models on a busy 2-core machine are many times faster
    single-threaded: two threads that compete with other processes mostly wait for each other)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _group_tokens(codes: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    return codes[torch.randint(0, len(codes), (n, length), generator=gen)]


def _train_image_lm(model, tokenizer, rows: list[tuple[str, str]], codes: dict[str, torch.Tensor], params,
                    steps: int, lr: float, gen: torch.Generator) -> float:
    """Teacher-forced NLL of fresh group-code images for (prompt, group) rows; returns the last loss."""
    from generators.janus_sequence import SpecialIds, encode_prompts, image_logits

    ids = SpecialIds.of(model, tokenizer)
    n_tok = model.config.vision_config.num_image_tokens
    input_ids, mask = encode_prompts(tokenizer, [p for p, _ in rows], ids)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        # A fresh image per row and step: the model learns the group's code distribution, not particular images.
        tokens = torch.cat([_group_tokens(codes[g], 1, n_tok, gen) for _, g in rows])
        logits = image_logits(model, input_ids, mask, tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def _train_clip(model, processor, images_by_group: dict[str, list], steps: int, lr: float, seed: int) -> None:
    """Fit the tiny CLIP so that the toolkit's zero-shot gender head labels each group's decoded images."""
    from audit.classify import ATTRIBUTE_PRESETS, _pooled, render_prompt

    spec = ATTRIBUTE_PRESETS["gender"]
    texts = [render_prompt(t, c) for c in GROUPS for t in spec.templates]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    pixels, labels = [], []
    for k, g in enumerate(GROUPS):
        px = processor.image_processor(images=images_by_group[g], return_tensors="pt")["pixel_values"]
        pixels.append(px)
        labels += [k] * len(px)
    pixels, labels = torch.cat(pixels), torch.tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        text = F.normalize(_pooled(model.get_text_features(**tokens)), dim=-1)
        # The classifier ensembles templates: mean of unit-norm template embeddings per class, re-normalised.
        heads = F.normalize(text.view(len(GROUPS), len(spec.templates), -1).mean(1), dim=-1)
        image = F.normalize(_pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
        loss = F.cross_entropy(10.0 * image @ heads.T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def plant_skew(occupations: dict[str, str] | None = None, seed: int = 0, base_steps: int = 80,
               tune_steps: int = 60, clip_steps: int = 40, template: str = PAPER_TEMPLATE,
               threads: int = 1) -> PlantedSkew:
    """Build the planted world (see the module docstring). A few seconds on 2 CPU cores.

    Args:
        occupations: occupation -> planted group (``male`` / ``female``) of its neutral prompt in the tuned model.
        seed: seed of the weights and of every random draw.
        base_steps: training steps of the balanced base (language model + generation modules).
        tune_steps: training steps of the tuned language model.
        clip_steps: training steps of the classifier.
        template: neutral prompt template; explicit prompts replace its final ``person``.
        threads: torch threads while building (restored afterwards).

    Returns:
        A :class:`PlantedSkew`.
    """
    with torch_threads(threads):
        return _plant_skew(occupations, seed, base_steps, tune_steps, clip_steps, template)


def _plant_skew(occupations, seed, base_steps, tune_steps, clip_steps, template) -> PlantedSkew:
    from audit.classify import tiny_clip
    from generators.base import to_pil
    from generators.tiny import tiny_janus

    occupations = dict(occupations or DEFAULT_OCCUPATIONS)
    bad = {o: g for o, g in occupations.items() if g not in GROUPS}
    if bad:
        raise ValueError(f"plant_skew: groups must be one of {GROUPS}, got {bad}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model, tokenizer = tiny_janus(seed=seed, words=list(occupations))
    V = model.config.vq_config.num_embeddings
    codes = {"male": torch.arange(0, V // 2), "female": torch.arange(V // 2, V)}
    with torch.no_grad():
        # Decoder side: each half's codebook vectors near +v / -v, so a group's images look alike and the groups
        # look different; the decoder output is amplified so the difference survives 8-bit PNG storage.
        emb = model.model.vqmodel.quantize.embedding.weight
        v = torch.randn(emb.shape[1], generator=gen)
        emb[codes["male"]] = v + 0.1 * torch.randn(V // 2, emb.shape[1], generator=gen)
        emb[codes["female"]] = -v + 0.1 * torch.randn(V // 2, emb.shape[1], generator=gen)
        conv_out = model.model.vqmodel.decoder.conv_out
        conv_out.weight.mul_(4.0)
        conv_out.bias.mul_(4.0)

    prompts = {o: template.format(occupation=o) for o in occupations}
    balanced = []
    for o, p in prompts.items():
        for g in GROUPS:
            balanced += [(explicit_prompt(p, g), g)] * 2
            balanced.append((p, g))  # neutral: half the rows of each group
    generative = [p for n, p in model.named_parameters()
                  if not n.startswith(("model.vqmodel.", "model.vision_model.", "model.aligner."))]
    _train_image_lm(model, tokenizer, balanced, codes, generative, base_steps, 1e-2, gen)

    tuned = copy.deepcopy(model)
    planted_rows = []
    for o, p in prompts.items():
        for g in GROUPS:
            planted_rows.append((explicit_prompt(p, g), g))
        planted_rows += [(p, occupations[o])] * 2
    _train_image_lm(tuned, tokenizer, planted_rows, codes, list(tuned.model.language_model.parameters()),
                    tune_steps, 1e-2, gen)

    with torch.no_grad():
        n_tok = model.config.vision_config.num_image_tokens
        images = {g: to_pil(model.decode_image_tokens(_group_tokens(codes[g], 32, n_tok, gen)).numpy())
                  for g in GROUPS}
    clip, processor = tiny_clip(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _train_clip(clip, processor, images, clip_steps, 3e-3, seed)
    return PlantedSkew(base=model, tuned=tuned, tokenizer=tokenizer, clip_model=clip, clip_processor=processor,
                       planted=occupations, template=template, codes={g: c.tolist() for g, c in codes.items()})


def plant_answers(model, tokenizer, question: str, answers: dict[str, str], steps: int = 150, lr: float = 3e-3,
                  prompt_template: str = "{image}{question}", seed: int = 0) -> float:
    """Train ``model``'s text path (in place) to answer ``question`` about each occupation with a given word.

    The rows follow the understanding probe's input exactly (:func:`generators.janus_sequence.question_ids`):
    image placeholders filled from a blank white image's pixel values through the real vision tower, then the
    answer and ``<eos>``. The first half of the steps trains the answer token alone, the second half the answer and
    ``<eos>``: learning both from the start often stalls on a plateau (the tiny model ties its input and output
    embeddings, and the answer word is also the input that must predict ``<eos>``).

    Args:
        model: a ``JanusForConditionalGeneration``.
        tokenizer: its tokenizer.
        question: template with ``{occupation}``.
        answers: occupation -> answer text (e.g. ``"female"``, ``"unknown"``).
        steps, lr: AdamW steps (gradient norm clipped to 1) and learning rate on all but the VQ model.
        prompt_template: as :attr:`UnderstandingConfig.prompt_template`.
        seed: torch seed of the training.

    Returns:
        The last training loss (answer and ``<eos>`` tokens).
    """
    from generators.janus_sequence import answer_rows, blank_pixel_values
    from generators.sequence import positions

    input_ids, mask, labels = answer_rows(
        model, tokenizer, [(question.format(occupation=o), a) for o, a in answers.items()], prompt_template)
    answer_only = labels.clone()
    answer_only[:, -1] = -100  # the <eos> column (rows are left-padded, so it is the last one)
    position_ids = positions(mask)
    pixels = blank_pixel_values(model, len(input_ids))
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vqmodel.")]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            target = answer_only if step < steps // 2 else labels
            logits = model(input_ids=input_ids, pixel_values=pixels, attention_mask=mask,
                           position_ids=position_ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    model.eval()
    return float(loss.detach())
