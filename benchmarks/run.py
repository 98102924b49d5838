"""Run every benchmark (each a ``python -m benchmarks.bench_*`` module that prints its result as one JSON object)
and collect one result per benchmark in ``benchmarks/results.json``. Ratios compare our pipeline with the bare
library call on the same model, measured in the same run; timings depend on the machine, ratios much less.

``--fast`` runs each benchmark with the smallest sizes that still exercise its code paths (the module's ``FAST``
arguments): a check that every benchmark runs, not a measurement; the test suite runs it.

Run: ``python -m benchmarks.run [--fast] [--out FILE] [--only bench_metrics ...]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmark_modules() -> list[str]:
    """The benchmark module names, ``bench_*`` in this folder, sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def fast_args(module: str) -> list[str]:
    """The module's ``FAST = [...]`` arguments, read from its source (no import: the runner stays light)."""
    tree = ast.parse((HERE / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FAST" for t in node.targets):
            return [str(a) for a in ast.literal_eval(node.value)]
    return []


def last_json_object(text: str) -> dict | None:
    """The last JSON object in ``text`` that starts at the beginning of a line, on one line or indented over
    several (anything may follow it, e.g. a library's closing chatter); None if there is none."""
    decoder = json.JSONDecoder()
    for match in reversed(list(re.finditer(r"^\{", text, re.MULTILINE))):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def run_benchmark(module: str, fast: bool = False) -> dict:
    """Run one benchmark in its own process; its result, or ``{"error": ...}`` with the end of its output."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *(fast_args(module) if fast else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, env=env)
    result = last_json_object(proc.stdout)
    if proc.returncode != 0 or result is None:
        why = f"exit code {proc.returncode}" if proc.returncode else "no JSON object in its output"
        return {"error": f"{module}: {why}", "stderr_tail": proc.stderr[-2000:], "stdout_tail": proc.stdout[-1000:]}
    return {**result, "wall_s": round(time.perf_counter() - t0, 1), **({"fast": True} if fast else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="smallest sizes: checks that every benchmark runs")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="where to write the results")
    parser.add_argument("--only", nargs="+", metavar="MODULE", help="run only these bench_* modules")
    args = parser.parse_args(argv)
    modules = benchmark_modules()
    unknown = sorted(set(args.only or []) - set(modules))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(modules)}")
    results = {}
    for module in args.only or modules:
        print(f"== {module}", flush=True)
        results[module] = run_benchmark(module, args.fast)
        if "error" in results[module]:
            print(results[module]["stderr_tail"], file=sys.stderr)
        print(json.dumps(results[module]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    failed = [m for m, r in results.items() if "error" in r]
    print(f"{len(results) - len(failed)} of {len(results)} benchmarks ran; results in {out}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
