/* test_router: the shared router (src/router.h) on one rank, against hand-computed values:
 * one-stage top-k and renormalised gates, the bias choosing without changing gates, the
 * slot-major capacity queue (counts, drops, dropped fraction), the Switch aux and z losses,
 * the two-stage selection staying inside the chosen groups with group capacity, and the
 * aux-free bias step; node-limited routing and the home-node bias on random logits against a
 * brute-force reference (never a unit outside the M chosen nodes; the chosen nodes are the
 * ones with the best sums), and a finite-difference check of the router backward on those
 * paths; product gating (moe.group_gate) against finite differences, and the reason it exists:
 * with renorm gating and one group per token the task gradient on every group prototype is
 * exactly zero, with product gating it is not. The other gradients are checked end to end by
 * model_gradcheck.
 * Legend: N E k G K TG = tokens, experts, top-k, groups, experts per group, groups per token. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "harness.h"
#include "router.h"

static MoeConfig base_cfg(void) {
    MoeConfig mc;
    memset(&mc, 0, sizeof mc);
    mc.capacity_factor = 1.0;
    mc.group_capacity_factor = 1.0;
    mc.aux_loss_coef = 0.01;
    mc.group_aux_coef = 0.01;
    mc.z_loss_coef = 0.001;
    mc.renormalize = true;
    mc.balance = BALANCE_AUX;
    mc.group_score = GROUP_SCORE_MEAN;
    return mc;
}

static void test_one_stage(Comm *comm) {
    enum { N = 4, E = 4, k = 2 };
    MoeConfig mc = base_cfg();
    Route r;
    RouteStats st;
    router_init(&r, N, E, k, 0, 0);
    router_stats_init(&st, E, 0);
    /* every token prefers 0 then 1 (ties broken towards the lower id in token 3) */
    const float lg[N * E] = {3, 2, 1, 0,  2, 1, 0, -1,  5, 4, 0, 0,  1, 1, 0, 0};
    memcpy(r.logits, lg, sizeof lg);
    router_select(&r, &mc, NULL, NULL, N, NULL);
    int sel_ok = 1, gate_ok = 1;
    for (int t = 0; t < N; t++) {
        sel_ok &= r.expert[t * k] == 0 && r.expert[t * k + 1] == 1;
        gate_ok &= fabs((double)r.gate[t * k] + r.gate[t * k + 1] - 1.0) < 1e-6;   /* float rounding of 2 gates */
    }
    ok(sel_ok, "one stage: top-2 by probability, ties to the lower id");
    ok(gate_ok, "one stage: renormalised gates sum to 1");
    /* capacity = ceil(1.0 * 4 * 2 / 4) = 2: experts 0 and 1 keep the first two tokens of the
     * slot-major queue, tokens 2 and 3 are dropped on both slots */
    router_capacity(&r, &mc, comm, NULL, N, &st);
    int pos_ok = 1;
    for (int t = 0; t < N; t++) pos_ok &= r.pos[t * k] == (t < 2 ? 0 : -1) && r.pos[t * k + 1] == (t < 2 ? 0 : -1);
    ok(st.capacity == 2 && pos_ok, "capacity 2: tokens 0, 1 kept, 2, 3 dropped (capacity %ld)", st.capacity);
    ok(st.counts_routed[0] == 4 && st.counts_routed[1] == 4 && st.counts[0] == 2 && st.counts[2] == 0 &&
       st.dropped_frac == 0.5, "counts routed 4 4 0 0, kept 2 2 0 0, dropped fraction 0.5 (got %g)", st.dropped_frac);
    router_losses(&r, &mc, comm, N, &st);
    double aux = 0, z = 0;
    for (int e = 0; e < E; e++) {
        double P = 0;
        for (int t = 0; t < N; t++) P += r.probs[t * E + e];
        aux += st.counts_routed[e] / (N * k) * P / N;
    }
    for (int t = 0; t < N; t++) z += r.lse[t] * r.lse[t];
    ok(fabs(st.aux_loss - mc.aux_loss_coef * E * aux) < 1e-12 && fabs(st.z_loss - mc.z_loss_coef * z / N) < 1e-12,
       "aux loss = alpha E sum f P (%g), z loss = beta mean lse^2 (%g)", st.aux_loss, st.z_loss);
    /* aux_free: the bias picks expert 3 for every token, the gates stay the unbiased probs */
    float bias[E] = {0, 0, 0, 10};
    float g1[N * k];
    memcpy(g1, r.gate, sizeof g1);
    mc.renormalize = false;
    router_select(&r, &mc, bias, NULL, N, NULL);
    int b_ok = 1;
    for (int t = 0; t < N; t++) b_ok &= r.expert[t * k] == 3 && r.gate[t * k] == r.probs[t * E + 3];
    ok(b_ok, "aux_free bias: expert 3 chosen first, its gate is its unbiased probability");
    mc.balance = BALANCE_AUX_FREE;
    router_losses(&r, &mc, comm, N, &st);
    ok(st.aux_loss == 0, "aux_free: no Switch aux loss (%g)", st.aux_loss);
    const double load[E] = {4, 1, 2, 3};
    float b2[E] = {0, 0, 0, 0};
    router_bias_step(b2, load, E, 0.5);
    ok(b2[0] == -0.5f && b2[1] == 0.5f && b2[2] == 0.5f && b2[3] == -0.5f,
       "bias step: +gamma below the mean load 2.5, -gamma above");
    router_stats_free(&st);
    router_free(&r);
    router_free(&r);   /* safe twice */
}

