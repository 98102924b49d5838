"""Before/after comparison of two audits on matched prompts and seeds (``debias compare BEFORE AFTER --out DIR``).

Pairing. Images are matched on ``(prompt, seed)`` (an inner join of the two ``predictions.json``): with the same
prompts and seeds, a debiased model starts from the same noise as the base model, so per-prompt differences are
paired and far less noisy than two independent audits. Unmatched images are counted and left out.

Statistics, per attribute:

- ``rd_before`` / ``rd_after``: mean RD of each full run with its interval, as in its ``metrics.json``, and each
  run's noise floor and debiased RD (``rd_floor_*``, ``rd_debiased_*``, ``rd_debiased_ci_*``, see
  :func:`audit.metrics.debiased_rd`): raw RD near its floor is mostly sampling noise.
- ``matched``: mean RD recomputed on the matched images, over prompts with a classified face in both runs, the
  change ``after - before`` and the relative change ``(after - before) / before``.
- ``per_prompt``: hard shares of each side recomputed from the matched predictions (Wilson intervals), RD of
  each side and the RD change with a paired bootstrap interval: seeds are resampled within the prompt, the same
  resampled seeds on both sides (percentile interval re-centred on the estimate, as in :mod:`audit.metrics`).
- ``test``: :func:`audit.metrics.paired_change` over prompts (Wilcoxon signed-rank on the per-prompt RD changes,
  with a bootstrap interval of the mean change).

Joint attributes (``gender_race``) are recomputed from the two attributes' predicted classes; a face abstained on
in either attribute is unclassified in the joint one. Quality: the CLIP score per prompt on the seeds scored in
both runs, paired the same way. A run compared with itself gives exactly zero change and p-value 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from audit.report import (
    PALETTE,
    MAX_PLOT_PROMPTS,
    THUMB_PX,
    fmt_num,
    figure_data_uri,
    image_grid_html,
    joint_parts,
    load_image,
    prediction_caption,
    prompt_labels,
    render_html,
    render_markdown,
    style_row_axis,
)
from generators.config import UserError

GRID_PROMPTS = 4
GRID_IMAGES = 8


# ---------------------------------------------------------------------------------------------------------- inputs


def _load_run(path: Any, role: str) -> dict[str, Any]:
    """Read and check one run folder; every problem is a UserError naming the path and the fix."""
    if not isinstance(path, (str, Path)):
        raise UserError(f"{role}: expected a run folder path, got {type(path).__name__}; pass the folder an audit "
                        "wrote (`debias audit --out DIR`)")
    root = Path(path)
    if not root.exists():
        raise UserError(f"{role}: run folder '{root}' does not exist; pass the folder an audit wrote "
                        "(`debias audit --out DIR`)")
    if not root.is_dir():
        raise UserError(f"{role}: '{root}' is not a directory; pass the run folder an audit wrote "
                        "(`debias audit --out DIR`)")
    data: dict[str, Any] = {"root": root}
    for fname in ("metrics.json", "predictions.json"):
        fpath = root / fname
        if not fpath.is_file():
            raise UserError(f"{role}: '{fpath}' not found; '{root}' is not a finished audit: run "
                            f"`debias audit --out {root}` (it resumes an interrupted run)")
        try:
            data[fname] = json.loads(fpath.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{role}: '{fpath}' is not readable JSON ({err}); rerun `debias audit --out {root}` "
                            "to rewrite it") from None
    metrics, preds = data["metrics.json"], data["predictions.json"]
    if not isinstance(metrics, dict) or not isinstance(metrics.get("attributes"), dict):
        raise UserError(f"{role}: '{root / 'metrics.json'}' has no 'attributes' block; rerun "
                        f"`debias audit --out {root}` to rewrite it")
    for name, attr in metrics["attributes"].items():
        if not isinstance(attr, dict) or not isinstance(attr.get("classes"), list):
            raise UserError(f"{role}: '{root / 'metrics.json'}' attribute {name!r} has no class list; rerun "
                            f"`debias audit --out {root}` to rewrite it")
    if not isinstance(preds, list):
        raise UserError(f"{role}: '{root / 'predictions.json'}' must hold a list of per-image rows, got "
                        f"{type(preds).__name__}; rerun `debias audit --out {root}`")
    for i, row in enumerate(preds):
        if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("seed"), int) \
                or isinstance(row.get("seed"), bool):
            raise UserError(f"{role}: '{root / 'predictions.json'}' row {i} needs a 'prompt' and an integer 'seed', "
                            f"got {str(row)[:80]}; rerun `debias audit --out {root}`")
    meta_path = root / "run.json"
    try:
        data["run.json"] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError):
        data["run.json"] = {}
    return data


def _check_options(n_boot: Any, alpha: Any, seed: Any, grid_prompts: Any, grid_images: Any) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise UserError(f"n_boot: must be a positive integer, got {n_boot!r}; use e.g. 1000")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise UserError(f"alpha: must be in (0, 1), got {alpha!r}; use e.g. 0.05 for 95% intervals")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed: must be a non-negative integer, got {seed!r}")
    for name, v in (("grid_prompts", grid_prompts), ("grid_images", grid_images)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UserError(f"{name}: must be a non-negative integer, got {v!r}; 0 leaves the image grids out")


# ------------------------------------------------------------------------------------------------------- matching


def _index(preds: Sequence[Mapping[str, Any]]) -> tuple[dict[tuple[str, int], Mapping[str, Any]], int]:
    """Rows by (prompt, seed); the first of duplicates wins (imported image folders can repeat a seed)."""
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    dup = 0
    for row in preds:
        key = (row["prompt"], int(row["seed"]))
        if key in out:
            dup += 1
        else:
            out[key] = row
    return out, dup


def _labeler(name: str, classes: list[str], attributes: Mapping[str, Any],
             row_keys: set[str]) -> Callable[[Mapping[str, Any]], int] | None:
    """A function giving an image's class index for ``name`` (-1: no face or unclassified), or None if the
    predictions do not hold that attribute."""
    index = {c: i for i, c in enumerate(classes)}
    if name in row_keys:
        def label(row):
            return index.get(row.get(name), -1) if row.get("face", True) else -1
        return label
    parts = joint_parts(name, attributes)
    if parts and all(p in row_keys for p in parts):
        a, b = parts

        def joint(row):
            if not row.get("face", True) or row.get(a) is None or row.get(b) is None:
                return -1
            return index.get(f"{row[a]}/{row[b]}", -1)
        return joint
    return None


# ---------------------------------------------------------------------------------------------------------- stats


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(labels), k))
    ok = labels >= 0
    out[np.flatnonzero(ok), labels[ok]] = 1.0
    return out


def _prompt_change(lb: np.ndarray, la: np.ndarray, k: int, n_boot: int, alpha: float,
                   rng: np.random.Generator) -> dict[str, Any]:
    """Shares, RD and the paired-bootstrap RD change of one prompt from labels on the same seeds."""
    from audit.metrics import percentile_ci, rd, share_intervals, shares_from_counts

    ob, oa = _one_hot(lb, k), _one_hot(la, k)
    cb, ca = ob.sum(axis=0), oa.sum(axis=0)
    rd_b, rd_a = (float(rd(shares_from_counts(c))) for c in (cb, ca))
    both = math.isfinite(rd_b) and math.isfinite(rd_a)
    change = rd_a - rd_b if both else None
    ci: list[float | None] = [None, None]
    if both:
        # Resample seeds with replacement; the same resampled seeds on both sides is what makes it paired.
        idx = rng.integers(0, len(lb), size=(n_boot, len(lb)))
        row = np.arange(n_boot)[:, None] * k

        def counts(labels: np.ndarray) -> np.ndarray:
            drawn = labels[idx]
            keep = drawn >= 0  # -1: no face or unclassified
            return np.bincount((row + drawn)[keep], minlength=n_boot * k).reshape(n_boot, k).astype(float)

        d = rd(shares_from_counts(counts(la))) - rd(shares_from_counts(counts(lb)))
        lo, hi = percentile_ci(d, alpha, center=change, bounds=(-2.0 / k, 2.0 / k))
        ci = [lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None]

    def side(c, r):
        tot = c.sum()
        if not tot:
            return None, None, None
        return ((c / tot).tolist(), share_intervals(c.astype(np.int64), alpha).tolist(), r)

    sb, sb_ci, _ = side(cb, rd_b)
    sa, sa_ci, _ = side(ca, rd_a)
    return {
        "n_classified_before": int(cb.sum()), "n_classified_after": int(ca.sum()),
        "shares_before": sb, "shares_before_ci": sb_ci, "shares_after": sa, "shares_after_ci": sa_ci,
        "rd_before": rd_b if math.isfinite(rd_b) else None, "rd_after": rd_a if math.isfinite(rd_a) else None,
        "rd_change": change, "rd_change_ci": ci,
    }


def _paired(before: list[Any], after: list[Any], alpha: float, n_boot: int, seed: int) -> dict[str, Any] | None:
    from audit.metrics import paired_change

    try:
        return paired_change(before, after, alpha=alpha, n_boot=n_boot, seed=seed)
    except UserError:
        return None  # no prompt defined on both sides: reported as "no paired prompts", not a crash


def _relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _clean(x: Any) -> Any:
    """Strict JSON: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------------------------------- plots


