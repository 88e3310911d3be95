/* compress_event.c: co-activation and (clustering.svd_space output) input statistics of the
 * warm-up, features, partition, refit and the filling of the clustered model (see
 * compress_event.h).
 * Legend: E G K D F F1 r = experts, groups, experts/group, d_model, expert width, F or 2F
 * (SwiGLU), residual rank; n1 n2 = D F1, F D (one expert's up / down matrix); nx = sampled
 * input rows. */
#include "compress_event.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "compress.h"

void compress_phase_config(const Config *cfg, long steps_done, Config *out) {
    *out = *cfg;
    if (cfg->clustering.compress_at > 0 && steps_done < cfg->clustering.compress_at) out->moe.kind = MOE_KIND_STANDARD;
}

int compress_pending(const Model *m) {
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_STANDARD && m->cstate[l].coact) return 1;
    return 0;
}

/* the quantisation of the input statistics: rows rounded to multiples of 2^-COV_BITS and
 * clamped to +-COV_CLAMP, so every product is an integer multiple of 2^-2 COV_BITS below
 * 2^32 in magnitude and every sum of fewer than 2^20 rows is exact in double: the moments do
 * not depend on the summation order (BLAS blocking, the rank count, the allreduce) */
#define COV_BITS 10
#define COV_CLAMP 64.0

static void cov_quantise(const float *x, size_t n, double *q) {
    const double s = (double)(1 << COV_BITS), lim = COV_CLAMP * s;
    for (size_t i = 0; i < n; i++) {
        double v = nearbyint((double)x[i] * s);
        q[i] = v > lim ? lim : v < -lim ? -lim : v;
    }
}

void compress_cov_step(Model *m, int l, double beta) {
    const MoeLayer *f = &m->ffn[l];
    ClusterState *cs = &m->cstate[l];
    const MoeState *st = &m->acts[l].moe;
    const Backend *be = m->be;
    const EpMap *em = f->ep;
    int E = f->E, D = f->D, F = f->F, M = st->M;
    size_t nD = (size_t)D * D, nF = (size_t)F * F, off2 = (size_t)E * nD, offn = off2 + (size_t)E * nF;
    double *c = xcalloc(sizeof(double) * (offn + E));   /* input sums [E, D, D], hidden [E, F, F], rows [E] */
    if (M > 0) {
        float *xg = xmalloc(sizeof(float) * (size_t)M * D), *a = xmalloc(sizeof(float) * (size_t)M * F);
        double *q = xmalloc(sizeof(double) * (size_t)M * (D > F ? D : F));
        be->ops->to_host(be->ctx, xg, st->xg, sizeof(float) * (size_t)M * D);
        be->ops->to_host(be->ctx, a, st->a, sizeof(float) * (size_t)M * F);
        int nl = em->n_slots * em->K;   /* this rank's expert slots (primaries, then replica copies) */
        for (int sl = 0; sl < nl; sl++) {
            int e = em->lslot_expert[sl], r0 = st->expert_off[sl], n = st->expert_off[sl + 1] - r0;
            if (e < 0 || n <= 0) continue;
            cov_quantise(xg + (size_t)r0 * D, (size_t)n * D, q);
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, D, n, 1.0, q, D, 1.0, c + (size_t)e * nD, D);
            cov_quantise(a + (size_t)r0 * F, (size_t)n * F, q);
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, F, n, 1.0, q, F, 1.0, c + off2 + (size_t)e * nF, F);
            c[offn + e] += n;
        }
        xfree(xg); xfree(a); xfree(q);
    }
    comm_allreduce_sum_f64(m->comm, c, offn + E);   /* integer-valued sums: exact, any rank count */
    const double s2 = (double)(1 << COV_BITS) * (double)(1 << COV_BITS);
    for (int e = 0; e < E; e++) {
        double n = c[offn + e];
        if (!(n > 0)) continue;
        int first = cs->cov_n[e] == 0;
        for (int w = 0; w < 2; w++) {
            int d = w ? F : D;
            const double *src = w ? c + off2 + (size_t)e * nF : c + (size_t)e * nD;
            double *dst = w ? cs->hid_cov + (size_t)e * nF : cs->in_cov + (size_t)e * nD;
            for (int i = 0; i < d; i++)
                for (int j = 0; j < d; j++) {
                    double v = (i <= j ? src[(size_t)i * d + j] : src[(size_t)j * d + i]) / (s2 * n);
                    size_t k = (size_t)i * d + j;
                    dst[k] = first ? v : (1 - beta) * dst[k] + beta * v;
                }
        }
        cs->cov_n[e] += 1;
    }
    xfree(c);
}

