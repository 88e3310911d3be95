/* test_gradsync: the bucket plan and the timing of the overlapped dense-gradient allreduce
 * (parallel.overlap_allreduce, gradsync.h) on small models (dense, standard MoE, classify),
 * with a recording device library on a fake two-rank world: the buckets partition the dense
 * category into contiguous ranges started in descending memory order (the tail with the last
 * layer, the embedding last), within the cap unless one layer alone exceeds it; every bucket
 * starts during model_backward and its gradients are already final then (a copy taken at the
 * start equals the gradients after the backward, bitwise); outstanding requests are tested
 * between layers; optim_reduce_grads waits for them and books one allreduce of the whole
 * category, exactly as the blocking path books it (bytes, calls), with the in-flight time.
 * Does not: run MPI (tests/test_overlap.py compares real multi-rank runs). */
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "gradsync.h"
#include "harness.h"
#include "model.h"
#include "optim.h"

#define MAXB 64
typedef struct Rec {
    const float *base;          /* the dense gradients */
    int n_start, n_test, n_wait, n_block, outstanding;
    size_t lo[MAXB], n[MAXB];
    float *snap[MAXB];          /* the bucket's gradients when it started */
} Rec;
static Rec rec;

static void *rec_iallreduce(void *ctx, float *dbuf, size_t n) {
    (void)ctx;
    int k = rec.n_start++;
    if (k < MAXB) {
        rec.lo[k] = (size_t)(dbuf - rec.base);
        rec.n[k] = n;
        rec.snap[k] = malloc(sizeof(float) * n);
        memcpy(rec.snap[k], dbuf, sizeof(float) * n);
    }
    rec.outstanding++;
    return &rec.lo[k < MAXB ? k : 0];
}
/* a request completes on its second test */
static int rec_test(void *ctx, void *req) {
    (void)ctx; (void)req;
    rec.n_test++;
    static int odd;
    odd ^= 1;
    if (odd) return 0;
    rec.outstanding--;
    return 1;
}
static void rec_wait(void *ctx, void *req) { (void)ctx; (void)req; rec.n_wait++; rec.outstanding--; }
static void rec_allreduce(void *ctx, float *dbuf, size_t n) { (void)ctx; (void)dbuf; (void)n; rec.n_block++; }
static const DevCommOps rec_ops = {.name = "recorder", .allreduce_sum_f32 = rec_allreduce,
                                   .iallreduce_sum_f32 = rec_iallreduce, .test = rec_test, .wait = rec_wait};

