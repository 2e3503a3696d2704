"""The embedded miniature world (DESIGN §4): the default main job's data, rewards and shipped weights.

- `engine.toy.world`: prompts with task tags, renderer, train/eval prompt sets (`train_prompts`, `eval_prompts`,
  `task_of`, TASKS).
- `engine.toy.rewards`: analytic per-task rewards, `quality`, `score_row` (the table row).
- `engine.toy.encoder.ToyTextEncoder`: `encode(prompts) -> Cond`, `from_pretrained(dir)`.
- `engine.toy.model`: the transformer config, `load_toy()` (base + experts + encoder), EXPERTS (task -> adapter).
"""
