/* backend: the one interface through which model code runs numerics (CPU/OpenBLAS reference,
 * CUDA/cuBLAS). A Backend is a table of function pointers plus a context. Compute runs in
 * order on one compute stream; host<->device transfers for offloading may run on a side stream
 * (host_alloc_pinned .. sync_event below) and are ordered against compute by events.
 * Does not: own model tensors (callers allocate through alloc/free and pass views).
 * All tensors are float32, row-major, contiguous unless a leading dimension is given.
 * Every *_backward op ACCUMULATES into its gradient outputs (+=), like llm.c.
 *
 * Legend: B T D F V H N = batch, seq, d_model, d_ff, vocab, heads, rows (tokens, B*T). */
#ifndef DCMOE_BACKEND_H
#define DCMOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "util.h"

/* the routing of one MoE layer on the backend (route_topk, route_two_stage): inputs, outputs and
 * workspace, all backend memory; router.h has the meaning of each array (a Route holds their
 * host copies). The contracts are src/router.c's: softmax in double, selection ties to the
 * lower id, the same gates. */
typedef struct RouteSelArgs {
    int N, E, k;                 /* tokens, experts, experts per token */
    int G, K, TG;                /* two stages: groups, experts per group, groups per token */
    int renorm;                  /* renormalise the top-k gates (moe.renormalize and k > 1) */
    int score_top2;              /* group score = top-2 members (moe.group_score top2, K >= 2), else the mean */
    int gate_product;            /* gates = q_g x in-group p (moe.group_gate product) */
    const float *logits;         /* [N, E] */
    const float *bias;           /* [E] selection bias (aux_free), NULL = none */
    const int32_t *members;      /* [G, K] (two stages) */
    float *probs;                /* [N, E] out: softmax (two stages: in-group, 0 outside the chosen groups) */
    double *lse;                 /* [N] out: log-sum-exp of all logits */
    int32_t *expert;             /* [N, k] out */
    float *gate;                 /* [N, k] out */
    float *q;                    /* [N, G] out: group softmax (two stages) */
    int32_t *group;              /* [N, TG] out: chosen groups (two stages) */
    int32_t *gtop2;              /* [N, G, 2] out: top-2 members per group (two stages, score_top2) */
    float *lsel;                 /* [N, G] out: group selection scores (two stages) */
    double *sums;                /* [E + G + 1] out: sums over the N tokens in token order of the
                                    probs, of q, and of lse^2 (the balance and z losses' inputs) */
} RouteSelArgs;

/* the router backward (route_backward): dlogits [N, E] (overwritten) from the forward's arrays
 * (RouteSelArgs names), dgate [N, k] (dloss/dgate per pair, 0 for dropped pairs), the balance
 * coefficients and the z-loss coefficient; G = 0 for one stage */
typedef struct RouteBwdArgs {
    int N, E, k, G, K, TG;
    int renorm, score_top2, gate_product;
    const float *logits, *probs, *gate, *q;
    const double *lse;
    const int32_t *expert, *group, *gtop2, *members;
    const double *fcoef;         /* [E + G]: alpha E f_i / n per expert, then per group */
    double z_coef;               /* 2 beta / n */
    const float *dgate;          /* [N, k] */
    float *dlogits;              /* [N, E] out */
} RouteBwdArgs;

