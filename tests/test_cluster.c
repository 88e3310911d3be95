/* test_cluster: the Hungarian algorithm against brute force (square and rectangular), fused
 * features (squared distance = 2(1 - S) checked against the cosines), balanced k-means
 * (exactly K per group for many (E, G), recovery of planted clusters, determinism), id
 * matching (a permuted labelling, and optimality against all G! relabelings), Jaccard on a
 * hand case, and the min-gain event (accept, then reject on unchanged features).
 * Legend: E G K P = experts, groups, experts per group, feature width. */
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "harness.h"

/* ---------------------------------------------------------------- Hungarian */

/* minimum over all injections rows -> columns (recursive enumeration) */
static double brute_rec(const double *cost, int n, int m, int row, char *used) {
    if (row == n) return 0;
    double best = INFINITY;
    for (int j = 0; j < m; j++) {
        if (used[j]) continue;
        used[j] = 1;
        double c = cost[(size_t)row * m + j] + brute_rec(cost, n, m, row + 1, used);
        used[j] = 0;
        if (c < best) best = c;
    }
    return best;
}

static void test_hungarian(void) {
    Rng rng;
    rng_init(&rng, 11, 0, RNG_TEST);
    double cost[49];
    int32_t assign[7];
    char used[7];
    int n_cases = 0, n_bad = 0, n_invalid = 0;
    for (int trial = 0; trial < 300; trial++) {
        int n = 1 + (int)rng_below(&rng, 7);
        int m = n + (int)rng_below(&rng, (uint64_t)(8 - n));      /* n <= m <= 7 */
        int integer = trial % 3 == 0;                              /* integer costs: many ties */
        for (int q = 0; q < n * m; q++)
            cost[q] = integer ? (double)rng_below(&rng, 5) - 2.0 : rng_uniform(&rng) * 10.0 - 5.0;
        cluster_hungarian(cost, n, m, assign);
        memset(used, 0, sizeof used);
        double got = 0;
        int valid = 1;
        for (int i = 0; i < n; i++) {
            if (assign[i] < 0 || assign[i] >= m || used[assign[i]]) { valid = 0; break; }
            used[assign[i]] = 1;
            got += cost[(size_t)i * m + assign[i]];
        }
        memset(used, 0, sizeof used);
        double want = brute_rec(cost, n, m, 0, used);
        n_cases++;
        if (!valid) n_invalid++;
        else if (fabs(got - want) > 1e-9) {
            if (n_bad < 3) printf("#   n=%d m=%d got %.9g want %.9g\n", n, m, got, want);
            n_bad++;
        }
    }
    ok(n_invalid == 0, "hungarian: every assignment is an injection (%d cases)", n_cases);
    ok(n_bad == 0, "hungarian: optimal cost equals brute force on %d random n<=m<=7 cases (%d wrong)",
       n_cases, n_bad);

    /* a 1 x m row picks its cheapest column, lowest index on a tie */
    double row[4] = {3, 1, 1, 2};
    cluster_hungarian(row, 1, 4, assign);
    ok(assign[0] == 1, "hungarian: 1x4 picks the lowest-index minimum (got %d)", assign[0]);
}

/* ---------------------------------------------------------------- fused features */

static double cosine(const float *a, const float *b, int n) {
    double ab = 0, aa = 0, bb = 0;
    for (int k = 0; k < n; k++) { ab += (double)a[k] * b[k]; aa += (double)a[k] * a[k]; bb += (double)b[k] * b[k]; }
    return ab / sqrt(aa * bb);
}

static void test_fuse(void) {
    enum { E = 6, PW = 40, PM = 8 };
    Rng rng;
    rng_init(&rng, 12, 0, RNG_TEST);
    float w[E * PW], mu[E * PM], z[E * (PW + PM)];
    for (int q = 0; q < E * PW; q++) w[q] = rng_normal(&rng) * 3.0f;
    for (int q = 0; q < E * PM; q++) mu[q] = rng_normal(&rng) + 0.5f;
    const double alphas[3] = {0.6, 0.0, 1.0};
    for (int ai = 0; ai < 3; ai++) {
        double alpha = alphas[ai];
        cluster_fuse_features(w, PW, mu, PM, E, alpha, z);
        double got[E * E], want[E * E];
        for (int i = 0; i < E; i++)
            for (int j = 0; j < E; j++) {
                double d2 = 0;
                for (int k = 0; k < PW + PM; k++) {
                    double d = (double)z[i * (PW + PM) + k] - z[j * (PW + PM) + k];
                    d2 += d * d;
                }
                double S = alpha * cosine(w + i * PW, w + j * PW, PW) + (1 - alpha) * cosine(mu + i * PM, mu + j * PM, PM);
                got[i * E + j] = d2;
                want[i * E + j] = 2 * (1 - S);
            }
        char what[64];
        snprintf(what, sizeof what, "fuse: |z_i - z_j|^2 = 2(1-S), alpha=%.1f", alpha);
        close_enough(what, got, want, E * E, 1e-5, 1e-5);
    }
    /* a zero row stays zero */
    memset(w, 0, sizeof(float) * PW);
    memset(mu, 0, sizeof(float) * PM);
    cluster_fuse_features(w, PW, mu, PM, E, 0.6, z);
    int all_zero = 1;
    for (int k = 0; k < PW + PM; k++) all_zero &= z[k] == 0.0f;
    ok(all_zero, "fuse: a zero-norm expert gets a zero feature row");
}

