"""Audit reports: one self-contained HTML page and a Markdown summary per run folder.

``report.html`` opens offline and can be mailed or attached as one file: plots are inline SVG data URIs, image
thumbnails inline PNG/JPEG data URIs, and the stylesheet is inline (no external CSS, JS, fonts or images).
``report.md`` holds the summary table, the most biased prompts and the run metadata, for pull requests and model
cards.

All text that comes from users or models (prompts, class names, model ids, config values) goes through Jinja2 with
autoescaping on, so a prompt such as ``<script>alert(1)</script>`` is shown, never run. Markdown output escapes
the characters that would break a table or turn into raw HTML.

Reusable pieces for other report sections (the locate probes, a classifier bias card, the before/after compare):
:func:`render_html`, :func:`render_markdown`, :func:`html_fragment`, :func:`figure_data_uri`,
:func:`image_data_uri`, :func:`image_grid_html`, :func:`fmt_num`, and :class:`Section`
for extra sections appended by :func:`write_report`.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from markupsafe import Markup

from generators.config import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

# Muted, colour-blind-safe qualitative palette (Okabe-Ito, slightly desaturated) for class colours.
PALETTE = ["#4e79a7", "#e15759", "#59a14f", "#b07aa1", "#f28e2b", "#76b7b2", "#9c755f", "#edc948", "#bab0ac",
           "#ff9da7"]
GRID_IMAGES = 8
MAX_GRID_PROMPTS = 50
MAX_PLOT_PROMPTS = 50
THUMB_PX = 128


# -------------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """An extra report section, appended after the built-in ones (e.g. locate probes, a classifier bias card).

    Attributes:
        title: Heading shown in the page and in the navigation bar (plain text; escaped when rendered).
        html: Body HTML, trusted as already safe: build it with :func:`render_html` or :func:`html_fragment` so
            that any user text inside is escaped.
        markdown: Body for ``report.md`` (may be empty to leave the section out of the Markdown summary).
        anchor: Fragment id of the section (``#anchor``); derived from the title when None.
    """

    title: str
    html: str
    markdown: str = ""
    anchor: str | None = None

    def __post_init__(self):
        if not isinstance(self.title, str) or not self.title.strip():
            raise UserError(f"Section.title: expected a non-empty string, got {self.title!r}; give the section a name")
        if not isinstance(self.html, str):
            raise UserError(f"Section.html: expected a string of HTML, got {type(self.html).__name__}; "
                            "render it with audit.report.render_html or html_fragment")
        if not isinstance(self.markdown, str):
            raise UserError(f"Section.markdown: expected a string, got {type(self.markdown).__name__}; "
                            "pass '' to leave the section out of report.md")


def slugify(text: str) -> str:
    """A fragment id for ``text``: lower-case ASCII words joined by ``-`` (``"section"`` when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return slug or "section"


# -------------------------------------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number as shown in every report table: fixed ``digits`` decimals, ``—`` when undefined.

    Args:
        x: A number, or None/NaN for undefined.
        digits: Decimals.

    Returns:
        E.g. ``"0.412"``; ``"—"`` for None, NaN or inf.
    """
    return f"{float(x):.{digits}f}" if _finite(x) else "—"


def fmt_pct(x: Any, digits: int = 1) -> str:
    """A fraction as a percentage, e.g. ``0.1234 -> "12.3%"``; ``—`` when undefined."""
    return f"{100 * float(x):.{digits}f}%" if _finite(x) else "—"


def fmt_ci(ci: Any, digits: int = 3) -> str:
    """An interval as ``[low, high]``; empty when either bound is undefined."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not all(_finite(v) for v in ci):
        return ""
    return f"[{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"


def fmt_signed(x: Any, digits: int = 3) -> str:
    """A change with its sign, e.g. ``"+0.120"``, ``"-0.350"``, ``"0.000"`` for exactly zero."""
    if not _finite(x):
        return "—"
    return f"{float(x):.{digits}f}" if x == 0 else f"{float(x):+.{digits}f}"


def fmt_seeds(seeds: Sequence[int] | None) -> str:
    """Seeds compactly: ``"0–159 (160)"`` for a contiguous range, else the first few and the count."""
    seeds = sorted(int(s) for s in (seeds or []))
    if not seeds:
        return "—"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]} ({len(seeds)})" if len(seeds) > 1 else str(seeds[0])
    head = ", ".join(map(str, seeds[:6]))
    return f"{head}, … ({len(seeds)})" if len(seeds) > 6 else head


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_escape(text: Any) -> str:
    """Escape text for a Markdown table cell: no raw HTML, no broken columns, no accidental emphasis."""
    s = " ".join(str(text).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def md_code(text: Any) -> str:
    """Text as a Markdown code span (model ids, revisions); backticks inside are dropped so the span cannot end."""
    s = " ".join(str(text).replace("`", "'").split())
    return f"`{s}`" if s else "—"


def _kv(value: Any) -> str:
    """A config value on one line: dicts as ``k=v, ...`` (nested ones in parentheses), lists comma-joined."""
    import jinja2

    if value is None or isinstance(value, jinja2.Undefined):
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}=({_kv(v)})" if isinstance(v, Mapping) else f"{k}={_kv(v)}"
                         for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


