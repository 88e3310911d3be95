/* test_placement: the struct (init errors, fill_slots, copy, equal), the measures (cut at node
 * and rank level, rank MaxVio on hand cases), and the three policies: every policy gives a
 * valid balanced placement on many shapes; contiguous and EPLB match hand-computed owners;
 * EPLB keeps node loads within the heaviest unit of each other; the topology policy recovers a
 * planted two-level partition from a shuffled, noisy block affinity with a strictly smaller
 * inter-node cut than contiguous and EPLB; refinement never increases the cut and usually
 * reaches the brute-force optimum on small cases; cut-neutral swaps balance load; the load
 * cap holds MaxVio to its tolerance (at a cut cost) and is a no-op when loose; all policies
 * are deterministic. The METIS partitioner: exact sizes, determinism, cut below contiguous and
 * the load cap on planted clusters, and 1024 units on 128 nodes x 8 ranks within a time bound.
 * Issue 12 (ep_propose_ex): the replica-aware placement has a lower rank MaxVio counting the
 * copies than the replica-blind one (a hand case and random loads); under node-limited routing
 * the co-selection statistics from the preferred units (router_preferred) put the pairs tokens
 * want on one node, after which the limit no longer changes their routing, while the routed
 * pairs keep them apart; with the home bias the placement spreads those pairs over the nodes.
 * Legend: U R N = units, ranks, nodes; per = units per rank. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ep.h"
#include "harness.h"
#include "placement.h"
#include "router.h"

static TopologyConfig vcfg(int nodes, int rpn) {
    TopologyConfig c;
    memset(&c, 0, sizeof c);
    c.nodes = nodes;
    c.ranks_per_node = rpn;
    return c;
}

static void make_topo(Topology *t, int nodes, int rpn) {
    TopologyConfig c = vcfg(nodes, rpn);
    Status s = topology_virtual(t, nodes * rpn, &c);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
}

/* each rank owns per_rank units; slot/unit_at agree with owner; slots ascend with unit id */
static int valid(const Placement *p) {
    int *count = calloc((size_t)p->n_ranks, sizeof(int));
    int good = 1;
    for (int u = 0; u < p->n_units && good; u++) {
        int r = p->owner[u];
        if (r < 0 || r >= p->n_ranks || p->slot[u] < 0 || p->slot[u] >= p->per_rank) { good = 0; break; }
        count[r]++;
        if (p->unit_at[(size_t)r * p->per_rank + p->slot[u]] != u) good = 0;
    }
    for (int r = 0; r < p->n_ranks && good; r++) {
        if (count[r] != p->per_rank) good = 0;
        for (int q = 1; q < p->per_rank && good; q++)
            if (p->unit_at[(size_t)r * p->per_rank + q] <= p->unit_at[(size_t)r * p->per_rank + q - 1]) good = 0;
    }
    free(count);
    return good;
}

static void random_symmetric(Rng *rng, double *a, int U, double density) {
    for (int u = 0; u < U; u++) {
        a[(size_t)u * U + u] = 0;
        for (int v = u + 1; v < U; v++) {
            double x = rng_uniform(rng) < density ? rng_uniform(rng) * 10 : 0;
            a[(size_t)u * U + v] = a[(size_t)v * U + u] = x;
        }
    }
}

/* ---------------------------------------------------------------- struct and measures */

static void test_struct(void) {
    Placement p, q;
    Status s = placement_init(&p, 10, 4);
    ok(!STATUS_OK(s) && strstr(s.msg, "n_units=10") && strstr(s.msg, "n_ranks=4"), "init 10 over 4: error (%s)", s.msg);
    placement_free(&p);
    s = placement_init(&p, 0, 1);
    ok(!STATUS_OK(s), "init 0 units: error (%s)", s.msg);
    placement_free(&p);

    s = placement_init(&p, 4, 2);
    ok(STATUS_OK(s) && p.per_rank == 2 && valid(&p) && p.owner[3] == 1, "init 4 over 2: contiguous, valid");
    int owner[4] = {1, 0, 1, 0}, want_slot[4] = {0, 0, 1, 1}, want_at[4] = {1, 3, 0, 2};
    memcpy(p.owner, owner, sizeof owner);
    placement_fill_slots(&p);
    ok(memcmp(p.slot, want_slot, sizeof want_slot) == 0 && memcmp(p.unit_at, want_at, sizeof want_at) == 0,
       "fill_slots: slots 0 0 1 1, unit_at 1 3 0 2 (got %d %d %d %d)", p.unit_at[0], p.unit_at[1], p.unit_at[2], p.unit_at[3]);

    memset(&q, 0, sizeof q);
    placement_copy(&q, &p);
    ok(placement_equal(&q, &p) && q.owner != p.owner, "copy: equal, separate memory");
    q.owner[0] = 0; q.owner[1] = 1;
    placement_fill_slots(&q);
    ok(!placement_equal(&q, &p), "equal: a swapped pair differs");
    Placement big;
    s = placement_init(&big, 12, 3);
    placement_copy(&big, &p);
    ok(STATUS_OK(s) && placement_equal(&big, &p) && big.n_units == 4, "copy: resizes the destination");
    placement_free(&big);

    /* cut: A01=1 A02=2 A03=3 A12=4 A13=5 A23=6, owner 0 0 1 1 */
    double a[16] = {0, 1, 2, 3, 1, 0, 4, 5, 2, 4, 0, 6, 3, 5, 6, 0};
    placement_contiguous(&p);
    Topology t2x1, t1x2;
    make_topo(&t2x1, 2, 1);
    make_topo(&t1x2, 1, 2);
    double c0 = placement_cut(&p, a, &t2x1, 0), c1 = placement_cut(&p, a, &t2x1, 1);
    double d0 = placement_cut(&p, a, &t1x2, 0), d1 = placement_cut(&p, a, &t1x2, 1);
    ok(c0 == 14 && c1 == 14 && d0 == 0 && d1 == 14, "cut: 2x1 node 14 rank 14, 1x2 node 0 rank 14 (got %g %g %g %g)",
       c0, c1, d0, d1);
    double load[4] = {1, 2, 3, 6};
    double mv = placement_rank_maxvio(&p, load);
    ok(fabs(mv - 0.5) < 1e-15 && placement_rank_maxvio(&p, NULL) == 0, "rank maxvio: sums 3, 9 over mean 6 -> 0.5 (got %g)", mv);
    topology_free(&t2x1);
    topology_free(&t1x2);
    placement_free(&p);
    placement_free(&q);
    placement_free(&q);         /* safe twice */
}

