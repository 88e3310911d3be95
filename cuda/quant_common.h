/* quant_common: the per-element arithmetic of the stored number formats (src/quant.h: IEEE
 * FP16, INT4 asymmetric group quantisation), shared by the host (src/quant.c, the CPU
 * backend's dequant_rows / fake_quant slots) and the CUDA kernels (cuda/backend_cuda.cu).
 * Under nvcc every function is __host__ __device__ (KC_FN of kernels_common.h); a C compiler
 * sees static inline functions, which src/quant.c calls for every conversion, so the CPU tests
 * of quant.c cover them, and tests/test_quant_common.c tests each one directly.
 * The arithmetic is bit manipulation, float multiplies, adds, one IEEE division and floorf:
 * with -ffp-contract=off on the host and -fmad=false on the device (no fused multiply-add,
 * IEEE division by default, denormals kept) both give the same bits.
 * Does not: loop over tensors (except one group's min/max scan, kept serial so the zero's sign
 * follows the row order), allocate, or know about QTensor or BackendOps.
 *
 * Layouts (quant.h): INT4 column c of a [rows, cols] tensor is the nibble run at byte c*cb,
 * cb = ceil(rows/2); row i is the low nibble of byte i/2 when i is even, the high nibble when
 * odd; the group k of column c holds rows k*group .. min(rows, k*group+group)-1, its FP16
 * scale and zero at index c*n_groups + k. */
#ifndef DCMOE_QUANT_COMMON_H
#define DCMOE_QUANT_COMMON_H

#include "kernels_common.h"

/* ---- FP32 <-> FP16 (after Maratyszcza's FP16 library) ---- */

