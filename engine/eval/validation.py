"""Validation during training: decoded samples from fixed prompts and noise, held-out scores, the best checkpoint
and the reward-hacking alarm. A step callback of `Trainer.train` (engine/eval/callbacks.py wires it), rank 0 only.

Every `validation.every` optimizer steps (before the first step of a fresh run and after the last), rank 0:
1. samples every prompt once per seed from the same noise (engine/eval/sampling.py) with the live student's
   velocity through the run's own field evaluator (`TrainingView.student_velocity`, CFG by `cfg_scale`), under the
   weights that `weights()` puts in place (the live student; EMA weights once engine/ema.py lands: pass its swap as
   `weights`, see docs/evaluation.md), Euler ODE on the run's schedule shift;
2. decodes them with the family's VAE and writes `<run>/validation/step_<N>.png` (one row per prompt, one column
   per seed; N = optimizer steps finished, 8 digits) and the tracker image `validation/samples`;
3. scores them with `validation.scorers`, appends `{"step": N, <scorer>: value, ..., "alarm": bool}` to
   `<run>/validation/scores.jsonl` and logs `validation/<scorer>` scalars;
4. with `validation.select`, exports the student to `<run>/export-best/` (atomically, as export/) when the score
   beats every earlier validation, and records it in `<run>/validation/best.json`;
5. raises the alarm (a warning and `validation/alarm` = 1) when `alarm_quality` fell by more than `alarm_drop` of
   its best value while `alarm_reward` is above its value at that best.

The other ranks go on to the next collective and wait there for rank 0, i.e. for the validation's duration: it
must stay below the collective timeout (FLOWOPD_DIST_TIMEOUT, default 1800 s; engine/distributed.py). Each
validation's time is logged (`validation/seconds`) and a warning names both numbers when it passes half the timeout.

Resume: lines of scores.jsonl after the checkpoint the run resumes from are dropped (the resumed run recomputes
them, bit for bit, and rewrites export-best if one of them was the best), so the curve has one point per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from engine.backends.base import ModelBackend, ModelSpec
from engine.config.io import resolve_path
from engine.config.schema import Config
from engine.eval.prompts import EvalPrompt, from_lines, load_eval_prompts
from engine.eval.sampling import eval_noise, grid, make_decoder, sample_images, save_png
from engine.eval.scorers import build_scorer
from engine.eval.scorers.base import Scorer
from engine.eval.scoring import score_set
from engine.eval.trackers import Trackers
from engine.files import write_atomic

log = logging.getLogger("flowopd.validation")

VALIDATION_DIR = "validation"
SCORES_FILE = "scores.jsonl"
BEST_FILE = "best.json"
EXPORT_BEST = "export-best"
TIMEOUT_WARN_FRACTION = 0.5

WeightsScope = Callable[[], AbstractContextManager[Any]]
"""`with weights():` the student weights validation samples and exports (default: the live ones)."""


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The rows of a scores.jsonl by step (the last line of a step wins; a line torn by a kill is skipped)."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return [rows[s] for s in sorted(rows)]


def alarm(history: Sequence[Mapping[str, Any]], now: Mapping[str, Any], quality: str, reward: str,
          drop: float) -> str | None:
    """The reward-hacking alarm's message, or None: `quality` now is more than `drop` of its best earlier value
    below it while `reward` is above its value at that best."""
    earlier = [r for r in history if _num(r.get(quality)) and _num(r.get(reward))]
    if not earlier or not (_num(now.get(quality)) and _num(now.get(reward))):
        return None
    ref = max(earlier, key=lambda r: r[quality])
    q0, q, r0, r = ref[quality], now[quality], ref[reward], now[reward]
    fell = (q0 - q) / abs(q0) if q0 else 0.0
    if fell > drop and r > r0:
        return (f"reward hacking? {quality} fell {fell:.0%} (from {q0:.4g} at step {ref['step']} to {q:.4g}) while "
                f"{reward} rose from {r0:.4g} to {r:.4g}; alarm threshold validation.alarm_drop = {drop:g}")
    return None


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def validation_prompts(config: Config) -> list[EvalPrompt]:
    """The prompts of [validation] (`prompts`, or the first `num_prompts` of `prompt_file`)."""
    v = config.validation
    if v.prompts:
        return from_lines(list(v.prompts))
    return load_eval_prompts(str(resolve_path(v.prompt_file)), v.num_prompts)  # `<world>:<rel>` paths resolve


class Validation:
    """The validation step callback (module docstring)."""

    def __init__(self, config: Config, backend: ModelBackend, spec: ModelSpec, device: torch.device,
                 start_step: int, trackers: Trackers, export_best: Callable[[Path], Any] | None = None,
                 weights: WeightsScope = nullcontext, timeout_s: float = 1800.0):
        from engine.data.cache import load_or_build
        from engine.data.text import build_text_encoder

        v = self.settings = config.validation
        self.every, self.total, self.shift = v.every, config.train.steps, config.rollout.shift
        self.device, self.trackers, self.weights, self.timeout_s = device, trackers, weights, timeout_s
        self.export_best = export_best
        self.dir = Path(config.output_dir) / VALIDATION_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prompts = validation_prompts(config)
        write_atomic(self.dir / "prompts.txt", "".join(p.text + "\n" for p in self.prompts))
        rows = [p for p in self.prompts for _ in v.seeds]
        encoder = build_text_encoder(config.data.encoder, backend, spec, config.data.max_sequence_length)
        emb = load_or_build(encoder, [p.text for p in self.prompts], self.dir / "prompt_cache.safetensors",
                            backend.cond_type)
        del encoder  # a real pipeline's encoders (T5-XXL) are not kept: the cache holds what validation needs
        self.cond = emb.cond([p.text for p in rows])
        self.rows = rows
        self.noise = eval_noise(len(self.prompts), v.seeds, 1, spec.latent_shape)
        model_dir = resolve_path(config.model.path) if config.model.path else None
        self.decode = make_decoder(backend, model_dir, spec.latent_shape, device)
        scorer_device = device if v.scorer_device == "train" else torch.device("cpu")
        self.scorers: dict[str, Scorer] = {n: build_scorer(n, p, scorer_device) for n, p in v.scorers.items()}
        # points after the checkpoint we resume from are recomputed: drop them (a kill keeps the old file, never half)
        self.history = [r for r in read_scores(self.dir / SCORES_FILE) if r["step"] <= start_step]
        write_atomic(self.dir / SCORES_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history))
        self.best = max((r[v.select] for r in self.history if _num(r.get(v.select))), default=-math.inf)

    def due(self, step: int) -> bool:
        """After `step` finished optimizer steps (0 = before the first)."""
        return self.every > 0 and (step % self.every == 0 or step == self.total)

    def __call__(self, view: Any, step: int) -> None:
        """Validate after `step` finished steps when due (`view`: engine.trainer.TrainingView)."""
        if view.rank != 0 or not self.due(step):
            return
        t0 = time.perf_counter()
        v = self.settings
        with self.weights():
            def velocity(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
                return view.student_velocity(x, sigma, cond, cfg_scale=v.cfg_scale)

            with torch.no_grad():
                images = sample_images(velocity, self.cond, self.noise, self.decode, v.steps, self.shift, v.batch,
                                       self.device)
            scored = score_set(self.scorers, images, self.rows) if self.scorers else None
            row: dict[str, Any] = {"step": step, **(scored.values if scored else {})}
            improved = bool(v.select) and _num(row.get(v.select)) and row[v.select] > self.best
            if improved:
                if self.export_best is not None:
                    self.export_best(self.dir.parent / EXPORT_BEST)
                self.best = row[v.select]
                write_atomic(self.dir / BEST_FILE, json.dumps({"step": step, "select": v.select,
                                                               "value": self.best}) + "\n")
        message = alarm(self.history, row, v.alarm_quality, v.alarm_reward, v.alarm_drop) if v.alarm_quality else None
        row["alarm"] = message is not None
        if message:
            log.warning("step %d: %s", step, message)
        canvas = grid(images, rows=len(self.prompts))
        scale = max(1, 128 // images.shape[-1])  # the miniature worlds' 16 px images shown at 128 px
        save_png(canvas, self.dir / f"step_{step:08d}.png", scale)
        with (self.dir / SCORES_FILE).open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        self.history.append(row)
        seconds = time.perf_counter() - t0
        self.trackers.image("validation/samples", canvas, step)
        scalars = {f"validation/{k}": float(val) for k, val in row.items() if k != "step" and _num(val)}
        self.trackers.scalars({**scalars, "validation/alarm": float(row["alarm"]), "validation/seconds": seconds},
                              step)
        if improved:
            self.trackers.scalars({f"validation/best_{v.select}": self.best}, step)
        self.trackers.flush()
        log.info("step %d validation (%.1f s): %s", step, seconds,
                 " ".join(f"{k} {val:.4g}" for k, val in row.items() if k != "step" and _num(val)) or "images only")
        if seconds > TIMEOUT_WARN_FRACTION * self.timeout_s:
            log.warning("validation took %.0f s, %.0f%% of the collective timeout (FLOWOPD_DIST_TIMEOUT = %.0f s): "
                        "the other ranks wait that long at their next collective; use fewer validation prompts or "
                        "seeds, or raise FLOWOPD_DIST_TIMEOUT", seconds, 100 * seconds / self.timeout_s,
                        self.timeout_s)
