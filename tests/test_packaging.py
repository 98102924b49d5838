"""The distribution a user installs: the wheel carries every module, template, shipped config and the lab world's
weights, and a non-editable install into a fresh venv works from outside the checkout, offline."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

PACKAGES = ("generators", "audit", "debias")


def source_files(root: Path) -> list[Path]:
    """The files a build sees: tracked ones in a git checkout, else everything outside caches and run folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True)
        files = [root / f for f in listed.stdout.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in root.rglob("*") if p.is_file()]
    skip = {".git", ".venv", "runs", "build", "__pycache__", ".pytest_cache"}
    return [f for f in files if f.is_file() and not skip & set(f.relative_to(root).parts)
            and not f.name.endswith(".egg-info")]


def build_wheel(root: Path, dest: Path) -> Path:
    """Build the wheel from a copy of the source (setuptools builds in-tree: the checkout stays clean)."""
    src = dest / "src"
    for f in source_files(root):
        target = src / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    # The running environment's setuptools when it is new enough (no download), else an isolated build.
    setuptools = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    flags = ["--no-build-isolation"] if setuptools >= (77, 0) else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-q", "-w", str(dest / "dist"),
                    str(src)], check=True, capture_output=True, text=True)
    return next((dest / "dist").glob("debias_t2i-*.whl"))


def test_pyproject_lists_every_package(repo_root):
    listed = set(tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(repo_root).parts) for pkg in PACKAGES
             for p in (repo_root / pkg).rglob("__init__.py")}
    assert listed == found | {"generators.configs"}, "add new sub-packages to [tool.setuptools] packages"


def test_wheel_holds_every_module_template_config_and_weight(repo_root, tmp_path):
    wheel = build_wheel(repo_root, tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for f in source_files(repo_root):
        rel = f.relative_to(repo_root)
        if rel.parts[0] in PACKAGES and f.suffix != ".pyc":
            expected.add(rel.as_posix())
        elif rel.parts[0] == "configs" and f.suffix == ".yaml":
            expected.add(("generators" / rel).as_posix())  # configs/ ships as generators/configs/
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing[:10]}"
    assert "generators/lab/weights/janus/model.safetensors" in names
    assert "generators/lab/weights/clip/tokenizer.json" in names
    assert "generators/configs/experiments/lab.yaml" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "configs/")) for n in names)  # no stray top-level dirs
    print(f"wheel: {len(names)} files, {wheel.stat().st_size / 2**20:.1f} MiB")


@pytest.mark.slow
def test_non_editable_install_runs_from_outside_the_checkout_offline(repo_root, tmp_path):
    """As a new user: fresh venv, the wheel with the pinned versions, commands run in an empty folder."""
    wheel = build_wheel(repo_root, tmp_path / "build")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--constraint",
           str(repo_root / "constraints.txt")]
    t0 = time.perf_counter()
    # torch first, by exact version: pip then takes the local CPU build (see the Makefile).
    torch_pin = next(line for line in (repo_root / "constraints.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    subprocess.run([*pip, torch_pin], check=True, capture_output=True, text=True)
    res = subprocess.run([*pip, str(wheel)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"install: {time.perf_counter() - t0:.0f} s")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*args: str) -> str:
        res = subprocess.run(list(args), cwd=work, capture_output=True, text=True, env=env)
        assert res.returncode == 0, (args, res.stderr[-3000:])
        return res.stdout

    where = run("python", "-c", "import debias, generators.resources as r; print(debias.__file__); "
                                "print(r.configs_dir())").split()
    assert all(str(venv) in w for w in where), where  # the installed copy, not the checkout
    assert "generator.variant" in run("debias", "config", "--explain")
    run("debias", "audit", "--config", "lab", "--out", "run", "--set", "images_per_prompt=2",
        "--set", "prompts.limit=1", "--quiet")
    assert (work / "run" / "report.html").is_file() and (work / "run" / "classifier_card.json").is_file()
    (work / "hub.yaml").write_text("generator: janus-pro-1b\nclassifier: clip-vit-large-patch14\n"
                                   "prompts: {occupations_file: configs/prompts/occupations-test.yaml}\n")
    assert run("debias", "config", "--check", "hub.yaml").strip() == "hub.yaml: ok"
    resolved = run("python", "-c", "from debias.config import load_config; c = load_config('hub.yaml'); "
                                   "print(c.generator.model, c.classifier.model, len(c.prompts.neutral_prompts()))")
    assert resolved.split() == ["deepseek-community/Janus-Pro-1B", "openai/clip-vit-large-patch14", "50"]
