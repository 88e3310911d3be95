/* clustered.c: the clustered MoE layer (DESIGN.md §1.1, §1.4): two-stage routing (groups by
 * prototype score, then top-k experts inside the chosen groups), group- and expert-level
 * capacity on the global batch, group-level and in-group Switch balance losses or the
 * aux-loss-free bias method, and the structured-compression FFN with base reuse:
 *   up:   h_ti = x_t Base1_g + (x_t A1_i) B1_i^T      (x_t Base1_g once per token and group)
 *   down: y_t  = (sum_i p_ti a_ti) Base2_g + sum_i p_ti (a_ti A2_i) B2_i^T
 * Routing decisions are made on the host; every product goes through the backend.
 * Inference path: when MoeParams.stored is set (precision.c), the expert products read the
 * stored formats (FP16 bases, INT4 factors) through quant.h's kernels, group by group,
 * dequantising on the fly (a block of base rows and one expert's factors at a time); the
 * group is fetched through the provider right after the dispatch (the routing is then
 * known). With FP32 QTensors it computes the same gemm sequence as the FP32 path whenever
 * D and F are <= QUANT_BLOCK_ROWS (one base block), hence bitwise-equal outputs there.
 *
 * Legend: N D F F1 E G K r TG k = tokens on this rank, d_model, expert width, F or 2F
 * (SwiGLU), experts, groups, experts per group, residual rank, groups per token, experts per
 * token; Mg = kept (token, group) rows, M = kept (token, expert) rows. */
#include "moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct CScratch {
    int n_max, M_max, Mg_max;
    /* host routing */
    float *logits;       /* [N, E] */
    float *probs;        /* [N, E] in-group softmax (0 outside the chosen groups) */
    float *q;            /* [N, G] group softmax */
    double *lse;         /* [N] log-sum-exp of all expert logits (z-loss) */
    int32_t *gsel;       /* [N, TG] chosen groups */
    int32_t *gtop2;      /* [N, G, 2] top-2 members per group (group_score top2) */
    int32_t *topk;       /* [N, k] */
    float *gate;         /* [N, k] */
    int32_t *pos;        /* [N, k] expert-entry row or -1 */
    int32_t *gkeep;      /* [N, TG] 1 if the (token, group) survived group capacity */
    int32_t *entry_token, *entry_grow;   /* [M] */
    float *entry_gate;                   /* [M] */
    int32_t *gentry_token;               /* [Mg] */
    int32_t *expert_off, *group_off;     /* [E+1], [G+1] */
    int32_t *cnt, *cnt_all;              /* counts per slot, and gathered over ranks */
    size_t cnt_all_cap;
    double *fcoef_e, *fcoef_g;           /* aux gradient coefficients [E], [G] */
    double z_coef;
    float *dgate_h, *dgate2_h;           /* [M] */
    float *dlogits;                      /* [N, E] */
    float *xh;                           /* [N, D] host copy of x (mu_source hidden) */
    int32_t *entry_src;                  /* [M] receive-order index of each expert-sorted entry */
    int32_t *gfill;                      /* [G_loc] scratch */
    float *yr;                           /* [rows_cap, D] device: output / dx row per received row */
    EpPath x;                            /* the dispatch/combine exchange (flat or two-level) */
    int M, Mg;
    /* device */
    float *logits_d, *dlogits_d;
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
static size_t g_state_bytes;   /* bytes allocated by the clustered_state_init running now (accounting) */
static void *dalloc(const Backend *be, size_t bytes) { g_state_bytes += bytes; return be->ops->alloc(be->ctx, bytes); }
static void dfree(const Backend *be, void *p) { if (p) be->ops->free(be->ctx, p); }

