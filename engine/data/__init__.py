"""Prompt sets with task tags, text encoders, and the prompt-embedding cache."""
