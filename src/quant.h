/* quant: stored number formats for clustered experts — IEEE FP16 (bases) and INT4 asymmetric
 * group quantisation (low-rank factors) — with conversions, error statistics, QAT fake-quant,
 * and matmul kernels that read the stored formats directly (dequantise on the fly).
 * Does not: decide which tensors are stored how (precision.mode is the caller's business),
 * train anything, or hold device code: tensors in backend memory (QTensor.dev) are decoded and
 * fake-quantised through the backend's dequant_rows / fake_quant slots, whose CUDA kernels
 * share cuda/quant_common.h's per-element arithmetic with this file.
 * Memory: a QTensor either owns one allocation (qtensor_init) or views caller memory
 * (qtensor_view); kernels take caller-provided scratch of quant_*_scratch_floats() floats.
 *
 * Legend: n in out r = rows of X (tokens), input width, output width, rank.
 *
 * ---- FP16 ----
 * IEEE 754 binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. FP32 -> FP16 rounds to
 * nearest, ties to even; overflow (|x| >= 65520) gives ±inf; values below the smallest
 * subnormal half (2^-25) round to ±0; subnormals are exact; every NaN becomes the quiet NaN
 * 0x7E00 (sign kept). FP16 -> FP32 is exact (NaN payloads kept). Requires the default FP
 * environment (round-to-nearest, no flush-to-zero).
 *
 * ---- INT4 layout (QFORMAT_INT4) of a matrix W[rows, cols] (row-major FP32 source) ----
 * The LONG axis is axis 0 (rows). Every factor in this model is [long, r] with r <= the long
 * dimension (a1 [D,r], b1 [F1,r], a2 [F,r], b2 [D,r]), so each rank column is quantised in
 * groups of `group` consecutive rows: group k of column c holds rows k*group .. k*group+group-1
 * (the last group of a column is shorter when rows % group != 0). n_groups = ceil(rows/group).
 *   data   : column-major nibbles. Column c occupies bytes [c*cb, (c+1)*cb) with
 *            cb = ceil(rows/2); row i of column c is nibble i of that run: byte c*cb + i/2,
 *            LOW nibble (bits 0-3) for even i, HIGH nibble (bits 4-7) for odd i. A padding
 *            nibble (odd rows) is 0.
 *   scales : FP16 [cols, n_groups], scale of group k of column c at index c*n_groups + k.
 *   zeros  : FP16 [cols, n_groups], same indexing.
 *   value  : W[i,c] ~ (float)q * scale + zero, q in 0..15, evaluated in FP32 as written
 *            (one multiply, one add; the build uses -ffp-contract=off).
 * Quantiser: zero = FP16 rounded DOWN from the group minimum, scale = FP16 rounded UP from
 * (max - zero)/15, q = clamp(floor((w - zero)/scale + 0.5), 0, 15). Hence every element's
 * error is at most scale/2 (plus FP32 rounding of the dequantise). Inputs must be finite and
 * within the FP16 range; a group of equal values is exact when its value is an FP16 number.
 * In one allocation the blob is [data, padded to 2 bytes][scales][zeros].
 *
 * QFORMAT_F16: uint16_t [rows, cols] row-major. QFORMAT_F32: float [rows, cols] row-major. */
#ifndef DCMOE_QUANT_H
#define DCMOE_QUANT_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "util.h"
#include "backend.h"

/* ---- FP16 ---- */
uint16_t quant_f32_to_f16(float x);
float quant_f16_to_f32(uint16_t h);
void quant_f32_to_f16_n(uint16_t *restrict dst, const float *restrict src, size_t n);  /* dst[n], src[n]; no overlap */
void quant_f16_to_f32_n(float *restrict dst, const uint16_t *restrict src, size_t n);  /* dst[n], src[n]; no overlap */
/* the FP16 neighbour of x rounded toward -inf / +inf (finite x inside the FP16 range) */
uint16_t quant_f32_to_f16_down(float x);
uint16_t quant_f32_to_f16_up(float x);

