"""Balanced preference fine-tuning of Stable-Diffusion-style pipelines with LoRA: SFT, BPO and Diffusion-DPO.

The data is the balanced synthetic set of DESIGN.md ("Balanced data and the balanced preference loss"): a Hugging
Face dataset saved with ``save_to_disk``, one row per kept image, with columns ``prompt`` (the NEUTRAL prompt the
image is paired back with), ``group`` (the demographic group the explicit prompt asked for and the classifier
confirmed), ``image`` (``datasets.Image``) and, optionally, ``seed`` and ``confidence``.

Objectives
----------
Notation: ``y`` an image, ``z_0 = VAE(y)`` its latent, ``c`` the embedding of its neutral prompt, ``t ~ U{0..T-1}``,
``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``, and the per-image denoising error

    err_theta(y) = mean over latent elements of (eps - eps_theta(z_t, t, c))^2

(for ``v_prediction`` schedulers the target is ``v`` instead of ``eps``; everything below is unchanged).

* ``sft``: the standard denoising loss ``mean_y err_theta(y)`` on the balanced set, conditioned on the neutral
  prompt. It is the diffusion analogue of the paper's stage 1 (maximise ``log p(image | neutral prompt)``):
  the denoising loss is, up to a positive weighting and constants, the negative ELBO of ``log p_theta(y | c)``.

* ``bpo`` (balanced preference, the paper's stage 2 carried over to diffusion). Derivation: the evidence lower
  bound of a diffusion model (Ho et al. 2020) gives, for the epsilon parametrisation,

      log p_theta(y | c) >= -E_{t, eps}[ w(t) * ||eps - eps_theta(z_t, t, c)||^2 ] + C,

  with ``C`` independent of ``theta``. Wallace et al. 2023 (Diffusion-DPO) take this bound, with ``w(t)`` absorbed
  into a constant, as a surrogate of the log-likelihood and estimate it with ONE shared ``(t, eps)`` draw per pair
  (the shared draw cancels most of the Monte-Carlo noise in the difference of two images). So the implicit
  log-likelihood ratio of an image against a reference is

      r(y) = -(err_theta(y) - err_ref(y)),   and without a reference   r(y) = -err_theta(y),

  each element-mean over the latent (as in Wallace et al.'s code; it makes ``beta`` independent of resolution).
  For a pair ``(i, j)`` of images of DIFFERENT groups for the same neutral prompt, with the same ``(t, eps)``:

      D = beta * (r_i - r_j),      loss_bpo = log(1 + (sigmoid(D) - 1/2)^2).

  The paper's BPO uses ``D = logodds_i - logodds_j`` of the per-token mean probability; an image's probability is
  tiny, where ``log p - log(1 - p) = log p + O(p)``, so ``D`` is a difference of log-likelihoods and ``r`` above is
  its diffusion surrogate. The loss is 0 exactly at ``D = 0`` (both groups equally likely), symmetric in ``i, j``,
  bounded by ``log 1.25``, and its gradient ``2 (s - 1/2) s (1 - s) / (1 + (s - 1/2)^2) * dD`` (``s = sigmoid(D)``)
  lowers the likelier image and raises the other. With K groups every unordered pair of images of different groups
  of a prompt is a pair (``K(K-1)/2`` group pairs x images), and the loss is the mean over the pairs of a batch.
  It is :func:`debias.losses.balanced_preference_loss_from_logits`, the Janus trainer's loss on this ``D``.

  Reference. The paper's BPO has NO reference model, and that is the default here (``reference: auto`` = ``none``
  for ``bpo``). With the reference = the model with the adapter disabled (``reference: base``), ``r`` measures how
  much the adapter CHANGED each likelihood: a fresh LoRA (``B = 0``) gives ``r_i = r_j = 0``, so ``D = 0`` and the
  loss and its gradient are exactly 0 at the start and nothing trains; continued from an SFT adapter it pushes the
  SFT change back towards "equal for all groups", i.e. it undoes balancing. ``base`` is offered for comparison
  only.

* ``dpo`` (Diffusion-DPO, Wallace et al. 2023, for comparison): the image of the preferred group is ``w``, the other
  ``l``, the reference is the model with the adapter disabled, ``D = beta * (r_w - r_l)`` and
  ``loss_dpo = -log sigmoid(D)``. Wallace et al. write ``-0.5 * beta_dpo * (model_diff - ref_diff)``, so their
  ``beta_dpo`` is ``2 * beta`` here (their SD 1.5 setting 5000 is ``beta = 2500``, the default for ``dpo``).

* ``align`` (Shen et al. 2024, :mod:`debias.train.align`): no images from the dataset; the model samples
  ``align_batch_size`` images per neutral prompt, the audit's CLIP classifier scores them, optimal transport to the
  target distribution gives each image a target class, and a cross-entropy (plus a term keeping each image close to
  the frozen model's image from the same noise) back-propagates through the sampling steps.

Pairs are built explicitly by row index (:func:`build_pairs`, on :func:`debias.losses.pair_indices`), never
cyclically or by position arithmetic (the published code's race pairing skipped pairs, DESIGN.md).

Training
--------
LoRA (peft) on the UNet attention projections (``to_q, to_k, to_v, to_out.0``) or on the CLIP text encoder
(``q_proj, k_proj, v_proj, out_proj``). The loop runs under ``accelerate.Accelerator`` (gradient accumulation,
mixed precision, ``accelerate launch`` on one or many processes). The adapter is saved in diffusers' LoRA format, so
``pipe.load_lora_weights(adapter_dir)`` (what :class:`generators.diffusers_backend.DiffusersGenerator` does) loads
it, rank and alpha included. SDXL pipelines train too: the UNet is conditioned as ``StableDiffusionXLPipeline``
conditions it (both text encoders, pooled embeddings, size/crop ids; :meth:`DiffusionParts.conditioning`) and
LoRA goes on the UNet or the FIRST text encoder (the second stays frozen).

Every item's noise and timestep come from a generator seeded by (seed, epoch, item) (:func:`item_generators`), so
N processes with per-process batch B/N compute the update of one process with batch B, and a run resumed from a
``checkpoint-N`` (``save_steps``, :func:`_save_checkpoint`) ends with the uninterrupted run's adapter. The stage
runner of ``debias train`` is :mod:`debias.train.diffusion_stages`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from debias.losses import balanced_preference_loss_from_logits, pair_indices
from generators.config import ConfigError, UserError, from_dict, option, to_dict

log = logging.getLogger(__name__)

LORA_MODULES = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
DEFAULT_BETA = {"bpo": 1.0, "dpo": 2500.0}
ADAPTER_NAME = "default"  # the name diffusers' training scripts use, and what load_lora_weights expects to find
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
RECORD_NAME = "train_config.json"
LOG_NAME = "train_log.jsonl"


@dataclass
class DiffusionTrainConfig:
    """LoRA fine-tuning of a diffusion pipeline on the balanced set (keys of the ``train`` section)."""

    dataset: str = option("", help="directory of the balanced dataset (datasets.save_to_disk) with columns "
                                   "prompt, group, image (+ optional seed, confidence)")
    output_dir: str = option("", help="run folder; the adapter is written to OUTPUT_DIR/adapter")
    objective: Literal["sft", "bpo", "dpo", "align"] = option(
        "sft", help="sft: denoising loss on the neutral prompt; bpo: balanced preference loss over pairs of "
                    "different groups; dpo: Diffusion-DPO sigmoid loss (needs preferred_group); align: distributional "
                    "alignment of the model's own samples to align_target (Shen et al. 2024; needs the classifier, "
                    "see debias.train.align)")
    lora_target: Literal["unet", "text_encoder"] = option(
        "unet", help="where LoRA goes: unet (to_q, to_k, to_v, to_out.0) or text_encoder (q/k/v/out_proj)")
    rank: int = option(8, help="LoRA rank r")
    alpha: float = option(8.0, help="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, help="LoRA dropout")
    init_adapter: str | None = option(
        None, help="continue training this adapter (e.g. the SFT stage's OUTPUT_DIR/adapter before BPO); its rank, "
                   "alpha and targets are used instead of rank/alpha")
    lr: float = option(1e-4, help="AdamW learning rate")
    lr_schedule: Literal["constant", "cosine"] = option("constant", help="learning-rate schedule after warmup")
    warmup_ratio: float = option(0.0, help="fraction of the steps with linear warmup")
    weight_decay: float = option(0.0, help="AdamW weight decay (0: parameters only move by their gradients)")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon (diffusers' training scripts: 1e-8); entries whose "
                                            "gradient is near it get updates that depend steeply on its rounding")
    max_grad_norm: float = option(1.0, help="gradient clipping norm; 0 disables clipping")
    steps: int = option(100, help="optimizer steps")
    batch_size: int = option(4, help="per process and micro-step: images (sft), pairs (bpo, dpo; 2 images each) or "
                                     "neutral prompts (align; align_batch_size images each)")
    grad_accum: int = option(1, help="micro-steps accumulated per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = option(
        "no", help="autocast precision of the forward passes (fp16 needs a GPU); LoRA weights stay float32")
    beta: float | None = option(
        None, help="scale of the implicit log-likelihood difference D; None: 1 for bpo (the paper), 2500 for dpo "
                   "(Wallace et al.'s beta_dpo 5000 for SD 1.5, which carries a factor 1/2)")
    reference: Literal["auto", "none", "base"] = option(
        "auto", help="reference of the implicit likelihood ratio: none (r = -err), base (the model with the adapter "
                     "disabled); auto: none for bpo (as the paper), base for dpo")
    preferred_group: str | dict[str, str] | None = option(
        None, help="dpo only: the preferred (chosen) group, one name for all prompts or a mapping prompt -> group")
    min_confidence: float = option(0.0, help="drop rows whose classifier confidence is below this (needs the column)")
    resolution: int = option(512, help="images are resized (shorter side) and centre-cropped to this many pixels; "
                                       "align: the side of the generated images")
    seed: int = option(0, help="seed of the shuffling, timesteps and noise")
    # objective 'align' (debias.train.align): batch_size is prompts per micro-step there, each with align_batch_size
    # images; the run needs the audit's classifier (run_diffusion_train(..., classifier=...)).
    align_attribute: str = option("gender", help="align: the classifier attribute to align (gender, race, ...)")
    align_target: str | dict[str, float] = option(
        "uniform", help="align: target distribution of align_attribute per prompt: uniform, or a mapping class -> "
                        "share naming every class (e.g. {young: 0.75, old: 0.25})")
    align_prompts: list[str] | None = option(
        None, help="align: the neutral prompts to train on; null takes the distinct values of the dataset's prompt "
                   "column (e.g. the synth set's neutral prompts; its images are not used). Set one of the two")
    align_batch_size: int = option(
        8, help="align: images generated per prompt and micro-step; the OT assigns targets within this batch")
    align_inference_steps: int = option(
        20, help="align: sampling steps of the training samples (the pipeline's own scheduler; the paper: 19-23)")
    align_steps: int | None = option(
        None, help="align: the last K sampling steps that keep gradients (earlier steps run without a graph; memory "
                   "grows with K); null: all steps, as the paper. The late steps barely move the image: on the tiny "
                   "DDIM/PNDM pipelines the last step alone carries < 1e-3 of the 8-step gradient norm")
    align_guidance_scale: float | None = option(
        None, help="align: CFG scale of the training samples; null: the generator config's "
                   "sampling.guidance_scale, i.e. what the audit samples with (7.5 for a pipeline passed in)")
    align_confidence: float = option(
        0.8, help="align: threshold C on the OT target's confidence c_i = max_k q_ik (q_i: how often image i is sent "
                  "to class k over target draws); images below it get no cross-entropy. The paper's 0.8")
    align_target_draws: int = option(
        200, help="align: iid target batches drawn to estimate q_i (the paper's expected OT); 0 uses the fixed counts "
                  "N * share (largest remainder) once, with every confidence 1")
    align_semantic_weight: float = option(
        8.0, help="align: weight lambda of the semantics-preserving term 1 - cos(CLIP(image), CLIP(frozen model's "
                  "image from the same noise)); 0 drops it (and the frozen model's sampling pass)")
    align_semantic_change_factor: float = option(
        0.2, help="align: semantic weight of images asked to change class (or without a confident target), relative "
                  "to 1 for images that keep the frozen image's class (the authors' 0.2)")

    def __post_init__(self):
        checks = [
            ("rank", self.rank >= 1, "a positive integer, e.g. 8"),
            ("alpha", self.alpha > 0, "a positive number, e.g. equal to rank"),
            ("dropout", 0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
            ("lr", self.lr > 0, "a positive number, e.g. 1e-4"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "a number in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("adam_epsilon", self.adam_epsilon > 0, "a positive number, e.g. 1e-8"),
            ("max_grad_norm", self.max_grad_norm >= 0, "a number >= 0 (0 disables clipping)"),
            ("steps", self.steps >= 1, "a positive integer"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("grad_accum", self.grad_accum >= 1, "a positive integer"),
            ("beta", self.beta is None or (self.beta > 0 and math.isfinite(self.beta)), "a positive number or null"),
            ("min_confidence", 0.0 <= self.min_confidence <= 1.0, "a number in [0, 1]"),
            ("resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a multiple of 8, e.g. 512"),
            ("seed", self.seed >= 0, "a non-negative integer"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"config key 'train.{key}': got {getattr(self, key)!r}; set it to {want}")
        if self.objective == "dpo" and not self.preferred_group:
            raise ConfigError("config key 'train.preferred_group' is required for objective 'dpo': name the chosen "
                              "group (e.g. female) or map each prompt to one; or use objective 'bpo'")
        if self.objective != "dpo" and self.preferred_group is not None:
            raise ConfigError(f"config key 'train.preferred_group' only applies to objective 'dpo' (objective is "
                              f"'{self.objective}'); remove it")
        from debias.train.align import check_align_fields

        check_align_fields(self)

    @property
    def effective_beta(self) -> float:
        """``beta``, or the objective's default when it is ``None``."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.objective, 1.0)

    @property
    def effective_reference(self) -> str:
        """``reference`` with ``auto`` resolved: ``none`` for bpo (and sft, where it is unused), ``base`` for dpo."""
        if self.reference != "auto":
            return self.reference
        return "base" if self.objective == "dpo" else "none"


