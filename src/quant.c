/* quant: FP16 and INT4 group formats, their conversions, error statistics, QAT fake-quant and
 * matmul kernels that dequantise the stored base a row block at a time (layouts in quant.h).
 * Per-element arithmetic: cuda/quant_common.h (shared with the CUDA kernels).
 * Does not: choose formats for tensors, touch the model, or hold device code (tensors in
 * backend memory go through the backend's dequant_rows / fake_quant slots).
 *
 * Legend: n in out r = rows of X (tokens), input width, output width, rank. */
#include "quant.h"
#include "quant_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------
 * FP16: the conversions are cuda/quant_common.h's (shared with the CUDA kernels); static
 * inline there, so the array loops inline and vectorise them */
#define f32_to_f16 qc_f32_to_f16
#define f16_to_f32 qc_f16_to_f32

uint16_t quant_f32_to_f16(float f) { return f32_to_f16(f); }
float quant_f16_to_f32(uint16_t h) { return f16_to_f32(h); }

void quant_f32_to_f16_n(uint16_t *restrict dst, const float *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

void quant_f16_to_f32_n(float *restrict dst, const uint16_t *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

uint16_t quant_f32_to_f16_down(float x) { return qc_f32_to_f16_down(x); }
uint16_t quant_f32_to_f16_up(float x) { return qc_f32_to_f16_up(x); }

/* ---------------------------------------------------------------------------------------
 * INT4 nibbles */

void quant_int4_pack(uint8_t *dst, const uint8_t *q, size_t n) {
    for (size_t j = 0; j < n / 2; j++) dst[j] = qc_int4_pack2(q[2 * j], q[2 * j + 1]);
    if (n & 1) dst[n / 2] = qc_int4_pack2(q[n - 1], 0);
}

void quant_int4_unpack(uint8_t *q, const uint8_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) q[i] = (uint8_t)qc_int4_get(src, i);
}

/* ---------------------------------------------------------------------------------------
 * tensors */

const char *quant_format_name(enum QFormat fmt) {
    switch (fmt) {
    case QFORMAT_F32: return "fp32";
    case QFORMAT_F16: return "fp16";
    case QFORMAT_INT4: return "int4";
    }
    return "?";
}

static size_t int4_data_bytes(int rows, int cols) {
    return (size_t)cols * (size_t)((rows + 1) / 2);
}

static size_t int4_data_bytes_padded(int rows, int cols) {
    size_t b = int4_data_bytes(rows, cols);
    return b + (b & 1);          /* scales start 2-byte aligned */
}

size_t qtensor_bytes(enum QFormat fmt, int rows, int cols, int group) {
    size_t n = (size_t)rows * (size_t)cols;
    switch (fmt) {
    case QFORMAT_F32: return n * sizeof(float);
    case QFORMAT_F16: return n * sizeof(uint16_t);
    case QFORMAT_INT4:
        return int4_data_bytes_padded(rows, cols) +
               2 * (size_t)cols * (size_t)quant_int4_n_groups(rows, group) * sizeof(uint16_t);
    }
    return 0;
}

static Status check_shape(enum QFormat fmt, int rows, int cols, int group) {
    if (rows < 0 || cols < 0)
        return status_errorf("quant: bad shape [%d, %d]", rows, cols);
    if (fmt != QFORMAT_F32 && fmt != QFORMAT_F16 && fmt != QFORMAT_INT4)
        return status_errorf("quant: unknown format %d", (int)fmt);
    if (fmt == QFORMAT_INT4 && (group < 2 || group % 2 != 0))
        return status_errorf("quant: INT4 group size %d must be even and >= 2", group);
    return status_ok();
}

Status qtensor_view(QTensor *t, enum QFormat fmt, int rows, int cols, int group, void *blob) {
    memset(t, 0, sizeof *t);
    TRY(check_shape(fmt, rows, cols, group));
    if (((uintptr_t)blob & 1) != 0) return status_errorf("quant: blob %p is not 2-byte aligned", blob);
    t->fmt = fmt;
    t->rows = rows;
    t->cols = cols;
    t->group = fmt == QFORMAT_INT4 ? group : 0;
    t->blob = blob;
    t->data = blob;
    if (fmt == QFORMAT_INT4) {
        size_t ng = (size_t)cols * (size_t)quant_int4_n_groups(rows, group);
        t->scales = (uint16_t *)((char *)blob + int4_data_bytes_padded(rows, cols));
        t->zeros = t->scales + ng;
    }
    return status_ok();
}

Status qtensor_init(QTensor *t, enum QFormat fmt, int rows, int cols, int group) {
    memset(t, 0, sizeof *t);
    TRY(check_shape(fmt, rows, cols, group));
    size_t b = qtensor_bytes(fmt, rows, cols, group);
    void *blob = xcalloc(b ? b : 1);
    Status s = qtensor_view(t, fmt, rows, cols, group, blob);
    if (!STATUS_OK(s)) { xfree(blob); return s; }
    t->owns = true;
    return status_ok();
}

void qtensor_free(QTensor *t) {
    if (t->owns) xfree(t->blob);
    memset(t, 0, sizeof *t);
}

/* one INT4 group of column c, rows i0..i1-1 of src[rows, cols]: quantise with (s, z) */
static void int4_encode_group(uint8_t *col, const float *src, int cols, int c, int i0, int i1,
                              float s, float z) {
    for (int i = i0; i < i1; i++) qc_int4_set(col, i, qc_int4_quant(src[(size_t)i * cols + c], s, z));
}

static void int4_encode(QTensor *t, const float *src, bool with_params) {
    int rows = t->rows, cols = t->cols, g = t->group, ng = quant_int4_n_groups(rows, g);
    size_t cb = (size_t)((rows + 1) / 2);
    uint8_t *data = t->data;
    memset(data, 0, int4_data_bytes(rows, cols));
    for (int c = 0; c < cols; c++) {
        for (int k = 0; k < ng; k++) {
            int i0 = k * g, i1 = i0 + g < rows ? i0 + g : rows;
            size_t gi = (size_t)c * ng + k;
            if (!with_params) {
                float mn, mx;
                qc_int4_minmax(src, cols, c, i0, i1, &mn, &mx);
                ASSERTF(isfinite(mn) && isfinite(mx), "quant: INT4 input is not finite (column %d, group %d)", c, k);
                qc_int4_params(mn, mx, &t->scales[gi], &t->zeros[gi]);
            }
            int4_encode_group(data + (size_t)c * cb, src, cols, c, i0, i1,
                              f16_to_f32(t->scales[gi]), f16_to_f32(t->zeros[gi]));
        }
    }
}

void qtensor_encode(QTensor *t, const float *src) {
    size_t n = (size_t)t->rows * t->cols;
    switch (t->fmt) {
    case QFORMAT_F32: memcpy(t->data, src, n * sizeof(float)); break;
    case QFORMAT_F16: quant_f32_to_f16_n(t->data, src, n); break;
    case QFORMAT_INT4: int4_encode(t, src, false); break;
    }
}

void qtensor_encode_with_params(QTensor *t, const float *src) {
    if (t->fmt == QFORMAT_INT4) int4_encode(t, src, true);
    else qtensor_encode(t, src);
}

void qtensor_decode_rows(const QTensor *t, int r0, int nr, float *dst) {
    ASSERT(r0 >= 0 && nr >= 0 && r0 + nr <= t->rows);
    int cols = t->cols;
    size_t off = (size_t)r0 * cols, n = (size_t)nr * cols;
    switch (t->fmt) {
    case QFORMAT_F32: memcpy(dst, (const float *)t->data + off, n * sizeof(float)); return;
    case QFORMAT_F16: quant_f16_to_f32_n(dst, (const uint16_t *)t->data + off, n); return;
    case QFORMAT_INT4: break;
    }
    int g = t->group, ng = quant_int4_n_groups(t->rows, g);
    size_t cb = (size_t)((t->rows + 1) / 2);
    const uint8_t *data = t->data;
    for (int c = 0; c < cols; c++) {
        const uint8_t *col = data + (size_t)c * cb;
        for (int i = r0; i < r0 + nr; i++) {
            size_t gi = (size_t)c * ng + (size_t)(i / g);
            dst[(size_t)(i - r0) * cols + c] = qc_int4_dequant16(qc_int4_get(col, i), t->scales[gi], t->zeros[gi]);
        }
    }
}

void qtensor_decode(const QTensor *t, float *dst) {
    qtensor_decode_rows(t, 0, t->rows, dst);
}

/* ---------------------------------------------------------------------------------------
 * error statistics, fake quant */

QuantError quant_error(const float *ref, const float *approx, size_t n) {
    QuantError e = {0, 0, 0};
    double se = 0, sr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)approx[i] - (double)ref[i];
        if (fabs(d) > e.max_abs || d != d) e.max_abs = fabs(d);
        se += d * d;
        sr += (double)ref[i] * ref[i];
    }
    e.ref_fro = sqrt(sr);
    e.rel_fro = sr > 0 ? sqrt(se / sr) : (se > 0 ? INFINITY : 0.0);
    return e;
}

