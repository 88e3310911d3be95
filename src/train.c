/* train.c: the training loop, evaluation, metrics logging, checkpoint/resume, the
 * compression and re-clustering events and their follow-up probe losses (25 and 50 steps
 * after each event; pending ones travel in the checkpoint).
 * Data parallelism: the global batch of B sequences is the same for every rank count
 * (data.h draws sequence j of step s from (seed, s, j)); rank r runs sequences
 * [r*B/P, (r+1)*B/P), gradients carry the 1/n_global scale and are summed over ranks.
 * Does not: offload during training on run.backend=cuda (refused at start: residency.c keeps
 * the model's own expert arrays in place in host memory; dcmoe eval may offload on cuda). */
#include "train.h"
#include "gradsync.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "checkpoint.h"
#include "comm_nccl.h"
#include "compress_event.h"
#include "config_build.h"
#include "data.h"
#include "evaluate.h"
#include "h5log.h"
#include "metrics.h"
#include "model.h"
#include "optim.h"
#include "precision.h"
#include "recluster.h"
#include "runlog.h"
#include "residency.h"
#include "topology.h"
#include "traffic.h"

static volatile sig_atomic_t g_stop_signal = 0;

/* peak resident set size of this process, measured by the kernel */
static double peak_rss_bytes(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss * 1024.0;
}
static void on_signal(int sig) { g_stop_signal = sig; }

void train_install_signal_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* test hook: DCMOE_TEST_NAN_AT=STEP[:RANK] poisons that rank's local loss at that (1-based)
 * step, so the non-finite handling can be tested without a diverging model */
static int test_nan_at(long step1, int rank) {
    const char *e = getenv("DCMOE_TEST_NAN_AT");
    if (!e || !e[0]) return 0;
    long s = 0;
    int r = 0;
    int n = sscanf(e, "%ld:%d", &s, &r);
    return n >= 1 && s == step1 && r == rank;
}

/* log.sync_wait: the seconds this rank has waited in the timed barriers so far, all phases */
static double wait_total(const Comm *c) {
    double w = 0;
    for (int ph = 0; ph < COMM_N_PHASES; ph++) w += c->stats.wait[ph];
    return w;
}

/* test hook: DCMOE_TEST_SLOW_RANK=RANK:MS makes that rank sleep MS milliseconds before every
 * forward, a planted straggler the other ranks wait for (log.sync_wait must book it) */
static void test_slow_rank(int rank) {
    const char *e = getenv("DCMOE_TEST_SLOW_RANK");
    if (!e || !e[0]) return;
    int r = -1;
    double ms = 0;
    if (sscanf(e, "%d:%lf", &r, &ms) == 2 && r == rank && ms > 0) {
        struct timespec ts = {(time_t)(ms / 1000), (long)(fmod(ms, 1000.0) * 1e6)};
        nanosleep(&ts, NULL);
    }
}

/* test hook: DCMOE_TEST_REPLICA_FLIP_AT=step flips the lowest bit of the first parameter of
 * every filled replica slot after that step's update (the copies then differ from their
 * primaries: the mismatch series and the checkpoint's check must see it) */
static void test_replica_flip(Model *m, long step1) {
    const char *e = getenv("DCMOE_TEST_REPLICA_FLIP_AT");
    if (!e || !e[0] || atol(e) != step1) return;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (!t->ep_unit) continue;
        const EpMap *em = &m->ep[t->layer];
        size_t span = (size_t)param_unit_rows(t, em->K) * (t->n / t->dims[0]);
        for (int s = 0; s < em->n_rep; s++) {
            if (em->lunit[em->per_rank + s] < 0) continue;
            float *p = m->params[PCAT_EXPERT] + t->offset + (size_t)(em->per_rank + s) * span, v;
            uint32_t b;
            m->be->ops->to_host(m->be->ctx, &v, p, sizeof v);
            memcpy(&b, &v, 4);
            b ^= 1u;
            memcpy(&v, &b, 4);
            m->be->ops->from_host(m->be->ctx, p, &v, sizeof v);
        }
    }
}

void train_run_dir(const Config *cfg, char *dst, size_t cap) {
    str_fmt(dst, cap, "%s/%s", cfg->run.out_dir, cfg->run.name);
}

double train_measure_sgemm_peak(const void *backend) {
    const Backend *be = backend;
    int n = be->kind == BACKEND_CUDA ? 4096 : 1024;   /* 1024^3 is too small to fill a GPU */
    float *a = be->ops->alloc(be->ctx, sizeof(float) * n * n);
    float *b = be->ops->alloc(be->ctx, sizeof(float) * n * n);
    float *c = be->ops->alloc(be->ctx, sizeof(float) * n * n);
    float *h = xmalloc(sizeof(float) * n * n);
    for (int i = 0; i < n * n; i++) h[i] = (float)((i * 37 % 101) - 50) * 0.01f;
    be->ops->from_host(be->ctx, a, h, sizeof(float) * n * n);
    be->ops->from_host(be->ctx, b, h, sizeof(float) * n * n);
    /* warm up (BLAS threads start lazily, pages fault in), then time products until at least
     * 0.3 s and 12 products have run, and keep the best: a short or single measurement varied by
     * a third between runs (other ranks starting, frequency ramp-up) */
    double best = 0, t_begin = time_now();
    int n_timed = 0;
    for (int r = 0; r < 200 && (n_timed < 12 || time_now() - t_begin < 0.3); r++) {
        be->ops->sync(be->ctx);
        double t0 = time_now();
        be->ops->gemm(be->ctx, false, false, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        be->ops->sync(be->ctx);
        double dt = time_now() - t0;
        double gf = 2.0 * n * n * (double)n / dt * 1e-9;
        if (r < 2) continue;
        n_timed++;
        if (gf > best) best = gf;
    }
    be->ops->free(be->ctx, a); be->ops->free(be->ctx, b); be->ops->free(be->ctx, c);
    xfree(h);
    return best;
}

/* activations and dispatch/combine buffers as the layers hold them now (the exchange's
 * receive side grows to its high-water mark during the run): set those two kinds */
static void mem_refresh_layers(MemAcct *a, const Model *m) {
    int64_t act = (int64_t)m->act_bytes, comm_b = 0;
    for (int l = 0; l < m->L; l++) {
        act += (int64_t)(m->acts[l].moe.act_bytes - m->acts[l].moe.comm_bytes);
        comm_b += (int64_t)m->acts[l].moe.comm_bytes;
    }
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_ACT, act - memacct_current(a, MEM_TIER_DEVICE, MEM_KIND_ACT));
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_COMM, comm_b - memacct_current(a, MEM_TIER_DEVICE, MEM_KIND_COMM));
}

/* what this rank holds, by kind (the resident/working tier) */
static void mem_register(MemAcct *a, const Model *m, const Precision *pr) {
    memacct_init(a);
    int64_t np = (int64_t)(m->n_cat[PCAT_DENSE] + m->n_cat[PCAT_EXPERT]) * 4;
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_PARAM_FP32, np);
    if (pr->shadow) memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_PARAM_FP32, (int64_t)m->n_cat[PCAT_EXPERT] * 4);
    if (pr->host) memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_SCRATCH, (int64_t)m->n_cat[PCAT_EXPERT] * 4);  /* QAT staging */
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_GRAD, np);
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_OPTIM, 2 * np);
    mem_refresh_layers(a, m);
}

/* collective: every rank's bytes by kind and measured VmHWM / VmRSS -> row [P, kinds + 2] on rank 0 */
static void mem_gather(Comm *comm, const MemAcct *a, double *all) {
    double mine[MEM_N_KINDS + 2];
    for (int k = 0; k < MEM_N_KINDS; k++) mine[k] = (double)memacct_current(a, MEM_TIER_DEVICE, (enum MemKind)k);
    MemProc p;
    if (!STATUS_OK(memacct_proc(&p))) memset(&p, 0, sizeof p);
    mine[MEM_N_KINDS] = (double)p.hwm;
    mine[MEM_N_KINDS + 1] = (double)p.rss;
    comm_gather_bytes(comm, mine, all, sizeof mine, 0);
}

/* re-run the placement policy on every MoE layer and migrate the units that change owner,
 * then re-choose the replicated hot units (parallel.replicas) and fill the changed copies
 * (every copy when refill: the units' contents changed); returns the bytes moved (all
 * ranks); *changed = 1 when an owner or a copy changed. The decisions go to ev [MoE layers,
 * PLACE_COLS] (parallel/placement) and, on rank 0, to one console line */
