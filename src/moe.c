/* moe.c: dense FFN and standard top-k MoE layer, forward and backward.
 * Legend: N D F F1 E k M = tokens on this rank, d_model, expert width, F or 2F (SwiGLU),
 * experts, top-k, routed entries kept (<= N*k). */
#include "moe.h"
#include "clustered.h"
#include "route_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void moe_layer_setup(MoeLayer *ml, const MoeConfig *mc, int kind, int D, int F, int act) {
    memset(ml, 0, sizeof *ml);
    ml->cfg = *mc;
    ml->kind = kind;
    ml->D = D;
    ml->F = F;
    ml->act = act;
    ml->F1 = act == ACT_KIND_SWIGLU ? 2 * F : F;
    ml->E = kind == MOE_KIND_DENSE ? 1 : mc->n_experts;
    ml->k = kind == MOE_KIND_DENSE ? 1 : mc->top_k;
    if (kind == MOE_KIND_CLUSTERED) {
        ml->G = mc->n_groups;
        ml->K = mc->n_experts / mc->n_groups;
        ml->r = mc->rank;
        ml->top_groups = mc->top_groups;
    }
}

size_t moe_n_router(const MoeLayer *ml) {
    return ml->kind == MOE_KIND_DENSE ? 0 : (size_t)ml->D * ml->E;
}

size_t moe_n_expert_params(const MoeLayer *ml) {
    size_t full = (size_t)ml->D * ml->F1 + (size_t)ml->F * ml->D;
    if (ml->kind == MOE_KIND_CLUSTERED)
        return (size_t)ml->G * full + (size_t)ml->E * ml->r * ((size_t)ml->D + ml->F1 + ml->F + ml->D);
    return (size_t)ml->E * full;
}

static void dev_free(const Backend *be, void *p) { if (p) be->ops->free(be->ctx, p); }

/* device buffers hold the routing arrays (MoeRouterDev: the routing runs on the backend) and
 * the entry arrays the gather/combine ops read; the host keeps what the exchange plans with.
 * On the CPU backend the copies are memcpy of a few KB. */
typedef struct MoeDev {
    MoeRouterDev router;         /* the routing arrays */
    int32_t *entry_token;        /* [M] */
    float *entry_gate;           /* [M] */
    float *dgate;                /* [M] */
} MoeDev;

/* scratch kept with the state (host) */
typedef struct MoeHost {
    float *dgate_h;              /* [M] */
    int32_t *entry_src;          /* [Mr] receive-order index of each expert-sorted entry */
    float *yr;                   /* [yr_rows, D] device: one output (or dx) row per received row */
    size_t yr_rows;              /* = the final exchange's rows_cap (moe_comm_reserve) */
    size_t act_other;            /* accounted bytes outside the comm buffers (act_fixed + act_expert) */
    size_t act_fixed;            /* routing buffers (fixed by the token capacity) */
    size_t act_expert;           /* the expert side now (expert_reserve) */
    size_t m_cap;                /* entries the expert side holds */
    EpPath x;                    /* the dispatch/combine exchange (flat or two-level) */
    MoeDev dev;
} MoeHost;

/* the expert side: arrays of M received entries (routing mirrors, gathered rows and the FFN
 * activations). Grown (never shrunk) to what a step's counts exchange announces, so the
 * memory follows the load and not the rank count; contents are not kept across a growth
 * (every forward refills them, and backward runs on the forward's M). */
