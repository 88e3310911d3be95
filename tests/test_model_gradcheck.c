/* test_model_gradcheck: the whole model's backward (cross-entropy + Switch aux loss +
 * router z-loss, through attention, LayerNorm, dense or MoE FFN, the tied LM head or the
 * classification head) against central finite differences of the loss, for every
 * parameter tensor: a directional derivative along a random direction per tensor and the
 * largest-gradient coordinates of each tensor. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "harness.h"
#include "model.h"

typedef struct Case {
    const char *name;
    int kind, act, task, pooling, dropless, renorm;
    double cf, z;
    int top_groups, group_score, balance;   /* clustered */
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
    cfg.moe.group_capacity_factor = c->cf;
    cfg.run.seed = 7;
    int V = 29, B = 3, T = 8, C = 3;
    Model m;
    Status st = model_init(&m, &cfg, V, C, B, be, comm);
    ok(STATUS_OK(st), "%s: model_init (%s)", c->name, st.msg);
    if (!STATUS_OK(st)) return;
    model_init_params(&m);
    Rng r;
    rng_init(&r, 99, 0, RNG_TEST);
    int32_t in[3 * 8], tg[3 * 8], len[3] = {8, 5, 1};
    for (int i = 0; i < B * T; i++) { in[i] = (int32_t)rng_below(&r, V); tg[i] = (int32_t)rng_below(&r, V); }
    if (c->task == TASK_CLASSIFY) for (int b = 0; b < B; b++) tg[b] = (int32_t)rng_below(&r, C);
    else tg[5] = -1;   /* an ignored target */
    long ng = c->task == TASK_LM ? B * T - 1 : B;

    model_zero_grad(&m);
    double L0 = model_forward(&m, in, tg, len, B, ng);
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

int main(void) {
    Comm comm;
    comm_single_init(&comm);
    Backend be;
    Status st = backend_cpu_init(&be, 1);
    ok(STATUS_OK(st), "cpu backend");
    const Case cases[] = {
        {"dense-gelu", MOE_KIND_DENSE, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 1.25, 0, 1, 0, 0},
        {"dense-swiglu", MOE_KIND_DENSE, ACT_SWIGLU, TASK_LM, POOL_MEAN, 0, 1, 1.25, 0, 1, 0, 0},
        {"moe-dropless-renorm-z", MOE_KIND_STANDARD, ACT_GELU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 1e-2, 1, 0, 0},
        {"moe-capacity-drops", MOE_KIND_STANDARD, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 0.5, 0, 1, 0, 0},
        {"moe-no-renorm-swiglu", MOE_KIND_STANDARD, ACT_SWIGLU, TASK_LM, POOL_MEAN, 1, 0, 1.25, 1e-2, 1, 0, 0},
        {"classify-mean", MOE_KIND_STANDARD, ACT_GELU, TASK_CLASSIFY, POOL_MEAN, 1, 1, 1.25, 0, 1, 0, 0},
        {"classify-last", MOE_KIND_DENSE, ACT_GELU, TASK_CLASSIFY, POOL_LAST, 1, 1, 1.25, 0, 1, 0, 0},
        {"clustered-dropless-z", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 1e-2, 1, GROUP_SCORE_MEAN, BALANCE_AUX},
        {"clustered-capacity", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 0, 1, 0.6, 0, 1, GROUP_SCORE_MEAN, BALANCE_AUX},
        {"clustered-top2-swiglu", MOE_KIND_CLUSTERED, ACT_SWIGLU, TASK_LM, POOL_MEAN, 1, 1, 1.25, 0, 1, GROUP_SCORE_TOP2, BALANCE_AUX},
        {"clustered-2groups-norenorm", MOE_KIND_CLUSTERED, ACT_GELU, TASK_LM, POOL_MEAN, 1, 0, 1.25, 0, 2, GROUP_SCORE_MEAN, BALANCE_AUX},
        {"clustered-auxfree-classify", MOE_KIND_CLUSTERED, ACT_GELU, TASK_CLASSIFY, POOL_MEAN, 1, 1, 1.25, 0, 1, GROUP_SCORE_MEAN, BALANCE_AUX_FREE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &comm, &be);
    backend_free(&be);
    return harness_done();
}
