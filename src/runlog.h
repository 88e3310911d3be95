/* runlog: the training run's HDF5 record (metrics.h5): the schema (every series and root
 * attribute declared in one place), the per-step rows, re-clustering and compression events
 * and their follow-up probe losses, evaluations and the final row. Rank 0 owns the file; on
 * other ranks a RunLog stays closed and every call is a no-op, so the training loop calls it
 * unconditionally.
 * Does not: decide when to log (train.c) or define the metrics (metrics.c). */
#ifndef DCMOE_RUNLOG_H
#define DCMOE_RUNLOG_H

#include "data.h"
#include "evaluate.h"
#include "compress_event.h"
#include "h5log.h"
#include "model.h"
#include "recluster.h"
#include "topology.h"
#include "traffic.h"

typedef struct LogIds {
    int loss, ce, aux, z, lr, gnorm, tokens;
    int step_s, tok_s, flops_frac, time_split, comm_bytes;
    int eval_loss, eval_ppl, eval_metric;
    int cv2, var, maxvio, maxmean, entropy, dead, drop, tpe;
    int rank_compute_s, rank_peak_rss;
    int tpg, gcv2, gmaxvio, gdrop, events, group_of, followup;
    int final_valid_ppl, final_test_ppl, final_test_loss;
    int c_intra, c_inter, c_time, c_wait, wait_split, c_msgs, c_dispatch, c_matrix, rank_maxvio, rank_tokens, owner, migr, off_train, c_msgmat;
    int c_nodemat, c_sent, c_recv;
    int qerr;                /* 0 = not logged (fp32 mode or no clustered layer) */
    int mem_bytes, mem_hwm, mem_rss;
    int nodes, intra_frac, placement;
    int trace, trace_owner;  /* 0 = not logged (log.trace_interval 0) */
    int replicas, replica_rank, replica_bad;   /* 0 = not logged (parallel.replicas = 0) */
    int ar_overlap;          /* 0 = not logged (parallel.overlap_allreduce off) */
    int compress;            /* 0 = not logged (clustering.compress_at = 0) */
    int project;             /* 0 = not logged (clustering.mode compressed) */
} LogIds;

typedef struct RunLog {
    H5log lg;
    LogIds id;
    bool open;               /* rank 0 after runlog_open succeeded */
    char path[4096];
    int P, E, G, n_moe, n_clus;
    double *row, *crow, *orow, *mat, *rank_row, *rrow;   /* row scratch */
    Status err;              /* the first failed write (a full disk): the run must stop */
} RunLog;

/* what one training step logs (rank 0's view of the agreed values) */
typedef struct StepRecord {
    long step;                           /* 1-based: steps completed */
    double loss, ce, aux, z, lr, gnorm;
    int64_t tokens;
    double step_s, tok_s, flops_frac;    /* step_s: the slowest rank */
    double split[4];                     /* forward, backward, allreduce, optimizer (s) */
    double wait_split[4];                /* log.sync_wait: the waits inside each split column (s) */
    double allreduce_bytes;
    double allreduce_inflight_s;         /* parallel.overlap_allreduce: the dense sum from its first bucket's */
    double allreduce_exposed_s;          /* start to its completion, and the wait after the backward (in split[2]) */
    const double *offload7;              /* NULL: offloading off */
    const TrafficStep *ts;
    const Traffic *traffic;
    bool traffic_matrices;               /* write the (src, dst) matrices this step */
    bool owners;                         /* write parallel/owner (start, after a placement change) */
    double migration_bytes;
    const double *rank_compute_s, *rank_rss;   /* [P] */
    const double *qerr;                  /* NULL: not this step */
    const double *mem_all;               /* [P, MEM_N_KINDS + 2]; NULL: not this step */
    const double *intra_frac;            /* [MoE layers] dispatch rows between ranks kept inside the node */
    const double *replica_mismatch;      /* [MoE layers] copies that differ from their primary; NULL: not this step */
    const double *placement;             /* [MoE layers, 8] a placement event's decisions (parallel/placement); NULL: none */
} StepRecord;

/* rank 0: create the log (resume_step < 0) or reopen it for appending, dropping rows after
 * resume_step; declare the series; on a new log write the root attributes. Collective-free. */
Status runlog_open(RunLog *rl, const char *path, const Model *m, const Comm *comm, const Dataset *ds,
                   const Topology *topo, long resume_step, double peak_gflops, const char *peak_how, double unigram_ppl);
/* every per-step series; returns the mean load CV² over the MoE layers (for the progress line) */
double runlog_step(RunLog *rl, const Model *m, const StepRecord *r);
void runlog_mem(RunLog *rl, long step, const double *all);
void runlog_event(RunLog *rl, const Model *m, long step, const ReclusterEvent *evs, int n_ev, double probe_before,
                  double probe_after);
/* cluster/event_followup: one row of FOLLOWUP_N_COLS (event_step, kind 0 re-clustering / 1
 * compression, probe_loss_before, probe_loss_after, probe_loss_25, probe_loss_50) at `step`,
 * the step its last measurement was taken */
#define FOLLOWUP_N_COLS 6
void runlog_followup(RunLog *rl, long step, const double *row);
/* the compression event (cluster/compress): one row of COMPRESS_N_COLS per MoE layer, and
 * the chosen partition (cluster/group_of) of the clustered model m */
void runlog_compress(RunLog *rl, const Model *m, long step, const CompressEvent *evs, int n_ev);
/* clustering.mode masters: cluster/project at `step`, one row (error mean, max, seconds) per
 * clustered layer of the projection just computed (recluster_project's err_mean / err_max, n
 * layers; seconds: the whole projection, every layer, on rank 0) */
void runlog_project(RunLog *rl, long step, const double *err_mean, const double *err_max, int n, double seconds);
/* after the model was replaced (the compression): the per-step rows follow its layer kinds */
void runlog_set_model(RunLog *rl, const Model *m);
/* the eval series at step; with once, nothing if a row at that step exists already (a resumed final step) */
void runlog_eval(RunLog *rl, long step, const EvalOut *ev, bool once);
/* the final series at the last step, each row only if it is not there yet */
void runlog_final(RunLog *rl, long step, double valid_ppl, double test_ppl, double test_loss);
/* routing trace of one step: all [P, MoE layers, N * k] (every rank's tokens, gathered; expert
 * per top-k slot, -1 = dropped) -> trace/routing [MoE layers, P, N * k], plus trace/owner */
void runlog_trace(RunLog *rl, const Model *m, long step, const int32_t *all);
/* the first write error since the last call (a full disk), ok otherwise */
Status runlog_take_error(RunLog *rl);
Status runlog_flush(RunLog *rl);
/* close; after a failed write, reopen and drop every row with an invalid step */
void runlog_close(RunLog *rl);

#endif