# ----------------------------------------------------------------------------------------------------------------
# Losses and pairs (pure functions)
# ----------------------------------------------------------------------------------------------------------------

def dpo_sigmoid_loss(d: torch.Tensor) -> torch.Tensor:
    """Per-pair Diffusion-DPO loss ``-log sigmoid(D)`` (``D = beta (r_w - r_l)``; ``log 2`` at ``D = 0``)."""
    return -F.logsigmoid(d)


def pair_logits(
    err_theta: torch.Tensor, err_ref: torch.Tensor | None, n_pairs: int, beta: float
) -> torch.Tensor:
    """``D = beta * (r_i - r_j)`` for pairs stacked as ``[images i..., images j...]``.

    Args:
        err_theta: ``(2P,)`` per-image denoising errors under the trained model; rows ``p`` and ``P + p`` are the two
            images of pair ``p`` (same prompt, noise and timestep).
        err_ref: the same under the reference, or ``None`` for no reference (``r = -err_theta``).
        n_pairs: ``P``.
        beta: scale.

    Returns:
        ``(P,)`` logits ``D``.
    """
    r = -(err_theta - err_ref) if err_ref is not None else -err_theta
    return beta * (r[:n_pairs] - r[n_pairs:])


def build_pairs(
    prompts: Sequence[str],
    groups: Sequence[str],
    rows: Sequence[int] | None = None,
    preferred: str | dict[str, str] | None = None,
) -> np.ndarray:
    """All pairs of rows of different groups for the same prompt: :func:`debias.losses.pair_indices` with ``every``.

    For each prompt, every row of one group is paired with every row of each other group: with ``K`` groups of
    ``n`` images each that is ``K(K-1)/2 * n^2`` pairs, every cross-group combination exactly once.

    Args:
        prompts: neutral prompt of every row of the dataset.
        groups: group of every row.
        rows: the row indices to pair (e.g. after a confidence filter); all rows when ``None``.
        preferred: for DPO, the chosen group (one name, or a mapping prompt -> name): only pairs with exactly one
            image of that group are kept, ordered ``(chosen, rejected)``. ``None`` keeps all pairs as ``(i, j)``
            with ``i`` before ``j`` in ``rows``.

    Returns:
        ``(N, 2)`` int64 array of row indices, ordered by prompt (first appearance), then ``i``, then ``j``.
    """
    position = {int(r): n for n, r in enumerate(range(len(prompts)) if rows is None else rows)}
    prompt_rank: dict[str, int] = {}
    for r in position:
        prompt_rank.setdefault(prompts[r], len(prompt_rank))
    # Row order, not group order, so the training set's order (hence its shuffled batches) does not depend on the
    # group names.
    pairs = sorted((tuple(sorted(p, key=position.get)) for p in pair_indices(prompts, groups, rows=rows, every=True)),
                   key=lambda p: (prompt_rank[prompts[p[0]]], position[p[0]], position[p[1]]))
    if preferred is not None:
        chosen = [preferred if isinstance(preferred, str) else preferred.get(prompts[i]) for i, _ in pairs]
        # groups differ within a pair, so at most one side is the chosen group
        pairs = [(i, j) if groups[i] == c else (j, i)
                 for (i, j), c in zip(pairs, chosen) if c in (groups[i], groups[j])]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Model pieces
