/* cluster.c: dual-similarity expert clustering of one MoE layer (DESIGN.md §1.2): fused
 * features, clustering cost, balanced k-means (k-means++ seeding, Lloyd iterations whose
 * assignment step is an exact min-cost assignment of experts to G*K slots), matching of new
 * group ids to old ones, Jaccard stability, the min-gain event, and the Hungarian algorithm.
 * All sums are in double; scratch is allocated and freed per call.
 * Determinism: the only randomness is the caller's Rng; ties go to the lowest index.
 * Legend: E G K P = experts, groups, experts per group (E/G), feature width. */
#include "cluster.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- fused features */

static double row_norm(const float *x /* [n] */, int n) {
    double s = 0;
    for (int k = 0; k < n; k++) s += (double)x[k] * x[k];
    return sqrt(s);
}

void cluster_fuse_features(const float *w /* [E, Pw] */, int Pw, const float *mu /* [E, Pm] */, int Pm,
                           int E, double alpha, float *z /* [E, Pw + Pm] */) {
    ASSERTF(alpha >= 0 && alpha <= 1, "cluster_fuse_features: alpha = %g, expected in [0,1]", alpha);
    ASSERTF(E >= 1 && Pw >= 0 && Pm >= 0, "cluster_fuse_features: E=%d Pw=%d Pm=%d", E, Pw, Pm);
    const int P = Pw + Pm;
    const double sw = sqrt(alpha), sm = sqrt(1.0 - alpha);
    for (int i = 0; i < E; i++) {
        float *zi = z + (size_t)i * P;
        const float *wi = w ? w + (size_t)i * Pw : NULL;
        const float *mi = mu ? mu + (size_t)i * Pm : NULL;
        double nw = Pw ? row_norm(wi, Pw) : 0, nm = Pm ? row_norm(mi, Pm) : 0;
        for (int k = 0; k < Pw; k++) zi[k] = nw > 0 ? (float)(sw * wi[k] / nw) : 0.0f;
        for (int k = 0; k < Pm; k++) zi[Pw + k] = nm > 0 ? (float)(sm * mi[k] / nm) : 0.0f;
    }
}

/* ---------------------------------------------------------------- cost */

/* centroids c [G, P] (double) = mean of z rows per group; counts [G] out (may be NULL) */
static void group_means(const float *z /* [E, P] */, int E, int P, const int32_t *group /* [E] */, int G,
                        double *c /* [G, P] */, int *counts /* [G] or NULL */) {
    int *n = xcalloc(sizeof(int) * (size_t)G);
    memset(c, 0, sizeof(double) * (size_t)G * P);
    for (int i = 0; i < E; i++) {
        int g = group[i];
        ASSERTF(g >= 0 && g < G, "cluster: group[%d] = %d, expected in [0,%d)", i, g, G);
        n[g]++;
        for (int k = 0; k < P; k++) c[(size_t)g * P + k] += z[(size_t)i * P + k];
    }
    for (int g = 0; g < G; g++)
        if (n[g] > 0)
            for (int k = 0; k < P; k++) c[(size_t)g * P + k] /= n[g];
    if (counts) memcpy(counts, n, sizeof(int) * (size_t)G);
    xfree(n);
}

static double sq_dist(const float *x /* [P] */, const double *c /* [P] */, int P) {
    double s = 0;
    for (int k = 0; k < P; k++) {
        double d = (double)x[k] - c[k];
        s += d * d;
    }
    return s;
}

double cluster_cost(const float *z /* [E, P] */, int E, int P, const int32_t *group /* [E] */, int G) {
    ASSERTF(E >= 1 && P >= 0 && G >= 1, "cluster_cost: E=%d P=%d G=%d", E, P, G);
    double *c = xmalloc(sizeof(double) * (size_t)G * (P > 0 ? P : 1));
    group_means(z, E, P, group, G, c, NULL);
    double s = 0;
    for (int i = 0; i < E; i++) s += sq_dist(z + (size_t)i * P, c + (size_t)group[i] * P, P);
    xfree(c);
    return s / E;
}

/* ---------------------------------------------------------------- Hungarian */

/* Kuhn-Munkres with potentials (the O(n^2 m) shortest-augmenting-path form, as in
 * Jonker-Volgenant): rows are added one at a time and each is routed along a shortest
 * alternating path in reduced costs. 1-based internally; column 0 is the virtual source.
 * Ties in the path search go to the lowest column index (strict <). */
