/* checkbackend: every BackendOps slot against an independent reference, in the style of
 * dav1d's checkasm. For each slot it draws random inputs of several shapes (empty and odd sizes
 * included), runs a naive reference written here (plain loops, double where rounding matters;
 * it never calls src/backend_cpu.c) and the backend under test, and compares them: bitwise where
 * the op is exact by its contract, else within the tolerance in the table below. Around that:
 *  - every output buffer starts as NaN bytes (an element the op forgets to write fails), every
 *    device buffer has 64-byte canaries on both sides, and every const input is read back after
 *    the op: a write outside an output or into an input fails the op;
 *  - every op runs twice on the same inputs and must give the same bits (determinism);
 *  - the reference backward of layernorm, attention, GELU/SwiGLU, cross-entropy and pooling is
 *    itself checked against central finite differences of the reference forward (double);
 *  - the per-element functions of cuda/kernels_common.h (shared with the CUDA kernels) are
 *    checked on the CPU against the reference and bit for bit against the CPU backend;
 *  - self-test: every check is rerun with a planted error in the backend's output (one ulp for
 *    exact ops, 4x the tolerance otherwise) and must fail. DCMOE_CHECK_BREAK=<op> plants it in
 *    the normal run instead (meson test checkbackend_detects expects that run to fail).
 * With --backend cuda, where the output differs from the CPU backend's a '#' line says by how
 * much (information only: the reference decides).
 * Does not: test node-limited routing (host only), communicators or whole models (tests/test_ops_gradcheck.c,
 * tests/test_model_gradcheck.c), or time anything unless --bench is given.
 *
 * usage: checkbackend [--backend cpu|cuda] [--seed N] [--op NAME] [--bench]
 * exit: 0 all passed; 1 a check failed; 77 skipped (--backend cuda without CUDA or a device);
 *       2 bad usage.
 *
 * Tolerances: |got - want| <= atol + rtol*|want| + bound, elementwise, want from the reference.
 * u = 2^-24; g(m) = 1.1 (m + 2) u. "sum bound" = g(m) * sum|terms| for a value that sums m
 * terms: it holds for any summation order, so it fits every backend.
 *   op                     compared                tolerance
 *   alloc                  contents (zeroed)       bitwise; pointer 16-byte aligned
 *   free, to_host, from_host, copy, zero, sync, destroy   bytes   bitwise
 *   gemm                   C (padding untouched)   sum bound: g(K+2)(|alpha| sum|a||b| + |beta c|)
 *   embed_forward          out                     bitwise (one add)
 *   embed_backward         dwte, dwpe              sum bound over the accumulated rows
 *   layernorm_forward      out                     8 (D+4) u (1 + |w xhat| + |b|)
 *                          mean, rstd              g(D) mean|x| + 1e-30;  rtol 4 (D+4) u
 *   layernorm_backward     dx                      8 (D+4) u rstd (|w g| + mean|w g| + |xhat| mean|w g xhat|) + 2u|dx0|
 *                          dw, db                  sum bound g(N+4) over rows
 *   attention_forward      out, att (lower tri.)   atol 1e-6, rtol 1e-5
 *   attention_backward     dqkv                    atol 4e-6, rtol 4e-5
 *   act_forward            a                       atol 2e-7, rtol 2e-6 (GELU and SwiGLU)
 *   act_backward           dh                      atol 5e-7, rtol 5e-6
 *   axpy, scale            y, x                    bitwise (one multiply, one add)
 *   sumsq                  the double sum          1.1 (n+2) 2^-53 sum
 *   xent_forward           loss                    atol 4 g(V) + 1e-6, rtol 4u
 *   xent_backward          dlogits (also in place) |scale| (g(V+4) (p + onehot) + 1e-7)
 *   gather_rows            out                     bitwise (copy)
 *   scatter_add_rows       y                       bitwise (serial order i = 0..n-1 is the contract)
 *   gather_dot             out                     sum bound g(D) sum|dy src|
 *   pool_forward           out                     mean: sum bound g(L+2) sum|x|/L; last: bitwise
 *   pool_backward          dx                      mean: 4u (|dx0| + |g|/L); last: bitwise
 *   adamw (one step)       p, m / v                4u per operation on the magnitudes met (m may cancel) / rtol 8u
 *   combine_rows           y                       bitwise (slot order is the contract)
 *   gather_rows_scaled     out                     bitwise (one multiply)
 *   kernels_common.h       exp / gelu / swiglu / adamw step   2 ulp / as act_* / as adamw; bitwise vs the CPU backend
 *   route_topk             probs, lse, sums        atol 1e-7 rtol 1e-6 / 1e-6 vs a double softmax;
 *                          experts                 bitwise (top-k of the returned probs, or logit + bias;
 *                                                  ties to the lower id); gates bitwise (renorm: 4ku)
 *   route_two_stage        groups, experts, gtop2  bitwise vs the host router (src/router.c)
 *                          probs, q, gates         atol 1e-7 rtol 1e-6 vs the host router; lsel bitwise
 *                          lse, sums               atol 1e-6 rtol 1e-6; contract: probs sum to 1, experts in chosen groups
 *   route_count, route_keep, route_pair_keep       bitwise vs naive loops (integers)
 *   route_backward         dlogits                 atol 1e-7 rtol 1e-6 vs the host router's router_backward;
 *                                                  atol 4e-7 rtol 1e-5 vs central differences (double, h = 1e-5) of
 *                                                  the routing loss with the selections held fixed
 *   dequant_rows           dst (FP16 / INT4 rows)  bitwise (exact: one conversion, or q*s then + z in FP32)
 *   fake_quant             x (FP16 / INT4)         bitwise (exact: quant.h's quantiser; FP16 rounding by table search)
 *   host_alloc_pinned .. sync_event (offloading's transfers)   bytes   bitwise (ordering checked through
 *                                                  axpy before / scale after a transfer)
 *   gemm_bf16 (CUDA)       C                       |alpha| (2^-7 + 2^-16 + g(K)) sum|a||b| + g(2)|beta c|;
 *                                                  the CPU backend must refuse bf16 naming run.gemm_dtype
 *   finite differences of the reference (double, h = 1e-5): atol 1e-6, rtol 1e-6
 *
 * Legend: B T D F V H N = batch, seq, d_model, d_ff, vocab, heads, rows; hd = D/H;
 *         n = entries (routed rows), R = rows of the table gathered from or scattered into. */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "config.h"
#include "half_ref.h"
#include "harness.h"
#include "kernels_common.h"
#include "router.h"
#include "util.h"

#define U32 (1.0 / 16777216.0)          /* u = 2^-24 */
#define F4(n) (sizeof(float) * (size_t)(n))
#define I4(n) (sizeof(int32_t) * (size_t)(n))
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))
#define LN_EPS_REF 1e-5                 /* the CPU reference's layernorm eps (torch's default) */

static double gam(double m) { return 1.1 * (m + 2.0) * U32; }

/* ---------------------------------------------------------------------------------------
 * the checker's state and reporting */
typedef struct Check {
    const Backend *be;      /* under test */
    const Backend *cpu;     /* the CPU backend: kernels_common bitwise checks, '#' diff lines */
    int is_cpu;             /* be is the CPU backend */
    uint64_t seed;
    Rng rng;                /* per op: (seed, op index) */
    const char *op;         /* the op being checked */
    const char *brk;        /* plant an error in this op's output (NULL: none) */
    int quiet;              /* self-test: count failures, print nothing */
    int quiet_fail;
    int guard_bad;          /* canary or input-modification violations in this op */
    int n_buffers;          /* device buffers checked for them */
} Check;

static void report(Check *c, int cond, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void report(Check *c, int cond, const char *fmt, ...) {
    if (c->quiet) {
        if (!cond) c->quiet_fail++;
        return;
    }
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    ok(cond, "%s", buf);
}

static void note(Check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(Check *c, const char *fmt, ...) {
    if (c->quiet) return;
    va_list ap;
    va_start(ap, fmt);
    printf("#   ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

static int planting(const Check *c) { return c->brk && !strcmp(c->brk, c->op); }

static uint32_t bits_of(float x) { uint32_t b; memcpy(&b, &x, sizeof b); return b; }

/* got[n] bitwise equal to want[n] (so -0 != +0 and NaN payloads count) */
static int cmp_exact(Check *c, const char *what, const float *got_in, const float *want, size_t n) {
    float *got = xmalloc(F4(n));
    memcpy(got, got_in, F4(n));
    if (planting(c) && n) got[n / 2] = nextafterf(got[n / 2], isinf(got[n / 2]) && got[n / 2] > 0 ? 0.0f : INFINITY);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (bits_of(got[i]) != bits_of(want[i])) {
            if (bad < 3) note(c, "%s: %s[%zu]: got %.9g (0x%08x) want %.9g (0x%08x)", c->op, what, i, (double)got[i],
                              bits_of(got[i]), (double)want[i], bits_of(want[i]));
            bad++;
        }
    report(c, bad == 0, "%s: %s: %zu/%zu differ (bitwise)", c->op, what, bad, n);
    xfree(got);
    return bad == 0;
}

/* |got - want| <= atol + rtol |want| + bound[i] (bound may be NULL) */
static int cmp_tol(Check *c, const char *what, const float *got_in, const double *want, const double *bound,
                   size_t n, double atol, double rtol) {
    float *got = xmalloc(F4(n));
    memcpy(got, got_in, F4(n));
    if (planting(c) && n) {
        size_t i = n / 2;
        double tol = atol + rtol * fabs(want[i]) + (bound ? bound[i] : 0);
        float p = (float)(want[i] + 4.0 * tol);
        while (!(fabs((double)p - want[i]) > tol)) p = nextafterf(p, INFINITY);
        got[i] = p;
    }
    size_t bad = 0;
    double max_abs = 0, max_ratio = 0;
    for (size_t i = 0; i < n; i++) {
        double tol = atol + rtol * fabs(want[i]) + (bound ? bound[i] : 0);
        double d = fabs((double)got[i] - want[i]);
        if (d > max_abs || d != d) max_abs = d;
        if (tol > 0 && d / tol > max_ratio) max_ratio = d / tol;
        if (!(d <= tol)) {
            if (bad < 3) note(c, "%s: %s[%zu]: got %.9g want %.12g (diff %.3g, tolerance %.3g)", c->op, what, i,
                              (double)got[i], want[i], d, tol);
            bad++;
        }
    }
    report(c, bad == 0, "%s: %s: %zu/%zu outside tolerance (max |diff| %.3g = %.2f of the tolerance)", c->op, what,
           bad, n, max_abs, max_ratio);
    xfree(got);
    return bad == 0;
}

/* reference against reference (finite differences): no planting */
static int cmp_dd(Check *c, const char *what, const double *got, const double *want, size_t n, double atol, double rtol) {
    size_t bad = 0;
    double max_abs = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]);
        if (d > max_abs || d != d) max_abs = d;
        if (!(d <= atol + rtol * fabs(want[i]))) {
            if (bad < 3) note(c, "%s: %s[%zu]: finite difference %.12g, reference backward %.12g", c->op, what, i, got[i], want[i]);
            bad++;
        }
    }
    report(c, bad == 0, "%s: %s: %zu/%zu outside atol %.0e rtol %.0e (max |diff| %.3g)", c->op, what, bad, n, atol,
           rtol, max_abs);
    return bad == 0;
}

/* two runs of the backend: the same bits */
static void same_bits(Check *c, const char *what, const void *a, const void *b, size_t bytes) {
    report(c, bytes == 0 || memcmp(a, b, bytes) == 0, "%s: %s: a second run gives the same bits", c->op, what);
}

/* information only (--backend cuda): how the backend's output differs from the CPU backend's */
static void vs_cpu(Check *c, const char *what, const float *got, const float *cpu, size_t n) {
    if (c->is_cpu || c->quiet) return;
    size_t differ = 0;
    double max_abs = 0;
    for (size_t i = 0; i < n; i++)
        if (bits_of(got[i]) != bits_of(cpu[i])) {
            differ++;
            double d = fabs((double)got[i] - (double)cpu[i]);
            if (d > max_abs) max_abs = d;
        }
    if (differ) note(c, "%s: %s: %zu/%zu elements differ from the cpu backend (max |diff| %.3g)", c->op, what, differ, n, max_abs);
    else note(c, "%s: %s: bitwise equal to the cpu backend", c->op, what);
}

/* ---------------------------------------------------------------------------------------
 * device buffers: an arena per op call. Every buffer has CANARY bytes of 0xA5 on both sides;
 * outputs start as NaN bytes; inputs are read back and must be unchanged. */
#define CANARY 64
#define ARENA_MAX 16
typedef struct Arena {
    const Backend *be;
    int n;
    struct { unsigned char *base; size_t bytes; const void *in; void *out; } b[ARENA_MAX];
} Arena;

static void *a_add(Arena *a, size_t bytes, const void *init, int fill, const void *in, void *out) {
    ASSERT(a->n < ARENA_MAX);
    unsigned char *h = xmalloc(bytes + 2 * CANARY);
    memset(h, 0xA5, CANARY);
    memset(h + CANARY + bytes, 0xA5, CANARY);
    if (init) memcpy(h + CANARY, init, bytes);
    else memset(h + CANARY, fill, bytes);
    unsigned char *d = a->be->ops->alloc(a->be->ctx, bytes + 2 * CANARY);
    a->be->ops->from_host(a->be->ctx, d, h, bytes + 2 * CANARY);
    xfree(h);
    a->b[a->n].base = d;
    a->b[a->n].bytes = bytes;
    a->b[a->n].in = in;
    a->b[a->n].out = out;
    a->n++;
    return d + CANARY;
}
/* a const input, checked unchanged at the end */
static void *a_in(Arena *a, const void *host, size_t bytes) { return a_add(a, bytes, host, 0, host, NULL); }
/* an output: NaN bytes, read back into host */
static void *a_out(Arena *a, void *host, size_t bytes) { return a_add(a, bytes, NULL, 0xFF, NULL, host); }
/* in and out (accumulated or in place): uploaded from host, read back into it */
static void *a_io(Arena *a, void *host, size_t bytes) { return a_add(a, bytes, host, 0, NULL, host); }
/* workspace: garbage, not read back (canaries still checked) */
static void *a_scratch(Arena *a, size_t bytes) { return a_add(a, bytes, NULL, 0x7F, NULL, NULL); }

static void a_finish(Check *c, Arena *a) {
    const Backend *be = a->be;
    be->ops->sync(be->ctx);
    for (int k = 0; k < a->n; k++) {
        size_t bytes = a->b[k].bytes;
        unsigned char *h = xmalloc(bytes + 2 * CANARY);
        be->ops->to_host(be->ctx, h, a->b[k].base, bytes + 2 * CANARY);
        int canary_ok = 1;
        for (size_t i = 0; i < CANARY; i++)
            if (h[i] != 0xA5 || h[CANARY + bytes + i] != 0xA5) canary_ok = 0;
        if (!canary_ok) {
            c->guard_bad++;
            note(c, "%s: buffer %d (%zu bytes): a write outside it (canary overwritten)", c->op, k, bytes);
        }
        if (a->b[k].in && memcmp(h + CANARY, a->b[k].in, bytes) != 0) {
            c->guard_bad++;
            note(c, "%s: buffer %d (%zu bytes): a const input was modified", c->op, k, bytes);
        }
        if (a->b[k].out) memcpy(a->b[k].out, h + CANARY, bytes);
        xfree(h);
        be->ops->free(be->ctx, a->b[k].base);
        c->n_buffers++;
    }
    a->n = 0;
}

/* ---------------------------------------------------------------------------------------
 * random inputs */
static float *randn(Check *c, size_t n, float mean, float sd) {
    float *x = xmalloc(F4(n));
    for (size_t i = 0; i < n; i++) x[i] = mean + sd * rng_normal(&c->rng);
    return x;
}
static int32_t *randi(Check *c, size_t n, int lo, int hi) {     /* [lo, hi) */
    int32_t *x = xmalloc(I4(n));
    for (size_t i = 0; i < n; i++) x[i] = lo + (int32_t)rng_below(&c->rng, (uint64_t)(hi - lo));
    return x;
}
static float *fdup(const float *x, size_t n) { float *y = xmalloc(F4(n)); memcpy(y, x, F4(n)); return y; }
static float *falloc(size_t n) { return xmalloc(F4(n)); }
static double *dalloc(size_t n) { return xcalloc(sizeof(double) * n); }
static double *to_d(const float *x, size_t n) {
    double *d = xmalloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}
static float *to_f(const double *x, size_t n) {
    float *f = xmalloc(F4(n));
    for (size_t i = 0; i < n; i++) f[i] = (float)x[i];
    return f;
}

static const int SIZES_N[] = {0, 1, 3, 17, 64};
static const int SIZES_D[] = {1, 5, 32, 67};

/* ---------------------------------------------------------------------------------------
 * the reference: naive loops in double (forward and backward), written from the contracts in
 * src/backend.h. Backward functions accumulate (+=) unless noted. */

/* layernorm: out = (x - mean) rstd w + b, biased variance, eps 1e-5 */
static void ref_ln_fwd(double *out, double *mean, double *rstd, const double *x, const double *w, const double *b,
                       int N, int D) {
    for (int n = 0; n < N; n++) {
        const double *xr = x + (size_t)n * D;
        double m = 0, v = 0;
        for (int d = 0; d < D; d++) m += xr[d];
        m /= D;
        for (int d = 0; d < D; d++) v += (xr[d] - m) * (xr[d] - m);
        v /= D;
        double s = 1.0 / sqrt(v + LN_EPS_REF);
        for (int d = 0; d < D; d++) out[(size_t)n * D + d] = (xr[d] - m) * s * w[d] + b[d];
        mean[n] = m;
        rstd[n] = s;
    }
}
static void ref_ln_bwd(double *dx, double *dw, double *db, const double *dout, const double *x, const double *w,
                       const double *mean, const double *rstd, int N, int D) {
    for (int n = 0; n < N; n++) {
        const double *xr = x + (size_t)n * D, *g = dout + (size_t)n * D;
        double a1 = 0, a2 = 0;
        for (int d = 0; d < D; d++) {
            double xhat = (xr[d] - mean[n]) * rstd[n];
            a1 += w[d] * g[d];
            a2 += w[d] * g[d] * xhat;
        }
        a1 /= D;
        a2 /= D;
        for (int d = 0; d < D; d++) {
            double xhat = (xr[d] - mean[n]) * rstd[n];
            dx[(size_t)n * D + d] += (w[d] * g[d] - a1 - xhat * a2) * rstd[n];
            dw[d] += xhat * g[d];
            db[d] += g[d];
        }
    }
}

/* causal attention: qkv[B,T,3D], out[B,T,D], att[B,H,T,T] (lower triangle) */
static void ref_attn_fwd(double *out, double *att, const double *qkv, int B, int T, int D, int H) {
    int hd = D / H;
    double scale = 1.0 / sqrt((double)hd);
    double *e = dalloc((size_t)T + 1);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const double *q = qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    const double *k = qkv + ((size_t)b * T + j) * 3 * D + D + (size_t)h * hd;
                    double s = 0;
                    for (int d = 0; d < hd; d++) s += q[d] * k[d];
                    e[j] = s * scale;
                    if (e[j] > mx) mx = e[j];
                }
                for (int j = 0; j <= t; j++) { e[j] = exp(e[j] - mx); sum += e[j]; }
                double *p = att + (((size_t)b * H + h) * T + t) * T;
                for (int j = 0; j < T; j++) p[j] = j <= t ? e[j] / sum : 0.0;
                double *o = out + ((size_t)b * T + t) * D + (size_t)h * hd;
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j <= t; j++) acc += p[j] * qkv[((size_t)b * T + j) * 3 * D + 2 * D + (size_t)h * hd + d];
                    o[d] = acc;
                }
            }
    xfree(e);
}
static void ref_attn_bwd(double *dqkv, const double *dout, const double *qkv, const double *att, int B, int T, int D, int H) {
    int hd = D / H;
    double scale = 1.0 / sqrt((double)hd);
    double *dp = dalloc((size_t)T + 1);
    size_t ld = 3 * (size_t)D;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const double *p = att + (((size_t)b * H + h) * T + t) * T;
                const double *g = dout + ((size_t)b * T + t) * D + (size_t)h * hd;
                const double *q = qkv + ((size_t)b * T + t) * ld + (size_t)h * hd;
                double *dq = dqkv + ((size_t)b * T + t) * ld + (size_t)h * hd;
                double pd = 0;
                for (int j = 0; j <= t; j++) {
                    const double *v = qkv + ((size_t)b * T + j) * ld + 2 * (size_t)D + (size_t)h * hd;
                    double *dv = dqkv + ((size_t)b * T + j) * ld + 2 * (size_t)D + (size_t)h * hd;
                    double s = 0;
                    for (int d = 0; d < hd; d++) { s += g[d] * v[d]; dv[d] += p[j] * g[d]; }
                    dp[j] = s;
                    pd += p[j] * s;
                }
                for (int j = 0; j <= t; j++) {
                    double ds = p[j] * (dp[j] - pd) * scale;
                    const double *k = qkv + ((size_t)b * T + j) * ld + (size_t)D + (size_t)h * hd;
                    double *dk = dqkv + ((size_t)b * T + j) * ld + (size_t)D + (size_t)h * hd;
                    for (int d = 0; d < hd; d++) { dq[d] += ds * k[d]; dk[d] += ds * q[d]; }
                }
            }
    xfree(dp);
}

