// The FastRM head's decode step, fused into one launch:
//   map[p] = sigmoid(scale * (folded[p, :] . LayerNorm(h; ln_w, ln_b) + c[p]))
// Reads x [m, D] (hidden states after the decoder's final norm), ln_w/ln_b [D], folded [P, D] (the
// once-per-prefill K W_q), c [P] (K b_q); writes out [m, P]. Nothing is saved.
// grid: (ceil(P / per_block), m), block: 256, dynamic shared: D f32. Each block normalises its row
// into shared memory (D reads from L2, negligible beside the P*D/gridDim.x reads of `folded`), then
// each warp takes whole patches: lanes stride the row, so reads of `folded` are coalesced.
#include "common.cuh"

template <typename T>
__device__ void fastrm_scores_fwd_impl(T* out, const T* x, const T* ln_w, const T* ln_b, const T* folded,
                                       const T* c, int D, int P, float eps, float scale, int per_block) {
    FASTRM_DYNAMIC_SHARED(float, u);
    __shared__ float scratch[32];
    const long long row = blockIdx.y;
    const T* xr = x + row * D;
    float s = 0.f;
    for (int t = threadIdx.x; t < D; t += blockDim.x) {
        const float v = to_f32(xr[t]);
        u[t] = v;
        s += v;
    }
    const float mu = block_sum(s, scratch) / D;
    float v2 = 0.f;
    for (int t = threadIdx.x; t < D; t += blockDim.x) {
        const float dlt = u[t] - mu;
        v2 += dlt * dlt;
    }
    const float r = rsqrtf(block_sum(v2, scratch) / D + eps);
    for (int t = threadIdx.x; t < D; t += blockDim.x) u[t] = (u[t] - mu) * r * to_f32(ln_w[t]) + to_f32(ln_b[t]);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int p0 = blockIdx.x * per_block, p1 = min(P, p0 + per_block);
    for (int p = p0 + warp; p < p1; p += n_warps) {
        const T* fr = folded + (long long)p * D;
        float dot = 0.f;
        for (int t = lane; t < D; t += 32) dot += to_f32(fr[t]) * u[t];
        dot = warp_sum(dot);
        if (lane == 0) {
            const float z = scale * (dot + to_f32(c[p]));
            out[row * P + p] = from_f32<T>(1.f / (1.f + expf(-z)));
        }
    }
}
#define FASTRM_PARAMS(T) (T* out, const T* x, const T* ln_w, const T* ln_b, const T* folded, const T* c, int D, int P, \
                          float eps, float scale, int per_block)
FASTRM_INSTANTIATE(fastrm_scores_fwd, FASTRM_PARAMS, (out, x, ln_w, ln_b, folded, c, D, P, eps, scale, per_block))
