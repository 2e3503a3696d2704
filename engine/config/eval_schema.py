"""[validation] and [tracking]: what a run shows while it trains (engine/eval, docs/evaluation.md).

Kept beside `schema.py` (which imports them into `Config`) so each table stays near its own checks; like every
section, `problems()` is pure: scorer names are checked against the scorer registry and scorer paths by the
preflight (engine/eval/checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.checks import choice, need, need_num

SCORER_DEVICES = ("train", "cpu")
WANDB_MODES = ("offline", "online")
SELECT_AVERAGE = "average"


@dataclass
class ValidationConfig:
    """[validation]: decoded samples from fixed prompts and noise during training, held-out scores, the best
    checkpoint and the reward-hacking alarm (rank 0; docs/evaluation.md)."""
    every: int = 0
    """Validate every N optimizer steps, before the first step of a fresh run and after the last; 0 = off (the
    other [validation] keys are then unused)."""
    prompts: list[str] = field(default_factory=list)
    """Validation prompts (`[task] text` lines work as in data.prompts); or set `prompt_file`."""
    prompt_file: str = ""
    """A prompt file instead of `prompts`: a GenEval `*_metadata.jsonl` (its rows feed the geneval scorer),
    .jsonl ({"prompt", "task"}), .txt (one prompt a line, e.g. Flow-OPD's dataset/ocr/test.txt) or
    `builtin:<name>`."""
    num_prompts: int = 0
    """Use the first N prompts of `prompt_file` (0 = all of them)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Noise seeds: every prompt is sampled once per seed from the same noise at every validation (one grid
    column per seed)."""
    cfg_scale: float = 1.0
    """Guidance scale of the validation samples (the student's own CFG; 1.0 = unguided)."""
    steps: int = 10
    """Euler ODE steps of a validation sample (the schedule of `rollout.shift`)."""
    batch: int = 8
    """Images per forward and per VAE decode (does not change the samples)."""
    scorers: dict[str, str] = field(default_factory=dict)
    """Held-out scores: scorer name -> its local weights dir (a URL for the server scorers deqa/unifiedreward,
    "" for scorers without weights such as a miniature world's); see docs/evaluation.md for the layouts."""
    scorer_device: str = "train"
    """Where the scorers run: train (the training device) or cpu."""
    select: str = ""
    """Keep `<output_dir>/export-best/`: the student of the validation with the highest value of this score (a
    name in `scorers`, or `average` for the Flow-OPD card's average); empty = off."""
    alarm_quality: str = ""
    """Reward-hacking alarm: the quality score to watch (a name in `scorers`, e.g. deqa or aesthetic)."""
    alarm_reward: str = ""
    """Reward-hacking alarm: the target reward (a name in `scorers`, e.g. geneval)."""
    alarm_drop: float = 0.1
    """Alarm when the quality score falls by more than this fraction of its best value while the reward is above
    its value at that best."""

    def problems(self) -> list[str]:
        """Impossible values of [validation] (scorer names and paths are checked by engine/eval/checks.py)."""
        p: list[str] = []
        need(p, "validation.every", self.every, self.every >= 0, "must be >= 0 (0 = off)")
        need(p, "validation.num_prompts", self.num_prompts, self.num_prompts >= 0, "must be >= 0 (0 = all)")
        need(p, "validation.steps", self.steps, self.steps >= 1, "must be >= 1")
        need(p, "validation.batch", self.batch, self.batch >= 1, "must be >= 1")
        need_num(p, "validation.cfg_scale", self.cfg_scale, self.cfg_scale >= 0, "must be >= 0")
        need_num(p, "validation.alarm_drop", self.alarm_drop, 0 < self.alarm_drop < 1, "must be in (0, 1)")
        choice(p, "validation.scorer_device", self.scorer_device, SCORER_DEVICES)
        if self.prompts and self.prompt_file:
            p.append("validation: set either `prompts` or `prompt_file`, not both")
        if self.every > 0 and not (self.prompts or self.prompt_file):
            p.append(f"validation.every = {self.every} needs validation.prompts or validation.prompt_file")
        if self.every > 0 and not self.seeds:
            p.append("validation.seeds is empty; give at least one noise seed, e.g. [0]")
        names = sorted(self.scorers)
        if self.select and self.select not in (*names, SELECT_AVERAGE):
            p.append(f"validation.select = {self.select!r}; valid: {', '.join([*names, SELECT_AVERAGE])}")
        for key in ("alarm_quality", "alarm_reward"):
            value = getattr(self, key)
            if value and value not in names:
                p.append(f"validation.{key} = {value!r}; valid: {', '.join(names) or '(no validation.scorers)'}")
        if bool(self.alarm_quality) != bool(self.alarm_reward):
            p.append("validation: the alarm needs both alarm_quality and alarm_reward (or neither)")
        elif self.alarm_quality and self.alarm_quality == self.alarm_reward:
            p.append(f"validation.alarm_quality and alarm_reward are both {self.alarm_reward!r}; they must differ")
        return p


@dataclass
class TrackingConfig:
    """[tracking]: experiment trackers fed from the run (metrics.jsonl stays the source of truth)."""
    tensorboard: bool = True
    """Write every metrics.jsonl scalar, the validation grids and scores, and the resolved config into
    `<output_dir>/tb/` (torch.utils.tensorboard); a resumed run continues the same curves."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; imported only when on)."""
    wandb_project: str = "flowopd"
    """wandb project name."""
    wandb_mode: str = "offline"
    """offline (no network; `wandb sync <output_dir>/wandb/offline-run-*` later) or online."""

    def problems(self) -> list[str]:
        """Impossible values of [tracking]."""
        p: list[str] = []
        choice(p, "tracking.wandb_mode", self.wandb_mode, WANDB_MODES)
        if self.wandb and not self.wandb_project:
            p.append("tracking.wandb_project is empty")
        return p