#define PLACE_COLS 8
static double replace_experts(Model *m, const Config *cfg, const Topology *topo, int refill, bool *changed,
                              long step, double *ev, int print) {
    double bytes = 0;
    int ch = 0, i = 0;
    char line[1024];
    size_t pos = (size_t)snprintf(line, sizeof line, "placement step %ld", step);
    EpPlaceOpts po = {.spread = cfg->moe.home_bias > 0 && cfg->parallel.home_spread};
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        Placement np;
        EpPlaceInfo inf;
        int acc = ep_propose_ex(&m->ep[l], cfg->parallel.placement, topo, cfg->parallel.refine_passes,
                                cfg->parallel.max_imbalance, cfg->parallel.min_gain, &po, &np, &inf);
        if (acc) {
            bytes += (double)model_ep_relayout(m, l, &np);
            ch = 1;
        }
        placement_free(&np);
        int rch = 0;
        bytes += (double)model_ep_replicas_update(m, l, refill, &rch);
        ch |= rch;
        int n_copies = 0;
        for (int q = 0; q < m->ep[l].P * m->ep[l].n_rep; q++) n_copies += m->ep[l].rep_unit[q] >= 0;
        double row[PLACE_COLS] = {inf.obj_before, inf.obj_after, acc, acc ? inf.moved : 0, n_copies, rch,
                                  inf.maxvio_before, acc ? inf.maxvio_after : inf.maxvio_before};
        if (ev) memcpy(ev + (size_t)i * PLACE_COLS, row, sizeof row);
        if (pos < sizeof line)
            pos += (size_t)snprintf(line + pos, sizeof line - pos, " | L%d obj %.4g -> %.4g %s, %d moved, %d copies%s, "
                                   "rank MaxVio %.2f -> %.2f", l, inf.obj_before, inf.obj_after, acc ? "taken" : "kept",
                                   acc ? inf.moved : 0, n_copies, rch ? " (changed)" : "", row[6], row[7]);
        i++;
    }
    comm_allreduce_sum_f64(m->comm, &bytes, 1);
    if (changed && ch) *changed = true;
    if (m->comm->rank == 0 && print) { printf("%s\n", line); fflush(stdout); }
    return bytes;
}

static Status residency_hook(void *ctx, int layer, const int32_t *units, int n) {
    return residency_need((Residency *)ctx, layer, units, n);
}

