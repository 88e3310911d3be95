/* test_precision: the clustered layer under precision.c on a tiny one-rank model:
 * - QAT: forward/backward with the fake-quantised shadow gives exactly (bitwise) the loss and
 *   the gradients of an FP32 model whose expert weights were replaced by the fake-quantised
 *   values (quantised here independently with quant_fake), and leaves the masters alone;
 * - the stored-format inference path equals dequantise-then-FP32 bitwise (D, F <= one base
 *   block), with and without a residency manager capped at one group (host and file tier);
 * - experts.q: pack/decode round trip, checkpoint round trip, header checks;
 * - a missing offload file gives an error naming the file. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "checkpoint.h"
#include "comm.h"
#include "config.h"
#include "harness.h"
#include "model.h"
#include "precision.h"

enum { V = 29, B = 3, T = 8 };

static void make_cfg(Config *cfg, int mode, int act) {
    config_defaults(cfg);
    cfg->model.d_model = 16; cfg->model.n_layer = 2; cfg->model.n_head = 2; cfg->model.seq_len = T;
    cfg->model.activation = act;
    cfg->model.init_std = 0.3;
    cfg->moe.kind = MOE_KIND_CLUSTERED; cfg->moe.n_experts = 8; cfg->moe.top_k = 2; cfg->moe.d_ff_expert = 8;
    cfg->moe.every = 1; cfg->moe.dropless = 1;
    cfg->moe.n_groups = 4; cfg->moe.rank = 2;
    cfg->precision.mode = mode;
    cfg->precision.int4_group = 4;
    cfg->run.seed = 5;
}

static int bits_equal(const float *a, const float *b, size_t n, size_t *first) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4) != 0) { *first = i; return 0; }
    return 1;
}

/* fake-quantise every clustered expert tensor of a host copy of the expert category */
static void fake_quant_experts(const Model *m, float *x, int group) {
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->kind != PARAM_BASE && t->kind != PARAM_FACTOR) continue;
        size_t per = (size_t)t->dims[1] * t->dims[2];
        for (int q = 0; q < t->dims[0]; q++)
            quant_fake(x + t->offset + (size_t)q * per, t->dims[1], t->dims[2],
                       t->kind == PARAM_BASE ? QFORMAT_F16 : QFORMAT_INT4, t->kind == PARAM_BASE ? 0 : group, NULL);
    }
}

static void batch(int32_t *in, int32_t *tg) {
    Rng r;
    rng_init(&r, 3, 0, RNG_TEST);
    for (int i = 0; i < B * T; i++) { in[i] = (int32_t)rng_below(&r, V); tg[i] = (int32_t)rng_below(&r, V); }
}

static void test_qat(Comm *comm, const Backend *be, int act) {
    Config cq, cf;
    make_cfg(&cq, PRECISION_QAT, act);
    make_cfg(&cf, PRECISION_FP32, act);
    Model a, b;
    ok(STATUS_OK(model_init(&a, &cq, V, 0, B, be, comm)) && STATUS_OK(model_init(&b, &cf, V, 0, B, be, comm)), "qat: models");
    model_init_params(&a);
    model_init_params(&b);
    size_t ne = a.n_cat[PCAT_EXPERT];
    float *master = malloc(sizeof(float) * ne);
    memcpy(master, a.params[PCAT_EXPERT], sizeof(float) * ne);
    fake_quant_experts(&b, b.params[PCAT_EXPERT], 4);
    Precision pr;
    ok(STATUS_OK(prec_init(&pr, &a)), "qat: prec_init");
    size_t first = 0;
    int changed = !bits_equal(master, b.params[PCAT_EXPERT], ne, &first);
    ok(changed, "qat: fake quantisation changes the expert weights");
    int32_t in[B * T], tg[B * T];
    batch(in, tg);
    long ng = B * T;
    model_zero_grad(&a); model_zero_grad(&b);
    double la = model_forward(&a, in, tg, NULL, B, ng);
    model_backward(&a, ng);
    double lb = model_forward(&b, in, tg, NULL, B, ng);
    model_backward(&b, ng);
    ok(la == lb, "qat: loss %.9g equals the FP32 loss at the fake-quantised weights %.9g", la, lb);
    for (int c = 0; c < PCAT_N; c++) {
        int eq = bits_equal(a.grads[c], b.grads[c], a.n_cat[c], &first);
        ok(eq, "qat: %s gradients (to the masters) equal the gradients at the fake-quantised weights bitwise%s",
           c ? "expert" : "dense", eq ? "" : " (first difference shown below)");
        if (!eq) printf("#   [%zu] %.9g vs %.9g\n", first, (double)a.grads[c][first], (double)b.grads[c][first]);
    }
    ok(bits_equal(master, a.params[PCAT_EXPERT], ne, &first), "qat: the FP32 masters are untouched");
    prec_measure(&pr);   /* the errors are measured on demand (train.c: log steps) */
    ok(pr.qerr[0] > 0 && pr.qerr[0] < 1e-3 && pr.qerr[1] > 0 && pr.qerr[1] < 0.2,
       "qat: quantisation errors logged (bases %.2e, factors %.2e)", pr.qerr[0], pr.qerr[1]);
    prec_free(&pr);
    ok(a.ffn_view == NULL, "qat: prec_free detaches the views");
    free(master);
    model_free(&a); model_free(&b);
}