/* ---------------------------------------------------------------- contiguous and EPLB */

static void test_contiguous_eplb(void) {
    Placement p;
    Topology t;
    make_topo(&t, 2, 2);
    placement_init(&p, 12, 4);
    placement_contiguous(&p);
    int exact = 1;
    for (int u = 0; u < 12; u++) exact &= p.owner[u] == u / 3 && p.slot[u] == u % 3 && p.unit_at[u] == u;
    ok(exact && valid(&p), "contiguous 12 over 4: unit u on rank u/3, slot u%%3");
    placement_free(&p);

    /* hand-computed: loads 1 8 3 6 2 7 4 5 on 2 nodes x 2 ranks (2 units a rank) */
    double load[8] = {1, 8, 3, 6, 2, 7, 4, 5};
    int want[8] = {0, 0, 3, 3, 2, 2, 1, 1};
    placement_init(&p, 8, 4);
    placement_eplb(&p, load, &t);
    ok(memcmp(p.owner, want, sizeof want) == 0 && valid(&p),
       "eplb hand case: owners 0 0 3 3 2 2 1 1 (got %d %d %d %d %d %d %d %d)", p.owner[0], p.owner[1], p.owner[2],
       p.owner[3], p.owner[4], p.owner[5], p.owner[6], p.owner[7]);
    ok(placement_rank_maxvio(&p, load) == 0, "eplb hand case: every rank carries 9");
    placement_eplb(&p, NULL, &t);
    int want_u[8] = {0, 2, 1, 3, 0, 2, 1, 3};   /* uniform: round robin over nodes, then ranks */
    ok(memcmp(p.owner, want_u, sizeof want_u) == 0, "eplb without load: owners 0 2 1 3 0 2 1 3 (got %d %d %d %d)",
       p.owner[0], p.owner[1], p.owner[2], p.owner[3]);
    placement_free(&p);
    topology_free(&t);

    /* random: node loads within the heaviest unit of each other, on many shapes */
    Rng rng;
    rng_init(&rng, 5, 0, RNG_TEST);
    int n_bad = 0, n_invalid = 0, n_cases = 0;
    for (int trial = 0; trial < 200; trial++) {
        int N = 1 + (int)rng_below(&rng, 4), rpn = 1 + (int)rng_below(&rng, 3), per = 1 + (int)rng_below(&rng, 5);
        int R = N * rpn, U = R * per;
        make_topo(&t, N, rpn);
        placement_init(&p, U, R);
        double *l = calloc((size_t)U, sizeof(double)), nl[4] = {0, 0, 0, 0}, heaviest = 0;
        for (int u = 0; u < U; u++) {
            l[u] = trial % 4 == 0 ? (double)rng_below(&rng, 4) : exp(2.0 * rng_normal(&rng));
            if (l[u] > heaviest) heaviest = l[u];
        }
        placement_eplb(&p, l, &t);
        for (int u = 0; u < U; u++) nl[t.node_of[p.owner[u]]] += l[u];
        double lo = nl[0], hi = nl[0];
        for (int n = 1; n < N; n++) { lo = fmin(lo, nl[n]); hi = fmax(hi, nl[n]); }
        n_cases++;
        if (!valid(&p)) n_invalid++;
        if (hi - lo > heaviest * (1 + 1e-12)) {
            if (n_bad < 3) printf("#   N=%d rpn=%d per=%d: node loads %g..%g, heaviest unit %g\n", N, rpn, per, lo, hi, heaviest);
            n_bad++;
        }
        free(l);
        placement_free(&p);
        topology_free(&t);
    }
    ok(n_invalid == 0, "eplb: valid placements on %d random shapes", n_cases);
    ok(n_bad == 0, "eplb: node loads within the heaviest unit of each other (%d of %d off)", n_bad, n_cases);
}