Status clustered_state_init(MoeState *st, const MoeLayer *ml, const Backend *be, const Comm *comm, int n_max) {
    memset(st, 0, sizeof *st);
    st->n_max = n_max;
    CScratch *c = xcalloc(sizeof *c);
    g_state_bytes = 0;
    int E = ml->E, G = ml->G, k = ml->k, TG = ml->top_groups, D = ml->D, F = ml->F, F1 = ml->F1, r = ml->r;
    /* source-side arrays: this rank's N tokens; expert-side arrays: what this rank's groups may
     * receive from every rank (up to the global batch) */
    size_t N = (size_t)n_max, Ms = N * k, P = (size_t)ml->ep->P, M = Ms * P, Mg = M;
    c->n_max = n_max; c->M_max = (int)M; c->Mg_max = (int)Mg;
    c->logits = xcalloc(sizeof(float) * N * E);
    c->probs = xcalloc(sizeof(float) * N * E);
    c->q = xcalloc(sizeof(float) * N * G);
    c->lse = xcalloc(sizeof(double) * N);
    c->gsel = xcalloc(sizeof(int32_t) * N * TG);
    c->gtop2 = xcalloc(sizeof(int32_t) * N * G * 2);
    c->topk = xcalloc(sizeof(int32_t) * Ms);
    c->gate = xcalloc(sizeof(float) * Ms);
    c->pos = xcalloc(sizeof(int32_t) * Ms);
    c->entry_src = xcalloc(sizeof(int32_t) * M);
    c->gfill = xcalloc(sizeof(int32_t) * (G + 1));
    epp_init(&c->x, be, ml->ep, comm->topo, ml->two_level, D, n_max, k);
    c->yr = dalloc(be, sizeof(float) * epp_final(&c->x)->rows_cap * D);
    c->gkeep = xcalloc(sizeof(int32_t) * N * TG);
    c->entry_token = xcalloc(sizeof(int32_t) * M);
    c->entry_grow = xcalloc(sizeof(int32_t) * M);
    c->entry_gate = xcalloc(sizeof(float) * M);
    c->gentry_token = xcalloc(sizeof(int32_t) * Mg);
    c->expert_off = xcalloc(sizeof(int32_t) * (E + 1));
    c->group_off = xcalloc(sizeof(int32_t) * (G + 1));
    c->cnt = xcalloc(sizeof(int32_t) * (size_t)(k > TG ? k : TG) * (E > G ? E : G));
    c->fcoef_e = xcalloc(sizeof(double) * E);
    c->fcoef_g = xcalloc(sizeof(double) * G);
    c->dgate_h = xcalloc(sizeof(float) * M);
    c->dgate2_h = xcalloc(sizeof(float) * M);
    c->dlogits = xcalloc(sizeof(float) * N * E);
    c->xh = xcalloc(sizeof(float) * N * D);
    c->logits_d = dalloc(be, sizeof(float) * N * E);
    c->dlogits_d = dalloc(be, sizeof(float) * N * E);
    c->entry_token_d = dalloc(be, sizeof(int32_t) * M);
    c->entry_grow_d = dalloc(be, sizeof(int32_t) * M);
    c->gentry_token_d = dalloc(be, sizeof(int32_t) * Mg);
    c->entry_gate_d = dalloc(be, sizeof(float) * M);
    c->dgate_d = dalloc(be, sizeof(float) * M);
    c->dgate2_d = dalloc(be, sizeof(float) * M);
    c->xg = dalloc(be, sizeof(float) * Mg * D);
    c->hb = dalloc(be, sizeof(float) * Mg * F1);
    c->S = dalloc(be, sizeof(float) * Mg * F);
    c->yg = dalloc(be, sizeof(float) * Mg * D);
    c->xe = dalloc(be, sizeof(float) * M * D);
    c->u = dalloc(be, sizeof(float) * M * r);
    c->h = dalloc(be, sizeof(float) * M * F1);
    c->a = dalloc(be, sizeof(float) * M * F);
    c->v = dalloc(be, sizeof(float) * M * r);
    c->z = dalloc(be, sizeof(float) * M * D);
    c->dyg = dalloc(be, sizeof(float) * Mg * D);
    c->dS = dalloc(be, sizeof(float) * Mg * F);
    c->dz = dalloc(be, sizeof(float) * M * D);
    c->dv = dalloc(be, sizeof(float) * M * r);
    c->da = dalloc(be, sizeof(float) * M * F);
    c->tmpF = dalloc(be, sizeof(float) * M * F);
    c->dh = dalloc(be, sizeof(float) * M * F1);
    c->du = dalloc(be, sizeof(float) * M * r);
    c->dxe = dalloc(be, sizeof(float) * M * D);
    c->dhb = dalloc(be, sizeof(float) * Mg * F1);
    c->dxg = dalloc(be, sizeof(float) * Mg * D);
    st->stats.counts = xcalloc(sizeof(double) * E);
    st->stats.counts_routed = xcalloc(sizeof(double) * E);
    st->stats.group_counts = xcalloc(sizeof(double) * G);
    /* the generic fields point at the clustered buffers so metrics code can read them */
    st->logits = c->logits;
    st->probs = c->probs;
    st->topk_expert = c->topk;
    st->topk_gate = c->gate;
    st->pos = c->pos;
    st->cpriv = c;
    /* act_bytes: every backend buffer of the layer incl. the exchange's; comm_bytes: the
     * exchange's send/receive rows and the returned rows (yr) */
    st->comm_bytes = epp_buffer_bytes(&c->x) + sizeof(float) * epp_final(&c->x)->rows_cap * D;
    st->act_bytes = g_state_bytes + epp_buffer_bytes(&c->x);
    return status_ok();
}

