// Shared helpers for every fastrm kernel: storage-type conversion (tensors are stored as f32, f16
// or bf16; all arithmetic is f32), warp/block reductions, and the macro that instantiates one
// templated kernel body for the three storage types under the names `<op>_<dtype>`.
#pragma once
#ifdef FASTRM_SIM
#include "sim/sim.h"  // host build for the simulated device (kernels/sim/)
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
#include <stdint.h>

typedef __half f16;
typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` holds 32 floats of shared memory; the leading barrier makes back-to-back calls
// with the same scratch safe.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// One kernel body, three exported entry points: `NAME_f32`, `NAME_f16`, `NAME_bf16`. The body is a
// template `NAME##_impl<T>` taking exactly the kernel's parameters. The simulator's build registers
// the three under the same names instead of exporting them.
#ifdef FASTRM_SIM
#define FASTRM_INSTANTIATE(NAME, PARAMS, ARGS)                                      \
    static void NAME##_f32 PARAMS(float) { NAME##_impl<float> ARGS; }             \
    static void NAME##_f16 PARAMS(f16) { NAME##_impl<f16> ARGS; }                 \
    static void NAME##_bf16 PARAMS(bf16) { NAME##_impl<bf16> ARGS; }              \
    static fastrm_sim::Registrar NAME##_registrar(#NAME "_f32", NAME##_f32, #NAME "_f16", \
                                                  NAME##_f16, #NAME "_bf16", NAME##_bf16);
#define FASTRM_DYNAMIC_SHARED(T, NAME) T* NAME = static_cast<T*>(fastrm_sim::dynamic_smem())
#else
#define FASTRM_INSTANTIATE(NAME, PARAMS, ARGS)                                   \
    extern "C" __global__ void NAME##_f32 PARAMS(float) { NAME##_impl<float> ARGS; } \
    extern "C" __global__ void NAME##_f16 PARAMS(f16) { NAME##_impl<f16> ARGS; }     \
    extern "C" __global__ void NAME##_bf16 PARAMS(bf16) { NAME##_impl<bf16> ARGS; }
#define FASTRM_DYNAMIC_SHARED(T, NAME) extern __shared__ T NAME[]
#endif
