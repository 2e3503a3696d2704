"""The problem-reporting helpers every config section uses (`choice`, `need`, `need_num`): each appends one
`<key> = <value>; <rule>` line, so a section's `problems()` reports every bad key with its valid range at once."""

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
    if finite(problems, where, value):
        need(problems, where, value, ok, rule)


def finite(problems: list[str], where: str, value: float) -> bool:
    """True when `value` is finite; else append `<where> = <value>; must be a finite number`."""
    if not math.isfinite(value):
        problems.append(f"{where} = {value}; must be a finite number")
        return False
    return True
