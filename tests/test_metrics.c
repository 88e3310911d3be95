/* test_metrics: the load-balance statistics (metrics_load, metrics_max_over_mean) and the
 * classification metrics (cls_metric: accuracy, F1 of class 1, MCC) on cases computed by
 * hand (the arithmetic is in the comments), the conventions for degenerate inputs, and the
 * K-class MCC against an independent computation from one-hot covariances. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "harness.h"
#include "metrics.h"
#include "util.h"

/* all quantities are a handful of double operations on small integers: 1e-12 leaves room
 * for the rounding of log() and sqrt() only */
#define TOL 1e-12

static void near(double got, double want, const char *what) {
    ok(fabs(got - want) <= TOL * (1 + fabs(want)), "%s = %.15g (expected %.15g)", what, got, want);
}

static void test_load(void) {
    /* {1, 2, 3, 6}: sum 12, mean 3; deviations -2 -1 0 3, squares 4 1 0 9 = 14, var 14/4 = 3.5;
     * cv2 = 3.5 / 9; max/mean = 6/3 = 2, maxvio 1; p = 1/12, 1/6, 1/4, 1/2,
     * H = ln12/12 + ln6/6 + ln4/4 + ln2/2 (= 1.19885 nats), normalised by ln 4 -> 0.864787 */
    double a[4] = {1, 2, 3, 6};
    LoadStats s = metrics_load(a, 4);
    near(s.var, 3.5, "{1,2,3,6}: var");
    near(s.cv2, 3.5 / 9.0, "{1,2,3,6}: cv2");
    near(s.max_over_mean, 2.0, "{1,2,3,6}: max/mean");
    near(s.maxvio, 1.0, "{1,2,3,6}: maxvio");
    double h = (log(12.0) / 12 + log(6.0) / 6 + log(4.0) / 4 + log(2.0) / 2) / log(4.0);
    near(s.entropy, h, "{1,2,3,6}: normalised entropy");
    ok(fabs(s.entropy - 0.864787) < 1e-6, "{1,2,3,6}: entropy %.6f is 0.864787 (hand arithmetic)", s.entropy);
    near(s.dead_frac, 0.0, "{1,2,3,6}: dead fraction");

    /* uniform {5,5,5}: no variance, no violation, maximal entropy */
    double u[3] = {5, 5, 5};
    s = metrics_load(u, 3);
    ok(s.var == 0 && s.cv2 == 0 && s.maxvio == 0 && s.max_over_mean == 1 && fabs(s.entropy - 1) < TOL && s.dead_frac == 0,
       "uniform {5,5,5}: cv2 %g, maxvio %g, max/mean %g, entropy %.15g, dead %g", s.cv2, s.maxvio, s.max_over_mean,
       s.entropy, s.dead_frac);

    /* {0,0,4,0}: mean 1, deviations -1 -1 3 -1, var (1+1+9+1)/4 = 3, cv2 3; max/mean 4,
     * maxvio 3; all mass on one expert -> entropy 0; 3 of 4 dead */
    double c[4] = {0, 0, 4, 0};
    s = metrics_load(c, 4);
    near(s.var, 3.0, "{0,0,4,0}: var");
    near(s.cv2, 3.0, "{0,0,4,0}: cv2");
    near(s.maxvio, 3.0, "{0,0,4,0}: maxvio");
    near(s.entropy, 0.0, "{0,0,4,0}: entropy");
    near(s.dead_frac, 0.75, "{0,0,4,0}: dead fraction");

    /* {0,2,2}: p = 0, 1/2, 1/2 -> H = ln 2, normalised ln2/ln3; one of three dead;
     * mean 4/3, deviations -4/3 2/3 2/3, var (16+4+4)/9/3 = 8/9, cv2 = (8/9)/(16/9) = 1/2 */
    double d[3] = {0, 2, 2};
    s = metrics_load(d, 3);
    near(s.entropy, log(2.0) / log(3.0), "{0,2,2}: entropy");
    near(s.dead_frac, 1.0 / 3.0, "{0,2,2}: dead fraction");
    near(s.cv2, 0.5, "{0,2,2}: cv2");
    near(s.maxvio, 0.5, "{0,2,2}: maxvio (2 / (4/3) - 1)");

    /* conventions: all zero, and a single bin */
    double z[2] = {0, 0};
    s = metrics_load(z, 2);
    ok(s.cv2 == 0 && s.var == 0 && s.maxvio == 0 && s.max_over_mean == 1 && s.entropy == 0 && s.dead_frac == 1,
       "all zero: cv2 0, maxvio 0, max/mean 1, entropy 0, dead 1");
    double one[1] = {7};
    s = metrics_load(one, 1);
    ok(s.cv2 == 0 && s.maxvio == 0 && s.max_over_mean == 1 && s.entropy == 0 && s.dead_frac == 0,
       "one bin: cv2 0, maxvio 0, entropy 0 (defined as 0 for n = 1), dead 0");

    /* scale invariance: cv2, maxvio and entropy of 10x the counts are unchanged */
    double a10[4] = {10, 20, 30, 60};
    LoadStats s10 = metrics_load(a10, 4), s1 = metrics_load(a, 4);
    ok(fabs(s10.cv2 - s1.cv2) < TOL && fabs(s10.maxvio - s1.maxvio) < TOL && fabs(s10.entropy - s1.entropy) < TOL,
       "cv2, maxvio and entropy are scale invariant");

    double x[2] = {1, 3};
    near(metrics_max_over_mean(x, 2), 1.5, "max_over_mean {1,3}");
    near(metrics_max_over_mean(z, 2), 1.0, "max_over_mean of zeros (balanced by convention)");
}

