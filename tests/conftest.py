"""Shared test setup. Triton runs in its interpreter on CPU-only machines; this must be set before any
`@triton.jit` function is defined, i.e. before a kernel module is imported."""

from __future__ import annotations

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NVTX_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads starve each other on a shared CPU (see engine/train.py): measured on 2 cores at load ~6,
# test_train.py's round-trip + resume tests took 127 s with the active policy, 22 s with PASSIVE. Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_rank_env():
    """An in-process training test makes this process rank 0 of a 1-rank group (init_distributed writes RANK,
    MASTER_PORT, ... into os.environ); a later test's subprocess inheriting them joined that group's port instead of
    making its own (CI: the GPU suite's dry run lost both iteration benches). Restore them after every test."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
