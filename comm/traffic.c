/* traffic.c: per-(phase, destination) byte counters, gathered into [phase, src, dst]
 * matrices at the end of each step and split into intra- and inter-node bytes. */
#include "traffic.h"

#include <stdlib.h>
#include <string.h>

void traffic_init(Traffic *tr, int P, int rank, const Topology *topo, int rank_matrix_max) {
    memset(tr, 0, sizeof *tr);
    tr->P = P;
    tr->rank = rank;
    tr->topo = topo;
    tr->n_nodes = topo && topo->n_nodes > 0 ? topo->n_nodes : 1;
    tr->rank_matrix_max = rank_matrix_max;
    size_t n = (size_t)COMM_N_PHASES * P;
    tr->bytes = xcalloc(sizeof(uint64_t) * n);
    tr->msgs = xcalloc(sizeof(uint64_t) * n);
    tr->sent = xcalloc(sizeof(double) * n);
    tr->recv = xcalloc(sizeof(double) * n);
    tr->node_matrix = xcalloc(sizeof(double) * COMM_N_PHASES * (size_t)tr->n_nodes * tr->n_nodes);
    tr->has_rank_matrix = P <= rank_matrix_max;
    if (tr->has_rank_matrix) {
        tr->matrix = xcalloc(sizeof(uint64_t) * n * P);
        tr->msg_matrix = xcalloc(sizeof(uint64_t) * n * P);
        tr->total = xcalloc(sizeof(uint64_t) * n * P);
    }
}

void traffic_free(Traffic *tr) {
    if (!tr) return;
    xfree(tr->bytes); xfree(tr->msgs); xfree(tr->sent); xfree(tr->recv); xfree(tr->node_matrix);
    xfree(tr->matrix); xfree(tr->msg_matrix); xfree(tr->total);
    memset(tr, 0, sizeof *tr);
}

void traffic_add(Traffic *tr, int phase, int dst, uint64_t bytes, uint64_t msgs) {
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    ASSERTF(dst >= 0 && dst < tr->P, "traffic_add: destination rank %d of %d", dst, tr->P);
    tr->bytes[(size_t)phase * tr->P + dst] += bytes;
    tr->msgs[(size_t)phase * tr->P + dst] += msgs;
}

void traffic_add_time(Traffic *tr, int phase, double seconds) {
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    tr->seconds[phase] += seconds;
}

void traffic_add_wait(Traffic *tr, int phase, double seconds) {
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    tr->wait[phase] += seconds;
}

void traffic_add_dispatch(Traffic *tr, double rows, double pairs, double nodes_touched, double tokens) {
    tr->rows += rows;
    tr->pairs += pairs;
    tr->nodes_touched += nodes_touched;
    tr->tokens += tokens;
}

static int node_of(const Traffic *tr, int r) { return tr->topo ? tr->topo->node_of[r] : 0; }

