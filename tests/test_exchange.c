/* test_exchange: the pure exchange planner (src/exchange.h).
 *   - uniform routing on a virtual 2 nodes x 4 ranks topology, against closed forms: rows
 *     and nodes per token, entries, the (src, dst) row matrix, message counts flat vs
 *     two-level;
 *   - random routing (uneven token counts, drops, shuffled placement): the plan's per
 *     (src, dst) rows and entries, flat and two-level, against a brute-force count, and
 *     every entry's slot / gate / token;
 *   - replicated hot units (ep.c): the replica choice on a hand-worked case (hottest units,
 *     least loaded rank on another node), its invariants on random loads (never on the
 *     owner's node, one copy per node, capped counts), stability, and the routing maps (a
 *     token goes to the copy on its node, else the owner);
 *   - the MPI executor (ep.c) on 4 ranks: this binary re-runs itself under mpirun (skipped
 *     when mpirun is missing) and checks that the dispatch / combine bytes the communicator
 *     booked equal the plan's byte matrices, and that the rows arrive in the plan's order.
 * Legend: P N k E D R = ranks, tokens per rank, top-k, experts, row width, ranks per node. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "ep.h"
#include "exchange.h"
#include "harness.h"
#include "topology.h"

static Topology virt(int nodes, int rpn) {
    TopologyConfig c;
    memset(&c, 0, sizeof c);
    c.nodes = nodes; c.ranks_per_node = rpn; c.intra_gbps = 100; c.inter_gbps = 10; c.latency_us = 1;
    Topology t;
    Status s = topology_virtual(&t, nodes * rpn, &c);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    return t;
}

/* routes of P ranks, N tokens each (arrays [P][N*k]) */
typedef struct Routes {
    int P, k, *N;
    int32_t **sel, **kept;
    float **gate;
    ExchangeRoute *rt;
} Routes;

static void routes_alloc(Routes *r, int P, int k, const int *N) {
    r->P = P; r->k = k;
    r->N = calloc(P, sizeof(int));
    r->sel = calloc(P, sizeof(int32_t *));
    r->kept = calloc(P, sizeof(int32_t *));
    r->gate = calloc(P, sizeof(float *));
    r->rt = calloc(P, sizeof(ExchangeRoute));
    for (int p = 0; p < P; p++) {
        r->N[p] = N[p];
        size_t n = (size_t)(N[p] ? N[p] : 1) * k;
        r->sel[p] = calloc(n, sizeof(int32_t));
        r->kept[p] = calloc(n, sizeof(int32_t));
        r->gate[p] = calloc(n, sizeof(float));
        r->rt[p] = (ExchangeRoute){.N = N[p], .k = k, .sel = r->sel[p], .kept = r->kept[p], .gate = r->gate[p]};
    }
}

static void routes_free(Routes *r) {
    for (int p = 0; p < r->P; p++) { free(r->sel[p]); free(r->kept[p]); free(r->gate[p]); }
    free(r->N); free(r->sel); free(r->kept); free(r->gate); free(r->rt);
}

/* uniform: global token g = p * N + t picks the experts on ranks (g + s * P / k) mod P (the
 * first expert of each, experts contiguous: Epr per rank), all kept */
static void routes_uniform(Routes *r, int P, int N, int k, int Epr) {
    int *Ns = calloc(P, sizeof(int));
    for (int p = 0; p < P; p++) Ns[p] = N;
    routes_alloc(r, P, k, Ns);
    free(Ns);
    for (int p = 0; p < P; p++)
        for (int t = 0; t < N; t++)
            for (int s = 0; s < k; s++) {
                int g = p * N + t, rank = (g + s * (P / k)) % P;
                r->sel[p][t * k + s] = rank * Epr + (g / P) % Epr;
                r->kept[p][t * k + s] = 0;
                r->gate[p][t * k + s] = 1.0f / k;
            }
}

