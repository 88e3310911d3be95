/* test_recluster: the re-clustering event on a real clustered model. Planted activation
 * centroids (alpha = 0) force a new partition; the event must accept it, move the experts,
 * keep groups balanced, refit each changed group so that its base is the member mean of the
 * reconstructed weights and its factors the best rank-r fit of the residual (the reported
 * reconstruction errors equal the discarded singular values' share, computed here with
 * LAPACK in double), reset the Adam moments of refit tensors, and leave a second event on
 * the same features unchanged (min-gain hysteresis). */
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "compress.h"
#include "config.h"
#include "harness.h"
#include "model.h"
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

int main(void) {
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
    backend_free(&be);
    return harness_done();
}
