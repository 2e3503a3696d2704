"""The SD3 / SD3.5 family (MMDiT): `SD3Transformer2DModel`, its text encoders and VAE, the fused joint attention."""

from engine.backends import register_backend
from engine.backends.sd3.backend import SD3Backend

register_backend(SD3Backend())