static void expert_reserve(const MoeLayer *ml, MoeState *st, MoeHost *hs, const Backend *be, size_t M) {
    if (M <= hs->m_cap && st->h) return;
    M = M > hs->m_cap ? M : hs->m_cap;
    if (!M) M = 1;
    int D = ml->D, F = ml->F, F1 = ml->F1;
    size_t acc = 0;
#define HGROW(p, T) do { xfree(p); p = xcalloc(sizeof(T) * M); } while (0)
#define DGROW(p, bytes) do { dev_free(be, p); p = moe_alloc_counted(be, &acc, bytes); } while (0)
    if (ml->kind != MOE_KIND_DENSE) {
        HGROW(st->entry_token, int32_t);
        HGROW(st->entry_gate, float);
        HGROW(hs->dgate_h, float);
        HGROW(hs->entry_src, int32_t);
        DGROW(hs->dev.entry_token, sizeof(int32_t) * M);
        DGROW(hs->dev.entry_gate, sizeof(float) * M);
        DGROW(hs->dev.dgate, sizeof(float) * M);
        DGROW(st->xg, sizeof(float) * M * D);
        DGROW(st->yg, sizeof(float) * M * D);
        DGROW(st->dyg, sizeof(float) * M * D);
        DGROW(st->dxg, sizeof(float) * M * D);
    }
    DGROW(st->h, sizeof(float) * M * F1);
    DGROW(st->a, sizeof(float) * M * F);
    DGROW(st->da, sizeof(float) * M * F);
    DGROW(st->dh, sizeof(float) * M * F1);
#undef HGROW
#undef DGROW
    hs->m_cap = M;
    hs->act_expert = acc;
}

Status moe_state_init(MoeState *st, const MoeLayer *ml, const Backend *be, const Comm *comm, int n_max) {
    memset(st, 0, sizeof *st);
    if (ml->kind == MOE_KIND_CLUSTERED) return clustered_state_init(st, ml, be, comm, n_max);
    st->n_max = n_max;
    int E = ml->E, k = ml->k, D = ml->D;
    /* source-side routing arrays hold this rank's n_max * k pairs; the expert side starts at
     * what a balanced step brings (n_max * k entries) and grows from the counts exchange */
    size_t Ms = (size_t)n_max * k;
    MoeHost *hs = xcalloc(sizeof(MoeHost));
    size_t acc = 0;              /* backend bytes allocated here, besides the expert side */
    router_stats_init(&st->stats, E, 0);
    if (ml->kind != MOE_KIND_DENSE) {
        router_init(&st->route, n_max, E, k, 0, 0);
        moe_state_view_route(st);
        st->expert_off = xcalloc(sizeof(int32_t) * (E + 1));
        moe_router_dev_init(&hs->dev.router, be, &acc, n_max, E, k, 0, 0);
        epp_init(&hs->x, be, ml->ep, moe_xcomm_c(ml, comm)->topo, ml->two_level, D, n_max, k);
    }
    expert_reserve(ml, st, hs, be, Ms);
    st->priv = hs;
    hs->act_fixed = acc;
    if (ml->kind != MOE_KIND_DENSE) {
        hs->act_other = acc + hs->act_expert;
        moe_comm_reserve(st, &hs->x, be, D, &hs->yr, &hs->yr_rows, hs->act_other);
    } else st->act_bytes = acc + hs->act_expert;
    return status_ok();
}

void moe_comm_reserve(MoeState *st, const EpPath *xp, const Backend *be, int D, float **yr, size_t *yr_rows,
                      size_t act_other) {
    size_t rows = epp_final(xp)->rows_cap;
    if (!*yr || rows > *yr_rows) {
        if (*yr) be->ops->free(be->ctx, *yr);
        *yr_rows = rows;
        *yr = be->ops->alloc(be->ctx, sizeof(float) * (rows ? rows : 1) * D);
    }
    st->comm_bytes = epp_buffer_bytes(xp) + sizeof(float) * *yr_rows * D;
    st->act_bytes = act_other + st->comm_bytes;
}

static MoeHost *host_of(const MoeState *st) { return (MoeHost *)st->priv; }

