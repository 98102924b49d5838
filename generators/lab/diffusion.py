"""Registry backend ``lab-sd``: the diffusion lab world's tiny Stable Diffusion pipeline (``DIR/sd``).

Built by ``debias lab build --world diffusion`` (:mod:`debias.lab.train_sd`); shipped in ``weights/sd``. Everything
else (sampling, seed blocks, LoRA adapters through ``load_lora_weights``, provenance) is
:class:`generators.diffusers_backend.DiffusersGenerator`'s, so the lab world exercises the real diffusers path.
"""

from __future__ import annotations

from dataclasses import replace

from generators.base import GeneratorConfig, check_adapter, check_weights, directory_hash, generator_provenance
from generators.config import ConfigError
from generators.diffusers_backend import DiffusersGenerator, scheduler_class
from generators.lab import missing_world, world_dir


def sd_dir(model: str | None):
    """The pipeline folder of the diffusion world ``model`` names (``lab`` or empty: the shipped one)."""
    return world_dir(model) / "sd"


class LabDiffusionGenerator(DiffusersGenerator):
    """The diffusion lab world (``generator.model`` may name another built world folder).

    Args:
        config: ``model`` is ``lab`` (the shipped world) or a folder built with ``--world diffusion``.
        pipeline: an already-built pipeline to wrap (the builder's verification, before the weights are written).
    """

    def __init__(self, config: GeneratorConfig, pipeline=None):
        self.weights = sd_dir(config.model)
        if pipeline is None:
            if not self.weights.is_dir():
                raise ConfigError(missing_world(self.weights, world="diffusion"))
            # The parent loads the folder; keep the config's own model name (lab) for identity and records.
            super().__init__(replace(config, model=str(self.weights)))
            self.config = config
        else:
            super().__init__(config, pipeline=pipeline)

    @classmethod
    def check_config(cls, config: GeneratorConfig, settings) -> None:
        weights = sd_dir(config.model)
        if not weights.is_dir():
            raise ConfigError(missing_world(weights, world="diffusion"))
        check_weights(str(weights), "generator.model", config.allow_pickle, marker="model_index.json")
        if settings.scheduler:
            scheduler_class(settings.scheduler)
        if config.adapter:
            check_adapter(config.adapter, "generator.adapter", config.allow_pickle, peft=False)

    def identity(self) -> dict:
        # Keyed by the weights' content, not their install path, so run folders move between machines.
        identity = {**super().identity(), "model": self.config.model or "lab"}
        if not self._in_process:
            identity["weights"] = directory_hash(self.weights)
        return identity

    def provenance(self) -> dict:
        if self._in_process:
            return super().provenance()
        return generator_provenance(self, location=self.weights)
