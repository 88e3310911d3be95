/* test_quant: FP16 conversion (every half, every rounding midpoint, overflow, subnormals),
 * INT4 nibble packing (every byte), INT4 group quantisation (layout, error <= scale/2,
 * requantise == identity, odd shapes), and the stored-format kernels (bitwise equal to the
 * dequantise-then-FP32 oracle, close to the FP32 product).
 * Does not: test the model integration (precision modes live in the trainer). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "quant.h"
#include "harness.h"

/* independent decoding of a half for the oracle */
static double half_value(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0) v = ldexp((double)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexp((double)(1024 + m), e - 25);
    return s ? -v : v;
}

static void test_f16_exhaustive(void) {
    long bad_decode = 0, bad_round = 0, bad_nan = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = quant_f16_to_f32((uint16_t)h);
        double ref = half_value((uint16_t)h);
        if (isnan(ref)) {
            uint16_t back = quant_f32_to_f16(f);
            if (!isnan(f) || (back & 0x7C00) != 0x7C00 || (back & 0x3FF) == 0 || (back & 0x8000) != (h & 0x8000)) bad_nan++;
            continue;
        }
        if ((double)f != ref || (signbit(f) != 0) != (int)(h >> 15)) bad_decode++;
        if (quant_f32_to_f16(f) != h) bad_round++;
    }
    ok(bad_decode == 0, "fp16 -> fp32 exact for every non-NaN half (%ld wrong)", bad_decode);
    ok(bad_round == 0, "fp32 -> fp16 round-trips every non-NaN half incl. subnormals, ±0, ±inf (%ld wrong)", bad_round);
    ok(bad_nan == 0, "NaN halves stay NaN with their sign (%ld wrong)", bad_nan);
}

static void test_f16_rounding(void) {
    long bad = 0;
    for (int sign = 0; sign < 2; sign++) {
        for (uint32_t h = 0; h < 0x7BFF; h++) {
            uint16_t lo = (uint16_t)(h | (sign << 15)), hi = (uint16_t)((h + 1) | (sign << 15));
            double mid = 0.5 * (half_value(lo) + half_value(hi));
            float fm = (float)mid;
            if ((double)fm != mid) { bad++; continue; }     /* midpoints are FP32 numbers */
            uint16_t even = (lo & 1) ? hi : lo;
            float toward_hi = nextafterf(fm, sign ? -INFINITY : INFINITY);
            float toward_lo = nextafterf(fm, sign ? INFINITY : -INFINITY);
            if (quant_f32_to_f16(fm) != even) bad++;
            if (quant_f32_to_f16(toward_hi) != hi) bad++;
            if (quant_f32_to_f16(toward_lo) != lo) bad++;
        }
    }
    ok(bad == 0, "every midpoint between neighbouring halves ties to even, and one FP32 ulp off it goes to the nearer (%ld wrong)", bad);
    ok(quant_f32_to_f16(65520.0f) == 0x7C00 && quant_f32_to_f16(-65520.0f) == 0xFC00 &&
       quant_f32_to_f16(nextafterf(65520.0f, 0)) == 0x7BFF && quant_f32_to_f16(1e30f) == 0x7C00,
       "overflow: 65520 -> inf, just below -> 65504");
    ok(quant_f32_to_f16(0x1.0p-25f) == 0x0000 && quant_f32_to_f16(nextafterf(0x1.0p-25f, 1)) == 0x0001 &&
       quant_f32_to_f16(-0x1.0p-26f) == 0x8000 && quant_f32_to_f16(1e-30f) == 0 &&
       quant_f32_to_f16(0x1.8p-24f) == 0x0002,
       "underflow: 2^-25 ties to 0, above it -> smallest subnormal, 1.5*2^-24 ties to 2*2^-24");
    ok(quant_f32_to_f16(INFINITY) == 0x7C00 && quant_f32_to_f16(-INFINITY) == 0xFC00 &&
       quant_f32_to_f16(NAN) == 0x7E00, "inf, -inf, NaN");

    /* vector forms equal the scalar ones; directed rounding brackets x */
    Rng rng;
    rng_init(&rng, 1, 0, RNG_TEST);
    enum { N = 4099 };
    float *x = xmalloc(N * sizeof(float)), *y = xmalloc(N * sizeof(float));
    uint16_t *h = xmalloc(N * sizeof(uint16_t));
    for (int i = 0; i < N; i++) x[i] = rng_normal(&rng) * (float)ldexp(1.0, (int)rng_below(&rng, 44) - 30);
    quant_f32_to_f16_n(h, x, N);
    quant_f16_to_f32_n(y, h, N);
    long bad_vec = 0, bad_dir = 0;
    for (int i = 0; i < N; i++) {
        if (h[i] != quant_f32_to_f16(x[i]) || y[i] != quant_f16_to_f32(h[i])) bad_vec++;
        if (fabsf(x[i]) > 65504.0f) continue;
        uint16_t d = quant_f32_to_f16_down(x[i]), u = quant_f32_to_f16_up(x[i]);
        float fd = quant_f16_to_f32(d), fu = quant_f16_to_f32(u);
        if (!(fd <= x[i] && x[i] <= fu)) bad_dir++;
        if (fd != fu && (float)half_value(quant_f32_to_f16(x[i])) != fd && (float)half_value(quant_f32_to_f16(x[i])) != fu) bad_dir++;
    }
    ok(bad_vec == 0, "vector conversions equal the scalar ones (%ld wrong)", bad_vec);
    ok(bad_dir == 0, "round-down/up bracket x and contain the nearest half (%ld wrong)", bad_dir);
    xfree(x); xfree(y); xfree(h);
}

