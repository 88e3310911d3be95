/* runlog.c: the training run's HDF5 schema and rows (see runlog.h). Series are declared once
 * in log_declare; every row is written through h5log, whose first error is kept in rl->err. */
#include "runlog.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "config_build.h"
#include "memacct.h"
#include "metrics.h"

static Status log_declare(H5log *lg, const Model *m, LogIds *id) {
    uint64_t d4[1] = {4}, dp[1] = {(uint64_t)m->comm->size};
    int nm = model_n_moe_layers(m);
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
    uint64_t d2[1] = {2};
    id->ar_overlap = m->cfg.parallel.overlap_allreduce ? h5log_series(lg, "comm/summary/allreduce_overlap_s", H5LOG_F64, 1, d2) : 0;
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
    /* a compression run (clustering.compress_at) declares the clustered series from the start */
    int nc = m->cfg.clustering.compress_at > 0 ? nm : model_n_clustered_layers(m);
    uint64_t dc[1] = {(uint64_t)(nc ? nc : 1)};
    uint64_t dcg[2] = {(uint64_t)(nc ? nc : 1), (uint64_t)m->cfg.moe.n_groups};
    uint64_t dce[2] = {(uint64_t)(nc ? nc : 1), (uint64_t)m->cfg.moe.n_experts};
    uint64_t dev[2] = {(uint64_t)(nc ? nc : 1), RECLUSTER_N_COLS + 2 + RECLUSTER_N_EXTRA};
    id->tpg = h5log_series(lg, "moe/tokens_per_group", H5LOG_F64, 2, dcg);
    id->gcv2 = h5log_series(lg, "moe/balance_group/cv2", H5LOG_F64, 1, dc);
    id->gmaxvio = h5log_series(lg, "moe/balance_group/maxvio", H5LOG_F64, 1, dc);
    id->gdrop = h5log_series(lg, "moe/balance_group/drop", H5LOG_F64, 1, dc);
    id->events = h5log_series(lg, "cluster/events", H5LOG_F64, 2, dev);
    id->group_of = h5log_series(lg, "cluster/group_of", H5LOG_F64, 2, dce);
    uint64_t dfu[1] = {FOLLOWUP_N_COLS};
    id->followup = h5log_series(lg, "cluster/event_followup", H5LOG_F64, 1, dfu);
    if (m->cfg.clustering.compress_at > 0) {
        uint64_t dcc[2] = {(uint64_t)(nm ? nm : 1), COMPRESS_N_COLS};
        id->compress = h5log_series(lg, "cluster/compress", H5LOG_F64, 2, dcc);
    } else id->compress = 0;
    if (m->cfg.clustering.mode == CLUSTER_MODE_MASTERS) {
        uint64_t dpj[2] = {(uint64_t)(nc ? nc : 1), 3};
        id->project = h5log_series(lg, "cluster/project", H5LOG_F64, 2, dpj);
    } else id->project = 0;
    uint64_t dph[1] = {COMM_N_PHASES};
    uint64_t dmat[3] = {COMM_N_PHASES, (uint64_t)m->comm->size, (uint64_t)m->comm->size};
    uint64_t dlp[2] = {(uint64_t)(nm ? nm : 1), (uint64_t)m->comm->size};
    id->c_intra = h5log_series(lg, "comm/summary/intra_bytes", H5LOG_F64, 1, dph);
    id->c_inter = h5log_series(lg, "comm/summary/inter_bytes", H5LOG_F64, 1, dph);
    id->c_time = h5log_series(lg, "comm/summary/time_s", H5LOG_F64, 1, dph);
    id->c_wait = m->cfg.log.sync_wait ? h5log_series(lg, "comm/summary/wait_s", H5LOG_F64, 1, dph) : 0;
    id->wait_split = m->cfg.log.sync_wait ? h5log_series(lg, "perf/wait_split", H5LOG_F64, 1, d4) : 0;
    id->c_msgs = h5log_series(lg, "comm/summary/msgs", H5LOG_F64, 1, dph);
    id->c_dispatch = h5log_series(lg, "comm/dispatch", H5LOG_F64, 1, d4);
    /* rank x rank only up to parallel.rank_matrix_max ranks; node x node and marginals always */
    int rank_mat = m->comm->size <= m->cfg.parallel.rank_matrix_max;
    id->c_matrix = rank_mat ? h5log_series(lg, "comm/bytes", H5LOG_F64, 3, dmat) : 0;
    id->c_msgmat = rank_mat ? h5log_series(lg, "comm/msgs", H5LOG_F64, 3, dmat) : 0;
    int n_nodes = m->comm->topo && m->comm->topo->n_nodes > 0 ? m->comm->topo->n_nodes : 1;
    uint64_t dnn[3] = {COMM_N_PHASES, (uint64_t)n_nodes, (uint64_t)n_nodes}, dpp[2] = {COMM_N_PHASES, (uint64_t)m->comm->size};
    id->c_nodemat = h5log_series(lg, "comm/node_bytes", H5LOG_F64, 3, dnn);
    id->c_sent = h5log_series(lg, "comm/rank_sent", H5LOG_F64, 2, dpp);
    id->c_recv = h5log_series(lg, "comm/rank_recv", H5LOG_F64, 2, dpp);
    id->rank_maxvio = h5log_series(lg, "moe/balance_rank/maxvio", H5LOG_F64, 1, dl);
    uint64_t dl2[2] = {dl[0], 2};
    id->nodes = h5log_series(lg, "moe/nodes_per_token", H5LOG_F64, 2, dl2);
    id->intra_frac = h5log_series(lg, "comm/intra_fraction", H5LOG_F64, 1, dl);
    if (m->cfg.log.trace_interval > 0 && nm > 0) {
        uint64_t dtr[3] = {(uint64_t)nm, (uint64_t)m->comm->size, (uint64_t)m->B_max * m->T * m->cfg.moe.top_k};
        id->trace = h5log_series(lg, "trace/routing", H5LOG_I64, 3, dtr);
        id->trace_owner = h5log_series(lg, "trace/owner", H5LOG_I64, 2, dle);
    } else id->trace = id->trace_owner = 0;
    id->rank_tokens = h5log_series(lg, "moe/tokens_per_rank", H5LOG_F64, 2, dlp);
    id->owner = h5log_series(lg, "parallel/owner", H5LOG_F64, 2, dle);
    id->migr = h5log_series(lg, "parallel/migration_bytes", H5LOG_F64, 0, NULL);
    uint64_t dpl[2] = {dl[0], 8};
    id->placement = h5log_series(lg, "parallel/placement", H5LOG_F64, 2, dpl);
    if (m->cfg.parallel.replicas > 0 && nm > 0) {
        /* replicated hot units: unit and EP rank of every copy (-1 = unused), written with
         * parallel/owner; copies that differ from their primary, on log steps */
        uint64_t dlr[2] = {(uint64_t)nm, (uint64_t)m->cfg.parallel.replicas};
        id->replicas = h5log_series(lg, "parallel/replicas", H5LOG_F64, 2, dlr);
        id->replica_rank = h5log_series(lg, "parallel/replica_rank", H5LOG_F64, 2, dlr);
        id->replica_bad = h5log_series(lg, "parallel/replica_mismatch", H5LOG_F64, 1, dl);
    }
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

void runlog_trace(RunLog *rl, const Model *m, long step, const int32_t *all) {
    if (!rl->open || rl->id.trace <= 0) return;
    int nm = rl->n_moe, P = rl->P, E = rl->E;
    size_t nk = (size_t)m->B_max * m->T * m->cfg.moe.top_k;
    int64_t *row = xmalloc(sizeof(int64_t) * (size_t)nm * P * nk), *own = xmalloc(sizeof(int64_t) * (size_t)nm * E);
    for (int l = 0; l < nm; l++)
        for (int p = 0; p < P; p++)
            for (size_t q = 0; q < nk; q++) row[((size_t)l * P + p) * nk + q] = all[((size_t)p * nm + l) * nk + q];
    int i = 0;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        for (int e = 0; e < E; e++) own[(size_t)i * E + e] = m->ep[l].expert_owner[e];
        i++;
    }
    h5log_append(&rl->lg, rl->id.trace, step, row);
    h5log_append(&rl->lg, rl->id.trace_owner, step, own);
    xfree(row);
    xfree(own);
}