static void fmt_eta(char *dst, size_t cap, double s) {
    if (s < 0 || !isfinite(s)) s = 0;
    long t = (long)s;
    if (t >= 3600) str_fmt(dst, cap, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else str_fmt(dst, cap, "%ldm%02lds", t / 60, t % 60);
}

static void print_params(const Model *m) {
    double by_kind[PARAM_N_KINDS], total, active;
    model_param_counts(m, by_kind, &total, &active);
    printf("params: total %.3fM, active %.3fM per token;", total * 1e-6, active * 1e-6);
    for (int k = 0; k < PARAM_N_KINDS; k++)
        if (by_kind[k] > 0) printf(" %s %.3fM", param_kind_names[k], by_kind[k] * 1e-6);
    printf("\n");
    printf("memory per rank: params %.1f MiB (dense %.1f, expert %.1f), grads %.1f MiB, "
           "optimizer %.1f MiB, activations %.1f MiB\n",
           (m->n_cat[0] + m->n_cat[1]) * 4.0 / 1048576, m->n_cat[0] * 4.0 / 1048576,
           m->n_cat[1] * 4.0 / 1048576, (m->n_cat[0] + m->n_cat[1]) * 4.0 / 1048576,
           (m->n_cat[0] + m->n_cat[1]) * 8.0 / 1048576, m->act_bytes / 1048576.0);
}

/* everything one training run holds, set up by run_setup and released by run_teardown */
typedef struct Run {
    const Config *cfg;
    const TrainOptions *opt;
    Comm *comm;
    TrainResult *res;
    int P, rank, Bl, T, threads;
    long n_global;                       /* loss normaliser: targets in the global batch */
    char dir[2048], log_path[4096], vocab_path[4096], ckpt[4096];
    Backend be;
    Dataset ds;
    Topology topo;
    Traffic traffic;
    Model m;
    TrainPos pos;
    Precision prec;
    Residency resid;
    RunLog log;
    MemAcct macct;
    double peak_total, unigram_ppl, flops_tok, t_start;
    char peak_how[200];
    char device[200];            /* run.backend=cuda: the device, its memory and the fp32 / bf16 peaks */
    int32_t *in, *tg, *len;              /* this rank's batch */
    double *mem_all, *rank_buf, *rank_cols;
    double *intra_frac;                 /* [MoE layers] + [MoE layers, 2] scratch: comm/intra_fraction */
    double *rep_bad;                    /* [MoE layers] replica slots that differ from their primary */
    double *place_ev;                   /* [MoE layers, PLACE_COLS] the last placement event's decisions */
    bool place_logged;                  /* place_ev is in the log already */
    ReclusterEvent *evs;
    CompressEvent *cevs;                 /* [L] rows of the compression event */
    long last_event, warm;
    double *proj_mean, *proj_max;        /* [L] the last projection's errors (clustering.mode masters) */
    int n_proj;                          /* clustered layers in them */
    double proj_s;                       /* seconds of the last projection */
    double *fu;                          /* [n_fu, FOLLOWUP_N_COLS] events whose cluster/event_followup row is pending */
    int n_fu, cap_fu;
    double pending_migr;
    bool log_owner;
    long window_steps;
    double window_time, ema_step;
    int stage;                           /* how far run_setup got (what run_teardown frees) */
} Run;

/* what one step computed, for its log row and the progress line */
typedef struct StepOut {
    double loss, ce, lr, gnorm, t0, t1, t2, ar_s0, ar_in0, dt;
    double w0, w1, w2, wa0;      /* log.sync_wait: this rank's waits so far at t0, t1, t2; the allreduce's at t0 */
    uint64_t ar_bytes0;
    bool log_step;
} StepOut;

/* ---- the run folder: lock, then what to do (start, resume, restart, nothing) ---- */

/* rank 0 decides; returns 1 in *done when the run is already complete */
static Status claim_run_folder(Run *r, int *lock_fd, int *done) {
    const TrainOptions *opt = r->opt;
    Status st = status_ok();
    int flags[1] = {0};
    r->ckpt[0] = 0;
    if (r->rank == 0) {
        char done_path[4096], stale[256] = "";
        str_fmt(done_path, sizeof done_path, "%s/DONE", r->dir);
        st = dir_make_p(r->dir);
        if (STATUS_OK(st)) st = run_lock_acquire(r->dir, lock_fd, stale, sizeof stale);
        if (STATUS_OK(st) && stale[0])
            fprintf(stderr, "dcmoe: %s/LOCK: taking over the lock of a process that is gone (%s)\n", r->dir, stale);
        int resume = opt->resume || opt->resume_from;
        if (!STATUS_OK(st)) {
        } else if (resume && file_exists(done_path)) {
            char *text = NULL;
            size_t n_text = 0;
            file_read_all(done_path, (void **)&text, &n_text);
            printf("%s: the run is already complete (DONE: %.*s); nothing to do\n", r->dir,
                   text ? (int)strcspn(text, "\n") : 0, text ? text : "");
            free(text);
            flags[0] = 1;
        } else if (opt->resume_from) {
            CheckpointInfo info;
            st = checkpoint_verify(opt->resume_from, &info);
            if (STATUS_OK(st)) str_fmt(r->ckpt, sizeof r->ckpt, "%s", opt->resume_from);
        } else if (opt->resume) {
            char skipped[4096];
            st = checkpoint_find_latest_valid(r->dir, r->ckpt, sizeof r->ckpt, skipped, sizeof skipped);
            if (STATUS_OK(st) && skipped[0]) {
                fprintf(stderr, "dcmoe: warning: newer checkpoints fail verification and are not used:\n%s", skipped);
                if (!r->ckpt[0])
                    st = status_errorf("%s: --resume: no checkpoint verifies (see above); resume from a copy with "
                                       "--resume-from DIR, or move %s/ckpt away to restart from step 0", r->dir, r->dir);
            }
            /* killed before its first checkpoint: nothing to continue, so start again and keep the old log */
            if (STATUS_OK(st) && !r->ckpt[0] && file_exists(r->log_path)) {
                char kept[4096];
                str_fmt(kept, sizeof kept, "%s/metrics.before-restart.h5", r->dir);
                if (rename(r->log_path, kept) != 0)
                    st = status_errorf("%s: could not keep the old log as %s: %s", r->log_path, kept, strerror(errno));
                else
                    printf("%s: no checkpoint yet: restarting from step 0 (the earlier log is kept as %s)\n", r->dir, kept);
            }
        } else if (file_exists(r->log_path)) {
            st = status_errorf("%s: already holds a run (metrics.h5); use --resume to continue it (or to restart it "
                               "from step 0 when it has no checkpoint yet), or set run.name / run.out_dir to start another",
                               r->dir);
        }
    }
    TRY(comm_agree(r->comm, st));
    comm_bcast_bytes(r->comm, r->ckpt, sizeof r->ckpt, 0);
    comm_bcast_bytes(r->comm, flags, sizeof flags, 0);
    *done = flags[0];
    return status_ok();
}

/* ---- set-up: backend, data, topology, model, checkpoint, precision, offloading, log ---- */

static int blas_threads(const Config *cfg, const Comm *comm) {
    int threads = cfg->run.threads > 0 ? cfg->run.threads : 0;
    if (threads == 0) {
        const char *env = getenv("OPENBLAS_NUM_THREADS");
        threads = env ? atoi(env) : 0;
        if (threads <= 0) {   /* cores / ranks on this node */
            long cores = sysconf(_SC_NPROCESSORS_ONLN);
            threads = (int)(cores > 0 ? cores : 1) / (comm->local_size > 0 ? comm->local_size : 1);
            if (threads < 1) threads = 1;
        }
    }
    return threads;
}

/* rank 0: the log, new or continued. A checkpoint from another rank count: the per-rank series
 * cannot grow a column, so the old log is kept beside a new one (steps up to the checkpoint). */
static Status open_log(Run *r) {
    if (r->rank != 0) return status_ok();
    int new_log = !r->ckpt[0] || !file_exists(r->log_path);   /* --resume-from a copied checkpoint: a new log */
    if (r->ckpt[0]) {
        /* the rank count as the verified checkpoint records it (COMPLETE is checked against it) */
        CheckpointInfo info = {0, r->P};
        TRY(checkpoint_verify(r->ckpt, &info));
        if (info.ranks != r->P) {
            char kept[4096];
            str_fmt(kept, sizeof kept, "%s/metrics.ranks%d.h5", r->dir, info.ranks);
            if (rename(r->log_path, kept) != 0) return status_errorf("%s: could not keep the old log as %s", r->log_path, kept);
            printf("checkpoint written at %d ranks, resuming at %d: the log so far is kept as %s\n", info.ranks, r->P, kept);
            new_log = 1;
        }
    }
    return runlog_open(&r->log, r->log_path, &r->m, r->comm, &r->ds, &r->topo, new_log ? -1 : (long)r->pos.step,
                       r->peak_total, r->peak_how, r->unigram_ppl);
}

static void print_banner(const Run *r) {
    if (r->rank != 0) return;
    printf("dcmoe %s (%s) | %d rank(s) x %d BLAS thread(s) | backend %s | sgemm peak %.1f GFLOP/s total (%s)\n",
           DCMOE_VERSION, DCMOE_GIT_REVISION, r->P, r->threads, r->be.ops->name, r->peak_total, r->peak_how);
    if (r->device[0]) printf("device: %s\n", r->device);
    printf("data: %s\n", r->ds.description);
    if (r->ds.n_phases > 0) {
        const DataConfig *dc = &r->cfg->data;
        printf("data phases: train batches from genres %s (%zu tokens)", dc->genres[0] ? dc->genres : "(all)",
               r->ds.phase[0].n_tokens);
        if (r->ds.n_phases > 1)
            printf(" until step %ld, then genres %s (%zu tokens)", r->ds.switch_at,
                   dc->genres_after[0] ? dc->genres_after : "(all)", r->ds.phase[1].n_tokens);
        printf("; validation and test: genres %s\n", dc->eval_genres[0] ? dc->eval_genres : "(all)");
    }
    print_params(&r->m);
    char mtab[2048];
    memacct_format(&r->macct, mtab, sizeof mtab);
    printf("memory accounted on rank 0 (mem/bytes in metrics.h5):\n%s", mtab);
    if (r->cfg->parallel.replicas > 0) {
        const EpMap *em = NULL;
        for (int l = 0; l < r->m.L && !em; l++) if (r->m.ep[l].E) em = &r->m.ep[l];
        if (em && em->R)
            printf("parallel.replicas: %d copies per MoE layer, %d extra unit slot(s) per rank (chosen at each placement)\n",
                   em->R, em->n_rep);
        else if (em)
            printf("parallel.replicas: no effect (each expert-parallel group spans one node)\n");
    }
    if (r->m.gsync) {
        const GradSync *gs = r->m.gsync;
        printf("parallel.overlap_allreduce: the dense gradients (%.2f MiB) in %d bucket(s) during the backward, in start "
               "order:", gs->n_total * 4.0 / 1048576.0, gs->n_buckets);
        for (int k = 0; k < gs->n_buckets; k++) printf(" %.2f", gs->b[k].n * 4.0 / 1048576.0);
        printf(" MiB%s\n", r->m.rep_comm ? " (the expert gradients' sum over the replicas stays blocking)" : "");
    }
    if (r->cfg->model.task == TASK_LM) printf("unigram perplexity of the valid split: %.2f\n", r->unigram_ppl);
    printf("run folder: %s\n", r->dir);
    fflush(stdout);
}

/* parallel.collectives = nccl: the world, the model's EP group and its replica group get NCCL
 * for their device collectives (each attach is collective over its communicator; attaching
 * the world again is a no-op). Called for every model the run builds. */
static Status attach_collectives(Run *r, Model *m, bool announce) {
    Comm *comm = r->comm;
    if (r->cfg->parallel.collectives != COLLECTIVES_NCCL) return status_ok();
    /* the world's also carries the overlapped gradient sum (its own NCCL communicator) */
    TRY(comm_agree(comm, comm_nccl_attach(comm, r->cfg->parallel.overlap_allreduce)));
    if (m->ep_comm && m->ep_comm != comm) TRY(comm_agree(comm, comm_nccl_attach(m->ep_comm, 0)));
    if (m->rep_comm) TRY(comm_agree(comm, comm_nccl_attach(m->rep_comm, 0)));
    if (announce && r->rank == 0)
        printf("parallel.collectives: nccl (gradient allreduce and exchange rows on device memory)\n");
    return status_ok();
}

/* ---- event follow-ups: the probe loss 25 and 50 steps after each event (cluster/event_followup) ---- */

static void followup_add(Run *r, long event_step, int kind, double pb, double pa) {
    if (r->n_fu == r->cap_fu) {
        r->cap_fu = r->cap_fu ? 2 * r->cap_fu : 8;
        double *grown = xmalloc(sizeof(double) * FOLLOWUP_N_COLS * (size_t)r->cap_fu);
        if (r->n_fu) memcpy(grown, r->fu, sizeof(double) * FOLLOWUP_N_COLS * (size_t)r->n_fu);
        xfree(r->fu);
        r->fu = grown;
    }
    double row[FOLLOWUP_N_COLS] = {(double)event_step, kind, pb, pa, NAN, NAN};
    memcpy(r->fu + (size_t)r->n_fu++ * FOLLOWUP_N_COLS, row, sizeof row);
}

/* after training step s (1-based), before any event of that step: the measurements due now
 * (one probe evaluation, collective, shared by every event that needs it); an event's row is
 * written with its 50-step measurement, or at the last step with NaN for what was not reached */
static void followup_step(Run *r, long s, bool is_last) {
    if (r->n_fu == 0) return;
    bool due = false;
    for (int i = 0; i < r->n_fu; i++) {
        long ev = (long)r->fu[(size_t)i * FOLLOWUP_N_COLS];
        due |= s == ev + 25 || s == ev + 50;
    }
    double loss = NAN;
    if (due)
        loss = evaluate(&r->m, &r->ds, SPLIT_VALID, r->cfg->clustering.probe_batches, r->cfg->train.batch_size,
                        &r->prec).loss;
    int kept = 0;
    for (int i = 0; i < r->n_fu; i++) {
        double *row = r->fu + (size_t)i * FOLLOWUP_N_COLS;
        long ev = (long)row[0];
        if (s == ev + 25) row[4] = loss;
        if (s == ev + 50) row[5] = loss;
        if (s >= ev + 50 || is_last) runlog_followup(&r->log, s, row);
        else memmove(r->fu + (size_t)kept++ * FOLLOWUP_N_COLS, row, sizeof(double) * FOLLOWUP_N_COLS);
    }
    r->n_fu = kept;
}

/* the pending follow-ups travel in the checkpoint (section run.followup), so a resumed run
 * writes the rows the uninterrupted one writes */
static Status followup_save(Run *r) {
    static const double none = 0;
    CheckpointSection sec = {"run.followup", r->n_fu ? (const void *)r->fu : (const void *)&none,
                             sizeof(double) * FOLLOWUP_N_COLS * (size_t)r->n_fu};
    return checkpoint_save_with(r->dir, &r->m, &r->pos, r->cfg->checkpoint.keep, &sec, 1);
}

/* a checkpoint without the section (written before it existed): nothing pending, the
 * follow-ups of events before it are not measured */
static Status followup_load(Run *r) {
    void *d = NULL;
    size_t n = 0;
    int found = 0;
    TRY(comm_agree(r->comm, checkpoint_read_section_opt(r->ckpt, "run.followup", r->comm, &d, &n, &found)));
    Status st = status_ok();
    size_t row = sizeof(double) * FOLLOWUP_N_COLS;
    if (found && n % row != 0)
        st = status_errorf("%s: section 'run.followup' has %zu bytes, not a multiple of %zu (checkpoint is damaged)",
                           r->ckpt, n, row);
    else if (found && n) {
        r->n_fu = r->cap_fu = (int)(n / row);
        r->fu = xmalloc(n);
        memcpy(r->fu, d, n);
    }
    xfree(d);
    return st;
}

static Status run_setup(Run *r) {
    const Config *cfg = r->cfg;
    Comm *comm = r->comm;
    int resuming = r->opt->resume || r->opt->resume_from;
    r->threads = blas_threads(cfg, comm);
    if (cfg->run.backend == BACKEND_CUDA) TRY(comm_agree(comm, backend_cuda_init(&r->be, comm->local_rank)));
    else TRY(backend_cpu_init(&r->be, r->threads));
    r->stage = 1;
    TRY(comm_agree(comm, backend_check(&r->be)));
    TRY(comm_agree(comm, backend_set_gemm_dtype(&r->be, cfg->run.gemm_dtype)));
    int have_vocab = resuming && file_exists(r->vocab_path);
    TRY(comm_agree(comm, data_load(&cfg->data, cfg->model.task, r->T, have_vocab ? r->vocab_path : NULL, &r->ds)));
    r->stage = 2;
    TRY(comm_agree(comm, r->rank == 0 && !have_vocab ? vocab_save(&r->ds.vocab, r->vocab_path) : status_ok()));
    TRY(comm_agree(comm, topology_init(&r->topo, comm, &cfg->topology)));
    r->stage = 3;
    traffic_init(&r->traffic, r->P, r->rank, &r->topo, r->cfg->parallel.rank_matrix_max);
    comm->topo = &r->topo;
    comm->sync_wait = cfg->log.sync_wait;
    int n_classes = cfg->model.n_classes > 0 ? cfg->model.n_classes : r->ds.n_classes;
    /* clustering.compress_at: the model of the phase the run is in (the warm-up's standard MoE
     * until the compression, which happens after step compress_at; a checkpoint's step says) */
    long steps_done = 0;
    if (cfg->clustering.compress_at > 0 && r->ckpt[0]) {
        void *pd = NULL;
        size_t npd = 0;
        TRY(comm_agree(comm, checkpoint_read_section(r->ckpt, "pos", comm, &pd, &npd)));
        TrainPos cp;
        memset(&cp, 0, sizeof cp);
        if (npd == sizeof cp) memcpy(&cp, pd, sizeof cp);
        steps_done = (long)cp.step;
        xfree(pd);
    }
    Config mcfg;
    compress_phase_config(cfg, steps_done, &mcfg);
    TRY(comm_agree(comm, model_init(&r->m, &mcfg, r->ds.vocab.n_words, n_classes, r->Bl, &r->be, comm)));
    r->stage = 4;
    TRY(attach_collectives(r, &r->m, true));
    model_init_params(&r->m);
    /* clustering.mode masters: the projection of the initial masters (a checkpoint brings its own) */
    r->proj_mean = xcalloc(sizeof(double) * (size_t)(r->m.L ? r->m.L : 1));
    r->proj_max = xcalloc(sizeof(double) * (size_t)(r->m.L ? r->m.L : 1));
    double tp = time_now();
    r->n_proj = recluster_project(&r->m, 0, r->proj_mean, r->proj_max);
    r->proj_s = time_now() - tp;
    r->pos = (TrainPos){0, 0, 0, (uint64_t)cfg->run.seed};
    if (r->ckpt[0]) {
        TRY(comm_agree(comm, checkpoint_load(r->ckpt, &r->m, &r->pos)));
        TRY(followup_load(r));
        if (r->rank == 0) printf("resumed from %s at step %lld\n", r->ckpt, (long long)r->pos.step);
    }
    /* precision.mode: qat points the clustered layers at fake-quantised shadow weights */
    prec_init(&r->prec, &r->m);
    r->stage = 5;
    /* offload.enabled: idle expert units leave the resident tier between steps */
    TRY(comm_agree(comm, residency_init(&r->resid, &r->m, &cfg->offload, r->dir)));
    r->stage = 6;
    r->resid.step = r->pos.step;
    if (r->resid.enabled)
        for (int l = 0; l < r->m.L; l++) { r->m.ffn[l].need = residency_hook; r->m.ffn[l].need_ctx = &r->resid; }
    /* the FLOP fraction's denominator: a calibrated value, or every rank measuring at once
     * (what they share while training) */
    r->peak_total = cfg->run.peak_gflops;
    if (r->peak_total > 0) str_fmt(r->peak_how, sizeof r->peak_how, "from run.peak_gflops");
    else {
        comm_barrier(comm);
        r->peak_total = train_measure_sgemm_peak(&r->be);
        comm_allreduce_sum_f64(comm, &r->peak_total, 1);
        int cuda = r->be.kind == BACKEND_CUDA;
        str_fmt(r->peak_how, sizeof r->peak_how,
                "measured at start-up: sum over ranks of the best %s^3 %s product of >= 0.3 s, all ranks at once",
                cuda ? "4096" : "1024", cfg->run.gemm_dtype == GEMM_DTYPE_BF16 ? "bf16" : "fp32");
    }
    if (r->be.kind == BACKEND_CUDA) {
        /* the device line: name, memory, and this rank's fp32 and bf16 GEMM peaks (the FLOP
         * fraction is against the configured dtype's, summed over ranks, above) */
        char name[128];
        double mem = 0;
        TRY(comm_agree(comm, backend_cuda_info(&r->be, name, sizeof name, &mem)));
        double pk[2];
        for (int d = 0; d < 2; d++) {
            TRY(comm_agree(comm, backend_set_gemm_dtype(&r->be, d)));
            pk[d] = train_measure_sgemm_peak(&r->be);
        }
        TRY(comm_agree(comm, backend_set_gemm_dtype(&r->be, cfg->run.gemm_dtype)));
        str_fmt(r->device, sizeof r->device,
                "%s, %.1f GiB (rank 0) | measured 4096^3 GEMM peak: fp32 %.1f TFLOP/s, bf16 inputs %.1f TFLOP/s | "
                "run.gemm_dtype=%s", name, mem / 1073741824.0, pk[0] * 1e-3, pk[1] * 1e-3,
                cfg->run.gemm_dtype == GEMM_DTYPE_BF16 ? "bf16" : "fp32");
    }
    r->unigram_ppl = cfg->model.task == TASK_LM ? data_unigram_ppl(&r->ds, SPLIT_VALID) : 0;
    r->res->unigram_ppl = r->unigram_ppl;
    TRY(comm_agree(comm, open_log(r)));
    r->stage = 7;
    mem_register(&r->macct, &r->m, &r->prec);
    r->mem_all = xcalloc(sizeof(double) * (size_t)r->P * (MEM_N_KINDS + 2));
    if (r->pos.step == 0) {
        mem_gather(comm, &r->macct, r->mem_all);
        runlog_mem(&r->log, 0, r->mem_all);
        runlog_project(&r->log, 0, r->proj_mean, r->proj_max, r->n_proj, r->proj_s);
    }
    r->flops_tok = model_flops_per_token(&r->m);
    print_banner(r);
    r->in = xcalloc(sizeof(int32_t) * r->Bl * r->T);
    r->tg = xcalloc(sizeof(int32_t) * r->Bl * r->T);
    r->len = xcalloc(sizeof(int32_t) * r->Bl);
    r->rank_buf = xcalloc(sizeof(double) * 3 * r->P);
    r->rank_cols = xcalloc(sizeof(double) * 2 * r->P);
    r->evs = xcalloc(sizeof(ReclusterEvent) * (size_t)(r->m.L ? r->m.L : 1));
    r->cevs = xcalloc(sizeof(CompressEvent) * (size_t)(r->m.L ? r->m.L : 1));
    r->last_event = -1;
    /* after a compression, re-clustering's warm-up counts from it */
    r->warm = cfg->clustering.compress_at + recluster_warmup(cfg);
    r->n_global = cfg->model.task == TASK_LM ? (long)cfg->train.batch_size * r->T : cfg->train.batch_size;
    r->t_start = time_now() - r->pos.elapsed_s;
    r->log_owner = true;
    r->stage = 8;
    return status_ok();
}

static void run_teardown(Run *r) {
    Comm *comm = r->comm;
    if (r->stage >= 7) runlog_close(&r->log);
    if (r->stage >= 6) residency_free(&r->resid);
    if (r->stage >= 5) prec_free(&r->prec);
    if (r->stage >= 4) model_free(&r->m);
    if (r->stage >= 3) {
        comm->traffic = NULL;
        traffic_free(&r->traffic);
        comm->topo = NULL;
        topology_free(&r->topo);
    }
    if (r->stage >= 2) data_free(&r->ds);
    if (r->stage >= 1) backend_free(&r->be);
    xfree(r->mem_all); xfree(r->in); xfree(r->tg); xfree(r->len); xfree(r->rank_buf); xfree(r->rank_cols); xfree(r->evs); xfree(r->cevs); xfree(r->intra_frac); xfree(r->rep_bad); xfree(r->place_ev);
    xfree(r->fu); xfree(r->proj_mean); xfree(r->proj_max);
}

/* ---- one training step ---- */

/* "first on rank R (... batch ...)": the first rank whose own loss is not finite (collective) */
static void describe_nonfinite(const Run *r, long step, double local_loss, char *where, size_t cap) {
    double first_bad = isfinite(local_loss) ? 0 : (double)(r->P - r->rank);
    comm_allreduce_max_f64(r->comm, &first_bad, 1);
    int bad = first_bad > 0 ? r->P - (int)first_bad : -1;
    if (bad >= 0)
        str_fmt(where, cap, "first on rank %d (its local loss is not finite; batch: %s %d..%d of the global batch of "
                "step %ld, data seed %llu)", bad, r->cfg->model.task == TASK_LM ? "sequences" : "examples", bad * r->Bl,
                (bad + 1) * r->Bl - 1, step + 1, (unsigned long long)r->cfg->run.seed);
    else
        str_fmt(where, cap, "every rank's loss is finite; the reduced gradient is not (global batch of step %ld, "
                "data seed %llu)", step + 1, (unsigned long long)r->cfg->run.seed);
}

/* forward, backward, gradient reduction, the non-finite check and the optimizer update */
static Status train_step(Run *r, long step, StepOut *o) {
    const Config *cfg = r->cfg;
    const TrainConfig *tc = &cfg->train;
    Comm *comm = r->comm;
    Model *m = &r->m;
    int n_clus = model_n_clustered_layers(m);
    o->t0 = time_now();
    o->w0 = wait_total(comm);
    o->wa0 = comm->stats.wait[COMM_PHASE_ALLREDUCE];
    comm->traffic = &r->traffic;
    for (int l = 0; l < m->L; l++) m->ep[l].collect = m->ffn[l].kind != MOE_KIND_DENSE;
    o->ar_bytes0 = comm->stats.bytes[COMM_PHASE_ALLREDUCE];
    o->ar_s0 = comm->stats.seconds[COMM_PHASE_ALLREDUCE] + comm->stats.wait[COMM_PHASE_ALLREDUCE];
    o->ar_in0 = comm->stats.inflight[COMM_PHASE_ALLREDUCE];
    if (cfg->model.task == TASK_LM)
        data_lm_train_batch(data_lm_train_split(&r->ds, step), (uint64_t)cfg->run.seed, step, r->rank * r->Bl, r->Bl, r->T, r->in, r->tg);
    else
        data_cls_train_batch(&r->ds.cls[SPLIT_TRAIN], (uint64_t)cfg->run.seed, step, r->rank * r->Bl, r->Bl, r->in, r->len, r->tg);
    model_zero_grad(m);
    o->log_step = (step + 1) % tc->log_interval == 0 || step == 0 || step + 1 == tc->steps;
    /* qat: fake-quantise this step's weights (on the backend); qat and storage: measure the
     * quantisation error on log steps (host copies; collective) */
    prec_qat_refresh(&r->prec);
    if (o->log_step) prec_measure(&r->prec);
    m->collect_mu = n_clus > 0 && cfg->clustering.enabled;
    test_slow_rank(r->rank);
    model_forward(m, r->in, r->tg, r->len, r->Bl, r->n_global);
    m->collect_mu = 0;
    o->t1 = time_now();
    o->w1 = wait_total(comm);
    model_backward(m, r->n_global);
    o->t2 = time_now();
    o->w2 = wait_total(comm);
    /* global loss: sum of local CE contributions + the (global) aux terms */
    if (test_nan_at(step + 1, r->rank)) m->loss_sum = NAN;
    double local_loss = m->loss_sum, ce[1] = {m->loss_sum / (double)r->n_global};
    comm_allreduce_sum_f64(comm, ce, 1);
    o->ce = ce[0];
    o->loss = ce[0] + m->aux_loss + m->z_loss;
    optim_reduce_grads(m);
    if (n_clus > 0 && cfg->clustering.router_freeze > 0 && r->last_event >= 0 &&
        step < r->last_event + cfg->clustering.router_freeze)
        for (int i = 0; i < m->n_tensors; i++)
            if (m->tensors[i].kind == PARAM_ROUTER)
                r->be.ops->zero(r->be.ctx, m->grads[m->tensors[i].cat] + m->tensors[i].offset, sizeof(float) * m->tensors[i].n);
    o->lr = optim_lr(tc, step);
    o->gnorm = optim_grad_norm(m);
    if (isfinite(o->loss) && isfinite(o->gnorm)) {
        optim_step_norm(m, step, o->lr, o->gnorm);
        return status_ok();
    }
    char where[256];
    describe_nonfinite(r, step, local_loss, where, sizeof where);
    if (tc->on_nonfinite == TRAIN_ON_NONFINITE_SKIP_STEP) {
        if (r->rank == 0)
            fprintf(stderr, "dcmoe: warning: step %ld: non-finite loss %g / gradient norm %g, %s; update skipped "
                    "(train.on_nonfinite: skip_step)\n", step + 1, o->loss, o->gnorm, where);
        return status_ok();
    }
    if (r->rank == 0) {   /* the record shows the step that stopped the run */
        h5log_append(&r->log.lg, r->log.id.loss, step + 1, &o->loss);
        h5log_append(&r->log.lg, r->log.id.gnorm, step + 1, &o->gnorm);
        runlog_flush(&r->log);
    }
    return status_errorf("step %ld: non-finite loss %g / gradient norm %g, %s; stopped without a checkpoint (the last "
                         "good one is kept; lower train.lr, raise train.warmup_steps, or set train.on_nonfinite: "
                         "skip_step)", step + 1, o->loss, o->gnorm, where);
}

/* after the update: balance biases, placement statistics and re-placement, offloading, the
 * traffic of the step; then the log row and the progress line */
static Status finish_step(Run *r, long step, StepOut *o) {
    const Config *cfg = r->cfg;
    const TrainConfig *tc = &cfg->train;
    Comm *comm = r->comm;
    Model *m = &r->m;
    int P = r->P;
    if (model_n_clustered_layers(m) > 0 && cfg->clustering.enabled) recluster_mu_step(m);
    if (compress_pending(m)) compress_coact_step(m);   /* the warm-up's co-activation statistics */
    /* moe.balance: aux_free, for the standard and the clustered layers (a no-op otherwise) */
    for (int l = 0; l < m->L; l++) moe_update_bias(&m->ffn[l], &m->acts[l].moe);
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind != MOE_KIND_DENSE) ep_stats_step(&m->ep[l], comm, cfg->parallel.affinity_ema);
    /* routing trace (log.trace_interval): every token's kept experts and the expert map the
     * step's exchange used (before any re-placement below), gathered to rank 0 */
    int nm_tr = model_n_moe_layers(m);
    if (cfg->log.trace_interval > 0 && nm_tr > 0 && (step + 1) % cfg->log.trace_interval == 0) {
        int k = cfg->moe.top_k;
        size_t nk = (size_t)m->B_max * m->T * k;
        int32_t *local = xmalloc(sizeof(int32_t) * (size_t)nm_tr * nk);
        int32_t *all = r->rank == 0 ? xmalloc(sizeof(int32_t) * (size_t)nm_tr * nk * P) : NULL;
        int i = 0;
        for (int l = 0; l < m->L; l++) {
            if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
            const Route *rt = &m->acts[l].moe.route;
            for (size_t q = 0; q < nk; q++)
                local[(size_t)i * nk + q] = q < (size_t)rt->N * k && rt->pos[q] >= 0 ? rt->expert[q] : -1;
            i++;
        }
        comm_gather_bytes(comm, local, all, sizeof(int32_t) * (size_t)nm_tr * nk, 0);
        if (r->rank == 0) runlog_trace(&r->log, m, step + 1, all);
        xfree(local);
        xfree(all);
    }
    /* offloading closes the step first, so a unit the placement fetches back below has its
     * catch-up include this step's update */
    TRY(comm_agree(comm, residency_end_step(&r->resid, step)));
    double migr = r->pending_migr;
    r->pending_migr = 0;
    if (m->ep_size > 1 && model_n_moe_layers(m) > 0 && cfg->parallel.place_interval > 0 &&
        (step + 1) % cfg->parallel.place_interval == 0 && step + 1 != tc->steps) {
        TRY(residency_fetch_all(&r->resid));
        if (!r->place_ev) r->place_ev = xcalloc(sizeof(double) * PLACE_COLS * (size_t)model_n_moe_layers(m));
        double b = replace_experts(m, cfg, m->ep_topo, 0, &r->log_owner, step + 1, r->place_ev, !r->opt->quiet);
        r->place_logged = false;
        if (b > 0) r->log_owner = true;
        migr += b;
    }
    /* replicated hot units: copies bitwise equal to their primaries (checked on log steps) */
    test_replica_flip(m, step + 1);
    double *rep_bad = NULL;
    if (o->log_step && model_ep_has_replicas(m)) {
        if (!r->rep_bad) r->rep_bad = xcalloc(sizeof(double) * (size_t)(model_n_moe_layers(m) + 1));
        model_ep_replicas_mismatch(m, r->rep_bad);
        rep_bad = r->rep_bad;
    }
    ResidencyStats rs = residency_take_step(&r->resid);
    double off7[7] = {rs.hits, rs.misses, rs.evictions, rs.bytes_in, rs.bytes_out, rs.stall_s, rs.resident_units};
    if (r->resid.enabled) comm_allreduce_sum_f64(comm, off7, 7);
    TrafficStep ts;
    bool matrices = (step + 1) % cfg->parallel.traffic_interval == 0 || step + 1 == tc->steps;
    traffic_step_end(&r->traffic, comm, &ts, matrices);
    comm->traffic = NULL;
    double t3 = time_now();
    o->dt = t3 - o->t0;
    double w3 = wait_total(comm), wa = comm->stats.wait[COMM_PHASE_ALLREDUCE] - o->wa0;
    /* per rank: compute time, peak RSS, step time (perf/step_s is the slowest rank's) */
    double mine[3] = {o->t2 - o->t0, peak_rss_bytes(), o->dt};
    comm_gather_bytes(comm, mine, r->rank_buf, sizeof mine, 0);
    if (o->log_step) {
        mem_refresh_layers(&r->macct, &r->m);
        mem_gather(comm, &r->macct, r->mem_all);
    }
    /* per MoE layer: dispatch rows between ranks that stay inside the node (the last forward's plan) */
    int nm = model_n_moe_layers(m);
    if (nm > 0) {
        if (!r->intra_frac) r->intra_frac = xcalloc(sizeof(double) * 3 * (size_t)nm);
        double *loc = r->intra_frac + nm;
        int i = 0;
        for (int l = 0; l < m->L; l++) {
            const EpPath *pp = moe_state_path(&m->ffn[l], &m->acts[l].moe);
            if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
            loc[2 * i] = pp ? pp->rows_intra : 0;
            loc[2 * i + 1] = pp ? pp->rows_inter : 0;
            i++;
        }
        comm_allreduce_sum_f64(comm, loc, 2 * (size_t)nm);
        for (i = 0; i < nm; i++) {
            double tot = loc[2 * i] + loc[2 * i + 1];
            r->intra_frac[i] = tot > 0 ? loc[2 * i] / tot : 1.0;
        }
    }
    r->pos.step = step + 1;
    r->pos.tokens_seen += (int64_t)tc->batch_size * r->T;
    if (r->rank != 0) return status_ok();
    double slowest = 0;
    for (int q = 0; q < P; q++) {
        r->rank_cols[q] = r->rank_buf[3 * q];
        r->rank_cols[P + q] = r->rank_buf[3 * q + 1];
        if (r->rank_buf[3 * q + 2] > slowest) slowest = r->rank_buf[3 * q + 2];
    }
    r->window_steps++;
    r->window_time += slowest;
    r->ema_step = r->ema_step == 0 ? slowest : 0.9 * r->ema_step + 0.1 * slowest;
    long s = step + 1;
    /* the allreduce column: the transfer and (log.sync_wait) the timed wait before it */
    double ar_s = comm->stats.seconds[COMM_PHASE_ALLREDUCE] + comm->stats.wait[COMM_PHASE_ALLREDUCE] - o->ar_s0;
    StepRecord rec = {
        .step = s, .loss = o->loss, .ce = o->ce, .aux = m->aux_loss, .z = m->z_loss, .lr = o->lr, .gnorm = o->gnorm,
        .tokens = r->pos.tokens_seen, .step_s = slowest, .tok_s = tc->batch_size * r->T / slowest,
        .split = {o->t1 - o->t0, o->t2 - o->t1, ar_s, t3 - o->t2 - ar_s},
        .wait_split = {o->w1 - o->w0, o->w2 - o->w1, wa, w3 - o->w2 - wa},
        .allreduce_bytes = (double)(comm->stats.bytes[COMM_PHASE_ALLREDUCE] - o->ar_bytes0),
        .allreduce_inflight_s = comm->stats.inflight[COMM_PHASE_ALLREDUCE] - o->ar_in0,
        .allreduce_exposed_s = m->gsync ? m->gsync->last_exposed_s : 0,
        .offload7 = r->resid.enabled ? off7 : NULL, .ts = &ts, .traffic = &r->traffic,
        .traffic_matrices = matrices,
        .owners = r->log_owner || migr > 0, .migration_bytes = migr,
        .rank_compute_s = r->rank_cols, .rank_rss = r->rank_cols + P,
        .qerr = o->log_step ? r->prec.qerr : NULL, .mem_all = o->log_step ? r->mem_all : NULL,
        .intra_frac = r->intra_frac, .replica_mismatch = rep_bad,
        .placement = r->place_ev && !r->place_logged ? r->place_ev : NULL};
    r->place_logged = true;
    rec.flops_frac = r->flops_tok * rec.tok_s / (r->peak_total * 1e9);
    r->log_owner = false;
    double mean_cv2 = runlog_step(&r->log, m, &rec);
    if (!r->opt->quiet && (s % tc->log_interval == 0 || s == 1 || s == tc->steps)) {
        double wtok = tc->batch_size * r->T * r->window_steps / r->window_time;
        char eta[32];
        fmt_eta(eta, sizeof eta, r->ema_step * (double)(tc->steps - s));
        printf("step %6ld/%d | loss %.4f | aux %.4f | lr %.2e | %.1f ms/step | %.0f tok/s | %.1f%% of peak | cv2 %.3f | "
               "ETA %s\n", s, tc->steps, o->loss, m->aux_loss + m->z_loss, o->lr, 1e3 * r->window_time / r->window_steps,
               wtok, 100.0 * r->flops_tok * wtok / (r->peak_total * 1e9), mean_cv2, eta);
        fflush(stdout);
        r->window_steps = 0;
        r->window_time = 0;
    }
    return status_ok();
}