/* ---- INT4 nibbles: two per byte, element 2j in the low nibble of byte j ---- */
void quant_int4_pack(uint8_t *dst, const uint8_t *q, size_t n);       /* dst[ceil(n/2)], q[n] in 0..15 */
void quant_int4_unpack(uint8_t *q, const uint8_t *src, size_t n);     /* q[n], src[ceil(n/2)] */

/* ---- packed tensors ---- */
enum QFormat { QFORMAT_F32 = 0, QFORMAT_F16 = 1, QFORMAT_INT4 = 2 };

typedef struct QTensor {
    enum QFormat fmt;
    int rows, cols;         /* logical FP32 shape [rows, cols] */
    int group;              /* INT4: elements per group along rows (even, >= 2); else 0 */
    void *data;             /* see the layouts above */
    uint16_t *scales;       /* INT4 only: FP16 [cols, n_groups] */
    uint16_t *zeros;        /* INT4 only: FP16 [cols, n_groups] */
    void *blob;             /* the single block holding data, scales, zeros */
    bool owns;              /* blob was allocated by qtensor_init */
    bool dev;               /* blob is backend memory: the kernels below decode it through the
                               backend's dequant_rows slot and never read it on the host */
} QTensor;

const char *quant_format_name(enum QFormat fmt);                      /* "fp32", "fp16", "int4" */
static inline int quant_int4_n_groups(int rows, int group) { return (rows + group - 1) / group; }
/* bytes of the blob for this format and shape (data + scales + zeros) */
size_t qtensor_bytes(enum QFormat fmt, int rows, int cols, int group);
/* allocate an owning tensor (zeroed); error on bad shape or group */
Status qtensor_init(QTensor *t, enum QFormat fmt, int rows, int cols, int group);
/* a non-owning view over blob (qtensor_bytes(...) bytes, 2-byte aligned) */
Status qtensor_view(QTensor *t, enum QFormat fmt, int rows, int cols, int group, void *blob);
void qtensor_free(QTensor *t);                                         /* zeroed/twice: safe */
static inline size_t qtensor_size(const QTensor *t) { return qtensor_bytes(t->fmt, t->rows, t->cols, t->group); }

/* encode src[rows, cols] (FP32 row-major) into t's format (INT4: computes scales and zeros) */
void qtensor_encode(QTensor *t, const float *src);
/* INT4: encode with t's existing scales and zeros (no min/max search); other formats = encode */
void qtensor_encode_with_params(QTensor *t, const float *src);
/* dst[rows, cols] = decoded values */
void qtensor_decode(const QTensor *t, float *dst);
/* dst[nr, cols] = decoded rows r0 .. r0+nr-1 */
void qtensor_decode_rows(const QTensor *t, int r0, int nr, float *dst);
/* INT4: the nibble of element (i, c) */
static inline int qtensor_int4_get(const QTensor *t, int i, int c) {
    const uint8_t *d = (const uint8_t *)t->data + (size_t)c * (size_t)((t->rows + 1) / 2) + (size_t)(i / 2);
    return (i & 1) ? (*d >> 4) : (*d & 15);
}

/* ---- error statistics of approx against ref (both [n]) ---- */
typedef struct QuantError {
    double max_abs;         /* max |approx - ref| */
    double rel_fro;         /* ||approx - ref||_F / ||ref||_F (0 when ref is all zero and equal) */
    double ref_fro;         /* ||ref||_F */
} QuantError;
QuantError quant_error(const float *ref, const float *approx, size_t n);
/* error of storing src[rows, cols] in fmt (encodes into a temporary) */
QuantError quant_roundtrip_error(const float *src, int rows, int cols, enum QFormat fmt, int group);

/* ---- QAT fake quantisation ----
 * x[rows, cols] <- decode(encode(x)) in place. Straight-through estimator: the backward pass
 * treats this op as the identity, i.e. the caller keeps FP32 master weights, runs the forward
 * with a fake-quantised COPY, and applies dL/d(copy) unchanged to the masters. scratch holds
 * qtensor_bytes(fmt, rows, cols, group) bytes (NULL = allocate and free internally). */