# ----------------------------------------------------------------------------------------------------------------

def images_to_pixels(images: Sequence[Any], resolution: int) -> torch.Tensor:
    """PIL images -> ``(B, 3, R, R)`` float32 in ``[-1, 1]``: shorter side resized to ``R`` (bicubic), centre crop."""
    from PIL import Image

    arrays = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class DiffusionParts:
    """The modules a training step uses. ``unet`` / ``text_encoder`` may be accelerate-wrapped (DDP) when trained."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    text_encoder_2: Any = None  # SDXL: the second (frozen) text encoder and its tokenizer
    tokenizer_2: Any = None

    @classmethod
    def from_pipeline(cls, pipe) -> "DiffusionParts":
        from diffusers import DDPMScheduler

        # Training noise follows the pipeline's own schedule (betas, prediction type), as diffusers' scripts do.
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                   DDPMScheduler.from_config(pipe.scheduler.config),
                   getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))

    @staticmethod
    def _unwrapped(module):
        # The reference pass must bypass DDP: it has no gradient and must not take part in gradient sync.
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            return module.module
        return module

    def peft_modules(self) -> list:
        """The (unwrapped) modules that carry LoRA layers."""
        return [m for m in (self._unwrapped(self.unet), self._unwrapped(self.text_encoder))
                if getattr(m, "peft_config", None)]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``z_0``: the VAE posterior MEAN times the scaling factor.

        The mean (not a sample) makes the latent a function of the image alone, so two identical images give
        identical latents and the reference sees exactly the latents the policy sees; SD's posterior std is tiny.
        """
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mode() * vae.config.scaling_factor

    def encode_prompts(self, prompts: Sequence[str], device, text_encoder=None) -> torch.Tensor:
        """Text-encoder hidden states of ``prompts``, tokenized exactly as ``StableDiffusionPipeline`` does."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return (text_encoder or self.text_encoder)(tok.input_ids.to(device))[0]

    def conditioning(self, prompts: Sequence[str], latents: torch.Tensor, text_encoder=None) -> tuple[Any, dict]:
        """The UNet's text conditioning: the hidden states (SD), or for SDXL what ``StableDiffusionXLPipeline``
        passes: the penultimate hidden states of both text encoders concatenated, the second encoder's pooled
        projection (``text_embeds``) and ``time_ids`` = (original size, crop top-left (0, 0), target size), all at
        the training resolution."""
        device = latents.device
        if self.text_encoder_2 is None:
            return self.encode_prompts(prompts, device, text_encoder), {}
        embeds, pooled = [], None
        for tok, enc in ((self.tokenizer, text_encoder or self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection) text_embeds
            embeds.append(out.hidden_states[-2])
        hidden = torch.cat(embeds, dim=-1)
        side = [n * 2 ** (len(self.vae.config.block_out_channels) - 1) for n in latents.shape[-2:]]
        time_ids = torch.tensor([[*side, 0, 0, *side]], dtype=hidden.dtype, device=device).repeat(len(prompts), 1)
        return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def denoising_errors(
        self, latents: torch.Tensor, prompts: Sequence[str], noise: torch.Tensor, timesteps: torch.Tensor,
        use_adapter: bool = True,
    ) -> torch.Tensor:
        """Per-image ``mean((target - prediction)^2)`` in float32; ``use_adapter=False`` gives the reference.

        The reference runs without gradient on the unwrapped modules with every adapter disabled (the base model).
        """
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise UserError(f"scheduler prediction_type '{sched.config.prediction_type}' is not supported; "
                            "use a pipeline trained for epsilon or v_prediction")
        if use_adapter:
            hidden, extra = self.conditioning(prompts, latents)
            pred = self.unet(noisy, timesteps, hidden, **extra).sample
        else:
            modules = self.peft_modules()
            with torch.no_grad():
                for m in modules:
                    m.disable_adapters()
                try:
                    hidden, extra = self.conditioning(prompts, latents, self._unwrapped(self.text_encoder))
                    pred = self._unwrapped(self.unet)(noisy, timesteps, hidden, **extra).sample
                finally:
                    for m in modules:
                        m.enable_adapters()
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)

    def sample_noise(self, latents: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps, t)`` for a batch of latents, drawn from ``generator``, or one generator per item (a list): then an
        item's draw does not depend on the batch it is in or on the process that trains it (see :func:`item_generators`)."""
        if isinstance(generator, (list, tuple)):
            T = self.noise_scheduler.config.num_train_timesteps
            t = torch.cat([torch.randint(0, T, (1,), generator=g, device=g.device) for g in generator])
            eps = torch.stack([torch.randn(latents.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                               for g in generator])
            return eps.to(latents.device, latents.dtype), t.to(latents.device)
        n = latents.shape[0]
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator,
                          device=generator.device).to(latents.device)
        eps = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return eps.to(latents.device, latents.dtype), t

    def sft_loss(self, pixels: torch.Tensor, prompts: Sequence[str], generator: torch.Generator):
        """Mean denoising error on the images under their neutral prompts, and its stats."""
        latents = self.encode_images(pixels)
        noise, t = self.sample_noise(latents, generator)
        err = self.denoising_errors(latents, prompts, noise, t)
        return err.mean(), {"mse": err.detach().mean().item()}

    def pair_logits(
        self, pixels_i: torch.Tensor, pixels_j: torch.Tensor, prompts: Sequence[str], generator: torch.Generator,
        beta: float, reference: str,
    ) -> tuple[torch.Tensor, dict]:
        """``D = beta (r_i - r_j)`` for ``P`` pairs, each with ONE shared noise and timestep (Wallace et al.).

        Both images of all pairs go through the UNet in one batch ``[i..., j...]``.
        """
        p = pixels_i.shape[0]
        latents = self.encode_images(torch.cat([pixels_i, pixels_j]))
        noise, t = self.sample_noise(latents[:p], generator)
        noise, t = torch.cat([noise, noise]), torch.cat([t, t])
        both = list(prompts) * 2
        err = self.denoising_errors(latents, both, noise, t)
        err_ref = self.denoising_errors(latents, both, noise, t, use_adapter=False) if reference == "base" else None
        d = pair_logits(err, err_ref, p, beta)
        stats = {"mse": err.detach().mean().item()}
        if err_ref is not None:
            stats["mse_ref"] = err_ref.mean().item()
        return d, stats

    def preference_loss(self, objective: str, pixels_i, pixels_j, prompts, generator, beta, reference):
        """Mean per-pair ``bpo`` or ``dpo`` loss, with stats (mean ``D``, mean ``|sigmoid(D) - 1/2|``)."""
        d, stats = self.pair_logits(pixels_i, pixels_j, prompts, generator, beta, reference)
        per = balanced_preference_loss_from_logits(d, "none") if objective == "bpo" else dpo_sigmoid_loss(d)
        dd = d.detach()
        stats.update(D=dd.mean().item(), imbalance=(torch.sigmoid(dd) - 0.5).abs().mean().item())
        if objective == "dpo":
            stats["implicit_acc"] = (dd > 0).float().mean().item()
        return per.mean(), stats


