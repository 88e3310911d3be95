/* recluster.c: centroid EMA, features, the clustering event and the refit, run where the
 * experts live (expert-parallel): each rank reconstructs and sketches only its own experts,
 * only the features travel to every rank, every rank runs the same clustering, and each
 * changed group is refit by its owner from members sent rank to rank (phase recluster);
 * the Jaccard of a layer's partition to its reference partition (local); masters mode: the
 * same event on the masters, and the projection of every group from its masters (local).
 * Legend: E G K D F F1 r Pw Pm P = experts, groups, experts/group, d_model, expert width,
 * F or 2F, residual rank, parameter-feature dims, centroid dims, ranks of the EP group;
 * Gl El = groups / experts on this rank (El = Gl K); n1 n2 = D F1, F D (one expert's up /
 * down matrix); nf = (2D + F1 + F) r (one expert's four factors). */
#include "recluster.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compress.h"
#include "compress_event.h"

/* the expert-parallel group's communicator (the world until the model sets one) */
static Comm *xcomm(Model *m) { return m->ep_comm ? m->ep_comm : m->comm; }

long recluster_warmup(const Config *cfg) {
    return cfg->clustering.warmup >= 0 ? cfg->clustering.warmup : cfg->train.steps / 10;
}

/* clustering.mu_source = coact: this step's unconstrained co-activation of clustered layer l
 * (every token's top-k over all E expert logits, ignoring the groups; ties to the lower id),
 * summed over the ranks, folded into the EMA; mu = its normalised rows */
static void coact_step(Model *m, int l, double beta) {
    const MoeLayer *f = &m->ffn[l];
    ClusterState *cs = &m->cstate[l];
    const Route *rt = &m->acts[l].moe.route;
    int E = f->E, k = f->k, N = rt->N;
    size_t EE = (size_t)E * E;
    double *c = xcalloc(sizeof(double) * (EE + E + 1));   /* pairs [E, E], selections [E], tokens */
    int32_t *top = xmalloc(sizeof(int32_t) * (k > 0 ? k : 1));
    for (int n = 0; n < N; n++) {
        const float *lg = rt->logits + (size_t)n * E;
        for (int a = 0; a < k; a++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int used = 0;
                for (int b = 0; b < a; b++) used |= top[b] == e;
                if (!used && (best < 0 || lg[e] > lg[best])) best = e;
            }
            top[a] = best;
            c[EE + best] += 1;
            for (int b = 0; b < a; b++) {
                c[(size_t)top[a] * E + top[b]] += 1;
                c[(size_t)top[b] * E + top[a]] += 1;
            }
        }
    }
    c[EE + E] = N;
    comm_allreduce_sum_f64(m->comm, c, EE + E + 1);   /* integer counts: exact at any rank count */
    if (c[EE + E] > 0) {
        int first = 1;
        for (int i = 0; i < E && first; i++) first = cs->coact_n[i] == 0;
        for (size_t q = 0; q < EE; q++)
            cs->coact[q] = first ? c[q] / c[EE + E] : (1 - beta) * cs->coact[q] + beta * c[q] / c[EE + E];
        for (int i = 0; i < E; i++)
            cs->coact_n[i] = first ? c[EE + i] / c[EE + E] : (1 - beta) * cs->coact_n[i] + beta * c[EE + i] / c[EE + E];
        compress_coact_features(cs->coact, cs->coact_n, E, cs->mu);
        for (int i = 0; i < E; i++) cs->mu_seen[i] = 1;
    }
    xfree(c);
    xfree(top);
}

