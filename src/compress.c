/* compress.c: structured compression of a group of experts (DESIGN.md §1.1, §1.3):
 * reconstruction W = base + A B^T (cblas_sgemm), truncated SVD to rank r (LAPACK's exact
 * sgesdd, or the randomised range finder of Halko, Martinsson & Tropp 2011, Alg. 4.4 with
 * QR re-orthonormalisation after every product), its output-space form (the SVD of
 * C^(1/2) R for an input second moment C, mapped back by C^(-1/2)), and the refit of a group
 * (base = member mean, residuals -> rank-r factors, relative error in double).
 * Float throughout (cblas/LAPACKE row-major); scratch is allocated and freed per call.
 * Legend: m n r l K = rows, columns, rank, r + oversampling (clamped to min(m, n)), experts
 *         in the group. Factors: A = U sqrt(S) [m, r], B = V sqrt(S) [n, r]. */
#include "compress.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <string.h>

void compress_reconstruct(const float *base /* [m, n] */, const float *A /* [m, r] */, const float *B /* [n, r] */,
                          int m, int n, int r, float *W /* [m, n] */) {
    ASSERTF(m >= 1 && n >= 1 && r >= 0, "compress_reconstruct: m=%d n=%d r=%d", m, n, r);
    if (W != base) memcpy(W, base, sizeof(float) * (size_t)m * n);
    if (r > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, r, 1.0f, A, r, B, r, 1.0f, W, n);
}

/* A [m, r] = U[:, :r] sqrt(s), B [n, r] = Vt[:r, :]^T sqrt(s); columns past k (the available
 * rank) are zero. U [m, ldu] row-major, Vt [>=k, n] row-major, s [k]. */
static void factors_from_svd(const float *U, int ldu, const float *s, const float *Vt, int k, int m, int n, int r,
                             float *A /* [m, r] */, float *B /* [n, r] */) {
    for (int c = 0; c < r; c++) {
        float sq = c < k ? sqrtf(s[c] > 0 ? s[c] : 0.0f) : 0.0f;
        for (int i = 0; i < m; i++) A[(size_t)i * r + c] = c < k ? U[(size_t)i * ldu + c] * sq : 0.0f;
        for (int j = 0; j < n; j++) B[(size_t)j * r + c] = c < k ? Vt[(size_t)c * n + j] * sq : 0.0f;
    }
}

/* exact: SVD of a copy of R by divide and conquer */
static int low_rank_exact(const float *R /* [m, n] */, int m, int n, int r, float *A, float *B) {
    const int mn = m < n ? m : n;
    float *a = xmalloc(sizeof(float) * (size_t)m * n);
    float *s = xmalloc(sizeof(float) * (size_t)mn);
    float *U = xmalloc(sizeof(float) * (size_t)m * mn);      /* [m, mn] */
    float *Vt = xmalloc(sizeof(float) * (size_t)mn * n);     /* [mn, n] */
    memcpy(a, R, sizeof(float) * (size_t)m * n);
    int info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', m, n, a, n, s, U, mn, Vt, n);
    if (info == 0) factors_from_svd(U, mn, s, Vt, mn, m, n, r, A, B);
    xfree(a); xfree(s); xfree(U); xfree(Vt);
    return info;
}

/* Y [rows, l] <- an orthonormal basis of its column space (Householder QR) */
static int orthonormalise(float *Y /* [rows, l] */, int rows, int l, float *tau /* [l] */) {
    int info = LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, rows, l, Y, l, tau);
    if (info == 0) info = LAPACKE_sorgqr(LAPACK_ROW_MAJOR, rows, l, l, Y, l, tau);
    return info;
}