void quant_fake(float *x, int rows, int cols, enum QFormat fmt, int group, void *scratch);
/* the same on x in backend memory, through be->ops->fake_quant (bitwise the host's quant_fake) */
void quant_fake_dev(const Backend *be, float *x, int rows, int cols, enum QFormat fmt, int group);

/* ---- kernels reading stored formats ----
 * X, Y, ws: backend memory; gemm goes through be->ops->gemm. A QTensor with dev set is decoded
 * by be->ops->dequant_rows (backend memory, e.g. on the device), else on the host by
 * qtensor_decode_rows into ws (which must then be host-addressable: the CPU backend). `beta` applies to Y as in gemm (0 =
 * overwrite; Y need not be initialised then). ws is caller scratch of at least the returned
 * number of floats. The base is dequantised `block_rows` rows at a time (QUANT_BLOCK_ROWS when
 * 0), so no FP32 copy of the whole base exists; factors are decoded whole ([in,r], [out,r]).
 * Summation order: Y = beta*Y + sum over row blocks k (ascending) of X[:,blk k] * Base[blk k,:],
 * one gemm per block; then the low-rank term as U = X*A (one gemm), Y += U*B^T (one gemm).
 * quant_*_ref run the SAME gemm sequence on fully dequantised FP32 copies; they are the test
 * oracles and must agree bitwise. */
#define QUANT_BLOCK_ROWS 64

/* Y[n,out] = beta*Y + X[n,in] * Base[in,out]            (base: any format, shape [in,out]) */
size_t quant_base_matmul_scratch_floats(int out, int block_rows);
void quant_base_matmul(const Backend *be, float *Y, const float *X, int n, const QTensor *base,
                       float beta, int block_rows, float *ws);
/* dX[n,in] = beta*dX + dY[n,out] * Base[in,out]^T       (backward to the activations) */
void quant_base_matmul_t(const Backend *be, float *dX, const float *dY, int n, const QTensor *base,
                         float beta, int block_rows, float *ws);

/* Y[n,out] += X[n,in] * A[in,r] * B[out,r]^T             (A, B: any format) */
size_t quant_lowrank_scratch_floats(int n, int in, int out, int r);
void quant_lowrank_apply(const Backend *be, float *Y, const float *X, int n, const QTensor *A,
                         const QTensor *B, float *ws);
/* dX[n,in] += dY[n,out] * B[out,r] * A[in,r]^T */
void quant_lowrank_apply_t(const Backend *be, float *dX, const float *dY, int n, const QTensor *A,
                           const QTensor *B, float *ws);

/* fused: Y[n,out] = beta*Y + X[n,in] * (Base[in,out] + A[in,r] B[out,r]^T) */
size_t quant_fused_scratch_floats(int n, int in, int out, int r, int block_rows);
void quant_fused_matmul(const Backend *be, float *Y, const float *X, int n, const QTensor *base,
                        const QTensor *A, const QTensor *B, float beta, int block_rows, float *ws);
/* fused transpose: dX[n,in] = beta*dX + dY[n,out] * (Base + A B^T)^T */
void quant_fused_matmul_t(const Backend *be, float *dX, const float *dY, int n, const QTensor *base,
                          const QTensor *A, const QTensor *B, float beta, int block_rows, float *ws);

/* oracles: the same gemm sequence on FP32 arrays base[in,out], a[in,r], b[out,r] */
void quant_fused_matmul_ref(const Backend *be, float *Y, const float *X, int n, int in, int out, int r,
                            const float *base, const float *a, const float *b, float beta,
                            int block_rows, float *ws);
void quant_fused_matmul_t_ref(const Backend *be, float *dX, const float *dY, int n, int in, int out, int r,
                              const float *base, const float *a, const float *b, float beta,
                              int block_rows, float *ws);

#endif
