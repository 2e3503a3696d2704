"""The evaluation table: one row per model, one column per scorer, and the Flow-OPD card's average.

The card (Flow-OPD README, "Key Results"; DESIGN §1) reports GenEval, OCR accuracy, DeQA (1-5) and PickScore (raw,
about 21-23) and averages them as mean(GenEval, OCR, DeQA / 5, PickScore / 26): base SD3.5-M .63 / .59 / 4.07 /
21.64 -> .72, Flow-OPD .92 / .94 / 4.35 / 23.08 -> .90. Scorers of the card are named by their card titles, in the
card's order, first; other scorers follow under their own names. `Average` is the card's average over the card
columns present (its title says which, when not all four are).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.files import write_atomic

CARD: dict[str, tuple[str, float]] = {
    "geneval": ("GenEval", 1.0), "ocr": ("OCR", 1.0), "deqa": ("DeQA", 1 / 5), "pickscore": ("PickScore", 1 / 26),
}
"""scorer name -> (column title, the card's normalisation in its average)."""
AVERAGE = "average"


def columns(scorers: Sequence[str]) -> list[str]:
    """Scorer names in table order: the card's columns in its order, then the others as given."""
    return [n for n in CARD if n in scorers] + [n for n in scorers if n not in CARD]


def card_average(values: Mapping[str, float]) -> float | None:
    """mean(GenEval, OCR, DeQA/5, PickScore/26) over the card scorers in `values`; None without any."""
    terms = [values[n] * scale for n, (_, scale) in CARD.items() if n in values and math.isfinite(values[n])]
    present = [n for n in CARD if n in values]
    if not present:
        return None
    return sum(terms) / len(terms) if len(terms) == len(present) else float("nan")


def average_title(scorers: Sequence[str]) -> str:
    """`Average`, or `Average (GenEval, OCR)` when not all four card columns are present."""
    present = [CARD[n][0] for n in CARD if n in scorers]
    return "Average" if len(present) == len(CARD) else f"Average ({', '.join(present)})"


def _cell(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def markdown(rows: Mapping[str, Mapping[str, float]], scorers: Sequence[str]) -> str:
    """The table as markdown: `| model | <columns> | Average |`."""
    cols = columns(scorers)
    titles = [CARD[c][0] if c in CARD else c for c in cols]
    has_avg = any(c in CARD for c in cols)
    if has_avg:
        titles.append(average_title(cols))
    lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for name, values in rows.items():
        cells = [_cell(values.get(c)) for c in cols] + ([_cell(values.get(AVERAGE))] if has_avg else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: Mapping[str, Mapping[str, float]], scorers: Sequence[str],
                settings: Mapping[str, Any], counts: Mapping[str, int]) -> str:
    """Write `out/table.md` and `out/table.json` (rows, settings, images scored per column); the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, scorers)
    notes = [f"- {CARD[c][0] if c in CARD else c}: {counts.get(c, 0)} images per row" for c in columns(scorers)]
    write_atomic(out / "table.md", text + "\n" + "\n".join(notes) + "\n")
    clean = {r: {k: (v if v is not None and math.isfinite(v) else None) for k, v in vals.items()}
             for r, vals in rows.items()}
    write_atomic(out / "table.json", json.dumps({"columns": columns(scorers), "rows": clean, "images": dict(counts),
                                                 "settings": dict(settings)}, indent=1, sort_keys=True) + "\n")
    return text
