// Row norms, forward and backward. One block per row; statistics in f32.
//   rms_norm_fwd:   out = x * rsqrt(mean(x^2) + eps) * w                        (Llama)
//   add_rms_norm_fwd: sum = a + b (rounded to T, as add_fwd stores it), out = rms_norm_fwd(sum):
//                   the decoder's residual add and the norm after it in one launch
//   rms_norm_bwd:   dx  = r (w*dy) - x r^3 mean((w*dy) x)
//   layer_norm_fwd: out = (x - mu) * rsqrt(var + eps) * w + b                   (CLIP, FastRM)
//   layer_norm_bwd: dx  = r (g - mean(g) - xhat mean(g xhat)), g = w*dy; also saves each row's
//                   mu and r to `stats` [rows, 2] for layer_norm_param_bwd
//   layer_norm_param_bwd: dw = sum_rows dy*xhat, db = sum_rows dy (one thread per column)
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd_impl(T* out, const T* x, const T* w, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = out + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        yr[c] = from_f32<T>(to_f32(xr[c]) * r * to_f32(w[c]));
}
#define RMS_PARAMS(T) (T* out, const T* x, const T* w, int cols, float eps)
FASTRM_INSTANTIATE(rms_norm_fwd, RMS_PARAMS, (out, x, w, cols, eps))

// grid: (rows), block: NORM_BLOCK. Each thread re-reads only the sums it wrote itself, so the
// barrier inside block_sum is the only ordering the second loop needs.
template <typename T>
__device__ void add_rms_norm_fwd_impl(T* sum, T* out, const T* a, const T* b, const T* w, int cols, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const T s = from_f32<T>(to_f32(a[base + c]) + to_f32(b[base + c]));
        sum[base + c] = s;
        const float v = to_f32(s);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[base + c] = from_f32<T>(to_f32(sum[base + c]) * r * to_f32(w[c]));
}
#define ADD_RMS_PARAMS(T) (T* sum, T* out, const T* a, const T* b, const T* w, int cols, float eps)
FASTRM_INSTANTIATE(add_rms_norm_fwd, ADD_RMS_PARAMS, (sum, out, a, b, w, cols, eps))

template <typename T>
__device__ void rms_norm_bwd_impl(T* dx, const T* x, const T* w, const T* dy, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    float ss = 0.f, gx = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        ss += v * v;
        gx += to_f32(w[c]) * to_f32(dyr[c]) * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
    const float m = block_sum(gx, scratch) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = to_f32(w[c]) * to_f32(dyr[c]);
        dx[row * cols + c] = from_f32<T>(r * g - to_f32(xr[c]) * r * r * r * m);
    }
}
#define RMS_BWD_PARAMS(T) (T* dx, const T* x, const T* w, const T* dy, int cols, float eps)
FASTRM_INSTANTIATE(rms_norm_bwd, RMS_BWD_PARAMS, (dx, x, w, dy, cols, eps))

// Mean and reciprocal standard deviation of one row, two passes (the row is in L1/L2): the centred
// variance does not cancel. Every thread of the block gets both.
template <typename T>
__device__ __forceinline__ void row_mean_rstd(const T* xr, int cols, float eps, float* scratch, float& mu, float& r) {
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += to_f32(xr[c]);
    mu = block_sum(s, scratch) / cols;
    float v2 = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = to_f32(xr[c]) - mu;
        v2 += d * d;
    }
    r = rsqrtf(block_sum(v2, scratch) / cols + eps);
}

template <typename T>
__device__ void layer_norm_fwd_impl(T* out, const T* x, const T* w, const T* b, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    float mu, r;
    row_mean_rstd(xr, cols, eps, scratch, mu, r);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = from_f32<T>((to_f32(xr[c]) - mu) * r * to_f32(w[c]) + to_f32(b[c]));
}
#define LN_PARAMS(T) (T* out, const T* x, const T* w, const T* b, int cols, float eps)
FASTRM_INSTANTIATE(layer_norm_fwd, LN_PARAMS, (out, x, w, b, cols, eps))

template <typename T>
__device__ void layer_norm_bwd_impl(T* dx, float* stats, const T* x, const T* w, const T* dy, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    float mu, r;
    row_mean_rstd(xr, cols, eps, scratch, mu, r);
    float sg = 0.f, sgx = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = to_f32(w[c]) * to_f32(dyr[c]);
        sg += g;
        sgx += g * (to_f32(xr[c]) - mu) * r;
    }
    const float mg = block_sum(sg, scratch) / cols;
    const float mgx = block_sum(sgx, scratch) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = to_f32(w[c]) * to_f32(dyr[c]);
        const float xhat = (to_f32(xr[c]) - mu) * r;
        dx[row * cols + c] = from_f32<T>(r * (g - mg - xhat * mgx));
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mu;
        stats[2 * row + 1] = r;
    }
}
#define LN_BWD_PARAMS(T) (T* dx, float* stats, const T* x, const T* w, const T* dy, int cols, float eps)
FASTRM_INSTANTIATE(layer_norm_bwd, LN_BWD_PARAMS, (dx, stats, x, w, dy, cols, eps))

template <typename T>
__device__ void layer_norm_param_bwd_impl(T* dw, T* db, const float* stats, const T* x, const T* dy, int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sw = 0.f, sb = 0.f;
    for (int r = 0; r < rows; ++r) {
        const float d = to_f32(dy[(long long)r * cols + c]);
        sw += d * (to_f32(x[(long long)r * cols + c]) - stats[2 * r]) * stats[2 * r + 1];
        sb += d;
    }
    dw[c] = from_f32<T>(sw);
    db[c] = from_f32<T>(sb);
}
#define LN_PARAM_BWD_PARAMS(T) (T* dw, T* db, const float* stats, const T* x, const T* dy, int rows, int cols)
FASTRM_INSTANTIATE(layer_norm_param_bwd, LN_PARAM_BWD_PARAMS, (dw, db, stats, x, dy, rows, cols))

// Column sums [rows, cols] -> [1, cols] (bias gradients); one thread per column.
template <typename T>
__device__ void sum_rows_impl(T* out, const T* x, int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
    for (int r = 0; r < rows; ++r) s += to_f32(x[(long long)r * cols + c]);
    out[c] = from_f32<T>(s);
}
#define SUM_ROWS_PARAMS(T) (T* out, const T* x, int rows, int cols)
FASTRM_INSTANTIATE(sum_rows, SUM_ROWS_PARAMS, (out, x, rows, cols))
