"""The worlds' report names each student's recipe: what a reader needs to reproduce the row (here: the EMA)."""

from __future__ import annotations

from pathlib import Path

from engine.config import load_config
from engine.worlds.report_common import student_lines

REPO = Path(__file__).resolve().parents[1]


def test_student_line_names_the_ema_only_when_it_is_on() -> None:
    config = REPO / "configs" / "toy_edit.toml"
    on = load_config(config, ["train.ema_decay=0.95", "train.ema_every=3"])
    off = load_config(config, ["train.ema_decay=0"])
    (line_on,), (line_off,) = student_lines([("s", on)]), student_lines([("s", off)])
    assert "EMA 0.95 every 3" in line_on
    assert "EMA" not in line_off
    assert line_on.replace(", EMA 0.95 every 3", "") == line_off