void compress_coact_step(Model *m) {
    double beta = m->cfg.clustering.ema_beta;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        ClusterState *cs = &m->cstate[l];
        if (f->kind != MOE_KIND_STANDARD || !cs->coact) continue;
        if (cs->in_cov) compress_cov_step(m, l, beta);
        const Route *rt = &m->acts[l].moe.route;
        int E = f->E, k = rt->k, N = rt->N;
        size_t EE = (size_t)E * E;
        double *c = xcalloc(sizeof(double) * (EE + E + 1));   /* pairs [E, E], selections [E], tokens */
        for (int n = 0; n < N; n++) {
            const int32_t *e = rt->expert + (size_t)n * k;
            for (int a = 0; a < k; a++) {
                if (e[a] < 0 || e[a] >= E) continue;
                c[EE + e[a]] += 1;
                for (int b = a + 1; b < k; b++) {
                    if (e[b] < 0 || e[b] >= E || e[b] == e[a]) continue;
                    c[(size_t)e[a] * E + e[b]] += 1;
                    c[(size_t)e[b] * E + e[a]] += 1;
                }
            }
        }
        c[EE + E] = N;
        comm_allreduce_sum_f64(m->comm, c, EE + E + 1);   /* integer counts: exact, any rank count */
        double tok = c[EE + E];
        if (tok > 0) {
            int first = 1;
            for (int i = 0; i < E && first; i++) first = cs->coact_n[i] == 0;
            for (size_t q = 0; q < EE; q++)
                cs->coact[q] = first ? c[q] / tok : (1 - beta) * cs->coact[q] + beta * c[q] / tok;
            for (int i = 0; i < E; i++)
                cs->coact_n[i] = first ? c[EE + i] / tok : (1 - beta) * cs->coact_n[i] + beta * c[EE + i] / tok;
        }
        xfree(c);
    }
}


void compress_weight_features(const float *W1, const float *W2, int E, size_t n1, size_t n2, int proj_dim, float *w) {
    int Pw = proj_dim > 0 ? proj_dim : (int)(n1 + n2);
    float *mean = xcalloc(sizeof(float) * (n1 + n2)), *row = xmalloc(sizeof(float) * (n1 + n2));
    for (size_t j = 0; j < n1 + n2; j++) {
        double s = 0;
        for (int i = 0; i < E; i++) s += j < n1 ? W1[(size_t)i * n1 + j] : W2[(size_t)i * n2 + j - n1];
        mean[j] = (float)(s / E);
    }
    memset(w, 0, sizeof(float) * (size_t)E * Pw);
    for (int i = 0; i < E; i++) {
        for (size_t j = 0; j < n1; j++) row[j] = W1[(size_t)i * n1 + j] - mean[j];
        for (size_t j = 0; j < n2; j++) row[n1 + j] = W2[(size_t)i * n2 + j] - mean[n1 + j];
        if (proj_dim > 0) {
            cluster_sketch_add(row, n1, 0, w + (size_t)i * Pw, Pw);
            cluster_sketch_add(row + n1, n2, n1, w + (size_t)i * Pw, Pw);
        } else {
            memcpy(w + (size_t)i * Pw, row, sizeof(float) * (n1 + n2));
        }
    }
    xfree(mean);
    xfree(row);
}

