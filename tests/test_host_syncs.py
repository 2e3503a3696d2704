"""Host syncs of a train step (issue 18): the census on the CPU (engine/host_syncs.py, simulate mode) finds no
host->device copy and no device read per query chunk, only a few per micro-batch / per step at known places; the
phase timers synchronise only when `train.phase_timing` asks. bench/gpu_probe.py takes the same census on a GPU.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.host_syncs import HostSyncCensus
from engine.profiling import PhaseTimer

REPO = Path(__file__).resolve().parents[1]


def test_census_classifies_copies_and_reads() -> None:
    dev = torch.ones(4)  # made before the block: a device tensor in simulate mode
    with HostSyncCensus(REPO, simulate=True) as c:
        host = torch.tensor([0, 2])  # host data, no device: host
        idx = torch.tensor([1, 3], device=dev.device)  # host data onto the device: a copy
        moved = host.to(dev.device)  # a copy; the source stays a host tensor
        host.to(torch.float32)  # dtype only: no copy
        dev[idx].sum()  # device index: nothing
        dev[host]  # host index into a device tensor: an implicit copy
        dev[dev > 0]  # boolean mask: the output size is read on the host
        float(dev.sum())  # a read
        host.sum().item()  # host value: nothing
        moved.tolist()  # moved is a device tensor now
    kinds = Counter((e.kind, e.call) for e in c.events)
    assert kinds == Counter({("h2d", "tensor"): 1, ("h2d", "Tensor.to"): 1, ("h2d", "__getitem__ (host operand)"): 1,
                             ("d2h", "__getitem__"): 1, ("d2h", "__float__"): 1, ("d2h", "tolist"): 1}), kinds
    assert all(e.site.startswith("tests/test_host_syncs.py:") for e in c.events)


def _census(tmp_path: Path, overrides: list[str]) -> Counter:
    """Engine events (kind, innermost engine site) of a steady-state step: the step is run once to warm the caches
    (row plans, graphs), then again under the census."""
    from engine.trainer import Trainer

    os.environ.setdefault("MASTER_PORT", "29643")
    cfg = load_config(REPO / "configs" / "tiny.toml", [f'output_dir="{tmp_path}"', "train.save_every=0", *overrides])
    trainer = Trainer(cfg)
    try:
        trainer.train_step(1)
        read = trainer.embeddings.cond

        def cond_rows(texts: list[str]):  # rows read from the prompt cache file: host memory on a GPU run too
            rows = read(texts)
            census.mark_host(*rows.tensors().values())
            return rows

        trainer.embeddings.cond = cond_rows
        with HostSyncCensus(REPO, simulate=True) as census:
            census.mark_host(*trainer.sampler._perm_cache.values())  # the data order's permutations
            trainer.train_step(1)
    finally:
        trainer.close()
    return Counter((e.kind, e.site.split(" < ")[0].split(":")[0] + " < " + e.site.split(" < ")[-1].split(":")[0])
                   for e in census.events if e.site.startswith("engine/"))


@pytest.mark.parametrize("path", [
    ['opd.evaluator="batched"', "kernels.cuda_graphs=true"],
    ['opd.evaluator="reference"', "kernels.cuda_graphs=false"],
], ids=["fast", "reference"])
def test_a_train_step_copies_nothing_per_query_chunk(tmp_path: Path, path: list[str]) -> None:
    """1 vs 3 query chunks per micro-batch: the same copies and reads, all per micro-batch (prompt embeddings,
    query indices, the graph rollout's seeds) or per step (the metrics row), none in the fields, the segmented
    LoRA, the loss or the objective's chunks."""
    one = _census(tmp_path / "q1", ["opd.query_states=1", *path])
    three = _census(tmp_path / "q3", ["opd.query_states=3", *path])
    assert one == three, (one, three)
    h2d = {site for kind, site in one if kind == "h2d"}
    allowed = {"engine/transfer.py < engine/trainer.py",  # prompt embeddings (pinned) and query indices (pinned)
               "engine/sampling/rollout_graph.py < engine/trainer.py"}  # per-row Philox keys of the rollout (pinned)
    assert h2d <= allowed, h2d
    assert one[("h2d", "engine/transfer.py < engine/trainer.py")] == 3  # 2 conditioning tensors + the queries
    d2h = {site for kind, site in one if kind == "d2h"}
    assert d2h <= {"engine/trainer.py < engine/trainer.py"}, d2h  # the metrics row after the last chunk
    assert not any(kind == "sync" for kind, _ in one)


def test_phase_timer_synchronises_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(1))
    for device, sync, expected in (("cuda", False, 0), ("cuda", True, 2), ("cpu", True, 0)):
        calls.clear()
        timer = PhaseTimer(torch.device(device), sync=sync)
        with timer.range("rollout"):
            pass
        with timer.range("fields"):
            pass
        assert len(calls) == expected and set(timer.pop()) == {"rollout", "fields"}
    cfg = load_config(REPO / "configs" / "tiny.toml", ["train.phase_timing=true"])
    assert cfg.train.phase_timing and not load_config(REPO / "configs" / "tiny.toml").train.phase_timing


@pytest.mark.cuda
def test_census_on_a_gpu_sees_blocking_and_non_blocking_transfers() -> None:
    """Real devices: two copies (a pageable one and a pinned non-blocking one) and one read, which torch's sync
    debug mode flags as a sync too; a cached device index (engine/transfer.py) is no copy at all."""
    from engine.transfer import device_ints, to_device

    dev = torch.ones(8, device="cuda")
    device_ints([1, 2, 3], "cuda")  # made before the census: a cache hit inside it
    with HostSyncCensus(REPO, simulate=False) as c:
        torch.tensor([1, 2], device="cuda")
        to_device(torch.arange(4), "cuda")
        dev.sum().item()
        dev[device_ints([1, 2, 3], "cuda")]
    kinds = Counter(e.kind for e in c.events)
    assert kinds["h2d"] == 2 and kinds["d2h"] == 1 and kinds["sync"] >= 1, c.events
    assert all(e.site.startswith("tests/test_host_syncs.py:") for e in c.events), c.events