/* GELU (tanh form) and SwiGLU; the backward overwrites dh */
static double ref_gelu(double x) { double c = sqrt(2.0 / M_PI); return 0.5 * x * (1.0 + tanh(c * (x + 0.044715 * x * x * x))); }
static double ref_gelu_grad(double x) {
    double c = sqrt(2.0 / M_PI), u = c * (x + 0.044715 * x * x * x), th = tanh(u);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x);
}
static double ref_sig(double x) { return 1.0 / (1.0 + exp(-x)); }
static void ref_act_fwd(int kind, double *a, const double *h, int N, int F) {
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) {
            if (kind == ACT_KIND_GELU) a[(size_t)n * F + f] = ref_gelu(h[(size_t)n * F + f]);
            else {
                double x1 = h[(size_t)n * 2 * F + f], x3 = h[(size_t)n * 2 * F + F + f];
                a[(size_t)n * F + f] = x1 * ref_sig(x1) * x3;
            }
        }
}
static void ref_act_bwd(int kind, double *dh, const double *da, const double *h, int N, int F) {
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) {
            double g = da[(size_t)n * F + f];
            if (kind == ACT_KIND_GELU) dh[(size_t)n * F + f] = g * ref_gelu_grad(h[(size_t)n * F + f]);
            else {
                double x1 = h[(size_t)n * 2 * F + f], x3 = h[(size_t)n * 2 * F + F + f], s = ref_sig(x1);
                dh[(size_t)n * 2 * F + f] = g * x3 * (s + x1 * s * (1.0 - s));
                dh[(size_t)n * 2 * F + F + f] = g * x1 * s;
            }
        }
}

/* cross-entropy: loss[n] = logsumexp(row) - row[y] (0 where y < 0); the backward overwrites */
static void ref_xent_fwd(double *loss, const double *logits, const int32_t *y, int N, int V) {
    for (int n = 0; n < N; n++) {
        const double *r = logits + (size_t)n * V;
        if (y[n] < 0) { loss[n] = 0; continue; }
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < V; j++) if (r[j] > mx) mx = r[j];
        for (int j = 0; j < V; j++) s += exp(r[j] - mx);
        loss[n] = log(s) + mx - r[y[n]];
    }
}
static void ref_xent_bwd(double *dl, const double *logits, const int32_t *y, double scale, int N, int V) {
    for (int n = 0; n < N; n++) {
        const double *r = logits + (size_t)n * V;
        double *d = dl + (size_t)n * V;
        if (y[n] < 0) { for (int j = 0; j < V; j++) d[j] = 0; continue; }
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < V; j++) if (r[j] > mx) mx = r[j];
        for (int j = 0; j < V; j++) s += exp(r[j] - mx);
        for (int j = 0; j < V; j++) d[j] = (exp(r[j] - mx) / s - (j == y[n])) * scale;
    }
}

/* pooling over the first len[b] positions: mean, or the last one */
static void ref_pool_fwd(int kind, double *out, const double *x, const int32_t *len, int B, int T, int D) {
    for (int b = 0; b < B; b++)
        for (int d = 0; d < D; d++) {
            int L = len[b];
            double s = 0;
            if (kind == POOL_KIND_LAST) s = x[((size_t)b * T + L - 1) * D + d];
            else { for (int t = 0; t < L; t++) s += x[((size_t)b * T + t) * D + d]; s /= L; }
            out[(size_t)b * D + d] = s;
        }
}
static void ref_pool_bwd(int kind, double *dx, const double *dout, const int32_t *len, int B, int T, int D) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) {
                int L = len[b];
                double g = dout[(size_t)b * D + d];
                if (kind == POOL_KIND_LAST) { if (t == L - 1) dx[((size_t)b * T + t) * D + d] += g; }
                else if (t < L) dx[((size_t)b * T + t) * D + d] += g / L;
            }
}

/* central finite differences of loss(u) with respect to x[n] against grad[n] */
typedef double (*LossFn)(void *u);
static void fd_check(Check *c, const char *what, LossFn f, void *u, double *x, const double *grad, size_t n) {
    double *fd = dalloc(n);
    for (size_t i = 0; i < n; i++) {
        double x0 = x[i], h = 1e-5 * (fabs(x0) > 1 ? fabs(x0) : 1);
        x[i] = x0 + h;
        double lp = f(u);
        x[i] = x0 - h;
        double lm = f(u);
        x[i] = x0;
        fd[i] = (lp - lm) / (2 * h);
    }
    char buf[128];
    snprintf(buf, sizeof buf, "reference backward vs finite differences: %s", what);
    cmp_dd(c, buf, fd, grad, n, 1e-6, 1e-6);
    xfree(fd);
}
static double wdot(const double *w, const double *y, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += w[i] * y[i];
    return s;
}

/* ---------------------------------------------------------------------------------------
 * memory slots */

static const size_t BYTE_SIZES[] = {0, 1, 3, 4, 17, 256, 4099 * 4 + 3};

static unsigned char *rand_bytes(Check *c, size_t n) {
    unsigned char *h = xmalloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)rng_below(&c->rng, 256);
    return h;
}
static int bytes_equal(Check *c, const char *what, const unsigned char *got, const unsigned char *want, size_t n) {
    /* a byte buffer seen as floats where it can be, so planting and reporting are shared */
    unsigned char *g = xmalloc(n ? n : 1);
    memcpy(g, got, n);
    if (planting(c) && n) g[n / 2] ^= 1;
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) if (g[i] != want[i]) { if (!bad) first = i; bad++; }
    if (bad) note(c, "%s: %s: first differing byte %zu: got 0x%02x want 0x%02x", c->op, what, first, g[first], want[first]);
    report(c, bad == 0, "%s: %s: %zu/%zu bytes differ", c->op, what, bad, n);
    xfree(g);
    return bad == 0;
}

static void check_alloc(Check *c) {
    const Backend *be = c->be;
    static const size_t sizes[] = {0, 1, 3, 64, 4096, 1 << 20};
    for (size_t k = 0; k < COUNT(sizes); k++) {
        size_t n = sizes[k];
        unsigned char *d = be->ops->alloc(be->ctx, n);
        report(c, d != NULL && ((uintptr_t)d % 16) == 0, "alloc: %zu bytes: a 16-byte aligned pointer (%p)", n, (void *)d);
        unsigned char *h = rand_bytes(c, n), *z = xcalloc(n);
        be->ops->to_host(be->ctx, h, d, n);
        char what[64];
        snprintf(what, sizeof what, "alloc(%zu) is zeroed", n);
        bytes_equal(c, what, h, z, n);
        be->ops->free(be->ctx, d);
        xfree(h);
        xfree(z);
    }
}

/* many buffers of random sizes, freed in a shuffled order while the others must keep their data */
static void check_free(Check *c) {
    const Backend *be = c->be;
    enum { NB = 24 };
    unsigned char *d[NB], *h[NB];
    size_t n[NB];
    for (int i = 0; i < NB; i++) {
        n[i] = (size_t)rng_below(&c->rng, 5000);
        h[i] = rand_bytes(c, n[i]);
        d[i] = be->ops->alloc(be->ctx, n[i]);
        if (n[i]) be->ops->from_host(be->ctx, d[i], h[i], n[i]);
    }
    int order[NB];
    for (int i = 0; i < NB; i++) order[i] = i;
    for (int i = NB - 1; i > 0; i--) { int j = (int)rng_below(&c->rng, (uint64_t)i + 1), t = order[i]; order[i] = order[j]; order[j] = t; }
    size_t bad = 0, checked = 0;
    unsigned char *tmp = xmalloc(5000);
    for (int k = 0; k < NB; k++) {
        be->ops->free(be->ctx, d[order[k]]);
        d[order[k]] = NULL;
        /* reallocate some memory in between: it must not alias a live buffer */
        unsigned char *x = be->ops->alloc(be->ctx, 777);
        unsigned char ff[777];
        memset(ff, 0xEE, sizeof ff);
        be->ops->from_host(be->ctx, x, ff, sizeof ff);
        for (int i = 0; i < NB; i++)
            if (d[i] && n[i]) {
                be->ops->to_host(be->ctx, tmp, d[i], n[i]);
                checked++;
                if (memcmp(tmp, h[i], n[i]) != 0) bad++;
            }
        be->ops->free(be->ctx, x);
    }
    unsigned char one = bad ? 1 : 0, zero = 0;
    char what[96];
    snprintf(what, sizeof what, "live buffers keep their bytes across %d frees (%zu reads)", NB, checked);
    bytes_equal(c, what, &one, &zero, 1);
    for (int i = 0; i < NB; i++) xfree(h[i]);
    xfree(tmp);
}

/* from_host into a sub-range of a zeroed buffer: exactly that range changes */
static void check_from_host(Check *c) {
    const Backend *be = c->be;
    for (size_t k = 0; k < COUNT(BYTE_SIZES); k++) {
        size_t n = BYTE_SIZES[k], off = (size_t)rng_below(&c->rng, 9), total = n + off + 5;
        unsigned char *src = rand_bytes(c, n), *want = xcalloc(total), *got = xmalloc(total);
        memcpy(want + off, src, n);
        unsigned char *d = be->ops->alloc(be->ctx, total);
        be->ops->from_host(be->ctx, d + off, src, n);
        be->ops->to_host(be->ctx, got, d, total);
        char what[64];
        snprintf(what, sizeof what, "%zu bytes at offset %zu", n, off);
        bytes_equal(c, what, got, want, total);
        be->ops->free(be->ctx, d);
        xfree(src); xfree(want); xfree(got);
    }
}

/* to_host of a sub-range into a host buffer with guards: exactly that range is written */
static void check_to_host(Check *c) {
    const Backend *be = c->be;
    for (size_t k = 0; k < COUNT(BYTE_SIZES); k++) {
        size_t n = BYTE_SIZES[k], off = (size_t)rng_below(&c->rng, 9), total = n + off + 5;
        unsigned char *src = rand_bytes(c, total), *want = xmalloc(n + 32), *got = xmalloc(n + 32);
        memset(want, 0x3C, n + 32);
        memcpy(want + 16, src + off, n);
        memset(got, 0x3C, n + 32);
        unsigned char *d = be->ops->alloc(be->ctx, total);
        be->ops->from_host(be->ctx, d, src, total);
        be->ops->to_host(be->ctx, got + 16, d + off, n);
        char what[64];
        snprintf(what, sizeof what, "%zu bytes from offset %zu (guards kept)", n, off);
        bytes_equal(c, what, got, want, n + 32);
        be->ops->free(be->ctx, d);
        xfree(src); xfree(want); xfree(got);
    }
}

static void check_copy(Check *c) {
    const Backend *be = c->be;
    for (size_t k = 0; k < COUNT(BYTE_SIZES); k++) {
        size_t n = BYTE_SIZES[k], os = (size_t)rng_below(&c->rng, 9), od = (size_t)rng_below(&c->rng, 9);
        size_t ts = n + os + 3, td = n + od + 7;
        unsigned char *hs = rand_bytes(c, ts), *hd = rand_bytes(c, td), *got = xmalloc(td);
        unsigned char *ds = be->ops->alloc(be->ctx, ts), *dd = be->ops->alloc(be->ctx, td);
        be->ops->from_host(be->ctx, ds, hs, ts);
        be->ops->from_host(be->ctx, dd, hd, td);
        be->ops->copy(be->ctx, dd + od, ds + os, n);
        memcpy(hd + od, hs + os, n);
        be->ops->to_host(be->ctx, got, dd, td);
        char what[80];
        snprintf(what, sizeof what, "%zu bytes, source offset %zu, destination offset %zu", n, os, od);
        bytes_equal(c, what, got, hd, td);
        be->ops->to_host(be->ctx, got, ds, ts);
        snprintf(what, sizeof what, "%zu bytes: the source is unchanged", n);
        bytes_equal(c, what, got, hs, ts);
        be->ops->free(be->ctx, ds);
        be->ops->free(be->ctx, dd);
        xfree(hs); xfree(hd); xfree(got);
    }
}

static void check_zero(Check *c) {
    const Backend *be = c->be;
    for (size_t k = 0; k < COUNT(BYTE_SIZES); k++) {
        size_t n = BYTE_SIZES[k], off = (size_t)rng_below(&c->rng, 9), total = n + off + 5;
        unsigned char *h = rand_bytes(c, total), *got = xmalloc(total);
        unsigned char *d = be->ops->alloc(be->ctx, total);
        be->ops->from_host(be->ctx, d, h, total);
        be->ops->zero(be->ctx, d + off, n);
        memset(h + off, 0, n);
        be->ops->to_host(be->ctx, got, d, total);
        char what[64];
        snprintf(what, sizeof what, "%zu bytes at offset %zu", n, off);
        bytes_equal(c, what, got, h, total);
        be->ops->free(be->ctx, d);
        xfree(h); xfree(got);
    }
}

/* a chain of queued device work, then sync, then the result */
static void check_sync(Check *c) {
    const Backend *be = c->be;
    size_t n = 100003;
    float *x = randn(c, n, 0, 1), *y = randn(c, n, 0, 1);
    float *dx = be->ops->alloc(be->ctx, F4(n)), *dy = be->ops->alloc(be->ctx, F4(n));
    be->ops->from_host(be->ctx, dx, x, F4(n));
    be->ops->from_host(be->ctx, dy, y, F4(n));
    for (int r = 0; r < 8; r++) {
        be->ops->axpy(be->ctx, dy, dx, 0.5f, n);
        for (size_t i = 0; i < n; i++) y[i] += 0.5f * x[i];
    }
    be->ops->sync(be->ctx);
    be->ops->sync(be->ctx);     /* twice is fine */
    float *got = falloc(n);
    be->ops->to_host(be->ctx, got, dy, F4(n));
    cmp_exact(c, "8 queued axpy then sync", got, y, n);
    be->ops->free(be->ctx, dx);
    be->ops->free(be->ctx, dy);
    xfree(x); xfree(y); xfree(got);
}

/* a second instance of the backend: used, then destroyed through backend_free; the first one
 * must still work afterwards */
static Status init_kind(Backend *be, int kind) {
    return kind == BACKEND_CUDA ? backend_cuda_init(be, 0) : backend_cpu_init(be, 1);
}
static void check_destroy(Check *c) {
    Backend b2;
    Status st = init_kind(&b2, c->be->kind);
    report(c, STATUS_OK(st), "destroy: a second %s backend starts (%s)", c->be->ops->name, st.msg);
    if (!STATUS_OK(st)) return;
    size_t n = 1000;
    float *x = randn(c, n, 0, 1), *want = fdup(x, n), *got = falloc(n);
    for (size_t i = 0; i < n; i++) want[i] *= 3.0f;
    float *d = b2.ops->alloc(b2.ctx, F4(n));
    b2.ops->from_host(b2.ctx, d, x, F4(n));
    b2.ops->scale(b2.ctx, d, 3.0f, n);
    b2.ops->to_host(b2.ctx, got, d, F4(n));
    b2.ops->free(b2.ctx, d);
    cmp_exact(c, "the second instance computes", got, want, n);
    backend_free(&b2);
    backend_free(&b2);          /* safe twice */
    const Backend *be = c->be;
    d = be->ops->alloc(be->ctx, F4(n));
    be->ops->from_host(be->ctx, d, x, F4(n));
    be->ops->scale(be->ctx, d, 3.0f, n);
    be->ops->to_host(be->ctx, got, d, F4(n));
    be->ops->free(be->ctx, d);
    cmp_exact(c, "the first instance still computes after the second is destroyed", got, want, n);
    xfree(x); xfree(want); xfree(got);
}

/* ---------------------------------------------------------------------------------------
 * gemm */
static void run_gemm(Check *c, const Backend *be, bool ta, bool tb, int M, int N, int K, float alpha, const float *A,
                     int lda, size_t na, const float *B, int ldb, size_t nb, float beta, float *C, int ldc, size_t nc) {
    Arena a = {be, 0, {{0}}};
    float *dc = a_io(&a, C, F4(nc));
    be->ops->gemm(be->ctx, ta, tb, M, N, K, alpha, a_in(&a, A, F4(na)), lda, a_in(&a, B, F4(nb)), ldb, beta, dc, ldc);
    a_finish(c, &a);
}

