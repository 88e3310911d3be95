/* comm: the communicator interface (MPI, single-process; NCCL later) with typed collectives,
 * so counts are never confused with bytes and every byte passes one place (traffic counters).
 * Does not: decide what to send (that is the model's exchange plan) or own user buffers. */
#ifndef DCMOE_COMM_H
#define DCMOE_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "util.h"

/* recluster: the re-clustering event's features, travelling members and statistics */
enum CommPhase { COMM_PHASE_ALLREDUCE = 0, COMM_PHASE_DISPATCH = 1, COMM_PHASE_COMBINE = 2,
                 COMM_PHASE_MIGRATION = 3, COMM_PHASE_OTHER = 4, COMM_PHASE_RECLUSTER = 5, COMM_N_PHASES = 6 };

typedef struct CommStats {
    uint64_t bytes[COMM_N_PHASES];     /* bytes this rank sent, per phase */
    uint64_t calls[COMM_N_PHASES];
    double seconds[COMM_N_PHASES];     /* blocking: the call; non-blocking: the exposed wait */
    double inflight[COMM_N_PHASES];    /* non-blocking collectives (comm_book_allreduce_f32): seconds
                                          from the first start to the completion, hidden part included */
    double wait[COMM_N_PHASES];        /* sync_wait: seconds in the timed barrier before the collectives
                                          (waiting for the slowest rank), not in seconds[] */
} CommStats;

typedef struct CommOps {
    const char *name;
    void (*barrier)(void *ctx);
    /* in-place sum over ranks */
    void (*allreduce_sum_f32)(void *ctx, float *buf, size_t n);
    /* non-blocking in-place sum: returns a request (NULL = already complete); test progresses
     * the library and returns 1 once the request is complete (then it is freed); wait blocks
     * until it is complete and frees it. NULL slots: the wrapper runs the blocking sum at start */
    void *(*iallreduce_sum_f32)(void *ctx, float *buf, size_t n);
    int (*test)(void *ctx, void *req);
    void (*wait)(void *ctx, void *req);
    void (*allreduce_sum_f64)(void *ctx, double *buf, size_t n);
    void (*allreduce_max_f64)(void *ctx, double *buf, size_t n);
    void (*bcast_bytes)(void *ctx, void *buf, size_t n, int root);
    /* gather n bytes from every rank into recv[size*n] at root */
    void (*gather_bytes)(void *ctx, const void *send, void *recv, size_t n, int root);
    void (*allgather_bytes)(void *ctx, const void *send, void *recv, size_t n);
    /* every rank sends n bytes to every rank: send[size*n] -> recv[size*n] */
    void (*alltoall_bytes)(void *ctx, const void *send, void *recv, size_t n);
    /* personalised exchange: scounts/sdispls/rcounts/rdispls in bytes, [size] each */
    void (*alltoallv_bytes)(void *ctx, const void *send, const size_t *scounts, const size_t *sdispls,
                            void *recv, const size_t *rcounts, const size_t *rdispls);
    void (*abort)(void *ctx, int code);
    /* a sub-communicator of the ranks with the same color, ordered by key (collective);
     * returns the new context (NULL for the single-process communicator: itself) */
    void *(*split)(void *ctx, int color, int key);
    void (*free_ctx)(void *ctx);
} CommOps;

struct Traffic;
struct Topology;

/* collectives on backend (device) memory, when a device library is attached to a Comm
 * (parallel.collectives = nccl: cuda/comm_nccl.c). Without one, comm_dev_* use the host ops
 * on the same pointers (right for the CPU backend, and for device memory only with a
 * CUDA-aware MPI). Counts and displacements in BYTES. */
typedef struct DevCommOps {
    const char *name;
    void (*allreduce_sum_f32)(void *ctx, float *dbuf, size_t n_elems);
    /* non-blocking, as CommOps' (NCCL: a communication stream, ordered after the work queued
     * on the compute stream so far; test/wait on its completion event) */
    void *(*iallreduce_sum_f32)(void *ctx, float *dbuf, size_t n_elems);
    int (*test)(void *ctx, void *req);
    void (*wait)(void *ctx, void *req);
    void (*alltoallv_bytes)(void *ctx, const void *send, const size_t *scounts, const size_t *sdispls,
                            void *recv, const size_t *rcounts, const size_t *rdispls);
    void (*free_ctx)(void *ctx);
} DevCommOps;

