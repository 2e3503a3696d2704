"""Multi-node through the real rendezvous path, on one machine: two torchrun agents ("nodes", 1 process each) meet
through torchrun's c10d rendezvous (node 0 hosts the store, node 1 joins it as a remote node would), exactly as the
SLURM/torchrun launch of docs/multinode.md does; the run must equal the single-node 2-process run bit for bit (same
ranks, same reduction order)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SETS = ["rollout.steps=4", "train.steps=4", "train.save_every=2", "rollout.group_size=1", "train.prompts_per_step=1"]
EXACT = ("step", "loss", "field", "anchor", "grad_norm", "lr", "skipped", "data_crc", "field/compose", "field/text")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(key, None)
    return env


def _train_args(out: Path) -> list[str]:
    return [str(REPO / "engine" / "train.py"), "--config", str(REPO / "configs" / "tiny.toml"),
            *sum((["--set", s] for s in SETS), []), "--output-dir", str(out)]


def two_nodes(out: Path, logs: Path) -> list[tuple[int, str]]:
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` once per node; (exit code, log) of each agent."""
    endpoint = f"127.0.0.1:{_port()}"
    procs = []
    for node in (0, 1):
        log = logs / f"node{node}.log"
        cmd = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "flowopd-test", "--rdzv-conf",
               f"is_host={'true' if node == 0 else 'false'}", "--max-restarts", "0", *_train_args(out)]
        with open(log, "w") as fh:
            procs.append((subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT), log))
    results = []
    for proc, log in procs:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        results.append((proc.returncode, log.read_text()))
    return results


def one_node(out: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2`: the same 2 ranks on one node."""
    return subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
                           *_train_args(out)], env=_env(), capture_output=True, text=True, timeout=600)


def test_two_nodes_through_the_c10d_rendezvous_equal_one_node_bit_for_bit(tmp_path: Path) -> None:
    results = two_nodes(tmp_path / "nodes", tmp_path)
    for rc, log in results:
        assert rc == 0, log[-3000:]
    assert sum("done:" in log for _, log in results) == 1  # rank 0 ran on one of the two agents
    single = one_node(tmp_path / "single")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    got = read_metrics(tmp_path / "nodes" / "metrics.jsonl")
    want = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [m["step"] for m in got] == [0, 1, 2, 3]
    assert [{k: m.get(k) for k in EXACT} for m in got] == [{k: m.get(k) for k in EXACT} for m in want]
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        assert (tmp_path / "nodes" / "export" / name).read_bytes() == \
            (tmp_path / "single" / "export" / name).read_bytes()
    parts = sorted(p.name for p in (tmp_path / "nodes" / "checkpoints" / "step_00000004").iterdir())
    assert parts == ["manifest.json", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # both nodes' partitions on the shared dir