def identity_rows(identity: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """A model identity (classifier, generator) as readable ``(key, value)`` rows.

    Attribute specs are reduced to their class lists (``gender: male, female``): prompt templates and
    descriptions are in ``run.json`` and would bury the table.
    """
    rows = []
    for k, v in (identity or {}).items():
        if k == "attributes" and isinstance(v, Mapping):
            v = "; ".join(f"{n}: {', '.join(map(str, spec['classes']))}"
                          if isinstance(spec, Mapping) and isinstance(spec.get("classes"), list) else str(n)
                          for n, spec in v.items())
        rows.append((str(k), _kv(v)))
    return rows


# ------------------------------------------------------------------------------------------------------- templates


@functools.lru_cache(maxsize=8)
def _env(template_dir: str | None = None):
    import jinja2

    loaders = [jinja2.FileSystemLoader(template_dir)] if template_dir else []
    loaders.append(jinja2.FileSystemLoader(str(TEMPLATE_DIR)))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        # Escaping is on for everything except the Markdown and CSS templates, which escape explicitly (md filter)
        # or hold no user text; unknown extensions and string templates escape too, the safe default.
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html", "htm", "xml", "html.j2", "svg"),
            disabled_extensions=("md.j2", "md", "css", "css.j2", "txt"),
            default_for_string=True,
            default=True,
        ),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt_num, pct=fmt_pct, ci=fmt_ci, signed=fmt_signed, seeds=fmt_seeds, md=md_escape,
                       code=md_code, kv=_kv, slug=slugify)
    env.globals.update(metric_dir=metric_direction, palette=PALETTE, rd_words=debiased_words)
    return env


def debiased_words(block: Mapping[str, Any] | None, digits: int = 3) -> str:
    """The debiased RD of an attribute (or prompt) block in words, for reports: ``"debiased 0.012 [0.000, 0.077]:
    indistinguishable from balanced"`` when its interval reaches 0, ``"...: biased beyond sampling noise"``
    otherwise; ``""`` when the block has no debiased RD (e.g. confusion-corrected rows)."""
    block = block or {}
    value, ci = block.get("rd_debiased"), block.get("rd_debiased_ci")
    if value is None or not ci or None in ci:
        return ""
    verdict = "indistinguishable from balanced" if ci[0] <= 1e-12 else "biased beyond sampling noise"
    return f"debiased {fmt_num(value, digits)} {fmt_ci(ci, digits)}: {verdict}"


def render_html(template_name: str, template_dir: str | Path | None = None, **context: Any) -> str:
    """Render an HTML template with autoescaping on.

    Templates are looked up in ``template_dir`` first (for sections that ship their own), then in
    ``audit/templates``, so a section template can ``{% extends "base.html.j2" %}`` or reuse its filters
    (``num``, ``pct``, ``ci``, ``signed``, ``seeds``).

    Args:
        template_name: File name, e.g. ``"audit.html.j2"``.
        template_dir: Extra folder searched before the built-in templates.
        **context: Template variables. Strings are escaped unless wrapped in ``markupsafe.Markup``.

    Returns:
        The rendered HTML.

    Raises:
        UserError: No such template.
    """
    import jinja2

    try:
        return _env(str(template_dir) if template_dir else None).get_template(template_name).render(**context)
    except jinja2.TemplateNotFound as err:
        where = f"'{template_dir}' or '{TEMPLATE_DIR}'" if template_dir else f"'{TEMPLATE_DIR}'"
        raise UserError(f"template {err.name!r} not found in {where}; check the template name") from None


def render_markdown(template_name: str, template_dir: str | Path | None = None, **context: Any) -> str:
    """Render a Markdown template (``*.md.j2``); escape user text in it with the ``md`` filter.

    Args:
        template_name: File name, e.g. ``"audit.md.j2"``.
        template_dir: Extra folder searched before the built-in templates.
        **context: Template variables.

    Returns:
        The rendered Markdown.
    """
    return render_html(template_name, template_dir, **context)


def html_fragment(source: str, **context: Any) -> Markup:
    """Render a small inline template with autoescaping, for building :class:`Section` bodies.

    Example: ``html_fragment("<p>{{ n }} prompts, e.g. {{ p }}</p>", n=3, p=prompt)``.

    Args:
        source: Jinja2 template text.
        **context: Variables; strings are escaped.

    Returns:
        Safe HTML (``Markup``) that templates will not escape again.
    """
    return Markup(_env(None).from_string(source).render(**context))


def metric_direction(name: str) -> Markup:
    """An arrow for a metric's direction in :data:`audit.metrics.METRICS`: ``↓`` lower is better, ``↑`` higher."""
    from audit.metrics import METRICS

    info = METRICS.get(name)
    if info is None:
        return Markup("")
    arrow, word = ("↓", "lower is better") if info.lower_is_better else ("↑", "higher is better")
    return Markup('<span class="dir" title="{}">{}</span>').format(f"{word}; range {info.range}", arrow)


# ---------------------------------------------------------------------------------------------- figures and images


