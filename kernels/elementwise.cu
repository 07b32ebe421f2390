// Elementwise ops, forward and backward side by side. Every kernel is a grid-stride loop over `n`
// elements; a launch of any grid size is correct.
//   add_fwd:         out[i] = a[i] + b[i % b_len]   (b_len = n, or one row broadcast over a's rows)
//   gelu_fwd:        out = x * Phi(x)               (exact, erf)
//   quick_gelu_fwd:  out = x * sigmoid(1.702 x)     (CLIP)
//   silu_mul_fwd:    out = silu(gate) * up
//   silu_mul_bwd:    dgate = dy * up * silu'(gate), dup = dy * silu(gate)
//   fill_uniform:    out[i] = center + spread * u_i, u_i the i-th SplitMix64 draw in [-1, 1) of
//                    `seed` (the CPU's `Synthetic` weights, value for value)
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

template <typename T>
__device__ void add_fwd_impl(T* out, const T* a, const T* b, long long n, long long b_len) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i % b_len]));
}
#define ADD_PARAMS(T) (T* out, const T* a, const T* b, long long n, long long b_len)
FASTRM_INSTANTIATE(add_fwd, ADD_PARAMS, (out, a, b, n, b_len))

template <typename T>
__device__ void gelu_fwd_impl(T* out, const T* x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]);
        out[i] = from_f32<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
    }
}
#define UNARY_PARAMS(T) (T* out, const T* x, long long n)
FASTRM_INSTANTIATE(gelu_fwd, UNARY_PARAMS, (out, x, n))

template <typename T>
__device__ void quick_gelu_fwd_impl(T* out, const T* x, long long n) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]);
        out[i] = from_f32<T>(v / (1.f + expf(-1.702f * v)));
    }
}
FASTRM_INSTANTIATE(quick_gelu_fwd, UNARY_PARAMS, (out, x, n))

template <typename T>
__device__ void silu_mul_fwd_impl(T* out, const T* gate, const T* up, long long n) {
    GRID_STRIDE(i, n) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g / (1.f + expf(-g)) * to_f32(up[i]));
    }
}
#define SILU_MUL_PARAMS(T) (T* out, const T* gate, const T* up, long long n)
FASTRM_INSTANTIATE(silu_mul_fwd, SILU_MUL_PARAMS, (out, gate, up, n))

template <typename T>
__device__ void silu_mul_bwd_impl(T* dgate, T* dup, const T* gate, const T* up, const T* dy, long long n) {
    GRID_STRIDE(i, n) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dy[i]);
        const float s = 1.f / (1.f + expf(-g));
        dup[i] = from_f32<T>(d * g * s);
        dgate[i] = from_f32<T>(d * u * s * (1.f + g * (1.f - s)));
    }
}
#define SILU_MUL_BWD_PARAMS(T) (T* dgate, T* dup, const T* gate, const T* up, const T* dy, long long n)
FASTRM_INSTANTIATE(silu_mul_bwd, SILU_MUL_BWD_PARAMS, (dgate, dup, gate, up, dy, n))

template <typename T>
__device__ void fill_uniform_impl(T* out, long long n, unsigned long long seed, float center, float spread) {
    GRID_STRIDE(i, n) {
        unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        // The CPU evaluates `(k / 2^24) * 2 - 1` then `center + spread * u` in f32, unfused:
        // the explicit _rn intrinsics keep nvcc from contracting them into FMAs.
        const float u = __fsub_rn(__fmul_rn((float)(z >> 40) / 16777216.f, 2.f), 1.f);
        out[i] = from_f32<T>(__fadd_rn(center, __fmul_rn(spread, u)));
    }
}
#define FILL_PARAMS(T) (T* out, long long n, unsigned long long seed, float center, float spread)
FASTRM_INSTANTIATE(fill_uniform, FILL_PARAMS, (out, n, seed, center, spread))
