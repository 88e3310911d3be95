/* traffic.c: per-(phase, destination) byte counters, gathered into [phase, src, dst]
 * matrices at the end of each step and split into intra- and inter-node bytes. */
#include "traffic.h"

#include <stdlib.h>
#include <string.h>

void traffic_init(Traffic *tr, int P, int rank, const Topology *topo) {
    memset(tr, 0, sizeof *tr);
    tr->P = P;
    tr->rank = rank;
    tr->topo = topo;
    size_t n = (size_t)COMM_N_PHASES * P;
    tr->bytes = xcalloc(sizeof(uint64_t) * n);
    tr->msgs = xcalloc(sizeof(uint64_t) * n);
    tr->matrix = xcalloc(sizeof(uint64_t) * n * P);
    tr->msg_matrix = xcalloc(sizeof(uint64_t) * n * P);
    tr->total = xcalloc(sizeof(uint64_t) * n * P);
}

void traffic_free(Traffic *tr) {
    if (!tr) return;
    xfree(tr->bytes); xfree(tr->msgs); xfree(tr->matrix); xfree(tr->msg_matrix); xfree(tr->total);
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

void traffic_add_dispatch(Traffic *tr, double rows, double pairs, double nodes_touched, double tokens) {
    tr->rows += rows;
    tr->pairs += pairs;
    tr->nodes_touched += nodes_touched;
    tr->tokens += tokens;
}

void traffic_step_end(Traffic *tr, Comm *c, TrafficStep *out) {
    int P = tr->P, NP = COMM_N_PHASES;
    size_t row = (size_t)NP * P;
    /* one gather of every rank's [bytes | msgs] rows; the scalars go in an allreduce.
     * This bookkeeping is itself not counted (it bypasses the profiled wrappers' profiler). */
    Traffic *saved = c->traffic;
    c->traffic = NULL;
    uint64_t *mine = xcalloc(sizeof(uint64_t) * 2 * row);
    memcpy(mine, tr->bytes, sizeof(uint64_t) * row);
    memcpy(mine + row, tr->msgs, sizeof(uint64_t) * row);
    uint64_t *all = xcalloc(sizeof(uint64_t) * 2 * row * P);
    comm_allgather_bytes(c, mine, all, sizeof(uint64_t) * 2 * row);
    memset(out, 0, sizeof *out);
    for (int ph = 0; ph < NP; ph++)
        for (int s = 0; s < P; s++)
            for (int d = 0; d < P; d++) {
                uint64_t b = all[(size_t)s * 2 * row + (size_t)ph * P + d];
                uint64_t m = all[(size_t)s * 2 * row + row + (size_t)ph * P + d];
                tr->matrix[((size_t)ph * P + s) * P + d] = b;
                tr->msg_matrix[((size_t)ph * P + s) * P + d] = m;
                tr->total[((size_t)ph * P + s) * P + d] += b;
                out->msgs[ph] += (double)m;
                if (s == d) continue;
                if (tr->topo && !topology_same_node(tr->topo, s, d)) out->inter[ph] += (double)b;
                else out->intra[ph] += (double)b;
            }
    double red[COMM_N_PHASES + 4];
    for (int ph = 0; ph < NP; ph++) red[ph] = tr->seconds[ph];
    comm_allreduce_max_f64(c, red, NP);
    for (int ph = 0; ph < NP; ph++) out->seconds[ph] = red[ph];
    red[0] = tr->rows; red[1] = tr->pairs; red[2] = tr->nodes_touched; red[3] = tr->tokens;
    comm_allreduce_sum_f64(c, red, 4);
    out->rows_dispatched = red[0];
    out->pairs_routed = red[1];
    out->nodes_touched = red[2];
    out->tokens = red[3];
    memset(tr->bytes, 0, sizeof(uint64_t) * row);
    memset(tr->msgs, 0, sizeof(uint64_t) * row);
    memset(tr->seconds, 0, sizeof tr->seconds);
    tr->rows = tr->pairs = tr->nodes_touched = tr->tokens = 0;
    xfree(mine);
    xfree(all);
    c->traffic = saved;
}
