// A hook that runs when a parameter's gradient is complete in the backward
// pass (PyTorch's register_post_accumulate_grad_hook, which tch does not bind),
// for `training.fused_backward`: the optimizer updates the tensor then and there,
// and its gradient is freed at once. Every function catches C++ exceptions and
// reports failure by return value.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

extern "C" {
// Called with the hook's context and the parameter's index; returns 1 when it
// used the gradient (which is then freed), 0 to leave the gradient as it is.
typedef int (*dbt_grad_ready_fn)(void* ctx, size_t index);
}

namespace {
struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  dbt_grad_ready_fn fn;
  void* ctx;
  size_t index;
  GradReadyHook(dbt_grad_ready_fn f, void* c, size_t i) : fn(f), ctx(c), index(i) {}
  void operator()(const torch::autograd::Variable& tensor) override {
    if (fn(ctx, index) == 1) {
      tensor.mutable_grad().reset();
    }
  }
};
}  // namespace

extern "C" {

// Sets (fn non-null) or removes (fn null) the hook of leaf tensor `t`. Returns 0 on success.
int dbt_set_grad_ready_hook(at::Tensor* t, dbt_grad_ready_fn fn, void* ctx, size_t index) {
  try {
    if (fn == nullptr) {
      torch::autograd::impl::set_post_acc_grad_hooks(*t, nullptr);
    } else {
      torch::autograd::impl::set_post_acc_grad_hooks(*t, std::make_unique<GradReadyHook>(fn, ctx, index));
    }
    return 0;
  } catch (...) {
    return 1;
  }
}

}