void clustered_state_free(MoeState *st, const Backend *be) {
    CScratch *c = cs_of(st);
    if (!c) return;
    void *host[] = {c->logits, c->probs, c->q, c->lse, c->gsel, c->gtop2, c->topk, c->gate, c->pos,
                    c->gkeep, c->entry_token, c->entry_grow, c->entry_gate, c->gentry_token,
                    c->expert_off, c->group_off, c->cnt, c->cnt_all, c->fcoef_e, c->fcoef_g,
                    c->dgate_h, c->dgate2_h, c->dlogits, c->xh, c->entry_src, c->gfill, c->qneed};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) xfree(host[i]);
    void *dev[] = {c->logits_d, c->dlogits_d, c->entry_token_d, c->entry_grow_d, c->gentry_token_d,
                   c->entry_gate_d, c->dgate_d, c->dgate2_d, c->xg, c->hb, c->S, c->yg,
                   c->xe, c->u, c->h, c->a, c->v, c->z, c->dyg, c->dS, c->dz, c->dv, c->da, c->tmpF,
                   c->dh, c->du, c->dxe, c->dhb, c->dxg, c->yr, c->qws};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) dfree(be, dev[i]);
    epp_free(&c->x, be);
    xfree(st->stats.counts); xfree(st->stats.counts_routed); xfree(st->stats.group_counts);
    xfree(c);
    memset(st, 0, sizeof *st);
}

/* ---- routing ---- */

static int better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

/* stage 1 + stage 2 for every token: group scores, group softmax q, chosen groups, in-group
 * softmax, top-k experts and gates. Selection uses logits + bias (aux-loss-free); the
 * probabilities never include the bias. */
