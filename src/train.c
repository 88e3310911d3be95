/* train.c: the training loop, evaluation, metrics logging, checkpoint/resume.
 * Data parallelism: the global batch of B sequences is the same for every rank count
 * (data.h draws sequence j of step s from (seed, s, j)); rank r runs sequences
 * [r*B/P, (r+1)*B/P), gradients carry the 1/n_global scale and are summed over ranks. */
#include "train.h"

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
#include "config_build.h"
#include "data.h"
#include "h5log.h"
#include "metrics.h"
#include "model.h"
#include "optim.h"
#include "precision.h"
#include "recluster.h"
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

void train_run_dir(const Config *cfg, char *dst, size_t cap) {
    str_fmt(dst, cap, "%s/%s", cfg->run.out_dir, cfg->run.name);
}

double train_measure_sgemm_peak(const void *backend) {
    const Backend *be = backend;
    int n = 1024;
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

/* ---- evaluation ---- */

typedef struct EvalOut { double loss, ppl, metric; long n; } EvalOut;

/* every rank takes part (the MoE layers exchange routing counts); global batches of
 * B_global windows, rank r runs its slice, padding windows have no targets */
static EvalOut evaluate_inner(Model *m, const Dataset *ds, int split, int max_batches, int B_global, Precision *pr);

/* evaluation traffic is not training traffic: the profiler and the placement statistics
 * are paused while it runs */
static EvalOut evaluate(Model *m, const Dataset *ds, int split, int max_batches, int B_global, Precision *pr) {
    Traffic *tr = m->comm->traffic;
    m->comm->traffic = NULL;
    for (int l = 0; l < m->L; l++) m->ep[l].collect = 0;
    if (pr) prec_qat_refresh(pr);   /* QAT: evaluate the fake-quantised current weights */
    EvalOut out = evaluate_inner(m, ds, split, max_batches, B_global, pr);
    m->comm->traffic = tr;
    return out;
}

static EvalOut evaluate_inner(Model *m, const Dataset *ds, int split, int max_batches, int B_global, Precision *pr) {
    Comm *comm = m->comm;
    int T = m->T, P = comm->size, Bl = B_global / P;
    EvalOut out = {0};
    int32_t *in = xcalloc(sizeof(int32_t) * Bl * T), *tg = xcalloc(sizeof(int32_t) * Bl * T);
    int32_t *len = xcalloc(sizeof(int32_t) * Bl);
    if (m->task == TASK_LM) {
        long n_win = data_lm_n_windows(&ds->lm[split], T);
        long n_batches = (n_win + B_global - 1) / B_global;
        if (max_batches > 0 && n_batches > max_batches) n_batches = max_batches;
        double acc[2] = {0, 0};
        for (long bi = 0; bi < n_batches; bi++) {
            for (int j = 0; j < Bl; j++) {
                long w = bi * B_global + (long)comm->rank * Bl + j;
                if (w < n_win) data_lm_window(&ds->lm[split], w, T, in + (size_t)j * T, tg + (size_t)j * T);
                else for (int t = 0; t < T; t++) { in[(size_t)j * T + t] = TOK_EOS; tg[(size_t)j * T + t] = -1; }
            }
            if (pr) prec_begin_batch(pr, bi);
            model_forward(m, in, tg, NULL, Bl, (long)B_global * T);
            if (pr) prec_end_batch(pr);
            acc[0] += m->loss_sum;
            acc[1] += m->n_targets_local;
        }
        comm_allreduce_sum_f64(comm, acc, 2);
        out.n = (long)acc[1];
        out.loss = acc[1] > 0 ? acc[0] / acc[1] : 0;
        out.ppl = exp(out.loss);
    } else {
        const ClsSplit *cs = &ds->cls[split];
        long n_ex = cs->n_examples;
        long n_batches = (n_ex + B_global - 1) / B_global;
        if (max_batches > 0 && n_batches > max_batches) n_batches = max_batches;
        long n_used = n_batches * B_global < n_ex ? n_batches * B_global : n_ex;
        double *pred = xcalloc(sizeof(double) * (n_used + 1));
        int32_t *pb = xcalloc(sizeof(int32_t) * Bl);
        double acc[2] = {0, 0};
        for (long bi = 0; bi < n_batches; bi++) {
            for (int j = 0; j < Bl; j++) {
                long e = bi * B_global + (long)comm->rank * Bl + j;
                long src = e < n_ex ? e : 0;
                memcpy(in + (size_t)j * T, cs->tokens + (size_t)src * cs->seq_len, sizeof(int32_t) * T);
                len[j] = cs->lengths[src];
                tg[j] = e < n_ex ? cs->labels[src] : -1;
            }
            if (pr) prec_begin_batch(pr, bi);
            model_forward(m, in, tg, len, Bl, B_global);
            if (pr) prec_end_batch(pr);
            model_predictions(m, pb);
            for (int j = 0; j < Bl; j++) {
                long e = bi * B_global + (long)comm->rank * Bl + j;
                if (e < n_used) pred[e] = pb[j];
            }
            acc[0] += m->loss_sum;
            acc[1] += m->n_targets_local;
        }
        comm_allreduce_sum_f64(comm, pred, (size_t)n_used);
        comm_allreduce_sum_f64(comm, acc, 2);
        int32_t *pi = xcalloc(sizeof(int32_t) * (n_used + 1));
        for (long e = 0; e < n_used; e++) pi[e] = (int32_t)pred[e];
        out.metric = cls_metric(ds->metric, pi, cs->labels, (int)n_used, ds->n_classes);
        out.loss = acc[1] > 0 ? acc[0] / acc[1] : 0;
        out.ppl = exp(out.loss);
        out.n = n_used;
        xfree(pi); xfree(pred); xfree(pb);
    }
    xfree(in); xfree(tg); xfree(len);
    return out;
}

/* ---- HDF5 series ---- */

typedef struct LogIds {
    int loss, ce, aux, z, lr, gnorm, tokens;
    int step_s, tok_s, flops_frac, time_split, comm_bytes;
    int eval_loss, eval_ppl, eval_metric;
    int cv2, var, maxvio, maxmean, entropy, dead, drop, tpe;
    int rank_compute_s, rank_peak_rss;
    int tpg, gcv2, gmaxvio, gdrop, events, group_of;
    int final_valid_ppl, final_test_ppl, final_test_loss;
    int c_intra, c_inter, c_time, c_msgs, c_dispatch, c_matrix, rank_maxvio, rank_tokens, owner, migr, off_train, c_msgmat;
    int qerr;                /* 0 = not logged (fp32 mode or no clustered layer) */
    int mem_bytes, mem_hwm, mem_rss;
} LogIds;

static int n_clustered_layers(const Model *m) {
    int n = 0;
    for (int l = 0; l < m->L; l++) n += m->ffn[l].kind == MOE_KIND_CLUSTERED;
    return n;
}

static int n_moe_layers(const Model *m) {
    int n = 0;
    for (int l = 0; l < m->L; l++) n += m->ffn[l].kind != MOE_KIND_DENSE;
    return n;
}

static Status log_declare(H5log *lg, const Model *m, LogIds *id) {
    uint64_t d4[1] = {4}, dp[1] = {(uint64_t)m->comm->size};
    int nm = n_moe_layers(m);
    uint64_t dl[1] = {(uint64_t)(nm ? nm : 1)};
    uint64_t dle[2] = {(uint64_t)(nm ? nm : 1), (uint64_t)m->cfg.moe.n_experts};
    id->loss = h5log_series(lg, "train/loss", H5LOG_F64, 0, NULL);
    id->ce = h5log_series(lg, "train/ce_loss", H5LOG_F64, 0, NULL);
    id->aux = h5log_series(lg, "train/aux_loss", H5LOG_F64, 0, NULL);
    id->z = h5log_series(lg, "train/z_loss", H5LOG_F64, 0, NULL);
    id->lr = h5log_series(lg, "train/lr", H5LOG_F64, 0, NULL);
    id->gnorm = h5log_series(lg, "train/grad_norm", H5LOG_F64, 0, NULL);
    id->tokens = h5log_series(lg, "train/tokens", H5LOG_I64, 0, NULL);
    id->step_s = h5log_series(lg, "perf/step_s", H5LOG_F64, 0, NULL);
    id->tok_s = h5log_series(lg, "perf/tok_s", H5LOG_F64, 0, NULL);
    id->flops_frac = h5log_series(lg, "perf/flops_frac", H5LOG_F64, 0, NULL);
    id->time_split = h5log_series(lg, "perf/time_split", H5LOG_F64, 1, d4);
    id->comm_bytes = h5log_series(lg, "comm/summary/allreduce_bytes", H5LOG_F64, 0, NULL);
    id->eval_loss = h5log_series(lg, "eval/loss", H5LOG_F64, 0, NULL);
    id->eval_ppl = h5log_series(lg, "eval/ppl", H5LOG_F64, 0, NULL);
    id->eval_metric = h5log_series(lg, "eval/metric", H5LOG_F64, 0, NULL);
    id->cv2 = h5log_series(lg, "moe/balance/cv2", H5LOG_F64, 1, dl);
    id->var = h5log_series(lg, "moe/balance/var", H5LOG_F64, 1, dl);
    id->maxvio = h5log_series(lg, "moe/balance/maxvio", H5LOG_F64, 1, dl);
    id->maxmean = h5log_series(lg, "moe/balance/max_over_mean", H5LOG_F64, 1, dl);
    id->entropy = h5log_series(lg, "moe/balance/entropy", H5LOG_F64, 1, dl);
    id->dead = h5log_series(lg, "moe/balance/dead", H5LOG_F64, 1, dl);
    id->drop = h5log_series(lg, "moe/balance/drop", H5LOG_F64, 1, dl);
    id->tpe = h5log_series(lg, "moe/tokens_per_expert", H5LOG_F64, 2, dle);
    id->rank_compute_s = h5log_series(lg, "perf/rank_compute_s", H5LOG_F64, 1, dp);
    id->rank_peak_rss = h5log_series(lg, "perf/rank_peak_rss_bytes", H5LOG_F64, 1, dp);
    int nc = n_clustered_layers(m);
    uint64_t dc[1] = {(uint64_t)(nc ? nc : 1)};
    uint64_t dcg[2] = {(uint64_t)(nc ? nc : 1), (uint64_t)m->cfg.moe.n_groups};
    uint64_t dce[2] = {(uint64_t)(nc ? nc : 1), (uint64_t)m->cfg.moe.n_experts};
    uint64_t dev[2] = {(uint64_t)(nc ? nc : 1), RECLUSTER_N_COLS + 2};
    id->tpg = h5log_series(lg, "moe/tokens_per_group", H5LOG_F64, 2, dcg);
    id->gcv2 = h5log_series(lg, "moe/balance_group/cv2", H5LOG_F64, 1, dc);
    id->gmaxvio = h5log_series(lg, "moe/balance_group/maxvio", H5LOG_F64, 1, dc);
    id->gdrop = h5log_series(lg, "moe/balance_group/drop", H5LOG_F64, 1, dc);
    id->events = h5log_series(lg, "cluster/events", H5LOG_F64, 2, dev);
    id->group_of = h5log_series(lg, "cluster/group_of", H5LOG_F64, 2, dce);
    uint64_t dph[1] = {COMM_N_PHASES};
    uint64_t dmat[3] = {COMM_N_PHASES, (uint64_t)m->comm->size, (uint64_t)m->comm->size};
    uint64_t dlp[2] = {(uint64_t)(nm ? nm : 1), (uint64_t)m->comm->size};
    id->c_intra = h5log_series(lg, "comm/summary/intra_bytes", H5LOG_F64, 1, dph);
    id->c_inter = h5log_series(lg, "comm/summary/inter_bytes", H5LOG_F64, 1, dph);
    id->c_time = h5log_series(lg, "comm/summary/time_s", H5LOG_F64, 1, dph);
    id->c_msgs = h5log_series(lg, "comm/summary/msgs", H5LOG_F64, 1, dph);
    id->c_dispatch = h5log_series(lg, "comm/dispatch", H5LOG_F64, 1, d4);
    id->c_matrix = h5log_series(lg, "comm/bytes", H5LOG_F64, 3, dmat);
    id->c_msgmat = h5log_series(lg, "comm/msgs", H5LOG_F64, 3, dmat);
    id->rank_maxvio = h5log_series(lg, "moe/balance_rank/maxvio", H5LOG_F64, 1, dl);
    id->rank_tokens = h5log_series(lg, "moe/tokens_per_rank", H5LOG_F64, 2, dlp);
    id->owner = h5log_series(lg, "parallel/owner", H5LOG_F64, 2, dle);
    id->migr = h5log_series(lg, "parallel/migration_bytes", H5LOG_F64, 0, NULL);
    uint64_t d7[1] = {7};
    id->off_train = h5log_series(lg, "offload/train", H5LOG_F64, 1, d7);
    uint64_t dmk[2] = {(uint64_t)m->comm->size, MEM_N_KINDS};
    id->mem_bytes = h5log_series(lg, "mem/bytes", H5LOG_F64, 2, dmk);
    id->mem_hwm = h5log_series(lg, "mem/vmhwm", H5LOG_F64, 1, dp);
    id->mem_rss = h5log_series(lg, "mem/vmrss", H5LOG_F64, 1, dp);
    if (m->cfg.precision.mode != PRECISION_FP32 && nc > 0) {
        uint64_t dq[2] = {(uint64_t)nc, 2};
        id->qerr = h5log_series(lg, "precision/quant_err", H5LOG_F64, 2, dq);
    }
    id->final_valid_ppl = h5log_series(lg, "final/valid_ppl", H5LOG_F64, 0, NULL);
    id->final_test_ppl = h5log_series(lg, "final/test_ppl", H5LOG_F64, 0, NULL);
    id->final_test_loss = h5log_series(lg, "final/test_loss", H5LOG_F64, 0, NULL);
    int *all = &id->loss;
    for (size_t i = 0; i < sizeof *id / sizeof(int); i++)
        if (all[i] < 0) return status_errorf("%s: could not declare HDF5 series: %s", lg->path, lg->err.msg);
    return status_ok();
}

static int id_qerr_declared(const H5log *lg) {
    for (int i = 0; i < lg->n_series; i++)
        if (!strcmp(lg->series[i].path, "precision/quant_err")) return 1;
    return 0;
}

static Status log_attrs(H5log *lg, const Model *m, const Comm *comm, const Dataset *ds,
                        double peak_gflops, double unigram_ppl, const Topology *topo) {
    char *yaml = config_to_yaml(&m->cfg);
    TRY(h5log_attr_str(lg, "/", "config", yaml));
    free(yaml);
    TRY(h5log_attr_str(lg, "/", "version", DCMOE_VERSION));
    TRY(h5log_attr_str(lg, "/", "git_revision", DCMOE_GIT_REVISION));
    TRY(h5log_attr_i64(lg, "/", "world_size", comm->size));
    time_t now = time(NULL);
    char ts[64];
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    TRY(h5log_attr_str(lg, "/", "start_time", ts));
    TRY(h5log_attr_str(lg, "/", "backend", m->be->ops->name));
    TRY(h5log_attr_str(lg, "/", "dataset", ds->description));
    TRY(h5log_attr_i64(lg, "/", "vocab_size", ds->vocab.n_words));
    TRY(h5log_attr_f64(lg, "/", "sgemm_peak_gflops", peak_gflops));
    TRY(h5log_attr_f64(lg, "/", "unigram_ppl_valid", unigram_ppl));
    TRY(h5log_attr_f64(lg, "/", "flops_per_token", model_flops_per_token(m)));
    TRY(h5log_attr_str(lg, "/perf/time_split", "columns", "forward,backward,allreduce,optimizer (seconds)"));
    char tdesc[256];
    topology_describe(topo, tdesc, sizeof tdesc);
    TRY(h5log_attr_str(lg, "/", "topology", tdesc));
    static const char *const pol[] = {"contiguous", "eplb", "topology"};
    TRY(h5log_attr_str(lg, "/", "placement", pol[m->cfg.parallel.placement]));
    TRY(h5log_attr_str(lg, "/", "exchange", m->cfg.parallel.exchange == EXCHANGE_TWO_LEVEL ? "two_level" : "flat"));
    int64_t *node_of = xcalloc(sizeof(int64_t) * (size_t)comm->size);
    for (int r = 0; r < comm->size; r++) node_of[r] = topo->node_of[r];
    uint64_t dn[1] = {(uint64_t)comm->size};
    Status sn = h5log_write_array(lg, "parallel/node_of_rank", H5LOG_I64, 1, dn, node_of);
    xfree(node_of);
    TRY(sn);
    static const char *const phase_cols = "allreduce,dispatch,combine,migration,other";
    TRY(h5log_attr_str(lg, "/comm/summary/intra_bytes", "columns", phase_cols));
    TRY(h5log_attr_str(lg, "/comm/summary/inter_bytes", "columns", phase_cols));
    TRY(h5log_attr_str(lg, "/comm/summary/time_s", "columns", phase_cols));
    TRY(h5log_attr_str(lg, "/comm/summary/msgs", "columns", phase_cols));
    TRY(h5log_attr_str(lg, "/comm/bytes", "axes", "phase (allreduce,dispatch,combine,migration,other), src rank, dst rank; written every parallel.traffic_interval steps"));
    TRY(h5log_attr_str(lg, "/comm/msgs", "axes", "phase, src rank, dst rank: messages, written with /comm/bytes"));
    TRY(h5log_attr_str(lg, "/comm/dispatch", "columns",
                       "payload rows sent (all MoE layers, incl. to self), token-expert pairs carried, "
                       "nodes touched (sum over token-layers), token-layers routed"));
    TRY(h5log_attr_str(lg, "/offload/train", "columns",
                       "hits,misses,evictions,bytes_in,bytes_out,stall_s,resident_units (summed over ranks; "
                       "training-time offloading, offload.enabled)"));
    TRY(h5log_attr_str(lg, "/parallel/owner", "note", "owning rank of every expert per MoE layer, at start and after every placement change"));
    /* "0,2,5": up to 12 characters per layer index */
    size_t cap_layers = (size_t)m->L * 12 + 8, n_layers_txt = 0;
    char *layers = xcalloc(cap_layers);
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind != MOE_KIND_DENSE)
            n_layers_txt += (size_t)snprintf(layers + n_layers_txt, cap_layers - n_layers_txt, "%s%d",
                                             n_layers_txt ? "," : "", l);
    Status sl = h5log_attr_str(lg, "/moe", "layers", layers[0] ? layers : "none");
    xfree(layers);
    TRY(sl);
    TRY(h5log_attr_str(lg, "/moe/tokens_per_expert", "note", "token-expert pairs routed per expert (before capacity), global batch"));
    {
        char kinds[256] = "";
        for (int k = 0; k < MEM_N_KINDS; k++) {
            strcat(kinds, memacct_kind_name((enum MemKind)k));
            if (k + 1 < MEM_N_KINDS) strcat(kinds, ",");
        }
        char note[512];
        str_fmt(note, sizeof note, "rank, kind (%s): bytes this rank holds in its working set (the resident tier), from "
                "the allocations (parameters by precision incl. a QAT shadow, gradients, Adam moments, activations "
                "and layer scratch, dispatch/combine buffers); at start (step 0) and every log step", kinds);
        TRY(h5log_attr_str(lg, "/mem/bytes", "axes", note));
        TRY(h5log_attr_str(lg, "/mem/vmhwm", "note", "peak resident set size per rank, measured (VmHWM of /proc/self/status)"));
        TRY(h5log_attr_str(lg, "/mem/vmrss", "note", "resident set size per rank now, measured (VmRSS)"));
    }
    if (id_qerr_declared(lg))
        TRY(h5log_attr_str(lg, "/precision/quant_err", "axes",
                           "clustered layer, (bases FP16, factors INT4): relative Frobenius error ||q(W)-W||/||W|| over "
                           "all groups/experts of the layer; every log step"));
    TRY(h5log_attr_str(lg, "/cluster/events", "columns",
                       "layer,cost_before,cost_after,accepted,moved_experts,groups_refit,jaccard,"
                       "recon_err_mean,recon_err_max,seconds,probe_loss_before,probe_loss_after"));
    double by_kind[PARAM_N_KINDS], total, active;
    model_param_counts(m, by_kind, &total, &active);
    uint64_t dk[1] = {PARAM_N_KINDS};
    TRY(h5log_write_array(lg, "params/by_kind", H5LOG_F64, 1, dk, by_kind));
    char names[256] = "";
    for (int k = 0; k < PARAM_N_KINDS; k++) {
        strcat(names, param_kind_names[k]);
        if (k + 1 < PARAM_N_KINDS) strcat(names, ",");
    }
    TRY(h5log_attr_str(lg, "/params/by_kind", "kinds", names));
    TRY(h5log_attr_f64(lg, "/params/by_kind", "total", total));
    TRY(h5log_attr_f64(lg, "/params/by_kind", "active", active));
    return status_ok();
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
    int64_t act = (int64_t)m->act_bytes, comm_b = 0;
    for (int l = 0; l < m->L; l++) {
        act += (int64_t)(m->acts[l].moe.act_bytes - m->acts[l].moe.comm_bytes);
        comm_b += (int64_t)m->acts[l].moe.comm_bytes;
    }
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_ACT, act);
    memacct_add(a, MEM_TIER_DEVICE, MEM_KIND_COMM, comm_b);
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

