/* router.c: routing of the standard and clustered MoE layers (see router.h).
 * Legend: N E k G K TG = tokens on this rank, experts, experts per token, groups (0 = one
 * stage), experts per group, groups per token.
 * The arithmetic of each stage is kept exactly as the layers had it (the reference and
 * bitwise tests pin it), which is why the one- and two-stage paths of router_losses and
 * router_backward differ in operation order. */
#include "router.h"

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
    r->dpf = xcalloc(sizeof(float) * E);
    r->dpd = xcalloc(sizeof(double) * (size_t)(E > G ? E : G));
    int slots = k > r->TG ? k : r->TG, buckets = E > G ? E : G;
    r->cnt = xcalloc(sizeof(int32_t) * (size_t)slots * buckets);
    if (G > 0) {
        r->q = xcalloc(sizeof(float) * N * G);
        r->group = xcalloc(sizeof(int32_t) * N * TG);
        r->gtop2 = xcalloc(sizeof(int32_t) * N * G * 2);
        r->gkeep = xcalloc(sizeof(int32_t) * N * TG);
        r->fcoef_g = xcalloc(sizeof(double) * G);
    }
}

void router_free(Route *r) {
    if (!r) return;
    void *a[] = {r->logits, r->probs, r->lse, r->expert, r->gate, r->pos, r->dgate, r->dlogits, r->fcoef_e,
                 r->dpf, r->dpd, r->cnt, r->cnt_all, r->q, r->group, r->gtop2, r->gkeep, r->fcoef_g};
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

/* p[E] = softmax(l[E]) with double accumulation; returns the log-sum-exp */
static double softmax_row(const float *l, float *p, int E) {
    float mx = l[0];
    for (int e = 1; e < E; e++) if (l[e] > mx) mx = l[e];
    double sum = 0;
    for (int e = 0; e < E; e++) sum += exp((double)l[e] - mx);
    for (int e = 0; e < E; e++) p[e] = (float)(exp((double)l[e] - mx) / sum);
    return mx + log(sum);
}

/* ---- nodes ---- */

static int nodes_active(const RouteNodes *nd) {
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
        r->lse[t] = softmax_row(l, p, E);
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

/* one stage: softmax rows with log-sum-exp (double accumulation), top-k by probability (ties:
 * lower id), or by logit + bias_e with aux_free bias (the gates stay the unbiased probs) */
static void select_one_stage(Route *r, const MoeConfig *mc, const float *bias, int N) {
    int E = r->E, k = r->k;
    for (int t = 0; t < N; t++) {
        const float *l = r->logits + (size_t)t * E;
        float *p = r->probs + (size_t)t * E;
        r->lse[t] = softmax_row(l, p, E);
        int32_t *sel = r->expert + (size_t)t * k;
        float *gate = r->gate + (size_t)t * k;
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
        if (mc->renormalize && k > 1)
            for (int s = 0; s < k; s++) gate[s] = (float)(gate[s] / gsum);
    }
}

static int better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

/* index j of the chosen group gs[j] that holds expert e (members [G, K]), -1 if none */
static int group_pos(const int32_t *members, int K, const int32_t *gs, int TG, int e) {
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++)
            if (members[(size_t)gs[j] * K + q] == e) return j;
    return -1;
}

/* two stages for every token: group scores, group softmax q, chosen groups, in-group
 * softmax, top-k experts and gates. Selection uses logits + bias; probabilities never do. */
static void select_two_stage(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                             const RouteNodes *nd) {
    int E = r->E, G = r->G, K = r->K, k = r->k, TG = r->TG;
    float lam[4096], lsel[4096], sel[4096];
    int32_t gnode[4096];
    int8_t gallow[4096];
    ASSERTF(G <= 4096 && E <= 4096, "clustered routing supports at most 4096 experts");
    int use_nodes = nodes_active(nd);
    int mg = use_nodes && nd->max_nodes > 0 ? (TG + nd->max_nodes - 1) / nd->max_nodes : 1;
    if (use_nodes)   /* a group's members live on one rank: the group's node is its first member's */
        for (int g = 0; g < G; g++) gnode[g] = nd->expert_node[members[(size_t)g * K]];
    for (int t = 0; t < N; t++) {
        const float *l = r->logits + (size_t)t * E;
        for (int i = 0; i < E; i++) sel[i] = l[i] + (bias ? bias[i] : 0.0f);
        /* group scores */
        for (int g = 0; g < G; g++) {
            const int32_t *mem = members + (size_t)g * K;
            if (mc->group_score == GROUP_SCORE_TOP2 && K >= 2) {
                int b0 = -1, b1 = -1;   /* top-2 members by selection score */
                for (int j = 0; j < K; j++) {
                    int i = mem[j];
                    if (b0 < 0 || better(sel[i], i, sel[b0], b0)) { b1 = b0; b0 = i; }
                    else if (b1 < 0 || better(sel[i], i, sel[b1], b1)) b1 = i;
                }
                r->gtop2[((size_t)t * G + g) * 2] = b0;
                r->gtop2[((size_t)t * G + g) * 2 + 1] = b1;
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
        float *qt = r->q + (size_t)t * G;
        for (int g = 0; g < G; g++) qt[g] = (float)(exp((double)lam[g] - mx) / zs);
        /* stage 1: top TG groups by selection score (with nodes: home bias, then only groups
         * on the token's chosen nodes) */
        if (use_nodes) {
            for (int g = 0; g < G; g++) if (gnode[g] == nd->home) lsel[g] += nd->home_bias;
            node_filter(nd, lsel, gnode, G, mg, gallow);
        }
        int32_t *gs = r->group + (size_t)t * TG;
        for (int j = 0; j < TG; j++) {
            int best = -1;
            for (int g = 0; g < G; g++) {
                if (use_nodes && !gallow[g]) continue;
                int taken = 0;
                for (int q = 0; q < j; q++) taken |= gs[q] == g;
                if (!taken && (best < 0 || better(lsel[g], g, lsel[best], best))) best = g;
            }
            ASSERTF(best >= 0, "node-limited routing: fewer than top_groups=%d groups on the chosen nodes", TG);
            gs[j] = best;
        }
        /* stage 2: softmax over the chosen groups' members, top-k by selection score */
        float *pt = r->probs + (size_t)t * E;
        memset(pt, 0, sizeof(float) * E);
        float lm = -INFINITY;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; if (l[i] > lm) lm = l[i]; }
        double ps = 0;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; ps += exp((double)l[i] - lm); }
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) {
                int i = members[(size_t)gs[j] * K + q];
                pt[i] = (float)(exp((double)l[i] - lm) / ps);
            }
        int32_t *tk = r->expert + (size_t)t * k;
        float *gt = r->gate + (size_t)t * k;
        double gsum = 0;
        for (int s = 0; s < k; s++) {
            int best = -1;
            for (int j = 0; j < TG; j++)
                for (int q = 0; q < K; q++) {
                    int i = members[(size_t)gs[j] * K + q], taken = 0;
                    for (int u = 0; u < s; u++) taken |= tk[u] == i;
                    if (!taken && (best < 0 || better(sel[i], i, sel[best], best))) best = i;
                }
            tk[s] = best;
            gt[s] = pt[best];
            gsum += pt[best];
        }
        if (mc->group_gate == GROUP_GATE_PRODUCT) {
            /* gate = q_g x p renormalised over the chosen experts of the expert's group */
            for (int j = 0; j < TG; j++) {
                double zg = 0;
                for (int s = 0; s < k; s++)
                    if (group_pos(members, K, gs, TG, tk[s]) == j) zg += pt[tk[s]];
                for (int s = 0; s < k; s++)
                    if (group_pos(members, K, gs, TG, tk[s]) == j) gt[s] = (float)(qt[gs[j]] * (pt[tk[s]] / zg));
            }
        } else if (mc->renormalize && k > 1)
            for (int s = 0; s < k; s++) gt[s] = (float)(gt[s] / gsum);
        /* z-loss over every expert logit */
        float am = l[0];
        for (int i = 1; i < E; i++) if (l[i] > am) am = l[i];
        double as = 0;
        for (int i = 0; i < E; i++) as += exp((double)l[i] - am);
        r->lse[t] = am + log(as);
    }
}

