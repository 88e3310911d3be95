/* comm.c: the typed collective wrappers (byte/time accounting per phase) and the
 * single-process communicator. The MPI one is in comm_mpi.c. */
#include "comm.h"
#include "traffic.h"

#include <stdlib.h>
#include <string.h>

static void single_barrier(void *ctx) { (void)ctx; }
static void single_allreduce_f32(void *ctx, float *buf, size_t n) { (void)ctx; (void)buf; (void)n; }
static void single_allreduce_f64(void *ctx, double *buf, size_t n) { (void)ctx; (void)buf; (void)n; }
static void single_bcast(void *ctx, void *buf, size_t n, int root) { (void)ctx; (void)buf; (void)n; (void)root; }
static void single_gather(void *ctx, const void *send, void *recv, size_t n, int root) {
    (void)ctx; (void)root;
    if (recv != send) memmove(recv, send, n);
}
static void single_allgather(void *ctx, const void *send, void *recv, size_t n) {
    (void)ctx;
    if (recv != send) memmove(recv, send, n);
}
static void single_alltoall(void *ctx, const void *send, void *recv, size_t n) {
    (void)ctx;
    if (recv != send) memmove(recv, send, n);
}
static void single_alltoallv(void *ctx, const void *send, const size_t *sc, const size_t *sd,
                             void *recv, const size_t *rc, const size_t *rd) {
    (void)ctx;
    ASSERTF(sc[0] == rc[0], "alltoallv: %zu bytes sent to self but %zu expected", sc[0], rc[0]);
    if (sc[0]) memmove((char *)recv + rd[0], (const char *)send + sd[0], sc[0]);
}
static void single_abort(void *ctx, int code) { (void)ctx; exit(code); }

static const CommOps single_ops = {
    .name = "single",
    .barrier = single_barrier,
    .allreduce_sum_f32 = single_allreduce_f32,
    .allreduce_sum_f64 = single_allreduce_f64,
    .allreduce_max_f64 = single_allreduce_f64,
    .bcast_bytes = single_bcast,
    .gather_bytes = single_gather,
    .allgather_bytes = single_allgather,
    .alltoall_bytes = single_alltoall,
    .alltoallv_bytes = single_alltoallv,
    .abort = single_abort,
};

Status comm_single_init(Comm *c) {
    memset(c, 0, sizeof *c);
    c->ops = &single_ops;
    c->rank = 0; c->size = 1; c->local_rank = 0; c->local_size = 1;
    return status_ok();
}

static inline void account(Comm *c, int phase, size_t bytes, double t0) {
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    c->stats.bytes[phase] += bytes;
    c->stats.calls[phase] += 1;
    c->stats.seconds[phase] += time_now() - t0;
}

void comm_barrier(Comm *c) { c->ops->barrier(c->ctx); }

/* bytes counted as this rank's contribution (n * 4); ring algorithms send ~2(P-1)/P of it */
void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n_elems, int phase) {
    double t0 = time_now();
    if (c->size > 1) c->ops->allreduce_sum_f32(c->ctx, buf, n_elems);
    account(c, phase, c->size > 1 ? n_elems * sizeof(float) : 0, t0);
    /* the profiler books a ring allreduce: 2 (P-1) messages of n/P elements to the successor
     * (the bytes a ring algorithm sends; MPI may pick another algorithm) */
    if (c->traffic && c->size > 1) {
        uint64_t per = (uint64_t)((n_elems + (size_t)c->size - 1) / (size_t)c->size) * sizeof(float);
        traffic_add(c->traffic, phase, (c->rank + 1) % c->size, per * 2 * (uint64_t)(c->size - 1),
                    2 * (uint64_t)(c->size - 1));
        traffic_add_time(c->traffic, phase, time_now() - t0);
    }
}

void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n_elems) {
    double t0 = time_now();
    if (c->size > 1) c->ops->allreduce_sum_f64(c->ctx, buf, n_elems);
    account(c, COMM_PHASE_OTHER, c->size > 1 ? n_elems * sizeof(double) : 0, t0);
}

void comm_allreduce_max_f64(Comm *c, double *buf, size_t n_elems) {
    double t0 = time_now();
    if (c->size > 1) c->ops->allreduce_max_f64(c->ctx, buf, n_elems);
    account(c, COMM_PHASE_OTHER, c->size > 1 ? n_elems * sizeof(double) : 0, t0);
}

void comm_bcast_bytes(Comm *c, void *buf, size_t n_bytes, int root) {
    double t0 = time_now();
    if (c->size > 1) c->ops->bcast_bytes(c->ctx, buf, n_bytes, root);
    account(c, COMM_PHASE_OTHER, (c->size > 1 && c->rank == root) ? n_bytes : 0, t0);
}

void comm_gather_bytes(Comm *c, const void *send, void *recv, size_t n_bytes, int root) {
    double t0 = time_now();
    if (c->size > 1) c->ops->gather_bytes(c->ctx, send, recv, n_bytes, root);
    else if (recv != send) memmove(recv, send, n_bytes);
    account(c, COMM_PHASE_OTHER, (c->size > 1 && c->rank != root) ? n_bytes : 0, t0);
}

void comm_allgather_bytes(Comm *c, const void *send, void *recv, size_t n_bytes) {
    double t0 = time_now();
    if (c->size > 1) c->ops->allgather_bytes(c->ctx, send, recv, n_bytes);
    else if (recv != send) memmove(recv, send, n_bytes);
    account(c, COMM_PHASE_OTHER, c->size > 1 ? n_bytes * (size_t)(c->size - 1) : 0, t0);
}

void comm_alltoall_bytes(Comm *c, const void *send, void *recv, size_t n_bytes, int phase) {
    double t0 = time_now();
    c->ops->alltoall_bytes(c->ctx, send, recv, n_bytes);
    account(c, phase, n_bytes * (size_t)(c->size - 1), t0);
    if (c->traffic)
        for (int d = 0; d < c->size; d++)
            if (d != c->rank) traffic_add(c->traffic, phase, d, n_bytes, 1);
}

void comm_alltoallv_bytes(Comm *c, const void *send, const size_t *scounts, const size_t *sdispls,
                          void *recv, const size_t *rcounts, const size_t *rdispls, int phase) {
    double t0 = time_now();
    c->ops->alltoallv_bytes(c->ctx, send, scounts, sdispls, recv, rcounts, rdispls);
    size_t sent = 0;
    for (int d = 0; d < c->size; d++) {
        if (d == c->rank) continue;
        sent += scounts[d];
        if (c->traffic && scounts[d]) traffic_add(c->traffic, phase, d, scounts[d], 1);
    }
    account(c, phase, sent, t0);
    if (c->traffic) traffic_add_time(c->traffic, phase, time_now() - t0);
}

void comm_abort(Comm *c, int code) {
    fflush(stdout);
    fflush(stderr);
    if (c && c->ops) c->ops->abort(c->ctx, code);
    exit(code);
}

void comm_free(Comm *c) {
    if (!c) return;
    if (c->ctx) free(c->ctx);
    memset(c, 0, sizeof *c);
}

Status comm_agree(Comm *c, Status st) {
    double bad = STATUS_OK(st) ? 0 : 1;
    comm_allreduce_max_f64(c, &bad, 1);
    if (bad > 0 && STATUS_OK(st)) return status_errorf("another rank failed (see its message)");
    return st;
}
