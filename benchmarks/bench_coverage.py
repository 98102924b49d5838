"""Coverage of every interval the toolkit reports, on simulated audits whose truth is known.

Each cell simulates ``reps`` audits: ``prompts`` prompts whose true class shares are drawn from a scenario
(``balanced``: every prompt uniform; ``skewed``: Dirichlet(0.5) per prompt; ``mixed``: half balanced, half
skewed; ``slight``: uniform shares moved by up to +-25% of 1/K; ``janus``: two classes, the minority share
~ Beta(1, 19), mean gender RD 0.90 like the paper's Janus-Pro results), ``images`` images per prompt, labelled
either exactly or through a classifier that confuses classes (90% correct, errors spread evenly) and abstains on
10% of faces. The toolkit's own code computes every interval (``audit.metrics.summarize_attribute``,
``audit.compare``'s paired per-prompt bootstrap, ``audit.metrics.paired_change``, the image plans of
``audit.sequential``), and the benchmark counts how often it contains its estimand:

- per-prompt shares (Wilson, Jeffreys): the share of the classifier's labels (= the true share without confusion);
- corrected shares: the true share (confusion matrix known exactly);
- per-prompt ``rd_debiased_ci``: that prompt's RD of the label distribution;
- mean ``rd_ci``, ``kl_ci``, ``entropy_ci``: the population mean of the expected plug-in value at the audit's image
  counts (raw RD includes its noise floor), by Monte Carlo over 100,000 prompts;
- ``rb_ci``, ``ab_ci``: the expected plug-in value of an audit of this design (Monte Carlo over 2,000 audits);
- aggregate ``rd_debiased_ci``: the population mean of the true RD;
- paired change: per prompt (``rd_change_ci``) the change of the expected RD at the prompt's image count (exact),
  and the mean-change interval of the test, its population mean;
- image plans: the per-prompt share intervals at the stopping look (true share), mean ``rd_ci`` (expected plug-in
  RD under the plan, Monte Carlo) and ``rd_debiased_ci`` (true RD); with the images used and the worst per-prompt
  half-width next to those of a fixed 160 images.

Also a floor table: the exact ``rd_floor`` against a Monte-Carlo estimate, and the bias of raw and debiased RD for
balanced, slightly skewed and skewed truths.

Run: ``python -m benchmarks.bench_coverage [--fast] [--reps 400] [--markdown PATH]``. Prints one JSON object
(``rows``: one per cell and interval, with ``coverage``, ``width`` and ``n``); ``--markdown`` also writes the
tables. ``--fast`` runs a few cells with few replicates (what the test runs). Nominal 95% should land in 93-97%;
the rows outside it are explained in the project notes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from audit import metrics as M
from audit import sequential as S
from audit.compare import _prompt_change

ALPHA = 0.05
SCENARIOS = ("balanced", "skewed", "mixed", "slight", "janus")


# ----------------------------------------------------------------------------------------------------- the world


FAST = ["--fast", "--reps", "6"]  # a few cells, few replicates: checks the code paths, measures nothing

def truths(rng: np.random.Generator, scenario: str, k: int, size: int) -> np.ndarray:
    """True class shares of ``size`` prompts, shape (size, K)."""
    uniform = np.full((size, k), 1.0 / k)
    if scenario == "balanced":
        return uniform
    if scenario == "skewed":
        return rng.dirichlet(np.full(k, 0.5), size=size)
    if scenario == "mixed":
        return np.where(rng.random((size, 1)) < 0.5, uniform, rng.dirichlet(np.full(k, 0.5), size=size))
    if scenario == "slight":
        p = uniform * (1 + rng.uniform(-0.25, 0.25, size=(size, k)))
        return p / p.sum(axis=1, keepdims=True)
    if scenario == "janus":
        if k != 2:
            raise ValueError("the janus scenario has two classes")
        minority = rng.beta(1, 19, size=size)
        female = np.where(rng.random(size) < 0.5, minority, 1 - minority)
        return np.stack([1 - female, female], axis=1)
    raise ValueError(f"unknown scenario {scenario!r}; use one of {SCENARIOS}")


def confusion(k: int, accuracy: float = 0.9) -> np.ndarray:
    return np.full((k, k), (1 - accuracy) / (k - 1)) + np.eye(k) * (accuracy - (1 - accuracy) / (k - 1))


def label_shares(p: np.ndarray, classifier: str) -> np.ndarray:
    """The distribution of the classifier's labels: ``C^T p`` with confusion, ``p`` for an exact classifier."""
    return p @ confusion(p.shape[-1]) if classifier == "confusion" else p


