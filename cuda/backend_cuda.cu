/* backend_cuda.cu: the CUDA backend (cuBLAS for GEMM and attention's products, small kernels
 * for the rest). Every BackendOps slot is filled, so backend_check() accepts it; each op is
 * checked against the checker's reference by tests/checkbackend.c --backend cuda.
 * Errors: the ops return nothing, so every CUDA runtime call, every cuBLAS and CUB call and
 * every kernel launch is checked and a failure is a fatal error naming the call and the status
 * (util_fatal: rank, file, line; MPI_Abort in MPI runs). No op fails silently. Device code cannot
 * call util_fatal: an out-of-range target (xent), length (pool) or negative token (embedding)
 * writes NaN into that output instead, so it surfaces in the loss.
 * Determinism: no float atomics anywhere. Every reduction has a fixed order that depends on the
 * shapes only: sumsq is a fixed-grid two-pass reduction in double; per-row reductions (layernorm,
 * softmax, cross-entropy, gather_dot) use 16 lanes per row in the CPU reference's lane order
 * (lane l sums the elements l, l+16, ... in order, then a tree over 8, 4, 2, 1); accumulations
 * over rows (scatter_add_rows, embed_backward's dwte, layernorm's dw/db, dwpe, combine_rows) walk
 * their rows serially: scatter_add_rows stably sorts the destination indices (CUB radix sort),
 * and one block per destination row adds its sources in index order, as the CPU does.
 * Numerics: built with -fmad=false (meson.build), so with the per-element functions of
 * kernels_common.h (shared with the host) and the lane orders above, every op except gemm and
 * attention (cuBLAS's summation order), sumsq (another fixed order, in double) and the
 * cross-entropy loss (logf) is meant to give the CPU reference's bits (checkbackend --backend cuda
 * prints, op by op, where they differ; not yet run on a GPU).
 * Routing (route_*): the host router's per-token code (route_common.h), one thread per token;
 * the capacity counts use integer atomics (exact), the queues one thread per (slot, bucket).
 * Written and compiled with nvcc; not yet run on a GPU.
 * bf16 (run.gemm_dtype=bf16, backend_cuda_set_gemm_dtype): gemm rounds A and B to bf16 on the
 * device (contiguous copies) and calls cublasGemmEx with FP32 accumulation and an FP32 C;
 * attention's batched products stay fp32. Compiled with nvcc; not yet run on a GPU.
 * Stored formats (dequant_rows, fake_quant): quant_common.h's per-element functions (shared
 * with src/quant.c), one thread per element; fake_quant's INT4 group parameters by one thread
 * per (column, group) scanning its rows in order, so both are meant to give the host's bits.
 * Compiled with nvcc; not yet run on a GPU.
 * Offloading (host_alloc_pinned .. sync_event): cudaHostAlloc'd host memory; transfers by
 * cudaMemcpyAsync on a second, non-blocking stream, each after an event recorded on the compute
 * stream (so it follows the compute enqueued before it) and each recording its own event from a
 * ring of CU_XFER_EVENTS; wait_event = cudaStreamWaitEvent of the compute (legacy default)
 * stream on that event only, sync_event = cudaEventSynchronize. Compiled with nvcc; not yet
 * run on a GPU.
 * Does not: performance tuning (no fused kernels; compute runs on the legacy default stream),
 * NCCL.
 *
 * Legend: M N K = GEMM dims; n = elements or routed rows; B T D F V H = batch, seq, d_model,
 *         d_ff, vocab, heads; hd = D/H; N = rows (B*T). */
#include <cub/cub.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
#include "config.h"
}
#include "kernels_common.h"
#include "route_common.h"
#include "quant_common.h"

/* sumsq: SUMSQ_BLOCKS blocks of SUMSQ_THREADS threads write one partial each, one block
 * reduces the partials. Both sizes are constants (not derived from the device), so the
 * summation order depends on n only. */
enum { SUMSQ_THREADS = 256, SUMSQ_BLOCKS = 512 };

/* events of the side stream's transfers, a ring: transfer t records xfer_ev[t % N]; a later
 * transfer that reuses the event completes after t (same stream, in order), so waiting on the
 * reused event waits at least as long as t needs */
enum { CU_XFER_EVENTS = 256 };

typedef struct CudaCtx {
    cublasHandle_t blas;
    int device;
    double *partial;        /* [SUMSQ_BLOCKS + 1] device scratch of sumsq; last = result */
    void *scratch;          /* scatter_add_rows' sort buffers, grown on demand */
    size_t scratch_bytes;
    int gemm_bf16;          /* run.gemm_dtype=bf16: gemm rounds A and B to bf16 (cublasGemmEx, FP32 accumulate) */
    __nv_bfloat16 *bf;      /* gemm's bf16 copies of A and B, grown on demand */
    size_t bf_elems;
    /* offloading's side stream: non-blocking (no implicit sync with the legacy default
     * stream, on which every kernel, cuBLAS call and cudaMemcpy of this backend runs) */
    cudaStream_t side;
    cudaEvent_t compute_ev;              /* recorded on the compute stream before each transfer */
    cudaEvent_t xfer_ev[CU_XFER_EVENTS]; /* transfer t's event is xfer_ev[t % CU_XFER_EVENTS] */
    uint64_t xfer_next;                  /* the next ticket (tickets start at 1) */
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

/* ---- offloading: pinned host memory and transfers on the side stream (backend.h) ---- */
static void *cu_host_alloc_pinned(void *ctx, size_t bytes) {
    (void)ctx;
    void *p = NULL;
    cudaError_t e = cudaHostAlloc(&p, bytes ? bytes : 64, cudaHostAllocDefault);
    if (e != cudaSuccess)
        util_fatal(__FILE__, __LINE__, "CUDA: cudaHostAlloc of %zu pinned bytes failed: %s", bytes, cudaGetErrorString(e));
    memset(p, 0, bytes ? bytes : 64);
    return p;
}
static void cu_host_free_pinned(void *ctx, void *p) { (void)ctx; if (p) CK(cudaFreeHost(p)); }
/* enqueue one copy on the side stream after the compute enqueued so far; its ticket */
static uint64_t cu_copy_async(CudaCtx *c, void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    CK(cudaEventRecord(c->compute_ev, 0));
    CK(cudaStreamWaitEvent(c->side, c->compute_ev, 0));
    if (n) CK(cudaMemcpyAsync(dst, src, n, kind, c->side));
    uint64_t t = ++c->xfer_next;
    CK(cudaEventRecord(c->xfer_ev[t % CU_XFER_EVENTS], c->side));
    return t;
}
static uint64_t cu_copy_to_device_async(void *ctx, void *dst, const void *src, size_t n) {
    return cu_copy_async((CudaCtx *)ctx, dst, src, n, cudaMemcpyHostToDevice);
}
static uint64_t cu_copy_to_host_async(void *ctx, void *dst, const void *src, size_t n) {
    return cu_copy_async((CudaCtx *)ctx, dst, src, n, cudaMemcpyDeviceToHost);
}
static void cu_wait_event(void *ctx, uint64_t ev) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (ev == 0) return;
    if (ev > c->xfer_next) util_fatal(__FILE__, __LINE__, "CUDA: wait_event(%llu): no such transfer (last %llu)",
                                      (unsigned long long)ev, (unsigned long long)c->xfer_next);
    CK(cudaStreamWaitEvent(0, c->xfer_ev[ev % CU_XFER_EVENTS], 0));
}
static void cu_sync_event(void *ctx, uint64_t ev) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (ev == 0) return;
    if (ev > c->xfer_next) util_fatal(__FILE__, __LINE__, "CUDA: sync_event(%llu): no such transfer (last %llu)",
                                      (unsigned long long)ev, (unsigned long long)c->xfer_next);
    CK(cudaEventSynchronize(c->xfer_ev[ev % CU_XFER_EVENTS]));
}