static void mem_log(H5log *lg, const LogIds *id, long step, const double *all, int P) {
    double *kinds = xcalloc(sizeof(double) * (size_t)P * MEM_N_KINDS), *hwm = xcalloc(sizeof(double) * P),
           *rss = xcalloc(sizeof(double) * P);
    for (int r = 0; r < P; r++) {
        memcpy(kinds + (size_t)r * MEM_N_KINDS, all + (size_t)r * (MEM_N_KINDS + 2), sizeof(double) * MEM_N_KINDS);
        hwm[r] = all[(size_t)r * (MEM_N_KINDS + 2) + MEM_N_KINDS];
        rss[r] = all[(size_t)r * (MEM_N_KINDS + 2) + MEM_N_KINDS + 1];
    }
    h5log_append(lg, id->mem_bytes, step, kinds);
    h5log_append(lg, id->mem_hwm, step, hwm);
    h5log_append(lg, id->mem_rss, step, rss);
    xfree(kinds); xfree(hwm); xfree(rss);
}

/* re-run the placement policy on every MoE layer and migrate the units that change owner;
 * returns the bytes moved (all ranks) */
static double replace_experts(Model *m, const Config *cfg, const Topology *topo) {
    double bytes = 0;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        Placement np;
        if (ep_propose(&m->ep[l], cfg->parallel.placement, topo, cfg->parallel.refine_passes,
                       cfg->parallel.max_imbalance, cfg->parallel.min_gain, &np))
            bytes += (double)model_ep_relayout(m, l, &np);
        placement_free(&np);
    }
    comm_allreduce_sum_f64(m->comm, &bytes, 1);
    return bytes;
}

