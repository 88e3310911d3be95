/* placement.c: the three unit -> rank policies (contiguous, EPLB-style hierarchical packing,
 * topology-aware graph partitioning) and the measures used to compare them (cut weight at
 * node and rank level, rank MaxVio).
 * The graph partitioner works on one level at a time: the units of a set (all units, or
 * one node's units) go to parts of fixed capacities (nodes, or that node's ranks) by greedy
 * graph growing, then Kernighan-Lin passes of pairwise swaps (tentative swaps with locking,
 * rolled back to the best prefix, so a pass never increases the cut), then cut-neutral swaps
 * that lower the load of the heavier part. With a load cap (placement_topology_capped) the
 * growth takes only units that fit, over-cap parts are repaired by the cheapest swaps that
 * lower the excess, and no refinement swap adds excess. Ties are broken by load, then by
 * index, so every rank computes the same placement from the same inputs. placement_topology_ex
 * takes a separate affinity per level (the home-bias spread maximises the node cut through its
 * complement) and a background load per rank (replicas), which lowers that rank's load cap.
 * Does not: move weights or measure affinity; no randomness anywhere.
 * Legend: U = units, R = ranks, N = nodes, m = units in the set being split, k = parts. */
#include "placement.h"

#include <math.h>
#include <metis.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ the struct */

Status placement_init(Placement *p, int n_units, int n_ranks) {
    memset(p, 0, sizeof *p);
    if (n_ranks < 1 || n_units < 1)
        return status_errorf("placement: n_units=%d and n_ranks=%d must both be positive", n_units, n_ranks);
    if (n_units % n_ranks != 0)
        return status_errorf("placement: n_units=%d is not a multiple of n_ranks=%d (every rank must own "
                             "the same number of units)", n_units, n_ranks);
    p->n_units = n_units;
    p->n_ranks = n_ranks;
    p->per_rank = n_units / n_ranks;
    p->owner = xcalloc(sizeof(int) * (size_t)n_units);
    p->slot = xcalloc(sizeof(int) * (size_t)n_units);
    p->unit_at = xcalloc(sizeof(int) * (size_t)n_units);
    placement_contiguous(p);
    return status_ok();
}

void placement_free(Placement *p) {
    if (!p) return;
    xfree(p->owner);
    xfree(p->slot);
    xfree(p->unit_at);
    memset(p, 0, sizeof *p);
}

/* dst: zeroed or initialised (any size); it is resized to src's */
void placement_copy(Placement *dst, const Placement *src) {
    if (dst == src) return;
    if (!dst->owner || dst->n_units != src->n_units || dst->n_ranks != src->n_ranks) {
        placement_free(dst);
        Status s = placement_init(dst, src->n_units, src->n_ranks);
        ASSERTF(STATUS_OK(s), "placement_copy: %s", s.msg);
    }
    size_t n = sizeof(int) * (size_t)src->n_units;
    memcpy(dst->owner, src->owner, n);
    memcpy(dst->slot, src->slot, n);
    memcpy(dst->unit_at, src->unit_at, n);
}

int placement_equal(const Placement *a, const Placement *b) {
    if (a->n_units != b->n_units || a->n_ranks != b->n_ranks) return 0;
    size_t n = sizeof(int) * (size_t)a->n_units;
    return memcmp(a->owner, b->owner, n) == 0 && memcmp(a->slot, b->slot, n) == 0 &&
           memcmp(a->unit_at, b->unit_at, n) == 0;
}

void placement_fill_slots(Placement *p) {
    int *fill = xcalloc(sizeof(int) * (size_t)p->n_ranks);
    for (int u = 0; u < p->n_units; u++) {
        int r = p->owner[u];
        ASSERTF(r >= 0 && r < p->n_ranks, "placement: unit %d has owner %d (n_ranks=%d)", u, r, p->n_ranks);
        ASSERTF(fill[r] < p->per_rank, "placement: rank %d owns more than per_rank=%d units", r, p->per_rank);
        p->slot[u] = fill[r];
        p->unit_at[(size_t)r * p->per_rank + fill[r]] = u;
        fill[r]++;
    }
    for (int r = 0; r < p->n_ranks; r++)
        ASSERTF(fill[r] == p->per_rank, "placement: rank %d owns %d units, per_rank=%d", r, fill[r], p->per_rank);
    xfree(fill);
}

/* ------------------------------------------------------------------ measures */

static inline double unit_load(const double *load, int u) { return load ? load[u] : 1.0; }

double placement_cut(const Placement *p, const double *affinity, const Topology *t, int level) {
    int U = p->n_units;
    double cut = 0;
    for (int u = 0; u < U; u++)
        for (int v = u + 1; v < U; v++) {
            int a = p->owner[u], b = p->owner[v];
            int split = level == 0 ? (t ? !topology_same_node(t, a, b) : a != b) : a != b;
            if (split) cut += 0.5 * (affinity[(size_t)u * U + v] + affinity[(size_t)v * U + u]);
        }
    return cut;
}

double placement_rank_maxvio(const Placement *p, const double *load) {
    if (!load) return 0;
    double *sum = xcalloc(sizeof(double) * (size_t)p->n_ranks);
    double total = 0;
    for (int u = 0; u < p->n_units; u++) {
        sum[p->owner[u]] += load[u];
        total += load[u];
    }
    double mx = 0;
    for (int r = 0; r < p->n_ranks; r++)
        if (sum[r] > mx) mx = sum[r];
    xfree(sum);
    double mean = total / p->n_ranks;
    return mean > 0 ? mx / mean - 1.0 : 0.0;
}

