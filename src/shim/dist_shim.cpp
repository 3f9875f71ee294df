// The process group of data-parallel training: PyTorch's own c10d engine as
// libtorch ships it (TCPStore for the rendezvous, ProcessGroupGloo on the CPU,
// ProcessGroupNCCL on CUDA), bound for src/dist/group.rs. Nothing of our own
// goes over the wire.
//
// Built with DBT_HAVE_GLOO where Gloo's headers are found (the wheel has Gloo
// inside libtorch_cpu but not its headers: Debian's libgloo-dev supplies them)
// and with DBT_HAVE_NCCL where NCCL's and CUDA's headers are. This file only
// calls functions libtorch exports and never instantiates a class that derives
// from a Gloo type (GlooStore): Debian's 2022 Gloo lacks the Store v2 methods
// (GLOO_STORE_HAS_STORE_V2) of the Gloo inside torch 2.11, so such a vtable
// made here would differ from libtorch's. The classes made here (TCPStore,
// PrefixStore, ProcessGroupGloo and its Options) hold Gloo objects only
// through shared_ptr, so their layout does not depend on the Gloo headers.
//
// Every function catches C++ exceptions and reports failure by return value;
// dbt_dist_last_error says what failed.
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef DBT_HAVE_GLOO
#define USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef DBT_HAVE_NCCL
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <ATen/ATen.h>

static thread_local std::string last_error;

// Runs `body`, turning a C++ exception into `failed` and its message into
// dbt_dist_last_error's: no exception may cross into Rust.
template <class T, class Body>
static T guarded(T failed, Body&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    last_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = e.what();
  }
  return failed;
}

#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1: return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 2: return c10d::ReduceOp(c10d::ReduceOp::AVG);
    default: return c10d::ReduceOp(c10d::ReduceOp::SUM);
  }
}
}  // namespace
#endif

extern "C" {

const char* dbt_dist_last_error() { return last_error.c_str(); }

// Which back ends this build has: bit 0 Gloo, bit 1 NCCL.
int dbt_dist_backends() {
  int bits = 0;
#ifdef DBT_HAVE_GLOO
  bits |= 1;
#endif
#ifdef DBT_HAVE_NCCL
  bits |= 2;
#endif
  return bits;
}

// Joins the group of `world` processes as `rank`. The TCPStore at host:port is
// hosted by this process when `host_store` is 1 (rank 0, unless torchrun's agent
// hosts it); `prefix` (may be empty) separates the keys of one attempt from
// another's on a shared store. backend: 0 Gloo, 1 NCCL (on CUDA device
// `cuda_index`). `timeout_ms` bounds the rendezvous and every collective.
// Returns the group, or null (see dbt_dist_last_error).
void* dbt_dist_init(const char* host, int port, int rank, int world, int host_store, const char* prefix, int backend,
                    int cuda_index, int64_t timeout_ms) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  return guarded(static_cast<void*>(nullptr), [&]() -> void* {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(port);
    store_options.isServer = host_store != 0;
    store_options.numWorkers = static_cast<std::size_t>(world);
    // The Gloo rendezvous waits for every rank; the store's own wait counts
    // connections in a way that can stall the host here.
    store_options.waitWorkers = false;
    store_options.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(std::string(host), store_options);
    if (prefix != nullptr && prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    }
    auto group = new Group();
    group->store = store;
    auto pg_store = c10::make_intrusive<c10d::PrefixStore>("dreambooth", store);
    if (backend == 0) {
#ifdef DBT_HAVE_GLOO
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(pg_store, rank, world, options);
#else
      delete group;
      last_error = "this build has no Gloo";
      return nullptr;
#endif
    } else {
#ifdef DBT_HAVE_NCCL
      (void)cuda_index;
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(pg_store, rank, world, options);
#else
      (void)cuda_index;
      delete group;
      last_error = "this build has no NCCL";
      return nullptr;
#endif
    }
    return group;
  });
#else
  (void)host; (void)port; (void)rank; (void)world; (void)host_store; (void)prefix; (void)backend; (void)cuda_index;
  (void)timeout_ms;
  last_error = "this build has no c10d back end";
  return nullptr;
#endif
}

