"""The generator backends by config name (``generator.backend``), one file each, imported when first used."""

from __future__ import annotations

from typing import Any

from generators.base import Generator, GeneratorConfig, parse_settings, resolve_device
from generators.config import from_dict
from generators.registry import Registry

GENERATORS: Registry = Registry("generator backend")
GENERATORS.add_lazy("janus", "generators.janus:JanusGenerator")
GENERATORS.add_lazy("emu3", "generators.emu3:Emu3Generator")
GENERATORS.add_lazy("diffusers", "generators.diffusers_backend:DiffusersGenerator")
GENERATORS.add_lazy("lab", "generators.lab.generator:LabGenerator")
GENERATORS.add_lazy("lab-sd", "generators.lab.diffusion:LabDiffusionGenerator")


def check_generator_config(config: GeneratorConfig) -> Any:
    """Everything loading ``config`` would reject, checked without loading a model; returns the sampling settings.

    The backend's ``Settings`` validate ``generator.sampling``, the device must exist on this machine, and the
    backend's ``check_config`` checks what it would load (model folder, weights format, adapter, pipeline options).

    Raises:
        ConfigError / UserError: naming the config key, the bad value and the fix.
    """
    cls = GENERATORS.get(config.backend)
    settings = parse_settings(cls.Settings, config)
    resolve_device(config.device, "generator.device")
    cls.check_config(config, settings)
    return settings


def load_generator(config: GeneratorConfig | dict) -> Generator:
    """Build the generator a config names (the backend is looked up in :data:`GENERATORS`), after
    :func:`check_generator_config`."""
    if isinstance(config, dict):
        config = from_dict(GeneratorConfig, config, prefix="generator")
    check_generator_config(config)
    return GENERATORS.get(config.backend)(config)
