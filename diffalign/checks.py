"""Checks a config field declares next to its default, with `typing.Annotated`:

    lr: Annotated[float, POSITIVE] = 1e-4
    mixed_precision: Annotated[str, OneOf("no", "bf16", "fp16")] = "no"
    beta: Annotated[float, KL_STRENGTH] = 5000.0

Each check's `problem(value)` returns None when the value is allowed, else the words after "key=value: " in the
one-line error (e.g. "must be > 0"); `rule` is what `--help` shows. diffalign.schema runs them when a config loads.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any


class Check:
    """Base of the checks (so the loader finds them among other Annotated metadata)."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError

    def rule(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Check):
    """A number within bounds: Range(gt=0), Range(ge=0, le=1), ..."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def bounds(self) -> list[tuple[str, float]]:
        ops = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        return [(op, getattr(self, name)) for name, op in ops if getattr(self, name) is not None]

    def problem(self, value: Any) -> str | None:
        if all(COMPARE[op](value, bound) for op, bound in self.bounds()):
            return None
        return "must be " + self.rule()

    def rule(self) -> str:
        return " and ".join(f"{op} {bound:g}" for op, bound in self.bounds())


COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class OneOf(Check):
    """One of fixed options, or of a registry's keys read at check time (OneOf(OBJECTIVES), so a name registered
    later counts), less `exclude`, plus `extra` fixed options; a list value is checked item by item. With
    `allow_empty`, "" (meaning "none" / "the default") is accepted too."""

    def __init__(
        self,
        *options: str | Mapping,
        allow_empty: bool = False,
        exclude: Collection[str] = (),
        extra: tuple[str, ...] = (),
    ):
        self.source = options[0] if len(options) == 1 and isinstance(options[0], Mapping) else tuple(options)
        self.allow_empty, self.exclude, self.extra = allow_empty, exclude, extra

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(k for k in self.source if k not in self.exclude) + self.extra

    def problem(self, value: Any) -> str | None:
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in self.options]
        if not bad or (self.allow_empty and value == ""):
            return None
        what = f"'{bad[0]}' is not known; " if isinstance(value, list) else ""
        close = difflib.get_close_matches(str(bad[0]), self.options, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return what + "must be " + self.rule() + hint

    def rule(self) -> str:
        return "one of " + ", ".join(self.options) + (' (or "")' if self.allow_empty else "")


@dataclass(frozen=True)
class KLStrength(Check):
    """β as a KL strength: > 0 (a negative β trains toward the rejected images; zero gives no gradient). The
    section's `allow_negative_beta: true` accepts β < 0, for tests that check the sign of a loss."""

    def problem(self, value: Any, allow_negative: bool = False) -> str | None:
        if value > 0 or (allow_negative and value < 0):
            return None
        return "must be > 0 (a KL strength; a negative beta trains toward the rejected images)"

    def rule(self) -> str:
        return "> 0"


@dataclass(frozen=True)
class NonEmpty(Check):
    """A list with at least one item."""

    def problem(self, value: Any) -> str | None:
        return None if value else "must name at least one"

    def rule(self) -> str:
        return "at least one"


KL_STRENGTH = KLStrength()
NON_EMPTY = NonEmpty()
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_1 = Range(ge=1)
PROBABILITY = Range(ge=0, le=1)
