/* bench_alltoall: a microbenchmark of the skewed personalised exchange (nccl-tests style).
 * For per-rank message sizes from --min to --max bytes (doubling) and a fixed non-uniform
 * rank x rank byte matrix (routing-like: hot destinations plus per-pair noise, generated from
 * --seed, identical on every rank) it times
 *   raw    one MPI_Alltoallv with the counts known in advance, and
 *   dcmoe  the trainer's dispatch path: comm_alltoall_bytes of the byte counts, then
 *          comm_alltoallv_bytes of the payload, with a Traffic profiler attached,
 * after checking the received bytes of both paths once. Each timed iteration starts after a
 * barrier; an iteration's time is the slowest rank's, and the table shows the median over
 * --iters iterations after --warmup untimed ones: size (mean bytes a rank sends), count
 * (float elements), time (us), algbw = size / time (GB/s), busbw = algbw * (P-1)/P, #wrong,
 * and the time ratio dcmoe/raw. After timing, the profiler's dispatch byte total is checked
 * against the matrix (a mismatch counts as wrong). Exits non-zero on any wrong byte.
 *
 * Usage:
 *   mpirun -n 4 build/bench/bench_alltoall [--min 1024] [--max 16777216] [--iters 20]
 *          [--warmup 5] [--seed 1] [--skew 1.0] [--nodes 0] [--csv FILE]
 *   (as root, in a container: mpirun --allow-run-as-root --oversubscribe --bind-to none -n 4 ...)
 * --skew is the spread (standard deviation of the log) of the destination popularity: 0 gives
 * a near-uniform matrix with only the per-pair noise. --nodes N > 0 splits the ranks into N
 * virtual nodes (P/N each) so the profiler's intra/inter-node split means something on one
 * machine; 0 uses the real topology (hostnames, or SLURM_NODEID). Run it on a quiet machine: the numbers
 * of an oversubscribed run measure the scheduler, not the exchange.
 * Does not: test NCCL, the two-level exchange, or the model's exchange plan; and it is not a
 * test (meson builds it but never runs it). */
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "topology.h"
#include "traffic.h"

typedef struct BenchArgs {
    size_t min_bytes, max_bytes;
    int iters, warmup;
    uint64_t seed;
    double skew;
    int nodes;                   /* > 0: a virtual topology of that many nodes */
    const char *csv;
} BenchArgs;

static int parse_args(int argc, char **argv, BenchArgs *a, int rank) {
    a->min_bytes = 1024;
    a->max_bytes = (size_t)16 << 20;
    a->iters = 20;
    a->warmup = 5;
    a->seed = 1;
    a->skew = 1.0;
    a->nodes = 0;
    a->csv = NULL;
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int known = 1;
        if (!v) known = 0;
        else if (strcmp(k, "--min") == 0) a->min_bytes = (size_t)strtoull(v, NULL, 10);
        else if (strcmp(k, "--max") == 0) a->max_bytes = (size_t)strtoull(v, NULL, 10);
        else if (strcmp(k, "--iters") == 0) a->iters = atoi(v);
        else if (strcmp(k, "--warmup") == 0) a->warmup = atoi(v);
        else if (strcmp(k, "--seed") == 0) a->seed = (uint64_t)strtoull(v, NULL, 10);
        else if (strcmp(k, "--skew") == 0) a->skew = atof(v);
        else if (strcmp(k, "--nodes") == 0) a->nodes = atoi(v);
        else if (strcmp(k, "--csv") == 0) a->csv = v;
        else known = 0;
        if (!known) {
            if (rank == 0)
                fprintf(stderr, "bench_alltoall: unknown or incomplete option '%s'\nusage: bench_alltoall [--min BYTES] "
                        "[--max BYTES] [--iters N] [--warmup N] [--seed S] [--skew X] [--nodes N] [--csv FILE]\n", k);
            return 0;
        }
        i++;
    }
    if (a->min_bytes < 1 || a->max_bytes < a->min_bytes || a->iters < 1 || a->warmup < 0 || a->skew < 0 || a->nodes < 0) {
        if (rank == 0)
            fprintf(stderr, "bench_alltoall: need 1 <= --min (%zu) <= --max (%zu), --iters (%d) >= 1, "
                    "--warmup (%d) >= 0, --skew (%g) >= 0, --nodes (%d) >= 0\n", a->min_bytes, a->max_bytes, a->iters,
                    a->warmup, a->skew, a->nodes);
        return 0;
    }
    return 1;
}

