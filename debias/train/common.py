"""Pieces shared by the image-token trainers: the image-token forward, LoRA config, classification, adapter saving."""

from __future__ import annotations

import json
import os
import re
import shutil
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch


Classify = Callable[[Any], Any]


def enable_image_token_forward(model, layout) -> None:
    """Let ``model(input_ids=, attention_mask=, image_tokens=)`` return ``(B, T)`` teacher-forced image-token log-probs.

    The Trainers call ``model(...)`` through whatever wraps it (PEFT, DDP, FSDP, DeepSpeed, autocast): routing the
    image path through the model's own ``forward`` keeps DDP's gradient synchronisation and sharded-parameter
    gathering working, which calling submodules directly from the trainer would bypass. The computation itself is
    the family's :meth:`generators.sequence.ImageTokenLayout.logprobs` (Janus: the generation embeddings and head;
    Emu3: the stock causal-LM path, its image tokens being vocabulary entries). Calls without ``image_tokens`` run
    the original forward unchanged. TRL patches ``forward`` the same way for its fused LM head.

    Args:
        model: the generator's model (not the PEFT wrapper: PEFT calls through to it).
        layout: the generator's :class:`generators.sequence.ImageTokenLayout` (its ``layout``).
    """
    model._debias_layout = layout
    if getattr(model, "_debias_image_forward", False):
        return
    original = model.forward

    def forward(self, *args, image_tokens=None, guidance_scale: float = 1.0, temperature: float = 1.0, **kwargs):
        if image_tokens is None:
            return original(*args, **kwargs)
        return self._debias_layout.logprobs(self, kwargs["input_ids"], kwargs["attention_mask"], image_tokens,
                                            guidance_scale, temperature)

    model.forward = types.MethodType(forward, model)
    model._debias_image_forward = True


def lora_target_regex(target_modules: Sequence[str], scope: str) -> str:
    """PEFT ``target_modules`` regex: modules named ``target_modules`` inside a submodule named ``scope``.

    A plain list would also hit the vision encoder's ``q_proj``/``k_proj``/``v_proj``; the regex keeps LoRA on the
    language model only (PEFT full-matches a string against each module name).
    """
    names = "|".join(re.escape(m) for m in target_modules)
    if not scope:
        return rf"(.*\.)?({names})"
    return rf"(.*\.)?{re.escape(scope)}\.(.*\.)?({names})"


def lora_config(options):
    """``peft.LoraConfig`` from :class:`debias.train.config.LoraOptions`."""
    from peft import LoraConfig

    return LoraConfig(
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=lora_target_regex(options.target_modules, options.scope), bias="none",
    )


def check_lora_targets(model, options) -> None:
    """Raise a :class:`UserError` naming ``train.lora`` when the LoRA pattern matches no module of ``model``."""
    from generators.config import UserError

    pattern = re.compile(lora_target_regex(options.target_modules, options.scope))
    names = [name for name, _ in model.named_modules()]
    if not any(pattern.fullmatch(name) for name in names):
        # Where the target names do occur: the decoders whose layers hold them (Janus language_model, Emu3
        # text_model), so the message names the scope to use.
        anywhere = re.compile(lora_target_regex(options.target_modules, ""))
        scopes = sorted({n.split(".layers.")[0].rsplit(".", 1)[-1] for n in names
                         if anywhere.fullmatch(n) and ".layers." in n})
        where = f"; they sit under {scopes}: set train.lora.scope to the model's decoder" if scopes else ""
        raise UserError(
            f"config keys 'train.lora.target_modules' / 'train.lora.scope': {options.target_modules} inside "
            f"'{options.scope}' match no module of the model{where}; use names like q_proj, v_proj under "
            "language_model (Janus) or text_model (Emu3)"
        )


def as_probabilities(output, num_classes: int) -> torch.Tensor:
    """A classifier's output (``(N,)`` class indices or ``(N, K)`` scores/probabilities) as ``(N, K)`` float rows."""
    arr = np.asarray(output.detach().cpu() if isinstance(output, torch.Tensor) else output)
    if arr.ndim == 1:
        idx = torch.as_tensor(arr.astype(np.int64))
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
            raise ValueError(f"classifier returned class index {int(idx.max())} outside [0, {num_classes})")
        return torch.nn.functional.one_hot(idx, num_classes).float()
    if arr.ndim != 2 or arr.shape[1] != num_classes:
        raise ValueError(f"classifier returned shape {arr.shape}; expected (N,) indices or (N, {num_classes}) scores")
    probs = torch.as_tensor(arr, dtype=torch.float32).clamp(min=0)
    return probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)


def classify_tokens(classify: Classify, tokens: torch.Tensor, layout, model, num_classes: int) -> torch.Tensor:
    """Classify generated images given their tokens: ``(N, K)`` class probabilities.

    ``classify`` receives PIL images decoded by the model's VQ decoder (through the generator's ``layout``), or the
    ``(N, T)`` token tensor itself when it has a true ``on_tokens`` attribute (see :func:`on_tokens`).
    """
    if getattr(classify, "on_tokens", False):
        out = classify(tokens.detach().cpu())
    else:
        with torch.no_grad():
            out = classify(layout.decode(model, tokens))
    probs = as_probabilities(out, num_classes)
    if probs.shape[0] != tokens.shape[0]:
        raise ValueError(f"classifier returned {probs.shape[0]} results for {tokens.shape[0]} images")
    return probs


def on_tokens(fn: Classify) -> Classify:
    """Mark a classify callable as taking ``(N, T)`` image-token tensors instead of PIL images."""
    fn.on_tokens = True
    return fn


def save_adapter(model, path: str | Path, info: dict | None = None) -> Path:
    """Write the trained ("default") adapter in PEFT format, atomically (temp folder + rename).

    Only the ``default`` adapter is written: TRL keeps a frozen ``ref`` copy for DPO-style losses, which is not part
    of the result. ``info`` is written beside it as ``train_info.json`` (PEFT ignores extra files).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model = model
    peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
    if info is not None:
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2, default=str))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Copies of the LoRA parameters of a PEFT model, keyed by name (tests, change checks)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