static Status log_attrs(H5log *lg, const Model *m, const Comm *comm, const Dataset *ds,
                        double peak_gflops, double unigram_ppl, const Topology *topo) {
    /* the run's config: during the warm-up of a compression run the model's copy says
     * moe.kind standard (compress_at > 0 is valid only with clustered) */
    Config rc = m->cfg;
    if (rc.clustering.compress_at > 0) rc.moe.kind = MOE_KIND_CLUSTERED;
    char *yaml = config_to_yaml(&rc);
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
    if (m->cfg.parallel.overlap_allreduce)
        TRY(h5log_attr_str(lg, "/comm/summary/allreduce_overlap_s", "columns",
                           "in_flight,exposed (seconds, rank 0: the dense gradient sum from its first bucket's start to "
                           "its completion, and the wait after the backward; in_flight - exposed ran hidden behind the "
                           "backward)"));
    char tdesc[256];
    topology_describe(topo, tdesc, sizeof tdesc);
    TRY(h5log_attr_str(lg, "/", "topology", tdesc));
    static const char *const pol[] = {"contiguous", "eplb", "topology"};
    TRY(h5log_attr_str(lg, "/", "placement", pol[m->cfg.parallel.placement]));
    TRY(h5log_attr_str(lg, "/", "exchange", m->cfg.parallel.exchange == EXCHANGE_TWO_LEVEL ? "two_level" : "flat"));
    TRY(h5log_attr_str(lg, "/", "clustering_mode",
                       m->cfg.clustering.mode == CLUSTER_MODE_MASTERS ? "masters" : "compressed"));
    int64_t *node_of = xcalloc(sizeof(int64_t) * (size_t)comm->size);
    for (int r = 0; r < comm->size; r++) node_of[r] = topo->node_of[r];
    uint64_t dn[1] = {(uint64_t)comm->size};
    Status sn = h5log_write_array(lg, "parallel/node_of_rank", H5LOG_I64, 1, dn, node_of);
    xfree(node_of);
    TRY(sn);
    /* enum CommPhase order; one name per phase */
    static const char *const phase_cols = "allreduce,dispatch,combine,migration,other,recluster";
    _Static_assert(COMM_N_PHASES == 6, "comm/summary columns: one name per CommPhase");
    TRY(h5log_attr_str(lg, "/comm/summary/intra_bytes", "columns", phase_cols));
    TRY(h5log_attr_str(lg, "/comm/summary/inter_bytes", "columns", phase_cols));
    TRY(h5log_attr_str(lg, "/comm/summary/time_s", "columns", phase_cols));
    if (m->cfg.log.sync_wait) {
        TRY(h5log_attr_str(lg, "/perf/wait_split", "columns",
                           "forward,backward,allreduce,optimizer: the seconds of each perf/time_split column this rank "
                           "(rank 0) spent in log.sync_wait's timed barriers"));
        TRY(h5log_attr_str(lg, "/comm/summary/wait_s", "columns", phase_cols));
        TRY(h5log_attr_str(lg, "/comm/summary/wait_s", "description",
                           "log.sync_wait: seconds per step in the timed barrier before the phase's blocking collectives "
                           "(waiting for the slowest rank; other: capacity counts, loss statistics, the loss and norm "
                           "reductions), mean over ranks; comm/summary/time_s excludes it"));
    }
    TRY(h5log_attr_str(lg, "/comm/summary/msgs", "columns", phase_cols));
    if (comm->size <= m->cfg.parallel.rank_matrix_max) {
        TRY(h5log_attr_str(lg, "/comm/bytes", "axes", "phase (allreduce,dispatch,combine,migration,other,recluster), src rank, dst rank; written every parallel.traffic_interval steps"));
        TRY(h5log_attr_str(lg, "/comm/msgs", "axes", "phase, src rank, dst rank: messages, written with /comm/bytes"));
    }
    TRY(h5log_attr_str(lg, "/comm/node_bytes", "axes", "phase (allreduce,dispatch,combine,migration,other,recluster), src node, dst node: bytes between "
                       "different ranks (a rank's bytes to itself excluded); written every parallel.traffic_interval steps"));
    TRY(h5log_attr_str(lg, "/comm/rank_sent", "axes", "phase, rank: bytes the rank sent to other ranks this step"));
    TRY(h5log_attr_str(lg, "/comm/rank_recv", "axes", "phase, rank: bytes the rank received from other ranks this step"));
    if (m->cfg.log.trace_interval > 0 && model_n_moe_layers(m) > 0) {
        TRY(h5log_attr_str(lg, "/trace/routing", "axes",
                           "MoE layer, rank, token x top-k slot of the step's training forward: the expert, or -1 for a "
                           "pair dropped by capacity; every log.trace_interval steps"));
        TRY(h5log_attr_str(lg, "/trace/owner", "axes",
                           "MoE layer, expert: its owner (rank inside the expert-parallel group) at that step"));
    }
    TRY(h5log_attr_str(lg, "/moe/balance/cv2", "note",
                       "expert load = token-expert pairs the router selected, before any capacity (group or expert), "
                       "for every layer kind; var, maxvio, max_over_mean, entropy and dead use the same load"));
    TRY(h5log_attr_str(lg, "/moe/nodes_per_token", "columns",
                       "mean distinct nodes of a token's selected experts (before capacity), tokens whose experts "
                       "span more than moe.max_nodes nodes (0 when the limit holds)"));
    TRY(h5log_attr_str(lg, "/comm/intra_fraction", "note",
                       "per MoE layer: of the dispatch rows sent to other ranks (both stages of a two-level "
                       "exchange), the fraction whose destination is on the sender's node (1 with one node)"));
    TRY(h5log_attr_str(lg, "/parallel/placement", "columns",
                       "per MoE layer, one row per placement event (periodic, or after a re-clustering; written with "
                       "the first log row after it): objective of the current placement, objective of the proposal "
                       "(topology: inter-node co-selection cut + 1e-3 x inter-rank cut, with moe.home_bias the "
                       "co-selection kept inside the nodes instead; replica-aware weights; eplb: rank MaxVio; 0 = "
                       "not compared), accepted (1/0), units moved, replicas placed after it, replicas changed (1/0), "
                       "rank load MaxVio counting replicas before and after"));
    TRY(h5log_attr_str(lg, "/comm/dispatch", "columns",
                       "payload rows sent (all MoE layers, incl. to self), token-expert pairs carried, "
                       "nodes touched (sum over token-layers), token-layers routed"));
    TRY(h5log_attr_str(lg, "/offload/train", "columns",
                       "hits,misses,evictions,bytes_in,bytes_out,stall_s,resident_units (summed over ranks; "
                       "training-time offloading, offload.enabled)"));
    TRY(h5log_attr_str(lg, "/parallel/owner", "note", "owning rank of every expert per MoE layer, at start and after every placement change "
                       "(with parallel.ep_size < world: the position inside the EP group, the same in every group; "
                       "parallel/ep_group_of_rank and parallel/ep_pos_of_rank map ranks)"));
    TRY(h5log_attr_i64(lg, "/", "ep_size", m->ep_size));
    TRY(h5log_attr_i64(lg, "/", "n_ep_groups", m->n_ep_groups));
    {
        int64_t *gp = xcalloc(sizeof(int64_t) * 2 * (size_t)comm->size);
        for (int r = 0; r < comm->size; r++) {
            gp[r] = m->ep_group_of_rank ? m->ep_group_of_rank[r] : 0;
            gp[comm->size + r] = m->ep_pos_of_rank ? m->ep_pos_of_rank[r] : r;
        }
        uint64_t dg[1] = {(uint64_t)comm->size};
        Status sg = h5log_write_array(lg, "parallel/ep_group_of_rank", H5LOG_I64, 1, dg, gp);
        if (STATUS_OK(sg)) sg = h5log_write_array(lg, "parallel/ep_pos_of_rank", H5LOG_I64, 1, dg, gp + comm->size);
        xfree(gp);
        TRY(sg);
    }
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
                       "recon_err_mean,recon_err_max,seconds,probe_loss_before,probe_loss_after,"
                       "w_cos_within,w_cos_cross,mu_cos_within,mu_cos_cross,bytes,rolled_back,jaccard_compress"));
    TRY(h5log_attr_str(lg, "/cluster/events", "note",
                       "one row per clustered layer and re-clustering event. jaccard: the proposed partition against the "
                       "one before the event (mean over matched groups of |A and B| / |A or B|, whether or not it was "
                       "accepted); jaccard_compress: the partition in force after the event (a rolled-back change "
                       "undone) against the reference partition, the one the compression event chose "
                       "(clustering.compress_at) or else the initial contiguous grouping of step 0, same definition "
                       "(NaN: reference unknown, resumed from a checkpoint that predates it); probe losses: "
                       "clustering.probe_batches fixed validation batches; their values 25 and 50 steps later are in "
                       "cluster/event_followup"));
    TRY(h5log_attr_str(lg, "/cluster/event_followup", "columns",
                       "event_step,kind,probe_loss_before,probe_loss_after,probe_loss_25,probe_loss_50"));
    TRY(h5log_attr_str(lg, "/cluster/event_followup", "note",
                       "one row per event (re-clustering: kind 0, all layers at once; compression: kind 1), written at "
                       "the step its 50-step measurement is taken, or at the last step if training ends first. "
                       "event_step: the event's step (its rows in cluster/events or cluster/compress); "
                       "probe_loss_before/after: as logged at the event; probe_loss_25/50: the loss on the same "
                       "clustering.probe_batches fixed validation batches after training step event_step + 25 / + 50 "
                       "(before any event of that step), NaN if training ended first. Pending measurements are "
                       "checkpointed, so a resumed run writes the same rows"));
    if (m->cfg.clustering.mode == CLUSTER_MODE_MASTERS) {
        TRY(h5log_attr_str(lg, "/cluster/project", "columns", "err_mean,err_max,seconds"));
        TRY(h5log_attr_str(lg, "/cluster/project", "note",
                           "clustering.mode masters: one row per clustered layer each time the projection (bases = "
                           "member mean, factors = rank-r SVD of the residuals) is recomputed from the masters (step 0, "
                           "every clustering.project_interval steps, the compression): relative error "
                           "||W_i - proj(W_i)||_F / ||W_i||_F per expert and matrix, mean and max over the layer; seconds: "
                           "the whole projection (every layer) on rank 0, outside the step times. In "
                           "this mode cluster/events' recon_err is the projection error of the changed groups (the "
                           "masters themselves move unchanged)"));
    }
    if (m->cfg.clustering.compress_at > 0)
        TRY(h5log_attr_str(lg, "/cluster/compress", "columns",
                           "layer,partition,weight_err_mean,weight_err_max,output_err_mean,output_err_max,"
                           "coselect_frac,coselect_frac_random,seconds,bytes,probe_loss_before,probe_loss_after,"
                           "params_total,params_expert"));
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

