/* comm_mpi.c: the MPI communicator over MPI_COMM_WORLD (plus a shared-memory split for the
 * node-local rank). Large buffers are sent in chunks below INT_MAX elements. The non-blocking
 * sum is MPI_Iallreduce on the same communicator (MPI matches collectives, blocking or not,
 * in the order every rank starts them); it progresses when the caller tests it or in any
 * other MPI call that drives the progress engine. */
#include "comm.h"

#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

typedef struct MpiCtx { MPI_Comm world, node; } MpiCtx;

#define CHUNK ((size_t)1 << 30)

static void mpi_barrier(void *ctx) { MPI_Barrier(((MpiCtx *)ctx)->world); }

static void mpi_allreduce_f32(void *ctx, float *buf, size_t n) {
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t m = n - off < CHUNK ? n - off : CHUNK;
        MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)m, MPI_FLOAT, MPI_SUM, ((MpiCtx *)ctx)->world);
    }
}
/* non-blocking: one MPI_Iallreduce per chunk; the request owns them all */
typedef struct MpiReq { int n; MPI_Request r[]; } MpiReq;
static void *mpi_iallreduce_f32(void *ctx, float *buf, size_t n) {
    int nc = (int)((n + CHUNK - 1) / CHUNK);
    MpiReq *q = malloc(sizeof *q + sizeof(MPI_Request) * (size_t)nc);
    ASSERT(q);
    q->n = nc;
    for (int i = 0; i < nc; i++) {
        size_t off = (size_t)i * CHUNK, m = n - off < CHUNK ? n - off : CHUNK;
        MPI_Iallreduce(MPI_IN_PLACE, buf + off, (int)m, MPI_FLOAT, MPI_SUM, ((MpiCtx *)ctx)->world, &q->r[i]);
    }
    return q;
}
static int mpi_test(void *ctx, void *req) {
    (void)ctx;
    MpiReq *q = req;
    int done = 0;
    MPI_Testall(q->n, q->r, &done, MPI_STATUSES_IGNORE);
    if (done) free(q);
    return done;
}
static void mpi_wait(void *ctx, void *req) {
    (void)ctx;
    MpiReq *q = req;
    MPI_Waitall(q->n, q->r, MPI_STATUSES_IGNORE);
    free(q);
}
static void mpi_allreduce_f64(void *ctx, double *buf, size_t n) {
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t m = n - off < CHUNK ? n - off : CHUNK;
        MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)m, MPI_DOUBLE, MPI_SUM, ((MpiCtx *)ctx)->world);
    }
}
static void mpi_allreduce_max_f64(void *ctx, double *buf, size_t n) {
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t m = n - off < CHUNK ? n - off : CHUNK;
        MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)m, MPI_DOUBLE, MPI_MAX, ((MpiCtx *)ctx)->world);
    }
}
static void mpi_bcast(void *ctx, void *buf, size_t n, int root) {
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t m = n - off < CHUNK ? n - off : CHUNK;
        MPI_Bcast((char *)buf + off, (int)m, MPI_BYTE, root, ((MpiCtx *)ctx)->world);
    }
}
static void mpi_gather(void *ctx, const void *send, void *recv, size_t n, int root) {
    ASSERTF(n < (size_t)INT_MAX, "gather of %zu bytes per rank is too large", n);
    MPI_Gather(send, (int)n, MPI_BYTE, recv, (int)n, MPI_BYTE, root, ((MpiCtx *)ctx)->world);
}
static void mpi_allgather(void *ctx, const void *send, void *recv, size_t n) {
    ASSERTF(n < (size_t)INT_MAX, "allgather of %zu bytes per rank is too large", n);
    MPI_Allgather(send, (int)n, MPI_BYTE, recv, (int)n, MPI_BYTE, ((MpiCtx *)ctx)->world);
}
static void mpi_alltoall(void *ctx, const void *send, void *recv, size_t n) {
    ASSERTF(n < (size_t)INT_MAX, "alltoall of %zu bytes per pair is too large", n);
    MPI_Alltoall(send, (int)n, MPI_BYTE, recv, (int)n, MPI_BYTE, ((MpiCtx *)ctx)->world);
}
/* MPI_Alltoallv counts are int: bytes are sent as MPI_BYTE while every count and
 * displacement fits, otherwise the call fails loudly (a step moving > 2 GiB per pair
 * needs the MPI-4 large-count interface) */
