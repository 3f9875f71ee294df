// The few libtorch calls tch does not bind, behind a C interface.
// - Private CPU generators: a run's noise must not depend on what else in the
//   process draws random numbers (tests in parallel threads, previews).
// - Generator state get/set: exact resume.
// - `param.grad = None`: set_grads_to_none.
// Every function catches C++ exceptions and reports failure by return value.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <mutex>
#include <cstring>

static thread_local char last_error[512];

static void set_error(const char* what) {
  std::strncpy(last_error, what, sizeof(last_error) - 1);
  last_error[sizeof(last_error) - 1] = 0;
}

extern "C" {

const char* dbt_last_error() { return last_error; }

void* dbt_generator_new(uint64_t seed) {
  try {
    return new at::Generator(at::make_generator<at::CPUGeneratorImpl>(seed));
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

void dbt_generator_free(void* g) { delete static_cast<at::Generator*>(g); }

// Standard normal float32 CPU tensor, drawn as torch.randn(size, generator=g).
at::Tensor* dbt_randn(void* g, const int64_t* sizes, size_t n) {
  try {
    auto& gen = *static_cast<at::Generator*>(g);
    return new at::Tensor(at::randn(at::IntArrayRef(sizes, n), gen, at::TensorOptions().dtype(at::kFloat)));
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

// Uniform [0, 1) float32, as torch.rand(size, generator=g).
at::Tensor* dbt_rand(void* g, const int64_t* sizes, size_t n) {
  try {
    auto& gen = *static_cast<at::Generator*>(g);
    return new at::Tensor(at::rand(at::IntArrayRef(sizes, n), gen, at::TensorOptions().dtype(at::kFloat)));
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

// int64 in [low, high), as torch.randint(low, high, size, generator=g).
at::Tensor* dbt_randint(void* g, int64_t low, int64_t high, const int64_t* sizes, size_t n) {
  try {
    auto& gen = *static_cast<at::Generator*>(g);
    return new at::Tensor(at::randint(low, high, at::IntArrayRef(sizes, n), gen, at::TensorOptions().dtype(at::kLong)));
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

// A random permutation of 0..n-1, as torch.randperm(n, generator=g).
at::Tensor* dbt_randperm(void* g, int64_t n) {
  try {
    auto& gen = *static_cast<at::Generator*>(g);
    return new at::Tensor(at::randperm(n, gen, at::TensorOptions().dtype(at::kLong)));
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

at::Tensor* dbt_generator_get_state(void* g) {
  try {
    auto& gen = *static_cast<at::Generator*>(g);
    std::lock_guard<std::mutex> lock(gen.mutex());
    return new at::Tensor(gen.get_state());
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

int dbt_generator_set_state(void* g, const at::Tensor* state) {
  try {
    auto& gen = *static_cast<at::Generator*>(g);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what());
    return 1;
  }
}

// param.grad = None
void dbt_grad_reset(at::Tensor* t) {
  try {
    t->mutable_grad().reset();
  } catch (...) {
  }
}

// A pinned (page-locked) copy of a CPU tensor, or null. tch's binding always
// passes pin_memory's deprecated `device` argument, which warns on every call.
at::Tensor* dbt_pin_memory(const at::Tensor* t) {
  try {
    return new at::Tensor(t->pin_memory());
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

}  // extern "C"
