// Attention forward and backward. The forward has two paths, chosen by the launcher:
//  * many queries (prefill, vision tower): cuBLAS writes the scores S = Q K^T (f32, [H, n_q, kv]);
//    `attn_softmax_fwd` turns each row into probabilities P (storage type) with the scale, the
//    causal mask and an optional key mask; cuBLAS then forms P V.
//  * few queries (decode): flash-decoding. `attn_decode_fwd` gives each (head, key chunk, query) a
//    block that keeps its chunk's scores in shared memory and writes a partial (max m, sum l,
//    unnormalised output o); `attn_decode_combine` merges the chunks of each (query, head).
// Masks: query i sits at position q_pos0 + i and sees keys 0 ..= q_pos0 + i (q_pos0 < 0: every
// key); `key_keep` (nullable, one byte per key) hides keys whose byte is 0 from every query.
// A query that sees no key at all gets a zero output.
// Paged keys (decode only, `pages` not null): query i is its own sequence's next position and
// sees that sequence's lens[i] keys; key j lives in row pages[i * max_pages + j / page] * page +
// j % page of k and v (a layer of the KV pool). Splits past a row's keys are empty partials, so a
// row's numbers do not depend on the longest row of its batch.
#include "common.cuh"

// 16-byte key (and value) packs each thread of attn_decode_fwd has in flight.
#define DECODE_INFLIGHT 4

__device__ __forceinline__ int visible_keys(int q_pos0, int i, int kv_len) {
    return q_pos0 < 0 ? kv_len : min(kv_len, q_pos0 + i + 1);
}

// Softmax statistics of one score row over its first `vis` keys (less the hidden ones): the
// maximum of scale * s and the reciprocal of the sum of exponentials (0 when no key is visible).
// Every thread of the block gets both; the probability of key j is then
// expf(s[j] * scale - mx) * inv.
__device__ __forceinline__ void row_softmax_stats(const float* sr, int vis, float scale,
                                                  const unsigned char* key_keep, float* scratch,
                                                  float& mx, float& inv) {
    mx = -INFINITY;
    for (int j = threadIdx.x; j < vis; j += blockDim.x)
        if (!key_keep || key_keep[j]) mx = fmaxf(mx, sr[j] * scale);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < vis; j += blockDim.x)
        if (!key_keep || key_keep[j]) sum += expf(sr[j] * scale - mx);
    sum = block_sum(sum, scratch);
    inv = sum > 0.f ? 1.f / sum : 0.f;
}

// grid: (H * n_q rows of S, row r = h * n_q + i), block: 256. Reads S [H*n_q, kv_len] f32,
// writes P [H*n_q, kv_len].
template <typename T>
__device__ void attn_softmax_fwd_impl(T* p, const float* s, int n_q, int kv_len, int q_pos0, float scale,
                                      const unsigned char* key_keep) {
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const int i = (int)(r % n_q);
    const int vis = visible_keys(q_pos0, i, kv_len);
    const float* sr = s + r * kv_len;
    T* pr = p + r * kv_len;
    float mx, inv;
    row_softmax_stats(sr, vis, scale, key_keep, scratch, mx, inv);
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        const bool on = j < vis && (!key_keep || key_keep[j]);
        pr[j] = from_f32<T>(on ? expf(sr[j] * scale - mx) * inv : 0.f);
    }
}
#define SOFTMAX_PARAMS(T) (T* p, const float* s, int n_q, int kv_len, int q_pos0, float scale, const unsigned char* key_keep)
FASTRM_INSTANTIATE(attn_softmax_fwd, SOFTMAX_PARAMS, (p, s, n_q, kv_len, q_pos0, scale, key_keep))

