/* gradsync.c: the bucket plan of the dense gradients and the non-blocking sums that follow
 * the backward (see gradsync.h). */
#include "gradsync.h"
#include "model.h"

#include <string.h>

Status gradsync_init(GradSync *gs, const Model *m, double bucket_mb) {
    memset(gs, 0, sizeof *gs);
    int L = m->L;
    size_t n = m->n_cat[PCAT_DENSE];
    /* start of each layer's dense range: the smallest offset of its dense tensors */
    size_t *start = xcalloc(sizeof(size_t) * (size_t)(L + 1));
    for (int l = 0; l < L; l++) start[l] = n;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->cat == PCAT_DENSE && t->layer >= 0 && t->offset < start[t->layer]) start[t->layer] = t->offset;
    }
    start[L] = n;
    /* segments in the order the backward finishes them: seg s = [lo[s], hi[s]) */
    int n_seg = L + 1;
    size_t *lo = xcalloc(sizeof(size_t) * (size_t)n_seg), *hi = xcalloc(sizeof(size_t) * (size_t)n_seg);
    for (int s = 0; s < L; s++) {
        int l = L - 1 - s;
        lo[s] = start[l];
        hi[s] = s == 0 ? n : start[l + 1];
    }
    lo[L] = 0;
    hi[L] = L > 0 ? start[0] : n;
    /* every dense tensor inside its segment: a layer's in its layer's, the others in the
     * embedding's (before layer 0) or the tail (after layer L-1) */
    Status st = status_ok();
    for (int i = 0; i < m->n_tensors && STATUS_OK(st); i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->cat != PCAT_DENSE) continue;
        int s = t->layer >= 0 ? L - 1 - t->layer : (t->offset < hi[L] ? L : 0);
        if (t->offset < lo[s] || t->offset + t->n > hi[s])
            st = status_errorf("parallel.overlap_allreduce: dense tensor %s (elements %zu..%zu) is not inside the "
                               "contiguous range of its %s (%zu..%zu); the buckets need per-layer contiguous gradients",
                               t->name, t->offset, t->offset + t->n, t->layer >= 0 ? "layer" : "embedding/tail",
                               lo[s], hi[s]);
    }
    if (STATUS_OK(st)) {
        gs->comm = m->comm;
        gs->grads = m->grads[PCAT_DENSE];
        gs->n_total = n;
        gs->n_seg = n_seg;
        gs->b = xcalloc(sizeof(GradBucket) * (size_t)n_seg);
        size_t cap = (size_t)(bucket_mb * 1048576.0 / sizeof(float));
        /* consecutive segments while the bucket stays within the cap (cap 0: one each) */
        int nb = 0;
        for (int s = 0; s < n_seg; s++) {
            size_t len = hi[s] - lo[s];
            GradBucket *cur = nb > 0 ? &gs->b[nb - 1] : NULL;
            if (cur && cap > 0 && cur->n + len <= cap) {
                cur->lo = lo[s];   /* segments go down in memory */
                cur->n += len;
                cur->last_seg = s;
            } else {
                gs->b[nb].lo = lo[s];
                gs->b[nb].n = len;
                gs->b[nb].last_seg = s;
                nb++;
            }
        }
        gs->n_buckets = nb;
        gs->rq = xcalloc(sizeof(CommRequest) * (size_t)nb);
        size_t sum = 0;
        for (int k = 0; k < nb; k++) sum += gs->b[k].n;
        ASSERTF(sum == n, "gradsync: buckets cover %zu of %zu dense elements", sum, n);
    }
    xfree(start);
    xfree(lo);
    xfree(hi);
    return st;
}

void gradsync_free(GradSync *gs) {
    if (!gs) return;
    if (gs->rq)
        for (int k = 0; k < gs->n_buckets; k++) comm_wait(&gs->rq[k]);
    xfree(gs->b);
    xfree(gs->rq);
    memset(gs, 0, sizeof *gs);
}

void gradsync_begin(GradSync *gs) {
    ASSERTF(!gs->armed, "gradsync: a backward started before the last one's gradients were reduced");
    gs->armed = 1;
    gs->next = 0;
    gs->t_first = 0;
}

static void start_upto(GradSync *gs, int seg) {
    while (gs->next < gs->n_buckets && gs->b[gs->next].last_seg <= seg) {
        const GradBucket *b = &gs->b[gs->next];
        if (gs->next == 0) gs->t_first = time_now();
        comm_dev_iallreduce_sum_f32(gs->comm, gs->grads + b->lo, b->n, &gs->rq[gs->next]);
        gs->next++;
    }
}

void gradsync_ready(GradSync *gs, int l) {
    if (!gs->armed) return;
    int L = gs->n_seg - 1, seg = L - 1 - l;
    ASSERTF(l >= -1 && l < L, "gradsync_ready: layer %d of %d", l, L);
    start_upto(gs, seg);
    for (int k = 0; k < gs->next; k++) comm_test(&gs->rq[k]);
}

void gradsync_finish(GradSync *gs) {
    if (!gs->armed) return;
    double t0 = time_now();
    start_upto(gs, gs->n_seg - 1);
    for (int k = 0; k < gs->n_buckets; k++) comm_wait(&gs->rq[k]);
    double t1 = time_now();
    gs->last_exposed_s = t1 - t0;
    gs->last_inflight_s = t1 - gs->t_first;
    comm_book_allreduce_f32(gs->comm, gs->n_total, COMM_PHASE_ALLREDUCE, gs->last_exposed_s, gs->last_inflight_s);
    gs->armed = 0;
}