static void check_gemm(Check *c) {
    static const int shapes[][3] = {{0, 3, 5}, {3, 0, 5}, {4, 3, 0}, {1, 1, 1}, {3, 17, 5}, {17, 64, 67}, {64, 33, 32}, {5, 1, 67}};
    static const float betas[] = {0.0f, 0.25f, 1.0f};
    for (size_t s = 0; s < COUNT(shapes); s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (size_t bi = 0; bi < COUNT(betas); bi++) {
                    int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                    float alpha = bi == 1 ? -0.7f : 1.0f, beta = betas[bi];
                    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
                    int lda = ac + 3, ldb = bc + 2, ldc = N + 1;
                    size_t na = (size_t)ar * lda, nb = (size_t)br * ldb, nc = (size_t)M * ldc;
                    float *A = randn(c, na, 0, 1), *B = randn(c, nb, 0, 1), *C0 = randn(c, nc, 0, 1);
                    double *want = dalloc((size_t)M * N), *bound = dalloc((size_t)M * N);
                    for (int i = 0; i < M; i++)
                        for (int j = 0; j < N; j++) {
                            double acc = 0, mag = 0;
                            for (int k = 0; k < K; k++) {
                                double av = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                                double bv = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                                acc += av * bv;
                                mag += fabs(av * bv);
                            }
                            double cv = C0[(size_t)i * ldc + j];
                            want[(size_t)i * N + j] = alpha * acc + (beta != 0 ? beta * cv : 0);
                            bound[(size_t)i * N + j] = gam(K + 2) * (fabs(alpha) * mag + fabs(beta * cv)) + 1e-30;
                        }
                    float *C1 = fdup(C0, nc), *C2 = fdup(C0, nc);
                    run_gemm(c, c->be, ta, tb, M, N, K, alpha, A, lda, na, B, ldb, nb, beta, C1, ldc, nc);
                    run_gemm(c, c->be, ta, tb, M, N, K, alpha, A, lda, na, B, ldb, nb, beta, C2, ldc, nc);
                    float *got = falloc((size_t)M * N), *pad = falloc(M), *pad0 = falloc(M);
                    for (int i = 0; i < M; i++) {
                        memcpy(got + (size_t)i * N, C1 + (size_t)i * ldc, F4(N));
                        pad[i] = C1[(size_t)i * ldc + N];
                        pad0[i] = C0[(size_t)i * ldc + N];
                    }
                    char what[96];
                    snprintf(what, sizeof what, "M=%d N=%d K=%d trans_a=%d trans_b=%d alpha=%g beta=%g", M, N, K, ta, tb,
                             (double)alpha, (double)beta);
                    cmp_tol(c, what, got, want, bound, (size_t)M * N, 0, 0);
                    snprintf(what, sizeof what, "M=%d N=%d K=%d: the ldc padding column is untouched", M, N, K);
                    cmp_exact(c, what, pad, pad0, M);
                    same_bits(c, "C", C1, C2, F4(nc));
                    if (!c->is_cpu) {
                        float *C3 = fdup(C0, nc);
                        run_gemm(c, c->cpu, ta, tb, M, N, K, alpha, A, lda, na, B, ldb, nb, beta, C3, ldc, nc);
                        vs_cpu(c, what, C1, C3, nc);
                        xfree(C3);
                    }
                    xfree(A); xfree(B); xfree(C0); xfree(C1); xfree(C2); xfree(got); xfree(pad); xfree(pad0);
                    xfree(want); xfree(bound);
                }
}

/* ---------------------------------------------------------------------------------------
 * embedding */
static const int EMB_B[] = {0, 1, 3}, EMB_T[] = {1, 5, 17};

static void run_embed_fwd(Check *c, const Backend *be, float *out, const int32_t *tok, const float *wte, const float *wpe,
                          int B, int T, int D, int V) {
    Arena a = {be, 0, {{0}}};
    float *d = a_out(&a, out, F4((size_t)B * T * D));
    be->ops->embed_forward(be->ctx, d, a_in(&a, tok, I4((size_t)B * T)), a_in(&a, wte, F4((size_t)V * D)),
                           a_in(&a, wpe, F4((size_t)T * D)), B, T, D);
    a_finish(c, &a);
}
static void check_embed_forward(Check *c) {
    for (size_t bi = 0; bi < COUNT(EMB_B); bi++)
        for (size_t ti = 0; ti < COUNT(EMB_T); ti++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++) {
                int B = EMB_B[bi], T = EMB_T[ti], D = SIZES_D[di], V = 7;
                size_t n = (size_t)B * T * D;
                int32_t *tok = randi(c, (size_t)B * T, 0, V);
                float *wte = randn(c, (size_t)V * D, 0, 1), *wpe = randn(c, (size_t)T * D, 0, 1);
                float *want = falloc(n), *g1 = falloc(n), *g2 = falloc(n);
                for (int b = 0; b < B; b++)
                    for (int t = 0; t < T; t++)
                        for (int d = 0; d < D; d++)
                            want[((size_t)b * T + t) * D + d] = wte[(size_t)tok[b * T + t] * D + d] + wpe[(size_t)t * D + d];
                run_embed_fwd(c, c->be, g1, tok, wte, wpe, B, T, D, V);
                run_embed_fwd(c, c->be, g2, tok, wte, wpe, B, T, D, V);
                char what[64];
                snprintf(what, sizeof what, "B=%d T=%d D=%d", B, T, D);
                cmp_exact(c, what, g1, want, n);
                same_bits(c, "out", g1, g2, F4(n));
                xfree(tok); xfree(wte); xfree(wpe); xfree(want); xfree(g1); xfree(g2);
            }
}

static void run_embed_bwd(Check *c, const Backend *be, float *dwte, float *dwpe, const float *dout, const int32_t *tok,
                          int B, int T, int D, int V) {
    Arena a = {be, 0, {{0}}};
    float *dw = a_io(&a, dwte, F4((size_t)V * D)), *dp = a_io(&a, dwpe, F4((size_t)T * D));
    be->ops->embed_backward(be->ctx, dw, dp, a_in(&a, dout, F4((size_t)B * T * D)), a_in(&a, tok, I4((size_t)B * T)), B, T, D);
    a_finish(c, &a);
}
static void check_embed_backward(Check *c) {
    static const int vocab[] = {3, 50};
    for (size_t bi = 0; bi < COUNT(EMB_B); bi++)
        for (size_t ti = 0; ti < COUNT(EMB_T); ti++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++)
                for (size_t vi = 0; vi < COUNT(vocab); vi++) {
                    int B = EMB_B[bi], T = EMB_T[ti], D = SIZES_D[di], V = vocab[vi];
                    size_t nw = (size_t)V * D, np = (size_t)T * D;
                    int32_t *tok = randi(c, (size_t)B * T, 0, V);
                    float *dout = randn(c, (size_t)B * T * D, 0, 1), *w0 = randn(c, nw, 0, 1), *p0 = randn(c, np, 0, 1);
                    double *ww = to_d(w0, nw), *wp = to_d(p0, np), *bw = dalloc(nw), *bp = dalloc(np);
                    int *cw = xcalloc(sizeof(int) * nw), *cp = xcalloc(sizeof(int) * np);
                    for (size_t i = 0; i < nw; i++) bw[i] = fabs(ww[i]);
                    for (size_t i = 0; i < np; i++) bp[i] = fabs(wp[i]);
                    for (int b = 0; b < B; b++)
                        for (int t = 0; t < T; t++)
                            for (int d = 0; d < D; d++) {
                                double g = dout[((size_t)b * T + t) * D + d];
                                size_t iw = (size_t)tok[b * T + t] * D + d, ip = (size_t)t * D + d;
                                ww[iw] += g; bw[iw] += fabs(g); cw[iw]++;
                                wp[ip] += g; bp[ip] += fabs(g); cp[ip]++;
                            }
                    for (size_t i = 0; i < nw; i++) bw[i] *= gam(cw[i]);
                    for (size_t i = 0; i < np; i++) bp[i] *= gam(cp[i]);
                    float *w1 = fdup(w0, nw), *p1 = fdup(p0, np), *w2 = fdup(w0, nw), *p2 = fdup(p0, np);
                    run_embed_bwd(c, c->be, w1, p1, dout, tok, B, T, D, V);
                    run_embed_bwd(c, c->be, w2, p2, dout, tok, B, T, D, V);
                    char what[80];
                    snprintf(what, sizeof what, "B=%d T=%d D=%d V=%d dwte", B, T, D, V);
                    cmp_tol(c, what, w1, ww, bw, nw, 0, 0);
                    if (!c->is_cpu) {
                        float *w3 = fdup(w0, nw), *p3 = fdup(p0, np);
                        run_embed_bwd(c, c->cpu, w3, p3, dout, tok, B, T, D, V);
                        vs_cpu(c, what, w1, w3, nw);
                        vs_cpu(c, "dwpe", p1, p3, np);
                        xfree(w3); xfree(p3);
                    }
                    snprintf(what, sizeof what, "B=%d T=%d D=%d V=%d dwpe", B, T, D, V);
                    cmp_tol(c, what, p1, wp, bp, np, 0, 0);
                    same_bits(c, "dwte", w1, w2, F4(nw));
                    same_bits(c, "dwpe", p1, p2, F4(np));
                    xfree(tok); xfree(dout); xfree(w0); xfree(p0); xfree(ww); xfree(wp); xfree(bw); xfree(bp);
                    xfree(cw); xfree(cp); xfree(w1); xfree(p1); xfree(w2); xfree(p2);
                }
}

/* ---------------------------------------------------------------------------------------
 * layernorm */
static void run_ln_fwd(Check *c, const Backend *be, float *out, float *mean, float *rstd, const float *x, const float *w,
                       const float *b, int N, int D) {
    Arena a = {be, 0, {{0}}};
    size_t n = (size_t)N * D;
    float *o = a_out(&a, out, F4(n)), *m = a_out(&a, mean, F4(N)), *r = a_out(&a, rstd, F4(N));
    be->ops->layernorm_forward(be->ctx, o, m, r, a_in(&a, x, F4(n)), a_in(&a, w, F4(D)), a_in(&a, b, F4(D)), N, D);
    a_finish(c, &a);
}
static void check_layernorm_forward(Check *c) {
    for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
        for (size_t di = 0; di < COUNT(SIZES_D); di++) {
            int N = SIZES_N[ni], D = SIZES_D[di];
            size_t n = (size_t)N * D;
            float *x = randn(c, n, 0.5f, 1), *w = randn(c, D, 1, 0.3f), *b = randn(c, D, 0, 0.3f);
            double *xd = to_d(x, n), *wd = to_d(w, D), *bd = to_d(b, D);
            double *out = dalloc(n), *mean = dalloc(N), *rstd = dalloc(N), *bo = dalloc(n), *bm = dalloc(N);
            ref_ln_fwd(out, mean, rstd, xd, wd, bd, N, D);
            for (int r = 0; r < N; r++) {
                double mabs = 0;
                for (int d = 0; d < D; d++) mabs += fabs(xd[(size_t)r * D + d]);
                bm[r] = gam(D) * mabs / D + 1e-30;
                for (int d = 0; d < D; d++) {
                    double xhat = (xd[(size_t)r * D + d] - mean[r]) * rstd[r];
                    bo[(size_t)r * D + d] = 8.0 * (D + 4) * U32 * (1 + fabs(wd[d] * xhat) + fabs(bd[d]));
                }
            }
            float *o1 = falloc(n), *m1 = falloc(N), *r1 = falloc(N), *o2 = falloc(n), *m2 = falloc(N), *r2 = falloc(N);
            run_ln_fwd(c, c->be, o1, m1, r1, x, w, b, N, D);
            run_ln_fwd(c, c->be, o2, m2, r2, x, w, b, N, D);
            char what[64];
            snprintf(what, sizeof what, "N=%d D=%d out", N, D);
            cmp_tol(c, what, o1, out, bo, n, 0, 0);
            if (!c->is_cpu) {
                float *o3 = falloc(n), *m3 = falloc(N), *r3 = falloc(N);
                run_ln_fwd(c, c->cpu, o3, m3, r3, x, w, b, N, D);
                vs_cpu(c, what, o1, o3, n);
                xfree(o3); xfree(m3); xfree(r3);
            }
            snprintf(what, sizeof what, "N=%d D=%d mean", N, D);
            cmp_tol(c, what, m1, mean, bm, N, 0, 0);
            snprintf(what, sizeof what, "N=%d D=%d rstd", N, D);
            cmp_tol(c, what, r1, rstd, NULL, N, 0, 4.0 * (D + 4) * U32);
            same_bits(c, "out", o1, o2, F4(n));
            same_bits(c, "mean", m1, m2, F4(N));
            same_bits(c, "rstd", r1, r2, F4(N));
            xfree(x); xfree(w); xfree(b); xfree(xd); xfree(wd); xfree(bd); xfree(out); xfree(mean); xfree(rstd);
            xfree(bo); xfree(bm); xfree(o1); xfree(m1); xfree(r1); xfree(o2); xfree(m2); xfree(r2);
        }
}

typedef struct LnFd { double *x, *w, *b, *dout, *out, *mean, *rstd; int N, D; } LnFd;
static double ln_loss(void *u) {
    LnFd *f = u;
    ref_ln_fwd(f->out, f->mean, f->rstd, f->x, f->w, f->b, f->N, f->D);
    return wdot(f->dout, f->out, (size_t)f->N * f->D);
}
static void fd_layernorm(Check *c) {
    int N = 3, D = 7;
    size_t n = (size_t)N * D;
    LnFd f = {dalloc(n), dalloc(D), dalloc(D), dalloc(n), dalloc(n), dalloc(N), dalloc(N), N, D};
    for (size_t i = 0; i < n; i++) { f.x[i] = 0.5 + rng_normal(&c->rng); f.dout[i] = rng_normal(&c->rng); }
    for (int d = 0; d < D; d++) { f.w[d] = 1 + 0.3 * rng_normal(&c->rng); f.b[d] = 0.3 * rng_normal(&c->rng); }
    ref_ln_fwd(f.out, f.mean, f.rstd, f.x, f.w, f.b, N, D);
    double *dx = dalloc(n), *dw = dalloc(D), *db = dalloc(D), *mean = dalloc(N), *rstd = dalloc(N);
    memcpy(mean, f.mean, sizeof(double) * N);
    memcpy(rstd, f.rstd, sizeof(double) * N);
    ref_ln_bwd(dx, dw, db, f.dout, f.x, f.w, mean, rstd, N, D);
    fd_check(c, "layernorm dx", ln_loss, &f, f.x, dx, n);
    fd_check(c, "layernorm dw", ln_loss, &f, f.w, dw, D);
    fd_check(c, "layernorm db", ln_loss, &f, f.b, db, D);
    xfree(f.x); xfree(f.w); xfree(f.b); xfree(f.dout); xfree(f.out); xfree(f.mean); xfree(f.rstd);
    xfree(dx); xfree(dw); xfree(db); xfree(mean); xfree(rstd);
}

static void run_ln_bwd(Check *c, const Backend *be, float *dx, float *dw, float *db, const float *dout, const float *x,
                       const float *w, const float *mean, const float *rstd, int N, int D) {
    Arena a = {be, 0, {{0}}};
    size_t n = (size_t)N * D;
    float *ddx = a_io(&a, dx, F4(n)), *ddw = a_io(&a, dw, F4(D)), *ddb = a_io(&a, db, F4(D));
    be->ops->layernorm_backward(be->ctx, ddx, ddw, ddb, a_in(&a, dout, F4(n)), a_in(&a, x, F4(n)), a_in(&a, w, F4(D)),
                                a_in(&a, mean, F4(N)), a_in(&a, rstd, F4(N)), N, D);
    a_finish(c, &a);
}
static void check_layernorm_backward(Check *c) {
    fd_layernorm(c);
    for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
        for (size_t di = 0; di < COUNT(SIZES_D); di++) {
            int N = SIZES_N[ni], D = SIZES_D[di];
            size_t n = (size_t)N * D;
            float *x = randn(c, n, 0.5f, 1), *w = randn(c, D, 1, 0.3f), *b = randn(c, D, 0, 0.3f), *g = randn(c, n, 0, 1);
            float *dx0 = randn(c, n, 0, 1), *dw0 = randn(c, D, 0, 1), *db0 = randn(c, D, 0, 1);
            double *xd = to_d(x, n), *wd = to_d(w, D), *bd = to_d(b, D), *gd = to_d(g, n);
            double *out = dalloc(n), *md = dalloc(N), *rd = dalloc(N);
            ref_ln_fwd(out, md, rd, xd, wd, bd, N, D);
            float *mean = to_f(md, N), *rstd = to_f(rd, N);
            double *mean_d = to_d(mean, N), *rstd_d = to_d(rstd, N);
            double *dx = to_d(dx0, n), *dw = to_d(dw0, D), *db = to_d(db0, D);
            ref_ln_bwd(dx, dw, db, gd, xd, wd, mean_d, rstd_d, N, D);
            double *bx = dalloc(n), *bw = dalloc(D), *bb = dalloc(D);
            for (int d = 0; d < D; d++) { bw[d] = fabs(dw0[d]); bb[d] = fabs(db0[d]); }
            for (int r = 0; r < N; r++) {
                double s = rstd_d[r], m1 = 0, m2 = 0;
                for (int d = 0; d < D; d++) {
                    size_t i = (size_t)r * D + d;
                    double xhat = (xd[i] - mean_d[r]) * s;
                    m1 += fabs(wd[d] * gd[i]);
                    m2 += fabs(wd[d] * gd[i] * xhat);
                    bw[d] += fabs(xhat * gd[i]);
                    bb[d] += fabs(gd[i]);
                }
                m1 /= D;
                m2 /= D;
                for (int d = 0; d < D; d++) {
                    size_t i = (size_t)r * D + d;
                    double xhat = (xd[i] - mean_d[r]) * s;
                    bx[i] = 8.0 * (D + 4) * U32 * s * (fabs(wd[d] * gd[i]) + m1 + fabs(xhat) * m2) + 2 * U32 * fabs(dx0[i]);
                }
            }
            for (int d = 0; d < D; d++) { bw[d] *= gam(N + 4); bb[d] *= gam(N + 4); }
            float *x1 = fdup(dx0, n), *w1 = fdup(dw0, D), *b1 = fdup(db0, D), *x2 = fdup(dx0, n), *w2 = fdup(dw0, D), *b2 = fdup(db0, D);
            run_ln_bwd(c, c->be, x1, w1, b1, g, x, w, mean, rstd, N, D);
            run_ln_bwd(c, c->be, x2, w2, b2, g, x, w, mean, rstd, N, D);
            char what[64];
            snprintf(what, sizeof what, "N=%d D=%d dx", N, D);
            cmp_tol(c, what, x1, dx, bx, n, 0, 0);
            if (!c->is_cpu) {
                float *x3 = fdup(dx0, n), *w3 = fdup(dw0, D), *b3 = fdup(db0, D);
                run_ln_bwd(c, c->cpu, x3, w3, b3, g, x, w, mean, rstd, N, D);
                vs_cpu(c, what, x1, x3, n);
                vs_cpu(c, "dw", w1, w3, D);
                vs_cpu(c, "db", b1, b3, D);
                xfree(x3); xfree(w3); xfree(b3);
            }
            snprintf(what, sizeof what, "N=%d D=%d dw", N, D);
            cmp_tol(c, what, w1, dw, bw, D, 0, 0);
            snprintf(what, sizeof what, "N=%d D=%d db", N, D);
            cmp_tol(c, what, b1, db, bb, D, 0, 0);
            same_bits(c, "dx", x1, x2, F4(n));
            same_bits(c, "dw", w1, w2, F4(D));
            same_bits(c, "db", b1, b2, F4(D));
            xfree(x); xfree(w); xfree(b); xfree(g); xfree(dx0); xfree(dw0); xfree(db0); xfree(xd); xfree(wd); xfree(bd);
            xfree(gd); xfree(out); xfree(md); xfree(rd); xfree(mean); xfree(rstd); xfree(mean_d); xfree(rstd_d);
            xfree(dx); xfree(dw); xfree(db); xfree(bx); xfree(bw); xfree(bb);
            xfree(x1); xfree(w1); xfree(b1); xfree(x2); xfree(w2); xfree(b2);
        }
}

/* ---------------------------------------------------------------------------------------
 * attention */
static const int ATT_SHAPES[][4] = {   /* B T D H */
    {0, 3, 4, 2}, {1, 0, 4, 1}, {1, 1, 4, 1}, {2, 5, 12, 3}, {1, 17, 32, 4}, {3, 9, 20, 5}, {1, 64, 16, 2}, {2, 7, 67, 1}};

static void run_attn_fwd(Check *c, const Backend *be, float *out, float *att, const float *qkv, int B, int T, int D, int H) {
    Arena a = {be, 0, {{0}}};
    float *o = a_out(&a, out, F4((size_t)B * T * D)), *p = a_out(&a, att, F4((size_t)B * H * T * T));
    be->ops->attention_forward(be->ctx, o, p, a_in(&a, qkv, F4((size_t)B * T * 3 * D)), B, T, D, H);
    a_finish(c, &a);
}
/* the lower triangle (t >= j) of att[B,H,T,T], the part the contract defines */
static size_t lower(const float *att, float *tri, int BH, int T) {
    size_t k = 0;
    for (int bh = 0; bh < BH; bh++)
        for (int t = 0; t < T; t++)
            for (int j = 0; j <= t; j++) tri[k++] = att[((size_t)bh * T + t) * T + j];
    return k;
}
static size_t lower_d(const double *att, double *tri, int BH, int T) {
    size_t k = 0;
    for (int bh = 0; bh < BH; bh++)
        for (int t = 0; t < T; t++)
            for (int j = 0; j <= t; j++) tri[k++] = att[((size_t)bh * T + t) * T + j];
    return k;
}
static void check_attention_forward(Check *c) {
    for (size_t s = 0; s < COUNT(ATT_SHAPES); s++) {
        int B = ATT_SHAPES[s][0], T = ATT_SHAPES[s][1], D = ATT_SHAPES[s][2], H = ATT_SHAPES[s][3];
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, na = (size_t)B * H * T * T;
        float *qkv = randn(c, nq, 0, 0.7f);
        double *qd = to_d(qkv, nq), *out = dalloc(no), *att = dalloc(na);
        ref_attn_fwd(out, att, qd, B, T, D, H);
        float *o1 = falloc(no), *p1 = falloc(na), *o2 = falloc(no), *p2 = falloc(na), *tri = falloc(na);
        double *trid = dalloc(na);
        run_attn_fwd(c, c->be, o1, p1, qkv, B, T, D, H);
        run_attn_fwd(c, c->be, o2, p2, qkv, B, T, D, H);
        char what[64];
        snprintf(what, sizeof what, "B=%d T=%d D=%d H=%d out", B, T, D, H);
        cmp_tol(c, what, o1, out, NULL, no, 1e-6, 1e-5);
        size_t nt = lower(p1, tri, B * H, T);
        lower_d(att, trid, B * H, T);
        snprintf(what, sizeof what, "B=%d T=%d D=%d H=%d att (lower triangle)", B, T, D, H);
        cmp_tol(c, what, tri, trid, NULL, nt, 1e-6, 1e-5);
        same_bits(c, "out", o1, o2, F4(no));
        lower(p2, tri + 0, B * H, T);
        float *tri1 = falloc(na);
        lower(p1, tri1, B * H, T);
        same_bits(c, "att", tri1, tri, F4(nt));
        if (!c->is_cpu) {
            float *o3 = falloc(no), *p3 = falloc(na);
            run_attn_fwd(c, c->cpu, o3, p3, qkv, B, T, D, H);
            vs_cpu(c, what, o1, o3, no);
            xfree(o3); xfree(p3);
        }
        xfree(qkv); xfree(qd); xfree(out); xfree(att); xfree(o1); xfree(p1); xfree(o2); xfree(p2); xfree(tri); xfree(tri1);
        xfree(trid);
    }
}

typedef struct AttFd { double *qkv, *dout, *out, *att; int B, T, D, H; } AttFd;
static double attn_loss(void *u) {
    AttFd *f = u;
    ref_attn_fwd(f->out, f->att, f->qkv, f->B, f->T, f->D, f->H);
    return wdot(f->dout, f->out, (size_t)f->B * f->T * f->D);
}
static void fd_attention(Check *c) {
    static const int shapes[][4] = {{1, 3, 4, 2}, {2, 4, 6, 3}};
    for (size_t s = 0; s < COUNT(shapes); s++) {
        int B = shapes[s][0], T = shapes[s][1], D = shapes[s][2], H = shapes[s][3];
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, na = (size_t)B * H * T * T;
        AttFd f = {dalloc(nq), dalloc(no), dalloc(no), dalloc(na), B, T, D, H};
        for (size_t i = 0; i < nq; i++) f.qkv[i] = 0.7 * rng_normal(&c->rng);
        for (size_t i = 0; i < no; i++) f.dout[i] = rng_normal(&c->rng);
        double *att = dalloc(na), *out = dalloc(no), *dq = dalloc(nq);
        ref_attn_fwd(out, att, f.qkv, B, T, D, H);
        ref_attn_bwd(dq, f.dout, f.qkv, att, B, T, D, H);
        char what[64];
        snprintf(what, sizeof what, "attention dqkv B=%d T=%d D=%d H=%d", B, T, D, H);
        fd_check(c, what, attn_loss, &f, f.qkv, dq, nq);
        xfree(f.qkv); xfree(f.dout); xfree(f.out); xfree(f.att); xfree(att); xfree(out); xfree(dq);
    }
}

static void run_attn_bwd(Check *c, const Backend *be, float *dqkv, const float *dout, const float *qkv, const float *att,
                         int B, int T, int D, int H) {
    Arena a = {be, 0, {{0}}};
    size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, na = (size_t)B * H * T * T;
    float *dq = a_io(&a, dqkv, F4(nq)), *scratch = a_scratch(&a, F4(na));
    be->ops->attention_backward(be->ctx, dq, scratch, a_in(&a, dout, F4(no)), a_in(&a, qkv, F4(nq)), a_in(&a, att, F4(na)),
                                B, T, D, H);
    a_finish(c, &a);
}
static void check_attention_backward(Check *c) {
    fd_attention(c);
    for (size_t s = 0; s < COUNT(ATT_SHAPES); s++) {
        int B = ATT_SHAPES[s][0], T = ATT_SHAPES[s][1], D = ATT_SHAPES[s][2], H = ATT_SHAPES[s][3];
        size_t nq = (size_t)B * T * 3 * D, no = (size_t)B * T * D, na = (size_t)B * H * T * T;
        float *qkv = randn(c, nq, 0, 0.7f), *dout = randn(c, no, 0, 1), *dq0 = randn(c, nq, 0, 1);
        double *qd = to_d(qkv, nq), *outd = dalloc(no), *attd = dalloc(na);
        ref_attn_fwd(outd, attd, qd, B, T, D, H);
        float *att = to_f(attd, na);        /* the saved probabilities, as a forward would leave them */
        double *att_d = to_d(att, na), *gd = to_d(dout, no), *dq = to_d(dq0, nq);
        ref_attn_bwd(dq, gd, qd, att_d, B, T, D, H);
        float *q1 = fdup(dq0, nq), *q2 = fdup(dq0, nq);
        run_attn_bwd(c, c->be, q1, dout, qkv, att, B, T, D, H);
        run_attn_bwd(c, c->be, q2, dout, qkv, att, B, T, D, H);
        char what[64];
        snprintf(what, sizeof what, "B=%d T=%d D=%d H=%d dqkv", B, T, D, H);
        cmp_tol(c, what, q1, dq, NULL, nq, 4e-6, 4e-5);
        same_bits(c, "dqkv", q1, q2, F4(nq));
        if (!c->is_cpu) {
            float *q3 = fdup(dq0, nq);
            run_attn_bwd(c, c->cpu, q3, dout, qkv, att, B, T, D, H);
            vs_cpu(c, what, q1, q3, nq);
            xfree(q3);
        }
        xfree(qkv); xfree(dout); xfree(dq0); xfree(qd); xfree(outd); xfree(attd); xfree(att); xfree(att_d); xfree(gd);
        xfree(dq); xfree(q1); xfree(q2);
    }
}

/* ---------------------------------------------------------------------------------------
 * activations */
static const char *act_name(int kind) { return kind == ACT_KIND_GELU ? "gelu" : "swiglu"; }

static void run_act_fwd(Check *c, const Backend *be, int kind, float *a_out_, const float *h, int N, int F) {
    Arena a = {be, 0, {{0}}};
    size_t nh = (size_t)N * F * (kind == ACT_KIND_SWIGLU ? 2 : 1);
    float *o = a_out(&a, a_out_, F4((size_t)N * F));
    be->ops->act_forward(be->ctx, kind, o, a_in(&a, h, F4(nh)), N, F);
    a_finish(c, &a);
}
static void check_act_forward(Check *c) {
    for (int kind = 0; kind < 2; kind++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++) {
                int N = SIZES_N[ni], F = SIZES_D[di];
                size_t na = (size_t)N * F, nh = na * (kind == ACT_KIND_SWIGLU ? 2 : 1);
                float *h = randn(c, nh, 0, 2);
                double *hd = to_d(h, nh), *want = dalloc(na);
                ref_act_fwd(kind, want, hd, N, F);
                float *a1 = falloc(na), *a2 = falloc(na);
                run_act_fwd(c, c->be, kind, a1, h, N, F);
                run_act_fwd(c, c->be, kind, a2, h, N, F);
                char what[64];
                snprintf(what, sizeof what, "%s N=%d F=%d", act_name(kind), N, F);
                cmp_tol(c, what, a1, want, NULL, na, 2e-7, 2e-6);
                same_bits(c, "a", a1, a2, F4(na));
                if (!c->is_cpu) {
                    float *a3 = falloc(na);
                    run_act_fwd(c, c->cpu, kind, a3, h, N, F);
                    vs_cpu(c, what, a1, a3, na);
                    xfree(a3);
                }
                xfree(h); xfree(hd); xfree(want); xfree(a1); xfree(a2);
            }
}

typedef struct ActFd { int kind; double *h, *da, *a; int N, F; } ActFd;
static double act_loss(void *u) {
    ActFd *f = u;
    ref_act_fwd(f->kind, f->a, f->h, f->N, f->F);
    return wdot(f->da, f->a, (size_t)f->N * f->F);
}
static void fd_act(Check *c) {
    for (int kind = 0; kind < 2; kind++) {
        int N = 3, F = 5;
        size_t na = (size_t)N * F, nh = na * (kind == ACT_KIND_SWIGLU ? 2 : 1);
        ActFd f = {kind, dalloc(nh), dalloc(na), dalloc(na), N, F};
        for (size_t i = 0; i < nh; i++) f.h[i] = 2 * rng_normal(&c->rng);
        for (size_t i = 0; i < na; i++) f.da[i] = rng_normal(&c->rng);
        double *dh = dalloc(nh);
        ref_act_bwd(kind, dh, f.da, f.h, N, F);
        fd_check(c, act_name(kind), act_loss, &f, f.h, dh, nh);
        xfree(f.h); xfree(f.da); xfree(f.a); xfree(dh);
    }
}

static void run_act_bwd(Check *c, const Backend *be, int kind, float *dh, const float *da, const float *h, int N, int F) {
    Arena a = {be, 0, {{0}}};
    size_t na = (size_t)N * F, nh = na * (kind == ACT_KIND_SWIGLU ? 2 : 1);
    float *o = a_out(&a, dh, F4(nh));
    be->ops->act_backward(be->ctx, kind, o, a_in(&a, da, F4(na)), a_in(&a, h, F4(nh)), N, F);
    a_finish(c, &a);
}
static void check_act_backward(Check *c) {
    fd_act(c);
    for (int kind = 0; kind < 2; kind++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++) {
                int N = SIZES_N[ni], F = SIZES_D[di];
                size_t na = (size_t)N * F, nh = na * (kind == ACT_KIND_SWIGLU ? 2 : 1);
                float *h = randn(c, nh, 0, 2), *da = randn(c, na, 0, 1);
                double *hd = to_d(h, nh), *dad = to_d(da, na), *want = dalloc(nh);
                ref_act_bwd(kind, want, dad, hd, N, F);
                float *d1 = falloc(nh), *d2 = falloc(nh);
                run_act_bwd(c, c->be, kind, d1, da, h, N, F);
                run_act_bwd(c, c->be, kind, d2, da, h, N, F);
                char what[64];
                snprintf(what, sizeof what, "%s N=%d F=%d dh", act_name(kind), N, F);
                cmp_tol(c, what, d1, want, NULL, nh, 5e-7, 5e-6);
                same_bits(c, "dh", d1, d2, F4(nh));
                if (!c->is_cpu) {
                    float *d3 = falloc(nh);
                    run_act_bwd(c, c->cpu, kind, d3, da, h, N, F);
                    vs_cpu(c, what, d1, d3, nh);
                    xfree(d3);
                }
                xfree(h); xfree(da); xfree(hd); xfree(dad); xfree(want); xfree(d1); xfree(d2);
            }
}

/* ---------------------------------------------------------------------------------------
 * vector helpers */
static const size_t VEC_SIZES[] = {0, 1, 3, 17, 64, 4099};

static void run_axpy(Check *c, const Backend *be, float *y, const float *x, float alpha, size_t n) {
    Arena a = {be, 0, {{0}}};
    float *dy = a_io(&a, y, F4(n));
    be->ops->axpy(be->ctx, dy, a_in(&a, x, F4(n)), alpha, n);
    a_finish(c, &a);
}
static void check_axpy(Check *c) {
    for (size_t k = 0; k < COUNT(VEC_SIZES); k++) {
        size_t n = VEC_SIZES[k];
        float alpha = rng_normal(&c->rng);
        float *x = randn(c, n, 0, 1), *y0 = randn(c, n, 0, 2), *want = fdup(y0, n);
        for (size_t i = 0; i < n; i++) want[i] = want[i] + alpha * x[i];
        float *y1 = fdup(y0, n), *y2 = fdup(y0, n);
        run_axpy(c, c->be, y1, x, alpha, n);
        run_axpy(c, c->be, y2, x, alpha, n);
        char what[48];
        snprintf(what, sizeof what, "n=%zu", n);
        cmp_exact(c, what, y1, want, n);
        same_bits(c, "y", y1, y2, F4(n));
        xfree(x); xfree(y0); xfree(want); xfree(y1); xfree(y2);
    }
}

static void run_scale(Check *c, const Backend *be, float *x, float alpha, size_t n) {
    Arena a = {be, 0, {{0}}};
    be->ops->scale(be->ctx, a_io(&a, x, F4(n)), alpha, n);
    a_finish(c, &a);
}
static void check_scale(Check *c) {
    for (size_t k = 0; k < COUNT(VEC_SIZES); k++) {
        size_t n = VEC_SIZES[k];
        float alpha = rng_normal(&c->rng);
        float *x0 = randn(c, n, 0, 1), *want = fdup(x0, n);
        for (size_t i = 0; i < n; i++) want[i] = want[i] * alpha;
        float *x1 = fdup(x0, n), *x2 = fdup(x0, n);
        run_scale(c, c->be, x1, alpha, n);
        run_scale(c, c->be, x2, alpha, n);
        char what[48];
        snprintf(what, sizeof what, "n=%zu", n);
        cmp_exact(c, what, x1, want, n);
        same_bits(c, "x", x1, x2, F4(n));
        xfree(x0); xfree(want); xfree(x1); xfree(x2);
    }
}

static double run_sumsq(Check *c, const Backend *be, const float *x, size_t n) {
    Arena a = {be, 0, {{0}}};
    double s = be->ops->sumsq(be->ctx, a_in(&a, x, F4(n)), n);
    a_finish(c, &a);
    return s;
}
static void check_sumsq(Check *c) {
    static const size_t sizes[] = {0, 1, 3, 17, 4099, 100003, 512 * 256 * 3 + 5};
    for (size_t k = 0; k < COUNT(sizes); k++) {
        size_t n = sizes[k];
        float *x = randn(c, n, 0, 3);
        long double ref = 0;
        for (size_t i = 0; i < n; i++) ref += (long double)x[i] * (long double)x[i];
        double want = (double)ref, bound = 1.1 * (double)(n + 2) * DBL_EPSILON / 2 * want;
        double s1 = run_sumsq(c, c->be, x, n), s2 = run_sumsq(c, c->be, x, n);
        if (planting(c)) s1 = want + 4 * bound + (want ? want * DBL_EPSILON : DBL_MIN);
        report(c, fabs(s1 - want) <= bound, "sumsq: n=%zu: %.17g vs reference %.17g (diff %.3g, tolerance %.3g)", n, s1,
               want, fabs(s1 - want), bound);
        same_bits(c, "sum", &s1, &s2, planting(c) ? 0 : sizeof s1);
        if (!c->is_cpu && !c->quiet) {
            double s3 = run_sumsq(c, c->cpu, x, n);
            note(c, "sumsq n=%zu: %s the cpu backend (diff %.3g)", n, memcmp(&s1, &s3, sizeof s1) ? "differs from" : "bitwise equal to",
                 fabs(s1 - s3));
        }
        xfree(x);
    }
}

/* ---------------------------------------------------------------------------------------
 * cross-entropy */
static const int XENT_V[] = {1, 5, 32, 67, 503};

static int32_t *xent_targets(Check *c, int N, int V) {
    int32_t *y = randi(c, N, 0, V);
    for (int n = 0; n < N; n++) if (rng_below(&c->rng, 5) == 0) y[n] = -1;
    return y;
}
static void run_xent_fwd(Check *c, const Backend *be, float *loss, const float *logits, const int32_t *y, int N, int V) {
    Arena a = {be, 0, {{0}}};
    float *l = a_out(&a, loss, F4(N));
    be->ops->xent_forward(be->ctx, l, a_in(&a, logits, F4((size_t)N * V)), a_in(&a, y, I4(N)), N, V);
    a_finish(c, &a);
}
static void check_xent_forward(Check *c) {
    for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
        for (size_t vi = 0; vi < COUNT(XENT_V); vi++) {
            int N = SIZES_N[ni], V = XENT_V[vi];
            size_t n = (size_t)N * V;
            float *logits = randn(c, n, 0, 3);
            int32_t *y = xent_targets(c, N, V);
            double *ld = to_d(logits, n), *want = dalloc(N);
            ref_xent_fwd(want, ld, y, N, V);
            float *l1 = falloc(N), *l2 = falloc(N);
            run_xent_fwd(c, c->be, l1, logits, y, N, V);
            run_xent_fwd(c, c->be, l2, logits, y, N, V);
            char what[48];
            snprintf(what, sizeof what, "N=%d V=%d loss", N, V);
            cmp_tol(c, what, l1, want, NULL, N, 4 * gam(V) + 1e-6, 4 * U32);
            same_bits(c, "loss", l1, l2, F4(N));
            if (!c->is_cpu) {
                float *l3 = falloc(N);
                run_xent_fwd(c, c->cpu, l3, logits, y, N, V);
                vs_cpu(c, what, l1, l3, N);
                xfree(l3);
            }
            xfree(logits); xfree(y); xfree(ld); xfree(want); xfree(l1); xfree(l2);
        }
}

typedef struct XentFd { double *logits, *loss, scale; const int32_t *y; int N, V; } XentFd;
static double xent_loss(void *u) {
    XentFd *f = u;
    ref_xent_fwd(f->loss, f->logits, f->y, f->N, f->V);
    double s = 0;
    for (int n = 0; n < f->N; n++) s += f->loss[n];
    return f->scale * s;
}
static void fd_xent(Check *c) {
    int N = 4, V = 6;
    int32_t y[4] = {2, -1, 0, 5};
    XentFd f = {dalloc((size_t)N * V), dalloc(N), 0.37, y, N, V};
    for (int i = 0; i < N * V; i++) f.logits[i] = 3 * rng_normal(&c->rng);
    double *dl = dalloc((size_t)N * V);
    ref_xent_bwd(dl, f.logits, y, f.scale, N, V);
    fd_check(c, "cross-entropy dlogits", xent_loss, &f, f.logits, dl, (size_t)N * V);
    xfree(f.logits); xfree(f.loss); xfree(dl);
}

/* in_place: dlogits is the logits buffer itself */
static void run_xent_bwd(Check *c, const Backend *be, float *dl, const float *logits, const int32_t *y, float scale, int N,
                         int V, int in_place) {
    Arena a = {be, 0, {{0}}};
    size_t n = (size_t)N * V;
    if (in_place) {
        memcpy(dl, logits, F4(n));
        float *d = a_io(&a, dl, F4(n));
        be->ops->xent_backward(be->ctx, d, d, a_in(&a, y, I4(N)), scale, N, V);
    } else {
        float *d = a_out(&a, dl, F4(n));
        be->ops->xent_backward(be->ctx, d, a_in(&a, logits, F4(n)), a_in(&a, y, I4(N)), scale, N, V);
    }
    a_finish(c, &a);
}
static void check_xent_backward(Check *c) {
    fd_xent(c);
    for (int in_place = 0; in_place < 2; in_place++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (size_t vi = 0; vi < COUNT(XENT_V); vi++) {
                int N = SIZES_N[ni], V = XENT_V[vi];
                size_t n = (size_t)N * V;
                float scale = N ? 1.0f / (float)N : 0.37f;
                if (vi % 2) scale = -0.37f;
                float *logits = randn(c, n, 0, 3);
                int32_t *y = xent_targets(c, N, V);
                double *ld = to_d(logits, n), *want = dalloc(n), *bound = dalloc(n);
                ref_xent_bwd(want, ld, y, scale, N, V);
                for (int r = 0; r < N; r++)
                    for (int j = 0; j < V; j++) {
                        size_t i = (size_t)r * V + j;
                        double p = y[r] < 0 ? 0 : want[i] / scale + (j == y[r]);
                        bound[i] = fabs(scale) * (gam(V + 4) * (p + (j == y[r])) + 1e-7);
                    }
                float *d1 = falloc(n), *d2 = falloc(n);
                run_xent_bwd(c, c->be, d1, logits, y, scale, N, V, in_place);
                run_xent_bwd(c, c->be, d2, logits, y, scale, N, V, in_place);
                char what[64];
                snprintf(what, sizeof what, "N=%d V=%d scale=%g%s dlogits", N, V, (double)scale, in_place ? " in place" : "");
                cmp_tol(c, what, d1, want, bound, n, 0, 0);
                same_bits(c, "dlogits", d1, d2, F4(n));
                if (!c->is_cpu) {
                    float *d3 = falloc(n);
                    run_xent_bwd(c, c->cpu, d3, logits, y, scale, N, V, in_place);
                    vs_cpu(c, what, d1, d3, n);
                    xfree(d3);
                }
                xfree(logits); xfree(y); xfree(ld); xfree(want); xfree(bound); xfree(d1); xfree(d2);
            }
}

/* ---------------------------------------------------------------------------------------
 * MoE permute / unpermute */
static void run_gather(Check *c, const Backend *be, float *out, const float *x, const int32_t *idx, int n, int D, int R) {
    Arena a = {be, 0, {{0}}};
    float *o = a_out(&a, out, F4((size_t)n * D));
    be->ops->gather_rows(be->ctx, o, a_in(&a, x, F4((size_t)R * D)), a_in(&a, idx, I4(n)), n, D);
    a_finish(c, &a);
}
static void check_gather_rows(Check *c) {
    for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
        for (size_t di = 0; di < COUNT(SIZES_D); di++) {
            int n = SIZES_N[ni], D = SIZES_D[di], R = 7;
            float *x = randn(c, (size_t)R * D, 0, 1), *want = falloc((size_t)n * D);
            int32_t *idx = randi(c, n, 0, R);
            for (int i = 0; i < n; i++) memcpy(want + (size_t)i * D, x + (size_t)idx[i] * D, F4(D));
            float *o1 = falloc((size_t)n * D), *o2 = falloc((size_t)n * D);
            run_gather(c, c->be, o1, x, idx, n, D, R);
            run_gather(c, c->be, o2, x, idx, n, D, R);
            char what[48];
            snprintf(what, sizeof what, "n=%d D=%d", n, D);
            cmp_exact(c, what, o1, want, (size_t)n * D);
            same_bits(c, "out", o1, o2, F4((size_t)n * D));
            xfree(x); xfree(want); xfree(idx); xfree(o1); xfree(o2);
        }
}

static void run_scatter(Check *c, const Backend *be, float *y, const float *src, const int32_t *idx, const float *scale,
                        int n, int D, int R) {
    Arena a = {be, 0, {{0}}};
    float *dy = a_io(&a, y, F4((size_t)R * D));
    const float *ds = scale ? a_in(&a, scale, F4(n)) : NULL;
    be->ops->scatter_add_rows(be->ctx, dy, a_in(&a, src, F4((size_t)n * D)), a_in(&a, idx, I4(n)), ds, n, D);
    a_finish(c, &a);
}
static void check_scatter_add_rows(Check *c) {
    static const int rows[] = {1, 5, 70};
    for (int with_scale = 0; with_scale < 2; with_scale++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++)
                for (size_t ri = 0; ri < COUNT(rows); ri++) {
                    int n = SIZES_N[ni], D = SIZES_D[di], R = rows[ri];
                    size_t ny = (size_t)R * D;
                    float *src = randn(c, (size_t)n * D, 0, 1), *y0 = randn(c, ny, 0, 1);
                    float *scale = with_scale ? randn(c, n, 0, 1) : NULL;
                    int32_t *idx = randi(c, n, 0, R);
                    float *want = fdup(y0, ny);
                    for (int i = 0; i < n; i++)          /* the contract: serial order i = 0..n-1 */
                        for (int d = 0; d < D; d++) {
                            float *yr = want + (size_t)idx[i] * D + d;
                            *yr = scale ? *yr + scale[i] * src[(size_t)i * D + d] : *yr + src[(size_t)i * D + d];
                        }
                    float *y1 = fdup(y0, ny), *y2 = fdup(y0, ny);
                    run_scatter(c, c->be, y1, src, idx, scale, n, D, R);
                    run_scatter(c, c->be, y2, src, idx, scale, n, D, R);
                    char what[64];
                    snprintf(what, sizeof what, "n=%d D=%d rows=%d scale=%s", n, D, R, scale ? "yes" : "NULL");
                    cmp_exact(c, what, y1, want, ny);
                    same_bits(c, "y", y1, y2, F4(ny));
                    xfree(src); xfree(y0); xfree(scale); xfree(idx); xfree(want); xfree(y1); xfree(y2);
                }
}

static void run_gather_dot(Check *c, const Backend *be, float *out, const float *dy, const float *src, const int32_t *idx,
                           int n, int D, int R) {
    Arena a = {be, 0, {{0}}};
    float *o = a_out(&a, out, F4(n));
    be->ops->gather_dot(be->ctx, o, a_in(&a, dy, F4((size_t)R * D)), a_in(&a, src, F4((size_t)n * D)), a_in(&a, idx, I4(n)), n, D);
    a_finish(c, &a);
}
static void check_gather_dot(Check *c) {
    for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
        for (size_t di = 0; di < COUNT(SIZES_D); di++) {
            int n = SIZES_N[ni], D = SIZES_D[di], R = 9;
            float *dy = randn(c, (size_t)R * D, 0, 1), *src = randn(c, (size_t)n * D, 0, 1);
            int32_t *idx = randi(c, n, 0, R);
            double *want = dalloc(n), *bound = dalloc(n);
            for (int i = 0; i < n; i++) {
                double s = 0, m = 0;
                for (int d = 0; d < D; d++) {
                    double p = (double)dy[(size_t)idx[i] * D + d] * src[(size_t)i * D + d];
                    s += p;
                    m += fabs(p);
                }
                want[i] = s;
                bound[i] = gam(D) * m + 1e-30;
            }
            float *o1 = falloc(n), *o2 = falloc(n);
            run_gather_dot(c, c->be, o1, dy, src, idx, n, D, R);
            run_gather_dot(c, c->be, o2, dy, src, idx, n, D, R);
            char what[48];
            snprintf(what, sizeof what, "n=%d D=%d", n, D);
            cmp_tol(c, what, o1, want, bound, n, 0, 0);
            same_bits(c, "out", o1, o2, F4(n));
            if (!c->is_cpu) {
                float *o3 = falloc(n);
                run_gather_dot(c, c->cpu, o3, dy, src, idx, n, D, R);
                vs_cpu(c, what, o1, o3, n);
                xfree(o3);
            }
            xfree(dy); xfree(src); xfree(idx); xfree(want); xfree(bound); xfree(o1); xfree(o2);
        }
}

static void run_combine(Check *c, const Backend *be, float *y, const float *src, const int32_t *pos, const float *gate,
                        int N, int k, int D, int M) {
    Arena a = {be, 0, {{0}}};
    float *dy = a_io(&a, y, F4((size_t)N * D));
    const float *dg = gate ? a_in(&a, gate, F4((size_t)N * k)) : NULL;
    be->ops->combine_rows(be->ctx, dy, a_in(&a, src, F4((size_t)M * D)), a_in(&a, pos, I4((size_t)N * k)), dg, N, k, D);
    a_finish(c, &a);
}
static void check_combine_rows(Check *c) {
    static const int ks[] = {1, 2, 4};
    for (int with_gate = 0; with_gate < 2; with_gate++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++)
                for (size_t ki = 0; ki < COUNT(ks); ki++) {
                    int N = SIZES_N[ni], D = SIZES_D[di], k = ks[ki], M = 9;
                    size_t ny = (size_t)N * D;
                    float *src = randn(c, (size_t)M * D, 0, 1), *y0 = randn(c, ny, 0, 1);
                    float *gate = with_gate ? randn(c, (size_t)N * k, 0.5f, 0.3f) : NULL;
                    int32_t *pos = randi(c, (size_t)N * k, -2, M);     /* negative: an empty slot */
                    float *want = fdup(y0, ny);
                    for (int t = 0; t < N; t++)          /* the contract: slot order s = 0..k-1 */
                        for (int s = 0; s < k; s++) {
                            int32_t p = pos[(size_t)t * k + s];
                            if (p < 0) continue;
                            for (int d = 0; d < D; d++) {
                                float *yr = want + (size_t)t * D + d, v = src[(size_t)p * D + d];
                                *yr = gate ? *yr + gate[(size_t)t * k + s] * v : *yr + v;
                            }
                        }
                    float *y1 = fdup(y0, ny), *y2 = fdup(y0, ny);
                    run_combine(c, c->be, y1, src, pos, gate, N, k, D, M);
                    run_combine(c, c->be, y2, src, pos, gate, N, k, D, M);
                    char what[64];
                    snprintf(what, sizeof what, "N=%d k=%d D=%d gate=%s", N, k, D, gate ? "yes" : "NULL");
                    cmp_exact(c, what, y1, want, ny);
                    same_bits(c, "y", y1, y2, F4(ny));
                    xfree(src); xfree(y0); xfree(gate); xfree(pos); xfree(want); xfree(y1); xfree(y2);
                }
}

static void run_gather_scaled(Check *c, const Backend *be, float *out, const float *x, const int32_t *idx, const float *scale,
                              int n, int D, int R) {
    Arena a = {be, 0, {{0}}};
    float *o = a_out(&a, out, F4((size_t)n * D));
    const float *ds = scale ? a_in(&a, scale, F4(n)) : NULL;
    be->ops->gather_rows_scaled(be->ctx, o, a_in(&a, x, F4((size_t)R * D)), a_in(&a, idx, I4(n)), ds, n, D);
    a_finish(c, &a);
}
static void check_gather_rows_scaled(Check *c) {
    for (int with_scale = 0; with_scale < 2; with_scale++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (size_t di = 0; di < COUNT(SIZES_D); di++) {
                int n = SIZES_N[ni], D = SIZES_D[di], R = 7;
                float *x = randn(c, (size_t)R * D, 0, 1), *want = falloc((size_t)n * D);
                float *scale = with_scale ? randn(c, n, 0, 1) : NULL;
                int32_t *idx = randi(c, n, 0, R);
                for (int i = 0; i < n; i++)
                    for (int d = 0; d < D; d++) {
                        float v = x[(size_t)idx[i] * D + d];
                        want[(size_t)i * D + d] = scale ? scale[i] * v : v;
                    }
                float *o1 = falloc((size_t)n * D), *o2 = falloc((size_t)n * D);
                run_gather_scaled(c, c->be, o1, x, idx, scale, n, D, R);
                run_gather_scaled(c, c->be, o2, x, idx, scale, n, D, R);
                char what[64];
                snprintf(what, sizeof what, "n=%d D=%d scale=%s", n, D, scale ? "yes" : "NULL");
                cmp_exact(c, what, o1, want, (size_t)n * D);
                same_bits(c, "out", o1, o2, F4((size_t)n * D));
                xfree(x); xfree(want); xfree(scale); xfree(idx); xfree(o1); xfree(o2);
            }
}

/* ---------------------------------------------------------------------------------------
 * pooling */
static const int POOL_B[] = {0, 1, 3, 17}, POOL_T[] = {1, 5, 17};

static void run_pool_fwd(Check *c, const Backend *be, int kind, float *out, const float *x, const int32_t *len, int B, int T, int D) {
    Arena a = {be, 0, {{0}}};
    float *o = a_out(&a, out, F4((size_t)B * D));
    be->ops->pool_forward(be->ctx, kind, o, a_in(&a, x, F4((size_t)B * T * D)), a_in(&a, len, I4(B)), B, T, D);
    a_finish(c, &a);
}
static void check_pool_forward(Check *c) {
    for (int kind = 0; kind < 2; kind++)
        for (size_t bi = 0; bi < COUNT(POOL_B); bi++)
            for (size_t ti = 0; ti < COUNT(POOL_T); ti++)
                for (size_t di = 0; di < COUNT(SIZES_D); di++) {
                    int B = POOL_B[bi], T = POOL_T[ti], D = SIZES_D[di];
                    size_t nx = (size_t)B * T * D, no = (size_t)B * D;
                    float *x = randn(c, nx, 0, 1);
                    int32_t *len = randi(c, B, 1, T + 1);
                    double *xd = to_d(x, nx), *want = dalloc(no), *bound = dalloc(no);
                    ref_pool_fwd(kind, want, xd, len, B, T, D);
                    for (int b = 0; b < B; b++)
                        for (int d = 0; d < D; d++) {
                            double m = 0;
                            for (int t = 0; t < len[b]; t++) m += fabs(xd[((size_t)b * T + t) * D + d]);
                            bound[(size_t)b * D + d] = kind == POOL_KIND_LAST ? 0 : gam(len[b] + 2) * m / len[b] + 1e-30;
                        }
                    float *o1 = falloc(no), *o2 = falloc(no);
                    run_pool_fwd(c, c->be, kind, o1, x, len, B, T, D);
                    run_pool_fwd(c, c->be, kind, o2, x, len, B, T, D);
                    char what[64];
                    snprintf(what, sizeof what, "%s B=%d T=%d D=%d", kind == POOL_KIND_LAST ? "last" : "mean", B, T, D);
                    if (kind == POOL_KIND_LAST) {
                        float *wf = to_f(want, no);      /* a copy: exact in float */
                        cmp_exact(c, what, o1, wf, no);
                        xfree(wf);
                    } else {
                        cmp_tol(c, what, o1, want, bound, no, 0, 0);
                    }
                    same_bits(c, "out", o1, o2, F4(no));
                    xfree(x); xfree(len); xfree(xd); xfree(want); xfree(bound); xfree(o1); xfree(o2);
                }
}

typedef struct PoolFd { int kind; double *x, *dout, *out; const int32_t *len; int B, T, D; } PoolFd;
static double pool_loss(void *u) {
    PoolFd *f = u;
    ref_pool_fwd(f->kind, f->out, f->x, f->len, f->B, f->T, f->D);
    return wdot(f->dout, f->out, (size_t)f->B * f->D);
}
static void fd_pool(Check *c) {
    int32_t len[3] = {2, 4, 1};
    for (int kind = 0; kind < 2; kind++) {
        int B = 3, T = 4, D = 3;
        size_t nx = (size_t)B * T * D, no = (size_t)B * D;
        PoolFd f = {kind, dalloc(nx), dalloc(no), dalloc(no), len, B, T, D};
        for (size_t i = 0; i < nx; i++) f.x[i] = rng_normal(&c->rng);
        for (size_t i = 0; i < no; i++) f.dout[i] = rng_normal(&c->rng);
        double *dx = dalloc(nx);
        ref_pool_bwd(kind, dx, f.dout, len, B, T, D);
        fd_check(c, kind == POOL_KIND_LAST ? "pool last dx" : "pool mean dx", pool_loss, &f, f.x, dx, nx);
        xfree(f.x); xfree(f.dout); xfree(f.out); xfree(dx);
    }
}

static void run_pool_bwd(Check *c, const Backend *be, int kind, float *dx, const float *dout, const int32_t *len, int B, int T, int D) {
    Arena a = {be, 0, {{0}}};
    float *d = a_io(&a, dx, F4((size_t)B * T * D));
    be->ops->pool_backward(be->ctx, kind, d, a_in(&a, dout, F4((size_t)B * D)), a_in(&a, len, I4(B)), B, T, D);
    a_finish(c, &a);
}
static void check_pool_backward(Check *c) {
    fd_pool(c);
    for (int kind = 0; kind < 2; kind++)
        for (size_t bi = 0; bi < COUNT(POOL_B); bi++)
            for (size_t ti = 0; ti < COUNT(POOL_T); ti++)
                for (size_t di = 0; di < COUNT(SIZES_D); di++) {
                    int B = POOL_B[bi], T = POOL_T[ti], D = SIZES_D[di];
                    size_t nx = (size_t)B * T * D, no = (size_t)B * D;
                    float *g = randn(c, no, 0, 1), *dx0 = randn(c, nx, 0, 1);
                    int32_t *len = randi(c, B, 1, T + 1);
                    float *d1 = fdup(dx0, nx), *d2 = fdup(dx0, nx);
                    run_pool_bwd(c, c->be, kind, d1, g, len, B, T, D);
                    run_pool_bwd(c, c->be, kind, d2, g, len, B, T, D);
                    char what[64];
                    snprintf(what, sizeof what, "%s B=%d T=%d D=%d", kind == POOL_KIND_LAST ? "last" : "mean", B, T, D);
                    if (kind == POOL_KIND_LAST) {
                        float *want = fdup(dx0, nx);     /* one float add per element: exact */
                        for (int b = 0; b < B; b++)
                            for (int d = 0; d < D; d++) {
                                float *r = want + ((size_t)b * T + len[b] - 1) * D + d;
                                *r = *r + g[(size_t)b * D + d];
                            }
                        cmp_exact(c, what, d1, want, nx);
                        xfree(want);
                    } else {
                        double *gd = to_d(g, no), *want = to_d(dx0, nx), *bound = dalloc(nx);
                        ref_pool_bwd(kind, want, gd, len, B, T, D);
                        for (int b = 0; b < B; b++)
                            for (int t = 0; t < T; t++)
                                for (int d = 0; d < D; d++) {
                                    size_t i = ((size_t)b * T + t) * D + d;
                                    bound[i] = 4 * U32 * (fabs(dx0[i]) + (t < len[b] ? fabs(gd[(size_t)b * D + d]) / len[b] : 0));
                                }
                        cmp_tol(c, what, d1, want, bound, nx, 0, 0);
                        xfree(gd); xfree(want); xfree(bound);
                    }
                    same_bits(c, "dx", d1, d2, F4(nx));
                    xfree(g); xfree(dx0); xfree(len); xfree(d1); xfree(d2);
                }
}

/* ---------------------------------------------------------------------------------------
 * AdamW: each step from the backend's own state, against one reference step in double */
static void run_adamw(Check *c, const Backend *be, float *p, const float *g, float *m, float *v, size_t n, float lr,
                      float b1, float b2, float eps, float wd, int t) {
    Arena a = {be, 0, {{0}}};
    float *dp = a_io(&a, p, F4(n)), *dm = a_io(&a, m, F4(n)), *dv = a_io(&a, v, F4(n));
    be->ops->adamw(be->ctx, dp, a_in(&a, g, F4(n)), dm, dv, n, lr, b1, b2, eps, wd, t);
    a_finish(c, &a);
}
/* one step in double; bp, bm (may be NULL): the float rounding bounds of p and m, 4u per
 * operation on the magnitudes that meet in it (m = lerp(m, g) may cancel, so relative to |m0| + |g|) */
static void ref_adamw(double *p, const double *g, double *m, double *v, size_t n, double lr, double b1, double b2,
                      double eps, double wd, int t, double *bp, double *bm) {
    double bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);
    for (size_t i = 0; i < n; i++) {
        double p0 = p[i], dm = 4 * U32 * (fabs(m[i]) + fabs(g[i]));
        p[i] *= 1 - lr * wd;
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
        double denom = sqrt(v[i]) / sqrt(bc2) + eps;
        p[i] -= lr / bc1 * m[i] / denom;
        if (bm) bm[i] = dm + 1e-30;
        if (bp) bp[i] = 4 * U32 * fabs(p0) + lr / bc1 * (8 * U32 * fabs(m[i]) + dm) / denom + 1e-30;
    }
}
static void check_adamw(Check *c) {
    static const size_t sizes[] = {0, 1, 3, 17, 4099};
    static const float beta1s[] = {0.9f, 0.3f};     /* the lerp weight 1 - beta1 below and above 0.5 */
    for (size_t k = 0; k < COUNT(sizes); k++)
        for (size_t bi = 0; bi < COUNT(beta1s); bi++) {
            size_t n = sizes[k];
            float lr = 3e-3f, b1 = beta1s[bi], b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
            float *p = randn(c, n, 0, 1), *m = xcalloc(F4(n)), *v = xcalloc(F4(n));
            for (int t = 1; t <= 3; t++) {
                float *g = randn(c, n, 0, 0.1f);
                double *pd = to_d(p, n), *md = to_d(m, n), *vd = to_d(v, n), *gd = to_d(g, n);
                double *bp = dalloc(n), *bm = dalloc(n);
                ref_adamw(pd, gd, md, vd, n, lr, b1, b2, eps, wd, t, bp, bm);
                float *p2 = fdup(p, n), *m2 = fdup(m, n), *v2 = fdup(v, n);
                run_adamw(c, c->be, p, g, m, v, n, lr, b1, b2, eps, wd, t);
                run_adamw(c, c->be, p2, g, m2, v2, n, lr, b1, b2, eps, wd, t);
                char what[64];
                snprintf(what, sizeof what, "n=%zu beta1=%.1f step %d: p", n, (double)b1, t);
                cmp_tol(c, what, p, pd, bp, n, 0, 0);
                snprintf(what, sizeof what, "n=%zu beta1=%.1f step %d: m", n, (double)b1, t);
                cmp_tol(c, what, m, md, bm, n, 0, 0);
                snprintf(what, sizeof what, "n=%zu beta1=%.1f step %d: v", n, (double)b1, t);
                cmp_tol(c, what, v, vd, NULL, n, 1e-30, 8 * U32);
                same_bits(c, "p", p, p2, F4(n));
                same_bits(c, "m", m, m2, F4(n));
                same_bits(c, "v", v, v2, F4(n));
                xfree(g); xfree(pd); xfree(md); xfree(vd); xfree(gd); xfree(p2); xfree(m2); xfree(v2); xfree(bp); xfree(bm);
            }
            xfree(p); xfree(m); xfree(v);
        }
}

/* ---------------------------------------------------------------------------------------
 * cuda/kernels_common.h on the CPU: against the reference, and bit for bit against the CPU
 * backend (whose formulas the header copies; the CUDA kernels call the header) */
static void check_kc_exp(Check *c) {
    size_t n = 200001;
    float *got = falloc(n);
    double *want = dalloc(n), *bound = dalloc(n);
    for (size_t i = 0; i < n; i++) {
        float x = (float)(-104.0 + 193.0 * (double)i / (double)(n - 1));   /* [-104, 89] */
        if (i % 7 == 3) x = (float)(40.0 * rng_normal(&c->rng));
        if (x < -104.0f) x = -104.0f;
        if (x > 88.7f) x = 88.7f;                                            /* below float overflow */
        got[i] = kc_exp_f32(x);
        want[i] = exp((double)x);
        bound[i] = 0x1p-149;                                                 /* gradual underflow: one subnormal step */
    }
    cmp_tol(c, "kc_exp_f32 over [-104, 88.7] (2 ulp)", got, want, bound, n, 0, 2.0 / 8388608.0);
    float nan_in = NAN, special[3] = {kc_exp_f32(nan_in), kc_exp_f32(200.0f), kc_exp_f32(-200.0f)};
    float nan_want = NAN, special_want[3] = {nan_want, INFINITY, 0.0f};
    report(c, isnan(special[0]) && special[1] == special_want[1] && special[2] == special_want[2],
           "kc_exp: nan -> nan (%g), 200 -> inf (%g), -200 -> 0 (%g)", (double)special[0], (double)special[1], (double)special[2]);
    xfree(got); xfree(want); xfree(bound);
}

static void check_kc_act(Check *c, int kind) {
    int N = 64, F = 67;
    size_t na = (size_t)N * F, nh = na * (kind == ACT_KIND_SWIGLU ? 2 : 1);
    float *h = randn(c, nh, 0, 2), *da = randn(c, na, 0, 1);
    for (size_t i = 0; i < 8 && i < nh; i++) h[i] = (float)(-12.0 + 3.0 * (double)i);   /* tails and 0 */
    float *a = falloc(na), *dh = falloc(nh);
    for (int r = 0; r < N; r++)
        for (int f = 0; f < F; f++) {
            size_t i = (size_t)r * F + f;
            if (kind == ACT_KIND_GELU) {
                a[i] = kc_gelu(h[i]);
                dh[i] = kc_gelu_grad(h[i]) * da[i];
            } else {
                float x1 = h[(size_t)r * 2 * F + f], x3 = h[(size_t)r * 2 * F + F + f];
                a[i] = kc_swiglu(x1, x3);
                kc_swiglu_grad(x1, x3, da[i], &dh[(size_t)r * 2 * F + f], &dh[(size_t)r * 2 * F + F + f]);
            }
        }
    double *hd = to_d(h, nh), *dad = to_d(da, na), *wa = dalloc(na), *wdh = dalloc(nh);
    ref_act_fwd(kind, wa, hd, N, F);
    ref_act_bwd(kind, wdh, dad, hd, N, F);
    char what[64];
    snprintf(what, sizeof what, "kc_%s forward vs reference", act_name(kind));
    cmp_tol(c, what, a, wa, NULL, na, 2e-7, 2e-6);
    snprintf(what, sizeof what, "kc_%s backward vs reference", act_name(kind));
    cmp_tol(c, what, dh, wdh, NULL, nh, 5e-7, 5e-6);
    float *ca = falloc(na), *cdh = falloc(nh);
    run_act_fwd(c, c->cpu, kind, ca, h, N, F);
    run_act_bwd(c, c->cpu, kind, cdh, da, h, N, F);
    snprintf(what, sizeof what, "kc_%s forward vs the cpu backend", act_name(kind));
    cmp_exact(c, what, a, ca, na);
    snprintf(what, sizeof what, "kc_%s backward vs the cpu backend", act_name(kind));
    cmp_exact(c, what, dh, cdh, nh);
    xfree(h); xfree(da); xfree(a); xfree(dh); xfree(hd); xfree(dad); xfree(wa); xfree(wdh); xfree(ca); xfree(cdh);
}
static void check_kc_gelu(Check *c) { check_kc_act(c, ACT_KIND_GELU); }
static void check_kc_swiglu(Check *c) { check_kc_act(c, ACT_KIND_SWIGLU); }

static void check_kc_adamw(Check *c) {
    static const float beta1s[] = {0.9f, 0.3f};
    size_t n = 4099;
    for (size_t bi = 0; bi < COUNT(beta1s); bi++) {
        float lr = 3e-3f, b1 = beta1s[bi], b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
        float *p = randn(c, n, 0, 1), *m = xcalloc(F4(n)), *v = xcalloc(F4(n));
        float *cp = fdup(p, n), *cm = fdup(m, n), *cv = fdup(v, n);
        for (int t = 1; t <= 3; t++) {
            float *g = randn(c, n, 0, 0.1f);
            double *pd = to_d(p, n), *md = to_d(m, n), *vd = to_d(v, n), *gd = to_d(g, n);
            double *bp = dalloc(n);
            ref_adamw(pd, gd, md, vd, n, lr, b1, b2, eps, wd, t, bp, NULL);
            KcAdamw s = kc_adamw_scalars(lr, b1, b2, eps, wd, t);
            for (size_t i = 0; i < n; i++) kc_adamw_step(&s, &p[i], g[i], &m[i], &v[i]);
            run_adamw(c, c->cpu, cp, g, cm, cv, n, lr, b1, b2, eps, wd, t);
            char what[80];
            snprintf(what, sizeof what, "kc_adamw_step beta1=%.1f step %d: p vs reference", (double)b1, t);
            cmp_tol(c, what, p, pd, bp, n, 0, 0);
            xfree(bp);
            snprintf(what, sizeof what, "kc_adamw_step beta1=%.1f step %d: p, m, v vs the cpu backend", (double)b1, t);
            float *all = falloc(3 * n), *call = falloc(3 * n);
            memcpy(all, p, F4(n)); memcpy(all + n, m, F4(n)); memcpy(all + 2 * n, v, F4(n));
            memcpy(call, cp, F4(n)); memcpy(call + n, cm, F4(n)); memcpy(call + 2 * n, cv, F4(n));
            cmp_exact(c, what, all, call, 3 * n);
            xfree(all); xfree(call); xfree(g); xfree(pd); xfree(md); xfree(vd); xfree(gd);
        }
        xfree(p); xfree(m); xfree(v); xfree(cp); xfree(cm); xfree(cv);
    }
}

/* ---------------------------------------------------------------------------------------
 * routing slots (route_*). route_count / route_keep / route_pair_keep are integer work:
 * against naive loops written here, bitwise. route_topk: probabilities, lse and the loss sums
 * against a softmax in double (tolerance), the chosen experts against the contract applied
 * to the backend's own probabilities (top-k by probability, or by logit + bias; ties to the
 * lower id: bitwise), gates = the chosen probabilities (renormalised: tolerance).
 * route_two_stage and route_backward: against the host router (src/router.c: router_select,
 * router_backward on a Route), indices bitwise, floats within atol 1e-7 + rtol 1e-6 (the
 * device's double exp/log may round differently from libm's), plus contract checks (the
 * in-group softmax sums to 1, the chosen experts are members of the chosen groups); the
 * backward also against central differences of the routing loss (independent of router.c). */

/* int outputs bitwise (planting flips one element) */
static int cmp_int(Check *c, const char *what, const int32_t *got_in, const int32_t *want, size_t n) {
    int32_t *got = xmalloc(I4(n ? n : 1));
    if (n) memcpy(got, got_in, I4(n));
    if (planting(c) && n) got[n / 2] ^= 1;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) {
            if (bad < 3) note(c, "%s: %s[%zu]: got %d want %d", c->op, what, i, got[i], want[i]);
            bad++;
        }
    report(c, bad == 0, "%s: %s: %zu/%zu differ (bitwise)", c->op, what, bad, n);
    xfree(got);
    return bad == 0;
}
static double *d_of_f(const float *x, size_t n) { return to_d(x, n); }

/* logits with ties: every third row repeats its first values */
static float *route_logits(Check *c, int N, int E) {
    float *l = randn(c, (size_t)N * E, 0, 1.5f);
    for (int t = 0; t < N; t += 3)
        for (int e = 1; e < E && e < 4; e++) l[(size_t)t * E + e] = l[(size_t)t * E];
    return l;
}

typedef struct RouteCase { int E, k, G, TG, renorm, bias, top2, product; } RouteCase;

static void check_route_topk(Check *c) {
    static const RouteCase cases[] = {{8, 2, 0, 0, 1, 0, 0, 0}, {5, 1, 0, 0, 0, 0, 0, 0}, {16, 4, 0, 0, 1, 1, 0, 0},
                                      {3, 3, 0, 0, 0, 1, 0, 0}, {67, 2, 0, 0, 0, 0, 0, 0}};
    for (size_t ci = 0; ci < COUNT(cases); ci++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++) {
            RouteCase rc = cases[ci];
            int N = SIZES_N[ni], E = rc.E, k = rc.k;
            size_t NE = (size_t)N * E, Nk = (size_t)N * k;
            float *l = route_logits(c, N, E), *bias = rc.bias ? randn(c, E, 0, 0.5f) : NULL;
            float *probs = falloc(NE), *gate = falloc(Nk), *probs2 = falloc(NE);
            double *lse = dalloc(N ? N : 1), *sums = dalloc(E + 1), *lse2 = dalloc(N ? N : 1), *sums2 = dalloc(E + 1);
            int32_t *expert = xmalloc(I4(Nk ? Nk : 1)), *expert2 = xmalloc(I4(Nk ? Nk : 1));
            float *gate2 = falloc(Nk);
            for (int run = 0; run < 2; run++) {
                Arena a = {c->be, 0, {{0}}};
                RouteSelArgs ra = {.N = N, .E = E, .k = k, .renorm = rc.renorm};
                ra.logits = a_in(&a, l, F4(NE));
                ra.bias = bias ? a_in(&a, bias, F4(E)) : NULL;
                ra.probs = a_out(&a, run ? probs2 : probs, F4(NE));
                ra.lse = a_out(&a, run ? lse2 : lse, sizeof(double) * (size_t)N);
                ra.expert = a_out(&a, run ? expert2 : expert, I4(Nk));
                ra.gate = a_out(&a, run ? gate2 : gate, F4(Nk));
                ra.sums = a_out(&a, run ? sums2 : sums, sizeof(double) * (size_t)(E + 1));
                c->be->ops->route_topk(c->be->ctx, &ra);
                a_finish(c, &a);
            }
            /* the reference: softmax in double; selection by the contract on the returned probs */
            double *wp = dalloc(NE ? NE : 1), *wl = dalloc(N ? N : 1), *ws = dalloc(E + 1), *wg = dalloc(Nk ? Nk : 1);
            int32_t *we = xmalloc(I4(Nk ? Nk : 1));
            for (int t = 0; t < N; t++) {
                const float *lr = l + (size_t)t * E;
                double mx = lr[0], z = 0;
                for (int e = 1; e < E; e++) if (lr[e] > mx) mx = lr[e];
                for (int e = 0; e < E; e++) z += exp(lr[e] - mx);
                for (int e = 0; e < E; e++) { wp[(size_t)t * E + e] = exp(lr[e] - mx) / z; ws[e] += wp[(size_t)t * E + e]; }
                wl[t] = mx + log(z);
                ws[E] += wl[t] * wl[t];
                const float *pr = probs + (size_t)t * E;
                double gs = 0;
                for (int s = 0; s < k; s++) {
                    int best = -1;
                    for (int e = 0; e < E; e++) {
                        int used = 0;
                        for (int q = 0; q < s; q++) used |= we[(size_t)t * k + q] == e;
                        if (used) continue;
                        float ve = bias ? lr[e] + bias[e] : pr[e], vb = best < 0 ? 0 : bias ? lr[best] + bias[best] : pr[best];
                        if (best < 0 || ve > vb) best = e;
                    }
                    we[(size_t)t * k + s] = best;
                    wg[(size_t)t * k + s] = pr[best];
                    gs += pr[best];
                }
                if (rc.renorm) for (int s = 0; s < k; s++) wg[(size_t)t * k + s] /= gs;
            }
            char what[96];
            snprintf(what, sizeof what, "N=%d E=%d k=%d%s%s: probs", N, E, k, rc.renorm ? " renorm" : "", bias ? " bias" : "");
            cmp_tol(c, what, probs, wp, NULL, NE, 1e-7, 1e-6);
            snprintf(what, sizeof what, "N=%d E=%d k=%d: experts (top-k, ties to the lower id)", N, E, k);
            cmp_int(c, what, expert, we, Nk);
            snprintf(what, sizeof what, "N=%d E=%d k=%d: gates", N, E, k);
            cmp_tol(c, what, gate, wg, NULL, Nk, 0, rc.renorm ? 4 * k * U32 : 0);
            float *lsef = to_f(lse, N), *sf = to_f(sums, E + 1);
            snprintf(what, sizeof what, "N=%d E=%d k=%d: lse", N, E, k);
            cmp_tol(c, what, lsef, wl, NULL, N, 1e-6, 1e-6);
            snprintf(what, sizeof what, "N=%d E=%d k=%d: sums (probs, lse^2)", N, E, k);
            cmp_tol(c, what, sf, ws, NULL, E + 1, 1e-6, 1e-6);
            same_bits(c, "probs", probs, probs2, F4(NE));
            same_bits(c, "experts", expert, expert2, I4(Nk));
            same_bits(c, "gates", gate, gate2, F4(Nk));
            same_bits(c, "sums", sums, sums2, sizeof(double) * (size_t)(E + 1));
            xfree(l); xfree(bias); xfree(probs); xfree(gate); xfree(probs2); xfree(lse); xfree(sums); xfree(lse2);
            xfree(sums2); xfree(expert); xfree(expert2); xfree(gate2); xfree(wp); xfree(wl); xfree(ws); xfree(wg);
            xfree(we); xfree(lsef); xfree(sf);
        }
}

/* members [G, K]: a random partition of E experts into G groups of K (ascending in a group) */
static int32_t *route_members(Check *c, int G, int K, int32_t *group_of) {
    int E = G * K;
    int32_t *perm = xmalloc(I4(E)), *mem = xmalloc(I4(E));
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) { int j = (int)rng_below(&c->rng, (uint64_t)i + 1); int32_t t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
    for (int g = 0; g < G; g++) {
        int32_t *m = mem + (size_t)g * K;
        for (int q = 0; q < K; q++) m[q] = perm[g * K + q];
        for (int q = 1; q < K; q++) for (int r = q; r > 0 && m[r - 1] > m[r]; r--) { int32_t t = m[r]; m[r] = m[r - 1]; m[r - 1] = t; }
        for (int q = 0; q < K; q++) if (group_of) group_of[m[q]] = g;
    }
    xfree(perm);
    return mem;
}

static MoeConfig route_mc(const RouteCase *rc) {
    MoeConfig mc;
    memset(&mc, 0, sizeof mc);
    mc.renormalize = rc->renorm;
    mc.group_score = rc->top2 ? GROUP_SCORE_TOP2 : GROUP_SCORE_MEAN;
    mc.group_gate = rc->product ? GROUP_GATE_PRODUCT : GROUP_GATE_RENORM;
    return mc;
}

static const RouteCase TWO_CASES[] = {{8, 2, 2, 1, 1, 0, 0, 0}, {16, 4, 4, 2, 1, 1, 1, 0}, {12, 3, 3, 2, 0, 0, 1, 1},
                                      {16, 2, 8, 3, 1, 1, 0, 1}, {6, 1, 3, 1, 0, 0, 0, 0}};

/* the backend's two-stage selection into host arrays (two runs: a, b) */
typedef struct TwoOut { float *probs, *gate, *q, *lsel; double *lse, *sums; int32_t *expert, *group, *gtop2; } TwoOut;
static void two_out_alloc(TwoOut *o, int N, int E, int k, int G, int TG) {
    size_t n = (size_t)(N ? N : 1);
    o->probs = falloc(n * E); o->gate = falloc(n * k); o->q = falloc(n * G); o->lsel = falloc(n * G);
    o->lse = dalloc(n); o->sums = dalloc((size_t)E + G + 1);
    o->expert = xmalloc(I4(n * k)); o->group = xmalloc(I4(n * TG)); o->gtop2 = xmalloc(I4(n * G * 2));
}
static void two_out_free(TwoOut *o) {
    xfree(o->probs); xfree(o->gate); xfree(o->q); xfree(o->lsel); xfree(o->lse); xfree(o->sums);
    xfree(o->expert); xfree(o->group); xfree(o->gtop2);
}
static void run_two_stage(Check *c, const RouteCase *rc, int N, const float *l, const float *bias, const int32_t *mem,
                          TwoOut *o) {
    int E = rc->E, G = rc->G, K = E / G, k = rc->k, TG = rc->TG;
    Arena a = {c->be, 0, {{0}}};
    RouteSelArgs ra = {.N = N, .E = E, .k = k, .G = G, .K = K, .TG = TG, .renorm = rc->renorm && k > 1,
                       .score_top2 = rc->top2 && K >= 2, .gate_product = rc->product};
    ra.logits = a_in(&a, l, F4((size_t)N * E));
    ra.bias = bias ? a_in(&a, bias, F4(E)) : NULL;
    ra.members = a_in(&a, mem, I4(E));
    ra.probs = a_out(&a, o->probs, F4((size_t)N * E));
    ra.lse = a_out(&a, o->lse, sizeof(double) * (size_t)N);
    ra.expert = a_out(&a, o->expert, I4((size_t)N * k));
    ra.gate = a_out(&a, o->gate, F4((size_t)N * k));
    ra.q = a_out(&a, o->q, F4((size_t)N * G));
    ra.group = a_out(&a, o->group, I4((size_t)N * TG));
    /* gtop2 is written only with score_top2 and K >= 2; lsel is workspace-like output */
    ra.gtop2 = ra.score_top2 ? a_out(&a, o->gtop2, I4((size_t)N * G * 2)) : a_scratch(&a, I4((size_t)N * G * 2));
    ra.lsel = a_out(&a, o->lsel, F4((size_t)N * G));
    ra.sums = a_out(&a, o->sums, sizeof(double) * (size_t)(E + G + 1));
    c->be->ops->route_two_stage(c->be->ctx, &ra);
    a_finish(c, &a);
}

static void check_route_two_stage(Check *c) {
    for (size_t ci = 0; ci < COUNT(TWO_CASES); ci++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++) {
            const RouteCase *rc = &TWO_CASES[ci];
            int N = SIZES_N[ni], E = rc->E, G = rc->G, K = E / G, k = rc->k, TG = rc->TG;
            float *l = route_logits(c, N, E), *bias = rc->bias ? randn(c, E, 0, 0.5f) : NULL;
            int32_t *mem = route_members(c, G, K, NULL);
            TwoOut o1, o2;
            two_out_alloc(&o1, N, E, k, G, TG);
            two_out_alloc(&o2, N, E, k, G, TG);
            run_two_stage(c, rc, N, l, bias, mem, &o1);
            run_two_stage(c, rc, N, l, bias, mem, &o2);
            /* the host router */
            MoeConfig mc = route_mc(rc);
            Route r;
            router_init(&r, N ? N : 1, E, k, G, TG);
            if (N) memcpy(r.logits, l, F4((size_t)N * E));
            router_select(&r, &mc, bias, mem, N, NULL);
            char what[112];
            const char *desc = rc->product ? "product" : rc->renorm ? "renorm" : "raw";
#define TWO_WHAT(s) snprintf(what, sizeof what, "N=%d E=%d G=%d TG=%d k=%d %s%s%s: " s, N, E, G, TG, k, desc, \
                             rc->top2 ? " top2" : " mean", bias ? " bias" : "")
            TWO_WHAT("groups");
            cmp_int(c, what, o1.group, r.group, (size_t)N * TG);
            TWO_WHAT("experts");
            cmp_int(c, what, o1.expert, r.expert, (size_t)N * k);
            if (rc->top2 && K >= 2) { TWO_WHAT("gtop2"); cmp_int(c, what, o1.gtop2, r.gtop2, (size_t)N * G * 2); }
            double *wd;
            wd = d_of_f(r.probs, (size_t)N * E); TWO_WHAT("probs"); cmp_tol(c, what, o1.probs, wd, NULL, (size_t)N * E, 1e-7, 1e-6); xfree(wd);
            wd = d_of_f(r.q, (size_t)N * G); TWO_WHAT("q"); cmp_tol(c, what, o1.q, wd, NULL, (size_t)N * G, 1e-7, 1e-6); xfree(wd);
            wd = d_of_f(r.gate, (size_t)N * k); TWO_WHAT("gates"); cmp_tol(c, what, o1.gate, wd, NULL, (size_t)N * k, 1e-7, 1e-6); xfree(wd);
            wd = d_of_f(r.lsel, (size_t)N * G); TWO_WHAT("lsel"); cmp_tol(c, what, o1.lsel, wd, NULL, (size_t)N * G, 0, 0); xfree(wd);
            float *lf = to_f(o1.lse, N);
            TWO_WHAT("lse"); cmp_tol(c, what, lf, r.lse, NULL, N, 1e-6, 1e-6);
            /* sums against the host arrays, in double */
            double *ws = dalloc((size_t)E + G + 1);
            for (int t = 0; t < N; t++) {
                for (int i = 0; i < E; i++) ws[i] += r.probs[(size_t)t * E + i];
                for (int g = 0; g < G; g++) ws[E + g] += r.q[(size_t)t * G + g];
                ws[E + G] += r.lse[t] * r.lse[t];
            }
            float *sf = to_f(o1.sums, (size_t)E + G + 1);
            TWO_WHAT("sums"); cmp_tol(c, what, sf, ws, NULL, (size_t)E + G + 1, 1e-6, 1e-6);
            /* contract: in-group softmax sums to 1 over the chosen groups, experts in chosen groups */
            int bad = 0;
            for (int t = 0; t < N; t++) {
                double ps = 0;
                for (int i = 0; i < E; i++) ps += o1.probs[(size_t)t * E + i];
                if (fabs(ps - 1) > 1e-5) bad++;
                for (int s = 0; s < k; s++) {
                    int e = o1.expert[(size_t)t * k + s], in = 0;
                    for (int j = 0; j < TG; j++)
                        for (int q = 0; q < K; q++) in |= mem[(size_t)o1.group[(size_t)t * TG + j] * K + q] == e;
                    if (!in) bad++;
                }
            }
            if (planting(c)) bad++;
            TWO_WHAT("contract (probs sum to 1, experts in chosen groups)");
            report(c, bad == 0, "%s: %s: %d violations", c->op, what, bad);
#undef TWO_WHAT
            same_bits(c, "probs", o1.probs, o2.probs, F4((size_t)N * E));
            same_bits(c, "experts", o1.expert, o2.expert, I4((size_t)N * k));
            same_bits(c, "gates", o1.gate, o2.gate, F4((size_t)N * k));
            same_bits(c, "sums", o1.sums, o2.sums, sizeof(double) * ((size_t)E + G + 1));
            router_free(&r);
            two_out_free(&o1); two_out_free(&o2);
            xfree(l); xfree(bias); xfree(mem); xfree(lf); xfree(ws); xfree(sf);
        }
}

