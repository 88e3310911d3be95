/* half_ref: an FP16 reference for the tests of the stored formats (tests/checkbackend.c,
 * tests/test_quant_common.c) that shares nothing with cuda/quant_common.h's bit tricks: a half
 * decoded by ldexp, and rounding to nearest (ties to the even code) by a binary search of the
 * table of every finite half.
 * Does not: directed roundings (checkbackend.c builds them on half_floor_code). */
#ifndef DCMOE_TESTS_HALF_REF_H
#define DCMOE_TESTS_HALF_REF_H

#include <math.h>
#include <stdint.h>

/* the value of half h (inf, NaN included) */
static inline double half_val(uint16_t h) {
    int sg = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp((double)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp((double)(1024 + m), e - 25);
    return sg ? -v : v;
}

/* largest code c in 0..0x7BFF with half_val(c) <= a (a >= 0 finite) */
static inline int half_floor_code(double a) {
    int lo = 0, hi = 0x7BFF;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (half_val((uint16_t)mid) <= a) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* nearest half, ties to the even code; |x| >= 65520 -> inf; NaN -> 0x7E00 with the sign */
static inline uint16_t ref_f16_rn(float x) {
    uint16_t sg = signbit(x) ? 0x8000 : 0;
    if (isnan(x)) return (uint16_t)(sg | 0x7E00);
    double a = fabs((double)x);
    if (a >= 65520.0) return (uint16_t)(sg | 0x7C00);
    int c = half_floor_code(a);
    double lo = half_val((uint16_t)c), hi = c == 0x7BFF ? 65536.0 : half_val((uint16_t)(c + 1));
    if (a == lo) return (uint16_t)(sg | c);
    int up = a - lo > hi - a || (a - lo == hi - a && (c & 1));
    return (uint16_t)(sg | (c + up));
}

#endif