// grid: (H, n_splits, n_q), block: a multiple of 32 (128), dynamic shared: (head_dim + chunk) f32,
// plus blockDim * 16 / sizeof(T) f32 when val_lanes > 0.
// q [n_q, H*d], k/v [>= kv_len, Hkv*d]; writes part_o [n_q*H*n_splits, d] and part_ml
// [n_q*H*n_splits, 2] (f32), entry (i*H + h)*n_splits + split. key_lanes > 0 (set by the launcher
// when a key row is that many 16-byte packs, a divisor of 32, and k is 16-byte aligned) scores
// several keys per warp pass with 16-byte loads; 0 walks one key per warp with element loads.
// val_lanes, the same for a value row (and v), gives the weighted sum of values 16-byte loads.
template <typename T>
__device__ void attn_decode_fwd_impl(float* part_o, float* part_ml, const T* q, const T* k, const T* v,
                                     int kv_len, int n_heads, int n_kv_heads, int d, int q_pos0,
                                     float scale, int chunk, const unsigned char* key_keep, int key_lanes,
                                     int val_lanes, const int* pages, int max_pages, int page, const int* lens) {
    FASTRM_DYNAMIC_SHARED(float, smem);
    float* qs = smem;          // [d]
    float* sc = smem + d;      // [chunk], then (val_lanes > 0) [blockDim / val_lanes, d]
    __shared__ float scratch[32];
    const int h = blockIdx.x, split = blockIdx.y, i = blockIdx.z, n_splits = gridDim.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int qcols = n_heads * d, kcols = n_kv_heads * d;
    const int vis = pages ? lens[i] : visible_keys(q_pos0, i, kv_len);
    const int* table = pages ? pages + (long long)i * max_pages : nullptr;
    // The cache row of key j: j itself, or its place in the row's pages.
    auto row_of = [&](int j) -> long long {
        return table ? (long long)table[j / page] * page + j % page : (long long)j;
    };
    const int j0 = split * chunk, j1 = min(j0 + chunk, vis);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int t = threadIdx.x; t < d; t += blockDim.x) qs[t] = to_f32(q[(long long)i * qcols + h * d + t]);
    __syncthreads();
    if (key_lanes > 0) {
        // A key row is key_lanes 16-byte packs: each warp scores 32 / key_lanes keys per pass,
        // a group of key_lanes lanes per key, one pack per lane.
        constexpr int V = 16 / sizeof(T);
        const int per_warp = 32 / key_lanes, sub = lane / key_lanes, pack = lane - sub * key_lanes;
        const int pass = n_warps * per_warp;  // keys a block scores per pass
        // DECODE_INFLIGHT passes' key packs are loaded before any is used (loads in flight,
        // checked by tools/sass_check.py); each key's dot is what one pass at a time computes.
        for (int jb = j0 + warp * per_warp; jb < j1; jb += DECODE_INFLIGHT * pass) {  // warp-uniform
            uint4 kv4[DECODE_INFLIGHT];
#pragma unroll
            for (int u = 0; u < DECODE_INFLIGHT; ++u) {
                const int j = jb + u * pass + sub;
                kv4[u] = j < j1 ? reinterpret_cast<const uint4*>(k + row_of(j) * kcols + kvh * d)[pack]
                                : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < DECODE_INFLIGHT; ++u) {
                const int j = jb + u * pass + sub;
                T ke[V];
                memcpy(ke, &kv4[u], 16);
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < V; ++e) dot += qs[pack * V + e] * to_f32(ke[e]);
                for (int o = key_lanes >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (pack == 0 && j < j1) sc[j - j0] = (!key_keep || key_keep[j]) ? dot * scale : -INFINITY;
            }
        }
    } else {
        for (int j = j0 + warp; j < j1; j += n_warps) {
            const T* kr = k + row_of(j) * kcols + kvh * d;
            float dot = 0.f;
            for (int t = lane; t < d; t += 32) dot += qs[t] * to_f32(kr[t]);
            dot = warp_sum(dot);
            if (lane == 0) sc[j - j0] = (!key_keep || key_keep[j]) ? dot * scale : -INFINITY;
        }
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) mx = fmaxf(mx, sc[j - j0]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const float e = mx == -INFINITY ? 0.f : expf(sc[j - j0] - mx);
        sc[j - j0] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);  // its leading barrier also publishes sc
    const long long part = ((long long)i * n_heads + h) * n_splits + split;
    if (val_lanes > 0) {
        // A value row is val_lanes 16-byte packs: the block splits into groups of val_lanes
        // threads, each group walks every (blockDim / val_lanes)-th key of the chunk, a thread
        // one pack; the groups' sums meet in shared memory.
        constexpr int V = 16 / sizeof(T);
        const int groups = blockDim.x / val_lanes, g = threadIdx.x / val_lanes;
        const int pack = threadIdx.x - g * val_lanes;
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = 0.f;
        // DECODE_INFLIGHT value packs loaded ahead, then added in key order as one at a time.
        for (int jb = j0 + g; jb < j1; jb += DECODE_INFLIGHT * groups) {
            uint4 v4[DECODE_INFLIGHT];
#pragma unroll
            for (int u = 0; u < DECODE_INFLIGHT; ++u) {
                const int j = jb + u * groups;
                v4[u] = j < j1 ? reinterpret_cast<const uint4*>(v + row_of(j) * kcols + kvh * d)[pack]
                               : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < DECODE_INFLIGHT; ++u) {
                const int j = jb + u * groups;
                if (j < j1) {
                    T ve[V];
                    memcpy(ve, &v4[u], 16);
                    const float pj = sc[j - j0];
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[e] += pj * to_f32(ve[e]);
                }
            }
        }
        float* red = sc + chunk;  // [groups, d]
#pragma unroll
        for (int e = 0; e < V; ++e) red[g * d + pack * V + e] = acc[e];
        __syncthreads();
        for (int t = threadIdx.x; t < d; t += blockDim.x) {
            float o = 0.f;
            for (int gg = 0; gg < groups; ++gg) o += red[gg * d + t];
            part_o[part * d + t] = o;
        }
    } else {
        for (int t = threadIdx.x; t < d; t += blockDim.x) {
            float acc = 0.f;
            for (int j = j0; j < j1; ++j) acc += sc[j - j0] * to_f32(v[row_of(j) * kcols + kvh * d + t]);
            part_o[part * d + t] = acc;
        }
    }
    if (threadIdx.x == 0) {
        part_ml[2 * part] = mx;
        part_ml[2 * part + 1] = sum;
    }
}
#define DECODE_PARAMS(T) (float* part_o, float* part_ml, const T* q, const T* k, const T* v, int kv_len, int n_heads, \
                          int n_kv_heads, int d, int q_pos0, float scale, int chunk, const unsigned char* key_keep, \
                          int key_lanes, int val_lanes, const int* pages, int max_pages, int page, const int* lens)
