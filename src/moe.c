/* moe.c: dense FFN and standard top-k MoE layer, forward and backward.
 * Legend: N D F F1 E k M = tokens on this rank, d_model, expert width, F or 2F (SwiGLU),
 * experts, top-k, routed entries kept (<= N*k). */
#include "moe.h"

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

static size_t g_state_bytes;   /* bytes allocated by the moe_state_init running now (accounting) */
static void *dev_alloc(const Backend *be, size_t bytes) { g_state_bytes += bytes; return be->ops->alloc(be->ctx, bytes); }
static void dev_free(const Backend *be, void *p) { if (p) be->ops->free(be->ctx, p); }

/* device buffers hold the routing arrays the gather/combine ops read; host mirrors are
 * used for the routing decisions. On the CPU backend the copies are memcpy of a few KB. */
typedef struct MoeDev {
    float *logits, *dlogits;     /* [N,E] */
    int32_t *pos;                /* [N,k] */
    float *gate;                 /* [N,k] */
    int32_t *entry_token;        /* [M] */
    float *entry_gate;           /* [M] */
    float *dgate;                /* [M] */
} MoeDev;

/* scratch kept with the state (host) */
typedef struct MoeHost {
    double *lse;                 /* [N] */
    double *fcoef;               /* [E] aux-loss gradient coefficient alpha*E*f_i/n_global */
    double z_coef;               /* 2*beta/n_global */
    int32_t *cnt;                /* [k, E] local routed counts per slot */
    int32_t *cnt_all;            /* [P, k, E] */
    size_t cnt_all_cap;
    float *dgate_h;              /* [M] */
    float *dp;                   /* [N, E] */
    int32_t *entry_src;          /* [Mr] receive-order index of each expert-sorted entry */
    float *yr;                   /* [rows_cap, D] device: one output (or dx) row per received row */
    EpPath x;                    /* the dispatch/combine exchange (flat or two-level) */
    MoeDev dev;
} MoeHost;

Status moe_state_init(MoeState *st, const MoeLayer *ml, const Backend *be, const Comm *comm, int n_max) {
    memset(st, 0, sizeof *st);
    if (ml->kind == MOE_KIND_CLUSTERED) return clustered_state_init(st, ml, be, comm, n_max);
    st->n_max = n_max;
    int E = ml->E, k = ml->k, D = ml->D, F = ml->F, F1 = ml->F1;
    /* source-side routing arrays hold this rank's n_max * k pairs; the expert-side buffers
     * hold what this rank's experts may receive from every rank (the global batch) */
    size_t Ms = (size_t)n_max * k;
    size_t M = ml->kind == MOE_KIND_DENSE ? Ms : Ms * (size_t)ml->ep->P;
    MoeHost *hs = xcalloc(sizeof(MoeHost));
    g_state_bytes = 0;
    st->stats.counts = xcalloc(sizeof(double) * E);
    st->stats.counts_routed = xcalloc(sizeof(double) * E);
    if (ml->kind != MOE_KIND_DENSE) {
        st->logits = xcalloc(sizeof(float) * n_max * E);
        st->probs = xcalloc(sizeof(float) * n_max * E);
        st->dlogits = xcalloc(sizeof(float) * n_max * E);
        st->topk_expert = xcalloc(sizeof(int32_t) * Ms);
        st->topk_gate = xcalloc(sizeof(float) * Ms);
        st->pos = xcalloc(sizeof(int32_t) * Ms);
        st->entry_token = xcalloc(sizeof(int32_t) * M);
        st->entry_gate = xcalloc(sizeof(float) * M);
        st->expert_off = xcalloc(sizeof(int32_t) * (E + 1));
        hs->lse = xcalloc(sizeof(double) * n_max);
        hs->fcoef = xcalloc(sizeof(double) * E);
        hs->cnt = xcalloc(sizeof(int32_t) * k * E);
        hs->dgate_h = xcalloc(sizeof(float) * M);
        hs->dp = xcalloc(sizeof(float) * n_max * E);
        hs->dev.logits = dev_alloc(be, sizeof(float) * n_max * E);
        hs->dev.dlogits = dev_alloc(be, sizeof(float) * n_max * E);
        hs->dev.pos = dev_alloc(be, sizeof(int32_t) * Ms);
        hs->dev.gate = dev_alloc(be, sizeof(float) * Ms);
        hs->entry_src = xcalloc(sizeof(int32_t) * M);
        epp_init(&hs->x, be, ml->ep, comm->topo, ml->two_level, D, n_max, k);
        hs->yr = dev_alloc(be, sizeof(float) * epp_final(&hs->x)->rows_cap * D);
        hs->dev.entry_token = dev_alloc(be, sizeof(int32_t) * M);
        hs->dev.entry_gate = dev_alloc(be, sizeof(float) * M);
        hs->dev.dgate = dev_alloc(be, sizeof(float) * M);
        st->xg = dev_alloc(be, sizeof(float) * M * D);
        st->yg = dev_alloc(be, sizeof(float) * M * D);
        st->dyg = dev_alloc(be, sizeof(float) * M * D);
        st->dxg = dev_alloc(be, sizeof(float) * M * D);
    }
    st->h = dev_alloc(be, sizeof(float) * M * F1);
    st->a = dev_alloc(be, sizeof(float) * M * F);
    st->da = dev_alloc(be, sizeof(float) * M * F);
    st->dh = dev_alloc(be, sizeof(float) * M * F1);
    st->priv = hs;
    if (ml->kind != MOE_KIND_DENSE) {
        st->comm_bytes = epp_buffer_bytes(&hs->x) + sizeof(float) * epp_final(&hs->x)->rows_cap * D;
        st->act_bytes = g_state_bytes + st->comm_bytes - sizeof(float) * epp_final(&hs->x)->rows_cap * D;
    } else st->act_bytes = g_state_bytes;
    return status_ok();
}

