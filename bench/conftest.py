"""Shared benchmark setup: device fixture and the versions/device recorded in every --benchmark-json.

Benchmarks compare providers side by side in one run (reference vs triton vs cuda ...); quote the medians
(`stats.median`) and ratios from the same JSON. Absolute GPU numbers only from a GPU run.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
os.environ.setdefault("NVTX_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _versions() -> dict[str, str]:
    """Installed versions, read from the package metadata: importing deepspeed here costs ~10 s at session end, and a
    step stopped by SIGINT meanwhile (bench/gpu_suite.sh) loses its whole JSON (measured in the suite's dry run)."""
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "diffusers", "peft", "deepspeed", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # optional in some environments (the GPU image)
            out[name] = "missing"
    return out


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["flowopd_versions"] = _versions()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["device"] = {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                                  "sm": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        machine_info["device"] = {"type": "cpu", "name": platform.processor() or platform.machine(),
                                  "threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):  # on a shared machine, CPU timings mean little when this exceeds the core count
        machine_info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        machine_info["cpu_count"] = os.cpu_count()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"