/* ---------------------------------------------------------------- balanced k-means */

static int counts_exact(const int32_t *group, int E, int G) {
    int n[64] = {0};
    for (int i = 0; i < E; i++) {
        if (group[i] < 0 || group[i] >= G) return 0;
        n[group[i]]++;
    }
    for (int g = 0; g < G; g++)
        if (n[g] != E / G) return 0;
    return 1;
}

static void test_balanced_sizes(void) {
    const int combos[5][2] = {{32, 4}, {32, 8}, {16, 2}, {12, 3}, {32, 1}};
    Rng rng;
    rng_init(&rng, 13, 0, RNG_TEST);
    for (int c = 0; c < 5; c++) {
        int E = combos[c][0], G = combos[c][1], n_bad = 0, n_trials = 40;
        for (int t = 0; t < n_trials; t++) {
            int P = 1 + (int)rng_below(&rng, 24);
            float *z = malloc(sizeof(float) * (size_t)E * P);
            int32_t group[32];
            /* skewed features: most experts in one blob, so unbalanced k-means would not be balanced */
            for (int q = 0; q < E * P; q++) z[q] = rng_normal(&rng) * (q < P ? 20.0f : 1.0f);
            cluster_balanced_kmeans(z, E, P, G, 20, 1 + t % 3, &rng, group);
            if (!counts_exact(group, E, G)) n_bad++;
            free(z);
        }
        ok(n_bad == 0, "kmeans: E=%d G=%d gives exactly K=%d per group in %d/%d random trials", E, G, E / G,
           n_trials - n_bad, n_trials);
    }
}

/* planted: G well-separated centres, K noisy copies each, expert order shuffled */
static void planted(Rng *rng, int E, int P, int G, double noise, float *z, int32_t *truth) {
    int K = E / G;
    float *centre = malloc(sizeof(float) * (size_t)G * P);
    for (int q = 0; q < G * P; q++) centre[q] = rng_normal(rng) * 3.0f;
    int *perm = malloc(sizeof(int) * (size_t)E);
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)rng_below(rng, (uint64_t)(i + 1));
        int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
    for (int s = 0; s < E; s++) {
        int i = perm[s], g = s / K;
        truth[i] = g;
        for (int k = 0; k < P; k++) z[(size_t)i * P + k] = centre[(size_t)g * P + k] + (float)noise * rng_normal(rng);
    }
    free(centre);
    free(perm);
}

static void test_planted(void) {
    const int combos[4][2] = {{32, 4}, {32, 8}, {16, 2}, {12, 3}};
    Rng rng;
    rng_init(&rng, 14, 0, RNG_TEST);
    enum { P = 16 };
    for (int c = 0; c < 4; c++) {
        int E = combos[c][0], G = combos[c][1], n_exact = 0, n_trials = 10;
        for (int t = 0; t < n_trials; t++) {
            float z[32 * P];
            int32_t truth[32], got[32];
            planted(&rng, E, P, G, 0.2, z, truth);
            cluster_balanced_kmeans(z, E, P, G, 50, 3, &rng, got);
            cluster_match_ids(truth, got, E, G);
            n_exact += memcmp(truth, got, sizeof(int32_t) * (size_t)E) == 0;
        }
        ok(n_exact == n_trials, "kmeans: planted clusters E=%d G=%d recovered exactly in %d/%d trials", E, G,
           n_exact, n_trials);
    }

    /* determinism: same Rng state, same answer */
    float z[32 * P];
    int32_t truth[32], a[32], b[32];
    planted(&rng, 32, P, 8, 1.5, z, truth);    /* heavy noise: a non-trivial optimum */
    Rng r1, r2;
    rng_init(&r1, 99, 0, RNG_CLUSTER);
    r2 = r1;
    cluster_balanced_kmeans(z, 32, P, 8, 30, 4, &r1, a);
    cluster_balanced_kmeans(z, 32, P, 8, 30, 4, &r2, b);
    ok(memcmp(a, b, sizeof a) == 0 && memcmp(&r1, &r2, sizeof r1) == 0, "kmeans: deterministic for a given Rng state");
    ok(a[0] == 0, "kmeans: labels are canonical (expert 0 in group 0)");

    /* more restarts never give a higher cost than the first restart alone */
    Rng r3 = r2, r4 = r2;
    cluster_balanced_kmeans(z, 32, P, 8, 30, 1, &r3, a);
    cluster_balanced_kmeans(z, 32, P, 8, 30, 6, &r4, b);
    double c1 = cluster_cost(z, 32, P, a, 8), c6 = cluster_cost(z, 32, P, b, 8);
    ok(c6 <= c1, "kmeans: 6 restarts cost %.6g <= 1 restart cost %.6g", c6, c1);
}

