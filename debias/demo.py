"""``debias demo``: the whole loop on the shipped lab world, offline on a CPU.

audit (before) -> locate -> synth (balanced data made by the generator itself) -> train (the default recipe) ->
audit (after, same prompts and seeds) -> compare, plus explicit-prompt adherence before and after, and the planted
truth the audit should recover. Every stage writes into its own sub-folder of ``out`` and resumes.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.adherence import explicit_adherence
from audit.metrics import rd
from audit.store import atomic_write_bytes, atomic_write_json, check_writable
from debias.config import load_config
from generators.config import to_dict
from generators.resources import configs_dir

DEMO_CONFIG = configs_dir() / "experiments" / "lab.yaml"
EXPLICIT_IMAGES = 16  # per explicit prompt (8 occupations x 6 variants): adherence to a few points
SWAP_IMAGES = 64  # per prompt and cell of the 2x2 component swap


def single_thread() -> None:
    """The lab world's models are tiny: one thread avoids OpenMP overhead that made them up to 50x slower on a
    loaded 2-core machine (measured: 64 images in 66 s with 2 threads, 1.5 s with 1)."""
    import torch

    torch.set_num_threads(1)


def planted_rd(world: dict, occupations: list[str]) -> dict[str, float]:
    """RD of the planted distributions (mean over occupations), the value a perfect audit would report."""
    g, r = [], []
    for occ in occupations:
        spec = world["occupations"][occ]
        g.append(rd([1 - spec["p_female"], spec["p_female"]]))
        r.append(rd(list(spec["race"].values())))
    return {"gender_rd": float(np.mean(g)), "race_rd": float(np.mean(r))}


def planted_shares(world: dict, occupation: str) -> dict[str, float]:
    return {"female": world["occupations"][occupation]["p_female"], **world["occupations"][occupation]["race"]}


def measured_vs_planted(metrics: dict, world: dict, occupations: list[str], template: str,
                        generator_own: dict | None = None) -> dict[str, Any]:
    """Per occupation: the audit's female share and its interval against the planted share and against the
    generator's own share (``generator_own``: the world's ``build_info.json`` block ``verify.generator_own``, a
    large sample taken as the audit takes it).

    Two different questions: ``covered_generator`` counts the intervals that contain the generator's own share,
    which is what the audit estimates (its validity: about 95% expected); ``covered`` counts those that contain the
    planted share, which also depends on how closely the tiny generator learned it (the world's ``fit``, mean
    |planted - generator-own|).
    """
    block = metrics["attributes"]["gender"]
    fem = block["classes"].index("female")
    own = (generator_own or {}).get("per_occupation") or {}
    rows = []
    for occ in occupations:
        row = next(r for r in block["per_prompt"] if r["prompt"] == template.format(occupation=occ))
        planted = world["occupations"][occ]["p_female"]
        measured, (lo, hi) = row["shares"][fem], row["shares_ci"][fem]
        generator = (own.get(occ) or {}).get("generator_p_female")
        rows.append({"occupation": occ, "planted_female": planted, "generator_female": generator,
                     "measured_female": measured, "ci": [lo, hi], "within_0.1": abs(measured - planted) <= 0.1,
                     "covered": lo <= planted <= hi,
                     "covered_generator": None if generator is None else lo <= generator <= hi})
    with_own = [r for r in rows if r["generator_female"] is not None]
    return {"per_occupation": rows, "within_0.1": sum(r["within_0.1"] for r in rows),
            "covered": sum(r["covered"] for r in rows), "n": len(rows),
            "covered_generator": sum(r["covered_generator"] for r in with_own) if with_own else None,
            "fit_mean_abs_p_female": float(np.mean([abs(r["planted_female"] - r["generator_female"])
                                                    for r in with_own])) if with_own else None,
            "generator_own_images": (generator_own or {}).get("n_per_occupation")}


def world_generator_own(world_path: str | Path | None) -> dict | None:
    """The world's generator-own shares (``build_info.json`` -> ``verify.generator_own``), None if not measured."""
    from generators.lab import world_dir

    path = world_dir(world_path) / "build_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    return (info.get("verify") or {}).get("generator_own")