/* ---- events between steps ---- */

/* clustering.verify: what an event may change (this rank's expert category: weights and Adam
 * moments; every clustered layer's groups), so that a rejected event is undone bitwise */
typedef struct EventSnapshot {
    float *arr[3];
    int32_t *groups;                    /* per clustered layer group_of [E] then members [E] */
    int *n_accepted;                    /* [L] */
} EventSnapshot;

static void snapshot_take(EventSnapshot *sn, const Model *m) {
    size_t nl = m->n_cat[PCAT_EXPERT], ng = 0;
    const float *dev[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    for (int a = 0; a < 3; a++) {
        sn->arr[a] = xmalloc(sizeof(float) * (nl ? nl : 1));
        if (nl) m->be->ops->to_host(m->be->ctx, sn->arr[a], dev[a], sizeof(float) * nl);
    }
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED) ng += 2 * (size_t)m->ffn[l].E;
    sn->groups = xmalloc(sizeof(int32_t) * (ng ? ng : 1));
    sn->n_accepted = xcalloc(sizeof(int) * m->L);
    int32_t *g = sn->groups;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
        int E = m->ffn[l].E;
        memcpy(g, m->cstate[l].group_of, sizeof(int32_t) * E);
        memcpy(g + E, m->cstate[l].members, sizeof(int32_t) * E);
        g += 2 * E;
        sn->n_accepted[l] = m->cstate[l].n_accepted;
    }
}

