import re
from dataclasses import dataclass
from typing import Any

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
                              "janus, lab, lab-sd")
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(float)


def test_generator_config_checks_values():
    with pytest.raises(ConfigError, match="generator.batch_size"):
        from_dict(GeneratorConfig, {"backend": "janus", "batch_size": 0}, prefix="generator")


@dataclass
class Floats:
    rate: float = option(0.5, help="rate")
    maybe: float | None = option(None, help="optional")
    shares: list[float] = option(default_factory=list, help="shares")
    extra: dict[str, Any] = option(default_factory=dict, help="free-form")
    limit: float = option(1.0, help="may be infinite", finite=False)


@pytest.mark.parametrize("data,key", [
    ({"rate": float("nan")}, "rate"), ({"rate": float("inf")}, "rate"), ({"maybe": float("-inf")}, "maybe"),
    ({"shares": [0.5, float("nan")]}, "shares[1]"), ({"extra": {"eta": {"deep": [float("nan")]}}}, "extra.eta.deep[0]"),
])
def test_non_finite_numbers_are_rejected_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}': (nan|inf|-inf) is not a finite number; "
                                          "use a finite number$"):
        from_dict(Floats, data)


def test_a_field_may_declare_infinity_meaningful():
    assert from_dict(Floats, {"limit": float("inf")}).limit == float("inf")


def test_yaml_files_are_read_strictly(tmp_path):
    from generators.config import load_yaml

    twice = tmp_path / "twice.yaml"
    twice.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: key 'c' is given twice \(lines 3 and 4\); keep one"):
        load_yaml(twice)
    merge = tmp_path / "merge.yaml"
    merge.write_text("base: &b {x: 1, y: 2}\nmine:\n  <<: *b\n  y: 3\n")
    assert load_yaml(merge)["mine"] == {"x": 1, "y": 3}  # a merge key overridden is not a duplicate
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml' is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_yaml(latin)
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; configs and --set read it as the number people mean."""
    from generators.config import load_yaml, parse_sets

    assert parse_sets(["lr=3e-3", "n=50", "x=1E5", "name=e5", "lst=[1e-4, 2]"]) == {
        "lr": 0.003, "n": 50, "x": 100000.0, "name": "e5", "lst": [0.0001, 2]}
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nsteps: 10\n")
    assert load_yaml(path) == {"lr": 0.0001, "steps": 10}
