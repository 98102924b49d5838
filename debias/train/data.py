"""The balanced data set, SFT examples, explicit BPO pairs and their collators.

Input: a Hugging Face ``datasets`` data set written with ``save_to_disk``, one row per kept synthetic image, with
columns ``prompt`` (the NEUTRAL prompt the image is trained under), ``explicit_prompt`` (the prompt it was generated
from), ``attribute`` (e.g. ``gender``), ``group`` (e.g. ``female``), ``seed``, ``confidence`` (classifier agreement),
``image`` and ``tokens`` (the image's codebook ids).

* SFT examples: one per row, ``(prompt, tokens)``.
* BPO pairs: for each ``(prompt, attribute)``, all K(K-1)/2 pairs of its groups, the n-th image of one group with the
  n-th of the other (:func:`debias.losses.pair_indices`), each pair recording the two source row indices.
* Collators keep pair ``b``'s two images at rows ``b`` and ``B + b`` of the batch (TRL's ``[chosen..., rejected...]``
  layout) and return the source indices, so alignment is checkable after collation.

The ``image`` column is never decoded here: training reads the tokens, and trainers treat a column named ``image`` as
a vision-language data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from debias.losses import pair_indices
from generators.config import UserError
from generators.sequence import left_pad

REQUIRED_COLUMNS = ("prompt", "explicit_prompt", "attribute", "group", "seed", "confidence", "image", "tokens")


def load_balanced_dataset(path: str | Path, key: str = "train.dataset"):
    """Load and check the balanced data set (without decoding images).

    Args:
        path: folder written by ``Dataset.save_to_disk`` (a ``DatasetDict`` must have a ``train`` split).
        key: config key named in error messages.

    Returns:
        The ``datasets.Dataset``.

    Raises:
        UserError: missing folder, not a data set, missing columns or no rows.
    """
    import datasets

    path = Path(path)
    if not str(path) or not path.is_dir():
        raise UserError(
            f"config key '{key}': data set folder '{path}' does not exist; pass the folder written by `debias synth` "
            "(datasets' save_to_disk)"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(
            f"config key '{key}': '{path}' is not a data set saved with save_to_disk ({err}); pass the folder "
            "written by `debias synth`"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"config key '{key}': '{path}' has splits {list(ds)} but no 'train' split")
        ds = ds["train"]
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(
            f"config key '{key}': data set '{path}' lacks columns {missing} (has {ds.column_names}); "
            "rebuild it with `debias synth`"
        )
    if len(ds) == 0:
        raise UserError(f"config key '{key}': data set '{path}' has no rows")
    return ds


def columns(table, names: Sequence[str]) -> dict[str, list]:
    """Plain Python lists of some columns, read once (random access into ``datasets`` columns is slow)."""
    return table.select_columns(list(names))[:]


def select_rows(ds, attributes: Sequence[str] = (), min_confidence: float = 0.0, key: str = "train"):
    """Rows of the wanted attributes with ``confidence >= min_confidence``; a ``Dataset`` without the image column.

    Raises:
        UserError: when nothing is left (naming the filter to relax).
    """
    table = ds.remove_columns([c for c in ("image",) if c in ds.column_names])
    cols = columns(table, ["attribute", "confidence"])
    attrs, conf = cols["attribute"], cols["confidence"]
    keep = [
        i for i in range(len(table))
        if (not attributes or attrs[i] in attributes) and float(conf[i]) >= min_confidence
    ]
    if not keep:
        present = sorted(set(attrs))
        raise UserError(
            f"config keys '{key}.attributes' / '{key}.min_confidence': no row left (attributes {list(attributes)} "
            f"of {present}, min_confidence {min_confidence}); relax the filters"
        )
    return table.select(keep, keep_in_memory=True) if len(keep) < len(table) else table


def check_tokens(tokens: Sequence[Sequence[int]], num_image_tokens: int, codebook_size: int, key: str) -> None:
    """Every row has ``num_image_tokens`` codebook ids in ``[0, codebook_size)`` (the model's image grid)."""
    for n, row in enumerate(tokens):
        if len(row) != num_image_tokens:
            raise UserError(
                f"config key '{key}': row {n} has {len(row)} image tokens but the generator draws "
                f"{num_image_tokens}; the data set was made with another model, rebuild it with this generator"
            )
    flat = torch.tensor(tokens, dtype=torch.long)
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise UserError(
            f"config key '{key}': image token ids span [{int(flat.min())}, {int(flat.max())}] but the generator's "
            f"codebook has {codebook_size} entries; rebuild the data set with this generator"
        )


def sft_examples(table, use_weights: bool = True):
    """One SFT example per row: ``prompt`` (neutral), ``tokens``, ``index`` (source row), ``group``, ``attribute``.

    With ``use_weights`` and a ``weight`` column (``debias synth`` with ``balance: reweight``, the M4 weights of
    "CLIP the Bias"), each example also gets ``weight``, rescaled to mean 1 so the learning rate keeps its meaning.
    """
    import datasets

    cols = columns(table, ["prompt", "tokens", "group", "attribute"])
    data = {**cols, "index": list(range(len(table)))}
    if use_weights and "weight" in table.column_names:
        weights = [float(w) for w in columns(table, ["weight"])["weight"]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError("config key 'train.dataset': the 'weight' column must be >= 0 with a positive sum")
        mean = sum(weights) / len(weights)
        data["weight"] = [w / mean for w in weights]
    return datasets.Dataset.from_dict(data)


def bpo_pairs(table, order: Sequence[str] | None = None):
    """All K(K-1)/2 group pairs per ``(prompt, attribute)``, paired explicitly by row index.

    Rows are taken in seed order within each group, so the pairing does not depend on how the data set was written.
    Data weights are not used here: the pairs are balanced by construction (every group pair of a prompt equally
    often).

    Args:
        table: rows from :func:`select_rows`.
        order: group order deciding which group is image ``i`` (default: sorted names).

    Returns:
        A ``Dataset`` with ``prompt``, ``attribute``, ``index_i``, ``index_j`` (source rows), ``group_i``,
        ``group_j``, ``tokens_i``, ``tokens_j``.

    Raises:
        UserError: when no prompt has two groups.
    """
    import datasets

    cols = columns(table, ["prompt", "attribute", "group", "seed", "tokens"])
    prompts, attrs, groups, seeds, tokens = (cols[c] for c in ("prompt", "attribute", "group", "seed", "tokens"))
    by_seed = sorted(range(len(table)), key=lambda i: (int(seeds[i]), i))
    pairs = pair_indices(list(zip(prompts, attrs)), groups, order, rows=by_seed)
    if not pairs:
        raise UserError(
            "config key 'train.dataset': no neutral prompt has images of two different groups, so BPO has no pairs; "
            "the balanced data set needs >= 2 groups per prompt"
        )
    return datasets.Dataset.from_dict({
        "prompt": [prompts[i] for i, _ in pairs],
        "attribute": [attrs[i] for i, _ in pairs],
        "index_i": [i for i, _ in pairs],
        "index_j": [j for _, j in pairs],
        "group_i": [groups[i] for i, _ in pairs],
        "group_j": [groups[j] for _, j in pairs],
        "tokens_i": [tokens[i] for i, _ in pairs],
        "tokens_j": [tokens[j] for _, j in pairs],
    })


class ImageTokenCollator:
    """SFT / on-policy batches: ``input_ids``, ``attention_mask`` (left-padded prompts), ``image_tokens``, the
    source ``index`` of each row (``prompt_index`` for prompt-only rows) and ``weight`` when the rows have one."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = left_pad([e["prompt_ids"] for e in examples], self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "tokens" in examples[0]:
            batch["image_tokens"] = torch.tensor([e["tokens"] for e in examples], dtype=torch.long)
        if "weight" in examples[0]:
            batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
        for name in ("index", "prompt_index"):
            if name in examples[0]:
                batch[name] = torch.tensor([e[name] for e in examples], dtype=torch.long)
        return batch


class PairCollator:
    """BPO batches of B pairs: rows ``b`` and ``B + b`` hold pair ``b``'s images ``i`` and ``j`` under the same prompt.

    Returns ``input_ids`` / ``attention_mask`` ``(2B, L)``, ``image_tokens`` ``(2B, T)`` and ``pair_index`` ``(B, 2)``
    (the source rows of each pair's images).
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        input_ids, mask = left_pad(prompts + prompts, self.pad_id)
        tokens = [e["tokens_i"] for e in examples] + [e["tokens_j"] for e in examples]
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "image_tokens": torch.tensor(tokens, dtype=torch.long),
            "pair_index": torch.tensor([[e["index_i"], e["index_j"]] for e in examples], dtype=torch.long),
        }
