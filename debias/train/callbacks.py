"""Training callbacks: periodic sampling + classification of neutral prompts, logging group shares and RD."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from audit.metrics import rd
from debias.train.common import Classify, classify_tokens


class GroupShareCallback(TrainerCallback):
    """Every ``every_steps`` optimiser steps (and before training), sample neutral prompts with the current model,
    classify the images and log ``monitor/rd_<attribute>`` (mean RD over prompts) and ``monitor/share_<class>``.

    Fixed seeds make the checks comparable across steps. Sampling runs on the main process only (the models are
    identical on every process); ``should_log`` is set on every process because logging reduces the loss across
    processes. The history is written to ``history_path`` (JSON) at the end of training.

    Args:
        prompts: neutral prompts to sample.
        classify: ``classify(images) -> (N,) indices or (N, K) probabilities`` (see
            :func:`debias.train.common.classify_tokens`).
        classes: class names, in the classifier's order.
        layout, settings: the generator's :class:`generators.sequence.ImageTokenLayout` and sampling settings.
        every_steps: check interval in optimiser steps.
        images_per_prompt: images per prompt per check.
        attribute: name used in the logged keys.
        history_path: where to write the checks (optional).
        seed_offset: first sampling seed.
    """

    def __init__(self, prompts: Sequence[str], classify: Classify, classes: Sequence[str], layout, settings,
                 every_steps: int = 50, images_per_prompt: int = 8, attribute: str = "group",
                 history_path: str | Path | None = None, seed_offset: int = 2_000_000):
        self.prompts, self.classify, self.classes = list(prompts), classify, list(classes)
        self.layout, self.settings = layout, settings
        self.every_steps, self.images_per_prompt, self.attribute = every_steps, images_per_prompt, attribute
        self.history_path = Path(history_path) if history_path else None
        self.seed_offset = seed_offset
        self.trainer = None  # set by attach(); metrics go through the trainer's next log line
        self.history: list[dict] = []

    def attach(self, trainer) -> "GroupShareCallback":
        """Register with ``trainer`` (one of the image-token trainers, which merge queued metrics into their logs)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """Sample, classify and return ``{monitor/rd_<attribute>: ..., monitor/share_<class>: ...}``."""
        from generators.sequence import unwrap

        device = unwrap(model).get_input_embeddings().weight.device
        was_training = model.training
        model.eval()
        try:
            per_prompt = []
            for prompt in self.prompts:
                n = self.images_per_prompt
                input_ids, mask = self.layout.encode([prompt] * n)
                seeds = [self.seed_offset + s for s in range(n)]
                tokens = self.layout.sample(model, input_ids.to(device), mask.to(device), seeds, self.settings)
                per_prompt.append(classify_tokens(self.classify, tokens, self.layout, model, len(self.classes)).mean(0))
        finally:
            model.train(was_training)
        shares = torch.stack(per_prompt)  # (P, K)
        out = {f"monitor/rd_{self.attribute}": float(np.mean(rd(shares.double().cpu().numpy())))}
        out.update({f"monitor/share_{c}": v for c, v in zip(self.classes, shares.mean(0).tolist())})
        return out

    def _check(self, state, model) -> None:
        if state.is_world_process_zero:
            metrics = self.measure(model)
            self.history.append({"step": state.global_step, **metrics})
            if self.trainer is not None:
                self.trainer.queue_log(metrics)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._check(state, model)
            control.should_log = True
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # A last check of the final model when the interval did not land on the last step (history only: the
        # Trainer has written its last log line by now).
        if state.is_world_process_zero and (not self.history or self.history[-1]["step"] != state.global_step):
            self.history.append({"step": state.global_step, **self.measure(model)})
        if state.is_world_process_zero and self.history_path is not None:
            self.history_path.write_text(json.dumps(self.history, indent=2))