/* ------------------------------------------------------------------ contiguous and EPLB */

void placement_contiguous(Placement *p) {
    for (int u = 0; u < p->n_units; u++) p->owner[u] = u / p->per_rank;
    placement_fill_slots(p);
}

/* order[U]: units by decreasing load, equal loads by ascending index (stable insertion sort;
 * U is at most a few thousand) */
static void sort_heaviest(int *order, int U, const double *load) {
    for (int u = 0; u < U; u++) {
        int q = u;
        while (q > 0 && unit_load(load, order[q - 1]) < unit_load(load, u)) {
            order[q] = order[q - 1];
            q--;
        }
        order[q] = u;
    }
}

void placement_eplb(Placement *p, const double *load, const Topology *t) {
    ASSERTF(t && t->n_ranks == p->n_ranks, "placement_eplb: topology has %d ranks, placement %d",
            t ? t->n_ranks : -1, p->n_ranks);
    int U = p->n_units, R = p->n_ranks, N = t->n_nodes;
    int *order = xcalloc(sizeof(int) * (size_t)U);
    sort_heaviest(order, U, load);
    double *node_load = xcalloc(sizeof(double) * (size_t)N), *rank_load = xcalloc(sizeof(double) * (size_t)R);
    int *node_fill = xcalloc(sizeof(int) * (size_t)N), *rank_fill = xcalloc(sizeof(int) * (size_t)R);
    for (int i = 0; i < U; i++) {
        int u = order[i], best_n = -1, best_r = -1;
        for (int n = 0; n < N; n++)
            if (node_fill[n] < t->node_size[n] * p->per_rank && (best_n < 0 || node_load[n] < node_load[best_n]))
                best_n = n;
        ASSERT(best_n >= 0);
        for (int r = 0; r < R; r++)
            if (t->node_of[r] == best_n && rank_fill[r] < p->per_rank &&
                (best_r < 0 || rank_load[r] < rank_load[best_r]))
                best_r = r;
        ASSERT(best_r >= 0);
        double l = unit_load(load, u);
        node_load[best_n] += l; node_fill[best_n]++;
        rank_load[best_r] += l; rank_fill[best_r]++;
        p->owner[u] = best_r;
    }
    placement_fill_slots(p);
    xfree(order); xfree(node_load); xfree(rank_load); xfree(node_fill); xfree(rank_fill);
}

/* ------------------------------------------------------------------ graph partitioning */

/* one level: m units (ids[] into the global arrays) into k parts of capacity cap[k] */
typedef struct Split {
    int m, k;
    const int *cap;          /* [k] units per part */
    const double *lcap;      /* [k] load cap per part (INFINITY: none) */
    double *a;               /* [m, m] symmetrised affinity, zero diagonal */
    double *w;               /* [m] unit load (1 when no load was given) */
    int *part;               /* [m] part of each unit (the result) */
    int *size;               /* [k] units in each part */
    double *pload;           /* [k] summed load per part */
    double *d;               /* [m, k] affinity of unit i to the members of part p (i itself excluded) */
    double eps;              /* gains within eps of each other are ties */
    double leps;             /* load excess below leps is none */
    int has_load;
} Split;

/* load of part p above its cap */
static inline double over(const Split *s, int p, double load) {
    return load > s->lcap[p] ? load - s->lcap[p] : 0.0;
}

static void split_recompute(Split *s) {
    memset(s->d, 0, sizeof(double) * (size_t)s->m * s->k);
    memset(s->pload, 0, sizeof(double) * (size_t)s->k);
    memset(s->size, 0, sizeof(int) * (size_t)s->k);
    for (int i = 0; i < s->m; i++) {
        s->pload[s->part[i]] += s->w[i];
        s->size[s->part[i]]++;
        for (int j = 0; j < s->m; j++) s->d[(size_t)i * s->k + s->part[j]] += s->a[(size_t)i * s->m + j];
    }
}

/* greedy graph growing: parts in order; each starts from the heaviest free unit (load, or
 * weighted degree without load) and takes the free unit most attached to it until full;
 * equal attachment goes to the unit whose load is closest to what the part still needs */
static void split_grow(Split *s) {
    int m = s->m;
    double *attach = xcalloc(sizeof(double) * (size_t)m);
    double *degree = xcalloc(sizeof(double) * (size_t)m);
    double total_w = 0;
    for (int i = 0; i < m; i++) {
        s->part[i] = -1;
        total_w += s->w[i];
        for (int j = 0; j < m; j++) degree[i] += s->a[(size_t)i * m + j];
    }
    for (int p = 0; p < s->k; p++) {
        memset(attach, 0, sizeof(double) * (size_t)m);
        double have = 0, target = total_w * s->cap[p] / m;
        for (int n = 0; n < s->cap[p]; n++) {
            double need = (target - have) / (s->cap[p] - n);
            /* only units that keep the part under its load cap, while any does */
            int any_fits = 0;
            for (int i = 0; i < m && !any_fits; i++) any_fits = s->part[i] < 0 && !(over(s, p, have + s->w[i]) > s->leps);
            int best = -1;
            for (int i = 0; i < m; i++) {
                if (s->part[i] >= 0 || (any_fits && over(s, p, have + s->w[i]) > s->leps)) continue;
                if (best < 0) { best = i; continue; }
                if (n == 0) {           /* seed: heaviest, then lowest index */
                    double hi = s->has_load ? s->w[i] : degree[i], hb = s->has_load ? s->w[best] : degree[best];
                    if (hi > hb) best = i;
                } else if (attach[i] > attach[best] + s->eps) {
                    best = i;
                } else if (attach[i] >= attach[best] - s->eps && fabs(s->w[i] - need) < fabs(s->w[best] - need)) {
                    best = i;
                }
            }
            ASSERT(best >= 0);
            s->part[best] = p;
            have += s->w[best];
            for (int i = 0; i < m; i++) attach[i] += s->a[(size_t)i * m + best];
        }
    }
    xfree(attach);
    xfree(degree);
}