/* ---------------------------------------------------------------- topology policy */

/* 32 units in 4 planted blocks of 8 (one block per rank; blocks 0,1 and 2,3 share a node),
 * shuffled ids; returns the block of each unit in block[] */
static void planted(Rng *rng, double *a, double *load, int *block) {
    enum { U = 32 };
    int perm[U];
    for (int u = 0; u < U; u++) perm[u] = u;
    for (int u = U - 1; u > 0; u--) {
        int j = (int)rng_below(rng, (uint64_t)u + 1), x = perm[u];
        perm[u] = perm[j]; perm[j] = x;
    }
    for (int u = 0; u < U; u++) block[perm[u]] = u / 8;
    for (int u = 0; u < U; u++) {
        a[u * U + u] = 0;
        load[u] = 1.0 + 0.2 * rng_uniform(rng);
        for (int v = u + 1; v < U; v++) {
            double base = block[u] == block[v] ? 10.0 : block[u] / 2 == block[v] / 2 ? 3.0 : 0.5;
            a[u * U + v] = a[v * U + u] = base + 0.5 * rng_uniform(rng);
        }
    }
}

static void test_topology_planted(void) {
    enum { U = 32 };
    double *a = calloc(U * U, sizeof(double)), load[U];
    int block[U];
    Rng rng;
    rng_init(&rng, 17, 0, RNG_TEST);
    Topology t;
    make_topo(&t, 2, 2);
    Placement topo, contig, eplb, greedy, truth;
    placement_init(&topo, U, 4);
    placement_init(&contig, U, 4);
    placement_init(&eplb, U, 4);
    placement_init(&greedy, U, 4);
    placement_init(&truth, U, 4);
    int n_recovered = 0, n_smaller = 0, n_valid = 0, n_exact_cut = 0;
    for (int trial = 0; trial < 10; trial++) {
        planted(&rng, a, load, block);
        placement_topology(&topo, a, load, &t, 8);
        placement_contiguous(&contig);
        placement_eplb(&eplb, load, &t);
        for (int u = 0; u < U; u++) truth.owner[u] = block[u];
        placement_fill_slots(&truth);
        n_valid += valid(&topo);
        /* every rank holds one whole block, every node a pair of blocks that belong together */
        int rec = 1;
        for (int r = 0; r < 4 && rec; r++) {
            int b0 = block[topo.unit_at[r * 8]];
            for (int q = 1; q < 8; q++) rec &= block[topo.unit_at[r * 8 + q]] == b0;
        }
        for (int u = 0; u < U && rec; u++)
            for (int v = 0; v < U; v++)
                rec &= (block[u] / 2 == block[v] / 2) == topology_same_node(&t, topo.owner[u], topo.owner[v]);
        n_recovered += rec;
        double ct = placement_cut(&topo, a, &t, 0), cc = placement_cut(&contig, a, &t, 0);
        double ce = placement_cut(&eplb, a, &t, 0), cw = placement_cut(&truth, a, &t, 0);
        n_smaller += ct < cc && ct < ce;
        n_exact_cut += fabs(ct - cw) <= 1e-9 * cw && fabs(placement_cut(&topo, a, &t, 1) - placement_cut(&truth, a, &t, 1)) <= 1e-9 * cw;
        if (trial == 0)
            printf("#   inter-node cut: topology %.1f, contiguous %.1f, eplb %.1f, planted %.1f\n", ct, cc, ce, cw);
    }
    ok(n_valid == 10, "topology planted: valid placements (%d/10)", n_valid);
    ok(n_recovered == 10, "topology planted: blocks recovered at rank and node level (%d/10)", n_recovered);
    ok(n_exact_cut == 10, "topology planted: node and rank cuts equal the planted ones (%d/10)", n_exact_cut);
    ok(n_smaller == 10, "topology planted: inter-node cut strictly below contiguous and eplb (%d/10)", n_smaller);

    /* deterministic: the same call twice, and a copy, give the same placement */
    placement_topology(&greedy, a, load, &t, 8);
    ok(placement_equal(&greedy, &topo), "topology: deterministic across calls");
    placement_eplb(&greedy, load, &t);
    ok(placement_equal(&greedy, &eplb), "eplb: deterministic across calls");

    placement_free(&topo); placement_free(&contig); placement_free(&eplb);
    placement_free(&greedy); placement_free(&truth);
    topology_free(&t);
    free(a);
}

/* brute force: the minimum inter-part cut over balanced 2-way splits of U <= 12 units */
static double brute_bisect(const double *a, int U) {
    double best = INFINITY;
    for (unsigned mask = 0; mask < (1u << U); mask++) {
        if (__builtin_popcount(mask) != U / 2 || !(mask & 1u)) continue;
        double cut = 0;
        for (int u = 0; u < U; u++)
            for (int v = u + 1; v < U; v++)
                if (((mask >> u) & 1u) != ((mask >> v) & 1u)) cut += a[u * U + v];
        if (cut < best) best = cut;
    }
    return best;
}

