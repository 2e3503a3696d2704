#!/usr/bin/env bash
# Compile-check the CUDA C++ sources of csrc/ where no GPU (and only CPU torch) exists, as CI does.
#   - every csrc/*.cu: `nvcc -arch=sm_90 -c` (the kernels include no torch header, so this is a full compile);
#   - every csrc/*.cpp: `g++ -fsyntax-only` against the torch headers of the Python in $PYTHON (the CPU wheel ships
#     the c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h: a stub with its one macro is
#     put on the include path). module.cpp is checked with TORCH_EXTENSION_NAME defined, as setup.py builds it.
# Skips (exit 0, one line) when nvcc is missing; FLOWOPD_CHECK_BINDINGS=0 skips the .cpp part (~15 s on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_sources: no nvcc, skipped"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
shopt -s nullglob
pids=()
for cu in csrc/*.cu; do
  "$NVCC" -arch=sm_90 -std=c++20 -O3 -Icsrc -c "$cu" -o "$tmp/$(basename "$cu").o" &
  pids+=($!)
done
cpps=(csrc/*.cpp)
checked=0
if [ "${FLOWOPD_CHECK_BINDINGS:-1}" != 0 ] && [ ${#cpps[@]} -gt 0 ]; then
  torch_inc=$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)
  py_inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
  # nvcc's own include dir (nvcc may be a wrapper script, so ask it rather than resolve its path)
  cuda_inc=$("$NVCC" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
  if [ -z "$torch_inc" ]; then
    echo "check_cuda_sources: torch not importable with $PYTHON, bindings not checked"
  else
    mkdir -p "$tmp/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    incs=(-I"$tmp/stub" -I"${cuda_inc:-${CUDA_HOME:-/usr/local/cuda}/include}" -I"$py_inc" -Icsrc)
    for d in $torch_inc; do incs+=(-I"$d"); done
    for cpp in "${cpps[@]}"; do
      g++ -std=c++20 -fsyntax-only -Wall -DTORCH_EXTENSION_NAME=flowopd_native "${incs[@]}" "$cpp" &
      pids+=($!)
    done
    checked=${#cpps[@]}
  fi
fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ $status -ne 0 ]; then
  echo "check_cuda_sources: FAILED"
  exit 1
fi
echo "check_cuda_sources: $(ls csrc/*.cu | wc -l) .cu compiled for sm_90, $checked of ${#cpps[@]} .cpp checked, $((SECONDS - start)) s"
