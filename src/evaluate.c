/* evaluate.c: evaluation on a split (training's periodic and final evaluations, and
 * `dcmoe eval`: a checkpoint, FP32 or the stored FP16/INT4 experts, with or without offloading,
 * and its JSON report) on run.backend. On CUDA the stored experts live in device memory (resident
 * blobs, or the residency manager's device slots fed from pinned host memory on a side stream)
 * and are decoded by the dequant_rows slot: compiled with nvcc, checked by
 * tests/gpu/device-check.sh, not yet run on a GPU. Every rank takes part; rank 0 prints and
 * writes the report. */
#include "evaluate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "checkpoint.h"
#include "compress_event.h"
#include "memacct.h"
#include "traffic.h"
#include "train.h"

/* every rank takes part (the MoE layers exchange routing counts); global batches of
 * B_global windows, rank r runs its slice, padding windows have no targets */
static EvalOut evaluate_inner(Model *m, const Dataset *ds, int split, int max_batches, int B_global, Precision *pr);

/* evaluation traffic is not training traffic: the profiler and the placement statistics
 * are paused while it runs */
EvalOut evaluate(Model *m, const Dataset *ds, int split, int max_batches, int B_global, Precision *pr) {
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
    /* the run's backend (run.backend), as dcmoe train chose it */
    Backend be;
    if (cfg->run.backend == BACKEND_CUDA) TRY(comm_agree(comm, backend_cuda_init(&be, comm->local_rank)));
    else TRY(comm_agree(comm, backend_cpu_init(&be, 0)));
    Status bs = comm_agree(comm, backend_check(&be));
    if (STATUS_OK(bs)) bs = comm_agree(comm, backend_set_gemm_dtype(&be, cfg->run.gemm_dtype));
    if (!STATUS_OK(bs)) { backend_free(&be); return bs; }
    Dataset ds;
    memset(&ds, 0, sizeof ds);
    TRY(data_load(&cfg->data, cfg->model.task, cfg->model.seq_len, vocab_path, &ds));
    int B = cfg->train.batch_size;
    if (B % comm->size) B = comm->size * (B / comm->size + 1);
    /* inference keeps every unit once (no replicated hot units: the checkpoint's copies are
     * not loaded, and the stored path addresses the primary slots only) */
    Config ecfg = *cfg;
    ecfg.parallel.replicas = 0;
    /* a checkpoint from the warm-up of a compression run (clustering.compress_at) holds the
     * standard MoE: the model follows the checkpoint's step */
    if (ecfg.clustering.compress_at > 0) {
        void *pd = NULL;
        size_t npd = 0;
        TRY(checkpoint_read_section(ckpt, "pos", comm, &pd, &npd));
        TrainPos cp;
        memset(&cp, 0, sizeof cp);
        if (npd == sizeof cp) memcpy(&cp, pd, sizeof cp);
        xfree(pd);
        Config pc;
        compress_phase_config(&ecfg, (long)cp.step, &pc);
        ecfg = pc;
    }
    cfg = &ecfg;
    Model m;
    TRY(model_init(&m, cfg, ds.vocab.n_words, cfg->model.n_classes > 0 ? cfg->model.n_classes : ds.n_classes,
                   B / comm->size, &be, comm));
    TrainPos pos;
    /* inference needs no Adam moments, and the stored path no FP32 experts */
    int n_clus0 = model_n_clustered_layers(&m), lean = stored && n_clus0 > 0 && model_n_moe_layers(&m) == n_clus0;
    Status st = checkpoint_load_opts(ckpt, &m, &pos, CKPT_LOAD_NO_ADAM | (lean ? CKPT_LOAD_NO_EXPERTS : 0));
    /* fp32 evaluates the FP32 masters as they are (no QAT fake quantisation) */
    if (!stored) m.cfg.precision.mode = PRECISION_FP32;
    else m.cfg.precision.mode = PRECISION_STORAGE;   /* the stored path replaces a QAT shadow */
    Precision prec;
    prec_init(&prec, &m);
    MemAcct acct;
    memacct_init(&acct);
    int n_clus = model_n_clustered_layers(&m);
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
        st = comm_agree(comm, st);
    }
    if (STATUS_OK(st)) {
        MemProc p0;
        memacct_reset_peaks(&acct);
        double t0 = time_now();
        EvalOut ev = evaluate(&m, &ds, sp, 0, B, &prec);
        double eval_s = time_now() - t0;
        st = comm_agree(comm, prec_status(&prec));
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
        st = comm_agree(comm, st);
    }
    prec_free(&prec);
    model_free(&m);
    data_free(&ds);
    backend_free(&be);
    return st;
}