static void test_uniform(int k) {
    const int P = 8, R = 4, n_nodes = 2, N = 32, Epr = 2, E = P * Epr;
    Topology topo = virt(n_nodes, R);
    int32_t owner[16], lslot[16];
    for (int e = 0; e < E; e++) { owner[e] = e / Epr; lslot[e] = e % Epr; }
    Routes r;
    routes_uniform(&r, P, N, k, Epr);
    ExchangePlan flat, two;
    ok(exchange_plan_build(&flat, r.rt, P, owner, lslot, E, &topo, 0) == 0, "uniform k=%d: flat plan built", k);
    ok(exchange_plan_build(&two, r.rt, P, owner, lslot, E, &topo, 1) == 0 && two.two_level,
       "uniform k=%d: two-level plan built", k);
    /* closed forms: a token's k experts sit on k distinct ranks spread evenly over the nodes */
    int nodes_per_token = k < n_nodes ? k : n_nodes;
    size_t rows = 0, ents = 0, rowsA = 0, entsA = 0, rowsB = 0, entsB = 0;
    double nodes = 0;
    for (int p = 0; p < P; p++) {
        rows += (size_t)flat.a[p].n_rows; ents += (size_t)flat.a[p].n_ent;
        rowsA += (size_t)two.a[p].n_rows; entsA += (size_t)two.a[p].n_ent;
        rowsB += (size_t)two.b[p].n_rows; entsB += (size_t)two.b[p].n_ent;
        nodes += exchange_stage_nodes_touched(&flat.a[p], &topo);
    }
    size_t T = (size_t)P * N;
    ok(rows == T * k && ents == T * k, "uniform k=%d flat: rows per token = entries per token = k (rows %zu, entries %zu, "
       "tokens %zu)", k, rows, ents, T);
    ok(nodes == (double)T * nodes_per_token, "uniform k=%d: nodes per token = min(k, nodes) = %d (got %.3f)", k,
       nodes_per_token, nodes / T);
    ok(rowsA == T * nodes_per_token && entsA == T * k,
       "uniform k=%d two-level stage A: one row per (token, node): %zu rows (want %zu), %zu entries", k, rowsA,
       T * nodes_per_token, entsA);
    ok(rowsB == T * k && entsB == T * k, "uniform k=%d two-level stage B: one row per (token, owner): %zu rows", k, rowsB);
    /* flat matrix: every (src, dst) gets N k / P rows */
    int uni = 1;
    for (size_t i = 0; i < (size_t)P * P; i++) uni &= flat.rows[i] == (size_t)N * k / P;
    ok(uni, "uniform k=%d flat: rows[src, dst] = N k / P = %d for every pair", k, N * k / P);
    /* messages: flat P (P - 1); two-level P (nodes - 1) inter-node + P (R - 1) intra-node */
    ok(flat.n_messages == (size_t)P * (P - 1), "uniform k=%d flat: %zu messages (want P(P-1) = %d)", k,
       flat.n_messages, P * (P - 1));
    ok(two.n_messages == (size_t)P * (n_nodes - 1) + (size_t)P * (R - 1),
       "uniform k=%d two-level: %zu messages (want P(nodes-1) + P(R-1) = %d)", k, two.n_messages,
       P * (n_nodes - 1) + P * (R - 1));
    /* inter-node rows: two-level, one per other node the token touches (stage A to the node
     * peer; stage B stays inside the node); flat, one per expert off the token's node */
    size_t inter_flat = 0, inter_two = 0;
    for (int s = 0; s < P; s++)
        for (int d = 0; d < P; d++)
            if (!topology_same_node(&topo, s, d)) {
                inter_flat += flat.rows[(size_t)s * P + d];
                inter_two += two.rows[(size_t)s * P + d];
            }
    ok(inter_two == T * (size_t)(nodes_per_token - 1),
       "uniform k=%d: two-level inter-node rows %zu = tokens x (nodes per token - 1)", k, inter_two);
    ok(inter_flat == T * (size_t)(k - k / n_nodes), "uniform k=%d: flat inter-node rows %zu = tokens x (k - k/nodes)", k,
       inter_flat);
    exchange_plan_free(&flat);
    exchange_plan_free(&two);
    routes_free(&r);
    topology_free(&topo);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

/* random distinct experts, ~75% kept, random gates */
static void routes_random(Routes *r, int P, const int *N, int k, int E) {
    routes_alloc(r, P, k, N);
    for (int p = 0; p < P; p++)
        for (int t = 0; t < N[p]; t++)
            for (int s = 0; s < k; s++) {
                int e, dup;
                do {
                    e = (int)(rnd() % (uint32_t)E);
                    dup = 0;
                    for (int q = 0; q < s; q++) dup |= r->sel[p][t * k + q] == e;
                } while (dup);
                r->sel[p][t * k + s] = e;
                r->kept[p][t * k + s] = rnd() % 4 == 0 ? -1 : 0;
                r->gate[p][t * k + s] = (float)(rnd() % 1000) / 1000.0f;
            }
}

static void test_random(void) {
    const int P = 4, E = 12, k = 3;
    const int N[4] = {10, 7, 0, 13};
    Topology topo = virt(2, 2);
    /* placement: a shuffled assignment, 3 experts per rank */
    int32_t owner[12], lslot[12], perm[12];
    for (int e = 0; e < E; e++) perm[e] = e;
    for (int e = E - 1; e > 0; e--) { int j = (int)(rnd() % (uint32_t)(e + 1)), tmp = perm[e]; perm[e] = perm[j]; perm[j] = tmp; }
    for (int i = 0; i < E; i++) { owner[perm[i]] = i / 3; lslot[perm[i]] = i % 3; }
    Routes r;
    routes_random(&r, P, N, k, E);
    ExchangePlan flat, two;
    exchange_plan_build(&flat, r.rt, P, owner, lslot, E, &topo, 0);
    exchange_plan_build(&two, r.rt, P, owner, lslot, E, &topo, 1);
    /* brute force */
    size_t rows[16] = {0}, ents[16] = {0}, rowsA[16] = {0}, rowsB[16] = {0}, entsA[16] = {0}, entsB[16] = {0};
    int entries_ok = 1;
    for (int p = 0; p < P; p++)
        for (int t = 0; t < N[p]; t++) {
            for (int d = 0; d < P; d++) {
                int any = 0;
                for (int s = 0; s < k; s++) {
                    int ts = t * k + s, e = r.sel[p][ts];
                    if (r.kept[p][ts] < 0 || owner[e] != d) continue;
                    any = 1;
                    ents[p * P + d]++;
                    /* the pair's entry: slot and gate, and its row holds token t */
                    const ExchangeStage *st = &flat.a[p];
                    int ie = st->ts_entry[ts];
                    size_t row0 = 0, e0 = 0;
                    for (int q = 0; q < d; q++) { row0 += st->rows[q]; e0 += st->ents[q]; }
                    entries_ok &= ie >= (int)e0 && ie < (int)(e0 + st->ents[d]) && st->ent[ie].slot == lslot[e] &&
                                  st->ent[ie].gate == r.gate[p][ts] &&
                                  st->row_token[row0 + (size_t)st->ent[ie].row] == t;
                }
                rows[p * P + d] += any;
            }
            for (int n = 0; n < topo.n_nodes; n++) {
                /* the node peer of p on node n gets one row if any kept pair lives on node n */
                int peer = -1, owners[16], no = 0;
                for (int q = 0; q < P; q++)
                    if (topo.node_of[q] == n && topo.local_index[q] == topo.local_index[p] % topo.node_size[n]) peer = q;
                for (int s = 0; s < k; s++) {
                    int ts = t * k + s, e = r.sel[p][ts], o = owner[e], dup = 0;
                    if (r.kept[p][ts] < 0 || topo.node_of[o] != n) continue;
                    entsA[p * P + peer]++;
                    entsB[peer * P + o]++;
                    for (int j = 0; j < no; j++) dup |= owners[j] == o;
                    if (!dup) owners[no++] = o;
                }
                if (no) rowsA[p * P + peer]++;
                for (int j = 0; j < no; j++) rowsB[peer * P + owners[j]]++;
            }
        }
    int flat_ok = 1, two_ok = 1;
    for (int i = 0; i < P * P; i++) {
        flat_ok &= flat.rows[i] == rows[i] && flat.ents[i] == ents[i];
        two_ok &= two.rows[i] == rowsA[i] + rowsB[i] && two.ents[i] == entsA[i] + entsB[i];
        two_ok &= two.a[i / P].rows[i % P] == rowsA[i] && two.b[i / P].rows[i % P] == rowsB[i];
    }
    ok(flat_ok, "random routing flat: rows and entries per (src, dst) equal the brute-force count");
    ok(entries_ok, "random routing flat: every kept pair's entry has its expert's slot, its gate and its token's row");
    ok(two_ok, "random routing two-level: stage A and stage B rows / entries per (src, dst) equal the brute force");
    /* bytes: dispatch = counts + entries + rows, combine = rows back */
    const int D = 5;
    double db[16], cb[16];
    exchange_plan_dispatch_bytes(&flat, D, db);
    exchange_plan_combine_bytes(&flat, D, cb);
    int bytes_ok = 1;
    for (int s = 0; s < P; s++)
        for (int d = 0; d < P; d++) {
            double want = s == d ? 0 : 16.0 + 12.0 * ents[s * P + d] + 4.0 * D * rows[s * P + d];
            bytes_ok &= db[s * P + d] == want && cb[d * P + s] == (s == d ? 0 : 4.0 * D * rows[s * P + d]);
        }
    ok(bytes_ok, "random routing: dispatch bytes = 16 + 12 entries + 4 D rows, combine bytes = 4 D rows (transposed)");
    exchange_plan_free(&flat);
    exchange_plan_free(&two);
    routes_free(&r);
    topology_free(&topo);
}

/* ---- the MPI executor: run as `test_exchange --mpi` on 4 ranks ---- */
static void test_replicas(void) {
    /* 8 units on 2 nodes x 2 ranks, contiguous (ranks 0, 1: units 0-3 on node 0) */
    Topology topo = virt(2, 2);
    EpMap em;
    ep_map_init(&em, 4, 2, 8, 1);
    ep_map_set_topology(&em, &topo);
    ep_map_set_replicas(&em, 3);
    ok(em.R == 3 && em.n_rep == 1 && em.n_slots == 3, "3 replicas on 4 ranks: 1 replica slot per rank (R %d, n_rep %d)",
       em.R, em.n_rep);
    int32_t out[64];
    ok(ep_replicas_choose(&em, out) == 0 && out[0] == -1 && out[3] == -1, "no statistics yet: no copies");
    double load[8] = {10, 1, 1, 1, 8, 1, 1, 6};
    memcpy(em.load, load, sizeof load);
    em.have_stats = 1;
    /* unit 0 (10) -> node 1, rank 3 (load 7 < 9); unit 4 (8) -> node 0, rank 1 (2 < 6);
     * unit 7 (6 > 0's 10/2) -> node 0, rank 0 (the only free slot there) */
    int n = ep_replicas_choose(&em, out);
    ok(n == 3 && out[0] == 7 && out[1] == 4 && out[2] == -1 && out[3] == 0,
       "hand-worked choice: copies [7, 4, -1, 0] (got %d: [%d, %d, %d, %d])", n, out[0], out[1], out[2], out[3]);
    memcpy(em.rep_unit, out, sizeof(int32_t) * 4);
    ep_map_refresh(&em, NULL);
    int32_t again[64];
    ep_replicas_choose(&em, again);
    ok(!memcmp(again, out, sizeof(int32_t) * 4), "the choice is stable under the same statistics");
    /* rank 2 (node 1): unit 0 via the copy on rank 3 (slot 2 = per_rank + 0); units 4 and 7 on
     * their owners (no copy on node 1) */
    ok(em.route_dest[0] == 3 && em.route_slot[0] == 2 && em.route_dest[4] == 2 && em.route_slot[4] == 0 &&
       em.route_dest[7] == 3 && em.route_slot[7] == 1 && em.lunit[2] == -1,
       "rank 2's routing: unit 0 -> copy on rank 3 slot 2, units 4 and 7 -> owners");
    ep_map_free(&em);
    ep_map_init(&em, 4, 0, 8, 1);
    ep_map_set_topology(&em, &topo);
    ep_map_set_replicas(&em, 3);
    memcpy(em.rep_unit, out, sizeof(int32_t) * 4);
    ep_map_refresh(&em, NULL);
    ok(em.route_dest[4] == 1 && em.route_slot[4] == 2 && em.route_dest[7] == 0 && em.route_slot[7] == 2 &&
       em.route_dest[0] == 0 && em.route_slot[0] == 0 && em.lunit[2] == 7 && em.lslot_expert[2] == 7,
       "rank 0's routing: unit 4 -> copy on rank 1, unit 7 -> its own replica slot, unit 0 -> itself");
    ep_map_free(&em);
    /* the cap: at most one copy per other node per unit */
    ep_map_init(&em, 4, 0, 8, 1);
    ep_map_set_topology(&em, &topo);
    ep_map_set_replicas(&em, 100);
    ok(em.R == 8 && em.n_rep == 2, "100 replicas of 8 units on 2 nodes are capped at 8 (%d), 2 slots per rank", em.R);
    ep_map_free(&em);
    ep_map_init(&em, 4, 0, 8, 1);
    ep_map_set_replicas(&em, 3);
    ok(em.R == 0 && em.n_slots == em.per_rank, "one node (no topology): no replica slots");
    ep_map_free(&em);
    topology_free(&topo);
    /* invariants on random loads: 4 nodes x 2 ranks, 16 units, 11 copies */
    Topology t4 = virt(4, 2);
    int bad = 0, placed = 0;
    for (int trial = 0; trial < 50; trial++) {
        ep_map_init(&em, 8, 0, 16, 1);
        ep_map_set_topology(&em, &t4);
        ep_map_set_replicas(&em, 11);
        for (int u = 0; u < 16; u++) em.load[u] = (double)(rnd() % 100) * (rnd() % 4 == 0 ? 10 : 1);
        em.have_stats = 1;
        int nr = ep_replicas_choose(&em, out);
        placed += nr;
        int cnt = 0;
        for (int i = 0; i < 8 * em.n_rep; i++) {
            int u = out[i];
            if (u < 0) continue;
            cnt++;
            int node = t4.node_of[i / em.n_rep];
            bad += t4.node_of[em.place.owner[u]] == node || !(em.load[u] > 0);
            for (int j = 0; j < i; j++) bad += out[j] == u && t4.node_of[j / em.n_rep] == node;
        }
        bad += cnt != nr || nr > 11;
        ep_map_free(&em);
    }
    ok(bad == 0 && placed > 0, "random loads: copies never on the owner's node, one per node and unit, at most R "
       "(%d violations, %d copies placed)", bad, placed);
    topology_free(&t4);
}

static int mpi_child(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    Comm comm;
    Status s = comm_mpi_init(&comm);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    Backend be;
    s = backend_cpu_init(&be, 1);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    int P = comm.size, me = comm.rank, fails = 0;
    const int E = 8, k = 3, D = 4;
    int N[64];
    for (int p = 0; p < P && p < 64; p++) N[p] = 5 + 3 * p;
    Topology topo = virt(2, P / 2);
    for (int two_level = 0; two_level < 2; two_level++) {
        rng_state = 0x1234567ull + (uint64_t)two_level;   /* every rank draws the same routes */
        Routes r;
        routes_random(&r, P, N, k, E);
        EpMap em;
        ep_map_init(&em, P, me, E, 1);
        ExchangePlan pl;
        exchange_plan_build(&pl, r.rt, P, em.expert_owner, em.expert_lslot, E, &topo, two_level);
        double *db = calloc((size_t)P * P, sizeof(double)), *cb = calloc((size_t)P * P, sizeof(double));
        exchange_plan_dispatch_bytes(&pl, D, db);
        exchange_plan_combine_bytes(&pl, D, cb);
        EpPath pp;
        epp_init(&pp, &be, &em, &topo, two_level, D, N[me], k);
        float *x = calloc((size_t)N[me] * D, sizeof(float)), *y = calloc((size_t)N[me] * D, sizeof(float));
        for (int t = 0; t < N[me]; t++)
            for (int j = 0; j < D; j++) x[t * D + j] = (float)(me * 1000 + t);
        uint64_t b0 = comm.stats.bytes[COMM_PHASE_DISPATCH];
        epp_plan(&pp, &em, &be, &comm, N[me], k, r.sel[me], r.kept[me], r.gate[me]);
        epp_send_rows(&pp, &be, &comm, x);
        double moved = (double)(comm.stats.bytes[COMM_PHASE_DISPATCH] - b0), want = 0;
        for (int d = 0; d < P; d++) want += db[(size_t)me * P + d];
        if (moved != want) { fprintf(stderr, "rank %d two_level %d: dispatch moved %.0f bytes, planned %.0f\n", me, two_level, moved, want); fails++; }
        /* the final stage's received rows, in (source, row) order of the plan */
        const EpX *X = epp_final(&pp);
        const ExchangeStage *fin = two_level ? pl.b : pl.a;
        size_t at = 0;
        for (int src = 0; src < P; src++) {
            const ExchangeStage *st = &fin[src];
            size_t row0 = 0;
            for (int d = 0; d < me; d++) row0 += st->rows[d];
            for (size_t q = 0; q < st->rows[me]; q++, at++) {
                float got = X->rbuf[at * D];
                if (!two_level) {
                    float wantv = (float)(src * 1000 + st->row_token[row0 + q]);
                    if (got != wantv) { if (fails < 5) fprintf(stderr, "rank %d: row %zu holds %g, plan says %g\n", me, at, got, wantv); fails++; }
                }
            }
        }
        if (at != (size_t)X->n_rrows) { fprintf(stderr, "rank %d two_level %d: received %d rows, planned %zu\n", me, two_level, X->n_rrows, at); fails++; }
        /* combine: every received row goes back (rows computed = the received rows) */
        uint64_t c0 = comm.stats.bytes[COMM_PHASE_COMBINE];
        epp_return_combine(&pp, &be, &comm, X->rbuf, y);
        double cm = (double)(comm.stats.bytes[COMM_PHASE_COMBINE] - c0), cw = 0;
        for (int src = 0; src < P; src++) cw += cb[(size_t)me * P + src];
        if (cm != cw) { fprintf(stderr, "rank %d two_level %d: combine moved %.0f bytes, planned %.0f\n", me, two_level, cm, cw); fails++; }
        epp_free(&pp, &be);
        ep_map_free(&em);
        exchange_plan_free(&pl);
        routes_free(&r);
        free(db); free(cb); free(x); free(y);
    }
    topology_free(&topo);
    int all = 0;
    MPI_Allreduce(&fails, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (me == 0) printf("# mpi executor: %d mismatch(es) over %d ranks\n", all, P);
    backend_free(&be);
    MPI_Finalize();
    return all ? 1 : 0;
}

static void test_mpi_executor(const char *self) {
    if (system("command -v mpirun > /dev/null 2>&1") != 0) {
        printf("# mpirun not found: the MPI executor byte check is skipped\n");
        return;
    }
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --allow-run-as-root --oversubscribe "
             "-n 4 %s --mpi", self);
    int rc = system(cmd);
    ok(rc == 0, "MPI executor on 4 ranks (flat and two-level): the dispatch and combine bytes it moved equal the plan's "
       "byte matrices, and the rows arrive in the plan's order (rc %d)", rc);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--mpi") == 0) return mpi_child(argc, argv);
    test_uniform(2);
    test_uniform(4);
    test_random();
    test_replicas();
    test_mpi_executor(argv[0]);
    return harness_done();
}