static void run_case(const char *name, int kind, int task, double bucket_mb, const Backend *be) {
    Config cfg;
    config_defaults(&cfg);
    cfg.model.d_model = 16; cfg.model.n_layer = 3; cfg.model.n_head = 2; cfg.model.seq_len = 8;
    cfg.model.task = task;
    cfg.moe.kind = kind; cfg.moe.n_experts = 4; cfg.moe.top_k = 2; cfg.moe.d_ff_expert = 8; cfg.moe.every = 1;
    cfg.moe.dropless = 1;
    cfg.run.seed = 3;
    cfg.parallel.overlap_allreduce = true;
    cfg.parallel.bucket_mb = bucket_mb;
    int V = 29, B = 2, T = 8, C = 3;
    Comm world;
    comm_single_init(&world);
    Model m;
    Status st = model_init(&m, &cfg, V, C, B, be, &world);
    ok(STATUS_OK(st) && m.gsync, "%s: model_init with parallel.overlap_allreduce (%s)", name, st.msg);
    if (!STATUS_OK(st)) return;
    model_init_params(&m);
    GradSync *gs = m.gsync;
    size_t n = m.n_cat[PCAT_DENSE];
    /* the plan: contiguous, descending, covering, within the cap unless one layer exceeds it */
    size_t cap = (size_t)(bucket_mb * 1048576.0 / sizeof(float));
    int good = gs->n_buckets >= 1 && gs->b[0].lo + gs->b[0].n == n && gs->b[gs->n_buckets - 1].lo == 0;
    for (int k = 1; k < gs->n_buckets; k++) good &= gs->b[k].lo + gs->b[k].n == gs->b[k - 1].lo;
    for (int k = 0; k < gs->n_buckets; k++) {
        int segs = gs->b[k].last_seg - (k ? gs->b[k - 1].last_seg : -1);
        good &= cap == 0 ? segs == 1 : (gs->b[k].n <= cap || segs == 1);
    }
    ok(good && gs->b[gs->n_buckets - 1].last_seg == m.L, "%s: %d bucket(s) partition the %zu dense elements from the end "
       "down, the embedding last%s", name, gs->n_buckets, n, cap ? ", each within the cap or one layer" : ", one per layer");
    if (cap == 0) ok(gs->n_buckets == m.L + 1, "%s: bucket_mb 0: one bucket per layer and the embedding (%d)", name, gs->n_buckets);
    /* the tail (final LayerNorm, classifier) goes with the last layer; the embedding's range ends at layer 0 */
    const ParamTensor *lnf = NULL, *l0 = NULL;
    for (int i = 0; i < m.n_tensors; i++) {
        if (!strcmp(m.tensors[i].name, "lnf.w")) lnf = &m.tensors[i];
        if (!l0 && m.tensors[i].layer == 0) l0 = &m.tensors[i];
    }
    ok(lnf && lnf->offset >= gs->b[0].lo && l0 && (cap > 0 || gs->b[gs->n_buckets - 1].n == l0->offset),
       "%s: the tail is in the first bucket, the embedding [0, layer 0) in the last", name);

    /* one step on a fake two-rank world carrying the recorder */
    Comm fake;
    comm_single_init(&fake);
    fake.size = 2;
    fake.dops = &rec_ops;
    gs->comm = &fake;
    memset(&rec, 0, sizeof rec);
    rec.base = m.grads[PCAT_DENSE];
    Rng r;
    rng_init(&r, 5, 0, RNG_TEST);
    int32_t in[16], tg[16], len[2] = {8, 6};
    for (int i = 0; i < B * T; i++) { in[i] = (int32_t)rng_below(&r, V); tg[i] = (int32_t)rng_below(&r, V); }
    if (task == TASK_CLASSIFY) for (int b = 0; b < B; b++) tg[b] = (int32_t)rng_below(&r, C);
    long ng = task == TASK_LM ? B * T : B;
    model_zero_grad(&m);
    model_forward(&m, in, tg, len, B, ng);
    model_backward(&m, ng);
    ok(rec.n_start == gs->n_buckets && rec.n_wait == 0 && rec.n_block == 0,
       "%s: every bucket started during the backward (%d of %d), none waited yet", name, rec.n_start, gs->n_buckets);
    int same = rec.n_start <= MAXB, order = 1;
    for (int k = 0; k < rec.n_start && k < MAXB; k++) {
        same &= rec.lo[k] == gs->b[k].lo && rec.n[k] == gs->b[k].n &&
                !memcmp(rec.snap[k], m.grads[PCAT_DENSE] + rec.lo[k], sizeof(float) * rec.n[k]);
        if (k) order &= rec.lo[k] < rec.lo[k - 1];
    }
    ok(same && order, "%s: each bucket started once its gradients were final (bitwise equal to the end of the "
       "backward), in descending memory order", name);
    ok(gs->n_buckets == 1 || rec.n_test > 0, "%s: outstanding requests tested between layers (%d tests)", name, rec.n_test);
    optim_reduce_grads(&m);
    ok(rec.outstanding == 0 && !gs->armed, "%s: optim_reduce_grads completed every request (%d waited)", name, rec.n_wait);
    /* booking: as the blocking comm_dev_allreduce_sum_f32 of the whole category */
    Comm blk;
    comm_single_init(&blk);
    blk.size = 2;
    blk.dops = &rec_ops;
    comm_dev_allreduce_sum_f32(&blk, m.grads[PCAT_DENSE], n, COMM_PHASE_ALLREDUCE);
    ok(fake.stats.bytes[COMM_PHASE_ALLREDUCE] == blk.stats.bytes[COMM_PHASE_ALLREDUCE] &&
       fake.stats.calls[COMM_PHASE_ALLREDUCE] == 1 && blk.stats.calls[COMM_PHASE_ALLREDUCE] == 1 &&
       fake.stats.bytes[COMM_PHASE_ALLREDUCE] == n * sizeof(float),
       "%s: booked as one allreduce of %zu bytes, as the blocking path (%llu)", name, n * sizeof(float),
       (unsigned long long)blk.stats.bytes[COMM_PHASE_ALLREDUCE]);
    ok(fake.stats.inflight[COMM_PHASE_ALLREDUCE] >= fake.stats.seconds[COMM_PHASE_ALLREDUCE] &&
       fake.stats.seconds[COMM_PHASE_ALLREDUCE] >= 0 && gs->last_inflight_s == fake.stats.inflight[COMM_PHASE_ALLREDUCE],
       "%s: in-flight time %.3g s >= exposed wait %.3g s", name, fake.stats.inflight[COMM_PHASE_ALLREDUCE],
       fake.stats.seconds[COMM_PHASE_ALLREDUCE]);
    for (int k = 0; k < rec.n_start && k < MAXB; k++) free(rec.snap[k]);
    gs->comm = &world;
    model_free(&m);
    comm_free(&world);
}

int main(void) {
    Backend be;
    Status st = backend_cpu_init(&be, 1);
    ok(STATUS_OK(st), "cpu backend");
    run_case("dense-per-layer", MOE_KIND_DENSE, TASK_LM, 0, &be);
    run_case("dense-cap", MOE_KIND_DENSE, TASK_LM, 0.015, &be);      /* 3932 floats: two layers merge, layer 0 with the embedding */
    run_case("dense-tiny-cap", MOE_KIND_DENSE, TASK_LM, 1e-4, &be);  /* 26 floats: every layer above the cap */
    run_case("moe-per-layer", MOE_KIND_STANDARD, TASK_LM, 0, &be);
    run_case("moe-one-bucket", MOE_KIND_STANDARD, TASK_LM, 100, &be);
    run_case("classify-per-layer", MOE_KIND_STANDARD, TASK_CLASSIFY, 0, &be);
    backend_free(&be);
    return harness_done();
}