static void test_int4_nibbles(void) {
    long bad = 0;
    for (int b = 0; b < 256; b++) {
        uint8_t byte = (uint8_t)b, q[2], back;
        quant_int4_unpack(q, &byte, 2);
        if (q[0] != (b & 15) || q[1] != (b >> 4)) bad++;          /* low nibble first */
        quant_int4_pack(&back, q, 2);
        if (back != byte) bad++;
    }
    ok(bad == 0, "INT4 unpack/pack round-trips all 256 bytes, element 0 in the low nibble (%d wrong)", (int)bad);
    uint8_t q[5] = {1, 2, 3, 4, 15}, p[3], u[5];
    quant_int4_pack(p, q, 5);
    quant_int4_unpack(u, p, 5);
    ok(p[0] == 0x21 && p[1] == 0x43 && p[2] == 0x0F && memcmp(q, u, 5) == 0, "odd count: last nibble low, high nibble 0");
}

/* the documented layout, spelled out on a tiny case: rows 3, cols 2, group 2 */
static void test_int4_layout(void) {
    /* column 0: 0, 1, 2 -> group 0 {0,1}, group 1 {2}; column 1: 10, 10, 25 */
    float w[6] = {0, 10, 1, 10, 2, 25};
    QTensor t;
    Status s = qtensor_init(&t, QFORMAT_INT4, 3, 2, 2);
    ok(STATUS_OK(s), "qtensor_init int4 [3,2] g2");
    qtensor_encode(&t, w);
    /* 2 columns x ceil(3/2)=2 bytes = 4 data bytes, 2x2 groups x (scale, zero) = 8 FP16 */
    ok(qtensor_size(&t) == 4 + 16, "blob bytes %zu == 4 data + 8 scales/zeros x 2 bytes", qtensor_size(&t));
    const uint8_t *d = t.data;
    /* col 0 group 0: zero 0, scale 1/15 -> q 0, 15; group 1: single value, range 0 -> q 0, zero 2 */
    ok(d[0] == 0xF0 && d[1] == 0x00, "column 0 bytes: %02x %02x (want f0 00)", d[0], d[1]);
    /* col 1 group 0: 10, 10 -> zero 10, scale 0 -> q 0,0; group 1: 25 alone */
    ok(d[2] == 0x00 && d[3] == 0x00, "column 1 bytes: %02x %02x (want 00 00)", d[2], d[3]);
    ok(quant_f16_to_f32(t.zeros[0]) == 0.0f && quant_f16_to_f32(t.zeros[1]) == 2.0f &&
       quant_f16_to_f32(t.zeros[2]) == 10.0f && quant_f16_to_f32(t.zeros[3]) == 25.0f,
       "zeros indexed [column, group]");
    ok(t.scales[1] == 0 && t.scales[2] == 0 && quant_f16_to_f32(t.scales[0]) >= 1.0f / 15,
       "scales indexed [column, group]; constant groups have scale 0");
    float back[6];
    qtensor_decode(&t, back);
    ok(back[1] == 10 && back[3] == 10 && back[4] == 2 && back[5] == 25 && back[0] == 0,
       "constant FP16-representable groups decode exactly");
    ok(qtensor_int4_get(&t, 1, 0) == 15, "qtensor_int4_get(1, 0) reads the high nibble");
    qtensor_free(&t);
    qtensor_free(&t);

    s = qtensor_init(&t, QFORMAT_INT4, 4, 4, 3);
    ok(!STATUS_OK(s) && strstr(s.msg, "even"), "odd group size refused: %s", s.msg);
    char blob[64];
    s = qtensor_view(&t, QFORMAT_F16, 2, 2, 0, blob + 1);
    ok(!STATUS_OK(s) && strstr(s.msg, "aligned"), "misaligned view refused: %s", s.msg);
}

