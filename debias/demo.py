"""``debias demo``: the whole loop on a shipped lab world, offline on a CPU.

audit (before) -> locate -> synth (balanced data made by the generator itself) -> train (the default recipe) ->
audit (after, same prompts and seeds) -> compare, plus explicit-prompt adherence before and after, and the planted
truth the audit should recover. Every stage writes into its own sub-folder of ``out`` and resumes; ``out/model`` is
the fixed model as it would be shared (adapter + model card), ``out/index.html`` the page to open first.

Two worlds share the renders, captions and planted skew (``configs/lab/world.yaml``): ``janus`` (a tiny unified
model; the default) and ``diffusion`` (a tiny Stable Diffusion pipeline). The locate probes read a unified model's
language and vision sides, so the diffusion world's demo has no locate stage.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from audit.adherence import explicit_adherence
from audit.metrics import rd
from audit.store import atomic_write_bytes, atomic_write_json, check_writable
from debias.config import load_config
from generators.config import UserError, to_dict
from generators.errors import did_you_mean
from generators.resources import configs_dir

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEMO_CONFIG = configs_dir() / "experiments" / "lab.yaml"
# world name -> its experiment config; ``debias demo --world`` and ``debias methods --world`` take these names.
WORLDS = {"janus": DEMO_CONFIG, "diffusion": configs_dir() / "experiments" / "lab-sd.yaml"}
UNIFIED_WORLDS = {"janus"}  # unified-model worlds: the locate probes read them; the builder measured their own shares
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


def world_config(world: str) -> Path:
    """The experiment config of a lab world, by name (``janus`` or ``diffusion``)."""
    if world not in WORLDS:
        raise UserError(f"--world: unknown world {world!r}{did_you_mean(world, WORLDS)}; use one of {list(WORLDS)}")
    return WORLDS[world]


def run_demo(out: str | Path, config_path: str | Path | None = None, progress: bool = True,
             images_per_prompt: int | None = None, overrides: dict | None = None,
             world: str = "janus") -> dict[str, Any]:
    """Run the whole loop on a lab world into ``out``; returns (and writes) ``summary.json``.

    Args:
        out: The demo folder; every stage has its own sub-folder and resumes.
        config_path: The experiment config (default: the world's, :data:`WORLDS`).
        progress: Progress bars.
        images_per_prompt: Shorthand for the override of the same key.
        overrides: Dotted config keys -> values (``debias demo --set``).
        world: ``janus`` or ``diffusion``; only ``janus`` runs the locate probes.
    """
    from audit.classify import ClipClassifier
    from audit.compare import run_compare
    from audit.run import run_audit
    from generators.lab import planted
    from debias.locate.run import check_locate, run_locate
    from debias.share import write_model_card
    from debias.synth import check_synth, run_synth
    from generators.backends import load_generator

    config_path = config_path or world_config(world)
    unified = world in UNIFIED_WORLDS
    out = check_writable(out)
    config = load_config(config_path, {"images_per_prompt": images_per_prompt, **(overrides or {})})
    # Every stage's input before the first model loads (the swap's tuned model comes from training).
    config.check()
    check_synth(config)
    if unified:
        check_locate(config, replace(config.locate, probes=[p for p in config.locate.probes if p != "swap"]))
    single_thread()
    truth = planted(config.generator.model)
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

    locate = None
    if unified:
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
    adapter = train_fix(train, config.generator, out / "train", classifier)
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
    # The fixed model as it would be shared: the adapter with a model card holding the before / after audit.
    write_model_card(adapter, out / "model", out / "before", out / "after", compare=out / "compare",
                     name=f"lab-world ({world}) debiased (demo)")
    lap("audit after + compare")

    swap = None
    if unified and "swap" in config.locate.probes:
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
        "planted": planted_rd(truth, occupations),
        "recovery": measured_vs_planted(before, truth, occupations, config.prompts.template,
                                        world_generator_own(config.generator.model) if unified else None),
        "gender_rd_ratio": after["attributes"]["gender"]["rd"] / before["attributes"]["gender"]["rd"],
        "wilcoxon_gender_p": compare["attributes"]["gender"]["test"]["p_value"],
        "world": world,
        "locate": locate_headlines(locate, swap) if locate else {},
        "synth": {k: synth[k] for k in ("n_rows", "acceptance_rate", "attribute")} | {
            "shortfalls": len(synth["shortfalls"])},
        "adapter": str(adapter), "method": train.method,
        "guidance_scale": before["run"]["guidance_scale"], "images_per_prompt": to_dict(config.images_per_prompt),
        "images_used": {"before": before["run"]["n_images"], "after": after["run"]["n_images"]},
        "timings_s": timings,
        # relative to the demo folder, so the folder can be moved or shared
        "reports": {"before": "before/report.html", **({"locate": "locate/locate.html"} if locate else {}),
                    "after": "after/report.html", "compare": "compare/compare.html",
                    **({"swap": "locate-swap/locate.html"} if swap else {}), "model": "model/README.md"},
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "index.html", index_html(summary).encode())
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


def train_fix(train, generator_config, out: Path, classifier) -> Path:
    """Train ``train.method`` with the trainer of the generator's kind (diffusion stages or the TRL trainers)."""
    from debias.train.diffusion_stages import is_diffusion, run_diffusion_stages
    from debias.train.run import run_train

    if is_diffusion(generator_config):
        return run_diffusion_stages(train, generator_config, out, classifier)
    return run_train(train, generator_config, out, classify=classifier_callable(classifier))


def classifier_callable(classifier):
    """``images -> (N, K) gender probabilities`` for the trainers' on-policy objective and monitor."""

    def classify(images):
        return classifier.classify(images)["gender"]

    return classify


REPORT_LABELS = {
    "before": ("Audit before the fix", "shares per prompt, intervals, images, the classifier's bias card"),
    "locate": ("Locate", "understanding, vision and controlled-generation probes"),
    "after": ("Audit after the fix", "same prompts and seeds"),
    "compare": ("Before / after comparison", "paired per-prompt changes, Wilcoxon test, side-by-side images"),
    "swap": ("Component swap", "which part of the fine-tuned model carries the change"),
    "model": ("The fixed model to share", "LoRA adapter folder with its model card (README.md)"),
}


def locate_sentences(headlines: dict[str, Any]) -> list[str]:
    """The locate probes' headline numbers (:func:`locate_headlines`) as sentences a reader can act on."""
    lines = []
    for key, value in headlines.items():
        if value is None:
            continue
        if key.startswith("controlled_hit_rate_"):
            attr = key.removeprefix("controlled_hit_rate_").replace("_", " × ")
            lines.append(f"Controlled generation ({attr}): for {value:.0%} of the neutral prompts with a clear "
                         f"{attr} majority, the image tokens are closest to those of the explicit prompt for that "
                         "majority group: evidence that the skew sits in how the language model reads the prompt.")
        elif key.startswith("understanding_unknown_rate_"):
            attr = key.removeprefix("understanding_unknown_rate_")
            eff = headlines.get(f"understanding_rd_effective_{attr}")
            lines.append(f"Understanding ({attr}): asked about an occupation's {attr}, the model answers “unknown” "
                         f"{value:.0%} of the time" + (f" (effective RD {eff:.2f})" if eff is not None else "")
                         + ": its understanding side is closer to neutral than its images (partial alignment).")
        elif key.startswith("vision_probe_accuracy_"):
            encoder, _, attr = key.removeprefix("vision_probe_accuracy_").partition("_")
            lines.append(f"Vision encoder “{encoder}”: a linear probe reads {attr} from its features with accuracy "
                         f"{value:.2f}: the vision side tells the groups apart.")
        elif key.startswith("swap_language_share_"):
            attr = key.removeprefix("swap_language_share_").replace("_", " × ")
            lines.append(f"Component swap ({attr}): the fine-tuned language model carries {value:.0%} of the fix's "
                         f"change in {attr} RD; the rest is the image decoder's.")
    return lines


def recovery_figure(rows: list[dict]):
    """Measured female share (with its interval) against the planted share, one row per occupation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 0.42 * len(rows) + 1.0))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    measured = np.array([r["measured_female"] for r in rows])
    lo, hi = np.array([r["ci"][0] for r in rows]), np.array([r["ci"][1] for r in rows])
    ax.errorbar(measured, y, xerr=[measured - lo, hi - measured], fmt="o", color="#2563eb", capsize=3,
                label="measured (95% interval)")
    ax.scatter([r["planted_female"] for r in rows], y, marker="D", color="#111827", zorder=3, label="planted")
    ax.set_yticks(y, [r["occupation"] for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("female share")
    ax.axvline(0.5, color="#9ca3af", lw=0.8, ls="--")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def index_html(summary: dict) -> str:
    """The demo's landing page (``index.html``): the planted / before / after table with intervals, the recovery
    plot, the locate headlines in words, adherence and quality, and links to every stage's report."""
    from audit.report import figure_data_uri, render_html

    b, a, planted = summary["before"], summary["after"], summary["planted"]
    rd_rows = [{"label": label, "planted": planted.get(key), "before": b[key], "before_ci": b.get(f"{key}_ci"),
                "after": a[key], "after_ci": a.get(f"{key}_ci")}
               for key, label in (("gender_rd", "gender"), ("race_rd", "race"), ("gender_race_rd", "gender × race"))
               if b.get(key) is not None and a.get(key) is not None]
    headline = (f"The fix brings the gender RD from {b['gender_rd']:.3f} to {a['gender_rd']:.3f} "
                f"({summary['gender_rd_ratio']:.0%} of before); the world was built with {planted['gender_rd']:.3f}.")
    links = [{"href": path, "label": REPORT_LABELS.get(name, (name, ""))[0],
              "note": REPORT_LABELS.get(name, ("", ""))[1]} for name, path in summary["reports"].items()]
    links.append({"href": "summary.json", "label": "All numbers (summary.json)", "note": ""})
    return render_html(
        "demo.html.j2", TEMPLATES, s=summary,
        title=f"debias demo: the {summary.get('world', 'janus')} lab world, before and after the fix",
        nav=[("result", "Result"), ("recovery", "Recovery"), ("locate", "Locate"), ("quality", "Cost"),
             ("reports", "Reports")],
        rd_rows=rd_rows, headline=headline, recovery_plot=figure_data_uri(recovery_figure(
            summary["recovery"]["per_occupation"])),
        locate_lines=locate_sentences(summary.get("locate") or {}), report_links=links,
        adherence_attrs=list((b.get("explicit_adherence") or {})), total_s=sum(summary["timings_s"].values()),
        generated=time.strftime("%Y-%m-%d %H:%M"),
    )
