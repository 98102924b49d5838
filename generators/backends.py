"""The generator backends by config name (``generator.backend``), one file each, imported when first used."""

from __future__ import annotations

from generators.base import Generator, GeneratorConfig
from generators.config import from_dict
from generators.registry import Registry

GENERATORS: Registry = Registry("generator backend")
GENERATORS.add_lazy("janus", "generators.janus:JanusGenerator")
GENERATORS.add_lazy("emu3", "generators.emu3:Emu3Generator")
GENERATORS.add_lazy("diffusers", "generators.diffusers_backend:DiffusersGenerator")
GENERATORS.add_lazy("lab", "generators.lab.generator:LabGenerator")


def load_generator(config: GeneratorConfig | dict) -> Generator:
    """Build the generator a config names (the backend is looked up in :data:`GENERATORS`)."""
    if isinstance(config, dict):
        config = from_dict(GeneratorConfig, config, prefix="generator")
    return GENERATORS.get(config.backend)(config)
