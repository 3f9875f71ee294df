// CUDA memory figures tch does not bind: the caching allocator's current and peak
// bytes (what torch.cuda.max_memory_allocated / max_memory_reserved report), for
// the dashboard's VRAM gauge, `bench` and the estimator's validation. Built with
// DBT_HAVE_CUDA only where libtorch has CUDA and its headers are present; elsewhere
// every call answers "no CUDA" (-1).
#include <cstdint>

#ifdef DBT_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
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

}
