"""Every shipped YAML config validates (keys, types, backend sampling settings) without loading a model."""

from pathlib import Path

import pytest

from debias.config import load_config
from generators.backends import GENERATORS
from generators.base import GeneratorConfig, parse_settings
from generators.config import ConfigError, from_dict, load_yaml, named_section

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "generators").glob("*.yaml")), ids=lambda p: p.stem)
def test_generator_configs_validate(path):
    cfg = from_dict(GeneratorConfig, load_yaml(path), prefix="generator")
    backend = GENERATORS.get(cfg.backend)
    parse_settings(backend.Settings, cfg)
    if cfg.model not in ("tiny", "lab"):
        assert cfg.model.count("/") == 1, "real models are named by hub id"
        assert "# " in path.read_text(), "real model configs cite where their sampling settings come from"


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_configs_validate(path):
    cfg = load_config(path)
    assert cfg.prompts.neutral_prompts()


def test_named_sections():
    assert named_section("generators", "sd15")["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(ConfigError, match=r"'sd-15' is neither a YAML file nor a name in configs/generators/; "
                                          r"did you mean 'sd15'\?"):
        named_section("generators", "sd-15")
