"""Stage 1: supervised fine-tuning on image tokens given the NEUTRAL prompt (``trl.SFTTrainer`` subclass).

Any image-token generator trains here through its family's layout (the generator's ``layout``,
:class:`generators.sequence.ImageTokenLayout`): Janus and Emu3 alike.

Hooks into TRL 1.16 (pinned in pyproject: these are private methods):

* ``_prepare_dataset``: instead of tokenising a text column, adds ``prompt_ids`` (the layout's prompt row, e.g.
  Janus' ``[bos] + prompt + [boi]``) to data sets of ``prompt`` + ``tokens`` rows.
* ``_set_signature_columns_if_needed``: keeps the image-token columns through ``remove_unused_columns``.
* ``compute_loss``: mean negative log-likelihood of the image tokens, scored as the layout scores them (Janus: its
  generation head, not the text ``lm_head`` TRL's fused path would use; Emu3: ``lm_head``'s visual-token rows),
  through the model's forward (see :func:`debias.train.common.enable_image_token_forward`).
* ``log``: adds metrics queued by callbacks (``queue_log``) to the next log line.

Everything else (PEFT wrapping, accelerate / DDP / DeepSpeed / FSDP preparation, mixed precision, gradient
checkpointing and accumulation, checkpoints, resume, ``report_to``) is TRL's and transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from audit.store import crash_point
from debias.train.common import enable_image_token_forward
from debias.train.data import ImageTokenCollator
from generators.sequence import unwrap


class ImageTokenTrainerMixin:
    """Prompt tokenisation, log queueing and loss-only evaluation shared by the image-token trainers (mixed in before
    the TRL class)."""

    def _setup_image_tokens(self, model, layout) -> None:
        self.layout = layout
        self._prompt_cache: dict[str, list[int]] = {}
        self._queued_logs: dict[str, float] = {}
        enable_image_token_forward(unwrap(model), layout)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.layout.prompt_ids(prompt)
        return self._prompt_cache[prompt]

    def _add_prompt_ids(self, dataset):
        if "prompt_ids" in dataset.column_names:  # already prepared (e.g. passed again to evaluate)
            return dataset

        column = [self._prompt_ids(prompt) for prompt in dataset["prompt"]]
        # A new in-memory column rather than `map`: no function hashing, no cache files in the user's data folder.
        return dataset.add_column("prompt_ids", column)

    def queue_log(self, metrics: dict[str, float]) -> None:
        """Metrics to add to the next log line (callbacks call this, then set ``control.should_log``)."""
        self._queued_logs.update(metrics)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._queued_logs:
            logs.update(self._queued_logs)
            self._queued_logs.clear()
        super().log(logs, start_time)

    def _image_logps(self, model, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """``(B, T)`` log-probs of ``inputs['image_tokens']`` through the (wrapped) model's forward."""
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            image_tokens=inputs["image_tokens"], **kwargs,
        )

    def _record(self, name: str, value: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach().reshape(-1)).mean().item())

    def _save_optimizer_and_scheduler(self, output_dir):
        # Mid-save: the weights are in checkpoint-N/, the optimizer and trainer state are not yet. Tests stop the
        # process exactly here (DEBIAS_CRASH_AT=train:checkpoint-N) to check that resuming skips such a folder.
        crash_point(f"train:checkpoint-{self.state.global_step}")
        super()._save_optimizer_and_scheduler(output_dir)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation is the training loss on held-out rows: no generation, no logits to gather.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class ImageTokenSFTTrainer(ImageTokenTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` on image tokens: ``-mean log p(image tokens | neutral prompt)``.

    Rows with a ``weight`` column contribute ``weight * mean token log-likelihood`` (data reweighting).

    Args:
        model: the generator's model (e.g. ``JanusForConditionalGeneration``, ``Emu3ForConditionalGeneration``), or
            a ``PeftModel`` around one (continuing an adapter).
        args: ``trl.SFTConfig``.
        train_dataset: rows with ``prompt`` and ``tokens`` (e.g. :func:`debias.train.data.sft_examples`); no
            ``image`` column.
        processing_class: the generator's tokenizer (always passed: TRL would otherwise fetch one from the hub).
        layout: the generator's :class:`generators.sequence.ImageTokenLayout` (prompt template included, as used
            when sampling).
        peft_config: ``peft.LoraConfig`` for a new adapter; ``None`` when ``model`` is already a ``PeftModel``.
        callbacks: extra ``TrainerCallback`` objects.
    """

    def __init__(self, model, args, train_dataset, processing_class, layout, peft_config=None, callbacks=None,
                 **kwargs: Any):
        self._setup_image_tokens(model, layout)
        super().__init__(
            model=model, args=args, data_collator=ImageTokenCollator(layout.pad_id), train_dataset=train_dataset,
            processing_class=processing_class, peft_config=peft_config, callbacks=callbacks, **kwargs,
        )

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        return self._add_prompt_ids(dataset)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "tokens", "index", "prompt_index", "weight"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Every image has the same number of tokens, so the per-micro-batch mean weighs all tokens equally and the
        # Trainer's division by the accumulation steps (no `labels` -> no `num_items_in_batch`) is exact.
        logps = self._image_logps(model, inputs)
        if "weight" in inputs:  # per-example data weights (mean 1 over the data set)
            loss = -(inputs["weight"].to(logps.dtype) * logps.mean(-1)).mean()
        else:
            loss = -logps.mean()
        self._record("logps/mean_token", logps.mean())
        if self.model.training:
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(
                torch.tensor(logps.numel(), device=logps.device)).sum().item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return (loss, {"logps": logps}) if return_outputs else loss