static void fill_normal(Rng *rng, float *x, size_t n, float sd, float mean) {
    for (size_t i = 0; i < n; i++) x[i] = mean + sd * rng_normal(rng);
}

static void test_int4_quantise(void) {
    Rng rng;
    rng_init(&rng, 2, 0, RNG_TEST);
    const int shapes[][3] = {{1, 1, 64}, {63, 3, 64}, {64, 16, 64}, {65, 16, 64}, {130, 5, 64},
                             {257, 16, 64}, {7, 2, 2}, {33, 4, 8}, {100, 3, 128}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int rows = shapes[si][0], cols = shapes[si][1], g = shapes[si][2];
        size_t n = (size_t)rows * cols;
        float *w = xmalloc(n * sizeof(float)), *d = xmalloc(n * sizeof(float));
        fill_normal(&rng, w, n, 0.05f, (float)si * 0.3f - 1.0f);
        QTensor t, t2;
        Status s = qtensor_init(&t, QFORMAT_INT4, rows, cols, g);
        ASSERT(STATUS_OK(s));
        qtensor_encode(&t, w);
        qtensor_decode(&t, d);
        int ng = quant_int4_n_groups(rows, g);
        long bad = 0, bad_formula = 0;
        double worst = 0;
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < cols; c++) {
                size_t gi = (size_t)c * ng + i / g;
                float sc = quant_f16_to_f32(t.scales[gi]), z = quant_f16_to_f32(t.zeros[gi]);
                double err = fabs((double)d[(size_t)i * cols + c] - w[(size_t)i * cols + c]);
                double bound = 0.5 * sc + 0x1.0p-22 * (fabs(z) + 15.0 * sc);
                if (err > bound) bad++;
                if (sc > 0 && err / sc > worst) worst = err / sc;
                float v = (float)qtensor_int4_get(&t, i, c) * sc;
                if (d[(size_t)i * cols + c] != v + z) bad_formula++;
            }
        ok(bad == 0 && bad_formula == 0,
           "int4 [%d,%d] g%d: every error <= scale/2 (%ld over, worst %.4f scale), decode == q*scale+zero (%ld wrong)",
           rows, cols, g, bad, worst, bad_formula);
        ok(qtensor_size(&t) == (size_t)cols * ((rows + 1) / 2) + ((size_t)cols * ((rows + 1) / 2) & 1) + 4 * (size_t)cols * ng,
           "int4 [%d,%d] g%d: %zu bytes", rows, cols, g, qtensor_size(&t));
        /* requantise the dequantised values with the same parameters: identical nibbles */
        s = qtensor_init(&t2, QFORMAT_INT4, rows, cols, g);
        ASSERT(STATUS_OK(s));
        memcpy(t2.scales, t.scales, (size_t)cols * ng * 2);
        memcpy(t2.zeros, t.zeros, (size_t)cols * ng * 2);
        qtensor_encode_with_params(&t2, d);
        ok(memcmp(t.blob, t2.blob, qtensor_size(&t)) == 0, "int4 [%d,%d] g%d: quantise(dequantise(q)) == q", rows, cols, g);
        QuantError e = quant_roundtrip_error(w, rows, cols, QFORMAT_INT4, g);
        QuantError e16 = quant_roundtrip_error(w, rows, cols, QFORMAT_F16, 0);
        ok(e.rel_fro < 0.12 && e16.rel_fro < 1e-3 && e16.max_abs <= 0x1.0p-11 * 4,
           "int4 [%d,%d] g%d: rel Frobenius error int4 %.2e, fp16 %.2e (max abs %.2e)",
           rows, cols, g, e.rel_fro, e16.rel_fro, e16.max_abs);
        qtensor_free(&t);
        qtensor_free(&t2);
        xfree(w);
        xfree(d);
    }

    /* every nibble pattern through random scale/zero: decode then requantise gives q back */
    int rows = 64, cols = 16, g = 16, ng = quant_int4_n_groups(rows, g);
    QTensor t, t2;
    ASSERT(STATUS_OK(qtensor_init(&t, QFORMAT_INT4, rows, cols, g)));
    ASSERT(STATUS_OK(qtensor_init(&t2, QFORMAT_INT4, rows, cols, g)));
    uint8_t *data = t.data;
    for (int i = 0; i < rows * cols / 2; i++) data[i] = (uint8_t)i;       /* all 256 bytes, x2 */
    for (int gi = 0; gi < cols * ng; gi++) {
        t.scales[gi] = quant_f32_to_f16((float)(0.001 + rng_uniform(&rng) * 0.1));
        t.zeros[gi] = quant_f32_to_f16((float)(rng_uniform(&rng) * 2 - 1));
    }
    float *d = xmalloc((size_t)rows * cols * sizeof(float));
    qtensor_decode(&t, d);
    memcpy(t2.scales, t.scales, (size_t)cols * ng * 2);
    memcpy(t2.zeros, t.zeros, (size_t)cols * ng * 2);
    qtensor_encode_with_params(&t2, d);
    ok(memcmp(t.data, t2.data, (size_t)rows * cols / 2) == 0, "all 256 byte patterns survive dequantise -> quantise");
    /* fake quant == decode(encode) */
    float *w = xmalloc((size_t)rows * cols * sizeof(float)), *f = xmalloc((size_t)rows * cols * sizeof(float));
    fill_normal(&rng, w, (size_t)rows * cols, 0.1f, 0.0f);
    memcpy(f, w, (size_t)rows * cols * sizeof(float));
    quant_fake(f, rows, cols, QFORMAT_INT4, g, NULL);
    qtensor_encode(&t, w);
    qtensor_decode(&t, d);
    ok(memcmp(f, d, (size_t)rows * cols * sizeof(float)) == 0, "quant_fake == decode(encode(x))");
    QuantError e = quant_error(w, f, (size_t)rows * cols);
    /* INT4 of Gaussian data: error ~ scale/sqrt(12) ~ 0.08 sd */
    ok(e.rel_fro > 0 && e.rel_fro < 0.12 && e.max_abs > 0, "quant_error: rel %.3e, max abs %.3e", e.rel_fro, e.max_abs);
    float r1[2] = {3, 4}, a1[2] = {3, 4};
    e = quant_error(r1, a1, 2);
    ok(e.max_abs == 0 && e.rel_fro == 0 && e.ref_fro == 5, "quant_error of equal arrays is 0");
    qtensor_free(&t);
    qtensor_free(&t2);
    xfree(d); xfree(w); xfree(f);
}

