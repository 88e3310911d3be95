/* test_compress_event: positive controls of the compression event's partition and refit
 * (compress_event.c), on synthetic experts without a model. 32 experts are built as 4
 * planted clusters (a random centre per cluster plus small noise), assigned to the clusters
 * in a scrambled order (the contiguous partition is wrong), with a co-activation matrix
 * consistent with them. Checks: the learned partition recovers the planted one exactly
 * (every pair of experts is together in one iff in the other: permutation invariant), from
 * the fused features, from the weights alone (alpha 1) and from the co-activation alone
 * (alpha 0, with weights that carry no cluster signal); the random partition is seeded,
 * balanced and does not recover it; the learned partition's refit error is far below the
 * random and contiguous ones and close to the planted noise; the base is the member mean;
 * the intra-group co-selection fraction of any balanced partition under uniform
 * co-activation is (K-1)/(E-1) = 7/31, and 1 for the planted partition under planted
 * co-activation. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "compress_event.h"
#include "config.h"
#include "harness.h"

enum { E = 32, G = 4, K = 8, D = 16, F = 16, R = 4 };

/* every pair (i, j): together in a iff together in b */
static int same_partition(const int32_t *a, const int32_t *b) {
    for (int i = 0; i < E; i++)
        for (int j = i + 1; j < E; j++)
            if ((a[i] == a[j]) != (b[i] == b[j])) return 0;
    return 1;
}

/* mean Jaccard of the groups of a against b after the best matching of group ids */
static double matched_jaccard(const int32_t *a, const int32_t *b) {
    int32_t c[E];
    memcpy(c, a, sizeof c);
    cluster_match_ids(b, c, E, G);
    return cluster_jaccard(c, b, E, G);
}

static int balanced(const int32_t *g) {
    int cnt[G] = {0};
    for (int i = 0; i < E; i++) {
        if (g[i] < 0 || g[i] >= G) return 0;
        cnt[g[i]]++;
    }
    for (int q = 0; q < G; q++) if (cnt[q] != K) return 0;
    return 1;
}

static double mean_err(const float *W1, const float *W2, const int32_t *part, const ClusterConfig *cc) {
    size_t n1 = (size_t)D * F, n2 = (size_t)F * D;
    float *b1 = malloc(sizeof(float) * G * n1), *b2 = malloc(sizeof(float) * G * n2);
    float *a1 = malloc(sizeof(float) * E * D * R), *c1 = malloc(sizeof(float) * E * F * R);
    float *a2 = malloc(sizeof(float) * E * F * R), *c2 = malloc(sizeof(float) * E * D * R);
    double werr[E], m = 0;
    compress_refit_layer(W1, W2, E, D, F, F, R, G, part, cc, 5, 0, RNG_CLUSTER + 8, NULL, NULL, b1, b2, a1, c1, a2, c2, werr);
    for (int i = 0; i < E; i++) m += werr[i] / E;
    free(b1); free(b2); free(a1); free(c1); free(a2); free(c2);
    return m;
}