def run_demo(out: str | Path, config_path: str | Path = DEMO_CONFIG, progress: bool = True,
             images_per_prompt: int | None = None, overrides: dict | None = None) -> dict[str, Any]:
    """Run the whole loop on the lab world into ``out``; returns (and writes) ``summary.json``.

    Args:
        out: The demo folder; every stage has its own sub-folder and resumes.
        config_path: The experiment config (default: the lab world's).
        progress: Progress bars.
        images_per_prompt: Shorthand for the override of the same key.
        overrides: Dotted config keys -> values (``debias demo --set``).
    """
    from audit.classify import ClipClassifier
    from audit.compare import run_compare
    from audit.run import run_audit
    from generators.lab import planted
    from debias.locate.run import run_locate
    from debias.synth import run_synth
    from debias.train.run import run_train
    from generators.backends import load_generator

    out = check_writable(out)
    config = load_config(config_path, {"images_per_prompt": images_per_prompt, **(overrides or {})})
    single_thread()
    world = planted(config.generator.model)
    occupations = config.prompts.occupation_list()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        print(f"[demo] {name} done in {timings[name]:.0f} s", flush=True)

    generator = load_generator(config.generator)
    classifier = ClipClassifier(config.classifier)
    before = run_audit(config, out / "before", progress=progress, generator=generator, classifier=classifier)
    explicit_images = min(config.max_images, EXPLICIT_IMAGES)
    adherence_before = explicit_adherence(config, out / "explicit-before", generator, classifier,
                                          explicit_images, progress)
    lap("audit before")

    # The swap needs the fine-tuned model: it runs after training, the other probes now.
    probes = copy.deepcopy(config.locate)
    probes.probes = [p for p in probes.probes if p != "swap"]
    locate = run_locate(config, probes, out / "locate", generator=generator, classifier=classifier,
                        audit_metrics=before)
    lap("locate")

    synth = run_synth(config, out / "synth", generator=generator, classifier=classifier, progress=progress)
    lap("synth")

    train = copy.deepcopy(config.train)
    train.dataset = synth["dataset"]
    adapter = run_train(train, config.generator, out / "train", classify=classifier_callable(classifier))
    lap("train")

    tuned_cfg = copy.deepcopy(config)
    tuned_cfg.generator.adapter = str(adapter)
    # LoRA merged into the weights: the same model, sampled ~1.5x faster, and the swap exchanges whole modules.
    tuned_cfg.generator.merge_adapter = True
    tuned = load_generator(tuned_cfg.generator)
    after = run_audit(tuned_cfg, out / "after", progress=progress, generator=tuned, classifier=classifier)
    adherence_after = explicit_adherence(tuned_cfg, out / "explicit-after", tuned, classifier,
                                         explicit_images, progress)
    compare = run_compare(out / "before", out / "after", out / "compare")
    lap("audit after + compare")

    swap = None
    if "swap" in config.locate.probes:
        swap_cfg = copy.deepcopy(config.locate)
        swap_cfg.probes = ["swap"]
        # Four cells of images: fewer per prompt keeps the demo within minutes (intervals say what that costs).
        swap_exp = copy.deepcopy(config)
        swap_exp.images_per_prompt = min(config.max_images, SWAP_IMAGES)
        swap = run_locate(swap_exp, swap_cfg, out / "locate-swap", generator=generator, classifier=classifier,
                          tuned=tuned, audit_metrics=before)
        lap("component swap")

    def side(metrics: dict, adherence: dict) -> dict:
        a = metrics["attributes"]
        return {**{f"{name}_{key}": a[attr][key] for name, attr in (("gender", "gender"), ("race", "race"),
                                                                      ("gender_race", "gender_race"))
                   for key in ("rd", "rd_ci", "rd_floor", "rd_debiased", "rd_debiased_ci")},
                "clip_score": (metrics.get("quality") or {}).get("clip_score"),
                "explicit_adherence": adherence}

    summary = {
        "before": side(before, adherence_before),
        "after": side(after, adherence_after),
        "planted": planted_rd(world, occupations),
        "recovery": measured_vs_planted(before, world, occupations, config.prompts.template,
                                        world_generator_own(config.generator.model)),
        "gender_rd_ratio": after["attributes"]["gender"]["rd"] / before["attributes"]["gender"]["rd"],
        "wilcoxon_gender_p": compare["attributes"]["gender"]["test"]["p_value"],
        "locate": locate_headlines(locate, swap),
        "synth": {k: synth[k] for k in ("n_rows", "acceptance_rate", "attribute")} | {
            "shortfalls": len(synth["shortfalls"])},
        "adapter": str(adapter), "method": train.method,
        "guidance_scale": before["run"]["guidance_scale"], "images_per_prompt": to_dict(config.images_per_prompt),
        "images_used": {"before": before["run"]["n_images"], "after": after["run"]["n_images"]},
        "timings_s": timings,
        # relative to the demo folder, so the folder can be moved or shared
        "reports": {"before": "before/report.html", "after": "after/report.html", "locate": "locate/locate.html",
                    "compare": "compare/compare.html", **({"swap": "locate-swap/locate.html"} if swap else {})},
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "index.html", _index_html(summary).encode())
    return summary


