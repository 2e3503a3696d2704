// torch bindings of the fused SDE / ODE steps: torch.ops.flowopd.sde_step_fwd and torch.ops.flowopd.ode_step_fwd.
// The Python side (kernels/sde_step.py, kernels/ode_step.py) allocates every output and the [B, P] partials,
// so these ops only validate and enqueue on the current stream: no allocation, no host sync (graph-safe).
// Other csrc/ files register into the same `flowopd` namespace with their own TORCH_LIBRARY_FRAGMENT.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "sde_step.h"

namespace flowopd {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "flowopd native steps take float32/bfloat16/float16, got ", t);
  }
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == x.numel(), name, " must have ", x.numel(), " elements, got ", t.numel());
}

void check_small(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == dtype && t.is_contiguous(), name, " must be a contiguous ",
              dtype, " tensor on ", x.device());
}

const void* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void sde_step_fwd_op(const at::Tensor& x, const at::Tensor& v, const std::optional<at::Tensor>& v_cond,
                     const std::optional<at::Tensor>& aux, int64_t noise_mode, const at::Tensor& sigmas,
                     const at::Tensor& step, int64_t next_off, int64_t sig1_idx, const at::Tensor& seed,
                     const at::Tensor& offset, double noise_level, double guidance,
                     const std::optional<at::Tensor>& sample, const std::optional<at::Tensor>& mean,
                     const at::Tensor& partial, const at::Tensor& log_prob, const at::Tensor& std_out) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 2, "x must be a contiguous CUDA tensor [B, ...]");
  const int64_t rows = x.size(0);
  check_like(v, x, "v");
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "v must have x's dtype");
  if (v_cond.has_value()) {
    check_like(*v_cond, x, "v_cond");
    TORCH_CHECK(v_cond->scalar_type() == x.scalar_type(), "v_cond must have x's dtype");
  }
  TORCH_CHECK((noise_mode == kPhilox) != aux.has_value(), "aux (eps or prev_sample) is given iff noise_mode != 0");
  if (aux.has_value()) {
    check_like(*aux, x, "aux");
    TORCH_CHECK(aux->scalar_type() == x.scalar_type() || aux->scalar_type() == at::kFloat,
                "eps / prev_sample must have x's dtype or float32");
  }
  TORCH_CHECK((noise_mode == kPrevSample) != sample.has_value(), "sample is written iff noise_mode != 2");
  if (sample.has_value()) check_like(*sample, x, "sample");
  if (mean.has_value()) check_like(*mean, x, "mean");
  check_small(sigmas, x, at::kFloat, "sigmas");
  check_small(step, x, at::kLong, "step");
  check_small(seed, x, at::kLong, "seed");
  check_small(offset, x, at::kLong, "offset");
  check_small(partial, x, at::kFloat, "partial");
  check_small(log_prob, x, at::kFloat, "log_prob");
  check_small(std_out, x, at::kFloat, "std");
  TORCH_CHECK(step.numel() == 1 || step.numel() == rows, "step must have 1 or B elements");
  TORCH_CHECK(seed.numel() == 1 || seed.numel() == rows, "seed must have 1 or B elements");
  TORCH_CHECK(partial.dim() == 2 && partial.size(0) == rows, "partial must be [B, P]");
  TORCH_CHECK(log_prob.numel() == rows && std_out.numel() == rows, "log_prob and std must have B elements");
  if (sample.has_value()) TORCH_CHECK(sample->scalar_type() == x.scalar_type(), "sample must have x's dtype");
  if (mean.has_value()) TORCH_CHECK(mean->scalar_type() == x.scalar_type(), "mean must have x's dtype");

  SdeStepParams p;
  p.x = x.data_ptr();
  p.v = v.data_ptr();
  p.vc = opt_ptr(v_cond);
  p.aux = opt_ptr(aux);
  p.sample = sample.has_value() ? sample->data_ptr() : nullptr;
  p.mean = mean.has_value() ? mean->data_ptr() : nullptr;
  p.partial = partial.data_ptr<float>();
  p.log_prob = log_prob.data_ptr<float>();
  p.std_out = std_out.data_ptr<float>();
  p.sigmas = sigmas.data_ptr<float>();
  p.step = step.data_ptr<int64_t>();
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.rows = rows;
  p.n = x.numel() / rows;
  p.q = 16 * ((p.n + 63) / 64);
  p.p = partial.size(1);
  p.step_stride = step.numel() == 1 ? 0 : 1;
  p.seed_stride = seed.numel() == 1 ? 0 : 1;
  p.next_off = next_off;
  p.sig1_idx = sig1_idx;
  p.noise_level = static_cast<float>(noise_level);
  p.guidance = static_cast<float>(guidance);
  p.noise_mode = static_cast<int>(noise_mode);
  p.dtype = to_dtype(x.scalar_type());
  p.aux_dtype = aux.has_value() ? to_dtype(aux->scalar_type()) : p.dtype;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = sde_step_fwd(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flowopd sde_step_fwd: ", cudaGetErrorString(err));
}

void ode_step_fwd_op(const at::Tensor& x, const at::Tensor& v, const std::optional<at::Tensor>& v_cond,
                     const at::Tensor& sigmas, const at::Tensor& step, int64_t next_off, double guidance,
                     const at::Tensor& out) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 2, "x must be a contiguous CUDA tensor [B, ...]");
  check_like(v, x, "v");
  check_like(out, x, "out");
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "v and out must have x's dtype");
  if (v_cond.has_value()) {
    check_like(*v_cond, x, "v_cond");
    TORCH_CHECK(v_cond->scalar_type() == x.scalar_type(), "v_cond must have x's dtype");
  }
  check_small(sigmas, x, at::kFloat, "sigmas");
  check_small(step, x, at::kLong, "step");
  TORCH_CHECK(step.numel() == 1 || step.numel() == x.size(0), "step must have 1 or B elements");

  OdeStepParams p;
  p.x = x.data_ptr();
  p.v = v.data_ptr();
  p.vc = opt_ptr(v_cond);
  p.out = out.data_ptr();
  p.sigmas = sigmas.data_ptr<float>();
  p.step = step.data_ptr<int64_t>();
  p.rows = x.size(0);
  p.n = x.numel() / x.size(0);
  p.step_stride = step.numel() == 1 ? 0 : 1;
  p.next_off = next_off;
  p.guidance = static_cast<float>(guidance);
  p.dtype = to_dtype(x.scalar_type());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = ode_step_fwd(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flowopd ode_step_fwd: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace flowopd

TORCH_LIBRARY_FRAGMENT(flowopd, m) {
  m.def(
      "sde_step_fwd(Tensor x, Tensor v, Tensor? v_cond, Tensor? aux, int noise_mode, Tensor sigmas, Tensor step, "
      "int next_off, int sig1_idx, Tensor seed, Tensor offset, float noise_level, float guidance, "
      "Tensor(a!)? sample, Tensor(b!)? mean, Tensor(c!) partial, Tensor(d!) log_prob, Tensor(e!) std) -> ()");
  m.def(
      "ode_step_fwd(Tensor x, Tensor v, Tensor? v_cond, Tensor sigmas, Tensor step, int next_off, float guidance, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(flowopd, CUDA, m) {
  m.impl("sde_step_fwd", &flowopd::sde_step_fwd_op);
  m.impl("ode_step_fwd", &flowopd::ode_step_fwd_op);
}
