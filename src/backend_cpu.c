/* backend_cpu: the CPU reference backend (OpenBLAS sgemm plus plain C loops written to
 * auto-vectorise) and the backend-independent helpers backend_check / backend_free.
 * Does not: thread anything itself (only OpenBLAS is threaded) or own model tensors; memory
 * from alloc is plain 64-byte-aligned host memory that the caller frees through ops->free;
 * "pinned" memory is the same, and the side-stream transfers are synchronous memcpys.
 * Every op is deterministic: reductions use a fixed summation order, never atomics.
 *
 * Legend: B T D F V H N = batch, seq, d_model, d_ff, vocab, heads, rows (tokens, B*T);
 *         hd = D/H head width. */
#include "backend.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "config.h"
#include "quant.h"
#include "route_common.h"

/* declared by OpenBLAS's cblas.h; repeated so a generic cblas.h still compiles */
void openblas_set_num_threads(int num_threads);

/* ---------------------------------------------------------------------------------------
 * reductions with a fixed order: LANES independent partial sums that the compiler turns into
 * one vector register (no -ffast-math needed), combined pairwise at the end. */
#define LANES 16

/* sum x[n] */
static inline float sum_f32(const float *x, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += x[i];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* sum a[n] * b[n] */
static inline float dot_f32(const float *a, const float *b, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += a[i] * b[i];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* max of x[n], n >= 1 (exact in any order) */
static inline float max_f32(const float *x, int n) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = x[0];
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (int l = 0; i < n; i++, l++) acc[l] = x[i] > acc[l] ? x[i] : acc[l];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] = acc[l + w] > acc[l] ? acc[l + w] : acc[l];
    return acc[0];
}

/* exp(x) without libm, so loops that call it vectorise (libm's expf stays scalar without
 * -ffast-math). Cephes expf: x = n ln2 + r with ln2 split in two, a degree-5 polynomial for e^r
 * and 2^n applied as two exact power-of-two factors, so results underflow gradually to 0 and
 * overflow to +inf like expf. Max error < 1 ulp over [-104, 89] (measured against double exp);
 * NaN stays NaN; no branches, no float-to-int conversion. */
static inline float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : x;
    x = x > 89.0f ? 89.0f : x;
    float t = x * 1.44269504088896341f + 12582912.0f;    /* round(x / ln2) + 1.5 * 2^23 */
    float nf = t - 12582912.0f;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    int32_t n = (int32_t)(tb - 0x4B400000u);              /* the integer n, from t's mantissa */
    float r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    /* n in [-150, 128]; n1 = floor(n / 2) by a shift (arithmetic for negative n with GCC and
     * Clang; `n / 2` compiled to an idiv inside this loop); n1, n2 in [-75, 64]: both factors
     * are normal floats, y * s1 is exact, so the one rounding is the last product's, whatever
     * the split (the results are the bits of the division's split) */
    int32_t n1 = (int32_t)(n >> 1), n2 = n - n1;
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return y * s1 * s2;
}

/* sum of exp(x[n] - c), lane order */
static inline float sum_exp_f32(const float *x, float c, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += exp_f32(x[i + l] - c);
    for (int l = 0; i < n; i++, l++) acc[l] += exp_f32(x[i] - c);
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* x[n] = exp(x[n] - c) in place; returns their sum (same lane order as sum_exp_f32) */
static inline float exp_inplace_sum_f32(float *x, float c, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) { float e = exp_f32(x[i + l] - c); x[i + l] = e; acc[l] += e; }
    for (int l = 0; i < n; i++, l++) { float e = exp_f32(x[i] - c); x[i] = e; acc[l] += e; }
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* sum (x[n] - c)^2 */
static inline float sumsq_centered_f32(const float *x, float c, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) { float d = x[i + l] - c; acc[l] += d * d; }
    for (int l = 0; i < n; i++, l++) { float d = x[i] - c; acc[l] += d * d; }
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* ---------------------------------------------------------------------------------------
 * memory: host memory, so every transfer is a memcpy */
static void *cpu_alloc(void *ctx, size_t bytes) { (void)ctx; return xcalloc(bytes); }
static void cpu_free(void *ctx, void *p) { (void)ctx; xfree(p); }
static void cpu_to_host(void *ctx, void *host_dst, const void *dev_src, size_t bytes) {
    (void)ctx;
    if (bytes && host_dst != dev_src) memmove(host_dst, dev_src, bytes);
}
static void cpu_from_host(void *ctx, void *dev_dst, const void *host_src, size_t bytes) {
    (void)ctx;
    if (bytes && dev_dst != host_src) memmove(dev_dst, host_src, bytes);
}
static void cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    if (bytes && dst != src) memmove(dst, src, bytes);
}
static void cpu_zero(void *ctx, void *p, size_t bytes) { (void)ctx; if (bytes) memset(p, 0, bytes); }
static void cpu_sync(void *ctx) { (void)ctx; }
/* the side stream of a host backend: every transfer is done when it returns (event 0) */
static void *cpu_host_alloc_pinned(void *ctx, size_t bytes) { (void)ctx; return xcalloc(bytes ? bytes : 1); }
static void cpu_host_free_pinned(void *ctx, void *p) { (void)ctx; xfree(p); }
static uint64_t cpu_copy_to_device_async(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    if (bytes && dst != src) memmove(dst, src, bytes);
    return 0;
}
static uint64_t cpu_copy_to_host_async(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    if (bytes && dst != src) memmove(dst, src, bytes);
    return 0;
}
static void cpu_wait_event(void *ctx, uint64_t ev) { (void)ctx; (void)ev; }
static void cpu_sync_event(void *ctx, uint64_t ev) { (void)ctx; (void)ev; }

