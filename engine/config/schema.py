"""The run configuration as typed dataclasses: one per TOML table, a docstring per field, `problems()` per section.

Each section's `problems()` lists its impossible values (pure: no files, no imports of model code); `Config.problems()`
adds the checks that span sections (names of teachers and fields, routes, the cold start). What depends on the model
family (presets, latent sizes) or on the inputs (files, the real architecture) is checked by the family's backend and
by `engine.config.preflight`; `engine.config.load.load_config` runs them all and raises one `ConfigError` listing
every problem. `python -m engine.config --reference` generates docs/config.md from these docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.checks import choice, finite, need, need_num, need_seed
from engine.config.eval_schema import TrackingConfig, ValidationConfig
from engine.config.opd import FIELD_EVALUATORS, LOSSES, QUERY_BIAS, ROUTINGS, OPDConfig  # noqa: F401 (re-exported)
from engine.config.rl_schema import RLConfig

SAMPLERS = ("sde", "ode")
MERGES = ("none", "average", "svd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("reference", "fused")
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flash", "xformers")
COMPILE = ("none", "blocks")
LORA_INITS = ("gaussian", "default", "zeros")
RESERVED_NAMES = ("base", "student")


@dataclass
class ModelConfig:
    """[model]: the base transformer (family, preset or local dir, dtype, attention)."""
    preset: str = "tiny"
    """Named architecture built with random init when `path` is empty (the family's presets, e.g. sd3: `tiny`,
    `sd35-medium`)."""
    path: str = ""
    """Local diffusers-format transformer dir (config.json + weights), or a pipeline dir with `transformer/`."""
    init_seed: int = 0
    """Seed of the random init of a preset model (ignored when loading `path`)."""
    dtype: str = "auto"
    """Parameter/compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16 (CUDA only:
    DeepSpeed fp16, loss scaling, fp32 master LoRA; for kl_only / rkl_pg its log-prob error is ~7x below bf16's,
    docs/fidelity.md)."""
    latent_size: int = 0
    """Latent height = width; 0 = the preset's default (SD3: pixel size / 8, e.g. 64 at 512 px)."""
    attention: str = "reference"
    """Joint-attention implementation: reference (diffusers + peft) or fused (LoRA-fused processor)."""
    attention_backend: str = "sdpa"
    """sdpa (torch's SDPA order), auto (cuDNN > flash > efficient > math on Hopper), an SDPA kernel (sdpa-cudnn, -flash,
    -efficient, -math), flash (flash-attn), xformers (fused only); one that cannot run falls back to sdpa (logged)."""
    compile: str = "none"
    """none, or blocks: torch.compile each transformer block (regional: one graph per block, shared by all of them)."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in the student's backward to save activation memory."""
    family: str = "sd3"
    """Model family (engine/backends): sd3 (SD3 / SD3.5 MMDiT), zimage (Z-Image: text-to-image and edit rows)."""

    def problems(self) -> list[str]:
        """Impossible values of [model] that do not depend on the family."""
        p: list[str] = []
        choice(p, "model.dtype", self.dtype, DTYPES)
        choice(p, "model.attention", self.attention, ATTENTION)
        choice(p, "model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        choice(p, "model.compile", self.compile, COMPILE)
        need(p, "model.latent_size", self.latent_size, self.latent_size >= 0 and self.latent_size % 2 == 0,
             "must be 0 (preset default) or a positive even number")
        need_seed(p, "model.init_seed", self.init_seed)
        return p


@dataclass
class StudentConfig:
    """[student]: the trainable LoRA adapter."""
    rank: int = 32
    """LoRA rank r of the student adapter."""
    alpha: float = 64.0
    """LoRA alpha; the adapter's update is scaled by alpha / r."""
    targets: list[str] = field(default_factory=list)
    """Module names (suffixes) the adapter wraps; when the key is absent, the model family's default (sd3: the 8
    joint-attention projections), filled in when the config is loaded."""
    init: str = "gaussian"
    """peft init of the student: gaussian (A ~ N(0, 1/r), B = 0), default (Kaiming A, B = 0), zeros."""

    def problems(self) -> list[str]:
        """Impossible values of [student]."""
        p: list[str] = []
        need(p, "student.rank", self.rank, self.rank > 0, "must be > 0")
        need_num(p, "student.alpha", self.alpha, self.alpha > 0, "must be > 0")
        if not self.targets:
            p.append("student.targets is empty")
        choice(p, "student.init", self.init, LORA_INITS)
        return p


@dataclass
class TeacherConfig:
    """[[teachers]]: one frozen adapter (a task expert) on the shared base."""
    name: str = ""
    """Adapter name, referenced by `fields[].source` and `init.teachers`."""
    path: str = ""
    """PEFT adapter dir (adapter_config.json + adapter_model.safetensors) or a diffusers LoRA file/dir."""
    alpha: float = 0.0
    """Override lora_alpha; required for diffusers files that carry no alpha metadata. 0 = from the file."""
    random_seed: int = -1
    """>= 0: instead of loading, a random non-zero stand-in adapter with this seed (tests, `tiny` preset)."""
    rank: int = 8
    """Rank of a random stand-in adapter (loaded adapters take their rank from the file)."""

    def problems(self, where: str) -> list[str]:
        """Impossible values of one [[teachers]] entry (`where` = `teachers[i]`)."""
        p: list[str] = []
        if not self.name:
            p.append(f"{where}.name is empty")
        elif self.name in RESERVED_NAMES:
            p.append(f"{where}.name = {self.name!r} is reserved ({', '.join(RESERVED_NAMES)})")
        if bool(self.path) == (self.random_seed >= 0):
            p.append(f"{where} ({self.name}): set exactly one of `path` or `random_seed`")
        need(p, f"{where}.rank", self.rank, self.rank > 0, "must be > 0")
        need_seed(p, f"{where}.random_seed", self.random_seed, off=-1)
        need_num(p, f"{where}.alpha", self.alpha, self.alpha >= 0, "must be >= 0 (0 = from the file)")
        return p


@dataclass
class FieldConfig:
    """[[fields]]: one capability field the student is distilled from."""
    name: str = ""
    """Field name, referenced by `opd.routes`, `opd.weights` and `opd.anchor`."""
    source: str = "base"
    """`base` (adapters disabled) or a teacher name."""
    cfg_scale: float = 1.0
    """Guidance scale g of the CFG operator v_u + g (v_c - v_u); 1.0 = plain v_c. Z-Image's guidance_scale is g - 1."""
    operator: str = "cfg"
    """How the field's conditional and unconditional velocities combine when cfg_scale != 1 (engine/fields/field.py
    OPERATORS): cfg = v_u + g (v_c - v_u)."""

    def problems(self, where: str, teachers: list[str]) -> list[str]:
        """Impossible values of one [[fields]] entry given the teacher names."""
        p: list[str] = []
        if not self.name:
            p.append(f"{where}.name is empty")
        elif self.name == "student":
            p.append(f"{where}.name = 'student' is reserved")
        need(p, f"{where}.source", repr(self.source), self.source == "base" or self.source in teachers,
             f"valid: base, {', '.join(teachers) or '(no teachers)'}")
        need_num(p, f"{where}.cfg_scale", self.cfg_scale, self.cfg_scale >= 0, "must be >= 0")
        return p


@dataclass
class InitConfig:
    """[init]: the student's cold start."""
    merge: str = "none"
    """Cold start of the student: none, average (reference: mean of A and of B), svd (exact rank-r merge)."""
    teachers: list[str] = field(default_factory=list)
    """Teachers to merge; empty = all teachers."""
    weights: list[float] = field(default_factory=list)
    """Merge weights per teacher; empty = 1/K each."""
    adapter: str = ""
    """Initialise the student from this adapter (PEFT dir or diffusers file) instead, e.g. an SFT result."""
    warm_start: bool = False
    """DanceOPD's warm start: the cold start (`merge` or `adapter`) goes into the student's base instead of its
    LoRA (a frozen adapter always active under the student; the teachers and the base field keep the clean base)
    and the student LoRA starts fresh (B = 0). The export folds both into one adapter."""

    def problems(self, teachers: list[TeacherConfig], student: StudentConfig) -> list[str]:
        """Impossible values of [init] given the teachers and the student."""
        p: list[str] = []
        names = [t.name for t in teachers]
        choice(p, "init.merge", self.merge, MERGES)
        for name in self.teachers:
            if name not in names:
                p.append(f"init.teachers: unknown teacher {name!r}; valid: {', '.join(names) or '(none)'}")
        n_merge = len(self.teachers) or len(names)
        if self.merge != "none" and n_merge == 0:
            p.append(f"init.merge = {self.merge!r} needs teachers")
        if self.weights and len(self.weights) != n_merge:
            p.append(f"init.weights has {len(self.weights)} entries for {n_merge} merged teachers")
        for i, w in enumerate(self.weights):
            finite(p, f"init.weights[{i}]", w)
        if self.merge != "none" and self.adapter:
            p.append("init: set either `merge` or `adapter`, not both")
        if self.warm_start and self.merge == "none" and not self.adapter:
            p.append("init.warm_start = true needs a cold start to merge into the base: init.merge or init.adapter")
        if self.merge == "average":  # loaded teachers' ranks are checked when they are loaded
            merged = [t for t in teachers if t.random_seed >= 0 and (not self.teachers or t.name in self.teachers)]
            off = [f"{t.name} (rank {t.rank})" for t in merged if t.rank != student.rank]
            if off:
                p.append(f"init.merge = 'average' averages A and B, so merged teachers need student.rank = "
                         f"{student.rank}: {', '.join(off)}; use init.merge = 'svd'")
        return p


@dataclass
class DataConfig:
    """[data]: prompts, text encoder, prompt cache, task weights."""
    prompts: str = "builtin:tiny"
    """Prompt set: `builtin:<name>` (the engine's `tiny`, or a miniature world's set, e.g. `builtin:toy`), a .csv
    with DanceOPD's columns `task,prompt,source_image,target_image` (image paths relative to the file), or a
    .jsonl ({"prompt": ..., "task": ..., optionally "source_image", "target_image"}) / .txt (`[task] text`) file. A
    row with a source_image is an edit row (the image conditions it; model.family = "zimage")."""
    encoder: str = "builtin"
    """Text encoder: builtin (deterministic hash encoder), a miniature world's encoder by the world's name (e.g.
    toy), or a local pipeline dir of the family (SD3: CLIP-L, CLIP-G, T5; Z-Image: Qwen, and VAE + SigLIP for edits)."""
    cache: str = ""
    """Prompt-embedding cache (safetensors); empty = `<output_dir>/prompt_cache.safetensors`."""
    image_cache: str = ""
    """Source-image cache dir of edit rows (one safetensors file per image, keyed by its sha256 and the image
    encoder; engine/data/images.py); empty = `<output_dir>/image_cache`. Shared between runs and users safely."""
    max_sequence_length: int = 256
    """T5 tokens for the SD3 encoders (77 CLIP + this many T5 tokens per prompt)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Task tag -> sampling weight (every task of the prompt set needs one; 0 leaves a task out); empty = every
    prompt equally likely, so tasks count by their number of prompts. Equal weights balance the tasks."""

    def problems(self) -> list[str]:
        """Impossible values of [data]."""
        p: list[str] = []
        if not self.prompts:
            p.append("data.prompts is empty")
        need(p, "data.max_sequence_length", self.max_sequence_length, self.max_sequence_length > 0, "must be > 0")
        for task, w in self.task_weights.items():
            need_num(p, f"data.task_weights.{task}", w, w >= 0, "must be >= 0")
        if self.task_weights and all(w <= 0 for w in self.task_weights.values()):
            p.append("data.task_weights: every weight is 0; give at least one task a positive weight")
        return p


@dataclass
class RolloutConfig:
    """[rollout]: the student's own rollouts."""
    steps: int = 10
    """Denoising steps of the student's rollout (>= 2)."""
    shift: float = 3.0
    """Schedule shift of FlowMatchEulerDiscreteScheduler."""
    sampler: str = "sde"
    """sde (Flow-GRPO SDE with log-probs, Flow-OPD) or ode (deterministic Euler, DanceOPD)."""
    noise_level: float = 0.7
    """SDE noise level a; s = a sqrt(sigma / (1 - sigma))."""
    cfg_scale: float = 1.0
    """Guidance of the student's own rollout (Flow-OPD 4.5, DanceOPD 1.0 = unguided; Z-Image's guidance_scale + 1)."""
    group_size: int = 1
    """Images per prompt."""

    def problems(self) -> list[str]:
        """Impossible values of [rollout]."""
        p: list[str] = []
        need(p, "rollout.steps", self.steps, self.steps >= 2, "must be >= 2")
        need_num(p, "rollout.shift", self.shift, self.shift > 0, "must be > 0")
        choice(p, "rollout.sampler", self.sampler, SAMPLERS)
        if finite(p, "rollout.noise_level", self.noise_level) and self.sampler == "sde" and self.noise_level <= 0:
            p.append(f"rollout.noise_level = {self.noise_level}; must be > 0 for the sde sampler")
        need_num(p, "rollout.cfg_scale", self.cfg_scale, self.cfg_scale >= 0, "must be >= 0")
        need(p, "rollout.group_size", self.group_size, self.group_size >= 1, "must be >= 1")
        return p


@dataclass
class TrainConfig:
    """[train]: optimizer, batch, seed, checkpoints, logging."""
    steps: int = 20
    """Optimizer steps."""
    prompts_per_step: int = 2
    """Prompts per rank per micro-batch (x group_size images)."""
    grad_accum: int = 1
    """Rollout micro-batches per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear learning-rate warmup steps (then constant)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    """Seed of data order, routing, noise and query draws (each a pure function of seed and step)."""
    deepspeed: str = "configs/ds_zero2.json"
    """DeepSpeed JSON (ZeRO stage, comm); batch sizes, clipping and precision are filled in from here."""
    save_every: int = 10
    """Checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    max_nonfinite: int = 3
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    profile_steps: str = ""
    """`A:B`: bracket optimizer steps [A, B) with cudaProfilerStart/Stop for nsys --capture-range."""
    phase_timing: bool = False
    """Synchronise the GPU at every phase end so metrics.jsonl's time/<phase> are GPU seconds (one host sync per phase);
    off: on CUDA time/<phase> is the host's issue time (step_s stays the step's wall time); on CPU both are equal."""
    ema_decay: float = 0.0
    """EMA of the student's LoRA weights (engine/ema.py), Flow-GRPO's rule: decay min((1 + n) / (10 + n),
    ema_decay) after finished step n; 0 = off (Flow-OPD: 0.9). When on, export and the world's eval use it."""
    ema_every: int = 8
    """Apply the EMA update when (n + 1) % ema_every == 0 (Flow-OPD: 8)."""
    ema_repeats: int = 1
    """EMA moves per due step: Flow-OPD calls its EMA after every rollout micro-batch, i.e. A times per optimizer
    step (ema = p + d^A (ema - p); A = 4 in its 8-GPU config: 8 micro-batches, 2 optimizer steps per epoch)."""
    step_timeout: float = 0.0
    """Seconds one optimizer step (with its checkpoint) may take on any rank before the job stops, naming the stuck
    rank and its phase (engine/watchdog.py); 0 = auto: max(300, 10 x the median step time), 1800 until 3 steps are
    timed; -1 = off."""

    def problems(self) -> list[str]:
        """Impossible values of [train]."""
        p: list[str] = []
        for key in ("steps", "prompts_per_step", "grad_accum", "log_every"):
            need(p, f"train.{key}", getattr(self, key), getattr(self, key) >= 1, "must be >= 1")
        need_num(p, "train.lr", self.lr, self.lr > 0, "must be > 0")
        need_num(p, "train.weight_decay", self.weight_decay, self.weight_decay >= 0, "must be >= 0")
        need(p, "train.betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "must be two numbers in [0, 1)")
        need_num(p, "train.eps", self.eps, self.eps > 0, "must be > 0")
        need(p, "train.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be >= 0")
        need_num(p, "train.grad_clip", self.grad_clip, self.grad_clip >= 0, "must be >= 0")
        need(p, "train.save_every", self.save_every, self.save_every >= 0, "must be >= 0")
        need(p, "train.keep_checkpoints", self.keep_checkpoints, self.keep_checkpoints >= 1, "must be >= 1")
        need(p, "train.max_nonfinite", self.max_nonfinite, self.max_nonfinite >= 1, "must be >= 1")
        need_num(p, "train.ema_decay", self.ema_decay, 0 <= self.ema_decay < 1, "must be in [0, 1) (0 = off)")
        need(p, "train.ema_every", self.ema_every, self.ema_every >= 1, "must be >= 1")
        need(p, "train.ema_repeats", self.ema_repeats, self.ema_repeats >= 1, "must be >= 1")
        need_seed(p, "train.seed", self.seed)
        need_num(p, "train.step_timeout", self.step_timeout, self.step_timeout >= 0 or self.step_timeout == -1,
                 "must be >= 0 (0 = auto) or -1 (off)")
        if self.profile_steps:
            try:
                a, b = (int(x) for x in self.profile_steps.split(":"))
                if not 0 <= a < b:
                    raise ValueError
            except ValueError:
                p.append(f"train.profile_steps = {self.profile_steps!r}; expected 'A:B' with 0 <= A < B")
        return p


@dataclass
class KernelsConfig:
    """[kernels]: kernel backends (engine.ops) and CUDA-graph rollouts."""
    default: str = "auto"
    """Backend of every kernel op without an entry in `backends`: auto (the fastest available; never the CPU
    Triton interpreter), torch (the reference), triton, cuda."""
    backends: dict[str, str] = field(default_factory=dict)
    """Op name -> backend, e.g. {sde_step = "torch"}; ops: see docs/kernels.md (`engine.ops`)."""
    cuda_graphs: bool = False
    """Roll out with `RolloutRunner`: each step (student forward + fused SDE/ODE step) captured once as a CUDA
    graph and replayed (eager on CPU or when capture fails). SDE step noise then comes from the in-kernel Philox
    stream, still keyed by (seed, sample id, step); switching this in a run changes the SDE noise."""

    lora_merge_rows: int = 0
    """Batched evaluator: a frozen adapter's segment of >= this many token rows (images x tokens) runs as one GEMM with
    W + s B A merged instead of base GEMM + segmented LoRA; 0 = never (docs/multi_lora.md: crossover ~1k at 512 px)."""

    def problems(self) -> list[str]:
        """Unknown ops and backends in [kernels], a negative merge threshold."""
        from engine.ops import problems

        p = problems(self.default, self.backends)
        need(p, "kernels.lora_merge_rows", self.lora_merge_rows, self.lora_merge_rows >= 0, "must be >= 0 (0 = off)")
        return p


@dataclass
class ReportConfig:
    """[report]: a miniature world's table, reward curves and samples."""
    enabled: bool = False
    """At the end, score every model of the miniature world `world` (needs that world's base, e.g.
    `model.path = "toy:base"`): base, each teacher, both merges, this student and each `[experiment]` variant;
    writes report.md/.json, samples.png and rewards.png into output_dir."""
    world: str = ""
    """The miniature world (engine/worlds) whose prompts, rewards and table the report uses, e.g. toy."""
    label: str = "OPD student"
    """This run's row name in the table."""
    eval_every: int = 0
    """Score the student on the world's quick eval subset every N optimizer steps (rewards.jsonl, the reward
    curves); 0 = only the final table."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Noise seeds of the final table (mean +- std over them; fixed per-sample noise)."""
    samples_per_prompt: int = 4
    """Samples per eval prompt in the final table (the quick curve subset uses 2 per every other prompt)."""
    rows: dict[str, str] = field(default_factory=dict)
    """Extra rows of the table: row name -> an adapter (PEFT dir or diffusers file), e.g. a GRPO-Mix student."""

    def problems(self) -> list[str]:
        """Impossible values of [report] (the world checks what it needs of the rest of the config)."""
        p: list[str] = []
        if (self.enabled or self.eval_every) and not self.world:
            p.append("report.enabled / report.eval_every score a miniature world's eval prompts with its rewards: "
                     "set report.world (e.g. 'toy')")
        need(p, "report.eval_every", self.eval_every, self.eval_every >= 0, "must be >= 0")
        need(p, "report.samples_per_prompt", self.samples_per_prompt, self.samples_per_prompt >= 1, "must be >= 1")
        if not self.seeds:
            p.append("report.seeds is empty")
        for i, seed in enumerate(self.seeds):
            need_seed(p, f"report.seeds[{i}]", seed)
        return p


@dataclass
class ExperimentConfig:
    """[experiment]: the other students trained beside this one for the report (engine/experiment.py)."""
    variants: dict[str, list[str]] = field(default_factory=dict)
    """Row name -> `--set` overrides on top of this config: each is another student trained after this one (in
    `<output_dir>/variants/<name as a slug>`, resumable like the main run) and scored in the report's table."""
    parallel: bool = True
    """Single-process CPU runs: train the variants in child processes beside this run, the cores split between
    them (multi-rank and GPU runs train them one after another)."""


@dataclass
class Config:
    """A whole run: every section, plus the run directory."""
    output_dir: str = "out/run"
    """Run directory: checkpoints, metrics.jsonl, config.toml, export/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    fields: list[FieldConfig] = field(default_factory=list)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def problems(self) -> list[str]:
        """Every impossible value and dangling reference that needs no model code and no files."""
        p: list[str] = []
        if not self.output_dir:
            p.append("output_dir is empty")
        p += self.model.problems() + self.student.problems()
        teachers: list[str] = []
        for i, t in enumerate(self.teachers):
            p += t.problems(f"teachers[{i}]")
            if t.name and t.name in teachers:
                first = teachers.index(t.name)
                p.append(f"teachers[{i}].name = {t.name!r} is used twice (also teachers[{first}].name)")
            teachers.append(t.name)
        fields: list[str] = []
        for i, f in enumerate(self.fields):
            p += f.problems(f"fields[{i}]", teachers)
            if f.name and f.name in fields:
                p.append(f"fields[{i}].name = {f.name!r} is used twice (also fields[{fields.index(f.name)}].name)")
            fields.append(f.name)
        p += self.init.problems(self.teachers, self.student)
        p += self.data.problems() + self.rollout.problems() + self.rl.problems(self.rollout.steps)
        if self.rl.loss:
            p += self.rl_problems(fields)
        else:
            if not fields:
                p.append("fields is empty: define at least one field to distill from")
            p += self.opd.problems(fields, self.rollout)
            if self.opd.loss == "mixed" and not self.rl.rewards:
                p.append("opd.loss = 'mixed' adds the task advantage of each rollout: set rl.rewards (task -> "
                         "{scorer: weight}) and rl.scorers")
        p += self.train.problems() + self.kernels.problems() + self.report.problems()
        p += self.validation.problems() + self.tracking.problems()
        return p

    def rl_problems(self, fields: list[str]) -> list[str]:
        """What an RL objective needs of the rest of the config: SDE rollouts, a known reference field."""
        p: list[str] = []
        if self.rollout.sampler != "sde" or self.rollout.noise_level <= 0:
            p.append(f"rl.loss = {self.rl.loss!r} needs rollout.sampler = 'sde' with rollout.noise_level > 0 "
                     f"(its ratio re-scores the rollout's log-probs)")
        if self.rl.reference and self.rl.reference not in fields:
            p.append(f"rl.reference = {self.rl.reference!r}: unknown field; valid: {', '.join(fields) or '(none)'}")
        return p
