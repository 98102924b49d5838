"""The diffusion lab world: a tiny ``StableDiffusionPipeline`` trained on the lab renders with the planted skew.

Real diffusers parts, as a Stable Diffusion 1.x checkpoint has them, so the ``diffusers`` code path of the toolkit
(sampling, seed blocks, LoRA adapters, re-audit of a fixed model) runs against a generator whose bias is known:

* ``vae``: a tiny ``AutoencoderKL`` trained here on renders (32 px -> 4x8x8 latents). Its ``scaling_factor`` is
  set from the measured latent std, as SD's 0.18215 was, so the UNet sees unit-variance latents.
* ``text_encoder`` / ``tokenizer``: the lab CLIP's own text tower (``CLIPTextModel`` with the weights of
  ``clip.text_model``) and its ``CLIPTokenizer``, frozen, as SD freezes CLIP ViT-L's text tower. The CLIP already
  learned every caption word of the world, so the UNet only has to learn to listen to it.
* ``unet``: a tiny ``UNet2DConditionModel`` trained with the DDPM epsilon loss on (caption, latent) rows drawn as
  the Janus world draws them (:class:`debias.lab.train_janus.WorldSampler`): neutral captions take gender and race
  from the planted per-occupation skew, explicit captions always show the attribute they name, and dropped captions
  (``captions.dropout``) become the empty prompt, which is exactly the pipeline's unconditional row for CFG.
* ``scheduler``: the sampler ``diffusion.sampler`` (default Euler ancestral) built from the DDPM training config;
  ``safety_checker=None, requires_safety_checker=False``.

Text embeddings are computed once per caption with the pipeline's own ``encode_prompt`` (the world has ~120
captions), so training sees exactly what sampling feeds the UNet and pays nothing for the frozen encoder.

:func:`build_sd` writes ``DIR/sd/`` (``save_pretrained``, safetensors) beside ``DIR/janus`` and ``DIR/clip``, with
the record of the build in ``DIR/sd/build_info.json`` (the Janus world's ``DIR/build_info.json`` is not touched) and
the resolved config in ``DIR/sd/world.yaml``. :func:`verify_sd` measures the world with the audit's own sampler (the
``lab-sd`` backend as ``configs/generators/lab-sd.yaml``) and classifier (the lab CLIP as
``configs/experiments/lab-sd.yaml``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from debias.lab.world import FORMS, IMAGE_SIZE, WorldConfig, caption, cosine_lr, random_attrs
from generators.config import UserError, from_dict, load_yaml, to_dict
from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch
from generators.resources import named_config

SD_GENERATOR = "lab-sd"  # configs/generators/lab-sd.yaml: the sampling settings the audit (and verification) use
SD_EXPERIMENT = "lab-sd"  # configs/experiments/lab-sd.yaml: its classifier section


def pixels(images: np.ndarray) -> torch.Tensor:
    """Renders ``(B, 32, 32, 3)`` in [0, 1] to VAE input ``(B, 3, 32, 32)`` in [-1, 1]."""
    return torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2) * 2 - 1


# ------------------------------------------------------------------------------------------------- parts


def text_encoder_from_clip(clip):
    """A frozen ``CLIPTextModel`` carrying the lab CLIP's text-tower weights (what SD's ``text_encoder`` is)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPModel.text_model is a CLIPTextModel
    te.eval().requires_grad_(False)
    return te


def make_vae(cfg: WorldConfig):
    """A tiny ``AutoencoderKL``: three levels, so 32 px images have 8x8 latents (vae_scale_factor 4)."""
    from diffusers import AutoencoderKL

    s = cfg.diffusion
    # No mid-block attention: at 8x8 it costs more than it adds for these local renders.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=s.latent_channels,
                         block_out_channels=list(s.vae_channels), layers_per_block=1, norm_num_groups=16,
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         sample_size=IMAGE_SIZE, mid_block_add_attention=False)


def make_unet(cfg: WorldConfig, cross_attention_dim: int):
    """A tiny ``UNet2DConditionModel`` on 8x8 latents, cross-attending to the CLIP text tower's hidden states."""
    from diffusers import UNet2DConditionModel

    s = cfg.diffusion
    n = len(s.unet_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=s.latent_channels, out_channels=s.latent_channels,
        block_out_channels=tuple(s.unet_channels), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim, attention_head_dim=s.attention_head_dim,
    )


