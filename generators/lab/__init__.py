"""The lab world: a small synthetic world the toolkit ships so the whole audit -> locate -> fix loop runs offline.

* :mod:`generators.lab.render` draws 32x32 stylised people whose pixels encode gender, a 4-level skin tone
  (labelled with the paper's race class names) and one of 8 occupations.
* :mod:`generators.lab.generator` is the registry backend ``lab``: the world's tiny Janus.
* :mod:`generators.lab.diffusion` is the registry backend ``lab-sd``: the diffusion world's tiny Stable Diffusion.
* ``weights/`` holds what :mod:`debias.lab.build` trained from ``configs/lab/world.yaml``: ``janus/``, ``clip/`` (the
  world's classifier, ``classifier.model: lab``), ``sd/`` (the diffusion world's pipeline, with its own
  ``build_info.json`` and ``world.yaml``), ``world.yaml`` (the planted skew) and ``build_info.json``.

The planted skew is the ground truth an audit must recover and a fix must remove.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def world_dir(path: str | Path | None = None) -> Path:
    """The lab world folder: ``path`` if given (a world built with ``debias lab build``), else the shipped one."""
    return Path(path) if path and str(path) != "lab" else WEIGHTS


def missing_world(path: Path, world: str = "janus") -> str:
    """The error text for a world folder without weights (names the command that builds them)."""
    flag = "" if world == "janus" else f" --world {world}"
    return (f"lab world weights not found at '{path}'; build them with "
            f"`debias lab build{flag} --out generators/lab/weights`")


def planted(world: str | Path | None = None) -> dict:
    """The planted distributions a world was built from (its ``world.yaml``)."""
    from generators.config import load_yaml

    return load_yaml(world_dir(world) / "world.yaml")