void traffic_step_end(Traffic *tr, Comm *c, TrafficStep *out, bool matrices) {
    int P = tr->P, NP = COMM_N_PHASES, N = tr->n_nodes, me = tr->rank;
    size_t row = (size_t)NP * P;
    /* this bookkeeping is itself not counted (it bypasses the profiled wrappers' profiler) */
    Traffic *saved = c->traffic;
    c->traffic = NULL;
    memset(out, 0, sizeof *out);
    /* this rank's row: intra/inter/messages, and its slot of the marginals. Byte counts are
     * integers below 2^53, so the sums are exact in any order. */
    double red[4 * COMM_N_PHASES + 4];
    memset(red, 0, sizeof red);
    memset(tr->sent, 0, sizeof(double) * row);
    memset(tr->recv, 0, sizeof(double) * row);
    for (int ph = 0; ph < NP; ph++)
        for (int d = 0; d < P; d++) {
            uint64_t b = tr->bytes[(size_t)ph * P + d];
            red[2 * NP + ph] += (double)tr->msgs[(size_t)ph * P + d];
            if (d == me) continue;
            if (tr->topo && !topology_same_node(tr->topo, me, d)) red[NP + ph] += (double)b;
            else red[ph] += (double)b;
            tr->sent[(size_t)ph * P + me] += (double)b;
            tr->recv[(size_t)ph * P + d] += (double)b;
        }
    red[3 * NP] = tr->rows; red[3 * NP + 1] = tr->pairs; red[3 * NP + 2] = tr->nodes_touched; red[3 * NP + 3] = tr->tokens;
    for (int ph = 0; ph < NP; ph++) red[3 * NP + 4 + ph] = tr->wait[ph];
    comm_allreduce_sum_f64(c, red, 4 * NP + 4);
    for (int ph = 0; ph < NP; ph++) { out->intra[ph] = red[ph]; out->inter[ph] = red[NP + ph]; out->msgs[ph] = red[2 * NP + ph]; }
    out->rows_dispatched = red[3 * NP];
    out->pairs_routed = red[3 * NP + 1];
    out->nodes_touched = red[3 * NP + 2];
    out->tokens = red[3 * NP + 3];
    for (int ph = 0; ph < NP; ph++) out->wait[ph] = red[3 * NP + 4 + ph] / c->size;
    double sec[COMM_N_PHASES];
    for (int ph = 0; ph < NP; ph++) sec[ph] = tr->seconds[ph];
    comm_allreduce_max_f64(c, sec, NP);
    for (int ph = 0; ph < NP; ph++) out->seconds[ph] = sec[ph];
    /* marginals: O(P) per rank */
    double *marg = xcalloc(sizeof(double) * 2 * row);
    memcpy(marg, tr->sent, sizeof(double) * row);
    memcpy(marg + row, tr->recv, sizeof(double) * row);
    comm_allreduce_sum_f64(c, marg, 2 * row);
    memcpy(tr->sent, marg, sizeof(double) * row);
    memcpy(tr->recv, marg + row, sizeof(double) * row);
    xfree(marg);
    if (matrices) {
        /* node x node: O(nodes²), self-traffic of a rank excluded as in intra/inter */
        size_t nn = (size_t)NP * N * N;
        memset(tr->node_matrix, 0, sizeof(double) * nn);
        int sn = node_of(tr, me);
        for (int ph = 0; ph < NP; ph++)
            for (int d = 0; d < P; d++)
                if (d != me) tr->node_matrix[((size_t)ph * N + sn) * N + node_of(tr, d)] += (double)tr->bytes[(size_t)ph * P + d];
        comm_allreduce_sum_f64(c, tr->node_matrix, nn);
        if (tr->has_rank_matrix) {
            /* the full rank x rank matrices: one gather of every rank's [bytes | msgs] rows */
            uint64_t *mine = xcalloc(sizeof(uint64_t) * 2 * row);
            memcpy(mine, tr->bytes, sizeof(uint64_t) * row);
            memcpy(mine + row, tr->msgs, sizeof(uint64_t) * row);
            uint64_t *all = xcalloc(sizeof(uint64_t) * 2 * row * P);
            comm_allgather_bytes(c, mine, all, sizeof(uint64_t) * 2 * row);
            for (int ph = 0; ph < NP; ph++)
                for (int s = 0; s < P; s++)
                    for (int d = 0; d < P; d++) {
                        uint64_t b = all[(size_t)s * 2 * row + (size_t)ph * P + d];
                        tr->matrix[((size_t)ph * P + s) * P + d] = b;
                        tr->msg_matrix[((size_t)ph * P + s) * P + d] = all[(size_t)s * 2 * row + row + (size_t)ph * P + d];
                        tr->total[((size_t)ph * P + s) * P + d] += b;
                    }
            xfree(mine);
            xfree(all);
        }
    }
    memset(tr->bytes, 0, sizeof(uint64_t) * row);
    memset(tr->msgs, 0, sizeof(uint64_t) * row);
    memset(tr->seconds, 0, sizeof tr->seconds);
    memset(tr->wait, 0, sizeof tr->wait);
    tr->rows = tr->pairs = tr->nodes_touched = tr->tokens = 0;
    c->traffic = saved;
}
