"""MMDiT loading (local diffusers dir or named preset), LoRA adapters, merging and export."""