def style_row_axis(ax, xlabel: str, header: str):
    """House style of the one-row-per-prompt plots: light vertical grid, no frame, a bold column header at the right
    edge. Returns the (axes x, data y) transform for writing per-row values in that column."""
    import matplotlib.transforms

    ax.set_xlabel(xlabel)
    ax.xaxis.grid(True, color="#e4e7eb", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    tr = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(1.015, -0.9, header, transform=tr, ha="left", va="center", fontsize=8, color="#52606d",
            fontweight="bold")
    return tr


def figure_data_uri(fig: Any, fmt: str = "svg", dpi: int = 144) -> str:
    """Encode a matplotlib figure as a data URI (and free it).

    Build figures with ``matplotlib.figure.Figure`` directly (not pyplot): it needs no GUI backend and holds no
    global state, so reports can be written from worker threads.

    Args:
        fig: A ``matplotlib.figure.Figure``.
        fmt: ``"svg"`` (crisp at any zoom, text drawn as paths) or ``"png"``.
        dpi: Resolution for PNG.

    Returns:
        ``data:image/svg+xml;base64,...`` or ``data:image/png;base64,...``.

    Raises:
        UserError: Unknown format.
    """
    if fmt not in ("svg", "png"):
        raise UserError(f"fmt: unknown figure format {fmt!r}; use 'svg' or 'png'")
    buf = io.BytesIO()
    # No date in the metadata, so the same data gives byte-identical reports.
    meta = {"Date": None} if fmt == "svg" else {"Software": None}
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)
    fig.clear()
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def thumbnail(image: Any, size: int = THUMB_PX) -> tuple[Any, bool]:
    """Resize an image for a report grid.

    Tiny images (the lab world renders 32 px faces) are enlarged by a whole factor with nearest-neighbour, so
    every pixel stays a sharp square instead of a blur; large ones are reduced with Lanczos.

    Args:
        image: A PIL image.
        size: Target length of the longer side in pixels.

    Returns:
        ``(thumbnail, enlarged)``; ``enlarged`` is True when pixels were replicated (show with pixelated rendering).
    """
    from PIL import Image

    im = image.convert("RGB")
    side = max(im.size)
    if side * 2 <= size:
        f = size // side
        return im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST), True
    if side > size:
        scale = size / side
        return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                         Image.Resampling.LANCZOS), False
    return im, False


def image_data_uri(image: Any, fmt: str = "png", quality: int = 85) -> str:
    """Encode a PIL image as a data URI.

    Args:
        image: A PIL image.
        fmt: ``"png"`` (lossless; best for renders and enlarged pixels) or ``"jpeg"`` (photos, ~5x smaller).
        quality: JPEG quality.

    Returns:
        ``data:image/png;base64,...`` or ``data:image/jpeg;base64,...``.

    Raises:
        UserError: Unknown format.
    """
    if fmt not in ("png", "jpeg"):
        raise UserError(f"fmt: unknown image format {fmt!r}; use 'png' or 'jpeg'")
    buf = io.BytesIO()
    if fmt == "png":
        image.convert("RGB").save(buf, format="PNG", optimize=False)
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def thumbnail_uri(image: Any, size: int = THUMB_PX) -> tuple[str, bool]:
    """A grid thumbnail as a data URI: PNG when enlarged or small, JPEG when a photo was reduced.

    Args:
        image: A PIL image.
        size: Target length of the longer side in pixels.

    Returns:
        ``(uri, enlarged)``, as :func:`thumbnail`.
    """
    thumb, enlarged = thumbnail(image, size)
    reduced = max(image.size) > size
    return image_data_uri(thumb, "jpeg" if reduced else "png"), enlarged


def load_image(run_dir: Path, file: str | None) -> Any:
    """Open an image of a run folder.

    Args:
        run_dir: The run folder.
        file: Path relative to it, as in ``predictions.json``.

    Returns:
        The RGB image, or None when missing, unreadable or outside the run folder (the grid shows "missing").
    """
    from PIL import Image, UnidentifiedImageError

    if not file:
        return None
    root = Path(run_dir).resolve()
    path = (root / file).resolve()
    # predictions.json is data: a path pointing outside the run folder is not followed.
    if root != path and root not in path.parents:
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None


def image_grid_html(images: Sequence[Any], captions: Sequence[str], flags: Sequence[str | None] | None = None,
                    size: int = THUMB_PX, titles: Sequence[str] | None = None) -> Markup:
    """An HTML grid of inline thumbnails with escaped captions.

    Args:
        images: PIL images; None shows a "missing" tile.
        captions: One caption per image (plain text, escaped).
        flags: Per image, None or a CSS class marking the tile, e.g. ``"noface"`` or ``"abstain"``.
        size: Thumbnail size in pixels.
        titles: Optional hover text per image.

    Returns:
        Safe HTML.

    Raises:
        UserError: Lists of different lengths.
    """
    flags = list(flags) if flags is not None else [None] * len(images)
    titles = list(titles) if titles is not None else list(captions)
    if not len(images) == len(captions) == len(flags) == len(titles):
        raise UserError(f"captions: got {len(captions)} captions, {len(flags)} flags and {len(titles)} titles for "
                        f"{len(images)} images; pass one of each per image")
    tiles = []
    for im, cap, flag, title in zip(images, captions, flags, titles):
        if im is None:
            tiles.append({"uri": None, "caption": cap, "flag": "missing", "title": title, "px": False})
            continue
        uri, px = thumbnail_uri(im, size)
        tiles.append({"uri": uri, "caption": cap, "flag": flag, "title": title, "px": px})
    return Markup(render_html("_grid.html.j2", tiles=tiles))


# ------------------------------------------------------------------------------------------------- prompt labels


