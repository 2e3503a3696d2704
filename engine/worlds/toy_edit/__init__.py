"""The editing miniature world (DESIGN §4, issue 13): T2I + local edit + global edit on a tiny Z-Image model.

- `world`: scenes, prompts with task tags (`t2i`, `local_edit`, `global_edit`), renderer, edits, the imperfect base
  mixture, clean expert data, the fixed eval set;
- `rewards`: analytic rewards (T2I correctness; edit correctness and preservation), `score_row`;
- `model`: the transformer preset, prompt encoder, flow-matching loss over T2I and edit rows, `load_world()`;
- `eval`: deterministic ODE sampling from fixed noise and the table rows (`python -m engine.worlds.toy_edit.eval`).

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