static unsigned blocks(size_t n);

/* C[M,N] (ld ldc) = beta C; beta == 0 writes exact zeros (C is not read) */
__global__ void k_scale_rows(float *C, int ldc, int N, float beta, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t r = i / (size_t)N, j = i % (size_t)N;
    float *c = C + r * (size_t)ldc + j;
    *c = beta == 0.0f ? 0.0f : *c * beta;
}

/* run.gemm_dtype=bf16: dst[rows, cols] (contiguous) = src[rows, cols] (ld) rounded to bf16 */
__global__ void k_to_bf16(__nv_bfloat16 *dst, const float *src, int cols, int ld, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t r = i / (size_t)cols, j = i % (size_t)cols;
    dst[i] = __float2bfloat16_rn(src[r * (size_t)ld + j]);
}
/* C = alpha op(A) op(B) + beta C with A and B rounded to bf16 (contiguous copies), FP32
 * accumulation and an FP32 C (cublasGemmEx, CUBLAS_COMPUTE_32F); sizes as cu_gemm (K > 0) */
static void gemm_bf16(CudaCtx *c, bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc) {
    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;   /* stored shapes */
    size_t na = (size_t)ar * ac, nb = (size_t)br * bc;
    if (na + nb > c->bf_elems) {
        CK(cudaDeviceSynchronize());
        if (c->bf) CK(cudaFree(c->bf));
        c->bf = NULL;
        size_t want = (na + nb) + (na + nb) / 2;
        cudaError_t e = cudaMalloc(&c->bf, want * sizeof(__nv_bfloat16));
        if (e != cudaSuccess)
            util_fatal(__FILE__, __LINE__, "CUDA: cudaMalloc of %zu bf16 GEMM inputs failed: %s", want, cudaGetErrorString(e));
        c->bf_elems = want;
    }
    __nv_bfloat16 *a16 = c->bf, *b16 = c->bf + na;
    k_to_bf16<<<blocks(na), 256>>>(a16, A, ac, lda, na);
    CK_LAUNCH("k_to_bf16");
    k_to_bf16<<<blocks(nb), 256>>>(b16, B, bc, ldb, nb);
    CK_LAUNCH("k_to_bf16");
    cublasStatus_t s = cublasGemmEx(c->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                                    &alpha, b16, CUDA_R_16BF, bc, a16, CUDA_R_16BF, ac, &beta, C, CUDA_R_32F, ldc,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        util_fatal(__FILE__, __LINE__, "cuBLAS: gemmEx bf16 (trans_a=%d trans_b=%d M=%d N=%d K=%d ldc=%d) failed: %s (%d)",
                   (int)ta, (int)tb, M, N, K, ldc, cublas_status_name(s), (int)s);
    CK_LAUNCH("cublasGemmEx");
}

/* row-major C[M,N] = alpha op(A) op(B) + beta C is column-major C^T = op(B)^T op(A)^T.
 * K == 0 leaves C = beta C (done here, as the CPU reference does, rather than relying on
 * cuBLAS's handling of an empty product). An invalid size or leading dimension is reported by
 * cuBLAS and is fatal here. */
static void cu_gemm(void *ctx, bool ta, bool tb, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    CudaCtx *c = (CudaCtx *)ctx;
    ASSERTF(M >= 0 && N >= 0 && K >= 0, "gemm: negative size M=%d N=%d K=%d", M, N, K);
    if (M == 0 || N == 0) return;
    if (K == 0) {
        if (beta == 1.0f) return;
        size_t total = (size_t)M * N;
        k_scale_rows<<<blocks(total), 256>>>(C, ldc, N, beta, total);
        CK_LAUNCH("k_scale_rows");
        return;
    }
    if (c->gemm_bf16) {
        gemm_bf16(c, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
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

/* AdamW in the CPU reference's (torch.optim.AdamW's) operation order: kc_adamw_step
 * (kernels_common.h), the same function the checker runs on the host against cpu_adamw */
__global__ void k_adamw(float *p, const float *g, float *m, float *v, size_t n, KcAdamw a) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pi = p[i], mi = m[i], vi = v[i];
    kc_adamw_step(&a, &pi, g[i], &mi, &vi);
    p[i] = pi;
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
    KcAdamw a = kc_adamw_scalars(lr, b1, b2, eps, wd, t);
    k_adamw<<<blocks(n), 256>>>(p, g, m, v, n, a);
    CK_LAUNCH("k_adamw");
}

/* ---------------------------------------------------------------------------------------
 * helpers shared by the kernels below */

/* a NaN to write where an input is out of range (device code cannot report an error) */
__device__ __forceinline__ float nan_f32(void) { return __int_as_float(0x7fffffff); }

/* 16-lane groups: GROUP_THREADS threads per block = GROUP_ROWS rows, one row per 16 lanes of a
 * warp. Every lane of the warp runs every shuffle (rows past the end run with no elements). */
enum { LANES16 = 16, GROUP_THREADS = 128, GROUP_ROWS = GROUP_THREADS / LANES16 };

/* the CPU reference's lane tree: acc[l] += acc[l + w] for w = 8, 4, 2, 1; the sum is on lane 0
 * of the group, then broadcast to all 16 lanes */
__device__ __forceinline__ float lane16_sum(float v) {
    for (int w = LANES16 / 2; w > 0; w >>= 1) v += __shfl_down_sync(0xffffffffu, v, w, LANES16);
    return __shfl_sync(0xffffffffu, v, 0, LANES16);
}
/* the same tree for max_f32: acc[l] = acc[l + w] > acc[l] ? acc[l + w] : acc[l] */
__device__ __forceinline__ float lane16_max(float v) {
    for (int w = LANES16 / 2; w > 0; w >>= 1) {
        float o = __shfl_down_sync(0xffffffffu, v, w, LANES16);
        v = o > v ? o : v;
    }
    return __shfl_sync(0xffffffffu, v, 0, LANES16);
}
/* max_f32 over x[n] (n >= 1 where on): every lane starts from x[0], lane l takes l, l+16, ... */
__device__ __forceinline__ float row_max(const float *x, int n, bool on, int lane) {
    float m = on ? x[0] : 0.0f;
    if (on)
        for (int j = lane; j < n; j += LANES16) m = x[j] > m ? x[j] : m;
    return lane16_max(m);
}

static unsigned group_blocks(size_t rows) {
    size_t b = (rows + GROUP_ROWS - 1) / GROUP_ROWS;
    if (b > 0x7fffffffu) util_fatal(__FILE__, __LINE__, "CUDA: %zu rows exceed one launch's grid", rows);
    return (unsigned)b;
}

/* ---------------------------------------------------------------------------------------
 * embedding */

/* out[B*T,D] = wte[tokens] + wpe[t]; tokens[B,T] */
__global__ void k_embed_fwd(float *out, const int32_t *tok, const float *wte, const float *wpe, int T, int D, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t n = i / (size_t)D;
    int d = (int)(i % (size_t)D), t = (int)(n % (size_t)T);
    int32_t v = tok[n];
    out[i] = v < 0 ? nan_f32() : wte[(size_t)v * D + d] + wpe[(size_t)t * D + d];
}
static void cu_embed_forward(void *ctx, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B, int T, int D) {
    (void)ctx;
    size_t total = (size_t)B * T * D;
    if (!total) return;
    k_embed_fwd<<<blocks(total), 256>>>(out, tokens, wte, wpe, T, D, total);
    CK_LAUNCH("k_embed_fwd");
}

/* dwpe[T,D] += sum over b of dout[b,t,:], b in order */
__global__ void k_embed_bwd_wpe(float *dwpe, const float *dout, int B, int T, int D) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)T * D) return;
    float acc = dwpe[i];
    for (int b = 0; b < B; b++) acc += dout[(size_t)b * T * D + i];
    dwpe[i] = acc;
}

