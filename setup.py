"""flowopd packaging.

`pip install --no-build-isolation -e .` installs the `engine` and `kernels` packages. The CUDA C++ ops in
`csrc/` are compiled only where a CUDA toolchain and a CUDA build of torch exist; elsewhere the install
succeeds without them and the ops fall back to Triton or the PyTorch reference at run time.
`FLOWOPD_NATIVE=1` forces the native build (and fails loudly if it cannot), `FLOWOPD_NATIVE=0` skips it.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup


def _native_extensions() -> tuple[list, dict]:
    mode = os.environ.get("FLOWOPD_NATIVE", "auto").lower()
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if mode in ("0", "off", "false") or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "on", "true"):
            raise
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if mode in ("1", "on", "true"):
            raise RuntimeError("FLOWOPD_NATIVE=1 but torch has no CUDA build or CUDA_HOME is not set")
        print("flowopd: no CUDA toolchain/torch, skipping the native ops (Triton/PyTorch fallbacks are used)")
        return [], {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        name="flowopd_native",
        sources=sources,
        # torch 2.13 headers need C++20; no --use_fast_math: the noise uses the precise logf/sincospif
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _native_extensions()

setup(
    name="flowopd",
    version="0.1.0",
    description="Kernel-optimized on-policy distillation for flow-matching MMDiT text-to-image models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    package_data={"engine.toy": ["weights/*.safetensors", "weights/*.json"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