/* routing-like weights w[P, P]: destination popularity exp(skew * g_d) times per-pair noise */
static void make_weights(double *w, int P, uint64_t seed, double skew) {
    Rng rng;
    rng_init(&rng, seed, 0, RNG_TEST);
    double *pop = calloc((size_t)P, sizeof(double));
    for (int d = 0; d < P; d++) pop[d] = exp(skew * rng_normal(&rng));
    for (int s = 0; s < P; s++)
        for (int d = 0; d < P; d++) w[s * P + d] = pop[d] * exp(0.5 * rng_normal(&rng));
    free(pop);
}

/* bytes[P, P] scaled so a rank sends `size` bytes on average */
static void make_matrix(size_t *bytes, const double *w, int P, size_t size) {
    double sum = 0;
    for (int q = 0; q < P * P; q++) sum += w[q];
    for (int q = 0; q < P * P; q++) bytes[q] = (size_t)llround((double)size * P * w[q] / sum);
}

static inline unsigned char pattern(int src, int dst, size_t k) {
    return (unsigned char)((size_t)src * 131u + (size_t)dst * 31u + k * 7u + (k >> 8));
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* median over iterations of the slowest rank's time */
static double median_of_max(double *t, int n) {
    MPI_Allreduce(MPI_IN_PLACE, t, n, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

typedef struct Exchange {        /* this rank's side of one matrix */
    int P, rank;
    size_t *sc, *sd, *rc, *rd;   /* [P] bytes */
    int *isc, *isd, *irc, *ird;  /* [P] the same as int for raw MPI */
    size_t send_total, recv_total;
    unsigned char *send, *recv;
} Exchange;

static void exchange_build(Exchange *x, const size_t *bytes, int P, int rank) {
    memset(x, 0, sizeof *x);
    x->P = P;
    x->rank = rank;
    x->sc = calloc((size_t)P * 4, sizeof(size_t));
    x->sd = x->sc + P; x->rc = x->sc + 2 * P; x->rd = x->sc + 3 * P;
    x->isc = calloc((size_t)P * 4, sizeof(int));
    x->isd = x->isc + P; x->irc = x->isc + 2 * P; x->ird = x->isc + 3 * P;
    for (int d = 0; d < P; d++) {
        x->sc[d] = bytes[(size_t)rank * P + d];
        x->sd[d] = x->send_total;
        x->send_total += x->sc[d];
        x->rc[d] = bytes[(size_t)d * P + rank];
        x->rd[d] = x->recv_total;
        x->recv_total += x->rc[d];
    }
    ASSERTF(x->send_total < INT32_MAX && x->recv_total < INT32_MAX, "bench: more than 2 GiB per rank");
    for (int d = 0; d < P; d++) {
        x->isc[d] = (int)x->sc[d]; x->isd[d] = (int)x->sd[d]; x->irc[d] = (int)x->rc[d]; x->ird[d] = (int)x->rd[d];
    }
    x->send = malloc(x->send_total + 1);
    x->recv = malloc(x->recv_total + 1);
    ASSERT(x->send && x->recv);
    for (int d = 0; d < P; d++)
        for (size_t k = 0; k < x->sc[d]; k++) x->send[x->sd[d] + k] = pattern(rank, d, k);
}

static void exchange_free(Exchange *x) {
    free(x->sc); free(x->isc); free(x->send); free(x->recv);
    memset(x, 0, sizeof *x);
}

static void run_raw(Exchange *x) {
    MPI_Alltoallv(x->send, x->isc, x->isd, MPI_BYTE, x->recv, x->irc, x->ird, MPI_BYTE, MPI_COMM_WORLD);
}

/* the trainer's path: counts first (dispatch phase), then the payload; the receive layout
 * comes from the exchanged counts, not from the matrix */
static void run_dcmoe(Exchange *x, Comm *c, size_t *rc, size_t *rd) {
    comm_alltoall_bytes(c, x->sc, rc, sizeof(size_t), COMM_PHASE_DISPATCH);
    size_t off = 0;
    for (int d = 0; d < x->P; d++) { rd[d] = off; off += rc[d]; }
    ASSERTF(off == x->recv_total, "bench: exchanged counts sum to %zu bytes, matrix says %zu", off, x->recv_total);
    comm_alltoallv_bytes(c, x->send, x->sc, x->sd, x->recv, rc, rd, COMM_PHASE_DISPATCH);
}

static long check_recv(const Exchange *x) {
    long wrong = 0;
    for (int s = 0; s < x->P; s++)
        for (size_t k = 0; k < x->rc[s]; k++) wrong += x->recv[x->rd[s] + k] != pattern(s, x->rank, k);
    return wrong;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    Comm comm;
    Status st = comm_mpi_init(&comm);
    if (!STATUS_OK(st)) { fprintf(stderr, "bench_alltoall: %s\n", st.msg); MPI_Abort(MPI_COMM_WORLD, 1); }
    int P = comm.size, rank = comm.rank;
    BenchArgs a;
    if (!parse_args(argc, argv, &a, rank)) { MPI_Finalize(); return 2; }
    Topology topo;
    TopologyConfig tcfg;
    memset(&tcfg, 0, sizeof tcfg);
    tcfg.nodes = a.nodes;
    tcfg.ranks_per_node = a.nodes > 0 ? P / a.nodes : 0;
    st = topology_init(&topo, &comm, &tcfg);
    if (!STATUS_OK(st)) {
        if (rank == 0) fprintf(stderr, "bench_alltoall: %s\n", st.msg);
        MPI_Finalize();
        return 1;
    }
    Traffic tr;
    traffic_init(&tr, P, rank, &topo, P);

    double *w = calloc((size_t)P * P, sizeof(double));
    size_t *bytes = calloc((size_t)P * P, sizeof(size_t));
    size_t *rc = calloc((size_t)P * 2, sizeof(size_t)), *rd = rc + P;
    double *t_raw = calloc((size_t)a.iters, sizeof(double)), *t_dc = calloc((size_t)a.iters, sizeof(double));
    make_weights(w, P, a.seed, a.skew);

    FILE *csv = NULL;
    if (rank == 0 && a.csv) {
        csv = fopen(a.csv, "w");
        if (!csv) fprintf(stderr, "bench_alltoall: cannot write --csv %s\n", a.csv);
        else fprintf(csv, "ranks,size,count,max_send,raw_us,raw_algbw,raw_busbw,dcmoe_us,dcmoe_algbw,dcmoe_busbw,ratio,wrong\n");
    }
    if (rank == 0) {
        char desc[128];
        topology_describe(&topo, desc, sizeof desc);
        make_matrix(bytes, w, P, 1 << 20);
        size_t hi_row = 0, hi_col = 0;
        for (int s = 0; s < P; s++) {
            size_t row = 0, col = 0;
            for (int d = 0; d < P; d++) { row += bytes[s * P + d]; col += bytes[d * P + s]; }
            if (row > hi_row) hi_row = row;
            if (col > hi_col) hi_col = col;
        }
        printf("# bench_alltoall: %d ranks (%s), seed %llu, skew %.2f, %d warm-up + %d timed iterations\n", P, desc,
               (unsigned long long)a.seed, a.skew, a.warmup, a.iters);
        printf("# matrix: max bytes sent by a rank / mean %.2f, max received / mean %.2f; time = median of the slowest rank\n",
               (double)hi_row / (1 << 20), (double)hi_col / (1 << 20));
        printf("#%11s %11s | %10s %8s %8s %6s | %10s %8s %8s %6s | %6s\n", "size", "count", "raw(us)", "algbw", "busbw",
               "#wrong", "dcmoe(us)", "algbw", "busbw", "#wrong", "ratio");
    }

    long any_wrong = 0;
    for (size_t size = a.min_bytes; size <= a.max_bytes; size *= 2) {
        make_matrix(bytes, w, P, size);
        double mean_send = 0;
        size_t max_send = 0;
        for (int s = 0; s < P; s++) {
            size_t row = 0;
            for (int d = 0; d < P; d++) row += bytes[s * P + d];
            mean_send += (double)row / P;
            if (row > max_send) max_send = row;
        }
        Exchange x;
        exchange_build(&x, bytes, P, rank);

        /* correctness once per path */
        memset(x.recv, 0xA5, x.recv_total + 1);
        run_raw(&x);
        long wrong_raw = check_recv(&x);
        memset(x.recv, 0x5A, x.recv_total + 1);
        comm.traffic = &tr;
        run_dcmoe(&x, &comm, rc, rd);
        long wrong_dc = check_recv(&x);

        for (int i = 0; i < a.warmup; i++) run_raw(&x);
        for (int i = 0; i < a.iters; i++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            run_raw(&x);
            t_raw[i] = MPI_Wtime() - t0;
        }
        for (int i = 0; i < a.warmup; i++) run_dcmoe(&x, &comm, rc, rd);
        for (int i = 0; i < a.iters; i++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            run_dcmoe(&x, &comm, rc, rd);
            t_dc[i] = MPI_Wtime() - t0;
        }
        comm.traffic = NULL;

        /* the profiler must have seen every off-diagonal byte of every dcmoe call */
        TrafficStep ts;
        traffic_step_end(&tr, &comm, &ts, true);
        double offdiag = 0;
        for (int s = 0; s < P; s++)
            for (int d = 0; d < P; d++)
                if (s != d) offdiag += (double)bytes[s * P + d] + (double)sizeof(size_t);
        double calls = 1 + a.warmup + a.iters;
        double counted = ts.intra[COMM_PHASE_DISPATCH] + ts.inter[COMM_PHASE_DISPATCH];
        long wrong_tr = fabs(counted - calls * offdiag) > 0.5 ? 1 : 0;

        long wr[2] = {wrong_raw, wrong_dc + wrong_tr};
        MPI_Allreduce(MPI_IN_PLACE, wr, 2, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
        any_wrong += wr[0] + wr[1];
        double tr_s = median_of_max(t_raw, a.iters), td_s = median_of_max(t_dc, a.iters);
        if (rank == 0) {
            double alg_r = mean_send / tr_s / 1e9, alg_d = mean_send / td_s / 1e9, f = P > 1 ? (double)(P - 1) / P : 0;
            if (wrong_tr) printf("# profiler counted %.0f dispatch bytes, expected %.0f\n", counted, calls * offdiag);
            printf(" %11zu %11zu | %10.1f %8.3f %8.3f %6ld | %10.1f %8.3f %8.3f %6ld | %6.3f\n", size, size / 4,
                   tr_s * 1e6, alg_r, alg_r * f, wr[0], td_s * 1e6, alg_d, alg_d * f, wr[1], td_s / tr_s);
            fflush(stdout);
            if (csv)
                fprintf(csv, "%d,%zu,%zu,%zu,%.3f,%.6f,%.6f,%.3f,%.6f,%.6f,%.6f,%ld\n", P, size, size / 4,
                        max_send, tr_s * 1e6, alg_r, alg_r * f, td_s * 1e6, alg_d, alg_d * f, td_s / tr_s, wr[0] + wr[1]);
        }
        exchange_free(&x);
        if (size > a.max_bytes / 2) break;    /* no overflow of size *= 2 */
    }
    if (rank == 0) {
        /* the profiler's view of all dcmoe calls: which share of the payload left its node */
        double intra = 0, inter = 0;
        for (int s = 0; s < P; s++)
            for (int d = 0; d < P; d++)
                if (s != d) {
                    double b = (double)tr.total[((size_t)COMM_PHASE_DISPATCH * P + s) * P + d];
                    if (topology_same_node(&topo, s, d)) intra += b;
                    else inter += b;
                }
        printf("# profiler, dispatch phase: %.3g bytes intra-node, %.3g inter-node (%.1f%% inter)\n", intra, inter,
               intra + inter > 0 ? 100.0 * inter / (intra + inter) : 0.0);
        printf("# %s: %ld wrong bytes in all\n", any_wrong ? "FAILED" : "ok", any_wrong);
        if (csv) fclose(csv);
    }
    free(w); free(bytes); free(rc); free(t_raw); free(t_dc);
    traffic_free(&tr);
    topology_free(&topo);
    comm_free(&comm);
    MPI_Finalize();
    return any_wrong ? 1 : 0;
}
