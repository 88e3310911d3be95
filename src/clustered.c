/* clustered.c: the clustered MoE layer (DESIGN.md §1.1, §1.4): two-stage routing (groups by
 * prototype score, then top-k experts inside the chosen groups), group- and expert-level
 * capacity on the global batch, group-level and in-group Switch balance losses or the
 * aux-loss-free bias method, and the structured-compression FFN with base reuse:
 *   up:   h_ti = x_t Base1_g + (x_t A1_i) B1_i^T      (x_t Base1_g once per token and group)
 *   down: y_t  = (sum_i p_ti a_ti) Base2_g + sum_i p_ti (a_ti A2_i) B2_i^T
 * Routing (moe_route) runs through the backend's routing slots on backend arrays; the host gets
 * the decisions the exchange needs (experts, gates, kept pairs); every product goes through
 * the backend.
 * Inference path: when MoeParams.stored is set (precision.c), the expert products read the
 * stored formats (FP16 bases, INT4 factors) through quant.h's kernels, group by group,
 * dequantising on the fly (a block of base rows and one expert's factors at a time); the
 * group is fetched through the provider right after the dispatch (the routing is then
 * known).
 * Masters mode (clustering.mode masters, recognised by the gradient set having w1/w2): the
 * forward and the input gradient use the projection (bases, factors) as above; the weight
 * gradient goes straight through to each expert's FP32 masters, dW1_e = x_e^T dh_e and
 * dW2_e = a_e^T (gate dy)_e, the standard MoE's per-expert products (same cost), and
 * nothing into the projection. With FP32 QTensors it computes the same gemm sequence as the FP32 path whenever
 * D and F are <= QUANT_BLOCK_ROWS (one base block), hence bitwise-equal outputs there.
 *
 * Legend: N D F F1 E G K r TG k = tokens on this rank, d_model, expert width, F or 2F
 * (SwiGLU), experts, groups, experts per group, residual rank, groups per token, experts per
 * token; Mg = kept (token, group) rows, M = kept (token, expert) rows. */
#include "clustered.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct CScratch {
    int n_max, M_max, Mg_max;
    /* host (the routing itself lives in MoeState.route) */
    int32_t *entry_token, *entry_grow;   /* [M] */
    float *entry_gate;                   /* [M] */
    int32_t *gentry_token;               /* [Mg] */
    int32_t *expert_off, *group_off;     /* [E+1], [G+1] */
    float *dgate_h, *dgate2_h;           /* [M] */
    float *xh;                           /* [N, D] host copy of x (mu_source hidden) */
    int32_t *entry_src;                  /* [M] receive-order index of each expert-sorted entry */
    int32_t *gfill;                      /* [G_loc] scratch */
    float *yr;                           /* [yr_rows, D] device: output / dx row per received row */
    size_t yr_rows;                      /* = the final exchange's rows_cap (moe_comm_reserve) */
    size_t act_other;                    /* accounted bytes outside the comm buffers (fixed + expert side) */
    size_t act_fixed, act_expert;        /* routing buffers; the expert side now (expert_reserve) */
    EpPath x;                            /* the dispatch/combine exchange (flat or two-level) */
    int M, Mg;
    /* device */
    MoeRouterDev router;                 /* the routing arrays (moe.h) */
    int32_t *entry_token_d, *entry_grow_d, *gentry_token_d;
    float *entry_gate_d, *dgate_d, *dgate2_d;
    float *xg, *hb, *S, *yg;             /* [Mg, D] [Mg, F1] [Mg, F] [Mg, D] */
    float *xe, *u, *h, *a, *v, *z;       /* [M, D] [M, r] [M, F1] [M, F] [M, r] [M, D] */
    float *dyg, *dS, *dz, *dv, *da, *tmpF, *dh, *du, *dxe, *dhb, *dxg;
    float *qws;                          /* stored path: quant kernel workspace (lazy) */
    size_t qws_floats;
    int32_t *qneed;                      /* [G_loc] groups needed by the stored path */
    int last_stored;                     /* the last forward ran the stored path */
} CScratch;

