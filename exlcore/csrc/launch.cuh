// Programmatic dependent launch (compute capability 9.0 on): a kernel started with `launch` may begin while the
// kernel before it in the stream is finishing. Before dependency_wait() it may only read what no kernel writes
// (weights, tables); after it, everything earlier kernels wrote is visible, and only then may it write (memory
// it writes can still be read by the kernel before). dependents_start() lets the next kernel begin, so its
// launch, and its reads of weights, overlap this kernel's end. A decode step is a chain of small kernels, where
// these gaps add up. A kernel that calls dependents_start() before its own wait lets the next one start while the
// kernel before it still runs: reads before the wait are of weights, tables and earlier steps' results only.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include <map>
#include <mutex>
#include <utility>

__device__ __forceinline__ void dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void dependents_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A 4-byte load of data no kernel writes, issued before a later dependency_wait(): ptxas moves the wait above
// read-only (.nc) loads, such as __ldg's, which then start only once the kernel before has finished; a plain
// global load stays where it is.
__device__ __forceinline__ uint32_t load_early(const void* p) {
    uint32_t v;
    asm volatile("ld.global.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// compute() for `kernel` on the current device, run once per (kernel, device, kind of query) and kept: host
// queries and settings (attributes, occupancy) that would otherwise cost every launch of a decode step.
template <typename F>
int once_per_device(const void* kernel, F&& compute) {
    static std::mutex mutex;
    static std::map<std::pair<const void*, int>, int> known;
    int device = 0;
    cudaGetDevice(&device);
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_pair(kernel, device);
    const auto it = known.find(key);
    return it != known.end() ? it->second : known[key] = compute();
}

// Whether `kernel` runs the waits above on the current device: built from sm_90 code (an older PTX target, JIT-
// compiled for a newer GPU, has them compiled out, and must then be launched in stream order).
inline bool overlap_allowed(const void* kernel) {
    return once_per_device(kernel, [&] {
        cudaFuncAttributes a{};
        return int(cudaFuncGetAttributes(&a, kernel) == cudaSuccess && a.ptxVersion >= 90 && a.binaryVersion >= 90);
    });
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                   Args... args) {
    cudaLaunchAttribute overlap{};
    overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    overlap.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    config.attrs = &overlap;
    config.numAttrs = overlap_allowed(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, args...);
}
