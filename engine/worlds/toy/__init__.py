"""The embedded T2I miniature world (DESIGN §4): the default main job's data, rewards and shipped weights.

- `engine.worlds.toy.world`: prompts with task tags, renderer, train/eval prompt sets (`train_prompts`,
  `eval_prompts`, `task_of`, TASKS).
- `engine.worlds.toy.rewards`: analytic per-task rewards, `quality`, `score_row` (the table row).
- `engine.worlds.toy.encoder.ToyTextEncoder`: `encode(prompts) -> SD3Cond`, `from_pretrained(dir)`.
- `engine.worlds.toy.model`: the transformer config, `load_toy()` (base + experts + encoder), EXPERTS.
- `engine.worlds.toy.eval`: sampling and the table row of any adapter (`python -m engine.worlds.toy.eval`).
- `engine.worlds.toy.report`: the report (table, samples, reward curves) and the `RewardCurve` callback.
- `engine.worlds.toy.scorers`: the rewards as engine.eval scorers (`toy:task`, `toy:quality`).

Plugged into core code as the world `toy` (engine/worlds): `toy:<rel>` paths, `builtin:toy` prompts,
`data.encoder = "toy"`, `report.world = "toy"`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.worlds import register_world
from engine.worlds.toy.scorers import register as register_scorers

if TYPE_CHECKING:
    from engine.backends.base import ImageEncoder, TextEncoder
    from engine.config.schema import Config

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class ToyWorld:
    """The T2I miniature world as a plug-in (engine.worlds.World)."""

    name = "toy"

    def resolve(self, rel: str) -> Path:
        """`toy:<rel>` -> the shipped file engine/worlds/toy/weights/<rel>."""
        return WEIGHTS_DIR / rel

    def train_prompts(self) -> list[str]:
        """The 132 training prompts (`builtin:toy`)."""
        from engine.worlds.toy.world import train_prompts

        return train_prompts()

    def encoder(self) -> TextEncoder:
        """The shipped text encoder (`data.encoder = "toy"`)."""
        from engine.worlds.toy.encoder import ToyTextEncoder

        return ToyTextEncoder.from_pretrained()

    def image_encoder(self) -> ImageEncoder:
        """The T2I world has no edit rows: ValueError."""
        raise ValueError("the toy world has no edit rows (no source-image encoder); see the toy_edit world")

    def config_problems(self, config: Config) -> list[str]:
        """The report scores the world's eval prompts with its rewards: it needs the world's encoder."""
        if config.data.encoder != self.name:
            return [f"report.enabled / report.eval_every score the miniature world's eval prompts with its rewards, "
                    f"so they need data.encoder = 'toy' (got {config.data.encoder!r})"]
        return []

    def callbacks(self, config: Config) -> Sequence[Callable[[Any, int], None]]:
        """The reward curve (`report.eval_every`)."""
        from engine.worlds.toy.report import RewardCurve

        return [RewardCurve(config)] if config.report.eval_every else []

    def write_report(self, config: Config, runs: Sequence[tuple[str, Config]]) -> str:
        """The table of base, experts, merges and the students of `runs`; report.md/.json, samples, curves."""
        from engine.worlds.toy.report import write_report

        return write_report(config, runs)


register_world(ToyWorld())
register_scorers()
