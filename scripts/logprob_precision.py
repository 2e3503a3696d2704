"""How far a half-precision forward moves the SDE log-probs that the ratio losses (kl_only, rkl_pg) compare.

    python scripts/logprob_precision.py            # the miniature world's base + SVD merge, 10-step SDE rollouts

The rollout is run in float32; each transition x -> x' is re-scored with the velocity of the same model cast to
bfloat16 and to float16 (what `model.dtype` gives the training forward). The ratio exp(logp_half - logp_fp32) should
be 1: its deviation is what PPO's clip (1e-4 in Flow-OPD) sees before any update. Flow-OPD's FAQ prefers fp16 for
this reason; docs/config.md (`model.dtype`) quotes the numbers printed here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options; --help works
    from engine.adapters.lora import STUDENT, AdapterSwitch
    from engine.backends import get_backend
    from engine.backends.sd3.backend import predict_velocity
    from engine.config import load_config
    from engine.ops import sde_step_ref
    from engine.sampling.rollout import SampleNoise, rollout
    from engine.sampling.schedule import flow_match_sigmas
    from engine.student import build_student
    from engine.worlds.toy.encoder import ToyTextEncoder
    from engine.worlds.toy.world import eval_prompts

    torch.set_num_threads(1)
    c = load_config()
    model, spec = build_student(c, get_backend("sd3"))
    model.requires_grad_(False)
    AdapterSwitch(model).activate(STUDENT)
    prompts = eval_prompts()[::2]
    cond = ToyTextEncoder.from_pretrained().encode(prompts)
    sigmas = flow_match_sigmas(10, 3.0)
    with torch.no_grad():
        traj = rollout(lambda x, s: predict_velocity(model, x, s, cond), SampleNoise(0, range(len(prompts)),
                       spec.latent_shape, torch.device("cpu")), sigmas, "sde", 0.7)
        rows = {}
        for dtype in (torch.bfloat16, torch.float16):
            half = build_student(c, get_backend("sd3"))[0].to(dtype).requires_grad_(False)
            AdapterSwitch(half).activate(STUDENT)
            dev = []
            for t in range(9):  # the training states
                x, x_next = traj.states[t], traj.states[t + 1]
                s, sn = sigmas[t].expand(len(prompts)), sigmas[t + 1].expand(len(prompts))
                v = predict_velocity(half, x, s, cond).float()
                lp = sde_step_ref(x, v, s, sn, float(sigmas[1]), 0.7, prev_sample=x_next).log_prob
                dev.append((lp - traj.log_probs[t]).abs())
            d = torch.stack(dev)
            rows[str(dtype).removeprefix("torch.")] = (float(d.mean()), float(d.max()),
                                                       float((torch.expm1(d) > 1e-4).float().mean()))
    print(f"{len(prompts)} rollouts x 9 training states, toy base + SVD merge, noise level 0.7")
    print("| forward | mean abs(log-prob error) | max | share of ratios outside 1 +- 1e-4 |")
    print("|---|---|---|---|")
    for name, (mean, mx, share) in rows.items():
        print(f"| {name} | {mean:.2e} | {mx:.2e} | {share:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