/* owners of every expert per MoE layer, for the log */
static void owner_rows(const Model *m, double *out) {
    int i = 0, E = m->cfg.moe.n_experts;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        for (int e = 0; e < E; e++) out[(size_t)i * E + e] = m->ep[l].expert_owner[e];
        i++;
    }
}


/* the copies of every MoE layer: units [MoE layers, R] then EP ranks [MoE layers, R], -1 = unused */
static void replica_rows(const Model *m, RunLog *rl) {
    int R = m->cfg.parallel.replicas, nm = rl->n_moe, i = 0;
    int32_t *u = xmalloc(sizeof(int32_t) * (size_t)R), *r = xmalloc(sizeof(int32_t) * (size_t)R);
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
        const EpMap *em = &m->ep[l];
        for (int q = 0; q < R; q++) u[q] = r[q] = -1;
        if (em->R) ep_replicas_list(em, u, r);
        for (int q = 0; q < R; q++) {
            rl->rrow[(size_t)i * R + q] = u[q];
            rl->rrow[(size_t)(nm + i) * R + q] = r[q];
        }
        i++;
    }
    xfree(u); xfree(r);
}

/* stream copy (the log can be large) */
static Status copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb");
    if (!a) return status_errorf("%s: cannot open: %s", from, strerror(errno));
    FILE *b = fopen(to, "wb");
    if (!b) { fclose(a); return status_errorf("%s: cannot create: %s", to, strerror(errno)); }
    char *buf = xmalloc(1 << 20);
    size_t n;
    Status st = status_ok();
    while ((n = fread(buf, 1, 1 << 20, a)) > 0)
        if (fwrite(buf, 1, n, b) != n) { st = status_errorf("%s: write failed: %s", to, strerror(errno)); break; }
    if (STATUS_OK(st) && ferror(a)) st = status_errorf("%s: read failed", from);
    xfree(buf);
    fclose(a);
    if (fclose(b) != 0 && STATUS_OK(st)) st = status_errorf("%s: write failed: %s", to, strerror(errno));
    return st;
}

