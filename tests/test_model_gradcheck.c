/* test_model_gradcheck: the whole model's backward (cross-entropy + Switch aux loss +
 * router z-loss, through attention, LayerNorm, dense or MoE FFN, the tied LM head or the
 * classification head) against central finite differences of the loss, for every
 * parameter tensor: a directional derivative along a random direction per tensor and the
 * largest-gradient coordinates of each tensor. Aux-loss-free cases start from a non-zero
 * selection bias, so the checked routing is the biased one.
 * clustering.mode masters (the clustered layer trains per-expert masters through their
 * projection, gradient straight through): with the exact SVD at full rank r = min(D, F) the
 * projection reproduces the masters, so the straight-through gradient is the true gradient of
 * loss(project(masters)); the finite differences re-project after every perturbation (as a
 * project_interval of 1 would), and the projection's own tensors (derived, never trained)
 * must get exactly zero gradient (perturbing them changes nothing once re-projected).
 * Also: moe.balance = aux_free on the standard layer (selection biased, gates not; the bias
 * update drives a deliberately skewed router's load MaxVio down). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "harness.h"
#include "model.h"
#include "recluster.h"

typedef struct Case {
    const char *name;
    int kind, act, task, pooling, dropless, renorm;
    double cf, z;
    int top_groups, group_score, balance;   /* clustered */
    int group_gate;                         /* clustered: renorm (0) or product */
    int masters;                            /* clustered: clustering.mode masters, full rank, exact SVD */
} Case;

/* routing signature of the last forward: a hash of every MoE layer's chosen experts and
 * kept/dropped positions. Finite differences are only valid when it does not change. */
static uint32_t routing_sig(const Model *m) {
    uint32_t h = 0;
    for (int l = 0; l < m->L; l++) {
        const MoeState *st = &m->acts[l].moe;
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        size_t n = (size_t)st->N * m->ffn[l].k;
        h = crc32_update(h, st->topk_expert, sizeof(int32_t) * n);
        h = crc32_update(h, st->pos, sizeof(int32_t) * n);
    }
    return h;
}

static uint32_t sig0;
static int sig_changed;

static double loss_at(Model *m, const int32_t *in, const int32_t *tg, const int32_t *len, int B, long ng) {
    recluster_project(m, 0, NULL, NULL);   /* masters mode: the projection of the (perturbed) masters */
    double L = model_forward(m, in, tg, len, B, ng);
    if (routing_sig(m) != sig0) sig_changed = 1;
    return L;
}