void compress_coact_features(const double *coact, const double *cnt, int E, float *f) {
    for (int i = 0; i < E; i++) {
        double mx = 0;
        for (int j = 0; j < E; j++) {
            double d = cnt && cnt[i] > 0 && cnt[j] > 0 ? sqrt(cnt[i] * cnt[j]) : 1.0;
            double a = j == i ? 0 : coact[(size_t)i * E + j] / d;
            f[(size_t)i * E + j] = (float)a;
            if (a > mx) mx = a;
        }
        f[(size_t)i * E + i] = (float)mx;
    }
}

void compress_partition(const float *W1, const float *W2, int E, size_t n1, size_t n2, const double *coact,
                        const double *cnt, int G, const ClusterConfig *cc, uint64_t seed, int layer, int32_t *group_of) {
    ASSERTF(G >= 1 && E % G == 0, "compress_partition: %d experts in %d groups", E, G);
    int K = E / G;
    if (cc->compress_partition == COMPRESS_CONTIGUOUS) {
        for (int i = 0; i < E; i++) group_of[i] = i / K;
        return;
    }
    Rng rng;
    rng_init(&rng, seed, (uint64_t)layer, RNG_CLUSTER + 8);
    if (cc->compress_partition == COMPRESS_RANDOM) {   /* Fisher-Yates shuffle, group = position / K */
        int32_t *perm = xmalloc(sizeof(int32_t) * E);
        for (int i = 0; i < E; i++) perm[i] = i;
        for (int i = E - 1; i > 0; i--) {
            int j = (int)rng_below(&rng, (uint64_t)i + 1);
            int32_t t = perm[i]; perm[i] = perm[j]; perm[j] = t;
        }
        for (int p = 0; p < E; p++) group_of[perm[p]] = p / K;
        xfree(perm);
        return;
    }
    int Pw = cc->proj_dim > 0 ? cc->proj_dim : (int)(n1 + n2), Pm = coact ? E : 0;
    float *w = xmalloc(sizeof(float) * (size_t)E * Pw), *fc = Pm ? xmalloc(sizeof(float) * (size_t)E * E) : NULL;
    float *z = xmalloc(sizeof(float) * (size_t)E * (Pw + Pm));
    compress_weight_features(W1, W2, E, n1, n2, cc->proj_dim, w);
    if (Pm) compress_coact_features(coact, cnt, E, fc);
    cluster_fuse_features(w, Pw, fc, Pm, E, Pm ? cc->alpha : 1.0, z);
    cluster_balanced_kmeans(z, E, Pw + Pm, G, cc->kmeans_iters, cc->kmeans_restarts, &rng, group_of);
    /* group ids as close to the contiguous layout as possible (stable names) */
    int32_t *contig = xmalloc(sizeof(int32_t) * E);
    for (int i = 0; i < E; i++) contig[i] = i / K;
    cluster_match_ids(contig, group_of, E, G);
    xfree(contig); xfree(w); xfree(fc); xfree(z);
}

double compress_coselect_fraction(const double *coact, int E, const int32_t *group_of) {
    double in = 0, all = 0;
    for (int i = 0; i < E; i++)
        for (int j = i + 1; j < E; j++) {
            double c = coact[(size_t)i * E + j];
            all += c;
            if (group_of[i] == group_of[j]) in += c;
        }
    return all > 0 ? in / all : 0;
}

/* members [G, K] (ascending) of a balanced partition */
static void members_of(const int32_t *group_of, int E, int G, int32_t *mem) {
    int K = E / G;
    int *cnt = xcalloc(sizeof(int) * G);
    for (int i = 0; i < E; i++) {
        int g = group_of[i];
        ASSERTF(g >= 0 && g < G && cnt[g] < K, "compression: expert %d in group %d (%d groups of %d)", i, g, G, K);
        mem[(size_t)g * K + cnt[g]++] = i;
    }
    xfree(cnt);
}

