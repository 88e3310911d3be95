/* reference_dump: build a small model for one named case, run one forward and backward on a
 * fixed random batch, and write everything the PyTorch reference (tests/test_reference.py)
 * needs to rebuild the same model and compare: config, every parameter, the batch, logits,
 * losses, the routing decisions of every MoE layer, and every gradient.
 * Does not: compare anything itself (the Python test does). Uses only the public API.
 *
 *   usage: reference_dump OUT.bin CASE
 *   CASE: dense-gelu dense-swiglu moe moe-capacity moe-swiglu-norenorm moe-dropless
 *         moe-ties classify classify-last
 *         clustered clustered-capacity clustered-top2-swiglu clustered-2groups
 *         clustered-classify clustered-auxfree
 *   moe-ties copies router column 1 into column 6 so experts 1 and 6 tie exactly for every
 *   token (the top-k rule sends ties to the lower index; slot order then decides capacity).
 *   clustered-* use moe.kind = clustered with the fixed contiguous groups of model_init
 *   (expert i in group i/K); clustered-auxfree sets a nonzero selection bias by hand.
 *
 * File format (little-endian, as the host writes it):
 *   header:  char magic[8] = "DCMOEREF", u32 version = 1
 *   records until end of file:
 *     u32 name_len, char name[name_len] (no NUL),
 *     u32 dtype (0 = float32, 1 = int32, 2 = float64, 3 = UTF-8 text),
 *     u32 n_dims, u32 dims[n_dims], data (product(dims) elements of dtype; text: dims = {bytes})
 *   records written:
 *     "cfg"                      text   JSON object of the case's scalar settings
 *     <tensor name>              f32    every parameter, table order, dims from the table
 *     "inputs" [B,T], "targets" [B,T] (LM) or [B] (classify), "lengths" [B]   i32
 *     "logits"                   f32    [B,T,V] or [B,C], saved before the backward
 *     "loss", "aux_loss", "z_loss", "loss_sum"                                 f64 [1]
 *     "moe.<l>.topk_expert" i32 [N,k], "moe.<l>.kept" i32 [N,k] (1 kept, 0 dropped),
 *     "moe.<l>.probs" f32 [N,E], "moe.<l>.stats" f64 [4] = {aux, z, dropped_frac, capacity}
 *                                                  (MoE layers only; clustered: probs = the
 *                                                  in-group softmax, 0 outside the chosen groups)
 *     clustered layers also: "moe.<l>.group_of" i32 [E], "moe.<l>.members" i32 [G,K],
 *     "moe.<l>.bias" f32 [E], "moe.<l>.group_counts" f64 [G] (token-group selections),
 *     "moe.<l>.counts_routed" f64 [E] (pairs surviving group capacity), "moe.<l>.counts"
 *     f64 [E] (kept), "moe.<l>.gstats" f64 [2] = {group_aux_loss, group_dropped_frac}
 *     "grad.<tensor name>"       f32    every gradient
 *
 * Legend: B T D H V L E k C N G K = batch, seq, d_model, heads, vocab, layers, experts, top-k,
 * classes, tokens (B*T), groups, experts per group. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "model.h"
#include "moe.h"

enum RecDtype { REC_F32 = 0, REC_I32 = 1, REC_F64 = 2, REC_TEXT = 3 };

#define REF_MAGIC "DCMOEREF"
#define REF_VERSION 1u

typedef struct RefCase {
    const char *name;
    int kind;            /* enum MoeKind */
    int act;             /* enum Activation */
    int task;            /* enum TaskKind */
    int pooling;         /* enum Pooling */
    double cf;           /* capacity factor */
    int dropless, renorm, every;
    int tie;             /* duplicate a router column: exact probability ties */
    /* clustered only (0 elsewhere) */
    int G, TG, rank;     /* groups, groups per token, residual rank */
    int gscore;          /* enum GroupScore */
    int balance;         /* enum BalanceKind; aux_free: a hand-set nonzero bias */
    double gcf;          /* group capacity factor */
} RefCase;