static void mpi_alltoallv(void *ctx, const void *send, const size_t *sc, const size_t *sd,
                          void *recv, const size_t *rc, const size_t *rd) {
    MpiCtx *m = ctx;
    int P;
    MPI_Comm_size(m->world, &P);
    int *buf = malloc(sizeof(int) * 4 * (size_t)P);
    ASSERT(buf);
    for (int r = 0; r < P; r++) {
        ASSERTF(sc[r] < INT_MAX && sd[r] < INT_MAX && rc[r] < INT_MAX && rd[r] < INT_MAX,
                "alltoallv: counts or displacements beyond 2 GiB");
        buf[r] = (int)sc[r]; buf[P + r] = (int)sd[r]; buf[2 * P + r] = (int)rc[r]; buf[3 * P + r] = (int)rd[r];
    }
    MPI_Alltoallv(send, buf, buf + P, MPI_BYTE, recv, buf + 2 * P, buf + 3 * P, MPI_BYTE, m->world);
    free(buf);
}
static void mpi_abort(void *ctx, int code) {
    MPI_Abort(ctx ? ((MpiCtx *)ctx)->world : MPI_COMM_WORLD, code);
    exit(code);
}

static void *mpi_split(void *ctx, int color, int key) {
    MpiCtx *m = ctx, *sub = calloc(1, sizeof *sub);
    ASSERT(sub);
    MPI_Comm_split(m->world, color, key, &sub->world);
    MPI_Comm_split_type(sub->world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &sub->node);
    return sub;
}
static void mpi_free_ctx(void *ctx) {
    MpiCtx *m = ctx;
    if (m->world != MPI_COMM_WORLD && m->world != MPI_COMM_NULL) MPI_Comm_free(&m->world);
    if (m->node != MPI_COMM_NULL) MPI_Comm_free(&m->node);
    free(m);
}

static const CommOps mpi_ops = {
    .name = "mpi",
    .barrier = mpi_barrier,
    .allreduce_sum_f32 = mpi_allreduce_f32,
    .iallreduce_sum_f32 = mpi_iallreduce_f32,
    .test = mpi_test,
    .wait = mpi_wait,
    .allreduce_sum_f64 = mpi_allreduce_f64,
    .allreduce_max_f64 = mpi_allreduce_max_f64,
    .bcast_bytes = mpi_bcast,
    .gather_bytes = mpi_gather,
    .allgather_bytes = mpi_allgather,
    .alltoall_bytes = mpi_alltoall,
    .alltoallv_bytes = mpi_alltoallv,
    .abort = mpi_abort,
    .split = mpi_split,
    .free_ctx = mpi_free_ctx,
};

static void abort_hook(int code) { MPI_Abort(MPI_COMM_WORLD, code); }

Status comm_mpi_init(Comm *c) {
    memset(c, 0, sizeof *c);
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) return status_errorf("comm_mpi_init: MPI_Init has not been called");
    MpiCtx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return status_errorf("comm_mpi_init: out of memory");
    ctx->world = MPI_COMM_WORLD;
    MPI_Comm_rank(ctx->world, &c->rank);
    MPI_Comm_size(ctx->world, &c->size);
    MPI_Comm_split_type(ctx->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &ctx->node);
    MPI_Comm_rank(ctx->node, &c->local_rank);
    MPI_Comm_size(ctx->node, &c->local_size);
    c->ops = &mpi_ops;
    c->ctx = ctx;
    util_rank = c->rank;
    util_abort_hook = abort_hook;
    return status_ok();
}
