"""The editing miniature world (DESIGN §4, issue 13): T2I + local edit + global edit on a tiny Z-Image model.

- `world`: scenes, prompts with task tags (`t2i`, `local_edit`, `global_edit`), renderer, edits, the imperfect base
  mixture, clean expert data, the fixed eval set;
- `rewards`: analytic rewards (T2I correctness; edit correctness and preservation), `score_row`;
- `model`: the transformer preset, prompt encoder, flow-matching loss over T2I and edit rows, `load_world()`;
- `eval`: deterministic ODE sampling from fixed noise and the table rows (`python -m engine.worlds.toy_edit.eval`);
- `trainset`: the OPD training set as a DanceOPD prompt CSV with PNG sources (`weights/train/`, `builtin:toy_edit`);
- `report`: the report (table, edits side by side, reward curves) and its `RewardCurve` callback.

Plugged into core code as the world `toy_edit` (engine/worlds): `toy_edit:<rel>` paths (the shipped files under
weights/), `builtin:toy_edit` prompts (the training CSV: edit rows with their source images), `data.encoder =
"toy_edit"` (the hash prompt encoder and the pixel source-image encoder), `report.world = "toy_edit"`.

Shipped rows (weights/eval.json; `nice -n 10 python scripts/train_toy_edit_world.py`, 10 unguided Euler steps, 2
samples x 72 eval items, mean ± std over noise seeds 0, 1, 2):

| row         | t2i         | local_edit  | global_edit | preservation | average     |
|-------------|-------------|-------------|-------------|--------------|-------------|
| base        | 0.480±0.024 | 0.174±0.013 | 0.620±0.041 | 0.797±0.009  | 0.518±0.013 |
| t2i         | 0.658±0.020 | 0.158±0.006 | 0.832±0.025 | 0.751±0.012  | 0.600±0.014 |
| local_edit  | 0.360±0.030 | 0.518±0.039 | 0.334±0.028 | 0.870±0.014  | 0.521±0.003 |
| global_edit | 0.265±0.009 | 0.000±0.000 | 1.000±0.000 | 0.713±0.003  | 0.494±0.002 |

Each expert beats the base on its own capability and loses to it elsewhere: the T2I expert keeps less of the source
(preservation -0.05, local -0.02; it does help relighting, whose time words it shares), the local-edit expert will
not relight (global -0.29) and draws worse (t2i -0.12), the global-edit expert repaints everything (local 0.00).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.worlds import register_world

if TYPE_CHECKING:
    from engine.backends.base import ImageEncoder, TextEncoder
    from engine.config.schema import Config

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class ToyEditWorld:
    """The editing miniature world as a plug-in (engine.worlds.World)."""

    name = "toy_edit"

    def resolve(self, rel: str) -> Path:
        """`toy_edit:<rel>` -> the shipped file engine/worlds/toy_edit/weights/<rel>."""
        return WEIGHTS_DIR / rel

    def train_prompts(self) -> Path:
        """The training CSV (`builtin:toy_edit`: 24 T2I prompts, 144 local and 144 global edits with their source
        images), checked against its SHA256SUMS first."""
        from engine.files import verify_sha256sums
        from engine.worlds.toy_edit.trainset import CSV_NAME, TRAIN_DIR

        if bad := verify_sha256sums(TRAIN_DIR):
            raise ValueError("; ".join(bad))
        return TRAIN_DIR / CSV_NAME

    def encoder(self) -> TextEncoder:
        """The world's prompt encoder (`data.encoder = "toy_edit"`): the backend's hash encoder, 16 tokens."""
        from engine.worlds.toy_edit.model import new_encoder

        return new_encoder()

    def image_encoder(self) -> ImageEncoder:
        """Source images are the latents (3 x 16 x 16, no VAE): the backend's pixel encoder."""
        from engine.backends.zimage.encoders import PixelImageEncoder
        from engine.worlds.toy_edit.model import LATENT_SHAPE

        return PixelImageEncoder(LATENT_SHAPE)

    def config_problems(self, config: Config) -> list[str]:
        """The report samples the world's eval items with its encoder on its Z-Image base."""
        out = []
        if config.data.encoder != self.name:
            out.append(f"report.world = 'toy_edit' scores the world's eval items with its own encoder: it needs "
                       f"data.encoder = 'toy_edit' (got {config.data.encoder!r})")
        if config.model.family != "zimage":
            out.append(f"report.world = 'toy_edit' is a Z-Image world: it needs model.family = 'zimage' "
                       f"(got {config.model.family!r})")
        return out

    def callbacks(self, config: Config) -> Sequence[Callable[[Any, int], None]]:
        """The reward curve (`report.eval_every`)."""
        from engine.worlds.toy_edit.report import RewardCurve

        return [RewardCurve(config)] if config.report.eval_every else []

    def write_report(self, config: Config, runs: Sequence[tuple[str, Config]]) -> str:
        """The table of base, experts, merges, guided fields and the students of `runs`; report.md/.json, samples,
        curves."""
        from engine.worlds.toy_edit.report import write_report

        return write_report(config, runs)


register_world(ToyEditWorld())