FASTRM_INSTANTIATE(attn_decode_fwd, DECODE_PARAMS,
                   (part_o, part_ml, q, k, v, kv_len, n_heads, n_kv_heads, d, q_pos0, scale, chunk, key_keep, key_lanes,
                    val_lanes, pages, max_pages, page, lens))

// grid: (H, n_q), block: any. Writes out [n_q, H*d].
template <typename T>
__device__ void attn_decode_combine_impl(T* out, const float* part_o, const float* part_ml, int n_heads, int d,
                                         int n_splits) {
    const int h = blockIdx.x, i = blockIdx.y;
    const long long base = ((long long)i * n_heads + h) * n_splits;
    float m = -INFINITY;
    for (int s = 0; s < n_splits; ++s) m = fmaxf(m, part_ml[2 * (base + s)]);
    float l = 0.f;
    for (int s = 0; s < n_splits; ++s) {
        const float ms = part_ml[2 * (base + s)];
        if (ms != -INFINITY) l += part_ml[2 * (base + s) + 1] * expf(ms - m);
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int t = threadIdx.x; t < d; t += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < n_splits; ++s) {
            const float ms = part_ml[2 * (base + s)];
            if (ms != -INFINITY) acc += part_o[(base + s) * d + t] * expf(ms - m);
        }
        out[(long long)i * n_heads * d + h * d + t] = from_f32<T>(acc * inv);
    }
}
#define COMBINE_PARAMS(T) (T* out, const float* part_o, const float* part_ml, int n_heads, int d, int n_splits)
FASTRM_INSTANTIATE(attn_decode_combine, COMBINE_PARAMS, (out, part_o, part_ml, n_heads, d, n_splits))

// ---- Backward (recomputes the probabilities from the scores; nothing from the forward is kept).
// With S = Q K^T (f32, unscaled, from cuBLAS) and dP = dO V^T (f32), per row r = h * n_q + i:
//   P = softmax(scale * S) under the causal mask,  D = sum_j P dP,
//   dS = scale * P * (dP - D)   (scale folded in, so dQ = dS K and dK = dS^T Q),
// writing P and dS in the storage type for the cuBLAS products that follow, and overwriting dP
// with the head's cam entries when asked (cam_kind 1: Chefer max(0, P dP); 2: GradCAM P max(0, dP))
// for attn_cam_mean. grid: (H * n_q), block: 256.
template <typename T>
__device__ void attn_softmax_bwd_impl(T* p_out, T* ds_out, float* dp, const float* s, int n_q, int kv_len,
                                      int q_pos0, float scale, int cam_kind) {
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const int i = (int)(r % n_q);
    const int vis = visible_keys(q_pos0, i, kv_len);
    const float* sr = s + r * kv_len;
    float* dpr = dp + r * kv_len;
    float mx, inv;
    row_softmax_stats(sr, vis, scale, nullptr, scratch, mx, inv);
    float dot = 0.f;
    for (int j = threadIdx.x; j < vis; j += blockDim.x) dot += expf(sr[j] * scale - mx) * inv * dpr[j];
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        const float pj = j < vis ? expf(sr[j] * scale - mx) * inv : 0.f;
        const float g = dpr[j];
        p_out[r * kv_len + j] = from_f32<T>(pj);
        ds_out[r * kv_len + j] = from_f32<T>(scale * pj * (g - dot));
        if (cam_kind == 1) dpr[j] = fmaxf(0.f, pj * g);
        else if (cam_kind == 2) dpr[j] = pj * fmaxf(0.f, g);
    }
}
#define SOFTMAX_BWD_PARAMS(T) (T* p_out, T* ds_out, float* dp, const float* s, int n_q, int kv_len, int q_pos0, \
                               float scale, int cam_kind)
FASTRM_INSTANTIATE(attn_softmax_bwd, SOFTMAX_BWD_PARAMS, (p_out, ds_out, dp, s, n_q, kv_len, q_pos0, scale, cam_kind))

// out[e] = mean over the H heads of cam[h * n + e], summed in head order (deterministic).
// grid-stride over n = n_q * kv_len.
template <typename T>
__device__ void attn_cam_mean_impl(T* out, const float* cam, int n_heads, long long n) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int h = 0; h < n_heads; ++h) acc += cam[h * n + e];
        out[e] = from_f32<T>(acc / n_heads);
    }
}
#define CAM_MEAN_PARAMS(T) (T* out, const float* cam, int n_heads, long long n)
FASTRM_INSTANTIATE(attn_cam_mean, CAM_MEAN_PARAMS, (out, cam, n_heads, n))
