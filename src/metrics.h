/* metrics: the load-balance and parameter metrics, defined once and used everywhere
 * (console, HDF5, analysis). Pure functions on caller-owned arrays.
 * Does not: allocate or log. */
#ifndef DCMOE_METRICS_H
#define DCMOE_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct LoadStats {
    double cv2;          /* Var(n_e) / mean(n_e)^2 (population variance) */
    double var;          /* Var(n_e) */
    double maxvio;       /* max_e n_e / mean - 1 */
    double max_over_mean;/* max_e n_e / mean */
    double entropy;      /* normalised entropy of n_e / sum, in [0,1] (1 = uniform) */
    double dead_frac;    /* fraction of experts with n_e == 0 */
} LoadStats;

/* stats of n counts (n >= 1, counts >= 0).
 * Entropy is H(p) / log(n) with p = n_e / sum; it is 0 when n == 1.
 * All zero counts give cv2 = var = maxvio = 0, max_over_mean = 1, entropy = 0, dead = 1. */
LoadStats metrics_load(const double *counts, int n);

/* max_i x[i] / mean(x) over n >= 1 values (e.g. tokens received per rank);
 * 1 when all are zero (balanced by convention) */
double metrics_max_over_mean(const double *x, int n);

#endif
