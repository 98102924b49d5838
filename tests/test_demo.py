"""The demo's bookkeeping: planted RD, recovery counts (hand-computed)."""

import json

import pytest

from debias.demo import measured_vs_planted, planted_rd

WORLD = {"occupations": {
    "doctor": {"p_female": 0.2, "race": {"White": 0.7, "Black": 0.1, "Indian": 0.1, "Asian": 0.1}},
    "nurse": {"p_female": 0.5, "race": {"White": 0.25, "Black": 0.25, "Indian": 0.25, "Asian": 0.25}},
}}
TEMPLATE = "A photo of the face of a {occupation}, a person"


def test_planted_rd_oracle():
    out = planted_rd(WORLD, ["doctor", "nurse"])
    # gender: doctor |0.8 - 0.2| = 0.6, nurse 0 -> mean 0.3
    assert out["gender_rd"] == pytest.approx(0.3)
    # race, doctor: pairs (W,B) (W,I) (W,A) 0.6 each, the other three 0 -> 1.8 / 6 = 0.3; nurse 0 -> mean 0.15
    assert out["race_rd"] == pytest.approx(0.15)


def test_measured_vs_planted_counts():
    def row(occ, female, lo, hi):
        return {"prompt": TEMPLATE.format(occupation=occ), "shares": [1 - female, female],
                "shares_ci": [[1 - hi, 1 - lo], [lo, hi]]}

    metrics = {"attributes": {"gender": {"classes": ["male", "female"], "per_prompt": [
        row("doctor", 0.25, 0.18, 0.33),   # within 0.1 of 0.2 and covers it
        row("nurse", 0.65, 0.58, 0.72),    # 0.15 away, interval misses 0.5
    ]}}}
    out = measured_vs_planted(metrics, WORLD, ["doctor", "nurse"], TEMPLATE)
    assert (out["within_0.1"], out["covered"], out["n"]) == (1, 1, 2)
    assert out["per_occupation"][1]["measured_female"] == 0.65 and not out["per_occupation"][1]["covered"]


def summary_fixture() -> dict:
    """A demo summary in the shape run_demo writes (numbers of a real run, two occupations)."""
    side = {"gender_rd": 0.4453, "gender_rd_ci": [0.2373, 0.6373], "race_rd": 0.1479, "race_rd_ci": [0.1023, 0.1945],
            "gender_race_rd": 0.1035, "gender_race_rd_ci": [0.0747, 0.1293], "clip_score": 58.92,
            "explicit_adherence": {"gender": 0.914, "race": 0.492}}
    after = {**side, "gender_rd": 0.1141, "gender_rd_ci": [0.0625, 0.1703], "clip_score": 58.62}
    return {
        "before": side, "after": after, "planted": {"gender_rd": 0.45, "race_rd": 0.1708},
        "recovery": {"per_occupation": [
            {"occupation": "doctor", "planted_female": 0.2, "measured_female": 0.1375, "ci": [0.0926, 0.1994],
             "within_0.1": True, "covered": False},
            {"occupation": "nurse", "planted_female": 0.85, "measured_female": 0.825, "ci": [0.7587, 0.8761],
             "within_0.1": True, "covered": True}], "within_0.1": 2, "covered": 1, "n": 2},
        "gender_rd_ratio": 0.2561, "wilcoxon_gender_p": 0.0391,
        "locate": {"controlled_hit_rate_gender": 0.8333, "understanding_unknown_rate_gender": 0.775,
                   "understanding_rd_effective_gender": 0.125, "vision_probe_accuracy_vq_gender": 1.0,
                   "swap_language_share_gender": 1.0},
        "synth": {"n_rows": 768, "acceptance_rate": 0.5333, "attribute": "gender", "shortfalls": 0},
        "adapter": "train/bpo/adapter", "method": "sft+bpo", "guidance_scale": 1.01, "images_per_prompt": 160,
        "timings_s": {"audit before": 42.8, "train": 63.8},
        "reports": {"before": "before/report.html", "after": "after/report.html", "locate": "locate/locate.html",
                    "compare": "compare/compare.html", "model": "model/README.md"},
    }


