/* moe: the FFN layer shared by every model kind: a dense FFN (one expert, no router) or a
 * standard MoE (softmax top-k router, Switch aux loss or aux-loss-free bias balancing, router
 * z-loss, capacity with overflow through the residual, dropless option). Forward saves what backward needs in MoeState.
 * Routing decisions are made on the host from the router logits; capacity and the aux loss
 * use the GLOBAL batch (per-expert counts are gathered over the data-parallel ranks), so the
 * routing does not depend on how the batch is split over ranks.
 * The clustered layer (two-stage routing, shared bases, low-rank residuals) is the third
 * kind: its state and entry points are in clustered.h; moe_forward/backward dispatch to it.
 * Does not: own parameters (views into the model's allocations) or communicate gradients.
 *
 * Legend: N D F F1 E k M = tokens on this rank, d_model, expert width, F or 2F (SwiGLU),
 * experts, top-k, routed entries (<= N*k). */
#ifndef DCMOE_MOE_H
#define DCMOE_MOE_H

#include <stdint.h>
#include "backend.h"
#include "comm.h"
#include "config.h"
#include "ep.h"
#include "router.h"

/* defined in clustered.h: the clustered layer's state and its stored-format experts */
typedef struct MoeStored MoeStored;
typedef struct ClusterState ClusterState;

typedef struct MoeParams {
    const MoeStored *stored; /* clustered inference path: NULL = compute from the FP32 arrays */
    float *router;   /* [D, E], NULL for a dense FFN */
    float *w1;       /* [E, D, F1] (dense, standard) */
    float *w2;       /* [E, F, D] */
    /* clustered: W1_i = base1[g(i)] + a1_i b1_i^T, W2_i = base2[g(i)] + a2_i b2_i^T */
    float *base1;    /* [G, D, F1] */
    float *base2;    /* [G, F, D] */
    float *a1;       /* [E, D, r] */
    float *b1;       /* [E, F1, r] */
    float *a2;       /* [E, F, r] */
    float *b2;       /* [E, D, r] */
} MoeParams;

typedef RouteStats MoeStats;      /* of the last forward, global over ranks (router.h) */

typedef struct MoeState {
    int n_max;                   /* token capacity of the buffers */
    int N;                       /* tokens in the last forward */
    int M;                       /* routed entries kept */
    /* routing (host): the Route of the last forward; the fields below are views into it */
    Route route;
    float *logits;               /* [N, E] route.logits */
    float *probs;                /* [N, E] route.probs */
    int32_t *topk_expert;        /* [N, k] route.expert */
    float *topk_gate;            /* [N, k] route.gate (renormalised if configured) */
    int32_t *pos;                /* [N, k] route.pos: sent-entry index of the pair, -1 = dropped */
    int32_t *entry_token;        /* [M] token of each gathered row (sorted by expert) */
    float *entry_gate;           /* [M] */
    int32_t *expert_off;         /* [E + 1] */
    /* activations */
    float *xg;                   /* [M, D] gathered inputs (NULL for dense: x is used) */
    float *h;                    /* [M, F1] */
    float *a;                    /* [M, F] */
    float *yg;                   /* [M, D] */
    /* backward scratch */
    float *dyg, *da, *dh, *dxg;  /* [M,D] [M,F] [M,F1] [M,D] */
    void *priv;                  /* routing scratch private to moe.c */
    void *cpriv;                 /* clustered-layer scratch private to clustered.c */
    float *dlogits;              /* [N, E] route.dlogits */
    size_t act_bytes;            /* backend bytes of the layer's activation and scratch buffers */
    size_t comm_bytes;           /* of which the dispatch/combine send and receive buffers */
    MoeStats stats;
} MoeState;

typedef struct MoeLayer {
    int kind;                    /* enum MoeKind */
    int D, F, F1, E, k, act;
    int G, K, r, top_groups;     /* clustered */
    MoeConfig cfg;
    ClusterState *cs;            /* clustered: the model's state for this layer; standard: only
                                    cs->bias is used (moe.balance = aux_free) */
    EpMap *ep;                   /* MoE layers: where the experts live (the model's map) */
    Comm *ep_comm;               /* the expert-parallel group the exchange runs over (the model's;
                                    routing statistics use the world communicator passed in) */
    int two_level;               /* parallel.exchange = two_level */
    int index;                   /* transformer block of this layer */
    /* training-time offloading: called after the dispatch with the local units (groups or
     * experts) that received rows, before any expert runs; NULL = everything resident */
    Status (*need)(void *ctx, int layer, const int32_t *units, int n);
    void *need_ctx;
} MoeLayer;

/* the communicator of a layer's exchange: its EP group, or comm when none was set (layers
 * built outside a model) */
static inline Comm *moe_xcomm(const MoeLayer *ml, Comm *comm) { return ml->ep_comm ? ml->ep_comm : comm; }
static inline const Comm *moe_xcomm_c(const MoeLayer *ml, const Comm *comm) { return ml->ep_comm ? ml->ep_comm : comm; }