/* cut reduction of swapping i (in part pi) with j (in part pj) */
static inline double swap_gain(const Split *s, int i, int j) {
    int pi = s->part[i], pj = s->part[j], k = s->k;
    return s->d[(size_t)i * k + pj] - s->d[(size_t)i * k + pi] + s->d[(size_t)j * k + pi] -
           s->d[(size_t)j * k + pj] - 2.0 * s->a[(size_t)i * s->m + j];
}

/* heavier of the two parts' loads after swapping i and j */
static inline double swap_max_load(const Split *s, int i, int j) {
    int pi = s->part[i], pj = s->part[j];
    double li = s->pload[pi] - s->w[i] + s->w[j], lj = s->pload[pj] - s->w[j] + s->w[i];
    return li > lj ? li : lj;
}

/* change of the summed load excess over the caps if i and j swapped */
static inline double swap_excess(const Split *s, int i, int j) {
    int pi = s->part[i], pj = s->part[j];
    double li = s->pload[pi] - s->w[i] + s->w[j], lj = s->pload[pj] - s->w[j] + s->w[i];
    return over(s, pi, li) + over(s, pj, lj) - over(s, pi, s->pload[pi]) - over(s, pj, s->pload[pj]);
}

static void split_swap(Split *s, int i, int j) {
    int pi = s->part[i], pj = s->part[j], m = s->m, k = s->k;
    for (int x = 0; x < m; x++) {
        double ai = s->a[(size_t)x * m + i], aj = s->a[(size_t)x * m + j];
        s->d[(size_t)x * k + pi] += aj - ai;
        s->d[(size_t)x * k + pj] += ai - aj;
    }
    s->pload[pi] += s->w[j] - s->w[i];
    s->pload[pj] += s->w[i] - s->w[j];
    s->part[i] = pj;
    s->part[j] = pi;
}

/* one Kernighan-Lin pass: tentative best swaps of unlocked pairs (negative gains allowed),
 * each locking its two units, then a rollback to the best prefix. Returns the kept gain. */
static double split_kl_pass(Split *s, int *seq, char *locked) {
    int m = s->m, n_seq = 0, best_len = 0;
    double cum = 0, best_cum = 0;
    memset(locked, 0, (size_t)m);
    for (;;) {
        int bi = -1, bj = -1;
        double bg = 0, bl = 0;
        for (int i = 0; i < m; i++) {
            if (locked[i]) continue;
            for (int j = i + 1; j < m; j++) {
                if (locked[j] || s->part[j] == s->part[i] || swap_excess(s, i, j) > s->leps) continue;
                double g = swap_gain(s, i, j);
                if (bi >= 0 && g < bg - s->eps) continue;
                double l = swap_max_load(s, i, j);
                if (bi < 0 || g > bg + s->eps || l < bl) { bi = i; bj = j; bg = g; bl = l; }
            }
        }
        if (bi < 0) break;
        split_swap(s, bi, bj);
        locked[bi] = locked[bj] = 1;
        seq[2 * n_seq] = bi;
        seq[2 * n_seq + 1] = bj;
        n_seq++;
        cum += bg;
        if (cum > best_cum + s->eps) { best_cum = cum; best_len = n_seq; }
    }
    for (int q = n_seq - 1; q >= best_len; q--) split_swap(s, seq[2 * q], seq[2 * q + 1]);
    split_recompute(s);      /* drop the rounding the tentative swaps accumulated */
    return best_cum;
}

/* cut-neutral swaps that lower the heavier of the two parts' loads, best first */
static void split_balance(Split *s) {
    int m = s->m;
    for (int iter = 0; iter < 4 * m; iter++) {
        int bi = -1, bj = -1;
        double best_drop = 0;
        for (int i = 0; i < m; i++)
            for (int j = i + 1; j < m; j++) {
                if (s->part[j] == s->part[i]) continue;
                if (swap_gain(s, i, j) < -s->eps || swap_excess(s, i, j) > s->leps) continue;
                double before = s->pload[s->part[i]] > s->pload[s->part[j]] ? s->pload[s->part[i]] : s->pload[s->part[j]];
                double drop = before - swap_max_load(s, i, j);
                if (drop > best_drop + 1e-12 * (before > 1 ? before : 1)) { best_drop = drop; bi = i; bj = j; }
            }
        if (bi < 0) break;
        split_swap(s, bi, bj);
    }
    split_recompute(s);
}

/* parts over their load caps: swaps that lower the summed excess, the one that costs the
 * least cut first (then the larger excess drop, then the lowest indices) */