void moe_state_free(MoeState *st, const Backend *be) {
    if (st && st->cpriv) { clustered_state_free(st, be); return; }
    if (!st || !st->priv) { if (st) memset(st, 0, sizeof *st); return; }
    MoeHost *hs = host_of(st);
    router_free(&st->route);
    router_stats_free(&st->stats);
    xfree(st->entry_token); xfree(st->entry_gate); xfree(st->expert_off);
    xfree(hs->dgate_h); xfree(hs->entry_src);
    epp_free(&hs->x, be);
    dev_free(be, hs->yr);
    moe_router_dev_free(&hs->dev.router, be);
    dev_free(be, hs->dev.entry_token);
    dev_free(be, hs->dev.entry_gate); dev_free(be, hs->dev.dgate);
    dev_free(be, st->xg); dev_free(be, st->yg); dev_free(be, st->dyg); dev_free(be, st->dxg);
    dev_free(be, st->h); dev_free(be, st->a); dev_free(be, st->da); dev_free(be, st->dh);
    xfree(hs);
    memset(st, 0, sizeof *st);
}

/* run every expert's FFN on its slice of the gathered rows: yg = act(xg W1_e) W2_e */
static int n_local_experts(const MoeLayer *ml) {
    return ml->kind == MOE_KIND_DENSE ? 1 : ml->ep->n_slots * ml->ep->K;   /* primaries, then replica slots */
}

static void experts_forward(const MoeLayer *ml, const Backend *be, const MoeParams *p,
                            const int32_t *off, const float *xg, float *h, float *a, float *yg) {
    int D = ml->D, F = ml->F, F1 = ml->F1;
    for (int e = 0; e < n_local_experts(ml); e++) {
        int r0 = off[e], n = off[e + 1] - off[e];
        if (n == 0) continue;
        const float *w1 = p->w1 + (size_t)e * D * F1;   /* [D, F1] */
        const float *w2 = p->w2 + (size_t)e * F * D;    /* [F, D] */
        float *he = h + (size_t)r0 * F1, *ae = a + (size_t)r0 * F;
        be->ops->gemm(be->ctx, false, false, n, F1, D, 1.0f, xg + (size_t)r0 * D, D, w1, F1, 0.0f, he, F1);
        be->ops->act_forward(be->ctx, ml->act, ae, he, n, F);
        be->ops->gemm(be->ctx, false, false, n, D, F, 1.0f, ae, F, w2, D, 0.0f, yg + (size_t)r0 * D, D);
    }
}

/* mirror of experts_forward; dxg overwritten (beta_dx = 0) or accumulated (1) */
static void experts_backward(const MoeLayer *ml, const Backend *be, const MoeParams *p,
                             MoeParams *g, MoeState *st, const int32_t *off, const float *xg,
                             const float *dyg, float *dxg, float beta_dx) {
    int D = ml->D, F = ml->F, F1 = ml->F1;
    for (int e = 0; e < n_local_experts(ml); e++) {
        int r0 = off[e], n = off[e + 1] - off[e];
        if (n == 0) continue;
        const float *w1 = p->w1 + (size_t)e * D * F1, *w2 = p->w2 + (size_t)e * F * D;
        float *gw1 = g->w1 + (size_t)e * D * F1, *gw2 = g->w2 + (size_t)e * F * D;
        const float *xe = xg + (size_t)r0 * D, *dye = dyg + (size_t)r0 * D;
        float *he = st->h + (size_t)r0 * F1, *ae = st->a + (size_t)r0 * F;
        float *dae = st->da + (size_t)r0 * F, *dhe = st->dh + (size_t)r0 * F1;
        /* dW2 [F,D] += a^T dy */
        be->ops->gemm(be->ctx, true, false, F, D, n, 1.0f, ae, F, dye, D, 1.0f, gw2, D);
        /* da [n,F] = dy W2^T */
        be->ops->gemm(be->ctx, false, true, n, F, D, 1.0f, dye, D, w2, D, 0.0f, dae, F);
        be->ops->act_backward(be->ctx, ml->act, dhe, dae, he, n, F);
        /* dW1 [D,F1] += x^T dh */
        be->ops->gemm(be->ctx, true, false, D, F1, n, 1.0f, xe, D, dhe, F1, 1.0f, gw1, F1);
        /* dx [n,D] (+)= dh W1^T */
        be->ops->gemm(be->ctx, false, true, n, D, F1, 1.0f, dhe, F1, w1, F1, beta_dx, dxg + (size_t)r0 * D, D);
    }
}