void compress_refit_layer(const float *W1, const float *W2, int E, int D, int F1, int F, int r, int G,
                          const int32_t *group_of, const ClusterConfig *cc, uint64_t seed, int layer, uint64_t purpose,
                          const double *cov1, const double *cov2,
                          float *base1, float *base2, float *a1, float *b1, float *a2, float *b2, double *werr) {
    int K = E / G, method = cc->svd == SVD_KIND_EXACT ? SVD_EXACT : SVD_RANDOMIZED;
    size_t n1 = (size_t)D * F1, n2 = (size_t)F * D;
    int32_t *mem = xmalloc(sizeof(int32_t) * E);
    members_of(group_of, E, G, mem);
    float *Wg1 = xmalloc(sizeof(float) * K * n1), *Wg2 = xmalloc(sizeof(float) * K * n2);
    float *A1 = xmalloc(sizeof(float) * K * D * r + 1), *B1 = xmalloc(sizeof(float) * K * F1 * r + 1);
    float *A2 = xmalloc(sizeof(float) * K * F * r + 1), *B2 = xmalloc(sizeof(float) * K * D * r + 1);
    float *rec = xmalloc(sizeof(float) * (n1 > n2 ? n1 : n2));
    double *err = xmalloc(sizeof(double) * K);
    /* output space: the members' second moments, in group order */
    double *Cg1 = cov1 ? xmalloc(sizeof(double) * K * (size_t)D * D) : NULL;
    double *Cg2 = cov2 ? xmalloc(sizeof(double) * K * (size_t)F * F) : NULL;
    for (int g = 0; g < G; g++) {
        for (int q = 0; q < K; q++) {
            int i = mem[(size_t)g * K + q];
            memcpy(Wg1 + (size_t)q * n1, W1 + (size_t)i * n1, sizeof(float) * n1);
            memcpy(Wg2 + (size_t)q * n2, W2 + (size_t)i * n2, sizeof(float) * n2);
            if (Cg1) memcpy(Cg1 + (size_t)q * D * D, cov1 + (size_t)i * D * D, sizeof(double) * D * D);
            if (Cg2) memcpy(Cg2 + (size_t)q * F * F, cov2 + (size_t)i * F * F, sizeof(double) * F * F);
        }
        Rng rg;
        rng_init(&rg, seed, ((uint64_t)(g + 1) << 32) | (uint64_t)layer, purpose);
        float *bs1 = base1 + (size_t)g * n1, *bs2 = base2 + (size_t)g * n2;
        int rc = compress_refit_group_weighted(Wg1, Cg1, K, D, F1, r, method, cc->svd_oversample, cc->svd_power_iters,
                                               &rg, bs1, A1, B1, err);
        ASSERTF(rc == 0, "compression of layer %d group %d (up projection) failed: LAPACK info %d", layer, g, rc);
        rc = compress_refit_group_weighted(Wg2, Cg2, K, F, D, r, method, cc->svd_oversample, cc->svd_power_iters,
                                           &rg, bs2, A2, B2, err);
        ASSERTF(rc == 0, "compression of layer %d group %d (down projection) failed: LAPACK info %d", layer, g, rc);
        for (int q = 0; q < K; q++) {
            int i = mem[(size_t)g * K + q];
            memcpy(a1 + (size_t)i * D * r, A1 + (size_t)q * D * r, sizeof(float) * D * r);
            memcpy(b1 + (size_t)i * F1 * r, B1 + (size_t)q * F1 * r, sizeof(float) * F1 * r);
            memcpy(a2 + (size_t)i * F * r, A2 + (size_t)q * F * r, sizeof(float) * F * r);
            memcpy(b2 + (size_t)i * D * r, B2 + (size_t)q * D * r, sizeof(float) * D * r);
            /* relative error over [w1 | w2] */
            double num = 0, den = 0;
            compress_reconstruct(bs1, A1 + (size_t)q * D * r, B1 + (size_t)q * F1 * r, D, F1, r, rec);
            for (size_t j = 0; j < n1; j++) {
                double w = Wg1[(size_t)q * n1 + j], d = w - rec[j];
                num += d * d; den += w * w;
            }
            compress_reconstruct(bs2, A2 + (size_t)q * F * r, B2 + (size_t)q * D * r, F, D, r, rec);
            for (size_t j = 0; j < n2; j++) {
                double w = Wg2[(size_t)q * n2 + j], d = w - rec[j];
                num += d * d; den += w * w;
            }
            werr[i] = den > 0 ? sqrt(num / den) : sqrt(num);
        }
    }
    xfree(mem); xfree(Wg1); xfree(Wg2); xfree(A1); xfree(B1); xfree(A2); xfree(B2); xfree(rec); xfree(err);
    xfree(Cg1); xfree(Cg2);
}