static void split_repair(Split *s) {
    int m = s->m;
    for (int iter = 0; iter < 4 * m; iter++) {
        int bi = -1, bj = -1;
        double bg = 0, bx = 0;
        for (int i = 0; i < m; i++)
            for (int j = i + 1; j < m; j++) {
                if (s->part[j] == s->part[i]) continue;
                double x = swap_excess(s, i, j);
                if (x >= -s->leps) continue;
                double g = swap_gain(s, i, j);
                if (bi < 0 || g > bg + s->eps || (g >= bg - s->eps && x < bx)) { bi = i; bj = j; bg = g; bx = x; }
            }
        if (bi < 0) break;
        split_swap(s, bi, bj);
    }
    split_recompute(s);
}

/* a split of the units ids[m] over k parts (units per part cap[k], load caps lcap[k]) */
static void split_init(Split *s, const int *ids, int m, const int *cap, const double *lcap, int k, int U,
                       const double *affinity, const double *load) {
    memset(s, 0, sizeof *s);
    s->m = m; s->k = k; s->cap = cap; s->lcap = lcap; s->has_load = load != NULL;
    s->a = xcalloc(sizeof(double) * (size_t)m * m);
    s->w = xcalloc(sizeof(double) * (size_t)m);
    s->part = xcalloc(sizeof(int) * (size_t)m);
    s->size = xcalloc(sizeof(int) * (size_t)k);
    s->pload = xcalloc(sizeof(double) * (size_t)k);
    s->d = xcalloc(sizeof(double) * (size_t)m * k);
    double total = 0, total_w = 0;
    for (int i = 0; i < m; i++) {
        s->w[i] = unit_load(load, ids[i]);
        total_w += fabs(s->w[i]);
        for (int j = 0; j < m; j++) {
            if (i == j) continue;
            double v = 0.5 * (affinity[(size_t)ids[i] * U + ids[j]] + affinity[(size_t)ids[j] * U + ids[i]]);
            s->a[(size_t)i * m + j] = v;
            total += fabs(v);
        }
    }
    s->eps = 1e-12 * (total > 0 ? total : 1.0);
    s->leps = 1e-12 * (total_w > 0 ? total_w : 1.0);
}

static void split_release(Split *s) {
    for (int p = 0; p < s->k; p++)
        ASSERTF(s->size[p] == s->cap[p], "placement: part %d holds %d units, capacity %d", p, s->size[p], s->cap[p]);
    xfree(s->a); xfree(s->w); xfree(s->part); xfree(s->size); xfree(s->pload); xfree(s->d);
    memset(s, 0, sizeof *s);
}

/* the units ids[m] into k parts: growth, load repair, refinement; part_out[m] gets the parts */
static void split_run(const int *ids, int m, const int *cap, const double *lcap, int k, int U,
                      const double *affinity, const double *load, int refine_passes, int *part_out) {
    Split s;
    split_init(&s, ids, m, cap, lcap, k, U, affinity, load);
    split_grow(&s);
    split_recompute(&s);
    if (k > 1 && s.has_load) split_repair(&s);
    if (k > 1 && refine_passes > 0) {
        int *seq = xcalloc(sizeof(int) * (size_t)m);
        char *locked = xcalloc((size_t)m);
        for (int pass = 0; pass < refine_passes; pass++)
            if (split_kl_pass(&s, seq, locked) <= s.eps) break;
        if (s.has_load) split_balance(&s);
        xfree(seq);
        xfree(locked);
    }
    memcpy(part_out, s.part, sizeof(int) * (size_t)m);
    split_release(&s);
}


/* ------------------------------------------------------------------ METIS path */

/* One level for large m, without any m x m array: the symmetrised affinity of the split as a
 * sparse graph (CSR, zero entries dropped), attachments d[m, k], part member lists. METIS
 * (multilevel k-way, multi-constraint: unit count and load) gives the first partition; greedy
 * passes then make the sizes exact (least added cut), bring parts under their load caps
 * (cheapest swaps) and refine with size-preserving swaps that add no excess. */
typedef struct Big {
    int m, k;
    const int *cap;          /* [k] units per part */
    const double *lcap;      /* [k] load cap per part */
    int *xadj, *adj;         /* [m + 1], [nnz] neighbours of each unit (split indices, ascending) */
    double *wt;              /* [nnz] symmetrised affinity of each edge */
    double *w;               /* [m] unit load (1 when no load was given) */
    int *part, *size;        /* [m], [k] */
    double *pload;           /* [k] */
    double *d;               /* [m, k] affinity of unit i to the members of part p (i excluded) */
    double *row;             /* [m] scratch: the affinity row of one unit, scattered */
    int *members, *pos, *off; /* [m] units by part (part p at off[p]..off[p]+cap[p]), [m] slot, [k + 1] */
    double eps, leps;
    int has_load;
} Big;