QuantError quant_roundtrip_error(const float *src, int rows, int cols, enum QFormat fmt, int group) {
    size_t n = (size_t)rows * cols;
    float *tmp = xmalloc(n * sizeof(float) + 64);
    memcpy(tmp, src, n * sizeof(float));
    quant_fake(tmp, rows, cols, fmt, group, NULL);
    QuantError e = quant_error(src, tmp, n);
    xfree(tmp);
    return e;
}

void quant_fake(float *x, int rows, int cols, enum QFormat fmt, int group, void *scratch) {
    if (fmt == QFORMAT_F32) return;
    QTensor t;
    void *blob = scratch ? scratch : xmalloc(qtensor_bytes(fmt, rows, cols, group) + 2);
    Status s = qtensor_view(&t, fmt, rows, cols, group, blob);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    qtensor_encode(&t, x);
    qtensor_decode(&t, x);
    if (!scratch) xfree(blob);
}

void quant_fake_dev(const Backend *be, float *x, int rows, int cols, enum QFormat fmt, int group) {
    if (fmt == QFORMAT_F32) return;
    be->ops->fake_quant(be->ctx, x, (int)fmt, rows, cols, fmt == QFORMAT_INT4 ? group : 0);
}

/* ---------------------------------------------------------------------------------------
 * kernels */

