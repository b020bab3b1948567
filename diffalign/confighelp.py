"""Help text for `diffalign <command> --help`, generated from the config dataclasses: every key, grouped by
section, with its type, default, docstring (the string literal under the field) and allowed values."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from diffalign.schema import checks_of, default_of, field_types, variants_of


@functools.cache
def _module_classes(path: str) -> dict[str, ast.ClassDef]:
    """The top-level classes of a source file by name, parsed once (inspect.getsource parses the whole file for
    every class it is asked about: 0.15 s of CPU per `--help`)."""
    return {node.name: node for node in ast.parse(Path(path).read_text()).body if isinstance(node, ast.ClassDef)}


def field_docs(cls: type) -> dict[str, str]:
    """field name -> the string literal under it in the class body (its docstring), on one line; a subclass's own
    string wins over its bases' (OnlineTrainConfig's lr over OptimConfig's)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        klass = _module_classes(inspect.getsourcefile(cls)).get(cls.__qualname__)
    except (OSError, TypeError):
        return {}
    if klass is None:  # not a top-level class of its file
        return {}
    body, docs = klass.body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) is not None:
        return str(typ).replace("typing.", "")
    return "null" if typ is type(None) else typ.__name__


def _describe_fields(cls: type, prefix: str) -> list[str]:
    docs, types_, checks = field_docs(cls), field_types(cls), checks_of(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types_[f.name]) or (f.name == "params" and variants_of(cls) is not None):
            continue
        rule = "; ".join(c.rule() for c in checks[f.name])
        head = f"  {prefix}{f.name} ({_type_name(types_[f.name])}, default {default_of(f)!r})"
        lines.append(f"{head}: {docs.get(f.name, '')}" + (f" [{rule}]" if rule else ""))
    return lines


def describe(cls: type) -> str:
    """Every key of config class `cls`, grouped by section: `key (type, default): first doc line [allowed]`."""
    top = _describe_fields(cls, "")
    lines = ["top level:", *top, ""] if top else []
    for f in dataclasses.fields(cls):
        sub = field_types(cls)[f.name]
        if not dataclasses.is_dataclass(sub):
            continue
        lines += [f"{f.name}:", *_describe_fields(sub, f"{f.name}.")]
        for name, variant in (variants_of(sub) or {}).items():
            keys = _describe_fields(variant, f"{f.name}.")
            lines += [f"  with {f.name}.name={name}:", *(f"  {line}" for line in keys or ["  (no further keys)"])]
        lines.append("")
    return "\n".join(lines).rstrip()
