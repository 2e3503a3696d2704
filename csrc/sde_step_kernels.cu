// Fused SDE step and Euler ODE step: the CUDA C++ twins of kernels/sde_step.py and kernels/ode_step.py.
//
// Layout (same contract as the Triton kernels and kernels/philox.py): a row of N elements is 4 lanes of
// Q = 16 * ceil(N / 64) groups; element n = lane * Q + g. One Philox4x32-10 call for group g feeds its 4
// lanes. Block (j, b) grid-strides over groups of row b; each thread takes VEC consecutive groups (VEC =
// 16 B / sizeof(T)) so every load and store of every lane is one 16-byte vector (two for float32 aux with
// 16-bit x). A row whose N is not a multiple of VEC, or a misaligned pointer, takes the VEC = 1 instance.
// The log-prob reduction is deterministic: each block writes its sum of (x' - mu)^2 to partial[b, j]
// (warp butterfly, then warps in order), a second kernel adds a row's partials in a fixed order. No
// atomics, no host synchronisation, no allocation: both launches are CUDA-graph capturable.
// Built without --use_fast_math: logf/sincosf/sqrtf are the precise library versions.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "sde_step.h"

namespace flowopd {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr float kHalfLog2Pi = 0.91893853320467274f;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};

// VEC elements as one aligned object: a 16-byte Pack compiles to one ld/st.global.v4, a 32-byte one to two.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* ptr, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = Cvt<T>::to(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* ptr, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = Cvt<T>::from(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pk;
}

// Philox4x32-10, key (seed lo, seed hi), counter (g, row, offset lo, offset hi), then two Box-Muller pairs
// of the exact float32 uniforms (r >> 9) 2^-23 + 2^-24 (kernels/philox.py documents the stream).
__device__ __forceinline__ void philox_normal4(uint64_t seed, uint64_t offset, uint32_t g, uint32_t row,
                                               float (&z)[4]) {
  uint32_t c0 = g, c1 = row, c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const float u0 = __uint2float_rn(c0 >> 9) * 0x1p-23f + 0x1p-24f;
  const float u1 = __uint2float_rn(c1 >> 9) * 0x1p-23f + 0x1p-24f;
  const float u2 = __uint2float_rn(c2 >> 9) * 0x1p-23f + 0x1p-24f;
  const float u3 = __uint2float_rn(c3 >> 9) * 0x1p-23f + 0x1p-24f;
  const float rad01 = sqrtf(-2.f * logf(u0)), rad23 = sqrtf(-2.f * logf(u2));
  float s01, c01, s23, c23;
  // sincospif(2u) = sincos(2 pi u) with an exact argument reduction: no slow path, no local-memory frame
  sincospif(2.f * u1, &s01, &c01);
  sincospif(2.f * u3, &s23, &c23);
  z[0] = rad01 * c01;
  z[1] = rad01 * s01;
  z[2] = rad23 * c23;
  z[3] = rad23 * s23;
}

struct Terms {
  float sigma, dt, s, std;
};

__device__ __forceinline__ Terms sigma_terms(const SdeStepParams& p, int64_t row) {
  const int64_t k = p.step[row * p.step_stride];
  const float sigma = p.sigmas[k];
  const float dt = p.sigmas[k + p.next_off] - sigma;
  const float tilde = sigma == 1.f ? p.sigmas[p.sig1_idx] : sigma;
  const float s = p.noise_level * sqrtf(sigma / (1.f - tilde));
  return {sigma, dt, s, s * sqrtf(-dt)};
}

// Sum over the block in a fixed order (the result is valid in thread 0).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

template <typename T, typename A, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads) sde_step_fwd_kernel(const SdeStepParams p) {
  const int64_t row = blockIdx.y;
  const Terms t = sigma_terms(p, row);
  const float c = t.s * t.s / (2.f * t.sigma);
  const int64_t base = row * p.n;
  const T* x = static_cast<const T*>(p.x) + base;
  const T* v = static_cast<const T*>(p.v) + base;
  const T* vc = p.vc != nullptr ? static_cast<const T*>(p.vc) + base : nullptr;
  const A* aux = p.aux != nullptr ? static_cast<const A*>(p.aux) + base : nullptr;
  T* sample = p.sample != nullptr ? static_cast<T*>(p.sample) + base : nullptr;
  T* mean = p.mean != nullptr ? static_cast<T*>(p.mean) + base : nullptr;
  const uint64_t seed = static_cast<uint64_t>(p.seed[row * p.seed_stride]);
  const uint64_t offset = static_cast<uint64_t>(p.offset[0]);
  const uint32_t ctr_row = p.seed_stride != 0 ? 0u : static_cast<uint32_t>(row);

  float acc = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t g0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; g0 < p.q; g0 += stride) {
    float z[VEC][4];
    if constexpr (MODE == kPhilox) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) philox_normal4(seed, offset, static_cast<uint32_t>(g0 + i), ctr_row, z[i]);
    }
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      // N % VEC == 0 on the vector path, so a vector is wholly inside the row or wholly past its end
      const int64_t n0 = lane * p.q + g0;
      if (n0 >= p.n) break;
      float xv[VEC], vv[VEC], mu[VEC], d[VEC];
      load<T, VEC>(x + n0, xv);
      load<T, VEC>(v + n0, vv);
      if (vc != nullptr) {
        float cv[VEC];
        load<T, VEC>(vc + n0, cv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) vv[i] += p.guidance * (cv[i] - vv[i]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) mu[i] = xv[i] + (vv[i] + c * (xv[i] + (1.f - t.sigma) * vv[i])) * t.dt;
      if constexpr (MODE == kPrevSample) {
        float pv[VEC];
        load<A, VEC>(aux + n0, pv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[i] = pv[i] - mu[i];
      } else {
        float e[VEC], xs[VEC];
        if constexpr (MODE == kGivenEps) {
          load<A, VEC>(aux + n0, e);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) e[i] = z[i][lane];
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          d[i] = t.std * e[i];
          xs[i] = mu[i] + d[i];
        }
        store<T, VEC>(sample + n0, xs);
      }
      if (mean != nullptr) store<T, VEC>(mean + n0, mu);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc += d[i] * d[i];
    }
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) p.partial[row * gridDim.x + blockIdx.x] = total;
}

