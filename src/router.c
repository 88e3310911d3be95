/* router.c: routing of the standard and clustered MoE layers (see router.h).
 * Legend: N E k G K TG = tokens on this rank, experts, experts per token, groups (0 = one
 * stage), experts per group, groups per token.
 * The arithmetic of each stage is kept exactly as the layers had it (the reference and
 * bitwise tests pin it), which is why the one- and two-stage paths of router_losses and
 * router_backward differ in operation order. The per-token selection and backward live in
 * cuda/route_common.h (shared with the backends' routing slots); node-limited routing, the
 * preferred units and the host capacity stay here; router_capacity_dev runs the capacity
 * through the backend's route_count / route_keep / route_pair_keep. */
#include "router.h"
#include "route_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void router_init(Route *r, int n_max, int E, int k, int G, int TG) {
    memset(r, 0, sizeof *r);
    size_t N = (size_t)n_max, Ms = N * k;
    r->n_max = n_max; r->E = E; r->k = k; r->G = G; r->TG = G > 0 ? TG : 0;
    r->K = G > 0 ? E / G : 1;
    r->logits = xcalloc(sizeof(float) * N * E);
    r->probs = xcalloc(sizeof(float) * N * E);
    r->lse = xcalloc(sizeof(double) * N);
    r->expert = xcalloc(sizeof(int32_t) * Ms);
    r->gate = xcalloc(sizeof(float) * Ms);
    r->pos = xcalloc(sizeof(int32_t) * Ms);
    r->dgate = xcalloc(sizeof(float) * Ms);
    r->dlogits = xcalloc(sizeof(float) * N * E);
    r->fcoef_e = xcalloc(sizeof(double) * E);
    r->fcoef = xcalloc(sizeof(double) * (size_t)(E + (G > 0 ? G : 0)));
    int slots = k > r->TG ? k : r->TG, buckets = E > G ? E : G;
    r->cnt = xcalloc(sizeof(int32_t) * (size_t)slots * buckets);
    if (G > 0) {
        r->q = xcalloc(sizeof(float) * N * G);
        r->group = xcalloc(sizeof(int32_t) * N * TG);
        r->gtop2 = xcalloc(sizeof(int32_t) * N * G * 2);
        r->gkeep = xcalloc(sizeof(int32_t) * N * TG);
        r->fcoef_g = xcalloc(sizeof(double) * G);
        r->lsel = xcalloc(sizeof(float) * N * G);
    }
}

void router_free(Route *r) {
    if (!r) return;
    void *a[] = {r->logits, r->probs, r->lse, r->expert, r->gate, r->pos, r->dgate, r->dlogits, r->fcoef_e,
                 r->fcoef, r->lsel, r->cnt, r->cnt_all, r->q, r->group, r->gtop2, r->gkeep, r->fcoef_g};
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++) xfree(a[i]);
    memset(r, 0, sizeof *r);
}

void router_stats_init(RouteStats *s, int E, int G) {
    memset(s, 0, sizeof *s);
    s->counts = xcalloc(sizeof(double) * E);
    s->counts_routed = xcalloc(sizeof(double) * E);
    s->counts_selected = xcalloc(sizeof(double) * E);
    if (G > 0) s->group_counts = xcalloc(sizeof(double) * G);
}

void router_stats_free(RouteStats *s) {
    if (!s) return;
    xfree(s->counts); xfree(s->counts_routed); xfree(s->counts_selected); xfree(s->group_counts);
    memset(s, 0, sizeof *s);
}

/* ---- selection ---- */

/* ---- nodes ---- */

int router_nodes_active(const RouteNodes *nd) {
    return nd && nd->expert_node && ((nd->max_nodes > 0 && nd->n_nodes > nd->max_nodes) || nd->home_bias != 0.0f);
}

/* the node filter of one token: score [n_units] selection scores (home bias already added),
 * node_of [n_units], m units counted per node; keeps the M nodes with the highest sum of their
 * best m scores (ties: lower node), allowed[u] = 1 for units on them. Without a limit every
 * unit is allowed. */
