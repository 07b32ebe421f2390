// Kernels that check the simulator itself (src/backend/cuda/sim.rs tests): the reductions every
// real kernel builds on, and the faults it must report rather than hang on. Host build only.
#include "../common.cuh"

// out[t] = block_sum and block_max of the thread indices, as every thread sees them.
template <typename T>
__device__ void sim_selftest_reduce_impl(T* out, int unused) {
    __shared__ float scratch[32];
    const float s = block_sum((float)threadIdx.x, scratch);
    const float m = block_max((float)threadIdx.x, scratch);
    out[2 * threadIdx.x] = from_f32<T>(s);
    out[2 * threadIdx.x + 1] = from_f32<T>(m);
    (void)unused;
}
#define SELFTEST_PARAMS(T) (T* out, int unused)
FASTRM_INSTANTIATE(sim_selftest_reduce, SELFTEST_PARAMS, (out, unused))

// A __syncthreads that thread 0 skips: undefined on hardware, a reported fault here.
template <typename T>
__device__ void sim_selftest_divergent_impl(T* out, int unused) {
    if (threadIdx.x != 0) __syncthreads();
    out[threadIdx.x] = from_f32<T>(1.f);
    (void)unused;
}
FASTRM_INSTANTIATE(sim_selftest_divergent, SELFTEST_PARAMS, (out, unused))

// A full-mask warp shuffle, which a block of 48 threads leaves with a 16-lane last warp.
template <typename T>
__device__ void sim_selftest_shuffle_impl(T* out, int unused) {
    out[threadIdx.x] = from_f32<T>(warp_sum(1.f));
    (void)unused;
}
FASTRM_INSTANTIATE(sim_selftest_shuffle, SELFTEST_PARAMS, (out, unused))

extern "C" {
// The storage conversions the kernels use, for comparison with the `half` crate.
uint16_t fastrm_sim_to_f16(float x) { return __float2half_rn(x).bits; }
uint16_t fastrm_sim_to_bf16(float x) { return __float2bfloat16_rn(x).bits; }
float fastrm_sim_from_f16(uint16_t b) { return __half2float(__half{b}); }
float fastrm_sim_from_bf16(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }
}