void router_select(Route *r, const MoeConfig *mc, const float *bias, const int32_t *members, int N,
                   const RouteNodes *nodes) {
    ASSERTF(N <= r->n_max, "router_select: %d tokens > capacity %d", N, r->n_max);
    r->N = N;
    if (r->G > 0) select_two_stage(r, mc, bias, members, N, nodes);
    else if (nodes_active(nodes)) select_one_stage_nodes(r, mc, bias, nodes, N);
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
    double routed = 0, kept_total = 0;
    for (int e = 0; e < E; e++) {
        double a = st->counts_routed[e];
        st->counts[e] = cap_e < 0 || a <= cap_e ? a : (double)cap_e;
        routed += a;
        kept_total += st->counts[e];
    }
    st->dropped_frac = routed > 0 ? (routed - kept_total) / routed : 0;
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

/* ---- losses ---- */

void router_losses(Route *r, const MoeConfig *mc, Comm *comm, long n_global, RouteStats *st) {
    int E = r->E, G = r->G, k = r->k, TG = r->TG, N = r->N;
    /* global P_i (mean prob), group q, and sum lse^2: one allreduce of E + G + 1 doubles */
    double *red = xcalloc(sizeof(double) * (2 * E + G + 3));
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

/* gradient of one token's top-k gates with respect to the chosen experts' probabilities:
 * dg[s] = dloss/dgate_s (0 for dropped slots); renormalised gates g_s = p_s / Z give
 * inc[s] = (dg_s - sum_j dg_j g_j) / Z, raw gates inc[s] = dg_s */
static void gate_backward(int k, const int32_t *sel, const float *gate, const float *probs, const double *dg,
                          int renorm, double *inc) {
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

/* one stage: gates -> probs (+ aux coefficient) -> softmax backward + z-loss */
static void backward_one_stage(Route *r, const MoeConfig *mc, const float *dgate) {
    int E = r->E, k = r->k, N = r->N;
    float *dpt = r->dpf;
    for (int t = 0; t < N; t++) {
        const float *pr = r->probs + (size_t)t * E;
        for (int e = 0; e < E; e++) dpt[e] = (float)r->fcoef_e[e];
        const int32_t *sel = r->expert + (size_t)t * k;
        const float *gate = r->gate + (size_t)t * k;
        double dg[64], inc[64];
        for (int s = 0; s < k; s++) dg[s] = dgate[(size_t)t * k + s];
        gate_backward(k, sel, gate, pr, dg, mc->renormalize && k > 1, inc);
        for (int s = 0; s < k; s++) dpt[sel[s]] += (float)inc[s];
        double s_pd = 0;
        for (int e = 0; e < E; e++) s_pd += (double)pr[e] * dpt[e];
        float *dl = r->dlogits + (size_t)t * E;
        double zc = r->z_coef * r->lse[t];
        for (int e = 0; e < E; e++) dl[e] = (float)(pr[e] * ((double)dpt[e] - s_pd) + zc * pr[e]);
    }
}

/* two stages: gates -> in-group softmax, group balance through q, z-loss -> logits */
static void backward_two_stage(Route *r, const MoeConfig *mc, const int32_t *members, const float *dgate) {
    int E = r->E, G = r->G, K = r->K, k = r->k, TG = r->TG, N = r->N;
    double *dp = r->dpd, dq[4096];
    for (int t = 0; t < N; t++) {
        const float *pt = r->probs + (size_t)t * E, *qt = r->q + (size_t)t * G, *l = r->logits + (size_t)t * E;
        const int32_t *gs = r->group + (size_t)t * TG, *tk = r->expert + (size_t)t * k;
        const float *gt = r->gate + (size_t)t * k;
        float *dl = r->dlogits + (size_t)t * E;
        for (int i = 0; i < E; i++) { dp[i] = 0; dl[i] = 0; }
        /* candidates: members of the chosen groups; in-group aux gradient on every candidate */
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; dp[i] = r->fcoef_e[i]; }
        double dg[64], inc[64], ag[64] = {0}, atot = 0;
        int product = mc->group_gate == GROUP_GATE_PRODUCT;
        for (int s = 0; s < k; s++) dg[s] = (double)dgate[(size_t)t * k + s];
        if (!product) {
            gate_backward(k, tk, gt, pt, dg, mc->renormalize && k > 1, inc);
            for (int s = 0; s < k; s++) dp[tk[s]] += inc[s];
        } else {
            /* gate_s = q_g p~_s, p~ = p renormalised over C_g (the chosen experts of group g):
             * within the group dl_i += q_g p~_i (dg_i - sum_C dg p~); through q: A_g = sum_C dg gate */
            for (int j = 0; j < TG; j++) {
                double zg = 0, dot = 0;
                for (int s = 0; s < k; s++)
                    if (group_pos(members, K, gs, TG, tk[s]) == j) zg += pt[tk[s]];
                for (int s = 0; s < k; s++)
                    if (group_pos(members, K, gs, TG, tk[s]) == j) dot += dg[s] * (pt[tk[s]] / zg);
                for (int s = 0; s < k; s++) {
                    if (group_pos(members, K, gs, TG, tk[s]) != j) continue;
                    double pn = pt[tk[s]] / zg;
                    dl[tk[s]] += (float)(qt[gs[j]] * pn * (dg[s] - dot));
                    ag[j] += dg[s] * gt[s];
                }
                atot += ag[j];
            }
        }
        double spd = 0;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; spd += pt[i] * dp[i]; }
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) {
                int i = members[(size_t)gs[j] * K + q];
                dl[i] += (float)(pt[i] * (dp[i] - spd));
            }
        /* group balance: dq_g = coef_g; softmax backward to the group scores */
        double sqd = 0;
        for (int gg = 0; gg < G; gg++) { dq[gg] = r->fcoef_g[gg]; sqd += qt[gg] * dq[gg]; }
        for (int gg = 0; gg < G; gg++) {
            double dlam = qt[gg] * (dq[gg] - sqd);
            if (product) {   /* the task term through q_g: A_g - q_g sum A */
                double a = 0;
                for (int j = 0; j < TG; j++) if (gs[j] == gg) a = ag[j];
                dlam += a - qt[gg] * atot;
            }
            if (dlam == 0) continue;
            if (mc->group_score == GROUP_SCORE_TOP2 && K >= 2) {
                dl[r->gtop2[((size_t)t * G + gg) * 2]] += (float)dlam;
                dl[r->gtop2[((size_t)t * G + gg) * 2 + 1]] += (float)dlam;
            } else {
                for (int q = 0; q < K; q++) dl[members[(size_t)gg * K + q]] += (float)(dlam / K);
            }
        }
        if (r->z_coef != 0) {
            double zc = r->z_coef * r->lse[t];
            for (int i = 0; i < E; i++) dl[i] += (float)(zc * exp((double)l[i] - r->lse[t]));
        }
    }
}

void router_backward(Route *r, const MoeConfig *mc, const int32_t *members, const float *dgate) {
    ASSERTF(r->k <= 64, "router_backward: top-k %d > 64", r->k);
    if (r->G > 0) backward_two_stage(r, mc, members, dgate);
    else backward_one_stage(r, mc, dgate);
}

void router_bias_step(float *bias, const double *load, int E, double gamma) {
    double mean = 0;
    for (int i = 0; i < E; i++) mean += load[i] / E;
    for (int i = 0; i < E; i++) {
        double d = mean - load[i];
        bias[i] += (float)(gamma * (d > 0 ? 1 : d < 0 ? -1 : 0));
    }
}