static const int ROUTE_SHAPES[][2] = {{1, 1}, {2, 8}, {3, 5}, {4, 67}};   /* slots, buckets */

static void check_route_count(Check *c) {
    for (size_t si = 0; si < COUNT(ROUTE_SHAPES); si++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (int with_valid = 0; with_valid < 2; with_valid++) {
                int S = ROUTE_SHAPES[si][0], Bk = ROUTE_SHAPES[si][1], N = SIZES_N[ni];
                size_t n = (size_t)N * S;
                int32_t *ids = randi(c, n ? n : 1, 0, Bk), *valid = randi(c, n ? n : 1, -1, 1);
                int32_t *got = xmalloc(I4((size_t)S * Bk)), *got2 = xmalloc(I4((size_t)S * Bk));
                int32_t *want = xcalloc(I4((size_t)S * Bk));
                for (int run = 0; run < 2; run++) {
                    Arena a = {c->be, 0, {{0}}};
                    int32_t *dc = a_out(&a, run ? got2 : got, I4((size_t)S * Bk));
                    const int32_t *di = a_in(&a, ids, I4(n)), *dv = with_valid ? a_in(&a, valid, I4(n)) : NULL;
                    c->be->ops->route_count(c->be->ctx, dc, di, dv, N, S, Bk);
                    a_finish(c, &a);
                }
                for (size_t i = 0; i < n; i++)
                    if (!with_valid || valid[i] >= 0) want[(i % (size_t)S) * Bk + ids[i]]++;
                char what[80];
                snprintf(what, sizeof what, "N=%d slots=%d buckets=%d%s: counts", N, S, Bk, with_valid ? " valid" : "");
                cmp_int(c, what, got, want, (size_t)S * Bk);
                same_bits(c, "counts", got, got2, I4((size_t)S * Bk));
                xfree(ids); xfree(valid); xfree(got); xfree(got2); xfree(want);
            }
}

static void check_route_keep(Check *c) {
    for (size_t si = 0; si < COUNT(ROUTE_SHAPES); si++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++)
            for (int capi = 0; capi < 3; capi++) {
                int S = ROUTE_SHAPES[si][0], Bk = ROUTE_SHAPES[si][1], N = SIZES_N[ni];
                size_t n = (size_t)N * S, sb = (size_t)S * Bk;
                int64_t cap = capi == 0 ? -1 : capi == 1 ? 0 : (int64_t)(N * S / Bk + 2);
                int32_t *ids = randi(c, n ? n : 1, 0, Bk), *keep0 = randi(c, n ? n : 1, -1, 1);
                int64_t *base = xmalloc(sizeof(int64_t) * sb);
                for (size_t i = 0; i < sb; i++) base[i] = (int64_t)rng_below(&c->rng, (uint64_t)(N + 3));
                int32_t *got = xmalloc(I4(n ? n : 1)), *got2 = xmalloc(I4(n ? n : 1)), *want = xmalloc(I4(n ? n : 1));
                if (n) { memcpy(got, keep0, I4(n)); memcpy(got2, keep0, I4(n)); memcpy(want, keep0, I4(n)); }
                for (int run = 0; run < 2; run++) {
                    Arena a = {c->be, 0, {{0}}};
                    int32_t *dk = a_io(&a, run ? got2 : got, I4(n));
                    c->be->ops->route_keep(c->be->ctx, dk, a_in(&a, ids, I4(n)), a_in(&a, base, sizeof(int64_t) * sb), cap, N, S, Bk);
                    a_finish(c, &a);
                }
                /* naive: for each pair, count the earlier kept pairs of its slot and bucket */
                for (int t = 0; t < N; t++)
                    for (int s = 0; s < S; s++) {
                        size_t ts = (size_t)t * S + s;
                        if (keep0[ts] < 0) continue;
                        int64_t before = 0;
                        for (int u = 0; u < t; u++) before += keep0[(size_t)u * S + s] >= 0 && ids[(size_t)u * S + s] == ids[ts];
                        if (cap >= 0 && base[(size_t)s * Bk + ids[ts]] + before >= cap) want[ts] = -1;
                    }
                char what[80];
                snprintf(what, sizeof what, "N=%d slots=%d buckets=%d cap=%lld: keep", N, S, Bk, (long long)cap);
                cmp_int(c, what, got, want, n);
                same_bits(c, "keep", got, got2, I4(n));
                xfree(ids); xfree(keep0); xfree(base); xfree(got); xfree(got2); xfree(want);
            }
}

static void check_route_pair_keep(Check *c) {
    static const int shapes[][3] = {{8, 2, 1}, {16, 4, 2}, {12, 3, 3}};   /* E, G, TG */
    for (size_t si = 0; si < COUNT(shapes); si++)
        for (size_t ni = 0; ni < COUNT(SIZES_N); ni++) {
            int E = shapes[si][0], G = shapes[si][1], TG = shapes[si][2], K = E / G, k = 2, N = SIZES_N[ni];
            int32_t *group_of = xmalloc(I4(E)), *mem = route_members(c, G, K, group_of);
            int32_t *expert = randi(c, (size_t)(N ? N : 1) * k, 0, E), *group = randi(c, (size_t)(N ? N : 1) * TG, 0, G);
            int32_t *gkeep = randi(c, (size_t)(N ? N : 1) * TG, -1, 1);
            size_t nk = (size_t)N * k;
            int32_t *got = xmalloc(I4(nk ? nk : 1)), *got2 = xmalloc(I4(nk ? nk : 1)), *want = xmalloc(I4(nk ? nk : 1));
            for (int run = 0; run < 2; run++) {
                Arena a = {c->be, 0, {{0}}};
                int32_t *dp = a_out(&a, run ? got2 : got, I4(nk));
                c->be->ops->route_pair_keep(c->be->ctx, dp, a_in(&a, expert, I4(nk)), a_in(&a, group, I4((size_t)N * TG)),
                                            a_in(&a, gkeep, I4((size_t)N * TG)), a_in(&a, group_of, I4(E)), N, k, TG);
                a_finish(c, &a);
            }
            for (int t = 0; t < N; t++)
                for (int s = 0; s < k; s++) {
                    int keep = 0;
                    for (int j = 0; j < TG; j++)
                        if (group[(size_t)t * TG + j] == group_of[expert[(size_t)t * k + s]] && gkeep[(size_t)t * TG + j] >= 0) keep = 1;
                    want[(size_t)t * k + s] = keep ? 0 : -1;
                }
            char what[80];
            snprintf(what, sizeof what, "N=%d E=%d G=%d TG=%d: pos", N, E, G, TG);
            cmp_int(c, what, got, want, nk);
            same_bits(c, "pos", got, got2, I4(nk));
            xfree(group_of); xfree(mem); xfree(expert); xfree(group); xfree(gkeep); xfree(got); xfree(got2); xfree(want);
        }
}

/* the routing loss of one token as a smooth function of its logits l [E] (double), the
 * selections held fixed: L = sum_s dg_s gate_s + sum_i fcoef_e[i] p_i + sum_g fcoef_g[g] q_g +
 * z_coef / 2 lse^2 (p: the full softmax, or the in-group softmax over the chosen groups'
 * members; gates raw, renormalised or q_g x p renormalised in the group). route_backward's
 * dlogits is its gradient: checked by central differences. */
static double ref_route_loss(const RouteBwdArgs *h, int t, const double *l, const int32_t *mem) {
    int E = h->E, k = h->k, G = h->G, K = h->K, TG = h->TG;
    const int32_t *sel = h->expert + (size_t)t * k;
    double mx = l[0], z = 0;
    for (int i = 1; i < E; i++) if (l[i] > mx) mx = l[i];
    for (int i = 0; i < E; i++) z += exp(l[i] - mx);
    double lse = mx + log(z), L = 0.5 * h->z_coef * lse * lse;
    double *p = xcalloc(sizeof(double) * (size_t)E), *q = xcalloc(sizeof(double) * (size_t)(G ? G : 1));
    if (!G) {
        for (int i = 0; i < E; i++) p[i] = exp(l[i] - lse);
    } else {
        const int32_t *gs = h->group + (size_t)t * TG;
        double lm = -INFINITY, ps = 0;
        for (int j = 0; j < TG; j++) for (int a = 0; a < K; a++) { int i = mem[(size_t)gs[j] * K + a]; if (l[i] > lm) lm = l[i]; }
        for (int j = 0; j < TG; j++) for (int a = 0; a < K; a++) ps += exp(l[mem[(size_t)gs[j] * K + a]] - lm);
        for (int j = 0; j < TG; j++) for (int a = 0; a < K; a++) { int i = mem[(size_t)gs[j] * K + a]; p[i] = exp(l[i] - lm) / ps; }
        double qm = -INFINITY, qs = 0;
        for (int g = 0; g < G; g++) {
            if (h->score_top2) {
                const int32_t *b = h->gtop2 + ((size_t)t * G + g) * 2;
                q[g] = l[b[0]] + l[b[1]];
            } else {
                double s = 0;
                for (int a = 0; a < K; a++) s += l[mem[(size_t)g * K + a]];
                q[g] = s / K;
            }
            if (q[g] > qm) qm = q[g];
        }
        for (int g = 0; g < G; g++) qs += exp(q[g] - qm);
        for (int g = 0; g < G; g++) { q[g] = exp(q[g] - qm) / qs; L += h->fcoef[E + g] * q[g]; }
    }
    for (int i = 0; i < E; i++) L += h->fcoef[i] * p[i];
    double gsum = 0;
    for (int s = 0; s < k; s++) gsum += p[sel[s]];
    for (int s = 0; s < k; s++) {
        double gate = p[sel[s]];
        if (G && h->gate_product) {
            const int32_t *gs = h->group + (size_t)t * TG;
            int j = -1;
            for (int jj = 0; jj < TG && j < 0; jj++) for (int a = 0; a < K; a++) if (mem[(size_t)gs[jj] * K + a] == sel[s]) j = jj;
            double zg = 0;
            for (int u = 0; u < k; u++)
                for (int a = 0; a < K; a++) if (mem[(size_t)gs[j] * K + a] == sel[u]) zg += p[sel[u]];
            gate = q[gs[j]] * p[sel[s]] / zg;
        } else if (h->renorm) gate = p[sel[s]] / gsum;
        L += (double)h->dgate[(size_t)t * k + s] * gate;
    }
    xfree(p); xfree(q);
    return L;
}
/* central differences of ref_route_loss at the forward's logits: want [N, E] */
static void ref_route_backward_fd(const RouteBwdArgs *h, const float *logits, const int32_t *mem, double *want) {
    int E = h->E;
    double *l = xmalloc(sizeof(double) * (size_t)E);
    for (int t = 0; t < h->N; t++) {
        for (int i = 0; i < E; i++) l[i] = logits[(size_t)t * E + i];
        for (int i = 0; i < E; i++) {
            double x = l[i], hh = 1e-5;
            l[i] = x + hh;
            double up = ref_route_loss(h, t, l, mem);
            l[i] = x - hh;
            double dn = ref_route_loss(h, t, l, mem);
            l[i] = x;
            want[(size_t)t * E + i] = (up - dn) / (2 * hh);
        }
    }
    xfree(l);
}

/* the backward: the host router's forward (router_select) gives the saved arrays; random
 * dgates (some 0 = dropped), coefficients and z_coef; the backend against router_backward */
static void check_route_backward(Check *c) {
    static const RouteCase one[] = {{8, 2, 0, 0, 1, 0, 0, 0}, {5, 1, 0, 0, 0, 0, 0, 0}, {16, 4, 0, 0, 0, 1, 0, 0}};
    for (int stage = 1; stage <= 2; stage++) {
        size_t nc = stage == 1 ? COUNT(one) : COUNT(TWO_CASES);
        for (size_t ci = 0; ci < nc; ci++)
            for (size_t ni = 0; ni < COUNT(SIZES_N); ni++) {
                const RouteCase *rc = stage == 1 ? &one[ci] : &TWO_CASES[ci];
                int N = SIZES_N[ni], E = rc->E, G = rc->G, K = G ? E / G : 1, k = rc->k, TG = rc->TG;
                size_t NE = (size_t)N * E, Nk = (size_t)N * k;
                float *l = route_logits(c, N, E), *bias = rc->bias ? randn(c, E, 0, 0.5f) : NULL;
                int32_t *mem = G ? route_members(c, G, K, NULL) : NULL;
                MoeConfig mc = route_mc(rc);
                Route r;
                router_init(&r, N ? N : 1, E, k, G, TG);
                if (N) memcpy(r.logits, l, F4(NE));
                router_select(&r, &mc, bias, mem, N, NULL);
                float *dgate = randn(c, Nk ? Nk : 1, 0, 1);
                for (size_t i = 0; i < Nk; i += 5) dgate[i] = 0.0f;
                for (int i = 0; i < E; i++) r.fcoef_e[i] = 0.01 * rng_uniform(&c->rng);
                for (int g = 0; g < G; g++) r.fcoef_g[g] = 0.01 * rng_uniform(&c->rng);
                r.z_coef = (ci % 2) ? 0.0 : 0.003;
                router_backward(&r, &mc, mem, dgate);
                RouteBwdArgs h = router_bwd_args(&r, &mc, mem, dgate);   /* fills r.fcoef */
                float *got = falloc(NE), *got2 = falloc(NE);
                for (int run = 0; run < 2; run++) {
                    Arena a = {c->be, 0, {{0}}};
                    RouteBwdArgs ba = h;
                    ba.logits = a_in(&a, r.logits, F4(NE));
                    ba.probs = a_in(&a, r.probs, F4(NE));
                    ba.gate = a_in(&a, r.gate, F4(Nk));
                    ba.lse = a_in(&a, r.lse, sizeof(double) * (size_t)N);
                    ba.expert = a_in(&a, r.expert, I4(Nk));
                    ba.fcoef = a_in(&a, r.fcoef, sizeof(double) * (size_t)(E + G));
                    ba.dgate = a_in(&a, dgate, F4(Nk));
                    if (G) {
                        ba.q = a_in(&a, r.q, F4((size_t)N * G));
                        ba.group = a_in(&a, r.group, I4((size_t)N * TG));
                        ba.gtop2 = a_in(&a, r.gtop2, I4((size_t)N * G * 2));
                        ba.members = a_in(&a, mem, I4(E));
                    }
                    ba.dlogits = a_out(&a, run ? got2 : got, F4(NE));
                    c->be->ops->route_backward(c->be->ctx, &ba);
                    a_finish(c, &a);
                }
                double *want = d_of_f(r.dlogits, NE);
                char what[112];
                snprintf(what, sizeof what, "%s N=%d E=%d k=%d G=%d TG=%d%s%s%s z=%g: dlogits", stage == 1 ? "one stage" : "two stages",
                         N, E, k, G, TG, rc->renorm ? " renorm" : "", rc->product ? " product" : "", rc->top2 ? " top2" : "", r.z_coef);
                cmp_tol(c, what, got, want, NULL, NE, 1e-7, 1e-6);
                vs_cpu(c, "dlogits", got, r.dlogits, NE);
                /* independent of src/router.c: the gradient of the routing loss by central differences */
                double *fd = dalloc(NE ? NE : 1);
                RouteBwdArgs hf = h;
                hf.expert = r.expert; hf.group = r.group; hf.gtop2 = r.gtop2; hf.fcoef = r.fcoef; hf.dgate = dgate;
                ref_route_backward_fd(&hf, l, mem, fd);
                char fwhat[160];
                snprintf(fwhat, sizeof fwhat, "%s vs central differences of the routing loss", what);
                cmp_tol(c, fwhat, got, fd, NULL, NE, 4e-7, 1e-5);
                xfree(fd);
                same_bits(c, "dlogits", got, got2, F4(NE));
                router_free(&r);
                xfree(l); xfree(bias); xfree(mem); xfree(dgate); xfree(got); xfree(got2); xfree(want);
            }
    }
}

/* ---------------------------------------------------------------------------------------
 * run.gemm_dtype=bf16 (backend_set_gemm_dtype): where the backend offers it (CUDA), gemm with
 * A and B rounded to bf16 against the double reference on the unrounded inputs, within
 * |alpha| (2^-7 + 2^-16 + g(K)) sum|a||b| + g(2) |beta c| (two bf16 roundings of the inputs, one
 * of their product's factors, the FP32 sum); the backend is set back to fp32 afterwards. The
 * CPU backend must refuse bf16 with an error naming run.gemm_dtype. */
static void check_gemm_bf16(Check *c) {
    Backend *be = (Backend *)c->be;
    Status st = backend_set_gemm_dtype(be, GEMM_DTYPE_BF16);
    if (!STATUS_OK(st)) {
        int named = strstr(st.msg, "run.gemm_dtype") != NULL;
        report(c, c->is_cpu && named && !planting(c), "gemm_bf16: the %s backend refuses bf16 (%s)", be->ops->name, st.msg);
        return;
    }
    static const int shapes[][5] = {{1, 1, 1, 0, 0}, {17, 5, 64, 0, 0}, {64, 67, 32, 1, 0}, {3, 64, 17, 0, 1},
                                    {33, 17, 67, 1, 1}, {5, 3, 0, 0, 0}, {0, 4, 4, 0, 0}};
    for (size_t si = 0; si < COUNT(shapes); si++) {
        int M = shapes[si][0], N = shapes[si][1], K = shapes[si][2], ta = shapes[si][3], tb = shapes[si][4];
        int lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 2, ldc = N + 3;
        size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
        float *A = randn(c, na ? na : 1, 0, 1), *B = randn(c, nb ? nb : 1, 0, 1), *C = randn(c, nc ? nc : 1, 0, 1);
        float alpha = 1.5f, beta = 0.5f;
        float *got = fdup(C, nc), *got2 = fdup(C, nc);
        for (int run = 0; run < 2; run++) {
            Arena a = {be, 0, {{0}}};
            float *dc = a_io(&a, run ? got2 : got, F4(nc));
            be->ops->gemm(be->ctx, ta, tb, M, N, K, alpha, a_in(&a, A, F4(na)), lda, a_in(&a, B, F4(nb)), ldb, beta, dc, ldc);
            a_finish(c, &a);
        }
        double *want = to_d(C, nc), *bound = dalloc(nc ? nc : 1);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double s = 0, sa = 0;
                for (int q = 0; q < K; q++) {
                    double av = ta ? A[(size_t)q * lda + i] : A[(size_t)i * lda + q];
                    double bv = tb ? B[(size_t)j * ldb + q] : B[(size_t)q * ldb + j];
                    s += av * bv;
                    sa += fabs(av * bv);
                }
                size_t ij = (size_t)i * ldc + j;
                bound[ij] = fabs(alpha) * (0x1p-7 + 0x1p-16 + gam(K)) * sa + gam(2) * fabs(beta * (double)C[ij]);
                want[ij] = alpha * s + beta * (double)C[ij];
            }
        char what[96];
        snprintf(what, sizeof what, "M=%d N=%d K=%d ta=%d tb=%d bf16 inputs: C (padding untouched)", M, N, K, ta, tb);
        cmp_tol(c, what, got, want, bound, nc, 0, 0);
        same_bits(c, "C", got, got2, F4(nc));
        xfree(A); xfree(B); xfree(C); xfree(got); xfree(got2); xfree(want); xfree(bound);
    }
    st = backend_set_gemm_dtype(be, GEMM_DTYPE_FP32);
    report(c, STATUS_OK(st), "gemm_bf16: the backend goes back to fp32 GEMMs");
}