static void run_case(const Case *c, Comm *comm, const Backend *be) {
    Config cfg;
    config_defaults(&cfg);
    cfg.model.d_model = 16; cfg.model.n_layer = 2; cfg.model.n_head = 2; cfg.model.seq_len = 8;
    cfg.model.activation = c->act; cfg.model.task = c->task; cfg.model.pooling = c->pooling;
    cfg.model.init_std = 0.3;  /* large enough that every path carries gradient */
    cfg.moe.kind = c->kind; cfg.moe.n_experts = 4; cfg.moe.top_k = 2; cfg.moe.d_ff_expert = 8;
    cfg.moe.every = 1; cfg.moe.capacity_factor = c->cf; cfg.moe.dropless = c->dropless;
    cfg.moe.aux_loss_coef = 0.05; cfg.moe.z_loss_coef = c->z; cfg.moe.renormalize = c->renorm;
    cfg.moe.n_groups = 2; cfg.moe.rank = 2; cfg.moe.group_aux_coef = 0.05;
    cfg.moe.top_groups = c->top_groups ? c->top_groups : 1;
    cfg.moe.group_score = c->group_score; cfg.moe.balance = c->balance;
    cfg.moe.group_gate = c->group_gate;
    cfg.moe.group_capacity_factor = c->cf;
    cfg.run.seed = 7;
    if (c->masters) {   /* r = min(D, F) = 8 with GELU (W1 [16, 8], W2 [8, 16]): the projection is exact */
        cfg.clustering.mode = CLUSTER_MODE_MASTERS;
        cfg.clustering.svd = SVD_KIND_EXACT;
        cfg.moe.rank = 8;
    }
    int V = 29, B = 3, T = 8, C = 3;
    Model m;
    Status st = model_init(&m, &cfg, V, C, B, be, comm);
    ok(STATUS_OK(st), "%s: model_init (%s)", c->name, st.msg);
    if (!STATUS_OK(st)) return;
    model_init_params(&m);
    if (c->balance == BALANCE_AUX_FREE)   /* a bias that changes the top-k of some tokens */
        for (int l = 0; l < m.L; l++)
            if (m.ffn[l].cs)
                for (int e = 0; e < m.ffn[l].E; e++) m.ffn[l].cs->bias[e] = 0.4f * (float)((e * 7 + l) % 4) - 0.6f;
    Rng r;
    rng_init(&r, 99, 0, RNG_TEST);
    int32_t in[3 * 8], tg[3 * 8], len[3] = {8, 5, 1};
    for (int i = 0; i < B * T; i++) { in[i] = (int32_t)rng_below(&r, V); tg[i] = (int32_t)rng_below(&r, V); }
    if (c->task == TASK_CLASSIFY) for (int b = 0; b < B; b++) tg[b] = (int32_t)rng_below(&r, C);
    else tg[5] = -1;   /* an ignored target */
    long ng = c->task == TASK_LM ? B * T - 1 : B;

    if (c->masters) {
        /* the initial projection, and how exact it is (relative error per expert and matrix) */
        double em[2], ex[2];
        int n = recluster_project(&m, 0, em, ex);
        ok(n == 2 && ex[0] < 1e-5 && ex[1] < 1e-5, "%s: full-rank projection reproduces the masters (max rel err "
           "%.2e, %.2e)", c->name, ex[0], ex[1]);
        int nd = 0, nm = 0;
        for (int ti = 0; ti < m.n_tensors; ti++) {
            nd += m.tensors[ti].derived;
            nm += m.tensors[ti].kind == PARAM_EXPERT;
        }
        ok(nd == 12 && nm == 4, "%s: 6 derived projection tensors and 2 master tensors per layer (%d, %d)", c->name, nd, nm);
    }
    model_zero_grad(&m);
    double L0 = loss_at(&m, in, tg, len, B, ng);
    sig0 = routing_sig(&m);
    model_backward(&m, ng);
    int n_skipped = 0, n_probes = 0;
    if (c->kind != MOE_KIND_DENSE && !c->dropless)
        printf("# %s: dropped fraction layer0 %.3f (groups %.3f)\n", c->name, m.acts[0].moe.stats.dropped_frac,
               m.acts[0].moe.stats.group_dropped_frac);
    int n_bad_dir = 0, n_bad_coord = 0, n_checked = 0;
    double worst = 0;
    for (int ti = 0; ti < m.n_tensors; ti++) {
        const ParamTensor *t = &m.tensors[ti];
        float *p = m.params[t->cat] + t->offset;
        const float *g = m.grads[t->cat] + t->offset;
        /* directional derivative along dir = (g/|g| + r/|r|)/2 with r random: half of it
         * along the gradient keeps the signal far above float32 noise, the random half
         * catches errors orthogonal to g. h is small so routing decisions do not flip. */
        float *dir = malloc(sizeof(float) * t->n), *save = malloc(sizeof(float) * t->n);
        double rn = 0, gn = 0, gd = 0;
        for (size_t j = 0; j < t->n; j++) {
            dir[j] = rng_normal(&r);
            rn += (double)dir[j] * dir[j];
            gn += (double)g[j] * g[j];
        }
        rn = sqrt(rn); gn = sqrt(gn) + 1e-30;
        for (size_t j = 0; j < t->n; j++) {
            dir[j] = (float)(0.5 * g[j] / gn + 0.5 * dir[j] / rn);
            gd += (double)g[j] * dir[j];
        }
        memcpy(save, p, sizeof(float) * t->n);
        /* shrink h until the routing is the same at +h and -h (a flipped top-k choice is a
         * jump, not a derivative); give up on this probe below 1e-5 */
        double fd = 0, h = 1e-3;
        for (;;) {
            sig_changed = 0;
            for (size_t j = 0; j < t->n; j++) p[j] = save[j] + (float)h * dir[j];
            double lp = loss_at(&m, in, tg, len, B, ng);
            for (size_t j = 0; j < t->n; j++) p[j] = save[j] - (float)h * dir[j];
            double lm = loss_at(&m, in, tg, len, B, ng);
            fd = (lp - lm) / (2 * h);
            if (!sig_changed || h < 1e-5) break;
            h /= 4;
        }
        memcpy(p, save, sizeof(float) * t->n);
        n_probes++;
        if (sig_changed) { n_skipped++; free(dir); free(save); continue; }
        double err = fabs(fd - gd), tol = 5e-3 * fabs(fd) + 1e-4;
        if (err > tol) {
            n_bad_dir++;
            printf("#   %s %s: directional fd %.6e analytic %.6e (err %.2e)\n", c->name, t->name, fd, gd, err);
        }
        if (err / (fabs(fd) + 1e-6) > worst) worst = err / (fabs(fd) + 1e-6);
        /* the three largest-gradient coordinates */
        size_t top[3] = {0, 0, 0};
        for (int q = 0; q < 3; q++) {
            double bv = -1;
            for (size_t j = 0; j < t->n; j++) {
                if ((q > 0 && j == top[0]) || (q > 1 && j == top[1])) continue;
                if (fabs(g[j]) > bv) { bv = fabs(g[j]); top[q] = j; }
            }
        }
        for (int q = 0; q < 3 && (size_t)q < t->n; q++) {
            size_t j = top[q];
            float s0 = p[j];
            double hc = 1e-3, fdc = 0;
            for (;;) {
                sig_changed = 0;
                p[j] = s0 + (float)hc; double a = loss_at(&m, in, tg, len, B, ng);
                p[j] = s0 - (float)hc; double b2 = loss_at(&m, in, tg, len, B, ng);
                double hreal = ((double)(s0 + (float)hc) - (double)(s0 - (float)hc)) / 2;
                fdc = (a - b2) / (2 * hreal);
                if (!sig_changed || hc < 1e-5) break;
                hc /= 4;
            }
            p[j] = s0;
            n_probes++;
            if (sig_changed) { n_skipped++; continue; }
            double e2 = fabs(fdc - g[j]);
            n_checked++;
            if (e2 > 1e-2 * fabs(fdc) + 1e-4) {
                n_bad_coord++;
                printf("#   %s %s[%zu]: fd %.6e analytic %.6e\n", c->name, t->name, j, fdc, (double)g[j]);
            }
        }
        free(dir); free(save);
    }
    ok(n_bad_dir == 0, "%s: directional derivatives of all %d tensors (loss %.5f, worst rel err %.2e)",
       c->name, m.n_tensors, L0, worst);
    ok(n_bad_coord == 0, "%s: %d single coordinates", c->name, n_checked);
    ok(n_skipped * 10 <= n_probes, "%s: %d of %d probes skipped because the routing flipped (<= 10%% allowed)",
       c->name, n_skipped, n_probes);
    /* backward accumulates: a second backward doubles the gradients */
    float g0 = m.grads[0][0];
    model_forward(&m, in, tg, len, B, ng);
    model_backward(&m, ng);
    ok(fabsf(m.grads[0][0] - 2 * g0) <= 1e-6f + 1e-5f * fabsf(g0), "%s: backward accumulates", c->name);
    model_free(&m);
}