void moe_update_bias(const MoeLayer *ml, const MoeState *st) {
    if (ml->kind == MOE_KIND_DENSE || ml->cfg.balance != BALANCE_AUX_FREE) return;
    ASSERTF(ml->cs && ml->cs->bias, "moe.balance=aux_free: layer %d has no selection bias", ml->index);
    router_bias_step(ml->cs->bias, st->stats.counts_routed, ml->E, ml->cfg.bias_gamma);
}

/* ---- the routing pipeline shared by the standard and clustered layers ---- */

void moe_router_dev_init(MoeRouterDev *dv, const Backend *be, size_t *acc, int n_max, int E, int k, int G, int TG) {
    memset(dv, 0, sizeof *dv);
    size_t N = (size_t)(n_max > 0 ? n_max : 1), Gs = (size_t)(G > 0 ? G : 1), TGs = (size_t)(TG > 0 ? TG : 1);
    int slots = k > TG ? k : TG, buckets = E > G ? E : G;
    dv->logits = moe_alloc_counted(be, acc, sizeof(float) * N * E);
    dv->dlogits = moe_alloc_counted(be, acc, sizeof(float) * N * E);
    dv->probs = moe_alloc_counted(be, acc, sizeof(float) * N * E);
    dv->gate = moe_alloc_counted(be, acc, sizeof(float) * N * k);
    dv->dgate = moe_alloc_counted(be, acc, sizeof(float) * N * k);
    dv->lse = moe_alloc_counted(be, acc, sizeof(double) * N);
    dv->sums = moe_alloc_counted(be, acc, sizeof(double) * (size_t)(E + G + 1));
    dv->fcoef = moe_alloc_counted(be, acc, sizeof(double) * (size_t)(E + G));
    dv->expert = moe_alloc_counted(be, acc, sizeof(int32_t) * N * k);
    dv->pos = moe_alloc_counted(be, acc, sizeof(int32_t) * N * k);
    dv->cnt = moe_alloc_counted(be, acc, sizeof(int32_t) * (size_t)slots * buckets);
    dv->base = moe_alloc_counted(be, acc, sizeof(int64_t) * (size_t)slots * buckets);
    dv->bias = moe_alloc_counted(be, acc, sizeof(float) * E);
    if (G > 0) {
        dv->q = moe_alloc_counted(be, acc, sizeof(float) * N * Gs);
        dv->lsel = moe_alloc_counted(be, acc, sizeof(float) * N * Gs);
        dv->group = moe_alloc_counted(be, acc, sizeof(int32_t) * N * TGs);
        dv->gkeep = moe_alloc_counted(be, acc, sizeof(int32_t) * N * TGs);
        dv->gtop2 = moe_alloc_counted(be, acc, sizeof(int32_t) * N * Gs * 2);
        dv->members = moe_alloc_counted(be, acc, sizeof(int32_t) * (size_t)E);
        dv->group_of = moe_alloc_counted(be, acc, sizeof(int32_t) * (size_t)E);
    }
    dv->sums_h = xcalloc(sizeof(double) * (size_t)(E + G + 1));
}

void moe_router_dev_free(MoeRouterDev *dv, const Backend *be) {
    void *d[] = {dv->logits, dv->dlogits, dv->probs, dv->gate, dv->dgate, dv->lse, dv->sums, dv->fcoef, dv->expert,
                 dv->pos, dv->cnt, dv->base, dv->bias, dv->q, dv->lsel, dv->group, dv->gkeep, dv->gtop2,
                 dv->members, dv->group_of};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) dev_free(be, d[i]);
    xfree(dv->sums_h);
    memset(dv, 0, sizeof *dv);
}