/* ---------------------------------------------------------------------------------------
 * scatter in serial order: y[idx[i],:] += scale[i] * src[i,:] for i = 0..n-1, as the CPU.
 * A stable radix sort of (idx[i], i) groups each destination row's sources in index order;
 * the block of the first sorted position of a group adds them one after another. */

__global__ void k_iota(int32_t *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = i;
}
/* key[n] sorted destination rows, val[n] their source indices (ascending within a key) */
__global__ void k_scatter_segments(float *y, const float *src, const float *scale, const int32_t *key,
                                   const int32_t *val, int n, int D) {
    int p = blockIdx.x;
    int32_t r = key[p];
    if (r < 0 || (p > 0 && key[p - 1] == r)) return;
    int end = p + 1;
    while (end < n && key[end] == r) end++;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float *yr = y + (size_t)r * D + d;
        float acc = *yr;
        for (int q = p; q < end; q++) {
            int32_t i = val[q];
            float s = src[(size_t)i * D + d];
            acc = scale ? acc + scale[i] * s : acc + s;
        }
        *yr = acc;
    }
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }
/* the context's scratch, at least bytes (grown after the device is idle, so no kernel in flight
 * still uses the old buffer) */
static void *scratch_get(CudaCtx *c, size_t bytes) {
    if (bytes <= c->scratch_bytes) return c->scratch;
    CK(cudaDeviceSynchronize());
    if (c->scratch) CK(cudaFree(c->scratch));
    c->scratch = NULL;
    size_t want = bytes + bytes / 2;
    cudaError_t e = cudaMalloc(&c->scratch, want);
    if (e != cudaSuccess)
        util_fatal(__FILE__, __LINE__, "CUDA: cudaMalloc of %zu bytes of scatter scratch failed: %s", want, cudaGetErrorString(e));
    c->scratch_bytes = want;
    return c->scratch;
}

static void scatter_serial(CudaCtx *c, float *y, const float *src, const int32_t *idx, const float *scale, int n, int D) {
    if (n <= 0 || D <= 0) return;
    size_t temp = 0;
    int32_t *null32 = NULL;
    CK(cub::DeviceRadixSort::SortPairs(NULL, temp, idx, null32, null32, null32, n));
    size_t nb = align256(sizeof(int32_t) * (size_t)n);
    char *base = (char *)scratch_get(c, 3 * nb + align256(temp));
    int32_t *keys = (int32_t *)base, *vals_in = (int32_t *)(base + nb), *vals = (int32_t *)(base + 2 * nb);
    void *tmp = base + 3 * nb;
    k_iota<<<blocks((size_t)n), 256>>>(vals_in, n);
    CK_LAUNCH("k_iota");
    CK(cub::DeviceRadixSort::SortPairs(tmp, temp, idx, keys, vals_in, vals, n));
    k_scatter_segments<<<(unsigned)n, 128>>>(y, src, scale, keys, vals, n, D);
    CK_LAUNCH("k_scatter_segments");
}

/* dwte[V,D] += scatter of dout[B*T,D] by tokens (serial order), dwpe[T,D] += sum over b */
static void cu_embed_backward(void *ctx, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int B, int T, int D) {
    CudaCtx *c = (CudaCtx *)ctx;
    if ((size_t)B * T * D == 0) return;
    scatter_serial(c, dwte, dout, tokens, NULL, B * T, D);
    k_embed_bwd_wpe<<<blocks((size_t)T * D), 256>>>(dwpe, dout, B, T, D);
    CK_LAUNCH("k_embed_bwd_wpe");
}

static void cu_scatter_add_rows(void *ctx, float *y, const float *src, const int32_t *idx, const float *scale, int n, int D) {
    scatter_serial((CudaCtx *)ctx, y, src, idx, scale, n, D);
}

/* ---------------------------------------------------------------------------------------
 * layernorm (eps 1e-5, biased variance): one 16-lane group per row, the CPU's lane order */
#define LN_EPS 1e-5f

/* out[N,D], mean[N], rstd[N] from x[N,D], w[D], b[D] */
__global__ void k_ln_fwd(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b, int N, int D) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = row < (size_t)N;
    const float *xr = x + (on ? row : 0) * (size_t)D;
    float s = 0.0f;
    if (on) for (int d = lane; d < D; d += LANES16) s += xr[d];
    float m = lane16_sum(s) / (float)D;
    float q = 0.0f;
    if (on) for (int d = lane; d < D; d += LANES16) { float t = xr[d] - m; q += t * t; }
    float var = lane16_sum(q) / (float)D;
    float rs = 1.0f / sqrtf(var + LN_EPS);
    if (!on) return;
    float *o = out + row * (size_t)D;
    for (int d = lane; d < D; d += LANES16) o[d] = (xr[d] - m) * rs * w[d] + b[d];
    if (lane == 0) { mean[row] = m; rstd[row] = rs; }
}
static void cu_layernorm_forward(void *ctx, float *out, float *mean, float *rstd, const float *x, const float *w,
                                 const float *b, int N, int D) {
    (void)ctx;
    if (N <= 0 || D <= 0) return;
    k_ln_fwd<<<group_blocks((size_t)N), GROUP_THREADS>>>(out, mean, rstd, x, w, b, N, D);
    CK_LAUNCH("k_ln_fwd");
}

