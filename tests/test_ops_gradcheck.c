/* test_ops_gradcheck: every CPU backend op against a naive double-precision reference
 * (forward values) and every backward against central finite differences of
 * L = sum(w * y) for a fixed random w: one directional derivative per tensor plus ~20 single
 * coordinates. Also: backward ops accumulate (twice = 2x), AdamW vs a double reimplementation,
 * gemm transposes / leading dims / zero sizes, determinism, backend_check. Suite: gradcheck.
 *
 * Legend: B T D F V H N = batch, seq, d_model, d_ff, vocab, heads, rows; hd = D/H. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "harness.h"
#include "util.h"

static Backend be;
static const BackendOps *O;
static Rng rng;

/* ---- helpers ---------------------------------------------------------------------------- */

static float *randn(size_t n, float mean, float sd) {
    float *x = xmalloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] = mean + sd * rng_normal(&rng);
    return x;
}

static float *zeros(size_t n) { return xcalloc(sizeof(float) * n); }

static float *dup(const float *x, size_t n) {
    float *y = xmalloc(sizeof(float) * n);
    memcpy(y, x, sizeof(float) * n);
    return y;
}

/* sum w[n] * y[n] in double */
static double wsum(const float *w, const float *y, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)w[i] * (double)y[i];
    return s;
}

/* compare float got[n] with double want[n] */
static int close_f(const char *what, const float *got, const double *want, size_t n, double atol, double rtol) {
    double *a = xmalloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) a[i] = got[i];
    int r = close_enough(what, a, want, n, atol, rtol);
    xfree(a);
    return r;
}

/* g2 (after two backward calls) must be 2 * g1 (after one) */
static void check_twice(const char *what, const float *g1, const float *g2, size_t n) {
    char name[160];
    str_fmt(name, sizeof name, "%s accumulates (2 calls = 2x)", what);
    double *want = xmalloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) want[i] = 2.0 * g1[i];
    close_f(name, g2, want, n, 1e-6, 1e-5);
    xfree(want);
}

typedef double (*LossFn)(void *st);

#define N_COORDS 20

/* Finite-difference check of the analytic gradient g[n] of L = loss(st) with respect to the
 * float tensor x[n] (perturbed in place, restored bit for bit) with step h (chosen per tensor:
 * ~1e-2 of the input's natural scale, which for shift-invariant inputs such as logits is not
 * their rms). The realised float perturbation (x+ - x-) is used, so rounding x adds no error.
 * (a) directional: L(x + h v) - L(x - h v) vs <g, x+ - x->, |err| <= dtol * (|fd| + sum|g_i dx_i|)
 * (b) N_COORDS single coordinates with close_enough(atol, rtol). */
static void gradcheck(const char *what, LossFn loss, void *st, float *x, const float *g, size_t n,
                      double h, double dtol, double atol, double rtol) {
    float *x0 = dup(x, n), *xp = xmalloc(sizeof(float) * n), *xm = xmalloc(sizeof(float) * n);

    /* (a) directional derivative along a random v */
    for (size_t i = 0; i < n; i++) {
        double v = rng_normal(&rng);
        xp[i] = (float)(x0[i] + h * v);
        xm[i] = (float)(x0[i] - h * v);
    }
    memcpy(x, xp, sizeof(float) * n);
    double lp = loss(st);
    memcpy(x, xm, sizeof(float) * n);
    double lm = loss(st);
    memcpy(x, x0, sizeof(float) * n);
    double fd = lp - lm, pred = 0, mag = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)xp[i] - (double)xm[i];
        pred += (double)g[i] * d;
        mag += fabs((double)g[i] * d);
    }
    double err = fabs(fd - pred), tol = dtol * (fabs(fd) + mag) + 1e-12;
    ok(err <= tol, "%s: directional derivative fd %.9g vs analytic %.9g (err %.3g, rel %.3g, tol %.3g)",
       what, fd, pred, err, err / (fabs(fd) + mag + 1e-30), tol);

    /* (b) single coordinates */
    size_t nc = n < N_COORDS ? n : N_COORDS;
    double got[N_COORDS], want[N_COORDS];
    for (size_t c = 0; c < nc; c++) {
        size_t i = n <= N_COORDS ? c : (size_t)rng_below(&rng, n);
        float p = (float)(x0[i] + h), m = (float)(x0[i] - h);
        x[i] = p;
        double l1 = loss(st);
        x[i] = m;
        double l2 = loss(st);
        x[i] = x0[i];
        want[c] = (l1 - l2) / ((double)p - (double)m);
        got[c] = g[i];
    }
    char name[160];
    str_fmt(name, sizeof name, "%s: %zu coordinates vs central differences", what, nc);
    close_enough(name, got, want, nc, atol, rtol);
    ok(memcmp(x, x0, sizeof(float) * n) == 0, "%s: input restored", what);
    xfree(x0); xfree(xp); xfree(xm);
}

/* default tolerances for a smooth op with O(1) gradients */
#define STEP 1e-2
#define DTOL 1e-3
#define ATOL 3e-4
#define RTOL 1e-2

/* ---- gemm -------------------------------------------------------------------------------- */

/* C[M,N] (ld ldc) = alpha op(A) op(B) + beta C in double */
static void gemm_ref(bool ta, bool tb, int M, int N, int K, double alpha, const float *A, int lda,
                     const float *B, int ldb, double beta, const float *C, int ldc, double *out) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++) {
                double a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                double b = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                s += a * b;
            }
            out[(size_t)i * ldc + j] = alpha * s + (beta == 0 ? 0.0 : beta * C[(size_t)i * ldc + j]);
        }
}