static void snapshot_restore(const EventSnapshot *sn, Model *m) {
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *dev[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    for (int a = 0; a < 3; a++)
        if (nl) m->be->ops->from_host(m->be->ctx, dev[a], sn->arr[a], sizeof(float) * nl);
    const int32_t *g = sn->groups;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
        int E = m->ffn[l].E;
        memcpy(m->cstate[l].group_of, g, sizeof(int32_t) * E);
        memcpy(m->cstate[l].members, g + E, sizeof(int32_t) * E);
        g += 2 * E;
        m->cstate[l].n_accepted = sn->n_accepted[l];
        ep_map_refresh(&m->ep[l], m->cstate[l].members);
    }
}

static void snapshot_free(EventSnapshot *sn) {
    for (int a = 0; a < 3; a++) xfree(sn->arr[a]);
    xfree(sn->groups);
    xfree(sn->n_accepted);
    memset(sn, 0, sizeof *sn);
}

/* re-cluster every clustered layer, re-place the groups, log the event with probe losses.
 * clustering.verify: an event that moved experts is kept only if the probe loss rose by at
 * most clustering.max_probe_increase; otherwise it is undone bitwise (nothing is re-placed)
 * and its rows say rolled back. The probe "after" is the proposal's in both cases. */
static Status recluster_event(Run *r, long step) {
    Model *m = &r->m;
    const ClusterConfig *cc = &r->cfg->clustering;
    int bs = r->cfg->train.batch_size;
    double pb = evaluate(m, &r->ds, SPLIT_VALID, cc->probe_batches, bs, &r->prec).loss;
    TRY(comm_agree(r->comm, residency_fetch_all(&r->resid)));
    EventSnapshot sn = {0};
    if (cc->verify) snapshot_take(&sn, m);
    r->comm->traffic = &r->traffic;   /* the event's bytes (phase recluster) land in the next step's row */
    int n_ev = recluster_run(m, step + 1, r->evs);
    r->comm->traffic = NULL;
    int moved = 0, refit = 0;
    for (int i = 0; i < n_ev; i++) {
        moved += r->evs[i].accepted ? r->evs[i].n_moved : 0;
        refit += r->evs[i].n_groups_refit;
    }
    double pa = evaluate(m, &r->ds, SPLIT_VALID, cc->probe_batches, bs, &r->prec).loss;
    int rolled_back = cc->verify && moved > 0 && pa - pb > cc->max_probe_increase;
    if (rolled_back) {
        snapshot_restore(&sn, m);
        for (int i = 0; i < n_ev; i++) r->evs[i].rolled_back = r->evs[i].accepted && r->evs[i].n_moved > 0;
    } else if (m->ep_size > 1) {
        /* groups changed: re-place them (migration bytes land in the next step's log) */
        if (!r->place_ev) r->place_ev = xcalloc(sizeof(double) * PLACE_COLS * (size_t)model_n_moe_layers(m));
        r->pending_migr += replace_experts(m, r->cfg, m->ep_topo, 1, &r->log_owner, step + 1, r->place_ev,
                                           !r->opt->quiet);
        r->place_logged = false;
    }
    if (cc->verify) snapshot_free(&sn);
    /* the partition in force now against the reference (compression's, or step 0's) */
    double jref = 0;
    for (int i = 0; i < n_ev; i++) {
        r->evs[i].jaccard_ref = recluster_jaccard_ref(m, r->evs[i].layer);
        jref += r->evs[i].jaccard_ref / n_ev;
    }
    r->last_event = step + 1;
    runlog_event(&r->log, m, step + 1, r->evs, n_ev, pb, pa);
    followup_add(r, step + 1, 0, pb, pa);
    if (r->rank == 0) {
        double emax = 0;
        for (int i = 0; i < n_ev; i++)
            if (r->evs[i].recon_err_max > emax) emax = r->evs[i].recon_err_max;
        printf("re-cluster step %ld | %d layer(s) | moved %d experts | refit %d groups | max recon err %.2f%% | "
               "probe loss %.4f -> %.4f | jaccard to reference %.3f%s\n", step + 1, n_ev, moved, refit, 100 * emax, pb,
               pa, jref,
               !cc->verify || moved == 0 ? "" : rolled_back ? " | rolled back (verify)" : " | kept (verify)");
        fflush(stdout);
    }
    return status_ok();
}