def classified(rng: np.random.Generator, images: int, size: Any, classifier: str) -> np.ndarray:
    """Classified faces per prompt: all images, or Binomial(images, 0.9) when the classifier abstains on 10%."""
    return rng.binomial(images, 0.9, size=size) if classifier == "confusion" else np.full(size, images)


def draw_counts(rng: np.random.Generator, q: np.ndarray, n: np.ndarray) -> np.ndarray:
    return np.stack([rng.multinomial(m, p) for m, p in zip(n, q)]) if len(q) < 2000 else rng.multinomial(n, q)


def summarize(counts: np.ndarray, images: int, n_boot: int, seed: int, interval: str = "wilson",
              confusion_matrix: np.ndarray | None = None, share_alpha: float | None = None,
              debiased_shift=None) -> dict:
    k = counts.shape[1]
    labels = [np.repeat(np.arange(k), c) for c in counts]
    return M.summarize_attribute([f"p{i}" for i in range(len(counts))], labels, None, [f"c{i}" for i in range(k)],
                                 [max(images, len(lab)) for lab in labels],
                                 [max(0, images - len(lab)) for lab in labels], confusion=confusion_matrix,
                                 alpha=ALPHA, n_boot=n_boot, seed=seed, interval=interval, share_alpha=share_alpha,
                                 debiased_shift=debiased_shift)


def _inside(lo, hi, truth) -> np.ndarray:
    lo, hi, truth = (np.asarray(x, dtype=float) for x in (lo, hi, truth))
    return (lo <= truth + 1e-12) & (truth <= hi + 1e-12)


class Tally:
    """Coverage counts per interval name."""

    def __init__(self):
        self.hit: dict[str, list[float]] = {}
        self.width: dict[str, list[float]] = {}

    def add(self, name: str, lo, hi, truth) -> None:
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        truth = np.broadcast_to(np.asarray(truth, dtype=float), lo.shape).ravel()
        lo, hi = lo.ravel(), hi.ravel()
        ok = np.isfinite(lo) & np.isfinite(hi)
        self.hit.setdefault(name, []).extend(_inside(lo[ok], hi[ok], truth[ok]).tolist())
        self.width.setdefault(name, []).extend((hi[ok] - lo[ok]).tolist())

    def rows(self, **cell) -> list[dict]:
        return [{**cell, "interval": name, "coverage": float(np.mean(h)) if h else None,
                 "width": float(np.mean(self.width[name])) if h else None, "n": len(h)}
                for name, h in self.hit.items()]


# ---------------------------------------------------------------------------------------------------- estimands


def population(rng: np.random.Generator, scenario: str, k: int, images: int, classifier: str,
               size: int = 100_000) -> dict[str, float]:
    """Population means over prompts of the expected plug-in metrics at this design, and of the true RD."""
    q = label_shares(truths(rng, scenario, k, size), classifier)
    n = classified(rng, images, size, classifier)
    c = rng.multinomial(n, q)
    keep = n > 0
    s = c[keep] / n[keep, None]
    t = np.full(k, 1.0 / k)
    return {"rd": float(M._rd(s).mean()), "kl": float(M.kl(s, t).mean()), "entropy": float(M.entropy(s).mean()),
            "rd_true": float(M._rd(q).mean())}