static void test_gemm_forward(void) {
    int M = 13, N = 9, K = 7;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
            int lda = ac + 3, ldb = bc + 2, ldc = N + 5;
            float *A = randn((size_t)ar * lda, 0, 1), *Bm = randn((size_t)br * ldb, 0, 1);
            float *C = randn((size_t)M * ldc, 0, 1);
            double *want = xmalloc(sizeof(double) * M * ldc);
            for (size_t i = 0; i < (size_t)M * ldc; i++) want[i] = C[i];   /* pad columns untouched */
            gemm_ref(ta, tb, M, N, K, 0.7, A, lda, Bm, ldb, 0.3, C, ldc, want);
            O->gemm(be.ctx, ta, tb, M, N, K, 0.7f, A, lda, Bm, ldb, 0.3f, C, ldc);
            char name[64];
            str_fmt(name, sizeof name, "gemm ta=%d tb=%d strided, alpha/beta", ta, tb);
            close_f(name, C, want, (size_t)M * ldc, 1e-5, 1e-5);
            xfree(A); xfree(Bm); xfree(C); xfree(want);
        }
    /* zero sizes: M = 0 and N = 0 touch nothing; K = 0 gives C = beta*C (beta 0: zeros, even over NaN) */
    float C[6] = {1, 2, 3, 4, 5, 6}, A[1] = {0}, Bm[1] = {0};
    O->gemm(be.ctx, false, false, 0, 3, 4, 1.0f, A, 4, Bm, 3, 0.0f, C, 3);
    O->gemm(be.ctx, false, false, 2, 0, 4, 1.0f, A, 4, Bm, 1, 0.0f, C, 3);
    ok(C[0] == 1 && C[5] == 6, "gemm with M=0 or N=0 is a no-op");
    O->gemm(be.ctx, false, false, 2, 3, 0, 1.0f, A, 1, Bm, 3, 0.5f, C, 3);
    ok(C[0] == 0.5f && C[5] == 3.0f, "gemm with K=0 scales C by beta");
    C[2] = NAN;
    O->gemm(be.ctx, false, false, 2, 3, 0, 1.0f, A, 1, Bm, 3, 0.0f, C, 3);
    ok(C[0] == 0 && C[2] == 0 && C[5] == 0, "gemm with K=0, beta=0 writes zeros");
}

/* linear layer y[N,O] = x[N,I] (ld I+3) W[I,O], backward through gemm with transposes */
typedef struct LinSt { float *x, *W, *y, *w; int N, I, Out, ldx; } LinSt;

static double lin_loss(void *p) {
    LinSt *s = p;
    O->gemm(be.ctx, false, false, s->N, s->Out, s->I, 1.0f, s->x, s->ldx, s->W, s->Out, 0.0f, s->y, s->Out);
    return wsum(s->w, s->y, (size_t)s->N * s->Out);
}

static void lin_backward(LinSt *s, float *dx, float *dW) {
    /* dx[N,I] += dy W^T ; dW[I,O] += x^T dy */
    O->gemm(be.ctx, false, true, s->N, s->I, s->Out, 1.0f, s->w, s->Out, s->W, s->Out, 1.0f, dx, s->ldx);
    O->gemm(be.ctx, true, false, s->I, s->Out, s->N, 1.0f, s->x, s->ldx, s->w, s->Out, 1.0f, dW, s->Out);
}

static void test_gemm_grad(void) {
    LinSt s = {.N = 11, .I = 9, .Out = 6};
    s.ldx = s.I + 3;
    size_t nx = (size_t)s.N * s.ldx, nw = (size_t)s.I * s.Out, ny = (size_t)s.N * s.Out;
    s.x = randn(nx, 0, 1); s.W = randn(nw, 0, 0.5f); s.y = zeros(ny); s.w = randn(ny, 0, 1);
    float *dx = zeros(nx), *dW = zeros(nw);
    lin_backward(&s, dx, dW);
    gradcheck("gemm linear dx (ld=I+3)", lin_loss, &s, s.x, dx, nx, STEP, DTOL, 1e-4, 1e-3);
    gradcheck("gemm linear dW", lin_loss, &s, s.W, dW, nw, STEP, DTOL, 1e-4, 1e-3);
    float *dx1 = dup(dx, nx), *dW1 = dup(dW, nw);
    lin_backward(&s, dx, dW);
    check_twice("gemm linear dx", dx1, dx, nx);
    check_twice("gemm linear dW", dW1, dW, nw);
    xfree(s.x); xfree(s.W); xfree(s.y); xfree(s.w); xfree(dx); xfree(dW); xfree(dx1); xfree(dW1);
}

/* ---- embedding --------------------------------------------------------------------------- */

typedef struct EmbSt { float *wte, *wpe, *out, *w; int32_t *tok; int B, T, D; } EmbSt;

static double emb_loss(void *p) {
    EmbSt *s = p;
    O->embed_forward(be.ctx, s->out, s->tok, s->wte, s->wpe, s->B, s->T, s->D);
    return wsum(s->w, s->out, (size_t)s->B * s->T * s->D);
}

static void test_embed(void) {
    EmbSt s = {.B = 2, .T = 5, .D = 6};
    int V = 7;
    int32_t tok[10] = {3, 1, 3, 0, 6, 3, 3, 2, 1, 5};   /* repeats: the scatter must sum them */
    s.tok = tok;
    size_t nte = (size_t)V * s.D, npe = (size_t)s.T * s.D, ny = (size_t)s.B * s.T * s.D;
    s.wte = randn(nte, 0, 1); s.wpe = randn(npe, 0, 1); s.out = zeros(ny); s.w = randn(ny, 0, 1);
    emb_loss(&s);
    double *want = xmalloc(sizeof(double) * ny);
    for (int n = 0; n < s.B * s.T; n++)
        for (int d = 0; d < s.D; d++)
            want[(size_t)n * s.D + d] = (double)s.wte[(size_t)tok[n] * s.D + d] + s.wpe[(size_t)(n % s.T) * s.D + d];
    close_f("embed forward", s.out, want, ny, 1e-6, 1e-6);
    float *dte = zeros(nte), *dpe = zeros(npe);
    O->embed_backward(be.ctx, dte, dpe, s.w, tok, s.B, s.T, s.D);
    gradcheck("embed dwte", emb_loss, &s, s.wte, dte, nte, STEP, DTOL, 1e-4, 1e-3);
    gradcheck("embed dwpe", emb_loss, &s, s.wpe, dpe, npe, STEP, DTOL, 1e-4, 1e-3);
    float *d1 = dup(dte, nte), *d2 = dup(dpe, npe);
    O->embed_backward(be.ctx, dte, dpe, s.w, tok, s.B, s.T, s.D);
    check_twice("embed dwte", d1, dte, nte);
    check_twice("embed dwpe", d2, dpe, npe);
    xfree(want); xfree(s.wte); xfree(s.wpe); xfree(s.out); xfree(s.w);
    xfree(dte); xfree(dpe); xfree(d1); xfree(d2);
}

