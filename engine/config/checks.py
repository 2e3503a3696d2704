"""The problem-reporting helpers every config section uses (`choice`, `need`, `need_num`): each appends one
`<key> = <value>; <rule>` line, so a section's `problems()` reports every bad key with its valid range at once."""

from __future__ import annotations

import math

# Seeds are hashed into 63-bit generator seeds (engine/rng.py) and given to torch.manual_seed, which refuses values
# outside [-2^63, 2^64); a seed in [0, 2^63) is the same seed everywhere. TOML integers are 64-bit signed.
SEED_LIMIT = 1 << 63


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


def need_seed(problems: list[str], where: str, value: int, off: int | None = None) -> None:
    """Append a problem unless `value` is a seed in [0, 2^63) (or the `off` value that disables it)."""
    if value != off:
        rule = f"must be in [0, 2^63){f' or {off}' if off is not None else ''}"
        need(problems, where, value, 0 <= value < SEED_LIMIT, rule)