Status runlog_open(RunLog *rl, const char *path, const Model *m, const Comm *comm, const Dataset *ds,
                   const Topology *topo, long resume_step, double peak_gflops, const char *peak_how, double unigram_ppl) {
    memset(rl, 0, sizeof *rl);
    rl->lg.file = -1;
    rl->err = status_ok();
    str_fmt(rl->path, sizeof rl->path, "%s", path);
    const Config *cfg = &m->cfg;
    /* the log is prepared under a temporary name (a copy, when continuing) and renamed into
     * place once SWMR writing has started and it is on disk: between creating or reopening a
     * file and starting SWMR, HDF5 leaves it unreadable to others if the process is killed,
     * so metrics.h5 is always either the previous, readable file or the new one */
    char tmp[4200];
    str_fmt(tmp, sizeof tmp, "%s.opening", path);
    unlink(tmp);
    Status st = resume_step >= 0 ? copy_file(path, tmp) : status_ok();
    if (STATUS_OK(st))
        st = resume_step >= 0 ? h5log_open_append(&rl->lg, tmp, cfg->log.swmr, cfg->log.flush_interval, resume_step)
                              : h5log_create(&rl->lg, tmp, cfg->log.swmr, cfg->log.flush_interval);
    if (STATUS_OK(st)) st = log_declare(&rl->lg, m, &rl->id);
    if (STATUS_OK(st) && resume_step < 0) st = log_attrs(&rl->lg, m, comm, ds, peak_gflops, unigram_ppl, topo);
    if (STATUS_OK(st) && resume_step < 0) st = h5log_attr_str(&rl->lg, "/", "sgemm_peak_source", peak_how);
    if (STATUS_OK(st)) st = h5log_start(&rl->lg);
    if (STATUS_OK(st)) st = h5log_flush(&rl->lg);
    if (STATUS_OK(st)) {
        if (rename(tmp, path) != 0) st = status_errorf("%s: cannot rename to %s: %s", tmp, path, strerror(errno));
        else {
            str_fmt(rl->lg.path, sizeof rl->lg.path, "%s", path);
            char dir[4096];
            str_fmt(dir, sizeof dir, "%s", path);
            char *slash = strrchr(dir, '/');
            if (slash) { *slash = 0; dir_fsync(dir); }
        }
    }
    if (!STATUS_OK(st)) { h5log_close(&rl->lg); unlink(tmp); return st; }
    rl->open = true;
    rl->P = comm->size;
    rl->E = cfg->moe.n_experts;
    rl->G = cfg->moe.n_groups;
    rl->n_moe = model_n_moe_layers(m);
    rl->n_clus = model_n_clustered_layers(m);
    int nm = rl->n_moe ? rl->n_moe : 1, nc = nm, E = rl->E, P = rl->P;   /* nc: room for a compression's layers */
    rl->row = xcalloc(sizeof(double) * (size_t)nm * ((E > 6 ? E : 6) * 8 + 2));
    rl->crow = xcalloc(sizeof(double) * (size_t)nc * (rl->G + E + 3 + 16) * (RECLUSTER_N_COLS + 2 + RECLUSTER_N_EXTRA));
    rl->orow = xcalloc(sizeof(double) * (size_t)nm * (E + P + 1));
    rl->mat = comm->size <= cfg->parallel.rank_matrix_max ? xcalloc(sizeof(double) * (size_t)COMM_N_PHASES * P * P) : NULL;
    rl->rank_row = xcalloc(sizeof(double) * 2 * (size_t)P);
    rl->rrow = xcalloc(sizeof(double) * 2 * (size_t)nm * (cfg->parallel.replicas + 1));
    return status_ok();
}