/* ---- layernorm --------------------------------------------------------------------------- */

typedef struct LnSt { float *x, *wt, *b, *out, *mean, *rstd, *w; int N, D; } LnSt;

static double ln_loss(void *p) {
    LnSt *s = p;
    O->layernorm_forward(be.ctx, s->out, s->mean, s->rstd, s->x, s->wt, s->b, s->N, s->D);
    return wsum(s->w, s->out, (size_t)s->N * s->D);
}

static void test_layernorm(void) {
    LnSt s = {.N = 6, .D = 37};   /* D not a multiple of the 16 reduction lanes */
    size_t n = (size_t)s.N * s.D;
    s.x = randn(n, 0.5f, 2.0f); s.wt = randn((size_t)s.D, 1, 0.3f); s.b = randn((size_t)s.D, 0, 0.3f);
    s.out = zeros(n); s.mean = zeros((size_t)s.N); s.rstd = zeros((size_t)s.N); s.w = randn(n, 0, 1);
    ln_loss(&s);
    double *want = xmalloc(sizeof(double) * n), *wm = xmalloc(sizeof(double) * s.N), *wr = xmalloc(sizeof(double) * s.N);
    for (int r = 0; r < s.N; r++) {
        const float *x = s.x + (size_t)r * s.D;
        double m = 0, v = 0;
        for (int d = 0; d < s.D; d++) m += x[d];
        m /= s.D;
        for (int d = 0; d < s.D; d++) v += (x[d] - m) * (x[d] - m);
        v /= s.D;
        double rs = 1.0 / sqrt(v + 1e-5);
        wm[r] = m; wr[r] = rs;
        for (int d = 0; d < s.D; d++) want[(size_t)r * s.D + d] = (x[d] - m) * rs * s.wt[d] + s.b[d];
    }
    close_f("layernorm forward", s.out, want, n, 1e-5, 1e-5);
    close_f("layernorm mean", s.mean, wm, (size_t)s.N, 1e-6, 1e-5);
    close_f("layernorm rstd (eps 1e-5, biased var)", s.rstd, wr, (size_t)s.N, 1e-6, 1e-5);
    /* eps is 1e-5: a constant row has rstd = 1/sqrt(1e-5) */
    float cx[4] = {2, 2, 2, 2}, cw[4] = {1, 1, 1, 1}, cb[4] = {0}, co[4], cm, cr;
    O->layernorm_forward(be.ctx, co, &cm, &cr, cx, cw, cb, 1, 4);
    double wcr = 1.0 / sqrt(1e-5);
    close_f("layernorm constant row rstd", &cr, &wcr, 1, 0, 1e-5);

    float *dx = zeros(n), *dwt = zeros((size_t)s.D), *db = zeros((size_t)s.D);
    O->layernorm_backward(be.ctx, dx, dwt, db, s.w, s.x, s.wt, s.mean, s.rstd, s.N, s.D);
    gradcheck("layernorm dx", ln_loss, &s, s.x, dx, n, STEP, DTOL, ATOL, RTOL);
    gradcheck("layernorm dw", ln_loss, &s, s.wt, dwt, (size_t)s.D, STEP, DTOL, ATOL, RTOL);
    gradcheck("layernorm db", ln_loss, &s, s.b, db, (size_t)s.D, STEP, DTOL, ATOL, RTOL);
    float *a = dup(dx, n), *b2 = dup(dwt, (size_t)s.D), *c = dup(db, (size_t)s.D);
    ln_loss(&s);   /* restore saved mean/rstd of the unperturbed x */
    O->layernorm_backward(be.ctx, dx, dwt, db, s.w, s.x, s.wt, s.mean, s.rstd, s.N, s.D);
    check_twice("layernorm dx", a, dx, n);
    check_twice("layernorm dw", b2, dwt, (size_t)s.D);
    check_twice("layernorm db", c, db, (size_t)s.D);
    xfree(want); xfree(wm); xfree(wr); xfree(s.x); xfree(s.wt); xfree(s.b); xfree(s.out);
    xfree(s.mean); xfree(s.rstd); xfree(s.w); xfree(dx); xfree(dwt); xfree(db); xfree(a); xfree(b2); xfree(c);
}

/* ---- attention --------------------------------------------------------------------------- */

typedef struct AttSt { float *qkv, *out, *att, *w; int B, T, D, H; } AttSt;

static double att_loss(void *p) {
    AttSt *s = p;
    O->attention_forward(be.ctx, s->out, s->att, s->qkv, s->B, s->T, s->D, s->H);
    return wsum(s->w, s->out, (size_t)s->B * s->T * s->D);
}

