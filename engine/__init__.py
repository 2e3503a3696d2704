"""flowopd engine: on-policy distillation of flow-matching MMDiT models (see DESIGN.md)."""

__version__ = "0.1.0"
