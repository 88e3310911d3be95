/* compress: the structured compression of a group of experts (DESIGN.md §1.1, §1.3):
 * W_i = W_base + A_i B_i^T with rank r factors. Reconstruction, refit of a group after
 * re-clustering (base = member mean, residual by truncated SVD: randomised with
 * oversampling and power iterations by default, LAPACK's exact SVD as an option), the
 * output-space fit (residuals weighted by an input second moment C: the SVD of C^(1/2) R),
 * and the relative reconstruction error.
 * Pure functions on caller-owned row-major float arrays. Does not: own memory or log. */
#ifndef DCMOE_COMPRESS_H
#define DCMOE_COMPRESS_H

#include <stdint.h>
#include "util.h"

enum SvdMethod { SVD_RANDOMIZED = 0, SVD_EXACT = 1 };

/* W [m, n] = base [m, n] + A [m, r] B [n, r]^T */
void compress_reconstruct(const float *base, const float *A, const float *B, int m, int n, int r, float *W);

/* best rank-r approximation of R [m, n] (not modified): R ~ A B^T with A = U sqrt(S),
 * B = V sqrt(S). Randomised: oversample p, q power iterations, Rng for the test matrix.
 * Returns 0 on success, non-zero if LAPACK failed. */
int compress_low_rank(const float *R, int m, int n, int r, int method, int oversample, int power_iters,
                      Rng *rng, float *A, float *B);

/* output space: the rank-r A B^T minimising |C^(1/2) (R - A B^T)|_F, i.e. |X (R - A B^T)|_F for
 * inputs X with second moment C = X^T X / n [m, m] (symmetric, double; regularised by
 * 1e-6 trace(C) / m times I). C NULL or of zero trace: compress_low_rank. */
int compress_low_rank_weighted(const float *R, const double *C, int m, int n, int r, int method, int oversample,
                               int power_iters, Rng *rng, float *A, float *B);

/* refit one group of K experts whose full weights are W [K, m, n]: base = mean over the K,
 * residual_i = W_i - base -> rank r factors A [K, m, r], B [K, n, r]. rel_err [K] gets
 * |W_i - (base + A_i B_i^T)|_F / |W_i|_F. Returns non-zero on LAPACK failure. */
int compress_refit_group(const float *W, int K, int m, int n, int r, int method, int oversample,
                         int power_iters, Rng *rng, float *base, float *A, float *B, double *rel_err);
/* the same with member i's residual fitted in output space under C [K, m, m] (member i's
 * input second moment; NULL = weight space); rel_err stays the weight-space error */
int compress_refit_group_weighted(const float *W, const double *C, int K, int m, int n, int r, int method,
                                  int oversample, int power_iters, Rng *rng, float *base, float *A, float *B,
                                  double *rel_err);

#endif