def design_pooled(rng: np.random.Generator, scenario: str, k: int, images: int, prompts: int, classifier: str,
                  audits: int = 2000) -> dict[str, float]:
    """Expected rb and ab of an audit of this design (they depend on the number of prompts)."""
    rb, ab = [], []
    t = np.full(k, 1.0 / k)
    for _ in range(audits):
        q = label_shares(truths(rng, scenario, k, prompts), classifier)
        c = draw_counts(rng, q, classified(rng, images, prompts, classifier))
        c = c[c.sum(axis=1) > 0]
        s = c / c.sum(axis=1, keepdims=True)
        pooled = c.sum(axis=0) / c.sum()
        rb.append(np.abs(pooled - t).max())
        ab.append(np.abs(s - pooled).max())
    return {"rb": float(np.mean(rb)), "ab": float(np.mean(ab))}


# -------------------------------------------------------------------------------------------------------- cells


def fixed_cell(k: int, scenario: str, images: int, prompts: int, classifier: str, reps: int, n_boot: int,
               seed: int) -> list[dict]:
    """Coverage of every interval of a fixed-count audit."""
    rng = np.random.default_rng([seed, k, images, prompts, SCENARIOS.index(scenario), classifier == "confusion"])
    pop = population(rng, scenario, k, images, classifier)
    pooled = design_pooled(rng, scenario, k, images, prompts, classifier, audits=2000 if reps > 50 else 200)
    conf = confusion(k) if classifier == "confusion" else None
    tally = Tally()
    for rep in range(reps):
        p = truths(rng, scenario, k, prompts)
        q = label_shares(p, classifier)
        counts = draw_counts(rng, q, classified(rng, images, prompts, classifier))
        for interval in ("wilson", "jeffreys"):
            s = summarize(counts, images, n_boot if interval == "wilson" else 1, rep, interval, conf)
            ci = np.array([row["shares_ci"] if row["shares_ci"] is not None else [[np.nan, np.nan]] * k
                           for row in s["per_prompt"]], dtype=float)
            tally.add(f"share ({interval})", ci[..., 0], ci[..., 1], q)
            if interval == "jeffreys":
                continue
            if conf is not None:
                cc = np.array(s["corrected"]["per_prompt_shares_ci"], dtype=float)
                tally.add("corrected share", cc[..., 0], cc[..., 1], p)
            dci = np.array([r["rd_debiased_ci"] or [np.nan, np.nan] for r in s["per_prompt"]], dtype=float)
            tally.add("prompt rd_debiased_ci", dci[:, 0], dci[:, 1], M._rd(q))
            for m in ("rd", "kl", "entropy"):
                tally.add(f"mean {m}_ci", *s[f"{m}_ci"], pop[m])
            for m in ("rb", "ab"):
                tally.add(f"{m}_ci", *s[f"{m}_ci"], pooled[m])
            tally.add("mean rd_debiased_ci", *s["rd_debiased_ci"], pop["rd_true"])
    return tally.rows(kind="fixed", k=k, scenario=scenario, images=images, prompts=prompts, classifier=classifier)


def paired_cell(images: int, prompts: int, reps: int, n_boot: int, seed: int, fix: float = 0.3,
                same_seed: float = 0.8) -> list[dict]:
    """Before/after on the same seeds (K = 2, skewed before; after = 30% of the way from balanced to before).

    Paired images: an image's label after equals its label before when both come from the same uniform draw, which
    happens with probability ``same_seed`` (the same seed gives a similar image); otherwise it is redrawn.
    """
    rng = np.random.default_rng([seed, images, prompts, 7])
    k = 2

    def pair(size):
        before = truths(rng, "skewed", k, size)
        return before, fix * before + (1 - fix) / k

    b, a = pair(200_000)
    cb, ca = rng.multinomial(images, b), rng.multinomial(images, a)
    truth_mean = float((M._rd(ca / images) - M._rd(cb / images)).mean())
    tally = Tally()
    for rep in range(reps):
        pb, pa = pair(prompts)
        u = rng.random((prompts, images))
        u2 = np.where(rng.random((prompts, images)) < same_seed, u, rng.random((prompts, images)))
        lb = (u > pb[:, :1]).astype(np.int64)  # class 1 when u exceeds the class-0 share
        la = (u2 > pa[:, :1]).astype(np.int64)
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(rep).spawn(prompts)]
        rows = [_prompt_change(lb[i], la[i], k, n_boot, ALPHA, rngs[i]) for i in range(prompts)]
        truth = [float(M.expected_rd(images, pa[i]) - M.expected_rd(images, pb[i])) for i in range(prompts)]
        ci = np.array([r["rd_change_ci"] for r in rows], dtype=float)
        tally.add("prompt rd_change_ci (paired seeds)", ci[:, 0], ci[:, 1], truth)
        test = M.paired_change([r["rd_before"] for r in rows], [r["rd_after"] for r in rows], ALPHA, n_boot, rep)
        tally.add("mean change ci (paired test)", *test["ci"], truth_mean)
    return tally.rows(kind="paired", k=k, scenario="skewed -> 30%", images=images, prompts=prompts,
                      classifier="exact")