/* naive causal attention in double: out[B,T,D], att[B,H,T,T] */
static void attention_ref(const float *qkv, int B, int T, int D, int H, double *out, double *att) {
    int hd = D / H;
    double scale = 1.0 / sqrt((double)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * D + (size_t)h * hd;
                double *p = att + (((size_t)b * H + h) * T + t) * T;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < T; j++) {
                    p[j] = 0;
                    if (j > t) continue;
                    const float *k = qkv + ((size_t)b * T + j) * 3 * D + D + (size_t)h * hd;
                    double s = 0;
                    for (int c = 0; c < hd; c++) s += (double)q[c] * k[c];
                    p[j] = s * scale;
                    if (p[j] > mx) mx = p[j];
                }
                for (int j = 0; j <= t; j++) { p[j] = exp(p[j] - mx); sum += p[j]; }
                for (int j = 0; j <= t; j++) p[j] /= sum;
                for (int c = 0; c < hd; c++) {
                    double o = 0;
                    for (int j = 0; j <= t; j++) o += p[j] * qkv[((size_t)b * T + j) * 3 * D + 2 * D + (size_t)h * hd + c];
                    out[((size_t)b * T + t) * D + (size_t)h * hd + c] = o;
                }
            }
}

static void test_attention(void) {
    AttSt s = {.B = 2, .T = 7, .D = 12, .H = 3};
    size_t nqkv = (size_t)s.B * s.T * 3 * s.D, ny = (size_t)s.B * s.T * s.D;
    size_t natt = (size_t)s.B * s.H * s.T * s.T;
    s.qkv = randn(nqkv, 0, 1); s.out = zeros(ny); s.att = zeros(natt); s.w = randn(ny, 0, 1);
    /* scores 20, 120, 220, 320 in row t=3 of batch 0 (exp overflows float past 88.7): softmax
     * must subtract the true row max */
    float *saved = dup(s.qkv, nqkv);
    for (int c = 0; c < s.D; c++) {
        s.qkv[(size_t)3 * 3 * s.D + c] = 100.0f;   /* hd = 4: score = 0.5 * 4 * 100 * k */
        for (int j = 0; j <= 3; j++) s.qkv[(size_t)j * 3 * s.D + s.D + c] = 0.1f + 0.5f * (float)j;
    }
    att_loss(&s);
    double *wo = xmalloc(sizeof(double) * ny), *wa = xmalloc(sizeof(double) * natt);
    attention_ref(s.qkv, s.B, s.T, s.D, s.H, wo, wa);
    close_f("attention forward out", s.out, wo, ny, 1e-5, 1e-4);
    close_f("attention forward probabilities (zero above diagonal)", s.att, wa, natt, 1e-6, 1e-4);
    memcpy(s.qkv, saved, sizeof(float) * nqkv);
    xfree(saved);

    float *dq = zeros(nqkv), *scratch = zeros(natt);
    att_loss(&s);
    O->attention_backward(be.ctx, dq, scratch, s.w, s.qkv, s.att, s.B, s.T, s.D, s.H);
    gradcheck("attention dqkv", att_loss, &s, s.qkv, dq, nqkv, STEP, DTOL, ATOL, RTOL);
    /* q, k and v slices separately, so one wrong product cannot hide behind the others */
    for (int part = 0; part < 3; part++) {
        float *dpart = zeros(nqkv);
        for (size_t r = 0; r < (size_t)s.B * s.T; r++)
            memcpy(dpart + r * 3 * s.D + (size_t)part * s.D, dq + r * 3 * s.D + (size_t)part * s.D, sizeof(float) * s.D);
        /* directional derivative along v restricted to this slice: zero the other slices' step */
        float *x0 = dup(s.qkv, nqkv), *xp = dup(s.qkv, nqkv), *xm = dup(s.qkv, nqkv);
        for (size_t r = 0; r < (size_t)s.B * s.T; r++)
            for (int c = 0; c < s.D; c++) {
                size_t i = r * 3 * s.D + (size_t)part * s.D + c;
                double v = rng_normal(&rng);
                xp[i] = (float)(x0[i] + 1e-2 * v);
                xm[i] = (float)(x0[i] - 1e-2 * v);
            }
        memcpy(s.qkv, xp, sizeof(float) * nqkv); double lp = att_loss(&s);
        memcpy(s.qkv, xm, sizeof(float) * nqkv); double lm = att_loss(&s);
        memcpy(s.qkv, x0, sizeof(float) * nqkv);
        double fd = lp - lm, pred = 0, mag = 0;
        for (size_t i = 0; i < nqkv; i++) {
            double d = (double)xp[i] - xm[i];
            pred += dpart[i] * d;
            mag += fabs(dpart[i] * d);
        }
        ok(fabs(fd - pred) <= DTOL * (fabs(fd) + mag), "attention d%c: directional fd %.9g vs analytic %.9g",
           "qkv"[part], fd, pred);
        xfree(dpart); xfree(x0); xfree(xp); xfree(xm);
    }
    float *d1 = dup(dq, nqkv);
    att_loss(&s);
    O->attention_backward(be.ctx, dq, scratch, s.w, s.qkv, s.att, s.B, s.T, s.D, s.H);
    check_twice("attention dqkv", d1, dq, nqkv);

    /* determinism: same inputs, same bits */
    float *o2 = zeros(ny), *a2 = zeros(natt), *dq2 = zeros(nqkv), *dq3 = zeros(nqkv);
    O->attention_forward(be.ctx, o2, a2, s.qkv, s.B, s.T, s.D, s.H);
    O->attention_backward(be.ctx, dq2, scratch, s.w, s.qkv, a2, s.B, s.T, s.D, s.H);
    O->attention_backward(be.ctx, dq3, scratch, s.w, s.qkv, a2, s.B, s.T, s.D, s.H);
    ok(memcmp(o2, s.out, sizeof(float) * ny) == 0 && memcmp(a2, s.att, sizeof(float) * natt) == 0 &&
       memcmp(dq2, dq3, sizeof(float) * nqkv) == 0, "attention forward/backward bitwise deterministic");
    xfree(wo); xfree(wa); xfree(s.qkv); xfree(s.out); xfree(s.att); xfree(s.w); xfree(dq); xfree(scratch);
    xfree(d1); xfree(o2); xfree(a2); xfree(dq2); xfree(dq3);
}

/* ---- activations ------------------------------------------------------------------------- */