static void node_filter(const RouteNodes *nd, const float *score, const int32_t *node_of, int n_units, int m,
                        int8_t *allowed) {
    int M = nd->max_nodes, Nn = nd->n_nodes;
    if (M <= 0 || Nn <= M) { memset(allowed, 1, (size_t)n_units); return; }
    float best[64][16];
    int cnt[64];
    ASSERTF(Nn <= 64 && m <= 16, "node-limited routing supports at most 64 nodes and 16 units per node score");
    for (int n = 0; n < Nn; n++) cnt[n] = 0;
    /* per node: its m best scores (insertion into a short sorted list) */
    for (int u = 0; u < n_units; u++) {
        int n = node_of[u], c = cnt[n];
        float v = score[u];
        if (c < m) cnt[n]++;
        else if (v <= best[n][m - 1]) continue;
        int j = c < m ? c : m - 1;
        while (j > 0 && best[n][j - 1] < v) { best[n][j] = best[n][j - 1]; j--; }
        best[n][j] = v;
    }
    double ns[64];
    for (int n = 0; n < Nn; n++) {
        ns[n] = 0;
        for (int j = 0; j < cnt[n]; j++) ns[n] += best[n][j];
        if (!cnt[n]) ns[n] = -INFINITY;
    }
    int8_t keep[64] = {0};
    for (int j = 0; j < M; j++) {
        int b = -1;
        for (int n = 0; n < Nn; n++)
            if (!keep[n] && cnt[n] && (b < 0 || ns[n] > ns[b])) b = n;
        if (b >= 0) keep[b] = 1;
    }
    for (int u = 0; u < n_units; u++) allowed[u] = keep[node_of[u]];
}

/* one stage with nodes: selection score = logit (+ aux-free bias) (+ home bias), node filter
 * over experts (m = ceil(k / M)), top-k among the allowed experts; gates as select_one_stage */
static void select_one_stage_nodes(Route *r, const MoeConfig *mc, const float *bias, const RouteNodes *nd, int N) {
    int E = r->E, k = r->k, M = nd->max_nodes;
    int m = M > 0 ? (k + M - 1) / M : 1;
    float *score = xmalloc(sizeof(float) * E);
    int8_t *allowed = xmalloc((size_t)E);
    for (int t = 0; t < N; t++) {
        const float *l = r->logits + (size_t)t * E;
        float *p = r->probs + (size_t)t * E;
        r->lse[t] = rc_softmax_row(l, p, E);
        for (int e = 0; e < E; e++)
            score[e] = l[e] + (bias ? bias[e] : 0.0f) + (nd->expert_node[e] == nd->home ? nd->home_bias : 0.0f);
        node_filter(nd, score, nd->expert_node, E, m, allowed);
        int32_t *sel = r->expert + (size_t)t * k;
        float *gate = r->gate + (size_t)t * k;
        double gsum = 0;
        for (int s = 0; s < k; s++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                if (!allowed[e]) continue;
                int taken = 0;
                for (int q = 0; q < s; q++) taken |= sel[q] == e;
                if (taken) continue;
                if (best < 0 || score[e] > score[best]) best = e;
            }
            ASSERTF(best >= 0, "node-limited routing: fewer than top_k=%d experts on the chosen nodes", k);
            sel[s] = best;
            gate[s] = p[best];
            gsum += p[best];
        }
        if (mc->renormalize && k > 1)
            for (int s = 0; s < k; s++) gate[s] = (float)(gate[s] / gsum);
    }
    xfree(score);
    xfree(allowed);
}