/* K-class MCC from its definition: the correlation of the one-hot matrices X (pred) and Y
 * (gold), cov(X,Y) / sqrt(cov(X,X) cov(Y,Y)) with cov summed over classes */
static double mcc_cov(const int32_t *pred, const int32_t *gold, int n, int K) {
    double *mx = calloc((size_t)K, sizeof(double)), *my = calloc((size_t)K, sizeof(double));
    for (int i = 0; i < n; i++) { mx[pred[i]] += 1.0 / n; my[gold[i]] += 1.0 / n; }
    double cxy = 0, cxx = 0, cyy = 0;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < K; k++) {
            double x = (pred[i] == k) - mx[k], y = (gold[i] == k) - my[k];
            cxy += x * y; cxx += x * x; cyy += y * y;
        }
    free(mx); free(my);
    return cxx > 0 && cyy > 0 ? cxy / sqrt(cxx * cyy) : 0;
}

static void test_cls(void) {
    /* gold 1 1 1 0 0 0 0 1, pred 1 0 1 0 1 0 0 1: tp 3 (0,2,7), fn 1 (1), fp 1 (4), tn 3;
     * accuracy 6/8; F1 = 2*3 / (2*3 + 1 + 1) = 0.75; MCC = (3*3 - 1*1) / sqrt(4*4*4*4) = 0.5 */
    int32_t g1[8] = {1, 1, 1, 0, 0, 0, 0, 1}, p1[8] = {1, 0, 1, 0, 1, 0, 0, 1};
    near(cls_metric(CLS_METRIC_ACCURACY, p1, g1, 8, 2), 0.75, "case 1: accuracy");
    near(cls_metric(CLS_METRIC_F1, p1, g1, 8, 2), 0.75, "case 1: F1");
    near(cls_metric(CLS_METRIC_MCC, p1, g1, 8, 2), 0.5, "case 1: MCC");
    /* gold 1 1 1 0 0 0 0, pred 1 1 0 1 0 0 0: tp 2, fn 1, fp 1, tn 3; accuracy 5/7;
     * F1 = 4 / (4 + 1 + 1) = 2/3; MCC = (2*3 - 1*1) / sqrt(3*3*4*4) = 5/12 */
    int32_t g2[7] = {1, 1, 1, 0, 0, 0, 0}, p2[7] = {1, 1, 0, 1, 0, 0, 0};
    near(cls_metric(CLS_METRIC_ACCURACY, p2, g2, 7, 2), 5.0 / 7.0, "case 2: accuracy");
    near(cls_metric(CLS_METRIC_F1, p2, g2, 7, 2), 2.0 / 3.0, "case 2: F1");
    near(cls_metric(CLS_METRIC_MCC, p2, g2, 7, 2), 5.0 / 12.0, "case 2: MCC");
    /* perfect and inverted */
    int32_t inv[8];
    for (int i = 0; i < 8; i++) inv[i] = 1 - g1[i];
    ok(cls_metric(CLS_METRIC_ACCURACY, g1, g1, 8, 2) == 1 && cls_metric(CLS_METRIC_F1, g1, g1, 8, 2) == 1 &&
       fabs(cls_metric(CLS_METRIC_MCC, g1, g1, 8, 2) - 1) < TOL, "perfect predictions: accuracy 1, F1 1, MCC 1");
    ok(cls_metric(CLS_METRIC_ACCURACY, inv, g1, 8, 2) == 0 && cls_metric(CLS_METRIC_F1, inv, g1, 8, 2) == 0 &&
       fabs(cls_metric(CLS_METRIC_MCC, inv, g1, 8, 2) + 1) < TOL, "inverted predictions: accuracy 0, F1 0, MCC -1");
    /* a constant prediction: F1 0 (class 1 never predicted), MCC undefined -> 0, accuracy = share of 0s */
    int32_t zero[8] = {0};
    ok(cls_metric(CLS_METRIC_F1, zero, g1, 8, 2) == 0 && cls_metric(CLS_METRIC_MCC, zero, g1, 8, 2) == 0 &&
       cls_metric(CLS_METRIC_ACCURACY, zero, g1, 8, 2) == 0.5, "constant prediction: F1 0, MCC 0, accuracy 0.5");
    ok(cls_metric(CLS_METRIC_ACCURACY, zero, g1, 0, 2) == 0, "no examples: metric 0");
    /* 3 classes, gold 0 1 2 0 1 2, pred 0 1 2 1 1 0: correct c = 4 of s = 6; predicted counts
     * p = (2, 3, 1), true counts t = (2, 2, 2); sum p t = 12, sum p^2 = 14, sum t^2 = 12;
     * MCC = (4*6 - 12) / sqrt((36 - 14)(36 - 12)) = 12 / sqrt(528) */
    int32_t g3[6] = {0, 1, 2, 0, 1, 2}, p3[6] = {0, 1, 2, 1, 1, 0};
    near(cls_metric(CLS_METRIC_MCC, p3, g3, 6, 3), 12.0 / sqrt(528.0), "3 classes: MCC");
    near(cls_metric(CLS_METRIC_MCC, p3, g3, 6, 3), mcc_cov(p3, g3, 6, 3), "3 classes: MCC equals the one-hot correlation");
    near(cls_metric(CLS_METRIC_ACCURACY, p3, g3, 6, 0), 4.0 / 6.0, "3 classes, K inferred: accuracy");
    /* random 4-class cases against the covariance definition */
    Rng r;
    rng_init(&r, 9, 0, RNG_TEST);
    double worst = 0;
    for (int rep = 0; rep < 20; rep++) {
        int32_t p[50], g[50];
        for (int i = 0; i < 50; i++) {
            g[i] = (int32_t)rng_below(&r, 4);
            p[i] = rng_uniform(&r) < 0.5 ? g[i] : (int32_t)rng_below(&r, 4);
        }
        double d = fabs(cls_metric(CLS_METRIC_MCC, p, g, 50, 4) - mcc_cov(p, g, 50, 4));
        if (d > worst) worst = d;
    }
    ok(worst < 1e-12, "4 classes, 20 random cases: MCC equals the one-hot correlation (max diff %.2e)", worst);
}

int main(void) {
    test_load();
    test_cls();
    return harness_done();
}