/* ---------------------------------------------------------------------------------------
 * gemm: C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C, row-major, leading dims given.
 * K == 0 leaves alpha*op(A)op(B) = 0, so C = beta*C (beta == 0 writes exact zeros). */
/* BLAS threads the backend was started with (OpenBLAS's setting is process-wide) */
static int cpu_threads = 1;
#define SMALL_GEMM_FLOPS 4.0e6

static void cpu_gemm(void *ctx, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    (void)ctx;
    ASSERT(M >= 0 && N >= 0 && K >= 0);
    if (M == 0 || N == 0) return;
    if (K == 0) {
        if (beta == 1.0f) return;
        for (int i = 0; i < M; i++) {
            float *c = C + (size_t)i * ldc;
            if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)N);
            else for (int j = 0; j < N; j++) c[j] *= beta;
        }
        return;
    }
    /* small products (the rank-r factors of the clustered layer, tiny experts) cost more in
     * OpenBLAS's thread hand-off than they compute: run them on the calling thread */
    int small = cpu_threads > 1 && (double)M * N * K < SMALL_GEMM_FLOPS;
    if (small) openblas_set_num_threads(1);
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (small) openblas_set_num_threads(cpu_threads);
}

/* ---------------------------------------------------------------------------------------
 * embedding */

/* out[B*T,D] = wte[tokens[b,t]] + wpe[t]; tokens[B,T], wte[V,D], wpe[T,D] */
static void cpu_embed_forward(void *ctx, float *out, const int32_t *tokens, const float *wte,
                              const float *wpe, int B, int T, int D) {
    (void)ctx;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            size_t n = (size_t)b * T + t;
            int32_t tok = tokens[n];
            ASSERT(tok >= 0);
            const float *we = wte + (size_t)tok * D, *pe = wpe + (size_t)t * D;
            float *o = out + n * D;
            for (int d = 0; d < D; d++) o[d] = we[d] + pe[d];
        }
}

/* dwte[V,D] += scatter of dout[B*T,D] by tokens[B,T]; dwpe[T,D] += sum over b; serial order */
static void cpu_embed_backward(void *ctx, float *dwte, float *dwpe, const float *dout,
                               const int32_t *tokens, int B, int T, int D) {
    (void)ctx;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            size_t n = (size_t)b * T + t;
            const float *g = dout + n * D;
            float *we = dwte + (size_t)tokens[n] * D, *pe = dwpe + (size_t)t * D;
            for (int d = 0; d < D; d++) we[d] += g[d];
            for (int d = 0; d < D; d++) pe[d] += g[d];
        }
}

/* ---------------------------------------------------------------------------------------
 * layernorm (eps 1e-5, biased variance, as torch.nn.LayerNorm) */
#define LN_EPS 1e-5f

/* out[N,D] = (x[N,D] - mean)*rstd*w[D] + b[D]; saves mean[N], rstd[N] */
static void cpu_layernorm_forward(void *ctx, float *out, float *mean, float *rstd, const float *x,
                                  const float *w, const float *b, int N, int D) {
    (void)ctx;
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        float *o = out + (size_t)n * D;
        float m = sum_f32(xr, D) / (float)D;
        float var = sumsq_centered_f32(xr, m, D) / (float)D;
        float s = 1.0f / sqrtf(var + LN_EPS);
        for (int d = 0; d < D; d++) o[d] = (xr[d] - m) * s * w[d] + b[d];
        mean[n] = m;
        rstd[n] = s;
    }
}

