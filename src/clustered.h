/* clustered: the clustered MoE layer (DESIGN.md §1.1, §1.4): experts in groups, each expert
 * W_i = Base_g(i) + A_i B_i^T, two-stage routing (groups by prototype score, then top-k experts
 * inside the chosen groups). This header holds the layer's own nouns: the clustering state
 * the model owns per layer (membership, selection bias, activation centroids) and the
 * stored-format experts of the inference path; the layer itself is a MoeLayer (moe.h), and
 * moe_forward / moe_backward dispatch to clustered_forward / clustered_backward.
 * clustering.mode masters: the gradient set g carries w1 [E, D, F1], w2 [E, F, D] (the
 * masters' gradients); clustered_backward then accumulates dW_e = straight-through gradient of
 * each expert's effective weights there and nothing into the bases or factors.
 * Does not: re-cluster (recluster.h) or compress (compress.h). */
#ifndef DCMOE_CLUSTERED_H
#define DCMOE_CLUSTERED_H

#include "moe.h"
#include "quant.h"

/* stored-format experts for the inference path (precision.c provides them): the clustered
 * layer's forward computes directly from FP16/INT4 tensors (quant.h kernels, dequantise on
 * the fly) when MoeParams.stored is set; no backward exists on this path. */
typedef struct MoeQGroup {
    const QTensor *base1, *base2;          /* [D, F1], [F, D] */
    const QTensor *a1, *b1, *a2, *b2;      /* [K] each: [D,r], [F1,r], [F,r], [D,r] */
} MoeQGroup;
struct MoeStored {
    /* the local groups g[n] (distinct, ascending) are needed by this forward: fetch/pin them
     * if possible (the fetch point after routing). Returns 1 when they are pinned, 0 when
     * get() must fetch them one at a time (e.g. more groups than resident slots). */
    int (*prepare)(void *ctx, const int *g, int n);
    /* the stored tensors of local group g; non-zero = unavailable (the error is kept by the
     * provider; the group's output rows are zero) */
    int (*get)(void *ctx, int g, MoeQGroup *out);
    /* optional: 1 when group g is resident now; the layer then computes resident groups
     * first (the order does not change any result: groups write disjoint rows), so a cap
     * below the groups a batch needs costs one miss per group beyond the cap instead of
     * LRU's miss on every access of a cyclic sweep */
    int (*resident)(void *ctx, int g);
    void *ctx;
};

/* the clustering state of one clustered layer (owned by the model, checkpointed) */
struct ClusterState {
    int32_t *group_of;           /* [E] group of each expert */
    int32_t *members;            /* [G, K] member experts of each group, ascending */
    float *bias;                 /* [E] aux-loss-free selection bias */
    float *mu;                   /* [E, Pm] EMA activation centroids */
    int mu_dim;                  /* Pm */
    int mu_hidden;               /* 1: mu from hidden inputs (Pm = D), 0: router logits (Pm = E) */
    int32_t *mu_seen;            /* [E] 1 once mu_i has had a first observation */
    double *mu_sum;              /* [E, Pm + 1] sums and counts being collected, NULL = not collecting */
    double *mu_sum_store;        /* the buffer behind mu_sum */
    int n_events, n_accepted;
    /* the reference partition re-clustering events are compared with (the jaccard_compress
     * column of cluster/events): the compression event's partition (clustering.compress_at),
     * else the initial contiguous grouping; ref_known 0 = unknown (resumed from a checkpoint
     * written before it was kept: the column is NaN) */
    int32_t *group_ref;          /* [E] */
    int ref_known;
    /* standard layers of a run with clustering.compress_at (compress_event.c), else NULL:
     * EMA over steps of how often experts i and j are both in one token's top-k (before
     * capacity, global over ranks) [E, E], and of each expert's selections [E] */
    double *coact, *coact_n;
    /* standard layers of a run with clustering.compress_at and clustering.svd_space = output,
     * else NULL: EMA over steps of each expert's input second moment [E, D, D] (the token
     * rows it received) and hidden second moment [E, F, F] (its activations), and the number
     * of steps each expert received rows in [E] (compress_event.c) */
    double *in_cov, *hid_cov, *cov_n;
};

/* clustered layer (clustered.c): two-stage routing, base reuse, low-rank residuals */
Status clustered_state_init(MoeState *st, const MoeLayer *ml, const Backend *be, const Comm *comm, int n_max);
void clustered_state_free(MoeState *st, const Backend *be);
const EpPath *clustered_state_path(const MoeState *st);
void clustered_forward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p,
                       MoeState *st, float *out, const float *x, int N, long n_global);
void clustered_backward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeParams *g,
                        MoeState *st, float *dx, const float *dout, const float *x);

#endif
