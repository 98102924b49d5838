"""Vision-encoder probe (paper section 3): do the model's image encoders keep demographic information?

Embeddings of a balanced, labelled face set are taken from the generator's own image encoders and a linear probe
(standardise + logistic regression) is cross-validated on them with stratified k-fold (scikit-learn
``cross_val_predict``). High accuracy means the encoder keeps the attribute, which it needs to draw faces at all;
by itself it does not make the encoder the source of a bias. Reported per attribute and encoder: pooled
cross-validated accuracy (Wilson interval), per-fold accuracies, macro-F1, the confusion matrix, chance (majority
class share) and an empirical chance level (the same probe on shuffled labels); and one-vs-one per class pair.

Encoders come from the generator's backend (its ``image_encoders`` capability, :mod:`generators.base`):

* Janus family - ``vision``: the understanding tower (``model.model.vision_model``), last hidden state pooled over
  patches; ``aligned``: the same after the understanding aligner (what the language model reads);
  ``vq``: the generation tokenizer's encoder (``model.model.vqmodel.encoder`` + ``quant_conv``, pre-quantisation
  latents) pooled over the latent grid.
* Emu3 - ``vq``: its VQ encoder (``model.model.vqmodel.encode``, latents before quantisation, 4 channels per grid
  cell: ``flatten`` keeps far more than ``mean``); ``embedded``: the language model's input embeddings of the VQ
  tokens (what its language model reads of an image), pooled over tokens.
* Diffusers pipelines - ``vae``: the VAE encoder's latent mean, pooled.

Pooling: ``mean`` over tokens / grid cells (default) or ``flatten`` (keeps the spatial layout; larger).

Data (:attr:`VisionProbeConfig.data`): ``lab`` renders a balanced set with the lab world's renderer (offline,
gender x race cells balanced); a folder ``root/<class>/*.png`` (one attribute, named by ``attribute``); a saved
Hugging Face dataset (``save_to_disk``) or a hub dataset id, with an image column and label columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from generators.config import ConfigError, UserError, did_you_mean, option

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class VisionProbeConfig:
    """Settings of the vision-encoder probe."""

    data: str = option("lab", help="'lab' (built-in renderer), a folder root/<class>/*.png, a saved HF dataset "
                                   "folder, or a hub dataset id")
    attribute: str = option("gender", help="attribute name of a class-folder dataset")
    label_columns: list[str] = option(default_factory=list,
                                      help="HF dataset label columns, one probe each (default: [attribute]; "
                                           "lab: gender and race)")
    image_column: str = option("image", help="HF dataset image column")
    split: str = option("train", help="HF dataset split")
    lab_images: int = option(128, help="'lab': images rendered (balanced over gender x race cells)")
    max_per_class: int = option(0, help="use at most this many images per class (0: all)")
    balance: bool = option(True, help="subsample every class to the smallest class count")
    encoders: list[str] = option(default_factory=list,
                                 help="encoders to probe (Janus: vision, aligned, vq; Emu3: vq, embedded; diffusers: "
                                      "vae); default: all the model has")
    pool: Literal["mean", "flatten"] = option("mean", help="how token / grid embeddings become one vector")
    folds: int = option(5, help="stratified cross-validation folds (capped by the smallest class)")
    C: float = option(1.0, help="inverse L2 regularisation strength of the logistic regression")
    seed: int = option(0, help="seed of rendering, balancing, fold assignment and the label shuffle")
    batch_size: int = option(32, help="images per encoder forward")
    pairwise: bool = option(True, help="also probe every class pair one-vs-one")
    image_mean: list[float] | None = option(None, help="understanding-tower normalisation mean (default 0.5)")
    image_std: list[float] | None = option(None, help="understanding-tower normalisation std (default 0.5)")

    def __post_init__(self):
        if self.folds < 2:
            raise ConfigError(f"config key 'locate.vision.folds': must be >= 2, got {self.folds}")
        if self.C <= 0:
            raise ConfigError(f"config key 'locate.vision.C': must be > 0, got {self.C}")
        if self.lab_images < 8 or self.max_per_class < 0 or self.batch_size < 1:
            raise ConfigError("config keys 'locate.vision.lab_images' (>= 8), 'max_per_class' (>= 0), "
                              f"'batch_size' (>= 1): got {self.lab_images}, {self.max_per_class}, {self.batch_size}")

    def check_encoders(self, generator) -> dict[str, str]:
        """The generator's encoders (name -> description); raises unless it has every one this config names."""
        from generators.base import IMAGE_ENCODERS, require

        require(generator, IMAGE_ENCODERS, "the vision-encoder probe (drop 'vision' from locate.probes otherwise)")
        available = generator.image_encoders()
        for enc in self.encoders:
            if enc not in available:
                raise UserError(f"config key 'locate.vision.encoders': backend '{generator.config.backend}' has no "
                                f"encoder {enc!r}{did_you_mean(enc, available)}; available: {list(available)}")
        return available

    def check_data(self) -> None:
        """Fail early (before any output) when a local data folder does not exist."""
        if self.data == "lab":
            return
        p = Path(self.data)
        looks_local = p.is_absolute() or self.data.startswith((".", "~")) or p.exists() or self.data.count("/") != 1
        if looks_local and not p.exists():
            raise UserError(f"config key 'locate.vision.data': '{self.data}' does not exist; pass a folder "
                            "root/<class>/*.png, a saved dataset folder, a hub dataset id (org/name), or 'lab'")