KC_FN uint32_t qc_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KC_FN float qc_f32_from(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* round to nearest, ties to even; |x| >= 65520 -> ±inf; below 2^-25 -> ±0; NaN -> 0x7E00 with
 * the sign. Scaling by 2^112 then 2^-110 lets the FPU round the mantissa, including overflow
 * to inf and the subnormal range. */
KC_FN uint16_t qc_f32_to_f16(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    uint32_t w = qc_f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = qc_f32_from((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = qc_f32_bits(base);
    uint32_t exp_bits = (bits >> 13) & 0x00007C00u, mant_bits = bits & 0x00000FFFu;
    uint32_t nonsign = exp_bits + mant_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* exact (NaN payloads kept) */
KC_FN float qc_f16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    float normalized = qc_f32_from((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    float denormalized = qc_f32_from((two_w >> 17) | magic_mask) - 0.5f;
    uint32_t r = sign | (two_w < (1u << 27) ? qc_f32_bits(denormalized) : qc_f32_bits(normalized));
    return qc_f32_from(r);
}

/* the FP16 neighbour of x rounded toward -inf (finite x inside the FP16 range) */
KC_FN uint16_t qc_f32_to_f16_down(float x) {
    uint16_t h = qc_f32_to_f16(x);
    if (qc_f16_to_f32(h) > x) {
        if (h == 0x0000) h = 0x8001;             /* +0 -> smallest negative subnormal */
        else if (h & 0x8000) h = (uint16_t)(h + 1);
        else h = (uint16_t)(h - 1);
    }
    return h;
}

/* ... toward +inf */
KC_FN uint16_t qc_f32_to_f16_up(float x) {
    uint16_t h = qc_f32_to_f16(x);
    if (qc_f16_to_f32(h) < x) {
        if (h == 0x8000) h = 0x0001;             /* -0 -> smallest positive subnormal */
        else if (h & 0x8000) h = (uint16_t)(h - 1);
        else h = (uint16_t)(h + 1);
    }
    return h;
}

/* FP16 fake quantisation of one element: x rounded to FP16 and back */
KC_FN float qc_f16_fake(float x) { return qc_f16_to_f32(qc_f32_to_f16(x)); }

/* ---- INT4 nibbles ---- */

/* nibble i of a run (element 2j in the low nibble of byte j) */
KC_FN int qc_int4_get(const uint8_t *run, size_t i) {
    uint8_t b = run[i / 2];
    return (i & 1) ? (b >> 4) : (b & 15);
}
/* set nibble i of a run to q (0..15), keeping the other nibble */
KC_FN void qc_int4_set(uint8_t *run, size_t i, int q) {
    uint8_t *b = run + i / 2;
    if (i & 1) *b = (uint8_t)((*b & 0x0F) | ((q & 15) << 4));
    else *b = (uint8_t)((*b & 0xF0) | (q & 15));
}
/* one packed byte from two nibbles (lo = even element) */
KC_FN uint8_t qc_int4_pack2(int lo, int hi) { return (uint8_t)((lo & 15) | ((hi & 15) << 4)); }

/* ---- INT4 group quantisation ---- */

/* min and max of rows i0..i1-1 (i1 > i0) of column c of src[., cols], scanned in row order
 * (the first of equal values wins, so -0/+0 follow the order) */
KC_FN void qc_int4_minmax(const float *src, int cols, int c, int i0, int i1, float *mn_out, float *mx_out) {
    float mn = src[(size_t)i0 * cols + c], mx = mn;
    for (int i = i0 + 1; i < i1; i++) {
        float w = src[(size_t)i * cols + c];
        mn = w < mn ? w : mn;
        mx = w > mx ? w : mx;
    }
    *mn_out = mn;
    *mx_out = mx;
}

/* a group's FP16 zero and scale from its min and max (finite): zero = FP16 rounded down from
 * the min (clamped to ±65504), scale = FP16 rounded up from (max - zero)/15, clamped to the
 * largest finite half; scale 0 when max == zero */
KC_FN void qc_int4_params(float mn, float mx, uint16_t *s16_out, uint16_t *z16_out) {
    if (mn < -65504.0f) mn = -65504.0f;
    if (mn > 65504.0f) mn = 65504.0f;
    uint16_t z16 = qc_f32_to_f16_down(mn);
    float z = qc_f16_to_f32(z16);
    float range = mx - z;
    uint16_t s16 = 0;
    if (range > 0.0f) {
        s16 = qc_f32_to_f16_up(range / 15.0f);
        if ((s16 & 0x7FFF) >= 0x7C00) s16 = 0x7BFF;     /* clamp to the largest finite */
    }
    *s16_out = s16;
    *z16_out = z16;
}

/* the nibble of w in a group with scale s and zero z (FP32 values of the FP16 parameters):
 * clamp(floor((w - z)/s + 0.5), 0, 15); 0 when s == 0 */
KC_FN int qc_int4_quant(float w, float s, float z) {
    int q = 0;
    if (s > 0.0f) {
        float t = floorf((w - z) / s + 0.5f);
        q = t < 0.0f ? 0 : t > 15.0f ? 15 : (int)t;
    }
    return q;
}

/* one element's value: (float)q * s + z, one multiply then one add (no fused multiply-add) */
KC_FN float qc_int4_dequant(int q, float s, float z) {
    float v = (float)q * s;
    return v + z;
}

/* the same from the FP16 parameters */
KC_FN float qc_int4_dequant16(int q, uint16_t s16, uint16_t z16) {
    return qc_int4_dequant(q, qc_f16_to_f32(s16), qc_f16_to_f32(z16));
}

/* INT4 fake quantisation of one element: encode with (s16, z16), decode */
KC_FN float qc_int4_fake(float w, uint16_t s16, uint16_t z16) {
    float s = qc_f16_to_f32(s16), z = qc_f16_to_f32(z16);
    return qc_int4_dequant(qc_int4_quant(w, s, z), s, z);
}

/* element (i, c) of an INT4 tensor [rows, cols] (data, scales, zeros as in quant.h) */
KC_FN float qc_int4_element(const uint8_t *data, const uint16_t *scales, const uint16_t *zeros, int rows, int group,
                            int i, int c) {
    int ng = (rows + group - 1) / group;
    size_t cb = (size_t)((rows + 1) / 2), gi = (size_t)c * ng + (size_t)(i / group);
    return qc_int4_dequant16(qc_int4_get(data + (size_t)c * cb, i), scales[gi], zeros[gi]);
}

#endif
