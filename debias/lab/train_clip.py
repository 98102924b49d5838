"""The lab world's classifier: a tiny ``CLIPModel`` trained contrastively on renders and VQ reconstructions.

Captions name any subset of the attributes; the loss is multi-positive (every caption that is true of an image counts
as its positive). The audit classifies with it zero-shot (:class:`audit.classify.ClipClassifier`, ``classifier.model:
lab``).
"""

from __future__ import annotations

import numpy as np
import torch

from debias.lab.world import IMAGE_SIZE, WorldConfig, cosine_lr, random_attrs
from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: np.ndarray) -> torch.Tensor:
    """``(B, 32, 32, 3)`` images in [0, 1] to CLIP pixel values, as ``CLIPImageProcessorPil`` does at 32 px."""
    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def make_clip(cfg: WorldConfig, tokenizer):
    """A seeded tiny ``CLIPModel`` (32 px, patch 4) and its ``CLIPProcessor``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    s = cfg.clip
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=s.projection_dim),
        vision_config=dict(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                           num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, image_size=IMAGE_SIZE,
                           patch_size=4, projection_dim=s.projection_dim),
        projection_dim=s.projection_dim,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _clip_caption(cfg: WorldConfig, form: str, g: int, r: int, o: int) -> tuple[str, tuple[int, int, int]]:
    """Fill a caption form; also return which attributes it names (-1 = not named)."""
    named = ("{gender}" in form or "{group}" in form, "{race}" in form, "{occupation}" in form)
    text = form.format(gender=GENDERS[g], race=RACES[r], occupation=OCCUPATIONS[o])
    return text, (g if named[0] else -1, r if named[1] else -1, o if named[2] else -1)


def train_clip(model, tokenizer, cfg: WorldConfig, rng: np.random.Generator, recon_bank, log) -> dict:
    """Contrastive training with multi-positive targets: a caption is a positive of every image it is true of.

    Half of each batch are fresh renders, half VQ reconstructions (``recon_bank``: images and attribute indices),
    so the classifier also works on what the generator decodes.
    """
    s = cfg.clip
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.05)
    model.train()
    losses = []
    bank_x, bank_a = recon_bank
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr * cosine_lr(step, s.steps, 20)
        n_fresh = s.batch_size // 2
        a = random_attrs(n_fresh, rng, cfg.occupations)
        fresh = render_batch(n_fresh, a, rng)
        pick = rng.integers(0, len(bank_x), s.batch_size - n_fresh)
        imgs = np.concatenate([fresh, bank_x[pick]])
        attrs = np.concatenate([np.stack([a["gender"], a["race"], a["occupation"]], 1), bank_a[pick]])
        texts, named = [], []
        for g, r, o in attrs:
            t, nm = _clip_caption(cfg, s.captions[rng.integers(len(s.captions))], g, r, o)
            texts.append(t)
            named.append(nm)
        named_t = torch.tensor(named)
        attrs_t = torch.as_tensor(attrs)
        # consistent[i, j]: caption j is true of image i (every attribute it names matches).
        consistent = ((named_t[None] == -1) | (named_t[None] == attrs_t[:, None])).all(-1).float()
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=clip_pixels(imgs))
        logits = out.logits_per_image
        li = -(consistent / consistent.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        lt = -(consistent.T / consistent.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = (li + lt) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == s.steps - 1:
            log(f"clip step {step:4d}  loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return {"steps": s.steps, "batch_size": s.batch_size, "final_loss": float(np.mean(losses[-20:]))}