static void route_two_stage(const MoeLayer *ml, CScratch *c, int N) {
    const ClusterState *cs = ml->cs;
    int E = ml->E, G = ml->G, K = ml->K, k = ml->k, TG = ml->top_groups;
    int aux_free = ml->cfg.balance == BALANCE_AUX_FREE;
    float lam[4096], lsel[4096], sel[4096];
    ASSERTF(G <= 4096 && E <= 4096, "clustered routing supports at most 4096 experts");
    for (int t = 0; t < N; t++) {
        const float *l = c->logits + (size_t)t * E;
        for (int i = 0; i < E; i++) sel[i] = l[i] + (aux_free ? cs->bias[i] : 0.0f);
        /* group scores */
        for (int g = 0; g < G; g++) {
            const int32_t *mem = cs->members + (size_t)g * K;
            if (ml->cfg.group_score == GROUP_SCORE_TOP2 && K >= 2) {
                int b0 = -1, b1 = -1;   /* top-2 members by selection score */
                for (int j = 0; j < K; j++) {
                    int i = mem[j];
                    if (b0 < 0 || better(sel[i], i, sel[b0], b0)) { b1 = b0; b0 = i; }
                    else if (b1 < 0 || better(sel[i], i, sel[b1], b1)) b1 = i;
                }
                c->gtop2[((size_t)t * G + g) * 2] = b0;
                c->gtop2[((size_t)t * G + g) * 2 + 1] = b1;
                lam[g] = l[b0] + l[b1];
                lsel[g] = sel[b0] + sel[b1];
            } else {
                double s = 0, s2 = 0;
                for (int j = 0; j < K; j++) { s += l[mem[j]]; s2 += sel[mem[j]]; }
                lam[g] = (float)(s / K);
                lsel[g] = (float)(s2 / K);
            }
        }
        float mx = lam[0];
        for (int g = 1; g < G; g++) if (lam[g] > mx) mx = lam[g];
        double zs = 0;
        for (int g = 0; g < G; g++) zs += exp((double)lam[g] - mx);
        float *qt = c->q + (size_t)t * G;
        for (int g = 0; g < G; g++) qt[g] = (float)(exp((double)lam[g] - mx) / zs);
        /* stage 1: top TG groups by selection score */
        int32_t *gs = c->gsel + (size_t)t * TG;
        for (int j = 0; j < TG; j++) {
            int best = -1;
            for (int g = 0; g < G; g++) {
                int taken = 0;
                for (int q = 0; q < j; q++) taken |= gs[q] == g;
                if (!taken && (best < 0 || better(lsel[g], g, lsel[best], best))) best = g;
            }
            gs[j] = best;
        }
        /* stage 2: softmax over the chosen groups' members, top-k by selection score */
        float *pt = c->probs + (size_t)t * E;
        memset(pt, 0, sizeof(float) * E);
        float lm = -INFINITY;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = cs->members[(size_t)gs[j] * K + q]; if (l[i] > lm) lm = l[i]; }
        double ps = 0;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = cs->members[(size_t)gs[j] * K + q]; ps += exp((double)l[i] - lm); }
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) {
                int i = cs->members[(size_t)gs[j] * K + q];
                pt[i] = (float)(exp((double)l[i] - lm) / ps);
            }
        int32_t *tk = c->topk + (size_t)t * k;
        float *gt = c->gate + (size_t)t * k;
        double gsum = 0;
        for (int s = 0; s < k; s++) {
            int best = -1;
            for (int j = 0; j < TG; j++)
                for (int q = 0; q < K; q++) {
                    int i = cs->members[(size_t)gs[j] * K + q], taken = 0;
                    for (int u = 0; u < s; u++) taken |= tk[u] == i;
                    if (!taken && (best < 0 || better(sel[i], i, sel[best], best))) best = i;
                }
            tk[s] = best;
            gt[s] = pt[best];
            gsum += pt[best];
        }
        if (ml->cfg.renormalize && k > 1)
            for (int s = 0; s < k; s++) gt[s] = (float)(gt[s] / gsum);
        /* z-loss over every expert logit */
        float am = l[0];
        for (int i = 1; i < E; i++) if (l[i] > am) am = l[i];
        double as = 0;
        for (int i = 0; i < E; i++) as += exp((double)l[i] - am);
        c->lse[t] = am + log(as);
    }
}