/* dx[N,D] += (w g - mean(w g) - xhat mean(w g xhat)) rstd, one group per row */
__global__ void k_ln_bwd_dx(float *dx, const float *dout, const float *x, const float *w, const float *mean,
                            const float *rstd, int N, int D) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = row < (size_t)N;
    size_t off = (on ? row : 0) * (size_t)D;
    const float *xr = x + off, *g = dout + off;
    float m = on ? mean[row] : 0.0f, s = on ? rstd[row] : 0.0f;
    float a1 = 0.0f, a2 = 0.0f;
    if (on)
        for (int d = lane; d < D; d += LANES16) {
            float wg = w[d] * g[d];
            a1 += wg;
            a2 += wg * ((xr[d] - m) * s);
        }
    float mean_wg = lane16_sum(a1) / (float)D, mean_wgx = lane16_sum(a2) / (float)D;
    if (!on) return;
    float *dxr = dx + off;
    for (int d = lane; d < D; d += LANES16) {
        float xhat = (xr[d] - m) * s;
        dxr[d] += (w[d] * g[d] - mean_wg - xhat * mean_wgx) * s;
    }
}
/* dw[D] += sum_n xhat g, db[D] += sum_n g: one thread per column, rows in order (as the CPU) */
__global__ void k_ln_bwd_dwdb(float *dw, float *db, const float *dout, const float *x, const float *mean,
                              const float *rstd, int N, int D) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    float aw = dw[d], ab = db[d];
    for (int n = 0; n < N; n++) {
        size_t i = (size_t)n * D + d;
        float xhat = (x[i] - mean[n]) * rstd[n];
        ab += dout[i];
        aw += xhat * dout[i];
    }
    dw[d] = aw;
    db[d] = ab;
}
static void cu_layernorm_backward(void *ctx, float *dx, float *dw, float *db, const float *dout, const float *x,
                                  const float *w, const float *mean, const float *rstd, int N, int D) {
    (void)ctx;
    if (N <= 0 || D <= 0) return;
    k_ln_bwd_dx<<<group_blocks((size_t)N), GROUP_THREADS>>>(dx, dout, x, w, mean, rstd, N, D);
    CK_LAUNCH("k_ln_bwd_dx");
    k_ln_bwd_dwdb<<<blocks((size_t)D), 256>>>(dw, db, dout, x, mean, rstd, N, D);
    CK_LAUNCH("k_ln_bwd_dwdb");
}

/* ---------------------------------------------------------------------------------------
 * causal attention: per batch row b, cuBLAS strided-batched products over the H heads (head h
 * at column h*hd of qkv, ld 3D), the full T x T score block, and a softmax kernel that masks the
 * upper triangle to exactly 0 (as the CPU reference) */

/* row-major C = alpha op(A) op(B) + beta C for `batch` matrices at strides sA, sB, sC */
static void gemm_strided(CudaCtx *c, bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                         long long sA, const float *B, int ldb, long long sB, float beta, float *C, int ldc,
                         long long sC, int batch) {
    cublasStatus_t s = cublasSgemmStridedBatched(c->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                                 N, M, K, &alpha, B, ldb, sB, A, lda, sA, &beta, C, ldc, sC, batch);
    if (s != CUBLAS_STATUS_SUCCESS)
        util_fatal(__FILE__, __LINE__, "cuBLAS: sgemm strided batched (trans_a=%d trans_b=%d M=%d N=%d K=%d lda=%d ldb=%d "
                   "ldc=%d batch=%d) failed: %s (%d)", (int)ta, (int)tb, M, N, K, lda, ldb, ldc, batch, cublas_status_name(s), (int)s);
    CK_LAUNCH("cublasSgemmStridedBatched");
}

/* att rows [rows = B*H*T, T]: row r (t = r % T) becomes softmax over j <= t, 0 above */
__global__ void k_attn_softmax(float *att, int T, size_t rows) {
    size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = r < rows;
    int t = on ? (int)(r % (size_t)T) : 0;
    float *row = att + (on ? r : 0) * (size_t)T;
    float mx = row_max(row, t + 1, on, lane);
    float acc = 0.0f;
    if (on)
        for (int j = lane; j <= t; j += LANES16) { float e = kc_exp_f32(row[j] - mx); row[j] = e; acc += e; }
    float inv = 1.0f / lane16_sum(acc);
    if (!on) return;
    for (int j = lane; j < T; j += LANES16) row[j] = j <= t ? row[j] * inv : 0.0f;
}
/* ds rows hold dP; ds = scale * P * (dP - rowsum(P * dP)) for j <= t, 0 above */
__global__ void k_attn_softmax_bwd(float *ds, const float *att, int T, float scale, size_t rows) {
    size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = r < rows;
    int t = on ? (int)(r % (size_t)T) : 0;
    const float *pr = att + (on ? r : 0) * (size_t)T;
    float *dr = ds + (on ? r : 0) * (size_t)T;
    float acc = 0.0f;
    if (on)
        for (int j = lane; j <= t; j += LANES16) acc += pr[j] * dr[j];
    float pd = lane16_sum(acc);
    if (!on) return;
    for (int j = lane; j < T; j += LANES16) dr[j] = j <= t ? scale * (pr[j] * (dr[j] - pd)) : 0.0f;
}

/* out[B,T,D], att[B,H,T,T] from qkv[B,T,3D] */
static void cu_attention_forward(void *ctx, float *out, float *att, const float *qkv, int B, int T, int D, int H) {
    CudaCtx *c = (CudaCtx *)ctx;
    ASSERTF(H > 0 && D % H == 0, "attention_forward: D=%d is not a multiple of H=%d", D, H);
    if (B <= 0 || T <= 0 || D <= 0) return;
    int hd = D / H, ld = 3 * D;
    long long TT = (long long)T * T;
    float scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++) {
        const float *q = qkv + (size_t)b * T * ld;
        /* S[T,T] = scale Q K^T per head */
        gemm_strided(c, false, true, T, T, hd, scale, q, ld, hd, q + D, ld, hd, 0.0f, att + (size_t)b * H * TT, T, TT, H);
    }
    size_t rows = (size_t)B * H * T;
    k_attn_softmax<<<group_blocks(rows), GROUP_THREADS>>>(att, T, rows);
    CK_LAUNCH("k_attn_softmax");
    for (int b = 0; b < B; b++) {
        const float *v = qkv + (size_t)b * T * ld + 2 * D;
        /* out[T,hd] (ld D) = P V per head */
        gemm_strided(c, false, false, T, hd, T, 1.0f, att + (size_t)b * H * TT, T, TT, v, ld, hd, 0.0f,
                     out + (size_t)b * T * D, D, hd, H);
    }
}