/* the Route's arrays on the backend as routing arguments */
static RouteSelArgs dev_sel_args(const Route *rt, const MoeConfig *mc, const MoeRouterDev *dv, int has_bias, int N) {
    RouteSelArgs a = {.N = N, .E = rt->E, .k = rt->k, .G = rt->G, .K = rt->K, .TG = rt->TG,
                      .renorm = mc->renormalize && rt->k > 1,
                      .score_top2 = mc->group_score == GROUP_SCORE_TOP2 && rt->K >= 2,
                      .gate_product = mc->group_gate == GROUP_GATE_PRODUCT,
                      .logits = dv->logits, .bias = has_bias ? dv->bias : NULL, .members = dv->members,
                      .probs = dv->probs, .lse = dv->lse, .expert = dv->expert, .gate = dv->gate, .q = dv->q,
                      .group = dv->group, .gtop2 = dv->gtop2, .lsel = dv->lsel, .sums = dv->sums};
    return a;
}

void moe_route(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeState *st,
               const MoeRouterDev *dv, const float *x, int N, long n_global) {
    int D = ml->D, E = ml->E, k = ml->k;
    Route *rt = &st->route;
    const BackendOps *op = be->ops;
    void *cx = be->ctx;
    /* router logits [N,E] = x [N,D] Wr [D,E] */
    op->gemm(cx, false, false, N, E, D, 1.0f, x, D, p->router, E, 0.0f, dv->logits, E);
    const float *bias = NULL;
    if (ml->cfg.balance == BALANCE_AUX_FREE) {
        ASSERTF(ml->cs && ml->cs->bias, "moe.balance=aux_free: layer %d has no selection bias", ml->index);
        bias = ml->cs->bias;
    }
    int two = ml->kind == MOE_KIND_CLUSTERED;
    int G = two ? rt->G : 0, TG = two ? rt->TG : 0;
    /* node-limited routing / home-node bias: where the units are now (follows migrations) */
    const EpMap *em = ml->ep;
    RouteNodes nd = {.n_nodes = em->n_nodes, .expert_node = em->expert_node, .home = em->home_node,
                     .max_nodes = ml->cfg.max_nodes, .home_bias = (float)ml->cfg.home_bias};
    /* node-aware routing only pairs units on the nodes placement chose: placement's
     * co-selection pairs come from the units each token would pick without it (not when the
     * limit cannot bind: a token selecting at most max_nodes units, and no home bias) */
    ml->ep->pref_pairs = em->n_nodes > 1 && (nd.home_bias != 0.0f || (nd.max_nodes > 0 && nd.max_nodes < nd.n_nodes &&
                                                                       (two ? rt->TG : ml->k) > nd.max_nodes));
    int collect_pref = ml->ep->pref_pairs && ml->ep->collect;
    int host_select = router_nodes_active(&nd);
    int cpu = be->kind == BACKEND_CPU;
    int host_logits = cpu || host_select || collect_pref ||
                      (ml->cs && (ml->cs->coact || (two && ml->cs->mu_sum && !ml->cs->mu_hidden)));
    if (host_logits) op->to_host(cx, rt->logits, dv->logits, sizeof(float) * N * E);
    size_t Nk = (size_t)N * k;
    if (two) {
        op->from_host(cx, dv->members, ml->cs->members, sizeof(int32_t) * (size_t)E);
        op->from_host(cx, dv->group_of, ml->cs->group_of, sizeof(int32_t) * (size_t)E);
    }
    const double *sums = NULL;
    if (host_select) {
        /* node-limited selection on the host; the decisions go to the backend for the capacity
         * and the backward */
        router_select(rt, &ml->cfg, bias, two ? ml->cs->members : NULL, N, &nd);
        op->from_host(cx, dv->probs, rt->probs, sizeof(float) * N * E);
        op->from_host(cx, dv->lse, rt->lse, sizeof(double) * N);
        op->from_host(cx, dv->expert, rt->expert, sizeof(int32_t) * Nk);
        op->from_host(cx, dv->gate, rt->gate, sizeof(float) * Nk);
        if (two) {
            op->from_host(cx, dv->q, rt->q, sizeof(float) * N * G);
            op->from_host(cx, dv->group, rt->group, sizeof(int32_t) * N * TG);
            op->from_host(cx, dv->gtop2, rt->gtop2, sizeof(int32_t) * N * G * 2);
        }
    } else {
        ASSERTF(N <= rt->n_max, "moe_route: %d tokens > capacity %d", N, rt->n_max);
        rt->N = N;
        if (bias) op->from_host(cx, dv->bias, bias, sizeof(float) * E);
        RouteSelArgs a = dev_sel_args(rt, &ml->cfg, dv, bias != NULL, N);
        if (two) op->route_two_stage(cx, &a);
        else op->route_topk(cx, &a);
        /* what the exchange and the statistics need */
        op->to_host(cx, rt->expert, dv->expert, sizeof(int32_t) * Nk);
        op->to_host(cx, rt->gate, dv->gate, sizeof(float) * Nk);
        op->to_host(cx, dv->sums_h, dv->sums, sizeof(double) * (size_t)(E + G + 1));
        sums = dv->sums_h;
        if (cpu) {   /* the full host mirror (memcpy on the CPU backend) */
            op->to_host(cx, rt->probs, dv->probs, sizeof(float) * N * E);
            op->to_host(cx, rt->lse, dv->lse, sizeof(double) * N);
            if (two) {
                op->to_host(cx, rt->q, dv->q, sizeof(float) * N * G);
                op->to_host(cx, rt->group, dv->group, sizeof(int32_t) * N * TG);
                op->to_host(cx, rt->gtop2, dv->gtop2, sizeof(int32_t) * N * G * 2);
                op->to_host(cx, rt->lsel, dv->lsel, sizeof(float) * N * G);
            }
        }
    }
    if (collect_pref) {
        int n_pref = two ? rt->TG : ml->k;
        if (n_pref < 2) n_pref = 2;
        if (n_pref > (two ? rt->G : E)) n_pref = two ? rt->G : E;
        int32_t *pu = xmalloc(sizeof(int32_t) * (size_t)(N ? N : 1) * n_pref);
        router_preferred(rt, &ml->cfg, bias, two ? ml->cs->members : NULL, N, n_pref, pu);
        ep_stats_add_pairs(ml->ep, N, n_pref, pu);
        xfree(pu);
    }
    router_nodes_touched(rt, &nd);
    RouteCapDev cd = {.expert = dv->expert, .group = dv->group, .group_of = dv->group_of, .pos = dv->pos,
                      .gkeep = dv->gkeep, .cnt = dv->cnt, .base = dv->base};
    router_capacity_dev(rt, &ml->cfg, comm, be, &cd, n_global, &st->stats);
    op->to_host(cx, rt->pos, dv->pos, sizeof(int32_t) * Nk);
    router_losses_sums(rt, &ml->cfg, comm, n_global, &st->stats, sums);
}