static void test_topology_refine(void) {
    Rng rng;
    rng_init(&rng, 23, 0, RNG_TEST);
    int n_cases = 0, n_invalid = 0, n_worse = 0, n_better = 0, n_nondet = 0;
    for (int trial = 0; trial < 120; trial++) {
        int N = 1 + (int)rng_below(&rng, 3), rpn = 1 + (int)rng_below(&rng, 3), per = 1 + (int)rng_below(&rng, 4);
        int R = N * rpn, U = R * per;
        Topology t;
        make_topo(&t, N, rpn);
        double *a = calloc((size_t)U * U, sizeof(double)), *l = calloc((size_t)U, sizeof(double));
        random_symmetric(&rng, a, U, trial % 2 ? 0.3 : 1.0);
        for (int u = 0; u < U; u++) l[u] = 1 + rng_uniform(&rng);
        Placement g, f, f2;
        placement_init(&g, U, R);
        placement_init(&f, U, R);
        placement_init(&f2, U, R);
        placement_topology(&g, a, trial % 3 ? l : NULL, &t, 0);
        placement_topology(&f, a, trial % 3 ? l : NULL, &t, 8);
        placement_topology(&f2, a, trial % 3 ? l : NULL, &t, 8);
        double g0 = placement_cut(&g, a, &t, 0), f0 = placement_cut(&f, a, &t, 0);
        double tol = 1e-9 * (g0 + 1);
        n_cases++;
        n_invalid += !valid(&g) || !valid(&f);
        n_nondet += !placement_equal(&f, &f2);
        if (f0 > g0 + tol) {
            if (n_worse < 3) printf("#   N=%d rpn=%d per=%d: greedy cut %.6f, refined %.6f\n", N, rpn, per, g0, f0);
            n_worse++;
        }
        n_better += f0 < g0 - tol;
        placement_free(&g); placement_free(&f); placement_free(&f2);
        topology_free(&t);
        free(a); free(l);
    }
    ok(n_invalid == 0, "topology: valid placements on %d random shapes (greedy and refined)", n_cases);
    ok(n_nondet == 0, "topology: deterministic on random shapes (%d differ)", n_nondet);
    ok(n_worse == 0, "refinement never increases the inter-node cut (%d of %d worse)", n_worse, n_cases);
    ok(n_better > 0, "refinement lowers the cut in some cases (%d of %d)", n_better, n_cases);

    /* 2 nodes x 1 rank, U = 10: refined cut vs the brute-force optimal bisection */
    Topology t;
    make_topo(&t, 2, 1);
    int n_opt = 0, n_greedy_opt = 0;
    for (int trial = 0; trial < 50; trial++) {
        enum { U = 10 };
        double a[U * U];
        random_symmetric(&rng, a, U, 0.5);
        Placement g, f;
        placement_init(&g, U, 2);
        placement_init(&f, U, 2);
        placement_topology(&g, a, NULL, &t, 0);
        placement_topology(&f, a, NULL, &t, 8);
        double best = brute_bisect(a, U);
        n_opt += placement_cut(&f, a, &t, 0) <= best + 1e-9;
        n_greedy_opt += placement_cut(&g, a, &t, 0) <= best + 1e-9;
        placement_free(&g); placement_free(&f);
    }
    ok(n_opt >= 45 && n_opt >= n_greedy_opt, "refined bisection optimal in %d/50 random cases (greedy alone %d)",
       n_opt, n_greedy_opt);
    topology_free(&t);
}

/* uniform affinity: every split has the same cut, so load decides */
static void test_topology_balance(void) {
    enum { U = 16 };
    double a[U * U], load[U];
    for (int u = 0; u < U; u++) {
        load[u] = u + 1;
        for (int v = 0; v < U; v++) a[u * U + v] = u == v ? 0 : 1;
    }
    Topology t;
    make_topo(&t, 1, 4);
    Placement p, c;
    placement_init(&p, U, 4);
    placement_init(&c, U, 4);
    placement_topology(&p, a, load, &t, 8);
    placement_contiguous(&c);
    double mp = placement_rank_maxvio(&p, load), mc = placement_rank_maxvio(&c, load);
    ok(valid(&p) && mp < 0.03 && mp < mc, "uniform affinity, loads 1..16 on 4 ranks: maxvio %.4f (contiguous %.4f)", mp, mc);
    topology_free(&t);
    make_topo(&t, 2, 2);
    placement_topology(&p, a, load, &t, 8);
    mp = placement_rank_maxvio(&p, load);
    ok(valid(&p) && mp < 0.03, "uniform affinity on 2x2: maxvio %.4f", mp);
    placement_free(&p);
    placement_free(&c);
    topology_free(&t);
}