// Reduces each of the `n` tensors in place across the group (op: 0 sum, 1 max,
// 2 average). All are started before the first is waited for, so the buckets
// of one step travel together. Returns 0 on success, -1 on failure.
int dbt_dist_all_reduce(void* handle, at::Tensor** tensors, size_t n, int op) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  return guarded(-1, [&]() -> int {
    auto group = static_cast<Group*>(handle);
    c10d::AllreduceOptions options;
    options.reduceOp = reduce_op(op);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*tensors[i]};
      works.push_back(group->backend->allreduce(one, options));
    }
    for (auto& work : works) {
      work->wait();
    }
    return 0;
  });
#else
  (void)handle; (void)tensors; (void)n; (void)op;
  last_error = "this build has no c10d back end";
  return -1;
#endif
}

// Starts reducing `tensor` in place across the group (op as above) without
// waiting: a bucket started while the backward pass goes on. Returns the
// pending work for dbt_dist_work_wait, or null (see dbt_dist_last_error).
void* dbt_dist_all_reduce_start(void* handle, at::Tensor* tensor, int op) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  return guarded(static_cast<void*>(nullptr), [&]() -> void* {
    auto group = static_cast<Group*>(handle);
    c10d::AllreduceOptions options;
    options.reduceOp = reduce_op(op);
    std::vector<at::Tensor> one{*tensor};
    return new c10::intrusive_ptr<c10d::Work>(group->backend->allreduce(one, options));
  });
#else
  (void)handle; (void)tensor; (void)op;
  last_error = "this build has no c10d back end";
  return nullptr;
#endif
}

// Waits for work from dbt_dist_all_reduce_start (`wait` 1), or lets it go
// (`wait` 0: the work keeps its tensor alive until done), and frees the handle.
// Returns 0 on success, -1 on failure.
int dbt_dist_work_finish(void* work, int wait) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  auto pending = static_cast<c10::intrusive_ptr<c10d::Work>*>(work);
  int rc = guarded(-1, [&]() -> int {
    if (wait != 0) (*pending)->wait();
    return 0;
  });
  delete pending;
  return rc;
#else
  (void)work; (void)wait;
  last_error = "this build has no c10d back end";
  return -1;
#endif
}

// Copies rank `root`'s tensor into every rank's. Returns 0 on success, -1 on failure.
int dbt_dist_broadcast(void* handle, at::Tensor* tensor, int root) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  return guarded(-1, [&]() -> int {
    auto group = static_cast<Group*>(handle);
    c10d::BroadcastOptions options;
    options.rootRank = root;
    std::vector<at::Tensor> one{*tensor};
    group->backend->broadcast(one, options)->wait();
    return 0;
  });
#else
  (void)handle; (void)tensor; (void)root;
  last_error = "this build has no c10d back end";
  return -1;
#endif
}

// Waits until every rank has called it, or `timeout_ms` has passed (a wait
// longer than the group's own time-out, for work that only one rank does).
// Goes through the store, so it needs no device. Returns 0, or -1 on failure.
int dbt_dist_barrier(void* handle, const char* name, int world, int64_t timeout_ms) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  return guarded(-1, [&]() -> int {
    auto group = static_cast<Group*>(handle);
    std::string key = std::string("barrier/") + name;
    group->store->add(key, 1);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (group->store->add(key, 0) < world) {
      if (std::chrono::steady_clock::now() > deadline) {
        last_error = std::string("timed out waiting at ") + key;
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return 0;
  });
#else
  (void)handle; (void)name; (void)world; (void)timeout_ms;
  last_error = "this build has no c10d back end";
  return -1;
#endif
}

// Makes `grad` the gradient of leaf tensor `param` (tch binds no setter): the
// averaged gradient of a rank whose share of a batch was empty.
void dbt_dist_set_grad(at::Tensor* param, at::Tensor* grad) {
  param->mutable_grad() = *grad;
}

void dbt_dist_free(void* handle) {
#if defined(DBT_HAVE_GLOO) || defined(DBT_HAVE_NCCL)
  try {
    auto group = static_cast<Group*>(handle);
    if (group->backend) group->backend->shutdown();
    delete group;
  } catch (...) {
  }
#else
  (void)handle;
#endif
}

}  // extern "C"