static CScratch *cs_of(const MoeState *st) { return (CScratch *)st->cpriv; }
static void dfree(const Backend *be, void *p) { if (p) be->ops->free(be->ctx, p); }

/* the expert side: host and device arrays of M received entries and Mg <= M group rows.
 * Grown (never shrunk) to what a step's counts exchange announces (Mg <= M: a group row
 * carries at least one entry), so the memory follows the load, not the rank count; contents
 * are not kept across a growth (every forward refills them; backward runs on its forward's
 * sizes). */
static void expert_reserve(const MoeLayer *ml, CScratch *c, const Backend *be, size_t M) {
    if (M <= (size_t)c->M_max && c->xe) return;
    M = M > (size_t)c->M_max ? M : (size_t)c->M_max;
    if (!M) M = 1;
    size_t Mg = M, acc = 0;
    int D = ml->D, F = ml->F, F1 = ml->F1, r = ml->r;
#define HGROW(p, n) do { xfree(p); p = xcalloc(sizeof(*(p)) * (n)); } while (0)
#define DGROW(p, bytes) do { dfree(be, p); p = moe_alloc_counted(be, &acc, bytes); } while (0)
    HGROW(c->entry_src, M);
    HGROW(c->entry_token, M);
    HGROW(c->entry_grow, M);
    HGROW(c->entry_gate, M);
    HGROW(c->gentry_token, Mg);
    HGROW(c->dgate_h, M);
    HGROW(c->dgate2_h, M);
    DGROW(c->entry_token_d, sizeof(int32_t) * M);
    DGROW(c->entry_grow_d, sizeof(int32_t) * M);
    DGROW(c->gentry_token_d, sizeof(int32_t) * Mg);
    DGROW(c->entry_gate_d, sizeof(float) * M);
    DGROW(c->dgate_d, sizeof(float) * M);
    DGROW(c->dgate2_d, sizeof(float) * M);
    DGROW(c->xg, sizeof(float) * Mg * D);
    DGROW(c->hb, sizeof(float) * Mg * F1);
    DGROW(c->S, sizeof(float) * Mg * F);
    DGROW(c->yg, sizeof(float) * Mg * D);
    DGROW(c->xe, sizeof(float) * M * D);
    DGROW(c->u, sizeof(float) * M * r);
    DGROW(c->h, sizeof(float) * M * F1);
    DGROW(c->a, sizeof(float) * M * F);
    DGROW(c->v, sizeof(float) * M * r);
    DGROW(c->z, sizeof(float) * M * D);
    DGROW(c->dyg, sizeof(float) * Mg * D);
    DGROW(c->dS, sizeof(float) * Mg * F);
    DGROW(c->dz, sizeof(float) * M * D);
    DGROW(c->dv, sizeof(float) * M * r);
    DGROW(c->da, sizeof(float) * M * F);
    DGROW(c->tmpF, sizeof(float) * M * F);
    DGROW(c->dh, sizeof(float) * M * F1);
    DGROW(c->du, sizeof(float) * M * r);
    DGROW(c->dxe, sizeof(float) * M * D);
    DGROW(c->dhb, sizeof(float) * Mg * F1);
    DGROW(c->dxg, sizeof(float) * Mg * D);
#undef HGROW
#undef DGROW
    /* the stored path's workspace is sized by M_max: rebuilt on its next use */
    dfree(be, c->qws);
    c->qws = NULL;
    xfree(c->qneed);
    c->qneed = NULL;
    c->M_max = (int)M;
    c->Mg_max = (int)Mg;
    c->act_expert = acc;
}