static void keep(RunLog *rl, Status st) {
    if (!STATUS_OK(st) && STATUS_OK(rl->err)) rl->err = st;
}

double runlog_step(RunLog *rl, const Model *m, const StepRecord *r) {
    if (!rl->open) return 0;
    H5log *lg = &rl->lg;
    const LogIds *id = &rl->id;
    const Config *cfg = &m->cfg;
    long s = r->step;
    int P = rl->P, E = rl->E, nm = rl->n_moe, n_clus = rl->n_clus;
    const TrafficStep *ts = r->ts;
    h5log_append(lg, id->loss, s, &r->loss);
    h5log_append(lg, id->ce, s, &r->ce);
    h5log_append(lg, id->aux, s, &r->aux);
    h5log_append(lg, id->z, s, &r->z);
    h5log_append(lg, id->lr, s, &r->lr);
    h5log_append(lg, id->gnorm, s, &r->gnorm);
    h5log_append(lg, id->tokens, s, &r->tokens);
    h5log_append(lg, id->step_s, s, &r->step_s);
    h5log_append(lg, id->tok_s, s, &r->tok_s);
    h5log_append(lg, id->flops_frac, s, &r->flops_frac);
    h5log_append(lg, id->time_split, s, r->split);
    h5log_append(lg, id->comm_bytes, s, &r->allreduce_bytes);
    if (id->ar_overlap) {
        double ov[2] = {r->allreduce_inflight_s, r->allreduce_exposed_s};
        h5log_append(lg, id->ar_overlap, s, ov);
    }
    if (r->offload7) h5log_append(lg, id->off_train, s, r->offload7);
    h5log_append(lg, id->c_intra, s, ts->intra);
    h5log_append(lg, id->c_inter, s, ts->inter);
    h5log_append(lg, id->c_time, s, ts->seconds);
    if (id->c_wait) h5log_append(lg, id->c_wait, s, ts->wait);
    if (id->wait_split) h5log_append(lg, id->wait_split, s, r->wait_split);
    h5log_append(lg, id->c_msgs, s, ts->msgs);
    double disp[4] = {ts->rows_dispatched, ts->pairs_routed, ts->nodes_touched, ts->tokens};
    h5log_append(lg, id->c_dispatch, s, disp);
    h5log_append(lg, id->c_sent, s, r->traffic->sent);
    h5log_append(lg, id->c_recv, s, r->traffic->recv);
    if (r->traffic_matrices) h5log_append(lg, id->c_nodemat, s, r->traffic->node_matrix);
    if (r->traffic_matrices && r->traffic->has_rank_matrix) {
        double *mat = rl->mat;
        for (size_t q = 0; q < (size_t)COMM_N_PHASES * P * P; q++) mat[q] = (double)r->traffic->matrix[q];
        h5log_append(lg, id->c_matrix, s, mat);
        for (size_t q = 0; q < (size_t)COMM_N_PHASES * P * P; q++) mat[q] = (double)r->traffic->msg_matrix[q];
        h5log_append(lg, id->c_msgmat, s, mat);
    }
    if (r->owners) {
        owner_rows(m, rl->orow);
        h5log_append(lg, id->owner, s, rl->orow);
        h5log_append(lg, id->migr, s, &r->migration_bytes);
        if (id->replicas) replica_rows(m, rl);
        if (id->replicas) h5log_append(lg, id->replicas, s, rl->rrow);
        if (id->replicas) h5log_append(lg, id->replica_rank, s, rl->rrow + (size_t)nm * cfg->parallel.replicas);
    }
    if (r->placement && nm > 0) h5log_append(lg, id->placement, s, r->placement);
    if (id->replica_bad && r->replica_mismatch) h5log_append(lg, id->replica_bad, s, r->replica_mismatch);
    if (nm > 0) {
        /* tokens each rank's experts received (after capacity) and the rank-level MaxVio */
        double *rt = rl->orow, *rmv = rl->orow + (size_t)nm * P;
        int i = 0;
        for (int l = 0; l < m->L; l++) {
            if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
            const MoeStats *ms = &m->acts[l].moe.stats;
            /* global counts by EP position; with several EP groups a rank gets its position's
             * share (tokens / groups: the groups' split of the tokens is not gathered) */
            double *pos_load = xcalloc(sizeof(double) * (size_t)m->ep_size);
            for (int e = 0; e < E; e++) pos_load[m->ep[l].expert_owner[e]] += ms->counts[e] / m->n_ep_groups;
            for (int q = 0; q < P; q++) rt[(size_t)i * P + q] = pos_load[m->ep_pos_of_rank[q]];
            xfree(pos_load);
            LoadStats lr_ = metrics_load(rt + (size_t)i * P, P);
            rmv[i] = lr_.maxvio;
            i++;
        }
        h5log_append(lg, id->rank_tokens, s, rt);
        h5log_append(lg, id->rank_maxvio, s, rmv);
    }
    h5log_append(lg, id->rank_compute_s, s, r->rank_compute_s);
    h5log_append(lg, id->rank_peak_rss, s, r->rank_rss);
    double mean_cv2 = 0;
    if (nm > 0) {
        double *row = rl->row;
        double *cv2 = row, *var = row + nm, *mv = row + 2 * nm, *mm = row + 3 * nm;
        double *ent = row + 4 * nm, *dead = row + 5 * nm, *drop = row + 6 * nm;
        double *tpe = row + 7 * nm;
        int i = 0;
        for (int l = 0; l < m->L; l++) {
            if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
            const MoeStats *ms = &m->acts[l].moe.stats;
            LoadStats ls = metrics_load(ms->counts_selected, E);   /* every kind: selections before capacity */
            cv2[i] = ls.cv2; var[i] = ls.var; mv[i] = ls.maxvio; mm[i] = ls.max_over_mean;
            ent[i] = ls.entropy; dead[i] = ls.dead_frac; drop[i] = ms->dropped_frac;
            memcpy(tpe + (size_t)i * E, ms->counts_routed, sizeof(double) * E);
            i++;
        }
        h5log_append(lg, id->cv2, s, cv2);
        h5log_append(lg, id->var, s, var);
        h5log_append(lg, id->maxvio, s, mv);
        h5log_append(lg, id->maxmean, s, mm);
        h5log_append(lg, id->entropy, s, ent);
        h5log_append(lg, id->dead, s, dead);
        h5log_append(lg, id->drop, s, drop);
        double *nodes = row + 7 * nm + (size_t)nm * E;      /* [nm, 2] after tpe */
        i = 0;
        for (int l = 0; l < m->L; l++) {
            if (m->ffn[l].kind == MOE_KIND_DENSE) continue;
            nodes[2 * i] = m->acts[l].moe.stats.nodes_mean;
            nodes[2 * i + 1] = m->acts[l].moe.stats.nodes_over;
            i++;
        }
        h5log_append(lg, id->nodes, s, nodes);
        if (r->intra_frac) h5log_append(lg, id->intra_frac, s, r->intra_frac);
        if (cfg->log.expert_interval > 0 && s % cfg->log.expert_interval == 0) h5log_append(lg, id->tpe, s, tpe);
        for (int q = 0; q < nm; q++) mean_cv2 += cv2[q] / nm;
    }
    if (n_clus > 0) {
        int G = rl->G, i = 0;
        double *gc = rl->crow, *gcv = rl->crow + (size_t)n_clus * G, *gmv = gcv + n_clus, *gdr = gmv + n_clus;
        for (int l = 0; l < m->L; l++) {
            if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
            const MoeStats *ms = &m->acts[l].moe.stats;
            memcpy(gc + (size_t)i * G, ms->group_counts, sizeof(double) * G);
            LoadStats ls = metrics_load(ms->group_counts, G);
            gcv[i] = ls.cv2; gmv[i] = ls.maxvio; gdr[i] = ms->group_dropped_frac;
            i++;
        }
        h5log_append(lg, id->tpg, s, gc);
        h5log_append(lg, id->gcv2, s, gcv);
        h5log_append(lg, id->gmaxvio, s, gmv);
        h5log_append(lg, id->gdrop, s, gdr);
    }
    if (id->qerr > 0 && r->qerr) h5log_append(lg, id->qerr, s, r->qerr);
    if (r->mem_all) mem_log(lg, id, s, r->mem_all, P);
    keep(rl, h5log_step_done(lg, s));
    return mean_cv2;
}