def train_scheduler(cfg: WorldConfig):
    """The DDPM noise schedule the UNet is trained on (the sampler is built from its config)."""
    from diffusers import DDPMScheduler

    s = cfg.diffusion
    # A linear schedule ends at alpha_bar ~ 4e-5: with 8x8 latents SD's scaled_linear schedule leaves ~10% of the
    # signal at the last step, so training would see a mean tone the pure-noise start of sampling never has.
    # steps_offset 1 is what StableDiffusionPipeline expects of SD configs (it warns otherwise).
    return DDPMScheduler(num_train_timesteps=s.train_timesteps, beta_schedule=s.beta_schedule,
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def sampling_scheduler(cfg: WorldConfig, ddpm):
    """``diffusion.sampler`` from the DDPM config (what the saved pipeline samples with)."""
    import diffusers

    cls = getattr(diffusers, cfg.diffusion.sampler, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"config key 'diffusion.sampler': unknown diffusers scheduler {cfg.diffusion.sampler!r}; "
                        "use e.g. EulerAncestralDiscreteScheduler or DDIMScheduler")
    return cls.from_config(ddpm.config)


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """The ``StableDiffusionPipeline`` of the world, without a safety checker (renders are not photos)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------- training


def train_vae(vae, cfg: WorldConfig, rng: np.random.Generator, log) -> dict:
    """Reconstruction (MSE in [-1, 1]) + ``vae_kl`` x KL on fresh renders; sets ``scaling_factor`` afterwards."""
    s = cfg.diffusion
    opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    vae.train()
    losses = []
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = s.vae_lr * cosine_lr(step, s.vae_steps, 20)
        x = pixels(render_batch(s.vae_batch_size, random_attrs(s.vae_batch_size, rng, cfg.occupations), rng))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + s.vae_kl * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(mse.item())
        if step % 100 == 0 or step == s.vae_steps - 1:
            log(f"vae step {step:4d}  recon mse {np.mean(losses[-20:]):.4f}")
    vae.eval()
    with torch.no_grad():
        x = pixels(render_batch(256, random_attrs(256, rng, cfg.occupations), rng))
        z = vae.encode(x).latent_dist.mean
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        rec = vae.decode(z).sample.clamp(-1, 1)
        eval_mse = float((((rec - x) / 2) ** 2).mean())
    log(f"vae eval mse {eval_mse:.5f} (0..1 units), latent scaling_factor {scale:.4f}")
    return {"steps": s.vae_steps, "final_recon_mse_minus1_1": float(np.mean(losses[-20:])),
            "eval_recon_mse_0_1": eval_mse, "eval_psnr_db": float(10 * np.log10(1 / eval_mse)),
            "scaling_factor": scale, "params": sum(p.numel() for p in vae.parameters())}


@torch.no_grad()
def latent_pool(vae, cfg: WorldConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``pool_per_cell`` renders per (occupation, gender, race) cell, encoded once.

    Returns:
        ``(mean, std)``, each ``(len(OCCUPATIONS), 2, 4, pool_per_cell, C, 8, 8)`` (zeros for unused occupations);
        training draws ``mean + std * noise`` as SD samples ``latent_dist``.
    """
    per = cfg.diffusion.pool_per_cell
    shape = (len(OCCUPATIONS), len(GENDERS), len(RACES), per, cfg.diffusion.latent_channels, IMAGE_SIZE // 4,
             IMAGE_SIZE // 4)
    mean, std = torch.zeros(shape), torch.zeros(shape)
    for o in cfg.occupations:
        for gi in range(len(GENDERS)):
            for ri in range(len(RACES)):
                a = {"occupation": np.full(per, OCCUPATIONS.index(o)), "gender": np.full(per, gi),
                     "race": np.full(per, ri)}
                post = vae.encode(pixels(render_batch(per, a, rng))).latent_dist
                mean[OCCUPATIONS.index(o), gi, ri], std[OCCUPATIONS.index(o), gi, ri] = post.mean, post.std
    return mean, std


def world_captions(cfg: WorldConfig) -> list[str]:
    """Every caption the world trains on: ``""`` (the dropped caption) first, then per occupation the neutral,
    gender, race and joint forms."""
    texts = [""]
    for o in cfg.occupations:
        texts.append(caption(cfg, o))
        texts += [caption(cfg, o, gender=g) for g in GENDERS] + [caption(cfg, o, race=r) for r in RACES]
        texts += [caption(cfg, o, gender=g, race=r) for g in GENDERS for r in RACES]
    return texts


class LatentSampler:
    """Draws (caption, latent) rows from the planted world, with the caption mix of the Janus world.

    Same draw as :meth:`debias.lab.train_janus.WorldSampler.rows`, so both worlds learn the same joint distribution:
    a dropped caption draws from the *neutral* world (CFG's unconditional branch is the planted marginal), an
    explicit form redraws the attribute it names uniformly and always shows it.
    """

    def __init__(self, cfg: WorldConfig, pool: tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.mean, self.std = pool
        self.occupations = list(cfg.occupations)
        self.index = {t: i for i, t in enumerate(world_captions(cfg))}
        forms = [f for f in FORMS if cfg.captions.mix.get(f, 0) > 0]
        w = np.array([cfg.captions.mix[f] for f in forms], float)
        self.forms, self.form_p = forms, w / w.sum()

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(caption indices into world_captions, latents (n, C, 8, 8) unscaled)``."""
        caps, cells = [], []
        per = self.mean.shape[3]
        for _ in range(n):
            o = self.occupations[self.rng.integers(len(self.occupations))]
            drop = self.rng.random() < self.cfg.captions.dropout
            form = "neutral" if drop else self.forms[self.rng.choice(len(self.forms), p=self.form_p)]
            spec = self.cfg.occupations[o]
            g = int(self.rng.random() < spec.p_female)
            r = int(self.rng.choice(len(RACES), p=[spec.race[c] for c in RACES]))
            if form in ("gender", "joint"):
                g = int(self.rng.integers(len(GENDERS)))
            if form in ("race", "joint"):
                r = int(self.rng.integers(len(RACES)))
            text = "" if drop else caption(self.cfg, o, gender=GENDERS[g] if form in ("gender", "joint") else None,
                                           race=RACES[r] if form in ("race", "joint") else None)
            caps.append(self.index[text])
            cells.append((OCCUPATIONS.index(o), g, r, int(self.rng.integers(per))))
        idx = tuple(torch.tensor(c) for c in zip(*cells))
        mean, std = self.mean[idx], self.std[idx]
        return torch.tensor(caps), mean + std * torch.randn_like(std)


def train_unet(unet, pipe, pool, cfg: WorldConfig, rng: np.random.Generator, log) -> dict:
    """DDPM epsilon-prediction training on world rows; the saved weights are the EMA (``diffusion.ema``)."""
    s = cfg.diffusion
    ddpm = train_scheduler(cfg)
    with torch.no_grad():
        # The pipeline's own prompt encoding (pad to 77, no attention mask), once per caption.
        embeds = pipe.encode_prompt(world_captions(cfg), "cpu", 1, False)[0]
    sampler = LatentSampler(cfg, pool, rng)
    scale = pipe.vae.config.scaling_factor
    alphas = ddpm.alphas_cumprod
    ema = copy.deepcopy(unet).requires_grad_(False) if s.ema > 0 else None
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    unet.train()
    losses = []
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr * cosine_lr(step, s.steps, s.warmup)
        caps, z0 = sampler.rows(s.batch_size)
        z0 = z0 * scale
        t = torch.randint(0, s.train_timesteps, (len(z0),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=embeds[caps]).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if ema is not None:
            # Warm the EMA up (decay grows with the step) so short --quick runs still save trained weights.
            d = min(s.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 100 == 0 or step == s.steps - 1:
            log(f"unet step {step:4d}  eps loss {np.mean(losses[-50:]):.4f}")
    if ema is not None:
        unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    return {"steps": s.steps, "batch_size": s.batch_size, "final_eps_loss": float(np.mean(losses[-50:])),
            "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)],
            "params": sum(p.numel() for p in unet.parameters()), "ema": s.ema}


# ------------------------------------------------------------------------------------------------- verification


def sd_generator(pipe, guidance_scale: float | None = None, num_inference_steps: int | None = None):
    """The audit's sampler on ``pipe``: the ``lab-sd`` backend configured as ``configs/generators/lab-sd.yaml``
    (optionally at another guidance scale or step count)."""
    from generators.base import GeneratorConfig
    from generators.lab.diffusion import LabDiffusionGenerator

    data = load_yaml(named_config("generators", SD_GENERATOR))
    sampling = dict(data.get("sampling") or {})
    if guidance_scale is not None:
        sampling["guidance_scale"] = guidance_scale
    if num_inference_steps is not None:
        sampling["num_inference_steps"] = num_inference_steps
    data["sampling"] = sampling
    return LabDiffusionGenerator(from_dict(GeneratorConfig, data, prefix="generator"), pipeline=pipe)


def sd_classifier(cfg: WorldConfig, clip, processor):
    """The audit's classifier: ``classifier`` of ``configs/experiments/lab-sd.yaml`` on the world's CLIP with the
    world's templates."""
    from audit.classify import ClipClassifier

    section = load_yaml(named_config("experiments", SD_EXPERIMENT))["classifier"]
    attributes = {a: {"classes": list(s.classes), "templates": list(s.templates)} for a, s in cfg.classifier.items()}
    return ClipClassifier({**section, "attributes": attributes}, model=clip, processor=processor)


def _interval(k: int, n: int) -> tuple[float, float]:
    from audit.metrics import wilson_interval

    lo, hi = wilson_interval(k, n)
    return float(lo), float(hi)


def verify_sd(pipe, clip, processor, cfg: WorldConfig, log, guidance_scale: float | None = None,
              num_inference_steps: int | None = None) -> dict:
    """Planted vs measured shares and explicit-prompt adherence, sampled and classified as the audit does.

    ``verify.n_per_occupation`` images per neutral prompt on the audit's seeds ``0..n-1``; per occupation the female
    share with its 95% Wilson interval, whether it is within 0.1 of the planted share and whether the interval covers
    it; per (occupation, race class) the same. Adherence: ``verify.n_explicit`` images per explicit gender and race
    prompt, the share classified as the asked group.
    """
    from debias.lab.verify import labels

    generator = sd_generator(pipe, guidance_scale, num_inference_steps)
    classifier = sd_classifier(cfg, clip, processor)
    v, occs = cfg.verify, list(cfg.occupations)
    n = v.n_per_occupation
    t0 = time.perf_counter()
    images = generator.generate([caption(cfg, o) for o in occs for _ in range(n)], list(range(n)) * len(occs))
    pred = labels(classifier, [im.image for im in images])
    per, g_within, g_cover, r_within, r_cover = {}, 0, 0, 0, 0
    for k, o in enumerate(occs):
        sl = slice(k * n, (k + 1) * n)
        spec = cfg.occupations[o]
        kf = int((pred["gender"][sl] == GENDERS.index("female")).sum())
        lo, hi = _interval(kf, n)
        rec = {"planted_p_female": spec.p_female, "measured_p_female": kf / n, "p_female_interval": [lo, hi],
               "within_0.1": abs(kf / n - spec.p_female) <= 0.1, "covered": lo <= spec.p_female <= hi,
               "planted_race": spec.race, "measured_race": {}, "race_interval": {}}
        g_within += rec["within_0.1"]
        g_cover += rec["covered"]
        for i, c in enumerate(RACES):
            kr = int((pred["race"][sl] == i).sum())
            rlo, rhi = _interval(kr, n)
            rec["measured_race"][c], rec["race_interval"][c] = kr / n, [rlo, rhi]
            r_within += abs(kr / n - spec.race[c]) <= 0.1
            r_cover += rlo <= spec.race[c] <= rhi
        per[o] = rec
    gerr = [abs(p["measured_p_female"] - p["planted_p_female"]) for p in per.values()]
    rerr = [abs(p["measured_race"][c] - p["planted_race"][c]) for p in per.values() for c in RACES]
    settings = generator.settings
    result: dict[str, Any] = {
        "sampling": f"generators.lab.diffusion.LabDiffusionGenerator as configs/generators/{SD_GENERATOR}.yaml, "
                    "seeds 0..n-1 per prompt",
        "classifier": f"audit.classify.ClipClassifier as configs/experiments/{SD_EXPERIMENT}.yaml with the world's "
                      "templates, argmax",
        "guidance_scale": settings.guidance_scale, "num_inference_steps": settings.num_inference_steps,
        "scheduler": type(generator.pipeline.scheduler).__name__, "interval": "Wilson 95%",
        "n_per_occupation": n, "n_occupations": len(occs),
        "female_within_0.1": int(g_within), "female_covered": int(g_cover),
        "mean_abs_err_p_female": float(np.mean(gerr)), "max_abs_err_p_female": float(np.max(gerr)),
        "race_cells": len(occs) * len(RACES), "race_within_0.1": int(r_within), "race_covered": int(r_cover),
        "mean_abs_err_race_share": float(np.mean(rerr)), "max_abs_err_race_share": float(np.max(rerr)),
        "per_occupation": per,
    }
    log(f"verify sd g={settings.guidance_scale} steps={settings.num_inference_steps}: female within 0.1 "
        f"{g_within}/{len(occs)}, covered {g_cover}/{len(occs)} (mean err {np.mean(gerr):.3f}); race within 0.1 "
        f"{r_within}/{len(occs) * len(RACES)}, covered {r_cover} (mean err {np.mean(rerr):.3f})")
    m = v.n_explicit
    asks = [(o, g, None) for o in occs for g in GENDERS] + [(o, None, r) for o in occs for r in RACES]
    images = generator.generate([caption(cfg, o, gender=g, race=r) for o, g, r in asks for _ in range(m)],
                                list(range(m)) * len(asks))
    pred = labels(classifier, [im.image for im in images])
    hits: dict[str, list[float]] = {"gender": [], "race": []}
    per_prompt = {}
    for k, (o, g, r) in enumerate(asks):
        a, want = ("gender", GENDERS.index(g)) if g else ("race", RACES.index(r))
        frac = float((pred[a][k * m:(k + 1) * m] == want).mean())
        hits[a].append(frac)
        per_prompt[caption(cfg, o, gender=g, race=r)] = frac
    result["explicit_adherence"] = {"n_per_prompt": m, "mean_gender": float(np.mean(hits["gender"])),
                                    "mean_race": float(np.mean(hits["race"])), "per_prompt": per_prompt}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"explicit adherence: gender {np.mean(hits['gender']):.3f}, race {np.mean(hits['race']):.3f}")
    return result


# ------------------------------------------------------------------------------------------------- build


def _load_clip(out: Path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(out / "clip").eval(), CLIPProcessor.from_pretrained(out / "clip")


def build_clip(cfg: WorldConfig, vae, rng: np.random.Generator, log) -> tuple[Any, Any, dict]:
    """Train the lab CLIP (when ``DIR`` has none) on renders and this VAE's reconstructions, and pick its zero-shot
    templates, as the Janus build does with VQ reconstructions."""
    from debias.lab.train_clip import make_clip, train_clip
    from debias.lab.verify import choose_templates
    from debias.lab.world import clip_tokenizer, clip_words
    from generators.base import to_pil

    k = min(cfg.diffusion.pool_per_cell, 16)
    a = random_attrs(len(cfg.occupations) * 8 * k, rng, cfg.occupations)
    with torch.no_grad():
        recon = ((vae.decode(vae.encode(pixels(render_batch(len(a["gender"]), a, rng))).latent_dist.mean).sample
                  .clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    bank = (recon, np.stack([a["gender"], a["race"], a["occupation"]], 1))
    tok = clip_tokenizer(clip_words(cfg))
    clip, processor = make_clip(cfg, tok)
    info = train_clip(clip, tok, cfg, rng, bank, log)
    info["params"] = sum(p.numel() for p in clip.parameters())
    n = cfg.verify.n_clip_eval
    ev_rng = np.random.default_rng(cfg.seed + 1)
    attrs = random_attrs(n, ev_rng, cfg.occupations)
    renders = render_batch(n, attrs, ev_rng)
    with torch.no_grad():
        recons = ((vae.decode(vae.encode(pixels(renders)).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2)
    info["zero_shot"] = choose_templates(clip, processor, cfg, to_pil(renders, (0.0, 1.0)),
                                         to_pil(recons.permute(0, 2, 3, 1).numpy(), (0.0, 1.0)), attrs)
    return clip, processor, info


def check_world_dir(out: Path, overwrite: bool) -> None:
    """Raise a :class:`UserError` before any training when ``out/sd`` exists (without ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder (a lab world folder, or a new one)")
    sd = out / "sd"
    if sd.exists() and any(sd.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: {sd} exists; pass --overwrite to rebuild the diffusion world or choose "
                        "another folder")


def world_clip_config(cfg: WorldConfig, out: Path) -> WorldConfig:
    """``cfg`` with the classifier templates of the world already in ``out`` (its ``world.yaml``), whose CLIP the
    diffusion world reuses; the planted occupations must agree, or the CLIP would not know the captions."""
    if not (out / "world.yaml").is_file():
        return cfg
    from debias.lab.world import load_world_config

    existing = load_world_config(out / "world.yaml")
    if to_dict(existing)["occupations"] != to_dict(cfg)["occupations"]:
        raise UserError(f"--config: its planted occupations differ from those of the world in {out} "
                        f"({out / 'world.yaml'}), whose CLIP the diffusion world reuses; use that world's config "
                        "or a new --out folder")
    cfg = copy.deepcopy(cfg)
    cfg.classifier = existing.classifier
    return cfg


def build_sd(out: str | Path, cfg: WorldConfig, quick: bool = False, overwrite: bool = False, log=print) -> dict:
    """Build the diffusion world into ``out/sd`` (written to a sibling temp folder, then renamed).

    Uses ``out/clip`` when present (the shipped world has one); otherwise trains the CLIP first and writes
    ``out/clip`` and ``out/world.yaml`` too. The Janus world in ``out`` (``janus/``, ``build_info.json``) is left
    as it is.

    Returns:
        The record written to ``out/sd/build_info.json``.
    """
    import yaml

    out = Path(out)
    check_world_dir(out, overwrite)
    have_clip = (out / "clip" / "config.json").is_file()
    cfg = world_clip_config(cfg, out) if have_clip else cfg
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    info: dict[str, Any] = {"seed": cfg.seed, "quick": quick, "torch_threads": torch.get_num_threads()}

    def lap(name, t0):
        times[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    rng = np.random.default_rng(cfg.seed + 101)  # apart from the Janus build's draws
    torch.manual_seed(cfg.seed + 101)
    t = time.perf_counter()
    vae = make_vae(cfg)
    info["vae"] = train_vae(vae, cfg, rng, log)
    t = lap("vae", t)
    if have_clip:
        clip, processor = _load_clip(out)
        info["clip"] = {"reused": str(out / "clip")}
    else:
        clip, processor, info["clip"] = build_clip(cfg, vae, rng, log)
        t = lap("clip", t)
    text_encoder = text_encoder_from_clip(clip)
    unet = make_unet(cfg, text_encoder.config.hidden_size)
    ddpm = train_scheduler(cfg)
    pipe = make_pipeline(vae, text_encoder, processor.tokenizer, unet, sampling_scheduler(cfg, ddpm))
    pool = latent_pool(vae, cfg, rng)
    t = lap("latent_pool", t)
    info["unet"] = train_unet(unet, pipe, pool, cfg, rng, log)
    t = lap("unet", t)
    info["verify"] = verify_sd(pipe, clip, processor, cfg, log, num_inference_steps=cfg.diffusion.verify_steps)
    lap("verify", t)

    tmp = out / f".sd.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "world.yaml").write_text(
            "# Resolved lab-world config the diffusion world was built from (written by debias.lab.build).\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        times["total"] = round(time.perf_counter() - t_start, 2)
        info["times_s"] = times
        info["weights_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        info["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                            "transformers": __import__("transformers").__version__}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=1))
        if not have_clip:
            clip.save_pretrained(out / "clip")
            processor.save_pretrained(out / "clip")
            if not (out / "world.yaml").exists():
                shutil.copy(tmp / "world.yaml", out / "world.yaml")
        if (out / "sd").exists():
            shutil.rmtree(out / "sd")
        tmp.rename(out / "sd")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built the diffusion lab world into {out / 'sd'} in {times['total']:.0f} s "
        f"({info['weights_bytes'] / 1e6:.1f} MB)")
    return info


def reverify_sd(out: str | Path, log=print, guidance_scale: float | None = None,
                num_inference_steps: int | None = None) -> dict:
    """Re-run :func:`verify_sd` on the diffusion world in ``out`` and rewrite ``out/sd/build_info.json``'s
    ``verify`` (weights untouched)."""
    from diffusers import StableDiffusionPipeline

    from debias.lab.world import load_world_config

    out = Path(out)
    sd = out / "sd"
    missing = [str(p) for p in (sd / "model_index.json", sd / "world.yaml", out / "clip") if not p.exists()]
    if missing:
        raise UserError(f"--out {out}: not a built diffusion lab world (missing {missing}); build one with "
                        "`python -m debias.lab.build --world diffusion --out DIR`")
    cfg = load_world_config(sd / "world.yaml")
    pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    clip, processor = _load_clip(out)
    info = json.loads((sd / "build_info.json").read_text()) if (sd / "build_info.json").exists() else {}
    info["verify"] = verify_sd(pipe, clip, processor, cfg, log, guidance_scale, num_inference_steps)
    (sd / "build_info.json").write_text(json.dumps(info, indent=1))
    return info