void cluster_hungarian(const double *cost /* [n, m] */, int n, int m, int32_t *assign /* [n] */) {
    ASSERTF(n >= 0 && n <= m, "cluster_hungarian: n = %d rows, m = %d columns, expected n <= m", n, m);
    if (n == 0) return;
    double *u = xcalloc(sizeof(double) * (size_t)(n + 1));     /* row potentials */
    double *v = xcalloc(sizeof(double) * (size_t)(m + 1));     /* column potentials */
    double *minv = xmalloc(sizeof(double) * (size_t)(m + 1));  /* slack per column */
    int *p = xcalloc(sizeof(int) * (size_t)(m + 1));           /* row matched to column j (0 = none) */
    int *way = xcalloc(sizeof(int) * (size_t)(m + 1));         /* previous column on the path */
    char *used = xmalloc((size_t)(m + 1));
    for (size_t q = 0; q < (size_t)n * m; q++)
        ASSERTF(isfinite(cost[q]), "cluster_hungarian: cost[%zu] = %g, expected finite", q, cost[q]);

    for (int i = 1; i <= n; i++) {
        p[0] = i;
        int j0 = 0;
        for (int j = 0; j <= m; j++) { minv[j] = INFINITY; used[j] = 0; }
        do {
            used[j0] = 1;
            int i0 = p[j0], j1 = 0;
            double delta = INFINITY;
            const double *row = cost + (size_t)(i0 - 1) * m;
            for (int j = 1; j <= m; j++) {
                if (used[j]) continue;
                double cur = row[j - 1] - u[i0] - v[j];
                if (cur < minv[j]) { minv[j] = cur; way[j] = j0; }
                if (minv[j] < delta) { delta = minv[j]; j1 = j; }
            }
            ASSERT(j1 > 0);
            for (int j = 0; j <= m; j++) {
                if (used[j]) { u[p[j]] += delta; v[j] -= delta; }
                else minv[j] -= delta;
            }
            j0 = j1;
        } while (p[j0] != 0);
        do {   /* augment along the path back to the source */
            int j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
        } while (j0 != 0);
    }
    for (int j = 1; j <= m; j++)
        if (p[j] != 0) assign[p[j] - 1] = j - 1;
    xfree(u); xfree(v); xfree(minv); xfree(p); xfree(way); xfree(used);
}

/* ---------------------------------------------------------------- balanced k-means */

/* relabel groups in order of their lowest member (expert 0's group becomes 0, ...) so the
 * output does not depend on the seeding order */
static void canonical_labels(int32_t *group /* [E] */, int E, int G) {
    int32_t *map = xmalloc(sizeof(int32_t) * (size_t)G);
    for (int g = 0; g < G; g++) map[g] = -1;
    int32_t next = 0;
    for (int i = 0; i < E; i++) {
        if (map[group[i]] < 0) map[group[i]] = next++;
        group[i] = map[group[i]];
    }
    xfree(map);
}

/* k-means++: the first centre uniformly, each next one with probability proportional to
 * its squared distance to the nearest chosen centre. c [G, P] out. */
static void seed_plus_plus(const float *z /* [E, P] */, int E, int P, int G, Rng *rng, double *c /* [G, P] */,
                           double *d2 /* [E] scratch */) {
    int first = (int)rng_below(rng, (uint64_t)E);
    for (int k = 0; k < P; k++) c[k] = z[(size_t)first * P + k];
    for (int i = 0; i < E; i++) d2[i] = sq_dist(z + (size_t)i * P, c, P);
    for (int g = 1; g < G; g++) {
        double total = 0;
        for (int i = 0; i < E; i++) total += d2[i];
        int pick = -1;
        if (total > 0) {
            double r = rng_uniform(rng) * total, cum = 0;
            for (int i = 0; i < E; i++) {
                if (d2[i] <= 0) continue;
                cum += d2[i];
                pick = i;              /* last positive row if rounding runs past the end */
                if (cum > r) break;
            }
        } else {
            pick = (int)rng_below(rng, (uint64_t)E);    /* all rows coincide with centres */
        }
        double *cg = c + (size_t)g * P;
        for (int k = 0; k < P; k++) cg[k] = z[(size_t)pick * P + k];
        for (int i = 0; i < E; i++) {
            double d = sq_dist(z + (size_t)i * P, cg, P);
            if (d < d2[i]) d2[i] = d;
        }
    }
}

void cluster_balanced_kmeans(const float *z /* [E, P] */, int E, int P, int G, int n_iter, int n_restarts,
                             Rng *rng, int32_t *group /* [E] */) {
    ASSERTF(G >= 1 && E >= G && E % G == 0, "cluster_balanced_kmeans: G = %d does not divide E = %d", G, E);
    ASSERTF(P >= 0 && rng, "cluster_balanced_kmeans: P = %d", P);
    const int K = E / G;
    if (n_iter < 1) n_iter = 1;          /* one balanced assignment is needed for a valid answer */
    if (n_restarts < 1) n_restarts = 1;
    const int Pc = P > 0 ? P : 1;
    double *c = xmalloc(sizeof(double) * (size_t)G * Pc);             /* [G, P] centroids */
    double *d2 = xmalloc(sizeof(double) * (size_t)E);
    double *dist = xmalloc(sizeof(double) * (size_t)E * G);          /* [E, G] */
    double *slots = xmalloc(sizeof(double) * (size_t)E * E);         /* [E, G*K] */
    int32_t *assign = xmalloc(sizeof(int32_t) * (size_t)E);
    int32_t *cur = xmalloc(sizeof(int32_t) * (size_t)E);
    int32_t *prev = xmalloc(sizeof(int32_t) * (size_t)E);
    double best = INFINITY;

    for (int rs = 0; rs < n_restarts; rs++) {
        seed_plus_plus(z, E, P, G, rng, c, d2);
        for (int it = 0; it < n_iter; it++) {
            for (int i = 0; i < E; i++)
                for (int g = 0; g < G; g++) dist[(size_t)i * G + g] = sq_dist(z + (size_t)i * P, c + (size_t)g * P, P);
            for (int i = 0; i < E; i++)          /* slot s = g*K + t belongs to group g */
                for (int s = 0; s < E; s++) slots[(size_t)i * E + s] = dist[(size_t)i * G + s / K];
            cluster_hungarian(slots, E, E, assign);
            for (int i = 0; i < E; i++) cur[i] = assign[i] / K;
            if (it > 0 && memcmp(cur, prev, sizeof(int32_t) * (size_t)E) == 0) break;
            memcpy(prev, cur, sizeof(int32_t) * (size_t)E);
            group_means(z, E, P, cur, G, c, NULL);
        }
        double cost = cluster_cost(z, E, P, cur, G);
        if (cost < best) {                   /* strict: the earliest restart wins ties */
            best = cost;
            memcpy(group, cur, sizeof(int32_t) * (size_t)E);
        }
    }
    canonical_labels(group, E, G);
    xfree(c); xfree(d2); xfree(dist); xfree(slots); xfree(assign); xfree(cur); xfree(prev);
}

