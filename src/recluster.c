/* recluster.c: centroid EMA, features, the clustering event and the refit.
 * Legend: E G K D F F1 r Pw Pm = experts, groups, experts/group, d_model, expert width,
 * F or 2F, residual rank, parameter-feature dims, centroid dims. */
#include "recluster.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compress.h"

long recluster_warmup(const Config *cfg) {
    return cfg->clustering.warmup >= 0 ? cfg->clustering.warmup : cfg->train.steps / 10;
}

void recluster_mu_step(Model *m) {
    double beta = m->cfg.clustering.ema_beta;
    for (int l = 0; l < m->L; l++) {
        MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        ClusterState *cs = &m->cstate[l];
        int Pm = cs->mu_dim;
        size_t n = (size_t)f->E * (Pm + 1);
        comm_allreduce_sum_f64(m->comm, cs->mu_sum_store, n);
        for (int i = 0; i < f->E; i++) {
            const double *row = cs->mu_sum_store + (size_t)i * (Pm + 1);
            if (row[Pm] <= 0) continue;
            float *mu = cs->mu + (size_t)i * Pm;
            for (int j = 0; j < Pm; j++) {
                double mean = row[j] / row[Pm];
                mu[j] = cs->mu_seen[i] ? (float)((1 - beta) * mu[j] + beta * mean) : (float)mean;
            }
            cs->mu_seen[i] = 1;
        }
        memset(cs->mu_sum_store, 0, sizeof(double) * n);
    }
}

/* count-sketch projection of x[n] into out[P] (+=): coordinate j goes to bucket h(j) with
 * sign s(j), both from a fixed hash, so the projection is the same on every rank and call */
static void sketch_add(const float *x, size_t n, uint64_t salt, float *out, int P) {
    for (size_t j = 0; j < n; j++) {
        uint64_t z = (j + salt) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[z % (uint64_t)P] += (z >> 63) ? x[j] : -x[j];
    }
}

/* one clustered layer's tensors in the canonical (all-experts) arrays gathered from every
 * rank: parameters and the two Adam moments */
typedef struct LayerHost { float *base1, *base2, *a1, *b1, *a2, *b2; } LayerHost;
typedef struct FullArrays { float *p, *m, *v; } FullArrays;

static LayerHost layer_view(const Model *m, float *full, int l) {
    float *v[6];
    int n = 0;
    for (int i = 0; i < m->n_tensors && n < 6; i++)
        if (m->tensors[i].layer == l && m->tensors[i].ep_unit) v[n++] = full + m->tensors[i].full_offset;
    ASSERTF(n == 6, "layer %d: expected 6 clustered expert tensors, found %d", l, n);
    LayerHost h = {v[0], v[1], v[2], v[3], v[4], v[5]};
    return h;
}

/* zero the Adam moments of the n elements at param_view (a view into fa->p) */
static void reset_adam(const FullArrays *fa, const float *param_view, size_t n) {
    size_t off = (size_t)(param_view - fa->p);
    memset(fa->m + off, 0, sizeof(float) * n);
    memset(fa->v + off, 0, sizeof(float) * n);
}

typedef struct ErrStats { double sum, max; int n, rc; } ErrStats;

/* refit one weight kind (m x n matrices) of a group with members mem[K]: W [E, m, n] holds
 * every expert's reconstructed matrix; the new base goes to base [m, n], each member's factors
 * to a_all [E, m, r] and b_all [E, n, r]; Wg, A, Bf, err are scratch */
static void refit_matrix(const float *W, const int32_t *mem, int K, int m, int n, int r, const ClusterConfig *cc,
                         Rng *rng, float *base, float *a_all, float *b_all, float *Wg, float *A, float *Bf,
                         double *err, ErrStats *es) {
    size_t mn = (size_t)m * n;
    for (int q = 0; q < K; q++) memcpy(Wg + (size_t)q * mn, W + (size_t)mem[q] * mn, sizeof(float) * mn);
    int method = cc->svd == SVD_KIND_EXACT ? SVD_EXACT : SVD_RANDOMIZED;
    es->rc = compress_refit_group(Wg, K, m, n, r, method, cc->svd_oversample, cc->svd_power_iters, rng, base, A, Bf, err);
    if (es->rc) return;
    for (int q = 0; q < K; q++) {
        memcpy(a_all + (size_t)mem[q] * m * r, A + (size_t)q * m * r, sizeof(float) * m * r);
        memcpy(b_all + (size_t)mem[q] * n * r, Bf + (size_t)q * n * r, sizeof(float) * n * r);
        es->sum += err[q];
        es->n++;
        if (err[q] > es->max) es->max = err[q];
    }
}