/* y [nx, D] = act(x W1) W2 of one expert (host; GELU tanh form or SwiGLU as the backends) */
static void expert_apply(const float *x, int nx, const float *W1, const float *W2, int D, int F1, int F, int act,
                         float *h, float *a, float *y) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nx, F1, D, 1.0f, x, D, W1, F1, 0.0f, h, F1);
    for (int n = 0; n < nx; n++)
        for (int f = 0; f < F; f++) {
            const float *hr = h + (size_t)n * F1;
            float v;
            if (act == ACT_KIND_SWIGLU) v = hr[f] / (1.0f + expf(-hr[f])) * hr[F + f];
            else v = 0.5f * hr[f] * (1.0f + tanhf(0.7978845608f * (hr[f] + 0.044715f * hr[f] * hr[f] * hr[f])));
            a[(size_t)n * F + f] = v;
        }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nx, D, F, 1.0f, a, F, W2, D, 0.0f, y, D);
}

static const ParamTensor *find_tensor(const Model *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}

static const ParamTensor *layer_tensor(const Model *m, int l, const char *leaf) {
    char nm[64];
    str_fmt(nm, sizeof nm, "h.%d.ffn.%s", l, leaf);
    const ParamTensor *t = find_tensor(m, nm);
    ASSERTF(t, "compression: tensor %s not found", nm);
    return t;
}