# ----------------------------------------------------------------------------------------------------------------
# Input checks (everything before anything is written)
# ----------------------------------------------------------------------------------------------------------------

def _as_config(config: DiffusionTrainConfig | dict) -> DiffusionTrainConfig:
    if isinstance(config, DiffusionTrainConfig):
        return config
    if isinstance(config, dict):
        return from_dict(DiffusionTrainConfig, config, prefix="train")
    raise UserError(f"run_diffusion_train: config must be a DiffusionTrainConfig or a mapping, got "
                    f"{type(config).__name__}")


@dataclass
class _Data:
    ds: Any
    prompts: list[str]
    groups: list[str]
    rows: list[int]
    pairs: np.ndarray | None
    fingerprint: str | None


def _load_data(config: DiffusionTrainConfig) -> _Data:
    import datasets

    if not config.dataset:
        raise ConfigError("config key 'train.dataset' is required: the directory written by the synth stage "
                          "(datasets.save_to_disk)")
    path = Path(config.dataset)
    if not path.is_dir():
        raise ConfigError(f"config key 'train.dataset': '{path}' is not a directory; pass the folder written by "
                          "datasets.save_to_disk (the synth stage's output)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants for foreign folders
        raise ConfigError(f"config key 'train.dataset': '{path}' is not a saved dataset ({err}); pass a folder "
                          "written by datasets.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"config key 'train.dataset': '{path}' holds a DatasetDict with splits "
                          f"{list(ds)}; pass the folder of one split, e.g. '{path / next(iter(ds))}'")
    missing = [c for c in ("prompt", "group", "image") if c not in ds.column_names]
    if config.min_confidence > 0 and "confidence" not in ds.column_names:
        missing.append("confidence")
    if missing:
        raise ConfigError(f"config key 'train.dataset': '{path}' lacks column(s) {missing} (has {ds.column_names}); "
                          "build it with the synth stage (columns prompt, group, seed, confidence, image)")
    if not isinstance(ds.features["image"], datasets.Image):
        raise ConfigError(f"config key 'train.dataset': column 'image' of '{path}' is "
                          f"{type(ds.features['image']).__name__}, not datasets.Image; cast it with "
                          "ds.cast_column('image', datasets.Image())")
    if len(ds) == 0:
        raise ConfigError(f"config key 'train.dataset': '{path}' has no rows; synthesise data first")
    prompts, groups = list(ds["prompt"]), list(ds["group"])
    for i, (p, g) in enumerate(zip(prompts, groups)):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"config key 'train.dataset': row {i} has prompt {p!r}; every row needs its neutral "
                              "prompt")
        if not isinstance(g, str) or not g.strip():
            raise ConfigError(f"config key 'train.dataset': row {i} has group {g!r}; every row needs a group name")
    rows = list(range(len(ds)))
    if config.min_confidence > 0:
        conf = list(ds["confidence"])
        rows = [i for i in rows if conf[i] is not None and conf[i] >= config.min_confidence]
        if not rows:
            raise ConfigError(f"config key 'train.min_confidence': {config.min_confidence} drops every row of "
                              f"'{path}'; lower it")
    _warn_if_unbalanced(prompts, groups, rows)
    pairs = None
    if config.objective in ("bpo", "dpo"):
        preferred = config.preferred_group if config.objective == "dpo" else None
        if isinstance(preferred, dict):
            known = set(prompts[i] for i in rows)
            unknown = [p for p in preferred if p not in known]
            if unknown:
                raise ConfigError(f"config key 'train.preferred_group': prompt {unknown[0]!r} is not in the dataset; "
                                  "map only prompts of the dataset")
            lacking = sorted(known - set(preferred))
            if lacking:
                raise ConfigError(f"config key 'train.preferred_group': prompt {lacking[0]!r} has no preferred "
                                  "group; add it to the mapping or drop its rows")
        if isinstance(preferred, str) and preferred not in set(groups[i] for i in rows):
            raise ConfigError(f"config key 'train.preferred_group': group {preferred!r} is not in the dataset "
                              f"(groups: {sorted(set(groups))}); name one of them")
        pairs = build_pairs(prompts, groups, rows, preferred)
        if len(pairs) == 0:
            raise ConfigError(f"config key 'train.objective': '{config.objective}' needs pairs of images of "
                              f"different groups for the same prompt, and '{path}' has none; use objective 'sft' "
                              "or synthesise several groups per prompt")
    return _Data(ds, prompts, groups, rows, pairs, getattr(ds, "_fingerprint", None))