Status clustered_state_init(MoeState *st, const MoeLayer *ml, const Backend *be, const Comm *comm, int n_max) {
    memset(st, 0, sizeof *st);
    st->n_max = n_max;
    CScratch *c = xcalloc(sizeof *c);
    size_t acc = 0;              /* backend bytes allocated here besides the expert side (accounting) */
    int E = ml->E, G = ml->G, k = ml->k, TG = ml->top_groups, D = ml->D;
    /* source-side arrays: this rank's N tokens; the expert side starts at what a balanced
     * step brings (N * k entries) and grows from the counts exchange (expert_reserve) */
    size_t N = (size_t)n_max, Ms = N * k;
    c->n_max = n_max;
    router_init(&st->route, n_max, E, k, G, TG);
    c->gfill = xcalloc(sizeof(int32_t) * ((G > ml->ep->n_slots ? G : ml->ep->n_slots) + 1));
    epp_init(&c->x, be, ml->ep, moe_xcomm_c(ml, comm)->topo, ml->two_level, D, n_max, k);
    c->expert_off = xcalloc(sizeof(int32_t) * (E + 1));
    c->group_off = xcalloc(sizeof(int32_t) * (G + 1));
    c->xh = xcalloc(sizeof(float) * N * D);
    moe_router_dev_init(&c->router, be, &acc, n_max, E, k, G, TG);
    expert_reserve(ml, c, be, Ms);
    router_stats_init(&st->stats, E, G);
    /* the generic fields are views into the route */
    moe_state_view_route(st);
    st->cpriv = c;
    /* act_bytes: every backend buffer of the layer incl. the exchange's; comm_bytes: the
     * exchange's send/receive rows and the returned rows (yr) */
    c->act_fixed = acc;
    c->act_other = acc + c->act_expert;
    moe_comm_reserve(st, &c->x, be, D, &c->yr, &c->yr_rows, c->act_other);
    return status_ok();
}

const EpPath *clustered_state_path(const MoeState *st) { return st->cpriv ? &cs_of(st)->x : NULL; }

void clustered_state_free(MoeState *st, const Backend *be) {
    CScratch *c = cs_of(st);
    if (!c) return;
    void *host[] = {c->entry_token, c->entry_grow, c->entry_gate, c->gentry_token,
                    c->expert_off, c->group_off, c->dgate_h, c->dgate2_h, c->xh, c->entry_src, c->gfill, c->qneed};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) xfree(host[i]);
    moe_router_dev_free(&c->router, be);
    void *dev[] = {c->entry_token_d, c->entry_grow_d, c->gentry_token_d,
                   c->entry_gate_d, c->dgate_d, c->dgate2_d, c->xg, c->hb, c->S, c->yg,
                   c->xe, c->u, c->h, c->a, c->v, c->z, c->dyg, c->dS, c->dz, c->dv, c->da, c->tmpF,
                   c->dh, c->du, c->dxe, c->dhb, c->dxg, c->yr, c->qws};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) dfree(be, dev[i]);
    epp_free(&c->x, be);
    router_free(&st->route);
    router_stats_free(&st->stats);
    xfree(c);
    memset(st, 0, sizeof *st);
}

/* expert side of the exchange. Received entries (row, local expert slot, gate) arrive in
 * (source rank, row) order with a row's entries together. Group rows = distinct (row, local
 * group) pairs, sorted by group slot then arrival; expert entries sorted by expert slot
 * (stable), each pointing at its group row. */
