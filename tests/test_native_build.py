"""The native build of csrc/ where it cannot happen (CPU torch): setup.py, CMake and the CI source check.

Issue 4: "on CPU the install succeeds and the op falls back to Triton or the reference with one log line. An env
var forces or skips the native build." FLOWOPD_NATIVE = auto (default) | 1 (force: fail loudly) | 0 (skip).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="CPU-torch behaviour (this torch has CUDA)")


def _env(**overrides: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWOPD_NATIVE"}
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


def _setup_py(native: str | None) -> subprocess.CompletedProcess:
    """`python setup.py --name`: runs the extension decision of setup.py without building anything."""
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=_env(FLOWOPD_NATIVE=native),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@cpu_torch
def test_setup_py_skips_forces_and_disables_the_native_build() -> None:
    auto = _setup_py(None)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "skipping the native ops" in auto.stdout and auto.stdout.strip().endswith("flowopd")
    off = _setup_py("0")
    assert off.returncode == 0 and "skipping" not in off.stdout and off.stdout.strip() == "flowopd"
    forced = _setup_py("1")
    assert forced.returncode != 0
    assert "FLOWOPD_NATIVE=1 but torch has no CUDA build" in forced.stderr


@cpu_torch
def test_native_ops_disabled_or_missing_log_one_line(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from kernels.native import native_available

    for value, reason in (("0", "disabled by FLOWOPD_NATIVE=0"), ("auto", "no CUDA device / CPU torch")):
        monkeypatch.setenv("FLOWOPD_NATIVE", value)
        native_available.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kernels.native"):
            assert not native_available() and not native_available()
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and reason in lines[0], lines
    native_available.cache_clear()


def _cmake(build: Path, *args: str) -> subprocess.CompletedProcess:
    prefix = torch.utils.cmake_prefix_path
    cmd = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


@cpu_torch
@pytest.mark.slow  # each configure probes the CUDA compiler where nvcc exists: ~20 s on 2 cores
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures_without_building_and_on_fails_loudly(tmp_path: Path) -> None:
    auto = _cmake(tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "native ops not built" in auto.stdout
    built = subprocess.run(["cmake", "--build", str(tmp_path / "auto")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and not list((tmp_path / "auto").rglob("*.so"))
    off = _cmake(tmp_path / "off", "-DFLOWOPD_NATIVE=OFF")
    assert off.returncode == 0 and "FLOWOPD_NATIVE=OFF, native ops not built" in off.stdout
    on = _cmake(tmp_path / "on", "-DFLOWOPD_NATIVE=ON")
    assert on.returncode != 0 and "FLOWOPD_NATIVE=ON but" in on.stderr


@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc not installed")
def test_cuda_source_check_fails_on_a_broken_kernel(tmp_path: Path) -> None:
    """scripts/check_cuda_sources.sh (CI) must be able to fail: a type error in a .cu makes it exit 1."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "csrc").mkdir()
    shutil.copy(ROOT / "scripts" / "check_cuda_sources.sh", tmp_path / "scripts")
    script = tmp_path / "scripts" / "check_cuda_sources.sh"
    env = _env(FLOWOPD_CHECK_BINDINGS="0")
    good = "__global__ void k(float* y, const float* x) { y[threadIdx.x] = 2.0f * x[threadIdx.x]; }\n"
    (tmp_path / "csrc" / "k.cu").write_text(good)
    ok = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "1 .cu compiled for sm_90" in ok.stdout, ok.stdout + ok.stderr
    (tmp_path / "csrc" / "k.cu").write_text(good.replace("const float* x", "const float3 x"))  # float3 * float
    bad = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout + bad.stderr


def _fake_cuda_torch(prefix: Path) -> Path:
    """A TorchConfig.cmake that is CUDA torch as far as architectures go: it runs torch's own utils.cmake and
    public/cuda.cmake (the files that read TORCH_CUDA_ARCH_LIST and set CMAKE_CUDA_ARCHITECTURES to OFF) against
    the nvcc here, and defines the c10_cuda target; no libraries, so only the plain-CUDA .cu can be compiled."""
    caffe2 = Path(torch.utils.cmake_prefix_path) / "Caffe2"
    prefix.mkdir(parents=True)
    (prefix / "TorchConfig.cmake").write_text(
        f'include("{caffe2}/public/utils.cmake")\nset(CAFFE2_USE_CUDA 1)\nlist(APPEND CMAKE_MODULE_PATH "{caffe2}")\n'
        f'include("{caffe2}/public/cuda.cmake")\nadd_library(c10_cuda INTERFACE IMPORTED)\nset(TORCH_LIBRARIES "")\n'
        "set(Torch_FOUND TRUE)\n")
    return prefix


CUDA_ROOT = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
CUOBJDUMP = shutil.which("cuobjdump") or next(  # Triton's wheel carries one
    (str(p) for p in Path(sys.prefix).glob("lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump")), None)


@pytest.mark.slow  # two configures (~8 s each) and one nvcc compile (~8 s) on 2 cores
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None or
                    not (CUDA_ROOT / "bin" / "nvcc").is_file() or CUOBJDUMP is None,
                    reason="needs cmake, ninja, a CUDA toolkit (CUDA_HOME) and cuobjdump")
def test_cmake_honours_torch_cuda_arch_list(tmp_path: Path) -> None:
    """Issue 18: CMakeLists.txt's CMAKE_CUDA_ARCHITECTURES never took effect (torch's cmake sets it to OFF; the status
    line printed "architectures OFF"). TORCH_CUDA_ARCH_LIST does: the nvcc flags and the object's cubins follow it."""
    prefix = _fake_cuda_torch(tmp_path / "torch")
    nvcc = f"-DCMAKE_CUDA_COMPILER={CUDA_ROOT / 'bin' / 'nvcc'}"

    def configure(build: Path, arch: str | None) -> subprocess.CompletedProcess:
        cmd = ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}", nvcc,
               f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_ROOT}"]
        env = {k: v for k, v in _env(TORCH_CUDA_ARCH_LIST=arch).items() if arch or k != "TORCH_CUDA_ARCH_LIST"}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    default = configure(tmp_path / "default", None)
    assert default.returncode == 0, default.stdout[-3000:] + default.stderr[-3000:]
    assert ("TORCH_CUDA_ARCH_LIST=8.0;9.0: -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90"
            in default.stdout), default.stdout[-2000:]
    assert "architectures OFF" not in default.stdout
    hopper = configure(tmp_path / "hopper", "9.0a")
    assert hopper.returncode == 0, hopper.stdout[-3000:] + hopper.stderr[-3000:]
    assert "TORCH_CUDA_ARCH_LIST=9.0a: -gencode arch=compute_90a,code=sm_90a" in hopper.stdout
    obj = "CMakeFiles/flowopd_native.dir/csrc/sde_step_kernels.cu.o"
    built = subprocess.run(["ninja", "-C", str(tmp_path / "hopper"), obj], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:]
    elf = subprocess.run([CUOBJDUMP, "--list-elf", str(tmp_path / "hopper" / obj)], capture_output=True, text=True)
    cubins = [line.split(":")[-1].strip() for line in elf.stdout.splitlines() if "cubin" in line]
    assert cubins and all(c.endswith(".sm_90a.cubin") for c in cubins), elf.stdout
