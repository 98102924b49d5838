"""Typed configuration: dataclasses with ``help`` metadata that YAML (or a dict) only fills.

Every config in the toolkit is a dataclass whose fields are declared with :func:`option`. :func:`from_dict` builds
one from plain data and rejects unknown keys (with a "did you mean") and values of the wrong type, naming the full
dotted key, so a typo in a YAML file fails before any model is loaded.

Every command reads its config the same way, with :func:`read_config`: the YAML file (:func:`load_yaml`), sections
given by name replaced by the shipped file they name (:func:`resolve_named`, fields declared with
``option(named=...)``), then the command line's ``--set KEY=VALUE`` overrides (:func:`parse_sets`,
:func:`apply_overrides`), then strict validation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from generators.errors import ConfigError, UserError, did_you_mean
from generators.resources import named_config, project_path

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           named: str | None = None, finite: bool = True) -> Any:
    """Declare a config field with its ``help`` text (shown by ``debias config --explain`` and in errors).

    Args:
        default, default_factory: As for :func:`dataclasses.field`.
        help: One line saying what the field does.
        named: For a section: the folder of ``configs/`` in which a string value names a shipped YAML file
            (``generator: janus-pro-1b`` reads ``configs/generators/janus-pro-1b.yaml``); a path to a YAML file
            works too.
        finite: Numbers in the field must be finite (the default). YAML reads ``.nan`` and ``.inf`` as floats, and a
            NaN guidance scale or temperature gives images that look real but are not; only a field that gives
            infinity a meaning may set this to False.
    """
    metadata = {"help": help, **({"named": named} if named else {}), **({} if finite else {"finite": False})}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def named_section(kind: str, value: Any) -> Any:
    """A section given as a YAML path or as a name in ``configs/<kind>/`` is replaced by that file's mapping."""
    if not isinstance(value, str):
        return value
    path = project_path(value)
    return load_yaml(path if path.is_file() else named_config(kind, value))


def resolve_named(cls: type, data: Any) -> Any:
    """``data`` (a copy) with every section of ``cls`` that is given by name replaced by its file's mapping.

    Runs before overrides, so ``--set generator.device=cpu`` applies to the file ``generator: lab`` names.
    """
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        if f.metadata.get("named"):
            out[f.name] = named_section(f.metadata["named"], out[f.name])
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(out[f.name], dict):
            out[f.name] = resolve_named(hints[f.name], out[f.name])
    return out


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["train.sft.max_steps=50", ...]`` (the CLI's ``--set``) -> ``{"train.sft.max_steps": 50}``.

    Values are read as YAML (``50`` is an integer, ``[a, b]`` a list, ``null`` None); a value that is not valid YAML
    is kept as the string it is.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set images_per_prompt=16")
        try:
            out[key.strip()] = yaml.load(value, Loader=_StrictLoader)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def apply_overrides(data: dict, overrides: Mapping[str, Any] | None) -> dict:
    """Config data with dotted-key ``overrides`` applied (a copy; ``data`` is not modified).

    Keys are dotted paths from the root (``images_per_prompt``, ``generator.sampling.guidance_scale``). ``None``
    values are skipped (unset CLI flags); a mapping value is merged into the section it names.

    Raises:
        ConfigError: when a key runs through a value that is not a section.
    """
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section (it holds {child!r})")
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return data


def read_config(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
    """Read config ``cls`` from a YAML file: named sections resolved, ``overrides`` applied, strictly validated.

    Args:
        cls: The config dataclass (e.g. the experiment config).
        path: The YAML file.
        overrides: Dotted keys -> values (see :func:`apply_overrides`), e.g. from ``--set``.

    Raises:
        ConfigError: naming the file or the dotted key, the bad value and the fix.
    """
    return from_dict(cls, apply_overrides(resolve_named(cls, load_yaml(path)), overrides))


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one",
                        key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)



# YAML 1.1 (PyYAML) reads 1e-4 as the string "1e-4": floats need a dot there. Configs and --set values take YAML 1.2
# floats, so a learning rate written as people write it is a number.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))

def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file on any problem (missing, unreadable, not
    UTF-8, not YAML, a key given twice, not a mapping)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; pass the path of a YAML file (see configs/)")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file (see configs/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read ({err.strerror or err}); check its permissions") \
            from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _not_finite(value: Any, key: str) -> ConfigError:
    return ConfigError(f"config key '{key}': {value!r} is not a finite number; use a finite number")


def _check_finite(value: Any, key: str) -> None:
    """Raise for a NaN or infinite float anywhere inside free-form data (an ``Any`` field, e.g. sampling extras)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _not_finite(value, key)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def _coerce(value: Any, tp: Any, key: str, finite: bool = True) -> Any:
    """Check ``value`` against annotation ``tp`` and return it (converted where lossless, e.g. int -> float).

    With ``finite`` (the default, see :func:`option`) a float must be finite, in free-form (``Any``) data too.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        if finite:
            _check_finite(value, key)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, finite)
            except ConfigError as err:
                errors.append((arg, err))
        if isinstance(value, float) and not math.isfinite(value) and float in args:
            raise _not_finite(value, key)
        # A union with one config section (``int | ImagesPlan``): a mapping gets that section's error (it names the
        # key inside), anything else the error of the one plain alternative ("expected an integer, got 'many'").
        sections = [err for arg, err in errors if dataclasses.is_dataclass(arg)]
        plain = [err for arg, err in errors if not dataclasses.is_dataclass(arg)]
        if len(sections) == 1 and (isinstance(value, dict) or len(plain) == 1):
            raise sections[0] if isinstance(value, dict) else plain[0]
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}': {value!r} is not one of {list(args)}{did_you_mean(value, map(str, args))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}", finite) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if finite and not math.isfinite(value):
            raise _not_finite(value, key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build config dataclass ``cls`` from ``data``; unknown keys, missing required keys and wrong types raise.

    Args:
        cls: A dataclass whose fields were declared with :func:`option`.
        data: Plain data, e.g. one section of a YAML file.
        prefix: Dotted key of ``data`` inside the whole config, used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: naming the dotted key, the bad value and the fix.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or cls.__name__}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (prefix + ".") if prefix else ""
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"config key '{dotted}{key}' is unknown{did_you_mean(key, fields)}; "
                f"known keys: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = named_section(f.metadata["named"], data[name]) if f.metadata.get("named") else data[name]
            kwargs[name] = _coerce(value, hints[name], dotted + name, f.metadata.get("finite", True))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{dotted}{name}' is required: {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config '{prefix or cls.__name__}': {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (dataclasses, tuples and paths become dicts, lists and strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def explain(cls: type, prefix: str = "") -> list[str]:
    """One line per field, ``key (type, default): help``, recursing into nested config dataclasses."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.extend(explain(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            "required" if f.default_factory is dataclasses.MISSING else repr(f.default_factory()))
        lines.append(f"{key} ({_type_name(tp)}, default {default}): {f.metadata.get('help', '')}")
    return lines
