"""Flow-matching schedule, SDE/ODE steps (reference + kernel dispatch) and rollouts."""

from engine.sampling.schedule import flow_match_sigmas, sigma_to_timestep
from engine.sampling.steps import SDEStepOutput, cfg_combine, ode_step, sde_noise_std, sde_step

__all__ = [
    "SDEStepOutput",
    "cfg_combine",
    "flow_match_sigmas",
    "ode_step",
    "sde_noise_std",
    "sde_step",
    "sigma_to_timestep",
]
