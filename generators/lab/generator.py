"""Registry backend ``lab``: the lab world's tiny Janus, so every command can target it by name."""

from __future__ import annotations

from dataclasses import replace

from generators.base import GeneratorConfig, check_adapter, check_weights, directory_hash, generator_provenance
from generators.config import ConfigError
from generators.janus import JanusGenerator
from generators.lab import missing_world, world_dir


class LabGenerator(JanusGenerator):
    """The lab world's tiny Janus (``generator.model`` may name another built world folder)."""

    def __init__(self, config: GeneratorConfig, model=None, tokenizer=None):
        self.weights = world_dir(config.model) / "janus"
        if model is None:
            if not self.weights.is_dir():
                raise ConfigError(missing_world(self.weights))
            super().__init__(replace(config, model=str(self.weights)))
            self.config = config
        else:
            super().__init__(config, model=model, tokenizer=tokenizer)

    def provenance(self) -> dict:
        if self._in_process:
            return super().provenance()
        return generator_provenance(self, location=self.weights)

    @classmethod
    def check_config(cls, config: GeneratorConfig, settings) -> None:
        weights = world_dir(config.model) / "janus"
        if not weights.is_dir():
            raise ConfigError(missing_world(weights))
        check_weights(str(weights), "generator.model", config.allow_pickle, marker="config.json")
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle)

    def identity(self) -> dict:
        # Keyed by the weights' content, not their install path, so run folders move between machines.
        return {**super().identity(), "model": self.config.model or "lab", "weights": directory_hash(self.weights)}
