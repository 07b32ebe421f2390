// Gathers, scatters and reductions that index rather than compute.
//   embedding_fwd: out[r, :] = table[ids[r], :]          grid: (n rows), block: any
//                  (also a sequence's keys or values gathered from the KV pool's pages)
//   scatter_rows:  dst[rows[r], :] = src[r, :]           grid: (n rows), block: any
//                  (a step's keys and values into their pages)
//   argmax_rows:   out[r] = first index of the row maximum (NaN never wins, as the CPU backend),
//                  in two passes: argmax_split (grid: (splits, n rows), block: 256) leaves the
//                  first maximum of each stretch of a row, argmax_rows (grid: (n rows), block: 256)
//                  the first of those. An lm_head row of 32k values is spread over ~32 blocks,
//                  four loads a thread, where one block per row had each thread load 125 in turn.
#include "common.cuh"

template <typename T>
__device__ void embedding_fwd_impl(T* out, const T* table, const unsigned int* ids, int d) {
    const long long r = blockIdx.x;
    const T* src = table + (long long)ids[r] * d;
    for (int t = threadIdx.x; t < d; t += blockDim.x) out[r * d + t] = src[t];
}
#define EMB_PARAMS(T) (T* out, const T* table, const unsigned int* ids, int d)
FASTRM_INSTANTIATE(embedding_fwd, EMB_PARAMS, (out, table, ids, d))

template <typename T>
__device__ void scatter_rows_impl(T* dst, const T* src, const unsigned int* rows, int d) {
    const long long r = blockIdx.x;
    T* out = dst + (long long)rows[r] * d;
    for (int t = threadIdx.x; t < d; t += blockDim.x) out[t] = src[r * d + t];
}
#define SCATTER_PARAMS(T) (T* dst, const T* src, const unsigned int* rows, int d)
FASTRM_INSTANTIATE(scatter_rows, SCATTER_PARAMS, (dst, src, rows, d))

// Whether (ov, oi) beats (mv, mi): a number beats NaN, a larger value wins, equal values go to
// the lower index — so every order of comparisons gives the first maximum.
__device__ inline bool argmax_beats(float ov, int oi, float mv, int mi) {
    return !isnan(ov) && (isnan(mv) || ov > mv || (ov == mv && oi < mi));
}

// The block's best (value, index) pair into sv[0], si[0]; blockDim.x a power of two, at most 256.
__device__ void argmax_block(float* sv, int* si, float best, int bi) {
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (threadIdx.x < s && argmax_beats(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
            sv[threadIdx.x] = sv[threadIdx.x + s];
            si[threadIdx.x] = si[threadIdx.x + s];
        }
        __syncthreads();
    }
}

// grid: (splits, rows), block: 256. Split s of row r covers columns [s * per_split, ...) and
// writes its first maximum to part_v/part_i[r * splits + s] (NaN and `cols` when it has none).
template <typename T>
__device__ void argmax_split_impl(float* part_v, int* part_i, const T* x, int cols, int per_split) {
    __shared__ float sv[256];
    __shared__ int si[256];
    const long long row = blockIdx.y;
    const T* xr = x + row * cols;
    const int c0 = blockIdx.x * per_split;
    const int c1 = min(cols, c0 + per_split);
    float best = NAN;
    int bi = cols;
    for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        if (argmax_beats(v, c, best, bi)) { best = v; bi = c; }
    }
    argmax_block(sv, si, best, bi);
    if (threadIdx.x == 0) {
        part_v[row * gridDim.x + blockIdx.x] = sv[0];
        part_i[row * gridDim.x + blockIdx.x] = si[0];
    }
}
#define ARGMAX_SPLIT_PARAMS(T) (float* part_v, int* part_i, const T* x, int cols, int per_split)
FASTRM_INSTANTIATE(argmax_split, ARGMAX_SPLIT_PARAMS, (part_v, part_i, x, cols, per_split))

// grid: (rows), block: 256: the first maximum of row r's `splits` pairs. The element type is only
// the instantiation's name: the pairs are f32 and int whatever the logits were.
template <typename T>
__device__ void argmax_rows_impl(unsigned int* out, const float* part_v, const int* part_i, int splits, int cols) {
    __shared__ float sv[256];
    __shared__ int si[256];
    const long long row = blockIdx.x;
    float best = NAN;
    int bi = cols;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        const float v = part_v[row * splits + s];
        const int i = part_i[row * splits + s];
        if (argmax_beats(v, i, best, bi)) { best = v; bi = i; }
    }
    argmax_block(sv, si, best, bi);
    // An all-NaN row: index 0, as the CPU backend.
    if (threadIdx.x == 0) out[row] = si[0] == cols ? 0u : (unsigned int)si[0];
}
#define ARGMAX_PARAMS(T) (unsigned int* out, const float* part_v, const int* part_i, int splits, int cols)
FASTRM_INSTANTIATE(argmax_rows, ARGMAX_PARAMS, (out, part_v, part_i, splits, cols))