static void big_init(Big *b, const int *ids, int m, const int *cap, const double *lcap, int k, int U,
                     const double *affinity, const double *load) {
    memset(b, 0, sizeof *b);
    b->m = m; b->k = k; b->cap = cap; b->lcap = lcap; b->has_load = load != NULL;
    b->w = xcalloc(sizeof(double) * (size_t)m);
    b->xadj = xcalloc(sizeof(int) * ((size_t)m + 1));
    size_t nnz = 0;
    for (int pass = 0; pass < 2; pass++) {   /* count, then fill */
        nnz = 0;
        for (int i = 0; i < m; i++) {
            const double *ri = affinity + (size_t)ids[i] * U;
            for (int j = 0; j < m; j++) {
                if (j == i) continue;
                double v = 0.5 * (ri[ids[j]] + affinity[(size_t)ids[j] * U + ids[i]]);
                if (v == 0) continue;
                if (pass == 1) { b->adj[nnz] = j; b->wt[nnz] = v; }
                nnz++;
            }
            if (pass == 0) b->xadj[i + 1] = (int)nnz;
        }
        ASSERTF(nnz < (size_t)INT32_MAX, "placement: %zu affinity entries in one split (limit %d)", nnz, INT32_MAX);
        if (pass == 0) {
            b->adj = xcalloc(sizeof(int) * (nnz ? nnz : 1));
            b->wt = xcalloc(sizeof(double) * (nnz ? nnz : 1));
        }
    }
    double total = 0, total_w = 0;
    for (size_t e = 0; e < nnz; e++) total += fabs(b->wt[e]);
    for (int i = 0; i < m; i++) {
        b->w[i] = unit_load(load, ids[i]);
        total_w += fabs(b->w[i]);
    }
    b->eps = 1e-12 * (total > 0 ? total : 1.0);
    b->leps = 1e-12 * (total_w > 0 ? total_w : 1.0);
    b->part = xcalloc(sizeof(int) * (size_t)m);
    b->size = xcalloc(sizeof(int) * (size_t)k);
    b->pload = xcalloc(sizeof(double) * (size_t)k);
    b->d = xcalloc(sizeof(double) * (size_t)m * k);
    b->row = xcalloc(sizeof(double) * (size_t)m);
    b->members = xcalloc(sizeof(int) * (size_t)m);
    b->pos = xcalloc(sizeof(int) * (size_t)m);
    b->off = xcalloc(sizeof(int) * ((size_t)k + 1));
    for (int p = 0; p < k; p++) b->off[p + 1] = b->off[p] + cap[p];
    ASSERTF(b->off[k] == m, "placement: part capacities sum to %d, %d units", b->off[k], m);
}

static void big_free(Big *b) {
    xfree(b->xadj); xfree(b->adj); xfree(b->wt); xfree(b->w); xfree(b->part); xfree(b->size);
    xfree(b->pload); xfree(b->d); xfree(b->row); xfree(b->members); xfree(b->pos); xfree(b->off);
    memset(b, 0, sizeof *b);
}

/* d, size, pload from part (and the member lists when every part is exactly full) */
static void big_recompute(Big *b) {
    int m = b->m, k = b->k;
    memset(b->d, 0, sizeof(double) * (size_t)m * k);
    memset(b->size, 0, sizeof(int) * (size_t)k);
    memset(b->pload, 0, sizeof(double) * (size_t)k);
    for (int i = 0; i < m; i++) {
        b->size[b->part[i]]++;
        b->pload[b->part[i]] += b->w[i];
        for (int e = b->xadj[i]; e < b->xadj[i + 1]; e++) b->d[(size_t)i * k + b->part[b->adj[e]]] += b->wt[e];
    }
    int exact = 1;
    for (int p = 0; p < k; p++) exact &= b->size[p] == b->cap[p];
    if (!exact) return;
    int *fill = xcalloc(sizeof(int) * (size_t)k);
    for (int i = 0; i < m; i++) {
        int p = b->part[i];
        b->pos[i] = fill[p];
        b->members[b->off[p] + fill[p]++] = i;
    }
    xfree(fill);
}

static void big_move(Big *b, int i, int q) {
    int p = b->part[i], k = b->k;
    for (int e = b->xadj[i]; e < b->xadj[i + 1]; e++) {
        double *dj = b->d + (size_t)b->adj[e] * k;
        dj[p] -= b->wt[e];
        dj[q] += b->wt[e];
    }
    b->size[p]--; b->size[q]++;
    b->pload[p] -= b->w[i]; b->pload[q] += b->w[i];
    b->part[i] = q;
}

/* swap i and j between their parts (both member lists are exact) */
static void big_swap(Big *b, int i, int j) {
    int pi = b->part[i], pj = b->part[j];
    big_move(b, i, pj);
    big_move(b, j, pi);
    int si = b->pos[i], sj = b->pos[j];
    b->members[b->off[pj] + sj] = i; b->pos[i] = sj;
    b->members[b->off[pi] + si] = j; b->pos[j] = si;
}

static inline double big_over(const Big *b, int p, double load) {
    return load > b->lcap[p] ? load - b->lcap[p] : 0.0;
}

static inline double big_move_gain(const Big *b, int i, int q) {
    return b->d[(size_t)i * b->k + q] - b->d[(size_t)i * b->k + b->part[i]];
}

/* change of the summed excess if i and j swapped */
static inline double big_swap_excess(const Big *b, int i, int j) {
    int pi = b->part[i], pj = b->part[j];
    double li = b->pload[pi] - b->w[i] + b->w[j], lj = b->pload[pj] - b->w[j] + b->w[i];
    return big_over(b, pi, li) + big_over(b, pj, lj) - big_over(b, pi, b->pload[pi]) - big_over(b, pj, b->pload[pj]);
}

static void big_scatter(Big *b, int i, double sign) {
    for (int e = b->xadj[i]; e < b->xadj[i + 1]; e++) b->row[b->adj[e]] = sign > 0 ? b->wt[e] : 0.0;
}

/* METIS k-way on the split, two constraints: unit count (weight 1, tolerance 3%: the sizes are
 * made exact afterwards) and, with loads and a finite cap, the load scaled to integers
 * (tolerance = max_imbalance); target weights = the parts' capacities; edge weights =
 * affinity scaled to integers (the largest 1e6, the sum below 2^30; entries that round to 0
 * dropped); fixed seed, so every rank computes the same split. Returns 0 when METIS fails
 * (the caller falls back to Kernighan-Lin). */
