/* router: the routing decisions of one MoE layer, shared by the standard MoE (one stage: softmax
 * over all experts, top-k) and the clustered layer (two stages: top groups by prototype score,
 * then top-k experts inside the chosen groups). A Route holds one forward's decisions on the
 * host; capacity and the balance losses use the GLOBAL batch (counts gathered over ranks), so
 * routing does not depend on how the batch is split. Also: the aux-loss-free selection bias
 * update and the router backward (gates -> logits).
 * Does not: compute logits (the layer's gemm), move rows (exchange/ep) or own the bias.
 * Memory: router_init allocates every array of the Route; router_free releases them.
 *
 * Legend: N E k G K TG = tokens on this rank, experts, experts per token, groups (0 = one
 * stage), experts per group, groups per token. */
#ifndef DCMOE_ROUTER_H
#define DCMOE_ROUTER_H

#include <stdint.h>
#include "backend.h"
#include "comm.h"
#include "config.h"
#include "util.h"

typedef struct RouteStats {      /* of the last forward, global over ranks */
    double aux_loss;             /* alpha * E * sum f_i P_i (+ the group term; 0 if dense) */
    double z_loss;               /* beta * mean lse^2 */
    double *counts;              /* [E] tokens kept per expert (after capacity) */
    double *counts_routed;       /* [E] token-expert pairs routed (before expert capacity; clustered: after group capacity) */
    double *counts_selected;     /* [E] token-expert pairs the router selected, before any capacity: the load
                                    every layer kind's balance metrics (CV², MaxVio) use */
    double dropped_frac;         /* dropped pairs / routed pairs */
    double *group_counts;        /* [G] token-group selections per group (clustered) */
    double group_aux_loss, group_dropped_frac;
    long capacity;               /* per-expert capacity used (-1 = dropless) */
    double nodes_mean;           /* distinct nodes of a token's selected experts, mean over the batch */
    double nodes_over;           /* tokens whose experts span more than moe.max_nodes nodes (0 = the limit held) */
} RouteStats;

typedef struct Route {
    int n_max, E, k, G, K, TG;   /* G = 0: one stage (standard MoE) */
    int N;                       /* tokens of the last forward */
    float *logits;               /* [N, E] router logits (filled by the layer) */
    float *probs;                /* [N, E] softmax (two stages: in-group softmax, 0 outside the chosen groups) */
    double *lse;                 /* [N] log-sum-exp of all logits (z-loss) */
    int32_t *expert;             /* [N, k] chosen experts */
    float *gate;                 /* [N, k] gates (renormalised if configured) */
    int32_t *pos;                /* [N, k] 0 kept / -1 dropped (router_capacity); the dispatch
                                    replaces a kept pair's 0 by its sent-entry index */
    /* group stage (G > 0) */
    float *q;                    /* [N, G] group softmax */
    int32_t *group;              /* [N, TG] chosen groups */
    int32_t *gtop2;              /* [N, G, 2] top-2 members per group (group_score top2) */
    int32_t *gkeep;              /* [N, TG] 1 if the (token, group) survived group capacity */
    /* loss-gradient coefficients of the last forward */
    double *fcoef_e;             /* [E] alpha*E*f_i/n_global */
    double *fcoef_g;             /* [G] */
    double z_coef;               /* 2*beta/n_global */
    /* scratch */
    int32_t *cnt, *cnt_all;      /* [slots, buckets] local counts, [P, slots, buckets] gathered */
    size_t cnt_all_cap;
    float *dgate;                /* [N, k] dloss/dgate per pair, filled by the layer for router_backward */
    float *dlogits;              /* [N, E] router backward output */
    double *fcoef;               /* [E + G] fcoef_e then fcoef_g (the backends' backward argument) */
    float *lsel;                 /* [N, G] group selection scores (two stages) */
    double nodes_sum, nodes_over;  /* router_nodes_touched (this rank) */
} Route;

/* Where the units live, for node-limited routing (moe.max_nodes) and the home-node bias
 * (moe.home_bias): the nodes of the expert-parallel group, the node of every expert's owner
 * and the node of this rank (the home of its tokens). NULL, or n_nodes <= 1 with no home
 * bias, leaves routing as without. */
typedef struct RouteNodes {
    int n_nodes;
    const int32_t *expert_node;  /* [E] */
    int home;                    /* node of this rank's tokens */
    int max_nodes;               /* 0 = no limit */
    float home_bias;             /* added to the selection score of units on the home node */
} RouteNodes;