static const RefCase ref_cases[] = {
    {"dense-gelu",          MOE_KIND_DENSE,    ACT_GELU,   TASK_LM,       POOL_MEAN, 1.25, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0},
    {"dense-swiglu",        MOE_KIND_DENSE,    ACT_SWIGLU, TASK_LM,       POOL_MEAN, 1.25, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0},
    {"moe",                 MOE_KIND_STANDARD, ACT_GELU,   TASK_LM,       POOL_MEAN, 2.0,  0, 1, 1, 0, 0, 0, 0, 0, 0, 0},
    {"moe-capacity",        MOE_KIND_STANDARD, ACT_GELU,   TASK_LM,       POOL_MEAN, 0.7,  0, 1, 1, 0, 0, 0, 0, 0, 0, 0},
    {"moe-swiglu-norenorm", MOE_KIND_STANDARD, ACT_SWIGLU, TASK_LM,       POOL_MEAN, 0.9,  0, 0, 1, 0, 0, 0, 0, 0, 0, 0},
    {"moe-dropless",        MOE_KIND_STANDARD, ACT_GELU,   TASK_LM,       POOL_MEAN, 1.0,  1, 1, 1, 0, 0, 0, 0, 0, 0, 0},
    {"moe-ties",            MOE_KIND_STANDARD, ACT_GELU,   TASK_LM,       POOL_MEAN, 0.9,  0, 1, 1, 1, 0, 0, 0, 0, 0, 0},
    {"classify",            MOE_KIND_STANDARD, ACT_GELU,   TASK_CLASSIFY, POOL_MEAN, 0.8,  0, 1, 2, 0, 0, 0, 0, 0, 0, 0},
    {"classify-last",       MOE_KIND_DENSE,    ACT_SWIGLU, TASK_CLASSIFY, POOL_LAST, 1.25, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0},
    /*                                                                          cf dropless renorm every tie
     *                                                                          G TG r gscore balance gcf */
    {"clustered",             MOE_KIND_CLUSTERED, ACT_GELU,   TASK_LM,       POOL_MEAN, 1.0, 1, 1, 1, 0,
     2, 1, 4, GROUP_SCORE_MEAN, BALANCE_AUX, 1.0},
    {"clustered-capacity",    MOE_KIND_CLUSTERED, ACT_GELU,   TASK_LM,       POOL_MEAN, 0.6, 0, 1, 1, 0,
     2, 1, 4, GROUP_SCORE_MEAN, BALANCE_AUX, 0.8},
    {"clustered-top2-swiglu", MOE_KIND_CLUSTERED, ACT_SWIGLU, TASK_LM,       POOL_MEAN, 1.0, 0, 1, 1, 0,
     2, 1, 4, GROUP_SCORE_TOP2, BALANCE_AUX, 1.1},
    {"clustered-2groups",     MOE_KIND_CLUSTERED, ACT_GELU,   TASK_LM,       POOL_MEAN, 0.9, 0, 0, 1, 0,
     4, 2, 4, GROUP_SCORE_MEAN, BALANCE_AUX, 0.9},
    {"clustered-classify",    MOE_KIND_CLUSTERED, ACT_GELU,   TASK_CLASSIFY, POOL_MEAN, 1.0, 0, 1, 2, 0,
     2, 1, 4, GROUP_SCORE_MEAN, BALANCE_AUX, 1.0},
    {"clustered-auxfree",     MOE_KIND_CLUSTERED, ACT_SWIGLU, TASK_LM,       POOL_MEAN, 1.0, 0, 1, 1, 0,
     2, 1, 4, GROUP_SCORE_TOP2, BALANCE_AUX_FREE, 0.9},
};
#define N_REF_CASES ((int)(sizeof ref_cases / sizeof ref_cases[0]))

/* model sizes shared by every case */
enum { REF_V = 50, REF_T = 16, REF_D = 32, REF_H = 4, REF_L = 2, REF_E = 8, REF_K = 2,
       REF_FE = 16, REF_FD = 24, REF_B = 4, REF_C = 3 };

