"""An audit as a Hugging Face ``datasets`` data set: one row per image, ready to share or to analyse elsewhere.

``export_audit(RUN, DIR)`` writes one folder that every reader accepts::

    DIR/README.md                         dataset card: YAML metadata (as the Hub reads it) and the audit's summary
    DIR/data/train-00000-of-00001.parquet the rows, for load_dataset("parquet", ...) and the Hub's viewer
    DIR/data-*.arrow, dataset_info.json,  the same rows in save_to_disk form, for datasets.load_from_disk(DIR)
    DIR/state.json

Columns: ``key``, ``prompt``, ``seed``, ``file`` (the PNG inside the run folder), ``face`` (a face was detected;
None when the image was flagged and never looked at), ``nsfw`` (the safety checker flagged it; None: no checker
ran), and per classifier attribute ``probs_<attribute>`` (class probabilities, in the order of the ``pred_``
column's class names; None without a classified face), ``pred_<attribute>`` (a ``ClassLabel``: the predicted
class, -1 where the image has no face, abstained or was flagged) and ``abstain_<attribute>``; ``clip_score``;
optionally ``image`` (the PNG bytes, ``images=True``).

:func:`push_to_hub` uploads such a folder (or a model folder) as the thin last step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audit.store import atomic_write_bytes
from generators.config import UserError
from generators.errors import first_line

PARQUET = "data/train-00000-of-00001.parquet"
# What the Hub should not receive from an export folder: the save_to_disk copy of the same rows.
DISK_FILES = ["data-*.arrow", "dataset_info.json", "state.json"]


def _read(run: Path, name: str) -> Any:
    path = run / name
    if not path.is_file():
        raise UserError(f"'{path}' not found; pass a run folder written by `debias audit` (or re-run it)")
    return json.loads(path.read_text())


def audit_rows(run_dir: str | Path, images: bool = False) -> tuple[dict[str, list], dict[str, list[str]]]:
    """The per-image rows of an audit run folder, as columns; and the classes of each attribute, in order.

    The class probabilities come from the audit's classification cache (``stages/classify-*.json``), keyed by the
    classifier and face settings recorded in ``metrics.json``, so the export is exactly what the metrics used.

    Raises:
        UserError: the folder is not a finished audit, or its classification cache is missing.
    """
    from audit.run import StageCache

    run = Path(run_dir)
    metrics, predictions = _read(run, "metrics.json"), _read(run, "predictions.json")
    classes = {name: list(spec["classes"]) for name, spec in metrics["run"]["classifier"]["attributes"].items()}
    classify = StageCache.open(run, "classify", {"faces": metrics["run"]["faces"], **metrics["run"]["classifier"]})
    if not classify.path.is_file():
        raise UserError(f"'{classify.path}' not found: the run's classification cache is missing; re-run "
                        f"`debias audit --out {run}` to rebuild it")
    cols: dict[str, list] = {k: [] for k in ("key", "prompt", "seed", "file", "face", "nsfw")}
    for name in classes:
        cols.update({f"probs_{name}": [], f"pred_{name}": [], f"abstain_{name}": []})
    cols["clip_score"] = []
    if images:
        cols["image"] = []
    for p in predictions:
        probs = classify.data.get(p["key"])
        for key in ("key", "prompt", "seed", "file", "face", "clip_score"):
            cols[key].append(p.get(key))
        cols["nsfw"].append(p.get("nsfw"))
        for name, names in classes.items():
            pred = p.get(name)
            cols[f"probs_{name}"].append(probs[name] if probs else None)
            cols[f"pred_{name}"].append(names.index(pred) if pred is not None else -1)
            cols[f"abstain_{name}"].append(bool(p.get("face")) and probs is not None and pred is None)
        if images:
            cols["image"].append({"bytes": (run / p["file"]).read_bytes(), "path": Path(p["file"]).name})
    return cols, classes


def audit_dataset(run_dir: str | Path, images: bool = False):
    """The rows of :func:`audit_rows` as a ``datasets.Dataset`` with typed features (``ClassLabel`` predictions)."""
    import datasets

    cols, classes = audit_rows(run_dir, images)
    features = {
        "key": datasets.Value("string"), "prompt": datasets.Value("string"), "seed": datasets.Value("int64"),
        "file": datasets.Value("string"), "face": datasets.Value("bool"), "nsfw": datasets.Value("bool"),
    }
    for name, names in classes.items():
        features[f"probs_{name}"] = datasets.Sequence(datasets.Value("float32"))
        features[f"pred_{name}"] = datasets.ClassLabel(names=names)
        features[f"abstain_{name}"] = datasets.Value("bool")
    features["clip_score"] = datasets.Value("float32")
    if images:
        features["image"] = datasets.Image()
    return datasets.Dataset.from_dict(cols, features=datasets.Features(features))


def export_audit(run_dir: str | Path, out: str | Path, images: bool = False) -> Path:
    """Write an audit as a data set folder (layout in the module docstring); returns ``out``.

    Args:
        run_dir: A run folder written by ``debias audit``.
        out: The export folder (created; files of an earlier export are replaced).
        images: Add an ``image`` column with the PNGs (the folder then holds them twice: parquet and arrow).

    Raises:
        UserError: ``run_dir`` is not a finished audit, or ``out`` is not a writable folder.
    """
    from audit.store import check_writable

    import datasets

    run = Path(run_dir)
    out = check_writable(out)
    dataset = audit_dataset(run, images)
    out.mkdir(parents=True, exist_ok=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # seconds of work: bars would only clutter the command's output
    try:
        dataset.save_to_disk(str(out))
        (out / "data").mkdir(exist_ok=True)
        dataset.to_parquet(str(out / PARQUET))
    finally:
        if bars:
            datasets.enable_progress_bars()
    atomic_write_bytes(out / "README.md", dataset_card(run, dataset).encode("utf-8"))
    return out


def dataset_card(run_dir: Path, dataset) -> str:
    """The export's ``README.md``: Hub metadata (configs pointing at the parquet file, tags, size) and a summary
    of the audit (bias per attribute with intervals, models and their resolved revisions, columns)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from audit.report import ordered_models, render_markdown

    metrics, meta = _read(run_dir, "metrics.json"), json.loads((run_dir / "run.json").read_text()) \
        if (run_dir / "run.json").is_file() else {}
    n = len(dataset)
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "n>100K"
    data = DatasetCardData(
        pretty_name=f"Bias audit: {metrics['run'].get('name') or run_dir.name}", size_categories=size,
        task_categories=["text-to-image"], tags=["debias-t2i", "bias-audit", "fairness"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": PARQUET}]}],
    )
    body = render_markdown("audit_dataset.md.j2", metrics=metrics, run=metrics["run"],
                           models=ordered_models(metrics["run"].get("models") or {}),
                           environment=meta.get("environment") or {}, n_rows=n,
                           columns=list(dataset.features), has_images="image" in dataset.features)
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def push_to_hub(folder: str | Path, repo: str, repo_type: str, ignore: list[str] | None = None) -> str:
    """Upload a folder written by ``debias export`` / ``debias card`` to the Hub repository ``repo`` (created if
    missing, private by default); returns the repository URL.

    Raises:
        UserError: when the upload fails (offline, no token, no access), naming the folder that is ready.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type=repo_type, ignore_patterns=ignore,
                          commit_message="Upload from debias-t2i")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as err:
        first = first_line(err)
        raise UserError(f"--push-to-hub {repo}: the upload failed ({first}); the folder '{folder}' is complete: "
                        f"push it later with `hf upload {repo} {folder} --repo-type {repo_type}` after "
                        "`hf auth login`") from None
    return str(url)
