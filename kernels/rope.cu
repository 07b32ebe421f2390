// Rotary embedding, split-halves layout (HF `rotate_half`). `rope_fwd` serves the backward too:
// `sign` = +1 rotates by +angle (forward), -1 by -angle (the backward is the inverse rotation).
// Reads x [n, heads*head_dim] and inv_freq [head_dim/2] (f32, computed on the host exactly as the CPU
// backend and torch do); writes out of the same shape. The angle is the f32 product
// inv_freq * position, as torch forms it; cos/sin are evaluated in double and rounded once so the
// result matches the CPU reference at every position. grid: (n rows), block: any.
#include "common.cuh"

// Rotates pair p of row `row` of x (a split-halves pair of one head) into row `out_row` of out.
template <typename T>
__device__ __forceinline__ void rope_pair_to(T* out, long long out_row, const T* x, const float* inv_freq, int cols,
                                             int head_dim, long long row, float pos, int p, float sign) {
    const int half = head_dim >> 1;
    const int head = p / half, i = p - head * half;
    const float a32 = inv_freq[i] * pos;
    double s, c;
    sincos((double)a32, &s, &c);
    const float cs = (float)c, sn = sign * (float)s;
    const long long base = row * cols + (long long)head * head_dim;
    const long long out_base = out_row * cols + (long long)head * head_dim;
    const float a = to_f32(x[base + i]), b = to_f32(x[base + i + half]);
    out[out_base + i] = from_f32<T>(a * cs - b * sn);
    out[out_base + i + half] = from_f32<T>(b * cs + a * sn);
}

// Rotates pair p of row `row` in place of the output's same row.
template <typename T>
__device__ __forceinline__ void rope_pair(T* out, const T* x, const float* inv_freq, int cols, int head_dim,
                                          long long row, float pos, int p, float sign) {
    rope_pair_to(out, row, x, inv_freq, cols, head_dim, row, pos, p, sign);
}

template <typename T>
__device__ void rope_fwd_impl(T* out, const T* x, const float* inv_freq, int cols, int head_dim, int pos0, float sign) {
    const long long row = blockIdx.x;
    const float pos = (float)(pos0 + (int)row);
    for (int p = threadIdx.x; p < (cols >> 1); p += blockDim.x)
        rope_pair(out, x, inv_freq, cols, head_dim, row, pos, p, sign);
}
#define ROPE_PARAMS(T) (T* out, const T* x, const float* inv_freq, int cols, int head_dim, int pos0, float sign)
FASTRM_INSTANTIATE(rope_fwd, ROPE_PARAMS, (out, x, inv_freq, cols, head_dim, pos0, sign))

// Row `row` of q rotated into the same row of q_out, and of k into row `k_row` of k_out (the row
// itself, or a cache slot); the pairs of a row are q's, then k's, spread over the block.
template <typename T>
__device__ __forceinline__ void rope_qk_row(T* q_out, const T* q, T* k_out, long long k_row, const T* k,
                                            const float* inv_freq, int q_cols, int k_cols, int head_dim,
                                            long long row, float pos) {
    const int q_pairs = q_cols >> 1, pairs = q_pairs + (k_cols >> 1);
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        if (p < q_pairs)
            rope_pair(q_out, q, inv_freq, q_cols, head_dim, row, pos, p, 1.f);
        else
            rope_pair_to(k_out, k_row, k, inv_freq, k_cols, head_dim, row, pos, p - q_pairs, 1.f);
    }
}

// The queries and keys of the same rows rotated forward in one launch (q [n, q_cols], k
// [n, k_cols]); row r sits at position pos[r] (a batched decode step's rows each at their own
// sequence's position).
template <typename T>
__device__ void rope_qk_fwd_impl(T* q_out, const T* q, T* k_out, const T* k, const float* inv_freq, int q_cols,
                                 int k_cols, int head_dim, const int* positions) {
    const long long row = blockIdx.x;
    rope_qk_row(q_out, q, k_out, row, k, inv_freq, q_cols, k_cols, head_dim, row, (float)positions[row]);
}
#define ROPE_QK_PARAMS(T) (T* q_out, const T* q, T* k_out, const T* k, const float* inv_freq, int q_cols, int k_cols, \
                           int head_dim, const int* positions)
FASTRM_INSTANTIATE(rope_qk_fwd, ROPE_QK_PARAMS, (q_out, q, k_out, k, inv_freq, q_cols, k_cols, head_dim, positions))

// A decode step's RoPE and cache writes in one launch: q rotated into q_out as rope_qk_fwd does,
// the rotated keys written straight into row slots[r] of the layer's key pool and the values into
// the same row of its value pool (k_pool, v_pool [pool rows, k_cols]), where rope_qk_fwd and two
// scatter_rows took three launches. grid: (n rows), block: any.
template <typename T>
__device__ void rope_qk_store_fwd_impl(T* q_out, const T* q, T* k_pool, const T* k, T* v_pool, const T* v,
                                       const float* inv_freq, int q_cols, int k_cols, int head_dim,
                                       const int* positions, const unsigned int* slots) {
    const long long row = blockIdx.x;
    const long long slot = slots[row];
    rope_qk_row(q_out, q, k_pool, slot, k, inv_freq, q_cols, k_cols, head_dim, row, (float)positions[row]);
    for (int c = threadIdx.x; c < k_cols; c += blockDim.x)
        v_pool[slot * k_cols + c] = v[row * k_cols + c];
}
#define ROPE_QK_STORE_PARAMS(T) (T* q_out, const T* q, T* k_pool, const T* k, T* v_pool, const T* v, \
                                 const float* inv_freq, int q_cols, int k_cols, int head_dim, const int* positions, \
                                 const unsigned int* slots)
FASTRM_INSTANTIATE(rope_qk_store_fwd, ROPE_QK_STORE_PARAMS,
                   (q_out, q, k_pool, k, v_pool, v, inv_freq, q_cols, k_cols, head_dim, positions, slots))