/* randomised: Q = orth((R R^T)^q R Omega), then the exact SVD of the small Q^T R */
static int low_rank_randomized(const float *R /* [m, n] */, int m, int n, int r, int oversample, int power_iters,
                               Rng *rng, float *A, float *B) {
    ASSERTF(rng, "compress_low_rank: the randomised SVD needs an Rng");
    const int mn = m < n ? m : n;
    int l = r + (oversample > 0 ? oversample : 0);
    if (l > mn) l = mn;
    if (l < 1) l = 1;
    float *Om = xmalloc(sizeof(float) * (size_t)n * l);      /* [n, l] Gaussian test matrix, later R^T Q */
    float *Y = xmalloc(sizeof(float) * (size_t)m * l);       /* [m, l] range sample, then Q */
    float *tau = xmalloc(sizeof(float) * (size_t)l);
    float *Bs = xmalloc(sizeof(float) * (size_t)l * n);      /* [l, n] Q^T R */
    float *s = xmalloc(sizeof(float) * (size_t)l);
    float *Ub = xmalloc(sizeof(float) * (size_t)l * l);      /* [l, l] */
    float *Vt = xmalloc(sizeof(float) * (size_t)l * n);      /* [l, n] */
    float *U = xmalloc(sizeof(float) * (size_t)m * l);       /* [m, l] Q Ub */
    int info = 0;

    for (size_t q = 0; q < (size_t)n * l; q++) Om[q] = rng_normal(rng);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, l, n, 1.0f, R, n, Om, l, 0.0f, Y, l);
    for (int it = 0; it < power_iters && info == 0; it++) {
        info = orthonormalise(Y, m, l, tau);
        if (info) break;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, l, m, 1.0f, R, n, Y, l, 0.0f, Om, l);  /* R^T Q */
        info = orthonormalise(Om, n, l, tau);
        if (info) break;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, l, n, 1.0f, R, n, Om, l, 0.0f, Y, l);
    }
    if (info == 0) info = orthonormalise(Y, m, l, tau);                       /* Q [m, l] */
    if (info == 0) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, l, n, m, 1.0f, Y, l, R, n, 0.0f, Bs, n);
        info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', l, n, Bs, n, s, Ub, l, Vt, n);
    }
    if (info == 0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, l, l, 1.0f, Y, l, Ub, l, 0.0f, U, l);
        factors_from_svd(U, l, s, Vt, l, m, n, r, A, B);
    }
    xfree(Om); xfree(Y); xfree(tau); xfree(Bs); xfree(s); xfree(Ub); xfree(Vt); xfree(U);
    return info;
}

int compress_low_rank(const float *R /* [m, n] */, int m, int n, int r, int method, int oversample, int power_iters,
                      Rng *rng, float *A /* [m, r] */, float *B /* [n, r] */) {
    ASSERTF(m >= 1 && n >= 1 && r >= 0, "compress_low_rank: m=%d n=%d r=%d", m, n, r);
    ASSERTF(method == SVD_EXACT || method == SVD_RANDOMIZED, "compress_low_rank: method %d, expected %d or %d",
            method, SVD_RANDOMIZED, SVD_EXACT);
    if (r == 0) return 0;
    return method == SVD_EXACT ? low_rank_exact(R, m, n, r, A, B)
                               : low_rank_randomized(R, m, n, r, oversample, power_iters, rng, A, B);
}

/* output space: the best rank-r approximation of R in the norm |C^(1/2) (R - A B^T)|_F.
 * Cr = C + lambda I (lambda = 1e-6 trace(C) / m) = Q diag(w) Q^T (LAPACK dsyevd, double);
 * R' = Cr^(1/2) R, its truncated SVD A' B^T, then A = Cr^(-1/2) A'. */
