/* test_quant_common: the per-element functions of cuda/quant_common.h (shared by src/quant.c
 * and the CUDA kernels) on the CPU, against values derived here by other means: FP16 decoding
 * by ldexp, FP16 rounding by a search of the table of every finite half (±0, subnormals,
 * inf/NaN, every rounding tie of a sweep), the directed roundings, nibble get/set/pack, the
 * INT4 parameters, quantiser and dequantiser of one element, and a whole-tensor fake
 * quantisation built from the header's functions against quant_fake (odd column counts, the
 * last partial group).
 * Does not: test the backends' slots (tests/checkbackend.c: dequant_rows, fake_quant). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "half_ref.h"
#include "harness.h"
#include "quant.h"
#include "quant_common.h"
#include "util.h"

static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static void test_f16(void) {
    long bad_dec = 0, bad_rt = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qc_f16_to_f32((uint16_t)h);
        double v = half_val((uint16_t)h);
        if (isnan(v)) { if (!isnan(f) || (fbits(f) >> 31) != (h >> 15)) bad_dec++; continue; }
        if ((double)f != v || (signbit(f) != 0) != (int)(h >> 15)) bad_dec++;
        if (qc_f32_to_f16(f) != h || qc_f16_fake(f) != f) bad_rt++;
    }
    ok(bad_dec == 0, "qc_f16_to_f32 exact for every half, signs of ±0 and NaN kept (%ld wrong)", bad_dec);
    ok(bad_rt == 0, "qc_f32_to_f16 and qc_f16_fake round-trip every non-NaN half (%ld wrong)", bad_rt);
    /* a sweep over FP32 values: every exponent the conversion distinguishes, the ties between
     * neighbouring halves and one ulp either side */
    long bad = 0, n = 0;
    for (int sign = 0; sign < 2; sign++)
        for (uint32_t c = 0; c < 0x7BFF; c += 7) {
            double lo = half_val((uint16_t)c), hi = half_val((uint16_t)(c + 1)), mid = 0.5 * (lo + hi);
            float xs[3] = {(float)mid, nextafterf((float)mid, 0), nextafterf((float)mid, INFINITY)};
            for (int k = 0; k < 3; k++) {
                float x = sign ? -xs[k] : xs[k];
                bad += qc_f32_to_f16(x) != ref_f16_rn(x);
                n++;
            }
        }
    ok(bad == 0, "qc_f32_to_f16 rounds %ld ties and near-ties like the table search (ties to even; %ld wrong)", n, bad);
    ok(qc_f32_to_f16(0.0f) == 0x0000 && qc_f32_to_f16(-0.0f) == 0x8000, "±0 keep their sign");
    ok(qc_f32_to_f16(0x1p-25f) == 0x0000 && qc_f32_to_f16(nextafterf(0x1p-25f, 1)) == 0x0001 &&
       qc_f32_to_f16(0x1.8p-24f) == 0x0002 && qc_f32_to_f16(-0x1p-26f) == 0x8000,
       "subnormal edge: 2^-25 ties to 0, just above gives the smallest subnormal, 1.5*2^-24 ties to even (2)");
    ok(qc_f32_to_f16(65504.0f) == 0x7BFF && qc_f32_to_f16(65519.996f) == 0x7BFF && qc_f32_to_f16(65520.0f) == 0x7C00 &&
       qc_f32_to_f16(-INFINITY) == 0xFC00 && qc_f32_to_f16(1e38f) == 0x7C00, "overflow: >= 65520 gives ±inf");
    ok(qc_f32_to_f16(NAN) == 0x7E00 && qc_f32_to_f16(-NAN) == 0xFE00, "NaN becomes the quiet NaN with its sign");
    /* directed roundings */
    long bad_dir = 0;
    for (int i = 0; i < 20000; i++) {
        float x = (float)(ldexp(1.0, -26 + i % 42) * (1.0 + (i * 0.6180339887) - floor(i * 0.6180339887)));
        if (x > 65504.0f) continue;
        for (int sg = 0; sg < 2; sg++) {
            float y = sg ? -x : x;
            uint16_t d = qc_f32_to_f16_down(y), u = qc_f32_to_f16_up(y);
            double dv = half_val(d), uv = half_val(u);
            if (!(dv <= y && uv >= y)) bad_dir++;
            if (dv != y && uv != y && (d & 0x7FFF) != 0 && (u & 0x7FFF) != 0 && fabs(uv - dv) > fabs(half_val((uint16_t)((d & 0x7FFF) + 1)) - half_val(d & 0x7FFF)) * 1.0000001)
                bad_dir++;   /* not neighbours */
        }
    }
    ok(bad_dir == 0, "qc_f32_to_f16_down <= x <= qc_f32_to_f16_up, neighbouring halves (%ld wrong)", bad_dir);
    ok(qc_f32_to_f16_down(0.0f) == 0x0000 && qc_f32_to_f16_down(-0.0f) == 0x8000 && qc_f32_to_f16_down(1e-10f) == 0x0000 &&
       qc_f32_to_f16_down(-1e-10f) == 0x8001 && qc_f32_to_f16_up(1e-10f) == 0x0001 && qc_f32_to_f16_up(-1e-10f) == 0x8000,
       "directed roundings around zero (down(+tiny) = +0, down(-tiny) = -2^-24, up(+tiny) = 2^-24, up(-tiny) = -0)");
}

