"""A fixed model as something to hand on: its PEFT adapter folder with a model card the Hub renders.

``write_model_card(ADAPTER, OUT, before=RUN, after=RUN)`` copies the adapter (``adapter_config.json``,
``adapter_model.safetensors``, ``train_info.json``) into ``OUT`` and writes ``OUT/README.md``: YAML metadata
(``library_name: peft``, ``base_model`` when the generator is a hub model, tags, and the before/after bias numbers
under ``debias_audit`` and as ``model-index`` results) followed by the before/after audit table with intervals, the
paired test when a comparison is given, the classifier bias card's summary, the training config and the package
versions. ``OUT`` loads as an adapter (``generator.adapter: OUT``, or ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from audit.report import ordered_models, render_markdown
from audit.store import atomic_write_bytes, check_writable, environment
from generators.config import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
# PEFT adapters (token models, TRL) and diffusers LoRA files (diffusion pipelines, debias/train/diffusion.py).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_info.json",
                 "pytorch_lora_weights.safetensors", "train_config.json", "train_log.jsonl")
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


def _metrics(run: str | Path, flag: str) -> dict[str, Any]:
    path = Path(run) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{flag} '{run}': no metrics.json there; pass a run folder written by `debias audit`")
    return json.loads(path.read_text())


def _train_config(adapter: Path, train_dir: str | Path | None) -> dict[str, Any]:
    """The resolved train + generator config: ``train_dir/train_config.yaml``, by default the training run the
    adapter sits in (``RUN/<stage>/adapter``)."""
    path = Path(train_dir) / "train_config.yaml" if train_dir else adapter.parent.parent / "train_config.yaml"
    if not path.is_file():
        if train_dir:
            raise UserError(f"--train '{train_dir}': no train_config.yaml there; pass the folder `debias train` "
                            "wrote (its --out)")
        return {}
    return yaml.safe_load(path.read_text()) or {}


def comparison_rows(before: dict, after: dict, compare: dict | None = None) -> list[dict[str, Any]]:
    """One row per attribute measured in both audits: RD before and after with their intervals, the change, and
    the paired Wilcoxon p-value on matched prompts when a ``compare.json`` is given."""
    rows = []
    for name, b in before["attributes"].items():
        a = after["attributes"].get(name)
        if a is None or b.get("rd") is None or a.get("rd") is None:
            continue
        test = ((compare or {}).get("attributes", {}).get(name) or {}).get("test") or {}
        rows.append({"attribute": name, "before": b["rd"], "before_ci": b.get("rd_ci"), "after": a["rd"],
                     "after_ci": a.get("rd_ci"), "change": a["rd"] - b["rd"], "p_value": test.get("p_value")})
    return rows


def write_model_card(adapter: str | Path, out: str | Path, before: str | Path, after: str | Path,
                     compare: str | Path | None = None, train_dir: str | Path | None = None,
                     name: str | None = None) -> Path:
    """Write the shareable adapter folder ``out`` (adapter files + ``README.md``); returns ``out``.

    Args:
        adapter: The adapter folder ``debias train`` wrote (``RUN/<stage>/adapter``).
        out: The folder to write; it may be ``adapter`` itself (then only ``README.md`` is added).
        before, after: The audit run folders of the base model and of the model with the adapter, on the same
            prompts and seeds.
        compare: A ``debias compare`` folder of the two audits (adds the paired test).
        train_dir: The training run folder (default: the one the adapter sits in).
        name: The model's name in the card's title (default: the folder name of ``out``).

    Raises:
        UserError: for a missing adapter, audit or training folder, naming the flag to fix.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    adapter = Path(adapter)
    diffusers_lora = (adapter / DIFFUSERS_LORA).is_file()
    if not diffusers_lora and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter '{adapter}': no adapter_config.json (PEFT) or {DIFFUSERS_LORA} (diffusers) "
                        "there; pass the <stage>/adapter folder written by `debias train`")
    b, a = _metrics(before, "--before"), _metrics(after, "--after")
    cmp = None
    if compare:
        path = Path(compare) / "compare.json"
        if not path.is_file():
            raise UserError(f"--compare '{compare}': no compare.json there; pass the folder `debias compare` wrote")
        cmp = json.loads(path.read_text())
    train = _train_config(adapter, train_dir)
    info = json.loads((adapter / "train_info.json").read_text()) if (adapter / "train_info.json").is_file() else {}
    out = check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != adapter.resolve():
        for f in ADAPTER_FILES:
            if (adapter / f).is_file():
                shutil.copy2(adapter / f, out / f)

    rows = comparison_rows(b, a, cmp)
    generator = (b["run"].get("models") or {}).get("generator") or {}
    base = generator.get("model") if generator.get("source") == "hub" else None
    model_name = name or out.name
    data = ModelCardData(
        library_name="diffusers" if diffusers_lora else "peft", base_model=base, pipeline_tag="text-to-image", model_name=model_name,
        tags=["debias-t2i", "fairness", "lora", "text-to-image"],
        eval_results=[EvalResult(task_type="text-to-image", dataset_type="debias-t2i-neutral-prompts",
                                 dataset_name=f"{b['run'].get('n_prompts')} neutral prompts (same seeds before/after)",
                                 metric_type=f"{r['attribute']}_rd", metric_value=round(r["after"], 4),
                                 metric_name=f"{r['attribute']} RD (lower is better)") for r in rows] or None,
        debias_audit={r["attribute"]: {k: r[k] for k in ("before", "before_ci", "after", "after_ci", "p_value")}
                      for r in rows},
    )
    body = render_markdown(
        "model_card.md.j2", TEMPLATES, name=model_name, rows=rows, before=b, after=a, compare=cmp, train=train,
        info=info, generator=generator, diffusers_lora=diffusers_lora, models=ordered_models(b["run"].get("models") or {}),
        card=b.get("classifier_card"), environment=environment(),
        train_yaml=yaml.safe_dump(train, sort_keys=False).strip() if train else None,
    )
    atomic_write_bytes(out / "README.md", str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")).encode("utf-8"))
    return out
