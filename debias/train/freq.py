"""On-policy group-frequency objective: move how often each group is *sampled* towards a target share.

BPO equalises the likelihood of given pairs of images, which the prototype showed does not equalise how often each
group is sampled. This trainer optimises the group marginal directly (derivation in
:func:`debias.losses.reweighted_likelihood_loss`): each step samples the current model's own images for neutral
prompts, classifies them, and weights each image's mean token log-likelihood by ``target_share / estimated_share`` of
its classified group (minus the baseline 1), with a running, per-prompt estimate of the shares.

TRL has no trainer for on-policy image-token sampling (GRPO / RLOO generate text through ``generate``), so this
extends :class:`debias.train.sft.ImageTokenSFTTrainer` (itself a ``trl.SFTTrainer``): the data set is the neutral
prompts, and ``compute_loss`` samples, classifies and weights. Under several processes the per-prompt class counts
are summed across processes every step, so every process holds the same estimate.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from debias.losses import frequency_weights, reweighted_likelihood_loss
from debias.train.common import Classify, classify_tokens
from debias.train.sft import ImageTokenSFTTrainer
from generators.sequence import left_pad


class GroupShareEstimator:
    """Running per-prompt class shares from decayed counts: ``(counts + prior) / (total + K * prior)``.

    Args:
        num_prompts: number of prompts tracked.
        num_classes: K.
        decay: each update multiplies the counts of the prompts it touches by ``decay`` before adding.
        prior: pseudo-count per class (keeps shares > 0, so weights stay finite).
    """

    def __init__(self, num_prompts: int, num_classes: int, decay: float = 0.9, prior: float = 0.5):
        self.counts = torch.zeros(num_prompts, num_classes, dtype=torch.float64)
        self.decay = decay
        self.prior = prior

    def shares(self) -> torch.Tensor:
        """``(P, K)`` estimated shares."""
        c = self.counts + self.prior
        return (c / c.sum(-1, keepdim=True)).float()

    def increments(self, prompt_index: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``(P, K)`` class counts of a batch (soft counts for probabilities)."""
        inc = torch.zeros_like(self.counts)
        inc.index_add_(0, prompt_index.long().cpu(), probs.double().cpu())
        return inc

    def update(self, increments: torch.Tensor) -> None:
        """Add a batch's counts (summed over processes), decaying the prompts it touches."""
        touched = increments.sum(-1, keepdim=True) > 0
        self.counts = torch.where(touched, self.decay * self.counts, self.counts) + increments.to(self.counts)