static void test_two_stage(Comm *comm) {
    enum { N = 4, E = 4, k = 2, G = 2, TG = 1 };
    MoeConfig mc = base_cfg();
    Route r;
    RouteStats st;
    router_init(&r, N, E, k, G, TG);
    router_stats_init(&st, E, G);
    const int32_t members[G * 2] = {0, 2, 1, 3}, group_of[E] = {0, 1, 0, 1};
    /* tokens 0-2 favour group 1 (experts 1, 3), token 3 group 0 */
    const float lg[N * E] = {0, 3, 0, 2,  0, 2, 0, 3,  0, 1, 0, 1,  4, 0, 3, 0};
    memcpy(r.logits, lg, sizeof lg);
    router_select(&r, &mc, NULL, members, N, NULL);
    int in_group = 1, zero_out = 1;
    for (int t = 0; t < N; t++) {
        int g = r.group[t];
        for (int s = 0; s < k; s++) in_group &= group_of[r.expert[t * k + s]] == g;
        for (int e = 0; e < E; e++) if (group_of[e] != g) zero_out &= r.probs[t * E + e] == 0;
    }
    ok(r.group[0] == 1 && r.group[1] == 1 && r.group[2] == 1 && r.group[3] == 0, "two stage: groups 1 1 1 0");
    ok(in_group && zero_out, "two stage: experts from the chosen group only, probabilities 0 outside it");
    /* group capacity ceil(1.0 * 4 * 1 / 2) = 2: token 2 (third in group 1's queue) is dropped */
    router_capacity(&r, &mc, comm, group_of, N, &st);
    ok(st.group_counts[0] == 1 && st.group_counts[1] == 3 && r.gkeep[2] == 0 && r.gkeep[0] && r.gkeep[1] &&
       r.pos[2 * k] == -1 && r.pos[2 * k + 1] == -1 && fabs(st.group_dropped_frac - 0.25) < 1e-15,
       "group capacity 2: token 2 dropped from group 1 with both pairs, group dropped fraction 1/4");
    router_losses(&r, &mc, comm, N, &st);
    ok(st.group_aux_loss > 0 && st.aux_loss > st.group_aux_loss, "two stage: group and in-group aux losses (%g, %g)",
       st.group_aux_loss, st.aux_loss);
    /* the load every kind's balance metrics use: selections before any capacity (token 2's pairs
     * count although group capacity dropped them; counts_routed does not have them) */
    double sel_cnt[E] = {0};
    for (int i = 0; i < N * k; i++) sel_cnt[r.expert[i]] += 1;
    int same = 1;
    for (int e = 0; e < E; e++) same &= st.counts_selected[e] == sel_cnt[e];
    double routed = 0, selected = 0;
    for (int e = 0; e < E; e++) { routed += st.counts_routed[e]; selected += st.counts_selected[e]; }
    ok(same && selected == N * k && routed == selected - k,
       "counts_selected = every selection before capacity (%g), counts_routed lacks the group-dropped pairs (%g)", selected,
       routed);
    router_stats_free(&st);
    router_free(&r);
}


/* ---- nodes ---- */

static uint64_t lcg(uint64_t *x) { *x = *x * 6364136223846793005ull + 1442695040888963407ull; return *x >> 33; }
static float urand(uint64_t *x) { return (float)(lcg(x) % 100000) / 100000.0f * 4.0f - 2.0f; }