/* ---------------------------------------------------------------------------------------
 * stored formats (dequant_rows, fake_quant): exact by contract, so bitwise against a reference
 * written here from quant.h's layouts and quantiser. Its FP16 rounding is independent of
 * cuda/quant_common.h's bit trick: a binary search in the table of every finite half (nearest,
 * ties to the even code; toward -inf / +inf for the INT4 zero and scale); the FP32 operations
 * of the quantiser (range / 15, (w - z) / s + 0.5, q s + z) are the contract's own. */
/* the half rounded toward -inf of finite x in [-65504, 65504] (x = -0 gives -0, else 0 is +0) */
static uint16_t ref_f16_down(float x) {
    if (x == 0.0f) return signbit(x) ? 0x8000 : 0x0000;
    if (x > 0) return (uint16_t)half_floor_code((double)x);
    int c = half_floor_code(-(double)x);                 /* |half| <= |x| */
    if (half_val((uint16_t)c) == -(double)x) return (uint16_t)(0x8000 | c);
    return (uint16_t)(0x8000 | (c + 1));
}
/* the half rounded toward +inf of finite x > 0, clamped to the largest finite (0x7BFF) */
static uint16_t ref_f16_up_pos(float x) {
    if ((double)x > 65504.0) return 0x7BFF;
    int c = half_floor_code((double)x);
    return half_val((uint16_t)c) == (double)x ? (uint16_t)c : (uint16_t)(c + 1);
}
static float ref_half_f(uint16_t h) { return (float)half_val(h); }