typedef struct ActSt { float *h, *a, *w; int kind, N, F; } ActSt;

static double act_loss(void *p) {
    ActSt *s = p;
    O->act_forward(be.ctx, s->kind, s->a, s->h, s->N, s->F);
    return wsum(s->w, s->a, (size_t)s->N * s->F);
}

/* 0.5 x (1 + tanh u) written as x sigmoid(2u): equal, and free of cancellation for x << 0 */
static double gelu_ref(double x) { return x / (1 + exp(-2 * sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }

static void test_act(int kind) {
    const char *nm = kind == ACT_KIND_GELU ? "gelu" : "swiglu";
    ActSt s = {.kind = kind, .N = 5, .F = 9};
    size_t na = (size_t)s.N * s.F, nh = kind == ACT_KIND_GELU ? na : 2 * na;
    s.h = randn(nh, 0, 2); s.a = zeros(na); s.w = randn(na, 0, 1);
    act_loss(&s);
    double *want = xmalloc(sizeof(double) * na);
    for (int n = 0; n < s.N; n++)
        for (int f = 0; f < s.F; f++) {
            size_t i = (size_t)n * s.F + f;
            if (kind == ACT_KIND_GELU) want[i] = gelu_ref(s.h[i]);
            else {
                double x = s.h[(size_t)n * 2 * s.F + f], g = s.h[(size_t)n * 2 * s.F + s.F + f];
                want[i] = x / (1 + exp(-x)) * g;
            }
        }
    char name[96];
    str_fmt(name, sizeof name, "%s forward vs double", nm);
    close_f(name, s.a, want, na, 1e-6, 1e-5);
    if (kind == ACT_KIND_GELU) {
        /* torch.nn.functional.gelu(x, approximate='tanh') at 1, -1, 3 */
        float hx[3] = {1, -1, 3}, ax[3];
        double ref[3] = {0.8411919906082768, -0.15880800939172324, 2.99636286559};
        O->act_forward(be.ctx, ACT_KIND_GELU, ax, hx, 1, 3);
        close_f("gelu tanh-form known values", ax, ref, 3, 1e-6, 1e-6);
    }
    float *dh = randn(nh, 0, 1);   /* garbage: act_backward overwrites */
    O->act_backward(be.ctx, kind, dh, s.w, s.h, s.N, s.F);
    str_fmt(name, sizeof name, "%s dh", nm);
    gradcheck(name, act_loss, &s, s.h, dh, nh, STEP, DTOL, ATOL, RTOL);
    float *d1 = dup(dh, nh);
    O->act_backward(be.ctx, kind, dh, s.w, s.h, s.N, s.F);
    str_fmt(name, sizeof name, "%s backward overwrites (2 calls = same bits)", nm);
    ok(memcmp(d1, dh, sizeof(float) * nh) == 0, "%s", name);
    xfree(want); xfree(s.h); xfree(s.a); xfree(s.w); xfree(dh); xfree(d1);
}

/* dense sweep over a wide range: forward and backward against double formulas (the backend
 * evaluates exp itself, so its accuracy is checked here, including saturation) */
static void test_act_sweep(void) {
    int n = 4001;
    float *h = xmalloc(sizeof(float) * 2 * n), *a = xmalloc(sizeof(float) * n), *da = xmalloc(sizeof(float) * n);
    float *dh = xmalloc(sizeof(float) * 2 * n);
    double *want = xmalloc(sizeof(double) * 2 * n);
    for (int i = 0; i < n; i++) { h[i] = -30.0f + 60.0f * (float)i / (float)(n - 1); da[i] = 1.0f; }
    O->act_forward(be.ctx, ACT_KIND_GELU, a, h, 1, n);
    for (int i = 0; i < n; i++) want[i] = gelu_ref(h[i]);
    /* rtol: where gelu is tiny, exp's argument 2u reaches ~88 and its float rounding (1 ulp of
     * u) alone is a relative error of 88 * 6e-8 ~ 1e-5 in the result */
    close_f("gelu forward sweep [-30, 30]", a, want, (size_t)n, 1e-30, 3e-5);
    O->act_backward(be.ctx, ACT_KIND_GELU, dh, da, h, 1, n);
    for (int i = 0; i < n; i++) {
        double x = h[i], c = sqrt(2 / M_PI), u = c * (x + 0.044715 * x * x * x), th = tanh(u);
        want[i] = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x);
    }
    close_f("gelu backward sweep [-30, 30]", dh, want, (size_t)n, 1e-6, 1e-5);
    /* SwiGLU rows [h1 | h3] with h3 = 1: silu over [-100, 100] */
    for (int i = 0; i < n; i++) { h[i] = -100.0f + 200.0f * (float)i / (float)(n - 1); h[n + i] = 1.0f; }
    O->act_forward(be.ctx, ACT_KIND_SWIGLU, a, h, 1, n);
    for (int i = 0; i < n; i++) want[i] = h[i] / (1 + exp(-(double)h[i]));
    close_f("silu sweep [-100, 100]", a, want, (size_t)n, 1e-30, 2e-6);
    O->act_backward(be.ctx, ACT_KIND_SWIGLU, dh, da, h, 1, n);
    for (int i = 0; i < n; i++) {
        double x = h[i], sg = 1 / (1 + exp(-x));
        want[i] = sg + x * sg * (1 - sg);
        want[n + i] = x * sg;
    }
    close_f("swiglu backward sweep [-100, 100]", dh, want, (size_t)2 * n, 1e-6, 1e-5);
    xfree(h); xfree(a); xfree(da); xfree(dh); xfree(want);
}

/* ---- cross-entropy ----------------------------------------------------------------------- */

typedef struct XentSt { float *logits, *loss; int32_t *tgt; float scale; int N, V; } XentSt;

static double xent_loss(void *p) {
    XentSt *s = p;
    O->xent_forward(be.ctx, s->loss, s->logits, s->tgt, s->N, s->V);
    double l = 0;
    for (int n = 0; n < s->N; n++) l += (double)s->scale * s->loss[n];
    return l;
}

static void test_xent(void) {
    XentSt s = {.N = 6, .V = 37, .scale = 0.37f};   /* V: 2 blocks of 16 lanes + a tail */
    int32_t tgt[6] = {3, -1, 0, 36, 5, 33};
    s.tgt = tgt;
    size_t n = (size_t)s.N * s.V;
    s.logits = randn(n, 0, 2); s.loss = zeros((size_t)s.N);
    /* a row whose largest logits (~120, in the tail) overflow exp unless the true row max is used */
    for (int v = 30; v < s.V; v++) s.logits[4 * s.V + v] += 120.0f;
    xent_loss(&s);
    double want[6];
    for (int r = 0; r < s.N; r++) {
        const float *x = s.logits + (size_t)r * s.V;
        double mx = -INFINITY, sum = 0;
        for (int v = 0; v < s.V; v++) mx = fmax(mx, x[v]);
        for (int v = 0; v < s.V; v++) sum += exp(x[v] - mx);
        want[r] = tgt[r] < 0 ? 0.0 : log(sum) + mx - x[tgt[r]];
    }
    close_f("xent forward vs double log-sum-exp (with +120 row, ignored row)", s.loss, want, (size_t)s.N, 1e-5, 1e-5);

    float *dl = randn(n, 0, 1);   /* garbage: xent_backward overwrites */
    O->xent_backward(be.ctx, dl, s.logits, tgt, s.scale, s.N, s.V);
    int zero_row = 1;
    for (int v = 0; v < s.V; v++) zero_row &= dl[s.V + v] == 0.0f;
    ok(zero_row, "xent backward: row with target < 0 is zero");
    gradcheck("xent dlogits", xent_loss, &s, s.logits, dl, n, STEP, DTOL, 1e-4, RTOL);
    double row_sum = 0;
    for (int v = 0; v < s.V; v++) row_sum += dl[v];
    ok(fabs(row_sum) < 1e-6, "xent backward: row sums to 0 (%.3g)", row_sum);
    /* aliasing: dlogits == logits gives the same bits as separate buffers */
    float *alias = dup(s.logits, n);
    O->xent_backward(be.ctx, alias, alias, tgt, s.scale, s.N, s.V);
    ok(memcmp(alias, dl, sizeof(float) * n) == 0, "xent backward in place (dlogits aliases logits) = out of place");
    xfree(s.logits); xfree(s.loss); xfree(dl); xfree(alias);
}

/* ---- MoE permute / unpermute / combine -------------------------------------------------- */

typedef struct GathSt { float *x, *out, *w; int32_t *idx; int n, D; } GathSt;

static double gath_loss(void *p) {
    GathSt *s = p;
    O->gather_rows(be.ctx, s->out, s->x, s->idx, s->n, s->D);
    return wsum(s->w, s->out, (size_t)s->n * s->D);
}

/* y[R,D] = base + scatter_add(scale * src) */
typedef struct ScatSt { float *src, *scale, *base, *y, *w; int32_t *idx; int n, R, D; } ScatSt;

static double scat_loss(void *p) {
    ScatSt *s = p;
    memcpy(s->y, s->base, sizeof(float) * s->R * s->D);
    O->scatter_add_rows(be.ctx, s->y, s->src, s->idx, s->scale, s->n, s->D);
    return wsum(s->w, s->y, (size_t)s->R * s->D);
}

/* y[N,D] = combine(src[M,D], pos[N,k], gate[N,k]) */
typedef struct CombSt { float *src, *gate, *y, *w; int32_t *pos; int N, k, M, D; } CombSt;

static double comb_loss(void *p) {
    CombSt *s = p;
    memset(s->y, 0, sizeof(float) * s->N * s->D);
    O->combine_rows(be.ctx, s->y, s->src, s->pos, s->gate, s->N, s->k, s->D);
    return wsum(s->w, s->y, (size_t)s->N * s->D);
}

static void test_moe_rows(void) {
    int R = 5, n = 8, D = 19;
    int32_t idx[8] = {2, 0, 4, 2, 2, 1, 0, 3};   /* repeats */
    /* gather: out = x[idx]; backward dx += scatter_add_rows(dout) */
    GathSt g = {.n = n, .D = D, .idx = idx};
    g.x = randn((size_t)R * D, 0, 1); g.out = zeros((size_t)n * D); g.w = randn((size_t)n * D, 0, 1);
    gath_loss(&g);
    int exact = 1;
    for (int i = 0; i < n; i++) exact &= memcmp(g.out + (size_t)i * D, g.x + (size_t)idx[i] * D, sizeof(float) * D) == 0;
    ok(exact, "gather_rows forward copies rows");
    float *dx = zeros((size_t)R * D);
    O->scatter_add_rows(be.ctx, dx, g.w, idx, NULL, n, D);
    gradcheck("gather_rows dx via scatter_add_rows", gath_loss, &g, g.x, dx, (size_t)R * D, STEP, DTOL, 1e-4, 1e-3);
    float *d1 = dup(dx, (size_t)R * D);
    O->scatter_add_rows(be.ctx, dx, g.w, idx, NULL, n, D);
    check_twice("scatter_add_rows", d1, dx, (size_t)R * D);

    /* scatter with scale: dsrc = gather_rows_scaled(dy, idx, scale), dscale = gather_dot(dy, src, idx) */
    ScatSt s = {.n = n, .R = R, .D = D, .idx = idx};
    s.src = randn((size_t)n * D, 0, 1); s.scale = randn((size_t)n, 0.5f, 0.3f);
    s.base = randn((size_t)R * D, 0, 1); s.y = zeros((size_t)R * D); s.w = randn((size_t)R * D, 0, 1);
    scat_loss(&s);
    double *want = xmalloc(sizeof(double) * R * D);
    for (int i = 0; i < R * D; i++) want[i] = s.base[i];
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) want[(size_t)idx[i] * D + d] += (double)s.scale[i] * s.src[(size_t)i * D + d];
    close_f("scatter_add_rows forward (scaled, repeated rows)", s.y, want, (size_t)R * D, 1e-6, 1e-6);
    float *dsrc = randn((size_t)n * D, 0, 1), *dscale = randn((size_t)n, 0, 1);
    O->gather_rows_scaled(be.ctx, dsrc, s.w, idx, s.scale, n, D);
    O->gather_dot(be.ctx, dscale, s.w, s.src, idx, n, D);
    gradcheck("scatter_add_rows dsrc via gather_rows_scaled", scat_loss, &s, s.src, dsrc, (size_t)n * D, STEP, DTOL, 1e-4, 1e-3);
    gradcheck("scatter_add_rows dscale via gather_dot", scat_loss, &s, s.scale, dscale, (size_t)n, STEP, DTOL, 1e-4, 1e-3);

    /* combine_rows: N tokens x k slots, some slots empty (-1); entry e = (t, s) */
    CombSt c = {.N = 4, .k = 2, .M = 6, .D = D};
    int32_t pos[8] = {3, 0, -1, 5, 1, 4, 2, -1};
    int32_t etok[6];
    float egate[6];
    c.pos = pos;
    c.src = randn((size_t)c.M * D, 0, 1); c.gate = randn(8, 0.5f, 0.2f);
    c.y = zeros((size_t)c.N * D); c.w = randn((size_t)c.N * D, 0, 1);
    for (int t = 0; t < c.N; t++)
        for (int k = 0; k < c.k; k++)
            if (pos[t * c.k + k] >= 0) { etok[pos[t * c.k + k]] = t; egate[pos[t * c.k + k]] = c.gate[t * c.k + k]; }
    comb_loss(&c);
    double *cw = xcalloc(sizeof(double) * c.N * D);
    for (int t = 0; t < c.N; t++)
        for (int k = 0; k < c.k; k++) {
            int p = pos[t * c.k + k];
            if (p >= 0)
                for (int d = 0; d < D; d++) cw[(size_t)t * D + d] += (double)c.gate[t * c.k + k] * c.src[(size_t)p * D + d];
        }
    close_f("combine_rows forward", c.y, cw, (size_t)c.N * D, 1e-6, 1e-6);
    float *csrc = zeros((size_t)c.M * D), *edot = zeros((size_t)c.M), *cgate = zeros(8);
    O->gather_rows_scaled(be.ctx, csrc, c.w, etok, egate, c.M, D);
    O->gather_dot(be.ctx, edot, c.w, c.src, etok, c.M, D);
    for (int t = 0; t < c.N * c.k; t++) cgate[t] = pos[t] >= 0 ? edot[pos[t]] : 0.0f;
    gradcheck("combine_rows dsrc via gather_rows_scaled", comb_loss, &c, c.src, csrc, (size_t)c.M * D, STEP, DTOL, 1e-4, 1e-3);
    gradcheck("combine_rows dgate via gather_dot", comb_loss, &c, c.gate, cgate, 8, STEP, DTOL, 1e-4, 1e-3);
    /* gate NULL = 1 */
    float *y1 = zeros((size_t)c.N * D), *ones = xmalloc(sizeof(float) * 8), *y2 = zeros((size_t)c.N * D);
    for (int i = 0; i < 8; i++) ones[i] = 1.0f;
    O->combine_rows(be.ctx, y1, c.src, pos, NULL, c.N, c.k, D);
    O->combine_rows(be.ctx, y2, c.src, pos, ones, c.N, c.k, D);
    ok(memcmp(y1, y2, sizeof(float) * c.N * D) == 0, "combine_rows with gate NULL = gate 1");

    xfree(g.x); xfree(g.out); xfree(g.w); xfree(dx); xfree(d1);
    xfree(s.src); xfree(s.scale); xfree(s.base); xfree(s.y); xfree(s.w); xfree(want); xfree(dsrc); xfree(dscale);
    xfree(c.src); xfree(c.gate); xfree(c.y); xfree(c.w); xfree(cw); xfree(csrc); xfree(edot); xfree(cgate);
    xfree(y1); xfree(y2); xfree(ones);
}