# ----------------------------------------------------------------------------------------------------- the probe


def linear_probe(X: Any, y: Sequence[Any], folds: int = 5, seed: int = 0, C: float = 1.0, shuffle_baseline: bool = True,
                 alpha: float = 0.05) -> dict[str, Any]:
    """Cross-validated linear probe (standardise + logistic regression, stratified k-fold).

    Args:
        X: ``(n, d)`` embeddings.
        y: ``n`` labels (any hashable; reported as strings).
        folds: k; capped by the smallest class count (at least 2 per class needed).
        seed: fold assignment and label-shuffle seed.
        C: inverse L2 regularisation.
        shuffle_baseline: also fit on shuffled labels (an empirical chance level).
        alpha: 1 - confidence level of the accuracy's Wilson interval.

    Returns:
        ``accuracy`` (pooled over the out-of-fold predictions), ``accuracy_ci``, ``fold_accuracy`` (list),
        ``accuracy_std``, ``macro_f1``, ``chance`` (majority class share), ``shuffled_accuracy``, ``classes``,
        ``counts``, ``confusion`` (rows true, columns predicted), ``n``, ``folds``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from audit.metrics import wilson_interval

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray([str(v) for v in y])
    if X.ndim != 2 or len(X) != len(y):
        raise UserError(f"linear_probe: X must be (n, d) with one label per row, got X {X.shape} and {len(y)} labels")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise UserError(f"linear_probe: need at least 2 classes, got {classes.tolist()}")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise UserError(f"linear_probe: every class needs >= 2 examples for cross-validation; counts "
                        f"{dict(zip(classes.tolist(), counts.tolist()))}")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    # Single-threaded BLAS: these fits are many small matrix products, which extra threads only slow down
    # (about 8x on a busy 2-core machine).
    with threadpool_limits(limits=1):
        pred = cross_val_predict(model, X, y, cv=cv)
        y_shuf = np.random.default_rng(seed).permutation(y)
        pred_shuf = cross_val_predict(model, X, y_shuf, cv=cv) if shuffle_baseline else None
    # The same (seeded) splits as cross_val_predict used, so these equal cross_val_score's fold accuracies.
    fold_acc = [float(np.mean(pred[test] == y[test])) for _, test in cv.split(X, y)]
    correct = int(np.sum(pred == y))
    lo, hi = wilson_interval(correct, len(y), alpha)
    out = {
        "n": int(len(y)), "folds": k, "classes": classes.tolist(), "counts": counts.tolist(),
        "accuracy": correct / len(y), "accuracy_ci": [float(lo), float(hi)],
        "fold_accuracy": fold_acc, "accuracy_std": float(np.std(fold_acc)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "chance": float(counts.max() / len(y)),
        "confusion": confusion_matrix(y, pred, labels=classes).tolist(),
    }
    if shuffle_baseline:
        out["shuffled_accuracy"] = float(np.mean(pred_shuf == y_shuf))
    return out


def pairwise_probes(X: Any, y: Sequence[Any], **kwargs) -> list[dict[str, Any]]:
    """One-vs-one probes: :func:`linear_probe` on the images of every class pair (no shuffle baseline)."""
    y = np.asarray([str(v) for v in y])
    X = np.asarray(X)
    out = []
    for a, b in itertools.combinations(sorted(set(y.tolist())), 2):
        keep = (y == a) | (y == b)
        r = linear_probe(X[keep], y[keep], shuffle_baseline=False, **kwargs)
        out.append({"pair": [a, b], "n": r["n"], "accuracy": r["accuracy"], "accuracy_ci": r["accuracy_ci"],
                    "macro_f1": r["macro_f1"], "chance": r["chance"]})
    return out


def balanced_indices(labels: Sequence[str], balance: bool, max_per_class: int, seed: int) -> np.ndarray:
    """Indices of a subsample with every class cut to the smallest class count (and to ``max_per_class``)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    cap = int(counts.min()) if balance else int(counts.max())
    if max_per_class:
        cap = min(cap, max_per_class)
    keep = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[:cap].tolist() if len(idx) > cap else idx.tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


# ------------------------------------------------------------------------------------------------------- data