/* dx[N,D] +=, dw[D] +=, db[D] += from dout[N,D], x[N,D], w[D], mean[N], rstd[N] */
static void cpu_layernorm_backward(void *ctx, float *restrict dx, float *restrict dw, float *restrict db,
                                   const float *restrict dout, const float *restrict x,
                                   const float *restrict w, const float *mean, const float *rstd, int N, int D) {
    (void)ctx;
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *g = dout + (size_t)n * D;
        float *dxr = dx + (size_t)n * D;
        float m = mean[n], s = rstd[n];
        /* two reductions: mean(w*g) and mean(w*g*xhat), in lane order */
        float a1[LANES] = {0}, a2[LANES] = {0};
        int d = 0;
        for (; d + LANES <= D; d += LANES)
            for (int l = 0; l < LANES; l++) {
                float wg = w[d + l] * g[d + l];
                a1[l] += wg;
                a2[l] += wg * ((xr[d + l] - m) * s);
            }
        for (int l = 0; d < D; d++, l++) {
            float wg = w[d] * g[d];
            a1[l] += wg;
            a2[l] += wg * ((xr[d] - m) * s);
        }
        for (int wdt = LANES / 2; wdt > 0; wdt /= 2)
            for (int l = 0; l < wdt; l++) { a1[l] += a1[l + wdt]; a2[l] += a2[l + wdt]; }
        float mean_wg = a1[0] / (float)D, mean_wgx = a2[0] / (float)D;
        for (d = 0; d < D; d++) {
            float xhat = (xr[d] - m) * s;
            db[d] += g[d];
            dw[d] += xhat * g[d];
            dxr[d] += (w[d] * g[d] - mean_wg - xhat * mean_wgx) * s;
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * causal multi-head attention: one sgemm per (b, h) on strided slices of qkv (ld 3D).
 * The full T x T score block is computed and the upper triangle masked to exactly 0. */

/* out[B,T,D], att[B,H,T,T] (softmax probs, zeros above the diagonal) from qkv[B,T,3D] */
static void cpu_attention_forward(void *ctx, float *out, float *att, const float *qkv,
                                  int B, int T, int D, int H) {
    ASSERT(H > 0 && D % H == 0);
    int hd = D / H, ld = 3 * D;
    float scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *q = qkv + (size_t)b * T * ld + (size_t)h * hd;
            const float *k = q + D, *v = q + 2 * D;
            float *p = att + ((size_t)b * H + h) * T * T;
            /* S[T,T] = scale * Q[T,hd] K[T,hd]^T */
            cpu_gemm(ctx, false, true, T, T, hd, scale, q, ld, k, ld, 0.0f, p, T);
            for (int t = 0; t < T; t++) {
                float *row = p + (size_t)t * T;
                float mx = max_f32(row, t + 1);
                float sum = exp_inplace_sum_f32(row, mx, t + 1);
                float inv = 1.0f / sum;
                for (int j = 0; j <= t; j++) row[j] *= inv;
                for (int j = t + 1; j < T; j++) row[j] = 0.0f;
            }
            /* out[T,hd] (ld D) = P[T,T] V[T,hd] */
            cpu_gemm(ctx, false, false, T, hd, T, 1.0f, p, T, v, ld, 0.0f,
                     out + (size_t)b * T * D + (size_t)h * hd, D);
        }
}

/* dqkv[B,T,3D] += from dout[B,T,D], qkv[B,T,3D], att[B,H,T,T]; scratch[B,H,T,T] workspace */
static void cpu_attention_backward(void *ctx, float *dqkv, float *scratch, const float *dout,
                                   const float *qkv, const float *att, int B, int T, int D, int H) {
    ASSERT(H > 0 && D % H == 0);
    int hd = D / H, ld = 3 * D;
    float scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t off = (size_t)b * T * ld + (size_t)h * hd;
            const float *q = qkv + off, *k = q + D, *v = q + 2 * D;
            float *dq = dqkv + off, *dk = dq + D, *dv = dq + 2 * D;
            const float *p = att + ((size_t)b * H + h) * T * T;
            float *ds = scratch + ((size_t)b * H + h) * T * T;
            const float *dob = dout + (size_t)b * T * D + (size_t)h * hd;
            /* dV[T,hd] += P^T dO */
            cpu_gemm(ctx, true, false, T, hd, T, 1.0f, p, T, dob, D, 1.0f, dv, ld);
            /* dP[T,T] = dO V^T */
            cpu_gemm(ctx, false, true, T, T, hd, 1.0f, dob, D, v, ld, 0.0f, ds, T);
            /* dS = scale * P * (dP - rowsum(P * dP)), zero above the diagonal */
            for (int t = 0; t < T; t++) {
                const float *pr = p + (size_t)t * T;
                float *r = ds + (size_t)t * T;
                float pd = dot_f32(pr, r, t + 1);
                for (int j = 0; j <= t; j++) r[j] = scale * (pr[j] * (r[j] - pd));
                for (int j = t + 1; j < T; j++) r[j] = 0.0f;
            }
            /* dQ[T,hd] += dS K ; dK[T,hd] += dS^T Q */
            cpu_gemm(ctx, false, false, T, hd, T, 1.0f, ds, T, k, ld, 1.0f, dq, ld);
            cpu_gemm(ctx, true, false, T, hd, T, 1.0f, ds, T, q, ld, 1.0f, dk, ld);
        }
}