def adaptive_audit(rng: np.random.Generator, p: np.ndarray, plan_looks: tuple[int, ...], target: float,
                   share_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One adaptive audit of prompts with true shares ``p`` (K = 2): counts at the stopping look and images used."""
    looks = np.array(plan_looks)
    draws = (rng.random((len(p), looks[-1])) < p[:, 1:2]).cumsum(axis=1)  # class-1 count after each image
    ones = draws[:, looks - 1]
    counts = np.stack([looks[None, :] - ones, ones], axis=-1)  # (R, looks, 2)
    hw = S.halfwidth(counts.reshape(-1, 2), share_alpha, "wilson").reshape(len(p), len(looks))
    stop = hw <= target + 1e-12
    stop[:, -1] = True
    at = stop.argmax(axis=1)
    return counts[np.arange(len(p)), at], looks[at]


def adaptive_cell(scenario: str, prompts: int, reps: int, n_boot: int, seed: int, minimum: int = 32,
                  maximum: int = 320, block: int = 16, target: float | None = None) -> list[dict]:
    """An image plan on K = 2. ``target`` None: each replicate's target is the worst per-prompt half-width a fixed
    160 images gives on the same prompts (the acceptance comparison)."""
    rng = np.random.default_rng([seed, prompts, SCENARIOS.index(scenario), 11])
    plan_looks = tuple(S.looks(minimum, maximum, block))
    # Estimands: the population's true RD, and for a fixed target the expected plug-in RD with the plan's
    # data-dependent counts (what raw RD's interval is about).
    big = truths(rng, scenario, 2, 20_000)
    truth_true = float(M._rd(big).mean())
    if target is not None:
        c_big, _ = adaptive_audit(rng, big, plan_looks, target, S.calibrated_alpha(plan_looks, target, ALPHA, "wilson"))
        truth_rd = float(M._rd(c_big / c_big.sum(axis=1, keepdims=True)).mean())
    tally = Tally()
    used, fixed_images, reached = [], [], []
    for rep in range(reps):
        p = truths(rng, scenario, 2, prompts)
        if target is None:
            k160 = rng.binomial(160, p[:, 1])
            worst160 = float(S.halfwidth(np.stack([160 - k160, k160], axis=1), ALPHA, "wilson").max())
            tgt = round(worst160, 3)
        else:
            tgt, worst160 = target, None
        share_alpha = S.calibrated_alpha(plan_looks, tgt, ALPHA, "wilson")
        counts, n = adaptive_audit(rng, p, plan_looks, tgt, share_alpha)
        used.append(int(n.sum()))
        fixed_images.append(160 * prompts)
        ci = M.share_intervals(counts, share_alpha, "wilson")
        tally.add("plan share (wilson, at stop)", ci[..., 0], ci[..., 1], p)
        worst = float(((ci[..., 1] - ci[..., 0]) / 2).max())
        if worst160 is not None:
            reached.append(worst <= worst160 + 1e-3)  # the target was rounded to 0.001
        s = summarize(counts, 0, n_boot, rep, share_alpha=share_alpha,
                      debiased_shift=S.stopping_bias(plan_looks, tgt, share_alpha))
        if target is not None:  # the estimand of raw RD depends on the plan: only for a fixed target
            tally.add("plan mean rd_ci", *s["rd_ci"], truth_rd)
        tally.add("plan mean rd_debiased_ci", *s["rd_debiased_ci"], truth_true)
    extra = {"images_used": float(np.mean(used)), "images_fixed_160": float(np.mean(fixed_images)),
             "saving": 1 - float(np.mean(used)) / float(np.mean(fixed_images)),
             "reached_fixed_160_worst_halfwidth": float(np.mean(reached)) if reached else None,
             "target": target if target is not None else "worst half-width of a fixed 160"}
    return [r | extra for r in tally.rows(kind="adaptive", k=2, scenario=scenario, images=f"{minimum}..{maximum}",
                                          prompts=prompts, classifier="exact")]


# ------------------------------------------------------------------------------------------------------ floor


def floor_table(mc: int, seed: int) -> list[dict]:
    """Exact floor vs Monte Carlo, and the bias of raw and debiased RD, per K and image count."""
    rng = np.random.default_rng(seed)
    skews = {2: [0.9, 0.1], 4: [0.7, 0.1, 0.1, 0.1], 8: [0.51] + [0.07] * 7}
    slight = {2: [0.55, 0.45], 4: [0.3, 0.25, 0.25, 0.2], 8: [0.15, 0.14, 0.13, 0.12, 0.12, 0.12, 0.11, 0.11]}
    rows = []
    for k in (2, 4, 8):
        for n in (32, 64, 160, 640):
            u = np.full(k, 1.0 / k)
            cu = rng.multinomial(n, u, size=mc)
            row = {"k": k, "images": n, "rd_floor": float(M.expected_rd(n, u)),
                   "rd_floor_monte_carlo": float(M._rd(cu / n).mean())}
            row["floor_abs_diff"] = abs(row["rd_floor"] - row["rd_floor_monte_carlo"])
            for name, p in (("balanced", u), ("slight", np.array(slight[k])), ("skewed", np.array(skews[k]))):
                c = cu if name == "balanced" else rng.multinomial(n, p, size=mc)
                true = float(M._rd(p))
                row[f"{name}_true_rd"] = true
                row[f"{name}_raw_bias"] = float(M._rd(c / n).mean()) - true
                row[f"{name}_debiased_bias"] = float(M.debiased_rd(c).mean()) - true
                row[f"{name}_debiased_sd"] = float(M.debiased_rd(c).std())
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------- grids


def grid(fast: bool) -> dict[str, list[tuple]]:
    if fast:
        return {"fixed": [(2, "balanced", 160, 8, "exact"), (4, "mixed", 32, 8, "confusion")],
                "paired": [(160, 8)], "adaptive": [("janus", 8, None)]}
    fixed = [(k, sc, n, r, "exact") for k in (2, 4, 8) for sc in ("balanced", "skewed", "mixed")
             for n in (32, 160, 640) for r in (8, 50)]
    fixed += [(k, sc, 160, 50, "confusion") for k in (2, 4, 8) for sc in ("balanced", "skewed", "mixed")]
    fixed += [(k, "slight", 160, r, "exact") for k in (2, 4, 8) for r in (8, 50)]
    return {"fixed": fixed, "paired": [(n, r) for n in (32, 160, 640) for r in (8, 50)],
            "adaptive": [("janus", 50, None), ("janus", 50, 0.05), ("skewed", 50, 0.05), ("mixed", 50, 0.05),
                         ("balanced", 50, 0.05)]}


def markdown(result: dict) -> str:
    lines = [f"Coverage of nominal {100 * (1 - ALPHA):.0f}% intervals ({result['reps']} simulated audits per cell; "
             "per-prompt rows pool prompts and classes).", "",
             "| kind | K | scenario | images | prompts | classifier | interval | coverage | mean width | n |",
             "|---|--:|---|--:|--:|---|---|--:|--:|--:|"]
    for r in result["rows"]:
        cov = f"{100 * r['coverage']:.1f}%" if r["coverage"] is not None else "—"
        flag = "" if r["coverage"] is None or 0.93 <= r["coverage"] <= 0.97 else " *"
        lines.append(f"| {r['kind']} | {r['k']} | {r['scenario']} | {r['images']} | {r['prompts']} | "
                     f"{r['classifier']} | {r['interval']} | {cov}{flag} | {r['width']:.3f} | {r['n']} |")
    lines += ["", "\\* outside 93-97%.", "", "Image plans (K = 2, 50 prompts, min 32, max 320, block 16):", "",
              "| scenario | target | images used | fixed 160 | saving | reached fixed-160 worst half-width |",
              "|---|---|--:|--:|--:|--:|"]
    seen = set()
    for r in result["rows"]:
        if r["kind"] == "adaptive" and (r["scenario"], str(r["target"])) not in seen:
            seen.add((r["scenario"], str(r["target"])))
            reached = f"{100 * r['reached_fixed_160_worst_halfwidth']:.0f}%" \
                if r["reached_fixed_160_worst_halfwidth"] is not None else "—"
            lines.append(f"| {r['scenario']} | {r['target']} | {r['images_used']:.0f} | {r['images_fixed_160']:.0f} | "
                         f"{100 * r['saving']:.0f}% | {reached} |")
    lines += ["", "Noise floor and bias of RD (Monte Carlo with "
              f"{result['floor_mc']} audits of one prompt):", "",
              "| K | images | rd_floor (exact) | Monte Carlo | balanced: raw bias / debiased bias | slight: true, raw / "
              "debiased bias | skewed: true, raw / debiased bias |", "|--:|--:|--:|--:|--:|--:|--:|"]
    for f in result["floor"]:
        lines.append(f"| {f['k']} | {f['images']} | {f['rd_floor']:.4f} | {f['rd_floor_monte_carlo']:.4f} | "
                     f"{f['balanced_raw_bias']:+.4f} / {f['balanced_debiased_bias']:+.4f} | "
                     f"{f['slight_true_rd']:.3f}: {f['slight_raw_bias']:+.4f} / {f['slight_debiased_bias']:+.4f} | "
                     f"{f['skewed_true_rd']:.3f}: {f['skewed_raw_bias']:+.4f} / {f['skewed_debiased_bias']:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="a few cells with few replicates (the test's mode)")
    ap.add_argument("--reps", type=int, default=None, help="simulated audits per cell (default 400; fast 20)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--parts", nargs="*", default=["fixed", "paired", "adaptive"],
                    help="which cell groups to run (the floor table always runs)")
    args = ap.parse_args(argv)
    reps = args.reps or (20 if args.fast else 400)
    n_boot = min(args.n_boot, 200) if args.fast else args.n_boot
    t0 = time.perf_counter()
    g = {part: cells if part in args.parts else [] for part, cells in grid(args.fast).items()}
    rows: list[dict] = []
    for cell in g["fixed"]:
        rows += fixed_cell(*cell, reps=reps, n_boot=n_boot, seed=args.seed)
        print(f"[coverage] fixed {cell} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for images, prompts in g["paired"]:
        rows += paired_cell(images, prompts, reps, n_boot, args.seed)
    for scenario, prompts, target in g["adaptive"]:
        rows += adaptive_cell(scenario, prompts, reps, n_boot, args.seed, target=target)
        print(f"[coverage] adaptive {scenario} {target} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    floor_mc = 20_000 if args.fast else 200_000
    result = {"benchmark": "coverage", "fast": args.fast, "reps": reps, "n_boot": n_boot, "alpha": ALPHA,
              "cpus": os.cpu_count(), "seconds": None, "rows": rows, "floor_mc": floor_mc,
              "floor": floor_table(floor_mc, args.seed)}
    inside = [r for r in rows if r["coverage"] is not None]
    result["in_93_97"] = sum(0.93 <= r["coverage"] <= 0.97 for r in inside)
    result["n_rows"] = len(inside)
    result["max_floor_abs_diff"] = max(f["floor_abs_diff"] for f in result["floor"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