/* each token once per destination rank of its kept experts (so once per chosen group when
 * groups sit on different ranks); pos becomes the pair's sent-entry index (where its dgate
 * comes back) */
void moe_dispatch(const MoeLayer *ml, EpPath *xp, const Backend *be, Comm *comm, MoeState *st, const float *x) {
    Route *rt = &st->route;
    int N = rt->N, k = ml->k;
    epp_plan(xp, ml->ep, be, moe_xcomm(ml, comm), N, k, rt->expert, rt->pos, rt->gate);
    for (size_t ts = 0; ts < (size_t)N * k; ts++) rt->pos[ts] = xp->a.ts_entry[ts];
    epp_send_rows(xp, be, moe_xcomm(ml, comm), x);
}

void moe_need(const MoeLayer *ml, const int32_t *off, int n_units) {
    if (!ml->need) return;
    int32_t *units = xmalloc(sizeof(int32_t) * (n_units ? n_units : 1));
    int nu = 0;
    for (int u = 0; u < n_units; u++) if (off[u + 1] > off[u]) units[nu++] = u;
    Status rs = ml->need(ml->need_ctx, ml->index, units, nu);
    ASSERTF(STATUS_OK(rs), "%s", rs.msg);
    xfree(units);
}

void moe_route_backward(const MoeLayer *ml, const EpPath *xp, const Backend *be, const MoeParams *p, MoeParams *g,
                        MoeState *st, const MoeRouterDev *dv, float *dx, const float *x) {
    Route *rt = &st->route;
    int N = rt->N, D = ml->D, E = ml->E, k = ml->k, G = rt->G;
    const BackendOps *op = be->ops;
    void *cx = be->ctx;
    ASSERTF(rt->k <= RC_MAX_K && rt->TG <= RC_MAX_K, "router backward: top-k %d or top groups %d > %d",
            rt->k, rt->TG, RC_MAX_K);
    for (size_t ts = 0; ts < (size_t)N * k; ts++)
        rt->dgate[ts] = rt->pos[ts] >= 0 ? xp->a.sval[rt->pos[ts]] : 0.0f;
    /* the host arguments (coefficients into rt->fcoef), pointed at the backend arrays */
    RouteBwdArgs a = router_bwd_args(rt, &ml->cfg, ml->kind == MOE_KIND_CLUSTERED ? dv->members : NULL, dv->dgate);
    op->from_host(cx, dv->dgate, rt->dgate, sizeof(float) * (size_t)N * k);
    op->from_host(cx, dv->fcoef, rt->fcoef, sizeof(double) * (size_t)(E + G));
    a.logits = dv->logits; a.probs = dv->probs; a.gate = dv->gate; a.q = dv->q; a.lse = dv->lse;
    a.expert = dv->expert; a.group = dv->group; a.gtop2 = dv->gtop2; a.fcoef = dv->fcoef; a.dlogits = dv->dlogits;
    op->route_backward(cx, &a);
    if (be->kind == BACKEND_CPU) op->to_host(cx, rt->dlogits, dv->dlogits, sizeof(float) * (size_t)N * E);
    /* dWr [D,E] += x^T dlogits;  dx [N,D] += dlogits Wr^T */
    op->gemm(cx, true, false, D, E, N, 1.0f, x, D, dv->dlogits, E, 1.0f, g->router, E);
    op->gemm(cx, false, true, N, D, E, 1.0f, dv->dlogits, E, p->router, E, 1.0f, dx, D);
}