/* clustering.mode masters: recompute the projection from the masters after `step` steps and
 * log its error (a no-op in compressed mode) */
static void project(Run *r, long step) {
    double t0 = time_now();
    r->n_proj = recluster_project(&r->m, step, r->proj_mean, r->proj_max);
    r->proj_s = time_now() - t0;
    runlog_project(&r->log, step, r->proj_mean, r->proj_max, r->n_proj, r->proj_s);
}

/* clustering.compress_at: after step compress_at, the warm-up's standard MoE becomes the
 * clustered model. The new model is built from the run's config, filled from the old one
 * (compress_event.c), and replaces it; everything that holds the model (precision, offloading,
 * memory accounting, FLOPs per token, the log's layer kinds) is set up again for it. The
 * probe loss on clustering.probe_batches fixed validation batches is logged before and after. */
static Status compress_swap(Run *r, long step) {
    const Config *cfg = r->cfg;
    Comm *comm = r->comm;
    Model *old = &r->m;
    int bs = cfg->train.batch_size;
    double t0 = time_now();
    /* a sample of every MoE layer's inputs (the last training forward's, rank 0) for the
     * output-space error, taken before the probe overwrites the activations */
    int nx = 0;
    float **x = xcalloc(sizeof(float *) * (size_t)old->L);
    if (r->rank == 0) {
        nx = old->B * old->T < 256 ? old->B * old->T : 256;
        for (int l = 0; l < old->L; l++) {
            if (old->ffn[l].kind == MOE_KIND_DENSE) continue;
            x[l] = xmalloc(sizeof(float) * (size_t)nx * old->D + 1);
            r->be.ops->to_host(r->be.ctx, x[l], old->acts[l].ln2, sizeof(float) * (size_t)nx * old->D);
        }
    }
    double pb = evaluate(old, &r->ds, SPLIT_VALID, cfg->clustering.probe_batches, bs, &r->prec).loss;
    TRY(comm_agree(comm, residency_fetch_all(&r->resid)));
    Model nw;
    TRY(comm_agree(comm, model_init(&nw, cfg, r->ds.vocab.n_words, old->C, r->Bl, &r->be, comm)));
    TRY(attach_collectives(r, &nw, false));
    model_init_params(&nw);
    int n = compress_event_run(old, &nw, step + 1, x, nx, r->cevs);
    for (int l = 0; l < old->L; l++) xfree(x[l]);
    xfree(x);
    /* the caches of the old model go, the new one takes its place */
    residency_free(&r->resid);
    prec_free(&r->prec);
    model_free(old);
    r->m = nw;
    prec_init(&r->prec, &r->m);
    TRY(comm_agree(comm, residency_init(&r->resid, &r->m, &cfg->offload, r->dir)));
    r->resid.step = step + 1;
    if (r->resid.enabled)
        for (int l = 0; l < r->m.L; l++) { r->m.ffn[l].need = residency_hook; r->m.ffn[l].need_ctx = &r->resid; }
    mem_register(&r->macct, &r->m, &r->prec);
    r->flops_tok = model_flops_per_token(&r->m);
    runlog_set_model(&r->log, &r->m);
    r->log_owner = true;   /* groups are the placement units now */
    /* clustering.mode masters: the warm-up's experts became the masters (with their Adam
     * moments); the projection is the one every later refresh computes */
    project(r, step + 1);
    double pa = evaluate(&r->m, &r->ds, SPLIT_VALID, cfg->clustering.probe_batches, bs, &r->prec).loss;
    for (int i = 0; i < n; i++) { r->cevs[i].probe_before = pb; r->cevs[i].probe_after = pa; }
    runlog_compress(&r->log, &r->m, step + 1, r->cevs, n);
    followup_add(r, step + 1, 1, pb, pa);
    if (r->rank == 0) {
        double we = 0, wmax = 0, oe = 0, cs = 0;
        for (int i = 0; i < n; i++) {
            we += r->cevs[i].werr_mean / n;
            oe += r->cevs[i].oerr_mean / n;
            cs += r->cevs[i].cosel / n;
            if (r->cevs[i].werr_max > wmax) wmax = r->cevs[i].werr_max;
        }
        static const char *const pn[] = {"learned", "random", "contiguous"};
        printf("compress step %ld | %d layer(s) | %s partition | weight err %.2f%% (max %.2f%%) | output err %.2f%% | "
               "co-selection in groups %.1f%% (random %.1f%%) | probe loss %.4f -> %.4f | %.2f s\n", step + 1, n,
               pn[cfg->clustering.compress_partition], 100 * we, 100 * wmax, 100 * oe, 100 * cs,
               n ? 100 * r->cevs[0].cosel_random : 0, pb, pa, time_now() - t0);
        print_params(&r->m);
        fflush(stdout);
    }
    return status_ok();
}

