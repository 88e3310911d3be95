/* test_cuda: the CUDA backend against the CPU reference on the slots it implements: GEMM in
 * all transpose combinations, axpy, scale, sumsq (and that it is reproducible bit for bit),
 * AdamW over several steps (both lerp branches, weight decay, bias correction), and that a
 * failing cuBLAS call is a fatal error naming it rather than a silent no-op. Exits 77
 * (skipped) when this build has no CUDA backend or the machine has no GPU. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend.h"
#include "config_build.h"
#include "harness.h"

static double *to_f64(const float *x, size_t n) {
    double *d = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

static int close_f32(const char *what, const float *got, const float *want, size_t n, double atol, double rtol) {
    double *a = to_f64(got, n), *b = to_f64(want, n);
    int r = close_enough(what, a, b, n, atol, rtol);
    free(a); free(b);
    return r;
}

static float *randn(Rng *r, size_t n, float scale) {
    float *x = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] = scale * rng_normal(r);
    return x;
}

static void test_gemm(const Backend *gpu, const Backend *cpu, Rng *r) {
    int M = 67, N = 45, K = 33;
    size_t na = (size_t)M * K, nb = (size_t)K * N, nc = (size_t)M * N;
    float *A = randn(r, na, 1), *B = randn(r, nb, 1), *C = malloc(sizeof(float) * nc), *Cg = malloc(sizeof(float) * nc);
    float *dA = gpu->ops->alloc(gpu->ctx, sizeof(float) * na), *dB = gpu->ops->alloc(gpu->ctx, sizeof(float) * nb);
    float *dC = gpu->ops->alloc(gpu->ctx, sizeof(float) * nc);
    gpu->ops->from_host(gpu->ctx, dA, A, sizeof(float) * na);
    gpu->ops->from_host(gpu->ctx, dB, B, sizeof(float) * nb);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? M : K, ldb = tb ? K : N;
            for (size_t i = 0; i < nc; i++) C[i] = 0.5f;
            gpu->ops->from_host(gpu->ctx, dC, C, sizeof(float) * nc);
            cpu->ops->gemm(cpu->ctx, ta, tb, M, N, K, 1.5f, A, lda, B, ldb, 0.25f, C, N);
            gpu->ops->gemm(gpu->ctx, ta, tb, M, N, K, 1.5f, dA, lda, dB, ldb, 0.25f, dC, N);
            gpu->ops->to_host(gpu->ctx, Cg, dC, sizeof(float) * nc);
            char what[64];
            snprintf(what, sizeof what, "gemm trans_a=%d trans_b=%d", ta, tb);
            /* each entry is 1.5 * (a dot product of K = 33 N(0,1) products, |sum| ~ sqrt(33)
             * ~ 6, sum of |terms| ~ 33 * 0.64 ~ 21) + 0.125: a different summation order in
             * float changes it by at most ~K * 2^-24 * 1.5 * 21 ~ 6e-5, typically ~1e-6;
             * atol 1e-4 covers the worst case, rtol 1e-5 the larger entries */
            close_f32(what, Cg, C, nc, 1e-4, 1e-5);
        }
    gpu->ops->free(gpu->ctx, dA); gpu->ops->free(gpu->ctx, dB); gpu->ops->free(gpu->ctx, dC);
    free(A); free(B); free(C); free(Cg);
}

/* axpy and scale are one float multiply (and add) per element; the kernels are compiled
 * with -fmad=false and the CPU reference with -ffp-contract=off, both round each operation
 * to nearest, so the results are equal bit for bit (atol = rtol = 0) */
