// Autocast for training, on any device type (tch binds CUDA autocast only): the
// mixed_precision setting must really change the math, on the CPU too (bf16/fp16).
// Every function catches C++ exceptions and reports failure by return value.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

extern "C" {

// torch.set_flush_denormal(True): tiny Adam moments (grad² of small gradients)
// become denormal floats, which make CPU math tens of times slower.
int dbt_set_flush_denormal(int on) {
  try {
    return at::globalContext().setFlushDenormal(on != 0) ? 0 : 1;
  } catch (...) {
    return 1;
  }
}

// Enables autocast for `cuda` (1) or the CPU (0) with `dtype` (c10::ScalarType
// code: 5 half, 15 bfloat16) or disables it (enabled 0). Returns 0 on success.
int dbt_autocast_set(int cuda, int enabled, int dtype) {
  try {
    auto device = cuda ? at::kCUDA : at::kCPU;
    if (enabled) {
      at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(dtype));
      at::autocast::set_autocast_enabled(device, true);
      at::autocast::increment_nesting();
    } else {
      at::autocast::set_autocast_enabled(device, false);
      if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
      }
    }
    return 0;
  } catch (...) {
    return 1;
  }
}

// Turns autocast's weight-cast cache on or off; returns whether it was on
// (-1 on failure). CUDA graph capture runs with it off, as PyTorch requires.
int dbt_autocast_cache_set(int enabled) {
  try {
    bool was = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(enabled != 0);
    return was ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

}