int compress_event_run(Model *old, Model *nw, long step, float *const *x, int nx, CompressEvent *ev) {
    const Backend *be = old->be;
    const ClusterConfig *cc = &nw->cfg.clustering;
    /* 1. every tensor outside the experts moves by name, with its Adam moments */
    {
        size_t no = old->n_cat[PCAT_DENSE], nn = nw->n_cat[PCAT_DENSE];
        float *src[3], *dst[3];
        float *os[3] = {old->params[PCAT_DENSE], old->adam_m[PCAT_DENSE], old->adam_v[PCAT_DENSE]};
        float *ns[3] = {nw->params[PCAT_DENSE], nw->adam_m[PCAT_DENSE], nw->adam_v[PCAT_DENSE]};
        for (int a = 0; a < 3; a++) {
            src[a] = xmalloc(sizeof(float) * (no ? no : 1));
            dst[a] = xmalloc(sizeof(float) * (nn ? nn : 1));
            be->ops->to_host(be->ctx, src[a], os[a], sizeof(float) * no);
            be->ops->to_host(be->ctx, dst[a], ns[a], sizeof(float) * nn);
        }
        for (int i = 0; i < nw->n_tensors; i++) {
            const ParamTensor *t = &nw->tensors[i];
            if (t->cat != PCAT_DENSE) continue;
            const ParamTensor *o = find_tensor(old, t->name);
            ASSERTF(o && o->cat == PCAT_DENSE && o->n == t->n, "compression: tensor %s has no counterpart of %zu "
                    "elements in the warm-up model", t->name, t->n);
            for (int a = 0; a < 3; a++) memcpy(dst[a] + t->offset, src[a] + o->offset, sizeof(float) * t->n);
        }
        for (int a = 0; a < 3; a++) {
            be->ops->from_host(be->ctx, ns[a], dst[a], sizeof(float) * nn);
            xfree(src[a]);
            xfree(dst[a]);
        }
    }
    /* 2. every expert of the EP group on every rank (canonical layout); masters mode: with
     * their Adam moments, which the masters keep */
    int masters = model_masters(nw), na = masters ? 3 : 1;
    float *fo = xmalloc(sizeof(float) * (old->n_expert_full ? old->n_expert_full : 1));
    float *fn = xcalloc(sizeof(float) * (nw->n_expert_full ? nw->n_expert_full : 1));
    float *fom[2] = {NULL, NULL}, *fnm[2] = {NULL, NULL};
    for (int a = 0; a < na - 1; a++) {
        fom[a] = xmalloc(sizeof(float) * (old->n_expert_full ? old->n_expert_full : 1));
        fnm[a] = xcalloc(sizeof(float) * (nw->n_expert_full ? nw->n_expert_full : 1));
    }
    {
        float *loc[3] = {old->params[PCAT_EXPERT], old->adam_m[PCAT_EXPERT], old->adam_v[PCAT_EXPERT]};
        float *full[3] = {fo, fom[0], fom[1]};
        model_ep_gather(old, loc, full, na);
    }
    double bytes = (double)na * sizeof(float) * old->n_cat[PCAT_EXPERT] * (old->ep_comm->size - 1);
    double by_kind[PARAM_N_KINDS], total, active;
    model_param_counts(nw, by_kind, &total, &active);
    int n_ev = 0;
    for (int l = 0; l < nw->L; l++) {
        MoeLayer *f = &nw->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        const MoeLayer *fo_l = &old->ffn[l];
        ASSERTF(fo_l->kind == MOE_KIND_STANDARD && fo_l->E == f->E && fo_l->D == f->D && fo_l->F1 == f->F1,
                "compression: layer %d of the warm-up model is not a standard MoE of the same experts", l);
        double t0 = time_now();
        int E = f->E, G = f->G, K = f->K, D = f->D, F = f->F, F1 = f->F1, r = f->r;
        size_t n1 = (size_t)D * F1, n2 = (size_t)F * D;
        const float *W1 = fo + layer_tensor(old, l, "experts.w1")->full_offset;
        const float *W2 = fo + layer_tensor(old, l, "experts.w2")->full_offset;
        const ClusterState *ocs = &old->cstate[l];
        ClusterState *cs = &nw->cstate[l];
        compress_partition(W1, W2, E, n1, n2, ocs->coact, ocs->coact_n, G, cc, (uint64_t)nw->cfg.run.seed, l, cs->group_of);
        members_of(cs->group_of, E, G, cs->members);
        memcpy(cs->group_ref, cs->group_of, sizeof(int32_t) * E);   /* later events are compared with it */
        cs->ref_known = 1;
        double *werr = xmalloc(sizeof(double) * E);
        compress_refit_layer(W1, W2, E, D, F1, F, r, G, cs->group_of, cc, (uint64_t)nw->cfg.run.seed, l,
                             RNG_CLUSTER + 8 + 16 * (uint64_t)step, ocs->in_cov, ocs->hid_cov,
                             fn + layer_tensor(nw, l, "base1")->full_offset, fn + layer_tensor(nw, l, "base2")->full_offset,
                             fn + layer_tensor(nw, l, "a1")->full_offset, fn + layer_tensor(nw, l, "b1")->full_offset,
                             fn + layer_tensor(nw, l, "a2")->full_offset, fn + layer_tensor(nw, l, "b2")->full_offset, werr);
        /* masters mode: the warm-up's experts are the masters, Adam moments included (canonical
         * layout by expert id in both models); the refit above is their first projection */
        if (masters) {
            const char *from[2] = {"experts.w1", "experts.w2"}, *to[2] = {"m1", "m2"};
            for (int w = 0; w < 2; w++) {
                const ParamTensor *src = layer_tensor(old, l, from[w]), *dst = layer_tensor(nw, l, to[w]);
                ASSERTF(src->n_full == dst->n_full, "compression: %s and %s differ in size", from[w], to[w]);
                memcpy(fn + dst->full_offset, fo + src->full_offset, sizeof(float) * src->n_full);
                for (int a = 0; a < 2; a++)
                    memcpy(fnm[a] + dst->full_offset, fom[a] + src->full_offset, sizeof(float) * src->n_full);
            }
        }
        /* the aux-loss-free selection bias stays with its expert */
        if (ocs->bias && cs->bias) memcpy(cs->bias, ocs->bias, sizeof(float) * E);
        ep_map_refresh(&nw->ep[l], cs->members);
        CompressEvent *e = &ev[n_ev++];
        memset(e, 0, sizeof *e);
        e->layer = l;
        e->partition = cc->compress_partition;
        for (int i = 0; i < E; i++) {
            e->werr_mean += werr[i] / E;
            if (werr[i] > e->werr_max) e->werr_max = werr[i];
        }
        e->cosel = ocs->coact ? compress_coselect_fraction(ocs->coact, E, cs->group_of) : 0;
        e->cosel_random = E > 1 ? (double)(K - 1) / (E - 1) : 0;
        e->seconds = time_now() - t0;
        /* output space, on the sample (rank 0) */
        if (x && x[l] && nx > 0) {
            const float *bs1 = fn + layer_tensor(nw, l, "base1")->full_offset, *bs2 = fn + layer_tensor(nw, l, "base2")->full_offset;
            const float *A1 = fn + layer_tensor(nw, l, "a1")->full_offset, *B1 = fn + layer_tensor(nw, l, "b1")->full_offset;
            const float *A2 = fn + layer_tensor(nw, l, "a2")->full_offset, *B2 = fn + layer_tensor(nw, l, "b2")->full_offset;
            float *R1 = xmalloc(sizeof(float) * n1), *R2 = xmalloc(sizeof(float) * n2);
            float *h = xmalloc(sizeof(float) * (size_t)nx * F1), *a = xmalloc(sizeof(float) * (size_t)nx * F);
            float *y = xmalloc(sizeof(float) * (size_t)nx * D), *yh = xmalloc(sizeof(float) * (size_t)nx * D);
            for (int i = 0; i < E; i++) {
                int g = cs->group_of[i];
                compress_reconstruct(bs1 + (size_t)g * n1, A1 + (size_t)i * D * r, B1 + (size_t)i * F1 * r, D, F1, r, R1);
                compress_reconstruct(bs2 + (size_t)g * n2, A2 + (size_t)i * F * r, B2 + (size_t)i * D * r, F, D, r, R2);
                expert_apply(x[l], nx, W1 + (size_t)i * n1, W2 + (size_t)i * n2, D, F1, F, fo_l->act, h, a, y);
                expert_apply(x[l], nx, R1, R2, D, F1, F, fo_l->act, h, a, yh);
                double num = 0, den = 0;
                for (size_t q = 0; q < (size_t)nx * D; q++) {
                    double d = (double)y[q] - yh[q];
                    num += d * d; den += (double)y[q] * y[q];
                }
                double oe = den > 0 ? sqrt(num / den) : sqrt(num);
                e->oerr_mean += oe / E;
                if (oe > e->oerr_max) e->oerr_max = oe;
            }
            xfree(R1); xfree(R2); xfree(h); xfree(a); xfree(y); xfree(yh);
        }
        e->bytes = bytes;
        e->params_total = total;
        e->params_expert = by_kind[PARAM_BASE] + by_kind[PARAM_FACTOR];
        xfree(werr);
    }
    /* 3. this rank's slots of the clustered experts (under the new membership); fresh Adam
     * state (masters mode: the masters' moments, the projection's zero) */
    {
        float *full[3] = {fn, fnm[0], fnm[1]}, *loc[3] = {nw->params[PCAT_EXPERT], nw->adam_m[PCAT_EXPERT], nw->adam_v[PCAT_EXPERT]};
        model_ep_scatter(nw, full, loc, na);
        size_t nb = sizeof(float) * (nw->n_cat[PCAT_EXPERT] ? nw->n_cat[PCAT_EXPERT] : 1);
        if (!masters) {
            be->ops->zero(be->ctx, nw->adam_m[PCAT_EXPERT], nb);
            be->ops->zero(be->ctx, nw->adam_v[PCAT_EXPERT], nb);
        }
    }
    xfree(fo);
    xfree(fn);
    for (int a = 0; a < 2; a++) { xfree(fom[a]); xfree(fnm[a]); }
    return n_ev;
}
