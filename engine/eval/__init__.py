"""Seeing and scoring a run (docs/evaluation.md): scorer plug-ins from local weights (`scorers/`), experiment
trackers (`trackers.py`), validation during training (`validation.py`, wired by `callbacks.py`), deterministic
sampling and decoding (`sampling.py`), evaluation prompt sets (`prompts.py`), the table (`table.py`) and the CLI
`python -m engine.eval` (`__main__.py`)."""
