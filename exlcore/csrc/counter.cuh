// Work split over blocks (or warps) and finished by the last one in: each counts itself in on a counter in global
// memory, and the one that finds all the others already in combines their partial results.
#pragma once

// counter += 1, returning the old value, with release and acquire semantics at GPU scope: after a barrier of the
// threads that wrote partial results, one thread's call publishes them; in the last one in, a barrier after its
// call orders every thread's loads of the others' results after it.
__device__ __forceinline__ int count_in(int* counter) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    return old;
}
