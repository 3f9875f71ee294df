// CUDA memory figures tch does not bind: the caching allocator's current and peak
// bytes (what torch.cuda.max_memory_allocated / max_memory_reserved report), for
// the dashboard's VRAM gauge, `bench` and the estimator's validation. Built with
// DBT_HAVE_CUDA only where libtorch has CUDA and its headers are present; elsewhere
// every call answers "no CUDA" (-1).
#include <cstdint>

#ifdef DBT_HAVE_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <string>
static thread_local std::string graph_error;
#endif

extern "C" {

int dbt_cuda_memory(int device, int64_t* allocated, int64_t* allocated_peak, int64_t* reserved, int64_t* reserved_peak) {
#ifdef DBT_HAVE_CUDA
    try {
        if (device < 0 || device >= static_cast<int>(c10::cuda::device_count())) return -1;
        auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
        const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
        *allocated = stats.allocated_bytes[all].current;
        *allocated_peak = stats.allocated_bytes[all].peak;
        *reserved = stats.reserved_bytes[all].current;
        *reserved_peak = stats.reserved_bytes[all].peak;
        return 0;
    } catch (...) {
        return -1;
    }
#else
    (void)device; (void)allocated; (void)allocated_peak; (void)reserved; (void)reserved_peak;
    return -1;
#endif
}

int dbt_cuda_reset_peak(int device) {
#ifdef DBT_HAVE_CUDA
    try {
        if (device < 0 || device >= static_cast<int>(c10::cuda::device_count())) return -1;
        c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
        return 0;
    } catch (...) {
        return -1;
    }
#else
    (void)device;
    return -1;
#endif
}

// CUDA graphs (the training step captured once, then replayed): see
// src/train/cuda_graph.rs. Every call returns 0 on success, -1 without CUDA,
// -2 on a libtorch error (dbt_graph_last_error says which).

const char* dbt_graph_last_error() {
#ifdef DBT_HAVE_CUDA
    return graph_error.c_str();
#else
    return "this build has no CUDA";
#endif
}

// Makes a pool stream the calling thread's current stream on `device`: capture
// cannot run on the default stream, and warm-up, capture and replay must share one.
int dbt_cuda_use_side_stream(int device) {
#ifdef DBT_HAVE_CUDA
    try {
        c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device)));
        return 0;
    } catch (const std::exception& e) {
        graph_error = e.what();
        return -2;
    }
#else
    (void)device;
    return -1;
#endif
}

void* dbt_graph_new() {
#ifdef DBT_HAVE_CUDA
    try {
        return new at::cuda::CUDAGraph();
    } catch (const std::exception& e) {
        graph_error = e.what();
        return nullptr;
    }
#else
    return nullptr;
#endif
}

void dbt_graph_free(void* graph) {
#ifdef DBT_HAVE_CUDA
    try {
        delete static_cast<at::cuda::CUDAGraph*>(graph);
    } catch (...) {
    }
#else
    (void)graph;
#endif
}

// op: 0 capture_begin (on the current stream, a private memory pool),
// 1 capture_end (instantiates), 2 replay.
int dbt_graph_op(void* graph, int op) {
#ifdef DBT_HAVE_CUDA
    try {
        auto* g = static_cast<at::cuda::CUDAGraph*>(graph);
        switch (op) {
            case 0: g->capture_begin(); break;
            case 1: g->capture_end(); break;
            case 2: g->replay(); break;
            default: graph_error = "unknown graph operation"; return -2;
        }
        return 0;
    } catch (const std::exception& e) {
        graph_error = e.what();
        return -2;
    }
#else
    (void)graph; (void)op;
    return -1;
#endif
}

// Hands the caching allocator's unused blocks back to the driver (after a
// capture, the eager warm-up's activations are no longer needed).
int dbt_cuda_empty_cache() {
#ifdef DBT_HAVE_CUDA
    try {
        c10::cuda::CUDACachingAllocator::emptyCache();
        return 0;
    } catch (const std::exception& e) {
        graph_error = e.what();
        return -2;
    }
#else
    return -1;
#endif
}

}
