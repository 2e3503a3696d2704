"""The editing miniature world (DESIGN §4, issue 13): T2I + local edit + global edit on a tiny Z-Image model.

- `world`: scenes, prompts with task tags (`t2i`, `local_edit`, `global_edit`), renderer, edits, the imperfect base
  mixture, clean expert data, the fixed eval set;
- `rewards`: analytic rewards (T2I correctness; edit correctness and preservation), `score_row`;
- `model`: the transformer preset, prompt encoder, flow-matching loss over T2I and edit rows, `load_world()`;
- `eval`: deterministic ODE sampling from fixed noise and the table rows (`python -m engine.worlds.toy_edit.eval`).
"""