def load_labelled_images(config: VisionProbeConfig) -> tuple[list, dict[str, list[str]], str]:
    """Images and labels from ``config.data``. Returns ``(PIL images, attribute -> labels, description)``."""
    from PIL import Image

    if config.data == "lab":
        from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch, to_uint8

        rng = np.random.default_rng(config.seed)
        cells = list(itertools.product(GENDERS, RACES))
        n = config.lab_images
        g = [cells[i % len(cells)][0] for i in range(n)]
        r = [cells[i % len(cells)][1] for i in range(n)]
        o = [OCCUPATIONS[int(i)] for i in rng.integers(0, len(OCCUPATIONS), n)]
        arr = to_uint8(render_batch(n, {"gender": g, "race": r, "occupation": o}, rng))
        wanted = config.label_columns or ["gender", "race"]
        labels = {"gender": g, "race": r}
        bad = [c for c in wanted if c not in labels]
        if bad:
            raise UserError(f"config key 'locate.vision.label_columns': the lab renderer labels gender and race, "
                            f"not {bad}")
        return [Image.fromarray(a) for a in arr], {c: labels[c] for c in wanted}, \
            f"lab renderer, {n} images balanced over gender x race (seed {config.seed})"
    root = Path(config.data)
    if root.is_dir() and not any((root / f).exists() for f in ("dataset_info.json", "state.json",
                                                              "dataset_dict.json")):
        images, labels = [], []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
                labels.append(sub.name)
        if len(set(labels)) < 2:
            raise UserError(f"config key 'locate.vision.data': '{root}' needs one sub-folder per class with images "
                            f"(root/<class>/*.png), found classes {sorted(set(labels))}")
        return images, {config.attribute: labels}, f"folder {root} ({len(images)} images)"
    import datasets

    try:
        if root.is_dir():
            ds = datasets.load_from_disk(str(root))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[config.split]
        else:
            ds = datasets.load_dataset(config.data, split=config.split)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear message
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"config key 'locate.vision.data': cannot load dataset '{config.data}' ({first})") from None
    columns = config.label_columns or [config.attribute]
    missing = [c for c in [config.image_column, *columns] if c not in ds.column_names]
    if missing:
        raise UserError(f"config key 'locate.vision': dataset '{config.data}' has no column(s) {missing}; "
                        f"columns: {ds.column_names}")
    labels = {}
    for c in columns:
        feat = ds.features[c]
        vals = ds[c]
        labels[c] = [feat.int2str(v) if hasattr(feat, "int2str") else str(v) for v in vals]
    images = [im.convert("RGB") for im in ds[config.image_column]]
    return images, labels, f"dataset {config.data} split {config.split} ({len(images)} images)"


def vision_probe(generator, config: VisionProbeConfig | None = None, images: Sequence | None = None,
                 labels: dict[str, Sequence[str]] | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Probe every requested encoder for every labelled attribute.

    Args:
        generator: a generator with the ``image_encoders`` capability (its backend says which encoders it has and
            how to read them).
        config: probe settings (data, encoders, folds, ...).
        images, labels: a labelled set to use instead of loading ``config.data`` (attribute -> one label per image).
        alpha: 1 - confidence level of the accuracy intervals.

    Returns:
        JSON-ready dict: ``data`` (description), ``encoders`` (each with its description), and per encoder and
        attribute the :func:`linear_probe` result plus ``pairwise`` one-vs-one probes.
    """
    config = config or VisionProbeConfig()
    if images is None:
        images, labels, described = load_labelled_images(config)
    else:
        described = f"{len(images)} given images"
        if not labels:
            raise UserError("vision_probe: pass labels (attribute -> one label per image) with images")
    for a, lab in labels.items():
        if len(lab) != len(images):
            raise UserError(f"vision_probe: attribute {a!r} has {len(lab)} labels for {len(images)} images")
    available = config.check_encoders(generator)
    encoders = config.encoders or list(available)
    result: dict[str, Any] = {}
    for enc in encoders:
        X = generator.embed_images(images, enc, config.pool, config.batch_size, config.image_mean, config.image_std)
        per_attr = {}
        for a, lab in labels.items():
            idx = balanced_indices(lab, config.balance, config.max_per_class, config.seed)
            y = np.asarray(lab)[idx]
            r = linear_probe(X[idx], y, config.folds, config.seed, config.C, alpha=alpha)
            if config.pairwise and len(r["classes"]) > 2:
                r["pairwise"] = pairwise_probes(X[idx], y, folds=config.folds, seed=config.seed, C=config.C,
                                                alpha=alpha)
            per_attr[a] = r
        result[enc] = {"dim": int(X.shape[1]), "attributes": per_attr}
    return {
        "probe": "vision",
        "data": described, "pool": config.pool, "balance": config.balance, "folds": config.folds, "C": config.C,
        "classifier": "StandardScaler + LogisticRegression (L2), stratified k-fold cross_val_predict",
        "encoder_descriptions": {e: available[e] for e in encoders},
        "encoders": result,
    }