/* validation at `step` (1-based); with once, no second eval row at a step that has one */
static void validate(Run *r, long step, bool once) {
    EvalOut ev = evaluate(&r->m, &r->ds, SPLIT_VALID, r->cfg->train.eval_batches, r->cfg->train.batch_size, &r->prec);
    runlog_eval(&r->log, step, &ev, once);
    if (r->rank == 0) {
        if (r->cfg->model.task == TASK_LM)
            printf("eval step %ld | valid loss %.4f | valid ppl %.2f (unigram %.2f) | %ld tokens\n", step, ev.loss,
                   ev.ppl, r->unigram_ppl, ev.n);
        else
            printf("eval step %ld | valid loss %.4f | valid %s %.4f | %ld examples\n", step, ev.loss,
                   cls_metric_name(r->ds.metric), ev.metric, ev.n);
        fflush(stdout);
    }
    r->res->valid_loss = ev.loss;
    r->res->valid_ppl = ev.ppl;
    r->res->valid_metric = ev.metric;
}

/* checkpoint when due, and stop when asked (--stop-at, a signal on any rank, a failed log
 * write); returns the stop reason agreed by every rank in *stop (0 = go on) */
static Status checkpoint_and_stop(Run *r, long step, int *stop_out) {
    const Config *cfg = r->cfg;
    bool is_last = step + 1 == cfg->train.steps;
    Status log_err = runlog_take_error(&r->log);
    /* [--stop-at reached, signal number, the log failed] */
    double stop[3] = {r->opt->stop_at > 0 && step + 1 >= r->opt->stop_at && !is_last ? 1 : 0, (double)g_stop_signal,
                      STATUS_OK(log_err) ? 0 : 1};
    comm_allreduce_max_f64(r->comm, stop, 3);
    bool stopping = stop[0] > 0 || stop[1] > 0 || stop[2] > 0;
    *stop_out = stopping;
    if (is_last || stopping || (cfg->checkpoint.interval > 0 && (step + 1) % cfg->checkpoint.interval == 0)) {
        r->pos.elapsed_s = time_now() - r->t_start;
        Status fs = runlog_flush(&r->log);
        if (STATUS_OK(log_err) && !STATUS_OK(fs)) { log_err = fs; stop[2] = 1; }
        Status st = comm_agree(r->comm, residency_fetch_all(&r->resid));
        if (STATUS_OK(st)) st = followup_save(r);
        if (!STATUS_OK(st))
            return status_errorf("step %ld: checkpoint failed: %s%s", step + 1, st.msg,
                                 stop[2] > 0 ? " (after the metrics log failed too)" : "");
    }
    if (stop[2] > 0)   /* a failed log write stops the run once the last checkpoint attempt succeeded */
        return status_errorf("step %ld: writing %s failed: %s; a checkpoint of step %ld was written, continue with "
                             "--resume once the disk has room", step + 1, r->log_path,
                             r->rank == 0 && !STATUS_OK(log_err) ? log_err.msg : "(rank 0 has the message)", step + 1);
    if (stopping && r->rank == 0) {
        if (stop[1] > 0)
            printf("signal %s received: checkpoint written at step %ld, stopping (continue with --resume)\n",
                   (int)stop[1] == SIGTERM ? "SIGTERM" : (int)stop[1] == SIGUSR1 ? "SIGUSR1" : "(other)", step + 1);
        else
            printf("--stop-at reached: checkpoint written at step %ld, stopping (continue with --resume)\n", step + 1);
    }
    return status_ok();
}