/* dqkv[B,T,3D] += from dout[B,T,D], qkv, att; scratch[B,H,T,T] holds dP then dS */
static void cu_attention_backward(void *ctx, float *dqkv, float *scratch, const float *dout, const float *qkv,
                                  const float *att, int B, int T, int D, int H) {
    CudaCtx *c = (CudaCtx *)ctx;
    ASSERTF(H > 0 && D % H == 0, "attention_backward: D=%d is not a multiple of H=%d", D, H);
    if (B <= 0 || T <= 0 || D <= 0) return;
    int hd = D / H, ld = 3 * D;
    long long TT = (long long)T * T;
    float scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++) {
        size_t off = (size_t)b * T * ld;
        const float *v = qkv + off + 2 * D, *p = att + (size_t)b * H * TT, *g = dout + (size_t)b * T * D;
        /* dV[T,hd] += P^T dO; dP[T,T] = dO V^T */
        gemm_strided(c, true, false, T, hd, T, 1.0f, p, T, TT, g, D, hd, 1.0f, dqkv + off + 2 * D, ld, hd, H);
        gemm_strided(c, false, true, T, T, hd, 1.0f, g, D, hd, v, ld, hd, 0.0f, scratch + (size_t)b * H * TT, T, TT, H);
    }
    size_t rows = (size_t)B * H * T;
    k_attn_softmax_bwd<<<group_blocks(rows), GROUP_THREADS>>>(scratch, att, T, scale, rows);
    CK_LAUNCH("k_attn_softmax_bwd");
    for (int b = 0; b < B; b++) {
        size_t off = (size_t)b * T * ld;
        const float *q = qkv + off, *ds = scratch + (size_t)b * H * TT;
        /* dQ[T,hd] += dS K; dK[T,hd] += dS^T Q */
        gemm_strided(c, false, false, T, hd, T, 1.0f, ds, T, TT, q + D, ld, hd, 1.0f, dqkv + off, ld, hd, H);
        gemm_strided(c, true, false, T, hd, T, 1.0f, ds, T, TT, q, ld, hd, 1.0f, dqkv + off + D, ld, hd, H);
    }
}

/* ---------------------------------------------------------------------------------------
 * activations: the per-element functions of kernels_common.h */
__global__ void k_gelu_fwd(float *a, const float *h, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) a[i] = kc_gelu(h[i]);
}
__global__ void k_gelu_bwd(float *dh, const float *da, const float *h, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dh[i] = kc_gelu_grad(h[i]) * da[i];
}
/* a[N,F] from h[N,2F] = [h1 | h3] */
__global__ void k_swiglu_fwd(float *a, const float *h, int F, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t n = i / (size_t)F, f = i % (size_t)F;
    const float *hr = h + n * 2 * (size_t)F;
    a[i] = kc_swiglu(hr[f], hr[F + f]);
}
__global__ void k_swiglu_bwd(float *dh, const float *da, const float *h, int F, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t n = i / (size_t)F, f = i % (size_t)F;
    const float *hr = h + n * 2 * (size_t)F;
    float *dr = dh + n * 2 * (size_t)F;
    float d1, d3;
    kc_swiglu_grad(hr[f], hr[F + f], da[i], &d1, &d3);
    dr[f] = d1;
    dr[F + f] = d3;
}
static void cu_act_forward(void *ctx, int kind, float *a, const float *h, int N, int F) {
    (void)ctx;
    ASSERTF(kind == ACT_KIND_GELU || kind == ACT_KIND_SWIGLU, "act_forward: unknown activation kind %d", kind);
    size_t total = (size_t)N * F;
    if (!total) return;
    if (kind == ACT_KIND_GELU) { k_gelu_fwd<<<blocks(total), 256>>>(a, h, total); CK_LAUNCH("k_gelu_fwd"); }
    else { k_swiglu_fwd<<<blocks(total), 256>>>(a, h, F, total); CK_LAUNCH("k_swiglu_fwd"); }
}
static void cu_act_backward(void *ctx, int kind, float *dh, const float *da, const float *h, int N, int F) {
    (void)ctx;
    ASSERTF(kind == ACT_KIND_GELU || kind == ACT_KIND_SWIGLU, "act_backward: unknown activation kind %d", kind);
    size_t total = (size_t)N * F;
    if (!total) return;
    if (kind == ACT_KIND_GELU) { k_gelu_bwd<<<blocks(total), 256>>>(dh, da, h, total); CK_LAUNCH("k_gelu_bwd"); }
    else { k_swiglu_bwd<<<blocks(total), 256>>>(dh, da, h, F, total); CK_LAUNCH("k_swiglu_bwd"); }
}

/* ---------------------------------------------------------------------------------------
 * cross-entropy: one 16-lane group per row, the CPU's lane order; logf may differ from glibc's
 * by an ulp, so the loss (only) is not always the CPU's bits */

/* loss[N] = log sum exp(row - max) - (row[y] - max); 0 where y < 0; NaN where y >= V */
__global__ void k_xent_fwd(float *loss, const float *logits, const int32_t *targets, int N, int V) {
    size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = r < (size_t)N;
    int32_t y = on ? targets[r] : -1;
    bool live = on && y >= 0 && y < V;
    const float *row = logits + (on ? r : 0) * (size_t)V;
    float mx = row_max(row, V, live, lane);
    float acc = 0.0f;
    if (live)
        for (int j = lane; j < V; j += LANES16) acc += kc_exp_f32(row[j] - mx);
    float sum = lane16_sum(acc);
    if (!on || lane != 0) return;
    loss[r] = y < 0 ? 0.0f : y >= V ? nan_f32() : logf(sum) - (row[y] - mx);
}
/* dlogits[N,V] = (softmax - onehot) * scale; 0 rows where y < 0; may alias logits (each lane
 * reads and writes only its own elements, and element y is finished by its own lane) */
__global__ void k_xent_bwd(float *dlogits, const float *logits, const int32_t *targets, float scale, int N, int V) {
    size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = r < (size_t)N;
    int32_t y = on ? targets[r] : -1;
    bool live = on && y >= 0 && y < V;
    const float *row = logits + (on ? r : 0) * (size_t)V;
    float *drow = dlogits + (on ? r : 0) * (size_t)V;
    float mx = row_max(row, V, live, lane);
    float acc = 0.0f, ey = 0.0f;
    if (live)
        for (int j = lane; j < V; j += LANES16) {
            float e = kc_exp_f32(row[j] - mx);
            drow[j] = e;
            acc += e;
            if (j == y) ey = e;
        }
    float inv = 1.0f / lane16_sum(acc);
    if (!on) return;
    if (!live) {
        float fill = y < 0 ? 0.0f : nan_f32();
        for (int j = lane; j < V; j += LANES16) drow[j] = fill;
        return;
    }
    for (int j = lane; j < V; j += LANES16) drow[j] = (drow[j] * inv) * scale;
    if (y % LANES16 == lane) drow[y] = (ey * inv - 1.0f) * scale;
}
static void cu_xent_forward(void *ctx, float *loss, const float *logits, const int32_t *targets, int N, int V) {
    (void)ctx;
    if (N <= 0) return;
    k_xent_fwd<<<group_blocks((size_t)N), GROUP_THREADS>>>(loss, logits, targets, N, V);
    CK_LAUNCH("k_xent_fwd");
}
static void cu_xent_backward(void *ctx, float *dlogits, const float *logits, const int32_t *targets, float dloss_scale,
                             int N, int V) {
    (void)ctx;
    if (N <= 0 || V <= 0) return;
    k_xent_bwd<<<group_blocks((size_t)N), GROUP_THREADS>>>(dlogits, logits, targets, dloss_scale, N, V);
    CK_LAUNCH("k_xent_bwd");
}

