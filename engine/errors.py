"""The errors the engine raises on purpose: each ends a run with its message (exit 1), not a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem found, one per line (exit 2, nothing written)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class CheckpointError(RuntimeError):
    """A checkpoint or run dir that cannot be written or resumed as asked (names the dir or file)."""


class ModelLoadError(RuntimeError):
    """A model dir that cannot be loaded as asked (the message names the file)."""


class AdapterError(ValueError):
    """A LoRA adapter file that cannot be loaded as asked (names the file and the problem)."""


class RoutingError(ValueError):
    """Prompts and routes that do not fit together (a task without a route, nothing to train on)."""