/* the host Route's arrays as the backends' routing arguments */
RouteSelArgs router_sel_args(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N) {
    RouteSelArgs a = {.N = N, .E = r->E, .k = r->k, .G = r->G, .K = r->K, .TG = r->TG,
                      .renorm = mc->renormalize && r->k > 1,
                      .score_top2 = mc->group_score == GROUP_SCORE_TOP2 && r->K >= 2,
                      .gate_product = mc->group_gate == GROUP_GATE_PRODUCT,
                      .logits = r->logits, .bias = bias, .members = members, .probs = r->probs, .lse = r->lse,
                      .expert = r->expert, .gate = r->gate, .q = r->q, .group = r->group, .gtop2 = r->gtop2,
                      .lsel = r->lsel, .sums = NULL};
    return a;
}

/* one stage: softmax rows with log-sum-exp (double accumulation), top-k by probability (ties:
 * lower id), or by logit + bias_e with aux_free bias (the gates stay the unbiased probs) */
static void select_one_stage(Route *r, const MoeConfig *mc, const float *bias, int N) {
    RouteSelArgs a = router_sel_args(r, mc, bias, NULL, N);
    for (int t = 0; t < N; t++) rc_select_one(&a, t);
}

#define better rc_better

/* two stages for every token: group scores, group softmax q, chosen groups, in-group
 * softmax, top-k experts and gates. Selection uses logits + bias; probabilities never do. */
static void select_two_stage(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                             const RouteNodes *nd) {
    int G = r->G, K = r->K, TG = r->TG;
    int32_t gnode[4096];
    int8_t gallow[4096];
    ASSERTF(G <= 4096 && r->E <= 4096, "clustered routing supports at most 4096 experts");
    int use_nodes = router_nodes_active(nd);
    int mg = use_nodes && nd->max_nodes > 0 ? (TG + nd->max_nodes - 1) / nd->max_nodes : 1;
    if (use_nodes)   /* a group's members live on one rank: the group's node is its first member's */
        for (int g = 0; g < G; g++) gnode[g] = nd->expert_node[members[(size_t)g * K]];
    RouteSelArgs a = router_sel_args(r, mc, bias, members, N);
    for (int t = 0; t < N; t++) {
        rc_two_scores(&a, t);
        /* stage 1 with nodes: home bias, then only groups on the token's chosen nodes */
        if (use_nodes) {
            float *lsel = r->lsel + (size_t)t * G;
            for (int g = 0; g < G; g++) if (gnode[g] == nd->home) lsel[g] += nd->home_bias;
            node_filter(nd, lsel, gnode, G, mg, gallow);
        }
        int rc = rc_two_choose(&a, t, use_nodes ? gallow : NULL);
        ASSERTF(rc == 0, "node-limited routing: fewer than top_groups=%d groups on the chosen nodes", TG);
    }
}

void router_select(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                   const RouteNodes *nodes) {
    ASSERTF(N <= r->n_max, "router_select: %d tokens > capacity %d", N, r->n_max);
    r->N = N;
    if (r->G > 0) select_two_stage(r, mc, bias, members, N, nodes);
    else if (router_nodes_active(nodes)) select_one_stage_nodes(r, mc, bias, nodes, N);
    else select_one_stage(r, mc, bias, N);
}

