/* metrics: load-balance statistics of per-expert (or per-group, per-rank) counts.
 * n = number of bins (experts, groups or ranks); counts[n] are token assignments. */
#include "metrics.h"
#include "util.h"

#include <math.h>

LoadStats metrics_load(const double *counts /* [n] */, int n) {
    ASSERTF(n >= 1, "metrics_load: n = %d, expected >= 1", n);
    LoadStats s = {0};
    double sum = 0, max = 0;
    int n_dead = 0;
    for (int i = 0; i < n; i++) {
        double c = counts[i];
        ASSERTF(c >= 0 && isfinite(c), "metrics_load: counts[%d] = %g, expected a finite count >= 0", i, c);
        sum += c;
        if (c > max) max = c;
        if (c == 0) n_dead++;
    }
    s.dead_frac = (double)n_dead / n;
    if (sum == 0) {
        s.max_over_mean = 1;
        return s;
    }
    double mean = sum / n;
    double ss = 0;
    for (int i = 0; i < n; i++) {
        double d = counts[i] - mean;
        ss += d * d;
    }
    s.var = ss / n;
    s.cv2 = s.var / (mean * mean);
    s.max_over_mean = max / mean;
    s.maxvio = s.max_over_mean - 1;
    if (n > 1) {
        double h = 0;
        for (int i = 0; i < n; i++) {
            if (counts[i] > 0) {
                double p = counts[i] / sum;
                h -= p * log(p);
            }
        }
        h /= log((double)n);
        s.entropy = h < 0 ? 0 : h > 1 ? 1 : h;
    }
    return s;
}

double metrics_max_over_mean(const double *x /* [n] */, int n) {
    ASSERTF(n >= 1, "metrics_max_over_mean: n = %d, expected >= 1", n);
    double sum = 0, max = x[0];
    for (int i = 0; i < n; i++) {
        sum += x[i];
        if (x[i] > max) max = x[i];
    }
    if (sum == 0) return 1;
    return max / (sum / n);
}