static MoeHost *host_of(const MoeState *st) { return (MoeHost *)st->priv; }

void moe_state_free(MoeState *st, const Backend *be) {
    if (st && st->cpriv) { clustered_state_free(st, be); return; }
    if (!st || !st->priv) { if (st) memset(st, 0, sizeof *st); return; }
    MoeHost *hs = host_of(st);
    xfree(st->logits); xfree(st->probs); xfree(st->dlogits);
    xfree(st->topk_expert); xfree(st->topk_gate); xfree(st->pos);
    xfree(st->entry_token); xfree(st->entry_gate); xfree(st->expert_off);
    xfree(st->stats.counts); xfree(st->stats.counts_routed);
    xfree(hs->lse); xfree(hs->fcoef); xfree(hs->cnt); xfree(hs->cnt_all);
    xfree(hs->dgate_h); xfree(hs->dp); xfree(hs->entry_src);
    epp_free(&hs->x, be);
    dev_free(be, hs->yr);
    dev_free(be, hs->dev.logits); dev_free(be, hs->dev.dlogits); dev_free(be, hs->dev.pos);
    dev_free(be, hs->dev.gate); dev_free(be, hs->dev.entry_token);
    dev_free(be, hs->dev.entry_gate); dev_free(be, hs->dev.dgate);
    dev_free(be, st->xg); dev_free(be, st->yg); dev_free(be, st->dyg); dev_free(be, st->dxg);
    dev_free(be, st->h); dev_free(be, st->a); dev_free(be, st->da); dev_free(be, st->dh);
    xfree(hs);
    memset(st, 0, sizeof *st);
}