def prompt_labels(prompts: Sequence[str]) -> tuple[list[str], str | None]:
    """Short labels for plots and tables: the prompts without the text they all share.

    ``"A photo of the face of a cardiologist, a person"`` becomes ``"a cardiologist"`` when every prompt starts
    with ``"A photo of the face of "`` and ends with ``", a person"``. Cuts fall on word boundaries.

    Args:
        prompts: Prompt texts.

    Returns:
        ``(labels, template)``: one label per prompt, and the shared text as ``"prefix … suffix"`` (None when
        nothing worth removing is shared, in which case the labels are the prompts).
    """
    prompts = [str(p) for p in prompts]
    if len(set(prompts)) < 2:
        return prompts, None
    pre = os.path.commonprefix(prompts)
    if not all(len(p) == len(pre) or not p[len(pre)].isalnum() for p in prompts) or (pre and pre[-1].isalnum()):
        # Cut back to the last space so a shared "a" is not split off "an".
        cut = pre.rfind(" ")
        pre = pre[: cut + 1] if cut >= 0 else ""
    rest = [p[len(pre):] for p in prompts]
    suf = os.path.commonprefix([r[::-1] for r in rest])[::-1]
    while suf and (suf[0].isalnum() or suf[0] in "-'"):
        suf = suf[1:]
    if len(pre) + len(suf) < 8:
        return prompts, None
    labels = [r[: len(r) - len(suf)].strip() if suf else r.strip() for r in rest]
    if any(not lab for lab in labels):
        return prompts, None
    return labels, f"{pre.strip()} … {suf.strip()}".strip()


# ------------------------------------------------------------------------------------------------------- plots


def _vec(values: Sequence[Any] | None) -> list[float] | None:
    """Per-prompt shares as floats, or None when undefined (summaries store a faceless prompt as ``[None, ...]``)."""
    if values is None or any(v is None for v in values):
        return None
    return [float(v) for v in values]


def _rc() -> dict[str, Any]:
    return {
        "font.size": 8.5, "axes.edgecolor": "#9aa5b1", "axes.labelcolor": "#3e4c59", "xtick.color": "#52606d",
        "ytick.color": "#3e4c59", "axes.titlesize": 10, "axes.titleweight": "bold", "svg.fonttype": "path",
        "svg.hashsalt": "debias-report",
    }


def _rows_to_plot(order: list[int], limit: int) -> tuple[list[int | None], int]:
    """Indices to plot (None marks a gap) when there are more rows than ``limit``: the top and bottom halves."""
    if len(order) <= limit:
        return list(order), 0
    half = limit // 2
    return order[:half] + [None] + order[-half:], len(order) - 2 * half


def _row_background(ax, y: int, i: int | None) -> bool:
    """Row ``y`` of a per-prompt plot: a dotted line for the gap of omitted rows (``i`` None), else every other row
    shaded. Returns whether the row holds a prompt."""
    if i is None:
        ax.axhline(y, color="#cbd2d9", lw=0.8, ls=":")
        return False
    if y % 2 == 0:
        ax.axhspan(y - 0.5, y + 0.5, color="#f5f7fa", zorder=0, lw=0)
    return True