void router_preferred(const Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                      int n_pref, int32_t *out) {
    int E = r->E, G = r->G, K = r->K;
    int n_units = G > 0 ? G : E;
    ASSERTF(n_pref >= 1 && n_pref <= n_units, "router_preferred: %d preferred of %d units", n_pref, n_units);
    float *sc = xmalloc(sizeof(float) * (size_t)n_units), *sel = xmalloc(sizeof(float) * (size_t)E);
    for (int t = 0; t < N; t++) {
        const float *l = r->logits + (size_t)t * E;
        for (int i = 0; i < E; i++) sel[i] = l[i] + (bias ? bias[i] : 0.0f);
        if (G > 0) {   /* the group selection score of select_two_stage, without the home bias */
            for (int g = 0; g < G; g++) {
                const int32_t *mem = members + (size_t)g * K;
                if (mc->group_score == GROUP_SCORE_TOP2 && K >= 2) {
                    int b0 = -1, b1 = -1;
                    for (int j = 0; j < K; j++) {
                        int i = mem[j];
                        if (b0 < 0 || better(sel[i], i, sel[b0], b0)) { b1 = b0; b0 = i; }
                        else if (b1 < 0 || better(sel[i], i, sel[b1], b1)) b1 = i;
                    }
                    sc[g] = sel[b0] + sel[b1];
                } else {
                    double s2 = 0;
                    for (int j = 0; j < K; j++) s2 += sel[mem[j]];
                    sc[g] = (float)(s2 / K);
                }
            }
        } else memcpy(sc, sel, sizeof(float) * (size_t)E);
        int32_t *o = out + (size_t)t * n_pref;
        for (int j = 0; j < n_pref; j++) {
            int best = -1;
            for (int u = 0; u < n_units; u++) {
                int taken = 0;
                for (int q = 0; q < j; q++) taken |= o[q] == u;
                if (!taken && (best < 0 || better(sc[u], u, sc[best], best))) best = u;
            }
            o[j] = best;
        }
    }
    xfree(sc);
    xfree(sel);
}

void router_nodes_touched(Route *r, const RouteNodes *nodes) {
    r->nodes_sum = 0;
    r->nodes_over = 0;
    if (!nodes || !nodes->expert_node) return;
    for (int t = 0; t < r->N; t++) {
        uint64_t mask = 0;
        for (int s = 0; s < r->k; s++) {
            int n = nodes->expert_node[r->expert[(size_t)t * r->k + s]];
            mask |= (uint64_t)1 << (n < 63 ? n : 63);
        }
        int c = __builtin_popcountll(mask);
        r->nodes_sum += c;
        r->nodes_over += nodes->max_nodes > 0 && c > nodes->max_nodes;
    }
}

/* ---- capacity ---- */

/* Capacity queues over the global batch: cnt [n_slots, n_buckets] holds this rank's counts
 * per top-k slot and bucket (expert or group); every rank's counts are gathered; base
 * [n_slots, n_buckets] gets the queue position of this rank's first item (slot-major: every
 * token's first choice before any second choice, then rank-major token order) and total
 * [n_buckets] the global count. */
static void queue_bases(Route *r, Comm *comm, int n_slots, int n_buckets, long *base, double *total) {
    int P = comm->size;
    size_t per = (size_t)n_slots * n_buckets;
    if (r->cnt_all_cap < (size_t)P * per) {
        xfree(r->cnt_all);
        r->cnt_all = xcalloc(sizeof(int32_t) * (size_t)P * per);
        r->cnt_all_cap = (size_t)P * per;
    }
    comm_allgather_bytes(comm, r->cnt, r->cnt_all, sizeof(int32_t) * per);
    for (int x = 0; x < n_buckets; x++) {
        long acc = 0;
        for (int s = 0; s < n_slots; s++) {
            long before = 0, tot = 0;
            for (int q = 0; q < P; q++) {
                long v = r->cnt_all[(size_t)q * per + (size_t)s * n_buckets + x];
                if (q < comm->rank) before += v;
                tot += v;
            }
            base[s * n_buckets + x] = acc + before;
            acc += tot;
        }
        total[x] = (double)acc;
    }
}

