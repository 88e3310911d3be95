/* gradsync: the overlapped dense-gradient allreduce (parallel.overlap_allreduce). The dense
 * category's gradients are laid out in table order: [wte wpe | layer 0 | ... | layer L-1 |
 * lnf (cls)], each layer's dense tensors contiguous. The backward finishes them from the end:
 * the head and the final LayerNorm, then layer L-1 down to 0, then the embedding (the tied wte
 * gets its last term there). A static plan cuts that order into buckets of whole segments
 * (segment 0 = layer L-1 with the tail after it, segment k = layer L-1-k, segment L = the
 * embedding), each a contiguous range of at most parallel.bucket_mb MiB (a larger segment is a
 * bucket on its own; 0 = one bucket per segment). model_backward reports every finished
 * segment (gradsync_ready); a bucket whose last segment is finished starts a non-blocking sum
 * over the world, and every call tests the outstanding ones (MPI progress between layers);
 * optim_reduce_grads waits for the rest (gradsync_finish) before the gradient norm.
 * Booking: the whole category is booked as ONE allreduce of n_cat[PCAT_DENSE] floats, as the
 * blocking path books it (bytes, calls, the profiler's ring messages), with the exposed wait
 * as its time (perf/time_split allreduce, comm/summary/time_s) and the time from the first
 * start to the completion in Comm.stats.inflight (comm/summary/allreduce_overlap_s).
 * Does not: touch the expert category (its sum over the replicas of an EP group stays
 * blocking, optim.c), or accumulate micro-batches (dcmoe has no gradient accumulation: every
 * backward is the step's last). */
#ifndef DCMOE_GRADSYNC_H
#define DCMOE_GRADSYNC_H

#include <stddef.h>
#include "comm.h"

struct Model;

typedef struct GradBucket {
    size_t lo, n;            /* element range of the dense category */
    int last_seg;            /* started once segment last_seg is finished */
} GradBucket;

typedef struct GradSync {
    Comm *comm;              /* the world (not owned) */
    float *grads;            /* the dense category (backend memory, not owned) */
    size_t n_total;          /* n_cat[PCAT_DENSE] */
    int n_seg;               /* L + 1 */
    int n_buckets;
    GradBucket *b;           /* [n_buckets] in start order */
    CommRequest *rq;         /* [n_buckets] */
    int next;                /* next bucket to start */
    int armed;               /* between gradsync_begin and gradsync_finish */
    double t_first;          /* this step: the first start */
    double last_exposed_s, last_inflight_s;   /* the last finished step (this rank) */
} GradSync;

/* the bucket plan of model m (its tensor table and dense category) with a cap of bucket_mb
 * MiB; error status when the dense layout is not per-layer contiguous */
Status gradsync_init(GradSync *gs, const struct Model *m, double bucket_mb);
void gradsync_free(GradSync *gs);
/* a step's backward starts (no request may be outstanding) */
void gradsync_begin(GradSync *gs);
/* the backward finished the dense gradients of layer l (L-1 .. 0; the tail after layer L-1 is
 * finished with it) or, l = -1, of the embedding: start every bucket that became complete,
 * then test the outstanding ones */
void gradsync_ready(GradSync *gs, int l);
/* start what is left, wait for every request, book the reduction (see above) */
void gradsync_finish(GradSync *gs);

#endif
