"""The lab world's tiny Janus: its config, the pre-tokenised render pool and its teacher-forced training.

The language model (plus the generation embedding, aligner and head) learns (caption, image tokens) rows in the
sequence layout of :mod:`generators.janus_sequence` (the one the sampler, the trainers and the probes use), through
its :func:`~generators.janus_sequence.image_logits`. Caption dropout (for classifier-free guidance) turns a row into
the layout's unconditional row (:func:`~generators.janus_sequence.unconditional`): every caption token becomes
``<pad>``, attention 1 on all of it, as transformers' Janus ``generate`` builds it.

Optionally (``understanding``) the text head learns to answer demographic questions about an occupation, mostly with
"unknown" (a partial-alignment world), in exactly the understanding probe's input
(:func:`generators.janus_sequence.question_ids`, a blank white image's pixel values through the real vision
tower)::

    [<bos>] + [<begin_of_image>] + [<image_placeholder>] * 64 + [<end_of_image>] + tokens(question)
    + tokens(answer) + [<eos>]

which is also ``[<bos>] + JanusProcessor(text="<image_placeholder>" + question, images=blank)`` with the processor
saved in ``janus/``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from debias.lab.vq import encode_images
from debias.lab.world import (
    FORMS, IMAGE_SIZE, NUM_PATCHES, WorldConfig, caption, cosine_lr, janus_tokenizer,
)
from generators.janus_sequence import (
    SpecialIds, answer_rows, blank_pixel_values, image_logits, prompt_ids, unconditional,
)
from generators.sequence import left_pad, positions
from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch


def janus_config(cfg: WorldConfig, vocab_size: int):
    """The ``JanusConfig`` of the lab model (32 px images, 8x8 = 64 image tokens)."""
    from transformers import JanusConfig

    lm, vq = cfg.janus, cfg.vq
    return JanusConfig(
        text_config=dict(
            model_type="llama", vocab_size=vocab_size, hidden_size=lm.hidden_size,
            intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_heads, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=lm.vision_hidden_size, intermediate_size=lm.vision_hidden_size * 2, num_hidden_layers=1,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=IMAGE_SIZE // NUM_PATCHES,
            projection_dim=lm.hidden_size, num_image_tokens=NUM_PATCHES**2, mlp_ratio=2.0,
        ),
        vq_config=dict(
            embed_dim=vq.embed_dim, num_embeddings=vq.codebook_size, base_channels=vq.base_channels,
            channel_multiplier=list(vq.channel_multiplier), num_res_blocks=1, latent_channels=vq.latent_channels,
            num_patches=NUM_PATCHES, image_token_embed_dim=lm.hidden_size, projection_dim=lm.hidden_size,
        ),
        image_token_id=6,
    )



def make_janus(cfg: WorldConfig):
    """A freshly initialised lab ``JanusForConditionalGeneration`` (from the global torch seed) and its tokenizer,
    with the generation config the sequence layout reads its special ids from."""
    from transformers import GenerationConfig, JanusForConditionalGeneration

    tokenizer = janus_tokenizer(cfg)
    model = JanusForConditionalGeneration(janus_config(cfg, len(tokenizer)))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")},
    )
    return model, tokenizer


def token_pool(model, cfg: WorldConfig, rng: np.random.Generator) -> torch.Tensor:
    """Image tokens of ``vq.pool_per_cell`` renders per (occupation, gender, race) cell, tokenised once.

    Returns:
        ``(len(OCCUPATIONS), len(GENDERS), len(RACES), pool_per_cell, 64)`` codebook ids (zeros for occupations
        the world does not use); LM batches index into it.
    """
    per = cfg.vq.pool_per_cell
    pool = torch.zeros((len(OCCUPATIONS), len(GENDERS), len(RACES), per, NUM_PATCHES**2), dtype=torch.long)
    cells = [(OCCUPATIONS.index(o), gi, ri) for o in cfg.occupations for gi in range(len(GENDERS))
             for ri in range(len(RACES))]
    cell_attrs = {k: np.repeat([c[i] for c in cells], per) for i, k in enumerate(("occupation", "gender", "race"))}
    toks = encode_images(model, render_batch(len(cells) * per, cell_attrs, rng)).view(len(cells), per, -1)
    for c, tk in zip(cells, toks):
        pool[c] = tk
    return pool


class WorldSampler:
    """Draws (caption, image tokens) training rows from the planted world, using a pre-tokenised render pool."""

    def __init__(self, cfg: WorldConfig, pool: torch.Tensor, tokenizer, ids: SpecialIds, rng: np.random.Generator):
        self.cfg, self.pool, self.tok, self.ids, self.rng = cfg, pool, tokenizer, ids, rng
        self.occupations = list(cfg.occupations)
        forms = [f for f in FORMS if cfg.captions.mix.get(f, 0) > 0]
        w = np.array([cfg.captions.mix[f] for f in forms], float)
        self.forms, self.form_p = forms, w / w.sum()
        self._cache: dict[str, list[int]] = {}

    def prompt_row(self, text: str) -> list[int]:
        """``[bos] + tokens(text) + [boi]`` (cached)."""
        if text not in self._cache:
            self._cache[text] = prompt_ids(self.tok, text, self.ids)
        return self._cache[text]

    def planted(self, occupation: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Gender and race indices drawn from the occupation's planted distribution."""
        spec = self.cfg.occupations[occupation]
        g = (self.rng.random(n) < spec.p_female).astype(int)
        r = self.rng.choice(len(RACES), n, p=[spec.race[c] for c in RACES])
        return g, r

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """``n`` left-padded prompt rows (dropped captions as unconditional rows), their image tokens and forms.

        Returns:
            ``(input_ids, attention_mask, image_tokens, forms)``; a form is ``uncond`` for a dropped caption.
        """
        prompts, images, forms = [], [], []
        for _ in range(n):
            o = self.occupations[self.rng.integers(len(self.occupations))]
            drop = self.rng.random() < self.cfg.captions.dropout
            # Unconditional rows draw from the neutral world, so CFG's "unconditional" is the planted marginal.
            form = "neutral" if drop else self.forms[self.rng.choice(len(self.forms), p=self.form_p)]
            g, r = (x[0] for x in self.planted(o, 1))
            if form in ("gender", "joint"):
                g = int(self.rng.integers(len(GENDERS)))
            if form in ("race", "joint"):
                r = int(self.rng.integers(len(RACES)))
            text = caption(self.cfg, o, gender=GENDERS[g] if form in ("gender", "joint") else None,
                           race=RACES[r] if form in ("race", "joint") else None)
            prompts.append(self.prompt_row(text))
            cell = self.pool[OCCUPATIONS.index(o), g, r]
            images.append(cell[self.rng.integers(len(cell))])
            forms.append("uncond" if drop else form)
        input_ids, mask = left_pad(prompts, self.ids.pad)
        dropped = torch.tensor([f == "uncond" for f in forms])
        input_ids = torch.where(dropped[:, None], unconditional(input_ids, self.ids), input_ids)
        return input_ids, mask, torch.stack(images), forms