/* the load cap: MaxVio within the tolerance where the loads allow it, at a cut cost */
static void test_topology_capped(void) {
    enum { U = 32 };
    double *a = calloc(U * U, sizeof(double)), load[U];
    int block[U];
    Rng rng;
    rng_init(&rng, 29, 0, RNG_TEST);
    Topology t;
    make_topo(&t, 2, 2);
    Placement p, q;
    placement_init(&p, U, 4);
    placement_init(&q, U, 4);

    /* INFINITY is the uncapped policy; a loose cap changes nothing on the planted case */
    planted(&rng, a, load, block);
    placement_topology(&p, a, load, &t, 8);
    placement_topology_capped(&q, a, load, &t, 8, INFINITY);
    ok(placement_equal(&p, &q), "capped(INFINITY) == topology");
    placement_topology_capped(&q, a, load, &t, 8, 0.25);
    ok(placement_equal(&p, &q), "capped(0.25) keeps the planted placement (its MaxVio is %.3f)",
       placement_rank_maxvio(&p, load));

    /* one hot block (load 3 per unit, the rest 1): uncapped it sits on one rank (MaxVio 1) */
    for (int u = 0; u < U; u++) load[u] = block[u] == 0 ? 3.0 : 1.0;
    placement_topology(&p, a, load, &t, 8);
    placement_topology_capped(&q, a, load, &t, 8, 0.2);
    double mp = placement_rank_maxvio(&p, load), mq = placement_rank_maxvio(&q, load);
    double cp = placement_cut(&p, a, &t, 1), cq = placement_cut(&q, a, &t, 1);
    ok(fabs(mp - 1.0) < 1e-12, "hot block uncapped: MaxVio 1 (got %.3f)", mp);
    ok(valid(&q) && mq <= 0.2 + 1e-12 && cq > cp, "hot block capped at 0.2: MaxVio %.3f, rank cut %.1f > %.1f uncapped",
       mq, cq, cp);
    placement_topology_capped(&p, a, load, &t, 8, 0.2);
    ok(placement_equal(&p, &q), "capped: deterministic");
    placement_free(&p);
    placement_free(&q);
    topology_free(&t);
    free(a);

    /* random shapes with loads in [0.5, 1.5] and >= 4 units a rank: the cap always holds */
    int n_cases = 0, n_over = 0, n_invalid = 0;
    for (int trial = 0; trial < 60; trial++) {
        int N = 1 + (int)rng_below(&rng, 3), rpn = 1 + (int)rng_below(&rng, 3), per = 4 + (int)rng_below(&rng, 5);
        int R = N * rpn, n = R * per;
        make_topo(&t, N, rpn);
        double *aa = calloc((size_t)n * n, sizeof(double)), *l = calloc((size_t)n, sizeof(double));
        random_symmetric(&rng, aa, n, 0.5);
        for (int u = 0; u < n; u++) l[u] = 0.5 + rng_uniform(&rng);
        placement_init(&p, n, R);
        placement_topology_capped(&p, aa, l, &t, 8, 0.1);
        n_cases++;
        n_invalid += !valid(&p);
        double mv = placement_rank_maxvio(&p, l);
        if (mv > 0.1 + 1e-9) {
            if (n_over < 3) printf("#   N=%d rpn=%d per=%d: MaxVio %.4f\n", N, rpn, per, mv);
            n_over++;
        }
        placement_free(&p);
        topology_free(&t);
        free(aa); free(l);
    }
    ok(n_invalid == 0, "capped: valid placements on %d random shapes", n_cases);
    ok(n_over == 0, "capped at 0.1: MaxVio <= 0.1 on every random shape (%d over)", n_over);
}

/* ---------------------------------------------------------------- METIS partitioner at scale */

/* U units in N planted clusters of U/N (shuffled ids): 10 + U(0,1) inside a cluster, 8 random
 * noise partners per unit at U(0,2); loads exp(0.5 z) */
static void planted_sparse(Rng *rng, double *a, double *load, int U, int N) {
    int *perm = calloc((size_t)U, sizeof(int)), c = U / N;
    for (int u = 0; u < U; u++) perm[u] = u;
    for (int u = U - 1; u > 0; u--) {
        int j = (int)rng_below(rng, (uint64_t)u + 1), x = perm[u];
        perm[u] = perm[j]; perm[j] = x;
    }
    memset(a, 0, sizeof(double) * (size_t)U * U);
    for (int u = 0; u < U; u++) load[u] = exp(0.5 * rng_normal(rng));
    for (int b = 0; b < N; b++)
        for (int x = 0; x < c; x++)
            for (int y = x + 1; y < c; y++) {
                int u = perm[b * c + x], v = perm[b * c + y];
                a[(size_t)u * U + v] = a[(size_t)v * U + u] = 10 + rng_uniform(rng);
            }
    for (int u = 0; u < U; u++)
        for (int n = 0; n < 8; n++) {
            int v = (int)rng_below(rng, (uint64_t)U);
            if (v == u) continue;
            double x = 2 * rng_uniform(rng);
            a[(size_t)u * U + v] += x;
            a[(size_t)v * U + u] += x;
        }
    free(perm);
}

