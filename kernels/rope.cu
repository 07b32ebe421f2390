// Rotary embedding, split-halves layout (HF `rotate_half`). `rope_fwd` serves the backward too:
// `sign` = +1 rotates by +angle (forward), -1 by -angle (the backward is the inverse rotation).
// Reads x [n, heads*head_dim] and inv_freq [head_dim/2] (f32, computed on the host exactly as the CPU
// backend and torch do); writes out of the same shape. The angle is the f32 product
// inv_freq * position, as torch forms it; cos/sin are evaluated in double and rounded once so the
// result matches the CPU reference at every position. grid: (n rows), block: any.
#include "common.cuh"

template <typename T>
__device__ void rope_fwd_impl(T* out, const T* x, const float* inv_freq, int cols, int head_dim, int pos0, float sign) {
    const long long row = blockIdx.x;
    const int half = head_dim >> 1;
    const float pos = (float)(pos0 + (int)row);
    const int pairs = cols >> 1;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half, i = p - head * half;
        const float a32 = inv_freq[i] * pos;
        double s, c;
        sincos((double)a32, &s, &c);
        const float cs = (float)c, sn = sign * (float)s;
        const long long base = row * cols + (long long)head * head_dim;
        const float a = to_f32(x[base + i]), b = to_f32(x[base + i + half]);
        out[base + i] = from_f32<T>(a * cs - b * sn);
        out[base + i + half] = from_f32<T>(b * cs + a * sn);
    }
}
#define ROPE_PARAMS(T) (T* out, const T* x, const float* inv_freq, int cols, int head_dim, int pos0, float sign)
FASTRM_INSTANTIATE(rope_fwd, ROPE_PARAMS, (out, x, inv_freq, cols, head_dim, pos0, sign))
