"""The text encoder named by `data.encoder`: a miniature world's (by the world's name) or the model family's
(`builtin`, or a local pipeline dir)."""

from __future__ import annotations

from engine.backends.base import ModelBackend, ModelSpec, TextEncoder


def build_text_encoder(spec: str, backend: ModelBackend, model: ModelSpec, max_sequence_length: int,
                       device: str | None = None) -> TextEncoder:
    """The encoder of `data.encoder = spec` for a model of `backend` with spec `model`."""
    from engine.worlds import find_world

    world = find_world(spec) if spec != "builtin" else None
    if world is not None:
        return world.encoder()
    return backend.text_encoder(spec, model, max_sequence_length, device)