static int block_of(int block_rows) { return block_rows > 0 ? block_rows : QUANT_BLOCK_ROWS; }

size_t quant_base_matmul_scratch_floats(int out, int block_rows) {
    return (size_t)block_of(block_rows) * (size_t)out;
}

/* rows r0..r0+nr-1 of t into ws: on the backend (t->dev) or on the host */
static void decode_rows_into(const Backend *be, const QTensor *t, int r0, int nr, float *ws) {
    if (t->dev) be->ops->dequant_rows(be->ctx, ws, (int)t->fmt, t->data, t->scales, t->zeros, t->rows, t->cols,
                                      t->group, r0, nr);
    else qtensor_decode_rows(t, r0, nr, ws);
}

/* the rows k0..k0+nb-1 of base as FP32: a pointer into an FP32 base, else decoded into ws */
static const float *base_rows(const Backend *be, const QTensor *base, int k0, int nb, float *ws) {
    if (base->fmt == QFORMAT_F32) return (const float *)base->data + (size_t)k0 * base->cols;
    decode_rows_into(be, base, k0, nb, ws);
    return ws;
}

void quant_base_matmul(const Backend *be, float *Y, const float *X, int n, const QTensor *base,
                       float beta, int block_rows, float *ws) {
    int in = base->rows, out = base->cols, kb = block_of(block_rows);
    ASSERT(in > 0 && out > 0 && n >= 0);
    if (n == 0) return;
    for (int k0 = 0; k0 < in; k0 += kb) {
        int nb = in - k0 < kb ? in - k0 : kb;
        const float *w = base_rows(be, base, k0, nb, ws);             /* [nb, out] */
        be->ops->gemm(be->ctx, false, false, n, out, nb, 1.0f, X + k0, in, w, out,
                      k0 == 0 ? beta : 1.0f, Y, out);
    }
}

void quant_base_matmul_t(const Backend *be, float *dX, const float *dY, int n, const QTensor *base,
                         float beta, int block_rows, float *ws) {
    int in = base->rows, out = base->cols, kb = block_of(block_rows);
    ASSERT(in > 0 && out > 0 && n >= 0);
    if (n == 0) return;
    for (int k0 = 0; k0 < in; k0 += kb) {
        int nb = in - k0 < kb ? in - k0 : kb;
        const float *w = base_rows(be, base, k0, nb, ws);             /* [nb, out] */
        /* dX[:, k0:k0+nb] = beta*dX + dY[n,out] w[nb,out]^T */
        be->ops->gemm(be->ctx, false, true, n, nb, out, 1.0f, dY, out, w, out, beta, dX + k0, in);
    }
}

size_t quant_lowrank_scratch_floats(int n, int in, int out, int r) {
    return (size_t)in * r + (size_t)out * r + (size_t)n * r;
}

/* decode a factor into ws (or point at FP32 data); returns the FP32 [rows, r] view */
static const float *factor_f32(const Backend *be, const QTensor *f, float *ws) {
    if (f->fmt == QFORMAT_F32) return f->data;
    decode_rows_into(be, f, 0, f->rows, ws);
    return ws;
}