static int layer_event(Model *m, int l, long step, ReclusterEvent *ev, const FullArrays *fa) {
    MoeLayer *f = &m->ffn[l];
    ClusterState *cs = &m->cstate[l];
    const ClusterConfig *cc = &m->cfg.clustering;
    int E = f->E, G = f->G, K = f->K, D = f->D, F = f->F, F1 = f->F1, r = f->r, Pm = cs->mu_dim;
    double t0 = time_now();
    memset(ev, 0, sizeof *ev);
    ev->layer = l;
    LayerHost h = layer_view(m, fa->p, l);
    size_t n1 = (size_t)D * F1, n2 = (size_t)F * D;
    /* reconstructed weights of every expert under the current grouping */
    float *W1 = xmalloc(sizeof(float) * E * n1), *W2 = xmalloc(sizeof(float) * E * n2);
    for (int i = 0; i < E; i++) {
        int g = cs->group_of[i];
        compress_reconstruct(h.base1 + (size_t)g * n1, h.a1 + (size_t)i * D * r, h.b1 + (size_t)i * F1 * r, D, F1, r, W1 + (size_t)i * n1);
        compress_reconstruct(h.base2 + (size_t)g * n2, h.a2 + (size_t)i * F * r, h.b2 + (size_t)i * D * r, F, D, r, W2 + (size_t)i * n2);
    }
    /* parameter features */
    int Pw = cc->proj_dim > 0 ? cc->proj_dim : (int)(n1 + n2);
    float *w = xcalloc(sizeof(float) * (size_t)E * Pw);
    for (int i = 0; i < E; i++) {
        if (cc->proj_dim > 0) {
            sketch_add(W1 + (size_t)i * n1, n1, 0, w + (size_t)i * Pw, Pw);
            sketch_add(W2 + (size_t)i * n2, n2, n1, w + (size_t)i * Pw, Pw);
        } else {
            memcpy(w + (size_t)i * Pw, W1 + (size_t)i * n1, sizeof(float) * n1);
            memcpy(w + (size_t)i * Pw + n1, W2 + (size_t)i * n2, sizeof(float) * n2);
        }
    }
    float *z = xmalloc(sizeof(float) * (size_t)E * (Pw + Pm));
    cluster_fuse_features(w, Pw, cs->mu, Pm, E, cc->alpha, z);
    int32_t *old = xmalloc(sizeof(int32_t) * E);
    memcpy(old, cs->group_of, sizeof(int32_t) * E);
    Rng rng;
    rng_init(&rng, (uint64_t)m->cfg.run.seed, (uint64_t)l, RNG_CLUSTER + 16 * (uint64_t)step);
    ClusterResult res = cluster_update(z, E, Pw + Pm, G, cc->min_gain, cc->kmeans_iters, cc->kmeans_restarts,
                                       &rng, cs->group_of);
    ev->cost_before = res.cost_old;
    ev->cost_after = res.accepted ? res.cost_new : res.cost_old;
    ev->accepted = res.accepted;
    ev->n_moved = res.n_moved;
    ev->jaccard = res.jaccard;
    cs->n_events++;
    if (res.accepted && res.n_moved > 0) {
        cs->n_accepted++;
        /* refit every group whose membership changed, from the reconstructed weights */
        ErrStats es = {0, 0, 0, 0};
        float *Wg1 = xmalloc(sizeof(float) * K * (n1 > n2 ? n1 : n2));
        float *A = xmalloc(sizeof(float) * (size_t)K * (F > D ? F : D) * r);
        float *Bf = xmalloc(sizeof(float) * (size_t)K * (F1 > D ? F1 : D) * r);
        double *err = xmalloc(sizeof(double) * K);
        int32_t *mem = xmalloc(sizeof(int32_t) * K);
        for (int g = 0; g < G; g++) {
            int n_mem = 0, changed = 0;
            for (int i = 0; i < E; i++)
                if (cs->group_of[i] == g) mem[n_mem++] = i;
            ASSERTF(n_mem == K, "re-clustering produced a group of %d experts (expected %d)", n_mem, K);
            /* changed if any member came from elsewhere or any old member left */
            for (int i = 0; i < E; i++) changed |= (old[i] == g) != (cs->group_of[i] == g);
            for (int q = 0; q < K; q++) cs->members[(size_t)g * K + q] = mem[q];
            if (!changed) continue;
            ev->n_groups_refit++;
            refit_matrix(W1, mem, K, D, F1, r, cc, &rng, h.base1 + (size_t)g * n1, h.a1, h.b1, Wg1, A, Bf, err, &es);
            ASSERTF(es.rc == 0, "refit of layer %d group %d (up projection) failed: LAPACK info %d", l, g, es.rc);
            refit_matrix(W2, mem, K, F, D, r, cc, &rng, h.base2 + (size_t)g * n2, h.a2, h.b2, Wg1, A, Bf, err, &es);
            ASSERTF(es.rc == 0, "refit of layer %d group %d (down projection) failed: LAPACK info %d", l, g, es.rc);
            if (cc->reset_adam) {
                reset_adam(fa, h.base1 + (size_t)g * n1, n1);
                reset_adam(fa, h.base2 + (size_t)g * n2, n2);
                for (int q = 0; q < K; q++) {
                    int i = mem[q];
                    reset_adam(fa, h.a1 + (size_t)i * D * r, (size_t)D * r);
                    reset_adam(fa, h.b1 + (size_t)i * F1 * r, (size_t)F1 * r);
                    reset_adam(fa, h.a2 + (size_t)i * F * r, (size_t)F * r);
                    reset_adam(fa, h.b2 + (size_t)i * D * r, (size_t)D * r);
                }
            }
        }
        ev->recon_err_mean = es.n ? es.sum / es.n : 0;
        ev->recon_err_max = es.max;
        xfree(Wg1); xfree(A); xfree(Bf); xfree(err); xfree(mem);
    }
    ev->seconds = time_now() - t0;
    xfree(W1); xfree(W2); xfree(w); xfree(z); xfree(old);
    return 1;
}

/* every rank gathers all experts (canonical layout), runs the same deterministic event on
 * them, then keeps its own slots under the new membership (a group stays on its rank; the
 * experts that joined it arrive with the refit) */
int recluster_run(Model *m, long step, ReclusterEvent *ev) {
    float *loc[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    float *full[3];
    for (int a = 0; a < 3; a++) full[a] = xmalloc(sizeof(float) * (m->n_expert_full ? m->n_expert_full : 1));
    model_ep_gather(m, loc, full, 3);
    FullArrays fa = {full[0], full[1], full[2]};
    int n = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED) {
            n += layer_event(m, l, step, &ev[n], &fa);
            ep_map_refresh(&m->ep[l], m->cstate[l].members);
        }
    model_ep_scatter(m, full, loc, 3);
    for (int a = 0; a < 3; a++) xfree(full[a]);
    return n;
}