/* run every expert's FFN on its slice of the gathered rows: yg = act(xg W1_e) W2_e */
static int n_local_experts(const MoeLayer *ml) {
    return ml->kind == MOE_KIND_DENSE ? 1 : ml->ep->per_rank * ml->ep->K;
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

/* softmax rows with log-sum-exp (double accumulation), top-k by probability (ties: lower id).
 * moe.balance = aux_free (DeepSeek-V3's aux-loss-free balancing): top-k by logit + bias_e
 * instead; the bias only chooses, the gates are the unbiased probabilities of the chosen
 * experts (no gradient reaches the bias, which moe_update_bias moves after each step). */
static void route_topk(const MoeLayer *ml, MoeState *st, MoeHost *hs, int N) {
    int E = ml->E, k = ml->k;
    const float *bias = NULL;
    if (ml->cfg.balance == BALANCE_AUX_FREE) {
        ASSERTF(ml->cs && ml->cs->bias, "moe.balance=aux_free: layer %d has no selection bias", ml->index);
        bias = ml->cs->bias;
    }
    for (int t = 0; t < N; t++) {
        const float *l = st->logits + (size_t)t * E;
        float *p = st->probs + (size_t)t * E;
        float mx = l[0];
        for (int e = 1; e < E; e++) if (l[e] > mx) mx = l[e];
        double sum = 0;
        for (int e = 0; e < E; e++) sum += exp((double)l[e] - mx);
        for (int e = 0; e < E; e++) p[e] = (float)(exp((double)l[e] - mx) / sum);
        hs->lse[t] = mx + log(sum);
        int32_t *sel = st->topk_expert + (size_t)t * k;
        float *gate = st->topk_gate + (size_t)t * k;
        double gsum = 0;
        for (int s = 0; s < k; s++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int q = 0; q < s; q++) taken |= sel[q] == e;
                if (taken) continue;
                if (best < 0) best = e;
                else if (bias ? l[e] + bias[e] > l[best] + bias[best] : p[e] > p[best]) best = e;
            }
            sel[s] = best;
            gate[s] = p[best];
            gsum += p[best];
        }
        if (ml->cfg.renormalize && k > 1)
            for (int s = 0; s < k; s++) gate[s] = (float)(gate[s] / gsum);
    }
}

void moe_bias_step(float *bias, const double *load, int E, double gamma) {
    double mean = 0;
    for (int i = 0; i < E; i++) mean += load[i] / E;
    for (int i = 0; i < E; i++) {
        double d = mean - load[i];
        bias[i] += (float)(gamma * (d > 0 ? 1 : d < 0 ? -1 : 0));
    }
}

void moe_update_bias(const MoeLayer *ml, const MoeState *st) {
    if (ml->kind == MOE_KIND_DENSE || ml->cfg.balance != BALANCE_AUX_FREE) return;
    ASSERTF(ml->cs && ml->cs->bias, "moe.balance=aux_free: layer %d has no selection bias", ml->index);
    moe_bias_step(ml->cs->bias, st->stats.counts_routed, ml->E, ml->cfg.bias_gamma);
}

/* capacity over the global batch: queue order is slot-major (every token's first choice
 * before any second choice), then global token order (rank-major). Fills pos, the entries
 * sorted by expert, and the global counts. */
void moe_queue_bases(Comm *comm, const int32_t *cnt, int n_slots, int n_buckets,
                     int32_t **cnt_all, size_t *cnt_all_cap, long *base, double *total) {
    int P = comm->size;
    size_t per = (size_t)n_slots * n_buckets;
    if (*cnt_all_cap < (size_t)P * per) {
        xfree(*cnt_all);
        *cnt_all = xcalloc(sizeof(int32_t) * (size_t)P * per);
        *cnt_all_cap = (size_t)P * per;
    }
    comm_allgather_bytes(comm, cnt, *cnt_all, sizeof(int32_t) * per);
    for (int x = 0; x < n_buckets; x++) {
        long acc = 0;
        for (int s = 0; s < n_slots; s++) {
            long before = 0, tot = 0;
            for (int r = 0; r < P; r++) {
                long v = (*cnt_all)[(size_t)r * per + (size_t)s * n_buckets + x];
                if (r < comm->rank) before += v;
                tot += v;
            }
            base[s * n_buckets + x] = acc + before;
            acc += tot;
        }
        total[x] = (double)acc;
    }
}

void moe_gate_backward(int k, const int32_t *sel, const float *gate, const float *probs,
                       const double *dg, int renorm, double *inc) {
    if (!renorm) {
        for (int s = 0; s < k; s++) inc[s] = dg[s];
        return;
    }
    double Z = 0, dot = 0;
    for (int s = 0; s < k; s++) {
        Z += probs[sel[s]];
        dot += dg[s] * gate[s];
    }
    for (int s = 0; s < k; s++) inc[s] = (dg[s] - dot) / Z;
}

