"""Stage 2: balanced preference optimisation on image tokens (``trl.DPOTrainer`` subclass), any image-token family.

Hooks into TRL 1.16 (pinned in pyproject: these are private methods):

* ``_prepare_dataset``: adds ``prompt_ids`` to explicit pair rows (:func:`debias.train.data.bpo_pairs`) instead of
  tokenising ``prompt/chosen/rejected`` text.
* ``_set_signature_columns_if_needed``: keeps the pair columns through ``remove_unused_columns``.
* the collator is :class:`debias.train.data.PairCollator` (pair ``b`` at rows ``b`` and ``B + b``, TRL's layout).
* ``_compute_loss``: mean per-token log-probs of both images as the generator's layout scores them, then
  :func:`debias.losses.balanced_preference_loss` (no reference), or for comparison :func:`debias.losses.dpo_loss` /
  :func:`debias.losses.ipo_loss` against the reference TRL keeps (the frozen ``ref`` copy of a continued adapter, or
  the model with the adapter disabled).

TRL's ``__init__`` (PEFT wrapping, the ``ref`` adapter copy, dropout disabling, accelerate preparation), ``log``
(metric averaging), ``training_step`` and checkpointing are used as they are. With the ``bpo`` loss the ``ref``
adapter TRL copies when continuing an adapter is deleted again: BPO has no reference and it would only cost memory.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from debias.losses import balanced_preference_loss, dpo_loss, ipo_loss, log_odds
from debias.train.data import PairCollator
from debias.train.sft import ImageTokenTrainerMixin

LOSSES = ("bpo", "dpo", "ipo")


class ImageTokenBPOTrainer(ImageTokenTrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` on pairs of generated images of different groups for the same neutral prompt.

    Args:
        model: the generator's model or a ``PeftModel`` around one (continuing the stage-1 adapter).
        args: ``trl.DPOConfig`` (``beta`` is the loss's beta).
        train_dataset: explicit pairs from :func:`debias.train.data.bpo_pairs`.
        processing_class: the generator's tokenizer.
        layout: the generator's :class:`generators.sequence.ImageTokenLayout`.
        loss: ``bpo`` (balanced preference), ``dpo`` or ``ipo``.
        prefer_first: dpo/ipo only: image ``i`` of each pair is the preferred one (pairs ordered by a group
            preference); otherwise the image the reference finds *less* likely is preferred, which raises the
            under-represented group. (Averaging both orientations would be a no-op: with the reference equal to the
            initial model, both losses are then minimal at the start.)
        peft_config: ``peft.LoraConfig`` for a new adapter; ``None`` when ``model`` is a ``PeftModel``.
        callbacks: extra ``TrainerCallback`` objects.
    """

    def __init__(self, model, args, train_dataset, processing_class, layout, loss: str = "bpo",
                 prefer_first: bool = False, peft_config=None, callbacks=None, **kwargs: Any):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.preference_loss = loss
        self.prefer_first = prefer_first
        self._setup_image_tokens(model, layout)
        super().__init__(
            model=model, args=args, data_collator=PairCollator(layout.pad_id), train_dataset=train_dataset,
            processing_class=processing_class, peft_config=peft_config, callbacks=callbacks, **kwargs,
        )
        peft_model = self.accelerator.unwrap_model(self.model)
        if loss == "bpo" and "ref" in getattr(peft_model, "peft_config", {}):
            peft_model.delete_adapter("ref")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self._add_prompt_ids(dataset)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "tokens_i", "tokens_j", "index_i", "index_j"]

    def _reference_logps(self, model, inputs) -> torch.Tensor:
        peft_model = self.accelerator.unwrap_model(self.model)
        # A continued adapter has a frozen "ref" copy (TRL's); a new adapter's reference is the base model.
        adapter = "ref" if "ref" in getattr(peft_model, "peft_config", {}) else None
        context = use_adapter(peft_model, adapter_name=adapter) if hasattr(peft_model, "peft_config") else (
            contextlib.nullcontext())
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                context:
            return self._image_logps(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        logps = self._image_logps(model, inputs)  # (2B, T): rows b and B + b are pair b
        mean_i, mean_j = logps.mean(-1).chunk(2)
        if self.preference_loss == "bpo":
            loss = balanced_preference_loss(mean_i, mean_j, self.beta)
            with torch.no_grad():
                gap = self.beta * (log_odds(mean_i) - log_odds(mean_j))
            self._record("bpo/abs_logodds_gap", gap.abs())
            self._record("bpo/sigmoid_gap", (torch.sigmoid(gap) - 0.5).abs())
        else:
            ref = self._reference_logps(model, inputs)
            if self.preference_loss == "dpo":
                # Standard DPO scores whole sequences (summed log-probs).
                pol_i, pol_j = logps.sum(-1).chunk(2)
                ref_i, ref_j = ref.sum(-1).chunk(2)
                fn = dpo_loss
            else:
                # IPO on per-token means, as TRL normalises it, so beta does not depend on the image size.
                pol_i, pol_j = mean_i, mean_j
                ref_i, ref_j = ref.mean(-1).chunk(2)
                fn = ipo_loss
            if not self.prefer_first:
                swap = ref_i > ref_j  # prefer the image the reference finds less likely
                pol_i, pol_j = torch.where(swap, pol_j, pol_i), torch.where(swap, pol_i, pol_j)
                ref_i, ref_j = torch.where(swap, ref_j, ref_i), torch.where(swap, ref_i, ref_j)
            loss = fn(pol_i, pol_j, ref_i, ref_j, self.beta)
            self._record("rewards/margins", self.beta * ((pol_i - ref_i) - (pol_j - ref_j)).detach())
        self._record("logps/i", mean_i.detach())
        self._record("logps/j", mean_j.detach())
        return (loss, {"logps": logps}) if return_outputs else loss
