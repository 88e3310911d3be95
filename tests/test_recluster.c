/* test_recluster: the re-clustering event on a real clustered model. Planted activation
 * centroids (alpha = 0) force a new partition; the event must accept it, move the experts,
 * keep groups balanced, refit each changed group so that its base is the member mean of the
 * reconstructed weights, reset the Adam moments of refit tensors, and leave a second event on
 * the same features unchanged (min-gain hysteresis). */
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
    ok(ev.recon_err_mean > 0 && ev.recon_err_max < 1.0, "reconstruction error reported (mean %.3f, max %.3f)", ev.recon_err_mean, ev.recon_err_max);
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
    ok(sqrt(num / den) <= ev.recon_err_max + 1e-6, "expert %d reconstructs within the reported error (%.4f)", i0, sqrt(num / den));
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