typedef struct BackendOps {
    const char *name;
    /* memory */
    void *(*alloc)(void *ctx, size_t bytes);                  /* zeroed */
    void (*free)(void *ctx, void *p);
    void (*to_host)(void *ctx, void *host_dst, const void *dev_src, size_t bytes);
    void (*from_host)(void *ctx, void *dev_dst, const void *host_src, size_t bytes);
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);
    void (*zero)(void *ctx, void *p, size_t bytes);
    void (*sync)(void *ctx);

    /* C[M,N] = alpha * op(A) op(B) + beta * C; op(A) is [M,K], op(B) is [K,N]; row-major */
    void (*gemm)(void *ctx, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

    /* out[B*T,D] = wte[tok] + wpe[t] */
    void (*embed_forward)(void *ctx, float *out, const int32_t *tokens, const float *wte,
                          const float *wpe, int B, int T, int D);
    /* dwte[V,D] += scatter(dout), dwpe[T,D] += sum over batch */
    void (*embed_backward)(void *ctx, float *dwte, float *dwpe, const float *dout,
                           const int32_t *tokens, int B, int T, int D);

    /* out[N,D] = (x - mean)*rstd*w + b; saves mean[N], rstd[N] */
    void (*layernorm_forward)(void *ctx, float *out, float *mean, float *rstd, const float *x,
                              const float *w, const float *b, int N, int D);
    void (*layernorm_backward)(void *ctx, float *dx, float *dw, float *db, const float *dout,
                               const float *x, const float *w, const float *mean,
                               const float *rstd, int N, int D);

    /* causal multi-head attention. qkv[B,T,3D] (q | k | v, head h at cols h*hd..),
     * out[B,T,D], att[B,H,T,T] saved softmax probabilities (lower triangle used) */
    void (*attention_forward)(void *ctx, float *out, float *att, const float *qkv,
                              int B, int T, int D, int H);
    /* dqkv[B,T,3D] +=; scratch[B,H,T,T] is workspace */
    void (*attention_backward)(void *ctx, float *dqkv, float *scratch, const float *dout,
                               const float *qkv, const float *att, int B, int T, int D, int H);

    /* GELU (tanh form): a[N,F] = gelu(h[N,F]).
     * SwiGLU: h[N,2F] = [h1 | h3] per row, a[N,F] = silu(h1) * h3. */
    void (*act_forward)(void *ctx, int kind, float *a, const float *h, int N, int F);
    /* dh[N,F or 2F] = (not accumulated: overwritten) from da[N,F] and saved h */
    void (*act_backward)(void *ctx, int kind, float *dh, const float *da, const float *h, int N, int F);

    /* y[n] += alpha * x[n] */
    void (*axpy)(void *ctx, float *y, const float *x, float alpha, size_t n);
    /* x[n] *= alpha */
    void (*scale)(void *ctx, float *x, float alpha, size_t n);
    /* sum of squares in double */
    double (*sumsq)(void *ctx, const float *x, size_t n);

    /* cross-entropy over rows: logits[N,V] -> loss[N] (0 where target < 0).
     * The backward writes dlogits[N,V] = (softmax - onehot) * dloss_scale for rows with a
     * target, 0 otherwise (overwrite, not accumulate; may alias logits). */
    void (*xent_forward)(void *ctx, float *loss, const float *logits, const int32_t *targets, int N, int V);
    void (*xent_backward)(void *ctx, float *dlogits, const float *logits, const int32_t *targets,
                          float dloss_scale, int N, int V);

    /* MoE permute: out[i,:] = x[idx[i],:] for i < n */
    void (*gather_rows)(void *ctx, float *out, const float *x, const int32_t *idx, int n, int D);
    /* MoE unpermute: y[idx[i],:] += scale[i] * src[i,:] (scale may be NULL = 1); serial order i = 0..n-1 */
    void (*scatter_add_rows)(void *ctx, float *y, const float *src, const int32_t *idx,
                             const float *scale, int n, int D);
    /* dgate[i] = dot(dy[idx[i],:], src[i,:]) */
    void (*gather_dot)(void *ctx, float *out, const float *dy, const float *src, const int32_t *idx, int n, int D);

    /* sequence pooling for the classification head: x[B,T,D] -> out[B,D];
     * mean over the first len[b] positions, or last = position len[b]-1 */
    void (*pool_forward)(void *ctx, int pooling, float *out, const float *x, const int32_t *len, int B, int T, int D);
    void (*pool_backward)(void *ctx, int pooling, float *dx, const float *dout, const int32_t *len, int B, int T, int D);

    /* AdamW on one tensor: m, v moments; step t >= 1 (bias correction) */
    void (*adamw)(void *ctx, float *p, const float *g, float *m, float *v, size_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, int t);

    /* MoE combine: y[t,:] += sum_{s<k, pos[t,s]>=0} gate[t,s] * src[pos[t,s],:] in slot order
     * (gate may be NULL = 1). Deterministic per row. y[N,D], src[M,D], pos/gate [N,k] */
    void (*combine_rows)(void *ctx, float *y, const float *src, const int32_t *pos,
                         const float *gate, int N, int k, int D);
    /* out[i,:] = scale[i] * x[idx[i],:] (overwrite) */
    void (*gather_rows_scaled)(void *ctx, float *out, const float *x, const int32_t *idx,
                               const float *scale, int n, int D);

    /* ---- routing (router.h, route_common.h): every array is backend memory ---- */
    /* one stage: softmax, top-k, gates, lse, sums (a->G = 0) */
    void (*route_topk)(void *ctx, const RouteSelArgs *a);
    /* two stages: group scores and softmax, top TG groups, in-group softmax, top-k, gates, lse, sums */
    void (*route_two_stage)(void *ctx, const RouteSelArgs *a);
    /* cnt[slots, buckets] = pairs (t, s) with ids[t*slots + s] = b and (valid NULL or
     * valid[t*slots + s] >= 0) (overwrite); integers, exact */
    void (*route_count)(void *ctx, int32_t *cnt, const int32_t *ids, const int32_t *valid, int N, int slots, int buckets);
    /* capacity from the global counts: keep[N, slots] (in/out, 0 kept / -1 dropped); kept pair
     * (t, s) of bucket b = ids[t*slots + s] has queue position base[s*buckets + b] + the kept
     * pairs (t' < t, s) of bucket b; dropped when cap >= 0 and that position is >= cap */
    void (*route_keep)(void *ctx, int32_t *keep, const int32_t *ids, const int64_t *base, int64_t cap,
                       int N, int slots, int buckets);
    /* two stages: pos[t, s] = 0 if the group group_of[expert[t, s]] is a chosen group of token t
     * (group[t, j]) with gkeep[t, j] >= 0, else -1 (overwrite) */
    void (*route_pair_keep)(void *ctx, int32_t *pos, const int32_t *expert, const int32_t *group, const int32_t *gkeep,
                            const int32_t *group_of, int N, int k, int TG);
    /* dlogits from the gates' gradients, the balance losses and the z-loss (one or two stages) */
    void (*route_backward)(void *ctx, const RouteBwdArgs *a);

    /* ---- stored number formats (src/quant.h layouts, cuda/quant_common.h arithmetic): every
     * array is backend memory; fmt is enum QFormat (1 = FP16, 2 = INT4) ---- */
    /* dst[nr, cols] (FP32 row-major, overwritten) = rows r0 .. r0+nr-1 of a stored tensor
     * [rows, cols]: FP16 data uint16 [rows, cols] (scales, zeros, group unused); INT4 data =
     * column-major nibbles, scales and zeros FP16 [cols, ceil(rows/group)]. Exact: the bits of
     * the host's qtensor_decode_rows */
    void (*dequant_rows)(void *ctx, float *dst, int fmt, const void *data, const uint16_t *scales,
                         const uint16_t *zeros, int rows, int cols, int group, int r0, int nr);
    /* QAT's fake quantisation in place: x[rows, cols] <- decode(encode(x)) with quant.h's
     * quantiser (FP16: each element rounded; INT4: each column in groups of `group` rows, the
     * group's zero and scale from its min and max). Exact: the bits of the host's quant_fake.
     * INT4 inputs must be finite (CPU: fatal error; CUDA: the group's outputs become NaN) */
    void (*fake_quant)(void *ctx, float *x, int fmt, int rows, int cols, int group);

    /* ---- host <-> device movement on a side stream (offloading, offload.h) ----
     * A transfer is enqueued on the backend's side stream after every transfer enqueued before
     * it and after all compute enqueued before the call (so it never overwrites or reads a
     * buffer that earlier compute still uses), and returns its event: a ticket > 0, or 0 when
     * the transfer is already complete. Until the event is waited for, src and dst must stay
     * allocated and src unchanged. CPU: synchronous memcpy, every event 0 (trivially complete).
     * CUDA: cudaMemcpyAsync on a non-blocking stream, one cudaEvent per transfer (a ring: a
     * newer transfer's event implies the older ones, so a reused event only waits longer). */
    /* page-locked host memory (CPU: plain 64-byte aligned host memory), zeroed; host_free_pinned(NULL) is a no-op */
    void *(*host_alloc_pinned)(void *ctx, size_t bytes);
    void (*host_free_pinned)(void *ctx, void *p);
    /* dev_dst[bytes] <- host_src (host_src should be pinned for the copy to be asynchronous) */
    uint64_t (*copy_to_device_async)(void *ctx, void *dev_dst, const void *host_src, size_t bytes);
    /* host_dst[bytes] <- dev_src */
    uint64_t (*copy_to_host_async)(void *ctx, void *host_dst, const void *dev_src, size_t bytes);
    /* the compute stream's later work waits for transfer ev (the host does not block); 0: no-op */
    void (*wait_event)(void *ctx, uint64_t ev);
    /* the host blocks until transfer ev is complete (then its buffers may be reused); 0: no-op */
    void (*sync_event)(void *ctx, uint64_t ev);

    /* release the context (handles, streams); called once by backend_free */
    void (*destroy)(void *ctx);
} BackendOps;

typedef struct Backend {
    const BackendOps *ops;
    void *ctx;
    int kind;               /* enum BackendKind */
    int threads;
} Backend;

/* CPU backend (always available); threads = BLAS threads */
Status backend_cpu_init(Backend *be, int threads);
/* CUDA backend: error status if built without CUDA or no device */
Status backend_cuda_init(Backend *be, int device);
/* the CUDA device's name and total memory (bytes); an error status for other backends */
Status backend_cuda_info(const Backend *be, char *name, size_t cap, double *mem_bytes);
/* the input precision of be's gemm (enum GemmDtype): the CPU backend offers fp32 only (bf16
 * is an error status), the CUDA backend fp32 and bf16 (cublasGemmEx, FP32 accumulate) */
Status backend_set_gemm_dtype(Backend *be, int dtype);
Status backend_cuda_set_gemm_dtype(Backend *be, int dtype);
/* every slot of an ops table must be filled: an empty slot is a start-up error */
Status backend_check(const Backend *be);
void backend_free(Backend *be);

enum ActKind { ACT_KIND_GELU = 0, ACT_KIND_SWIGLU = 1 };
enum PoolKind { POOL_KIND_MEAN = 0, POOL_KIND_LAST = 1 };

#endif