/* ---------------------------------------------------------------------------------------
 * MoE permute / combine */

/* out[n,D] = scale[i] * x[idx[i],:] (scale NULL: a copy) */
__global__ void k_gather(float *out, const float *x, const int32_t *idx, const float *scale, int D, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t r = i / (size_t)D, d = i % (size_t)D;
    float v = x[(size_t)idx[r] * D + d];
    out[i] = scale ? scale[r] * v : v;
}
static void cu_gather_rows(void *ctx, float *out, const float *x, const int32_t *idx, int n, int D) {
    (void)ctx;
    size_t total = (size_t)n * D;
    if (!total) return;
    k_gather<<<blocks(total), 256>>>(out, x, idx, NULL, D, total);
    CK_LAUNCH("k_gather");
}
static void cu_gather_rows_scaled(void *ctx, float *out, const float *x, const int32_t *idx, const float *scale, int n, int D) {
    (void)ctx;
    size_t total = (size_t)n * D;
    if (!total) return;
    k_gather<<<blocks(total), 256>>>(out, x, idx, scale, D, total);
    CK_LAUNCH("k_gather");
}

/* out[n] = dot(dy[idx[i],:], src[i,:]), one 16-lane group per entry */
__global__ void k_gather_dot(float *out, const float *dy, const float *src, const int32_t *idx, int n, int D) {
    size_t r = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / LANES16;
    int lane = threadIdx.x % LANES16;
    bool on = r < (size_t)n;
    float acc = 0.0f;
    if (on) {
        const float *a = dy + (size_t)idx[r] * D, *b = src + r * (size_t)D;
        for (int d = lane; d < D; d += LANES16) acc += a[d] * b[d];
    }
    float s = lane16_sum(acc);
    if (on && lane == 0) out[r] = s;
}
static void cu_gather_dot(void *ctx, float *out, const float *dy, const float *src, const int32_t *idx, int n, int D) {
    (void)ctx;
    if (n <= 0) return;
    k_gather_dot<<<group_blocks((size_t)n), GROUP_THREADS>>>(out, dy, src, idx, n, D);
    CK_LAUNCH("k_gather_dot");
}

/* y[N,D] += sum over slots s < k (in order) with pos[t,s] >= 0 of gate[t,s] * src[pos[t,s],:] */
__global__ void k_combine(float *y, const float *src, const int32_t *pos, const float *gate, int k, int D, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t t = i / (size_t)D, d = i % (size_t)D;
    float acc = y[i];
    for (int s = 0; s < k; s++) {
        int32_t p = pos[t * k + s];
        if (p < 0) continue;
        float v = src[(size_t)p * D + d];
        acc = gate ? acc + gate[t * k + s] * v : acc + v;
    }
    y[i] = acc;
}
static void cu_combine_rows(void *ctx, float *y, const float *src, const int32_t *pos, const float *gate, int N, int k, int D) {
    (void)ctx;
    size_t total = (size_t)N * D;
    if (!total || k <= 0) return;
    k_combine<<<blocks(total), 256>>>(y, src, pos, gate, k, D, total);
    CK_LAUNCH("k_combine");
}

/* ---------------------------------------------------------------------------------------
 * sequence pooling: x[B,T,D] -> out[B,D] over len[b] in [1, T] (NaN outside) */
__global__ void k_pool_fwd(int last, float *out, const float *x, const int32_t *len, int T, int D, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t b = i / (size_t)D, d = i % (size_t)D;
    int L = len[b];
    if (L < 1 || L > T) { out[i] = nan_f32(); return; }
    const float *xb = x + b * (size_t)T * D + d;
    if (last) { out[i] = xb[(size_t)(L - 1) * D]; return; }
    float o = xb[0];
    for (int t = 1; t < L; t++) o += xb[(size_t)t * D];
    float inv = 1.0f / (float)L;
    out[i] = o * inv;
}
/* dx[B,T,D] += dout[B,D] / len (mean) or at len-1 (last) */
__global__ void k_pool_bwd(int last, float *dx, const float *dout, const int32_t *len, int T, int D, size_t total) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    size_t d = i % (size_t)D, bt = i / (size_t)D, b = bt / (size_t)T;
    int t = (int)(bt % (size_t)T), L = len[b];
    if (L < 1 || L > T) { dx[i] = nan_f32(); return; }
    float g = dout[b * (size_t)D + d];
    if (last) { if (t == L - 1) dx[i] += g; return; }
    float inv = 1.0f / (float)L;
    if (t < L) dx[i] += g * inv;
}
static void cu_pool_forward(void *ctx, int pooling, float *out, const float *x, const int32_t *len, int B, int T, int D) {
    (void)ctx;
    ASSERTF(pooling == POOL_KIND_MEAN || pooling == POOL_KIND_LAST, "pool_forward: unknown pooling kind %d", pooling);
    size_t total = (size_t)B * D;
    if (!total) return;
    k_pool_fwd<<<blocks(total), 256>>>(pooling == POOL_KIND_LAST, out, x, len, T, D, total);
    CK_LAUNCH("k_pool_fwd");
}
static void cu_pool_backward(void *ctx, int pooling, float *dx, const float *dout, const int32_t *len, int B, int T, int D) {
    (void)ctx;
    ASSERTF(pooling == POOL_KIND_MEAN || pooling == POOL_KIND_LAST, "pool_backward: unknown pooling kind %d", pooling);
    size_t total = (size_t)B * T * D;
    if (!total) return;
    k_pool_bwd<<<blocks(total), 256>>>(pooling == POOL_KIND_LAST, dx, dout, len, T, D, total);
    CK_LAUNCH("k_pool_bwd");
}

/* ---------------------------------------------------------------------------------------
 * routing: the host router's per-token code (route_common.h), one thread per token; the loss
 * sums one thread per column over the tokens in order (the CPU's order, in double); the
 * capacity queues one thread per (slot, bucket) walking the tokens in order (integers: exact).
 * Not tuned: the per-token work is serial in E (and in the chosen groups' members). */
enum { ROUTE_THREADS = 128 };
static unsigned route_blocks(size_t n) {
    size_t b = (n + ROUTE_THREADS - 1) / ROUTE_THREADS;
    if (b > 0x7fffffffu) util_fatal(__FILE__, __LINE__, "CUDA: %zu routing items exceed one launch's grid", n);
    return (unsigned)b;
}
__global__ void k_route_topk(RouteSelArgs a) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < a.N) rc_select_one(&a, t);
}
__global__ void k_route_two(RouteSelArgs a) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= a.N) return;
    rc_two_scores(&a, t);
    rc_two_choose(&a, t, NULL);
}
__global__ void k_route_sums(RouteSelArgs a) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col < a.E + a.G + 1) a.sums[col] = rc_sum_column(&a, col);
}
static void route_sums(const RouteSelArgs *a) {
    int cols = a->E + a->G + 1;
    k_route_sums<<<route_blocks((size_t)cols), ROUTE_THREADS>>>(*a);
    CK_LAUNCH("k_route_sums");
}
static void cu_route_topk(void *ctx, const RouteSelArgs *a) {
    (void)ctx;
    ASSERTF(a->G == 0, "route_topk: G=%d, expected 0 (one stage)", a->G);
    if (a->N > 0) {
        k_route_topk<<<route_blocks((size_t)a->N), ROUTE_THREADS>>>(*a);
        CK_LAUNCH("k_route_topk");
    }
    route_sums(a);
}
static void cu_route_two_stage(void *ctx, const RouteSelArgs *a) {
    (void)ctx;
    ASSERTF(a->G > 0 && a->TG >= 1 && a->TG <= a->G && a->K * a->G == a->E,
            "route_two_stage: G=%d K=%d TG=%d E=%d", a->G, a->K, a->TG, a->E);
    if (a->N > 0) {
        k_route_two<<<route_blocks((size_t)a->N), ROUTE_THREADS>>>(*a);
        CK_LAUNCH("k_route_two");
    }
    route_sums(a);
}