/* forward loss and logits of m */
static double fwd(Model *m, const int32_t *in, const int32_t *tg, float *logits) {
    double l = model_forward(m, in, tg, NULL, B, B * T);
    memcpy(logits, m->logits, sizeof(float) * B * T * m->V);
    return l;
}

static void test_stored(Comm *comm, const Backend *be, int act) {
    Config cs;
    make_cfg(&cs, PRECISION_STORAGE, act);
    Model a, b;
    ok(STATUS_OK(model_init(&a, &cs, V, 0, B, be, comm)) && STATUS_OK(model_init(&b, &cs, V, 0, B, be, comm)), "stored: models");
    model_init_params(&a);
    model_init_params(&b);
    /* canonical experts -> experts.q -> decoded FP32 weights in model b */
    size_t nf = a.n_expert_full;
    float *full = calloc(nf, sizeof(float)), *dec = calloc(nf, sizeof(float));
    float *loc[1] = {a.params[PCAT_EXPERT]};
    model_ep_gather(&a, loc, &full, 1);
    size_t nq = prec_q_bytes(&a, 4);
    unsigned char *q = malloc(nq);
    prec_q_pack(&a, full, 4, q);
    ok(STATUS_OK(prec_q_check(&a, q, nq, "test")), "experts.q: header check passes (%zu bytes)", nq);
    memcpy(dec, full, sizeof(float) * nf);
    prec_q_decode(&a, q, dec);
    unsigned char *q2 = malloc(nq);
    prec_q_pack(&a, dec, 4, q2);
    ok(memcmp(q, q2, nq) == 0, "experts.q: encode(decode(q)) == q (exact round trip)");
    float *dl[1] = {b.params[PCAT_EXPERT]};
    model_ep_scatter(&b, &dec, dl, 1);
    int32_t in[B * T], tg[B * T];
    batch(in, tg);
    size_t nl = (size_t)B * T * V, first = 0;
    float *la = malloc(sizeof(float) * nl), *lb = malloc(sizeof(float) * nl);
    double lossb = fwd(&b, in, tg, lb);
    /* stored path, all groups resident */
    Precision pr;
    prec_init(&pr, &a);
    OffloadConfig off;
    memset(&off, 0, sizeof off);
    MemAcct acct;
    memacct_init(&acct);
    ok(STATUS_OK(prec_attach_stored(&pr, q, nq, &off, "", &acct)), "stored: attach");
    double lossa = fwd(&a, in, tg, la);
    ok(lossa == lossb && bits_equal(la, lb, nl, &first),
       "stored: quantised forward == dequantise-then-FP32 forward bitwise (loss %.9g vs %.9g)", lossa, lossb);
    ok(memacct_tier_current(&acct, MEM_TIER_DEVICE) > 0, "stored: resident stored bytes accounted (%lld)",
       (long long)memacct_tier_current(&acct, MEM_TIER_DEVICE));
    prec_free(&pr);
    /* under a residency manager with one resident group per layer: host, then file tier */
    for (int tier = 0; tier < 2; tier++) {
        char dir[256];
        snprintf(dir, sizeof dir, "test_precision_offload_%d", (int)getpid());
        off.enabled = 1; off.max_resident_groups = 1; off.tier = tier ? OFFLOAD_FILE : OFFLOAD_HOST;
        off.idle_steps = 1000; off.prefetch = PREFETCH_NONE; off.prefetch_ema = 0.05;
        prec_init(&pr, &a);
        Status st = prec_attach_stored(&pr, q, nq, &off, dir, NULL);
        ok(STATUS_OK(st), "offload %s: attach (%s)", tier ? "file" : "host", st.msg);
        for (int rep = 0; rep < 2; rep++) {
            prec_begin_batch(&pr, rep);
            double lo = fwd(&a, in, tg, la);
            prec_end_batch(&pr);
            ok(STATUS_OK(prec_status(&pr)) && lo == lossb && bits_equal(la, lb, nl, &first),
               "offload %s cap 1, pass %d: forward equals the resident one bitwise (loss %.9g)", tier ? "file" : "host", rep, lo);
        }
        OffloadStats os;
        prec_offload_totals(&pr, &os);
        ok(os.misses > 0 && os.evictions > 0, "offload %s: groups were evicted and refetched (%lld misses, %lld evictions)",
           tier ? "file" : "host", (long long)os.misses, (long long)os.evictions);
        if (tier == 1) {
            /* lose a group's file: the next fetch of it must fail naming the file */
            char path[512];
            int gone = 0;
            for (int u = 0; u < pr.layers[0].Gl; u++) {
                offload_unit_path(&pr.layers[0].om, u, path, sizeof path);
                if (!offload_is_resident(&pr.layers[0].om, u) && unlink(path) == 0) { gone = 1; break; }
            }
            ok(gone, "offload file: removed %s", path);
            prec_begin_batch(&pr, 9);
            fwd(&a, in, tg, la);
            prec_end_batch(&pr);
            Status es = prec_status(&pr);
            ok(!STATUS_OK(es) && strstr(es.msg, path) != NULL, "offload file: missing file -> error naming it: %s", es.msg);
        }
        prec_free(&pr);
        char rm[600];
        snprintf(rm, sizeof rm, "rm -rf '%s'", dir);
        if (system(rm) != 0) printf("# could not remove %s\n", dir);
    }
    /* checkpoint round trip of the section */
    char run[256], ck[512];
    snprintf(run, sizeof run, "test_precision_run_%d", (int)getpid());
    TrainPos pos = {3, 0, 0, 5};
    Status st = checkpoint_save(run, &a, &pos, 1);
    ok(STATUS_OK(st), "checkpoint: save (%s)", st.msg);
    snprintf(ck, sizeof ck, "%s/ckpt/step_00000003", run);
    void *rq = NULL;
    size_t rn = 0;
    st = checkpoint_read_section(ck, "experts.q", comm, &rq, &rn);
    ok(STATUS_OK(st) && rn == nq && memcmp(rq, q, nq) == 0, "checkpoint: experts.q section round trip (%zu bytes)", rn);
    xfree(rq);
    TrainPos p2;
    ok(STATUS_OK(checkpoint_load(ck, &b, &p2)), "checkpoint: a checkpoint with experts.q still loads");
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", run);
    if (system(cmd) != 0) printf("# could not remove %s\n", run);
    /* header checks */
    q[0] ^= 1;
    st = prec_q_check(&a, q, nq, "x.bin: experts.q");
    ok(!STATUS_OK(st) && strstr(st.msg, "bad magic"), "experts.q: bad magic rejected: %s", st.msg);
    q[0] ^= 1;
    st = prec_q_check(&a, q, nq - 1, "x.bin: experts.q");
    ok(!STATUS_OK(st), "experts.q: wrong size rejected: %s", st.msg);
    free(q); free(q2); free(full); free(dec); free(la); free(lb);
    model_free(&a); model_free(&b);
}

int main(void) {
    Comm comm;
    comm_single_init(&comm);
    Backend be;
    ok(STATUS_OK(backend_cpu_init(&be, 1)), "cpu backend");
    test_qat(&comm, &be, ACT_GELU);
    test_qat(&comm, &be, ACT_SWIGLU);
    test_stored(&comm, &be, ACT_GELU);
    test_stored(&comm, &be, ACT_SWIGLU);
    backend_free(&be);
    return harness_done();
}