static Status residency_hook(void *ctx, int layer, const int32_t *units, int n) {
    return residency_need((Residency *)ctx, layer, units, n);
}

/* owners of every expert per MoE layer, for the log */
static void owner_rows(const Model *m, double *out) {
    int i = 0, E = m->cfg.moe.n_experts;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        for (int e = 0; e < E; e++) out[(size_t)i * E + e] = m->ep[l].expert_owner[e];
        i++;
    }
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

/* every rank must agree on a failure; returns an error on all ranks if any rank failed */
static Status agree(Comm *comm, Status st) {
    double bad = STATUS_OK(st) ? 0 : 1;
    comm_allreduce_max_f64(comm, &bad, 1);
    if (bad > 0 && STATUS_OK(st)) return status_errorf("another rank failed (see its message)");
    return st;
}

static Status train_run_locked(const Config *cfg, const TrainOptions *opt, Comm *comm, TrainResult *res, int *lock_fd);

/* the run folder's lock is held from the first checks to the end, whatever the outcome */
Status train_run(const Config *cfg, const TrainOptions *opt, Comm *comm, TrainResult *res) {
    int lock_fd = -1;
    Status st = train_run_locked(cfg, opt, comm, res, &lock_fd);
    char run_dir[2048];
    train_run_dir(cfg, run_dir, sizeof run_dir);
    run_lock_release(run_dir, lock_fd);
    return st;
}