def shares_figure(labels: Sequence[str], shares: Sequence[Any], cis: Sequence[Any], rds: Sequence[Any],
                  classes: Sequence[str], target: Sequence[float] | None = None, title: str = "",
                  limit: int = MAX_PLOT_PROMPTS) -> tuple[Any, int]:
    """Per-prompt class shares with intervals: one row per prompt (most biased on top), one marker per class.

    Args:
        labels: Row labels (prompts).
        shares: Per row, K shares or None (no classified face).
        cis: Per row, K ``[low, high]`` intervals or None.
        rds: Per row, RD or None; rows are sorted by it, descending, undefined last.
        classes: Class names (legend).
        target: Target shares (dashed lines); uniform when None.
        title: Axes title.
        limit: Most rows drawn; beyond it the top and bottom ``limit // 2`` are shown.

    Returns:
        ``(figure, n_omitted)``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    k = len(classes)
    shares = [_vec(s) for s in shares]
    order = sorted(range(len(labels)), key=lambda i: (rds[i] is None, -(rds[i] or 0.0), labels[i]))
    rows, omitted = _rows_to_plot(order, limit)
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(8.6, 0.9 + 0.27 * len(rows)))
        ax = fig.add_subplot()
        offs = (np.arange(k) - (k - 1) / 2) * (0.66 / max(k, 2))
        target = list(target) if target is not None else [1.0 / k] * k
        if np.allclose(target, target[0]):
            ax.axvline(target[0], color="#7b8794", lw=0.9, ls="--", zorder=1)
        else:
            for j in range(k):
                ax.axvline(target[j], color=PALETTE[j % len(PALETTE)], lw=0.8, ls="--", alpha=0.6, zorder=1)
        for y, i in enumerate(rows):
            if not _row_background(ax, y, i):
                continue
            if shares[i] is None:
                ax.text(0.5, y, "no classified face", ha="center", va="center", color="#9aa5b1", fontsize=7.5)
                continue
            for j in range(k):
                s = shares[i][j]
                ci = cis[i][j] if cis[i] is not None else None
                lo, hi = (ci if ci is not None and None not in ci else (s, s))
                ax.errorbar(s, y + offs[j], xerr=[[max(s - lo, 0)], [max(hi - s, 0)]], fmt="o", ms=3.6,
                            color=PALETTE[j % len(PALETTE)], elinewidth=1.1, capsize=0, zorder=3)
        ticks = [y for y, i in enumerate(rows)]
        ticklabels = [_clip(labels[i], 48) if i is not None else f"… {omitted} prompts not shown …" for i in rows]
        ax.set_yticks(ticks, ticklabels)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(-0.01, 1.01)
        # RD of each row at the right edge, so the sort order is readable.
        tr = style_row_axis(ax, "share of classified faces (95% interval)", "RD")
        for y, i in enumerate(rows):
            if i is not None:
                ax.text(1.015, y, fmt_num(rds[i], 2), transform=tr, ha="left", va="center", fontsize=8,
                        color="#3e4c59")
        handles = [matplotlib.lines.Line2D([], [], marker="o", ls="", color=PALETTE[j % len(PALETTE)], ms=5)
                   for j in range(k)]
        ax.legend(handles, list(classes), ncol=min(k, 6), loc="lower left", bbox_to_anchor=(0, 1.0),
                  frameon=False, handletextpad=0.2, columnspacing=1.2, borderaxespad=0.3)
        if title:
            ax.set_title(title, loc="left", pad=22)
    return fig, omitted


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell_norm(dev: np.ndarray, floor: float):
    from matplotlib.colors import TwoSlopeNorm

    lim = float(np.nanmax(np.abs(dev))) if np.isfinite(dev).any() else 0.0
    # At least the largest target, so full blue always means "class absent" and small deviations stay pale.
    lim = max(lim, floor, 1e-6)
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


def _text_colour(im, value: float) -> str:
    # Dark text on pale cells, white on saturated ones, so cell labels stay readable at both ends of the scale.
    return "#1f2933" if abs(im.norm(value) - 0.5) < 0.35 else "white"


def _frame_heatmap(fig, ax, im, label: str, fraction: float, pad: float) -> None:
    """A heatmap without ticks or spines, and a borderless colour bar labelled ``label``."""
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cb = fig.colorbar(im, ax=ax, fraction=fraction, pad=pad)
    cb.set_label(label, fontsize=8)
    cb.outline.set_visible(False)


def joint_heatmap_figure(pooled: Sequence[float], rows: Sequence[str], cols: Sequence[str],
                         target: Sequence[float], title: str = "") -> Any:
    """Pooled joint shares as a rows x cols heatmap, coloured by the deviation from the target, labelled in %.

    Args:
        pooled: Joint shares in row-major order (``len(rows) * len(cols)``).
        rows: Row class names (e.g. gender).
        cols: Column class names (e.g. race).
        target: Target share per cell, same order as ``pooled``.
        title: Axes title.

    Returns:
        A matplotlib figure.
    """
    import matplotlib
    from matplotlib.figure import Figure

    p = np.asarray([np.nan if v is None else v for v in pooled], dtype=float).reshape(len(rows), len(cols))
    dev = p - np.asarray(target, dtype=float).reshape(p.shape)
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(1.2 + 1.05 * len(cols), 0.8 + 0.62 * len(rows)))
        ax = fig.add_subplot()
        im = ax.imshow(dev, cmap="RdBu_r", norm=_cell_norm(dev, float(np.max(target))), aspect="auto")
        for (r, c), v in np.ndenumerate(p):
            ax.text(c, r, fmt_pct(v, 1), ha="center", va="center", fontsize=9,
                    color=_text_colour(im, dev[r, c]))
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        _frame_heatmap(fig, ax, im, "share − target", fraction=0.05, pad=0.03)
        if title:
            ax.set_title(title, loc="left")
    return fig


def prompt_heatmap_figure(labels: Sequence[str], shares: Sequence[Any], rds: Sequence[Any], cells: Sequence[str],
                          target: Sequence[float], limit: int = MAX_PLOT_PROMPTS) -> tuple[Any, int]:
    """Per-prompt joint shares (prompts x cells), most biased prompt first, coloured by deviation from the target.

    Args:
        labels: Row labels (prompts).
        shares: Per row, the joint shares or None (no classified face).
        rds: Per row, RD or None; rows are sorted by it, descending.
        cells: Cell names, e.g. ``"female/Asian"``.
        target: Target share per cell.
        limit: Most rows drawn; beyond it the top and bottom ``limit // 2`` are shown.

    Returns:
        ``(figure, n_omitted)``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    order = sorted(range(len(labels)), key=lambda i: (rds[i] is None, -(rds[i] or 0.0), labels[i]))
    rows, omitted = _rows_to_plot(order, limit)
    k = len(cells)
    m = np.full((len(rows), k), np.nan)
    for y, i in enumerate(rows):
        if i is not None and _vec(shares[i]) is not None:
            m[y] = _vec(shares[i])
    dev = m - np.asarray(target, dtype=float)[None, :]
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(2.6 + 0.72 * k, 1.0 + 0.24 * len(rows)))
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#f5f7fa")
        im = ax.imshow(dev, cmap=cmap, norm=_cell_norm(dev, float(np.max(target))), aspect="auto",
                       interpolation="nearest")
        if len(rows) <= 60:
            for (r, c), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6.5,
                            color=_text_colour(im, dev[r, c]))
        ax.set_xticks(range(k), [c.replace("/", "\n") for c in cells])
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(rows)),
                      [_clip(labels[i], 44) if i is not None else f"… {omitted} not shown …" for i in rows])
        _frame_heatmap(fig, ax, im, "share − target (cells: % of faces)", fraction=0.04, pad=0.02)
    return fig, omitted


# ----------------------------------------------------------------------------------------------------- the report


