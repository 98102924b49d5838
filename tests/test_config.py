from dataclasses import dataclass

import pytest

from generators.backends import GENERATORS
from generators.base import GeneratorConfig
from generators.config import ConfigError, explain, from_dict, option
from generators.registry import Registry


@dataclass
class Inner:
    steps: int = option(10, help="steps")
    rate: float = option(0.5, help="rate")


@dataclass
class Outer:
    name: str = option(help="required name")
    inner: Inner = option(default_factory=Inner, help="nested")
    tags: list[str] = option(default_factory=list, help="tags")
    maybe: int | None = option(None, help="optional int")


def test_from_dict_fills_and_converts():
    cfg = from_dict(Outer, {"name": "x", "inner": {"steps": 3, "rate": 1}, "tags": ["a"], "maybe": 4})
    assert cfg.inner.steps == 3 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.tags == ["a"] and cfg.maybe == 4


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"name": "x", "inner": {"stepz": 3}})
    assert str(err.value) == "config key 'inner.stepz' is unknown; did you mean 'steps'?; known keys: rate, steps"


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"^config key 'inner.steps': expected an integer, got 'many'$"):
        from_dict(Outer, {"name": "x", "inner": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"config key 'inner.steps': expected an integer, got True"):
        from_dict(Outer, {"name": "x", "inner": {"steps": True}})
    with pytest.raises(ConfigError, match=r"config key 'maybe': expected"):
        from_dict(Outer, {"name": "x", "maybe": "no"})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"^config key 'name' is required: required name$"):
        from_dict(Outer, {})


def test_explain_lists_nested_keys_with_help():
    lines = explain(Outer)
    assert "inner.steps (int, default 10): steps" in lines
    assert "name (str, default required): required name" in lines


def test_registry_did_you_mean():
    with pytest.raises(ConfigError) as err:
        GENERATORS.get("janos")
    assert str(err.value) == ("unknown generator backend 'janos'; did you mean 'janus'?; available: diffusers, emu3, "
                              "janus, lab")
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(float)


def test_generator_config_checks_values():
    with pytest.raises(ConfigError, match="generator.batch_size"):
        from_dict(GeneratorConfig, {"backend": "janus", "batch_size": 0}, prefix="generator")