def check_landing_page(page: str, summary: dict) -> None:
    """What a reader must find on index.html: the table with intervals, the recovery plot, the locate headlines
    in words, adherence and quality, and a link to every report; and no dumped JSON."""
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.images, self.tags, self.text = [], [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            attrs = dict(attrs)
            if tag == "a":
                self.links.append(attrs.get("href"))
            if tag == "img":
                self.images.append(attrs.get("src", ""))

        def handle_data(self, data):
            self.text.append(data)

    parsed = Page()
    parsed.feed(page)
    text = " ".join(" ".join(parsed.text).split())
    assert "pre" not in parsed.tags and '{"' not in page and '"gender_rd"' not in page  # no raw JSON
    for side in ("before", "after"):
        lo, hi = summary[side]["gender_rd_ci"]
        assert f"{summary[side]['gender_rd']:.3f} [{lo:.3f}, {hi:.3f}]" in text, side
    assert f"{summary['planted']['gender_rd']:.3f}" in text
    assert any(src.startswith("data:image/svg+xml;base64,") for src in parsed.images)  # the recovery plot
    assert set(summary["reports"].values()) <= set(parsed.links)
    for key, value in summary["locate"].items():  # the locate headlines, in words
        if key.startswith("understanding_unknown_rate_"):
            assert f"answers “unknown” {value:.0%} of the time" in text, key
        if key.startswith("swap_language_share_") and value is not None:
            assert f"carries {value:.0%} of the fix's change" in text, key
    assert "adherence, gender" in text and "CLIP score" in text


def test_landing_page_is_a_page_not_a_json_dump():
    from debias.demo import index_html

    summary = summary_fixture()
    page = index_html(summary)
    check_landing_page(page, summary)
    import html

    assert "answers “unknown” 78% of the time (effective RD 0.12)" in html.unescape(page)
    assert "for 83% of the neutral prompts with a clear gender majority" in html.unescape(page)


def test_measured_vs_planted_and_generator_own():
    def row(occ, female, lo, hi):
        return {"prompt": TEMPLATE.format(occupation=occ), "shares": [1 - female, female],
                "shares_ci": [[1 - hi, 1 - lo], [lo, hi]]}

    metrics = {"attributes": {"gender": {"classes": ["male", "female"], "per_prompt": [
        row("doctor", 0.25, 0.18, 0.33),   # covers planted 0.2 but misses the generator's own 0.35
        row("nurse", 0.65, 0.58, 0.72),    # misses planted 0.5, covers the generator's own 0.62
    ]}}}
    own = {"n_per_occupation": 2000, "per_occupation": {"doctor": {"generator_p_female": 0.35},
                                                        "nurse": {"generator_p_female": 0.62}}}
    out = measured_vs_planted(metrics, WORLD, ["doctor", "nurse"], TEMPLATE, own)
    assert (out["covered"], out["covered_generator"], out["n"]) == (1, 1, 2)
    assert [r["covered_generator"] for r in out["per_occupation"]] == [False, True]
    assert out["fit_mean_abs_p_female"] == pytest.approx((0.15 + 0.12) / 2)
    assert out["generator_own_images"] == 2000
    assert measured_vs_planted(metrics, WORLD, ["doctor", "nurse"], TEMPLATE)["covered_generator"] is None


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_resumes(tmp_path, repo_root):
    """The README's main job at a reduced size: every stage runs on the shipped world, writes its report, the
    adapter changes the images, and a second run resumes to the same summary."""
    import yaml

    from debias.demo import DEMO_CONFIG, run_demo

    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["metrics"] = {"n_boot": 100}
    cfg["synth"].update(per_cell=4, max_rounds=2, min_confidence=0.5)
    cfg["train"]["sft"]["epochs"] = 1
    cfg["train"]["bpo"]["max_steps"] = 2
    cfg["locate"].update(understanding={"samples": 4, "max_new_tokens": 4},
                         vision={"data": "lab", "lab_images": 32, "pool": "flatten"},
                         controlled={"samples": 4})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "demo"

    summary = run_demo(out, path, progress=False, images_per_prompt=8)

    # Planted truth from the shipped world's own config: gender RD = mean |1 - 2 p_female| over the occupations.
    world = yaml.safe_load((repo_root / "generators" / "lab" / "weights" / "world.yaml").read_text())
    p = [world["occupations"][o]["p_female"] for o in cfg["prompts"]["occupations"]]
    assert summary["planted"]["gender_rd"] == pytest.approx(sum(abs(1 - 2 * x) for x in p) / len(p))
    for side in ("before", "after"):
        for key in ("gender_rd", "race_rd"):
            lo, hi = summary[side][f"{key}_ci"]
            assert lo <= summary[side][key] <= hi, (side, key)
    assert summary["recovery"]["n"] == 8 and summary["synth"]["n_rows"] > 0
    # The shipped world's generator-own shares (build_info.json) sit beside the planted and audited ones.
    assert all(r["generator_female"] is not None for r in summary["recovery"]["per_occupation"])
    assert summary["recovery"]["covered_generator"] is not None
    for side in ("before", "after"):
        assert summary[side]["gender_rd_floor"] == pytest.approx(0.2734375)  # exact floor of 8 images
        assert summary[side]["gender_rd_debiased_ci"][1] == summary[side]["gender_rd_ci"][1]
    assert summary["locate"]["swap_language_share_gender"] is not None
    for report in summary["reports"].values():
        assert (out / report).is_file(), report
    check_landing_page((out / "index.html").read_text(), summary)
    assert (out / "model" / "README.md").is_file() and (out / "model" / "adapter_config.json").is_file()
    # The fix changed the model: matched seeds give different images before and after.
    before = {p.name: p.read_bytes() for p in (out / "before").rglob("*.png")}
    after = {p.name: p.read_bytes() for p in (out / "after").rglob("*.png")}
    assert before and after and any(before[k] != after.get(k) for k in before)

    again = run_demo(out, path, progress=False, images_per_prompt=8)
    for side in ("before", "after"):
        assert again[side]["gender_rd"] == summary[side]["gender_rd"]
        assert again[side]["race_rd"] == summary[side]["race_rd"]
    # The re-run redid no probe: every locate result came from its stage.
    reused = {name: json.loads((out / name / "run.json").read_text())["stages"]["locate"]["reused"]
              for name in ("locate", "locate-swap")}
    assert reused == {"locate": ["understanding", "vision", "controlled"], "locate-swap": ["swap"]}
    assert again["locate"] == summary["locate"]


@pytest.mark.slow
def test_diffusion_demo_runs_the_whole_loop(tmp_path):
    """`debias demo --world diffusion` at a reduced size: the shipped diffusion world is audited, fixed with a
    diffusers LoRA (SFT then BPO), re-audited on the same seeds and shared; no locate stage (no unified model)."""
    import yaml

    from debias.demo import WORLDS, run_demo

    cfg = yaml.safe_load(WORLDS["diffusion"].read_text())
    cfg["metrics"] = {"n_boot": 100}
    cfg["prompts"]["occupations"] = cfg["synth"]["prompts"]["occupations"] = ["nurse", "engineer"]
    cfg["synth"].update(per_cell=4, max_rounds=2, min_confidence=0.5)
    cfg["train"]["diffusion"]["sft"]["steps"] = 4
    cfg["train"]["diffusion"]["bpo"]["steps"] = 2
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "demo"

    summary = run_demo(out, path, progress=False, images_per_prompt=8, world="diffusion",
                       overrides={"generator.sampling.num_inference_steps": 4})

    assert summary["world"] == "diffusion" and summary["locate"] == {} and "locate" not in summary["reports"]
    assert summary["method"] == "sft+bpo" and summary["adapter"].endswith("bpo/adapter")
    assert summary["recovery"]["n"] == 2 and summary["synth"]["n_rows"] > 0
    for report in summary["reports"].values():
        assert (out / report).is_file(), report
    page = (out / "index.html").read_text()
    assert "a diffusion pipeline does not have" in page
    assert (out / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (out / "model" / "README.md").read_text()
    before = {p.name: p.read_bytes() for p in (out / "before").rglob("*.png")}
    after = {p.name: p.read_bytes() for p in (out / "after").rglob("*.png")}
    assert before and after and any(before[k] != after.get(k) for k in before)
