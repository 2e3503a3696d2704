"""Reinforcement learning objectives beside OPD: Flow-GRPO (issue 16)."""