static int write_record(FILE *f, const char *name, int dtype, int n_dims, const uint32_t *dims,
                        const void *data) {
    uint32_t nl = (uint32_t)strlen(name), dt = (uint32_t)dtype, nd = (uint32_t)n_dims;
    size_t n = 1, esz = dtype == REC_F64 ? 8 : dtype == REC_TEXT ? 1 : 4;
    for (int i = 0; i < n_dims; i++) n *= dims[i];
    int ok = fwrite(&nl, 4, 1, f) == 1 && fwrite(name, 1, nl, f) == nl &&
             fwrite(&dt, 4, 1, f) == 1 && fwrite(&nd, 4, 1, f) == 1 &&
             fwrite(dims, 4, (size_t)n_dims, f) == (size_t)n_dims &&
             (n == 0 || fwrite(data, esz, n, f) == n);
    return ok ? 0 : -1;
}

static int write_f64(FILE *f, const char *name, const double *v, int n) {
    uint32_t d = (uint32_t)n;
    return write_record(f, name, REC_F64, 1, &d, v);
}

static const RefCase *find_case(const char *name) {
    for (int i = 0; i < N_REF_CASES; i++)
        if (strcmp(ref_cases[i].name, name) == 0) return &ref_cases[i];
    return NULL;
}

static void usage(void) {
    fprintf(stderr, "usage: reference_dump OUT.bin CASE\n  CASE:");
    for (int i = 0; i < N_REF_CASES; i++) fprintf(stderr, " %s", ref_cases[i].name);
    fprintf(stderr, "\n");
}

static void case_config(const RefCase *rc, Config *cfg) {
    config_defaults(cfg);
    cfg->run.seed = 1234;
    cfg->run.threads = 1;
    cfg->model.d_model = REF_D;
    cfg->model.n_layer = REF_L;
    cfg->model.n_head = REF_H;
    cfg->model.seq_len = REF_T;
    cfg->model.d_ff = REF_FD;
    cfg->model.activation = rc->act;
    cfg->model.init_std = 0.2;
    cfg->model.task = rc->task;
    cfg->model.pooling = rc->pooling;
    cfg->model.n_classes = rc->task == TASK_CLASSIFY ? REF_C : 0;
    if (rc->task == TASK_CLASSIFY) {   /* validation ties the task to the data kind */
        cfg->data.kind = DATA_GLUE;
        str_fmt(cfg->data.glue_task, sizeof cfg->data.glue_task, "%s", "sst2");
    } else {
        cfg->data.kind = DATA_BROWN;
    }
    cfg->moe.kind = rc->kind;
    cfg->moe.n_experts = REF_E;
    cfg->moe.top_k = REF_K;
    cfg->moe.d_ff_expert = REF_FE;
    cfg->moe.every = rc->every;
    cfg->moe.capacity_factor = rc->cf;
    cfg->moe.dropless = rc->dropless;
    cfg->moe.aux_loss_coef = 1e-2;
    cfg->moe.z_loss_coef = 1e-2;
    cfg->moe.renormalize = rc->renorm;
    if (rc->kind == MOE_KIND_CLUSTERED) {
        cfg->moe.n_groups = rc->G;
        cfg->moe.top_groups = rc->TG;
        cfg->moe.rank = rc->rank;
        cfg->moe.group_score = rc->gscore;
        cfg->moe.balance = rc->balance;
        cfg->moe.group_capacity_factor = rc->gcf;
        cfg->moe.group_aux_coef = 2e-2;   /* differs from aux_loss_coef: a swap shows */
        cfg->clustering.enabled = false;  /* fixed contiguous groups */
    }
}

/* a nonzero aux-loss-free selection bias on every clustered layer (large enough to change
 * some choices: router logits have a spread of about 1) */
static void set_cluster_bias(Model *m) {
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
        int E = m->ffn[l].E;
        for (int i = 0; i < E; i++)
            m->cstate[l].bias[i] = (float)(0.35 * (((i * 5 + l * 3) % E) - 0.5 * (E - 1)) / E);
    }
}