static int big_metis(Big *b, double max_imbalance) {
    int m = b->m, k = b->k;
    if (k == 1) { memset(b->part, 0, sizeof(int) * (size_t)m); return 1; }
    int nnz = b->xadj[m];
    double amax = 0, asum = 0;
    for (int e = 0; e < nnz; e++) { amax = fmax(amax, fabs(b->wt[e])); asum += fabs(b->wt[e]); }
    double ascale = amax > 0 ? fmin(1e6 / amax, 1e9 / asum) : 0;
    double wmax = 0;
    for (int i = 0; i < m; i++) wmax = fmax(wmax, b->w[i]);
    int ncon = b->has_load && wmax > 0 && !isinf(max_imbalance) ? 2 : 1;
    idx_t nv = m, nc = ncon, np = k, cut = 0, *xadj = xcalloc(sizeof(idx_t) * ((size_t)m + 1));
    idx_t *adj = xcalloc(sizeof(idx_t) * (size_t)(nnz ? nnz : 1)), *awt = xcalloc(sizeof(idx_t) * (size_t)(nnz ? nnz : 1));
    idx_t *vwt = xcalloc(sizeof(idx_t) * (size_t)m * ncon), *part = xcalloc(sizeof(idx_t) * (size_t)m);
    real_t *tp = xcalloc(sizeof(real_t) * (size_t)k * ncon), ub[2] = {1.03f, 1.03f};  /* sizes: close, made exact afterwards */
    if (ncon == 2) ub[1] = (real_t)fmax(1.0 + max_imbalance, 1.01);
    idx_t n_e = 0;
    for (int i = 0; i < m; i++) {
        for (int e = b->xadj[i]; e < b->xadj[i + 1]; e++) {
            long long x = llround(b->wt[e] * ascale);
            if (x <= 0) continue;
            adj[n_e] = b->adj[e];
            awt[n_e++] = (idx_t)x;
        }
        xadj[i + 1] = n_e;
        vwt[(size_t)i * ncon] = 1;
        if (ncon == 2) vwt[(size_t)i * ncon + 1] = (idx_t)llround(fmax(b->w[i], 0) / wmax * 10000.0);
    }
    for (int p = 0; p < k; p++)
        for (int c = 0; c < ncon; c++) tp[(size_t)p * ncon + c] = (real_t)((double)b->cap[p] / m);
    idx_t opt[METIS_NOPTIONS];
    METIS_SetDefaultOptions(opt);
    opt[METIS_OPTION_SEED] = 1;                 /* fixed: the same placement on every rank */
    opt[METIS_OPTION_NUMBERING] = 0;
    opt[METIS_OPTION_OBJTYPE] = METIS_OBJTYPE_CUT;
    int rc = METIS_PartGraphKway(&nv, &nc, xadj, adj, vwt, NULL, awt, &np, tp, ub, opt, &cut, part);
    if (rc == METIS_OK)
        for (int i = 0; i < m; i++) b->part[i] = (int)part[i];
    xfree(xadj); xfree(adj); xfree(awt); xfree(vwt); xfree(part); xfree(tp);
    return rc == METIS_OK;
}

/* exact sizes: units leave over-full parts for under-full ones, one at a time, the move that
 * adds no load excess and costs the least cut first */
static void big_fix_sizes(Big *b) {
    int m = b->m, k = b->k;
    big_recompute(b);
    for (;;) {
        int bi = -1, bq = -1, bx = 0;
        double bg = 0;
        for (int i = 0; i < m; i++) {
            int p = b->part[i];
            if (b->size[p] <= b->cap[p]) continue;
            for (int q = 0; q < k; q++) {
                if (b->size[q] >= b->cap[q]) continue;
                double dx = big_over(b, q, b->pload[q] + b->w[i]) - big_over(b, q, b->pload[q]) +
                            big_over(b, p, b->pload[p] - b->w[i]) - big_over(b, p, b->pload[p]);
                int x = dx > b->leps;
                double g = big_move_gain(b, i, q);
                if (bi < 0 || x < bx || (x == bx && g > bg + b->eps)) { bi = i; bq = q; bg = g; bx = x; }
            }
        }
        if (bi < 0) break;
        big_move(b, bi, bq);
    }
    big_recompute(b);
}

/* parts over their load caps: part by part, the member whose best swap (the one that lowers the
 * summed excess and costs the least cut) is cheapest swaps; rounds until no part is over its
 * cap or no swap lowers the excess */
static void big_fix_caps(Big *b) {
    int m = b->m, k = b->k;
    for (int round = 0, moved = 1; moved && round < m; round++) {
        moved = 0;
        for (int p = 0; p < k; p++) {
            if (!(big_over(b, p, b->pload[p]) > b->leps)) continue;
            int bi = -1, bj = -1;
            double bg = 0, bx = 0;
            for (int s = 0; s < b->cap[p]; s++) {
                int i = b->members[b->off[p] + s];
                big_scatter(b, i, 1);
                for (int j = 0; j < m; j++) {
                    if (b->part[j] == p) continue;
                    double x = big_swap_excess(b, i, j);
                    if (x >= -b->leps) continue;
                    double g = big_move_gain(b, i, b->part[j]) + big_move_gain(b, j, p) - 2 * b->row[j];
                    if (bi < 0 || g > bg + b->eps || (g >= bg - b->eps && x < bx)) { bi = i; bj = j; bg = g; bx = x; }
                }
                big_scatter(b, i, 0);
            }
            if (bi < 0) continue;
            big_swap(b, bi, bj);
            moved = 1;
        }
    }
    big_recompute(b);
}

