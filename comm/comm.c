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

/* the communicator every sub-communicator was split from: its statistics and profiler
 * book the bytes of all of them */
static inline Comm *root_of(Comm *c) {
    while (c->parent) c = c->parent;
    return c;
}
static inline struct Traffic *traffic_of(Comm *c) { return comm_traffic(c); }

static inline void account_s(Comm *c, int phase, size_t bytes, double seconds) {
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    c = root_of(c);
    c->stats.bytes[phase] += bytes;
    c->stats.calls[phase] += 1;
    c->stats.seconds[phase] += seconds;
}
static inline void account(Comm *c, int phase, size_t bytes, double t0) { account_s(c, phase, bytes, time_now() - t0); }

void comm_barrier(Comm *c) { c->ops->barrier(c->ctx); }

/* sync_wait (the root's flag): a timed barrier before a blocking collective, whose wait is
 * booked under the collective's phase in stats.wait and the profiler instead of in its time.
 * Every all-to-all and allreduce of the exchange and allreduce phases, and the small ones
 * (OTHER: capacity counts, loss statistics, the loss and norm reductions) while the profiler
 * is attached, i.e. inside a training step: not the profiler's own sums, not start-up */
static void sync_wait(Comm *c, int phase) {
    Comm *root = root_of(c);
    if (!root->sync_wait || c->size < 2) return;
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    struct Traffic *tr = traffic_of(c);
    if (phase == COMM_PHASE_OTHER && !tr) return;
    double t0 = time_now();
    c->ops->barrier(c->ctx);
    double w = time_now() - t0;
    root->stats.wait[phase] += w;
    if (tr) traffic_add_wait(tr, phase, w);
}

/* bytes counted as this rank's contribution (n * 4); ring algorithms send ~2(P-1)/P of it */
static void book_allreduce_f32_s(Comm *c, size_t n_elems, int phase, double seconds) {
    account_s(c, phase, c->size > 1 ? n_elems * sizeof(float) : 0, seconds);
    /* the profiler books a ring allreduce: 2 (P-1) messages of n/P elements to the successor
     * (the bytes a ring algorithm sends; MPI may pick another algorithm) */
    struct Traffic *tr = traffic_of(c);
    if (tr && c->size > 1) {
        uint64_t per = (uint64_t)((n_elems + (size_t)c->size - 1) / (size_t)c->size) * sizeof(float);
        traffic_add(tr, phase, comm_world_rank(c, (c->rank + 1) % c->size), per * 2 * (uint64_t)(c->size - 1),
                    2 * (uint64_t)(c->size - 1));
        traffic_add_time(tr, phase, seconds);
    }
}
static void book_allreduce_f32(Comm *c, size_t n_elems, int phase, double t0) {
    book_allreduce_f32_s(c, n_elems, phase, time_now() - t0);
}

void comm_book_allreduce_f32(Comm *c, size_t n_elems, int phase, double seconds, double inflight_s) {
    book_allreduce_f32_s(c, n_elems, phase, seconds);
    if (phase < 0 || phase >= COMM_N_PHASES) phase = COMM_PHASE_OTHER;
    root_of(c)->stats.inflight[phase] += inflight_s;
}

/* a request with nothing in flight; returns whether there is anything to sum */
static int request_open(Comm *c, CommRequest *rq, int dev, size_t n_elems) {
    rq->c = c;
    rq->dev = dev;
    rq->req = NULL;
    return c->size > 1 && n_elems > 0;
}

/* non-blocking: a library without the slots (or one rank) completes at start */
void comm_iallreduce_sum_f32(Comm *c, float *buf, size_t n_elems, CommRequest *rq) {
    if (!request_open(c, rq, 0, n_elems)) return;
    if (c->ops->iallreduce_sum_f32) rq->req = c->ops->iallreduce_sum_f32(c->ctx, buf, n_elems);
    else c->ops->allreduce_sum_f32(c->ctx, buf, n_elems);
}

void comm_dev_iallreduce_sum_f32(Comm *c, float *dbuf, size_t n_elems, CommRequest *rq) {
    if (!c->dops) { comm_iallreduce_sum_f32(c, dbuf, n_elems, rq); return; }
    if (!request_open(c, rq, 1, n_elems)) return;
    if (c->dops->iallreduce_sum_f32) rq->req = c->dops->iallreduce_sum_f32(c->dctx, dbuf, n_elems);
    else c->dops->allreduce_sum_f32(c->dctx, dbuf, n_elems);
}

int comm_test(CommRequest *rq) {
    if (!rq->req) return 1;
    Comm *c = rq->c;
    int done = rq->dev ? c->dops->test(c->dctx, rq->req) : c->ops->test(c->ctx, rq->req);
    if (done) rq->req = NULL;
    return done;
}

void comm_wait(CommRequest *rq) {
    if (!rq->req) return;
    Comm *c = rq->c;
    if (rq->dev) c->dops->wait(c->dctx, rq->req);
    else c->ops->wait(c->ctx, rq->req);
    rq->req = NULL;
}

void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n_elems, int phase) {
    sync_wait(c, phase);
    double t0 = time_now();
    if (c->size > 1) c->ops->allreduce_sum_f32(c->ctx, buf, n_elems);
    book_allreduce_f32(c, n_elems, phase, t0);
}

void comm_dev_allreduce_sum_f32(Comm *c, float *dbuf, size_t n_elems, int phase) {
    if (!c->dops) { comm_allreduce_sum_f32(c, dbuf, n_elems, phase); return; }
    double t0 = time_now();
    if (c->size > 1) c->dops->allreduce_sum_f32(c->dctx, dbuf, n_elems);
    book_allreduce_f32(c, n_elems, phase, t0);
}