static void test_nibbles(void) {
    uint8_t run[5] = {0};
    for (int i = 0; i < 9; i++) qc_int4_set(run, (size_t)i, (i * 7 + 3) & 15);
    int good = 1;
    for (int i = 0; i < 9; i++) good &= qc_int4_get(run, (size_t)i) == ((i * 7 + 3) & 15);
    ok(good && run[4] == ((8 * 7 + 3) & 15), "qc_int4_set/get: 9 nibbles (odd count), the padding nibble stays 0");
    qc_int4_set(run, 3, 0x1F);
    ok(qc_int4_get(run, 3) == 15 && qc_int4_get(run, 2) == ((2 * 7 + 3) & 15), "qc_int4_set masks to 4 bits and keeps the other nibble");
    int pack_ok = 1;
    for (int lo = 0; lo < 16; lo++)
        for (int hi = 0; hi < 16; hi++) {
            uint8_t b = qc_int4_pack2(lo, hi);
            pack_ok &= b == (uint8_t)(lo | hi << 4) && qc_int4_get(&b, 0) == lo && qc_int4_get(&b, 1) == hi;
        }
    ok(pack_ok, "qc_int4_pack2 / qc_int4_get for all 256 bytes");
}

static void test_int4_element(void) {
    uint16_t s16, z16;
    qc_int4_params(-1.0f, 2.0f, &s16, &z16);
    ok(half_val(z16) == -1.0 && half_val(s16) >= 0.2 && half_val(qc_f32_to_f16_down((float)half_val(s16))) == half_val(s16) &&
       half_val(s16) - 0.2 < 0.0002, "params(-1, 2): zero -1, scale = the half just at or above 0.2 (%g)", half_val(s16));
    qc_int4_params(0.75f, 0.75f, &s16, &z16);
    ok(s16 == 0 && half_val(z16) == 0.75 && qc_int4_quant(0.75f, 0.0f, 0.75f) == 0 && qc_int4_fake(0.75f, s16, z16) == 0.75f,
       "a constant group: scale 0, every element its zero (exact when an FP16 number)");
    qc_int4_params(-0.0f, 0.0f, &s16, &z16);
    ok(s16 == 0 && z16 == 0x8000, "params(-0, +0): zero -0, scale 0");
    qc_int4_params(-70000.0f, 1e30f, &s16, &z16);
    ok(z16 == 0xFBFF && s16 == 0x7BFF, "params beyond the FP16 range: zero clamps to -65504, scale to the largest finite half");
    float s = 0.25f, z = -1.0f;
    ok(qc_int4_quant(-1.0f, s, z) == 0 && qc_int4_quant(-2.0f, s, z) == 0 && qc_int4_quant(2.75f, s, z) == 15 &&
       qc_int4_quant(9.0f, s, z) == 15 && qc_int4_quant(-0.875f, s, z) == 1 && qc_int4_quant(-0.8751f, s, z) == 0,
       "qc_int4_quant: clamps to 0..15, rounds half up (floor(t + 0.5))");
    ok(qc_int4_dequant(3, s, z) == -0.25f && fbits(qc_int4_dequant(4, 0.25f, -1.0f)) == fbits(0.0f) &&
       qc_int4_dequant16(2, qc_f32_to_f16(0.5f), qc_f32_to_f16(1.0f)) == 2.0f, "qc_int4_dequant(16): q s + z");
    /* one element of a tensor by its layout: rows 5 (odd), group 2 (3 groups, the last partial) */
    uint8_t data[2 * 3] = {0};
    uint16_t sc[2 * 3], ze[2 * 3];
    for (int c = 0; c < 2; c++)
        for (int k = 0; k < 3; k++) { sc[c * 3 + k] = qc_f32_to_f16(0.5f * (float)(k + 1)); ze[c * 3 + k] = qc_f32_to_f16((float)-c); }
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < 5; i++) qc_int4_set(data + c * 3, (size_t)i, i + 3 * c);
    int el_ok = 1;
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < 5; i++) {
            float want = (float)(i + 3 * c) * 0.5f * (float)(i / 2 + 1) + (float)-c;
            el_ok &= qc_int4_element(data, sc, ze, 5, 2, i, c) == want;
        }
    ok(el_ok, "qc_int4_element: rows 5 (odd), group 2, the last group one row");
}