/* ---------------------------------------------------------------- cost, matching, Jaccard */

static void test_cost(void) {
    /* E=4, P=1, two groups {0,1} and {2,3}: z = 0, 2, 10, 14 -> means 1, 12 ->
     * squared distances 1 1 4 4 -> cost 10/4 */
    float z[4] = {0, 2, 10, 14};
    int32_t g[4] = {0, 0, 1, 1};
    double c = cluster_cost(z, 4, 1, g, 2);
    ok(fabs(c - 2.5) < 1e-12, "cost: hand case 2.5 (got %.12g)", c);
}

static void test_match_jaccard(void) {
    Rng rng;
    rng_init(&rng, 15, 0, RNG_TEST);
    enum { E = 32, G = 8 };
    int32_t old[E], neu[E];
    for (int i = 0; i < E; i++) old[i] = i % G;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)rng_below(&rng, (uint64_t)(i + 1));
        int32_t t = old[i]; old[i] = old[j]; old[j] = t;
    }
    int perm[G];
    for (int g = 0; g < G; g++) perm[g] = (g * 5 + 3) % G;       /* a derangement-ish relabeling */
    for (int i = 0; i < E; i++) neu[i] = perm[old[i]];
    double before = cluster_jaccard(old, neu, E, G);
    cluster_match_ids(old, neu, E, G);
    ok(memcmp(old, neu, sizeof old) == 0, "match: a permuted labelling is mapped back exactly");
    double after = cluster_jaccard(old, neu, E, G);
    ok(fabs(after - 1.0) < 1e-15 && before < 1.0, "jaccard: %.3f before matching, %.3f after", before, after);

    /* hand case: a = {0,1}{2,3}, b = {0,2}{1,3} -> 1/3 for both groups */
    int32_t a4[4] = {0, 0, 1, 1}, b4[4] = {0, 1, 0, 1};
    double j4 = cluster_jaccard(a4, b4, 4, 2);
    ok(fabs(j4 - 1.0 / 3.0) < 1e-15, "jaccard: hand case 1/3 (got %.6f)", j4);

    /* optimality: matched overlap equals the best over all 4! relabelings */
    enum { E2 = 16, G2 = 4 };
    int n_bad = 0;
    for (int t = 0; t < 50; t++) {
        int32_t x[E2], y[E2], ym[E2];
        for (int i = 0; i < E2; i++) { x[i] = (int32_t)rng_below(&rng, G2); y[i] = (int32_t)rng_below(&rng, G2); }
        memcpy(ym, y, sizeof y);
        cluster_match_ids(x, ym, E2, G2);
        int got = 0, best = 0;
        for (int i = 0; i < E2; i++) got += x[i] == ym[i];
        int p[4] = {0, 1, 2, 3};
        /* all 24 permutations via Heap's algorithm (iterative) */
        int cnt[4] = {0, 0, 0, 0}, k = 1;
        for (;;) {
            int o = 0;
            for (int i = 0; i < E2; i++) o += x[i] == p[y[i]];
            if (o > best) best = o;
            while (k < 4 && cnt[k] >= k) cnt[k++] = 0;
            if (k >= 4) break;
            int s = (k % 2) ? cnt[k] : 0;
            int tmp = p[s]; p[s] = p[k]; p[k] = tmp;
            cnt[k]++;
            k = 1;
        }
        /* the relabeling must also be a bijection of labels */
        int seen[G2][G2];
        memset(seen, 0, sizeof seen);
        int bij = 1;
        for (int i = 0; i < E2; i++) seen[y[i]][ym[i]] = 1;
        for (int g = 0; g < G2; g++) {
            int n_img = 0;
            for (int h = 0; h < G2; h++) n_img += seen[g][h];
            if (n_img > 1) bij = 0;
        }
        if (got != best || !bij) n_bad++;
    }
    ok(n_bad == 0, "match: overlap after matching equals the best of all 4! relabelings (50 random cases, %d bad)",
       n_bad);
}

/* ---------------------------------------------------------------- the event */