/* ---- pooling ----------------------------------------------------------------------------- */

typedef struct PoolSt { float *x, *out, *w; int32_t *len; int kind, B, T, D; } PoolSt;

static double pool_loss(void *p) {
    PoolSt *s = p;
    O->pool_forward(be.ctx, s->kind, s->out, s->x, s->len, s->B, s->T, s->D);
    return wsum(s->w, s->out, (size_t)s->B * s->D);
}

static void test_pool(int kind) {
    const char *nm = kind == POOL_KIND_MEAN ? "pool mean" : "pool last";
    int32_t len[3] = {5, 1, 3};
    PoolSt s = {.kind = kind, .B = 3, .T = 5, .D = 6, .len = len};
    size_t nx = (size_t)s.B * s.T * s.D, ny = (size_t)s.B * s.D;
    s.x = randn(nx, 0, 1); s.out = zeros(ny); s.w = randn(ny, 0, 1);
    pool_loss(&s);
    double want[18];
    for (int b = 0; b < s.B; b++)
        for (int d = 0; d < s.D; d++) {
            double a = 0;
            if (kind == POOL_KIND_LAST) a = s.x[((size_t)b * s.T + len[b] - 1) * s.D + d];
            else {
                for (int t = 0; t < len[b]; t++) a += s.x[((size_t)b * s.T + t) * s.D + d];
                a /= len[b];
            }
            want[b * s.D + d] = a;
        }
    char name[96];
    str_fmt(name, sizeof name, "%s forward", nm);
    close_f(name, s.out, want, ny, 1e-6, 1e-6);
    float *dx = zeros(nx);
    O->pool_backward(be.ctx, kind, dx, s.w, len, s.B, s.T, s.D);
    str_fmt(name, sizeof name, "%s dx", nm);
    gradcheck(name, pool_loss, &s, s.x, dx, nx, STEP, DTOL, 1e-4, 1e-3);
    int untouched = 1;
    for (int b = 0; b < s.B; b++)
        for (int t = len[b]; t < s.T; t++)
            for (int d = 0; d < s.D; d++) untouched &= dx[((size_t)b * s.T + t) * s.D + d] == 0.0f;
    ok(untouched, "%s: positions >= len get no gradient", nm);
    float *d1 = dup(dx, nx);
    O->pool_backward(be.ctx, kind, dx, s.w, len, s.B, s.T, s.D);
    check_twice(name, d1, dx, nx);
    xfree(s.x); xfree(s.out); xfree(s.w); xfree(dx); xfree(d1);
}