/* ---- moe.balance = aux_free on the standard layer, driven directly ---- */

enum { BR_D = 8, BR_E = 4, BR_K = 2, BR_F = 6, BR_N = 64 };

typedef struct BalanceRig {
    MoeLayer ml;
    EpMap em;
    ClusterState cs;
    MoeState st;
    MoeParams p;
    float *x, *out;          /* [N, D] */
} BalanceRig;

/* a standard top-2 layer over 4 experts on one rank; skew > 0 makes every token prefer
 * experts 0 and 1 by about skew logits (x[:, 0] ~ 1 and router row 0 favours them) */
static void rig_init(BalanceRig *r, Comm *comm, const Backend *be, int balance, float skew) {
    memset(r, 0, sizeof *r);
    Config cfg;
    config_defaults(&cfg);
    MoeConfig mc = cfg.moe;
    mc.n_experts = BR_E; mc.top_k = BR_K; mc.d_ff_expert = BR_F; mc.dropless = true; mc.renormalize = true;
    mc.balance = balance; mc.bias_gamma = 0.02; mc.aux_loss_coef = 0.05; mc.z_loss_coef = 0;
    moe_layer_setup(&r->ml, &mc, MOE_KIND_STANDARD, BR_D, BR_F, ACT_KIND_GELU);
    ep_map_init(&r->em, 1, 0, BR_E, 1);
    r->ml.ep = &r->em;
    r->cs.bias = calloc(BR_E, sizeof(float));
    r->ml.cs = &r->cs;
    Status s = moe_state_init(&r->st, &r->ml, be, comm, BR_N);
    ok(STATUS_OK(s), "balance rig: moe_state_init (%s)", s.msg);
    Rng g;
    rng_init(&g, 5, 0, RNG_TEST);
    r->p.router = malloc(sizeof(float) * BR_D * BR_E);
    r->p.w1 = malloc(sizeof(float) * BR_E * BR_D * BR_F);
    r->p.w2 = malloc(sizeof(float) * BR_E * BR_F * BR_D);
    r->x = malloc(sizeof(float) * BR_N * BR_D);
    r->out = malloc(sizeof(float) * BR_N * BR_D);
    for (int i = 0; i < BR_D * BR_E; i++) r->p.router[i] = 0.5f * rng_normal(&g);
    for (int e = 0; e < BR_E; e++) r->p.router[e] += e < 2 ? skew : 0.0f;   /* row 0: feature x[:, 0] */
    for (int i = 0; i < BR_E * BR_D * BR_F; i++) r->p.w1[i] = 0.3f * rng_normal(&g);
    for (int i = 0; i < BR_E * BR_F * BR_D; i++) r->p.w2[i] = 0.3f * rng_normal(&g);
    for (int t = 0; t < BR_N; t++)
        for (int d = 0; d < BR_D; d++) r->x[t * BR_D + d] = d == 0 ? 1.0f + 0.1f * rng_normal(&g) : rng_normal(&g);
}

