"""Does the classifier bind attributes to the right person, or read a caption as a bag of words?

Following ARO (Yuksekgonul et al., ICLR 2023, "When and why vision-language models behave like bags-of-words, and
what to do about it"): show the classifier an image whose binding is known (two people side by side, e.g. a
female doctor left of a male nurse) and compare its similarity to

* the correct caption (``a photo of a female doctor and a male nurse``) against the caption with the attributes
  *swapped* between the people (``a photo of a male doctor and a female nurse``): same words, other binding;
* the correct caption against *word-order shuffles* of it (``nurse photo a male and doctor a female of``).

Each comparison is a two-way choice, so chance is 0.5. A model that ignores word order and binding (a bag of
words) scores 0.5 on both, whatever its word-level knowledge. Items come in swap-balanced pairs (every image has
its mirror image, for which the swapped caption is the correct one), so a pure *text* preference for one of the two
captions also scores exactly 0.5: only binding moves the accuracy.

Verdict: the classifier *binds* when its swap accuracy is at least ``bind_threshold`` (0.6) and the lower bound of
its Wilson interval is above 0.5; otherwise it behaves like a bag of words, and the audit should classify each face
crop on its own (``faces.detector``: a face detector, one crop per person) instead of whole multi-person images.

Images with known binding: for the lab world, two renders side by side (:func:`lab_binding_items`); otherwise a
manifest of composite images (:func:`load_binding_items`: ``path``, ``caption``, ``swapped`` columns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from generators.config import ConfigError, UserError, option

DEFAULT_TEMPLATE = "a photo of a {left} and a {right}"


@dataclass
class CompositionalConfig:
    """The attribute-binding check of the classifier bias card (``card.compositional``)."""

    enabled: bool = option(True, help="run the binding check when images with known binding are available")
    images: str | None = option(
        None, help="manifest (.jsonl/.csv) of composite images: path, caption (correct), swapped (attributes "
                   "swapped between the people); default: lab-world renders side by side for a lab classifier",
    )
    n_items: int = option(48, help="lab composites (in swap-balanced pairs, so rounded up to even)")
    n_shuffles: int = option(3, help="word-order shuffles of each correct caption")
    template: str = option(DEFAULT_TEMPLATE, help="lab caption: {left} and {right} are '<gender> <occupation>'")
    bind_threshold: float = option(0.6, help="swap accuracy needed (with its interval above 0.5) to call it binding")
    alpha: float = option(0.05, help="1 - confidence level of the accuracy intervals")
    seed: int = option(0, help="seed of the lab renders and the shuffles")

    def __post_init__(self):
        if self.n_items < 2:
            raise ConfigError(f"config key 'card.compositional.n_items': must be >= 2, got {self.n_items}")
        if self.n_shuffles < 0:
            raise ConfigError(f"config key 'card.compositional.n_shuffles': must be >= 0, got {self.n_shuffles}")
        if not 0.5 <= self.bind_threshold <= 1:
            raise ConfigError(f"config key 'card.compositional.bind_threshold': must be in [0.5, 1], "
                              f"got {self.bind_threshold}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"config key 'card.compositional.alpha': must be in (0, 1), got {self.alpha}")
        if "{left}" not in self.template or "{right}" not in self.template:
            raise ConfigError(f"config key 'card.compositional.template': {self.template!r} needs {{left}} and "
                              "{right}, e.g. 'a photo of a {left} and a {right}'")


@dataclass
class BindingItem:
    """An image whose attribute binding is known, with its correct and swapped captions.

    Attributes:
        image: The composite image.
        caption: The caption that binds the attributes correctly.
        swapped: The same words with the attributes swapped between the people.
        shuffles: Word-order shuffles of ``caption`` (filled by :func:`add_shuffles` when empty).
        meta: Free-form description (e.g. the people's attributes), kept in the JSON output.
    """

    image: Image.Image
    caption: str
    swapped: str
    shuffles: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ metrics


def preference_accuracy(correct: Any, other: Any) -> float:
    """Fraction of comparisons in which the correct caption scores higher; a tie counts one half.

    Args:
        correct: Similarities to the correct caption, shape (N,) or broadcastable to ``other``.
        other: Similarities to the competing caption(s), shape (N,) or (N, S).

    Returns:
        The accuracy in [0, 1] (chance 0.5); NaN for no comparisons.

    Raises:
        UserError: for shapes that do not broadcast or non-finite scores.
    """
    c = np.asarray(correct, dtype=float)
    o = np.asarray(other, dtype=float)
    if o.ndim == 2 and c.ndim == 1:
        c = c[:, None]
    try:
        c, o = np.broadcast_arrays(c, o)
    except ValueError:
        raise UserError(f"preference_accuracy: correct {np.shape(correct)} and other {np.shape(other)} do not "
                        "match; pass one score per comparison") from None
    if not (np.isfinite(c).all() and np.isfinite(o).all()):
        raise UserError("preference_accuracy: scores must be finite")
    if c.size == 0:
        return float("nan")
    return float(((c > o) + 0.5 * (c == o)).mean())


def accuracy_summary(correct: Any, other: Any, alpha: float = 0.05) -> dict[str, Any]:
    """:func:`preference_accuracy` with a Wilson interval, the count and chance (0.5).

    With several competitors per item the comparisons are not independent; the interval counts every comparison,
    so it is too narrow by up to ``sqrt(S)``: read it as approximate.
    """
    from audit.metrics import wilson_interval

    acc = preference_accuracy(correct, other)
    n = int(np.shape(correct)[0]) if np.ndim(correct) else 1
    n_cmp = int(np.size(other)) if np.ndim(other) else 1
    lo, hi = wilson_interval(acc * n_cmp, n_cmp, alpha) if n_cmp else (np.nan, np.nan)
    return {"accuracy": acc, "ci": [float(lo), float(hi)] if n_cmp else None, "n_items": n, "n_comparisons": n_cmp,
            "chance": 0.5}


def binding_verdict(swap: dict[str, Any], bind_threshold: float = 0.6) -> dict[str, Any]:
    """Whether the classifier binds attributes, from the swap accuracy and its interval.

    Args:
        swap: The :func:`accuracy_summary` of correct vs swapped captions.
        bind_threshold: Accuracy needed, with the interval's lower bound above chance (0.5).

    Returns:
        ``binds`` (bool), ``verdict`` (``"binds attributes"`` or ``"bag of words"``) and ``recommendation``
        (None when it binds).
    """
    acc, ci = swap.get("accuracy"), swap.get("ci")
    binds = bool(acc is not None and np.isfinite(acc) and acc >= bind_threshold and ci and ci[0] > 0.5)
    return {
        "binds": binds,
        "verdict": "binds attributes" if binds else "bag of words",
        "recommendation": None if binds else (
            "This classifier does not reliably tell which person has which attribute. Classify one face crop per "
            "person (faces.detector: a face detector, e.g. opencv) rather than whole images that may show several "
            "people, and do not use whole-image captions that name several people's attributes."),
    }


# ----------------------------------------------------------------------------------------------------- captions


def shuffle_caption(caption: str, rng: np.random.Generator, avoid: Sequence[str] = ()) -> str | None:
    """A random word-order permutation of ``caption`` that differs from it and from ``avoid``.

    Returns:
        The shuffled caption, or None when the words allow no other order (e.g. one word, all equal).
    """
    words = caption.split()
    banned = {caption, *avoid}
    if len(set(words)) < 2:
        return None
    for _ in range(50):
        perm = " ".join(words[i] for i in rng.permutation(len(words)))
        if perm not in banned:
            return perm
    return None


def add_shuffles(items: Sequence[BindingItem], n_shuffles: int, seed: int = 0) -> None:
    """Fill each item's ``shuffles`` (when empty) with up to ``n_shuffles`` distinct word-order shuffles."""
    rng = np.random.default_rng(seed)
    for item in items:
        if item.shuffles:
            continue
        found: list[str] = []
        for _ in range(n_shuffles * 4):
            if len(found) >= n_shuffles:
                break
            s = shuffle_caption(item.caption, rng, avoid=[item.swapped, *found])
            if s is not None:
                found.append(s)
        item.shuffles = found


def compose_side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two images side by side on a square canvas (the rest filled with the edge colour of each half).

    Square, because CLIP processors resize the short side and centre-crop: a 2:1 strip would lose the outer half of
    each person.
    """
    left, right = left.convert("RGB"), right.convert("RGB")
    h = max(left.height, right.height)
    w = left.width + right.width
    side = max(w, h)
    arr = np.zeros((side, side, 3), np.uint8)
    top = (side - h) // 2
    for x0, im in ((0, left), (left.width, right)):
        a = np.asarray(im)
        # Repeat each half's top and bottom rows upwards and downwards: padding that looks like its background.
        arr[:top, x0:x0 + im.width] = a[:1]
        arr[top:top + im.height, x0:x0 + im.width] = a
        arr[top + im.height:, x0:x0 + im.width] = a[-1:]
    return Image.fromarray(arr)


def lab_binding_items(n_items: int = 48, seed: int = 0, template: str = DEFAULT_TEMPLATE) -> list[BindingItem]:
    """Lab-world composites: a woman and a man side by side, in different occupations, with known binding.

    Items come in mirror pairs: (female o1, male o2) and (male o1, female o2) with the same occupations and order,
    so the two captions of one pair swap roles and a text-only preference scores exactly 0.5.

    Args:
        n_items: Number of items (rounded up to an even number).
        seed: Seed of the renders and of the attribute draws.
        template: Caption with ``{left}`` and ``{right}`` (each ``"<gender> <occupation>"``).

    Returns:
        The items.
    """
    from generators.lab.render import GENDERS, OCCUPATIONS, RACES, render_batch, to_uint8

    rng = np.random.default_rng(seed)
    n_pairs = (n_items + 1) // 2
    items = []
    for _ in range(n_pairs):
        o1, o2 = rng.choice(len(OCCUPATIONS), 2, replace=False)
        r1, r2 = rng.integers(0, len(RACES), 2)
        for g1 in (1, 0):  # female left, then its mirror with male left
            g2 = 1 - g1
            imgs = to_uint8(render_batch(2, {"gender": [g1, g2], "race": [int(r1), int(r2)],
                                             "occupation": [int(o1), int(o2)]}, rng))
            left = f"{GENDERS[g1]} {OCCUPATIONS[o1]}"
            right = f"{GENDERS[g2]} {OCCUPATIONS[o2]}"
            swapped_left = f"{GENDERS[g2]} {OCCUPATIONS[o1]}"
            swapped_right = f"{GENDERS[g1]} {OCCUPATIONS[o2]}"
            items.append(BindingItem(
                image=compose_side_by_side(Image.fromarray(imgs[0]), Image.fromarray(imgs[1])),
                caption=template.format(left=left, right=right),
                swapped=template.format(left=swapped_left, right=swapped_right),
                meta={"left": left, "right": right},
            ))
    return items


def load_binding_items(manifest: str | Path) -> list[BindingItem]:
    """Composite images with known binding from a ``.jsonl`` or ``.csv`` manifest.

    Columns: ``path`` (relative to the manifest's folder, or absolute), ``caption`` (correct binding), ``swapped``
    (attributes swapped between the people); optional ``shuffles`` (JSONL: a list of captions).

    Raises:
        UserError: for a missing manifest or image, missing columns, or identical caption and swapped caption.
    """
    import csv

    path = Path(manifest)
    if not path.is_file():
        raise UserError(f"card.compositional.images: manifest '{path}' does not exist; give a .jsonl or .csv with "
                        "path, caption and swapped columns")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() == ".jsonl":
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise UserError(f"card.compositional.images: '{path}' is not valid JSONL: {err}") from None
    else:
        raise UserError(f"card.compositional.images: '{path}' must be a .jsonl or .csv manifest")
    if not rows:
        raise UserError(f"card.compositional.images: '{path}' lists no images")
    items = []
    for n, row in enumerate(rows):
        missing = [c for c in ("path", "caption", "swapped") if not row.get(c)]
        if missing:
            raise UserError(f"card.compositional.images: '{path}' row {n}: missing {', '.join(missing)}")
        if row["caption"] == row["swapped"]:
            raise UserError(f"card.compositional.images: '{path}' row {n}: caption and swapped are identical")
        src = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        if not src.is_file():
            raise UserError(f"card.compositional.images: '{path}' row {n}: image '{src}' does not exist")
        with Image.open(src) as im:
            image = im.convert("RGB")
        shuffles = row.get("shuffles") if isinstance(row.get("shuffles"), list) else []
        items.append(BindingItem(image, str(row["caption"]), str(row["swapped"]), [str(s) for s in shuffles],
                                 {"path": str(row["path"])}))
    return items


# ---------------------------------------------------------------------------------------------------- the check


def binding_check(classifier: Any, items: Sequence[BindingItem], config: CompositionalConfig | None = None,
                  source: str = "") -> dict[str, Any]:
    """Score every item's captions with the classifier and summarise binding and word-order accuracy.

    Args:
        classifier: A :class:`audit.classify.ClipClassifier` (its ``image_embeddings`` and ``text_embeddings``).
        items: Images with known binding.
        config: Thresholds and shuffle count (default :class:`CompositionalConfig`).
        source: Where the items come from (kept in the output).

    Returns:
        ``swap`` and ``order`` (:func:`accuracy_summary` each; ``order`` None without shuffles), the fields of
        :func:`binding_verdict`, ``source``, ``bind_threshold`` and a few ``examples``.

    Raises:
        UserError: for no items.
    """
    config = config or CompositionalConfig()
    if not items:
        raise UserError("binding_check: no items; give images with known binding")
    add_shuffles(items, config.n_shuffles, config.seed)
    img = classifier.image_embeddings([it.image for it in items])
    texts = list(dict.fromkeys(t for it in items for t in (it.caption, it.swapped, *it.shuffles)))
    index = {t: i for i, t in enumerate(texts)}
    txt = classifier.text_embeddings(texts)
    sims = (img @ txt.T).cpu().numpy().astype(np.float64)
    rows = np.arange(len(items))
    s_correct = sims[rows, [index[it.caption] for it in items]]
    s_swapped = sims[rows, [index[it.swapped] for it in items]]
    swap = accuracy_summary(s_correct, s_swapped, config.alpha)
    order = None
    pairs = [(i, index[s]) for i, it in enumerate(items) for s in it.shuffles]
    if pairs:
        ii = np.array([p[0] for p in pairs])
        jj = np.array([p[1] for p in pairs])
        order = accuracy_summary(s_correct[ii], sims[ii, jj], config.alpha)
        order["n_items"] = len(set(ii.tolist()))
    examples = [{"caption": it.caption, "swapped": it.swapped, "prefers_correct": bool(s_correct[i] > s_swapped[i]),
                 **it.meta} for i, it in enumerate(items[:4])]
    return {"source": source, "swap": swap, "order": order, "bind_threshold": config.bind_threshold,
            **binding_verdict(swap, config.bind_threshold), "examples": examples}


__all__ = [
    "BindingItem", "CompositionalConfig", "DEFAULT_TEMPLATE", "accuracy_summary", "add_shuffles", "binding_check",
    "binding_verdict", "compose_side_by_side", "lab_binding_items", "load_binding_items", "preference_accuracy",
    "shuffle_caption",
]
