"""The benchmark runner (`make bench`): how it reads each benchmark's result, and a fast run of every benchmark."""

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