static void rig_free(BalanceRig *r, const Backend *be) {
    moe_state_free(&r->st, be);
    ep_map_free(&r->em);
    free(r->cs.bias); free(r->p.router); free(r->p.w1); free(r->p.w2); free(r->x); free(r->out);
}

static void rig_forward(BalanceRig *r, Comm *comm, const Backend *be) {
    moe_forward(&r->ml, be, comm, &r->p, &r->st, r->out, r->x, BR_N, BR_N);
}

/* load MaxVio = max_e load_e / mean load - 1 over the routed pairs */
static double rig_maxvio(const BalanceRig *r) {
    double mx = 0, mean = 0;
    for (int e = 0; e < BR_E; e++) {
        mean += r->st.stats.counts_routed[e] / BR_E;
        if (r->st.stats.counts_routed[e] > mx) mx = r->st.stats.counts_routed[e];
    }
    return mx / mean - 1;
}

/* (b) the bias changes which experts are chosen (top-k of logit + bias), never the gates'
 * values: those are the unbiased softmax probabilities of the chosen experts, renormalised */
static void test_aux_free_selection(Comm *comm, const Backend *be) {
    BalanceRig r;
    rig_init(&r, comm, be, BALANCE_AUX_FREE, 0.0f);
    rig_forward(&r, comm, be);
    float *probs0 = malloc(sizeof(float) * BR_N * BR_E);
    memcpy(probs0, r.st.probs, sizeof(float) * BR_N * BR_E);
    int n_had3 = 0;
    for (int t = 0; t < BR_N; t++) n_had3 += r.st.topk_expert[t * BR_K] == 3 || r.st.topk_expert[t * BR_K + 1] == 3;
    const float bias[BR_E] = {0.0f, -0.5f, 0.25f, 3.0f};
    memcpy(r.cs.bias, bias, sizeof bias);
    rig_forward(&r, comm, be);
    int sel_ok = 1, gate_ok = 1, n_has3 = 0;
    for (int t = 0; t < BR_N; t++) {
        const float *l = r.st.logits + (size_t)t * BR_E, *pr = r.st.probs + (size_t)t * BR_E;
        /* reference top-2 of logit + bias (ties cannot occur with these random logits) */
        int b0 = 0;
        for (int e = 1; e < BR_E; e++) if (l[e] + bias[e] > l[b0] + bias[b0]) b0 = e;
        int b1 = b0 == 0 ? 1 : 0;
        for (int e = 0; e < BR_E; e++) if (e != b0 && l[e] + bias[e] > l[b1] + bias[b1]) b1 = e;
        const int32_t *sel = r.st.topk_expert + (size_t)t * BR_K;
        const float *gate = r.st.topk_gate + (size_t)t * BR_K;
        sel_ok &= sel[0] == b0 && sel[1] == b1;
        n_has3 += sel[0] == 3 || sel[1] == 3;
        double z = (double)pr[sel[0]] + pr[sel[1]];
        /* gates: float division of the same float probabilities, so 1 ulp covers it */
        for (int s2 = 0; s2 < BR_K; s2++) gate_ok &= fabs(gate[s2] - pr[sel[s2]] / z) <= 1e-6 * fabs(gate[s2]);
    }
    ok(memcmp(probs0, r.st.probs, sizeof(float) * BR_N * BR_E) == 0,
       "aux_free: the bias leaves the router probabilities unchanged");
    ok(sel_ok, "aux_free: top-2 = top-2 of logit + bias for every token");
    ok(n_has3 == BR_N && n_had3 < BR_N, "aux_free: a +3 bias puts expert 3 in every token's top-2 (%d of %d; %d "
       "without the bias)", n_has3, BR_N, n_had3);
    ok(gate_ok, "aux_free: gates are the unbiased probabilities of the chosen experts, renormalised");
    ok(r.st.stats.aux_loss == 0, "aux_free: the Switch aux loss is off (%g)", r.st.stats.aux_loss);
    rig_free(&r, be);

    /* moe.balance = aux: the same bias values are not used, and the aux loss is on */
    rig_init(&r, comm, be, BALANCE_AUX, 0.0f);
    memcpy(r.cs.bias, bias, sizeof bias);
    rig_forward(&r, comm, be);
    int n3 = 0;
    for (int t = 0; t < BR_N; t++) n3 += r.st.topk_expert[t * BR_K] == 3 || r.st.topk_expert[t * BR_K + 1] == 3;
    ok(n3 == n_had3 && r.st.stats.aux_loss > 0, "aux: the bias is ignored (%d tokens choose expert 3) and the aux "
       "loss is on (%g)", n3, r.st.stats.aux_loss);
    moe_update_bias(&r.ml, &r.st);
    ok(memcmp(r.cs.bias, bias, sizeof bias) == 0, "aux: moe_update_bias changes nothing");
    rig_free(&r, be);
    free(probs0);
}