void runlog_mem(RunLog *rl, long step, const double *all) {
    if (rl->open) mem_log(&rl->lg, &rl->id, step, all, rl->P);
}

void runlog_event(RunLog *rl, const Model *m, long step, const ReclusterEvent *evs, int n_ev, double pb, double pa) {
    if (!rl->open) return;
    double *er = rl->crow;
    int E = rl->E;
    for (int i = 0; i < n_ev; i++) {
        const ReclusterEvent *e = &evs[i];
        double v[RECLUSTER_N_COLS + 2 + RECLUSTER_N_EXTRA] = {
            e->layer, e->cost_before, e->cost_after, e->accepted, e->n_moved, e->n_groups_refit, e->jaccard,
            e->recon_err_mean, e->recon_err_max, e->seconds, pb, pa,
            e->w_cos_within, e->w_cos_cross, e->mu_cos_within, e->mu_cos_cross, e->bytes, e->rolled_back,
            e->jaccard_ref};
        memcpy(er + (size_t)i * (RECLUSTER_N_COLS + 2 + RECLUSTER_N_EXTRA), v, sizeof v);
    }
    h5log_append(&rl->lg, rl->id.events, step, er);
    int i = 0;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
        for (int e = 0; e < E; e++) er[(size_t)i * E + e] = m->cstate[l].group_of[e];
        i++;
    }
    h5log_append(&rl->lg, rl->id.group_of, step, er);
}

