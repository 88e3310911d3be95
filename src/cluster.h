/* cluster: the dual-similarity expert clustering of one MoE layer (DESIGN.md §1.2):
 * fused features z_i = [sqrt(a) w_i/|w_i| ; sqrt(1-a) mu_i/|mu_i|] (squared distance
 * = 2(1 - S), S = a cos(w) + (1-a) cos(mu)), k-means++ (seeded RNG), exact balancing to
 * groups of equal size K = E/G, matching of new group ids to old ones by overlap, the
 * min-gain hysteresis, and the stability measure (Jaccard).
 * Pure functions on caller-owned arrays; deterministic for a given Rng state.
 * Does not: touch model weights (compress.c refits them) or log. */
#ifndef DCMOE_CLUSTER_H
#define DCMOE_CLUSTER_H

#include <stdint.h>
#include "util.h"

typedef struct ClusterResult {
    double cost_old;         /* clustering cost of the old partition on the new features */
    double cost_new;         /* cost of the proposed partition */
    int accepted;            /* 1 if the new partition replaced the old (gain > min_gain) */
    int n_moved;             /* experts whose group changed */
    double jaccard;          /* mean over groups of |old ∩ new| / |old ∪ new| after matching */
} ClusterResult;

/* build fused features: w [E, Pw] parameter features, mu [E, Pm] activation centroids,
 * alpha in [0,1]; z out [E, Pw + Pm]. Zero-norm rows stay zero. */
void cluster_fuse_features(const float *w, int Pw, const float *mu, int Pm, int E, double alpha, float *z);

/* clustering cost of an assignment: sum over experts of squared distance of z_i to its
 * group's mean, divided by E (group[i] in [0,G)) */
double cluster_cost(const float *z, int E, int P, const int32_t *group, int G);

/* balanced k-means: k-means++ seeding then Lloyd iterations where each assignment step is
 * an exact balanced assignment (every group gets exactly E/G experts: min-cost assignment of
 * experts to G*K slots). n_restarts keeps the best. group out [E]. */
void cluster_balanced_kmeans(const float *z, int E, int P, int G, int n_iter, int n_restarts,
                             Rng *rng, int32_t *group);

/* relabel new groups to maximise overlap with old ones (optimal matching on the GxG overlap
 * matrix), in place */
void cluster_match_ids(const int32_t *old_group, int32_t *new_group, int E, int G);

/* mean Jaccard similarity of matched groups */
double cluster_jaccard(const int32_t *a, const int32_t *b, int E, int G);

/* the whole event: propose a partition from z, match ids to `group` (in/out), and accept it
 * only if (cost_old - cost_new) > min_gain * cost_old. Returns what happened. */
ClusterResult cluster_update(const float *z, int E, int P, int G, double min_gain, int n_iter,
                             int n_restarts, Rng *rng, int32_t *group);

/* minimum-cost assignment (Hungarian, O(n^3)) on an n x m cost matrix, n <= m;
 * assign[i] = column of row i. Exposed for tests and placement. */
void cluster_hungarian(const double *cost, int n, int m, int32_t *assign);

/* count-sketch projection of x[n] into out[P] (+=): coordinate j (+ salt) goes to bucket h(j)
 * with sign s(j), both from a fixed hash, so the projection is the same on every rank and call
 * (the parameter features of re-clustering and of the compression event) */
void cluster_sketch_add(const float *x, size_t n, uint64_t salt, float *out, int P);

#endif
