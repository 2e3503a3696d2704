"""The problem reporters every config section's `problems()` uses: each appends one message naming the key, its value
and the valid range (engine/config/schema.py)."""

from __future__ import annotations

import math


def choice(problems: list[str], where: str, value: str, valid: tuple[str, ...]) -> None:
    """Append a problem when `value` is not one of `valid`."""
    if value not in valid:
        problems.append(f"{where} = {value!r}; valid: {', '.join(valid)}")


def need(problems: list[str], where: str, value: object, ok: bool, rule: str) -> None:
    """Append `<where> = <value>; <rule>` unless `ok`."""
    if not ok:
        problems.append(f"{where} = {value}; {rule}")


def need_num(problems: list[str], where: str, value: float, ok: bool, rule: str) -> None:
    """Append a problem when `value` is not finite, else when not `ok` (`<where> = <value>; <rule>`)."""
    if _finite(problems, where, value):
        need(problems, where, value, ok, rule)


def _finite(problems: list[str], where: str, value: float) -> bool:
    if not math.isfinite(value):
        problems.append(f"{where} = {value}; must be a finite number")
        return False
    return True