static Status train_run_locked(const Config *cfg, const TrainOptions *opt, Comm *comm, TrainResult *res, int *lock_fd) {
    memset(res, 0, sizeof *res);
    int P = comm->size, rank = comm->rank;
    const TrainConfig *tc = &cfg->train;
    if (tc->batch_size % P != 0)
        return status_errorf("train.batch_size=%d is not divisible by the %d ranks", tc->batch_size, P);
    if (cfg->offload.enabled && cfg->precision.mode == PRECISION_QAT)
        return status_errorf("offload.enabled with precision.mode=qat: training-time offloading needs fp32 or "
                             "storage (the QAT shadow weights are rebuilt from every master each step)");

    int Bl = tc->batch_size / P, T = cfg->model.seq_len;
    char run_dir[2048], path[4096], vocab_path[4096], ckpt[4096] = "";
    train_run_dir(cfg, run_dir, sizeof run_dir);
    str_fmt(vocab_path, sizeof vocab_path, "%s/vocab.txt", run_dir);
    str_fmt(path, sizeof path, "%s/metrics.h5", run_dir);

    train_install_signal_handlers();
    /* the run folder is locked for the whole run (two starts on one folder: the second is
     * refused naming the holder); then: refuse to overwrite a run unless resuming, say so and
     * change nothing when resuming a finished run, fall back past damaged checkpoints */
    Status st = status_ok();
    int flags[2] = {0, 0};   /* already done, restart from step 0 */
    if (rank == 0) {
        char done_path[4096], stale[256] = "";
        str_fmt(done_path, sizeof done_path, "%s/DONE", run_dir);
        st = dir_make_p(run_dir);
        if (STATUS_OK(st)) st = run_lock_acquire(run_dir, lock_fd, stale, sizeof stale);
        if (STATUS_OK(st) && stale[0])
            fprintf(stderr, "dcmoe: %s/LOCK: taking over the lock of a process that is gone (%s)\n", run_dir, stale);
        int resume = opt->resume || opt->resume_from;
        if (!STATUS_OK(st)) {
        } else if (resume && file_exists(done_path)) {
            char *text = NULL;
            size_t n_text = 0;
            file_read_all(done_path, (void **)&text, &n_text);
            printf("%s: the run is already complete (DONE: %.*s); nothing to do\n", run_dir,
                   text ? (int)strcspn(text, "\n") : 0, text ? text : "");
            free(text);
            flags[0] = 1;
        } else if (opt->resume_from) {
            CheckpointInfo info;
            st = checkpoint_verify(opt->resume_from, &info);
            if (STATUS_OK(st)) str_fmt(ckpt, sizeof ckpt, "%s", opt->resume_from);
        } else if (opt->resume) {
            char skipped[4096];
            st = checkpoint_find_latest_valid(run_dir, ckpt, sizeof ckpt, skipped, sizeof skipped);
            if (STATUS_OK(st) && skipped[0]) {
                fprintf(stderr, "dcmoe: warning: newer checkpoints fail verification and are not used:\n%s", skipped);
                if (!ckpt[0])
                    st = status_errorf("%s: --resume: no checkpoint verifies (see above); resume from a copy with "
                                       "--resume-from DIR, or move %s/ckpt away to restart from step 0", run_dir, run_dir);
            }
            if (STATUS_OK(st) && !ckpt[0]) {
                /* killed before its first checkpoint: nothing to continue, so start again and keep the old log */
                flags[1] = 1;
                if (file_exists(path)) {
                    char kept[4096];
                    str_fmt(kept, sizeof kept, "%s/metrics.before-restart.h5", run_dir);
                    if (rename(path, kept) != 0)
                        st = status_errorf("%s: could not keep the old log as %s: %s", path, kept, strerror(errno));
                    else
                        printf("%s: no checkpoint yet: restarting from step 0 (the earlier log is kept as %s)\n",
                               run_dir, kept);
                }
            }
        } else if (file_exists(path)) {
            st = status_errorf("%s: already holds a run (metrics.h5); use --resume to continue it (or to restart it "
                               "from step 0 when it has no checkpoint yet), or set run.name / run.out_dir to start another",
                               run_dir);
        }
    }
    TRY(agree(comm, st));
    comm_bcast_bytes(comm, ckpt, sizeof ckpt, 0);
    comm_bcast_bytes(comm, flags, sizeof flags, 0);
    if (flags[0]) {
        res->already_done = true;
        return status_ok();
    }
    int resuming = opt->resume || opt->resume_from;

    Backend be;
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
    if (cfg->run.backend == BACKEND_CUDA) TRY(agree(comm, backend_cuda_init(&be, comm->local_rank)));
    else TRY(backend_cpu_init(&be, threads));
    TRY(agree(comm, backend_check(&be)));

    Dataset ds;
    memset(&ds, 0, sizeof ds);
    st = data_load(&cfg->data, cfg->model.task, T, resuming && file_exists(vocab_path) ? vocab_path : NULL, &ds);
    TRY(agree(comm, st));
    if (rank == 0 && !(resuming && file_exists(vocab_path))) st = vocab_save(&ds.vocab, vocab_path);
    TRY(agree(comm, st));
    int n_classes = cfg->model.n_classes > 0 ? cfg->model.n_classes : ds.n_classes;

    Topology topo;
    st = topology_init(&topo, comm, &cfg->topology);
    if (!STATUS_OK(st)) { data_free(&ds); backend_free(&be); return agree(comm, st); }
    TRY(agree(comm, st));
    Traffic traffic;
    traffic_init(&traffic, P, rank, &topo);

    comm->topo = &topo;
    Model m;
    st = model_init(&m, cfg, ds.vocab.n_words, n_classes, Bl, &be, comm);
    TRY(agree(comm, st));
    model_init_params(&m);
    TrainPos pos = {0, 0, 0, (uint64_t)cfg->run.seed};
    if (ckpt[0]) {
        TRY(agree(comm, checkpoint_load(ckpt, &m, &pos)));
        if (rank == 0) printf("resumed from %s at step %lld\n", ckpt, (long long)pos.step);
    }
    /* precision.mode: qat points the clustered layers at fake-quantised shadow weights */
    Precision prec;
    prec_init(&prec, &m);
    /* offload.enabled: idle expert units leave the resident tier between steps */
    Residency resid;
    st = residency_init(&resid, &m, &cfg->offload, run_dir);
    if (!STATUS_OK(st)) { prec_free(&prec); model_free(&m); data_free(&ds); backend_free(&be); return agree(comm, st); }
    resid.step = pos.step;
    if (resid.enabled)
        for (int l = 0; l < m.L; l++) { m.ffn[l].need = residency_hook; m.ffn[l].need_ctx = &resid; }

    /* the FLOP fraction's denominator: a calibrated value, or every rank measuring at once
     * (what they share while training) */
    double peak_total = cfg->run.peak_gflops;
    char peak_how[160];
    if (peak_total > 0) str_fmt(peak_how, sizeof peak_how, "from run.peak_gflops");
    else {
        comm_barrier(comm);
        peak_total = train_measure_sgemm_peak(&be);
        comm_allreduce_sum_f64(comm, &peak_total, 1);
        str_fmt(peak_how, sizeof peak_how, "measured at start-up: sum over ranks of the best 1024^3 product of >= 0.3 s, all ranks at once");
    }
    double uni_ppl = cfg->model.task == TASK_LM ? data_unigram_ppl(&ds, SPLIT_VALID) : 0;
    res->unigram_ppl = uni_ppl;

    H5log lg;
    memset(&lg, 0, sizeof lg);
    lg.file = -1;
    LogIds id;
    memset(&id, 0, sizeof id);
    if (rank == 0) {
        /* a checkpoint from another rank count: the per-rank series cannot grow a column, so
         * the old log is kept beside the new one (steps up to the checkpoint) */
        int new_log = !ckpt[0] || !file_exists(path);   /* --resume-from a copied checkpoint: a new log */
        if (ckpt[0]) {
            /* the rank count as the verified checkpoint records it (COMPLETE is checked against it) */
            CheckpointInfo info = {0, P};
            st = checkpoint_verify(ckpt, &info);
            int ck_ranks = info.ranks;
            if (STATUS_OK(st) && ck_ranks != P) {
                char kept[4096];
                str_fmt(kept, sizeof kept, "%s/metrics.ranks%d.h5", run_dir, ck_ranks);
                if (rename(path, kept) != 0) st = status_errorf("%s: could not keep the old log as %s", path, kept);
                else printf("checkpoint written at %d ranks, resuming at %d: the log so far is kept as %s\n",
                            ck_ranks, P, kept);
                new_log = 1;
            }
        }
        if (STATUS_OK(st)) {
            if (!new_log) st = h5log_open_append(&lg, path, cfg->log.swmr, cfg->log.flush_interval, (long)pos.step);
            else st = h5log_create(&lg, path, cfg->log.swmr, cfg->log.flush_interval);
        }
        if (STATUS_OK(st)) st = log_declare(&lg, &m, &id);
        if (STATUS_OK(st) && new_log) st = log_attrs(&lg, &m, comm, &ds, peak_total, uni_ppl, &topo);
        if (STATUS_OK(st) && new_log) st = h5log_attr_str(&lg, "/", "sgemm_peak_source", peak_how);
        if (STATUS_OK(st)) st = h5log_start(&lg);
    }
    st = agree(comm, st);
    if (!STATUS_OK(st)) { h5log_close(&lg); prec_free(&prec); model_free(&m); data_free(&ds); backend_free(&be); return st; }

    MemAcct macct;
    mem_register(&macct, &m, &prec);
    double *mem_all = xcalloc(sizeof(double) * (size_t)P * (MEM_N_KINDS + 2));
    if (pos.step == 0) {
        mem_gather(comm, &macct, mem_all);
        if (rank == 0) mem_log(&lg, &id, 0, mem_all, P);
    }
    double flops_tok = model_flops_per_token(&m);
    if (rank == 0) {
        printf("dcmoe %s (%s) | %d rank(s) x %d BLAS thread(s) | backend %s | sgemm peak %.1f GFLOP/s total (%s)\n",
               DCMOE_VERSION, DCMOE_GIT_REVISION, P, threads, be.ops->name, peak_total, peak_how);
        printf("data: %s\n", ds.description);
        print_params(&m);
        char mtab[2048];
        memacct_format(&macct, mtab, sizeof mtab);
        printf("memory accounted on rank 0 (mem/bytes in metrics.h5):\n%s", mtab);
        if (cfg->model.task == TASK_LM) printf("unigram perplexity of the valid split: %.2f\n", uni_ppl);
        printf("run folder: %s\n", run_dir);
        fflush(stdout);
    }

    int32_t *in = xcalloc(sizeof(int32_t) * Bl * T), *tg = xcalloc(sizeof(int32_t) * Bl * T);
    int32_t *len = xcalloc(sizeof(int32_t) * Bl);
    int nm = n_moe_layers(&m), E = cfg->moe.n_experts;
    double *row = xcalloc(sizeof(double) * (size_t)(nm ? nm : 1) * (E > 6 ? E : 6) * 8);
    double *rank_buf = xcalloc(sizeof(double) * 2 * P), *rank_row = xcalloc(sizeof(double) * 2 * P);
    int n_clus = n_clustered_layers(&m);
    double *crow = xcalloc(sizeof(double) * (size_t)(n_clus ? n_clus : 1) * (cfg->moe.n_groups + E + 3 + 16));
    ReclusterEvent *evs = xcalloc(sizeof(ReclusterEvent) * (n_clus ? n_clus : 1));
    long last_event = -1, warm = recluster_warmup(cfg);
    long n_global = cfg->model.task == TASK_LM ? (long)tc->batch_size * T : tc->batch_size;
    double t_start = time_now() - pos.elapsed_s;
    long window_steps = 0;
    double window_time = 0, ema_step = 0;
    double last_loss = 0;

    double *orow = xcalloc(sizeof(double) * (size_t)(nm ? nm : 1) * (E + P + 1));
    double *mat = xcalloc(sizeof(double) * (size_t)COMM_N_PHASES * P * P);
    double pending_migr = 0;
    int log_owner = 1;
    Status log_err = status_ok();   /* rank 0: the first failed write of the metrics log */
    /* a signal during start-up: checkpoint where we are (unless resumed from exactly here) and stop */
    {
        double sig = (double)g_stop_signal;
        comm_allreduce_max_f64(comm, &sig, 1);
        if (sig > 0 && pos.step < tc->steps) {
            if (!ckpt[0]) {
                pos.elapsed_s = time_now() - t_start;
                if (rank == 0) h5log_flush(&lg);
                st = checkpoint_save(run_dir, &m, &pos, cfg->checkpoint.keep);
            }
            if (STATUS_OK(st) && rank == 0)
                printf("signal received during start-up: %s at step %lld, stopping (continue with --resume)\n",
                       ckpt[0] ? "the run stays" : "checkpoint written", (long long)pos.step);
            res->interrupted = true;
        }
    }
    long first_step = pos.step;
    for (long step = pos.step; step < tc->steps && STATUS_OK(st) && !res->interrupted; step++) {
        double t0 = time_now();
        comm->traffic = &traffic;
        for (int l = 0; l < m.L; l++) m.ep[l].collect = m.ffn[l].kind != MOE_KIND_DENSE;
        uint64_t ar_bytes0 = comm->stats.bytes[COMM_PHASE_ALLREDUCE];
        double ar_s0 = comm->stats.seconds[COMM_PHASE_ALLREDUCE];
        if (cfg->model.task == TASK_LM)
            data_lm_train_batch(&ds.lm[SPLIT_TRAIN], (uint64_t)cfg->run.seed, step, rank * Bl, Bl, T, in, tg);
        else
            data_cls_train_batch(&ds.cls[SPLIT_TRAIN], (uint64_t)cfg->run.seed, step, rank * Bl, Bl, in, len, tg);
        model_zero_grad(&m);
        int log_step = (step + 1) % tc->log_interval == 0 || step == 0 || step + 1 == tc->steps;
        /* qat: fake-quantise this step's weights (and measure the error); storage: measure */
        if (prec.mode == PRECISION_QAT || log_step) prec_measure(&prec);
        m.collect_mu = n_clus > 0 && cfg->clustering.enabled;
        model_forward(&m, in, tg, len, Bl, n_global);
        m.collect_mu = 0;
        double t1 = time_now();
        model_backward(&m, n_global);
        double t2 = time_now();
        /* global loss: sum of local CE contributions + the (global) aux terms */
        if (test_nan_at(step + 1, rank)) m.loss_sum = NAN;
        double local_loss = m.loss_sum;
        double ce[1] = {m.loss_sum / (double)n_global};
        comm_allreduce_sum_f64(comm, ce, 1);
        double loss = ce[0] + m.aux_loss + m.z_loss;
        last_loss = loss;
        optim_reduce_grads(&m);
        if (n_clus > 0 && cfg->clustering.router_freeze > 0 && last_event >= 0 &&
            step < last_event + cfg->clustering.router_freeze)
            for (int i = 0; i < m.n_tensors; i++)
                if (m.tensors[i].kind == PARAM_ROUTER)
                    be.ops->zero(be.ctx, m.grads[m.tensors[i].cat] + m.tensors[i].offset, sizeof(float) * m.tensors[i].n);
        double lr = optim_lr(tc, step);
        double gnorm = optim_grad_norm(&m);
        if (!isfinite(loss) || !isfinite(gnorm)) {
            /* name the first rank whose own loss is not finite, and its slice of the batch */
            double first_bad = isfinite(local_loss) ? 0 : (double)(P - rank);
            comm_allreduce_max_f64(comm, &first_bad, 1);
            int bad_rank = first_bad > 0 ? P - (int)first_bad : -1;
            char where[256];
            if (bad_rank >= 0)
                str_fmt(where, sizeof where, "first on rank %d (its local loss is not finite; batch: %s %d..%d of "
                        "the global batch of step %ld, data seed %llu)", bad_rank,
                        cfg->model.task == TASK_LM ? "sequences" : "examples", bad_rank * Bl, (bad_rank + 1) * Bl - 1,
                        step + 1, (unsigned long long)cfg->run.seed);
            else
                str_fmt(where, sizeof where, "every rank's loss is finite; the reduced gradient is not (global batch "
                        "of step %ld, data seed %llu)", step + 1, (unsigned long long)cfg->run.seed);
            if (cfg->train.on_nonfinite == TRAIN_ON_NONFINITE_STOP) {
                if (rank == 0) {
                    h5log_append(&lg, id.loss, step + 1, &loss);
                    h5log_append(&lg, id.gnorm, step + 1, &gnorm);
                    h5log_flush(&lg);
                }
                st = status_errorf("step %ld: non-finite loss %g / gradient norm %g, %s; stopped without a checkpoint "
                                   "(the last good one is kept; lower train.lr, raise train.warmup_steps, or set "
                                   "train.on_nonfinite: skip_step)", step + 1, loss, gnorm, where);
                break;
            }
            if (rank == 0)
                fprintf(stderr, "dcmoe: warning: step %ld: non-finite loss %g / gradient norm %g, %s; update skipped "
                        "(train.on_nonfinite: skip_step)\n", step + 1, loss, gnorm, where);
        } else {
            optim_step_norm(&m, step, lr, gnorm);
        }
        if (n_clus > 0 && cfg->clustering.enabled) recluster_mu_step(&m);
        /* moe.balance: aux_free, for the standard and the clustered layers (a no-op otherwise) */
        for (int l = 0; l < m.L; l++) moe_update_bias(&m.ffn[l], &m.acts[l].moe);
        int is_last_step = step + 1 == tc->steps;
        for (int l = 0; l < m.L; l++)
            if (m.ffn[l].kind != MOE_KIND_DENSE) ep_stats_step(&m.ep[l], comm, cfg->parallel.affinity_ema);
        double migr = pending_migr;
        pending_migr = 0;
        if (P > 1 && nm > 0 && cfg->parallel.place_interval > 0 && (step + 1) % cfg->parallel.place_interval == 0 &&
            !is_last_step) {
            st = residency_fetch_all(&resid);
            if (!STATUS_OK(st)) break;
            double b = replace_experts(&m, cfg, &topo);
            if (b > 0) log_owner = 1;
            migr += b;
        }
        st = agree(comm, residency_end_step(&resid, step));
        if (!STATUS_OK(st)) break;
        ResidencyStats rstat = residency_take_step(&resid);
        double orow7[7] = {rstat.hits, rstat.misses, rstat.evictions, rstat.bytes_in, rstat.bytes_out, rstat.stall_s,
                           rstat.resident_units};
        if (resid.enabled) comm_allreduce_sum_f64(comm, orow7, 7);
        TrafficStep ts;
        traffic_step_end(&traffic, comm, &ts);
        comm->traffic = NULL;
        double t3 = time_now();
        double dt = time_now() - t0;
        double mine[2] = {t2 - t0, peak_rss_bytes()}, *all_r = rank_buf;
        comm_gather_bytes(comm, mine, all_r, sizeof mine, 0);
        if (log_step) mem_gather(comm, &macct, mem_all);
        pos.step = step + 1;
        pos.tokens_seen += (int64_t)tc->batch_size * T;
        window_steps++;
        window_time += dt;
        ema_step = ema_step == 0 ? dt : 0.9 * ema_step + 0.1 * dt;
        double tok_s = tc->batch_size * T / dt;
        double frac = flops_tok * tok_s / (peak_total * 1e9);
        if (rank == 0) {
            long s = step + 1;
            h5log_append(&lg, id.loss, s, &loss);
            h5log_append(&lg, id.ce, s, &ce[0]);
            h5log_append(&lg, id.aux, s, &m.aux_loss);
            h5log_append(&lg, id.z, s, &m.z_loss);
            h5log_append(&lg, id.lr, s, &lr);
            h5log_append(&lg, id.gnorm, s, &gnorm);
            int64_t toks = pos.tokens_seen;
            h5log_append(&lg, id.tokens, s, &toks);
            h5log_append(&lg, id.step_s, s, &dt);
            h5log_append(&lg, id.tok_s, s, &tok_s);
            h5log_append(&lg, id.flops_frac, s, &frac);
            double ar_s = comm->stats.seconds[COMM_PHASE_ALLREDUCE] - ar_s0;
            double split[4] = {t1 - t0, t2 - t1, ar_s, t3 - t2 - ar_s};
            h5log_append(&lg, id.time_split, s, split);
            double arb = (double)(comm->stats.bytes[COMM_PHASE_ALLREDUCE] - ar_bytes0);
            h5log_append(&lg, id.comm_bytes, s, &arb);
            if (resid.enabled) h5log_append(&lg, id.off_train, s, orow7);
            h5log_append(&lg, id.c_intra, s, ts.intra);
            h5log_append(&lg, id.c_inter, s, ts.inter);
            h5log_append(&lg, id.c_time, s, ts.seconds);
            h5log_append(&lg, id.c_msgs, s, ts.msgs);
            double disp[4] = {ts.rows_dispatched, ts.pairs_routed, ts.nodes_touched, ts.tokens};
            h5log_append(&lg, id.c_dispatch, s, disp);
            if (s % cfg->parallel.traffic_interval == 0 || s == tc->steps) {
                for (size_t q = 0; q < (size_t)COMM_N_PHASES * P * P; q++) mat[q] = (double)traffic.matrix[q];
                h5log_append(&lg, id.c_matrix, s, mat);
                for (size_t q = 0; q < (size_t)COMM_N_PHASES * P * P; q++) mat[q] = (double)traffic.msg_matrix[q];
                h5log_append(&lg, id.c_msgmat, s, mat);
            }
            if (log_owner || migr > 0) {
                owner_rows(&m, orow);
                h5log_append(&lg, id.owner, s, orow);
                h5log_append(&lg, id.migr, s, &migr);
                log_owner = 0;
            }
            if (nm > 0) {
                /* tokens each rank's experts received (after capacity) and the rank-level MaxVio */
                double *rt = orow, *rmv = orow + (size_t)nm * P;
                int i = 0;
                for (int l = 0; l < m.L; l++) {
                    if (m.ffn[l].kind == MOE_KIND_DENSE) continue;
                    const MoeStats *ms = &m.acts[l].moe.stats;
                    for (int r = 0; r < P; r++) rt[(size_t)i * P + r] = 0;
                    for (int e = 0; e < E; e++) rt[(size_t)i * P + m.ep[l].expert_owner[e]] += ms->counts[e];
                    LoadStats lr_ = metrics_load(rt + (size_t)i * P, P);
                    rmv[i] = lr_.maxvio;
                    i++;
                }
                h5log_append(&lg, id.rank_tokens, s, rt);
                h5log_append(&lg, id.rank_maxvio, s, rmv);
            }
            for (int r = 0; r < P; r++) { rank_row[r] = all_r[2 * r]; rank_row[P + r] = all_r[2 * r + 1]; }
            h5log_append(&lg, id.rank_compute_s, s, rank_row);
            h5log_append(&lg, id.rank_peak_rss, s, rank_row + P);
            if (nm > 0) {
                double *cv2 = row, *var = row + nm, *mv = row + 2 * nm, *mm = row + 3 * nm;
                double *ent = row + 4 * nm, *dead = row + 5 * nm, *drop = row + 6 * nm;
                double *tpe = row + 7 * nm;
                int i = 0;
                for (int l = 0; l < m.L; l++) {
                    if (m.ffn[l].kind == MOE_KIND_DENSE) continue;
                    const MoeStats *ms = &m.acts[l].moe.stats;
                    LoadStats ls = metrics_load(ms->counts_routed, E);
                    cv2[i] = ls.cv2; var[i] = ls.var; mv[i] = ls.maxvio; mm[i] = ls.max_over_mean;
                    ent[i] = ls.entropy; dead[i] = ls.dead_frac; drop[i] = ms->dropped_frac;
                    memcpy(tpe + (size_t)i * E, ms->counts_routed, sizeof(double) * E);
                    i++;
                }
                h5log_append(&lg, id.cv2, s, cv2);
                h5log_append(&lg, id.var, s, var);
                h5log_append(&lg, id.maxvio, s, mv);
                h5log_append(&lg, id.maxmean, s, mm);
                h5log_append(&lg, id.entropy, s, ent);
                h5log_append(&lg, id.dead, s, dead);
                h5log_append(&lg, id.drop, s, drop);
                if (cfg->log.expert_interval > 0 && s % cfg->log.expert_interval == 0)
                    h5log_append(&lg, id.tpe, s, tpe);
            }
            if (n_clus > 0) {
                int G = cfg->moe.n_groups, i = 0;
                double *gc = crow, *gcv = crow + (size_t)n_clus * G, *gmv = gcv + n_clus, *gdr = gmv + n_clus;
                for (int l = 0; l < m.L; l++) {
                    if (m.ffn[l].kind != MOE_KIND_CLUSTERED) continue;
                    const MoeStats *ms = &m.acts[l].moe.stats;
                    memcpy(gc + (size_t)i * G, ms->group_counts, sizeof(double) * G);
                    LoadStats ls = metrics_load(ms->group_counts, G);
                    gcv[i] = ls.cv2; gmv[i] = ls.maxvio; gdr[i] = ms->group_dropped_frac;
                    i++;
                }
                h5log_append(&lg, id.tpg, s, gc);
                h5log_append(&lg, id.gcv2, s, gcv);
                h5log_append(&lg, id.gmaxvio, s, gmv);
                h5log_append(&lg, id.gdrop, s, gdr);
            }
            if (id.qerr > 0 && log_step) h5log_append(&lg, id.qerr, s, prec.qerr);
            if (log_step) mem_log(&lg, &id, s, mem_all, P);
            Status ls = h5log_step_done(&lg, s);
            if (!STATUS_OK(ls) && STATUS_OK(log_err)) log_err = ls;
            if (!opt->quiet && (s % tc->log_interval == 0 || s == 1 || s == tc->steps)) {
                double wtok = tc->batch_size * T * window_steps / window_time;
                double mean_cv2 = 0;
                for (int i = 0; i < nm; i++) mean_cv2 += row[i] / nm;
                char eta[32];
                fmt_eta(eta, sizeof eta, ema_step * (double)(tc->steps - s));
                printf("step %6ld/%d | loss %.4f | aux %.4f | lr %.2e | %.1f ms/step | %.0f tok/s | "
                       "%.1f%% of peak | cv2 %.3f | ETA %s\n",
                       s, tc->steps, loss, m.aux_loss + m.z_loss, lr, 1e3 * window_time / window_steps,
                       wtok, 100.0 * flops_tok * wtok / (peak_total * 1e9), mean_cv2, eta);
                fflush(stdout);
                window_steps = 0;
                window_time = 0;
            }
        }
        int is_last = step + 1 == tc->steps;
        if (n_clus > 0 && cfg->clustering.enabled && step + 1 >= warm && (step + 1) % cfg->clustering.interval == 0 && !is_last) {
            double pb = evaluate(&m, &ds, SPLIT_VALID, 1, tc->batch_size, &prec).loss;
            st = agree(comm, residency_fetch_all(&resid));
            if (!STATUS_OK(st)) break;
            int n_ev = recluster_run(&m, step + 1, evs);
            /* groups changed: re-place them (migration bytes land in the next step's log) */
            if (P > 1) pending_migr += replace_experts(&m, cfg, &topo);
            double pa = evaluate(&m, &ds, SPLIT_VALID, 1, tc->batch_size, &prec).loss;
            last_event = step + 1;
            if (rank == 0) {
                double *er = crow;
                int moved = 0, refit = 0;
                double emax = 0;
                for (int i = 0; i < n_ev; i++) {
                    const ReclusterEvent *e = &evs[i];
                    double v[RECLUSTER_N_COLS + 2] = {e->layer, e->cost_before, e->cost_after, e->accepted, e->n_moved,
                                                      e->n_groups_refit, e->jaccard, e->recon_err_mean, e->recon_err_max,
                                                      e->seconds, pb, pa};
                    memcpy(er + (size_t)i * (RECLUSTER_N_COLS + 2), v, sizeof v);
                    moved += e->n_moved; refit += e->n_groups_refit;
                    if (e->recon_err_max > emax) emax = e->recon_err_max;
                }
                h5log_append(&lg, id.events, step + 1, er);
                int i = 0;
                for (int l = 0; l < m.L; l++) {
                    if (m.ffn[l].kind != MOE_KIND_CLUSTERED) continue;
                    for (int e = 0; e < E; e++) er[(size_t)i * E + e] = m.cstate[l].group_of[e];
                    i++;
                }
                h5log_append(&lg, id.group_of, step + 1, er);
                printf("re-cluster step %ld | %d layer(s) | moved %d experts | refit %d groups | max recon err %.2f%% | "
                       "probe loss %.4f -> %.4f\n", step + 1, n_ev, moved, refit, 100 * emax, pb, pa);
                fflush(stdout);
            }
        }
        if ((tc->eval_interval > 0 && (step + 1) % tc->eval_interval == 0) || is_last) {
            EvalOut ev = evaluate(&m, &ds, SPLIT_VALID, tc->eval_batches, tc->batch_size, &prec);
            if (rank == 0) {
                h5log_append(&lg, id.eval_loss, step + 1, &ev.loss);
                h5log_append(&lg, id.eval_ppl, step + 1, &ev.ppl);
                h5log_append(&lg, id.eval_metric, step + 1, &ev.metric);
                if (cfg->model.task == TASK_LM)
                    printf("eval step %ld | valid loss %.4f | valid ppl %.2f (unigram %.2f) | %ld tokens\n",
                           step + 1, ev.loss, ev.ppl, uni_ppl, ev.n);
                else
                    printf("eval step %ld | valid loss %.4f | valid %s %.4f | %ld examples\n",
                           step + 1, ev.loss, cls_metric_name(ds.metric), ev.metric, ev.n);
                fflush(stdout);
            }
            res->valid_loss = ev.loss;
            res->valid_ppl = ev.ppl;
            res->valid_metric = ev.metric;
        }
        /* why to stop, agreed by every rank: [--stop-at reached, signal number, the log failed] */
        double stop[3] = {opt->stop_at > 0 && step + 1 >= opt->stop_at && !is_last ? 1 : 0, (double)g_stop_signal,
                          STATUS_OK(log_err) ? 0 : 1};
        comm_allreduce_max_f64(comm, stop, 3);
        int stopping = stop[0] > 0 || stop[1] > 0 || stop[2] > 0;
        int want_ckpt = is_last || stopping ||
                        (cfg->checkpoint.interval > 0 && (step + 1) % cfg->checkpoint.interval == 0);
        if (want_ckpt) {
            pos.elapsed_s = time_now() - t_start;
            if (rank == 0) {
                Status fs = h5log_flush(&lg);
                if (!STATUS_OK(fs) && STATUS_OK(log_err)) log_err = fs;
            }
            st = agree(comm, residency_fetch_all(&resid));
            if (STATUS_OK(st)) st = checkpoint_save(run_dir, &m, &pos, cfg->checkpoint.keep);
            if (!STATUS_OK(st)) {
                st = status_errorf("step %ld: checkpoint failed: %s%s", step + 1, st.msg,
                                   stop[2] > 0 ? " (after the metrics log failed too)" : "");
                break;
            }
        }
        if (stop[2] > 0) {
            /* a failed log write stops the run once the last checkpoint attempt succeeded */
            st = status_errorf("step %ld: writing %s failed: %s; a checkpoint of step %ld was written, continue with "
                               "--resume once the disk has room", step + 1, path,
                               rank == 0 ? log_err.msg : "(rank 0 has the message)", step + 1);
            break;
        }
        if (stopping) {
            if (rank == 0) {
                if (stop[1] > 0)
                    printf("signal %s received: checkpoint written at step %ld, stopping (continue with --resume)\n",
                           (int)stop[1] == SIGTERM ? "SIGTERM" : (int)stop[1] == SIGUSR1 ? "SIGUSR1" : "(other)", step + 1);
                else
                    printf("--stop-at reached: checkpoint written at step %ld, stopping (continue with --resume)\n", step + 1);
            }
            res->interrupted = true;
            break;
        }
    }
    res->steps_done = pos.step;
    res->final_train_loss = last_loss;
    /* resumed at the last step (killed after the final checkpoint, before DONE): the final
     * validation is recomputed (deterministic), and each of its rows is written only if the
     * killed run did not write it already */
    if (STATUS_OK(st) && !res->interrupted && first_step >= tc->steps) {
        EvalOut ev = evaluate(&m, &ds, SPLIT_VALID, tc->eval_batches, tc->batch_size, &prec);
        res->valid_loss = ev.loss;
        res->valid_ppl = ev.ppl;
        res->valid_metric = ev.metric;
        if (rank == 0) {
            if (h5log_last_step(&lg, id.eval_ppl) != (long)pos.step) {
                h5log_append(&lg, id.eval_loss, pos.step, &ev.loss);
                h5log_append(&lg, id.eval_ppl, pos.step, &ev.ppl);
                h5log_append(&lg, id.eval_metric, pos.step, &ev.metric);
            }
            printf("resumed at the last step (%lld): finishing the final evaluation\n", (long long)pos.step);
        }
    }
    if (STATUS_OK(st) && !res->interrupted && cfg->model.task == TASK_LM && pos.step >= tc->steps) {
        EvalOut ev = evaluate(&m, &ds, SPLIT_TEST, tc->eval_batches, tc->batch_size, &prec);
        res->test_loss = ev.loss;
        res->test_ppl = ev.ppl;
        if (rank == 0) {
            /* the run's headline numbers, one row at the last step (attributes cannot be
             * added once SWMR writing has started) */
            if (h5log_last_step(&lg, id.final_valid_ppl) != (long)pos.step)
                h5log_append(&lg, id.final_valid_ppl, pos.step, &res->valid_ppl);
            if (h5log_last_step(&lg, id.final_test_ppl) != (long)pos.step)
                h5log_append(&lg, id.final_test_ppl, pos.step, &ev.ppl);
            if (h5log_last_step(&lg, id.final_test_loss) != (long)pos.step)
                h5log_append(&lg, id.final_test_loss, pos.step, &ev.loss);
            if (ev.n > 0)
                printf("final | valid ppl %.2f | test ppl %.2f | unigram ppl (valid) %.2f | %.1f s\n",
                       res->valid_ppl, ev.ppl, uni_ppl, time_now() - t_start);
            else
                printf("final | valid ppl %.2f | test split shorter than one window | unigram ppl (valid) %.2f | %.1f s\n",
                       res->valid_ppl, uni_ppl, time_now() - t_start);
        }
    }
    if (rank == 0) {
        Status fs = h5log_flush(&lg);
        if (STATUS_OK(st) && !STATUS_OK(fs)) st = status_errorf("writing %s failed: %s", path, fs.msg);
        h5log_close(&lg);
        /* after a failed write (a full disk), no row may keep an invalid step */
        if (!STATUS_OK(log_err) || !STATUS_OK(fs)) {
            Status rs = h5log_repair(path, -1);
            if (!STATUS_OK(rs)) fprintf(stderr, "dcmoe: warning: %s\n", rs.msg);
        }
    }
    /* DONE marks a run that reached train.steps (launchers skip it); written last, atomically */
    if (rank == 0 && STATUS_OK(st) && !res->interrupted && pos.step >= tc->steps) {
        char done_path[4096], done[128];
        str_fmt(done_path, sizeof done_path, "%s/DONE", run_dir);
        int nd = snprintf(done, sizeof done, "steps %lld\n", (long long)pos.step);
        st = file_write_atomic(done_path, done, (size_t)nd);
    }
    comm->traffic = NULL;
    traffic_free(&traffic);
    residency_free(&resid);
    prec_free(&prec);
    model_free(&m);
    comm->topo = NULL;
    topology_free(&topo);
    xfree(orow); xfree(mat); xfree(mem_all);
    xfree(in); xfree(tg); xfree(len); xfree(row); xfree(rank_buf); xfree(rank_row); xfree(crow); xfree(evs);
    data_free(&ds);
    backend_free(&be);
    return agree(comm, st);
}