void recluster_mu_step(Model *m) {
    double beta = m->cfg.clustering.ema_beta;
    for (int l = 0; l < m->L; l++) {
        MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        ClusterState *cs = &m->cstate[l];
        if (cs->coact) { coact_step(m, l, beta); continue; }
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


/* one clustered layer's six expert tensors inside an array laid out like this rank's expert
 * category (parameters, Adam m or Adam v): bases [Gl, ...] by local group slot, factors
 * [El, ...] by local expert slot (group slot * K + index in the group's members) */
typedef struct LayerLocal { float *base1, *base2, *a1, *b1, *a2, *b2, *m1, *m2; } LayerLocal;

/* masters mode adds m1 [El, D, F1], m2 [El, F, D] (by local expert slot); NULL otherwise */
static LayerLocal layer_local(const Model *m, float *arr, int l) {
    float *v[8] = {0};
    int n = 0;
    for (int i = 0; i < m->n_tensors && n < 8; i++)
        if (m->tensors[i].layer == l && m->tensors[i].ep_unit) v[n++] = arr + m->tensors[i].offset;
    int want = model_masters(m) ? 8 : 6;
    ASSERTF(n == want, "layer %d: expected %d clustered expert tensors, found %d", l, want, n);
    LayerLocal h = {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
    return h;
}

/* the per-expert rows of local expert slot s: the four factors (a1 [D, r], b1 [F1, r],
 * a2 [F, r], b2 [D, r]) and, in masters mode, the masters (m1 [D, F1], m2 [F, D]), packed one
 * after the other in buf [nf] (member_floats): get copies them out, put copies them in */
static size_t member_floats(const LayerLocal *h, const MoeLayer *f) {
    size_t n = (size_t)(2 * f->D + f->F1 + f->F) * f->r;
    return h->m1 ? n + (size_t)f->D * f->F1 + (size_t)f->F * f->D : n;
}

static int factors_span(const LayerLocal *h, const MoeLayer *f, int s, float *span[6], size_t len[6]) {
    int r = f->r;
    span[0] = h->a1 + (size_t)s * f->D * r; len[0] = (size_t)f->D * r;
    span[1] = h->b1 + (size_t)s * f->F1 * r; len[1] = (size_t)f->F1 * r;
    span[2] = h->a2 + (size_t)s * f->F * r; len[2] = (size_t)f->F * r;
    span[3] = h->b2 + (size_t)s * f->D * r; len[3] = (size_t)f->D * r;
    if (!h->m1) return 4;
    span[4] = h->m1 + (size_t)s * f->D * f->F1; len[4] = (size_t)f->D * f->F1;
    span[5] = h->m2 + (size_t)s * f->F * f->D; len[5] = (size_t)f->F * f->D;
    return 6;
}

static void factors_get(const LayerLocal *h, const MoeLayer *f, int s, float *buf) {
    float *span[6];
    size_t len[6];
    int n = factors_span(h, f, s, span, len);
    for (int k = 0; k < n; k++) { memcpy(buf, span[k], sizeof(float) * len[k]); buf += len[k]; }
}

static void factors_put(const LayerLocal *h, const MoeLayer *f, int s, const float *buf) {
    float *span[6];
    size_t len[6];
    int n = factors_span(h, f, s, span, len);
    for (int k = 0; k < n; k++) { memcpy(span[k], buf, sizeof(float) * len[k]); buf += len[k]; }
}

/* global expert in local expert slot s of rank q under the current maps */
static int expert_at(const EpMap *em, const ClusterState *cs, int q, int s) {
    int g = em->place.unit_at[q * em->per_rank + s / em->K];
    return cs->members[(size_t)g * em->K + s % em->K];
}

/* refit one weight kind of a group from its members' reconstructed matrices Wg [K, m, n]:
 * base [m, n], factors a [K, m, r] and b [K, n, r] (the group's K consecutive local slots);
 * adds the K relative errors to *sum and *max */
static void refit_matrix(const float *Wg, int K, int m, int n, int r, const ClusterConfig *cc, Rng *rng, float *base,
                         float *a, float *b, double *err, double *sum, double *max, int l, int g, const char *what) {
    int method = cc->svd == SVD_KIND_EXACT ? SVD_EXACT : SVD_RANDOMIZED;
    int rc = compress_refit_group(Wg, K, m, n, r, method, cc->svd_oversample, cc->svd_power_iters, rng, base, a, b, err);
    ASSERTF(rc == 0, "refit of layer %d group %d (%s projection) failed: LAPACK info %d", l, g, what, rc);
    for (int q = 0; q < K; q++) {
        *sum += err[q];
        if (err[q] > *max) *max = err[q];
    }
}

/* mean cosine of the rows of x [E, d] over pairs of experts in the same group and in different
 * groups (rows of zero norm count as cosine 0) */
static void cos_within_cross(const float *x, int E, int d, const int32_t *group, double *within, double *cross) {
    double *nrm = xmalloc(sizeof(double) * (E > 0 ? E : 1));
    for (int i = 0; i < E; i++) {
        double q = 0;
        for (int j = 0; j < d; j++) q += (double)x[(size_t)i * d + j] * x[(size_t)i * d + j];
        nrm[i] = sqrt(q);
    }
    double sw = 0, sc = 0;
    long nw = 0, nc = 0;
    for (int i = 0; i < E; i++)
        for (int k = i + 1; k < E; k++) {
            double dot = 0;
            for (int j = 0; j < d; j++) dot += (double)x[(size_t)i * d + j] * x[(size_t)k * d + j];
            double c = nrm[i] > 0 && nrm[k] > 0 ? dot / (nrm[i] * nrm[k]) : 0;
            if (group[i] == group[k]) { sw += c; nw++; }
            else { sc += c; nc++; }
        }
    *within = nw ? sw / nw : 0;
    *cross = nc ? sc / nc : 0;
    xfree(nrm);
}

/* byte counts in and displacements out: d[i] = sum of c[0..i) */
static size_t displs(const size_t *c, size_t *d, int P) {
    size_t n = 0;
    for (int q = 0; q < P; q++) { d[q] = n; n += c[q]; }
    return n;
}

/* the event for clustered layer l. cur[3]: this rank's expert category on the host before
 * the event (parameters, Adam m, Adam v), read only; nxt[3]: a copy that receives the new
 * state; *dirty is set when it changed. The maps (em) still describe the old membership. */
static int layer_event(Model *m, int l, long step, ReclusterEvent *ev, float *const cur[3], float *const nxt[3],
                       int *dirty) {
    Comm *c = xcomm(m);
    MoeLayer *f = &m->ffn[l];
    ClusterState *cs = &m->cstate[l];
    const EpMap *em = &m->ep[l];
    const ClusterConfig *cc = &m->cfg.clustering;
    int E = f->E, G = f->G, K = f->K, D = f->D, F = f->F, F1 = f->F1, r = f->r, Pm = cs->mu_dim;
    int P = c->size, me = c->rank, Gl = em->per_rank, El = Gl * K;
    ASSERTF(em->P == P && em->K == K, "layer %d: expert map over %d ranks (K %d), communicator of %d (K %d)", l, em->P,
            em->K, P, K);
    double t0 = time_now();
    memset(ev, 0, sizeof *ev);
    ev->layer = l;
    LayerLocal h = layer_local(m, cur[0], l);
    int masters = h.m1 != NULL;
    size_t n1 = (size_t)D * F1, n2 = (size_t)F * D, nf = member_floats(&h, f);
    /* 1. this rank's experts' weights W1 [El, n1], W2 [El, n2]: reconstructed under the current
     * grouping, or (masters mode) the masters themselves */
    float *W1 = xmalloc(sizeof(float) * ((size_t)El * n1 + 1)), *W2 = xmalloc(sizeof(float) * ((size_t)El * n2 + 1));
    if (masters) {
        memcpy(W1, h.m1, sizeof(float) * (size_t)El * n1);
        memcpy(W2, h.m2, sizeof(float) * (size_t)El * n2);
    } else
        for (int s = 0; s < El; s++) {
            int u = s / K;
            compress_reconstruct(h.base1 + (size_t)u * n1, h.a1 + (size_t)s * D * r, h.b1 + (size_t)s * F1 * r, D, F1, r, W1 + (size_t)s * n1);
            compress_reconstruct(h.base2 + (size_t)u * n2, h.a2 + (size_t)s * F * r, h.b2 + (size_t)s * D * r, F, D, r, W2 + (size_t)s * n2);
        }
    /* 2. their parameter features wl [El, Pw]; every rank's block goes to every rank -> w [E, Pw] */
    int Pw = cc->proj_dim > 0 ? cc->proj_dim : (int)(n1 + n2);
    float *wl = xcalloc(sizeof(float) * ((size_t)El * Pw + 1));
    for (int s = 0; s < El; s++) {
        if (cc->proj_dim > 0) {
            cluster_sketch_add(W1 + (size_t)s * n1, n1, 0, wl + (size_t)s * Pw, Pw);
            cluster_sketch_add(W2 + (size_t)s * n2, n2, n1, wl + (size_t)s * Pw, Pw);
        } else {
            memcpy(wl + (size_t)s * Pw, W1 + (size_t)s * n1, sizeof(float) * n1);
            memcpy(wl + (size_t)s * Pw + n1, W2 + (size_t)s * n2, sizeof(float) * n2);
        }
    }
    size_t *sc = xcalloc(sizeof(size_t) * P), *sd = xcalloc(sizeof(size_t) * P);
    size_t *rc = xcalloc(sizeof(size_t) * P), *rd = xcalloc(sizeof(size_t) * P);
    size_t blk = sizeof(float) * (size_t)El * Pw;
    for (int q = 0; q < P; q++) { sc[q] = blk; sd[q] = 0; rc[q] = blk; rd[q] = (size_t)q * blk; }
    float *wall = xmalloc(blk * P + 1);
    comm_alltoallv_bytes(c, wl, sc, sd, wall, rc, rd, COMM_PHASE_RECLUSTER);
    /* the event's bytes over every rank, known to all without communicating (the volumes
     * follow from the maps and the partitions): the features here, the members' rows and
     * statistics of changed groups below; every EP group runs the same event */
    double groups = (double)(m->comm->size / P);
    ev->bytes = groups * (double)P * (double)blk * (P - 1);
    float *w = xmalloc(sizeof(float) * (size_t)E * Pw);
    int32_t *seen = xcalloc(sizeof(int32_t) * E);
    for (int q = 0; q < P; q++)
        for (int s = 0; s < El; s++) {
            int i = expert_at(em, cs, q, s);
            memcpy(w + (size_t)i * Pw, wall + ((size_t)q * El + s) * Pw, sizeof(float) * Pw);
            seen[i]++;
        }
    for (int i = 0; i < E; i++) ASSERTF(seen[i] == 1, "layer %d: expert %d held %d times over the ranks", l, i, seen[i]);
    /* masters mode: the features are centred on the all-expert mean (the sketch is linear, so
     * this is the sketch of the centred masters): what every expert shares says nothing about
     * the grouping, and nothing in the masters is shared by construction */
    if (masters)
        for (int j = 0; j < Pw; j++) {
            double mean = 0;
            for (int i = 0; i < E; i++) mean += w[(size_t)i * Pw + j];
            mean /= E;
            for (int i = 0; i < E; i++) w[(size_t)i * Pw + j] = (float)(w[(size_t)i * Pw + j] - mean);
        }
    /* how much the features confirm the current grouping (the same on every rank) */
    cos_within_cross(w, E, Pw, cs->group_of, &ev->w_cos_within, &ev->w_cos_cross);
    cos_within_cross(cs->mu, E, Pm, cs->group_of, &ev->mu_cos_within, &ev->mu_cos_cross);
    /* 3. the same deterministic clustering on every rank */
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
        *dirty = 1;
        /* new members (ascending) and the groups whose membership changed: a member came
         * from elsewhere or an old member left */
        int32_t *mem = xmalloc(sizeof(int32_t) * (size_t)G * K), *cnt = xcalloc(sizeof(int32_t) * G);
        char *changed = xcalloc((size_t)G);
        for (int i = 0; i < E; i++) {
            int g = cs->group_of[i];
            ASSERTF(cnt[g] < K, "re-clustering produced a group of more than %d experts", K);
            mem[(size_t)g * K + cnt[g]++] = i;
            if (old[i] != g) changed[old[i]] = changed[g] = 1;
        }
        for (int g = 0; g < G; g++) ASSERTF(cnt[g] == K, "re-clustering produced a group of %d experts (expected %d)", cnt[g], K);
        /* 4. members of changed groups whose old group lives on another rank travel to the
         * new group's owner (the old maps em say where): reconstructed rows [n1 | n2] and,
         * when the moments are kept, the factor Adam moments [nf | nf]. Masters mode: the
         * masters [n1 | n2] and the Adam moments of the member's rows (factors and masters),
         * always (a move leaves a master as it is). Packed per destination in (group,
         * member) order; unpacked in the same order. */
        int keep_m = masters || !cc->reset_adam;
        size_t row = n1 + n2 + (keep_m ? 2 * nf : 0), rowb = sizeof(float) * row;
        memset(sc, 0, sizeof(size_t) * P);
        memset(rc, 0, sizeof(size_t) * P);
        for (int g = 0; g < G; g++) {
            if (!changed[g]) continue;
            int o = em->place.owner[g];
            ev->bytes += groups * 16.0 * (P - 1);   /* step 6: the group's error sum and max */
            for (int q = 0; q < K; q++) {
                int src = em->expert_owner[mem[(size_t)g * K + q]];
                if (src == o) continue;
                ev->bytes += groups * (double)rowb;
                if (src == me) sc[o] += rowb;
                if (o == me) rc[src] += rowb;
            }
        }
        size_t ns = displs(sc, sd, P), nr = displs(rc, rd, P);
        float *sbuf = xmalloc(ns + 1), *rbuf = xmalloc(nr + 1);
        LayerLocal hm = layer_local(m, cur[1], l), hv = layer_local(m, cur[2], l);
        size_t *fill = xcalloc(sizeof(size_t) * P);
        for (int g = 0; g < G; g++) {
            int o = em->place.owner[g];
            if (!changed[g] || o == me) continue;
            for (int q = 0; q < K; q++) {
                int i = mem[(size_t)g * K + q], s = em->expert_lslot[i];
                if (em->expert_owner[i] != me) continue;
                float *dst = (float *)((char *)sbuf + sd[o] + fill[o]);
                memcpy(dst, W1 + (size_t)s * n1, sizeof(float) * n1);
                memcpy(dst + n1, W2 + (size_t)s * n2, sizeof(float) * n2);
                if (keep_m) {
                    factors_get(&hm, f, s, dst + n1 + n2);
                    factors_get(&hv, f, s, dst + n1 + n2 + nf);
                }
                fill[o] += rowb;
            }
        }
        comm_alltoallv_bytes(c, sbuf, sc, sd, rbuf, rc, rd, COMM_PHASE_RECLUSTER);
        /* 5. on each owner: the groups' slots follow the new membership; changed groups are
         * refit (base, factors) from their members' weights with the group's own random
         * stream, so the result depends neither on the rank that refits nor on the order */
        LayerLocal np = layer_local(m, nxt[0], l), nm = layer_local(m, nxt[1], l), nv = layer_local(m, nxt[2], l);
        float *Wg1 = xmalloc(sizeof(float) * K * n1), *Wg2 = xmalloc(sizeof(float) * K * n2);
        float *tmp = xmalloc(sizeof(float) * nf);
        double *err = xmalloc(sizeof(double) * K);
        double *gst = xcalloc(sizeof(double) * 2 * G);   /* [G, 2]: error sum, max of each refit group */
        memset(fill, 0, sizeof(size_t) * P);
        for (int g = 0; g < G; g++) {
            if (em->place.owner[g] != me) continue;
            int u = em->place.slot[g];
            for (int q = 0; q < K; q++) {
                int i = mem[(size_t)g * K + q], src = em->expert_owner[i], so = em->expert_lslot[i], sn = u * K + q;
                if (!changed[g]) {
                    /* the same members: factors and moments follow them to their slots */
                    ASSERTF(src == me, "layer %d: unchanged group %d has member %d on rank %d", l, g, i, src);
                    const LayerLocal *from[3] = {&h, &hm, &hv}, *to[3] = {&np, &nm, &nv};
                    for (int a = 0; a < 3; a++) {
                        factors_get(from[a], f, so, tmp);
                        factors_put(to[a], f, sn, tmp);
                    }
                    continue;
                }
                const float *w1, *w2, *mom = NULL;
                if (src == me) {
                    w1 = W1 + (size_t)so * n1;
                    w2 = W2 + (size_t)so * n2;
                } else {
                    const float *in = (const float *)((const char *)rbuf + rd[src] + fill[src]);
                    fill[src] += rowb;
                    w1 = in;
                    w2 = in + n1;
                    mom = in + n1 + n2;
                }
                memcpy(Wg1 + (size_t)q * n1, w1, sizeof(float) * n1);
                memcpy(Wg2 + (size_t)q * n2, w2, sizeof(float) * n2);
                if (masters) {   /* the master itself moves to its new slot, unchanged */
                    memcpy(np.m1 + (size_t)sn * n1, w1, sizeof(float) * n1);
                    memcpy(np.m2 + (size_t)sn * n2, w2, sizeof(float) * n2);
                }
                if (keep_m) {
                    /* the member keeps its factor moments (the group's base keeps its own) */
                    if (mom) {
                        factors_put(&nm, f, sn, mom);
                        factors_put(&nv, f, sn, mom + nf);
                    } else {
                        factors_get(&hm, f, so, tmp);
                        factors_put(&nm, f, sn, tmp);
                        factors_get(&hv, f, so, tmp);
                        factors_put(&nv, f, sn, tmp);
                    }
                }
            }
            if (!changed[g]) continue;
            Rng rg;
            rng_init(&rg, (uint64_t)m->cfg.run.seed, ((uint64_t)(g + 1) << 32) | (uint64_t)l,
                     RNG_CLUSTER + 16 * (uint64_t)step);
            double *sum = &gst[2 * g], *max = &gst[2 * g + 1];
            refit_matrix(Wg1, K, D, F1, r, cc, &rg, np.base1 + (size_t)u * n1, np.a1 + (size_t)u * K * D * r,
                         np.b1 + (size_t)u * K * F1 * r, err, sum, max, l, g, "up");
            refit_matrix(Wg2, K, F, D, r, cc, &rg, np.base2 + (size_t)u * n2, np.a2 + (size_t)u * K * F * r,
                         np.b2 + (size_t)u * K * D * r, err, sum, max, l, g, "down");
            /* (masters mode: the projection is not trained, its moments unused; the masters keep theirs) */
            if (cc->reset_adam && !masters) {
                const LayerLocal *mv[2] = {&nm, &nv};
                memset(tmp, 0, sizeof(float) * nf);
                for (int a = 0; a < 2; a++) {
                    memset(mv[a]->base1 + (size_t)u * n1, 0, sizeof(float) * n1);
                    memset(mv[a]->base2 + (size_t)u * n2, 0, sizeof(float) * n2);
                    for (int q = 0; q < K; q++) factors_put(mv[a], f, u * K + q, tmp);
                }
            }
        }
        /* 6. the event's statistics are global: every owner sends the (error sum, max) of its
         * refit groups to every rank; all combine them in group order (the same at any P) */
        int n_changed = 0;
        memset(rc, 0, sizeof(size_t) * P);
        for (int g = 0; g < G; g++)
            if (changed[g]) { n_changed++; rc[em->place.owner[g]] += 2 * sizeof(double); }
        displs(rc, rd, P);
        double *gmine = xmalloc(rc[me] + 1), *gall = xmalloc(sizeof(double) * 2 * G + 1);
        int nmine = 0;
        for (int g = 0; g < G; g++)
            if (changed[g] && em->place.owner[g] == me) { gmine[nmine++] = gst[2 * g]; gmine[nmine++] = gst[2 * g + 1]; }
        for (int q = 0; q < P; q++) { sc[q] = rc[me]; sd[q] = 0; }
        comm_alltoallv_bytes(c, gmine, sc, sd, gall, rc, rd, COMM_PHASE_RECLUSTER);
        memset(fill, 0, sizeof(size_t) * P);
        double esum = 0, emax = 0;
        for (int g = 0; g < G; g++) {
            if (!changed[g]) continue;
            int o = em->place.owner[g];
            const double *v = (const double *)((const char *)gall + rd[o] + fill[o]);
            fill[o] += 2 * sizeof(double);
            esum += v[0];
            if (v[1] > emax) emax = v[1];
        }
        ev->n_groups_refit = n_changed;
        ev->recon_err_mean = n_changed ? esum / (2.0 * K * n_changed) : 0;
        ev->recon_err_max = emax;
        memcpy(cs->members, mem, sizeof(int32_t) * (size_t)G * K);
        xfree(mem); xfree(cnt); xfree(changed); xfree(sbuf); xfree(rbuf); xfree(fill);
        xfree(Wg1); xfree(Wg2); xfree(tmp); xfree(err); xfree(gst); xfree(gmine); xfree(gall);
    }
    ev->seconds = time_now() - t0;
    xfree(W1); xfree(W2); xfree(wl); xfree(wall); xfree(w); xfree(seen); xfree(z); xfree(old);
    xfree(sc); xfree(sd); xfree(rc); xfree(rd);
    return 1;
}

/* every rank works on its own slots (host copies of its expert category); the maps of each
 * layer are refreshed to the new membership after its event (a group stays on its rank; the
 * experts that joined it arrived with the refit) */
int recluster_run(Model *m, long step, ReclusterEvent *ev) {
    const Backend *be = m->be;
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *dev[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    float *cur[3], *nxt[3];
    for (int a = 0; a < 3; a++) {
        cur[a] = xmalloc(sizeof(float) * (nl ? nl : 1));
        nxt[a] = xmalloc(sizeof(float) * (nl ? nl : 1));
        if (nl) be->ops->to_host(be->ctx, cur[a], dev[a], sizeof(float) * nl);
        memcpy(nxt[a], cur[a], sizeof(float) * nl);
    }
    int n = 0, dirty = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED) {
            n += layer_event(m, l, step, &ev[n], cur, nxt, &dirty);
            ep_map_refresh(&m->ep[l], m->cstate[l].members);
        }
    for (int a = 0; a < 3; a++) {
        if (dirty && nl) be->ops->from_host(be->ctx, dev[a], nxt[a], sizeof(float) * nl);
        xfree(cur[a]);
        xfree(nxt[a]);
    }
    return n;
}

/* the projection of one unit slot s of a masters-mode layer (the group g it holds): base =
 * member mean, residual = rank-r SVD of each member's masters, with the stream of group g and
 * `step` (the same stream as an event's refit at that step, so the result depends on neither
 * the rank nor the slot). Adds the 2K relative errors to *sum and *max. */
static void project_slot(const Model *m, int l, const LayerLocal *h, int s, int g, long step, double *err, double *sum,
                         double *max) {
    const MoeLayer *f = &m->ffn[l];
    int K = f->K, D = f->D, F = f->F, F1 = f->F1, r = f->r;
    size_t n1 = (size_t)D * F1, n2 = (size_t)F * D;
    Rng rg;
    rng_init(&rg, (uint64_t)m->cfg.run.seed, ((uint64_t)(g + 1) << 32) | (uint64_t)l, RNG_CLUSTER + 16 * (uint64_t)step);
    refit_matrix(h->m1 + (size_t)s * K * n1, K, D, F1, r, &m->cfg.clustering, &rg, h->base1 + (size_t)s * n1,
                 h->a1 + (size_t)s * K * D * r, h->b1 + (size_t)s * K * F1 * r, err, sum, max, l, g, "up");
    refit_matrix(h->m2 + (size_t)s * K * n2, K, F, D, r, &m->cfg.clustering, &rg, h->base2 + (size_t)s * n2,
                 h->a2 + (size_t)s * K * F * r, h->b2 + (size_t)s * K * D * r, err, sum, max, l, g, "down");
}

int recluster_project(Model *m, long step, double *err_mean, double *err_max) {
    if (!model_masters(m)) return 0;
    const Backend *be = m->be;
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *host = xmalloc(sizeof(float) * (nl ? nl : 1));
    if (nl) be->ops->to_host(be->ctx, host, m->params[PCAT_EXPERT], sizeof(float) * nl);
    int n = 0;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        const EpMap *em = &m->ep[l];
        LayerLocal h = layer_local(m, host, l);
        double *err = xmalloc(sizeof(double) * f->K);
        double st[2] = {0, 0}, scratch[2] = {0, 0};   /* error sum and max over this rank's primaries */
        for (int s = 0; s < em->n_slots; s++) {
            int g = em->lunit[s];
            if (g < 0) continue;   /* an empty replica slot */
            /* replica slots: the same projection as their primary (same stream), not counted twice */
            double *sum = s < em->per_rank ? &st[0] : &scratch[0], *max = s < em->per_rank ? &st[1] : &scratch[1];
            project_slot(m, l, &h, s, g, step, err, sum, max);
        }
        xfree(err);
        if (err_mean || err_max) {
            Comm *c = xcomm(m);
            double mx = st[1];
            comm_allreduce_sum_f64(c, &st[0], 1);
            comm_allreduce_max_f64(c, &mx, 1);
            if (err_mean) err_mean[n] = st[0] / (2.0 * f->E);
            if (err_max) err_max[n] = mx;
        }
        n++;
    }
    if (nl) be->ops->from_host(be->ctx, m->params[PCAT_EXPERT], host, sizeof(float) * nl);
    xfree(host);
    return n;
}

double recluster_jaccard_ref(const Model *m, int l) {
    const MoeLayer *f = &m->ffn[l];
    const ClusterState *cs = &m->cstate[l];
    if (f->kind != MOE_KIND_CLUSTERED || !cs->group_ref || !cs->ref_known) return NAN;
    int E = f->E, G = f->G;
    /* as cluster_update's jaccard: relabel the current groups to the reference's, then compare */
    int32_t *cur = xmalloc(sizeof(int32_t) * E);
    memcpy(cur, cs->group_of, sizeof(int32_t) * E);
    cluster_match_ids(cs->group_ref, cur, E, G);
    double j = cluster_jaccard(cs->group_ref, cur, E, G);
    xfree(cur);
    return j;
}
