// The decode step's linears: y[i, n] = x[i, :] . w[n, :] (+ b[n]) for a few rows of x (batch 1 is
// one row). cuBLAS runs these as GEMMs with n = 1 and leaves much of the bandwidth unused at 4096²;
// the product is a pure read of w, so this kernel streams w once with 16-byte loads, keeps every
// partial sum in f32, and adds the bias before the single rounding of y (no second launch).
// Reads x [m, K], w [N, K], b [N] or null; writes y [m, N]. Nothing is saved.
//   linear_gemv_fwd   grid: (ceil(N / warps per block)), block: 256; m <= GEMV_MAX_ROWS
// Each warp owns one output column n: its lanes walk w[n, :] in 16-byte packs (`vec` set when K
// and every pointer allow it; the launcher checks), GEMV_INFLIGHT packs loaded ahead per lane, so
// a warp has 2 KB of w outstanding. x is re-read by every warp and stays in L1/L2.
#include "common.cuh"

#define GEMV_MAX_ROWS 4
// 16-byte weight packs each lane has in flight.
#define GEMV_INFLIGHT 4

// One warp's output column n of y = x . w^T (+ b); every lane of the warp calls it.
template <typename T>
__device__ void gemv_column(T* y, const T* x, const T* w, const T* b, int m, int K, int N, long long n, int vec) {
    const int lane = threadIdx.x & 31;
    const T* wr = w + n * K;
    float acc[GEMV_MAX_ROWS] = {0.f, 0.f, 0.f, 0.f};
    if (vec) {
        constexpr int V = 16 / sizeof(T);
        const int packs = K / V;
        const uint4* wp = reinterpret_cast<const uint4*>(wr);
        // GEMV_INFLIGHT weight packs per lane are loaded before any of them is used, so a warp
        // keeps 32 * GEMV_INFLIGHT * 16 bytes of w outstanding (tools/sass_check.py counts
        // them in the machine code). Out-of-range packs load nothing and add nothing; each lane
        // still sums its packs in increasing order, as one pack at a time would.
        for (int c0 = lane; c0 < packs; c0 += 32 * GEMV_INFLIGHT) {
            uint4 wv[GEMV_INFLIGHT];
#pragma unroll
            for (int u = 0; u < GEMV_INFLIGHT; ++u) {
                const int c = c0 + 32 * u;
                wv[u] = c < packs ? wp[c] : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < GEMV_INFLIGHT; ++u) {
                const int c = c0 + 32 * u;
                T we[V];
                memcpy(we, &wv[u], 16);
#pragma unroll
                for (int i = 0; i < GEMV_MAX_ROWS; ++i) {
                    // Predicated, not a break: a break ends the unrolled region and with it
                    // the loads issued ahead.
                    if (i < m && c < packs) {
                        const uint4 xv = reinterpret_cast<const uint4*>(x + (long long)i * K)[c];
                        T xe[V];
                        memcpy(xe, &xv, 16);
                        float s = 0.f;
#pragma unroll
                        for (int j = 0; j < V; ++j) s += to_f32(we[j]) * to_f32(xe[j]);
                        acc[i] += s;
                    }
                }
            }
        }
    } else {
        for (int t = lane; t < K; t += 32) {
            const float wv = to_f32(wr[t]);
            for (int i = 0; i < m; ++i) acc[i] += wv * to_f32(x[(long long)i * K + t]);
        }
    }
    const float bias = b ? to_f32(b[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < GEMV_MAX_ROWS; ++i) {
        const float s = warp_sum(acc[i]);  // every lane takes part, whatever m is
        if (lane == 0 && i < m) y[(long long)i * N + n] = from_f32<T>(s + bias);
    }
}

template <typename T>
__device__ void linear_gemv_fwd_impl(T* y, const T* x, const T* w, const T* b, int m, int K, int N, int vec) {
    const long long n = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;  // whole warps leave together: no shuffle runs in a partial warp
    gemv_column(y, x, w, b, m, K, N, n, vec);
}
#define GEMV_PARAMS(T) (T* y, const T* x, const T* w, const T* b, int m, int K, int N, int vec)
FASTRM_INSTANTIATE(linear_gemv_fwd, GEMV_PARAMS, (y, x, w, b, m, K, N, vec))

// Up to three linears of the same x in one launch (the decode step's q, k, v; gate, up): the
// warps' columns run through w0's rows, then w1's, then w2's (n2 = 0 for two). No bias.
//   linear_gemv_group_fwd   grid: (ceil((n0 + n1 + n2) / warps per block)), block: 256
template <typename T>
__device__ void linear_gemv_group_fwd_impl(T* y0, T* y1, T* y2, const T* x, const T* w0, const T* w1,
                                           const T* w2, int m, int K, int n0, int n1, int n2, int vec) {
    long long n = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n < n0) {
        gemv_column(y0, x, w0, (const T*)nullptr, m, K, n0, n, vec);
    } else if ((n -= n0) < n1) {
        gemv_column(y1, x, w1, (const T*)nullptr, m, K, n1, n, vec);
    } else if ((n -= n1) < n2) {
        gemv_column(y2, x, w2, (const T*)nullptr, m, K, n2, n, vec);
    }
}
#define GEMV_GROUP_PARAMS(T) (T* y0, T* y1, T* y2, const T* x, const T* w0, const T* w1, const T* w2, int m, \
                              int K, int n0, int n1, int n2, int vec)
FASTRM_INSTANTIATE(linear_gemv_group_fwd, GEMV_GROUP_PARAMS, (y0, y1, y2, x, w0, w1, w2, m, K, n0, n1, n2, vec))