static void route_capacity(const MoeLayer *ml, Comm *comm, MoeState *st, CScratch *c, int N, long n_global) {
    int E = ml->E, G = ml->G, k = ml->k, TG = ml->top_groups;
    int dropless = ml->cfg.dropless;
    long cap_g = dropless ? -1 : (long)ceil(ml->cfg.group_capacity_factor * (double)n_global * TG / G);
    long cap_e = dropless ? -1 : (long)ceil(ml->cfg.capacity_factor * (double)n_global * k / E);
    st->stats.capacity = cap_e;
    long *base = xcalloc(sizeof(long) * (size_t)(k > TG ? k : TG) * (E > G ? E : G));
    long *run = xcalloc(sizeof(long) * (E > G ? E : G));
    /* group level */
    memset(c->cnt, 0, sizeof(int32_t) * TG * G);
    for (int t = 0; t < N; t++)
        for (int j = 0; j < TG; j++) c->cnt[j * G + c->gsel[(size_t)t * TG + j]]++;
    moe_queue_bases(comm, c->cnt, TG, G, &c->cnt_all, &c->cnt_all_cap, base, st->stats.group_counts);
    double g_routed = 0, g_kept = 0;
    for (int g = 0; g < G; g++) {
        g_routed += st->stats.group_counts[g];
        g_kept += cap_g < 0 || st->stats.group_counts[g] <= cap_g ? st->stats.group_counts[g] : cap_g;
    }
    st->stats.group_dropped_frac = g_routed > 0 ? (g_routed - g_kept) / g_routed : 0;
    for (int j = 0; j < TG; j++) {
        memset(run, 0, sizeof(long) * G);
        for (int t = 0; t < N; t++) {
            int g = c->gsel[(size_t)t * TG + j];
            long qpos = base[j * G + g] + run[g]++;
            c->gkeep[(size_t)t * TG + j] = cap_g < 0 || qpos < cap_g;
        }
    }
    /* expert level, on the pairs whose group survived */
    memset(c->cnt, 0, sizeof(int32_t) * k * E);
    for (int t = 0; t < N; t++)
        for (int s = 0; s < k; s++) {
            int e = c->topk[(size_t)t * k + s], g = ml->cs->group_of[e], ok = 0;
            for (int j = 0; j < TG; j++) ok |= c->gsel[(size_t)t * TG + j] == g && c->gkeep[(size_t)t * TG + j];
            c->pos[(size_t)t * k + s] = ok ? 0 : -1;
            if (ok) c->cnt[s * E + e]++;
        }
    moe_queue_bases(comm, c->cnt, k, E, &c->cnt_all, &c->cnt_all_cap, base, st->stats.counts_routed);
    /* counts_routed = token-expert pairs offered to each expert after group capacity (the
     * f_i of the in-group balance loss and the load metrics); counts = after expert capacity */
    int32_t *kept = xcalloc(sizeof(int32_t) * E);
    double routed = 0, kept_total = 0;
    for (int e = 0; e < E; e++) {
        double a = st->stats.counts_routed[e];
        st->stats.counts[e] = cap_e < 0 || a <= cap_e ? a : (double)cap_e;
        routed += a;
        kept_total += st->stats.counts[e];
    }
    st->stats.dropped_frac = routed > 0 ? (routed - kept_total) / routed : 0;
    for (int s = 0; s < k; s++) {
        memset(run, 0, sizeof(long) * E);
        for (int t = 0; t < N; t++) {
            size_t ts = (size_t)t * k + s;
            if (c->pos[ts] < 0) continue;
            int e = c->topk[ts];
            long qpos = base[s * E + e] + run[e]++;
            if (cap_e >= 0 && qpos >= cap_e) c->pos[ts] = -1;
            else kept[e]++;
        }
    }
    xfree(kept); xfree(base); xfree(run);
}

/* expert side of the exchange. Received entries (row, local expert slot, gate) arrive in
 * (source rank, row) order with a row's entries together. Group rows = distinct (row, local
 * group) pairs, sorted by group slot then arrival; expert entries sorted by expert slot
 * (stable), each pointing at its group row. */