void runlog_followup(RunLog *rl, long step, const double *row) {
    if (rl->open) h5log_append(&rl->lg, rl->id.followup, step, row);
}

void runlog_compress(RunLog *rl, const Model *m, long step, const CompressEvent *evs, int n_ev) {
    if (!rl->open || rl->id.compress <= 0) return;
    double *er = rl->crow;
    for (int i = 0; i < n_ev; i++) {
        const CompressEvent *e = &evs[i];
        double v[COMPRESS_N_COLS] = {e->layer, e->partition, e->werr_mean, e->werr_max, e->oerr_mean, e->oerr_max,
                                     e->cosel, e->cosel_random, e->seconds, e->bytes, e->probe_before, e->probe_after,
                                     e->params_total, e->params_expert};
        memcpy(er + (size_t)i * COMPRESS_N_COLS, v, sizeof v);
    }
    h5log_append(&rl->lg, rl->id.compress, step, er);
    /* the partition the compression chose (cluster/group_of at its step) */
    int i = 0, E = rl->E;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
        for (int e = 0; e < E; e++) er[(size_t)i * E + e] = m->cstate[l].group_of[e];
        i++;
    }
    if (i > 0) h5log_append(&rl->lg, rl->id.group_of, step, er);
}

void runlog_project(RunLog *rl, long step, const double *err_mean, const double *err_max, int n, double seconds) {
    if (!rl->open || rl->id.project <= 0 || n <= 0) return;
    double *er = rl->crow;
    for (int i = 0; i < n; i++) { er[3 * i] = err_mean[i]; er[3 * i + 1] = err_max[i]; er[3 * i + 2] = seconds; }
    h5log_append(&rl->lg, rl->id.project, step, er);
}