void moe_layer_setup(MoeLayer *ml, const MoeConfig *mc, int kind, int D, int F, int act);
/* parameter counts */
size_t moe_n_router(const MoeLayer *ml);
size_t moe_n_expert_params(const MoeLayer *ml);   /* all experts */
Status moe_state_init(MoeState *st, const MoeLayer *ml, const Backend *be, const Comm *comm, int n_max);
void moe_state_free(MoeState *st, const Backend *be);

/* out[N,D] = FFN(x[N,D]) (overwrite). n_global = tokens in the global batch. */
void moe_forward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p,
                 MoeState *st, float *out, const float *x, int N, long n_global);
/* dx[N,D] += , grads += (the aux and z-loss gradients use the forward's global statistics) */
void moe_backward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeParams *g,
                  MoeState *st, float *dx, const float *dout, const float *x);

/* moe.balance = aux_free (DeepSeek-V3): after each optimizer step, for every layer kind (a
 * no-op for dense layers and for moe.balance = aux), bias_e += gamma * sign(mean load - load_e)
 * with load = the last forward's GLOBAL routed counts (stats.counts_routed), so every rank
 * moves the bias alike. The bias (ml->cs->bias [E], owned by the model) only shifts the top-k
 * selection scores (logit + bias); gates come from the unbiased softmax, and the Switch aux
 * losses are off. */
void moe_update_bias(const MoeLayer *ml, const MoeState *st);

/* The routing pipeline both routed layers (standard, clustered) run, in order:
 *   moe_route          logits (backend gemm) -> Route: selection, capacity, losses
 *   moe_dispatch       plan the exchange of the kept pairs, rows out (route.pos becomes
 *                      each kept pair's sent-entry index)
 *   moe_need           offloading hook: the local units that received rows
 *   ... the layer's expert computation and epp_return_combine ...
 *   moe_route_backward dgates back -> router backward -> dWr, dx
 * Layer-private state (buffers, accounting) stays in moe.c / clustered.c. */
/* The routing runs on the backend (RouteSelArgs / RouteBwdArgs slots) on these backend
 * arrays; the host Route gets what the exchange and the statistics need (expert, gate, pos
 * [N,k], the loss sums), plus logits when a host consumer reads them (node-aware routing and
 * placement, the clustering centroids) and, on the CPU backend (where the copies are memcpy),
 * every array, so host readers of the Route see what they saw before. Node-limited routing or
 * a home bias select on the host (router_select) and upload the decisions. */
typedef struct MoeRouterDev {
    float *logits, *dlogits;     /* [n_max, E] */
    float *probs, *gate, *q, *lsel, *dgate;   /* [n, E] [n, k] [n, G] [n, G] [n, k] */
    double *lse, *sums, *fcoef;  /* [n] [E + G + 1] [E + G] */
    int32_t *expert, *pos, *group, *gtop2, *gkeep;   /* [n, k] [n, k] [n, TG] [n, G, 2] [n, TG] */
    int32_t *cnt;                /* [slots * buckets] */
    int64_t *base;               /* [slots * buckets] */
    float *bias;                 /* [E] */
    int32_t *members, *group_of; /* [G, K], [E] */
    double *sums_h;              /* host: [E + G + 1] */
} MoeRouterDev;
/* allocate (counted into *acc) / free the router's backend arrays for n_max tokens */
void moe_router_dev_init(MoeRouterDev *dv, const Backend *be, size_t *acc, int n_max, int E, int k, int G, int TG);
void moe_router_dev_free(MoeRouterDev *dv, const Backend *be);
void moe_route(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeState *st,
               const MoeRouterDev *dv, const float *x, int N, long n_global);
void moe_dispatch(const MoeLayer *ml, EpPath *xp, const Backend *be, Comm *comm, MoeState *st, const float *x);
void moe_need(const MoeLayer *ml, const int32_t *off, int n_units);
/* after epp_return_scalars: dgates of the kept pairs from xp->a.sval; dWr += , dx += */
void moe_route_backward(const MoeLayer *ml, const EpPath *xp, const Backend *be, const MoeParams *p, MoeParams *g,
                        MoeState *st, const MoeRouterDev *dv, float *dx, const float *x);
/* the layer's comm buffers: grow yr [*yr_rows, D] (one returned row per received row) to the
 * final exchange's receive capacity, and set st->comm_bytes = the exchange's row buffers +
 * yr, st->act_bytes = act_other + comm_bytes. Called after every dispatch (the exchange
 * grows its receive side from the counts; a steady state reallocates nothing), so the
 * accounting is the high-water mark actually allocated. */
void moe_comm_reserve(MoeState *st, const EpPath *xp, const Backend *be, int D, float **yr, size_t *yr_rows,
                      size_t act_other);
/* backend allocation that adds its bytes to *acc (the layer's activation accounting) */
static inline void *moe_alloc_counted(const Backend *be, size_t *acc, size_t bytes) {
    *acc += bytes;
    return be->ops->alloc(be->ctx, bytes);
}

/* the layer's dispatch/combine path (NULL for a dense FFN): its last plan's locality counters */
const EpPath *moe_state_path(const MoeLayer *ml, const MoeState *st);

/* the generic MoeState fields (logits, probs, dlogits, topk_expert, topk_gate, pos) as views
 * into st->route, for both layer kinds */
void moe_state_view_route(MoeState *st);

#endif