typedef struct Comm {
    const CommOps *ops;
    void *ctx;
    const DevCommOps *dops;            /* device collectives (NULL = the host ops); see DevCommOps */
    void *dctx;
    int rank, size;
    int local_rank, local_size;        /* within the node */
    CommStats stats;
    /* time a barrier before every blocking collective of the exchange and allreduce phases,
     * and before the small ones (phase other) while the profiler is attached, i.e. inside a
     * training step (the root's flag; log.sync_wait): the wait for the slowest rank is booked
     * in stats.wait and the profiler's wait, so stats.seconds holds the transfer alone */
    bool sync_wait;
    struct Traffic *traffic;           /* optional (src, dst) profiler fed by the wrappers */
    const struct Topology *topo;       /* optional node map (set by the trainer; NULL = unknown),
                                          indexed by this communicator's ranks */
    /* sub-communicators (comm_split): the communicator they were split from and the world
     * rank of each member, so the profiler and the per-phase statistics of the world see
     * every byte with its real (source, destination) ranks */
    struct Comm *parent;
    int *world_of;                     /* [size] world rank of each member; NULL = the world */
} Comm;

/* MPI communicator over MPI_COMM_WORLD (MPI_Init must have been called) */
Status comm_mpi_init(Comm *c);
/* single-process communicator (rank 0 of 1) */
Status comm_single_init(Comm *c);
/* the ranks of parent with the same color, ordered by key (collective over parent). Bytes
 * the sub-communicator moves are booked in the root communicator's statistics and traffic
 * profiler under world ranks; out->topo is left NULL (the caller sets a sub-topology). */
void comm_split(Comm *parent, int color, int key, Comm *out);
void comm_free(Comm *c);
/* the traffic profiler that books this communicator's bytes (the root's) */
static inline struct Traffic *comm_traffic(const Comm *c) {
    while (c->parent) c = c->parent;
    return c->traffic;
}
/* world rank of member r (the root communicator's numbering) */
static inline int comm_world_rank(const Comm *c, int r) { return c->world_of ? c->world_of[r] : r; }

/* typed wrappers: count bytes and time per phase */
void comm_barrier(Comm *c);
/* every rank must agree on a failure: an error on every rank if any rank failed (its own
 * message where it failed, "another rank failed" elsewhere); one max-allreduce */
Status comm_agree(Comm *c, Status st);
void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n_elems, int phase);
void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n_elems);
void comm_allreduce_max_f64(Comm *c, double *buf, size_t n_elems);
void comm_bcast_bytes(Comm *c, void *buf, size_t n_bytes, int root);
void comm_gather_bytes(Comm *c, const void *send, void *recv, size_t n_bytes, int root);
void comm_allgather_bytes(Comm *c, const void *send, void *recv, size_t n_bytes);
void comm_alltoall_bytes(Comm *c, const void *send, void *recv, size_t n_bytes, int phase);
/* personalised exchange (counts and displacements in bytes); the bytes to every other rank
 * are counted per destination in the profiler (the part a rank keeps is not traffic) */
void comm_alltoallv_bytes(Comm *c, const void *send, const size_t *scounts, const size_t *sdispls,
                          void *recv, const size_t *rcounts, const size_t *rdispls, int phase);
/* the same collectives on backend memory: through the attached device library (NCCL), else
 * the host ops; booked exactly like the host versions (bytes, calls, seconds, profiler) */
void comm_dev_allreduce_sum_f32(Comm *c, float *dbuf, size_t n_elems, int phase);
void comm_dev_alltoallv_bytes(Comm *c, const void *send, const size_t *scounts, const size_t *sdispls,
                              void *recv, const size_t *rcounts, const size_t *rdispls, int phase);
static inline int comm_has_dev(const Comm *c) { return c && c->dops != NULL; }

/* non-blocking in-place sum (parallel.overlap_allreduce: gradient buckets during the backward).
 * comm_iallreduce_sum_f32 starts it on host memory, comm_dev_iallreduce_sum_f32 on backend
 * memory (the attached device library, else the host op). Neither books anything: the caller
 * books the logical collective once every part of it completed (comm_book_allreduce_f32), so
 * a reduction split into buckets is counted exactly as the one blocking call it replaces.
 * Every rank must start the same requests in the same order. */
typedef struct CommRequest {
    Comm *c;
    void *req;                         /* the library's request; NULL once complete */
    int dev;                           /* started through c->dops */
} CommRequest;
void comm_iallreduce_sum_f32(Comm *c, float *buf, size_t n_elems, CommRequest *rq);
void comm_dev_iallreduce_sum_f32(Comm *c, float *dbuf, size_t n_elems, CommRequest *rq);
/* progress; 1 once complete (a completed request stays complete) */
int comm_test(CommRequest *rq);
void comm_wait(CommRequest *rq);
/* book one allreduce of n_elems floats in phase as the blocking wrappers do (bytes, one call,
 * the profiler's ring messages) with `seconds` as its time (the exposed wait) and
 * inflight_s added to stats.inflight[phase] */
void comm_book_allreduce_f32(Comm *c, size_t n_elems, int phase, double seconds, double inflight_s);
/* end every rank: MPI_Abort in MPI runs, exit otherwise */
void comm_abort(Comm *c, int code) __attribute__((noreturn));

#endif