/* cnt[s, b] (zeroed first) += 1 per valid pair: integer atomics, so the result is exact */
__global__ void k_route_count(int32_t *cnt, const int32_t *ids, const int32_t *valid, size_t n, int slots, int buckets) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n || (valid && valid[i] < 0)) return;
    int s = (int)(i % (size_t)slots), b = ids[i];
    if (b >= 0 && b < buckets) atomicAdd(&cnt[(size_t)s * buckets + b], 1);
}
static void cu_route_count(void *ctx, int32_t *cnt, const int32_t *ids, const int32_t *valid, int N, int slots, int buckets) {
    (void)ctx;
    size_t sb = (size_t)slots * buckets, n = (size_t)N * slots;
    if (!sb) return;
    CK(cudaMemset(cnt, 0, sizeof(int32_t) * sb));
    if (!n) return;
    k_route_count<<<route_blocks(n), ROUTE_THREADS>>>(cnt, ids, valid, n, slots, buckets);
    CK_LAUNCH("k_route_count");
}

/* one thread per (slot s, bucket b): the kept pairs of b in slot s in token order */
__global__ void k_route_keep(int32_t *keep, const int32_t *ids, const int64_t *base, int64_t cap, int N, int slots,
                             int buckets) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)slots * buckets) return;
    int s = (int)(i / (size_t)buckets), b = (int)(i % (size_t)buckets);
    int64_t qpos = base[i];
    for (int t = 0; t < N; t++) {
        size_t ts = (size_t)t * slots + s;
        if (keep[ts] < 0 || ids[ts] != b) continue;
        if (cap >= 0 && qpos >= cap) keep[ts] = -1;
        qpos++;
    }
}
static void cu_route_keep(void *ctx, int32_t *keep, const int32_t *ids, const int64_t *base, int64_t cap, int N,
                          int slots, int buckets) {
    (void)ctx;
    size_t sb = (size_t)slots * buckets;
    if (!sb || N <= 0) return;
    k_route_keep<<<route_blocks(sb), ROUTE_THREADS>>>(keep, ids, base, cap, N, slots, buckets);
    CK_LAUNCH("k_route_keep");
}

__global__ void k_route_pair_keep(int32_t *pos, const int32_t *expert, const int32_t *group, const int32_t *gkeep,
                                  const int32_t *group_of, int k, int TG, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t t = i / (size_t)k;
    int g = group_of[expert[i]], ok = 0;
    for (int j = 0; j < TG; j++) ok |= group[t * TG + j] == g && gkeep[t * TG + j] >= 0;
    pos[i] = ok ? 0 : -1;
}
static void cu_route_pair_keep(void *ctx, int32_t *pos, const int32_t *expert, const int32_t *group, const int32_t *gkeep,
                               const int32_t *group_of, int N, int k, int TG) {
    (void)ctx;
    size_t n = (size_t)N * k;
    if (!n) return;
    k_route_pair_keep<<<route_blocks(n), ROUTE_THREADS>>>(pos, expert, group, gkeep, group_of, k, TG, n);
    CK_LAUNCH("k_route_pair_keep");
}

__global__ void k_route_backward(RouteBwdArgs a) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= a.N) return;
    if (a.G > 0) rc_backward_two(&a, t);
    else rc_backward_one(&a, t);
}
static void cu_route_backward(void *ctx, const RouteBwdArgs *a) {
    (void)ctx;
    ASSERTF(a->k <= RC_MAX_K && a->TG <= RC_MAX_K, "route_backward: top-k %d or top groups %d > %d", a->k, a->TG, RC_MAX_K);
    if (a->N <= 0) return;
    k_route_backward<<<route_blocks((size_t)a->N), ROUTE_THREADS>>>(*a);
    CK_LAUNCH("k_route_backward");
}

/* ---- stored formats (quant_common.h per element; bitwise the host's quant.c) ---- */
/* dequant_rows: one thread per output element (i - r0, c) */
__global__ void k_dequant_f16(float *dst, const uint16_t *data, int cols, int r0, size_t total) {
    size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (j >= total) return;
    dst[j] = qc_f16_to_f32(data[(size_t)r0 * cols + j]);
}
__global__ void k_dequant_int4(float *dst, const uint8_t *data, const uint16_t *scales, const uint16_t *zeros,
                               int rows, int cols, int group, int r0, size_t total) {
    size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (j >= total) return;
    int i = r0 + (int)(j / (size_t)cols), c = (int)(j % (size_t)cols);
    dst[j] = qc_int4_element(data, scales, zeros, rows, group, i, c);
}
static void cu_dequant_rows(void *ctx, float *dst, int fmt, const void *data, const uint16_t *scales,
                            const uint16_t *zeros, int rows, int cols, int group, int r0, int nr) {
    (void)ctx;
    ASSERTF(fmt == 1 || fmt == 2, "dequant_rows: format %d is not a stored format (fp16 1, int4 2)", fmt);
    ASSERTF(rows >= 0 && cols >= 0 && r0 >= 0 && nr >= 0 && r0 + nr <= rows && (fmt != 2 || (group >= 2 && group % 2 == 0)),
            "dequant_rows: bad shape [%d, %d], rows %d..%d or INT4 group %d", rows, cols, r0, r0 + nr, group);
    size_t total = (size_t)nr * cols;
    if (total == 0) return;
    if (fmt == 1) {
        k_dequant_f16<<<blocks(total), 256>>>(dst, (const uint16_t *)data, cols, r0, total);
        CK_LAUNCH("k_dequant_f16");
    } else {
        k_dequant_int4<<<blocks(total), 256>>>(dst, (const uint8_t *)data, scales, zeros, rows, cols, group, r0, total);
        CK_LAUNCH("k_dequant_int4");
    }
}

/* fake_quant FP16: one thread per element */
__global__ void k_fake_f16(float *x, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] = qc_f16_fake(x[i]);
}
/* fake_quant INT4, pass 1: one thread per (column c, group k) scans its rows in order (the
 * min/max the host finds, -0/+0 included) and writes the FP16 scale and zero; a non-finite
 * group gets NaN parameters, so its outputs become NaN (device code cannot stop the run) */