void runlog_set_model(RunLog *rl, const Model *m) {
    if (rl->open) rl->n_clus = model_n_clustered_layers(m);
}

void runlog_eval(RunLog *rl, long step, const EvalOut *ev, bool once) {
    if (!rl->open) return;
    if (once && h5log_last_step(&rl->lg, rl->id.eval_ppl) == step) return;
    h5log_append(&rl->lg, rl->id.eval_loss, step, &ev->loss);
    h5log_append(&rl->lg, rl->id.eval_ppl, step, &ev->ppl);
    h5log_append(&rl->lg, rl->id.eval_metric, step, &ev->metric);
}

void runlog_final(RunLog *rl, long step, double valid_ppl, double test_ppl, double test_loss) {
    if (!rl->open) return;
    /* the run's headline numbers, one row at the last step (attributes cannot be added once
     * SWMR writing has started); a resumed final step writes only the missing ones */
    const int ids[3] = {rl->id.final_valid_ppl, rl->id.final_test_ppl, rl->id.final_test_loss};
    const double v[3] = {valid_ppl, test_ppl, test_loss};
    for (int k = 0; k < 3; k++)
        if (h5log_last_step(&rl->lg, ids[k]) != step) h5log_append(&rl->lg, ids[k], step, &v[k]);
}

Status runlog_take_error(RunLog *rl) {
    Status st = rl->err;
    rl->err = status_ok();
    return st;
}

Status runlog_flush(RunLog *rl) {
    if (!rl->open) return status_ok();
    Status st = h5log_flush(&rl->lg);
    keep(rl, st);
    return st;
}

void runlog_close(RunLog *rl) {
    if (rl->open) {
        Status fs = h5log_flush(&rl->lg);
        keep(rl, fs);
        h5log_close(&rl->lg);
        /* after a failed write (a full disk), no row may keep an invalid step */
        if (!STATUS_OK(rl->err)) {
            Status rs = h5log_repair(rl->path, -1);
            if (!STATUS_OK(rs)) fprintf(stderr, "dcmoe: warning: %s\n", rs.msg);
        }
    }
    xfree(rl->row); xfree(rl->crow); xfree(rl->orow); xfree(rl->mat); xfree(rl->rank_row); xfree(rl->rrow);
    rl->row = rl->crow = rl->orow = rl->mat = rl->rank_row = rl->rrow = NULL;
    rl->open = false;
}
