"""Renderer of the lab world: 32x32 RGB pictures of stylised people whose pixels encode three attributes.

* **gender** (``male`` / ``female``): hair shape. Both genders have a hair cap on top of the head; ``female`` adds
  long hair falling on both sides of the face down to the shoulders (dark vertical bands beside the face).
* **race** (``White``, ``Black``, ``Indian``, ``Asian``): the paper's four class names, used here only as labels of
  four abstract *skin-tone levels* (lightest to darkest: White, Asian, Indian, Black). They stand in for the
  classes the audit counts; they are not a claim about how real people of any group look.
* **occupation**: clothing colour plus a small mark (doctor: white coat with a dark tie line; nurse: light-blue
  scrubs with a white cross; engineer: orange vest with a light stripe; teacher: purple cardigan with a white
  collar; chef: red jacket with a white button row; pilot: navy jacket with gold shoulder bars; farmer: green
  overalls with dark straps; cashier: yellow shirt with a small dark badge).

Every picture is jittered (position, face size, shoulder width, every colour, hair colour) and has pixel noise, so
no two renders are equal. Rendering is vectorised over the batch and deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from generators.config import UserError

SIZE = 32
GENDERS: tuple[str, ...] = ("male", "female")
RACES: tuple[str, ...] = ("White", "Black", "Indian", "Asian")
OCCUPATIONS: tuple[str, ...] = ("doctor", "nurse", "engineer", "teacher", "chef", "pilot", "farmer", "cashier")

# Skin-tone levels (RGB in [0, 1]); adjacent levels differ by ~0.23 in brightness, far above the jitter (~0.03),
# so the tone class is recoverable from a few face pixels even after VQ compression.
TONES: dict[str, tuple[float, float, float]] = {
    "White": (0.99, 0.88, 0.8),
    "Asian": (0.85, 0.66, 0.47),
    "Indian": (0.6, 0.4, 0.26),
    "Black": (0.3, 0.19, 0.12),
}

# Clothing colour and accent colour per occupation (accent drawn in the occupation's mark).
CLOTHES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "doctor": ((0.95, 0.95, 0.95), (0.15, 0.2, 0.45)),
    "nurse": ((0.55, 0.78, 0.92), (0.98, 0.98, 0.98)),
    "engineer": ((0.98, 0.55, 0.1), (0.95, 0.95, 0.6)),
    "teacher": ((0.5, 0.22, 0.55), (0.95, 0.95, 0.95)),
    "chef": ((0.85, 0.12, 0.12), (0.98, 0.98, 0.98)),
    "pilot": ((0.1, 0.13, 0.35), (0.95, 0.8, 0.2)),
    "farmer": ((0.22, 0.55, 0.2), (0.25, 0.15, 0.08)),
    "cashier": ((0.95, 0.85, 0.2), (0.15, 0.15, 0.15)),
}

# One muted background colour (jittered). Varied backgrounds only add entropy the tiny models must spend capacity
# on; a trained lab VQ dropped background colour from its reconstructions anyway.
BACKGROUND = (0.66, 0.72, 0.7)

# Hair colours are drawn independently of every attribute, so colour carries no label information. They are dark,
# cool or neutral, far from every (warm) skin tone and from the background, so hair never passes for skin (or for
# background) in a blurry decode.
HAIR = np.array([(0.06, 0.06, 0.07), (0.13, 0.15, 0.3), (0.3, 0.3, 0.35)], dtype=np.float32)


def _index(values, names: Sequence[str], field: str, n: int) -> np.ndarray:
    """Map attribute names (or ints) to class indices, broadcasting a single value to ``n`` rows."""
    if isinstance(values, (str, int, np.integer)):
        values = [values] * n
    values = list(values)
    if len(values) != n:
        raise UserError(f"render_batch: attrs['{field}'] has {len(values)} values for n={n}; give one per image "
                        "or a single value")
    out = np.empty(n, dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if not 0 <= int(v) < len(names):
                raise UserError(f"render_batch: attrs['{field}'][{i}] = {v} is out of range 0..{len(names) - 1}")
            out[i] = int(v)
        elif v in names:
            out[i] = names.index(v)
        else:
            raise UserError(f"render_batch: attrs['{field}'][{i}] = {v!r} is not one of {list(names)}")
    return out


def render_batch(n: int, attrs: Mapping[str, object], rng: np.random.Generator) -> np.ndarray:
    """Render ``n`` people with the given attributes.

    Args:
        n: number of images.
        attrs: ``gender``, ``race`` and ``occupation``, each a single value (broadcast) or a sequence of ``n``
            values; values are class names (see :data:`GENDERS`, :data:`RACES`, :data:`OCCUPATIONS`) or indices.
        rng: source of all randomness (jitter and noise); the same generator state gives the same images.

    Returns:
        ``(n, 32, 32, 3)`` float32 array in [0, 1], channels last.

    Raises:
        UserError: on a missing attribute, an unknown class name or a wrong number of values.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise UserError(f"render_batch: n must be a non-negative integer, got {n!r}")
    missing = [k for k in ("gender", "race", "occupation") if k not in attrs]
    if missing:
        raise UserError(f"render_batch: attrs lacks {missing}; give gender, race and occupation")
    g = _index(attrs["gender"], GENDERS, "gender", n)
    r = _index(attrs["race"], RACES, "race", n)
    o = _index(attrs["occupation"], OCCUPATIONS, "occupation", n)
    if n == 0:
        return np.zeros((0, SIZE, SIZE, 3), np.float32)

    def u(lo, hi, *shape):
        return rng.uniform(lo, hi, size=(n, *shape)).astype(np.float32)

    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    yy, xx = yy[None], xx[None]  # (1, H, W), broadcast against per-image (n, 1, 1) parameters

    def col(x):  # (n, 3) -> (n, 1, 1, 3)
        return x[:, None, None, :]

    def paint(img, mask, colour):
        return np.where(mask[..., None], col(colour), img)

    # Background: one muted colour, jittered, with a faint vertical gradient (see BACKGROUND).
    bg = np.array(BACKGROUND, np.float32) + u(-0.03, 0.03, 3)
    grad = u(-0.05, 0.05)[:, None, None, None] * ((yy[..., None] - SIZE / 2) / SIZE)
    img = np.broadcast_to(col(bg), (n, SIZE, SIZE, 3)) + grad

    cx = 15.5 + u(-1, 1)[:, None, None]
    cy = 12.5 + u(-1, 1)[:, None, None]
    rx = 6.0 + u(-0.4, 0.4)[:, None, None]
    ry = 7.2 + u(-0.4, 0.4)[:, None, None]
    skin = np.array([TONES[RACES[i]] for i in r], np.float32) + u(-0.015, 0.015, 3) + u(-0.02, 0.02)[:, None]
    hair = HAIR[rng.integers(0, len(HAIR), n)] + u(-0.02, 0.02, 3)
    clothes = np.array([CLOTHES[OCCUPATIONS[i]][0] for i in o], np.float32) + u(-0.025, 0.025, 3)
    accent = np.array([CLOTHES[OCCUPATIONS[i]][1] for i in o], np.float32) + u(-0.02, 0.02, 3)

    female = (g == 1)[:, None, None]
    # Long hair behind the head and shoulders (drawn first so face and body cover its middle).
    long_hair = female & (np.abs(xx - cx) <= rx + 2.6) & (yy >= cy - ry) & (yy <= cy + ry + 5 + u(0, 2)[:, None, None])
    img = paint(img, long_hair, hair)

    # Body: shoulders from below the chin to the bottom edge, width jittered.
    top = cy + ry - 0.5 + u(0, 1.0)[:, None, None]
    half = 10.0 + u(-1.0, 1.0)[:, None, None] + 0.35 * np.clip(yy - top, 0, None)
    body = (yy >= top + 1.5) & (np.abs(xx - cx) <= half)
    img = paint(img, body, clothes)
    neck = (yy >= cy + ry - 2) & (yy < top + 2.5) & (np.abs(xx - cx) <= 2.0)
    img = paint(img, neck, skin)

    # Occupation marks, relative to the body's top centre.
    by = top + 1.5
    dx, dy = xx - cx, yy - by
    occ = o[:, None, None]
    marks = np.zeros((n, SIZE, SIZE), bool)
    marks |= (occ == 0) & (np.abs(dx) <= 0.6) & (dy >= 0)                                      # doctor: tie line
    marks |= (occ == 1) & (((np.abs(dx + 5) <= 0.6) & (np.abs(dy - 4) <= 1.6))                 # nurse: cross
                           | ((np.abs(dx + 5) <= 1.6) & (np.abs(dy - 4) <= 0.6)))
    marks |= (occ == 2) & (np.abs(dy - 4) <= 0.8) & body                                         # engineer: stripe
    marks |= (occ == 3) & (dy >= 0) & (dy <= 1.2) & (np.abs(dx) <= 4.5)                         # teacher: collar
    marks |= (occ == 4) & (np.abs(np.abs(dx) - 2) <= 0.6) & (dy >= 1) & ((dy.astype(np.int32) % 2) == 0)  # chef
    marks |= (occ == 5) & (np.abs(np.abs(dx) - 8) <= 1.6) & (dy >= 0) & (dy <= 1.2)             # pilot: bars
    marks |= (occ == 6) & (np.abs(np.abs(dx) - 4) <= 0.8) & (dy >= 0)                            # farmer: straps
    marks |= (occ == 7) & (np.abs(dx - 5) <= 1.2) & (np.abs(dy - 3.5) <= 1.0)                    # cashier: badge
    img = paint(img, marks & body, accent)

    # Face, then the hair cap over its top (both genders).
    face = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    img = paint(img, face, skin)
    cap_line = cy - ry * (0.35 + u(-0.08, 0.08)[:, None, None])
    cap = (((xx - cx) / (rx + 1.0)) ** 2 + ((yy - cy) / (ry + 1.0)) ** 2 <= 1.0) & (yy <= cap_line)
    img = paint(img, cap, hair)

    # Eyes and mouth (dark features), at fixed offsets inside the face.
    eye_y = np.round(cy - 1)
    eyes = (yy == eye_y) & ((np.abs(xx - np.round(cx - 2.5)) < 0.5) | (np.abs(xx - np.round(cx + 2.5)) < 0.5))
    img = paint(img, eyes, np.full((n, 3), 0.08, np.float32))
    mouth = (yy == np.round(cy + 3.5)) & (np.abs(xx - cx) <= 1.6)
    img = paint(img, mouth, np.tile(np.array([[0.55, 0.15, 0.15]], np.float32), (n, 1)) * 0.8 + 0.2 * skin)

    img = img + rng.normal(0, 0.015, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render(gender: str, race: str, occupation: str, rng: np.random.Generator) -> np.ndarray:
    """Render one person; ``(32, 32, 3)`` float32 in [0, 1]. See :func:`render_batch`."""
    return render_batch(1, {"gender": gender, "race": race, "occupation": occupation}, rng)[0]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (or [-1, 1] when ``images.min() < 0``) to uint8, channels last."""
    images = np.asarray(images, dtype=np.float32)
    if images.min() < 0:
        images = (images + 1) / 2
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def contact_sheet(images: np.ndarray, cols: int = 8, scale: int = 4):
    """A PIL image tiling ``images`` (N, H, W, 3) in a grid, upscaled ``scale`` times (for eyeballing the world)."""
    from PIL import Image

    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * (h + 1), cols * (w + 1), 3), 255, np.uint8)
    for i in range(n):
        y, x = divmod(i, cols)
        sheet[y * (h + 1):y * (h + 1) + h, x * (w + 1):x * (w + 1) + w] = arr[i]
    return Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