def change_figure(labels: Sequence[str], changes: Sequence[Any], cis: Sequence[Any], befores: Sequence[Any],
                  afters: Sequence[Any], limit: int = MAX_PLOT_PROMPTS) -> tuple[Any, int]:
    """Per-prompt RD change with paired intervals, largest decrease on top (a forest plot).

    Args:
        labels: Row labels (prompts).
        changes: Per row, RD after - before, or None when undefined on one side.
        cis: Per row, ``[low, high]`` of the change, or None.
        befores: Per row, RD before (printed at the right).
        afters: Per row, RD after.
        limit: Most rows drawn.

    Returns:
        ``(figure, n_omitted)``; beyond ``limit`` rows the top and bottom halves are drawn.
    """
    import matplotlib
    from matplotlib.figure import Figure

    from audit.report import _rc, _row_background, _rows_to_plot

    order = sorted(range(len(labels)), key=lambda i: (changes[i] is None, changes[i] or 0.0, labels[i]))
    rows, omitted = _rows_to_plot(order, limit)
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(8.6, 0.9 + 0.26 * len(rows)))
        ax = fig.add_subplot()
        ax.axvline(0, color="#7b8794", lw=0.9, zorder=1)
        for y, i in enumerate(rows):
            if not _row_background(ax, y, i):
                continue
            c = changes[i]
            if c is None:
                ax.text(0, y, "undefined (no face on one side)", ha="center", va="center", color="#9aa5b1",
                        fontsize=7.5)
                continue
            lo, hi = cis[i] if cis[i] and None not in cis[i] else (c, c)
            col = "#3f7d58" if hi < 0 else "#b4534b" if lo > 0 else "#7b8794"
            ax.errorbar(c, y, xerr=[[max(c - lo, 0)], [max(hi - c, 0)]], fmt="o", ms=4, color=col,
                        elinewidth=1.2, capsize=0, zorder=3)
        ax.set_yticks(range(len(rows)), [_clip(labels[i], 48) if i is not None else
                                         f"… {omitted} prompts not shown …" for i in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        span = max([abs(v) for ci in cis if ci for v in ci if v is not None] + [0.05])
        ax.set_xlim(-1.05 * span, 1.05 * span)
        tr = style_row_axis(ax, "RD after − before (paired bootstrap interval over seeds); left = less biased",
                            "before → after")
        for y, i in enumerate(rows):
            if i is not None:
                ax.text(1.015, y, f"{fmt_num(befores[i], 2)} → {fmt_num(afters[i], 2)}", transform=tr, ha="left",
                        va="center", fontsize=8, color="#3e4c59")
    return fig, omitted


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------------------------- compare


def compare_runs(before: Mapping[str, Any], after: Mapping[str, Any], n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, Any]:
    """The comparison of two loaded runs (see the module docstring); no files are written.

    Args:
        before: ``{"root", "metrics.json", "predictions.json", "run.json"}`` of the base run.
        after: The same for the run to compare with it.
        n_boot: Bootstrap replicates (paired per-prompt intervals and the mean-change interval).
        alpha: 1 - confidence level.
        seed: Bootstrap seed.

    Returns:
        The JSON-ready result written to ``compare.json``.

    Raises:
        UserError: No (prompt, seed) pair in common, or no attribute in common.
    """
    bm, am = before["metrics.json"], after["metrics.json"]
    b_idx, b_dup = _index(before["predictions.json"])
    a_idx, a_dup = _index(after["predictions.json"])
    # Prompt order of the base run (its metrics order), so tables and plots follow the audit's prompt list.
    order: dict[str, int] = {}
    for attr in bm["attributes"].values():
        for pp in attr.get("per_prompt") or []:
            order.setdefault(pp.get("prompt"), len(order))
    for prompt, _ in b_idx:
        order.setdefault(prompt, len(order))
    matched = sorted(set(b_idx) & set(a_idx), key=lambda k: (order.get(k[0], math.inf), k[0], k[1]))
    if not matched:
        nb, na = len(b_idx), len(a_idx)
        pb, pa = len({p for p, _ in b_idx}), len({p for p, _ in a_idx})
        raise UserError(
            f"before/after: no (prompt, seed) pair appears in both runs (before: {nb} images over {pb} prompts in "
            f"'{before['root']}', after: {na} images over {pa} prompts in '{after['root']}'); compare audits of the "
            "same prompt set with the same seeds"
        )
    prompts = list(dict.fromkeys(p for p, _ in matched))
    seeds_of = {p: [s for q, s in matched if q == p] for p in prompts}

    common = [n for n in bm["attributes"] if n in am["attributes"]]
    if not common:
        raise UserError(
            f"before/after: the runs share no attribute (before: {sorted(bm['attributes'])}, after: "
            f"{sorted(am['attributes'])}); audit both with the same classifier attributes"
        )
    b_keys = set().union(*(r.keys() for r in b_idx.values()))
    a_keys = set().union(*(r.keys() for r in a_idx.values()))
    skipped: dict[str, str] = {}
    attributes: dict[str, Any] = {}
    for ai, name in enumerate(common):
        ba, aa = bm["attributes"][name], am["attributes"][name]
        classes = list(ba["classes"])
        entry: dict[str, Any] = {
            "classes": classes,
            "rd_before": ba.get("rd"), "rd_before_ci": ba.get("rd_ci"),
            "rd_after": aa.get("rd"), "rd_after_ci": aa.get("rd_ci"),
            "run_change": (aa["rd"] - ba["rd"]) if ba.get("rd") is not None and aa.get("rd") is not None else None,
            # Each run's noise floor and debiased RD (audit.metrics), so the page can say when a side is balanced.
            **{f"{key}_{side}": run.get(key) for side, run in (("before", ba), ("after", aa))
               for key in ("rd_floor", "rd_debiased", "rd_debiased_ci")},
        }
        if list(aa["classes"]) != classes:
            skipped[name] = f"classes differ (before {classes}, after {list(aa['classes'])})"
            continue
        lab_b = _labeler(name, classes, bm["attributes"], b_keys)
        lab_a = _labeler(name, classes, am["attributes"], a_keys)
        if lab_b is None or lab_a is None:
            skipped[name] = "predictions.json holds no per-image class for it"
            attributes[name] = entry
            continue
        k = len(classes)
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, ai]).spawn(len(prompts))]
        per_prompt = []
        for pi, p in enumerate(prompts):
            lb = np.array([lab_b(b_idx[(p, s)]) for s in seeds_of[p]], dtype=np.int64)
            la = np.array([lab_a(a_idx[(p, s)]) for s in seeds_of[p]], dtype=np.int64)
            per_prompt.append({"prompt": p, "n_seeds": len(seeds_of[p]),
                               **_prompt_change(lb, la, k, n_boot, alpha, rngs[pi])})
        pairs = [(q["rd_before"], q["rd_after"]) for q in per_prompt
                 if q["rd_before"] is not None and q["rd_after"] is not None]
        mb, ma = _mean([x for x, _ in pairs]), _mean([y for _, y in pairs])
        entry.update({
            "matched": {"n_prompts": len(pairs), "rd_before": mb, "rd_after": ma,
                        "change": (ma - mb) if pairs else None, "relative_change": _relative(mb, ma)},
            "test": _paired([q["rd_before"] for q in per_prompt], [q["rd_after"] for q in per_prompt], alpha,
                            n_boot, seed),
            "per_prompt": per_prompt,
        })
        attributes[name] = entry

    # Quality: CLIP score per prompt on the seeds scored in both runs.
    q_rows = []
    for p in prompts:
        pairs = [(b_idx[(p, s)].get("clip_score"), a_idx[(p, s)].get("clip_score")) for s in seeds_of[p]]
        pairs = [(x, y) for x, y in pairs if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        if pairs:
            q_rows.append({"prompt": p, "n_seeds": len(pairs), "before": float(np.mean([x for x, _ in pairs])),
                           "after": float(np.mean([y for _, y in pairs]))})
    quality = None
    if q_rows:
        for r in q_rows:
            r["change"] = r["after"] - r["before"]
        qb, qa = _mean([r["before"] for r in q_rows]), _mean([r["after"] for r in q_rows])
        quality = {"metric": "clip_score", "lower_is_better": False, "n_prompts": len(q_rows), "before": qb,
                   "after": qa, "change": qa - qb, "relative_change": _relative(qb, qa),
                   "test": _paired([r["before"] for r in q_rows], [r["after"] for r in q_rows], alpha, n_boot, seed),
                   "per_prompt": q_rows}

    nf_b = sum(not b_idx[k].get("face", True) for k in matched) / len(matched)
    nf_a = sum(not a_idx[k].get("face", True) for k in matched) / len(matched)

    def side(run: Mapping[str, Any]) -> dict[str, Any]:
        info = run["metrics.json"].get("run") or {}
        env = (run["run.json"] or {}).get("environment") or {}
        return {"path": str(run["root"]), "name": info.get("name"), "generator": info.get("generator"),
                "guidance_scale": info.get("guidance_scale"), "classifier": info.get("classifier"),
                "n_images": len(run["predictions.json"]), "git_revision": env.get("git_revision")}

    return _clean({
        "before": side(before), "after": side(after),
        "matching": {
            "n_matched": len(matched), "n_prompts": len(prompts),
            "unmatched_before": len(b_idx) - len(matched), "unmatched_after": len(a_idx) - len(matched),
            "duplicates_before": b_dup, "duplicates_after": a_dup,
            "prompts_only_before": len({p for p, _ in b_idx} - set(prompts)),
            "prompts_only_after": len({p for p, _ in a_idx} - set(prompts)),
        },
        "attributes": attributes,
        "skipped": skipped,
        "quality": quality,
        "faces": {"no_face_rate_before": nf_b, "no_face_rate_after": nf_a, "change": nf_a - nf_b,
                  "lower_is_better": True},
        "settings": {"n_boot": n_boot, "alpha": alpha, "seed": seed},
    })


def _primary(result: Mapping[str, Any]) -> str | None:
    names = [n for n, a in result["attributes"].items() if a.get("per_prompt")]
    return "gender" if "gender" in names else (names[0] if names else None)


def _render_context(result: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any],
                    grid_prompts: int, grid_images: int) -> dict[str, Any]:
    from datetime import datetime

    attrs = result["attributes"]
    prompts = list(dict.fromkeys(q["prompt"] for a in attrs.values() for q in a.get("per_prompt") or []))
    labels, template = prompt_labels(prompts) if prompts else ([], None)
    label_of = dict(zip(prompts, labels))
    plots = []
    for name, a in attrs.items():
        pp = a.get("per_prompt")
        if not pp:
            continue
        fig, omitted = change_figure([label_of.get(q["prompt"], q["prompt"]) for q in pp],
                                     [q["rd_change"] for q in pp], [q["rd_change_ci"] for q in pp],
                                     [q["rd_before"] for q in pp], [q["rd_after"] for q in pp])
        plots.append({"name": name, "label": name.replace("_", " × "), "uri": figure_data_uri(fig),
                      "omitted": omitted, "n": len(pp)})

    primary = _primary(result)
    grids = []
    if primary and grid_prompts and grid_images:
        b_idx, _ = _index(before["predictions.json"])
        a_idx, _ = _index(after["predictions.json"])
        simple = [n for n in attrs if joint_parts(n, before["metrics.json"]["attributes"]) is None]
        ranked = sorted(attrs[primary]["per_prompt"],
                        key=lambda q: (q["rd_change"] is None, -abs(q["rd_change"] or 0.0), q["prompt"]))
        matched_seeds: dict[str, list[int]] = {}
        for p, s in b_idx:
            if (p, s) in a_idx:
                matched_seeds.setdefault(p, []).append(s)
        for q in ranked[:grid_prompts]:
            seeds = sorted(matched_seeds.get(q["prompt"], []))[:grid_images]
            rows = []
            for side_name, run, idx in (("before", before, b_idx), ("after", after, a_idx)):
                recs = [idx[(q["prompt"], s)] for s in seeds]
                caps = [prediction_caption(r, simple) for r in recs]
                rows.append({"side": side_name, "html": image_grid_html(
                    [load_image(run["root"], r.get("file")) for r in recs], [c for c, _ in caps],
                    [f for _, f in caps], size=THUMB_PX)})
            grids.append({"prompt": q["prompt"], "label": label_of.get(q["prompt"], q["prompt"]), "q": q,
                          "rows": rows})

    by_attr = {name: {q["prompt"]: q for q in a.get("per_prompt") or []} for name, a in attrs.items()}
    table = [{"prompt": p, "label": label_of.get(p, p), "cells": [by_attr[n].get(p) for n in attrs]}
             for p in prompts]
    q_by = {r["prompt"]: r for r in (result["quality"] or {}).get("per_prompt") or []}
    for row in table:
        row["clip"] = q_by.get(row["prompt"])

    nav = [("summary", "Summary"), ("changes", "Per-prompt change")]
    if result["quality"]:
        nav.append(("quality", "Quality"))
    if grids:
        nav.append(("images", "Images"))
    nav += [("prompts", "All prompts"), ("runs", "Runs")]
    bg = result["before"].get("generator") or {}
    ag = result["after"].get("generator") or {}
    keys = list(dict.fromkeys(list(bg) + list(ag)))
    conf = round((1 - result["settings"]["alpha"]) * 100)
    return {
        "title": "Before / after comparison", "result": result, "attrs": attrs, "plots": plots, "grids": grids,
        "table": table, "template": template, "nav": nav, "primary": primary, "conf": conf,
        "gen_rows": [(k, bg.get(k), ag.get(k), bg.get(k) != ag.get(k)) for k in keys],
        "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
        "names": [n.replace("_", " × ") for n in attrs], "palette": PALETTE,
    }