/* the M nodes with the highest sums of their best m scores (ties: lower node) */
static void ref_nodes(const float *score, const int32_t *node_of, int n_units, int n_nodes, int m, int M, int *keep) {
    double ns[64];
    for (int n = 0; n < n_nodes; n++) {
        float v[4096];
        int c = 0;
        for (int u = 0; u < n_units; u++) if (node_of[u] == n) v[c++] = score[u];
        for (int i = 0; i < c; i++)          /* selection sort, descending */
            for (int j = i + 1; j < c; j++) if (v[j] > v[i]) { float t = v[i]; v[i] = v[j]; v[j] = t; }
        ns[n] = 0;
        for (int i = 0; i < m && i < c; i++) ns[n] += v[i];
        keep[n] = 0;
    }
    for (int j = 0; j < M; j++) {
        int b = -1;
        for (int n = 0; n < n_nodes; n++) if (!keep[n] && (b < 0 || ns[n] > ns[b])) b = n;
        keep[b] = 1;
    }
}

/* finite differences of loss = sum c * gate + aux + z against router_backward on the logits
 * already in r (40 random coordinates, step 1e-2): returns the worst relative error, or 1 if a
 * probe changed the selection (no ties on random logits, so it should not) */
static double fd_router(Comm *comm, const MoeConfig *mc, Route *r, RouteStats *st, const int32_t *members,
                        const int32_t *group_of, const RouteNodes *nd, uint64_t *seed) {
    int N = r->n_max, E = r->E, k = r->k;
    double *c = xmalloc(sizeof(double) * N * k);
    float *dg = xmalloc(sizeof(float) * N * k);
    for (int i = 0; i < N * k; i++) { c[i] = urand(seed); dg[i] = (float)c[i]; }
    router_select(r, mc, NULL, members, N, nd);
    router_capacity(r, mc, comm, group_of, N, st);
    router_losses(r, mc, comm, N, st);
    router_backward(r, mc, members, dg);
    int32_t *sel0 = xmalloc(sizeof(int32_t) * N * k);
    memcpy(sel0, r->expert, sizeof(int32_t) * N * k);
    float *dl = xmalloc(sizeof(float) * N * E), *save = xmalloc(sizeof(float) * N * E);
    memcpy(dl, r->dlogits, sizeof(float) * N * E);
    double worst = 0;
    for (int q = 0; q < 40; q++) {
        int i = (int)(lcg(seed) % (uint64_t)(N * E));
        double lp[2];
        float orig = r->logits[i];
        for (int sgn = 0; sgn < 2; sgn++) {
            memcpy(save, r->logits, sizeof(float) * N * E);
            r->logits[i] = orig + (sgn ? -1e-2f : 1e-2f);
            router_select(r, mc, NULL, members, N, nd);
            if (memcmp(sel0, r->expert, sizeof(int32_t) * N * k)) worst = 1;
            router_capacity(r, mc, comm, group_of, N, st);
            router_losses(r, mc, comm, N, st);
            double L = st->aux_loss + st->z_loss;
            for (int j = 0; j < N * k; j++) L += c[j] * r->gate[j];
            lp[sgn] = L;
            memcpy(r->logits, save, sizeof(float) * N * E);
        }
        double fd = (lp[0] - lp[1]) / 2e-2, an = dl[i];
        double err = fabs(fd - an) / (fabs(fd) + fabs(an) + 1e-3);
        if (err > worst) worst = err;
    }
    xfree(c); xfree(dg); xfree(sel0); xfree(dl); xfree(save);
    return worst;
}

