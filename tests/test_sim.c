/* test_sim: the simulator's traffic counting (src/sim.h) against the trainer's planner
 * (exchange_plan_build, the code the MPI executor runs) on random routings, flat and
 * two-level: rows, entries and non-empty messages per (source, destination), split by node,
 * must be identical. Closed form: uniform routing's rows per token = the expected number of
 * distinct owner ranks of k distinct experts, nodes per token likewise.
 * Legend: P N k E = ranks, tokens per rank, experts per token, experts. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "exchange.h"
#include "harness.h"
#include "sim.h"
#include "topology.h"

static uint64_t lcg(uint64_t *x) { *x = *x * 6364136223846793005ull + 1442695040888963407ull; return *x >> 33; }

/* k distinct experts per token, uniformly */
static void draw(int32_t *sel, int P, int N, int k, int E, uint64_t seed) {
    for (int i = 0; i < P * N; i++)
        for (int s = 0; s < k; s++) {
            int e, dup;
            do {
                e = (int)(lcg(&seed) % (uint64_t)E);
                dup = 0;
                for (int q = 0; q < s; q++) dup |= sel[i * k + q] == e;
            } while (dup);
            sel[i * k + s] = e;
        }
}

static void compare_with_planner(int P, int nodes, int N, int k, int E, int two_level, uint64_t seed) {
    TopologyConfig tc = {.nodes = nodes, .ranks_per_node = P / nodes};
    Topology t;
    ok(STATUS_OK(topology_virtual(&t, P, &tc)), "topology %d x %d", nodes, P / nodes);
    int32_t *sel = xmalloc(sizeof(int32_t) * (size_t)P * N * k), *kept = xcalloc(sizeof(int32_t) * (size_t)N * k);
    float *gate = xcalloc(sizeof(float) * (size_t)N * k);
    int32_t owner[256], lslot[256];
    for (int e = 0; e < E; e++) { owner[e] = e / (E / P); lslot[e] = e % (E / P); }
    draw(sel, P, N, k, E, seed);
    ExchangeRoute *routes = xcalloc(sizeof(ExchangeRoute) * P);
    for (int p = 0; p < P; p++) routes[p] = (ExchangeRoute){.N = N, .k = k, .sel = sel + (size_t)p * N * k, .kept = kept, .gate = gate};
    ExchangePlan pl;
    exchange_plan_build(&pl, routes, P, owner, lslot, E, &t, two_level);
    SimTraffic tr[2];
    sim_traffic_count(tr, sel, P, N, k, owner, &t, two_level, 1.0);
    /* per rank: rows / entries sent to other ranks of its node and of other nodes, messages,
     * rows received incl. from itself */
    int same = 1;
    for (int st = 0; st <= two_level; st++) {
        const ExchangeStage *stages = st == 0 ? pl.a : pl.b;
        for (int s = 0; s < P; s++) {
            double ri = 0, rn = 0, ei = 0, en = 0, mi = 0, mn = 0;
            for (int d = 0; d < P; d++) {
                if (d == s) continue;
                double r = (double)stages[s].rows[d], e = (double)stages[s].ents[d];
                if (topology_same_node(&t, s, d)) { ri += r; ei += e; mi += r > 0; }
                else { rn += r; en += e; mn += r > 0; }
            }
            double recv = 0;
            for (int q = 0; q < P; q++) recv += (double)stages[q].rows[s];
            same &= ri == tr[st].rows_intra_s[s] && rn == tr[st].rows_inter_s[s] && ei == tr[st].ents_intra_s[s] &&
                    en == tr[st].ents_inter_s[s] && mi == tr[st].msgs_intra[s] && mn == tr[st].msgs_inter[s] &&
                    recv == tr[st].recv_rows[s];
        }
    }
    ok(same, "P=%d on %d nodes, k=%d, %s: the simulator counts the planner's rows, entries and messages per rank exactly",
       P, nodes, k, two_level ? "two-level" : "flat");
    sim_traffic_free(&tr[0]);
    if (two_level) sim_traffic_free(&tr[1]);
    exchange_plan_free(&pl);
    xfree(routes); xfree(sel); xfree(kept); xfree(gate);
    topology_free(&t);
}

/* expected distinct owners of k distinct experts out of E over S ranks of E/S experts:
 * S (1 - C(E - E/S, k) / C(E, k)) */
static double expected_distinct(int E, int S, int k) {
    double miss = 1;
    for (int j = 0; j < k; j++) miss *= (double)(E - E / S - j) / (E - j);
    return S * (1 - miss);
}

static void closed_forms(void) {
    enum { P = 16, NODES = 4, N = 2000, k = 4, E = 64 };
    TopologyConfig tc = {.nodes = NODES, .ranks_per_node = P / NODES};
    Topology t;
    topology_virtual(&t, P, &tc);
    int32_t *sel = xmalloc(sizeof(int32_t) * P * N * k), owner[E];
    for (int e = 0; e < E; e++) owner[e] = e / (E / P);
    draw(sel, P, N, k, E, 77);
    SimTraffic tr[2];
    sim_traffic_count(tr, sel, P, N, k, owner, &t, 0, 1.0);
    double rows = tr[0].rows_total / tr[0].tokens, nodes = tr[0].nodes_touched / tr[0].tokens;
    double er = expected_distinct(E, P, k), en = expected_distinct(E, NODES, k);
    ok(fabs(rows / er - 1) < 0.01, "uniform routing: rows per token %.4f = closed form %.4f (within 1%%)", rows, er);
    ok(fabs(nodes / en - 1) < 0.01, "uniform routing: nodes per token %.4f = closed form %.4f (within 1%%)", nodes, en);
    ok(tr[0].pairs_total == (double)P * N * k, "pairs = tokens x k");
    sim_traffic_free(&tr[0]);
    /* scaling: counting n tokens with scale s books s times the rows */
    sim_traffic_count(tr, sel, P, N, k, owner, &t, 0, 3.0);
    ok(fabs(tr[0].rows_total / tr[0].tokens - rows) < 1e-12 && tr[0].tokens == 3.0 * P * N,
       "scale: rows and tokens scale together");
    sim_traffic_free(&tr[0]);
    xfree(sel);
    topology_free(&t);
}

int main(void) {
    compare_with_planner(8, 2, 50, 2, 32, 0, 1);
    compare_with_planner(8, 2, 50, 4, 32, 1, 2);
    compare_with_planner(12, 3, 40, 3, 48, 0, 3);
    compare_with_planner(12, 3, 40, 3, 48, 1, 4);
    compare_with_planner(16, 4, 30, 8, 64, 1, 5);
    closed_forms();
    return harness_done();
}
