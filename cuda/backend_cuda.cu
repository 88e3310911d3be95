/* backend_cuda.cu: the CUDA backend (cuBLAS for GEMM, small kernels for the rest).
 * Status: memory, GEMM, axpy/scale/sumsq and AdamW are implemented; the remaining slots
 * (attention, layernorm, activations, cross-entropy, MoE permute/combine, pooling) are not
 * yet, so backend_check() refuses this backend at start-up rather than falling back.
 * Errors: the ops return nothing, so every CUDA runtime call, every cuBLAS call and every
 * kernel launch is checked and a failure is a fatal error naming the call and the status
 * (util_fatal: rank, file, line; MPI_Abort in MPI runs). No op fails silently.
 * Numerics: built with -fmad=false (meson.build), so the element-wise kernels round like the
 * CPU reference built with -ffp-contract=off; sumsq is a fixed-order two-pass reduction in
 * double, so the gradient norm (and clipping) is reproducible run to run.
 *
 * Legend: M N K = GEMM dims; n = elements. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
#include "config.h"
}

/* sumsq: SUMSQ_BLOCKS blocks of SUMSQ_THREADS threads write one partial each, one block
 * reduces the partials. Both sizes are constants (not derived from the device), so the
 * summation order depends on n only. */
enum { SUMSQ_THREADS = 256, SUMSQ_BLOCKS = 512 };

typedef struct CudaCtx {
    cublasHandle_t blas;
    int device;
    double *partial;        /* [SUMSQ_BLOCKS + 1] device scratch of sumsq; last = result */
} CudaCtx;

#define CK(x) do { cudaError_t e_ = (x); \
    if (e_ != cudaSuccess) util_fatal(__FILE__, __LINE__, "CUDA: %s failed: %s", #x, cudaGetErrorString(e_)); } while (0)
/* after a kernel launch: a bad launch configuration or an earlier asynchronous fault */
#define CK_LAUNCH(name) do { cudaError_t e_ = cudaGetLastError(); \
    if (e_ != cudaSuccess) util_fatal(__FILE__, __LINE__, "CUDA: kernel %s failed to launch: %s", name, cudaGetErrorString(e_)); } while (0)

static const char *cublas_status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED (handle not created)";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED (out of device memory)";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE (bad size or leading dimension)";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH (device lacks a required feature)";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED (kernel failed on the device)";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "unknown cuBLAS status";
    }
}
#define CKB(x) do { cublasStatus_t s_ = (x); \
    if (s_ != CUBLAS_STATUS_SUCCESS) util_fatal(__FILE__, __LINE__, "cuBLAS: %s failed: %s (%d)", #x, cublas_status_name(s_), (int)s_); } while (0)

static void *cu_alloc(void *ctx, size_t bytes) {
    (void)ctx;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 64);
    if (e != cudaSuccess) util_fatal(__FILE__, __LINE__, "CUDA: cudaMalloc of %zu bytes failed: %s", bytes, cudaGetErrorString(e));
    CK(cudaMemset(p, 0, bytes ? bytes : 64));
    return p;
}
static void cu_free(void *ctx, void *p) { (void)ctx; if (p) CK(cudaFree(p)); }
static void cu_to_host(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; CK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost)); }
static void cu_from_host(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; CK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice)); }
static void cu_copy(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; CK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToDevice)); }
static void cu_zero(void *ctx, void *p, size_t n) { (void)ctx; CK(cudaMemset(p, 0, n)); }
static void cu_sync(void *ctx) { (void)ctx; CK(cudaDeviceSynchronize()); }

/* row-major C[M,N] = alpha op(A) op(B) + beta C is column-major C^T = op(B)^T op(A)^T.
 * An invalid size or leading dimension is reported by cuBLAS and is fatal here. */
static void cu_gemm(void *ctx, bool ta, bool tb, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (M == 0 || N == 0) return;
    cublasStatus_t s = cublasSgemm(c->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                   &alpha, B, ldb, A, lda, &beta, C, ldc);
    if (s != CUBLAS_STATUS_SUCCESS)
        util_fatal(__FILE__, __LINE__, "cuBLAS: sgemm (trans_a=%d trans_b=%d M=%d N=%d K=%d lda=%d ldb=%d ldc=%d) failed: %s (%d)",
                   (int)ta, (int)tb, M, N, K, lda, ldb, ldc, cublas_status_name(s), (int)s);
    CK_LAUNCH("cublasSgemm");
}