__global__ void k_fake_int4_params(const float *x, uint16_t *par, int rows, int cols, int group, int ng) {
    size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (j >= (size_t)cols * ng) return;
    int c = (int)(j / (size_t)ng), k = (int)(j % (size_t)ng);
    int i0 = k * group, i1 = i0 + group < rows ? i0 + group : rows;
    float mn, mx;
    qc_int4_minmax(x, cols, c, i0, i1, &mn, &mx);
    uint16_t s16 = 0x7E00, z16 = 0x7E00;
    if (isfinite(mn) && isfinite(mx)) qc_int4_params(mn, mx, &s16, &z16);
    par[2 * j] = s16;
    par[2 * j + 1] = z16;
}
/* pass 2: one thread per element, encode and decode with its group's parameters */
__global__ void k_fake_int4_apply(float *x, const uint16_t *par, int cols, int group, int ng, size_t total) {
    size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (j >= total) return;
    int i = (int)(j / (size_t)cols), c = (int)(j % (size_t)cols);
    size_t g = (size_t)c * ng + (size_t)(i / group);
    x[j] = qc_int4_fake(x[j], par[2 * g], par[2 * g + 1]);   /* NaN parameters: NaN */
}
static void cu_fake_quant(void *ctx, float *x, int fmt, int rows, int cols, int group) {
    CudaCtx *c = (CudaCtx *)ctx;
    ASSERTF(fmt == 1 || fmt == 2, "fake_quant: format %d is not a stored format (fp16 1, int4 2)", fmt);
    ASSERTF(rows >= 0 && cols >= 0 && (fmt != 2 || (group >= 2 && group % 2 == 0)),
            "fake_quant: bad shape [%d, %d] or INT4 group %d (even, >= 2)", rows, cols, group);
    size_t n = (size_t)rows * cols;
    if (n == 0) return;
    if (fmt == 1) {
        k_fake_f16<<<blocks(n), 256>>>(x, n);
        CK_LAUNCH("k_fake_f16");
        return;
    }
    int ng = (rows + group - 1) / group;
    size_t np = (size_t)cols * ng;
    uint16_t *par = (uint16_t *)scratch_get(c, 2 * np * sizeof(uint16_t));
    k_fake_int4_params<<<blocks(np), 256>>>(x, par, rows, cols, group, ng);
    CK_LAUNCH("k_fake_int4_params");
    k_fake_int4_apply<<<blocks(n), 256>>>(x, par, cols, group, ng, n);
    CK_LAUNCH("k_fake_int4_apply");
}

static void cu_destroy(void *ctx) {
    CudaCtx *c = (CudaCtx *)ctx;
    if (!c) return;
    if (c->partial) CK(cudaFree(c->partial));
    if (c->scratch) CK(cudaFree(c->scratch));
    if (c->bf) CK(cudaFree(c->bf));
    if (c->side) {
        CK(cudaStreamSynchronize(c->side));
        for (int i = 0; i < CU_XFER_EVENTS; i++) CK(cudaEventDestroy(c->xfer_ev[i]));
        CK(cudaEventDestroy(c->compute_ev));
        CK(cudaStreamDestroy(c->side));
    }
    CKB(cublasDestroy(c->blas));
    free(c);
}

static BackendOps make_ops(void) {
    BackendOps o;
    memset(&o, 0, sizeof o);
    o.name = "cuda";
    o.alloc = cu_alloc; o.free = cu_free; o.to_host = cu_to_host; o.from_host = cu_from_host;
    o.copy = cu_copy; o.zero = cu_zero; o.sync = cu_sync; o.gemm = cu_gemm;
    o.embed_forward = cu_embed_forward; o.embed_backward = cu_embed_backward;
    o.layernorm_forward = cu_layernorm_forward; o.layernorm_backward = cu_layernorm_backward;
    o.attention_forward = cu_attention_forward; o.attention_backward = cu_attention_backward;
    o.act_forward = cu_act_forward; o.act_backward = cu_act_backward;
    o.axpy = cu_axpy; o.scale = cu_scale; o.sumsq = cu_sumsq;
    o.xent_forward = cu_xent_forward; o.xent_backward = cu_xent_backward;
    o.gather_rows = cu_gather_rows; o.scatter_add_rows = cu_scatter_add_rows; o.gather_dot = cu_gather_dot;
    o.pool_forward = cu_pool_forward; o.pool_backward = cu_pool_backward;
    o.adamw = cu_adamw;
    o.combine_rows = cu_combine_rows; o.gather_rows_scaled = cu_gather_rows_scaled;
    o.route_topk = cu_route_topk; o.route_two_stage = cu_route_two_stage; o.route_count = cu_route_count;
    o.route_keep = cu_route_keep; o.route_pair_keep = cu_route_pair_keep; o.route_backward = cu_route_backward;
    o.dequant_rows = cu_dequant_rows; o.fake_quant = cu_fake_quant;
    o.host_alloc_pinned = cu_host_alloc_pinned; o.host_free_pinned = cu_host_free_pinned;
    o.copy_to_device_async = cu_copy_to_device_async; o.copy_to_host_async = cu_copy_to_host_async;
    o.wait_event = cu_wait_event; o.sync_event = cu_sync_event;
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
    /* the side stream and its events (offloading's transfers) */
    e = cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->compute_ev, cudaEventDisableTiming);
    for (int i = 0; i < CU_XFER_EVENTS && e == cudaSuccess; i++)
        e = cudaEventCreateWithFlags(&c->xfer_ev[i], cudaEventDisableTiming);
    if (e != cudaSuccess) {
        cudaFree(c->partial);
        cublasDestroy(c->blas);
        free(c);
        return status_errorf("run.backend=cuda: device %d: cannot create the transfer stream and its events: %s", dev,
                             cudaGetErrorString(e));
    }
    cuda_ops = make_ops();
    be->ops = &cuda_ops;
    be->ctx = c;
    be->kind = BACKEND_CUDA;
    return status_ok();
}

extern "C" Status backend_cuda_info(const Backend *be, char *name, size_t cap, double *mem_bytes) {
    if (!be || be->kind != BACKEND_CUDA || !be->ctx) return status_errorf("backend_cuda_info: not a CUDA backend");
    const CudaCtx *c = (const CudaCtx *)be->ctx;
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, c->device);
    if (e != cudaSuccess) return status_errorf("CUDA: cudaGetDeviceProperties(%d) failed: %s", c->device, cudaGetErrorString(e));
    if (cap) snprintf(name, cap, "%s", p.name);
    *mem_bytes = (double)p.totalGlobalMem;
    return status_ok();
}

extern "C" Status backend_cuda_set_gemm_dtype(Backend *be, int dtype) {
    if (!be || be->kind != BACKEND_CUDA || !be->ctx) return status_errorf("run.gemm_dtype: not a CUDA backend");
    if (dtype != GEMM_DTYPE_FP32 && dtype != GEMM_DTYPE_BF16)
        return status_errorf("run.gemm_dtype: unknown GEMM dtype %d (allowed: fp32, bf16)", dtype);
    ((CudaCtx *)be->ctx)->gemm_bf16 = dtype == GEMM_DTYPE_BF16;
    return status_ok();
}