static void recv_build(const MoeLayer *ml, CScratch *c) {
    const EpX *X = epp_final(&c->x);
    int K = ml->K, Gl = ml->ep->n_slots, El = Gl * K, n = X->n_recv;
    int32_t *gcount = c->gfill;
    memset(gcount, 0, sizeof(int32_t) * (Gl + 1));
    memset(c->expert_off, 0, sizeof(int32_t) * (El + 1));
    /* pass 1: count group rows per group slot and entries per expert slot */
    for (int a = 0; a < n;) {
        int b = a;
        while (b < n && X->recv[b].row == X->recv[a].row) b++;
        for (int i = a; i < b; i++) {
            int g = X->recv[i].slot / K, first = 1;
            for (int j = a; j < i; j++) first &= X->recv[j].slot / K != g;
            if (first) gcount[g]++;
            c->expert_off[X->recv[i].slot + 1]++;
        }
        a = b;
    }
    c->group_off[0] = 0;
    for (int g = 0; g < Gl; g++) c->group_off[g + 1] = c->group_off[g] + gcount[g];
    for (int e = 0; e < El; e++) c->expert_off[e + 1] += c->expert_off[e];
    c->Mg = c->group_off[Gl];
    c->M = n;
    /* pass 2: assign group rows (in arrival order inside a group) and place the entries */
    memset(gcount, 0, sizeof(int32_t) * (Gl + 1));
    int32_t *efill = xcalloc(sizeof(int32_t) * (El + 1));
    for (int a = 0; a < n;) {
        int b = a;
        while (b < n && X->recv[b].row == X->recv[a].row) b++;
        int grows[64], gids[64], ng = 0;
        for (int i = a; i < b; i++) {
            int g = X->recv[i].slot / K, q = 0;
            while (q < ng && gids[q] != g) q++;
            if (q == ng) {
                ASSERT(ng < 64);
                gids[ng] = g;
                grows[ng] = c->group_off[g] + gcount[g]++;
                c->gentry_token[grows[ng]] = X->recv[i].row;
                ng++;
            }
            int e = X->recv[i].slot, j = c->expert_off[e] + efill[e]++;
            c->entry_token[j] = X->recv[i].row;
            c->entry_grow[j] = grows[q];
            c->entry_gate[j] = X->recv[i].gate;
            c->entry_src[j] = i;
        }
        a = b;
    }
    xfree(efill);
}

/* ---- forward ---- */

/* the expert products from stored formats (inference only): per needed local group, fetched
 * through the provider, up base + each member's low-rank term, activation, gated sum S,
 * each member's down low-rank term, down base. Leaves yg [Mg, D] and z [M, D] like the FP32
 * path. */
static void stored_experts(const MoeLayer *ml, const Backend *be, const MoeStored *sd, CScratch *c) {
    const BackendOps *op = be->ops;
    void *cx = be->ctx;
    int D = ml->D, F = ml->F, F1 = ml->F1, r = ml->r, K = ml->K, Gl = ml->ep->n_slots;
    int M = c->M, Mg = c->Mg;
    if (!c->qws) {
        int wide = F1 > D ? F1 : D, in_max = D > F ? D : F;
        size_t a = quant_base_matmul_scratch_floats(wide, 0);
        size_t b = quant_lowrank_scratch_floats(c->M_max, in_max, wide, r);
        c->qws_floats = a > b ? a : b;
        c->qws = be->ops->alloc(be->ctx, sizeof(float) * c->qws_floats);
        c->qneed = xcalloc(sizeof(int32_t) * (size_t)(Gl + 1));
    }
    op->gather_rows(cx, c->xe, c->xg, c->entry_grow_d, M, D);
    op->zero(cx, c->S, sizeof(float) * (size_t)(Mg ? Mg : 1) * F);
    int n_need = 0;
    for (int g = 0; g < Gl; g++)
        if (c->group_off[g + 1] > c->group_off[g]) c->qneed[n_need++] = g;
    if (n_need > 0 && !sd->prepare(sd->ctx, c->qneed, n_need) && sd->resident) {
        /* not pinned together: resident groups first (stable), then the ones to fetch */
        int n_res = 0;
        for (int q = 0; q < n_need; q++)
            if (sd->resident(sd->ctx, c->qneed[q])) {
                int g = c->qneed[q];
                memmove(c->qneed + n_res + 1, c->qneed + n_res, sizeof(int32_t) * (size_t)(q - n_res));
                c->qneed[n_res++] = g;
            }
    }
    for (int q = 0; q < n_need; q++) {
        int g = c->qneed[q], r0g = c->group_off[g], ng = c->group_off[g + 1] - r0g;
        int e0 = c->expert_off[g * K], ne = c->expert_off[(g + 1) * K] - e0;
        MoeQGroup qg;
        if (sd->get(sd->ctx, g, &qg) != 0) {
            /* unavailable (the provider keeps the error): zero output rows, no garbage */
            op->zero(cx, c->yg + (size_t)r0g * D, sizeof(float) * (size_t)ng * D);
            if (ne) op->zero(cx, c->z + (size_t)e0 * D, sizeof(float) * (size_t)ne * D);
            continue;
        }
        /* up: hb = xg Base1; h = hb[row] + x A1 B1^T per member */
        quant_base_matmul(be, c->hb + (size_t)r0g * F1, c->xg + (size_t)r0g * D, ng, qg.base1, 0.0f, 0, c->qws);
        if (ne == 0) { op->zero(cx, c->yg + (size_t)r0g * D, sizeof(float) * (size_t)ng * D); continue; }
        op->gather_rows(cx, c->h + (size_t)e0 * F1, c->hb, c->entry_grow_d + e0, ne, F1);
        for (int j = 0; j < K; j++) {
            int e = g * K + j, r0 = c->expert_off[e], n = c->expert_off[e + 1] - r0;
            if (n == 0) continue;
            quant_lowrank_apply(be, c->h + (size_t)r0 * F1, c->xe + (size_t)r0 * D, n, &qg.a1[j], &qg.b1[j], c->qws);
        }
        op->act_forward(cx, ml->act, c->a + (size_t)e0 * F, c->h + (size_t)e0 * F1, ne, F);
        op->scatter_add_rows(cx, c->S, c->a + (size_t)e0 * F, c->entry_grow_d + e0, c->entry_gate_d + e0, ne, F);
        for (int j = 0; j < K; j++) {
            int e = g * K + j, r0 = c->expert_off[e], n = c->expert_off[e + 1] - r0;
            if (n == 0) continue;
            op->zero(cx, c->z + (size_t)r0 * D, sizeof(float) * (size_t)n * D);
            quant_lowrank_apply(be, c->z + (size_t)r0 * D, c->a + (size_t)r0 * F, n, &qg.a2[j], &qg.b2[j], c->qws);
        }
        quant_base_matmul(be, c->yg + (size_t)r0g * D, c->S + (size_t)r0g * F, ng, qg.base2, 0.0f, 0, c->qws);
    }
}