/* group level: gkeep, group counts; the pairs of a dropped (token, group) get pos -1 */
static void capacity_groups(Route *r, const MoeConfig *mc, Comm *comm, const int32_t *group_of, long n_global,
                            RouteStats *st, long *base, long *run) {
    int G = r->G, k = r->k, TG = r->TG, N = r->N;
    long cap_g = mc->dropless ? -1 : (long)ceil(mc->group_capacity_factor * (double)n_global * TG / G);
    memset(r->cnt, 0, sizeof(int32_t) * TG * G);
    for (int t = 0; t < N; t++)
        for (int j = 0; j < TG; j++) r->cnt[j * G + r->group[(size_t)t * TG + j]]++;
    queue_bases(r, comm, TG, G, base, st->group_counts);
    double g_routed = 0, g_kept = 0;
    for (int g = 0; g < G; g++) {
        g_routed += st->group_counts[g];
        g_kept += cap_g < 0 || st->group_counts[g] <= cap_g ? st->group_counts[g] : cap_g;
    }
    st->group_dropped_frac = g_routed > 0 ? (g_routed - g_kept) / g_routed : 0;
    for (int j = 0; j < TG; j++) {
        memset(run, 0, sizeof(long) * G);
        for (int t = 0; t < N; t++) {
            int g = r->group[(size_t)t * TG + j];
            long qpos = base[j * G + g] + run[g]++;
            r->gkeep[(size_t)t * TG + j] = cap_g < 0 || qpos < cap_g;
        }
    }
    for (int t = 0; t < N; t++)
        for (int s = 0; s < k; s++) {
            int g = group_of[r->expert[(size_t)t * k + s]], ok = 0;
            for (int j = 0; j < TG; j++) ok |= r->group[(size_t)t * TG + j] == g && r->gkeep[(size_t)t * TG + j];
            r->pos[(size_t)t * k + s] = ok ? 0 : -1;
        }
}

/* per-expert kept counts after capacity cap_e (< 0: dropless) from the pairs offered to each
 * expert, and the dropped fraction */
static void expert_kept_stats(RouteStats *st, int E, long cap_e) {
    double routed = 0, kept_total = 0;
    for (int e = 0; e < E; e++) {
        double a = st->counts_routed[e];
        st->counts[e] = cap_e < 0 || a <= cap_e ? a : (double)cap_e;
        routed += a;
        kept_total += st->counts[e];
    }
    st->dropped_frac = routed > 0 ? (routed - kept_total) / routed : 0;
}

void router_capacity(Route *r, const MoeConfig *mc, Comm *comm, const int32_t *group_of, long n_global,
                     RouteStats *st) {
    int E = r->E, G = r->G, k = r->k, N = r->N;
    long cap_e = mc->dropless ? -1 : (long)ceil(mc->capacity_factor * (double)n_global * k / E);
    st->capacity = cap_e;
    int slots = k > r->TG ? k : r->TG, buckets = E > G ? E : G;
    long *base = xcalloc(sizeof(long) * (size_t)slots * buckets);
    long *run = xcalloc(sizeof(long) * buckets);
    if (G > 0) capacity_groups(r, mc, comm, group_of, n_global, st, base, run);
    else memset(r->pos, 0, sizeof(int32_t) * (size_t)N * k);
    /* expert level, on the pairs whose group survived. counts_routed = pairs offered to each
     * expert (the f_i of the balance loss and the load metrics); counts = after capacity */
    memset(r->cnt, 0, sizeof(int32_t) * k * E);
    for (int t = 0; t < N; t++)
        for (int s = 0; s < k; s++)
            if (r->pos[(size_t)t * k + s] >= 0) r->cnt[s * E + r->expert[(size_t)t * k + s]]++;
    queue_bases(r, comm, k, E, base, st->counts_routed);
    expert_kept_stats(st, E, cap_e);
    for (int s = 0; s < k; s++) {
        memset(run, 0, sizeof(long) * E);
        for (int t = 0; t < N; t++) {
            size_t ts = (size_t)t * k + s;
            if (r->pos[ts] < 0) continue;
            int e = r->expert[ts];
            long qpos = base[s * E + e] + run[e]++;
            if (cap_e >= 0 && qpos >= cap_e) r->pos[ts] = -1;
        }
    }
    xfree(base); xfree(run);
}

/* the backend-side capacity: the same queues as router_capacity, with the counting and the
 * keep decisions on backend arrays (only the counts come to the host, for the gather) */