static void test_update(void) {
    Rng rng;
    rng_init(&rng, 16, 0, RNG_TEST);
    enum { E = 32, G = 8, P = 24 };
    float z[E * P];
    int32_t truth[E], group[E], before[E];
    planted(&rng, E, P, G, 0.5, z, truth);
    for (int i = 0; i < E; i++) group[i] = i / (E / G);          /* contiguous start */
    memcpy(before, group, sizeof group);
    Rng crng;
    rng_init(&crng, 7, 0, RNG_CLUSTER);

    ClusterResult r1 = cluster_update(z, E, P, G, 0.02, 50, 4, &crng, group);
    int moved = 0;
    for (int i = 0; i < E; i++) moved += before[i] != group[i];
    ok(r1.accepted == 1, "update 1: accepted (cost %.4f -> %.4f)", r1.cost_old, r1.cost_new);
    ok(r1.cost_new <= r1.cost_old, "update 1: accepted cost <= old cost");
    ok(r1.n_moved == moved && moved > 0, "update 1: n_moved = %d matches the %d changed experts", r1.n_moved, moved);
    ok(counts_exact(group, E, G), "update 1: balanced");
    ok(fabs(r1.cost_old - cluster_cost(z, E, P, before, G)) < 1e-12 &&
       fabs(r1.cost_new - cluster_cost(z, E, P, group, G)) < 1e-12, "update 1: reported costs are cluster_cost");
    ok(r1.jaccard < 1.0 && fabs(r1.jaccard - cluster_jaccard(before, group, E, G)) < 1e-15,
       "update 1: jaccard %.3f is old vs new", r1.jaccard);
    int32_t m[E];
    memcpy(m, group, sizeof m);
    cluster_match_ids(truth, m, E, G);
    ok(memcmp(m, truth, sizeof m) == 0, "update 1: found the planted partition");
    /* matching to the old ids: the new labels overlap the old ones at least as well as any relabeling;
     * matching once more must be the identity */
    int32_t again[E];
    memcpy(again, group, sizeof again);
    cluster_match_ids(before, again, E, G);
    ok(memcmp(again, group, sizeof again) == 0, "update 1: ids already matched to the old ones");

    memcpy(before, group, sizeof group);
    ClusterResult r2 = cluster_update(z, E, P, G, 0.02, 50, 4, &crng, group);
    ok(r2.accepted == 0 && r2.n_moved == 0, "update 2 (unchanged features): accepted=%d n_moved=%d", r2.accepted,
       r2.n_moved);
    ok(memcmp(before, group, sizeof group) == 0, "update 2: partition unchanged");
    ok(fabs(r2.jaccard - 1.0) < 1e-15, "update 2: jaccard %.3f", r2.jaccard);

    /* min_gain = 1 can never be met: rejected, unchanged, but cost_new and jaccard are still reported */
    for (int i = 0; i < E; i++) group[i] = i / (E / G);
    memcpy(before, group, sizeof group);
    ClusterResult r3 = cluster_update(z, E, P, G, 1.0, 50, 4, &crng, group);
    ok(r3.accepted == 0 && r3.n_moved == 0 && memcmp(before, group, sizeof group) == 0,
       "update min_gain=1: rejected, group unchanged, n_moved=0");
    ok(r3.cost_new < r3.cost_old && r3.jaccard < 1.0,
       "update min_gain=1: proposal still measured (cost %.4f -> %.4f, jaccard %.3f)", r3.cost_old, r3.cost_new,
       r3.jaccard);

    /* random (structureless) features: whatever is decided follows the rule exactly */
    int n_bad = 0, n_acc = 0;
    for (int t = 0; t < 20; t++) {
        for (int q = 0; q < E * P; q++) z[q] = rng_normal(&rng);
        for (int i = 0; i < E; i++) group[i] = (int32_t)(i % G);
        for (int rep = 0; rep < 2; rep++) {
            memcpy(before, group, sizeof group);
            ClusterResult r = cluster_update(z, E, P, G, 0.02, 30, 3, &crng, group);
            int rule = (r.cost_old - r.cost_new) > 0.02 * r.cost_old;
            int mv = 0;
            for (int i = 0; i < E; i++) mv += before[i] != group[i];
            n_acc += r.accepted;
            if (r.accepted != rule || r.n_moved != mv || (!r.accepted && mv != 0) || !counts_exact(group, E, G) ||
                cluster_cost(z, E, P, group, G) > r.cost_old + 1e-12)
                n_bad++;
        }
    }
    ok(n_bad == 0, "update on random features: decisions follow the min-gain rule (%d/40 accepted)", n_acc);
}

int main(void) {
    test_hungarian();
    test_fuse();
    test_cost();
    test_balanced_sizes();
    test_planted();
    test_match_jaccard();
    test_update();
    return harness_done();
}
