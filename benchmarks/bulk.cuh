// The copy engine (cp.async.bulk, sm_90) feeding a ring of shared-memory slots, each with an mbarrier, and a grid-wide
// barrier: the pieces benchmarks/persist.py, persist_step.py and stream_gemv.py build their prototypes from.
#pragma once
#include <cstdint>

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(unsigned bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals));
}

// The issuing thread's arrival on barrier `bar`, whose phase then completes once `bytes` of copies have landed.
__device__ __forceinline__ void expect_bytes(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// Start a copy of `bytes` from global `src` into shared `dst`, counted on barrier `bar` as it lands.
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

__device__ __forceinline__ void barrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Until barrier `bar` has completed the phase of this parity.
__device__ __forceinline__ void barrier_wait(unsigned bar, unsigned parity) {
    unsigned ok = 0;
    while (!ok)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
}

// One thread per block, its block's other threads held at a block barrier on either side: counts the block in
// (release), then reads the count until `target` are in (acquire).
__device__ __forceinline__ void grid_count(unsigned* sync, unsigned target) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(sync) : "memory");
    unsigned in = 0;
    while (in < target) asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(in) : "l"(sync) : "memory");
}