int main(void) {
    Config cfg;
    config_defaults(&cfg);
    ClusterConfig cc = cfg.clustering;
    cc.proj_dim = 64;
    cc.svd = SVD_KIND_EXACT;
    size_t n1 = (size_t)D * F, n2 = (size_t)F * D;
    Rng rng;
    rng_init(&rng, 123, 0, RNG_TEST);
    /* planted: expert i belongs to cluster planted[i] (a scrambled balanced assignment) */
    int32_t planted[E], perm[E];
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) { int j = (int)rng_below(&rng, (uint64_t)i + 1); int t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
    for (int p = 0; p < E; p++) planted[perm[p]] = p / K;
    int32_t contig[E];
    for (int i = 0; i < E; i++) contig[i] = i / K;
    ok(!same_partition(planted, contig), "the planted partition is not the contiguous one");
    float *C1 = malloc(sizeof(float) * G * n1), *C2 = malloc(sizeof(float) * G * n2);
    for (size_t q = 0; q < G * n1; q++) C1[q] = rng_normal(&rng);
    for (size_t q = 0; q < G * n2; q++) C2[q] = rng_normal(&rng);
    const float noise = 0.05f;
    float *W1 = malloc(sizeof(float) * E * n1), *W2 = malloc(sizeof(float) * E * n2);
    float *U1 = malloc(sizeof(float) * E * n1), *U2 = malloc(sizeof(float) * E * n2);   /* no cluster signal */
    for (int i = 0; i < E; i++) {
        for (size_t q = 0; q < n1; q++) W1[i * n1 + q] = C1[planted[i] * n1 + q] + noise * rng_normal(&rng);
        for (size_t q = 0; q < n2; q++) W2[i * n2 + q] = C2[planted[i] * n2 + q] + noise * rng_normal(&rng);
        for (size_t q = 0; q < n1; q++) U1[i * n1 + q] = rng_normal(&rng);
        for (size_t q = 0; q < n2; q++) U2[i * n2 + q] = rng_normal(&rng);
    }
    /* co-activation consistent with the clusters (plus weak noise), selection counts */
    double coact[E * E], cnt[E], uniform[E * E];
    for (int i = 0; i < E; i++) {
        cnt[i] = 0.0625 * (1 + 0.1 * rng_uniform(&rng));
        for (int j = 0; j < E; j++) uniform[i * E + j] = i == j ? 0 : 1;
    }
    for (int i = 0; i < E; i++)
        for (int j = i; j < E; j++) {
            double v = i == j ? 0 : (planted[i] == planted[j] ? 0.01 : 0.0005) * (1 + 0.2 * rng_uniform(&rng));
            coact[i * E + j] = coact[j * E + i] = v;
        }

    int32_t learned[E], w_only[E], c_only[E], random1[E], random2[E], random3[E];
    cc.compress_partition = COMPRESS_LEARNED;
    cc.alpha = 0.6;
    compress_partition(W1, W2, E, n1, n2, coact, cnt, G, &cc, 7, 0, learned);
    ok(balanced(learned), "learned partition is balanced (%d groups of %d)", G, K);
    double jl = matched_jaccard(learned, planted);
    ok(same_partition(learned, planted) && jl == 1.0,
       "learned partition (alpha 0.6) recovers the planted clusters (matched Jaccard %.3f)", jl);
    cc.alpha = 1.0;
    compress_partition(W1, W2, E, n1, n2, coact, cnt, G, &cc, 7, 0, w_only);
    ok(same_partition(w_only, planted), "weight features alone (alpha 1) recover the planted clusters");
    cc.alpha = 0.0;
    compress_partition(U1, U2, E, n1, n2, coact, cnt, G, &cc, 7, 0, c_only);
    ok(same_partition(c_only, planted), "co-activation alone (alpha 0, unclustered weights) recovers the planted clusters");
    cc.alpha = 1.0;
    compress_partition(U1, U2, E, n1, n2, coact, cnt, G, &cc, 7, 0, c_only);
    ok(!same_partition(c_only, planted), "unclustered weights alone (alpha 1) do not recover them (control)");
    cc.alpha = 0.6;

    cc.compress_partition = COMPRESS_RANDOM;
    compress_partition(W1, W2, E, n1, n2, coact, cnt, G, &cc, 7, 0, random1);
    compress_partition(W1, W2, E, n1, n2, coact, cnt, G, &cc, 7, 0, random2);
    compress_partition(W1, W2, E, n1, n2, coact, cnt, G, &cc, 8, 0, random3);
    ok(balanced(random1), "random partition is balanced");
    ok(memcmp(random1, random2, sizeof random1) == 0, "random partition is seeded (same seed, same partition)");
    ok(!same_partition(random1, random3), "random partition changes with the seed");
    double jr = matched_jaccard(random1, planted);
    ok(!same_partition(random1, planted) && jr < 0.6, "random partition does not recover the planted one (Jaccard %.3f)", jr);
    cc.compress_partition = COMPRESS_CONTIGUOUS;
    int32_t cont[E];
    compress_partition(W1, W2, E, n1, n2, coact, cnt, G, &cc, 7, 0, cont);
    ok(memcmp(cont, contig, sizeof cont) == 0, "contiguous partition: expert i in group i / K");

    /* refit error: learned << random, contiguous; close to the planted noise */
    double el = mean_err(W1, W2, learned, &cc), er = mean_err(W1, W2, random1, &cc), ec = mean_err(W1, W2, contig, &cc);
    printf("# refit relative error: learned %.4f, random %.4f, contiguous %.4f\n", el, er, ec);
    ok(el < 0.2 * er && el < 0.2 * ec, "learned partition's refit error (%.4f) far below random (%.4f) and contiguous "
       "(%.4f)", el, er, ec);
    ok(el < 0.05, "learned partition's refit error (%.4f) at the planted noise level (noise/centre ~ %.2f)", el, noise);

    /* the base is the member mean; factors reconstruct the residual of rank <= R */
    {
        float *b1 = malloc(sizeof(float) * G * n1), *b2 = malloc(sizeof(float) * G * n2);
        float *a1 = malloc(sizeof(float) * E * D * R), *c1 = malloc(sizeof(float) * E * F * R);
        float *a2 = malloc(sizeof(float) * E * F * R), *c2 = malloc(sizeof(float) * E * D * R);
        double werr[E], worst = 0;
        compress_refit_layer(W1, W2, E, D, F, F, R, G, learned, &cc, 5, 0, RNG_CLUSTER + 8, NULL, NULL, b1, b2, a1, c1, a2, c2, werr);
        for (int g = 0; g < G; g++)
            for (size_t q = 0; q < n1; q++) {
                double s = 0;
                for (int i = 0; i < E; i++) if (learned[i] == g) s += W1[i * n1 + q];
                double d = fabs(s / K - b1[g * n1 + q]);
                if (d > worst) worst = d;
            }
        ok(worst < 1e-5, "base1 of every group is the member mean (max diff %.2e)", worst);
        free(b1); free(b2); free(a1); free(c1); free(a2); free(c2);
    }

    /* co-selection fraction */
    double fu = compress_coselect_fraction(uniform, E, random1), fc = compress_coselect_fraction(uniform, E, contig);
    ok(fabs(fu - 7.0 / 31) < 1e-12 && fabs(fc - 7.0 / 31) < 1e-12,
       "uniform co-activation: intra-group fraction %.4f / %.4f = 7/31 for any balanced partition", fu, fc);
    double fp = compress_coselect_fraction(coact, E, planted), fr = compress_coselect_fraction(coact, E, random1);
    double want = 0;
    {
        double in = 0, all = 0;
        for (int i = 0; i < E; i++)
            for (int j = i + 1; j < E; j++) { all += coact[i * E + j]; if (planted[i] == planted[j]) in += coact[i * E + j]; }
        want = in / all;
    }
    ok(fabs(fp - want) < 1e-12 && fp > 0.8 && fr < fp, "planted co-activation: fraction %.4f for the planted partition "
       "(direct sum %.4f), %.4f for the random one", fp, want, fr);
    free(C1); free(C2); free(W1); free(W2); free(U1); free(U2);
    return harness_done();
}