/* (a) a router skewed towards experts 0 and 1 (every token picks them: MaxVio 1); the bias
 * update alone, router fixed, must bring the load MaxVio down */
static void test_aux_free_balance(Comm *comm, const Backend *be) {
    BalanceRig r;
    rig_init(&r, comm, be, BALANCE_AUX_FREE, 2.0f);
    rig_forward(&r, comm, be);
    double v0 = rig_maxvio(&r), tail = 0;
    enum { STEPS = 400, TAIL = 100 };
    for (int step = 0; step < STEPS; step++) {
        moe_update_bias(&r.ml, &r.st);
        rig_forward(&r, comm, be);
        double v = rig_maxvio(&r);
        if (step % 50 == 0) printf("# aux_free balance: step %d MaxVio %.3f bias %.2f %.2f %.2f %.2f\n", step, v,
                                   r.cs.bias[0], r.cs.bias[1], r.cs.bias[2], r.cs.bias[3]);
        if (step >= STEPS - TAIL) tail += v / TAIL;
    }
    /* with gamma = 0.02 the bias closes the ~2-logit gap in ~100 steps; after that it either
     * sits at exact balance (32 pairs per expert: sign 0, no change) or dithers by +-gamma,
     * where a few of the 64 tokens flipping give MaxVio ~0.1-0.2. 0.3 is above that and far
     * below the ~1.0 of the skewed start. */
    ok(v0 > 0.9, "skewed router: initial MaxVio %.3f (experts 0 and 1 take every token)", v0);
    ok(tail < 0.3, "aux_free: mean MaxVio over the last %d of %d steps %.3f < 0.3 (from %.3f)", TAIL, STEPS, tail, v0);
    ok(r.cs.bias[0] < 0 && r.cs.bias[1] < 0 && r.cs.bias[2] > 0 && r.cs.bias[3] > 0,
       "aux_free: overloaded experts get a negative bias, idle ones a positive bias");
    rig_free(&r, be);

    /* the same skew with moe.balance = aux: no bias update, the load stays skewed */
    rig_init(&r, comm, be, BALANCE_AUX, 2.0f);
    for (int step = 0; step < 50; step++) { rig_forward(&r, comm, be); moe_update_bias(&r.ml, &r.st); }
    ok(rig_maxvio(&r) > 0.9, "aux (no training): MaxVio stays %.3f without the bias", rig_maxvio(&r));
    rig_free(&r, be);
}