/* G = 0 for the standard MoE (K and TG ignored) */
void router_init(Route *r, int n_max, int E, int k, int G, int TG);
void router_free(Route *r);
void router_stats_init(RouteStats *s, int E, int G);
void router_stats_free(RouteStats *s);

/* softmax and top-k for N tokens from r->logits (ties: lower id). bias [E] (aux_free, NULL =
 * none) shifts only the selection scores, never the gates. members [G, K] for two stages.
 * nodes (NULL = none): with max_nodes M > 0 each token first keeps the M nodes with the
 * highest sum of their best ceil(k / M) expert (standard) or ceil(TG / M) group (clustered)
 * selection scores and then selects only units on those nodes; home_bias is added to the
 * selection score of units on the home node (before the node choice). Gates, the group
 * softmax and the losses are computed as without (selection only). With nodes active the
 * standard MoE selects by logit (+ bias) instead of probability (the same order up to ties). */
void router_select(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                   const RouteNodes *nodes);
/* the placement units (groups; experts of the standard MoE) each token of the last
 * router_select would pick with neither the node limit nor the home bias: the top n_pref by
 * selection score (logit + aux-free bias; clustered: the stage-1 group score), ties to the
 * lower id. Placement's co-selection statistics use them when routing is node-aware, since
 * the node-aware selections only ever pair units on the nodes the placement already chose.
 * out [N, n_pref] */
void router_preferred(const Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                      int n_pref, int32_t *out);
/* distinct nodes of each token's selected pairs (before capacity), over this rank's tokens:
 * r->nodes_sum, and r->nodes_over = tokens on more than max_nodes nodes (0 under node-limited
 * routing); router_losses makes them global (RouteStats nodes_mean, nodes_over) */
void router_nodes_touched(Route *r, const RouteNodes *nodes);
/* capacity over the global batch (collective): group level (two stages), then expert level;
 * fills r->pos (0 kept, -1 dropped) and the counts of s. group_of [E] for two stages. */
void router_capacity(Route *r, const MoeConfig *mc, Comm *comm, const int32_t *group_of, long n_global,
                     RouteStats *s);
/* Switch balance losses (moe.balance = aux) and the z-loss with global statistics (one
 * allreduce of E + G + 1 doubles); sets s's losses and r's gradient coefficients */
void router_losses(Route *r, const MoeConfig *mc, Comm *comm, long n_global, RouteStats *s);
/* dlogits [N, E] (r->dlogits, overwritten) from dgate [N, k] (dloss/dgate per pair, 0 for
 * dropped pairs), the balance losses and the z-loss. members [G, K] for two stages. */
void router_backward(Route *r, const MoeConfig *mc, const int32_t *members, const float *dgate);

/* node-limited routing or a home bias is configured and can bind (router_select then selects
 * on the host: the backends' routing slots do not filter by node) */
int router_nodes_active(const RouteNodes *nd);
/* the Route's host arrays as the backends' routing arguments (cuda/route_common.h holds the
 * per-token arithmetic both use); sums stays NULL. router_bwd_args copies the loss
 * coefficients into r->fcoef. */
RouteSelArgs router_sel_args(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N);
RouteBwdArgs router_bwd_args(Route *r, const MoeConfig *mc, const int32_t *members, const float *dgate);
/* router_losses with this rank's sums over its tokens of the probs [E], q [G] and lse^2 (RouteSelArgs.sums,
 * computed by the backend's route_topk / route_two_stage) instead of the Route's host arrays:
 * r->expert, r->nodes_sum and r->nodes_over are still read on the host. sums NULL = router_losses. */
void router_losses_sums(Route *r, const MoeConfig *mc, Comm *comm, long n_global, RouteStats *s, const double *sums);
/* capacity through the backend's route_count / route_keep / route_pair_keep on backend arrays
 * (d: expert [N,k], group [N,TG], pos [N,k] out, gkeep [N,TG] scratch, group_of [E], cnt
 * [slots*buckets], base [slots*buckets] int64); the counts come to the host for the gather.
 * Same result and statistics as router_capacity; r->pos and r->gkeep are not filled. */
typedef struct RouteCapDev {
    const int32_t *expert, *group, *group_of;
    int32_t *pos, *gkeep, *cnt;
    int64_t *base;
} RouteCapDev;
void router_capacity_dev(Route *r, const MoeConfig *mc, Comm *comm, const Backend *be, const RouteCapDev *d,
                         long n_global, RouteStats *s);

/* aux-loss-free balancing (DeepSeek-V3): bias[E] += gamma * sign(mean(load) - load[e]) */
void router_bias_step(float *bias, const double *load, int E, double gamma);

#endif