def _warn_if_unbalanced(prompts, groups, rows) -> None:
    counts: dict[str, dict[str, int]] = {}
    for i in rows:
        c = counts.setdefault(prompts[i], {})
        c[groups[i]] = c.get(groups[i], 0) + 1
    all_groups = set(groups[i] for i in rows)
    for prompt, c in counts.items():
        full = {g: c.get(g, 0) for g in all_groups}
        if len(set(full.values())) > 1:
            # Unequal counts re-weight the groups in SFT, i.e. re-introduce the skew the set exists to remove.
            log.warning("prompt %r is not balanced across groups: %s (and possibly others)", prompt, full)
            return


def _resolve_pipeline(source) -> tuple[Any, dict]:
    """The pipeline to train, and the identity that keys a finished run (``None`` model when unknown)."""
    from generators.base import GeneratorConfig

    if isinstance(source, dict):
        source = from_dict(GeneratorConfig, source, prefix="generator")
    if isinstance(source, GeneratorConfig):
        if not is_diffusers_backend(source.backend):
            raise ConfigError(f"config key 'generator.backend': diffusion training needs a diffusers pipeline "
                              f"(backend 'diffusers' or a subclass of it), got '{source.backend}'; use the Janus "
                              "trainer for token generators")
        if source.adapter:
            raise ConfigError("config key 'generator.adapter': training starts from the base model; move the adapter "
                              "to 'train.init_adapter' to continue training it")
        from generators.backends import GENERATORS

        pipe = GENERATORS.get(source.backend)(source).pipeline
        return pipe, {"model": source.model, "revision": source.revision, "dtype": source.dtype}
    if not all(hasattr(source, a) for a in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        raise UserError(f"run_diffusion_train: expected a StableDiffusionPipeline or a generator config, got "
                        f"{type(source).__name__}")
    return source, {"model": getattr(source, "name_or_path", None), "revision": None,
                    "dtype": str(source.unet.dtype).replace("torch.", "")}


def _check_pipeline(pipe, config: DiffusionTrainConfig) -> None:
    from diffusers import UNet2DConditionModel

    xl = getattr(pipe, "text_encoder_2", None) is not None
    if (not isinstance(pipe.unet, UNet2DConditionModel) or getattr(pipe, "text_encoder_3", None) is not None
            or (xl and (getattr(pipe, "tokenizer_2", None) is None
                        or pipe.unet.config.addition_embed_type != "text_time"))):
        raise UserError(f"run_diffusion_train: {type(pipe).__name__} is not supported; train a Stable Diffusion "
                        "1.x/2.x-style pipeline (one CLIP text encoder, UNet2DConditionModel) or an SDXL one (two "
                        "text encoders, text_time conditioning)")
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise UserError("run_diffusion_train: the pipeline has no text encoder/tokenizer; load the full pipeline")
    for name in ("unet", "text_encoder"):
        if getattr(getattr(pipe, name), "peft_config", None):
            raise UserError(f"run_diffusion_train: the pipeline's {name} already carries LoRA adapters "
                            f"{list(getattr(pipe, name).peft_config)}; pass a clean pipeline and put the adapter "
                            "in 'train.init_adapter' to continue training it")
    module = getattr(pipe, config.lora_target)
    suffixes = LORA_MODULES[config.lora_target]
    if not any(n.endswith(s) for n, _ in module.named_modules() for s in suffixes):
        raise ConfigError(f"config key 'train.lora_target': the pipeline's {config.lora_target} has no modules "
                          f"named {list(suffixes)}; choose the other target")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(f"run_diffusion_train: the pipeline's scheduler predicts '{prediction}'; only epsilon and "
                        "v_prediction pipelines can be trained")
    factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    if config.resolution % factor:
        fix = max(factor, round(config.resolution / factor) * factor)
        raise ConfigError(f"config key 'train.resolution': {config.resolution} is not a multiple of {factor} "
                          f"(VAE x UNet downsampling of this pipeline); use e.g. {fix}")
    if config.init_adapter is not None:
        path = Path(config.init_adapter)
        if not (path / WEIGHTS_NAME).is_file():
            raise ConfigError(f"config key 'train.init_adapter': '{path}' has no {WEIGHTS_NAME}; pass the adapter "
                              "folder written by an earlier run (OUTPUT_DIR/adapter)")
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
            prefixes = {k.split(".", 1)[0] for k in f.keys()}
        if config.lora_target not in prefixes:
            raise ConfigError(f"config key 'train.init_adapter': '{path}' adapts {sorted(prefixes)}, not lora_target "
                              f"'{config.lora_target}'; set lora_target to the component it adapts")


def _check_precision(config: DiffusionTrainConfig, cpu: bool) -> None:
    from accelerate.state import AcceleratorState

    if config.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a CUDA GPU; use bf16 or no on CPU")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision:
        raise UserError(f"config key 'train.mixed_precision': this process already runs accelerate with "
                        f"mixed_precision '{state['_mixed_precision']}'; set the same value or train in a fresh "
                        "process")


def _record(config: DiffusionTrainConfig, data: _Data, identity: dict) -> dict:
    import accelerate
    import diffusers
    import peft

    return {
        "train": to_dict(config),
        "dataset_fingerprint": data.fingerprint,
        "base": identity,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
    }


def _same_run(a: dict, b: dict) -> bool:
    keys = ("train", "dataset_fingerprint", "base", "align")
    return all(a.get(k) == b.get(k) for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

def run_diffusion_train(
    config: DiffusionTrainConfig | dict,
    pipeline_or_generator_config,
    out_dir: str | os.PathLike | None = None,
    classifier=None,
    save_steps: int = 0,
    save_total_limit: int = 2,
    resume_from: str | os.PathLike | None = None,
) -> Path:
    """Fine-tune a LoRA adapter on the balanced set and save it where ``pipe.load_lora_weights`` can load it.

    All inputs are checked before anything is written; the adapter folder appears atomically (written to a temporary
    folder, then renamed), so a crash never leaves a half-written adapter. If ``OUT_DIR/adapter`` already holds an
    adapter from the same config, dataset and base model, it is reused (loaded into the pipeline) instead of
    retrained; one from another run is never overwritten.

    Args:
        config: a :class:`DiffusionTrainConfig` or its mapping (the ``train`` section).
        pipeline_or_generator_config: a Stable Diffusion pipeline, trained IN PLACE (it ends with the adapter
            attached and active, ready to sample), or a diffusers :class:`generators.base.GeneratorConfig` (or its
            mapping) to load one.
        out_dir: run folder; defaults to ``config.output_dir``.
        classifier: the audit's :class:`audit.classify.ClipClassifier`; required by objective ``align`` (it is the
            differentiable attribute classifier of the loss, and its identity keys the run), ignored otherwise.
        save_steps: write a resumable ``OUT_DIR/checkpoint-N`` every N optimizer steps (0: never); see
            :func:`_save_checkpoint`. Not part of the run's identity (changing it does not retrain).
        save_total_limit: checkpoints kept (the oldest are removed).
        resume_from: a ``checkpoint-N`` folder of this run to continue from; the result equals the uninterrupted
            run's (the LoRA weights, optimizer, scheduler, data position and log are restored; the noise of every
            item is a function of seed, epoch and item, see :func:`item_generators`).

    Returns:
        The adapter folder ``OUT_DIR/adapter`` (``pytorch_lora_weights.safetensors``, ``train_config.json``,
        ``train_log.jsonl``).

    Raises:
        UserError: bad config, dataset or pipeline, naming the key and the fix.
    """
    from generators.base import GeneratorConfig

    config = _as_config(config)
    out_dir = out_dir if out_dir is not None else config.output_dir
    if not out_dir:
        raise ConfigError("config key 'train.output_dir' is required: the run folder the adapter is written to")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'train.output_dir': '{out}' is a file; pass a folder")
    # A generator config that asks for the CPU keeps training there; a pipeline goes where accelerate puts it.
    src = pipeline_or_generator_config
    force_cpu = (src.get("device") if isinstance(src, dict)
                 else getattr(src, "device", None) if isinstance(src, GeneratorConfig) else None) == "cpu"
    _check_precision(config, force_cpu)
    sampling = None
    if config.objective == "align":
        from debias.train import align

        align.check_classifier(config, classifier)
        sampling = align.sampling_defaults(src)
        if config.align_guidance_scale is not None:
            sampling["guidance_scale"] = config.align_guidance_scale
        prompts, fingerprint = align.load_prompts(config)
        data = _Data(None, prompts, [], list(range(len(prompts))), None, fingerprint)
    else:
        data = _load_data(config)
    pipe, identity = _resolve_pipeline(pipeline_or_generator_config)
    _check_pipeline(pipe, config)
    record = _record(config, data, identity)
    if sampling is not None:
        record["align"] = {"classifier": classifier.identity(), **sampling}

    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        old_path = adapter_dir / RECORD_NAME
        old = json.loads(old_path.read_text()) if old_path.is_file() else {}
        if identity.get("model") and data.fingerprint and _same_run(old, record):
            pipe.load_lora_weights(str(adapter_dir))
            log.info("reusing the adapter in %s (same config, dataset and base model)", adapter_dir)
            return adapter_dir
        raise UserError(f"config key 'train.output_dir': '{adapter_dir}' already holds an adapter from another run "
                        "(or from a base model that cannot be identified); pass a new output_dir or delete it")
    resume = _read_checkpoint(resume_from, record) if resume_from is not None else None
    return _train(config, data, pipe, record, out, adapter_dir, force_cpu,
                  Checkpointing(max(0, int(save_steps)), max(1, int(save_total_limit)), resume), classifier, sampling)


def _train(config, data: _Data, pipe, record: dict, out: Path, adapter_dir: Path, force_cpu: bool,
           ckpt: "Checkpointing | None" = None, classifier=None, sampling: dict | None = None) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    fresh_state = not AcceleratorState._shared_state  # leave accelerate's process-global state as we found it
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum,
                              mixed_precision=config.mixed_precision, cpu=force_cpu)
    objective = None
    try:
        device = accelerator.device
        target = config.lora_target
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).requires_grad_(False)
        if config.init_adapter is not None:
            pipe.load_lora_weights(config.init_adapter, adapter_name=ADAPTER_NAME)
            if ADAPTER_NAME not in (getattr(getattr(pipe, target), "peft_config", None) or {}):
                raise ConfigError(f"config key 'train.init_adapter': '{config.init_adapter}' has no LoRA layers for "
                                  f"lora_target '{target}'; set lora_target to the component it adapts")
        else:
            add_lora(getattr(pipe, target), target, config)
        model = getattr(pipe, target)
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
        for other in ("unet", "text_encoder"):
            if other != target:
                getattr(pipe, other).requires_grad_(False)  # an init adapter's other half stays frozen
        if model.dtype != torch.float32:
            cast_training_params(model, torch.float32)  # AdamW on fp16/bf16 LoRA weights loses small updates
        was_training = {n: getattr(pipe, n).training for n in ("unet", "vae", "text_encoder")}
        pipe.vae.to(device).eval()
        pipe.unet.to(device)
        pipe.text_encoder.to(device)
        if getattr(pipe, "text_encoder_2", None) is not None:
            pipe.text_encoder_2.to(device).eval()  # SDXL's second encoder: conditioning only, never trained
        model.train()

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_epsilon)
        n_items = len(data.pairs) if data.pairs is not None else len(data.rows)
        loader = torch.utils.data.DataLoader(
            list(range(n_items)), batch_size=config.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(config.seed))
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        lr_scheduler = get_scheduler(
            config.lr_schedule, optimizer=optimizer,
            num_warmup_steps=int(config.warmup_ratio * config.steps) * accelerator.num_processes,
            num_training_steps=config.steps * accelerator.num_processes)
        had_forward_attr = "forward" in model.__dict__
        wrapped, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
        parts = DiffusionParts.from_pipeline(pipe)
        setattr(parts, target, wrapped)
        beta, reference = config.effective_beta, config.effective_reference
        if config.objective == "align":  # data.rows index the neutral prompts; batch_size prompts per micro-step
            from debias.train.align import AlignObjective

            objective = AlignObjective(config, pipe, parts, classifier, sampling["guidance_scale"],
                                       sampling["negative_prompt"], (config.seed, accelerator.process_index))

        ckpt = ckpt or Checkpointing()
        logs: list[dict] = []
        step, acc_stats, epoch, start = 0, [], 0, (0, 0)
        if ckpt.resume is not None:
            step, logs, start = _load_checkpoint(ckpt.resume, model, optimizer, lr_scheduler)
        while step < config.steps:
            for position, batch in enumerate(loader):
                if (epoch, position) < start:
                    continue  # consumed before the checkpoint (iterating keeps the shuffle order of the run)
                idx = batch.tolist()
                noise_gen = item_generators(config.seed, epoch, idx)
                with accelerator.accumulate(wrapped):
                    with accelerator.autocast():
                        if objective is not None:
                            loss, stats = objective.loss([data.prompts[data.rows[k]] for k in idx], noise_gen)
                        elif data.pairs is None:
                            rows = [data.rows[k] for k in idx]
                            pixels = _pixels(data, rows, config.resolution, device)
                            loss, stats = parts.sft_loss(pixels, [data.prompts[r] for r in rows], noise_gen)
                        else:
                            pairs = data.pairs[idx]
                            pix = _pixels(data, [*pairs[:, 0].tolist(), *pairs[:, 1].tolist()],
                                          config.resolution, device)
                            loss, stats = parts.preference_loss(
                                config.objective, pix[:len(idx)], pix[len(idx):],
                                [data.prompts[int(i)] for i in pairs[:, 0]], noise_gen, beta, reference)
                    accelerator.backward(loss)
                    if objective is not None:
                        objective.sync_gradients(accelerator, params)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                acc_stats.append({"loss": loss.detach().item(), **stats})
                if accelerator.sync_gradients:
                    step += 1
                    entry = {k: float(np.mean([s[k] for s in acc_stats])) for k in acc_stats[0]}
                    entry = {"step": step, **entry, "lr": lr_scheduler.get_last_lr()[0]}
                    logs.append(entry)
                    acc_stats = []
                    if step >= config.steps:
                        break
                    if ckpt.save_steps and step % ckpt.save_steps == 0:
                        _save_checkpoint(accelerator, model, optimizer, lr_scheduler, out, step, logs,
                                         (epoch, position + 1), record, ckpt.save_total_limit)
            epoch += 1

        # Mixed precision patches the instance's forward with autocast; the pipeline must sample as before.
        model = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        if not had_forward_attr:
            model.__dict__.pop("forward", None)
        setattr(pipe, target, model)
        for n, was in was_training.items():
            getattr(pipe, n).train(was)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save(pipe, record, logs, out, adapter_dir)
        accelerator.wait_for_everyone()
        return adapter_dir
    finally:
        if objective is not None:
            objective.close()
        if fresh_state:
            AcceleratorState._reset_state()
            GradientState._reset_state()


