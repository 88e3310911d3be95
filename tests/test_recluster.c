/* test_recluster: the re-clustering event on a real clustered model. Planted activation
 * centroids (alpha = 0) force a new partition; the event must accept it, move the experts,
 * keep groups balanced, refit each changed group so that its base is the member mean of the
 * reconstructed weights and its factors the best rank-r fit of the residual (the reported
 * reconstruction errors equal the discarded singular values' share, computed here with
 * LAPACK in double), reset the Adam moments of refit tensors, and leave a second event on
 * the same features unchanged (min-gain hysteresis).
 * Expert-parallel (`test_recluster --mpi` on 4 ranks, started by the test itself): the event
 * on 4 ranks gives bitwise the 1-rank event (partition, statistics, every expert's weights and
 * Adam moments, with and without the Adam reset, randomised SVD), and the bytes it sends are
 * all booked to phase recluster and equal the analytic volume: the features of this rank's
 * experts to every other rank, the rows of members that change rank, and the refit groups'
 * error statistics; far below the old all-gather of every expert's weights and moments; the
 * same in clustering.mode masters (members carry their masters and all their moments).
 * Masters mode positive control (one rank): 16 experts whose masters form 4 planted clusters,
 * grouped so that every group mixes them, are regrouped to the planted partition (Jaccard 1)
 * with every master and its Adam moments unchanged, the projection error falls, and a planted
 * drift (two experts of different groups exchange their masters) makes the next event move
 * exactly those two. */
#include <lapacke.h>
#include <math.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "compress.h"
#include "config.h"
#include "harness.h"
#include "model.h"
#include "cluster.h"
#include "recluster.h"

/* the best relative rank-r error of W_i [m, n] around the exact member mean of its group
 * (Eckart-Young): sqrt(sum_{k > r} s_k^2) / |W_i|_F with s the singular values of
 * W_i - mean_q W_q, from LAPACK's double-precision SVD */
static double best_rank_err(const float *W /* [E, m, n] */, const int32_t *mem, int K, int i, int m, int n, int r) {
    size_t mn = (size_t)m * n;
    double *R = malloc(sizeof(double) * mn), *s = malloc(sizeof(double) * (size_t)(m < n ? m : n));
    double den = 0;
    for (size_t j = 0; j < mn; j++) {
        double mean = 0;
        for (int q = 0; q < K; q++) mean += W[(size_t)mem[q] * mn + j];
        mean /= K;
        R[j] = W[(size_t)i * mn + j] - mean;
        den += (double)W[(size_t)i * mn + j] * W[(size_t)i * mn + j];
    }
    int info = (int)LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'N', m, n, R, n, s, NULL, m, NULL, n);
    double tail = 0;
    for (int k = r; k < (m < n ? m : n); k++) tail += s[k] * s[k];
    free(R); free(s);
    return info == 0 ? sqrt(tail / den) : -1;
}

/* ---- expert-parallel: run as `test_recluster --mpi` on 4 ranks ---- */

static int mpi_fails = 0;
static void mpi_check(int cond, int rank, const char *what) {
    if (cond) return;
    if (mpi_fails < 8) fprintf(stderr, "rank %d: %s\n", rank, what);
    mpi_fails++;
}

static void mpi_config(Config *cfg, int reset_adam, int masters) {
    config_defaults(cfg);
    cfg->model.d_model = 16; cfg->model.n_layer = 1; cfg->model.n_head = 2; cfg->model.seq_len = 8;
    cfg->moe.kind = MOE_KIND_CLUSTERED; cfg->moe.n_experts = 16; cfg->moe.n_groups = 8; cfg->moe.top_k = 2;
    cfg->moe.d_ff_expert = 12; cfg->moe.rank = 3;
    cfg->clustering.alpha = 0.3; cfg->clustering.min_gain = 0.02; cfg->clustering.svd = SVD_KIND_RANDOMIZED;
    cfg->clustering.proj_dim = 16; cfg->clustering.reset_adam = reset_adam;
    if (masters) cfg->clustering.mode = CLUSTER_MODE_MASTERS;
}

/* a value for canonical element j of an Adam moment array a (distinct everywhere) */
static float moment_value(int a, size_t j) { return (float)(a + 1) * 1e-3f + 1e-6f * (float)(j % 100003); }