static void lowrank_fwd(const Backend *be, float *Y, const float *X, int n, int in, int out, int r,
                        const float *a, const float *b, float *u) {
    /* u[n,r] = X[n,in] a[in,r];  Y[n,out] += u b[out,r]^T */
    be->ops->gemm(be->ctx, false, false, n, r, in, 1.0f, X, in, a, r, 0.0f, u, r);
    be->ops->gemm(be->ctx, false, true, n, out, r, 1.0f, u, r, b, r, 1.0f, Y, out);
}

static void lowrank_bwd(const Backend *be, float *dX, const float *dY, int n, int in, int out, int r,
                        const float *a, const float *b, float *v) {
    /* v[n,r] = dY[n,out] b[out,r];  dX[n,in] += v a[in,r]^T */
    be->ops->gemm(be->ctx, false, false, n, r, out, 1.0f, dY, out, b, r, 0.0f, v, r);
    be->ops->gemm(be->ctx, false, true, n, in, r, 1.0f, v, r, a, r, 1.0f, dX, in);
}

static void check_factors(const QTensor *A, const QTensor *B) {
    ASSERTF(A->cols == B->cols && A->cols > 0, "quant: factor ranks differ (A [%d,%d], B [%d,%d])",
            A->rows, A->cols, B->rows, B->cols);
}

void quant_lowrank_apply(const Backend *be, float *Y, const float *X, int n, const QTensor *A,
                         const QTensor *B, float *ws) {
    check_factors(A, B);
    int in = A->rows, out = B->rows, r = A->cols;
    if (n == 0) return;
    float *wa = ws, *wb = wa + (size_t)in * r, *u = wb + (size_t)out * r;
    lowrank_fwd(be, Y, X, n, in, out, r, factor_f32(be, A, wa), factor_f32(be, B, wb), u);
}

void quant_lowrank_apply_t(const Backend *be, float *dX, const float *dY, int n, const QTensor *A,
                           const QTensor *B, float *ws) {
    check_factors(A, B);
    int in = A->rows, out = B->rows, r = A->cols;
    if (n == 0) return;
    float *wa = ws, *wb = wa + (size_t)in * r, *v = wb + (size_t)out * r;
    lowrank_bwd(be, dX, dY, n, in, out, r, factor_f32(be, A, wa), factor_f32(be, B, wb), v);
}

size_t quant_fused_scratch_floats(int n, int in, int out, int r, int block_rows) {
    size_t a = quant_base_matmul_scratch_floats(out, block_rows), b = quant_lowrank_scratch_floats(n, in, out, r);
    return a > b ? a : b;
}

void quant_fused_matmul(const Backend *be, float *Y, const float *X, int n, const QTensor *base,
                        const QTensor *A, const QTensor *B, float beta, int block_rows, float *ws) {
    ASSERT(A->rows == base->rows && B->rows == base->cols);
    quant_base_matmul(be, Y, X, n, base, beta, block_rows, ws);
    quant_lowrank_apply(be, Y, X, n, A, B, ws);
}

void quant_fused_matmul_t(const Backend *be, float *dX, const float *dY, int n, const QTensor *base,
                          const QTensor *A, const QTensor *B, float beta, int block_rows, float *ws) {
    ASSERT(A->rows == base->rows && B->rows == base->cols);
    quant_base_matmul_t(be, dX, dY, n, base, beta, block_rows, ws);
    quant_lowrank_apply_t(be, dX, dY, n, A, B, ws);
}

void quant_fused_matmul_ref(const Backend *be, float *Y, const float *X, int n, int in, int out, int r,
                            const float *base, const float *a, const float *b, float beta,
                            int block_rows, float *ws) {
    int kb = block_of(block_rows);
    if (n == 0) return;
    for (int k0 = 0; k0 < in; k0 += kb) {
        int nb = in - k0 < kb ? in - k0 : kb;
        be->ops->gemm(be->ctx, false, false, n, out, nb, 1.0f, X + k0, in, base + (size_t)k0 * out, out,
                      k0 == 0 ? beta : 1.0f, Y, out);
    }
    lowrank_fwd(be, Y, X, n, in, out, r, a, b, ws);
}

void quant_fused_matmul_t_ref(const Backend *be, float *dX, const float *dY, int n, int in, int out, int r,
                              const float *base, const float *a, const float *b, float beta,
                              int block_rows, float *ws) {
    int kb = block_of(block_rows);
    if (n == 0) return;
    for (int k0 = 0; k0 < in; k0 += kb) {
        int nb = in - k0 < kb ? in - k0 : kb;
        be->ops->gemm(be->ctx, false, true, n, nb, out, 1.0f, dY, out, base + (size_t)k0 * out, out, beta,
                      dX + k0, in);
    }
    lowrank_bwd(be, dX, dY, n, in, out, r, a, b, ws);
}
