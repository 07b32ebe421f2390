// Host emulation of the CUDA C++ our kernels use, so `kernels/*.cu` compile unchanged as ordinary
// C++ (g++, `-DFASTRM_SIM`) and run on the CPU behind the simulated device of the `sim` feature
// (src/backend/cuda/sim.rs). It exists to run the CUDA backend's own code paths, launch
// configurations and kernel bodies in CI, where no GPU exists; it says nothing about speed.
//
// Every CUDA thread of a block is a fiber on the launching OS thread. A fiber runs until it
// reaches a barrier (`__syncthreads`, or a warp shuffle, which synchronises its warp the way
// `__shfl_xor_sync(0xffffffff, ..)` requires), so the scheduler interleaves threads only where
// the hardware's ordering guarantees allow it. A barrier that some threads never reach (a
// `__syncthreads` under divergent control flow, a shuffle in a partial warp) is reported as an
// error instead of hanging. `__shared__` variables are thread-local statics: one copy per OS
// thread, shared by the fibers of the block that thread is running (blocks run one after the
// other), so tests that launch from several threads at once do not see each other's data.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local

namespace fastrm_sim {

struct dim3 {
    unsigned x, y, z;
};

extern thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// Block-wide barrier of the running block.
void sync_block();
// Exchange within the calling thread's warp: every lane's `v` in, lane (self ^ mask)'s out.
float shfl_xor(float v, int mask);
// The launch's dynamic shared memory (poisoned with NaN bytes at the start of every block).
void* dynamic_smem();

}  // namespace fastrm_sim

#define threadIdx (fastrm_sim::thread_idx)
#define blockIdx (fastrm_sim::block_idx)
#define blockDim (fastrm_sim::block_dim)
#define gridDim (fastrm_sim::grid_dim)

inline void __syncthreads() { fastrm_sim::sync_block(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return fastrm_sim::shfl_xor(v, mask); }

// CUDA's device math that the C library lacks or spells differently.
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
using std::isnan;
// Round-to-nearest intrinsics: plain operations, because the library is built with
// -ffp-contract=off (nothing is fused into an FMA behind our back).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// CUDA's 16-byte vector type, for kernels that load four words at once.
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

// Storage types: bit patterns with round-to-nearest-even conversions, as cuda_fp16.h and
// cuda_bf16.h define them.
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline uint32_t fastrm_sim_f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float fastrm_sim_bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000) << 16;
    const uint32_t exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
    if (exp == 0x1f) return fastrm_sim_bits_f32(sign | 0x7f800000 | (man << 13));
    if (exp != 0) return fastrm_sim_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
    // Zero or subnormal: man * 2^-24, exact in f32.
    const float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

inline __half __float2half_rn(float f) {
    uint32_t x = fastrm_sim_f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffff;
    if (x >= 0x7f800000) return {(uint16_t)(sign | (x > 0x7f800000 ? 0x7e00 : 0x7c00))};
    if (x < 0x38800000) {  // below half's smallest normal (2^-14): subnormal or zero
        if (x < 0x33000000) return {sign};  // at most 2^-25: rounds to (even) zero
        const uint32_t e = x >> 23, m = (x & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e;  // m * 2^(e-150) in units of 2^-24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (r & 1))) ++r;
        return {(uint16_t)(sign | r)};
    }
    // Normal: rebias the exponent, round the 13 dropped bits; a carry rolls into the exponent
    // (up to infinity), which is what rounding should do.
    uint32_t r = (x - 0x38000000) >> 13;
    const uint32_t rem = x & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
    if (r > 0x7c00) r = 0x7c00;
    return {(uint16_t)(sign | r)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return fastrm_sim_bits_f32((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t x = fastrm_sim_f32_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return {(uint16_t)((x >> 16) | 0x40)};  // quiet NaN
    return {(uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16)};
}

// Kernel registration: each `FASTRM_INSTANTIATE` records its three entry points with their
// parameter sizes, so a launch from Rust with the wrong number or width of arguments is an error
// rather than a kernel reading garbage.
namespace fastrm_sim {

using Invoke = void (*)(void (*)(), const void* const*);

void register_kernel(const char* name, void (*fn)(), Invoke invoke, const size_t* sizes, size_t n);

template <typename... A, size_t... I>
void call_with(void (*f)(A...), const void* const* args, std::index_sequence<I...>) {
    f(*static_cast<const A*>(args[I])...);
}

template <typename... A>
void invoke(void (*erased)(), const void* const* args) {
    call_with(reinterpret_cast<void (*)(A...)>(erased), args, std::index_sequence_for<A...>{});
}

template <typename... A>
void add(const char* name, void (*f)(A...)) {
    static const size_t sizes[] = {sizeof(A)..., 0};
    register_kernel(name, reinterpret_cast<void (*)()>(f), &invoke<A...>, sizes, sizeof...(A));
}

struct Registrar {
    template <typename F32, typename F16, typename BF16>
    Registrar(const char* f32, F32 a, const char* f16, F16 b, const char* bf16, BF16 c) {
        add(f32, a);
        add(f16, b);
        add(bf16, c);
    }
};

}  // namespace fastrm_sim
