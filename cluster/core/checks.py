"""Field checks shared by every config section: each failure names the field, its value and
what is allowed, in one style (``section.field = value is not allowed: must be ...``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from cluster.core.errors import ConfigError

_UNITS = {"_us": "microseconds", "_s": "seconds", "_bytes": "bytes", "_gbps": "GB/s",
          "_tflops": "TFLOP/s", "_gflops": "GFLOP/s"}


def unit_of(name: str) -> str:
    """The unit a field's name carries (``latency_us`` -> ``microseconds``), or ''."""
    for suffix, unit in _UNITS.items():
        if name.endswith(suffix):
            return unit
    return ""


def finite(v: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


def check(section: str, name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        unit = unit_of(name)
        if unit and unit not in allowed and "second" not in allowed:
            allowed = f"{allowed} ({unit})"
        raise ConfigError(f"{section}.{name} = {value!r} is not allowed: must be {allowed}")


def positive(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(section, n, v, finite(v) and v > 0, "a finite number > 0")


def non_negative(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(section, n, v, finite(v) and v >= 0, "a finite number >= 0")


def integers(section: str, obj: Any, *names: str, minimum: int = 1) -> None:
    for n in names:
        v = getattr(obj, n)
        check(section, n, v, isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
               f"an integer >= {minimum}")


def coerce_value(section: str, key: str, want: Any, value: Any) -> Any:
    """Checks a raw value (TOML, ``--set``) against a field's declared type ``want`` (the
    annotation, a string under ``from __future__ import annotations``): integral floats become
    ints for int fields, ints become floats for float fields; anything else of the wrong type
    fails with the field, the value and what is allowed."""
    where = f"{section}.{key}"
    if want in ("int", int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} is not allowed: must be an integer")
    elif want in ("float", float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} is not allowed: must be a number")
        try:
            value = float(value)
        except OverflowError:  # an integer literal too large for a float
            value = math.inf
        if not math.isfinite(value):
            unit = f" ({unit_of(key)})" if unit_of(key) else ""
            raise ConfigError(f"{where} = {value!r} is not allowed: must be a finite number{unit}")
    elif want in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} is not allowed: must be true or false")
    elif want in ("str", str) and not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r} is not allowed: must be a string")
    return value


def close_matches(name: str, allowed: Iterable[str]) -> str:
    import difflib

    allowed = sorted(allowed)
    near = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"{', '.join(allowed)}{hint}"