class ImageTokenFreqTrainer(ImageTokenSFTTrainer):
    """On-policy reweighted-likelihood training of an image-token generator towards target group shares.

    Args:
        model, args, processing_class, layout, peft_config, callbacks: as :class:`ImageTokenSFTTrainer`.
        train_dataset: rows ``prompt`` (neutral) and ``prompt_index`` (into ``prompts``), e.g. from
            :func:`prompt_dataset`.
        prompts: the distinct neutral prompts, indexed by ``prompt_index``.
        classify: ``classify(images) -> (N,) class indices or (N, K) probabilities`` (see
            :func:`debias.train.common.classify_tokens`).
        target: ``(K,)`` target shares.
        settings: the generator's sampling settings (e.g. :class:`generators.janus.JanusSettings`); the
            log-likelihood uses the same guidance
            scale and temperature (top-k / top-p truncation is not part of the scored distribution).
        clip, decay, prior, init_samples, baseline, seed_offset: see :class:`debias.train.config.FreqOptions`.
        class_names: names of the classes in the logged keys (``freq/share_<name>``).
    """

    def __init__(self, model, args, train_dataset, processing_class, layout, prompts: Sequence[str],
                 classify: Classify, target: Sequence[float], settings, clip: float = 5.0,
                 decay: float = 0.9, prior: float = 0.5, init_samples: int = 16, baseline: bool = True,
                 seed_offset: int = 1_000_000, class_names: Sequence[str] | None = None, peft_config=None,
                 callbacks=None, **kwargs: Any):
        self.prompts = list(prompts)
        self.class_names = list(class_names) if class_names else [str(k) for k in range(len(target))]
        self.classify = classify
        self.target = torch.tensor(list(target), dtype=torch.float32)
        self.settings = settings
        self.clip, self.baseline_value = clip, (1.0 if baseline else 0.0)
        self.init_samples = init_samples
        self.seed_offset = seed_offset
        self.estimator = GroupShareEstimator(len(self.prompts), len(self.target), decay, prior)
        self._calls: int | None = None
        super().__init__(model, args, train_dataset, processing_class, layout, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)

    @torch.no_grad()
    def _sample(self, model, input_ids, attention_mask, seeds) -> torch.Tensor:
        policy = self.accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()  # no LoRA dropout while sampling: the samples come from the model being trained
        try:
            return self.layout.sample(policy, input_ids, attention_mask, seeds, self.settings)
        finally:
            policy.train(was_training)

    def _prompt_batch(self, indices: Sequence[int]):
        rows = [self._prompt_ids(self.prompts[i]) for i in indices]
        ids, mask = left_pad(rows, self.layout.pad_id)
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    def _initial_estimate(self, model) -> None:
        """Seed the share estimate with ``init_samples`` images per prompt (same seeds on every process)."""
        if self.init_samples == 0:
            return
        k = len(self.target)
        jobs = [(p, n) for p in range(len(self.prompts)) for n in range(self.init_samples)]
        bs = self.args.per_device_train_batch_size
        for start in range(0, len(jobs), bs):
            chunk = jobs[start:start + bs]
            index = torch.tensor([p for p, _ in chunk])
            input_ids, mask = self._prompt_batch(index.tolist())
            seeds = [self.seed_offset + 10**9 + p * self.init_samples + n for p, n in chunk]
            tokens = self._sample(model, input_ids, mask, seeds)
            probs = classify_tokens(self.classify, tokens, self.layout, self.accelerator.unwrap_model(model), k)
            self.estimator.update(self.estimator.increments(index, probs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._calls is None:  # first call (also after a resume): seed the estimate, continue the seed sequence
            self._initial_estimate(model)
            self._calls = self.state.global_step * self.args.gradient_accumulation_steps
        index = inputs["prompt_index"]
        b = index.shape[0]
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        first = self.seed_offset + (self._calls * world + rank) * b
        self._calls += 1
        tokens = self._sample(model, inputs["input_ids"], inputs["attention_mask"], list(range(first, first + b)))
        probs = classify_tokens(self.classify, tokens, self.layout, self.accelerator.unwrap_model(model),
                                len(self.target))

        # Weights from the estimate *before* this batch, so a sample's weight does not depend on its own label.
        shares = self.estimator.shares()
        weights = frequency_weights(probs, shares[index.cpu()], self.target, self.clip).to(tokens.device)
        inc = self.estimator.increments(index, probs)
        if world > 1:
            inc = self.accelerator.reduce(inc.to(self.accelerator.device), reduction="sum").cpu()
        self.estimator.update(inc)

        logps = self._image_logps(
            model, {**inputs, "image_tokens": tokens},
            guidance_scale=self.settings.guidance_scale, temperature=self.settings.temperature,
        )
        loss = reweighted_likelihood_loss(logps.mean(-1), weights, self.baseline_value)

        self._record("freq/weight", weights)
        self._record("logps/mean_token", logps.mean().detach())
        new_shares = self.estimator.shares()
        kl = (self.target * (self.target.clamp(min=1e-12).log() - new_shares.log())).sum(-1)
        self._record("freq/kl_target_share", kl.mean().to(tokens.device))
        mode = "train" if self.model.training else "eval"
        batch_share = self.accelerator.gather_for_metrics(probs.to(tokens.device)).mean(0).tolist()
        for name, share, now in zip(self.class_names, new_shares.mean(0).tolist(), batch_share):
            self._metrics[mode][f"freq/share_{name}"].append(share)
            self._metrics[mode][f"freq/batch_share_{name}"].append(now)
        return (loss, {"logps": logps}) if return_outputs else loss


def prompt_dataset(prompts: Sequence[str], min_rows: int = 1):
    """Rows ``(prompt, prompt_index)`` repeated so that there are at least ``min_rows`` (one full batch)."""
    import datasets

    repeats = max(1, -(-min_rows // len(prompts)))
    return datasets.Dataset.from_dict({
        "prompt": [p for _ in range(repeats) for p in prompts],
        "prompt_index": [i for _ in range(repeats) for i in range(len(prompts))],
    })