static void test_metis(void) {
    Rng rng;
    rng_init(&rng, 31, 0, RNG_TEST);
    /* exact sizes, determinism, cut below contiguous, on shapes METIS handles alone */
    int shapes[][3] = {{4, 2, 4}, {8, 4, 2}, {16, 2, 8}, {32, 8, 1}, {3, 3, 5}, {1, 4, 6}};
    int n_invalid = 0, n_nondet = 0, n_worse = 0, n_over = 0, n_cases = 0;
    for (int si = 0; si < 6; si++)
        for (int trial = 0; trial < 3; trial++) {
            int N = shapes[si][0], rpn = shapes[si][1], per = shapes[si][2], R = N * rpn, U = R * per;
            Topology t;
            make_topo(&t, N, rpn);
            double *a = calloc((size_t)U * U, sizeof(double)), *l = calloc((size_t)U, sizeof(double));
            planted_sparse(&rng, a, l, U, N);
            for (int u = 0; u < U; u++) l[u] = 0.5 + rng_uniform(&rng);   /* a cap of 0.1 is feasible */
            Placement p, q, c;
            placement_init(&p, U, R);
            placement_init(&q, U, R);
            placement_init(&c, U, R);
            placement_topology_part(&p, a, l, &t, 8, 0.1, PLACEMENT_PART_METIS);
            placement_topology_part(&q, a, l, &t, 8, 0.1, PLACEMENT_PART_METIS);
            n_cases++;
            n_invalid += !valid(&p);
            n_nondet += !placement_equal(&p, &q);
            double cp = placement_cut(&p, a, &t, 0), cc = placement_cut(&c, a, &t, 0);
            if (N > 1 && !(cp < cc)) {
                if (n_worse < 3) printf("#   N=%d rpn=%d per=%d: metis cut %.3f, contiguous %.3f\n", N, rpn, per, cp, cc);
                n_worse++;
            }
            if (per >= 4) n_over += placement_rank_maxvio(&p, l) > 0.1 + 1e-9;   /* fewer units: infeasible */
            placement_free(&p); placement_free(&q); placement_free(&c);
            topology_free(&t);
            free(a); free(l);
        }
    ok(n_invalid == 0, "metis: every rank holds exactly per_rank units on %d cases", n_cases);
    ok(n_nondet == 0, "metis: same input -> same placement twice (%d differ)", n_nondet);
    ok(n_worse == 0, "metis: inter-node cut below contiguous on planted clusters (%d not)", n_worse);
    ok(n_over == 0, "metis: rank MaxVio within the cap 0.1 where ranks hold >= 4 units (%d over)", n_over);

    /* the case: 1024 units on 128 nodes x 8 ranks, the default policy (AUTO) */
    enum { U = 1024, N = 128, RPN = 8 };
    double *a = calloc((size_t)U * U, sizeof(double)), *l = calloc(U, sizeof(double));
    planted_sparse(&rng, a, l, U, N);
    Topology t;
    make_topo(&t, N, RPN);
    Placement p, q, c;
    placement_init(&p, U, N * RPN);
    placement_init(&q, U, N * RPN);
    placement_init(&c, U, N * RPN);
    double t0 = time_now();
    placement_topology_capped(&p, a, l, &t, 8, 0.25);
    double dt = time_now() - t0;
    placement_topology_capped(&q, a, l, &t, 8, 0.25);
    double cp = placement_cut(&p, a, &t, 0), cc = placement_cut(&c, a, &t, 0);
    /* 5 s: the goal is 1 s (results/bench-placement.md measures it); a shared, loaded CI
     * machine must not make this flaky */
    ok(valid(&p) && dt < 5.0, "1024 units on 128 x 8 ranks: valid, %.3f s (bound 5 s)", dt);
    ok(placement_equal(&p, &q), "1024 units: deterministic");
    ok(cp < 0.5 * cc, "1024 units: inter-node cut %.1f below half of contiguous %.1f", cp, cc);
    placement_free(&p); placement_free(&q); placement_free(&c);
    topology_free(&t);
    free(a); free(l);
}

/* ---------------------------------------------------------------- issue 12: replicas and nodes */

/* 8 units on 2 nodes x 2 ranks, one copy: unit 0 (load 6) is copied to the other node, so it
 * carries 3 on each holder. Blind to the copy, the placement gives unit 0 the two lightest
 * units' node and then the copy lands on a full node; aware of it, the loads are even */
