"""Miniature worlds (DESIGN §4): synthetic data, analytic rewards and shipped weights, plugged into the engine."""