/* expert side of the exchange: received entries sorted by local expert slot (stable, so in
 * (source rank, row) order inside an expert); entry_token = received row */
static void recv_entries(const MoeLayer *ml, MoeState *st, MoeHost *hs) {
    const EpX *X = epp_final(&hs->x);
    int El = n_local_experts(ml), n = X->n_recv;
    memset(st->expert_off, 0, sizeof(int32_t) * (El + 1));
    for (int i = 0; i < n; i++) st->expert_off[X->recv[i].slot + 1]++;
    for (int e = 0; e < El; e++) st->expert_off[e + 1] += st->expert_off[e];
    int32_t *fill = xcalloc(sizeof(int32_t) * (El + 1));
    for (int i = 0; i < n; i++) {
        int e = X->recv[i].slot, j = st->expert_off[e] + fill[e]++;
        st->entry_token[j] = X->recv[i].row;
        st->entry_gate[j] = X->recv[i].gate;
        hs->entry_src[j] = i;
    }
    xfree(fill);
    st->M = n;
}

void moe_forward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p,
                 MoeState *st, float *out, const float *x, int N, long n_global) {
    ASSERTF(N <= st->n_max, "moe_forward: %d tokens > buffer capacity %d", N, st->n_max);
    int D = ml->D;
    st->N = N;
    if (ml->kind == MOE_KIND_CLUSTERED) {
        clustered_forward(ml, be, comm, p, st, out, x, N, n_global);
        return;
    }
    if (ml->kind == MOE_KIND_DENSE) {
        int32_t off[2] = {0, N};
        st->M = N;
        experts_forward(ml, be, p, off, x, st->h, st->a, out);
        st->stats.counts[0] = (double)N;
        st->stats.counts_routed[0] = (double)N;
        return;
    }
    MoeHost *hs = host_of(st);
    moe_route(ml, be, comm, p, st, &hs->dev.router, x, N, n_global);
    EpPath *XP = &hs->x;
    moe_dispatch(ml, XP, be, comm, st, x);
    const EpX *X = epp_final(XP);
    expert_reserve(ml, st, hs, be, (size_t)X->n_recv);
    hs->act_other = hs->act_fixed + hs->act_expert;
    moe_comm_reserve(st, XP, be, D, &hs->yr, &hs->yr_rows, hs->act_other);
    recv_entries(ml, st, hs);
    int M = st->M;
    moe_need(ml, st->expert_off, n_local_experts(ml));
    be->ops->from_host(be->ctx, hs->dev.entry_token, st->entry_token, sizeof(int32_t) * (M ? M : 1));
    be->ops->from_host(be->ctx, hs->dev.entry_gate, st->entry_gate, sizeof(float) * (M ? M : 1));
    be->ops->gather_rows(be->ctx, st->xg, X->rbuf, hs->dev.entry_token, M, D);
    experts_forward(ml, be, p, st->expert_off, st->xg, st->h, st->a, st->yg);
    /* one gated sum per received row, sent back and added to its token */
    be->ops->zero(be->ctx, hs->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    be->ops->scatter_add_rows(be->ctx, hs->yr, st->yg, hs->dev.entry_token, hs->dev.entry_gate, M, D);
    be->ops->zero(be->ctx, out, sizeof(float) * N * D);
    epp_return_combine(XP, be, moe_xcomm(ml, comm), hs->yr, out);
}

void moe_backward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeParams *g,
                  MoeState *st, float *dx, const float *dout, const float *x) {
    int N = st->N, D = ml->D, M = st->M;
    if (ml->kind == MOE_KIND_CLUSTERED) {
        clustered_backward(ml, be, comm, p, g, st, dx, dout, x);
        return;
    }
    if (ml->kind == MOE_KIND_DENSE) {
        int32_t off[2] = {0, N};
        experts_backward(ml, be, p, g, st, off, x, dout, dx, 1.0f);
        return;
    }
    MoeHost *hs = host_of(st);
    EpPath *XP = &hs->x;
    /* dout rows to the experts (the mirror of the combine), dx rows and dgates back */
    epp_send_rows(XP, be, moe_xcomm(ml, comm), dout);
    EpX *X = XP->two_level ? &XP->b : &XP->a;
    /* dgate[i] = <dout row_i, yg_i>;  dyg_i = gate_i * dout row_i */
    be->ops->gather_dot(be->ctx, hs->dev.dgate, X->rbuf, st->yg, hs->dev.entry_token, M, D);
    be->ops->gather_rows_scaled(be->ctx, st->dyg, X->rbuf, hs->dev.entry_token, hs->dev.entry_gate, M, D);
    experts_backward(ml, be, p, g, st, st->expert_off, st->xg, st->dyg, st->dxg, 0.0f);
    be->ops->zero(be->ctx, hs->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    be->ops->scatter_add_rows(be->ctx, hs->yr, st->dxg, hs->dev.entry_token, NULL, M, D);
    epp_return_combine(XP, be, moe_xcomm(ml, comm), hs->yr, dx);
    be->ops->to_host(be->ctx, hs->dgate_h, hs->dev.dgate, sizeof(float) * (M ? M : 1));
    for (int i = 0; i < M; i++) X->rval[hs->entry_src[i]] = hs->dgate_h[i];
    epp_return_scalars(XP, moe_xcomm(ml, comm), X->rval);

    moe_route_backward(ml, XP, be, p, g, st, &hs->dev.router, dx, x);
}

const EpPath *moe_state_path(const MoeLayer *ml, const MoeState *st) {
    if (ml->kind == MOE_KIND_DENSE || (!st->priv && !st->cpriv)) return NULL;
    if (ml->kind == MOE_KIND_CLUSTERED) return clustered_state_path(st);
    return &host_of(st)->x;
}

void moe_state_view_route(MoeState *st) {
    st->logits = st->route.logits;
    st->probs = st->route.probs;
    st->dlogits = st->route.dlogits;
    st->topk_expert = st->route.expert;
    st->topk_gate = st->route.gate;
    st->pos = st->route.pos;
}