static int bitwise_equal(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

static void test_kernels(const Backend *be) {
    Rng rng;
    rng_init(&rng, 3, 0, RNG_TEST);
    /* n, in, out, r, int4 group, block rows */
    const int cases[][6] = {{5, 130, 70, 16, 64, 64}, {1, 7, 3, 2, 2, 4}, {33, 257, 96, 8, 64, 0},
                            {17, 64, 200, 16, 8, 100}, {4, 96, 257, 4, 64, 32}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int n = cases[ci][0], in = cases[ci][1], out = cases[ci][2], r = cases[ci][3], g = cases[ci][4];
        int kb = cases[ci][5];
        float *W = xmalloc((size_t)in * out * 4), *A = xmalloc((size_t)in * r * 4), *B = xmalloc((size_t)out * r * 4);
        fill_normal(&rng, W, (size_t)in * out, 0.05f, 0.0f);
        fill_normal(&rng, A, (size_t)in * r, 0.1f, 0.0f);
        fill_normal(&rng, B, (size_t)out * r, 0.1f, 0.0f);
        QTensor qb, qa, qbb;
        ASSERT(STATUS_OK(qtensor_init(&qb, QFORMAT_F16, in, out, 0)));
        ASSERT(STATUS_OK(qtensor_init(&qa, QFORMAT_INT4, in, r, g)));
        ASSERT(STATUS_OK(qtensor_init(&qbb, QFORMAT_INT4, out, r, g)));
        qtensor_encode(&qb, W);
        qtensor_encode(&qa, A);
        qtensor_encode(&qbb, B);
        float *Wd = xmalloc((size_t)in * out * 4), *Ad = xmalloc((size_t)in * r * 4), *Bd = xmalloc((size_t)out * r * 4);
        qtensor_decode(&qb, Wd);
        qtensor_decode(&qa, Ad);
        qtensor_decode(&qbb, Bd);

        size_t nws = quant_fused_scratch_floats(n, in, out, r, kb);
        ok(nws <= (size_t)(kb ? kb : QUANT_BLOCK_ROWS) * out + (size_t)(in + out + n) * r,
           "case %zu: scratch %zu floats is bounded by a row block plus the factors", ci, nws);
        float *ws = xmalloc(nws * 4), *ws2 = xmalloc(nws * 4);
        float *X = xmalloc((size_t)n * in * 4), *dY = xmalloc((size_t)n * out * 4);
        fill_normal(&rng, X, (size_t)n * in, 1.0f, 0.0f);
        fill_normal(&rng, dY, (size_t)n * out, 1.0f, 0.0f);
        float *Y1 = xmalloc((size_t)n * out * 4), *Y2 = xmalloc((size_t)n * out * 4);
        float *dX1 = xmalloc((size_t)n * in * 4), *dX2 = xmalloc((size_t)n * in * 4);

        for (int pass = 0; pass < 2; pass++) {
            float beta = pass ? 1.0f : 0.0f;
            for (size_t i = 0; i < (size_t)n * out; i++) Y1[i] = Y2[i] = pass ? (float)i * 0.01f : NAN;
            for (size_t i = 0; i < (size_t)n * in; i++) dX1[i] = dX2[i] = pass ? (float)i * -0.02f : NAN;
            quant_fused_matmul(be, Y1, X, n, &qb, &qa, &qbb, beta, kb, ws);
            quant_fused_matmul_ref(be, Y2, X, n, in, out, r, Wd, Ad, Bd, beta, kb, ws2);
            ok(bitwise_equal(Y1, Y2, (size_t)n * out),
               "case %zu [n%d in%d out%d r%d g%d blk%d] beta %g: fused forward == dequantise-then-FP32, bitwise",
               ci, n, in, out, r, g, kb, beta);
            quant_fused_matmul_t(be, dX1, dY, n, &qb, &qa, &qbb, beta, kb, ws);
            quant_fused_matmul_t_ref(be, dX2, dY, n, in, out, r, Wd, Ad, Bd, beta, kb, ws2);
            ok(bitwise_equal(dX1, dX2, (size_t)n * in), "case %zu beta %g: fused transpose == oracle, bitwise", ci, beta);
        }

        /* close to the FP32 product, in double: against the dequantised weights (kernel error
         * only) and against the unquantised weights (kernel + format error) */
        double *yk = xmalloc((size_t)n * out * 8), *yq = xmalloc((size_t)n * out * 8), *y32 = xmalloc((size_t)n * out * 8);
        quant_fused_matmul(be, Y1, X, n, &qb, &qa, &qbb, 0.0f, kb, ws);
        double se = 0, sr = 0;
        for (int t = 0; t < n; t++)
            for (int o = 0; o < out; o++) {
                double sq = 0, s32 = 0;
                for (int i = 0; i < in; i++) {
                    double wq = Wd[(size_t)i * out + o], w32 = W[(size_t)i * out + o];
                    for (int k = 0; k < r; k++) {
                        wq += (double)Ad[(size_t)i * r + k] * Bd[(size_t)o * r + k];
                        w32 += (double)A[(size_t)i * r + k] * B[(size_t)o * r + k];
                    }
                    sq += X[(size_t)t * in + i] * wq;
                    s32 += X[(size_t)t * in + i] * w32;
                }
                size_t j = (size_t)t * out + o;
                yk[j] = Y1[j];
                yq[j] = sq;
                y32[j] = s32;
                se += (sq - s32) * (sq - s32);
                sr += s32 * s32;
            }
        close_enough("fused vs exact product of the stored weights", yk, yq, (size_t)n * out, 2e-5, 1e-4);
        ok(sqrt(se / sr) < 0.15, "case %zu: stored-format product within %.2e (rel Frobenius) of the FP32 product",
           ci, sqrt(se / sr));

        /* the pieces: base-only with an FP32 base reads the data in place */
        QTensor q32;
        ASSERT(STATUS_OK(qtensor_view(&q32, QFORMAT_F32, in, out, 0, Wd)));
        quant_base_matmul(be, Y1, X, n, &qb, 0.0f, kb, ws);
        quant_base_matmul(be, Y2, X, n, &q32, 0.0f, kb, ws2);
        ok(bitwise_equal(Y1, Y2, (size_t)n * out), "case %zu: base matmul from FP16 == from the decoded FP32 base", ci);

        xfree(yk); xfree(yq); xfree(y32);
        xfree(W); xfree(A); xfree(B); xfree(Wd); xfree(Ad); xfree(Bd);
        xfree(ws); xfree(ws2); xfree(X); xfree(dY); xfree(Y1); xfree(Y2); xfree(dX1); xfree(dX2);
        qtensor_free(&qb); qtensor_free(&qa); qtensor_free(&qbb);
    }
}

/* any format in any position: INT4 base, FP16 A, FP32 B; partial row decoding */
static void test_mixed_formats(const Backend *be) {
    Rng rng;
    rng_init(&rng, 4, 0, RNG_TEST);
    int n = 9, in = 77, out = 45, r = 6, kb = 16;
    float *W = xmalloc((size_t)in * out * 4), *A = xmalloc((size_t)in * r * 4), *B = xmalloc((size_t)out * r * 4);
    fill_normal(&rng, W, (size_t)in * out, 0.05f, 0.01f);
    fill_normal(&rng, A, (size_t)in * r, 0.1f, 0.0f);
    fill_normal(&rng, B, (size_t)out * r, 0.1f, 0.0f);
    QTensor qb, qa, qbb;
    ASSERT(STATUS_OK(qtensor_init(&qb, QFORMAT_INT4, in, out, 8)));
    ASSERT(STATUS_OK(qtensor_init(&qa, QFORMAT_F16, in, r, 0)));
    ASSERT(STATUS_OK(qtensor_init(&qbb, QFORMAT_F32, out, r, 0)));
    qtensor_encode(&qb, W);
    qtensor_encode(&qa, A);
    qtensor_encode(&qbb, B);
    float *Wd = xmalloc((size_t)in * out * 4), *Ad = xmalloc((size_t)in * r * 4), *part = xmalloc((size_t)in * out * 4);
    qtensor_decode(&qb, Wd);
    qtensor_decode(&qa, Ad);
    long bad = 0;
    for (int r0 = 0; r0 < in; r0 += 13) {
        int nr = in - r0 < 10 ? in - r0 : 10;
        qtensor_decode_rows(&qb, r0, nr, part);
        bad += memcmp(part, Wd + (size_t)r0 * out, (size_t)nr * out * 4) != 0;
    }
    ok(bad == 0, "INT4 decode_rows of any row range equals the slice of the full decode");
    size_t nws = quant_fused_scratch_floats(n, in, out, r, kb);
    float *ws = xmalloc(nws * 4), *ws2 = xmalloc(nws * 4), *X = xmalloc((size_t)n * in * 4);
    float *Y1 = xmalloc((size_t)n * out * 4), *Y2 = xmalloc((size_t)n * out * 4);
    fill_normal(&rng, X, (size_t)n * in, 1.0f, 0.0f);
    quant_fused_matmul(be, Y1, X, n, &qb, &qa, &qbb, 0.0f, kb, ws);
    quant_fused_matmul_ref(be, Y2, X, n, in, out, r, Wd, Ad, B, 0.0f, kb, ws2);
    ok(bitwise_equal(Y1, Y2, (size_t)n * out), "INT4 base + FP16 A + FP32 B: fused == oracle, bitwise");
    float *dY = xmalloc((size_t)n * out * 4), *dX1 = xmalloc((size_t)n * in * 4), *dX2 = xmalloc((size_t)n * in * 4);
    fill_normal(&rng, dY, (size_t)n * out, 1.0f, 0.0f);
    quant_fused_matmul_t(be, dX1, dY, n, &qb, &qa, &qbb, 0.0f, kb, ws);
    quant_fused_matmul_t_ref(be, dX2, dY, n, in, out, r, Wd, Ad, B, 0.0f, kb, ws2);
    ok(bitwise_equal(dX1, dX2, (size_t)n * in), "mixed formats: fused transpose == oracle, bitwise");
    /* n = 0 touches nothing */
    Y1[0] = 42.0f;
    quant_fused_matmul(be, Y1, X, 0, &qb, &qa, &qbb, 0.0f, kb, ws);
    ok(Y1[0] == 42.0f, "n = 0 is a no-op");
    xfree(W); xfree(A); xfree(B); xfree(Wd); xfree(Ad); xfree(part); xfree(ws); xfree(ws2); xfree(X);
    xfree(Y1); xfree(Y2); xfree(dY); xfree(dX1); xfree(dX2);
    qtensor_free(&qb); qtensor_free(&qa); qtensor_free(&qbb);
}

int main(void) {
    Backend be;
    Status s = backend_cpu_init(&be, 1);
    if (!STATUS_OK(s)) { printf("# %s\n", s.msg); return 1; }
    test_f16_exhaustive();
    test_f16_rounding();
    test_int4_nibbles();
    test_int4_layout();
    test_int4_quantise();
    test_kernels(&be);
    test_mixed_formats(&be);
    backend_free(&be);
    return harness_done();
}