static void dev_queue(Route *r, Comm *comm, const Backend *be, const RouteCapDev *d, const int32_t *ids,
                      const int32_t *valid, int N, int n_slots, int n_buckets, long *base, int64_t *base64, double *total) {
    size_t per = (size_t)n_slots * n_buckets;
    be->ops->route_count(be->ctx, d->cnt, ids, valid, N, n_slots, n_buckets);
    be->ops->to_host(be->ctx, r->cnt, d->cnt, sizeof(int32_t) * per);
    queue_bases(r, comm, n_slots, n_buckets, base, total);
    for (size_t i = 0; i < per; i++) base64[i] = base[i];
    be->ops->from_host(be->ctx, d->base, base64, sizeof(int64_t) * per);
}

void router_capacity_dev(Route *r, const MoeConfig *mc, Comm *comm, const Backend *be, const RouteCapDev *d,
                         long n_global, RouteStats *st) {
    int E = r->E, G = r->G, k = r->k, TG = r->TG, N = r->N;
    long cap_e = mc->dropless ? -1 : (long)ceil(mc->capacity_factor * (double)n_global * k / E);
    st->capacity = cap_e;
    int slots = k > TG ? k : TG, buckets = E > G ? E : G;
    long *base = xcalloc(sizeof(long) * (size_t)slots * buckets);
    int64_t *base64 = xcalloc(sizeof(int64_t) * (size_t)slots * buckets);
    if (G > 0) {
        /* group level: gkeep 0 kept / -1 dropped, then the pairs of a dropped (token, group) */
        long cap_g = mc->dropless ? -1 : (long)ceil(mc->group_capacity_factor * (double)n_global * TG / G);
        dev_queue(r, comm, be, d, d->group, NULL, N, TG, G, base, base64, st->group_counts);
        double g_routed = 0, g_kept = 0;
        for (int g = 0; g < G; g++) {
            g_routed += st->group_counts[g];
            g_kept += cap_g < 0 || st->group_counts[g] <= cap_g ? st->group_counts[g] : cap_g;
        }
        st->group_dropped_frac = g_routed > 0 ? (g_routed - g_kept) / g_routed : 0;
        be->ops->zero(be->ctx, d->gkeep, sizeof(int32_t) * (size_t)(N ? N : 1) * TG);
        be->ops->route_keep(be->ctx, d->gkeep, d->group, d->base, cap_g, N, TG, G);
        be->ops->route_pair_keep(be->ctx, d->pos, d->expert, d->group, d->gkeep, d->group_of, N, k, TG);
    } else be->ops->zero(be->ctx, d->pos, sizeof(int32_t) * (size_t)(N ? N : 1) * k);
    /* expert level, on the pairs whose group survived */
    dev_queue(r, comm, be, d, d->expert, d->pos, N, k, E, base, base64, st->counts_routed);
    expert_kept_stats(st, E, cap_e);
    be->ops->route_keep(be->ctx, d->pos, d->expert, d->base, cap_e, N, k, E);
    xfree(base);
    xfree(base64);
}

/* ---- losses ---- */

void router_losses(Route *r, const MoeConfig *mc, Comm *comm, long n_global, RouteStats *st) {
    router_losses_sums(r, mc, comm, n_global, st, NULL);
}

