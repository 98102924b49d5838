"""The audit report: self-contained HTML, escaped user text, Markdown summary, reusable helpers.

Run folders are built by hand (PIL images, hand-made labels, metrics from audit.metrics.summarize_attribute), so no
model is needed and the file runs in a few seconds.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.metrics import joint_classes, summarize_attribute
from audit.report import (
    Section,
    fmt_num,
    html_fragment,
    prompt_labels,
    render_html,
    write_report,
    write_report_from_run,
)
from generators.config import UserError

GENDER = ["male", "female"]
RACE = ["White", "Black", "Indian", "Asian"]
XSS = "A photo of the face of a <script>alert(1)</script>, a person"


def make_run(root: Path, spec: dict[str, list[tuple[int, str | None, str | None]]], name: str = "synthetic",
             size: int = 32) -> tuple[dict, list[dict]]:
    """Write a run folder: ``spec`` maps prompt -> [(seed, gender or None, race or None)]; gender None = no face.

    Returns ``(metrics, predictions)`` as written to metrics.json / predictions.json.
    """
    root.mkdir(parents=True, exist_ok=True)
    prompts = list(spec)
    preds = []
    for pi, (prompt, items) in enumerate(spec.items()):
        for seed, g, r in items:
            key = f"p{pi}s{seed}"
            rel = f"samples/images/{key[:2]}/{key}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            colour = (40 + 60 * pi % 200, 90 + 13 * seed % 150, 200 if g == "female" else 60)
            Image.new("RGB", (size, size), colour).save(root / rel)
            preds.append({"key": key, "prompt": prompt, "seed": seed, "file": rel, "face": g is not None,
                          "clip_score": 25.0 + pi + 0.1 * seed, "gender": g, "gender_p": 0.9 if g else None,
                          "race": r if g else None, "race_p": 0.8 if g and r else None})

    def summarize(attr: str, classes: list[str], label_of) -> dict:
        labels, n_img, n_abs = [], [], []
        for p in prompts:
            rows = [x for x in preds if x["prompt"] == p]
            lab = [label_of(x) for x in rows if x["face"]]
            labels.append(np.array([v for v in lab if v is not None], dtype=np.int64))
            n_img.append(len(rows))
            n_abs.append(sum(v is None for v in lab))
        return summarize_attribute(prompts, labels, None, classes, n_img, n_abs, n_boot=200)

    def gi(x):
        return GENDER.index(x["gender"]) if x["gender"] else None

    def ri(x):
        return RACE.index(x["race"]) if x["race"] else None

    attributes = {
        "gender": summarize("gender", GENDER, gi),
        "race": summarize("race", RACE, ri),
        "gender_race": summarize("gender_race", joint_classes(GENDER, RACE),
                                 lambda x: None if gi(x) is None or ri(x) is None else gi(x) * 4 + ri(x)),
    }
    n_face = sum(x["face"] for x in preds)
    per_prompt_clip = {p: float(np.mean([x["clip_score"] for x in preds if x["prompt"] == p])) for p in prompts}
    metrics = {
        "run": {"name": name, "generator": {"backend": "lab", "model": "tiny-janus <b>", "revision": "abc123",
                                            "adapter": None, "settings": {"guidance_scale": 3.0, "top_k": 900}},
                "guidance_scale": 3.0, "images_per_prompt": max(len(v) for v in spec.values()),
                "n_prompts": len(prompts), "n_images": len(preds), "seeds": sorted({x["seed"] for x in preds}),
                "classifier": {"model": "tiny-clip", "revision": None}, "faces": {"detector": "none"}},
        "faces": {"n_images": len(preds), "n_faces": n_face, "no_face_rate": 1 - n_face / len(preds),
                  "lower_is_better": True},
        "attributes": attributes,
        "quality": {"clip_score": float(np.mean(list(per_prompt_clip.values()))), "clip_score_ci": [25.0, 27.0],
                    "lower_is_better": False, "per_prompt": per_prompt_clip},
    }
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "predictions.json").write_text(json.dumps(preds))
    (root / "run.json").write_text(json.dumps({
        "config": {}, "environment": {"python": "3.11.0", "versions": {"torch": "2.13.0"}, "git_revision": "deadbeef"},
        "stages": {"audit": {"command": "debias audit --out x", "finished": "2025-01-02T03:04:05"}}}))
    return metrics, preds


def skewed_spec() -> dict:
    """Three prompts: one all-male White, one balanced, one (the XSS prompt) mostly female with a no-face image."""
    races = RACE * 2
    return {
        "A photo of the face of a senator, a person": [(s, "male", "White") for s in range(8)],
        "A photo of the face of a nurse, a person": [(s, GENDER[s % 2], races[s]) for s in range(8)],
        XSS: [(0, None, None)] + [(s, "female" if s < 6 else "male", races[s]) for s in range(1, 8)],
    }


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "run"
    metrics, preds = make_run(root, skewed_spec())
    return root, metrics, preds


def test_report_is_self_contained_and_shows_summary(run):
    root, metrics, preds = run
    write_report(root, metrics, preds)
    html = (root / "report.html").read_text()
    assert html.startswith("<!doctype html>")
    # Nothing is fetched from elsewhere: no remote src/href, no external stylesheets or scripts.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "<link" not in html and "<script" not in html
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(srcs) > 24  # 3 plots + pooled heatmap + 24 thumbnails
    assert all(s.startswith("data:image/") for s in srcs)
    # The first thumbnail decodes to a PNG enlarged from 32 px with whole pixels.
    thumb = next(s for s in srcs if s.startswith("data:image/png"))
    raw = base64.b64decode(thumb.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    # Summary numbers appear exactly as formatted in the table, with their interval.
    g = metrics["attributes"]["gender"]
    assert fmt_num(g["rd"]) in html
    assert f"[{g['rd_ci'][0]:.3f}, {g['rd_ci'][1]:.3f}]" in html
    assert fmt_num(metrics["attributes"]["race"]["rd"]) in html
    for section in ("summary", "shares", "intersection", "prompts", "images", "run", "metrics"):
        assert f'id="{section}"' in html and f'href="#{section}"' in html
    assert "deadbeef" in html and "guidance scale" in html
    assert "no face" in html  # the no-face image is marked


def test_user_text_is_escaped(run):
    root, metrics, preds = run
    write_report(root, metrics, preds)
    html = (root / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "tiny-janus &lt;b&gt;" in html and "tiny-janus <b>" not in html
    md = (root / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md


def test_markdown_summary(run):
    root, metrics, preds = run
    write_report(root, metrics, preds)
    md = (root / "report.md").read_text()
    assert md.startswith("# Bias audit: synthetic")
    assert "| Attribute | K | RD ↓ (95% CI) |" in md
    line = next(x for x in md.splitlines() if x.startswith("| gender |"))
    assert fmt_num(metrics["attributes"]["gender"]["rd"]) in line
    assert "## Most biased prompts: gender" in md
    # The all-male senator prompt is the most biased gender prompt (RD 1).
    top = md.split("## Most biased prompts: gender")[1].splitlines()[4]
    assert "senator" in top and "1.000" in top
    assert "deadbeef" in md


def test_extra_sections_are_appended(run):
    root, metrics, preds = run
    body = html_fragment("<p>hit rate {{ x }} for {{ p }}</p>", x="0.998", p="<i>evil</i>")
    write_report(root, metrics, preds, extra_sections=[Section("Locate probes", body, "hit rate 0.998")])
    html = (root / "report.html").read_text()
    assert 'id="locate-probes"' in html and 'href="#locate-probes"' in html
    assert "hit rate 0.998 for &lt;i&gt;evil&lt;/i&gt;" in html
    assert html.index('id="locate-probes"') < html.index('id="metrics"')
    assert "## Locate probes\n\nhit rate 0.998" in (root / "report.md").read_text()


def test_report_from_run_folder_and_missing_image(run):
    root, metrics, preds = run
    (root / preds[0]["file"]).unlink()
    write_report_from_run(root)
    assert "missing" in (root / "report.html").read_text()


def test_bad_input_raises_and_writes_nothing(tmp_path, run):
    root, metrics, preds = run
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="run_dir: '.*nope' is not a directory; pass the run folder"):
        write_report(missing, metrics, preds)
    assert not missing.exists()
    with pytest.raises(UserError, match="metrics: missing the 'attributes' block"):
        write_report(root, {"run": {}}, preds)
    with pytest.raises(UserError, match=r"extra_sections\[0\]: expected an audit.report.Section"):
        write_report(root, metrics, preds, extra_sections=["<p>x</p>"])
    assert not (root / "report.html").exists() and not (root / "report.md").exists()


def test_helpers():
    labels, template = prompt_labels(["A photo of the face of a cardiologist, a person",
                                      "A photo of the face of an accountant, a person"])
    assert labels == ["a cardiologist", "an accountant"]
    assert template == "A photo of the face of … , a person"
    assert prompt_labels(["x", "y"]) == (["x", "y"], None)
    with pytest.raises(UserError, match="template 'nope.html.j2' not found"):
        render_html("nope.html.j2")
    assert fmt_num(None) == "—" and fmt_num(0.41249) == "0.412"