static void test_replica_aware(void) {
    Topology t;
    make_topo(&t, 2, 2);
    EpMap em;
    ep_map_init(&em, 4, 0, 8, 1);
    ep_map_set_topology(&em, &t);
    ep_map_set_replicas(&em, 1);
    double load[8] = {6, 3, 3, 3, 3, 3, 1, 1};
    memcpy(em.load, load, sizeof load);
    em.have_stats = 1;
    Placement blind, aware;
    EpPlaceOpts ob = {.replica_blind = 1}, oa = {0};
    EpPlaceInfo ib, ia;
    ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.0, &ob, &blind, &ib);
    ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.0, &oa, &aware, &ia);
    double vb = ep_placement_maxvio(&em, &blind), va = ep_placement_maxvio(&em, &aware);
    ok(valid(&blind) && valid(&aware), "replica-aware and blind placements are valid");
    ok(ia.copies == 1 && ib.copies == 0, "the aware placement plans 1 copy (%d), the blind one none (%d)", ia.copies,
       ib.copies);
    ok(va < vb - 0.05, "hand case: rank MaxVio counting the copy: aware %.3f < blind %.3f", va, vb);
    ok(fabs(ia.maxvio_after - va) < 1e-12 && fabs(ib.maxvio_after - vb) < 1e-12,
       "info.maxvio_after is the placement's MaxVio with its copies");
    placement_free(&blind);
    placement_free(&aware);
    /* no co-selection (objective 0 either way): from {0, 2} {1, 3} {4, 6} {5, 7} the aware
     * proposal is taken on balance alone (the copy lands on a rank with {3, 1}); the blind one,
     * which only compares the cut, is not */
    int32_t start[8] = {0, 1, 0, 1, 2, 3, 2, 3};
    memcpy(em.place.owner, start, sizeof start);
    placement_fill_slots(&em.place);
    ep_map_refresh(&em, NULL);
    int acc_b = ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.05, &ob, &blind, &ib);
    int acc_a = ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.05, &oa, &aware, &ia);
    ok(acc_a && !acc_b && ia.obj_after == 0 && fabs(ia.maxvio_before - 7 / 5.75 + 1) < 1e-9 &&
       ia.maxvio_after < ia.maxvio_before - 0.05,
       "zero co-selection: the aware proposal is taken on balance (rank MaxVio with the copy %.3f -> %.3f), the blind "
       "one is not (%d)", ia.maxvio_before, ia.maxvio_after, acc_b);
    placement_free(&blind);
    placement_free(&aware);
    ep_map_free(&em);
    topology_free(&t);

    /* random heavy-tailed loads, 4 nodes x 2 ranks, 32 units, 6 copies, where the load decides
     * the placement: no co-selection at the default cap, or co-selection under a tight cap (with
     * strong co-selection under a loose cap the cut decides and both stay within the cap) */
    Topology t4;
    make_topo(&t4, 4, 2);
    const double dens[2] = {0.0, 0.2}, caps[2] = {0.25, 0.1};
    for (int c = 0; c < 2; c++) {
        Rng rng;
        rng_init(&rng, 77, 0, RNG_TEST);
        int better = 0, worse = 0, n = 40;
        double sum_b = 0, sum_a = 0;
        for (int trial = 0; trial < n; trial++) {
            ep_map_init(&em, 8, 0, 32, 1);
            ep_map_set_topology(&em, &t4);
            ep_map_set_replicas(&em, 6);
            for (int u = 0; u < 32; u++) em.load[u] = 1 + rng_uniform(&rng) * (rng_uniform(&rng) < 0.2 ? 20 : 2);
            random_symmetric(&rng, em.affinity, 32, dens[c]);
            em.have_stats = 1;
            ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t4, 8, caps[c], 0.0, &ob, &blind, NULL);
            ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t4, 8, caps[c], 0.0, &oa, &aware, NULL);
            vb = ep_placement_maxvio(&em, &blind);
            va = ep_placement_maxvio(&em, &aware);
            sum_b += vb;
            sum_a += va;
            better += va < vb - 1e-9;
            worse += va > vb + 1e-9;
            placement_free(&blind);
            placement_free(&aware);
            ep_map_free(&em);
        }
        ok(sum_a < 0.8 * sum_b && better > 2 * worse,
           "random loads, co-selection density %.1f, cap %.2f: mean rank MaxVio with copies aware %.3f < 0.8 x blind "
           "%.3f (aware lower in %d of %d, higher in %d)", dens[c], caps[c], sum_a / n, sum_b / n, better, n, worse);
    }
    topology_free(&t4);
}

/* standard MoE, 8 experts on 2 nodes x 2 ranks, contiguous (experts 0-3 on node 0): every
 * token wants the pair (j, j + 4), one expert on each node. */
enum { NL_N = 64, NL_E = 8, NL_K = 2 };
static void nl_logits(Route *r) {
    for (int t = 0; t < NL_N; t++) {
        int j = t % 4;
        for (int e = 0; e < NL_E; e++) r->logits[t * NL_E + e] = 0.1f * (float)((e * 3 + t) % 5) / 5.0f;
        r->logits[t * NL_E + j] = 3.0f + 0.01f * (float)(t % 3);
        r->logits[t * NL_E + j + 4] = 3.0f;
    }
}

/* tokens whose two wanted experts are both selected */
static int nl_both(const Route *r) {
    int n = 0;
    for (int t = 0; t < NL_N; t++) {
        int j = t % 4, a = r->expert[t * NL_K], b = r->expert[t * NL_K + 1];
        n += (a == j && b == j + 4) || (a == j + 4 && b == j);
    }
    return n;
}