/* ---------------------------------------------------------------------------------------
 * activations. GELU (tanh form) is evaluated as x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715x^3),
 * which equals 0.5x(1 + tanh u) exactly in real arithmetic and needs only exp (vectorisable). */
#define GELU_C 0.7978845608028654f   /* sqrt(2/pi) */

/* GELU: a[N,F] = gelu_tanh(h[N,F]); SwiGLU: a[N,F] = silu(h1) * h3 with h[N,2F] = [h1 | h3] */
static void cpu_act_forward(void *ctx, int kind, float *a, const float *h, int N, int F) {
    (void)ctx;
    if (kind == ACT_KIND_GELU) {
        size_t n = (size_t)N * F;
        for (size_t i = 0; i < n; i++) {
            float x = h[i];
            float u = GELU_C * (x + 0.044715f * x * x * x);
            a[i] = x / (1.0f + exp_f32(-2.0f * u));
        }
    } else {
        ASSERTF(kind == ACT_KIND_SWIGLU, "act_forward: unknown activation kind %d", kind);
        for (int n = 0; n < N; n++) {
            const float *h1 = h + (size_t)n * 2 * F, *h3 = h1 + F;
            float *ar = a + (size_t)n * F;
            for (int f = 0; f < F; f++) {
                float x = h1[f];
                float sig = 1.0f / (1.0f + exp_f32(-x));
                ar[f] = x * sig * h3[f];
            }
        }
    }
}