/* the INT4 quantiser of quant.h on x[rows, cols] in place (decode(encode(x))) */
static void ref_int4_fake(float *x, int rows, int cols, int group) {
    for (int c = 0; c < cols; c++)
        for (int i0 = 0; i0 < rows; i0 += group) {
            int i1 = i0 + group < rows ? i0 + group : rows;
            float mn = x[(size_t)i0 * cols + c], mx = mn;
            for (int i = i0 + 1; i < i1; i++) {
                float w = x[(size_t)i * cols + c];
                if (w < mn) mn = w;
                if (w > mx) mx = w;
            }
            if (mn < -65504.0f) mn = -65504.0f;
            if (mn > 65504.0f) mn = 65504.0f;
            float z = ref_half_f(ref_f16_down(mn)), range = mx - z, s = 0.0f;
            if (range > 0.0f) s = ref_half_f(ref_f16_up_pos(range / 15.0f));
            for (int i = i0; i < i1; i++) {
                float *w = &x[(size_t)i * cols + c];
                int q = 0;
                if (s > 0.0f) {
                    float t = floorf((*w - z) / s + 0.5f);
                    q = t < 0.0f ? 0 : t > 15.0f ? 15 : (int)t;
                }
                float v = (float)q * s;
                *w = v + z;
            }
        }
}

