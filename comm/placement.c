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
 * index, so every rank computes the same placement from the same inputs.
 * Does not: move weights or measure affinity; no randomness anywhere.
 * Legend: U = units, R = ranks, N = nodes, m = units in the set being split, k = parts. */
#include "placement.h"

#include <math.h>
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

void placement_topology(Placement *p, const double *affinity, const double *load, const Topology *t,
                        int refine_passes) {
    placement_topology_capped(p, affinity, load, t, refine_passes, INFINITY);
}

void placement_topology_capped(Placement *p, const double *affinity, const double *load, const Topology *t,
                               int refine_passes, double max_imbalance) {
    ASSERTF(t && t->n_ranks == p->n_ranks, "placement_topology: topology has %d ranks, placement %d",
            t ? t->n_ranks : -1, p->n_ranks);
    ASSERT(affinity);
    ASSERTF(!(max_imbalance < 0), "placement_topology: max_imbalance %g must be >= 0", max_imbalance);
    int U = p->n_units, R = p->n_ranks, N = t->n_nodes, K = N > R ? N : R;
    int *ids = xcalloc(sizeof(int) * (size_t)U);
    int *part = xcalloc(sizeof(int) * (size_t)U);
    int *node_of_unit = xcalloc(sizeof(int) * (size_t)U);
    int *cap = xcalloc(sizeof(int) * (size_t)K);           /* [max(N, R)] */
    double *lcap = xcalloc(sizeof(double) * (size_t)K);
    int *ranks = xcalloc(sizeof(int) * (size_t)R);
    /* a rank may carry (1 + max_imbalance) x the mean rank load, a node that times its ranks */
    double total = 0;
    for (int u = 0; u < U; u++) total += unit_load(load, u);
    double rank_cap = isinf(max_imbalance) || !load ? INFINITY : (1.0 + max_imbalance) * total / R;

    /* level 0: units -> nodes */
    for (int u = 0; u < U; u++) ids[u] = u;
    for (int n = 0; n < N; n++) {
        cap[n] = t->node_size[n] * p->per_rank;
        lcap[n] = rank_cap * t->node_size[n];
    }
    split_run(ids, U, cap, lcap, N, U, affinity, load, refine_passes, node_of_unit);

    /* level 1: inside each node, its units -> its ranks (in local-index order) */
    for (int n = 0; n < N; n++) {
        int m = 0, k = 0;
        for (int u = 0; u < U; u++)
            if (node_of_unit[u] == n) ids[m++] = u;
        for (int r = 0; r < R; r++)
            if (t->node_of[r] == n) ranks[t->local_index[r]] = r, k++;
        for (int q = 0; q < k; q++) {
            cap[q] = p->per_rank;
            lcap[q] = rank_cap;
        }
        split_run(ids, m, cap, lcap, k, U, affinity, load, refine_passes, part);
        for (int i = 0; i < m; i++) p->owner[ids[i]] = ranks[part[i]];
    }

    /* a node filled close to its cap can leave a rank over the cap with no swap inside the
     * node to fix it: then swaps between ranks anywhere, the cheapest in rank cut first */
    if (!isinf(rank_cap)) {
        double *rl = xcalloc(sizeof(double) * (size_t)R);
        for (int u = 0; u < U; u++) rl[p->owner[u]] += load[u];
        int over_cap = 0;
        for (int r = 0; r < R; r++) over_cap |= rl[r] > rank_cap * (1 + 1e-12);
        xfree(rl);
        if (over_cap && R > 1) {
            for (int u = 0; u < U; u++) ids[u] = u;
            for (int r = 0; r < R; r++) { cap[r] = p->per_rank; lcap[r] = rank_cap; }
            Split s;
            split_init(&s, ids, U, cap, lcap, R, U, affinity, load);
            memcpy(s.part, p->owner, sizeof(int) * (size_t)U);
            split_recompute(&s);
            split_repair(&s);
            memcpy(p->owner, s.part, sizeof(int) * (size_t)U);
            split_release(&s);
        }
    }
    placement_fill_slots(p);
    xfree(ids); xfree(part); xfree(node_of_unit); xfree(cap); xfree(lcap); xfree(ranks);
}
