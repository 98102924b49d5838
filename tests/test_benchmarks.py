"""The benchmarks run (in their small modes) and report what their docstrings promise."""

import json

import pytest


def test_coverage_benchmark_fast_mode_measures_every_interval(tmp_path):
    from benchmarks.bench_coverage import main

    md = tmp_path / "coverage.md"
    result = main(["--fast", "--reps", "6", "--markdown", str(md)])
    json.dumps(result, allow_nan=False)
    names = {r["interval"] for r in result["rows"]}
    assert names >= {"share (wilson)", "share (jeffreys)", "corrected share", "prompt rd_debiased_ci",
                     "mean rd_ci", "mean kl_ci", "mean entropy_ci", "rb_ci", "ab_ci", "mean rd_debiased_ci",
                     "prompt rd_change_ci (paired seeds)", "mean change ci (paired test)",
                     "plan share (wilson, at stop)", "plan mean rd_debiased_ci"}
    assert all(0 <= r["coverage"] <= 1 and r["n"] > 0 for r in result["rows"])
    # The floor table: exact floor against Monte Carlo (20,000 draws in fast mode), and no debiasing bias at balance.
    assert result["max_floor_abs_diff"] < 0.005
    for row in result["floor"]:
        assert abs(row["balanced_debiased_bias"]) < 0.01 and row["balanced_raw_bias"] > 0.01
        if row["images"] >= 160:
            assert abs(row["skewed_debiased_bias"]) < 0.01
    text = md.read_text()
    assert "| fixed | 2 | balanced | 160 |" in text and "Image plans" in text and "Noise floor" in text


def test_metrics_benchmark_reports_the_ratio_to_a_bare_pass():
    from benchmarks.bench_metrics import main

    result = main(["--prompts", "40", "--images", "32", "--n-boot", "50", "--repeats", "1"])
    assert result["gender_summary_vs_bare_pass"] > 1 and result["gender_bare_numpy_pass_s"] > 0
    assert result["gender_rd_floor"] > 0 and "gender_x_race_uniform_rd_debiased" in result


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_at_tiny_sizes(tmp_path):
    from benchmarks.bench_gpu import main

    md = tmp_path / "gpu.md"
    result = main(["--tiny", "--markdown", str(md)])
    assert result["tiny"] and result["device"] == "cpu" and result["copy_bandwidth_gb_s"] > 0
    s = result["sampling"][0]
    assert s["ours_images_per_s"] > 0 and s["generate_images_per_s"] > 0 and s["bandwidth_bound_images_per_s"] > 0
    assert result["classifier"]["ours_images_per_s"] > 0 and result["classifier"]["bare_forward_images_per_s"] > 0
    t = result["training"][0]
    assert t["sft_s_per_step"] > 0 and t["bpo_s_per_step"] > 0
    assert "bandwidth bound" in md.read_text()