static void route_capacity(const MoeLayer *ml, Comm *comm, MoeState *st, MoeHost *hs, int N,
                           long n_global) {
    int E = ml->E, k = ml->k;
    memset(hs->cnt, 0, sizeof(int32_t) * k * E);
    for (int t = 0; t < N; t++)
        for (int s = 0; s < k; s++) hs->cnt[s * E + st->topk_expert[(size_t)t * k + s]]++;
    long cap = ml->cfg.dropless ? -1 : (long)ceil(ml->cfg.capacity_factor * (double)n_global * k / E);
    st->stats.capacity = cap;
    /* base[s][e]: queue position of this rank's first slot-s token for expert e */
    long *base = xcalloc(sizeof(long) * k * E);
    long *run = xcalloc(sizeof(long) * E);
    moe_queue_bases(comm, hs->cnt, k, E, &hs->cnt_all, &hs->cnt_all_cap, base, st->stats.counts_routed);
    for (int e = 0; e < E; e++) {
        double acc = st->stats.counts_routed[e];
        st->stats.counts[e] = cap < 0 || acc <= cap ? acc : (double)cap;
    }
    /* keep decision (pos 0 = kept, -1 = dropped); epx_plan turns kept pairs into entries */
    for (int s = 0; s < k; s++) {
        memset(run, 0, sizeof(long) * E);
        for (int t = 0; t < N; t++) {
            int e = st->topk_expert[(size_t)t * k + s];
            long q = base[s * E + e] + run[e]++;
            int keep = cap < 0 || q < cap;
            st->pos[(size_t)t * k + s] = keep ? 0 : -1;
        }
    }
    double routed = 0, total_kept = 0;
    for (int e = 0; e < E; e++) { routed += st->stats.counts_routed[e]; total_kept += st->stats.counts[e]; }
    st->stats.dropped_frac = routed > 0 ? (routed - total_kept) / routed : 0;
    xfree(base); xfree(run);
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
    int D = ml->D, E = ml->E, k = ml->k;
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
    /* router logits [N,E] = x [N,D] Wr [D,E] */
    be->ops->gemm(be->ctx, false, false, N, E, D, 1.0f, x, D, p->router, E, 0.0f, hs->dev.logits, E);
    be->ops->to_host(be->ctx, st->logits, hs->dev.logits, sizeof(float) * N * E);
    route_topk(ml, st, hs, N);
    route_capacity(ml, comm, st, hs, N, n_global);

    /* aux loss alpha*E*sum f_i P_i with global f (routed pairs / (n_global k)) and P (mean prob);
     * z-loss beta * mean lse^2. One allreduce of E+1 doubles. */
    double *red = xcalloc(sizeof(double) * (E + 1));
    for (int t = 0; t < N; t++) {
        const float *pr = st->probs + (size_t)t * E;
        for (int e = 0; e < E; e++) red[e] += pr[e];
        red[E] += hs->lse[t] * hs->lse[t];
    }
    comm_allreduce_sum_f64(comm, red, E + 1);
    double aux = 0, alpha = ml->cfg.balance == BALANCE_AUX ? ml->cfg.aux_loss_coef : 0;   /* aux_free: bias instead */
    for (int e = 0; e < E; e++) {
        double f = st->stats.counts_routed[e] / ((double)n_global * k);
        double P = red[e] / (double)n_global;
        aux += f * P;
        hs->fcoef[e] = alpha * E * f / (double)n_global;
    }
    st->stats.aux_loss = alpha * E * aux;
    st->stats.z_loss = ml->cfg.z_loss_coef * red[E] / (double)n_global;
    hs->z_coef = 2.0 * ml->cfg.z_loss_coef / (double)n_global;
    xfree(red);

    /* dispatch: each token once per destination rank of its kept experts; pos becomes the
     * index of the pair's entry in the sent order (where its dgate comes back) */
    EpPath *XP = &hs->x;
    epp_plan(XP, ml->ep, be, comm, N, k, st->topk_expert, st->pos, st->topk_gate);
    for (size_t ts = 0; ts < (size_t)N * k; ts++) st->pos[ts] = XP->a.ts_entry[ts];
    epp_send_rows(XP, be, comm, x);
    const EpX *X = epp_final(XP);
    recv_entries(ml, st, hs);
    int M = st->M;
    if (ml->need) {
        int El = n_local_experts(ml), nu = 0;
        int32_t *units = xmalloc(sizeof(int32_t) * (El ? El : 1));
        for (int e = 0; e < El; e++) if (st->expert_off[e + 1] > st->expert_off[e]) units[nu++] = e;
        Status rs = ml->need(ml->need_ctx, ml->index, units, nu);
        ASSERTF(STATUS_OK(rs), "%s", rs.msg);
        xfree(units);
    }
    be->ops->from_host(be->ctx, hs->dev.entry_token, st->entry_token, sizeof(int32_t) * (M ? M : 1));
    be->ops->from_host(be->ctx, hs->dev.entry_gate, st->entry_gate, sizeof(float) * (M ? M : 1));
    be->ops->gather_rows(be->ctx, st->xg, X->rbuf, hs->dev.entry_token, M, D);
    experts_forward(ml, be, p, st->expert_off, st->xg, st->h, st->a, st->yg);
    /* one gated sum per received row, sent back and added to its token */
    be->ops->zero(be->ctx, hs->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    be->ops->scatter_add_rows(be->ctx, hs->yr, st->yg, hs->dev.entry_token, hs->dev.entry_gate, M, D);
    be->ops->zero(be->ctx, out, sizeof(float) * N * D);
    epp_return_combine(XP, be, comm, hs->yr, out);
}

void moe_backward(const MoeLayer *ml, const Backend *be, Comm *comm, const MoeParams *p, MoeParams *g,
                  MoeState *st, float *dx, const float *dout, const float *x) {
    int N = st->N, D = ml->D, E = ml->E, k = ml->k, M = st->M;
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
    epp_send_rows(XP, be, comm, dout);
    EpX *X = XP->two_level ? &XP->b : &XP->a;
    /* dgate[i] = <dout row_i, yg_i>;  dyg_i = gate_i * dout row_i */
    be->ops->gather_dot(be->ctx, hs->dev.dgate, X->rbuf, st->yg, hs->dev.entry_token, M, D);
    be->ops->gather_rows_scaled(be->ctx, st->dyg, X->rbuf, hs->dev.entry_token, hs->dev.entry_gate, M, D);
    experts_backward(ml, be, p, g, st, st->expert_off, st->xg, st->dyg, st->dxg, 0.0f);
    be->ops->zero(be->ctx, hs->yr, sizeof(float) * (size_t)(X->n_rrows ? X->n_rrows : 1) * D);
    be->ops->scatter_add_rows(be->ctx, hs->yr, st->dxg, hs->dev.entry_token, NULL, M, D);
    epp_return_combine(XP, be, comm, hs->yr, dx);
    be->ops->to_host(be->ctx, hs->dgate_h, hs->dev.dgate, sizeof(float) * (M ? M : 1));
    for (int i = 0; i < M; i++) X->rval[hs->entry_src[i]] = hs->dgate_h[i];
    epp_return_scalars(XP, comm, X->rval);

    /* router: gates -> probs -> logits */
    float *dp = hs->dp;
    for (int t = 0; t < N; t++) {
        const float *pr = st->probs + (size_t)t * E;
        float *dpt = dp + (size_t)t * E;
        for (int e = 0; e < E; e++) dpt[e] = (float)hs->fcoef[e];
        const int32_t *sel = st->topk_expert + (size_t)t * k;
        const float *gate = st->topk_gate + (size_t)t * k;
        const int32_t *pos = st->pos + (size_t)t * k;
        double dg[64], inc[64];
        for (int s = 0; s < k; s++) dg[s] = pos[s] >= 0 ? XP->a.sval[pos[s]] : 0.0;
        moe_gate_backward(k, sel, gate, pr, dg, ml->cfg.renormalize && k > 1, inc);
        for (int s = 0; s < k; s++) dpt[sel[s]] += (float)inc[s];
        /* softmax backward + z-loss */
        double s_pd = 0;
        for (int e = 0; e < E; e++) s_pd += (double)pr[e] * dpt[e];
        float *dl = st->dlogits + (size_t)t * E;
        double zc = hs->z_coef * hs->lse[t];
        for (int e = 0; e < E; e++) dl[e] = (float)(pr[e] * ((double)dpt[e] - s_pd) + zc * pr[e]);
    }
    be->ops->from_host(be->ctx, hs->dev.dlogits, st->dlogits, sizeof(float) * N * E);
    /* dWr [D,E] += x^T dlogits;  dx [N,D] += dlogits Wr^T */
    be->ops->gemm(be->ctx, true, false, D, E, N, 1.0f, x, D, hs->dev.dlogits, E, 1.0f, g->router, E);
    be->ops->gemm(be->ctx, false, true, N, D, E, 1.0f, hs->dev.dlogits, E, p->router, E, 1.0f, dx, D);
}
