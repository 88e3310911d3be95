/* kernels_common: the per-element arithmetic that the CUDA kernels share with the host
 * (exp, GELU, SwiGLU, one AdamW step). Under nvcc every function is __host__ __device__;
 * a plain C compiler sees static inline functions, so tests/checkbackend.c unit-tests each one
 * on the CPU (against its own double reference, and bit for bit against the CPU backend).
 * The formulas and their operation order are copied from the CPU reference
 * (src/backend_cpu.c: exp_f32, cpu_act_forward/backward, cpu_adamw): with -fmad=false on the
 * device and -ffp-contract=off on the host they give the CPU reference's bits.
 * Does not: loop over tensors, allocate, or know about BackendOps. */
#ifndef DCMOE_KERNELS_COMMON_H
#define DCMOE_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KC_FN static __host__ __device__ __forceinline__
#else
#define KC_FN static inline
#endif

/* sqrt(2/pi), as GELU_C in src/backend_cpu.c */
#define KC_GELU_C 0.7978845608028654f

/* exp(x) without libm (Cephes expf, as exp_f32 in src/backend_cpu.c): x = n ln2 + r, a
 * degree-5 polynomial for e^r, 2^n applied as two exact power-of-two factors (gradual
 * underflow to 0, overflow to +inf). Max error < 1 ulp over [-104, 89]; NaN stays NaN. */
KC_FN float kc_exp_f32(float x) {
    x = x < -104.0f ? -104.0f : x;
    x = x > 89.0f ? 89.0f : x;
    float t = x * 1.44269504088896341f + 12582912.0f;    /* round(x / ln2) + 1.5 * 2^23 */
    float nf = t - 12582912.0f;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    int32_t n = (int32_t)(tb - 0x4B400000u);
    float r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    int32_t n1 = n / 2, n2 = n - n1;
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return y * s1 * s2;
}

/* GELU (tanh form) as x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3) */
KC_FN float kc_gelu(float x) {
    float u = KC_GELU_C * (x + 0.044715f * x * x * x);
    return x / (1.0f + kc_exp_f32(-2.0f * u));
}

/* d gelu(x) / dx = s + 2x s (1-s) du/dx, s = sigmoid(2u) */
KC_FN float kc_gelu_grad(float x) {
    float u = KC_GELU_C * (x + 0.044715f * x * x * x);
    float du = KC_GELU_C * (1.0f + 3.0f * 0.044715f * x * x);
    float sg = 1.0f / (1.0f + kc_exp_f32(-2.0f * u));
    return sg + 2.0f * x * sg * (1.0f - sg) * du;
}

/* SwiGLU: silu(x1) * x3 */
KC_FN float kc_swiglu(float x1, float x3) {
    float sig = 1.0f / (1.0f + kc_exp_f32(-x1));
    return x1 * sig * x3;
}

/* SwiGLU backward from g = dL/da: *d1 = dL/dx1, *d3 = dL/dx3 */
KC_FN void kc_swiglu_grad(float x1, float x3, float g, float *d1, float *d3) {
    float sig = 1.0f / (1.0f + kc_exp_f32(-x1));
    float silu = x1 * sig;
    *d1 = g * x3 * (sig + silu * (1.0f - sig));
    *d3 = g * silu;
}

/* AdamW's per-call scalars, from double as cpu_adamw computes them (torch.optim.AdamW order) */
typedef struct KcAdamw {
    float decay;        /* 1 - lr*wd */
    float w1;           /* lerp weight 1 - beta1 */
    int lerp_low;       /* w1 < 0.5: torch's lerp branch */
    float beta2, w2;    /* w2 = 1 - beta2 */
    float bc2_sqrt;     /* sqrt(1 - beta2^t) */
    float eps;
    float neg_step;     /* -lr / (1 - beta1^t) */
} KcAdamw;

KC_FN KcAdamw kc_adamw_scalars(float lr, float beta1, float beta2, float eps, float weight_decay, int t) {
    KcAdamw a;
    a.decay = (float)(1.0 - (double)lr * (double)weight_decay);
    a.w1 = (float)(1.0 - (double)beta1);
    a.lerp_low = a.w1 < 0.5f;
    a.beta2 = beta2;
    a.w2 = (float)(1.0 - (double)beta2);
    double bc1 = 1.0 - pow((double)beta1, t);
    double bc2 = 1.0 - pow((double)beta2, t);
    a.neg_step = (float)(-((double)lr / bc1));
    a.bc2_sqrt = (float)sqrt(bc2);
    a.eps = eps;
    return a;
}

/* one element: p *= decay; m = lerp(m, g, w1); v = v*b2 + w2*g*g; p += neg_step*m/(sqrt(v)/bc2_sqrt + eps) */
KC_FN void kc_adamw_step(const KcAdamw *a, float *p, float g, float *m, float *v) {
    float pi = *p * a->decay;
    float mi = *m;
    mi = a->lerp_low ? mi + a->w1 * (g - mi) : g - (g - mi) * (1.0f - a->w1);
    float vi = *v * a->beta2 + a->w2 * g * g;
    float denom = sqrtf(vi) / a->bc2_sqrt + a->eps;
    *p = pi + a->neg_step * mi / denom;
    *m = mi;
    *v = vi;
}

#endif