/* a random finite half: every exponent (subnormals, ±0 included) */
static uint16_t rand_half(Check *c) {
    uint16_t h;
    do h = (uint16_t)rng_below(&c->rng, 65536); while ((h & 0x7C00) == 0x7C00);
    return h;
}

static void run_dequant(Check *c, const Backend *be, float *out, int fmt, const void *data, size_t data_bytes,
                        const uint16_t *sc, const uint16_t *ze, size_t n_par, int rows, int cols, int group, int r0, int nr) {
    Arena a = {be, 0, {{0}}};
    float *o = a_out(&a, out, F4((size_t)nr * cols));
    const void *dd = a_in(&a, data, data_bytes);
    const uint16_t *ds = fmt == 2 ? a_in(&a, sc, n_par * 2) : NULL, *dz = fmt == 2 ? a_in(&a, ze, n_par * 2) : NULL;
    be->ops->dequant_rows(be->ctx, o, fmt, dd, ds, dz, rows, cols, group, r0, nr);
    a_finish(c, &a);
}
static void check_dequant_rows(Check *c) {
    static const int ROWS[] = {1, 2, 5, 17, 64, 67}, COLS[] = {1, 3, 16}, GROUPS[] = {2, 4, 64};
    for (int fmt = 1; fmt <= 2; fmt++)
        for (size_t ri = 0; ri < COUNT(ROWS); ri++)
            for (size_t ci = 0; ci < COUNT(COLS); ci++)
                for (size_t gi = 0; gi < (fmt == 2 ? COUNT(GROUPS) : 1); gi++) {
                    int rows = ROWS[ri], cols = COLS[ci], group = fmt == 2 ? GROUPS[gi] : 0;
                    int ng = fmt == 2 ? (rows + group - 1) / group : 0;
                    size_t cb = (size_t)(rows + 1) / 2, n_par = (size_t)cols * ng;
                    size_t data_bytes = fmt == 1 ? 2 * (size_t)rows * cols : cb * cols;
                    unsigned char *data = rand_bytes(c, data_bytes);
                    uint16_t *sc = xmalloc(2 * (n_par ? n_par : 1)), *ze = xmalloc(2 * (n_par ? n_par : 1));
                    if (fmt == 1)
                        for (size_t i = 0; i < (size_t)rows * cols; i++) { uint16_t h = rand_half(c); memcpy(data + 2 * i, &h, 2); }
                    for (size_t i = 0; i < n_par; i++) { sc[i] = rand_half(c) & 0x7FFF; ze[i] = rand_half(c); }
                    /* row ranges: all, empty, the last row, a middle run crossing a group edge */
                    int ranges[4][2] = {{0, rows}, {rows / 2, 0}, {rows - 1, 1}, {rows / 3, rows - rows / 3 - rows / 4}};
                    for (int k = 0; k < 4; k++) {
                        int r0 = ranges[k][0], nr = ranges[k][1];
                        float *want = falloc((size_t)nr * cols), *o1 = falloc((size_t)nr * cols), *o2 = falloc((size_t)nr * cols);
                        for (int i = r0; i < r0 + nr; i++)
                            for (int col = 0; col < cols; col++) {
                                float v;
                                if (fmt == 1) {
                                    uint16_t h;
                                    memcpy(&h, data + 2 * ((size_t)i * cols + col), 2);
                                    v = ref_half_f(h);
                                } else {
                                    unsigned char b = data[(size_t)col * cb + (size_t)i / 2];
                                    int q = (i & 1) ? b >> 4 : b & 15;
                                    size_t g = (size_t)col * ng + (size_t)(i / group);
                                    float s = ref_half_f(sc[g]), z = ref_half_f(ze[g]), t = (float)q * s;
                                    v = t + z;
                                }
                                want[(size_t)(i - r0) * cols + col] = v;
                            }
                        run_dequant(c, c->be, o1, fmt, data, data_bytes, sc, ze, n_par, rows, cols, group, r0, nr);
                        run_dequant(c, c->be, o2, fmt, data, data_bytes, sc, ze, n_par, rows, cols, group, r0, nr);
                        char what[96];
                        snprintf(what, sizeof what, "%s [%d,%d] group %d rows %d..%d", fmt == 1 ? "fp16" : "int4", rows, cols,
                                 group, r0, r0 + nr);
                        cmp_exact(c, what, o1, want, (size_t)nr * cols);
                        same_bits(c, "dst", o1, o2, F4((size_t)nr * cols));
                        if (!c->is_cpu) {
                            float *co = falloc((size_t)nr * cols);
                            run_dequant(c, c->cpu, co, fmt, data, data_bytes, sc, ze, n_par, rows, cols, group, r0, nr);
                            vs_cpu(c, what, o1, co, (size_t)nr * cols);
                            xfree(co);
                        }
                        xfree(want); xfree(o1); xfree(o2);
                    }
                    xfree(data); xfree(sc); xfree(ze);
                }
}

static void run_fake_quant(Check *c, const Backend *be, float *x, int fmt, int rows, int cols, int group) {
    Arena a = {be, 0, {{0}}};
    float *dx = a_io(&a, x, F4((size_t)rows * cols));
    be->ops->fake_quant(be->ctx, dx, fmt, rows, cols, group);
    a_finish(c, &a);
}
static void check_fake_quant(Check *c) {
    static const int ROWS[] = {0, 1, 3, 17, 64, 67, 130}, COLS[] = {1, 5, 16}, GROUPS[] = {2, 8, 64};
    for (int fmt = 1; fmt <= 2; fmt++)
        for (size_t ri = 0; ri < COUNT(ROWS); ri++)
            for (size_t ci = 0; ci < COUNT(COLS); ci++)
                for (size_t gi = 0; gi < (fmt == 2 ? COUNT(GROUPS) : 1); gi++) {
                    int rows = ROWS[ri], cols = COLS[ci], group = fmt == 2 ? GROUPS[gi] : 0;
                    size_t n = (size_t)rows * cols;
                    float *x = falloc(n ? n : 1);
                    for (int col = 0; col < cols; col++) {
                        double sd = ldexp(1.0, (int)rng_below(&c->rng, 30) - 20);     /* 2^-20 .. 2^9 */
                        for (int i = 0; i < rows; i++) x[(size_t)i * cols + col] = (float)(sd * rng_normal(&c->rng));
                    }
                    /* edge cases: a constant column, ±0, FP16 ties and subnormals, the FP16 range's ends */
                    if (rows > 0 && cols > 1)
                        for (int i = 0; i < rows; i++) x[(size_t)i * cols + 1] = i % 3 == 0 ? -0.0f : 0.0f;
                    if (rows > 0 && cols > 2) {
                        float v = (float)(0.5 * (half_val(0x3C00) + half_val(0x3C01)));   /* tie to even */
                        for (int i = 0; i < rows; i++) x[(size_t)i * cols + 2] = i & 1 ? v : 3.0f;
                    }
                    if (n > 4) { x[0] = 0x1p-20f; x[n - 1] = -0x1p-25f; x[n / 2] = 65504.0f; x[n / 3] = -70000.0f; }
                    if (fmt == 1 && n > 6) { x[1] = INFINITY; x[n - 2] = NAN; x[n - 3] = 65520.0f; x[2] = 0x1.8p-24f; }
                    float *want = fdup(x, n), *o1 = fdup(x, n), *o2 = fdup(x, n);
                    if (fmt == 1)
                        for (size_t i = 0; i < n; i++) {
                            uint16_t h = ref_f16_rn(x[i]);
                            want[i] = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) ? (signbit(x[i]) ? -NAN : NAN) : ref_half_f(h);
                            if (isnan(want[i])) { uint32_t b = (h & 0x8000 ? 0x80000000u : 0) | 0x7FC00000u; memcpy(&want[i], &b, 4); }
                        }
                    else ref_int4_fake(want, rows, cols, group);
                    run_fake_quant(c, c->be, o1, fmt, rows, cols, group);
                    run_fake_quant(c, c->be, o2, fmt, rows, cols, group);
                    char what[96];
                    snprintf(what, sizeof what, "%s [%d,%d] group %d", fmt == 1 ? "fp16" : "int4", rows, cols, group);
                    cmp_exact(c, what, o1, want, n);
                    same_bits(c, "x", o1, o2, F4(n));
                    if (!c->is_cpu) {
                        float *co = fdup(x, n);
                        run_fake_quant(c, c->cpu, co, fmt, rows, cols, group);
                        vs_cpu(c, what, o1, co, n);
                        xfree(co);
                    }
                    xfree(x); xfree(want); xfree(o1); xfree(o2);
                }
}

