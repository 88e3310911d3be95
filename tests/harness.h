/* harness: a tiny TAP-style test harness. Tests call ok()/close_enough() and end with
 * harness_done(), which returns the exit code (non-zero on any failure, 77 = skip).
 * Does not: fork or time anything. */
#ifndef DCMOE_TEST_HARNESS_H
#define DCMOE_TEST_HARNESS_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int harness_n_tests = 0, harness_n_failed = 0;

static inline void ok(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void ok(int cond, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    harness_n_tests++;
    if (!cond) harness_n_failed++;
    printf("%s %d - ", cond ? "ok" : "not ok", harness_n_tests);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

/* |a - b| <= atol + rtol * |b| elementwise; prints the first few failures and the max errors */
static inline int close_enough(const char *what, const double *a, const double *b, size_t n,
                               double atol, double rtol) {
    size_t n_bad = 0;
    double max_abs = 0, max_rel = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        double r = d / (fabs(b[i]) + 1e-30);
        if (d > max_abs) max_abs = d;
        if (r > max_rel && fabs(b[i]) > atol) max_rel = r;
        if (!(d <= atol + rtol * fabs(b[i]))) {
            if (n_bad < 5) printf("#   %s[%zu]: got %.9g want %.9g (diff %.3g)\n", what, i, a[i], b[i], d);
            n_bad++;
        }
    }
    ok(n_bad == 0, "%s: %zu/%zu outside atol=%.1e rtol=%.1e (max abs %.3g, max rel %.3g)",
       what, n_bad, n, atol, rtol, max_abs, max_rel);
    return n_bad == 0;
}

static inline int harness_done(void) {
    printf("1..%d\n", harness_n_tests);
    if (harness_n_failed) printf("# %d of %d failed\n", harness_n_failed, harness_n_tests);
    return harness_n_failed ? 1 : 0;
}

#endif
