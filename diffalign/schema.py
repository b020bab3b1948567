"""The config machinery: typed dataclass fields with declared checks (diffalign.checks), YAML + dotted overrides.

A field declares what it accepts next to its default, with `typing.Annotated`:

    lr: Annotated[float, POSITIVE] = 1e-4
    mixed_precision: Annotated[str, OneOf("no", "bf16", "fp16")] = "no"

`load_config` reads the YAML, applies `a.b=value` overrides, coerces every value to its field's type and runs the
checks; any failure is a ConfigError of one line naming the key, the value and what is allowed. Unknown keys get
the closest valid key ("did you mean ..."). A section whose keys depend on a choice (the objective: its dataclass
fields are the keys) declares `VARIANTS` (name -> dataclass) and keeps the chosen one's values in `params`.

YAML is read with YAML 1.2 booleans (only true/false): `no`, `off`, `on`, `yes` stay strings, so
`train.mixed_precision=no` means "no", and a bool field still accepts them. A value for a `str` field given on the
command line is taken verbatim. No exec/eval.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from diffalign.checks import Check, KLStrength
from diffalign.errors import DiffalignError


class ConfigError(DiffalignError, ValueError):
    """A config file or override is wrong; the message names the key (and the file)."""


def checks_of(cls: type) -> dict[str, list[Check]]:
    """field name -> the checks declared in its Annotated type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Check)]
            for f in dataclasses.fields(cls)}  # fmt: skip


def field_types(cls: type) -> dict[str, Any]:
    """field name -> its plain type (Annotated stripped)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------------------------
# Reading values


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and floats without a dot (1e-4)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
for _ch in "tTfF":
    _Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, [_ch])
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
FORMS = {list: "a list: key=[a,b] or key=a,b", dict: 'a mapping: key="{name: {arg: value}}"'}


def _parse_override(raw: str, typ: Any, where: str) -> Any:
    """The text after `key=`, read for the field's type: str verbatim, lists and mappings as YAML flow."""
    if typ is str or typing.get_args(typ) == (str, type(None)):
        return raw
    if raw == "":
        return ""
    try:
        return read_yaml(raw)
    except yaml.YAMLError:
        form = FORMS.get(typing.get_origin(typ))
        expected = f"; expected {form}" if form else ""
        raise ConfigError(f"{where}={raw}: cannot be read{expected}") from None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one value to the annotated type; raise ConfigError naming `where` and the value."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if typ is list or origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        if isinstance(value, str):  # "a,b" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r}: expected {FORMS[list]}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected {FORMS[dict]}")
        return dict(value)
    if typ is bool:
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if typ is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if typ is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f'{where}={value!r}: expected a string ("" for none)')
        return str(value)
    raise ConfigError(f"{where}: unsupported type {typ}")


def _check(value: Any, checks: list, where: str, allow_negative: bool = False) -> None:
    for check in checks:
        problem = check.problem(value, allow_negative) if isinstance(check, KLStrength) else check.problem(value)
        if problem:
            raise ConfigError(f"{where}={value!r}: {problem}")


def suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def variants_of(cls: type) -> dict[str, type] | None:
    """A section's VARIANTS (name -> dataclass whose fields are its further keys), or None."""
    return cls.__dict__.get("VARIANTS")


def _variant_fields(variant: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(variant)}


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, failing on unknown keys, wrong types and failed checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}={data!r}: expected a mapping of keys")
    types_, checks = field_types(cls), checks_of(cls)
    own = {k: v for k, v in data.items() if k in types_}
    rest = {k: v for k, v in data.items() if k not in types_}
    kwargs = {}
    for key, value in own.items():
        path = f"{where}.{key}" if where else key
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            base = _section_default(cls, key)  # e.g. OnlineConfig's objective defaults to name d3po
            kwargs[key] = from_dict(typ, {**base, **value} if isinstance(value, dict) else value or base, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
            _check(kwargs[key], checks[key], path)
    variants = variants_of(cls)
    if variants is None:
        for key in rest:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key '{path}'{suggest(key, list(types_))}")
        return cls(**kwargs)
    cfg = cls(**kwargs)
    cfg.params = _variant_params(cfg, variants, rest, where, set(types_) - {"params"})
    return cfg


def _variant_params(cfg: Any, variants: dict[str, type], data: dict[str, Any], where: str, own: set[str]) -> dict:
    """The chosen variant's settings (defaults, then the section's remaining keys), coerced and checked."""
    variant = variants[cfg.name]
    fields, types_, checks = _variant_fields(variant), field_types(variant), checks_of(variant)
    params = {key: default_of(f) for key, f in fields.items()}
    for key, value in data.items():
        path = f"{where}.{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{path}': {cfg.name} has no '{key}'{_variant_hint(key, cfg.name, variants, own)}"
            )
        params[key] = _coerce(value, types_[key], path)
    allow_negative = bool(getattr(cfg, "allow_negative_beta", False))
    for key, value in params.items():
        _check(value, checks[key], f"{where}.{key}", allow_negative)
    return params