void clustered_forward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p,
                       MoeState *st, float *out, const float *x, int N, long n_global) {
    CScratch *c = cs_of(st);
    ClusterState *cs = ml->cs;
    const BackendOps *op = be->ops;
    void *cx = be->ctx;
    int D = ml->D, k = ml->k;
    int F = ml->F, F1 = ml->F1, r = ml->r;
    ASSERTF(N <= c->n_max, "clustered_forward: %d tokens > capacity %d", N, c->n_max);
    st->N = N;
    moe_route(ml, be, comm, p, st, &c->router, x, N, n_global);
    const Route *rt = &st->route;

    /* activation centroids for clustering: sums of the router-logit vector (or the hidden
     * input) of every routed pair, reduced and folded into the EMA at the end of the step */
    if (cs->mu_sum) {
        int Pm = cs->mu_dim;
        const float *src = rt->logits;
        if (cs->mu_hidden) {
            op->to_host(cx, c->xh, x, sizeof(float) * N * D);
            src = c->xh;
        }
        for (int t = 0; t < N; t++)
            for (int s = 0; s < k; s++) {
                int e = rt->expert[(size_t)t * k + s];
                double *row = cs->mu_sum + (size_t)e * (Pm + 1);
                const float *v = src + (size_t)t * Pm;
                for (int j = 0; j < Pm; j++) row[j] += v[j];
                row[Pm] += 1;
            }
    }

    /* dispatch: each token once per destination rank of its kept experts (so once per chosen
     * group when groups sit on different ranks) */
    EpPath *XP = &c->x;
    moe_dispatch(ml, XP, be, comm, st, x);
    const EpX *X = epp_final(XP);
    expert_reserve(ml, c, be, (size_t)X->n_recv);
    c->act_other = c->act_fixed + c->act_expert;
    moe_comm_reserve(st, XP, be, D, &c->yr, &c->yr_rows, c->act_other);
    recv_build(ml, c);
    int M = c->M, Mg = c->Mg, Gl = ml->ep->n_slots, El = Gl * ml->K;
    moe_need(ml, c->group_off, Gl);
    op->from_host(cx, c->entry_token_d, c->entry_token, sizeof(int32_t) * (M ? M : 1));
    op->from_host(cx, c->entry_grow_d, c->entry_grow, sizeof(int32_t) * (M ? M : 1));
    op->from_host(cx, c->entry_gate_d, c->entry_gate, sizeof(float) * (M ? M : 1));
    op->from_host(cx, c->gentry_token_d, c->gentry_token, sizeof(int32_t) * (Mg ? Mg : 1));

    /* up projection: one base GEMM per local group on its (row, group) rows */
    op->gather_rows(cx, c->xg, X->rbuf, c->gentry_token_d, Mg, D);
    c->last_stored = p->stored != NULL;
    if (p->stored) {
        stored_experts(ml, be, p->stored, c);
        goto combine;
    }
    for (int g = 0; g < Gl; g++) {
        int r0 = c->group_off[g], n = c->group_off[g + 1] - r0;
        if (n == 0) continue;
        op->gemm(cx, false, false, n, F1, D, 1.0f, c->xg + (size_t)r0 * D, D,
                 p->base1 + (size_t)g * D * F1, F1, 0.0f, c->hb + (size_t)r0 * F1, F1);
    }
    op->gather_rows(cx, c->xe, c->xg, c->entry_grow_d, M, D);
    op->gather_rows(cx, c->h, c->hb, c->entry_grow_d, M, F1);
    for (int e = 0; e < El; e++) {
        int r0 = c->expert_off[e], n = c->expert_off[e + 1] - r0;
        if (n == 0) continue;
        /* u [n,r] = x A1_e;  h [n,F1] += u B1_e^T */
        op->gemm(cx, false, false, n, r, D, 1.0f, c->xe + (size_t)r0 * D, D, p->a1 + (size_t)e * D * r, r,
                 0.0f, c->u + (size_t)r0 * r, r);
        op->gemm(cx, false, true, n, F1, r, 1.0f, c->u + (size_t)r0 * r, r, p->b1 + (size_t)e * F1 * r, r,
                 1.0f, c->h + (size_t)r0 * F1, F1);
    }
    op->act_forward(cx, ml->act, c->a, c->h, M, F);
    /* down projection: S = sum_i p_i a_i per (token, group) row, one base GEMM per group,
     * plus each expert's low-rank term */
    op->zero(cx, c->S, sizeof(float) * (size_t)Mg * F);
    op->scatter_add_rows(cx, c->S, c->a, c->entry_grow_d, c->entry_gate_d, M, F);
    for (int e = 0; e < El; e++) {
        int r0 = c->expert_off[e], n = c->expert_off[e + 1] - r0;
        if (n == 0) continue;
        op->gemm(cx, false, false, n, r, F, 1.0f, c->a + (size_t)r0 * F, F, p->a2 + (size_t)e * F * r, r,
                 0.0f, c->v + (size_t)r0 * r, r);
        op->gemm(cx, false, true, n, D, r, 1.0f, c->v + (size_t)r0 * r, r, p->b2 + (size_t)e * D * r, r,
                 0.0f, c->z + (size_t)r0 * D, D);
    }
    for (int g = 0; g < Gl; g++) {
        int r0 = c->group_off[g], n = c->group_off[g + 1] - r0;
        if (n == 0) continue;
        op->gemm(cx, false, false, n, D, F, 1.0f, c->S + (size_t)r0 * F, F,
                 p->base2 + (size_t)g * F * D, D, 0.0f, c->yg + (size_t)r0 * D, D);
    }
combine:
    op->scatter_add_rows(cx, c->yg, c->z, c->entry_grow_d, c->entry_gate_d, M, D);
    /* group rows -> one row per received row, back to the token's rank */
    op->zero(cx, c->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    op->scatter_add_rows(cx, c->yr, c->yg, c->gentry_token_d, NULL, Mg, D);
    op->zero(cx, out, sizeof(float) * (size_t)N * D);
    epp_return_combine(XP, be, moe_xcomm(ml, comm), c->yr, out);
}

/* ---- backward ---- */

void clustered_backward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeParams *g,
                        MoeState *st, float *dx, const float *dout, const float *x) {
    CScratch *c = cs_of(st);
    const BackendOps *op = be->ops;
    void *cx = be->ctx;
    int D = ml->D, K = ml->K;
    int F = ml->F, F1 = ml->F1, r = ml->r, M = c->M, Mg = c->Mg;
    int Gl = ml->ep->n_slots, El = Gl * K;
    EpPath *XP = &c->x;
    ASSERTF(!c->last_stored && !p->stored, "clustered_backward: the stored-format path is inference only");
    /* masters mode (g->w1 set): the bases and factors are a projection of per-expert masters;
     * the gradient w.r.t. each expert's effective weights W1_e = Base1_g + A1_e B1_e^T and
     * W2_e goes straight through to its masters (the standard MoE's x^T dh and a^T dz per
     * expert); nothing is accumulated into the projection's tensors */
    int masters = g->w1 != NULL;

    /* dout rows to the groups' ranks (mirror of the combine) */
    epp_send_rows(XP, be, moe_xcomm(ml, comm), dout);
    EpX *X = XP->two_level ? &XP->b : &XP->a;
    op->gather_rows(cx, c->dyg, X->rbuf, c->gentry_token_d, Mg, D);
    for (int gg = 0; gg < Gl; gg++) {
        int r0 = c->group_off[gg], n = c->group_off[gg + 1] - r0;
        if (n == 0) continue;
        const float *b2 = p->base2 + (size_t)gg * F * D;
        /* dBase2 [F,D] += S^T dy;  dS [n,F] = dy Base2^T */
        if (!masters)
            op->gemm(cx, true, false, F, D, n, 1.0f, c->S + (size_t)r0 * F, F, c->dyg + (size_t)r0 * D, D,
                     1.0f, g->base2 + (size_t)gg * F * D, D);
        op->gemm(cx, false, true, n, F, D, 1.0f, c->dyg + (size_t)r0 * D, D, b2, D, 0.0f, c->dS + (size_t)r0 * F, F);
    }
    op->gather_rows_scaled(cx, c->dz, c->dyg, c->entry_grow_d, c->entry_gate_d, M, D);
    op->gather_dot(cx, c->dgate_d, c->dyg, c->z, c->entry_grow_d, M, D);
    for (int e = 0; e < El; e++) {
        int r0 = c->expert_off[e], n = c->expert_off[e + 1] - r0;
        if (n == 0) continue;
        float *dz = c->dz + (size_t)r0 * D, *v = c->v + (size_t)r0 * r, *dv = c->dv + (size_t)r0 * r;
        /* dB2 [D,r] += dz^T v;  dv [n,r] = dz B2;  dA2 [F,r] += a^T dv;  da [n,F] = dv A2^T
         * (masters: dW2_e [F,D] += a^T dz instead of dB2, dA2) */
        if (masters)
            op->gemm(cx, true, false, F, D, n, 1.0f, c->a + (size_t)r0 * F, F, dz, D, 1.0f, g->w2 + (size_t)e * F * D, D);
        else
            op->gemm(cx, true, false, D, r, n, 1.0f, dz, D, v, r, 1.0f, g->b2 + (size_t)e * D * r, r);
        op->gemm(cx, false, false, n, r, D, 1.0f, dz, D, p->b2 + (size_t)e * D * r, r, 0.0f, dv, r);
        if (!masters)
            op->gemm(cx, true, false, F, r, n, 1.0f, c->a + (size_t)r0 * F, F, dv, r, 1.0f, g->a2 + (size_t)e * F * r, r);
        op->gemm(cx, false, true, n, F, r, 1.0f, dv, r, p->a2 + (size_t)e * F * r, r, 0.0f, c->da + (size_t)r0 * F, F);
    }
    /* the base path: da_i += gate_i dS[row_i]; dgate_i += <dS[row_i], a_i> */
    op->gather_rows_scaled(cx, c->tmpF, c->dS, c->entry_grow_d, c->entry_gate_d, M, F);
    op->axpy(cx, c->da, c->tmpF, 1.0f, (size_t)M * F);
    op->gather_dot(cx, c->dgate2_d, c->dS, c->a, c->entry_grow_d, M, F);
    op->act_backward(cx, ml->act, c->dh, c->da, c->h, M, F);
    for (int e = 0; e < El; e++) {
        int r0 = c->expert_off[e], n = c->expert_off[e + 1] - r0;
        if (n == 0) continue;
        float *dh = c->dh + (size_t)r0 * F1, *u = c->u + (size_t)r0 * r, *du = c->du + (size_t)r0 * r;
        /* dB1 [F1,r] += dh^T u;  du [n,r] = dh B1;  dA1 [D,r] += x^T du;  dx_e [n,D] = du A1^T
         * (masters: dW1_e [D,F1] += x^T dh instead of dB1, dA1, and dBase1 below) */
        if (masters)
            op->gemm(cx, true, false, D, F1, n, 1.0f, c->xe + (size_t)r0 * D, D, dh, F1, 1.0f, g->w1 + (size_t)e * D * F1, F1);
        else
            op->gemm(cx, true, false, F1, r, n, 1.0f, dh, F1, u, r, 1.0f, g->b1 + (size_t)e * F1 * r, r);
        op->gemm(cx, false, false, n, r, F1, 1.0f, dh, F1, p->b1 + (size_t)e * F1 * r, r, 0.0f, du, r);
        if (!masters)
            op->gemm(cx, true, false, D, r, n, 1.0f, c->xe + (size_t)r0 * D, D, du, r, 1.0f, g->a1 + (size_t)e * D * r, r);
        op->gemm(cx, false, true, n, D, r, 1.0f, du, r, p->a1 + (size_t)e * D * r, r, 0.0f, c->dxe + (size_t)r0 * D, D);
    }
    op->zero(cx, c->dhb, sizeof(float) * (size_t)Mg * F1);
    op->scatter_add_rows(cx, c->dhb, c->dh, c->entry_grow_d, NULL, M, F1);
    for (int gg = 0; gg < Gl; gg++) {
        int r0 = c->group_off[gg], n = c->group_off[gg + 1] - r0;
        if (n == 0) continue;
        /* dBase1 [D,F1] += xg^T dhb;  dxg [n,D] = dhb Base1^T */
        if (!masters)
            op->gemm(cx, true, false, D, F1, n, 1.0f, c->xg + (size_t)r0 * D, D, c->dhb + (size_t)r0 * F1, F1,
                     1.0f, g->base1 + (size_t)gg * D * F1, F1);
        op->gemm(cx, false, true, n, D, F1, 1.0f, c->dhb + (size_t)r0 * F1, F1, p->base1 + (size_t)gg * D * F1, F1,
                 0.0f, c->dxg + (size_t)r0 * D, D);
    }
    op->scatter_add_rows(cx, c->dxg, c->dxe, c->entry_grow_d, NULL, M, D);
    /* dx rows back to the tokens' ranks, dgates (base and residual paths) with them */
    op->zero(cx, c->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    op->scatter_add_rows(cx, c->yr, c->dxg, c->gentry_token_d, NULL, Mg, D);
    epp_return_combine(XP, be, moe_xcomm(ml, comm), c->yr, dx);
    op->to_host(cx, c->dgate_h, c->dgate_d, sizeof(float) * (M ? M : 1));
    op->to_host(cx, c->dgate2_h, c->dgate2_d, sizeof(float) * (M ? M : 1));
    for (int i = 0; i < M; i++) X->rval[c->entry_src[i]] = c->dgate_h[i] + c->dgate2_h[i];
    epp_return_scalars(XP, moe_xcomm(ml, comm), X->rval);

    moe_route_backward(ml, XP, be, p, g, st, &c->router, dx, x);
}