int main(void) {
    Comm comm;
    comm_single_init(&comm);
    Backend be;
    Status st = backend_cpu_init(&be, 1);
    ok(STATUS_OK(st), "cpu backend");
    const Case cases[] = {
        {"dense-gelu", MOE_KIND_DENSE, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 1.25, 0, 1, 0, 0, 0, 0},
        {"dense-swiglu", MOE_KIND_DENSE, ACT_SWIGLU, TASK_LM, POOL_MEAN, 0, 1, 1.25, 0, 1, 0, 0, 0, 0},
        {"moe-dropless-renorm-z", MOE_KIND_STANDARD, ACT_GELU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 1e-2, 1, 0, 0, 0, 0},
        {"moe-capacity-drops", MOE_KIND_STANDARD, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 0.5, 0, 1, 0, 0, 0, 0},
        {"moe-no-renorm-swiglu", MOE_KIND_STANDARD, ACT_SWIGLU, TASK_LM, POOL_MEAN, 1, 0, 1.25, 1e-2, 1, 0, 0, 0, 0},
        {"classify-mean", MOE_KIND_STANDARD, ACT_GELU, TASK_CLASSIFY, POOL_MEAN, 1, 1, 1.25, 0, 1, 0, 0, 0, 0},
        {"classify-last", MOE_KIND_DENSE, ACT_GELU, TASK_CLASSIFY, POOL_LAST, 1, 1, 1.25, 0, 1, 0, 0, 0, 0},
        {"clustered-dropless-z", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 1e-2, 1, GROUP_SCORE_MEAN, BALANCE_AUX, 0, 0},
        {"clustered-capacity", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 0.6, 0, 1, GROUP_SCORE_MEAN, BALANCE_AUX, 0, 0},
        {"clustered-top2-swiglu", MOE_KIND_CLUSTERED, ACT_SWIGLU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 0, 1, GROUP_SCORE_TOP2, BALANCE_AUX, 0, 0},
        {"clustered-2groups-norenorm", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 1, 0, 1.25, 0, 2, GROUP_SCORE_MEAN, BALANCE_AUX, 0, 0},
        {"clustered-auxfree-classify", MOE_KIND_CLUSTERED, ACT_GELU, TASK_CLASSIFY, POOL_MEAN, 1, 1, 1.25, 0, 1, GROUP_SCORE_MEAN, BALANCE_AUX_FREE, 0, 0},
        {"clustered-product-gate", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 1e-2, 1, GROUP_SCORE_MEAN, BALANCE_AUX,
         GROUP_GATE_PRODUCT, 0},
        {"clustered-product-2groups-top2", MOE_KIND_CLUSTERED, ACT_SWIGLU, TASK_LM, POOL_MEAN, 0, 1, 0.9, 0, 2, GROUP_SCORE_TOP2,
         BALANCE_AUX, GROUP_GATE_PRODUCT, 0},
        {"clustered-masters", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 1e-2, 1, GROUP_SCORE_MEAN,
         BALANCE_AUX, 0, 1},
        {"clustered-masters-product-2groups", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 0.9, 0, 2,
         GROUP_SCORE_MEAN, BALANCE_AUX, GROUP_GATE_PRODUCT, 1},
        {"moe-auxfree-capacity-z", MOE_KIND_STANDARD, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 1.0, 1e-2, 1, 0, BALANCE_AUX_FREE, 0, 0},
        {"moe-auxfree-dropless-norenorm", MOE_KIND_STANDARD, ACT_SWIGLU, TASK_LM, POOL_MEAN, 1, 0, 1.25, 0, 1, 0, BALANCE_AUX_FREE, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &comm, &be);
    test_aux_free_selection(&comm, &be);
    test_aux_free_balance(&comm, &be);
    backend_free(&be);
    return harness_done();
}
