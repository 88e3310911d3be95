/* backend_cuda.cu: the CUDA backend (cuBLAS for GEMM, small kernels for the rest).
 * Status: memory, GEMM, axpy/scale/sumsq and AdamW are implemented; the remaining slots
 * (attention, layernorm, activations, cross-entropy, MoE permute/combine, pooling) are not
 * yet, so backend_check() refuses this backend at start-up rather than falling back. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "backend.h"
}

typedef struct CudaCtx { cublasHandle_t blas; int device; } CudaCtx;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) util_fatal(__FILE__, __LINE__, "CUDA: %s", cudaGetErrorString(e_)); } while (0)

static void *cu_alloc(void *ctx, size_t bytes) {
    (void)ctx;
    void *p = NULL;
    CK(cudaMalloc(&p, bytes ? bytes : 64));
    CK(cudaMemset(p, 0, bytes ? bytes : 64));
    return p;
}
static void cu_free(void *ctx, void *p) { (void)ctx; if (p) cudaFree(p); }
static void cu_to_host(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; CK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost)); }
static void cu_from_host(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; CK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice)); }
static void cu_copy(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; CK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToDevice)); }
static void cu_zero(void *ctx, void *p, size_t n) { (void)ctx; CK(cudaMemset(p, 0, n)); }
static void cu_sync(void *ctx) { (void)ctx; CK(cudaDeviceSynchronize()); }

/* row-major C = A B is column-major C^T = B^T A^T */
static void cu_gemm(void *ctx, bool ta, bool tb, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (M == 0 || N == 0) return;
    cublasSgemm(c->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                &alpha, B, ldb, A, lda, &beta, C, ldc);
}

__global__ void k_axpy(float *y, const float *x, float a, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
__global__ void k_scale(float *x, float a, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
__global__ void k_sumsq(const float *x, size_t n, double *out) {
    __shared__ double s[256];
    double acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += (double)x[i] * x[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(out, s[0]);
}
__global__ void k_adamw(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                        float b2, float eps, float wd, float bc1, float bc2) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pi = p[i] - lr * wd * p[i];
    float mi = b1 * m[i] + (1 - b1) * g[i];
    float vi = b2 * v[i] + (1 - b2) * g[i] * g[i];
    m[i] = mi; v[i] = vi;
    p[i] = pi - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
}

static unsigned blocks(size_t n) { return (unsigned)((n + 255) / 256); }
static void cu_axpy(void *ctx, float *y, const float *x, float a, size_t n) { (void)ctx; if (n) k_axpy<<<blocks(n), 256>>>(y, x, a, n); }
static void cu_scale(void *ctx, float *x, float a, size_t n) { (void)ctx; if (n) k_scale<<<blocks(n), 256>>>(x, a, n); }
static double cu_sumsq(void *ctx, const float *x, size_t n) {
    (void)ctx;
    double *d, h = 0;
    CK(cudaMalloc(&d, sizeof(double)));
    CK(cudaMemset(d, 0, sizeof(double)));
    if (n) k_sumsq<<<256, 256>>>(x, n, d);
    CK(cudaMemcpy(&h, d, sizeof(double), cudaMemcpyDeviceToHost));
    cudaFree(d);
    return h;
}
static void cu_adamw(void *ctx, float *p, const float *g, float *m, float *v, size_t n, float lr,
                     float b1, float b2, float eps, float wd, int t) {
    (void)ctx;
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    if (n) k_adamw<<<blocks(n), 256>>>(p, g, m, v, n, lr, b1, b2, eps, wd, bc1, bc2);
}

static void cu_destroy(void *ctx) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (!c) return;
    cublasDestroy(c->blas);
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
    CK(cudaSetDevice(dev));
    CudaCtx *c = (CudaCtx *)calloc(1, sizeof *c);
    c->device = dev;
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) { free(c); return status_errorf("cuBLAS init failed on device %d", dev); }
    cuda_ops = make_ops();
    be->ops = &cuda_ops;
    be->ctx = c;
    be->kind = 1;
    return status_ok();
}