def run_compare(before: str | Path, after: str | Path, out: str | Path, *, n_boot: int = 1000,
                alpha: float = 0.05, seed: int = 0, grid_prompts: int = GRID_PROMPTS,
                grid_images: int = GRID_IMAGES) -> dict[str, Any]:
    """Compare two audit run folders on matched prompts and seeds; write ``compare.json``, ``.html`` and ``.md``.

    Everything is checked and computed before ``out`` is created, so bad input leaves nothing behind.

    Args:
        before: Run folder of the base model (written by ``debias audit``).
        after: Run folder of the model to compare (e.g. base + debiasing adapter), same prompts and seeds.
        out: Output folder (created if missing; may be an existing folder).
        n_boot: Bootstrap replicates for the paired intervals.
        alpha: 1 - confidence level.
        seed: Bootstrap seed.
        grid_prompts: Prompts with side-by-side image rows (most changed first); 0 for none.
        grid_images: Images per row (the first matched seeds).

    Returns:
        The content of ``compare.json``: ``before``/``after`` (run info), ``matching`` (matched and unmatched
        counts), ``attributes`` (per attribute: run RDs with intervals, ``matched`` means and relative change,
        ``test`` from :func:`audit.metrics.paired_change`, ``per_prompt`` shares and RD change with paired
        intervals), ``skipped``, ``quality`` (CLIP score, paired), ``faces`` and ``settings``.

    Raises:
        UserError: A run folder or its metrics.json/predictions.json is missing or malformed, ``out`` is not a
            writable folder, an option is out of range, or the runs share no (prompt, seed) or attribute.
    """
    from audit.store import atomic_write_bytes, check_writable

    b = _load_run(before, "before")
    a = _load_run(after, "after")
    if not isinstance(out, (str, Path)):
        raise UserError(f"--out: expected a folder path, got {type(out).__name__}; e.g. --out runs/compare")
    out = check_writable(out)
    _check_options(n_boot, alpha, seed, grid_prompts, grid_images)
    result = compare_runs(b, a, n_boot=n_boot, alpha=alpha, seed=seed)
    ctx = _render_context(result, b, a, grid_prompts, grid_images)
    html = render_html("compare.html.j2", **ctx)
    md = render_markdown("compare.md.j2", **ctx)
    body = json.dumps(result, indent=1, allow_nan=False) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "compare.json", body.encode())
    atomic_write_bytes(out / "compare.html", html.encode("utf-8"))
    atomic_write_bytes(out / "compare.md", md.encode("utf-8"))
    return result


__all__ = ["run_compare", "compare_runs", "change_figure"]
