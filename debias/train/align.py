"""Distributional alignment of a diffusion model's samples to a target attribute distribution (Shen et al., ICLR 2024).

Method
------
Shen et al. ("Finetuning Text-to-Image Diffusion Models for Fairness", FFD) fine-tune the sampler itself on a loss
defined on its OWN samples. For a neutral prompt, the model being trained generates a batch of ``N`` images from
fresh noise; a differentiable attribute classifier ``h`` gives every image class probabilities ``p_i``; each image is
then given a target class by optimal transport (OT) from ``{p_i}`` to ``N`` one-hot points ``{u_j}`` that represent
the target distribution, ``sigma* = argmin over permutations of sum_i ||p_i - u_sigma(i)||_2`` (the cheapest change
of the batch, in probability space, that makes it follow the target); and a cross-entropy pulls each image towards its
target, ``L_align = 1/N sum_i 1[c_i >= C] CE(h(x_i), y_i)``. A semantics-preserving term keeps each image close to the
image the frozen model draws from the same noise, so that only the attribute changes. Gradients reach the weights
through the sampling chain itself ("adjusted direct finetuning"). Minority images are pulled further into their
class and the majority's most borderline images are pushed across, until the batch follows the target; unlike
training on a balanced synthetic set, nothing but neutral prompts and a classifier is needed.

Facts carried over from the paper and the authors' code (sail-sg/finetune-fair-diffusion)
-----------------------------------------------------------------------------------------
* OT cost: the L2 distance between the probability vector and the one-hot class vector (not squared).
* Targets: the paper draws ``u_1..u_N`` iid from the target distribution, solves the OT for each draw and uses the
  expectation ``q_i = E[u_sigma*(i)]``: ``y_i = argmax q_i``, confidence ``c_i = max q_i``; only images with
  ``c_i >= C`` get the cross-entropy (the authors' code keeps ``c_i >= 0.8``: ``uncertainty_threshold 0.2``).
  Here the expectation is a Monte-Carlo average over ``align_target_draws`` draws (the paper: "approximated by
  empirical average"); each draw is an exact assignment (:func:`ot_assign`). The paper notes the fixed alternative,
  exactly ``N * p_k`` targets of class ``k`` (``align_target_draws: 0``, counts rounded by largest remainder): it
  demands a balanced finite batch and gives every image confidence 1, so the threshold no longer filters.
* The confidence is that of the OT TARGET, not the classifier's confidence in the image: an image in the middle of the
  batch's ranking could go either way under the target distribution and is left alone.
* Semantic term: ``1 - cos`` between features of the trained model's image and of the frozen model's image from the
  same noise (they use CLIP ViT-H and DINOv2 features, weight 8 on their sum), weighted 1 where the image keeps the
  frozen image's class and ``align_semantic_change_factor`` (their 0.2) where it is asked to change (or has no
  confident target), so that the preservation term does not fight the change it is meant to allow.
* Adjusted direct finetuning: the UNet's input latent is detached, so the gradient reaches the weights through each
  noise prediction and the sampler's own update chain, not through the UNet's Jacobian with respect to its input
  (the exploding "indirect" paths the paper identifies). CFG as in sampling; they train with 19-23 DPM-Solver steps.

Deviations (why)
----------------
* Classifier: the audit's zero-shot CLIP head (text embeddings of the class prompt ensembles as a fixed linear head)
  on the WHOLE image, instead of a face detector + face-attribute classifier on face crops: the loss then optimises
  exactly what the audit measures, and the lab world has no face detector. The semantic term uses the same CLIP's
  image embedding (no DINO, no face-identity term, no realism term).
* Gradient window: by default every sampling step keeps its graph, as the paper; ``align_steps: K`` keeps only the
  last ``K`` (truncated backpropagation, for memory). Truncating hard costs most of the signal: the late, low-noise
  steps barely change the image (the eps coefficient of a DDIM step vanishes as t -> 0, and with
  ``set_alpha_to_one: false`` the final DDIM step is the identity), so on the tiny pipelines the gradient norm of the
  last step alone was ~6e-4 (PNDM, SD 1.5's schedule) and ~1.5e-4 (DDIM) of all 8 steps'. The paper also rescales
  each step's gradient (their ``A_t`` standardised to 1); no rescaling is applied here (Adam normalises the overall
  scale, not the balance between steps).
* One pass: the batch is generated once with the graph, classified, assigned targets from its own (detached)
  probabilities and back-propagated. The authors generate it twice (once without gradient for the targets, then in
  small chunks with gradient) to bound GPU memory; here memory grows with ``batch_size * align_batch_size`` images.
* Per process: with several processes each one aligns its own batch (the authors gather the probabilities across
  GPUs first, making the OT batch ``N * processes``); gradients are averaged by hand
  (:meth:`AlignObjective.sync_gradients`). Multi-process runs are untested here (CPU, one process).
* Fixed number of sampling steps (``align_inference_steps``) instead of a random 19-23.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from generators.config import ConfigError, UserError, did_you_mean


# ----------------------------------------------------------------------------------------------------------------
# Optimal-transport targets (pure)
# ----------------------------------------------------------------------------------------------------------------

def largest_remainder_counts(shares: Sequence[float], n: int) -> np.ndarray:
    """Integer class counts summing to ``n`` for target shares (Hamilton's largest-remainder rounding).

    Every class first gets ``floor(n * share)``; the seats left go one each to the classes with the largest
    remainders ``n * share - floor(n * share)``; equal remainders go to the class listed first. Each count is thus
    within 1 of ``n * share``, and the rounding never moves a seat from a larger remainder to a smaller one.

    Args:
        shares: ``(K,)`` non-negative shares summing to 1.
        n: batch size.

    Returns:
        ``(K,)`` int64 counts.
    """
    shares = np.asarray(shares, dtype=np.float64)
    exact = np.round(shares * n, 9)  # 0.1 * 30 = 3.0000000000000004 must floor to 3, not leave a remainder
    counts = np.floor(exact).astype(np.int64)
    left = int(n - counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:left]] += 1
    return counts


def _assign(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    # One column per target slot: class k's cost column repeated counts[k] times makes the OT to a multiset of
    # one-hot points an assignment problem, which linear_sum_assignment solves exactly.
    slots = np.repeat(np.arange(len(counts)), counts)
    rows, cols = linear_sum_assignment(cost[:, slots])
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = slots[cols]
    return out


def _ot_cost(probs: np.ndarray) -> np.ndarray:
    """``(N, K)`` cost ``||p_i - e_k||_2`` of moving image ``i`` to class ``k`` (the paper's L2 distance)."""
    return np.linalg.norm(probs[:, None, :] - np.eye(probs.shape[1])[None], axis=-1)


def _check_probs(probs) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or not np.isfinite(probs).all():
        raise UserError(f"ot_assign: probs must be a finite (N, K) array with K >= 2, got shape {probs.shape}")
    return probs


def ot_assign(probs, target: Sequence[float] | None = None, counts: Sequence[int] | None = None) -> np.ndarray:
    """Exact OT assignment of a batch to target class counts: the class each image should have.

    Minimises ``sum_i ||probs_i - e_{y_i}||_2`` over all labelings ``y`` with exactly ``counts[k]`` images of class
    ``k``. Where the greedy argmax would put every image into the majority class, this moves the images that are
    cheapest to move (those closest to the other classes) until the counts hold.

    Args:
        probs: ``(N, K)`` class probabilities of the batch.
        target: ``(K,)`` target shares; the counts are ``N * target`` rounded by :func:`largest_remainder_counts`.
        counts: ``(K,)`` integer counts summing to ``N``, instead of ``target``.

    Returns:
        ``(N,)`` int64 class indices. Ties (equal costs) are broken deterministically by the solver.
    """
    probs = _check_probs(probs)
    n, k = probs.shape
    if (target is None) == (counts is None):
        raise UserError("ot_assign: pass exactly one of target (shares) and counts")
    if counts is None:
        counts = largest_remainder_counts(target, n)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (k,) or (counts < 0).any() or counts.sum() != n:
        raise UserError(f"ot_assign: counts must be {k} non-negative integers summing to the batch size {n}, got "
                        f"{counts.tolist()}")
    return _assign(_ot_cost(probs), counts)


def ot_targets(probs, target: Sequence[float], draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The paper's dynamic targets: ``y_i = argmax q_i`` and confidence ``c_i = max q_i``.

    ``q_i[k]`` is the probability that image ``i`` is sent to class ``k`` by the OT to ``N`` points drawn iid from
    the target distribution (their class counts are multinomial), estimated over ``draws`` draws. With ``draws = 0``
    the fixed counts ``N * target`` (largest remainder) are used once and every confidence is 1.

    Args:
        probs: ``(N, K)`` class probabilities.
        target: ``(K,)`` target shares.
        draws: Monte-Carlo draws of the target batch (0: fixed counts).
        rng: source of the draws.

    Returns:
        ``(targets (N,) int64, confidence (N,) float64)``; equal ``q`` entries resolve to the lower class index.
    """
    probs = _check_probs(probs)
    n = probs.shape[0]
    if draws == 0:
        return ot_assign(probs, target), np.ones(n)
    cost = _ot_cost(probs)
    q = np.zeros_like(probs)
    for _ in range(draws):
        q[np.arange(n), _assign(cost, rng.multinomial(n, np.asarray(target, dtype=np.float64)))] += 1.0
    q /= draws
    return q.argmax(axis=1), q.max(axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Loss (pure torch)
# ----------------------------------------------------------------------------------------------------------------

def align_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    confidence: torch.Tensor,
    threshold: float,
    image_embeddings: torch.Tensor | None = None,
    reference_embeddings: torch.Tensor | None = None,
    reference_classes: torch.Tensor | None = None,
    semantic_weight: float = 0.0,
    change_factor: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = 1/N sum_i 1[c_i >= C] CE_i + lambda * 1/N sum_i w_i (1 - cos(e_i, e_i^ref))``.

    Args:
        log_probs: ``(N, K)`` log class probabilities of the generated images (with gradient).
        targets: ``(N,)`` OT target classes.
        confidence: ``(N,)`` target confidences ``c_i``.
        threshold: ``C``; images below it get no cross-entropy (the mean still divides by ``N``, as in the paper).
        image_embeddings: ``(N, D)`` unit-norm features of the generated images (with gradient), for the semantic
            term; ``None`` (or ``semantic_weight`` 0) leaves it out.
        reference_embeddings: ``(N, D)`` unit-norm features of the frozen model's images from the same noise.
        reference_classes: ``(N,)`` the classifier's class of each frozen image: ``w_i = 1`` where the image keeps it
            (confident target equal to it), ``change_factor`` otherwise.
        semantic_weight: ``lambda``.
        change_factor: the semantic weight of images asked to change class (or without a confident target).

    Returns:
        The scalar loss and stats (``ce``: mean CE over the images that get it, ``semantic``: mean ``1 - cos``,
        ``used``: fraction of images with a confident target).
    """
    n = log_probs.shape[0]
    use = (confidence >= threshold).to(log_probs.device)
    ce = F.nll_loss(log_probs.float(), targets.to(log_probs.device), reduction="none")
    loss = (ce * use).sum() / n
    stats = {"ce": (ce.detach()[use].mean().item() if use.any() else 0.0), "used": use.float().mean().item()}
    if semantic_weight > 0 and image_embeddings is not None:
        dist = 1.0 - (image_embeddings.float() * reference_embeddings.to(image_embeddings.device).float()).sum(-1)
        keep = use & (targets.to(dist.device) == reference_classes.to(dist.device))
        weights = torch.where(keep, torch.ones_like(dist), torch.full_like(dist, change_factor))
        loss = loss + semantic_weight * (weights * dist).mean()
        stats["semantic"] = dist.detach().mean().item()
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Sampling through the pipeline's own scheduler, with gradients through the last steps
# ----------------------------------------------------------------------------------------------------------------

def encode_prompts(pipe, prompts: Sequence[str], device, text_encoder=None) -> torch.Tensor:
    """Text-encoder hidden states, tokenized exactly as ``StableDiffusionPipeline.encode_prompt`` does (max-length
    padding, truncation, no attention mask for CLIP text encoders), negatives included."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return (text_encoder or pipe.text_encoder)(tok.input_ids.to(device))[0]


def sample_images(
    pipe,
    prompts: Sequence[str],
    latents: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    grad_steps: int = 0,
    *,
    negative_prompt: str | None = None,
    unet=None,
    text_encoder=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample like ``StableDiffusionPipeline.__call__`` and return ``(N, 3, H, W)`` float pixels in ``[0, 1]``.

    The pipeline's own scheduler (``pipe.scheduler.set_timesteps(num_inference_steps)``), classifier-free guidance
    ``uncond + g * (cond - uncond)`` with the empty (or ``negative_prompt``) unconditional text when ``g > 1`` (as
    the pipeline), VAE decoding and ``x / 2 + 0.5`` clamped to ``[0, 1]``. With ``grad_steps = 0`` it reproduces
    ``pipe(prompt, latents=latents, output_type="np")`` (a test checks it).

    The first ``num_inference_steps - grad_steps`` steps run under ``torch.no_grad``; the last ``grad_steps`` steps,
    the text encoding and the VAE decoding keep the autograd graph (when grad mode is on). Inside the window the
    UNet's input latent is detached (adjusted direct finetuning): the gradient reaches the weights through every noise
    prediction of the window and the scheduler's update chain, not through the UNet's input Jacobian.

    Args:
        pipe: a Stable Diffusion 1.x/2.x pipeline.
        prompts: one prompt per image.
        latents: ``(N, C, h, w)`` initial latents, already scaled by ``init_noise_sigma`` (``pipe.prepare_latents``).
        num_inference_steps: sampling steps.
        guidance_scale: CFG scale (the audit's ``generator.sampling.guidance_scale``).
        grad_steps: steps at the end with gradient.
        negative_prompt: the unconditional text (``None``: empty, as the pipeline).
        unet: the UNet to call (e.g. accelerate's wrapper of ``pipe.unet``); default ``pipe.unet``.
        text_encoder: the text encoder to call; default ``pipe.text_encoder``.
        generator: passed to the scheduler step (stochastic samplers), as the pipeline does.
    """
    unet = unet if unet is not None else pipe.unet
    device = latents.device
    grad = torch.is_grad_enabled() and grad_steps > 0
    cfg = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    n = len(prompts)
    with torch.set_grad_enabled(grad):
        texts = ([negative_prompt or ""] * n if cfg else []) + list(prompts)
        embeds = encode_prompts(pipe, texts, device, text_encoder)
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps, device=device)
    timesteps = sched.timesteps
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    start = len(timesteps) - grad_steps
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(grad and i >= start):
            x = torch.cat([latents] * 2) if cfg else latents
            x = sched.scale_model_input(x.detach(), t)  # detached: the adjusted gradient (no indirect paths)
            pred = unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(pred, t, latents, **extra, return_dict=False)[0]
    with torch.set_grad_enabled(grad):
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


@contextlib.contextmanager
def adapters_disabled(modules: Sequence[Any]):
    """Run the frozen base model: every peft adapter of ``modules`` disabled inside the block."""
    for m in modules:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in modules:
            m.enable_adapters()


# ----------------------------------------------------------------------------------------------------------------
# Config checks and inputs (used by debias.train.diffusion)
# ----------------------------------------------------------------------------------------------------------------

def check_align_fields(config) -> None:
    """Config-time checks of the ``align_*`` keys of :class:`debias.train.diffusion.DiffusionTrainConfig`."""
    checks = [
        ("align_steps", config.align_steps is None or config.align_steps >= 1,
         "a positive integer (steps at the end of sampling with gradient), or null for all"),
        ("align_inference_steps", config.align_inference_steps >= 1, "a positive integer, e.g. 20"),
        ("align_confidence", 0.0 <= config.align_confidence <= 1.0, "a number in [0, 1], e.g. 0.8"),
        ("align_semantic_weight", config.align_semantic_weight >= 0, "a number >= 0 (0 drops the semantic term)"),
        ("align_semantic_change_factor", 0.0 <= config.align_semantic_change_factor <= 1.0, "a number in [0, 1]"),
        ("align_batch_size", config.align_batch_size >= 2, "an integer >= 2 (the OT needs a batch to distribute)"),
        ("align_target_draws", config.align_target_draws >= 0, "an integer >= 0 (0: fixed counts)"),
        ("align_guidance_scale", config.align_guidance_scale is None or config.align_guidance_scale >= 0,
         "a number >= 0, or null for the generator's guidance_scale"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"config key 'train.{key}': got {getattr(config, key)!r}; set it to {want}")
    if config.align_steps is not None and config.align_steps > config.align_inference_steps:
        raise ConfigError(f"config key 'train.align_steps': {config.align_steps} gradient steps exceed "
                          f"align_inference_steps {config.align_inference_steps}; lower it, or null for all steps")
    target = config.align_target
    if isinstance(target, str) and target != "uniform":
        raise ConfigError(f"config key 'train.align_target': {target!r} is not 'uniform'; give 'uniform' or a mapping "
                          "class -> share, e.g. {male: 0.5, female: 0.5}")
    if isinstance(target, dict):
        bad = [k for k, v in target.items() if not (isinstance(v, (int, float)) and v >= 0)]
        if bad or not target or not math.isclose(sum(target.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"config key 'train.align_target': {target!r} must map classes to shares >= 0 that "
                              "sum to 1")
    if config.objective == "align":
        if config.align_prompts is not None and config.dataset:
            raise ConfigError("config keys 'train.align_prompts' and 'train.dataset': objective 'align' takes its "
                              "neutral prompts from one of them; remove one")
        if config.align_prompts is not None and (not config.align_prompts or not all(
                isinstance(p, str) and p.strip() for p in config.align_prompts)):
            raise ConfigError(f"config key 'train.align_prompts': {config.align_prompts!r} must be a non-empty list "
                              "of neutral prompts")
    elif config.align_prompts is not None:
        raise ConfigError(f"config key 'train.align_prompts' only applies to objective 'align' (objective is "
                          f"'{config.objective}'); remove it")


def target_shares(target: str | dict[str, float], classes: Sequence[str]) -> np.ndarray:
    """``(K,)`` target shares in the classifier's class order (``uniform``, or a mapping naming every class)."""
    if target == "uniform":
        return np.full(len(classes), 1.0 / len(classes))
    unknown = [c for c in target if c not in classes]
    if unknown:
        raise ConfigError(f"config key 'train.align_target': {unknown[0]!r} is not a class of the attribute"
                          f"{did_you_mean(unknown[0], list(classes))}; classes: {', '.join(classes)}")
    missing = [c for c in classes if c not in target]
    if missing:
        raise ConfigError(f"config key 'train.align_target': class {missing[0]!r} has no share; give every class "
                          f"of {list(classes)} a share (0 is allowed)")
    return np.asarray([float(target[c]) for c in classes])


def check_classifier(config, classifier) -> None:
    """The classifier objective ``align`` needs: a :class:`audit.classify.ClipClassifier` with the attribute."""
    if classifier is None:
        raise ConfigError("config key 'train.objective': 'align' needs the attribute classifier during training; pass "
                          "run_diffusion_train(..., classifier=ClipClassifier(config.classifier)) (the audit's)")
    if not all(hasattr(classifier, a) for a in ("heads", "embed_tensor_images", "class_log_probs", "identity")):
        raise UserError(f"run_diffusion_train: classifier must be an audit.classify.ClipClassifier, got "
                        f"{type(classifier).__name__}")
    if config.align_attribute not in classifier.heads:
        raise ConfigError(f"config key 'train.align_attribute': the classifier has no attribute "
                          f"{config.align_attribute!r}{did_you_mean(config.align_attribute, list(classifier.heads))}; "
                          f"it classifies: {', '.join(classifier.heads)}")
    target_shares(config.align_target, classifier.heads[config.align_attribute].classes)


def load_prompts(config) -> tuple[list[str], str]:
    """The neutral training prompts (``align_prompts``, or the dataset's distinct ``prompt`` values in order of first
    appearance) and a fingerprint of them that keys a finished run."""
    if config.align_prompts is not None:
        prompts = list(config.align_prompts)
    else:
        if not config.dataset:
            raise ConfigError("config key 'train.align_prompts' (or 'train.dataset'): objective 'align' needs neutral "
                              "prompts: list them, or name a dataset whose 'prompt' column holds them")
        import datasets

        path = Path(config.dataset)
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises FileNotFoundError / ValueError variants for foreign folders
            raise ConfigError(f"config key 'train.dataset': '{path}' is not a saved dataset ({err}); pass a folder "
                              "written by datasets.save_to_disk, or list the prompts in 'train.align_prompts'"
                              ) from None
        if isinstance(ds, datasets.DatasetDict) or "prompt" not in ds.column_names:
            raise ConfigError(f"config key 'train.dataset': '{path}' has no 'prompt' column (one split's folder "
                              "needed); or list the prompts in 'train.align_prompts'")
        prompts = list(dict.fromkeys(p for p in ds["prompt"] if isinstance(p, str) and p.strip()))
        if not prompts:
            raise ConfigError(f"config key 'train.dataset': '{path}' has no non-empty prompt")
    return prompts, "prompts-sha256:" + hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def sampling_defaults(source) -> dict[str, Any]:
    """Guidance scale and negative prompt of the audit's sampler: the generator config's ``sampling`` section when
    training starts from one, else the diffusers backend's defaults."""
    from generators.base import GeneratorConfig, parse_settings
    from generators.config import from_dict
    from generators.diffusers_backend import DiffusersSettings

    if isinstance(source, dict):
        source = from_dict(GeneratorConfig, source, prefix="generator")
    settings = parse_settings(DiffusersSettings, source) if isinstance(source, GeneratorConfig) else DiffusersSettings()
    return {"guidance_scale": settings.guidance_scale, "negative_prompt": settings.negative_prompt}


# ----------------------------------------------------------------------------------------------------------------
# The training objective (called from debias.train.diffusion._train once per micro-step)
# ----------------------------------------------------------------------------------------------------------------

class AlignObjective:
    """The distributional alignment loss of one micro-step, for a batch of neutral prompts.

    Args:
        config: the :class:`debias.train.diffusion.DiffusionTrainConfig`.
        pipe: the pipeline being trained (its scheduler, tokenizer, VAE).
        parts: its :class:`debias.train.diffusion.DiffusionParts` (the trained module possibly accelerate-wrapped).
        classifier: the audit's :class:`audit.classify.ClipClassifier`; its weights are frozen while the objective
            lives (``close`` restores them).
        guidance_scale: CFG scale of the sampler.
        negative_prompt: its unconditional text (``None``: empty).
        seed: seed of the target draws (per process).
    """

    def __init__(self, config, pipe, parts, classifier, guidance_scale: float, negative_prompt: str | None,
                 seed: Sequence[int]):
        self.config, self.pipe, self.parts, self.classifier = config, pipe, parts, classifier
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.attribute = config.align_attribute
        self.classes = list(classifier.heads[self.attribute].classes)
        self.shares = target_shares(config.align_target, self.classes)
        self.rng = np.random.default_rng(list(seed))
        # The classifier is a fixed measuring device: no gradients into it (and none left in its .grad).
        self._flags = [(p, p.requires_grad) for p in classifier.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)

    def close(self) -> None:
        """Give the classifier its ``requires_grad`` flags back."""
        for p, flag in self._flags:
            p.requires_grad_(flag)

    @staticmethod
    def sync_gradients(accelerator, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the trained parameters' gradients over processes after each backward.

        The sampler calls the unwrapped modules (several forwards per backward, which DDP's hooks reject), so DDP
        does not reduce them; the authors' code reduces by hand too. A no-op in one process.
        """
        if accelerator.num_processes > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= accelerator.num_processes

    def loss(self, prompts: Sequence[str], generator: torch.Generator | Sequence[torch.Generator],
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Generate ``align_batch_size`` images per prompt, assign OT targets per prompt, return the loss + stats.

        ``generator``: one for the batch, or one per prompt (the trainer's per-item generators, which make a run on
        N processes and a resumed run draw the same starting noise as one uninterrupted process); the first one also
        draws a stochastic sampler's step noise.
        """
        c, pipe, parts, clf = self.config, self.pipe, self.parts, self.classifier
        n = c.align_batch_size
        batch = [p for p in prompts for _ in range(n)]
        unwrap = parts._unwrapped
        device = unwrap(parts.unet).device
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        shape = (pipe.unet.config.in_channels, c.resolution, c.resolution, unwrap(parts.text_encoder).dtype, device)
        if len(gens) == 1:
            latents = pipe.prepare_latents(len(batch), *shape, gens[0])
        else:
            latents = torch.cat([pipe.prepare_latents(n, *shape, g) for g in gens])
        generator = gens[0]
        state = generator.get_state()  # the frozen model's sampler draws the same step noise (stochastic samplers)
        kwargs = dict(negative_prompt=self.negative_prompt)
        grad_steps = c.align_steps or c.align_inference_steps
        # The unwrapped modules: a DDP wrapper allows one forward per backward, the sampler makes several (see
        # sync_gradients).
        images = sample_images(pipe, batch, latents, c.align_inference_steps, self.guidance_scale, grad_steps,
                               unet=unwrap(parts.unet), text_encoder=unwrap(parts.text_encoder), generator=generator,
                               **kwargs)
        emb = clf.embed_tensor_images(images)
        log_probs = clf.class_log_probs(emb, self.attribute)
        probs = log_probs.detach().exp().cpu().double().numpy()
        targets, confidence = [], []
        for s in range(0, len(batch), n):  # one OT per prompt: the target distribution is per prompt
            y, conf = ot_targets(probs[s:s + n], self.shares, c.align_target_draws, self.rng)
            targets.append(y)
            confidence.append(conf)
        targets_t = torch.as_tensor(np.concatenate(targets), device=log_probs.device)
        conf_t = torch.as_tensor(np.concatenate(confidence), device=log_probs.device)
        ref_emb = ref_classes = None
        if c.align_semantic_weight > 0:
            ref_gen = torch.Generator(device=generator.device).set_state(state)
            with torch.no_grad(), adapters_disabled(parts.peft_modules()):
                ref = sample_images(pipe, batch, latents, c.align_inference_steps, self.guidance_scale, 0,
                                    unet=unwrap(parts.unet), text_encoder=unwrap(parts.text_encoder),
                                    generator=ref_gen, **kwargs)
                ref_emb = clf.embed_tensor_images(ref)
                ref_classes = clf.class_log_probs(ref_emb, self.attribute).argmax(-1)
        loss, stats = align_loss(log_probs, targets_t, conf_t, c.align_confidence, emb, ref_emb, ref_classes,
                                 c.align_semantic_weight, c.align_semantic_change_factor)
        hard = probs.argmax(1)
        stats.update({f"share_{name}": float((hard == k).mean()) for k, name in enumerate(self.classes)})
        return loss, stats


__all__ = [
    "AlignObjective", "adapters_disabled", "align_loss", "check_align_fields", "check_classifier", "encode_prompts",
    "largest_remainder_counts", "load_prompts", "ot_assign", "ot_targets", "sample_images", "sampling_defaults",
    "target_shares",
]