def _check_inputs(run_dir: Any, metrics: Any, predictions: Any, extra_sections: Any) -> Path:
    if not isinstance(run_dir, (str, Path)):
        raise UserError(f"run_dir: expected a folder path, got {type(run_dir).__name__}; pass the audit's run folder")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir: '{run_dir}' is not a directory; pass the run folder written by `debias audit`")
    if not isinstance(metrics, Mapping):
        raise UserError(f"metrics: expected the dict of metrics.json, got {type(metrics).__name__}")
    for key in ("run", "attributes"):
        if not isinstance(metrics.get(key), Mapping):
            raise UserError(f"metrics: missing the '{key}' block of metrics.json; pass the dict written by "
                            "audit.run.run_audit (rerun the audit to regenerate it)")
    for name, attr in metrics["attributes"].items():
        if not isinstance(attr, Mapping) or "per_prompt" not in attr or "classes" not in attr:
            raise UserError(f"metrics: attribute {name!r} is not an audit.metrics.summarize_attribute summary "
                            "(no 'classes'/'per_prompt'); rerun the audit to regenerate metrics.json")
    if not isinstance(predictions, (list, tuple)):
        raise UserError(f"predictions: expected the list of predictions.json, got {type(predictions).__name__}")
    for i, row in enumerate(predictions):
        if not isinstance(row, Mapping) or "prompt" not in row:
            raise UserError(f"predictions[{i}]: expected a row with at least 'prompt', got {row!r:.80}; "
                            "pass the rows of predictions.json")
    for i, sec in enumerate(extra_sections):
        if not isinstance(sec, Section):
            raise UserError(f"extra_sections[{i}]: expected an audit.report.Section, got {type(sec).__name__}")
    return run_dir


def joint_parts(name: str, attributes: Mapping[str, Any]) -> tuple[str, str] | None:
    """The two attributes a joint attribute is made of (``"gender_race" -> ("gender", "race")``), else None."""
    classes = attributes[name].get("classes") or []
    for a in attributes:
        b = name[len(a) + 1:]
        if a != name and name.startswith(a + "_") and b in attributes and b != name:
            ca, cb = attributes[a].get("classes") or [], attributes[b].get("classes") or []
            if list(classes) == [f"{x}/{y}" for x in ca for y in cb]:
                return a, b
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_attr(attributes: Mapping[str, Any]) -> str | None:
    return "gender" if "gender" in attributes else next(iter(attributes), None)


def prediction_caption(row: Mapping[str, Any], attrs: Sequence[str]) -> tuple[str, str | None]:
    """Caption and flag of one image for a grid: seed and predicted classes, or 'no face' / 'abstained'.

    Args:
        row: A row of ``predictions.json``.
        attrs: Attributes whose predicted class is shown, e.g. ``["gender", "race"]``.

    Returns:
        ``(caption, flag)``; ``flag`` is None, ``"noface"`` (no face, or flagged by the safety checker) or
        ``"abstain"`` (CSS classes of the grid tile).
    """
    seed = row.get("seed")
    head = f"seed {seed}" if seed is not None else ""
    if row.get("nsfw"):
        return " · ".join(x for x in (head, "NSFW-flagged, excluded") if x), "noface"
    if not row.get("face", True):
        return " · ".join(x for x in (head, "no face") if x), "noface"
    labels = [str(row[a]) for a in attrs if row.get(a) is not None]
    if not labels:
        return " · ".join(x for x in (head, "abstained") if x), "abstain"
    return " · ".join([head] + labels if head else labels), None


def _share_bar(shares: Sequence[Any] | None, classes: Sequence[str]) -> Markup:
    """A small stacked bar of one prompt's shares, as inline HTML (widths are numbers we computed)."""
    shares = _vec(shares)
    if shares is None:
        return Markup('<span class="sbar empty"></span>')
    parts = []
    for j, (s, c) in enumerate(zip(shares, classes)):
        if s and s > 0:
            parts.append(Markup('<span style="width:{:.2f}%;background:{}" title="{}: {}"></span>').format(
                100 * s, PALETTE[j % len(PALETTE)], c, fmt_pct(s)))
    return Markup('<span class="sbar">{}</span>').format(Markup("").join(parts))