/* ---------------------------------------------------------------------------------------
 * offloading's transfers (host_alloc_pinned .. sync_event): bytes, bitwise. The ordering
 * contracts are checked through their effects: a transfer sees the compute enqueued before it
 * (an axpy just before a copy_to_host_async), compute after wait_event sees the transfer (a
 * scale just after), and a pinned source may be reused after sync_event. */
static void check_host_alloc_pinned(Check *c) {
    const Backend *be = c->be;
    for (size_t k = 0; k < COUNT(BYTE_SIZES); k++) {
        size_t n = BYTE_SIZES[k];
        unsigned char *p = be->ops->host_alloc_pinned(be->ctx, n), *zero = xcalloc(n ? n : 1);
        report(c, p != NULL && ((uintptr_t)p % 16) == 0, "host_alloc_pinned: %zu bytes: pointer %p 16-byte aligned", n, (void *)p);
        if (!p) { xfree(zero); continue; }
        char what[64];
        snprintf(what, sizeof what, "%zu pinned bytes start zeroed", n);
        bytes_equal(c, what, p, zero, n);
        unsigned char *r = rand_bytes(c, n);
        if (n) memcpy(p, r, n);   /* host memory: the host writes and reads it */
        snprintf(what, sizeof what, "%zu pinned bytes written and read by the host", n);
        bytes_equal(c, what, p, r, n);
        be->ops->host_free_pinned(be->ctx, p);
        xfree(zero); xfree(r);
    }
}

static void check_host_free_pinned(Check *c) {
    const Backend *be = c->be;
    be->ops->host_free_pinned(be->ctx, NULL);   /* a no-op */
    size_t n = 4096;
    unsigned char *want = rand_bytes(c, n);
    for (int i = 0; i < 50; i++) {            /* alloc / free cycles reuse memory cleanly */
        unsigned char *p = be->ops->host_alloc_pinned(be->ctx, n);
        memcpy(p, want, n);
        if (i == 49) bytes_equal(c, "50th alloc/free cycle holds what was written", p, want, n);
        be->ops->host_free_pinned(be->ctx, p);
    }
    xfree(want);
}

static void check_copy_to_device_async(Check *c) {
    const Backend *be = c->be;
    for (size_t k = 0; k < COUNT(BYTE_SIZES); k++) {
        size_t n = BYTE_SIZES[k], off = (size_t)rng_below(&c->rng, 9), total = n + off + 7;
        unsigned char *src = be->ops->host_alloc_pinned(be->ctx, n), *r = rand_bytes(c, n);
        unsigned char *want = rand_bytes(c, total), *got = xmalloc(total);
        if (n) memcpy(src, r, n);
        unsigned char *d = be->ops->alloc(be->ctx, total);
        be->ops->from_host(be->ctx, d, want, total);
        uint64_t ev = be->ops->copy_to_device_async(be->ctx, d + off, src, n);
        be->ops->sync_event(be->ctx, ev);
        if (n) memset(src, 0xA5, n);            /* reusing the source after sync_event is safe */
        if (n) memcpy(want + off, r, n);
        be->ops->wait_event(be->ctx, ev);
        be->ops->to_host(be->ctx, got, d, total);
        char what[80];
        snprintf(what, sizeof what, "%zu bytes at offset %zu (guards kept)", n, off);
        bytes_equal(c, what, got, want, total);
        be->ops->free(be->ctx, d);
        be->ops->host_free_pinned(be->ctx, src);
        xfree(r); xfree(want); xfree(got);
    }
}

static void check_copy_to_host_async(Check *c) {
    const Backend *be = c->be;
    size_t n = 100003;
    float *x = randn(c, n, 0, 1), *y = randn(c, n, 0, 1);
    float *dx = be->ops->alloc(be->ctx, F4(n)), *dy = be->ops->alloc(be->ctx, F4(n));
    be->ops->from_host(be->ctx, dx, x, F4(n));
    be->ops->from_host(be->ctx, dy, y, F4(n));
    float *got = be->ops->host_alloc_pinned(be->ctx, F4(n + 2));
    got[0] = got[n + 1] = 7.0f;
    for (int r = 0; r < 4; r++) {
        be->ops->axpy(be->ctx, dy, dx, 0.5f, n);   /* enqueued compute: the copy must see it */
        for (size_t i = 0; i < n; i++) y[i] += 0.5f * x[i];
    }
    uint64_t ev = be->ops->copy_to_host_async(be->ctx, got + 1, dy, F4(n));
    be->ops->sync_event(be->ctx, ev);
    be->ops->sync_event(be->ctx, ev);               /* twice is fine */
    cmp_exact(c, "4 queued axpy, then the copy, then sync_event", got + 1, y, n);
    report(c, got[0] == 7.0f && got[n + 1] == 7.0f, "copy_to_host_async: guards kept");
    be->ops->free(be->ctx, dx);
    be->ops->free(be->ctx, dy);
    be->ops->host_free_pinned(be->ctx, got);
    xfree(x); xfree(y);
}

/* several transfers into parts of one buffer; compute after each part's wait_event */
static void check_wait_event(Check *c) {
    const Backend *be = c->be;
    be->ops->wait_event(be->ctx, 0);   /* event 0: a no-op */
    size_t n = 4 * 25013;
    float *x = randn(c, n, 0, 1), *want = fdup(x, n), *got = falloc(n);
    float *src = be->ops->host_alloc_pinned(be->ctx, F4(n));
    memcpy(src, x, F4(n));
    float *d = be->ops->alloc(be->ctx, F4(n));
    uint64_t ev[4];
    for (int p = 0; p < 4; p++)
        ev[p] = be->ops->copy_to_device_async(be->ctx, d + p * (n / 4), src + p * (n / 4), F4(n / 4));
    for (int p = 3; p >= 0; p--) {            /* waits out of order: each part's own event */
        be->ops->wait_event(be->ctx, ev[p]);
        be->ops->scale(be->ctx, d + p * (n / 4), (float)(p + 2), n / 4);
        for (size_t i = p * (n / 4); i < (p + 1) * (n / 4); i++) want[i] *= (float)(p + 2);
    }
    be->ops->to_host(be->ctx, got, d, F4(n));
    cmp_exact(c, "4 transfers, each part scaled after its wait_event", got, want, n);
    for (int p = 0; p < 4; p++) be->ops->sync_event(be->ctx, ev[p]);
    be->ops->free(be->ctx, d);
    be->ops->host_free_pinned(be->ctx, src);
    xfree(x); xfree(want); xfree(got);
}

/* the host waits for a transfer, then reuses its pinned source for the next one */
static void check_sync_event(Check *c) {
    const Backend *be = c->be;
    be->ops->sync_event(be->ctx, 0);   /* event 0: a no-op */
    size_t n = 65537;
    unsigned char *stage = be->ops->host_alloc_pinned(be->ctx, n), *want = rand_bytes(c, 3 * n);
    unsigned char *got = xmalloc(3 * n), *d = be->ops->alloc(be->ctx, 3 * n);
    for (int p = 0; p < 3; p++) {
        memcpy(stage, want + p * n, n);
        uint64_t ev = be->ops->copy_to_device_async(be->ctx, d + p * n, stage, n);
        be->ops->sync_event(be->ctx, ev);
    }
    be->ops->to_host(be->ctx, got, d, 3 * n);
    bytes_equal(c, "one pinned stage reused for 3 transfers after sync_event", got, want, 3 * n);
    be->ops->free(be->ctx, d);
    be->ops->host_free_pinned(be->ctx, stage);
    xfree(want); xfree(got);
}

/* ---------------------------------------------------------------------------------------
 * the table: every BackendOps slot (by offset, so a misspelt slot does not compile and a
 * missing one is caught at start-up), then the kernels_common.h checks */
typedef struct OpCheck { const char *name; size_t offset; void (*fn)(Check *); } OpCheck;
#define SLOT(s) {#s, offsetof(BackendOps, s), check_##s}
#define NOT_A_SLOT ((size_t)-1)
static const OpCheck OPS[] = {
    SLOT(alloc), SLOT(free), SLOT(to_host), SLOT(from_host), SLOT(copy), SLOT(zero), SLOT(sync), SLOT(gemm),
    SLOT(embed_forward), SLOT(embed_backward), SLOT(layernorm_forward), SLOT(layernorm_backward),
    SLOT(attention_forward), SLOT(attention_backward), SLOT(act_forward), SLOT(act_backward),
    SLOT(axpy), SLOT(scale), SLOT(sumsq), SLOT(xent_forward), SLOT(xent_backward),
    SLOT(gather_rows), SLOT(scatter_add_rows), SLOT(gather_dot), SLOT(pool_forward), SLOT(pool_backward),
    SLOT(adamw), SLOT(combine_rows), SLOT(gather_rows_scaled),
    SLOT(route_topk), SLOT(route_two_stage), SLOT(route_count), SLOT(route_keep), SLOT(route_pair_keep),
    SLOT(route_backward), SLOT(dequant_rows), SLOT(fake_quant),
    SLOT(host_alloc_pinned), SLOT(host_free_pinned), SLOT(copy_to_device_async), SLOT(copy_to_host_async),
    SLOT(wait_event), SLOT(sync_event), SLOT(destroy),
    {"kc_exp", NOT_A_SLOT, check_kc_exp}, {"kc_gelu", NOT_A_SLOT, check_kc_gelu},
    {"kc_swiglu", NOT_A_SLOT, check_kc_swiglu}, {"kc_adamw", NOT_A_SLOT, check_kc_adamw},
    {"gemm_bf16", NOT_A_SLOT, check_gemm_bf16},
};
#define N_SLOTS 44
_Static_assert(sizeof(BackendOps) == sizeof(const char *) + N_SLOTS * sizeof(void (*)(void)),
               "BackendOps gained or lost a slot: add its check to OPS in tests/checkbackend.c");

/* every slot appears once in OPS */
static int table_complete(void) {
    int seen[N_SLOTS] = {0}, n = 0;
    for (size_t i = 0; i < COUNT(OPS); i++) {
        if (OPS[i].offset == NOT_A_SLOT) continue;
        size_t k = (OPS[i].offset - sizeof(const char *)) / sizeof(void (*)(void));
        if (k >= N_SLOTS || seen[k]++) return 0;
        n++;
    }
    return n == N_SLOTS;
}
static int slot_filled(const Backend *be, const OpCheck *op) {
    if (op->offset == NOT_A_SLOT) return 1;
    void (*fn)(void);
    memcpy(&fn, (const char *)be->ops + op->offset, sizeof fn);
    return fn != NULL;
}

/* ---------------------------------------------------------------------------------------
 * --bench: the backend's time per call on one mid-size shape per op (device time between
 * syncs; inputs are random, so the numbers are for comparison between backends only) */
#define BENCH(label, call) do { \
        call; be->ops->sync(be->ctx); \
        double t0_ = time_now(); int reps_ = 0; \
        do { call; reps_++; be->ops->sync(be->ctx); } while (time_now() - t0_ < 0.2 && reps_ < 1000); \
        printf("# bench %-20s %-24s %10.1f us/call\n", label, shape, 1e6 * (time_now() - t0_) / reps_); \
    } while (0)

static void bench(Check *c) {
    const Backend *be = c->be;
    const BackendOps *o = be->ops;
    void *x = be->ctx;
    int B = 8, T = 256, D = 512, H = 8, F = 2048, V = 8192, N = B * T;
    size_t big = (size_t)N * (V > 3 * D ? V : 3 * D);
    if ((size_t)N * 2 * F > big) big = (size_t)N * 2 * F;
    float *h = randn(c, big, 0, 1);
    int32_t *tok = randi(c, N, 0, V), *len = randi(c, B, 1, T + 1), *pos = randi(c, (size_t)N * 2, 0, N);
    float *d1 = o->alloc(x, F4(big)), *d2 = o->alloc(x, F4(big)), *d3 = o->alloc(x, F4(big));
    float *att = o->alloc(x, F4((size_t)B * H * T * T)), *scr = o->alloc(x, F4((size_t)B * H * T * T));
    float *st = o->alloc(x, F4((size_t)2 * N)), *st2 = o->alloc(x, F4((size_t)2 * N));
    int32_t *dtok = o->alloc(x, I4(N)), *dlen = o->alloc(x, I4(B)), *dpos = o->alloc(x, I4((size_t)N * 2));
    o->from_host(x, d1, h, F4(big));
    o->from_host(x, d2, h, F4(big));
    o->from_host(x, dtok, tok, I4(N));
    o->from_host(x, dlen, len, I4(B));
    o->from_host(x, dpos, pos, I4((size_t)N * 2));
    for (size_t i = 0; i < (size_t)2 * N; i++) h[i] = 0.5f + 0.1f * h[i];
    o->from_host(x, st2, h, F4((size_t)2 * N));
    char shape[64];
    snprintf(shape, sizeof shape, "%dx%dx%d", N, D, 4 * D);
    BENCH("gemm", o->gemm(x, false, false, N, 4 * D, D, 1.0f, d1, D, d2, 4 * D, 0.0f, d3, 4 * D));
    snprintf(shape, sizeof shape, "N=%d D=%d", N, D);
    BENCH("layernorm_forward", o->layernorm_forward(x, d3, st, st2, d1, d2, d2, N, D));
    BENCH("layernorm_backward", o->layernorm_backward(x, d3, d2, d2 + D, d1, d1, d2 + 2 * D, st, st2, N, D));
    BENCH("embed_forward", o->embed_forward(x, d3, dtok, d1, d2, B, T, D));
    BENCH("embed_backward", o->embed_backward(x, d3, d2, d1, dtok, B, T, D));
    BENCH("gather_rows", o->gather_rows(x, d3, d1, dtok, N, D));
    BENCH("scatter_add_rows", o->scatter_add_rows(x, d3, d1, dtok, st2, N, D));
    BENCH("gather_dot", o->gather_dot(x, st, d1, d2, dtok, N, D));
    BENCH("combine_rows", o->combine_rows(x, d3, d1, dpos, st2, N, 2, D));
    BENCH("gather_rows_scaled", o->gather_rows_scaled(x, d3, d1, dtok, st2, N, D));
    snprintf(shape, sizeof shape, "B=%d T=%d D=%d H=%d", B, T, D, H);
    BENCH("attention_forward", o->attention_forward(x, d3, att, d1, B, T, D, H));
    BENCH("attention_backward", o->attention_backward(x, d3, scr, d2, d1, att, B, T, D, H));
    snprintf(shape, sizeof shape, "N=%d F=%d", N, F);
    BENCH("act_forward gelu", o->act_forward(x, ACT_KIND_GELU, d3, d1, N, F));
    BENCH("act_backward swiglu", o->act_backward(x, ACT_KIND_SWIGLU, d3, d1, d2, N, F));
    snprintf(shape, sizeof shape, "N=%d V=%d", N, V);
    BENCH("xent_forward", o->xent_forward(x, st, d1, dtok, N, V));
    BENCH("xent_backward", o->xent_backward(x, d3, d1, dtok, 0.01f, N, V));
    snprintf(shape, sizeof shape, "B=%d T=%d D=%d", B, T, D);
    BENCH("pool_forward mean", o->pool_forward(x, POOL_KIND_MEAN, d3, d1, dlen, B, T, D));
    BENCH("pool_backward mean", o->pool_backward(x, POOL_KIND_MEAN, d3, d1, dlen, B, T, D));
    size_t nv = (size_t)B * H * T * T;
    snprintf(shape, sizeof shape, "n=%zu", nv);
    BENCH("sumsq", (void)o->sumsq(x, d1, nv));
    BENCH("axpy", o->axpy(x, d3, d1, 1e-3f, nv));
    BENCH("adamw", o->adamw(x, d3, d1, att, scr, nv, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 3));
    float *bufs[] = {d1, d2, d3, att, scr, st, st2};
    for (size_t i = 0; i < COUNT(bufs); i++) o->free(x, bufs[i]);
    o->free(x, dtok); o->free(x, dlen); o->free(x, dpos);
    xfree(h); xfree(tok); xfree(len); xfree(pos);
}

/* ---------------------------------------------------------------------------------------
 * main */
static void usage(void) {
    fprintf(stderr, "usage: checkbackend [--backend cpu|cuda] [--seed N] [--op NAME] [--bench]\nops:");
    for (size_t i = 0; i < COUNT(OPS); i++) fprintf(stderr, " %s", OPS[i].name);
    fprintf(stderr, "\nDCMOE_CHECK_BREAK=NAME plants an error in that op's output (the run must then fail)\n");
}
static int known_op(const char *name) {
    for (size_t i = 0; i < COUNT(OPS); i++) if (!strcmp(OPS[i].name, name)) return 1;
    return 0;
}

static void run_one(Check *c, size_t i) {
    c->op = OPS[i].name;
    rng_init(&c->rng, c->seed, i + 1, RNG_TEST);
    c->guard_bad = 0;
    c->n_buffers = 0;
    OPS[i].fn(c);
    if (c->n_buffers)
        report(c, c->guard_bad == 0, "%s: no write outside an output or into an input (%d device buffers, 64-byte canaries)",
               c->op, c->n_buffers);
}

int main(int argc, char **argv) {
    const char *backend = "cpu", *only = NULL;
    uint64_t seed = 1;
    int do_bench = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--backend") && i + 1 < argc) backend = argv[++i];
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--op") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--bench")) do_bench = 1;
        else { usage(); return 2; }
    }
    if (strcmp(backend, "cpu") && strcmp(backend, "cuda")) { usage(); return 2; }
    if (only && !known_op(only)) { fprintf(stderr, "checkbackend: unknown op '%s'\n", only); usage(); return 2; }
    const char *brk = getenv("DCMOE_CHECK_BREAK");
    if (brk && !*brk) brk = NULL;
    if (brk && !known_op(brk)) { fprintf(stderr, "checkbackend: DCMOE_CHECK_BREAK=%s: unknown op\n", brk); usage(); return 2; }
    if (!table_complete()) { fprintf(stderr, "checkbackend: the op table does not list every BackendOps slot once\n"); return 1; }

    Backend cpu, dev, *be = &cpu;
    backend_cpu_init(&cpu, 1);
    if (!strcmp(backend, "cuda")) {
        Status st = backend_cuda_init(&dev, 0);
        if (!STATUS_OK(st)) {
            printf("# skipped: %s\n", st.msg);
            backend_free(&cpu);
            return 77;
        }
        be = &dev;
    }
    Check c = {0};
    c.be = be;
    c.cpu = &cpu;
    c.is_cpu = be == &cpu;
    c.seed = seed;
    c.op = "backend_check";
    c.brk = brk;
    printf("# checkbackend: backend %s, seed %llu%s%s%s\n", be->ops->name, (unsigned long long)seed,
           brk ? ", planted error in " : "", brk ? brk : "", brk ? " (this run must fail)" : "");
    Status st = backend_check(be);
    report(&c, STATUS_OK(st), "backend_check accepts the %s backend (every slot filled)%s%s", be->ops->name,
           STATUS_OK(st) ? "" : ": ", st.msg);

    int n_run = 0;
    for (size_t i = 0; i < COUNT(OPS); i++) {
        if (only && strcmp(only, OPS[i].name)) continue;
        if (!slot_filled(be, &OPS[i])) {
            c.op = OPS[i].name;
            report(&c, 0, "%s: the %s backend leaves this slot empty", OPS[i].name, be->ops->name);
            continue;
        }
        run_one(&c, i);
        n_run++;
    }
    /* self-test: with a planted error every op's checks must fail */
    if (!brk) {
        for (size_t i = 0; i < COUNT(OPS); i++) {
            if ((only && strcmp(only, OPS[i].name)) || !slot_filled(be, &OPS[i])) continue;
            Check q = c;
            q.quiet = 1;
            q.quiet_fail = 0;
            q.brk = OPS[i].name;
            run_one(&q, i);
            c.op = OPS[i].name;
            report(&c, q.quiet_fail > 0, "self-test: %s: a planted error in its output is detected (%d checks failed)",
                   OPS[i].name, q.quiet_fail);
        }
    }
    printf("# %d checks run (%s backend)\n", n_run, be->ops->name);
    if (do_bench) bench(&c);
    if (be != &cpu) backend_free(be);
    backend_free(&cpu);
    return harness_done();
}
