/* bench_placement: time and quality of the topology placement's partitioners (Kernighan-Lin,
 * METIS, AUTO) on a synthetic co-selection affinity with planted clusters. One run prints one
 * CSV row (with --header, the header first); bench/run_placement.py sweeps the shapes and
 * writes results/bench-placement.{csv,md}.
 * The affinity: U units in clusters of U / N (one per node, ids shuffled); pairs inside a
 * cluster 10 + U(0,1), pairs of clusters 2c and 2c+1 ("neighbours") 2 + U(0,1) with
 * probability 1/2, plus every unit 16 random noise partners at U(0,2); loads exp(0.5 z).
 * Columns: CPU and wall seconds of one placement call (the run with the least CPU time of
 * --reps), inter-node and
 * inter-rank cut, their planted and contiguous counterparts, rank MaxVio, and whether the
 * placement is valid (every rank exactly per_rank units).
 * usage: bench_placement --units U --nodes N --rpn R --method kl|metis|auto [--seed S]
 *        [--reps n] [--passes 8] [--max-imbalance 0.25] [--header] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "placement.h"

static void usage(const char *msg) {
    fprintf(stderr, "bench_placement: %s\nusage: bench_placement --units U --nodes N --rpn R --method kl|metis|auto "
            "[--seed S] [--reps n] [--passes 8] [--max-imbalance 0.25] [--header]\n", msg);
    exit(2);
}

int main(int argc, char **argv) {
    int U = 0, N = 0, rpn = 0, reps = 1, passes = 8, header = 0, method = -1;
    unsigned long long seed = 1;
    double max_imb = 0.25;
    const char *mname = "";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--header")) { header = 1; continue; }
        if (!v) usage("an option lacks its value");
        if (!strcmp(a, "--units")) U = atoi(v);
        else if (!strcmp(a, "--nodes")) N = atoi(v);
        else if (!strcmp(a, "--rpn")) rpn = atoi(v);
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--reps")) reps = atoi(v);
        else if (!strcmp(a, "--passes")) passes = atoi(v);
        else if (!strcmp(a, "--max-imbalance")) max_imb = atof(v);
        else if (!strcmp(a, "--method")) {
            mname = v;
            method = !strcmp(v, "kl") ? PLACEMENT_PART_KL : !strcmp(v, "metis") ? PLACEMENT_PART_METIS
                   : !strcmp(v, "auto") ? PLACEMENT_PART_AUTO : -1;
            if (method < 0) usage("--method must be kl, metis or auto");
        } else usage("unknown option");
        i++;
    }
    if (U < 1 || N < 1 || rpn < 1 || method < 0 || reps < 1) usage("--units, --nodes, --rpn and --method are required");
    int R = N * rpn;
    if (U % R || (U / N) < 1) usage("--units must be a multiple of nodes x rpn");
    if (header)
        printf("units,nodes,rpn,per_rank,method,seed,cpu_s,wall_s,cut_node,cut_rank,planted_node,planted_rank,"
               "contig_node,contig_rank,maxvio,contig_maxvio,valid\n");

    /* the planted affinity */
    double *a = xcalloc(sizeof(double) * (size_t)U * U), *load = xcalloc(sizeof(double) * (size_t)U);
    int *perm = xcalloc(sizeof(int) * (size_t)U), *cl = xcalloc(sizeof(int) * (size_t)U);
    Rng rng;
    rng_init(&rng, seed, 0, RNG_TEST);
    for (int u = 0; u < U; u++) perm[u] = u;
    for (int u = U - 1; u > 0; u--) {
        int j = (int)rng_below(&rng, (uint64_t)u + 1), x = perm[u];
        perm[u] = perm[j]; perm[j] = x;
    }
    int csize = U / N;
    for (int u = 0; u < U; u++) cl[perm[u]] = u / csize;
    for (int u = 0; u < U; u++) load[u] = exp(0.5 * rng_normal(&rng));
    for (int c = 0; c < N; c++)          /* members of cluster c are perm[c*csize ..] */
        for (int x = 0; x < csize; x++)
            for (int y = x + 1; y < csize; y++) {
                int u = perm[c * csize + x], v = perm[c * csize + y];
                a[(size_t)u * U + v] = a[(size_t)v * U + u] = 10 + rng_uniform(&rng);
            }
    for (int c = 0; c + 1 < N; c += 2)
        for (int x = 0; x < csize; x++)
            for (int y = 0; y < csize; y++)
                if (rng_uniform(&rng) < 0.5) {
                    int u = perm[c * csize + x], v = perm[(c + 1) * csize + y];
                    a[(size_t)u * U + v] = a[(size_t)v * U + u] = 2 + rng_uniform(&rng);
                }
    for (int u = 0; u < U; u++)
        for (int n = 0; n < 16; n++) {
            int v = (int)rng_below(&rng, (uint64_t)U);
            if (v == u || cl[v] == cl[u]) continue;
            double x = 2 * rng_uniform(&rng);
            a[(size_t)u * U + v] += x;
            a[(size_t)v * U + u] += x;
        }

    TopologyConfig tc;
    memset(&tc, 0, sizeof tc);
    tc.nodes = N;
    tc.ranks_per_node = rpn;
    Topology t;
    Status st = topology_virtual(&t, R, &tc);
    if (!STATUS_OK(st)) usage(st.msg);
    Placement p, planted, contig;
    placement_init(&p, U, R);
    placement_init(&planted, U, R);
    placement_init(&contig, U, R);
    /* planted: cluster c on node c, its units over the node's ranks in id order */
    int *fill = xcalloc(sizeof(int) * (size_t)N);
    for (int u = 0; u < U; u++) {
        int c = cl[u];
        planted.owner[u] = c * rpn + fill[c]++ / (U / R);
    }
    placement_fill_slots(&planted);

    double best = INFINITY, best_wall = 0;
    for (int r = 0; r < reps; r++) {
        struct timespec c0, c1;     /* CPU time of this process: the machine may be shared */
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
        double t0 = time_now();
        placement_topology_part(&p, a, load, &t, passes, max_imb, method);
        double wall = time_now() - t0;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
        double dt = (double)(c1.tv_sec - c0.tv_sec) + 1e-9 * (double)(c1.tv_nsec - c0.tv_nsec);
        if (dt < best) { best = dt; best_wall = wall; }
        if (dt < best) best = dt;
    }
    int valid = 1, *count = xcalloc(sizeof(int) * (size_t)R);
    for (int u = 0; u < U; u++) count[p.owner[u]]++;
    for (int r = 0; r < R; r++) valid &= count[r] == p.per_rank;
    printf("%d,%d,%d,%d,%s,%llu,%.6f,%.6f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.5f,%.5f,%d\n", U, N, rpn, U / R, mname, seed, best, best_wall,
           placement_cut(&p, a, &t, 0), placement_cut(&p, a, &t, 1), placement_cut(&planted, a, &t, 0),
           placement_cut(&planted, a, &t, 1), placement_cut(&contig, a, &t, 0), placement_cut(&contig, a, &t, 1),
           placement_rank_maxvio(&p, load), placement_rank_maxvio(&contig, load), valid);
    placement_free(&p); placement_free(&planted); placement_free(&contig);
    topology_free(&t);
    xfree(a); xfree(load); xfree(perm); xfree(cl); xfree(fill); xfree(count);
    return valid ? 0 : 1;
}