static void recv_build(const MoeLayer *ml, CScratch *c) {
    const EpX *X = epp_final(&c->x);
    int K = ml->K, Gl = ml->ep->per_rank, El = Gl * K, n = X->n_recv;
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
    int D = ml->D, F = ml->F, F1 = ml->F1, r = ml->r, K = ml->K, Gl = ml->ep->per_rank;
    int M = c->M, Mg = c->Mg;
    if (!c->qws) {
        int wide = F1 > D ? F1 : D, in_max = D > F ? D : F;
        size_t a = quant_base_matmul_scratch_floats(wide, 0);
        size_t b = quant_lowrank_scratch_floats(c->M_max, in_max, wide, r);
        c->qws_floats = a > b ? a : b;
        c->qws = dalloc(be, sizeof(float) * c->qws_floats);
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
    int D = ml->D, E = ml->E, G = ml->G, k = ml->k, TG = ml->top_groups;
    int F = ml->F, F1 = ml->F1, r = ml->r;
    ASSERTF(N <= c->n_max, "clustered_forward: %d tokens > capacity %d", N, c->n_max);
    st->N = N;
    op->gemm(cx, false, false, N, E, D, 1.0f, x, D, p->router, E, 0.0f, c->logits_d, E);
    op->to_host(cx, c->logits, c->logits_d, sizeof(float) * N * E);
    route_two_stage(ml, c, N);
    route_capacity(ml, comm, st, c, N, n_global);

    /* balance losses with global statistics: one allreduce of E + G + 1 doubles */
    int aux = ml->cfg.balance == BALANCE_AUX;
    double *red = xcalloc(sizeof(double) * (E + G + 1));
    for (int t = 0; t < N; t++) {
        for (int i = 0; i < E; i++) red[i] += c->probs[(size_t)t * E + i];
        for (int g = 0; g < G; g++) red[E + g] += c->q[(size_t)t * G + g];
        red[E + G] += c->lse[t] * c->lse[t];
    }
    comm_allreduce_sum_f64(comm, red, E + G + 1);
    double a_e = aux ? ml->cfg.aux_loss_coef : 0, a_g = aux ? ml->cfg.group_aux_coef : 0;
    double le = 0, lg = 0;
    for (int i = 0; i < E; i++) {
        double f = st->stats.counts_routed[i] / ((double)n_global * k);
        le += f * red[i] / (double)n_global;
        c->fcoef_e[i] = a_e * E * f / (double)n_global;
    }
    for (int g = 0; g < G; g++) {
        double f = st->stats.group_counts[g] / ((double)n_global * TG);
        lg += f * red[E + g] / (double)n_global;
        c->fcoef_g[g] = a_g * G * f / (double)n_global;
    }
    st->stats.aux_loss = a_e * E * le + a_g * G * lg;
    st->stats.group_aux_loss = a_g * G * lg;
    st->stats.z_loss = ml->cfg.z_loss_coef * red[E + G] / (double)n_global;
    c->z_coef = 2.0 * ml->cfg.z_loss_coef / (double)n_global;
    xfree(red);

    /* activation centroids for clustering: sums of the router-logit vector (or the hidden
     * input) of every routed pair, reduced and folded into the EMA at the end of the step */
    if (cs->mu_sum) {
        int Pm = cs->mu_dim;
        const float *src = c->logits;
        if (cs->mu_hidden) {
            op->to_host(cx, c->xh, x, sizeof(float) * N * D);
            src = c->xh;
        }
        for (int t = 0; t < N; t++)
            for (int s = 0; s < k; s++) {
                int e = c->topk[(size_t)t * k + s];
                double *row = cs->mu_sum + (size_t)e * (Pm + 1);
                const float *v = src + (size_t)t * Pm;
                for (int j = 0; j < Pm; j++) row[j] += v[j];
                row[Pm] += 1;
            }
    }

    /* dispatch: each token once per destination rank of its kept experts (so once per chosen
     * group when groups sit on different ranks); pos becomes the pair's sent-entry index */
    EpPath *XP = &c->x;
    epp_plan(XP, ml->ep, be, comm, N, k, c->topk, c->pos, c->gate);
    for (size_t ts = 0; ts < (size_t)N * k; ts++) c->pos[ts] = XP->a.ts_entry[ts];
    epp_send_rows(XP, be, comm, x);
    const EpX *X = epp_final(XP);
    recv_build(ml, c);
    int M = c->M, Mg = c->Mg, Gl = ml->ep->per_rank, El = Gl * ml->K;
    if (ml->need) {
        int32_t units[4096];
        int nu = 0;
        for (int g = 0; g < Gl && nu < 4096; g++) if (c->group_off[g + 1] > c->group_off[g]) units[nu++] = g;
        Status rs = ml->need(ml->need_ctx, ml->index, units, nu);
        ASSERTF(STATUS_OK(rs), "%s", rs.msg);
    }
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
    epp_return_combine(XP, be, comm, c->yr, out);
}

/* ---- backward ---- */

void clustered_backward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeParams *g,
                        MoeState *st, float *dx, const float *dout, const float *x) {
    CScratch *c = cs_of(st);
    const ClusterState *cs = ml->cs;
    const BackendOps *op = be->ops;
    void *cx = be->ctx;
    int N = st->N, D = ml->D, E = ml->E, G = ml->G, K = ml->K, k = ml->k, TG = ml->top_groups;
    int F = ml->F, F1 = ml->F1, r = ml->r, M = c->M, Mg = c->Mg;
    int Gl = ml->ep->per_rank, El = Gl * K;
    EpPath *XP = &c->x;
    ASSERTF(!c->last_stored && !p->stored, "clustered_backward: the stored-format path is inference only");

    /* dout rows to the groups' ranks (mirror of the combine) */
    epp_send_rows(XP, be, comm, dout);
    EpX *X = XP->two_level ? &XP->b : &XP->a;
    op->gather_rows(cx, c->dyg, X->rbuf, c->gentry_token_d, Mg, D);
    for (int gg = 0; gg < Gl; gg++) {
        int r0 = c->group_off[gg], n = c->group_off[gg + 1] - r0;
        if (n == 0) continue;
        const float *b2 = p->base2 + (size_t)gg * F * D;
        /* dBase2 [F,D] += S^T dy;  dS [n,F] = dy Base2^T */
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
        /* dB2 [D,r] += dz^T v;  dv [n,r] = dz B2;  dA2 [F,r] += a^T dv;  da [n,F] = dv A2^T */
        op->gemm(cx, true, false, D, r, n, 1.0f, dz, D, v, r, 1.0f, g->b2 + (size_t)e * D * r, r);
        op->gemm(cx, false, false, n, r, D, 1.0f, dz, D, p->b2 + (size_t)e * D * r, r, 0.0f, dv, r);
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
        /* dB1 [F1,r] += dh^T u;  du [n,r] = dh B1;  dA1 [D,r] += x^T du;  dx_e [n,D] = du A1^T */
        op->gemm(cx, true, false, F1, r, n, 1.0f, dh, F1, u, r, 1.0f, g->b1 + (size_t)e * F1 * r, r);
        op->gemm(cx, false, false, n, r, F1, 1.0f, dh, F1, p->b1 + (size_t)e * F1 * r, r, 0.0f, du, r);
        op->gemm(cx, true, false, D, r, n, 1.0f, c->xe + (size_t)r0 * D, D, du, r, 1.0f, g->a1 + (size_t)e * D * r, r);
        op->gemm(cx, false, true, n, D, r, 1.0f, du, r, p->a1 + (size_t)e * D * r, r, 0.0f, c->dxe + (size_t)r0 * D, D);
    }
    op->zero(cx, c->dhb, sizeof(float) * (size_t)Mg * F1);
    op->scatter_add_rows(cx, c->dhb, c->dh, c->entry_grow_d, NULL, M, F1);
    for (int gg = 0; gg < Gl; gg++) {
        int r0 = c->group_off[gg], n = c->group_off[gg + 1] - r0;
        if (n == 0) continue;
        /* dBase1 [D,F1] += xg^T dhb;  dxg [n,D] = dhb Base1^T */
        op->gemm(cx, true, false, D, F1, n, 1.0f, c->xg + (size_t)r0 * D, D, c->dhb + (size_t)r0 * F1, F1,
                 1.0f, g->base1 + (size_t)gg * D * F1, F1);
        op->gemm(cx, false, true, n, D, F1, 1.0f, c->dhb + (size_t)r0 * F1, F1, p->base1 + (size_t)gg * D * F1, F1,
                 0.0f, c->dxg + (size_t)r0 * D, D);
    }
    op->scatter_add_rows(cx, c->dxg, c->dxe, c->entry_grow_d, NULL, M, D);
    /* dx rows back to the tokens' ranks, dgates (base and residual paths) with them */
    op->zero(cx, c->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    op->scatter_add_rows(cx, c->yr, c->dxg, c->gentry_token_d, NULL, Mg, D);
    epp_return_combine(XP, be, comm, c->yr, dx);
    op->to_host(cx, c->dgate_h, c->dgate_d, sizeof(float) * (M ? M : 1));
    op->to_host(cx, c->dgate2_h, c->dgate2_d, sizeof(float) * (M ? M : 1));
    for (int i = 0; i < M; i++) X->rval[c->entry_src[i]] = c->dgate_h[i] + c->dgate2_h[i];
    epp_return_scalars(XP, comm, X->rval);

    /* router: gates -> in-group softmax, group balance through q, z-loss -> logits */
    double dp[4096], dq[4096];
    for (int t = 0; t < N; t++) {
        const float *pt = c->probs + (size_t)t * E, *qt = c->q + (size_t)t * G, *l = c->logits + (size_t)t * E;
        const int32_t *gs = c->gsel + (size_t)t * TG, *tk = c->topk + (size_t)t * k, *ps = c->pos + (size_t)t * k;
        const float *gt = c->gate + (size_t)t * k;
        float *dl = c->dlogits + (size_t)t * E;
        for (int i = 0; i < E; i++) { dp[i] = 0; dl[i] = 0; }
        /* candidates: members of the chosen groups; in-group aux gradient on every candidate */
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = cs->members[(size_t)gs[j] * K + q]; dp[i] = c->fcoef_e[i]; }
        double dg[64], inc[64];
        for (int s = 0; s < k; s++) dg[s] = ps[s] >= 0 ? (double)XP->a.sval[ps[s]] : 0.0;
        moe_gate_backward(k, tk, gt, pt, dg, ml->cfg.renormalize && k > 1, inc);
        for (int s = 0; s < k; s++) dp[tk[s]] += inc[s];
        double spd = 0;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = cs->members[(size_t)gs[j] * K + q]; spd += pt[i] * dp[i]; }
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) {
                int i = cs->members[(size_t)gs[j] * K + q];
                dl[i] += (float)(pt[i] * (dp[i] - spd));
            }
        /* group balance: dq_g = coef_g; softmax backward to the group scores */
        double sqd = 0;
        for (int gg = 0; gg < G; gg++) { dq[gg] = c->fcoef_g[gg]; sqd += qt[gg] * dq[gg]; }
        for (int gg = 0; gg < G; gg++) {
            double dlam = qt[gg] * (dq[gg] - sqd);
            if (dlam == 0) continue;
            if (ml->cfg.group_score == GROUP_SCORE_TOP2 && K >= 2) {
                dl[c->gtop2[((size_t)t * G + gg) * 2]] += (float)dlam;
                dl[c->gtop2[((size_t)t * G + gg) * 2 + 1]] += (float)dlam;
            } else {
                for (int q = 0; q < K; q++) dl[cs->members[(size_t)gg * K + q]] += (float)(dlam / K);
            }
        }
        if (c->z_coef != 0) {
            double zc = c->z_coef * c->lse[t];
            for (int i = 0; i < E; i++) dl[i] += (float)(zc * exp((double)l[i] - c->lse[t]));
        }
    }
    op->from_host(cx, c->dlogits_d, c->dlogits, sizeof(float) * N * E);
    op->gemm(cx, true, false, D, E, N, 1.0f, x, D, c->dlogits_d, E, 1.0f, g->router, E);
    op->gemm(cx, false, true, N, D, E, 1.0f, c->dlogits_d, E, p->router, E, 1.0f, dx, D);
}

void clustered_update_bias(const MoeLayer *ml, const MoeState *st) { moe_update_bias(ml, st); }