/* ---- AdamW and vector helpers ----------------------------------------------------------- */

static void test_adamw(void) {
    size_t n = 300;
    float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    float *p = randn(n, 0, 1), *m = zeros(n), *v = zeros(n);
    double *pd = xmalloc(sizeof(double) * n), *md = xcalloc(sizeof(double) * n), *vd = xcalloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) pd[i] = p[i];
    for (int t = 1; t <= 3; t++) {
        float *g = randn(n, 0, 1);
        g[0] = 0.0f;                  /* a zero gradient: only the decay moves p */
        g[1] = 1e-4f;                 /* a tiny gradient: the update is still ~lr (Adam normalises) */
        O->adamw(be.ctx, p, g, m, v, n, lr, b1, b2, eps, wd, t);
        for (size_t i = 0; i < n; i++) {
            /* decoupled decay first, then moments, bias correction, update */
            pd[i] -= (double)lr * wd * pd[i];
            md[i] = (double)b1 * md[i] + (1 - (double)b1) * g[i];
            vd[i] = (double)b2 * vd[i] + (1 - (double)b2) * (double)g[i] * g[i];
            double mh = md[i] / (1 - pow(b1, t)), vh = vd[i] / (1 - pow(b2, t));
            pd[i] -= (double)lr * mh / (sqrt(vh) + eps);
        }
        xfree(g);
    }
    close_f("adamw p after 3 steps vs double", p, pd, n, 1e-6, 1e-5);
    close_f("adamw m after 3 steps", m, md, n, 1e-7, 1e-5);
    close_f("adamw v after 3 steps", v, vd, n, 1e-8, 1e-5);
    xfree(p); xfree(m); xfree(v); xfree(pd); xfree(md); xfree(vd);
}

