"""Scorer plug-ins behind one interface (engine/eval/scorers/base.py), looked up by name.

Built-in scorers are imported on first use (one line each in `_BUILTIN`), so validating a config does not import
transformers; a miniature world registers its own (`<world>:<name>`, e.g. `toy:task`) when the world is found by
its prefix, and any other plug-in calls `register_scorer` before the config is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.eval.scorers.base import BaseScorer, Scorer, ScorerError

if TYPE_CHECKING:
    import torch

__all__ = ["BaseScorer", "Scorer", "ScorerEntry", "ScorerError", "build_scorer", "find_scorer", "register_scorer",
           "scorer_names"]

WEIGHTS = ("dir", "url", "none")

_BUILTIN: dict[str, str] = {
    "pickscore": "engine.eval.scorers.clip",
    "clip": "engine.eval.scorers.clip",
    "aesthetic": "engine.eval.scorers.clip",
    "ocr": "engine.eval.scorers.ocr",
    "geneval": "engine.eval.scorers.geneval",
    "geneval_reward": "engine.eval.scorers.geneval",
    "deqa": "engine.eval.scorers.server",
    "unifiedreward": "engine.eval.scorers.server",
}


@dataclass(frozen=True)
class ScorerEntry:
    """A registered scorer: how to build it and what its path names."""
    name: str
    build: Callable[[str, torch.device], Scorer]
    """(path, device) -> the scorer."""
    weights: str = "dir"
    """dir (a local weights dir), url (a remote server), none (nothing to load)."""


_REGISTRY: dict[str, ScorerEntry] = {}


def register_scorer(name: str, build: Callable[[str, torch.device], Scorer], weights: str = "dir") -> None:
    """Make `build` selectable as scorer `name` (re-registering replaces)."""
    if weights not in WEIGHTS:
        raise ValueError(f"register_scorer({name!r}): weights = {weights!r}; valid: {', '.join(WEIGHTS)}")
    _REGISTRY[name] = ScorerEntry(name, build, weights)


def scorer_names() -> list[str]:
    """Every scorer name registered or built in (a world's appear once the world is looked up)."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def find_scorer(name: str) -> ScorerEntry | None:
    """The scorer called `name`, or None."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # its module calls register_scorer
    if name not in _REGISTRY and ":" in name:
        from engine.worlds import find_world

        find_world(name.split(":", 1)[0])  # a world's package registers its scorers when imported
    return _REGISTRY.get(name)


def build_scorer(name: str, path: str, device: torch.device) -> Scorer:
    """Scorer `name` loaded from `path` onto `device`; ScorerError listing the valid names for an unknown one."""
    entry = find_scorer(name)
    if entry is None:
        raise ScorerError(f"unknown scorer {name!r}; valid: {', '.join(scorer_names())}")
    return entry.build(path, device)