static void test_axpy_scale(const Backend *gpu, const Backend *cpu, Rng *r) {
    size_t n = 100003;     /* not a multiple of the 256-thread block */
    float *x = randn(r, n, 1), *y = randn(r, n, 2), *yg = malloc(sizeof(float) * n);
    float *dx = gpu->ops->alloc(gpu->ctx, sizeof(float) * n), *dy = gpu->ops->alloc(gpu->ctx, sizeof(float) * n);
    gpu->ops->from_host(gpu->ctx, dx, x, sizeof(float) * n);
    gpu->ops->from_host(gpu->ctx, dy, y, sizeof(float) * n);
    cpu->ops->axpy(cpu->ctx, y, x, -0.3f, n);
    gpu->ops->axpy(gpu->ctx, dy, dx, -0.3f, n);
    gpu->ops->to_host(gpu->ctx, yg, dy, sizeof(float) * n);
    close_f32("axpy y += -0.3 x (bitwise)", yg, y, n, 0, 0);
    cpu->ops->scale(cpu->ctx, y, 0.7f, n);
    gpu->ops->scale(gpu->ctx, dy, 0.7f, n);
    gpu->ops->to_host(gpu->ctx, yg, dy, sizeof(float) * n);
    close_f32("scale y *= 0.7 (bitwise)", yg, y, n, 0, 0);
    /* n = 0 touches nothing */
    gpu->ops->axpy(gpu->ctx, dy, dx, 1.0f, 0);
    gpu->ops->scale(gpu->ctx, dy, 0.0f, 0);
    gpu->ops->to_host(gpu->ctx, yg, dy, sizeof(float) * n);
    ok(memcmp(yg, y, sizeof(float) * n) == 0, "axpy and scale with n = 0 leave y alone");
    gpu->ops->free(gpu->ctx, dx); gpu->ops->free(gpu->ctx, dy);
    free(x); free(y); free(yg);
}

static void test_sumsq(const Backend *gpu, const Backend *cpu, Rng *r) {
    size_t sizes[] = {1, 255, 257, 131072 + 77, (size_t)512 * 256 * 3 + 5};  /* up to > 3 grid strides */
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        float *x = randn(r, n, 3);
        float *dx = gpu->ops->alloc(gpu->ctx, sizeof(float) * n);
        gpu->ops->from_host(gpu->ctx, dx, x, sizeof(float) * n);
        double s_cpu = cpu->ops->sumsq(cpu->ctx, x, n);
        double s1 = gpu->ops->sumsq(gpu->ctx, dx, n), s2 = gpu->ops->sumsq(gpu->ctx, dx, n);
        /* every x^2 is exact in double (24-bit mantissa squared); summing n positive doubles
         * in any order is within (n-1) u S of the exact sum S (u = 2^-53), so two orders
         * differ by at most 2 (n-1) u S */
        double bound = 2.0 * (double)(n - 1) * (DBL_EPSILON / 2) * s_cpu;
        ok(fabs(s1 - s_cpu) <= bound, "sumsq n=%zu: %.17g vs cpu %.17g (diff %.3g, bound %.3g)", n, s1, s_cpu,
           fabs(s1 - s_cpu), bound);
        ok(memcmp(&s1, &s2, sizeof s1) == 0, "sumsq n=%zu: two calls give the same bits (%.17g, %.17g)", n, s1, s2);
        gpu->ops->free(gpu->ctx, dx);
        free(x);
    }
    ok(gpu->ops->sumsq(gpu->ctx, NULL, 0) == 0.0, "sumsq of 0 elements is 0");
}

/* AdamW: the kernel follows cpu_adamw's operation order with the same float scalars;
 * float +, -, *, / and sqrtf round to nearest on both sides (nvcc's defaults -prec-div=true,
 * -prec-sqrt=true; -fmad=false), so p, m and v are equal bit for bit after every step */