static void test_vector_ops(void) {
    size_t n = 1003;
    float *x = randn(n, 0, 1), *y = randn(n, 0, 1);
    double *want = xmalloc(sizeof(double) * n), ss = 0;
    for (size_t i = 0; i < n; i++) { want[i] = (double)y[i] + 0.3 * (double)x[i]; ss += (double)x[i] * x[i]; }
    O->axpy(be.ctx, y, x, 0.3f, n);
    close_f("axpy", y, want, n, 1e-6, 1e-6);
    double got = O->sumsq(be.ctx, x, n);
    ok(fabs(got - ss) <= 1e-12 * ss, "sumsq in double: %.17g vs %.17g", got, ss);
    for (size_t i = 0; i < n; i++) want[i] = -0.25 * (double)x[i];
    O->scale(be.ctx, x, -0.25f, n);
    close_f("scale", x, want, n, 0, 1e-7);
    xfree(x); xfree(y); xfree(want);
}

/* ---- backend table ----------------------------------------------------------------------- */

static void test_backend_table(void) {
    Status st = backend_check(&be);
    ok(STATUS_OK(st), "backend_check accepts the cpu table (%s)", st.msg);
    BackendOps broken = *be.ops;
    broken.pool_backward = NULL;
    Backend bb = be;
    bb.ops = &broken;
    st = backend_check(&bb);
    ok(!STATUS_OK(st) && strstr(st.msg, "pool_backward") != NULL, "backend_check names the empty slot: %s", st.msg);
    broken = *be.ops;
    broken.gather_rows_scaled = NULL;
    st = backend_check(&bb);
    ok(!STATUS_OK(st) && strstr(st.msg, "gather_rows_scaled") != NULL, "backend_check sees the last slot: %s", st.msg);
    float *p = O->alloc(be.ctx, 100);
    int zeroed = ((uintptr_t)p % 64) == 0;
    for (int i = 0; i < 25; i++) zeroed &= p[i] == 0.0f;
    ok(zeroed, "alloc is zeroed and 64-byte aligned");
    O->free(be.ctx, p);
    Backend z;
    memset(&z, 0, sizeof z);
    backend_free(&z);
    backend_free(&z);
    Backend t2;
    st = backend_cpu_init(&t2, 0);
    backend_free(&t2);
    backend_free(&t2);
    ok(STATUS_OK(st) && t2.ops == NULL, "backend_free safe on a zeroed struct and twice");
}

int main(void) {
    Status st = backend_cpu_init(&be, 1);
    ASSERT(STATUS_OK(st));
    O = be.ops;
    ok(be.kind == 0 && strcmp(O->name, "cpu") == 0, "cpu backend initialised (kind 0, name cpu)");
    rng_init(&rng, 1234, 0, RNG_TEST);
    double t0 = time_now();
    test_backend_table();
    test_gemm_forward();
    test_gemm_grad();
    test_embed();
    test_layernorm();
    test_attention();
    test_act(ACT_KIND_GELU);
    test_act(ACT_KIND_SWIGLU);
    test_act_sweep();
    test_xent();
    test_moe_rows();
    test_pool(POOL_KIND_MEAN);
    test_pool(POOL_KIND_LAST);
    test_adamw();
    test_vector_ops();
    printf("# %.2f s\n", time_now() - t0);
    backend_free(&be);
    return harness_done();
}