int compress_low_rank_weighted(const float *R /* [m, n] */, const double *C /* [m, m] */, int m, int n, int r,
                               int method, int oversample, int power_iters, Rng *rng, float *A /* [m, r] */,
                               float *B /* [n, r] */) {
    ASSERTF(m >= 1 && n >= 1 && r >= 0, "compress_low_rank_weighted: m=%d n=%d r=%d", m, n, r);
    if (!C) return compress_low_rank(R, m, n, r, method, oversample, power_iters, rng, A, B);
    if (r == 0) return 0;
    double tr = 0;
    for (int i = 0; i < m; i++) tr += C[(size_t)i * m + i];
    if (!(tr > 0) || !isfinite(tr))   /* no inputs seen: weight space */
        return compress_low_rank(R, m, n, r, method, oversample, power_iters, rng, A, B);
    const double lam = 1e-6 * tr / m;
    double *Q = xmalloc(sizeof(double) * (size_t)m * m), *w = xmalloc(sizeof(double) * (size_t)m);
    double *S = xmalloc(sizeof(double) * (size_t)m * m), *Si = xmalloc(sizeof(double) * (size_t)m * m);
    double *T = xmalloc(sizeof(double) * (size_t)m * m);
    for (size_t q = 0; q < (size_t)m * m; q++) Q[q] = 0.5 * (C[q] + C[(q % m) * m + q / m]);   /* symmetric part */
    for (int i = 0; i < m; i++) Q[(size_t)i * m + i] += lam;
    int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', m, Q, m, w);   /* Q: eigenvectors in its columns */
    float *Rw = NULL, *Aw = NULL;
    if (info == 0) {
        /* S = Q diag(sqrt w) Q^T, Si = Q diag(1 / sqrt w) Q^T (eigenvalues clamped at lambda) */
        for (int j = 0; j < m; j++) {
            double wj = w[j] > lam ? w[j] : lam, sq = sqrt(wj);
            for (int i = 0; i < m; i++) T[(size_t)i * m + j] = Q[(size_t)i * m + j] * sq;
        }
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, m, m, 1.0, T, m, Q, m, 0.0, S, m);
        for (int j = 0; j < m; j++) {
            double wj = w[j] > lam ? w[j] : lam, isq = 1.0 / sqrt(wj);
            for (int i = 0; i < m; i++) T[(size_t)i * m + j] = Q[(size_t)i * m + j] * isq;
        }
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, m, m, 1.0, T, m, Q, m, 0.0, Si, m);
        /* R' = S R (double accumulation) */
        Rw = xmalloc(sizeof(float) * (size_t)m * n);
        double *row = xmalloc(sizeof(double) * (size_t)n);
        for (int i = 0; i < m; i++) {
            memset(row, 0, sizeof(double) * (size_t)n);
            for (int k = 0; k < m; k++) {
                double s = S[(size_t)i * m + k];
                const float *Rk = R + (size_t)k * n;
                for (int j = 0; j < n; j++) row[j] += s * Rk[j];
            }
            for (int j = 0; j < n; j++) Rw[(size_t)i * n + j] = (float)row[j];
        }
        xfree(row);
        Aw = xmalloc(sizeof(float) * (size_t)m * r);
        info = compress_low_rank(Rw, m, n, r, method, oversample, power_iters, rng, Aw, B);
    }
    if (info == 0) {   /* A = Si A' */
        for (int i = 0; i < m; i++)
            for (int c = 0; c < r; c++) {
                double s = 0;
                for (int k = 0; k < m; k++) s += Si[(size_t)i * m + k] * Aw[(size_t)k * r + c];
                A[(size_t)i * r + c] = (float)s;
            }
    }
    xfree(Q); xfree(w); xfree(S); xfree(Si); xfree(T); xfree(Rw); xfree(Aw);
    return info;
}

int compress_refit_group(const float *W /* [K, m, n] */, int K, int m, int n, int r, int method, int oversample,
                         int power_iters, Rng *rng, float *base /* [m, n] */, float *A /* [K, m, r] */,
                         float *B /* [K, n, r] */, double *rel_err /* [K] */) {
    return compress_refit_group_weighted(W, NULL, K, m, n, r, method, oversample, power_iters, rng, base, A, B, rel_err);
}

int compress_refit_group_weighted(const float *W /* [K, m, n] */, const double *C /* [K, m, m] or NULL */, int K,
                                  int m, int n, int r, int method, int oversample, int power_iters, Rng *rng,
                                  float *base /* [m, n] */, float *A /* [K, m, r] */, float *B /* [K, n, r] */,
                                  double *rel_err /* [K] */) {
    ASSERTF(K >= 1 && m >= 1 && n >= 1 && r >= 0, "compress_refit_group: K=%d m=%d n=%d r=%d", K, m, n, r);
    const size_t mn = (size_t)m * n;
    for (size_t q = 0; q < mn; q++) {           /* member mean, summed in double */
        double s = 0;
        for (int i = 0; i < K; i++) s += W[(size_t)i * mn + q];
        base[q] = (float)(s / K);
    }
    float *res = xmalloc(sizeof(float) * mn);   /* [m, n] residual, then reconstruction */
    int info = 0;
    for (int i = 0; i < K && info == 0; i++) {
        const float *Wi = W + (size_t)i * mn;
        float *Ai = A + (size_t)i * m * r, *Bi = B + (size_t)i * n * r;
        for (size_t q = 0; q < mn; q++) res[q] = Wi[q] - base[q];
        info = compress_low_rank_weighted(res, C ? C + (size_t)i * m * m : NULL, m, n, r, method, oversample,
                                          power_iters, rng, Ai, Bi);
        if (info) break;
        compress_reconstruct(base, Ai, Bi, m, n, r, res);
        double num = 0, den = 0;
        for (size_t q = 0; q < mn; q++) {
            double d = (double)Wi[q] - res[q];
            num += d * d;
            den += (double)Wi[q] * Wi[q];
        }
        rel_err[i] = den > 0 ? sqrt(num / den) : sqrt(num);
    }
    xfree(res);
    return info;
}