/* size-preserving refinement: every unit in turn swaps with the member of another part it is
 * attached to (d > 0) that gains the most, if the swap lowers the cut and adds no load
 * excess. Returns the cut removed. */
static double big_refine_pass(Big *b) {
    int m = b->m, k = b->k;
    double total = 0;
    for (int i = 0; i < m; i++) {
        int p = b->part[i], bj = -1;
        const double *di = b->d + (size_t)i * k;
        double bg = b->eps;
        big_scatter(b, i, 1);
        for (int q = 0; q < k; q++) {
            if (q == p || !(di[q] > 0)) continue;
            for (int s = 0; s < b->cap[q]; s++) {
                int j = b->members[b->off[q] + s];
                double g = di[q] - di[p] + big_move_gain(b, j, p) - 2 * b->row[j];
                if (g > bg && big_swap_excess(b, i, j) <= b->leps) { bg = g; bj = j; }
            }
        }
        big_scatter(b, i, 0);
        if (bj >= 0) {
            big_swap(b, i, bj);
            total += bg;
        }
    }
    big_recompute(b);
    return total;
}

/* the units ids[m] into k parts with METIS; part_out[m]. Returns 0 if METIS failed. */
static int big_run(const int *ids, int m, const int *cap, const double *lcap, int k, int U, const double *affinity,
                   const double *load, int refine_passes, double max_imbalance, int *part_out) {
    Big b;
    big_init(&b, ids, m, cap, lcap, k, U, affinity, load);
    int good = big_metis(&b, max_imbalance);
    if (good) {
        big_fix_sizes(&b);
        if (k > 1 && b.has_load) big_fix_caps(&b);
        for (int pass = 0; k > 1 && pass < refine_passes; pass++)
            if (big_refine_pass(&b) <= b.eps) break;
        for (int p = 0; p < k; p++)
            ASSERTF(b.size[p] == cap[p], "placement: part %d holds %d units, capacity %d", p, b.size[p], cap[p]);
        memcpy(part_out, b.part, sizeof(int) * (size_t)m);
    }
    big_free(&b);
    return good;
}

/* (summed load excess over the caps, cut, heaviest part) of part[m] over the units ids[m] */
static void split_score(const int *ids, int m, const int *part, const double *lcap, int k, int U,
                        const double *affinity, const double *load, double out[3]) {
    double *pl = xcalloc(sizeof(double) * (size_t)k);
    double cut = 0;
    for (int i = 0; i < m; i++) {
        pl[part[i]] += unit_load(load, ids[i]);
        for (int j = i + 1; j < m; j++)
            if (part[i] != part[j])
                cut += 0.5 * (affinity[(size_t)ids[i] * U + ids[j]] + affinity[(size_t)ids[j] * U + ids[i]]);
    }
    double ex = 0, mx = 0;
    for (int p = 0; p < k; p++) {
        if (pl[p] > lcap[p]) ex += pl[p] - lcap[p];
        if (pl[p] > mx) mx = pl[p];
    }
    xfree(pl);
    out[0] = ex; out[1] = cut; out[2] = mx;
}

/* one level with the chosen partitioner. AUTO: up to PLACEMENT_KL_MAX units both, keeping
 * METIS's split only where it is strictly better (less excess, then less cut, then a lighter
 * heaviest part); above it METIS alone (Kernighan-Lin is O(m^3) a pass there) */
static void split_any(const int *ids, int m, const int *cap, const double *lcap, int k, int U,
                      const double *affinity, const double *load, int refine_passes, double max_imbalance,
                      int partitioner, int *part_out) {
    if (partitioner == PLACEMENT_PART_KL || k == 1) {
        split_run(ids, m, cap, lcap, k, U, affinity, load, refine_passes, part_out);
        return;
    }
    if (partitioner == PLACEMENT_PART_METIS || m > PLACEMENT_KL_MAX) {
        if (!big_run(ids, m, cap, lcap, k, U, affinity, load, refine_passes, max_imbalance, part_out))
            split_run(ids, m, cap, lcap, k, U, affinity, load, refine_passes, part_out);
        return;
    }
    int *alt = xcalloc(sizeof(int) * (size_t)m);
    split_run(ids, m, cap, lcap, k, U, affinity, load, refine_passes, part_out);
    if (big_run(ids, m, cap, lcap, k, U, affinity, load, refine_passes, max_imbalance, alt)) {
        double a[3], b[3], tot = 0, tot_w = 0;
        for (int i = 0; i < m; i++) {
            tot_w += fabs(unit_load(load, ids[i]));
            for (int j = 0; j < m; j++) tot += fabs(affinity[(size_t)ids[i] * U + ids[j]]);
        }
        double eps = 1e-9 * (tot > 0 ? tot : 1), leps = 1e-9 * (tot_w > 0 ? tot_w : 1);
        split_score(ids, m, part_out, lcap, k, U, affinity, load, a);
        split_score(ids, m, alt, lcap, k, U, affinity, load, b);
        int better = b[0] < a[0] - leps ||
                     (b[0] <= a[0] + leps && (b[1] < a[1] - eps || (b[1] <= a[1] + eps && b[2] < a[2] - leps)));
        if (better) memcpy(part_out, alt, sizeof(int) * (size_t)m);
    }
    xfree(alt);
}

void placement_topology(Placement *p, const double *affinity, const double *load, const Topology *t,
                        int refine_passes) {
    placement_topology_capped(p, affinity, load, t, refine_passes, INFINITY);
}