static void test_nodes_one_stage(Comm *comm) {
    enum { N = 64, E = 16, k = 4, NN = 4, M = 2 };
    MoeConfig mc = base_cfg();
    mc.dropless = true;
    Route r;
    RouteStats st;
    router_init(&r, N, E, k, 0, 0);
    router_stats_init(&st, E, 0);
    int32_t enode[E];
    for (int e = 0; e < E; e++) enode[e] = (e * 7 + 3) % NN;   /* a scattered placement */
    RouteNodes nd = {.n_nodes = NN, .expert_node = enode, .home = 1, .max_nodes = M, .home_bias = 0};
    uint64_t seed = 12345;
    for (int i = 0; i < N * E; i++) r.logits[i] = urand(&seed);
    router_select(&r, &mc, NULL, NULL, N, &nd);
    int inside = 1, topk = 1;
    for (int t = 0; t < N; t++) {
        int keep[NN];
        ref_nodes(r.logits + (size_t)t * E, enode, E, NN, (k + M - 1) / M, M, keep);
        for (int s = 0; s < k; s++) inside &= keep[enode[r.expert[t * k + s]]];
        /* the k best allowed experts by logit, in order */
        int used[E] = {0};
        for (int s = 0; s < k; s++) {
            int b = -1;
            for (int e = 0; e < E; e++)
                if (keep[enode[e]] && !used[e] && (b < 0 || r.logits[t * E + e] > r.logits[t * E + b])) b = e;
            used[b] = 1;
            topk &= r.expert[t * k + s] == b;
        }
    }
    ok(inside, "max_nodes 2 of 4: every selected expert is on one of the token's 2 best nodes (brute force)");
    ok(topk, "max_nodes 2: the top-4 experts by logit among the allowed nodes");
    router_nodes_touched(&r, &nd);
    router_capacity(&r, &mc, comm, NULL, N, &st);
    router_losses(&r, &mc, comm, N, &st);
    ok(st.nodes_over == 0 && st.nodes_mean > 1 && st.nodes_mean <= 2, "node counts: none over the limit, mean %.2f",
       st.nodes_mean);
    /* without the limit the same logits reach more nodes */
    RouteNodes free_nd = nd;
    free_nd.max_nodes = 0;
    router_select(&r, &mc, NULL, NULL, N, &free_nd);
    router_nodes_touched(&r, &nd);
    ok(r.nodes_over > 0, "without the limit %g of %d tokens span more than 2 nodes", r.nodes_over, N);
    /* home bias: with a huge bias every token stays on its home node */
    RouteNodes home = nd;
    home.max_nodes = 0;
    home.home_bias = 1e30f;
    router_select(&r, &mc, NULL, NULL, N, &home);
    int all_home = 1;
    for (int i = 0; i < N * k; i++) all_home &= enode[r.expert[i]] == 1;
    ok(all_home, "home_bias 1e30: every selected expert is on the home node");

    /* finite differences of the router backward on the node-limited path */
    mc.z_loss_coef = 0.01;
    double worst = fd_router(comm, &mc, &r, &st, NULL, NULL, &nd, &seed);
    ok(worst < 2e-2, "router backward on the node-limited path matches finite differences (worst rel %.2e)", worst);
    router_stats_free(&st);
    router_free(&r);
}

static void test_nodes_two_stage(Comm *comm) {
    enum { N = 64, E = 16, k = 2, G = 8, K = 2, TG = 2, NN = 4, M = 1 };
    MoeConfig mc = base_cfg();
    mc.dropless = true;
    Route r;
    RouteStats st;
    router_init(&r, N, E, k, G, TG);
    router_stats_init(&st, E, G);
    int32_t members[G * K], group_of[E], enode[E], gnode[G];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < K; j++) { members[g * K + j] = j * G + g; group_of[j * G + g] = g; }
    for (int g = 0; g < G; g++) gnode[g] = (g * 3) % NN;          /* two groups per node, scattered */
    for (int e = 0; e < E; e++) enode[e] = gnode[group_of[e]];
    RouteNodes nd = {.n_nodes = NN, .expert_node = enode, .home = 2, .max_nodes = M, .home_bias = 0};
    uint64_t seed = 999;
    for (int i = 0; i < N * E; i++) r.logits[i] = urand(&seed);
    router_select(&r, &mc, NULL, members, N, &nd);
    int one_node = 1, best_node = 1;
    for (int t = 0; t < N; t++) {
        float lam[G];
        for (int g = 0; g < G; g++) {
            double sum = 0;
            for (int j = 0; j < K; j++) sum += r.logits[t * E + members[g * K + j]];
            lam[g] = (float)(sum / K);
        }
        int keep[NN];
        ref_nodes(lam, gnode, G, NN, TG, M, keep);
        for (int j = 0; j < TG; j++) best_node &= keep[gnode[r.group[t * TG + j]]];
        for (int s = 0; s < k; s++) one_node &= enode[r.expert[t * k + s]] == gnode[r.group[t * TG]];
        one_node &= gnode[r.group[t * TG]] == gnode[r.group[t * TG + 1]];
    }
    ok(best_node, "clustered max_nodes 1: both chosen groups on the node with the best two group scores");
    ok(one_node, "clustered max_nodes 1: every selected expert on that one node");
    /* home bias (moderate): more tokens keep their groups on the home node than without */
    RouteNodes h0 = nd, h1 = nd;
    h0.max_nodes = 0;
    h1.max_nodes = 0;
    h1.home_bias = 0.5f;
    int n0 = 0, n1 = 0;
    router_select(&r, &mc, NULL, members, N, &h0);
    for (int i = 0; i < N * TG; i++) n0 += gnode[r.group[i]] == 2;
    router_select(&r, &mc, NULL, members, N, &h1);
    for (int i = 0; i < N * TG; i++) n1 += gnode[r.group[i]] == 2;
    ok(n1 > n0, "home_bias 0.5: %d of %d token-groups on the home node (%d without)", n1, N * TG, n0);
    /* finite differences of the two-stage router backward with the node limit */
    double worst = fd_router(comm, &mc, &r, &st, members, group_of, &nd, &seed);
    ok(worst < 2e-2, "two-stage router backward with the node limit matches finite differences (worst rel %.2e)", worst);
    router_stats_free(&st);
    router_free(&r);
}

