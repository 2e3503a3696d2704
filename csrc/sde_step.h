// Fused SDE / ODE steps (kernels/sde_step.py, kernels/ode_step.py are the Triton twins and the contract).
// Plain C++ / CUDA runtime types only: sde_step_kernels.cu compiles with bare nvcc (CI checks it against CPU
// torch, whose wheel cannot build CUDA extensions); the torch binding lives in sde_step_binding.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace flowopd {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum NoiseMode : int { kPhilox = 0, kGivenEps = 1, kPrevSample = 2 };

struct SdeStepParams {
  // [B, N] row-major, contiguous; x, v, vc share `dtype`, aux (eps or prev_sample) is `aux_dtype`
  // (== dtype, or float32).
  const void* x = nullptr;
  const void* v = nullptr;   // v, or v_u when vc != nullptr (CFG fused)
  const void* vc = nullptr;  // v_c or nullptr
  const void* aux = nullptr; // eps (kGivenEps) / prev_sample (kPrevSample) / nullptr (kPhilox)
  void* sample = nullptr;    // out x' (dtype); unused for kPrevSample
  void* mean = nullptr;      // out mu (dtype) or nullptr
  float* partial = nullptr;  // out [B, P] sums of (x' - mu)^2; P = blocks per row of the main kernel
  float* log_prob = nullptr; // out [B]
  float* std_out = nullptr;  // out [B] s
  const float* sigmas = nullptr;   // sigma table
  const int64_t* step = nullptr;   // step index per row (stride step_stride)
  const int64_t* seed = nullptr;   // Philox key per row (stride seed_stride)
  const int64_t* offset = nullptr; // [1] Philox counter words 2-3
  int64_t rows = 0, n = 0, q = 0, p = 0;
  int64_t step_stride = 0, seed_stride = 0, next_off = 1, sig1_idx = 1;
  float noise_level = 0.f, guidance = 1.f;
  int noise_mode = kPhilox;
  DType dtype = DType::kFloat32, aux_dtype = DType::kFloat32;
};

struct OdeStepParams {
  const void* x = nullptr;
  const void* v = nullptr;
  const void* vc = nullptr;
  void* out = nullptr;  // may alias x
  const float* sigmas = nullptr;
  const int64_t* step = nullptr;
  int64_t rows = 0, n = 0, step_stride = 0, next_off = 1;
  float guidance = 1.f;
  DType dtype = DType::kFloat32;
};

// Enqueue on `stream`; no host synchronisation, no allocation (graph-capturable). Returns the launch error,
// or cudaErrorInvalidValue for an unsupported dtype combination.
cudaError_t sde_step_fwd(const SdeStepParams& params, cudaStream_t stream);
cudaError_t ode_step_fwd(const OdeStepParams& params, cudaStream_t stream);

}  // namespace flowopd
