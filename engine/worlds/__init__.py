"""Miniature worlds as plug-ins (DESIGN §4): a world ships its prompts, text encoder, weights, rewards and report,
and core code reaches it only through this registry, by the name a config uses:

- `<world>:<rel>` config paths (`model.path = "toy:base"`) -> `World.resolve(rel)`;
- `data.prompts = "builtin:<world>"` -> `World.train_prompts()` (`[task] text` lines, or a prompt file of the
  world's own, e.g. edit rows with their source images);
- `data.encoder = "<world>"` -> `World.encoder()` (and `World.image_encoder()` for edit rows' source images);
- `report.world = "<world>"` -> `World.config_problems`, `World.callbacks` (reward curves), `World.write_report`.

Built-in worlds are imported on first use (one line each in `_BUILTIN`); others call `register_world`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.backends.base import ImageEncoder, TextEncoder
    from engine.config.schema import Config

_BUILTIN: dict[str, str] = {
    "toy": "engine.worlds.toy",
    "toy_edit": "engine.worlds.toy_edit",
}
_REGISTRY: dict[str, World] = {}


class World(Protocol):
    """One miniature world."""

    name: str

    def resolve(self, rel: str) -> Path:
        """The shipped file `<name>:<rel>` names."""
        ...

    def train_prompts(self) -> list[str] | Path:
        """The training prompt set of `data.prompts = "builtin:<name>"`: `[task] text` lines, or a prompt file
        (.csv / .jsonl, read like a user's: e.g. edit rows with their source images)."""
        ...

    def encoder(self) -> TextEncoder:
        """The world's text encoder (`data.encoder = "<name>"`)."""
        ...

    def image_encoder(self) -> ImageEncoder:
        """The world's source-image encoder for edit rows (`data.encoder = "<name>"`); ValueError when the world has
        no edit rows."""
        ...

    def config_problems(self, config: Config) -> list[str]:
        """What the world's report needs of a config that sets `report.world = "<name>"`."""
        ...

    def callbacks(self, config: Config) -> Sequence[Callable[[Any, int], None]]:
        """Step callbacks for a run of `config` on rank 0 (e.g. the reward curve of `report.eval_every`)."""
        ...

    def write_report(self, config: Config, runs: Sequence[tuple[str, Config]]) -> str:
        """Measure every row (base, experts, merges, the students of `runs`) and write the report; its markdown."""
        ...


def register_world(world: World) -> None:
    """Make `world` reachable by its name (re-registering replaces)."""
    _REGISTRY[world.name] = world


def world_names() -> list[str]:
    """Every world name, built-in and registered."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def find_world(name: str) -> World | None:
    """The world called `name`, or None."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # its __init__ calls register_world
    return _REGISTRY.get(name)


def get_world(name: str) -> World:
    """The world called `name`; KeyError listing the valid names."""
    world = find_world(name)
    if world is None:
        raise KeyError(f"unknown miniature world {name!r}; valid: {', '.join(world_names())}")
    return world