void router_losses_sums(Route *r, const MoeConfig *mc, Comm *comm, long n_global, RouteStats *st, const double *sums) {
    int E = r->E, G = r->G, k = r->k, TG = r->TG, N = r->N;
    /* global P_i (mean prob), group q, and sum lse^2: one allreduce of E + G + 1 doubles */
    double *red = xcalloc(sizeof(double) * (2 * E + G + 3));
    if (sums) memcpy(red, sums, sizeof(double) * (size_t)(E + G + 1));
    else
        for (int t = 0; t < N; t++) {
            for (int i = 0; i < E; i++) red[i] += r->probs[(size_t)t * E + i];
            for (int g = 0; g < G; g++) red[E + g] += r->q[(size_t)t * G + g];
            red[E + G] += r->lse[t] * r->lse[t];
        }
    red[E + G + 1] = r->nodes_sum;      /* the node counts and selections ride along (element-wise sums) */
    red[E + G + 2] = r->nodes_over;
    for (size_t q = 0; q < (size_t)N * r->k; q++) red[E + G + 3 + r->expert[q]] += 1;
    comm_allreduce_sum_f64(comm, red, 2 * E + G + 3);
    st->nodes_mean = red[E + G + 1] / (double)n_global;
    st->nodes_over = red[E + G + 2];
    for (int i = 0; i < E; i++) st->counts_selected[i] = red[E + G + 3 + i];
    int aux = mc->balance == BALANCE_AUX;       /* aux_free: the bias balances instead */
    double a_e = aux ? mc->aux_loss_coef : 0, a_g = aux ? mc->group_aux_coef : 0;
    double le = 0, lg = 0;
    for (int i = 0; i < E; i++) {
        double f = st->counts_routed[i] / ((double)n_global * k);
        if (G > 0) le += f * red[i] / (double)n_global;
        else le += f * (red[i] / (double)n_global);
        r->fcoef_e[i] = a_e * E * f / (double)n_global;
    }
    for (int g = 0; g < G; g++) {
        double f = st->group_counts[g] / ((double)n_global * TG);
        lg += f * red[E + g] / (double)n_global;
        r->fcoef_g[g] = a_g * G * f / (double)n_global;
    }
    st->aux_loss = G > 0 ? a_e * E * le + a_g * G * lg : a_e * E * le;
    st->group_aux_loss = a_g * G * lg;
    st->z_loss = mc->z_loss_coef * red[E + G] / (double)n_global;
    r->z_coef = 2.0 * mc->z_loss_coef / (double)n_global;
    xfree(red);
}

/* ---- backward ---- */

/* the host Route's arrays as the backends' backward arguments (fcoef: [E + G], the Route's
 * fcoef_e then fcoef_g copied into r->fcoef) */
RouteBwdArgs router_bwd_args(Route *r, const MoeConfig *mc, const int32_t *members, const float *dgate) {
    int E = r->E, G = r->G;
    for (int i = 0; i < E; i++) r->fcoef[i] = r->fcoef_e[i];
    for (int g = 0; g < G; g++) r->fcoef[E + g] = r->fcoef_g[g];
    RouteBwdArgs a = {.N = r->N, .E = E, .k = r->k, .G = G, .K = r->K, .TG = r->TG,
                      .renorm = mc->renormalize && r->k > 1,
                      .score_top2 = mc->group_score == GROUP_SCORE_TOP2 && r->K >= 2,
                      .gate_product = mc->group_gate == GROUP_GATE_PRODUCT,
                      .logits = r->logits, .probs = r->probs, .gate = r->gate, .q = r->q, .lse = r->lse,
                      .expert = r->expert, .group = r->group, .gtop2 = r->gtop2, .members = members,
                      .fcoef = r->fcoef, .z_coef = r->z_coef, .dgate = dgate, .dlogits = r->dlogits};
    return a;
}

void router_backward(Route *r, const MoeConfig *mc, const int32_t *members, const float *dgate) {
    ASSERTF(r->k <= RC_MAX_K && r->TG <= RC_MAX_K, "router_backward: top-k %d or top groups %d > %d", r->k, r->TG, RC_MAX_K);
    RouteBwdArgs a = router_bwd_args(r, mc, members, dgate);
    for (int t = 0; t < r->N; t++) {
        if (r->G > 0) rc_backward_two(&a, t);
        else rc_backward_one(&a, t);
    }
}

void router_bias_step(float *bias, const double *load, int E, double gamma) {
    double mean = 0;
    for (int i = 0; i < E; i++) mean += load[i] / E;
    for (int i = 0; i < E; i++) {
        double d = mean - load[i];
        bias[i] += (float)(gamma * (d > 0 ? 1 : d < 0 ? -1 : 0));
    }
}