void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n_elems) {
    sync_wait(c, COMM_PHASE_OTHER);
    double t0 = time_now();
    if (c->size > 1) c->ops->allreduce_sum_f64(c->ctx, buf, n_elems);
    account(c, COMM_PHASE_OTHER, c->size > 1 ? n_elems * sizeof(double) : 0, t0);
}

void comm_allreduce_max_f64(Comm *c, double *buf, size_t n_elems) {
    sync_wait(c, COMM_PHASE_OTHER);
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
    sync_wait(c, COMM_PHASE_OTHER);
    double t0 = time_now();
    if (c->size > 1) c->ops->allgather_bytes(c->ctx, send, recv, n_bytes);
    else if (recv != send) memmove(recv, send, n_bytes);
    account(c, COMM_PHASE_OTHER, c->size > 1 ? n_bytes * (size_t)(c->size - 1) : 0, t0);
}

void comm_alltoall_bytes(Comm *c, const void *send, void *recv, size_t n_bytes, int phase) {
    sync_wait(c, phase);
    double t0 = time_now();
    c->ops->alltoall_bytes(c->ctx, send, recv, n_bytes);
    account(c, phase, n_bytes * (size_t)(c->size - 1), t0);
    struct Traffic *tr = traffic_of(c);
    if (tr)
        for (int d = 0; d < c->size; d++)
            if (d != c->rank) traffic_add(tr, phase, comm_world_rank(c, d), n_bytes, 1);
}

static void book_alltoallv(Comm *c, const size_t *scounts, int phase, double t0) {
    size_t sent = 0;
    struct Traffic *tr = traffic_of(c);
    for (int d = 0; d < c->size; d++) {
        if (d == c->rank) continue;
        sent += scounts[d];
        if (tr && scounts[d]) traffic_add(tr, phase, comm_world_rank(c, d), scounts[d], 1);
    }
    account(c, phase, sent, t0);
    if (tr) traffic_add_time(tr, phase, time_now() - t0);
}

void comm_alltoallv_bytes(Comm *c, const void *send, const size_t *scounts, const size_t *sdispls,
                          void *recv, const size_t *rcounts, const size_t *rdispls, int phase) {
    sync_wait(c, phase);
    double t0 = time_now();
    c->ops->alltoallv_bytes(c->ctx, send, scounts, sdispls, recv, rcounts, rdispls);
    book_alltoallv(c, scounts, phase, t0);
}

void comm_dev_alltoallv_bytes(Comm *c, const void *send, const size_t *scounts, const size_t *sdispls,
                              void *recv, const size_t *rcounts, const size_t *rdispls, int phase) {
    if (!c->dops) { comm_alltoallv_bytes(c, send, scounts, sdispls, recv, rcounts, rdispls, phase); return; }
    double t0 = time_now();
    c->dops->alltoallv_bytes(c->dctx, send, scounts, sdispls, recv, rcounts, rdispls);
    book_alltoallv(c, scounts, phase, t0);
}

void comm_abort(Comm *c, int code) {
    fflush(stdout);
    fflush(stderr);
    if (c && c->ops) c->ops->abort(c->ctx, code);
    exit(code);
}

void comm_split(Comm *parent, int color, int key, Comm *out) {
    memset(out, 0, sizeof *out);
    out->ops = parent->ops;
    out->parent = parent;
    if (parent->size == 1) {
        out->ops = &single_ops;
        out->ctx = NULL;
        out->rank = 0; out->size = 1; out->local_rank = 0; out->local_size = 1;
        out->world_of = xcalloc(sizeof(int));
        out->world_of[0] = comm_world_rank(parent, 0);
        return;
    }
    /* membership: every rank's (color, key, rank) over the parent */
    int P = parent->size, mine[3] = {color, key, parent->rank};
    int *all = xcalloc(sizeof(int) * 3 * (size_t)P);
    parent->ops->allgather_bytes(parent->ctx, mine, all, sizeof mine);
    out->ctx = parent->ops->split(parent->ctx, color, key);
    int n = 0;
    for (int r = 0; r < P; r++) n += all[3 * r] == color;
    out->size = n;
    out->world_of = xcalloc(sizeof(int) * (size_t)n);
    /* the members in (key, parent rank) order, as MPI_Comm_split orders them */
    int i = 0;
    for (int r = 0; r < P; r++) {
        if (all[3 * r] != color) continue;
        int pos = 0;
        for (int q = 0; q < P; q++)
            if (all[3 * q] == color && (all[3 * q + 1] < all[3 * r + 1] || (all[3 * q + 1] == all[3 * r + 1] && q < r)))
                pos++;
        out->world_of[pos] = comm_world_rank(parent, r);
        if (r == parent->rank) out->rank = pos;
        i++;
    }
    ASSERT(i == n);
    /* local_rank / local_size stay the parent's: they describe the node (BLAS threads per
     * rank, the device of the rank), not the sub-communicator */
    out->local_rank = parent->local_rank;
    out->local_size = parent->local_size;
    xfree(all);
}

void comm_free(Comm *c) {
    if (!c) return;
    if (c->dops && c->dops->free_ctx) c->dops->free_ctx(c->dctx);
    if (c->ctx) {
        if (c->ops && c->ops->free_ctx) c->ops->free_ctx(c->ctx);
        else free(c->ctx);
    }
    xfree(c->world_of);
    memset(c, 0, sizeof *c);
}

Status comm_agree(Comm *c, Status st) {
    double bad = STATUS_OK(st) ? 0 : 1;
    comm_allreduce_max_f64(c, &bad, 1);
    if (bad > 0 && STATUS_OK(st)) return status_errorf("another rank failed (see its message)");
    return st;
}
