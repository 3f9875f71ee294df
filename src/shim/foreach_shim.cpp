// Multi-tensor ("foreach" and fused) kernels that tch does not bind. On CUDA a
// per-parameter loop launches thousands of small kernels per optimizer step and,
// for the fp16 overflow check, synchronises once per parameter; these do the
// same work in a handful of launches, as torch.optim and GradScaler do.
#include <torch/torch.h>
#include <string>
#include <vector>

static thread_local std::string foreach_error;

static std::vector<at::Tensor> gather(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

extern "C" {

const char* dbt_foreach_last_error() { return foreach_error.c_str(); }

// torch._fused_adamw_ (decoupled weight decay, no amsgrad); `step` is one float
// tensor on the parameters' device holding the step number (already counted).
int dbt_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs, size_t n,
                    at::Tensor* step, double lr, double beta1, double beta2, double weight_decay, double eps) {
  try {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(gather(params, n), gather(grads, n), gather(exp_avgs, n), gather(exp_avg_sqs, n), {}, steps, lr,
                      beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return -1;
  }
}

// GradScaler's unscale: grads *= inv_scale; found_inf = 1 where any is inf/nan.
int dbt_foreach_unscale(at::Tensor** grads, size_t n, at::Tensor* found_inf, at::Tensor* inv_scale) {
  try {
    at::NoGradGuard no_grad;
    at::_amp_foreach_non_finite_check_and_unscale_(gather(grads, n), *found_inf, *inv_scale);
    return 0;
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return -1;
  }
}

// The global 2-norm of the tensors (clip_grad_norm_'s total norm), as a new tensor.
at::Tensor* dbt_foreach_total_norm(at::Tensor** ts, size_t n) {
  try {
    at::NoGradGuard no_grad;
    auto norms = at::_foreach_norm(gather(ts, n), 2);
    return new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return nullptr;
  }
}

// ts[i] *= factor (a one-element tensor on their device).
int dbt_foreach_mul_(at::Tensor** ts, size_t n, at::Tensor* factor) {
  try {
    at::NoGradGuard no_grad;
    at::_foreach_mul_(gather(ts, n), *factor);
    return 0;
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return -1;
  }
}

// dst[i].copy_(src[i]) in a few multi-tensor launches.
int dbt_foreach_copy_(at::Tensor** dst, at::Tensor** src, size_t n) {
  try {
    at::NoGradGuard no_grad;
    at::_foreach_copy_(gather(dst, n), gather(src, n));
    return 0;
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return -1;
  }
}

// ts[i].zero_() in a few launches.
int dbt_foreach_zero_(at::Tensor** ts, size_t n) {
  try {
    at::NoGradGuard no_grad;
    at::_foreach_zero_(gather(ts, n));
    return 0;
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return -1;
  }
}

// EMA: shadow[i] -= (shadow[i] - params[i]) * one_minus, as the per-tensor loop.
int dbt_foreach_ema_(at::Tensor** shadow, at::Tensor** params, size_t n, double one_minus) {
  try {
    at::NoGradGuard no_grad;
    auto s = gather(shadow, n);
    auto deltas = at::_foreach_sub(s, gather(params, n));
    at::_foreach_mul_(deltas, one_minus);
    at::_foreach_sub_(s, deltas);
    return 0;
  } catch (const std::exception& e) {
    foreach_error = e.what();
    return -1;
  }
}

}  // extern "C"