def add_lora(module, target: str, config: DiffusionTrainConfig) -> None:
    """Attach a fresh LoRA adapter (peft's init: A random, B = 0) to ``module``, seeded by ``config.seed``.

    The init is seeded so that the same config gives the same adapter (finished runs are reused by content), inside
    ``fork_rng`` so that the caller's global torch RNG is left as it was.
    """
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        module.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                      init_lora_weights=True, target_modules=list(LORA_MODULES[target])))


def _pixels(data: _Data, rows: list[int], resolution: int, device) -> torch.Tensor:
    images = data.ds[[int(r) for r in rows]]["image"]
    return images_to_pixels(images, resolution).to(device)


def _save(pipe, record: dict, logs: list[dict], out: Path, adapter_dir: Path) -> None:
    """Write the adapter (diffusers LoRA format, rank/alpha in its metadata) + record + log, then rename into place."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    for name in ("unet", "text_encoder"):
        module = getattr(pipe, name)
        if ADAPTER_NAME in (getattr(module, "peft_config", None) or {}):
            sd = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(sd)
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER_NAME].to_dict()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    try:
        StableDiffusionPipeline.save_lora_weights(str(tmp), safe_serialization=True, **kwargs)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
        (tmp / LOG_NAME).write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in logs))
        os.replace(tmp, adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Backends, per-item noise and resumable checkpoints
# ----------------------------------------------------------------------------------------------------------------

def is_diffusers_backend(backend: str) -> bool:
    """Whether generator backend ``backend`` is a diffusers pipeline (``diffusers`` or a subclass, e.g. ``lab-sd``)."""
    from generators.backends import GENERATORS
    from generators.diffusers_backend import DiffusersGenerator

    try:
        cls = GENERATORS.get(backend)
    except Exception:  # an unknown name: the generator config check reports it
        return False
    return isinstance(cls, type) and issubclass(cls, DiffusersGenerator)


def item_generators(seed: int, epoch: int, items: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per training item, seeded by ``(seed, epoch, item)``: the noise and timestep an item gets
    do not depend on the batch size, the process that trains it or where a run resumed, so a run on N processes
    (per-process batch / N) computes the same update as on one, and a resumed run the same as an uninterrupted one."""
    import hashlib

    out = []
    for k in items:
        digest = hashlib.sha256(f"{seed}:{epoch}:{int(k)}".encode()).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return out