/* router [D,E] of every MoE layer: column dst = column src (exact ties between the two) */
static void tie_router_columns(Model *m, const Backend *be, int src, int dst) {
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->kind != PARAM_ROUTER) continue;
        int D = t->dims[0], E = t->dims[1];
        float *w = m->params[t->cat] + t->offset, *host = xcalloc(sizeof(float) * t->n);
        be->ops->to_host(be->ctx, host, w, sizeof(float) * t->n);
        for (int d = 0; d < D; d++) host[(size_t)d * E + dst] = host[(size_t)d * E + src];
        be->ops->from_host(be->ctx, w, host, sizeof(float) * t->n);
        xfree(host);
    }
}

static int dump_case(const RefCase *rc, const char *path) {
    Comm comm;
    Backend be;
    Config cfg;
    Model m;
    Status st = comm_single_init(&comm);
    if (!STATUS_OK(st)) { fprintf(stderr, "reference_dump: comm: %s\n", st.msg); return 1; }
    st = backend_cpu_init(&be, 1);
    if (!STATUS_OK(st)) { fprintf(stderr, "reference_dump: backend: %s\n", st.msg); return 1; }
    case_config(rc, &cfg);
    st = config_validate(&cfg);
    if (!STATUS_OK(st)) { fprintf(stderr, "reference_dump: %s: config: %s\n", rc->name, st.msg); return 1; }
    int is_cls = rc->task == TASK_CLASSIFY;
    int B = REF_B, T = REF_T, V = REF_V, C = REF_C, N = B * T;
    st = model_init(&m, &cfg, V, is_cls ? C : 0, B, &be, &comm);
    if (!STATUS_OK(st)) { fprintf(stderr, "reference_dump: %s: model_init: %s\n", rc->name, st.msg); return 1; }
    model_init_params(&m);
    if (rc->tie) tie_router_columns(&m, &be, 1, 6);
    if (rc->kind == MOE_KIND_CLUSTERED && rc->balance == BALANCE_AUX_FREE) set_cluster_bias(&m);

    /* the batch: random tokens; LM targets with one ignored (-1); classify labels + lengths */
    int32_t *inputs = xcalloc(sizeof(int32_t) * N);
    int32_t *targets = xcalloc(sizeof(int32_t) * N);
    int32_t *lengths = xcalloc(sizeof(int32_t) * B);
    Rng r;
    rng_init(&r, 4321, 0, RNG_TEST);
    for (int i = 0; i < N; i++) inputs[i] = (int32_t)rng_below(&r, (uint64_t)V);
    for (int i = 0; i < N; i++) targets[i] = (int32_t)rng_below(&r, (uint64_t)V);
    long n_global;
    if (is_cls) {
        for (int b = 0; b < B; b++) targets[b] = (int32_t)rng_below(&r, (uint64_t)C);
        for (int b = 0; b < B; b++) lengths[b] = b == 0 ? T : 1 + (int32_t)rng_below(&r, (uint64_t)T);
        lengths[B - 1] = 1;   /* a one-token sequence */
        n_global = B;
    } else {
        for (int b = 0; b < B; b++) lengths[b] = T;
        targets[7] = -1;
        n_global = N - 1;
    }

    model_zero_grad(&m);
    double loss = model_forward(&m, inputs, targets, lengths, B, n_global);
    /* the backward overwrites m.logits with dlogits: save them first */
    size_t n_logits = is_cls ? (size_t)B * C : (size_t)N * V;
    float *logits = xcalloc(sizeof(float) * n_logits);
    be.ops->to_host(be.ctx, logits, m.logits, sizeof(float) * n_logits);
    model_backward(&m, n_global);
    be.ops->sync(be.ctx);

    FILE *f = fopen(path, "wb");
    if (!f) { fprintf(stderr, "reference_dump: cannot open %s for writing\n", path); return 1; }
    int err = 0;
    err |= fwrite(REF_MAGIC, 1, 8, f) != 8;
    uint32_t ver = REF_VERSION;
    err |= fwrite(&ver, 4, 1, f) != 1;

    int is_cl = rc->kind == MOE_KIND_CLUSTERED;
    char json[4096];
    str_fmt(json, sizeof json,
            "{\"case\": \"%s\", \"V\": %d, \"T\": %d, \"D\": %d, \"H\": %d, \"L\": %d, "
            "\"E\": %d, \"k\": %d, \"B\": %d, \"C\": %d, \"d_ff_expert\": %d, \"d_ff\": %d, "
            "\"moe_kind\": %d, \"tied_experts\": %s, \"activation\": \"%s\", \"task\": \"%s\", "
            "\"pooling\": \"%s\", \"every\": %d, \"capacity_factor\": %.17g, \"dropless\": %d, "
            "\"renormalize\": %d, "
            "\"aux_loss_coef\": %.17g, \"z_loss_coef\": %.17g, \"n_global\": %ld, "
            "\"G\": %d, \"top_groups\": %d, \"rank\": %d, \"group_score\": \"%s\", "
            "\"balance\": \"%s\", \"group_aux_coef\": %.17g, \"group_capacity_factor\": %.17g, "
            "\"layernorm_eps\": 1e-5}",
            rc->name, V, T, REF_D, REF_H, REF_L, REF_E, REF_K, B, is_cls ? C : 0, REF_FE,
            config_d_ff_dense(&cfg), (int)cfg.moe.kind, rc->tie ? "[1, 6]" : "[]",
            rc->act == ACT_SWIGLU ? "swiglu" : "gelu", is_cls ? "classify" : "lm",
            rc->pooling == POOL_LAST ? "last" : "mean", cfg.moe.every, cfg.moe.capacity_factor,
            (int)cfg.moe.dropless, (int)cfg.moe.renormalize, cfg.moe.aux_loss_coef,
            cfg.moe.z_loss_coef, n_global, is_cl ? cfg.moe.n_groups : 0,
            is_cl ? cfg.moe.top_groups : 0, is_cl ? cfg.moe.rank : 0,
            cfg.moe.group_score == GROUP_SCORE_TOP2 ? "top2" : "mean",
            cfg.moe.balance == BALANCE_AUX_FREE ? "aux_free" : "aux", cfg.moe.group_aux_coef,
            cfg.moe.group_capacity_factor);
    uint32_t jl = (uint32_t)strlen(json);
    err |= write_record(f, "cfg", REC_TEXT, 1, &jl, json);

    /* parameters, then (below) gradients, in table order */
    size_t n_max = 1;
    for (int i = 0; i < m.n_tensors; i++) if (m.tensors[i].n > n_max) n_max = m.tensors[i].n;
    float *host = xcalloc(sizeof(float) * n_max);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            /* batch, outputs and routing between the parameters and the gradients */
            uint32_t d_bt[2] = {(uint32_t)B, (uint32_t)T}, d_b[1] = {(uint32_t)B};
            err |= write_record(f, "inputs", REC_I32, 2, d_bt, inputs);
            if (is_cls) err |= write_record(f, "targets", REC_I32, 1, d_b, targets);
            else err |= write_record(f, "targets", REC_I32, 2, d_bt, targets);
            err |= write_record(f, "lengths", REC_I32, 1, d_b, lengths);
            if (is_cls) {
                uint32_t d[2] = {(uint32_t)B, (uint32_t)C};
                err |= write_record(f, "logits", REC_F32, 2, d, logits);
            } else {
                uint32_t d[3] = {(uint32_t)B, (uint32_t)T, (uint32_t)V};
                err |= write_record(f, "logits", REC_F32, 3, d, logits);
            }
            err |= write_f64(f, "loss", &loss, 1);
            err |= write_f64(f, "aux_loss", &m.aux_loss, 1);
            err |= write_f64(f, "z_loss", &m.z_loss, 1);
            err |= write_f64(f, "loss_sum", &m.loss_sum, 1);
            for (int l = 0; l < m.L; l++) {
                const MoeLayer *ml = &m.ffn[l];
                if (ml->kind == MOE_KIND_DENSE) continue;
                const MoeState *ms = &m.acts[l].moe;
                int E = ml->E, k = ml->k;
                int32_t *kept = xcalloc(sizeof(int32_t) * N * k);
                for (int i = 0; i < N * k; i++) kept[i] = ms->pos[i] >= 0;
                char nm[64];
                uint32_t d_nk[2] = {(uint32_t)N, (uint32_t)k}, d_ne[2] = {(uint32_t)N, (uint32_t)E};
                str_fmt(nm, sizeof nm, "moe.%d.topk_expert", l);
                err |= write_record(f, nm, REC_I32, 2, d_nk, ms->topk_expert);
                str_fmt(nm, sizeof nm, "moe.%d.kept", l);
                err |= write_record(f, nm, REC_I32, 2, d_nk, kept);
                str_fmt(nm, sizeof nm, "moe.%d.probs", l);
                err |= write_record(f, nm, REC_F32, 2, d_ne, ms->probs);
                double s4[4] = {ms->stats.aux_loss, ms->stats.z_loss, ms->stats.dropped_frac,
                                (double)ms->stats.capacity};
                str_fmt(nm, sizeof nm, "moe.%d.stats", l);
                err |= write_f64(f, nm, s4, 4);
                if (ml->kind == MOE_KIND_CLUSTERED) {
                    const ClusterState *cs = ml->cs;
                    int G = ml->G, K = ml->K;
                    uint32_t d_e[1] = {(uint32_t)E}, d_gk[2] = {(uint32_t)G, (uint32_t)K};
                    str_fmt(nm, sizeof nm, "moe.%d.group_of", l);
                    err |= write_record(f, nm, REC_I32, 1, d_e, cs->group_of);
                    str_fmt(nm, sizeof nm, "moe.%d.members", l);
                    err |= write_record(f, nm, REC_I32, 2, d_gk, cs->members);
                    str_fmt(nm, sizeof nm, "moe.%d.bias", l);
                    err |= write_record(f, nm, REC_F32, 1, d_e, cs->bias);
                    str_fmt(nm, sizeof nm, "moe.%d.group_counts", l);
                    err |= write_f64(f, nm, ms->stats.group_counts, G);
                    str_fmt(nm, sizeof nm, "moe.%d.counts_routed", l);
                    err |= write_f64(f, nm, ms->stats.counts_routed, E);
                    str_fmt(nm, sizeof nm, "moe.%d.counts", l);
                    err |= write_f64(f, nm, ms->stats.counts, E);
                    double g2[2] = {ms->stats.group_aux_loss, ms->stats.group_dropped_frac};
                    str_fmt(nm, sizeof nm, "moe.%d.gstats", l);
                    err |= write_f64(f, nm, g2, 2);
                    printf("%s: layer %d: expert capacity %ld, group dropped fraction %.4f, expert "
                           "dropped fraction %.4f (of the pairs surviving group capacity)\n", rc->name,
                           l, ms->stats.capacity, ms->stats.group_dropped_frac, ms->stats.dropped_frac);
                } else {
                    printf("%s: layer %d: capacity %ld, dropped fraction %.4f\n", rc->name, l,
                           ms->stats.capacity, ms->stats.dropped_frac);
                }
                xfree(kept);
            }
        }
        for (int i = 0; i < m.n_tensors; i++) {
            const ParamTensor *t = &m.tensors[i];
            const float *src = (pass == 0 ? m.params[t->cat] : m.grads[t->cat]) + t->offset;
            be.ops->to_host(be.ctx, host, src, sizeof(float) * t->n);
            uint32_t dims[3];
            for (int d = 0; d < t->n_dims; d++) dims[d] = (uint32_t)t->dims[d];
            char nm[80];
            str_fmt(nm, sizeof nm, "%s%s", pass == 0 ? "" : "grad.", t->name);
            err |= write_record(f, nm, REC_F32, t->n_dims, dims, host);
        }
    }
    err |= fclose(f) != 0;
    if (err) fprintf(stderr, "reference_dump: write error on %s\n", path);
    else printf("%s: loss %.9g (aux %.6g, z %.6g), %d tensors -> %s\n", rc->name, loss, m.aux_loss,
                m.z_loss, m.n_tensors, path);
    xfree(host); xfree(logits); xfree(inputs); xfree(targets); xfree(lengths);
    model_free(&m);
    backend_free(&be);
    comm_free(&comm);
    return err ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 3) { usage(); return 2; }
    const RefCase *rc = find_case(argv[2]);
    if (!rc) {
        fprintf(stderr, "reference_dump: unknown case '%s'\n", argv[2]);
        usage();
        return 2;
    }
    return dump_case(rc, argv[1]);
}
