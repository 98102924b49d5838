"""Where the toolkit's shipped data lives: the versioned YAML files under ``configs/``.

Every lookup of a shipped config goes through :func:`configs_dir` / :func:`named_config`, so the location is
decided in one place. In a checkout ``configs/`` sits at the top of the repository; the wheel ships the same folder
as the package data ``generators/configs`` (``pyproject.toml`` maps it there), found with ``importlib.resources``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from generators.errors import ConfigError, did_you_mean


def configs_dir() -> Path:
    """The folder of shipped configs (``generators/``, ``classifiers/``, ``prompts/``, ``experiments/``, ...): the
    installed package data, else the checkout's top-level ``configs/``."""
    installed = Path(str(resources.files("generators").joinpath("configs")))
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def config_names(kind: str) -> list[str]:
    """Names (file stems) of the shipped configs of one kind, e.g. ``config_names("generators")``."""
    return sorted(p.stem for p in (configs_dir() / kind).glob("*.yaml"))


def named_config(kind: str, name: str, key: str | None = None) -> Path:
    """The shipped YAML file ``configs/<kind>/<name>.yaml``.

    Args:
        kind: Sub-folder of ``configs/`` (``generators``, ``classifiers``, ``accelerate``, ...).
        name: File stem; a trailing ``.yaml`` is accepted.
        key: Config key (or command-line option, ``--config``) the name was given for, named in the error
            (default: ``kind`` without its plural s).

    Raises:
        ConfigError: for an unknown name, with the available names and a "did you mean".
    """
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    path = configs_dir() / kind / f"{stem}.yaml"
    if path.is_file():
        return path
    names = config_names(kind)
    key = key or kind.rstrip("s")
    where = key if key.startswith("--") else f"config key '{key}'"
    raise ConfigError(f"{where}: '{name}' is neither a YAML file nor a name in "
                      f"configs/{kind}/{did_you_mean(stem, names)}; available: {', '.join(names)}")


def project_path(path: str | Path) -> Path:
    """A path from a config: as given if it exists, else relative to the folder holding ``configs/``
    (so ``configs/prompts/paper.yaml`` works from any working directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    root_relative = configs_dir().parent / p
    return root_relative if root_relative.exists() else p


def config_file(path: str | Path, kind: str, key: str) -> Path:
    """The YAML file a user named: a path (as given, or under the folder holding ``configs/``, see
    :func:`project_path`), or a bare name in ``configs/<kind>/`` (``--config lab``). A missing path is returned as
    is, for the reader to report."""
    p = Path(path)
    shipped = project_path(p)
    if shipped.is_file():
        return shipped
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        return p
    return named_config(kind, str(path), key)