CHECKPOINT_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint (as the Trainer's)


@dataclass
class Checkpointing:
    save_steps: int = 0
    save_total_limit: int = 2
    resume: dict | None = None


def _read_checkpoint(path, record: dict) -> dict:
    """The state of checkpoint folder ``path``; it must be complete and come from the same run (config, data,
    base model)."""
    path = Path(path)
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or "global_step" not in state:
        raise UserError(f"checkpoint '{path}' is incomplete (no readable {CHECKPOINT_STATE}); pass an earlier "
                        "checkpoint-N, or none to start over")
    if not _same_run(state.get("record") or {}, record):
        raise UserError(f"checkpoint '{path}' was written by another run (config, data or base model differ); "
                        "pass a checkpoint of this run, or none to start over")
    return {**state, "path": str(path)}


def _save_checkpoint(accelerator, model, optimizer, lr_scheduler, out: Path, step: int, logs: list[dict],
                     position: tuple[int, int], record: dict, limit: int) -> None:
    """``OUT/checkpoint-STEP``: the trainable (LoRA) weights (safetensors), the optimizer and scheduler states, and
    ``trainer_state.json`` (step, data position, log, run record) written LAST, so a kill mid-save leaves a folder
    that :func:`debias.train.run.last_complete_checkpoint` recognises as incomplete. Weights and optimizer states
    are identical on every process under DDP, so the main process writes them alone."""
    from safetensors.torch import save_file

    from audit.store import crash_point

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = out / f"checkpoint-{step}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        save_file({n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(path / "lora.safetensors"))
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
        crash_point(f"train:checkpoint-{step}")
        torch.save(lr_scheduler.state_dict(), path / "scheduler.pt")
        state = {"global_step": step, "epoch": position[0], "next_batch": position[1], "log_history": logs,
                 "record": record}
        (path / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        done = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()
                       and (p / CHECKPOINT_STATE).is_file()), key=lambda p: int(p.name[11:]))
        for old in done[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(state: dict, model, optimizer, lr_scheduler) -> tuple[int, list[dict], tuple[int, int]]:
    from safetensors.torch import load_file

    path = Path(state["path"])
    weights = load_file(str(path / "lora.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise UserError(f"checkpoint '{path}' holds other LoRA weights than this run trains; pass a checkpoint of "
                        "this run, or none to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return int(state["global_step"]), list(state["log_history"]), (int(state["epoch"]), int(state["next_batch"]))