static void test_node_limit_prefs(void) {
    Topology t;
    make_topo(&t, 2, 2);
    Comm comm;
    Status st = comm_single_init(&comm);
    ASSERTF(STATUS_OK(st), "%s", st.msg);
    MoeConfig mc;
    memset(&mc, 0, sizeof mc);
    mc.renormalize = true;
    mc.balance = BALANCE_AUX;
    Route r;
    router_init(&r, NL_N, NL_E, NL_K, 0, 0);
    for (int pref = 0; pref < 2; pref++) {
        EpMap em;
        ep_map_init(&em, 4, 0, NL_E, 1);
        ep_map_set_topology(&em, &t);
        RouteNodes nd = {.n_nodes = 2, .expert_node = em.expert_node, .home = 0, .max_nodes = 1, .home_bias = 0};
        nl_logits(&r);
        router_select(&r, &mc, NULL, NULL, NL_N, &nd);
        int before = nl_both(&r);
        /* statistics: the preferred units (what moe_route feeds placement under a node limit),
         * or the routed pairs (kept selections, as epx_plan counts them) */
        if (pref) {
            int32_t pu[NL_N * NL_K];
            router_preferred(&r, &mc, NULL, NULL, NL_N, NL_K, pu);
            int pref_ok = 1;
            for (int q = 0; q < NL_N; q++) pref_ok &= (pu[q * 2] == q % 4 && pu[q * 2 + 1] == q % 4 + 4);
            ok(pref_ok, "router_preferred: every token's unconstrained top-2 (j, j + 4) across the node limit");
            em.collect = 1;
            ep_stats_add_pairs(&em, NL_N, NL_K, pu);
        } else {
            for (int q = 0; q < NL_N; q++) {
                int a = r.expert[q * 2], b = r.expert[q * 2 + 1];
                em.aff_step[a * (NL_E + 1) + b] += 1;
                em.aff_step[b * (NL_E + 1) + a] += 1;
            }
        }
        for (int q = 0; q < NL_N * NL_K; q++) em.aff_step[r.expert[q] * (NL_E + 1) + NL_E] += 1;
        ep_stats_step(&em, &comm, 1.0);
        Placement np;
        int acc = ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.05, NULL, &np, NULL);
        if (acc) {
            placement_copy(&em.place, &np);
            ep_map_refresh(&em, NULL);
        }
        int together = 0;
        for (int j = 0; j < 4; j++) together += topology_same_node(&t, em.place.owner[j], em.place.owner[j + 4]);
        nl_logits(&r);
        router_select(&r, &mc, NULL, NULL, NL_N, &nd);
        int after = nl_both(&r);
        if (pref)
            ok(before == 0 && acc && together == 4 && after == NL_N,
               "max_nodes 1, preferred-unit statistics: the 4 wanted pairs share a node (%d of 4, proposal %s), and "
               "then every token gets both its experts (%d of %d, before %d)", together, acc ? "taken" : "kept", after,
               NL_N, before);
        else
            ok(together == 0 && after == 0,
               "max_nodes 1, routed-pair statistics: the wanted pairs stay split (%d of 4 together), no token gets "
               "both (%d)", together, after);
        placement_free(&np);
        ep_map_free(&em);
    }
    /* home bias: the same preferred pairs, placed together at first, are spread over the nodes */
    EpMap em;
    ep_map_init(&em, 4, 0, NL_E, 1);
    ep_map_set_topology(&em, &t);
    int32_t own[NL_E] = {0, 1, 2, 3, 0, 1, 2, 3};   /* (j, j + 4) on rank j: node j / 2 */
    memcpy(em.place.owner, own, sizeof own);
    placement_fill_slots(&em.place);
    ep_map_refresh(&em, NULL);
    int32_t pu[NL_N * NL_K];
    nl_logits(&r);
    router_preferred(&r, &mc, NULL, NULL, NL_N, NL_K, pu);
    em.collect = 1;
    ep_stats_add_pairs(&em, NL_N, NL_K, pu);
    for (int q = 0; q < NL_N * NL_K; q++) em.aff_step[pu[q] * (NL_E + 1) + NL_E] += 1;
    ep_stats_step(&em, &comm, 1.0);
    EpPlaceOpts sp = {.spread = 1};
    Placement pack, spread;
    EpPlaceInfo ip, is;
    ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.05, NULL, &pack, &ip);
    int acc = ep_propose_ex(&em, PLACEMENT_TOPOLOGY, &t, 8, 0.25, 0.05, &sp, &spread, &is);
    int split = 0, split_pack = 0;
    for (int j = 0; j < 4; j++) {
        split += !topology_same_node(&t, spread.owner[j], spread.owner[j + 4]);
        split_pack += !topology_same_node(&t, pack.owner[j], pack.owner[j + 4]);
    }
    ok(acc && split == 4 && split_pack == 0 && is.obj_after < is.obj_before,
       "home bias, spread: every wanted pair on two nodes (%d of 4; packed: %d), co-selection kept inside the nodes "
       "%.1f -> %.1f", split, split_pack, is.obj_before, is.obj_after);
    placement_free(&pack);
    placement_free(&spread);
    ep_map_free(&em);
    router_free(&r);
    comm_free(&comm);
    topology_free(&t);
}

int main(void) {
    test_struct();
    test_contiguous_eplb();
    test_topology_planted();
    test_topology_refine();
    test_topology_balance();
    test_topology_capped();
    test_metis();
    test_replica_aware();
    test_node_limit_prefs();
    return harness_done();
}