/* loss = sum c * gate + aux + z on two-stage routing; finite differences of the logits vs router_backward */
static double fd_two_stage(Comm *comm, MoeConfig *mc, int N, int E, int k, int G, int TG, uint64_t seed) {
    int K = E / G;
    Route r;
    RouteStats st;
    router_init(&r, N, E, k, G, TG);
    router_stats_init(&st, E, G);
    int32_t *members = xmalloc(sizeof(int32_t) * E), *group_of = xmalloc(sizeof(int32_t) * E);
    for (int g = 0; g < G; g++)
        for (int j = 0; j < K; j++) { members[g * K + j] = j * G + g; group_of[j * G + g] = g; }
    for (int i = 0; i < N * E; i++) r.logits[i] = urand(&seed);
    double worst = fd_router(comm, mc, &r, &st, members, group_of, NULL, &seed);
    xfree(members); xfree(group_of);
    router_stats_free(&st);
    router_free(&r);
    return worst;
}

static void test_group_gate(Comm *comm) {
    enum { N = 48, E = 16, G = 4, K = 4 };
    MoeConfig mc = base_cfg();
    mc.dropless = true;
    mc.group_gate = GROUP_GATE_PRODUCT;
    for (int TG = 1; TG <= 2; TG++)
        for (int score = 0; score < 2; score++) {
            mc.group_score = score ? GROUP_SCORE_TOP2 : GROUP_SCORE_MEAN;
            double w = fd_two_stage(comm, &mc, N, E, 2, G, TG, 4242 + TG * 10 + score);
            ok(w < 2e-2, "product gating, top_groups %d, group score %s: router backward = finite differences (worst rel %.2e)",
               TG, score ? "top2" : "mean", w);
        }
    /* the task gradient on the group prototypes (mean score: sum of the members' dlogits) with
     * one group per token and no balance or z losses */
    mc.aux_loss_coef = mc.group_aux_coef = mc.z_loss_coef = 0;
    mc.group_score = GROUP_SCORE_MEAN;
    Route r;
    RouteStats st;
    int32_t members[E], group_of[E];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < K; j++) { members[g * K + j] = j * G + g; group_of[j * G + g] = g; }
    double proto[2];
    for (int gate = 0; gate < 2; gate++) {
        mc.group_gate = gate ? GROUP_GATE_PRODUCT : GROUP_GATE_RENORM;
        router_init(&r, N, E, 2, G, 1);
        router_stats_init(&st, E, G);
        uint64_t seed = 31337;
        for (int i = 0; i < N * E; i++) r.logits[i] = urand(&seed);
        float dg[N * 2];
        for (int i = 0; i < N * 2; i++) dg[i] = urand(&seed);
        router_select(&r, &mc, NULL, members, N, NULL);
        router_capacity(&r, &mc, comm, group_of, N, &st);
        router_losses(&r, &mc, comm, N, &st);
        router_backward(&r, &mc, members, dg);
        proto[gate] = 0;
        for (int t = 0; t < N; t++)
            for (int g = 0; g < G; g++) {
                double sdl = 0;
                for (int j = 0; j < K; j++) sdl += r.dlogits[t * E + members[g * K + j]];
                if (fabs(sdl) > proto[gate]) proto[gate] = fabs(sdl);
            }
        router_stats_free(&st);
        router_free(&r);
    }
    ok(proto[0] < 1e-6, "renorm gating, top_groups 1: the task gradient on every group prototype is zero (max %.1e)", proto[0]);
    ok(proto[1] > 1e-2, "product gating, top_groups 1: the group prototypes get a task gradient (max %.3f)", proto[1]);
}

int main(void) {
    Comm comm;
    Status s = comm_single_init(&comm);
    ok(STATUS_OK(s), "single-rank communicator");
    test_one_stage(&comm);
    test_two_stage(&comm);
    test_nodes_one_stage(&comm);
    test_nodes_two_stage(&comm);
    test_group_gate(&comm);
    return harness_done();
}
