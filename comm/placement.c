/* placement.c: TEMPORARY minimal version (contiguous only) until the full one lands. */
#include "placement.h"

#include <stdlib.h>
#include <string.h>

Status placement_init(Placement *p, int n_units, int n_ranks) {
    memset(p, 0, sizeof *p);
    if (n_ranks < 1 || n_units % n_ranks != 0)
        return status_errorf("%d placement units cannot be split evenly over %d ranks", n_units, n_ranks);
    p->n_units = n_units; p->n_ranks = n_ranks; p->per_rank = n_units / n_ranks;
    p->owner = xcalloc(sizeof(int) * n_units);
    p->slot = xcalloc(sizeof(int) * n_units);
    p->unit_at = xcalloc(sizeof(int) * n_units);
    placement_contiguous(p);
    return status_ok();
}
void placement_free(Placement *p) { xfree(p->owner); xfree(p->slot); xfree(p->unit_at); memset(p, 0, sizeof *p); }
void placement_fill_slots(Placement *p) {
    int *fill = xcalloc(sizeof(int) * p->n_ranks);
    for (int u = 0; u < p->n_units; u++) {
        int r = p->owner[u];
        p->slot[u] = fill[r]++;
        p->unit_at[r * p->per_rank + p->slot[u]] = u;
    }
    xfree(fill);
}
void placement_contiguous(Placement *p) {
    for (int u = 0; u < p->n_units; u++) p->owner[u] = u / p->per_rank;
    placement_fill_slots(p);
}
void placement_copy(Placement *dst, const Placement *src) {
    if (dst->n_units != src->n_units) { placement_free(dst); placement_init(dst, src->n_units, src->n_ranks); }
    memcpy(dst->owner, src->owner, sizeof(int) * src->n_units);
    memcpy(dst->slot, src->slot, sizeof(int) * src->n_units);
    memcpy(dst->unit_at, src->unit_at, sizeof(int) * src->n_units);
}
int placement_equal(const Placement *a, const Placement *b) {
    return a->n_units == b->n_units && !memcmp(a->owner, b->owner, sizeof(int) * a->n_units) &&
           !memcmp(a->slot, b->slot, sizeof(int) * a->n_units);
}