void placement_topology_capped(Placement *p, const double *affinity, const double *load, const Topology *t,
                               int refine_passes, double max_imbalance) {
    placement_topology_part(p, affinity, load, t, refine_passes, max_imbalance, PLACEMENT_PART_AUTO);
}

void placement_topology_part(Placement *p, const double *affinity, const double *load, const Topology *t,
                             int refine_passes, double max_imbalance, int partitioner) {
    placement_topology_ex(p, affinity, affinity, load, NULL, t, refine_passes, max_imbalance, partitioner);
}

void placement_topology_ex(Placement *p, const double *aff_node, const double *aff_rank, const double *load,
                           const double *rank_bg, const Topology *t, int refine_passes, double max_imbalance,
                           int partitioner) {
    ASSERTF(t && t->n_ranks == p->n_ranks, "placement_topology: topology has %d ranks, placement %d",
            t ? t->n_ranks : -1, p->n_ranks);
    ASSERT(aff_node && aff_rank);
    ASSERTF(!(max_imbalance < 0), "placement_topology: max_imbalance %g must be >= 0", max_imbalance);
    int U = p->n_units, R = p->n_ranks, N = t->n_nodes, K = N > R ? N : R;
    int *ids = xcalloc(sizeof(int) * (size_t)U);
    int *part = xcalloc(sizeof(int) * (size_t)U);
    int *node_of_unit = xcalloc(sizeof(int) * (size_t)U);
    int *cap = xcalloc(sizeof(int) * (size_t)K);           /* [max(N, R)] */
    double *lcap = xcalloc(sizeof(double) * (size_t)K);
    int *ranks = xcalloc(sizeof(int) * (size_t)R);
    /* a rank may carry (1 + max_imbalance) x the mean rank load (its background load
     * included, which then leaves less room for units), a node that times its ranks */
    double total = 0;
    for (int u = 0; u < U; u++) total += unit_load(load, u);
    if (rank_bg)
        for (int r = 0; r < R; r++) total += rank_bg[r];
    double rank_cap = isinf(max_imbalance) || !load ? INFINITY : (1.0 + max_imbalance) * total / R;
#define BG(r) (rank_bg ? rank_bg[r] : 0.0)

    /* level 0: units -> nodes (aff_node) */
    for (int u = 0; u < U; u++) ids[u] = u;
    for (int n = 0; n < N; n++) {
        cap[n] = t->node_size[n] * p->per_rank;
        lcap[n] = rank_cap * t->node_size[n];
    }
    if (rank_bg && !isinf(rank_cap))
        for (int r = 0; r < R; r++) lcap[t->node_of[r]] -= rank_bg[r];
    split_any(ids, U, cap, lcap, N, U, aff_node, load, refine_passes, max_imbalance, partitioner, node_of_unit);

    /* level 1: inside each node, its units -> its ranks (in local-index order; aff_rank) */
    for (int n = 0; n < N; n++) {
        int m = 0, k = 0;
        for (int u = 0; u < U; u++)
            if (node_of_unit[u] == n) ids[m++] = u;
        for (int r = 0; r < R; r++)
            if (t->node_of[r] == n) ranks[t->local_index[r]] = r, k++;
        for (int q = 0; q < k; q++) {
            cap[q] = p->per_rank;
            lcap[q] = rank_cap - (isinf(rank_cap) ? 0.0 : BG(ranks[q]));
        }
        split_any(ids, m, cap, lcap, k, U, aff_rank, load, refine_passes, max_imbalance, partitioner, part);
        for (int i = 0; i < m; i++) p->owner[ids[i]] = ranks[part[i]];
    }

    /* a node filled close to its cap can leave a rank over the cap with no swap inside the
     * node to fix it: then swaps between ranks anywhere, the cheapest in rank cut first */
    if (!isinf(rank_cap)) {
        double *rl = xcalloc(sizeof(double) * (size_t)R);
        for (int u = 0; u < U; u++) rl[p->owner[u]] += load[u];
        int over_cap = 0;
        for (int r = 0; r < R; r++) over_cap |= rl[r] + BG(r) > rank_cap * (1 + 1e-12);
        xfree(rl);
        if (over_cap && R > 1) {
            for (int u = 0; u < U; u++) ids[u] = u;
            for (int r = 0; r < R; r++) { cap[r] = p->per_rank; lcap[r] = rank_cap - BG(r); }
            if (partitioner == PLACEMENT_PART_KL || (partitioner == PLACEMENT_PART_AUTO && U <= PLACEMENT_KL_MAX)) {
                Split s;
                split_init(&s, ids, U, cap, lcap, R, U, aff_rank, load);
                memcpy(s.part, p->owner, sizeof(int) * (size_t)U);
                split_recompute(&s);
                split_repair(&s);
                memcpy(p->owner, s.part, sizeof(int) * (size_t)U);
                split_release(&s);
            } else {
                Big b;
                big_init(&b, ids, U, cap, lcap, R, U, aff_rank, load);
                memcpy(b.part, p->owner, sizeof(int) * (size_t)U);
                big_recompute(&b);
                big_fix_caps(&b);
                memcpy(p->owner, b.part, sizeof(int) * (size_t)U);
                big_free(&b);
            }
        }
    }
#undef BG
    placement_fill_slots(p);
    xfree(ids); xfree(part); xfree(node_of_unit); xfree(cap); xfree(lcap); xfree(ranks);
}
