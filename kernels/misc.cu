// Gathers, scatters and reductions that index rather than compute.
//   embedding_fwd: out[r, :] = table[ids[r], :]          grid: (n rows), block: any
//                  (also a sequence's keys or values gathered from the KV pool's pages)
//   scatter_rows:  dst[rows[r], :] = src[r, :]           grid: (n rows), block: any
//                  (a step's keys and values into their pages)
//   argmax_rows:   out[r] = first index of the row maximum (NaN never wins, as the CPU backend)
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

// grid: (rows), block: 256 (a power of two).
template <typename T>
__device__ void argmax_rows_impl(unsigned int* out, const T* x, int cols) {
    __shared__ float sv[256];
    __shared__ int si[256];
    const T* xr = x + (long long)blockIdx.x * cols;
    float best = NAN;
    int bi = cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        if (!isnan(v) && (isnan(best) || v > best)) { best = v; bi = c; }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = sv[threadIdx.x + s];
            const int oi = si[threadIdx.x + s];
            const float mv = sv[threadIdx.x];
            const int mi = si[threadIdx.x];
            const bool take = !isnan(ov) && (isnan(mv) || ov > mv || (ov == mv && oi < mi));
            if (take) { sv[threadIdx.x] = ov; si[threadIdx.x] = oi; }
        }
        __syncthreads();
    }
    // An all-NaN row: index 0, as the CPU backend.
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] == cols ? 0u : (unsigned int)si[0];
}
#define ARGMAX_PARAMS(T) (unsigned int* out, const T* x, int cols)
FASTRM_INSTANTIATE(argmax_rows, ARGMAX_PARAMS, (out, x, cols))