def qa_rows(model, cfg: WorldConfig, tokenizer, n: int, rng: np.random.Generator):
    """Question-answer rows for the text head: ``(input_ids, attention_mask, labels)``.

    Each row is the understanding probe's question followed by its answer
    (:func:`generators.janus_sequence.answer_rows`); labels cover the answer and <eos> only.
    """
    attrs = list(cfg.understanding.questions)
    pairs = []
    for _ in range(n):
        a = attrs[rng.integers(len(attrs))]
        o = list(cfg.occupations)[rng.integers(len(cfg.occupations))]
        opts = cfg.understanding.answers[a]
        ans = list(opts)[rng.choice(len(opts), p=np.array(list(opts.values())) / sum(opts.values()))]
        pairs.append((cfg.understanding.questions[a].format(occupation=o), ans))
    return answer_rows(model, tokenizer, pairs)


def train_janus(model, tokenizer, pool: torch.Tensor, cfg: WorldConfig, rng: np.random.Generator, log) -> dict:
    """Train the language model and generation modules (teacher forcing), plus the QA text head if configured."""
    spec = cfg.janus
    with torch.no_grad():
        # Start the image-token input embeddings from the VQ codebook: related codes start close.
        model.model.generation_embeddings.weight.copy_(model.model.vqmodel.quantize.embedding.weight)
    sampler = WorldSampler(cfg, pool, tokenizer, SpecialIds.of(model, tokenizer), rng)
    trainable = [p for n, p in model.named_parameters()
                 if not n.startswith("model.vqmodel.") and not n.startswith("model.vision_model.")]
    for n, p in model.named_parameters():
        p.requires_grad_(not (n.startswith("model.vqmodel.") or n.startswith("model.vision_model.")))
    opt = torch.optim.AdamW(trainable, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses, qa_losses = [], []
    do_qa = spec.qa_every > 0 and bool(cfg.understanding.questions)
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * cosine_lr(step, spec.steps, spec.warmup)
        input_ids, mask, images, _ = sampler.rows(spec.batch_size)
        logits = image_logits(model, input_ids, mask, images)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), images.reshape(-1))
        total = loss
        if do_qa and step % spec.qa_every == 0:
            q_ids, q_mask, labels = qa_rows(model, cfg, tokenizer, spec.qa_batch_size, rng)
            out = model(input_ids=q_ids, pixel_values=blank_pixel_values(model, len(q_ids)), attention_mask=q_mask,
                        position_ids=positions(q_mask))
            qa = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100)
            total = total + qa
            qa_losses.append(qa.item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == spec.steps - 1:
            log(f"janus step {step:4d}  image-token loss {np.mean(losses[-50:]):.4f}"
                + (f"  qa loss {np.mean(qa_losses[-10:]):.4f}" if qa_losses else ""))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": spec.steps, "batch_size": spec.batch_size,
            "final_image_token_loss": float(np.mean(losses[-50:])),
            "final_qa_loss": float(np.mean(qa_losses[-10:])) if qa_losses else None,
            "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]}