/* the canonical (all-experts) layout of a one-rank model's expert array loc -> full [n_expert_full] */
static float *canonical(const Model *M, const float *loc) {
    float *full = calloc(M->n_expert_full, sizeof(float));
    for (int i = 0; i < M->n_tensors; i++) {
        const ParamTensor *t = &M->tensors[i];
        if (!t->ep_unit) continue;
        size_t row = t->n / t->dims[0];
        for (int q = 0; q < t->dims[0]; q++)
            memcpy(full + t->full_offset + (size_t)model_ep_row(M, t, 0, q) * row, loc + t->offset + (size_t)q * row,
                   sizeof(float) * row);
    }
    return full;
}

/* an event on 4 ranks (model m4 over world) against the same event on one rank (m1, the
 * canonical layout); returns through mpi_check */
static void mpi_case(Comm *world, const Backend *be, int reset_adam, int masters) {
    Config cfg;
    mpi_config(&cfg, reset_adam, masters);
    Comm single;
    comm_single_init(&single);
    Model m4, m1;
    Status st = model_init(&m4, &cfg, 20, 0, 2, be, world);
    ASSERTF(STATUS_OK(st), "%s", st.msg);
    st = model_init(&m1, &cfg, 20, 0, 2, be, &single);
    ASSERTF(STATUS_OK(st), "%s", st.msg);
    model_init_params(&m4);
    model_init_params(&m1);
    recluster_project(&m4, 0, NULL, NULL);   /* masters mode: the initial projection (else a no-op) */
    recluster_project(&m1, 0, NULL, NULL);
    Comm *ec = m4.ep_comm ? m4.ep_comm : world;
    int P = ec->size, me = ec->rank;
    const MoeLayer *f = &m4.ffn[0];
    int E = f->E, G = f->G, K = f->K, D = f->D, F = f->F, F1 = f->F1, r = f->r;
    ClusterState *c4 = &m4.cstate[0], *c1 = &m1.cstate[0];
    EpMap *em = &m4.ep[0];
    /* Adam moments get distinct values by canonical position, in both models' slots */
    const Model *both[2] = {&m1, &m4};
    for (int k = 0; k < 2; k++) {
        const Model *M = both[k];
        for (int i = 0; i < M->n_tensors; i++) {
            const ParamTensor *t = &M->tensors[i];
            if (!t->ep_unit) continue;
            size_t row = t->n / t->dims[0];
            for (int q = 0; q < t->dims[0]; q++) {
                size_t lo = t->offset + (size_t)q * row, co = t->full_offset + (size_t)model_ep_row(M, t, k ? me : 0, q) * row;
                for (size_t j = 0; j < row; j++) {
                    M->adam_m[PCAT_EXPERT][lo + j] = moment_value(0, co + j);
                    M->adam_v[PCAT_EXPERT][lo + j] = moment_value(1, co + j);
                }
            }
        }
    }
    int same_init = 1;
    float *cw = canonical(&m1, m1.params[PCAT_EXPERT]);
    for (int i = 0; i < m4.n_tensors; i++) {
        const ParamTensor *t = &m4.tensors[i];
        if (!t->ep_unit) continue;
        size_t row = t->n / t->dims[0];
        for (int q = 0; q < t->dims[0]; q++) {
            size_t lo = t->offset + (size_t)q * row, co = t->full_offset + (size_t)model_ep_row(&m4, t, me, q) * row;
            same_init &= !memcmp(m4.params[PCAT_EXPERT] + lo, cw + co, sizeof(float) * row);
        }
    }
    mpi_check(same_init, me, "4-rank slots hold the canonical initial weights");
    /* planted centroids: expert i near direction (5 i) mod 8, so every group has to change and
     * members cross ranks */
    int Pm = c4->mu_dim;
    for (int i = 0; i < E; i++)
        for (int j = 0; j < Pm; j++) {
            float v = (j % 8 == (5 * i) % 8 ? 1.0f : 0.0f) + 0.01f * (float)((i * 7 + j * 3) % 5);
            c4->mu[(size_t)i * Pm + j] = v;
            c1->mu[(size_t)i * Pm + j] = v;
        }
    int32_t *old = malloc(sizeof(int32_t) * E);
    memcpy(old, c4->group_of, sizeof(int32_t) * E);
    int32_t *old_owner = malloc(sizeof(int32_t) * E);
    memcpy(old_owner, em->expert_owner, sizeof(int32_t) * E);
    uint64_t b0[COMM_N_PHASES];
    memcpy(b0, world->stats.bytes, sizeof b0);
    ReclusterEvent e4, e1;
    recluster_run(&m4, 100, &e4);
    recluster_run(&m1, 100, &e1);
    /* identical event */
    mpi_check(e4.accepted && e4.n_moved > 0, me, "the planted partition is accepted and moves experts");
    mpi_check(e4.cost_before == e1.cost_before && e4.cost_after == e1.cost_after && e4.accepted == e1.accepted &&
              e4.n_moved == e1.n_moved && e4.jaccard == e1.jaccard && e4.n_groups_refit == e1.n_groups_refit,
              me, "clustering statistics equal the 1-rank event's (bitwise)");
    mpi_check(e4.recon_err_mean == e1.recon_err_mean && e4.recon_err_max == e1.recon_err_max && e4.recon_err_max > 0,
              me, "global reconstruction errors equal the 1-rank event's (bitwise)");
    mpi_check(!memcmp(c4->group_of, c1->group_of, sizeof(int32_t) * E) &&
              !memcmp(c4->members, c1->members, sizeof(int32_t) * E), me, "group_of and members equal the 1-rank event's");
    /* every slot of this rank holds bitwise the reference's expert (weights, Adam m, v) under the new maps */
    int same_w = 1, same_m = 1;
    free(cw);
    cw = canonical(&m1, m1.params[PCAT_EXPERT]);
    float *cm = canonical(&m1, m1.adam_m[PCAT_EXPERT]), *cv = canonical(&m1, m1.adam_v[PCAT_EXPERT]);
    for (int i = 0; i < m4.n_tensors; i++) {
        const ParamTensor *t = &m4.tensors[i];
        if (!t->ep_unit) continue;
        size_t row = t->n / t->dims[0];
        for (int q = 0; q < t->dims[0]; q++) {
            size_t lo = t->offset + (size_t)q * row, co = t->full_offset + (size_t)model_ep_row(&m4, t, me, q) * row;
            same_w &= !memcmp(m4.params[PCAT_EXPERT] + lo, cw + co, sizeof(float) * row);
            same_m &= !memcmp(m4.adam_m[PCAT_EXPERT] + lo, cm + co, sizeof(float) * row) &&
                      !memcmp(m4.adam_v[PCAT_EXPERT] + lo, cv + co, sizeof(float) * row);
        }
    }
    /* the moments are really kept or reset: a member that crossed ranks carries its own */
    int kept_ok = 1;
    for (int i = 0; i < m4.n_tensors; i++) {
        const ParamTensor *t = &m4.tensors[i];
        if (t->ep_unit != 1) continue;
        size_t row = t->n / t->dims[0];
        for (int q = 0; q < t->dims[0]; q++) {
            int e = model_ep_row(&m4, t, me, q);
            size_t lo = t->offset + (size_t)q * row, co = t->full_offset + (size_t)e * row;
            if (old_owner[e] == me) continue;
            for (size_t j = 0; j < row; j++)
                kept_ok &= m4.adam_m[PCAT_EXPERT][lo + j] == (reset_adam && !masters ? 0.0f : moment_value(0, co + j));
        }
    }
    free(cw); free(cm); free(cv);
    mpi_check(same_w, me, "every expert's refit weights on its owner equal the 1-rank event's (bitwise)");
    mpi_check(same_m, me, "every expert's Adam moments equal the 1-rank event's (bitwise)");
    mpi_check(kept_ok, me, masters ? "masters mode: members that crossed ranks keep their moments (masters and factors)"
                           : reset_adam ? "factor moments of members that crossed ranks are reset"
                                      : "members that crossed ranks keep their own factor moments");
    /* bytes: all in phase recluster, and exactly the analytic volume. Changed groups and
     * members that change rank from the old and new partitions (a group keeps its owner). */
    size_t n1 = (size_t)D * F1, n2 = (size_t)F * D, nf = (size_t)(2 * D + F1 + F) * r;
    size_t El = (size_t)em->per_rank * K, Pw = (size_t)cfg.clustering.proj_dim;
    /* masters mode: the masters [n1 | n2] and the moments of factors and masters, always */
    size_t row = masters ? n1 + n2 + 2 * (nf + n1 + n2) : n1 + n2 + (reset_adam ? 0 : 2 * nf);
    double want = 4.0 * El * Pw * (P - 1);       /* features to every other rank */
    int n_cross = 0, n_changed = 0;
    for (int g = 0; g < G; g++) {
        int chg = 0, o = em->place.owner[g];
        for (int i = 0; i < E; i++) chg |= (old[i] == g) != (c4->group_of[i] == g);
        if (!chg) continue;
        n_changed++;
        if (o == me) want += 16.0 * (P - 1);  /* the group's error sum and max to every other rank */
        for (int i = 0; i < E; i++)
            if (c4->group_of[i] == g && old_owner[i] != o) {
                n_cross++;
                if (old_owner[i] == me) want += 4.0 * row;   /* the member's rows to the new owner */
            }
    }
    mpi_check(n_cross > 0 && n_changed == e4.n_groups_refit, me, "members cross ranks; changed groups = groups refit");
    int other_zero = 1;
    for (int ph = 0; ph < COMM_N_PHASES; ph++)
        if (ph != COMM_PHASE_RECLUSTER) other_zero &= world->stats.bytes[ph] == b0[ph];
    double got = (double)(world->stats.bytes[COMM_PHASE_RECLUSTER] - b0[COMM_PHASE_RECLUSTER]);
    /* the old event: every rank all-gathered the expert category (weights, Adam m and v) */
    double old_gather = 3.0 * 4.0 * (double)m4.n_cat[PCAT_EXPERT] * (P - 1);
    char msg[256];
    snprintf(msg, sizeof msg, "recluster bytes sent %.0f = analytic %.0f (reset_adam %d, masters %d)", got, want,
             reset_adam, masters);
    mpi_check(got == want, me, msg);
    mpi_check(other_zero, me, "no bytes of the event booked to another phase");
    /* half of the experts cross ranks here (a larger share than a typical event moves) */
    snprintf(msg, sizeof msg, "recluster bytes %.0f below 1/5 of the old full gather %.0f", got, old_gather);
    mpi_check(got * 5 < old_gather, me, msg);
    double tot[3] = {got, old_gather, (double)n_cross};
    MPI_Allreduce(MPI_IN_PLACE, tot, 3, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (me == 0)
        printf("# reset_adam %d: %d groups refit, %.0f members crossed ranks; recluster bytes %.0f (all ranks), "
               "old full gather %.0f (%.1f%%)\n", reset_adam, e4.n_groups_refit, tot[2] / P, tot[0], tot[1],
               100 * tot[0] / tot[1]);
    /* a second event on the same features is rejected: only the features travel */
    memcpy(b0, world->stats.bytes, sizeof b0);
    recluster_run(&m4, 200, &e4);
    recluster_run(&m1, 200, &e1);
    got = (double)(world->stats.bytes[COMM_PHASE_RECLUSTER] - b0[COMM_PHASE_RECLUSTER]);
    mpi_check(!e4.accepted && !e1.accepted && got == 4.0 * El * Pw * (P - 1),
              me, "a rejected event sends only the features");
    free(old); free(old_owner);
    model_free(&m4);
    model_free(&m1);
    comm_free(&single);
}

static int mpi_child(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    Comm world;
    Status s = comm_mpi_init(&world);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    Backend be;
    s = backend_cpu_init(&be, 1);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    mpi_case(&world, &be, 1, 0);
    mpi_case(&world, &be, 0, 0);
    mpi_case(&world, &be, 1, 1);
    int all = 0;
    MPI_Allreduce(&mpi_fails, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (world.rank == 0) printf("# expert-parallel event: %d mismatch(es) over %d ranks\n", all, world.size);
    backend_free(&be);
    MPI_Finalize();
    return all ? 1 : 0;
}

static void test_mpi_event(const char *self) {
    if (system("command -v mpirun > /dev/null 2>&1") != 0) {
        printf("# mpirun not found: the expert-parallel event is not checked\n");
        return;
    }
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --allow-run-as-root --oversubscribe "
             "-n 4 %s --mpi", self);
    int rc = system(cmd);
    ok(rc == 0, "expert-parallel event on 4 ranks: bitwise the 1-rank event (weights, Adam moments, statistics), "
       "every byte in phase recluster and equal to the analytic volume, < 1/5 of the old full gather (rc %d)", rc);
}

/* ---- clustering.mode masters: the positive control (issue 14 item 5) ---- */

/* the rows of expert i's masters (m1 then m2) in the local slots of a one-rank model's array */
static void master_rows(const Model *m, const float *arr, int i, float *out /* [n1 + n2] */) {
    const MoeLayer *f = &m->ffn[0];
    size_t n1 = (size_t)f->D * f->F1, n2 = (size_t)f->F * f->D;
    int s = m->ep[0].expert_lslot[i];
    memcpy(out, arr + (m->p.layers[0].ffn.w1 - m->params[PCAT_EXPERT]) + (size_t)s * n1, sizeof(float) * n1);
    memcpy(out + n1, arr + (m->p.layers[0].ffn.w2 - m->params[PCAT_EXPERT]) + (size_t)s * n2, sizeof(float) * n2);
}

static void master_set(Model *m, float *arr, int i, const float *in) {
    const MoeLayer *f = &m->ffn[0];
    size_t n1 = (size_t)f->D * f->F1, n2 = (size_t)f->F * f->D;
    int s = m->ep[0].expert_lslot[i];
    memcpy(arr + (m->p.layers[0].ffn.w1 - m->params[PCAT_EXPERT]) + (size_t)s * n1, in, sizeof(float) * n1);
    memcpy(arr + (m->p.layers[0].ffn.w2 - m->params[PCAT_EXPERT]) + (size_t)s * n2, in + n1, sizeof(float) * n2);
}

static double jaccard_to(const int32_t *ref, const int32_t *group_of, int E, int G) {
    int32_t *cur = malloc(sizeof(int32_t) * E);
    memcpy(cur, group_of, sizeof(int32_t) * E);
    cluster_match_ids(ref, cur, E, G);
    double j = cluster_jaccard(ref, cur, E, G);
    free(cur);
    return j;
}

/* 16 experts whose masters are 4 planted clusters (expert i in cluster i % 4), grouped
 * contiguously, so every group holds one expert of each cluster: the event regroups them to
 * the planted partition (Jaccard 1), every master and its Adam moments move unchanged, and the
 * projection error of the new groups is far below the wrong grouping's. Then a planted drift:
 * two experts of different groups exchange their masters; the next event moves them. */
static void test_masters_planted(Comm *comm, const Backend *be) {
    Config cfg;
    config_defaults(&cfg);
    cfg.model.d_model = 16; cfg.model.n_layer = 1; cfg.model.n_head = 2; cfg.model.seq_len = 8;
    cfg.moe.kind = MOE_KIND_CLUSTERED; cfg.moe.n_experts = 16; cfg.moe.n_groups = 4; cfg.moe.top_k = 2;
    cfg.moe.d_ff_expert = 12; cfg.moe.rank = 3;
    cfg.clustering.mode = CLUSTER_MODE_MASTERS;
    cfg.clustering.alpha = 1.0;   /* the masters' features alone (no activation evidence) */
    cfg.clustering.min_gain = 0.02; cfg.clustering.svd = SVD_KIND_EXACT; cfg.clustering.proj_dim = 64;
    Model m;
    Status st = model_init(&m, &cfg, 20, 0, 2, be, comm);
    ok(STATUS_OK(st), "masters: model_init (%s)", st.msg);
    if (!STATUS_OK(st)) return;
    model_init_params(&m);
    const MoeLayer *f = &m.ffn[0];
    ClusterState *cs = &m.cstate[0];
    int E = f->E, G = f->G, K = f->K;
    size_t n1 = (size_t)f->D * f->F1, n2 = (size_t)f->F * f->D, nw = n1 + n2;
    /* planted: 4 centres, each master = its centre + 5% noise; Adam moments distinct per element */
    Rng rng;
    rng_init(&rng, 3, 0, RNG_TEST);
    float *C = malloc(sizeof(float) * 4 * nw), *row = malloc(sizeof(float) * nw);
    for (size_t j = 0; j < 4 * nw; j++) C[j] = rng_normal(&rng);
    int32_t planted[16];
    for (int i = 0; i < E; i++) {
        planted[i] = i % 4;
        for (size_t j = 0; j < nw; j++) row[j] = C[(size_t)planted[i] * nw + j] + 0.05f * rng_normal(&rng);
        master_set(&m, m.params[PCAT_EXPERT], i, row);
        for (size_t j = 0; j < nw; j++) row[j] = 1e-3f * (float)(i + 1) + 1e-7f * (float)j;
        master_set(&m, m.adam_m[PCAT_EXPERT], i, row);
        master_set(&m, m.adam_v[PCAT_EXPERT], i, row);
    }
    double e0[1], x0[1];
    recluster_project(&m, 0, e0, x0);
    double j0 = jaccard_to(planted, cs->group_of, E, G);
    ok(j0 < 0.5, "masters: the contiguous grouping mixes the planted clusters (Jaccard %.3f)", j0);
    float *before = malloc(sizeof(float) * E * nw), *mb = malloc(sizeof(float) * E * nw);
    for (int i = 0; i < E; i++) {
        master_rows(&m, m.params[PCAT_EXPERT], i, before + (size_t)i * nw);
        master_rows(&m, m.adam_m[PCAT_EXPERT], i, mb + (size_t)i * nw);
    }
    ReclusterEvent ev;
    recluster_run(&m, 100, &ev);
    double j1 = jaccard_to(planted, cs->group_of, E, G);
    ok(ev.accepted && ev.n_moved > 0 && j1 == 1.0, "masters: the event moves %d experts to the planted partition "
       "(Jaccard %.3f -> %.3f; cost %.4f -> %.4f)", ev.n_moved, j0, j1, ev.cost_before, ev.cost_after);
    ok(ev.w_cos_within < 0.1 && ev.w_cos_cross < 0.1, "masters: centred features do not confirm the grouping (mean "
       "cosine within %.3f, across %.3f)", ev.w_cos_within, ev.w_cos_cross);
    int same = 1, same_m = 1;
    for (int i = 0; i < E; i++) {
        master_rows(&m, m.params[PCAT_EXPERT], i, row);
        same &= !memcmp(row, before + (size_t)i * nw, sizeof(float) * nw);
        master_rows(&m, m.adam_m[PCAT_EXPERT], i, row);
        same_m &= !memcmp(row, mb + (size_t)i * nw, sizeof(float) * nw);
    }
    ok(same && same_m, "masters: every expert's masters and Adam moments are bitwise the same after the move");
    ok(ev.recon_err_max < 0.2 * e0[0], "masters: projection error of the regrouped experts %.4f (max), was %.4f "
       "(mean) under the wrong grouping", ev.recon_err_max, e0[0]);
    /* the projection of every group: base = the member mean of the masters */
    const MoeParams *p = &m.p.layers[0].ffn;
    double maxd = 0;
    for (int u = 0; u < G; u++)
        for (size_t j = 0; j < n1; j++) {
            double mean = 0;
            for (int q = 0; q < K; q++) mean += p->w1[(size_t)(u * K + q) * n1 + j] / K;
            double d = fabs(mean - p->base1[(size_t)u * n1 + j]);
            if (d > maxd) maxd = d;
        }
    ok(maxd < 1e-5, "masters: bases after the event are the member means of the masters (max diff %.2e)", maxd);
    /* a second event on the same masters: nothing to gain */
    recluster_run(&m, 200, &ev);
    ok(!ev.accepted && ev.n_moved == 0, "masters: a second event on unchanged masters moves nothing");
    /* planted drift: experts a and b (different groups) exchange their masters */
    int a = cs->members[0], b = cs->members[K];
    int ga = cs->group_of[a], gb = cs->group_of[b];
    float *ra = malloc(sizeof(float) * nw), *rb = malloc(sizeof(float) * nw);
    master_rows(&m, m.params[PCAT_EXPERT], a, ra);
    master_rows(&m, m.params[PCAT_EXPERT], b, rb);
    master_set(&m, m.params[PCAT_EXPERT], a, rb);
    master_set(&m, m.params[PCAT_EXPERT], b, ra);
    recluster_project(&m, 250, NULL, NULL);
    recluster_run(&m, 300, &ev);
    ok(ev.accepted && ev.n_moved == 2 && cs->group_of[a] == gb && cs->group_of[b] == ga,
       "masters: a planted drift (experts %d and %d exchange masters) makes the next event move them (moved %d; "
       "groups %d,%d -> %d,%d)", a, b, ev.n_moved, ga, gb, cs->group_of[a], cs->group_of[b]);
    free(C); free(row); free(before); free(mb); free(ra); free(rb);
    model_free(&m);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--mpi") == 0) return mpi_child(argc, argv);
    Comm comm;
    comm_single_init(&comm);
    Backend be;
    backend_cpu_init(&be, 1);
    Config cfg;
    config_defaults(&cfg);
    cfg.model.d_model = 16; cfg.model.n_layer = 1; cfg.model.n_head = 2; cfg.model.seq_len = 8;
    cfg.moe.kind = MOE_KIND_CLUSTERED; cfg.moe.n_experts = 8; cfg.moe.n_groups = 2; cfg.moe.top_k = 2;
    cfg.moe.d_ff_expert = 12; cfg.moe.rank = 3;
    cfg.clustering.alpha = 0.0; cfg.clustering.min_gain = 0.02; cfg.clustering.svd = SVD_KIND_EXACT;
    cfg.clustering.proj_dim = 0;
    Model m;
    Status st = model_init(&m, &cfg, 20, 0, 2, &be, &comm);
    ok(STATUS_OK(st), "model_init (%s)", st.msg);
    model_init_params(&m);
    for (int c = 0; c < PCAT_N; c++)
        for (size_t i = 0; i < m.n_cat[c]; i++) { m.adam_m[c][i] = 1.0f; m.adam_v[c][i] = 1.0f; }
    ClusterState *cs = &m.cstate[0];
    const MoeLayer *f = &m.ffn[0];
    int E = f->E, D = f->D, F = f->F, F1 = f->F1, r = f->r, Pm = cs->mu_dim;
    ok(cs->group_of[0] == 0 && cs->group_of[7] == 1, "initial groups are contiguous");
    /* planted centroids: even experts near e0, odd experts near e1 */
    for (int i = 0; i < E; i++)
        for (int j = 0; j < Pm; j++) cs->mu[(size_t)i * Pm + j] = (j == (i % 2) ? 1.0f : 0.0f) + 0.01f * (float)((i * 7 + j * 3) % 5);
    /* the reconstructed weights before the event */
    const LayerParams *lp = &m.p.layers[0];
    size_t n1 = (size_t)D * F1, n2 = (size_t)F * D;
    float *W1 = malloc(sizeof(float) * E * n1), *W2 = malloc(sizeof(float) * E * n2);
    for (int i = 0; i < E; i++) {
        int g = cs->group_of[i];
        compress_reconstruct(lp->ffn.base1 + g * n1, lp->ffn.a1 + (size_t)i * D * r, lp->ffn.b1 + (size_t)i * F1 * r, D, F1, r, W1 + i * n1);
        compress_reconstruct(lp->ffn.base2 + g * n2, lp->ffn.a2 + (size_t)i * F * r, lp->ffn.b2 + (size_t)i * D * r, F, D, r, W2 + i * n2);
    }
    ReclusterEvent ev;
    int n = recluster_run(&m, 100, &ev);
    ok(n == 1, "one clustered layer processed");
    ok(ev.accepted == 1 && ev.n_moved > 0, "event accepted, %d experts moved (cost %.4f -> %.4f)", ev.n_moved, ev.cost_before, ev.cost_after);
    int parity_ok = 1, count[2] = {0, 0};
    for (int i = 0; i < E; i++) {
        parity_ok &= cs->group_of[i] == cs->group_of[i % 2];
        count[cs->group_of[i]]++;
    }
    ok(parity_ok && cs->group_of[0] != cs->group_of[1], "planted partition recovered (even / odd experts)");
    ok(count[0] == 4 && count[1] == 4, "groups balanced (%d, %d)", count[0], count[1]);
    int mem_ok = 1;
    for (int g = 0; g < 2; g++)
        for (int q = 0; q < 4; q++) mem_ok &= cs->group_of[cs->members[g * 4 + q]] == g && (q == 0 || cs->members[g * 4 + q] > cs->members[g * 4 + q - 1]);
    ok(mem_ok, "members lists match group_of, ascending");
    ok(ev.n_groups_refit == 2, "both groups refit (%d)", ev.n_groups_refit);
    /* with exact SVD every refit expert's error is the Eckart-Young optimum of its residual:
     * the event reports the mean and max over the 8 experts x 2 matrices of both refit groups.
     * The refit runs in float (float mean, sgesdd, float reconstruction), which moves a
     * relative error by a few float32 epsilons (6e-8) times a small dimension-dependent factor
     * (m, n <= 24), at most ~1e-6 (observed ~1e-9); 1e-5 keeps a 10x margin over that and is
     * 4 orders of magnitude below the errors themselves (~0.5) */
    double want_max = 0, want_sum = 0, err_i0_w1 = -1;
    int n_err = 0;
    for (int i = 0; i < E; i++) {
        const int32_t *mem = cs->members + (size_t)cs->group_of[i] * 4;
        double e1 = best_rank_err(W1, mem, 4, i, D, F1, r), e2 = best_rank_err(W2, mem, 4, i, F, D, r);
        if (i == cs->members[4]) err_i0_w1 = e1;
        want_sum += e1 + e2;
        n_err += 2;
        if (e1 > want_max) want_max = e1;
        if (e2 > want_max) want_max = e2;
    }
    double want_mean = want_sum / n_err;
    ok(fabs(ev.recon_err_max - want_max) <= 1e-5 && fabs(ev.recon_err_mean - want_mean) <= 1e-5,
       "reconstruction error: max %.6f mean %.6f reported, best rank-%d fit gives max %.6f mean %.6f (diffs %.1e %.1e)",
       ev.recon_err_max, ev.recon_err_mean, r, want_max, want_mean, fabs(ev.recon_err_max - want_max),
       fabs(ev.recon_err_mean - want_mean));
    /* base = member mean of the old reconstructed weights */
    double maxd = 0;
    for (int g = 0; g < 2; g++) {
        for (size_t j = 0; j < n1; j++) {
            double mean = 0;
            for (int q = 0; q < 4; q++) mean += W1[(size_t)cs->members[g * 4 + q] * n1 + j] / 4.0;
            double d = fabs(mean - lp->ffn.base1[g * n1 + j]);
            if (d > maxd) maxd = d;
        }
    }
    ok(maxd < 1e-5, "new up-projection bases are the member means (max diff %.2e)", maxd);
    /* with exact SVD the refit error equals the best rank-r error of W_i - base: check one expert */
    /* after the event the rank's slots follow the new membership: expert i0 lives in local
     * slot expert_lslot[i0] (group slot * K + position) */
    int i0 = cs->members[4], s0 = m.ep[0].expert_lslot[i0];
    ok(s0 == m.ep[0].place.slot[1] * 4, "expert %d (first member of group 1) is in local slot %d", i0, s0);
    float *Wn = malloc(sizeof(float) * n1);
    compress_reconstruct(lp->ffn.base1 + (size_t)m.ep[0].place.slot[1] * n1, lp->ffn.a1 + (size_t)s0 * D * r,
                         lp->ffn.b1 + (size_t)s0 * F1 * r, D, F1, r, Wn);
    double num = 0, den = 0;
    for (size_t j = 0; j < n1; j++) { double d = Wn[j] - W1[(size_t)i0 * n1 + j]; num += d * d; den += (double)W1[(size_t)i0 * n1 + j] * W1[(size_t)i0 * n1 + j]; }
    /* the same float-vs-double margin as above */
    ok(fabs(sqrt(num / den) - err_i0_w1) <= 1e-5, "expert %d reconstructs with its best rank-%d error (%.6f vs %.6f)", i0, r,
       sqrt(num / den), err_i0_w1);
    /* Adam moments of refit tensors are reset, others untouched */
    size_t off_b1 = (size_t)(lp->ffn.base1 - m.params[PCAT_EXPERT]);
    ok(m.adam_m[PCAT_EXPERT][off_b1] == 0.0f && m.adam_v[PCAT_EXPERT][off_b1] == 0.0f, "Adam moments of refit bases reset");
    ok(m.adam_m[PCAT_DENSE][0] == 1.0f, "Adam moments of dense parameters untouched");
    /* a second event on the same features keeps the partition (min-gain) */
    int32_t before[8];
    memcpy(before, cs->group_of, sizeof before);
    float *snap = malloc(sizeof(float) * m.n_cat[PCAT_EXPERT]);
    memcpy(snap, m.params[PCAT_EXPERT], sizeof(float) * m.n_cat[PCAT_EXPERT]);
    recluster_run(&m, 200, &ev);
    ok(ev.accepted == 0 && ev.n_moved == 0 && !memcmp(before, cs->group_of, sizeof before),
       "second event on unchanged features rejected by min-gain (cost %.4f vs %.4f)", ev.cost_before, ev.cost_after);
    ok(!memcmp(snap, m.params[PCAT_EXPERT], sizeof(float) * m.n_cat[PCAT_EXPERT]), "weights unchanged by a rejected event");
    free(W1); free(W2); free(Wn); free(snap);
    model_free(&m);
    test_masters_planted(&comm, &be);
    backend_free(&be);
    test_mpi_event(argv[0]);
    return harness_done();
}