/* ---------------------------------------------------------------- matching and stability */

void cluster_match_ids(const int32_t *old_group /* [E] */, int32_t *new_group /* [E] */, int E, int G) {
    ASSERTF(G >= 1 && E >= 1, "cluster_match_ids: E=%d G=%d", E, G);
    double *cost = xcalloc(sizeof(double) * (size_t)G * G);   /* [old g, new h] = -|old g ∩ new h| */
    int32_t *assign = xmalloc(sizeof(int32_t) * (size_t)G);
    int32_t *map = xmalloc(sizeof(int32_t) * (size_t)G);
    for (int i = 0; i < E; i++) {
        ASSERTF(old_group[i] >= 0 && old_group[i] < G && new_group[i] >= 0 && new_group[i] < G,
                "cluster_match_ids: expert %d has old group %d, new group %d, expected in [0,%d)", i,
                old_group[i], new_group[i], G);
        cost[(size_t)old_group[i] * G + new_group[i]] -= 1.0;
    }
    cluster_hungarian(cost, G, G, assign);
    for (int g = 0; g < G; g++) map[assign[g]] = g;    /* new label assign[g] becomes g */
    for (int i = 0; i < E; i++) new_group[i] = map[new_group[i]];
    xfree(cost); xfree(assign); xfree(map);
}

/* labels are compared as given (group g of a against group g of b): match first */
double cluster_jaccard(const int32_t *a /* [E] */, const int32_t *b /* [E] */, int E, int G) {
    ASSERTF(G >= 1 && E >= 1, "cluster_jaccard: E=%d G=%d", E, G);
    int *inter = xcalloc(sizeof(int) * (size_t)G), *na = xcalloc(sizeof(int) * (size_t)G);
    int *nb = xcalloc(sizeof(int) * (size_t)G);
    for (int i = 0; i < E; i++) {
        ASSERTF(a[i] >= 0 && a[i] < G && b[i] >= 0 && b[i] < G,
                "cluster_jaccard: expert %d has groups %d and %d, expected in [0,%d)", i, a[i], b[i], G);
        na[a[i]]++;
        nb[b[i]]++;
        if (a[i] == b[i]) inter[a[i]]++;
    }
    double s = 0;
    for (int g = 0; g < G; g++) {
        int uni = na[g] + nb[g] - inter[g];
        s += uni > 0 ? (double)inter[g] / uni : 1.0;     /* two empty groups are identical */
    }
    xfree(inter); xfree(na); xfree(nb);
    return s / G;
}

/* ---------------------------------------------------------------- the event */

ClusterResult cluster_update(const float *z /* [E, P] */, int E, int P, int G, double min_gain, int n_iter,
                             int n_restarts, Rng *rng, int32_t *group /* [E] in/out */) {
    ClusterResult res;
    memset(&res, 0, sizeof res);
    int32_t *prop = xmalloc(sizeof(int32_t) * (size_t)E);
    res.cost_old = cluster_cost(z, E, P, group, G);
    cluster_balanced_kmeans(z, E, P, G, n_iter, n_restarts, rng, prop);
    cluster_match_ids(group, prop, E, G);
    res.cost_new = cluster_cost(z, E, P, prop, G);
    res.jaccard = cluster_jaccard(group, prop, E, G);
    res.accepted = (res.cost_old - res.cost_new) > min_gain * res.cost_old;
    if (res.accepted) {
        for (int i = 0; i < E; i++) res.n_moved += prop[i] != group[i];
        memcpy(group, prop, sizeof(int32_t) * (size_t)E);
    }
    xfree(prop);
    return res;
}

void cluster_sketch_add(const float *x, size_t n, uint64_t salt, float *out, int P) {
    for (size_t j = 0; j < n; j++) {
        uint64_t z = (j + salt) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[z % (uint64_t)P] += (z >> 63) ? x[j] : -x[j];
    }
}