__global__ void __launch_bounds__(kThreads) sde_logprob_kernel(const SdeStepParams p) {
  const int64_t row = blockIdx.x;
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < p.p; j += kThreads) acc += p.partial[row * p.p + j];
  const float total = block_sum(acc);
  if (threadIdx.x == 0) {
    const Terms t = sigma_terms(p, row);
    p.log_prob[row] = -total / (2.f * t.std * t.std * static_cast<float>(p.n)) - logf(t.std) - kHalfLog2Pi;
    p.std_out[row] = t.s;
  }
}

template <typename T, int VEC, bool CFG>
__global__ void __launch_bounds__(kThreads) ode_step_kernel(const OdeStepParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* v = static_cast<const T*>(p.v);
  const T* vc = static_cast<const T*>(p.vc);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; i0 < total; i0 += stride) {
    const int64_t k = p.step[(i0 / p.n) * p.step_stride];  // N % VEC == 0: a vector never straddles rows
    const float dt = p.sigmas[k + p.next_off] - p.sigmas[k];
    float xv[VEC], vv[VEC];
    load<T, VEC>(x + i0, xv);
    load<T, VEC>(v + i0, vv);
    if constexpr (CFG) {
      float cv[VEC];
      load<T, VEC>(vc + i0, cv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) vv[i] += p.guidance * (cv[i] - vv[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) xv[i] += dt * vv[i];
    store<T, VEC>(out + i0, xv);
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename A, int MODE>
cudaError_t launch_sde(const SdeStepParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.n % kVec == 0 && aligned16(p.x) && aligned16(p.v) && aligned16(p.vc) && aligned16(p.aux) &&
                   aligned16(p.sample) && aligned16(p.mean);
  const dim3 grid(static_cast<unsigned>(p.p), static_cast<unsigned>(p.rows));
  if (vec) {
    sde_step_fwd_kernel<T, A, kVec, MODE><<<grid, kThreads, 0, stream>>>(p);
  } else {
    sde_step_fwd_kernel<T, A, 1, MODE><<<grid, kThreads, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sde_logprob_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int MODE>
cudaError_t launch_sde_aux(const SdeStepParams& p, cudaStream_t stream) {
  if constexpr (MODE == kPhilox) {
    return launch_sde<T, T, MODE>(p, stream);
  } else {
    if (p.aux_dtype == p.dtype) return launch_sde<T, T, MODE>(p, stream);
    if (p.aux_dtype == DType::kFloat32) return launch_sde<T, float, MODE>(p, stream);
    return cudaErrorInvalidValue;
  }
}

template <int MODE>
cudaError_t launch_sde_dtype(const SdeStepParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_sde_aux<float, MODE>(p, stream);
    case DType::kBFloat16:
      return launch_sde_aux<__nv_bfloat16, MODE>(p, stream);
    case DType::kFloat16:
      return launch_sde_aux<__half, MODE>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_ode(const OdeStepParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.n % kVec == 0 && aligned16(p.x) && aligned16(p.v) && aligned16(p.vc) && aligned16(p.out);
  const int64_t per_block = static_cast<int64_t>(kThreads) * (vec ? kVec : 1);
  const int64_t blocks = (p.rows * p.n + per_block - 1) / per_block;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  const bool cfg = p.vc != nullptr;
  if (vec && cfg) ode_step_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(p);
  if (vec && !cfg) ode_step_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(p);
  if (!vec && cfg) ode_step_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(p);
  if (!vec && !cfg) ode_step_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sde_step_fwd(const SdeStepParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.rows > 65535 || p.p <= 0 || p.p > 65535 || p.n <= 0 || p.q * 4 < p.n || p.q % 16 != 0)
    return cudaErrorInvalidValue;
  if ((p.noise_mode != kPhilox) != (p.aux != nullptr) || (p.noise_mode != kPrevSample) != (p.sample != nullptr))
    return cudaErrorInvalidValue;
  switch (p.noise_mode) {
    case kPhilox:
      return launch_sde_dtype<kPhilox>(p, stream);
    case kGivenEps:
      return launch_sde_dtype<kGivenEps>(p, stream);
    case kPrevSample:
      return launch_sde_dtype<kPrevSample>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ode_step_fwd(const OdeStepParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.n <= 0) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_ode<float>(p, stream);
    case DType::kBFloat16:
      return launch_ode<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_ode<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flowopd