def _variant_hint(key: str, name: str, variants: dict[str, type], own: set[str]) -> str:
    """Did you mean a key of this variant; else which other variant has such a key; else this one's keys."""
    mine = sorted(_variant_fields(variants[name]))
    close = difflib.get_close_matches(key, mine, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    if any(key in _variant_fields(variant) for variant in variants.values()):  # set for another objective
        return f" (its keys: {', '.join(mine) or 'none besides name'})"
    for other, variant in variants.items():
        close = difflib.get_close_matches(key, list(_variant_fields(variant)), n=1, cutoff=0.6)
        if close:
            return f" ('{close[0]}' is a key of {other})"
    return f"; its keys: {', '.join(mine + sorted(own))}"


def _section_default(cls: type, key: str) -> dict[str, Any]:
    """The non-default values of section `key`'s default in `cls` (a field default_factory may differ from the
    section class's own defaults)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    section = default_of(f)
    plain = type(section)()
    return {k: v for k, v in to_dict(section).items() if to_dict(plain).get(k) != v}


def default_of(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (default_factory called)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested dict (a variant section flattened: {name: smpo, gamma: 10.0, ...})."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif f.name == "params" and variants_of(type(cfg)) is not None:
            out.update(value)
        else:
            out[f.name] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict (validated against `cls` afterwards)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node, typ, section_default = data, cls, {}
        for i, key in enumerate(keys):
            name = ".".join(keys[: i + 1])
            valid = field_types(typ) if dataclasses.is_dataclass(typ) else None
            variants = variants_of(typ) if valid is not None else None
            if valid is not None and key not in valid and variants is None:
                raise ConfigError(f"unknown config key '{name}'{suggest(key, list(valid))}")
            leaf = valid.get(key) if valid is not None else Any
            if leaf is None:  # a key of the chosen variant: its type once the name is known
                chosen = variants.get(node.get("name", section_default.get("name", typ().name)))
                leaf = field_types(chosen).get(key, Any) if chosen is not None else Any
            if i == len(keys) - 1:
                node[key] = _parse_override(raw, leaf, name)
            else:
                if not dataclasses.is_dataclass(leaf):
                    raise ConfigError(f"config key '{name}' has no sub-keys")
                section_default = _section_default(typ, key)
                node = node.setdefault(key, {})
                typ = leaf
    return data


def check_moved(data: dict[str, Any], overrides: list[str], moved: dict[str, str]) -> None:
    """A key that has moved (`moved`: old dotted key -> new one), in the YAML or an override: one line naming both."""
    keys = [f"{section}.{key}" for section, values in data.items() if isinstance(values, dict) for key in values]
    keys += [item.split("=", 1)[0] for item in overrides]
    for key in keys:
        if key in moved:
            raise ConfigError(f"config key '{key}' has moved: it is '{moved[key]}' now")


def load_config(
    cls: type, path: str | Path | Any = None, overrides: list[str] | None = None, moved: dict[str, str] | None = None
) -> Any:
    """Read an optional YAML file (or take a `cls` object, for scripts), apply dotted overrides, validate into
    `cls`; the result is always a new, checked object. `moved`: old keys that are refused naming their new place."""
    data: dict[str, Any] = {}
    if isinstance(path, cls):
        data, path = to_dict(path), None
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    try:
        check_moved(data, list(overrides or []), moved or {})
        data = apply_overrides(data, list(overrides or []), cls)
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