static void test_adamw(const Backend *gpu, const Backend *cpu, Rng *r) {
    const float beta1s[2] = {0.9f, 0.3f};     /* lerp weight 1-b1 below and above 0.5 */
    for (int bi = 0; bi < 2; bi++) {
        size_t n = 4099;
        float *p = randn(r, n, 1), *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
        float *hp = malloc(sizeof(float) * n), *hm = malloc(sizeof(float) * n), *hv = malloc(sizeof(float) * n);
        float *g = malloc(sizeof(float) * n);
        float *dp = gpu->ops->alloc(gpu->ctx, sizeof(float) * n), *dg = gpu->ops->alloc(gpu->ctx, sizeof(float) * n);
        float *dm = gpu->ops->alloc(gpu->ctx, sizeof(float) * n), *dv = gpu->ops->alloc(gpu->ctx, sizeof(float) * n);
        gpu->ops->from_host(gpu->ctx, dp, p, sizeof(float) * n);
        float *p0 = malloc(sizeof(float) * n);
        memcpy(p0, p, sizeof(float) * n);
        for (int t = 1; t <= 4; t++) {
            for (size_t i = 0; i < n; i++) g[i] = 0.1f * rng_normal(r);
            gpu->ops->from_host(gpu->ctx, dg, g, sizeof(float) * n);
            cpu->ops->adamw(cpu->ctx, p, g, m, v, n, 3e-3f, beta1s[bi], 0.95f, 1e-8f, 0.1f, t);
            gpu->ops->adamw(gpu->ctx, dp, dg, dm, dv, n, 3e-3f, beta1s[bi], 0.95f, 1e-8f, 0.1f, t);
        }
        gpu->ops->to_host(gpu->ctx, hp, dp, sizeof(float) * n);
        gpu->ops->to_host(gpu->ctx, hm, dm, sizeof(float) * n);
        gpu->ops->to_host(gpu->ctx, hv, dv, sizeof(float) * n);
        char what[96];
        snprintf(what, sizeof what, "adamw beta1=%.1f, 4 steps: parameters (bitwise)", (double)beta1s[bi]);
        close_f32(what, hp, p, n, 0, 0);
        snprintf(what, sizeof what, "adamw beta1=%.1f: first moment (bitwise)", (double)beta1s[bi]);
        close_f32(what, hm, m, n, 0, 0);
        snprintf(what, sizeof what, "adamw beta1=%.1f: second moment (bitwise)", (double)beta1s[bi]);
        close_f32(what, hv, v, n, 0, 0);
        ok(memcmp(p0, hp, sizeof(float) * n) != 0, "adamw beta1=%.1f: the parameters moved", (double)beta1s[bi]);
        gpu->ops->free(gpu->ctx, dp); gpu->ops->free(gpu->ctx, dg); gpu->ops->free(gpu->ctx, dm); gpu->ops->free(gpu->ctx, dv);
        free(p); free(m); free(v); free(g); free(hp); free(hm); free(hv); free(p0);
    }
}

/* child mode: a GEMM with lda < K (invalid for cuBLAS) must end the process with a message */
static int bad_gemm(void) {
    Backend gpu;
    Status st = backend_cuda_init(&gpu, 0);
    if (!STATUS_OK(st)) return 77;
    float *d = gpu.ops->alloc(gpu.ctx, sizeof(float) * 64);
    gpu.ops->gemm(gpu.ctx, false, false, 4, 4, 8, 1.0f, d, 1, d, 4, 0.0f, d, 4);
    gpu.ops->sync(gpu.ctx);
    printf("bad gemm returned\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--bad-gemm")) return bad_gemm();
    Backend gpu, cpu;
    Status st = backend_cuda_init(&gpu, 0);
    if (!STATUS_OK(st)) {
        printf("# skipped: %s\n", st.msg);
        return 77;
    }
    backend_cpu_init(&cpu, 1);
    Rng r;
    rng_init(&r, 3, 0, RNG_TEST);
    test_gemm(&gpu, &cpu, &r);
    test_axpy_scale(&gpu, &cpu, &r);
    test_sumsq(&gpu, &cpu, &r);
    test_adamw(&gpu, &cpu, &r);
    /* a failed cuBLAS call is fatal and named (run in a fresh process: the CUDA context of
     * this one must not be shared with a forked child) */
    char cmd[256], log[128];
    snprintf(log, sizeof log, "test_cuda_bad_gemm_%d.log", (int)getpid());
    snprintf(cmd, sizeof cmd, "/proc/%d/exe --bad-gemm > %s 2>&1", (int)getpid(), log);
    int rc = system(cmd);
    char text[2048] = {0};
    FILE *f = fopen(log, "r");
    if (f) { size_t k = fread(text, 1, sizeof text - 1, f); text[k] = 0; fclose(f); }
    remove(log);
    ok(rc != -1 && !(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) && strstr(text, "cuBLAS") && strstr(text, "sgemm") &&
       !strstr(text, "bad gemm returned"),
       "gemm with lda=1 < K=8 is a fatal cuBLAS error naming sgemm: %.200s", text);
    st = backend_check(&gpu);
    printf("# backend_check on cuda: %s\n", STATUS_OK(st) ? "complete" : st.msg);
    backend_free(&gpu);
    return harness_done();
}