/* one number per rank in the eval report */
static void json_rank_array(FILE *f, const char *name, const double *all, int P, int stride, int col, int last) {
    fprintf(f, "  \"%s\": [", name);
    for (int r = 0; r < P; r++) fprintf(f, "%s%.17g", r ? ", " : "", all[(size_t)r * stride + col]);
    fprintf(f, "]%s\n", last ? "" : ",");
}

Status eval_run(const Config *cfg, const char *ckpt_dir, const char *split, const char *precision, Comm *comm) {
    char run_dir[2048], vocab_path[4096], ckpt[4096];
    train_run_dir(cfg, run_dir, sizeof run_dir);
    str_fmt(vocab_path, sizeof vocab_path, "%s/vocab.txt", run_dir);
    int sp = !strcmp(split, "test") ? SPLIT_TEST : !strcmp(split, "valid") ? SPLIT_VALID : -1;
    if (sp < 0) return status_errorf("--split %s: expected valid or test", split);
    int stored = cfg->precision.mode != PRECISION_FP32;
    if (precision && precision[0]) {
        if (!strcmp(precision, "stored")) stored = 1;
        else if (!strcmp(precision, "fp32")) stored = 0;
        else return status_errorf("--precision %s: expected fp32 or stored", precision);
    }
    if (cfg->offload.enabled && !stored)
        return status_errorf("offload.enabled: the offloaded groups are the stored FP16/INT4 formats; evaluate with "
                             "--precision stored (a checkpoint of a precision.mode storage or qat run)");
    if (ckpt_dir && ckpt_dir[0]) str_fmt(ckpt, sizeof ckpt, "%s", ckpt_dir);
    else {
        TRY(checkpoint_find_latest(run_dir, ckpt, sizeof ckpt));
        if (!ckpt[0]) return status_errorf("%s: no complete checkpoint to evaluate", run_dir);
    }
    if (!file_exists(vocab_path)) return status_errorf("%s: missing (the run's vocabulary)", vocab_path);
    Backend be;
    TRY(backend_cpu_init(&be, 0));
    Dataset ds;
    memset(&ds, 0, sizeof ds);
    TRY(data_load(&cfg->data, cfg->model.task, cfg->model.seq_len, vocab_path, &ds));
    int B = cfg->train.batch_size;
    if (B % comm->size) B = comm->size * (B / comm->size + 1);
    Model m;
    TRY(model_init(&m, cfg, ds.vocab.n_words, cfg->model.n_classes > 0 ? cfg->model.n_classes : ds.n_classes,
                   B / comm->size, &be, comm));
    TrainPos pos;
    /* inference needs no Adam moments, and the stored path no FP32 experts */
    int n_clus0 = n_clustered_layers(&m), lean = stored && n_clus0 > 0 && n_moe_layers(&m) == n_clus0;
    Status st = checkpoint_load_opts(ckpt, &m, &pos, CKPT_LOAD_NO_ADAM | (lean ? CKPT_LOAD_NO_EXPERTS : 0));
    /* fp32 evaluates the FP32 masters as they are (no QAT fake quantisation) */
    if (!stored) m.cfg.precision.mode = PRECISION_FP32;
    else m.cfg.precision.mode = PRECISION_STORAGE;   /* the stored path replaces a QAT shadow */
    Precision prec;
    prec_init(&prec, &m);
    MemAcct acct;
    memacct_init(&acct);
    int n_clus = n_clustered_layers(&m);
    if (STATUS_OK(st) && stored && n_clus == 0)
        st = status_errorf("--precision stored: the model has no clustered layer (moe.kind: clustered) to store in FP16/INT4");
    if (STATUS_OK(st) && stored) {
        void *q = NULL;
        size_t nq = 0;
        st = checkpoint_read_section(ckpt, "experts.q", comm, &q, &nq);
        if (!STATUS_OK(st))
            st = status_errorf("%s (the run was trained with precision.mode: fp32, so it has no stored formats; "
                               "evaluate with --precision fp32)", st.msg);
        char odir[2048];
        if (cfg->offload.dir[0]) str_fmt(odir, sizeof odir, "%s", cfg->offload.dir);
        else str_fmt(odir, sizeof odir, "%s/offload", run_dir);
        if (STATUS_OK(st)) st = prec_attach_stored(&prec, q, nq, &cfg->offload, odir, &acct);
        xfree(q);
        st = agree(comm, st);
    }
    if (STATUS_OK(st)) {
        MemProc p0;
        memacct_reset_peaks(&acct);
        double t0 = time_now();
        EvalOut ev = evaluate(&m, &ds, sp, 0, B, &prec);
        double eval_s = time_now() - t0;
        st = agree(comm, prec_status(&prec));
        OffloadStats os;
        prec_offload_totals(&prec, &os);
        if (!STATUS_OK(memacct_proc(&p0))) memset(&p0, 0, sizeof p0);
        enum { NCOL = 14 };
        double mine[NCOL] = {(double)memacct_tier_peak(&acct, MEM_TIER_DEVICE), (double)memacct_tier_current(&acct, MEM_TIER_DEVICE),
                             (double)os.hits, (double)os.misses, (double)os.bytes_in, os.stall_s, eval_s,
                             (double)p0.hwm, (double)m.n_cat[PCAT_EXPERT] * 4.0, (double)m.n_cat[PCAT_DENSE] * 4.0,
                             (double)os.prefetches, (double)os.prefetch_hits, (double)os.evictions,
                             (double)(memacct_tier_peak(&acct, MEM_TIER_HOST) + memacct_tier_peak(&acct, MEM_TIER_FILE))};
        double *all = xcalloc(sizeof(double) * NCOL * (size_t)comm->size);
        comm_gather_bytes(comm, mine, all, sizeof mine, 0);
        if (STATUS_OK(st) && comm->rank == 0) {
            const char *pn = stored ? "stored" : "fp32";
            double hits = 0, miss = 0, stall = 0, secs = 0;
            for (int r = 0; r < comm->size; r++) {
                hits += all[r * NCOL + 2]; miss += all[r * NCOL + 3];
                if (all[r * NCOL + 5] > stall) stall = all[r * NCOL + 5];
                if (all[r * NCOL + 6] > secs) secs = all[r * NCOL + 6];
            }
            if (cfg->model.task == TASK_LM)
                printf("eval %s | checkpoint step %lld | precision %s | %s loss %.4f | ppl %.2f | unigram ppl %.2f | %ld tokens\n",
                       ckpt, (long long)pos.step, pn, split, ev.loss, ev.ppl, data_unigram_ppl(&ds, sp), ev.n);
            else
                printf("eval %s | checkpoint step %lld | precision %s | %s loss %.4f | %s %.4f | %ld examples\n", ckpt,
                       (long long)pos.step, pn, split, ev.loss, cls_metric_name(ds.metric), ev.metric, ev.n);
            if (stored)
                printf("stored experts: peak resident %.1f KiB on rank 0 | offload %s | hits %.0f misses %.0f (hit rate %.3f) | "
                       "stall %.3f s of %.3f s (%.2f%%)\n", all[0] / 1024.0, cfg->offload.enabled ? "on" : "off",
                       hits, miss, hits + miss > 0 ? hits / (hits + miss) : 1.0, stall, secs, secs > 0 ? 100 * stall / secs : 0);
            char jpath[4200];
            str_fmt(jpath, sizeof jpath, "%s/eval_%s_%s%s.json", ckpt, split, pn, cfg->offload.enabled ? "_offload" : "");
            FILE *f = fopen(jpath, "w");
            if (!f) st = status_errorf("%s: cannot write the eval report", jpath);
            else {
                fprintf(f, "{\n  \"checkpoint\": \"%s\",\n  \"step\": %lld,\n  \"split\": \"%s\",\n  \"precision\": \"%s\",\n",
                        ckpt, (long long)pos.step, split, pn);
                fprintf(f, "  \"loss\": %.17g,\n  \"ppl\": %.17g,\n  \"metric\": %.17g,\n  \"n\": %ld,\n", ev.loss, ev.ppl, ev.metric, ev.n);
                fprintf(f, "  \"ranks\": %d,\n  \"offload_enabled\": %s,\n  \"max_resident_groups\": %d,\n  \"tier\": \"%s\",\n",
                        comm->size, cfg->offload.enabled ? "true" : "false", cfg->offload.max_resident_groups,
                        cfg->offload.tier == OFFLOAD_FILE ? "file" : "host");
                fprintf(f, "  \"hit_rate\": %.17g,\n  \"stall_fraction\": %.17g,\n", hits + miss > 0 ? hits / (hits + miss) : 1.0,
                        secs > 0 ? stall / secs : 0);
                static const char *const cols[NCOL] = {"peak_resident_expert_bytes", "resident_expert_bytes_end", "hits", "misses",
                                                       "bytes_in", "stall_s", "eval_s", "vmhwm_bytes", "fp32_expert_param_bytes",
                                                       "fp32_dense_param_bytes", "prefetches", "prefetch_hits", "evictions",
                                                       "backing_tier_peak_bytes"};
                for (int c = 0; c < NCOL; c++) json_rank_array(f, cols[c], all, comm->size, NCOL, c, c == NCOL - 1);
                fprintf(f, "}\n");
                if (fclose(f) != 0) st = status_errorf("%s: write failed", jpath);
            }
        }
        xfree(all);
        st = agree(comm, st);
    }
    prec_free(&prec);
    model_free(&m);
    data_free(&ds);
    backend_free(&be);
    return st;
}