/* a signal during start-up: checkpoint where we are (unless resumed from exactly here) and stop */
static Status startup_signal(Run *r) {
    double sig = (double)g_stop_signal;
    comm_allreduce_max_f64(r->comm, &sig, 1);
    if (sig <= 0 || r->pos.step >= r->cfg->train.steps) return status_ok();
    if (!r->ckpt[0]) {
        r->pos.elapsed_s = time_now() - r->t_start;
        runlog_flush(&r->log);
        TRY(followup_save(r));
    }
    if (r->rank == 0)
        printf("signal received during start-up: %s at step %lld, stopping (continue with --resume)\n",
               r->ckpt[0] ? "the run stays" : "checkpoint written", (long long)r->pos.step);
    r->res->interrupted = true;
    return status_ok();
}

/* the last step is done: the final validation when resumed exactly there (killed after the
 * final checkpoint, before DONE; recomputed, deterministic, rows written once), the test split,
 * the final rows */
static void final_evaluation(Run *r, long first_step) {
    const TrainConfig *tc = &r->cfg->train;
    if (first_step >= tc->steps) {
        if (r->rank == 0) printf("resumed at the last step (%lld): finishing the final evaluation\n", (long long)r->pos.step);
        validate(r, (long)r->pos.step, true);
    }
    if (r->cfg->model.task != TASK_LM) return;
    EvalOut ev = evaluate(&r->m, &r->ds, SPLIT_TEST, tc->eval_batches, tc->batch_size, &r->prec);
    r->res->test_loss = ev.loss;
    r->res->test_ppl = ev.ppl;
    runlog_final(&r->log, (long)r->pos.step, r->res->valid_ppl, ev.ppl, ev.loss);
    if (r->rank != 0) return;
    if (ev.n > 0)
        printf("final | valid ppl %.2f | test ppl %.2f | unigram ppl (valid) %.2f | %.1f s\n", r->res->valid_ppl, ev.ppl,
               r->unigram_ppl, time_now() - r->t_start);
    else
        printf("final | valid ppl %.2f | test split shorter than one window | unigram ppl (valid) %.2f | %.1f s\n",
               r->res->valid_ppl, r->unigram_ppl, time_now() - r->t_start);
}

/* ---- the run ---- */

static Status train_loop(Run *r) {
    const Config *cfg = r->cfg;
    const TrainConfig *tc = &cfg->train;
    TRY(startup_signal(r));
    long first_step = r->pos.step;
    for (long step = r->pos.step; step < tc->steps && !r->res->interrupted; step++) {
        StepOut o;
        TRY(train_step(r, step, &o));
        r->res->final_train_loss = o.loss;
        TRY(finish_step(r, step, &o));
        if (model_masters(&r->m) && (step + 1) % cfg->clustering.project_interval == 0) project(r, step + 1);
        bool is_last = step + 1 == tc->steps;
        followup_step(r, step + 1, is_last);
        if (cfg->clustering.compress_at > 0 && step + 1 == cfg->clustering.compress_at && compress_pending(&r->m))
            TRY(compress_swap(r, step));
        if (model_n_clustered_layers(&r->m) > 0 && cfg->clustering.enabled && step + 1 >= r->warm &&
            (step + 1) % cfg->clustering.interval == 0 && !is_last)
            TRY(recluster_event(r, step));
        if ((tc->eval_interval > 0 && (step + 1) % tc->eval_interval == 0) || is_last) validate(r, step + 1, false);
        int stop;
        TRY(checkpoint_and_stop(r, step, &stop));
        if (stop) r->res->interrupted = true;
    }
    if (!r->res->interrupted && r->pos.step >= tc->steps) final_evaluation(r, first_step);
    return status_ok();
}

static Status train_run_locked(const Config *cfg, const TrainOptions *opt, Comm *comm, TrainResult *res, int *lock_fd) {
    memset(res, 0, sizeof *res);
    if (cfg->train.batch_size % comm->size != 0)
        return status_errorf("train.batch_size=%d is not divisible by the %d ranks", cfg->train.batch_size, comm->size);
    if (cfg->offload.enabled && cfg->run.backend == BACKEND_CUDA)
        /* residency.c offloads the model's own expert arrays in place (host memory, locate) with
         * on_fetch / on_evict hooks that replay AdamW on host pointers: device slots would need
         * the hooks' catch-up on the device and the in-place units' pages moved by copies */
        return status_errorf("offload.enabled with run.backend=cuda: training-time offloading works on host memory "
                             "only (dcmoe eval --precision stored may offload on cuda); set "
                             "offload.enabled=false or run.backend=cpu");
    if (cfg->offload.enabled && cfg->precision.mode == PRECISION_QAT)
        return status_errorf("offload.enabled with precision.mode=qat: training-time offloading needs fp32 or "
                             "storage (the QAT shadow weights are rebuilt from every master each step)");
    Run *r = xcalloc(sizeof *r);
    *r = (Run){.cfg = cfg, .opt = opt, .comm = comm, .res = res, .P = comm->size, .rank = comm->rank,
               .Bl = cfg->train.batch_size / comm->size, .T = cfg->model.seq_len};
    train_run_dir(cfg, r->dir, sizeof r->dir);
    str_fmt(r->vocab_path, sizeof r->vocab_path, "%s/vocab.txt", r->dir);
    str_fmt(r->log_path, sizeof r->log_path, "%s/metrics.h5", r->dir);
    train_install_signal_handlers();
    /* the run folder is locked for the whole run (a second start is refused naming the holder) */
    int done = 0;
    Status st = claim_run_folder(r, lock_fd, &done);
    if (STATUS_OK(st) && done) res->already_done = true;
    else if (STATUS_OK(st)) {
        st = run_setup(r);
        if (STATUS_OK(st)) st = train_loop(r);
        res->steps_done = r->pos.step;
        if (r->stage >= 7) {
            Status fs = runlog_flush(&r->log);
            if (STATUS_OK(st) && !STATUS_OK(fs)) st = status_errorf("writing %s failed: %s", r->log_path, fs.msg);
            runlog_close(&r->log);
        }
        /* DONE marks a run that reached train.steps (launchers skip it); written last, atomically */
        if (r->rank == 0 && STATUS_OK(st) && !res->interrupted && r->pos.step >= cfg->train.steps) {
            char done_path[4096], text[128];
            str_fmt(done_path, sizeof done_path, "%s/DONE", r->dir);
            int nd = snprintf(text, sizeof text, "steps %lld\n", (long long)r->pos.step);
            st = file_write_atomic(done_path, text, (size_t)nd);
        }
        st = comm_agree(comm, st);
    }
    run_teardown(r);
    xfree(r);
    return st;
}

/* the run folder's lock is held from the first checks to the end, whatever the outcome */
Status train_run(const Config *cfg, const TrainOptions *opt, Comm *comm, TrainResult *res) {
    int lock_fd = -1;
    Status st = train_run_locked(cfg, opt, comm, res, &lock_fd);
    char run_dir[2048];
    train_run_dir(cfg, run_dir, sizeof run_dir);
    run_lock_release(run_dir, lock_fd);
    return st;
}