/* a whole fake quantisation from the header's functions (as the CUDA kernels compose them) is
 * quant_fake's: odd column counts, the last partial group, ±0 and subnormal inputs */
static void test_fake_tensor(void) {
    static const int shapes[][3] = {{1, 1, 2}, {5, 3, 2}, {67, 5, 64}, {130, 7, 8}, {17, 1, 4}};
    Rng rng;
    rng_init(&rng, 7, 1, RNG_TEST);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int rows = shapes[si][0], cols = shapes[si][1], group = shapes[si][2];
        size_t n = (size_t)rows * cols;
        float *x = xmalloc(sizeof(float) * n), *a = xmalloc(sizeof(float) * n), *b = xmalloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) x[i] = (float)(ldexp(1.0, (int)(i % 23) - 16) * rng_normal(&rng));
        if (n > 3) { x[0] = -0.0f; x[1] = 0x1p-24f; x[n - 1] = 0.0f; }
        memcpy(a, x, sizeof(float) * n);
        memcpy(b, x, sizeof(float) * n);
        quant_fake(a, rows, cols, QFORMAT_INT4, group, NULL);
        int ng = (rows + group - 1) / group;
        for (int c = 0; c < cols; c++)
            for (int k = 0; k < ng; k++) {
                int i0 = k * group, i1 = i0 + group < rows ? i0 + group : rows;
                float mn, mx;
                uint16_t s16, z16;
                qc_int4_minmax(x, cols, c, i0, i1, &mn, &mx);
                qc_int4_params(mn, mx, &s16, &z16);
                for (int i = i0; i < i1; i++) b[(size_t)i * cols + c] = qc_int4_fake(x[(size_t)i * cols + c], s16, z16);
            }
        ok(memcmp(a, b, sizeof(float) * n) == 0, "int4 [%d,%d] group %d: minmax + params + fake per element == quant_fake bitwise",
           rows, cols, group);
        memcpy(a, x, sizeof(float) * n);
        quant_fake(a, rows, cols, QFORMAT_F16, 0, NULL);
        int f16_ok = 1;
        for (size_t i = 0; i < n; i++) f16_ok &= fbits(a[i]) == fbits(qc_f16_fake(x[i]));
        ok(f16_ok, "fp16 [%d,%d]: qc_f16_fake per element == quant_fake bitwise", rows, cols);
        xfree(x); xfree(a); xfree(b);
    }
}

int main(void) {
    test_f16();
    test_nibbles();
    test_int4_element();
    test_fake_tensor();
    return harness_done();
}
