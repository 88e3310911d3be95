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

/* host copies of one clustered layer's parameters (views into the category buffers) */
typedef struct LayerHost { float *base1, *base2, *a1, *b1, *a2, *b2; } LayerHost;

static float *host_of_param(Model *m, const float *dev, int cat) {
    /* the CPU backend's memory is host memory; other backends copy (not supported yet) */
    ASSERTF(m->be->kind == 0, "re-clustering needs host-visible parameters (CPU backend)");
    (void)cat;
    return (float *)dev;
}

static void reset_adam(Model *m, const float *param_view, size_t n) {
    for (int c = 0; c < PCAT_N; c++) {
        if (param_view >= m->params[c] && param_view < m->params[c] + m->n_cat[c]) {
            size_t off = (size_t)(param_view - m->params[c]);
            m->be->ops->zero(m->be->ctx, m->adam_m[c] + off, sizeof(float) * n);
            m->be->ops->zero(m->be->ctx, m->adam_v[c] + off, sizeof(float) * n);
            return;
        }
    }
}

static int layer_event(Model *m, int l, long step, ReclusterEvent *ev) {
    MoeLayer *f = &m->ffn[l];
    ClusterState *cs = &m->cstate[l];
    const ClusterConfig *cc = &m->cfg.clustering;
    int E = f->E, G = f->G, K = f->K, D = f->D, F = f->F, F1 = f->F1, r = f->r, Pm = cs->mu_dim;
    double t0 = time_now();
    memset(ev, 0, sizeof *ev);
    ev->layer = l;
    LayerParams *lp = &m->p.layers[l];
    LayerHost h = {host_of_param(m, lp->ffn.base1, PCAT_EXPERT), host_of_param(m, lp->ffn.base2, PCAT_EXPERT),
                   host_of_param(m, lp->ffn.a1, PCAT_EXPERT), host_of_param(m, lp->ffn.b1, PCAT_EXPERT),
                   host_of_param(m, lp->ffn.a2, PCAT_EXPERT), host_of_param(m, lp->ffn.b2, PCAT_EXPERT)};
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
        double err_sum = 0, err_max = 0;
        int n_err = 0;
        float *Wg1 = xmalloc(sizeof(float) * K * n1), *Wg2 = xmalloc(sizeof(float) * K * n2);
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
            for (int q = 0; q < K; q++) {
                memcpy(Wg1 + (size_t)q * n1, W1 + (size_t)mem[q] * n1, sizeof(float) * n1);
                memcpy(Wg2 + (size_t)q * n2, W2 + (size_t)mem[q] * n2, sizeof(float) * n2);
            }
            int method = cc->svd == SVD_KIND_EXACT ? SVD_EXACT : SVD_RANDOMIZED;
            int rc = compress_refit_group(Wg1, K, D, F1, r, method, cc->svd_oversample, cc->svd_power_iters, &rng,
                                          h.base1 + (size_t)g * n1, A, Bf, err);
            ASSERTF(rc == 0, "refit of layer %d group %d (up projection) failed: LAPACK info %d", l, g, rc);
            for (int q = 0; q < K; q++) {
                memcpy(h.a1 + (size_t)mem[q] * D * r, A + (size_t)q * D * r, sizeof(float) * D * r);
                memcpy(h.b1 + (size_t)mem[q] * F1 * r, Bf + (size_t)q * F1 * r, sizeof(float) * F1 * r);
                err_sum += err[q]; n_err++; if (err[q] > err_max) err_max = err[q];
            }
            rc = compress_refit_group(Wg2, K, F, D, r, method, cc->svd_oversample, cc->svd_power_iters, &rng,
                                      h.base2 + (size_t)g * n2, A, Bf, err);
            ASSERTF(rc == 0, "refit of layer %d group %d (down projection) failed: LAPACK info %d", l, g, rc);
            for (int q = 0; q < K; q++) {
                memcpy(h.a2 + (size_t)mem[q] * F * r, A + (size_t)q * F * r, sizeof(float) * F * r);
                memcpy(h.b2 + (size_t)mem[q] * D * r, Bf + (size_t)q * D * r, sizeof(float) * D * r);
                err_sum += err[q]; n_err++; if (err[q] > err_max) err_max = err[q];
            }
            if (cc->reset_adam) {
                reset_adam(m, lp->ffn.base1 + (size_t)g * n1, n1);
                reset_adam(m, lp->ffn.base2 + (size_t)g * n2, n2);
                for (int q = 0; q < K; q++) {
                    int i = mem[q];
                    reset_adam(m, lp->ffn.a1 + (size_t)i * D * r, (size_t)D * r);
                    reset_adam(m, lp->ffn.b1 + (size_t)i * F1 * r, (size_t)F1 * r);
                    reset_adam(m, lp->ffn.a2 + (size_t)i * F * r, (size_t)F * r);
                    reset_adam(m, lp->ffn.b2 + (size_t)i * D * r, (size_t)D * r);
                }
            }
        }
        ev->recon_err_mean = n_err ? err_sum / n_err : 0;
        ev->recon_err_max = err_max;
        xfree(Wg1); xfree(Wg2); xfree(A); xfree(Bf); xfree(err); xfree(mem);
    }
    ev->seconds = time_now() - t0;
    xfree(W1); xfree(W2); xfree(w); xfree(z); xfree(old);
    return 1;
}

int recluster_run(Model *m, long step, ReclusterEvent *ev) {
    int n = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED) n += layer_event(m, l, step, &ev[n]);
    return n;
}
