/* test_router: the shared router (src/router.h) on one rank, against hand-computed values:
 * one-stage top-k and renormalised gates, the bias choosing without changing gates, the
 * slot-major capacity queue (counts, drops, dropped fraction), the Switch aux and z losses,
 * the two-stage selection staying inside the chosen groups with group capacity, and the
 * aux-free bias step. The gradients are checked end to end by model_gradcheck.
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
    router_select(&r, &mc, NULL, NULL, N);
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
    router_select(&r, &mc, bias, NULL, N);
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
    router_select(&r, &mc, NULL, members, N);
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
    router_stats_free(&st);
    router_free(&r);
}

int main(void) {
    Comm comm;
    Status s = comm_single_init(&comm);
    ok(STATUS_OK(s), "single-rank communicator");
    test_one_stage(&comm);
    test_two_stage(&comm);
    return harness_done();
}
