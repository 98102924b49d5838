"""The benchmark runner (`make bench`): how it reads each benchmark's result, a fast run of every benchmark, and
what single benchmarks report in their small modes."""

import json
import subprocess
import sys

import pytest

from benchmarks.run import benchmark_modules, fast_args, last_json_object


def test_last_json_object_reads_one_line_and_indented_results_amid_chatter():
    one_line = 'loading...\n{"benchmark": "a", "x": 1}\n'
    assert last_json_object(one_line) == {"benchmark": "a", "x": 1}
    # the case that crashed `make bench`: an indented object, whose last line starting with "{" is a lone "{"
    indented = "warmup\n" + json.dumps({"benchmark": "b", "nested": {"y": [1, 2]}}, indent=2) + "\ndone\n"
    assert last_json_object(indented) == {"benchmark": "b", "nested": {"y": [1, 2]}}
    # the last of several objects wins; a broken one and a list are skipped
    several = '{"benchmark": "first"}\n{"benchmark": "second"}\n{not json\n[1, 2]\n'
    assert last_json_object(several) == {"benchmark": "second"}
    assert last_json_object("no result here\n") is None


def test_every_benchmark_declares_fast_arguments():
    modules = benchmark_modules()
    assert {"bench_bpo", "bench_classifier", "bench_metrics", "bench_sampling", "bench_train"} <= set(modules)
    for module in modules:
        args = fast_args(module)
        assert args and all(isinstance(a, str) for a in args), module


@pytest.mark.slow
def test_fast_run_writes_one_result_per_benchmark(tmp_path, repo_root):
    out = tmp_path / "results.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.run", "--fast", "--out", str(out)], cwd=repo_root,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == benchmark_modules()
    for module, result in results.items():
        assert "error" not in result and result["fast"] is True and result["benchmark"], (module, result)
    stages = results["bench_train"]["stages"]
    assert set(stages) == {"sft", "bpo"}
    assert all(s["rss_peak_mib"] >= s["rss_start_mib"] > 0 for s in stages.values())
    assert set(results["bench_bpo"]["variants"]) == {"bpo", "ours_dpo", "stock_dpo"}

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