/* dh[N,F] (GELU) or dh[N,2F] (SwiGLU) = (overwritten) from da[N,F] and the saved h */
static void cpu_act_backward(void *ctx, int kind, float *dh, const float *da, const float *h, int N, int F) {
    (void)ctx;
    if (kind == ACT_KIND_GELU) {
        size_t n = (size_t)N * F;
        for (size_t i = 0; i < n; i++) {
            /* d/dx x*s = s + 2x s(1-s) du/dx, s = sigmoid(2u) (= 0.5(1+tanh u) + 0.5x sech^2(u) du/dx) */
            float x = h[i];
            float u = GELU_C * (x + 0.044715f * x * x * x);
            float du = GELU_C * (1.0f + 3.0f * 0.044715f * x * x);
            float sg = 1.0f / (1.0f + exp_f32(-2.0f * u));
            float grad = sg + 2.0f * x * sg * (1.0f - sg) * du;
            dh[i] = grad * da[i];
        }
    } else {
        ASSERTF(kind == ACT_KIND_SWIGLU, "act_backward: unknown activation kind %d", kind);
        for (int n = 0; n < N; n++) {
            const float *h1 = h + (size_t)n * 2 * F, *h3 = h1 + F, *g = da + (size_t)n * F;
            float *d1 = dh + (size_t)n * 2 * F, *d3 = d1 + F;
            for (int f = 0; f < F; f++) {
                float x = h1[f];
                float sig = 1.0f / (1.0f + exp_f32(-x));
                float silu = x * sig;
                d1[f] = g[f] * h3[f] * (sig + silu * (1.0f - sig));
                d3[f] = g[f] * silu;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * vector helpers */

/* y[n] += alpha * x[n] */
static void cpu_axpy(void *ctx, float *y, const float *x, float alpha, size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/* x[n] *= alpha */
static void cpu_scale(void *ctx, float *x, float alpha, size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) x[i] *= alpha;
}

/* sum of x[n]^2 accumulated in double, fixed lane order */
static double cpu_sumsq(void *ctx, const float *x, size_t n) {
    (void)ctx;
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) { double v = x[i + l]; acc[l] += v * v; }
    for (int l = 0; i < n; i++, l++) { double v = x[i]; acc[l] += v * v; }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* ---------------------------------------------------------------------------------------
 * cross-entropy: stable log-softmax in float with the row max */

/* loss[N] = -log softmax(logits[N,V])[target]; 0 where targets[N] < 0 */
static void cpu_xent_forward(void *ctx, float *loss, const float *logits, const int32_t *targets, int N, int V) {
    (void)ctx;
    for (int n = 0; n < N; n++) {
        int32_t y = targets[n];
        if (y < 0) { loss[n] = 0.0f; continue; }
        ASSERTF(y < V, "xent_forward: target %d outside vocab %d (row %d)", (int)y, V, n);
        const float *row = logits + (size_t)n * V;
        float mx = max_f32(row, V);
        float sum = sum_exp_f32(row, mx, V);
        loss[n] = logf(sum) - (row[y] - mx);
    }
}

/* dlogits[N,V] = (softmax(logits) - onehot(target)) * dloss_scale, 0 rows where target < 0.
 * Overwrites; dlogits may be logits itself (exact alias): a row's max is taken from the logits
 * before anything is written, then the row is turned into exps in place. */
static void cpu_xent_backward(void *ctx, float *dlogits, const float *logits, const int32_t *targets,
                              float dloss_scale, int N, int V) {
    (void)ctx;
    for (int n = 0; n < N; n++) {
        int32_t y = targets[n];
        const float *row = logits + (size_t)n * V;
        float *drow = dlogits + (size_t)n * V;
        if (y < 0) { memset(drow, 0, sizeof(float) * (size_t)V); continue; }
        ASSERTF(y < V, "xent_backward: target %d outside vocab %d (row %d)", (int)y, V, n);
        float mx = max_f32(row, V);
        /* exps go into drow (in place when it aliases logits; row is not read again) */
        if (drow != row) memcpy(drow, row, sizeof(float) * (size_t)V);
        float sum = exp_inplace_sum_f32(drow, mx, V);
        float inv = 1.0f / sum, ey = drow[y];
        for (int j = 0; j < V; j++) drow[j] = (drow[j] * inv) * dloss_scale;
        drow[y] = (ey * inv - 1.0f) * dloss_scale;
    }
}

/* ---------------------------------------------------------------------------------------
 * MoE permute / unpermute (n = routed entries) */

/* out[n,D] = x[idx[i],:] */
static void cpu_gather_rows(void *ctx, float *out, const float *x, const int32_t *idx, int n, int D) {
    (void)ctx;
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * D, x + (size_t)idx[i] * D, sizeof(float) * (size_t)D);
}

/* y[idx[i],:] += scale[i] * src[n,D] (scale NULL = 1); serial i = 0..n-1 */
static void cpu_scatter_add_rows(void *ctx, float *y, const float *src, const int32_t *idx,
                                 const float *scale, int n, int D) {
    (void)ctx;
    for (int i = 0; i < n; i++) {
        float *yr = y + (size_t)idx[i] * D;
        const float *s = src + (size_t)i * D;
        if (scale) {
            float a = scale[i];
            for (int d = 0; d < D; d++) yr[d] += a * s[d];
        } else {
            for (int d = 0; d < D; d++) yr[d] += s[d];
        }
    }
}

/* out[n] = dot(dy[idx[i],:], src[i,:]); dy[*,D], src[n,D] */
static void cpu_gather_dot(void *ctx, float *out, const float *dy, const float *src, const int32_t *idx,
                           int n, int D) {
    (void)ctx;
    for (int i = 0; i < n; i++) out[i] = dot_f32(dy + (size_t)idx[i] * D, src + (size_t)i * D, D);
}

/* y[N,D] += sum_{s<k, pos[t,s] >= 0} gate[t,s] * src[pos[t,s],:] in slot order (gate NULL = 1);
 * src[M,D], pos[N,k], gate[N,k] */
static void cpu_combine_rows(void *ctx, float *y, const float *src, const int32_t *pos,
                             const float *gate, int N, int k, int D) {
    (void)ctx;
    for (int t = 0; t < N; t++) {
        float *yr = y + (size_t)t * D;
        for (int s = 0; s < k; s++) {
            int32_t p = pos[(size_t)t * k + s];
            if (p < 0) continue;
            const float *sr = src + (size_t)p * D;
            if (gate) {
                float g = gate[(size_t)t * k + s];
                for (int d = 0; d < D; d++) yr[d] += g * sr[d];
            } else {
                for (int d = 0; d < D; d++) yr[d] += sr[d];
            }
        }
    }
}

/* out[n,D] = scale[i] * x[idx[i],:] (overwrite; scale NULL = plain gather) */
static void cpu_gather_rows_scaled(void *ctx, float *out, const float *x, const int32_t *idx,
                                   const float *scale, int n, int D) {
    if (!scale) { cpu_gather_rows(ctx, out, x, idx, n, D); return; }
    for (int i = 0; i < n; i++) {
        const float *xr = x + (size_t)idx[i] * D;
        float *o = out + (size_t)i * D;
        float a = scale[i];
        for (int d = 0; d < D; d++) o[d] = a * xr[d];
    }
}

/* ---------------------------------------------------------------------------------------
 * sequence pooling: x[B,T,D] -> out[B,D] over len[B] in [1,T] */

static void cpu_pool_forward(void *ctx, int pooling, float *out, const float *x, const int32_t *len,
                             int B, int T, int D) {
    (void)ctx;
    for (int b = 0; b < B; b++) {
        int L = len[b];
        ASSERTF(L >= 1 && L <= T, "pool_forward: len[%d] = %d outside [1, %d]", b, L, T);
        const float *xb = x + (size_t)b * T * D;
        float *o = out + (size_t)b * D;
        if (pooling == POOL_KIND_LAST) {
            memcpy(o, xb + (size_t)(L - 1) * D, sizeof(float) * (size_t)D);
            continue;
        }
        ASSERTF(pooling == POOL_KIND_MEAN, "pool_forward: unknown pooling kind %d", pooling);
        memcpy(o, xb, sizeof(float) * (size_t)D);
        for (int t = 1; t < L; t++) {
            const float *xr = xb + (size_t)t * D;
            for (int d = 0; d < D; d++) o[d] += xr[d];
        }
        float inv = 1.0f / (float)L;
        for (int d = 0; d < D; d++) o[d] *= inv;
    }
}

/* dx[B,T,D] += from dout[B,D] (positions >= len[b] receive nothing) */
static void cpu_pool_backward(void *ctx, int pooling, float *dx, const float *dout, const int32_t *len,
                              int B, int T, int D) {
    (void)ctx;
    for (int b = 0; b < B; b++) {
        int L = len[b];
        ASSERTF(L >= 1 && L <= T, "pool_backward: len[%d] = %d outside [1, %d]", b, L, T);
        float *dxb = dx + (size_t)b * T * D;
        const float *g = dout + (size_t)b * D;
        if (pooling == POOL_KIND_LAST) {
            float *r = dxb + (size_t)(L - 1) * D;
            for (int d = 0; d < D; d++) r[d] += g[d];
            continue;
        }
        ASSERTF(pooling == POOL_KIND_MEAN, "pool_backward: unknown pooling kind %d", pooling);
        float inv = 1.0f / (float)L;
        for (int t = 0; t < L; t++) {
            float *r = dxb + (size_t)t * D;
            for (int d = 0; d < D; d++) r[d] += g[d] * inv;
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * AdamW, in torch.optim.AdamW's single-tensor order (float math, scalars from double):
 *   p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = v*b2 + (1-b2)*g*g;
 *   p += -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
 * p, g, m, v [n]; t >= 1 */
static inline void adamw_loop(float *restrict p, const float *restrict g, float *restrict m,
                              float *restrict v, size_t n, float decay, float w1, bool lerp_low,
                              float beta2, float w2, float bc2_sqrt, float eps, float neg_step) {
    for (size_t i = 0; i < n; i++) {
        float pi = p[i] * decay;
        float gi = g[i], mi = m[i];
        mi = lerp_low ? mi + w1 * (gi - mi) : gi - (gi - mi) * (1.0f - w1);
        float vi = v[i] * beta2 + w2 * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + neg_step * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

static void cpu_adamw(void *ctx, float *p, const float *g, float *m, float *v, size_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, int t) {
    (void)ctx;
    ASSERT(t >= 1);
    float decay = (float)(1.0 - (double)lr * (double)weight_decay);
    float w1 = (float)(1.0 - (double)beta1);       /* lerp weight */
    float w2 = (float)(1.0 - (double)beta2);
    double bc1 = 1.0 - pow((double)beta1, t);
    double bc2 = 1.0 - pow((double)beta2, t);
    float neg_step = (float)(-((double)lr / bc1));
    float bc2_sqrt = (float)sqrt(bc2);
    /* torch lerp: weight < 0.5 ? self + w*(end-self) : end - (end-self)*(1-w); the branch is
     * hoisted out of the loop (the loop still stays scalar under -fmath-errno because of sqrtf;
     * it is memory bound anyway) */
    if (w1 < 0.5f) adamw_loop(p, g, m, v, n, decay, w1, true, beta2, w2, bc2_sqrt, eps, neg_step);
    else adamw_loop(p, g, m, v, n, decay, w1, false, beta2, w2, bc2_sqrt, eps, neg_step);
}

/* ---------------------------------------------------------------------------------------
 * the table and the backend-independent helpers */

/* ---------------------------------------------------------------------------------------
 * routing: the host router's per-token code (cuda/route_common.h), token by token */

static void route_sums(const RouteSelArgs *a) {
    int E = a->E, G = a->G, N = a->N;
    for (int c = 0; c < E + G + 1; c++) a->sums[c] = 0;
    for (int t = 0; t < N; t++) {       /* token order, as router_losses summed */
        for (int i = 0; i < E; i++) a->sums[i] += a->probs[(size_t)t * E + i];
        for (int g = 0; g < G; g++) a->sums[E + g] += a->q[(size_t)t * G + g];
        a->sums[E + G] += a->lse[t] * a->lse[t];
    }
}
static void cpu_route_topk(void *ctx, const RouteSelArgs *a) {
    (void)ctx;
    ASSERTF(a->G == 0, "route_topk: G=%d, expected 0 (one stage)", a->G);
    for (int t = 0; t < a->N; t++) rc_select_one(a, t);
    route_sums(a);
}
static void cpu_route_two_stage(void *ctx, const RouteSelArgs *a) {
    (void)ctx;
    ASSERTF(a->G > 0 && a->TG >= 1 && a->TG <= a->G && a->K * a->G == a->E,
            "route_two_stage: G=%d K=%d TG=%d E=%d", a->G, a->K, a->TG, a->E);
    for (int t = 0; t < a->N; t++) {
        rc_two_scores(a, t);
        rc_two_choose(a, t, NULL);
    }
    route_sums(a);
}
static void cpu_route_count(void *ctx, int32_t *cnt, const int32_t *ids, const int32_t *valid, int N, int slots,
                            int buckets) {
    (void)ctx;
    memset(cnt, 0, sizeof(int32_t) * (size_t)slots * buckets);
    for (int t = 0; t < N; t++)
        for (int s = 0; s < slots; s++) {
            size_t ts = (size_t)t * slots + s;
            if (!valid || valid[ts] >= 0) cnt[(size_t)s * buckets + ids[ts]]++;
        }
}
static void cpu_route_keep(void *ctx, int32_t *keep, const int32_t *ids, const int64_t *base, int64_t cap, int N,
                           int slots, int buckets) {
    (void)ctx;
    int64_t *run = xcalloc(sizeof(int64_t) * (size_t)(buckets > 0 ? buckets : 1));
    for (int s = 0; s < slots; s++) {
        memset(run, 0, sizeof(int64_t) * (size_t)buckets);
        for (int t = 0; t < N; t++) {
            size_t ts = (size_t)t * slots + s;
            if (keep[ts] < 0) continue;
            int b = ids[ts];
            int64_t qpos = base[(size_t)s * buckets + b] + run[b]++;
            if (cap >= 0 && qpos >= cap) keep[ts] = -1;
        }
    }
    xfree(run);
}
static void cpu_route_pair_keep(void *ctx, int32_t *pos, const int32_t *expert, const int32_t *group,
                                const int32_t *gkeep, const int32_t *group_of, int N, int k, int TG) {
    (void)ctx;
    for (int t = 0; t < N; t++)
        for (int s = 0; s < k; s++) {
            int g = group_of[expert[(size_t)t * k + s]], ok = 0;
            for (int j = 0; j < TG; j++) ok |= group[(size_t)t * TG + j] == g && gkeep[(size_t)t * TG + j] >= 0;
            pos[(size_t)t * k + s] = ok ? 0 : -1;
        }
}
static void cpu_route_backward(void *ctx, const RouteBwdArgs *a) {
    (void)ctx;
    ASSERTF(a->k <= RC_MAX_K && a->TG <= RC_MAX_K, "route_backward: top-k %d or top groups %d > %d", a->k, a->TG, RC_MAX_K);
    for (int t = 0; t < a->N; t++) {
        if (a->G > 0) rc_backward_two(a, t);
        else rc_backward_one(a, t);
    }
}

/* ---------------------------------------------------------------------------------------
 * stored formats: host memory is backend memory, so the slots are src/quant.c's host code
 * (which calls cuda/quant_common.h per element, as the CUDA kernels do) on views of the arrays */
static void cpu_dequant_rows(void *ctx, float *dst, int fmt, const void *data, const uint16_t *scales,
                             const uint16_t *zeros, int rows, int cols, int group, int r0, int nr) {
    (void)ctx;
    ASSERTF(fmt == QFORMAT_F16 || fmt == QFORMAT_INT4, "dequant_rows: format %d is not a stored format (fp16 1, int4 2)", fmt);
    QTensor t;
    memset(&t, 0, sizeof t);
    t.fmt = (enum QFormat)fmt;
    t.rows = rows; t.cols = cols;
    t.group = fmt == QFORMAT_INT4 ? group : 0;
    t.data = (void *)data;
    t.scales = (uint16_t *)scales;
    t.zeros = (uint16_t *)zeros;
    ASSERTF(rows >= 0 && cols >= 0 && (fmt != QFORMAT_INT4 || (group >= 2 && group % 2 == 0)),
            "dequant_rows: bad shape [%d, %d] or INT4 group %d (even, >= 2)", rows, cols, group);
    if (nr == 0 || cols == 0) return;
    qtensor_decode_rows(&t, r0, nr, dst);
}

static void cpu_fake_quant(void *ctx, float *x, int fmt, int rows, int cols, int group) {
    (void)ctx;
    ASSERTF(fmt == QFORMAT_F16 || fmt == QFORMAT_INT4, "fake_quant: format %d is not a stored format (fp16 1, int4 2)", fmt);
    if (rows == 0 || cols == 0) return;
    quant_fake(x, rows, cols, (enum QFormat)fmt, group, NULL);
}

static void cpu_destroy(void *ctx) { (void)ctx; }   /* the CPU backend has no context */

static const BackendOps cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc, .free = cpu_free, .to_host = cpu_to_host, .from_host = cpu_from_host,
    .copy = cpu_copy, .zero = cpu_zero, .sync = cpu_sync,
    .gemm = cpu_gemm,
    .embed_forward = cpu_embed_forward, .embed_backward = cpu_embed_backward,
    .layernorm_forward = cpu_layernorm_forward, .layernorm_backward = cpu_layernorm_backward,
    .attention_forward = cpu_attention_forward, .attention_backward = cpu_attention_backward,
    .act_forward = cpu_act_forward, .act_backward = cpu_act_backward,
    .axpy = cpu_axpy, .scale = cpu_scale, .sumsq = cpu_sumsq,
    .xent_forward = cpu_xent_forward, .xent_backward = cpu_xent_backward,
    .gather_rows = cpu_gather_rows, .scatter_add_rows = cpu_scatter_add_rows,
    .gather_dot = cpu_gather_dot,
    .pool_forward = cpu_pool_forward, .pool_backward = cpu_pool_backward,
    .adamw = cpu_adamw,
    .combine_rows = cpu_combine_rows, .gather_rows_scaled = cpu_gather_rows_scaled,
    .route_topk = cpu_route_topk, .route_two_stage = cpu_route_two_stage, .route_count = cpu_route_count,
    .route_keep = cpu_route_keep, .route_pair_keep = cpu_route_pair_keep, .route_backward = cpu_route_backward,
    .dequant_rows = cpu_dequant_rows, .fake_quant = cpu_fake_quant,
    .host_alloc_pinned = cpu_host_alloc_pinned, .host_free_pinned = cpu_host_free_pinned,
    .copy_to_device_async = cpu_copy_to_device_async, .copy_to_host_async = cpu_copy_to_host_async,
    .wait_event = cpu_wait_event, .sync_event = cpu_sync_event,
    .destroy = cpu_destroy,
};

Status backend_cpu_init(Backend *be, int threads) {
    memset(be, 0, sizeof *be);
    if (threads > 0) openblas_set_num_threads(threads);
    cpu_threads = threads > 0 ? threads : 1;
    be->ops = &cpu_ops;
    be->ctx = NULL;
    be->kind = BACKEND_CPU;
    be->threads = threads;
    return status_ok();
}

/* every function slot of BackendOps, in declaration order; the static assert below fails
 * when a slot is added to the struct but not here */
#define BACKEND_SLOTS(X) \
    X(alloc) X(free) X(to_host) X(from_host) X(copy) X(zero) X(sync) X(gemm) \
    X(embed_forward) X(embed_backward) X(layernorm_forward) X(layernorm_backward) \
    X(attention_forward) X(attention_backward) X(act_forward) X(act_backward) \
    X(axpy) X(scale) X(sumsq) X(xent_forward) X(xent_backward) \
    X(gather_rows) X(scatter_add_rows) X(gather_dot) X(pool_forward) X(pool_backward) \
    X(adamw) X(combine_rows) X(gather_rows_scaled) \
    X(route_topk) X(route_two_stage) X(route_count) X(route_keep) X(route_pair_keep) X(route_backward) \
    X(dequant_rows) X(fake_quant) \
    X(host_alloc_pinned) X(host_free_pinned) X(copy_to_device_async) X(copy_to_host_async) \
    X(wait_event) X(sync_event) X(destroy)
#define SLOT_COUNT(s) + 1
_Static_assert(sizeof(BackendOps) == sizeof(const char *) + (0 BACKEND_SLOTS(SLOT_COUNT)) * sizeof(void (*)(void)),
               "BackendOps gained a slot: add it to BACKEND_SLOTS in backend_cpu.c");

Status backend_check(const Backend *be) {
    if (!be || !be->ops) return status_errorf("backend: no ops table (backend not initialised)");
    const BackendOps *o = be->ops;
    const char *name = o->name ? o->name : "(unnamed)";
#define SLOT_CHECK(s) \
    if (!o->s) return status_errorf("backend '%s': ops slot '%s' is empty (not implemented); " \
                                    "every slot must be filled, there is no fallback", name, #s);
    BACKEND_SLOTS(SLOT_CHECK)
#undef SLOT_CHECK
    if (!o->name) return status_errorf("backend: ops table has no name");
    return status_ok();
}

Status backend_set_gemm_dtype(Backend *be, int dtype) {
    if (dtype != GEMM_DTYPE_FP32 && dtype != GEMM_DTYPE_BF16)
        return status_errorf("run.gemm_dtype: unknown GEMM dtype %d (allowed: fp32, bf16)", dtype);
    if (be->kind == BACKEND_CUDA) return backend_cuda_set_gemm_dtype(be, dtype);
    if (dtype == GEMM_DTYPE_BF16)
        return status_errorf("run.gemm_dtype=bf16: the %s backend has fp32 GEMMs only (bf16 needs run.backend=cuda)",
                             be->ops ? be->ops->name : "(uninitialised)");
    return status_ok();
}

/* releases the backend's context through its destroy slot (CUDA: cuBLAS handle); safe on a
 * zeroed struct and safe twice */
void backend_free(Backend *be) {
    if (!be) return;
    if (be->ops && be->ops->destroy) be->ops->destroy(be->ctx);
    memset(be, 0, sizeof *be);
}