def build_context(run_dir: Path, metrics: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]],
                  extra_sections: Sequence[Section] = (), grid_images: int = GRID_IMAGES,
                  max_grid_prompts: int = MAX_GRID_PROMPTS, max_plot_prompts: int = MAX_PLOT_PROMPTS
                  ) -> dict[str, Any]:
    """Everything the audit templates show, computed once and shared by the HTML and Markdown renderings.

    Args: as :func:`write_report` (``run_dir`` already checked).

    Returns:
        The template context (plots already encoded as data URIs, image grids as safe HTML).
    """
    from audit.metrics import METRICS

    run = dict(metrics.get("run") or {})
    attributes: dict[str, Any] = dict(metrics["attributes"])
    faces = metrics.get("faces") or {}
    quality = metrics.get("quality") or None
    meta = _read_json(run_dir / "run.json") or {}
    gen = run.get("generator") or {}
    model = gen.get("model") or gen.get("source") or gen.get("backend") or "unknown model"

    # Prompt order and labels from the first attribute (all attributes share the prompt list).
    first = _first_attr(attributes)
    prompts = [pp["prompt"] for pp in attributes[first]["per_prompt"]] if first else \
        list(dict.fromkeys(r["prompt"] for r in predictions))
    labels, template = prompt_labels(prompts)
    label_of = dict(zip(prompts, labels))
    clip_pp = (quality or {}).get("per_prompt") or {}

    joints = {name: joint_parts(name, attributes) for name in attributes}
    summary, tops, share_plots, heatmaps = [], [], [], []
    for name, a in attributes.items():
        k = len(a["classes"])
        summary.append({"name": name, "label": name.replace("_", " × "), "a": a, "k": k, "corrected": False})
        if a.get("corrected"):
            summary.append({"name": name, "label": f"{name.replace('_', ' × ')} (corrected)", "a": a["corrected"],
                            "k": k, "corrected": True})
        pp = a["per_prompt"]
        defined = [p for p in pp if p.get("rd") is not None]
        ranked = sorted(defined, key=lambda p: (-p["rd"], p["prompt"]))
        # Halves, so a prompt never shows up as both most and least biased.
        n_top = min(10, max(1, len(ranked) // 2))

        def row(p):
            return {
                "prompt": p["prompt"], "label": label_of.get(p["prompt"], p["prompt"]), "rd": p["rd"],
                "n_classified": p.get("n_classified"), "n_images": p.get("n_images"),
                "no_face_rate": p.get("no_face_rate"), "shares": p.get("shares"), "cis": p.get("shares_ci"),
                "bar": _share_bar(p.get("shares"), a["classes"]), "clip": clip_pp.get(p["prompt"]),
                "major": _major(p.get("shares"), a["classes"]),
            }

        tops.append({
            "name": name, "label": name.replace("_", " × "), "classes": a["classes"],
            "most": [row(p) for p in ranked[:n_top]], "top5": [row(p) for p in ranked[:5]],
            "least": [row(p) for p in ranked[::-1][:min(n_top, len(ranked) // 2)]],
            "empty": a.get("empty_prompts") or [],
        })
        if joints[name] is None:
            fig, omitted = shares_figure([label_of.get(p["prompt"], p["prompt"]) for p in pp],
                                         [p.get("shares") for p in pp], [p.get("shares_ci") for p in pp],
                                         [p.get("rd") for p in pp], a["classes"], a.get("target"),
                                         limit=max_plot_prompts)
            share_plots.append({"name": name, "label": name.replace("_", " × "), "uri": figure_data_uri(fig),
                                "omitted": omitted, "n": len(pp)})
        else:
            ra, rb = joints[name]
            target = a.get("target") or [1.0 / k] * k
            pooled_fig = joint_heatmap_figure(a.get("shares") or [None] * k, attributes[ra]["classes"],
                                              attributes[rb]["classes"], target)
            prompt_fig, omitted = prompt_heatmap_figure(
                [label_of.get(p["prompt"], p["prompt"]) for p in pp], [p.get("shares") for p in pp],
                [p.get("rd") for p in pp], a["classes"], target, limit=max_plot_prompts)
            heatmaps.append({"name": name, "label": f"{ra} × {rb}", "pooled": figure_data_uri(pooled_fig),
                             "per_prompt": figure_data_uri(prompt_fig), "omitted": omitted, "n": len(pp)})

    # Image grids: most biased prompt (first attribute) first.
    simple_attrs = [n for n in attributes if joints[n] is None]
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for r in predictions:
        by_prompt.setdefault(r["prompt"], []).append(r)
    rd_of = {p["prompt"]: p.get("rd") for p in attributes[first]["per_prompt"]} if first else {}
    grid_prompts = sorted(by_prompt, key=lambda p: (rd_of.get(p) is None, -(rd_of.get(p) or 0.0), p))
    rd_maps = {n: {q["prompt"]: q for q in a["per_prompt"]} for n, a in attributes.items()}
    grids = []
    for p in grid_prompts[:max_grid_prompts]:
        rows = sorted(by_prompt[p], key=lambda r: (r.get("seed") is None, r.get("seed") or 0))[:grid_images]
        caps = [prediction_caption(r, simple_attrs) for r in rows]
        grids.append({
            "prompt": p, "label": label_of.get(p, p), "n_total": len(by_prompt[p]),
            "rds": [(n.replace("_", " × "), rd_maps[n].get(p, {}).get("rd")) for n in attributes],
            "html": image_grid_html([load_image(run_dir, r.get("file")) for r in rows], [c for c, _ in caps],
                                    [f for _, f in caps]),
        })

    all_prompts = []
    for p in prompts:
        q0 = rd_maps[first].get(p, {}) if first else {}
        all_prompts.append({"prompt": p, "label": label_of.get(p, p), "n_images": q0.get("n_images"),
                            "no_face_rate": q0.get("no_face_rate"),
                            "rds": [rd_maps[n].get(p, {}).get("rd") for n in attributes],
                            "clip": clip_pp.get(p)})

    now = datetime.now().astimezone()
    finished = ((meta.get("stages") or {}).get("audit") or {}).get("finished")
    finished = str(finished).replace("T", " ")[:16] if finished else None
    env = meta.get("environment") or {}
    sections = [("summary", "Summary"), ("shares", "Shares per prompt")]
    if heatmaps:
        sections.append(("intersection", "Gender × race" if any(h["label"] == "gender × race" for h in heatmaps)
                         else "Intersections"))
    sections += [("prompts", "Most / least biased"), ("images", "Images"), ("run", "Run")]
    used = {a for a, _ in sections}
    extras = []
    for sec in extra_sections:
        anchor = base = sec.anchor or slugify(sec.title)
        i = 2
        while anchor in used:
            anchor, i = f"{base}-{i}", i + 1
        used.add(anchor)
        extras.append({"anchor": anchor, "title": sec.title, "html": Markup(sec.html), "markdown": sec.markdown})
        sections.append((anchor, sec.title))
    sections.append(("metrics", "Metric definitions"))

    return {
        "title": f"Bias audit: {run.get('name') or run_dir.name}",
        "run": run, "run_name": run.get("name") or run_dir.name, "model": model, "generator": gen,
        "generated": now.strftime("%Y-%m-%d %H:%M %Z").strip(), "finished": finished,
        "faces": faces, "quality": quality, "summary": summary, "attr_names": list(attributes),
        "attr_labels": [n.replace("_", " × ") for n in attributes],
        "tops": tops, "share_plots": share_plots, "heatmaps": heatmaps, "grids": grids,
        "grid_omitted": max(0, len(grid_prompts) - max_grid_prompts), "grid_images": grid_images,
        "all_prompts": all_prompts, "template": template, "n_prompts": len(prompts),
        "n_images": run.get("n_images", len(predictions)), "environment": env, "stages": meta.get("stages") or {},
        "config": meta.get("config") or {}, "metrics_info": METRICS,
        "classifier_rows": identity_rows(run.get("classifier")), "nav": sections, "extras": extras,
        "models": ordered_models(run.get("models") or {}), "nsfw": metrics.get("nsfw") or {},
        "alpha": next((a.get("alpha") for a in attributes.values() if a.get("alpha") is not None), 0.05),
        "first_attr": first,
    }


def ordered_models(models: Mapping[str, Any]) -> dict[str, Any]:
    """The run's model records in reading order: generator, adapter, classifier, face detector, then any other."""
    order = ["generator", "adapter", "classifier", "face_detector"]
    return {k: models[k] for k in sorted(models, key=lambda k: (order.index(k) if k in order else len(order), k))}


def _major(shares: Sequence[Any] | None, classes: Sequence[str]) -> tuple[str, float] | None:
    shares = _vec(shares)
    if not shares:
        return None
    j = int(np.argmax(shares))
    return classes[j], shares[j]


def write_report(run_dir: str | Path, metrics: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]],
                 extra_sections: Sequence[Section] = (), *, grid_images: int = GRID_IMAGES,
                 max_grid_prompts: int = MAX_GRID_PROMPTS, max_plot_prompts: int = MAX_PLOT_PROMPTS) -> None:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/report.md``.

    Sections: summary table per attribute (RD with interval, KL, entropy, RB, AB, abstain and no-face rates, each
    with its direction), CLIP score; per-prompt share plots with intervals; gender x race heatmaps (pooled and per
    prompt); the most and least biased prompts; image grids per prompt with predicted classes; run metadata
    (model, guidance scale, seeds, classifier, versions, git revision); then ``extra_sections``; then the metric
    definitions. Both files are rendered completely before either is written, and each is written atomically.

    Args:
        run_dir: The run folder (image paths in ``predictions`` are relative to it; ``run.json`` is read if there).
        metrics: The dict of ``metrics.json``.
        predictions: The rows of ``predictions.json``.
        extra_sections: Sections appended after the built-in ones.
        grid_images: Images shown per prompt in the grids (the first by seed).
        max_grid_prompts: Prompts with an image grid (most biased first).
        max_plot_prompts: Rows in a per-prompt plot; beyond it the top and bottom halves are drawn.

    Raises:
        UserError: ``run_dir`` is not a folder, or ``metrics``/``predictions``/``extra_sections`` are malformed.
    """
    from audit.store import atomic_write_bytes

    run_dir = _check_inputs(run_dir, metrics, predictions, extra_sections)
    for name, v in (("grid_images", grid_images), ("max_grid_prompts", max_grid_prompts),
                    ("max_plot_prompts", max_plot_prompts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name != "max_plot_prompts" else 2):
            raise UserError(f"{name}: expected a non-negative integer (>= 2 for plots), got {v!r}")
    ctx = build_context(run_dir, metrics, predictions, extra_sections, grid_images, max_grid_prompts,
                        max_plot_prompts)
    html = render_html("audit.html.j2", **ctx)
    md = render_markdown("audit.md.j2", **ctx)
    atomic_write_bytes(run_dir / "report.html", html.encode("utf-8"))
    atomic_write_bytes(run_dir / "report.md", md.encode("utf-8"))


def write_report_from_run(run_dir: str | Path, extra_sections: Sequence[Section] = ()) -> None:
    """Re-render the report of an existing run folder from its ``metrics.json`` and ``predictions.json``.

    Args:
        run_dir: The run folder.
        extra_sections: Sections appended after the built-in ones.

    Raises:
        UserError: The folder or one of its JSON files is missing or unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir: '{run_dir}' is not a directory; pass the run folder written by `debias audit`")
    data = {}
    for fname in ("metrics.json", "predictions.json"):
        path = run_dir / fname
        if not path.is_file():
            raise UserError(f"'{path}' not found; run `debias audit --out {run_dir}` to (re)create it")
        try:
            data[fname] = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"'{path}' is not valid JSON ({err}); rerun the audit to rewrite it") from None
    write_report(run_dir, data["metrics.json"], data["predictions.json"], extra_sections)


__all__ = [
    "Section", "write_report", "write_report_from_run", "render_html", "render_markdown", "html_fragment",
    "figure_data_uri", "image_data_uri", "thumbnail", "thumbnail_uri", "image_grid_html",
    "load_image", "prompt_labels", "shares_figure", "joint_heatmap_figure", "prompt_heatmap_figure", "fmt_num",
    "fmt_pct", "fmt_ci", "fmt_signed", "fmt_seeds", "md_escape", "md_code", "metric_direction", "slugify",
    "joint_parts", "prediction_caption", "identity_rows", "ordered_models", "PALETTE", "TEMPLATE_DIR",
]