def locate_headlines(locate: dict, swap: dict | None) -> dict[str, Any]:
    """The numbers a reader wants from the probes: hit rates, the understanding side's answers, the swap shares."""
    res = locate["results"]
    out: dict[str, Any] = {}
    for attr, block in res.get("controlled", {}).get("attributes", {}).items():
        used = res["controlled"]["distribution_used"]
        out[f"controlled_hit_rate_{attr}"] = block["hit_rate"][used]["hit_rate"]
    for attr, block in res.get("understanding", {}).get("attributes", {}).items():
        out[f"understanding_unknown_rate_{attr}"] = block["unknown_rate"]
        out[f"understanding_rd_effective_{attr}"] = block["rd_effective"]
    for enc, block in res.get("vision", {}).get("encoders", {}).items():
        for attr, probe in block["attributes"].items():
            out[f"vision_probe_accuracy_{enc}_{attr}"] = probe["accuracy"]
    if swap:
        for attr, block in swap["results"]["swap"].get("attributes", {}).items():
            out[f"swap_language_share_{attr}"] = block.get("language_share")
    return out


def classifier_callable(classifier):
    """``images -> (N, K) gender probabilities`` for the trainers' on-policy objective and monitor."""

    def classify(images):
        return classifier.classify(images)["gender"]

    return classify


def _index_html(summary: dict) -> str:
    from audit.report import html_fragment

    return html_fragment(
        """<!doctype html><meta charset="utf-8"><title>debias demo</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:760px;margin:40px auto;color:#1f2937}
td,th{padding:4px 12px;text-align:right}th:first-child,td:first-child{text-align:left}
table{border-collapse:collapse}tr{border-bottom:1px solid #e5e7eb}</style>
<h1>debias demo: the lab world, before and after</h1>
<table><tr><th></th><th>planted</th><th>before</th><th>after</th></tr>
{% for k in ["gender_rd", "race_rd"] %}<tr><td>{{ k }} (lower is better)</td><td>{{ "%.3f"|format(s.planted[k]) }}</td>
<td>{{ "%.3f"|format(s.before[k]) }}</td><td>{{ "%.3f"|format(s.after[k]) }}</td></tr>{% endfor %}
</table>
<p>Reports: {% for name, path in s.reports.items() %}<a href="{{ path }}">{{ name }}</a> {% endfor %}</p>
<pre>{{ js }}</pre>""", s=summary, js=json.dumps(summary, indent=1, default=str))