__global__ void k_axpy(float *y, const float *x, float a, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
__global__ void k_scale(float *x, float a, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}

/* fixed-order tree reduction of s[SUMSQ_THREADS] in shared memory; the result is in s[0] */
__device__ void block_reduce(double *s) {
    for (int w = SUMSQ_THREADS / 2; w > 0; w >>= 1) {
        __syncthreads();
        if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    }
    __syncthreads();
}
/* pass 1: block b, thread t sums x[i]^2 for i = b*T + t + k*(B*T), k = 0, 1, ... in order,
 * then the block's tree gives partial[b] */
__global__ void k_sumsq_partial(const float *x, size_t n, double *partial) {
    __shared__ double s[SUMSQ_THREADS];
    double acc = 0;
    for (size_t i = blockIdx.x * (size_t)SUMSQ_THREADS + threadIdx.x; i < n; i += (size_t)SUMSQ_BLOCKS * SUMSQ_THREADS)
        acc += (double)x[i] * (double)x[i];
    s[threadIdx.x] = acc;
    block_reduce(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}
/* pass 2 (one block): thread t sums partial[t + k*T] in order, then the tree; out = partial[B] */
__global__ void k_sumsq_final(double *partial) {
    __shared__ double s[SUMSQ_THREADS];
    double acc = 0;
    for (int b = threadIdx.x; b < SUMSQ_BLOCKS; b += SUMSQ_THREADS) acc += partial[b];
    s[threadIdx.x] = acc;
    block_reduce(s);
    if (threadIdx.x == 0) partial[SUMSQ_BLOCKS] = s[0];
}

/* AdamW in the CPU reference's (torch.optim.AdamW's) operation order, scalars from double:
 * p *= decay; m = lerp(m, g, w1); v = v*b2 + w2*g*g; p += neg_step * m / (sqrt(v)/bc2_sqrt + eps) */
__global__ void k_adamw(float *p, const float *g, float *m, float *v, size_t n, float decay, float w1, int lerp_low,
                        float b2, float w2, float bc2_sqrt, float eps, float neg_step) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pi = p[i] * decay;
    float gi = g[i], mi = m[i];
    mi = lerp_low ? mi + w1 * (gi - mi) : gi - (gi - mi) * (1.0f - w1);
    float vi = v[i] * b2 + w2 * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi + neg_step * mi / denom;
    m[i] = mi;
    v[i] = vi;
}

static unsigned blocks(size_t n) {
    size_t b = (n + 255) / 256;
    if (b > 0x7fffffffu) util_fatal(__FILE__, __LINE__, "CUDA: %zu elements exceed one launch's grid", n);
    return (unsigned)b;
}
static void cu_axpy(void *ctx, float *y, const float *x, float a, size_t n) {
    (void)ctx;
    if (!n) return;
    k_axpy<<<blocks(n), 256>>>(y, x, a, n);
    CK_LAUNCH("k_axpy");
}
static void cu_scale(void *ctx, float *x, float a, size_t n) {
    (void)ctx;
    if (!n) return;
    k_scale<<<blocks(n), 256>>>(x, a, n);
    CK_LAUNCH("k_scale");
}
static double cu_sumsq(void *ctx, const float *x, size_t n) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (!n) return 0;
    double h = 0;
    k_sumsq_partial<<<SUMSQ_BLOCKS, SUMSQ_THREADS>>>(x, n, c->partial);
    CK_LAUNCH("k_sumsq_partial");
    k_sumsq_final<<<1, SUMSQ_THREADS>>>(c->partial);
    CK_LAUNCH("k_sumsq_final");
    CK(cudaMemcpy(&h, c->partial + SUMSQ_BLOCKS, sizeof(double), cudaMemcpyDeviceToHost));
    return h;
}
static void cu_adamw(void *ctx, float *p, const float *g, float *m, float *v, size_t n, float lr,
                     float b1, float b2, float eps, float wd, int t) {
    (void)ctx;
    ASSERTF(t >= 1, "adamw: step %d, expected >= 1", t);
    if (!n) return;
    /* the same scalars as cpu_adamw (src/backend_cpu.c) */
    float decay = (float)(1.0 - (double)lr * (double)wd);
    float w1 = (float)(1.0 - (double)b1), w2 = (float)(1.0 - (double)b2);
    double bc1 = 1.0 - pow((double)b1, t), bc2 = 1.0 - pow((double)b2, t);
    float neg_step = (float)(-((double)lr / bc1));
    float bc2_sqrt = (float)sqrt(bc2);
    k_adamw<<<blocks(n), 256>>>(p, g, m, v, n, decay, w1, w1 < 0.5f, b2, w2, bc2_sqrt, eps, neg_step);
    CK_LAUNCH("k_adamw");
}

static void cu_destroy(void *ctx) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (!c) return;
    if (c->partial) CK(cudaFree(c->partial));
    CKB(cublasDestroy(c->blas));
    free(c);
}

static BackendOps make_ops(void) {
    BackendOps o;
    memset(&o, 0, sizeof o);
    o.name = "cuda";
    o.alloc = cu_alloc; o.free = cu_free; o.to_host = cu_to_host; o.from_host = cu_from_host;
    o.copy = cu_copy; o.zero = cu_zero; o.sync = cu_sync; o.gemm = cu_gemm;
    o.axpy = cu_axpy; o.scale = cu_scale; o.sumsq = cu_sumsq; o.adamw = cu_adamw;
    o.destroy = cu_destroy;
    return o;
}
static BackendOps cuda_ops;

extern "C" Status backend_cuda_init(Backend *be, int device) {
    memset(be, 0, sizeof *be);
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        return status_errorf("run.backend=cuda: no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    int dev = device % n;
    e = cudaSetDevice(dev);
    if (e != cudaSuccess) return status_errorf("run.backend=cuda: cudaSetDevice(%d) failed: %s", dev, cudaGetErrorString(e));
    CudaCtx *c = (CudaCtx *)calloc(1, sizeof *c);
    if (!c) return status_errorf("run.backend=cuda: out of host memory");
    c->device = dev;
    cublasStatus_t s = cublasCreate(&c->blas);
    if (s != CUBLAS_STATUS_SUCCESS) {
        free(c);
        return status_errorf("run.backend=cuda: cublasCreate on device %d failed: %s", dev, cublas_status_name(s));
    }
    e = cudaMalloc(&c->partial, sizeof(double) * (SUMSQ_BLOCKS + 1));
    if (e != cudaSuccess) {
        cublasDestroy(c->blas);
        free(c);
        return status_errorf("run.backend=cuda: device %d: cannot allocate the reduction scratch: %s", dev, cudaGetErrorString(e));
    }
    cuda_ops = make_ops();
    be->ops = &cuda_ops;
    be->ctx = c;
    be->kind = BACKEND_CUDA;
    return status_ok();
}
