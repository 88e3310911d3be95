/* train: the training loop (data-parallel over the communicator's ranks), periodic
 * evaluation, HDF5 metrics, checkpoints and resume; and evaluation of a checkpoint.
 * Does not: parse the command line (main.c) or define the model maths. */
#ifndef DCMOE_TRAIN_H
#define DCMOE_TRAIN_H

#include <stdbool.h>
#include "comm.h"
#include "config.h"

typedef struct TrainOptions {
    bool resume;             /* continue from the newest complete checkpoint of the run */
    bool quiet;              /* no per-step lines */
    long stop_at;            /* > 0: checkpoint and stop after this many steps (a planned interruption) */
    const char *config_path; /* for messages */
    const char *resume_from; /* non-NULL: resume from this checkpoint folder (implies resume) */
} TrainOptions;

typedef struct TrainResult {
    long steps_done;
    double final_train_loss;
    double valid_loss, valid_ppl, test_loss, test_ppl, unigram_ppl;  /* LM */
    double valid_metric;     /* classification */
    bool interrupted;        /* stopped by a signal after checkpointing */
    bool already_done;       /* --resume of a run whose folder holds DONE: nothing was changed */
} TrainResult;

Status train_run(const Config *cfg, const TrainOptions *opt, Comm *comm, TrainResult *res);
/* run folder of a config: out_dir/name */
void train_run_dir(const Config *cfg, char *dst, size_t cap);
/* SIGTERM / SIGUSR1 request a checkpoint at the end of the current step; main installs the
 * handlers first thing so a signal during start-up is not lost (train_run installs them too) */
void train_install_signal_handlers(void);
/* measured sgemm peak of this process, GFLOP/s (best of several 1024^3 products) */
double train_measure_sgemm_peak(const void *backend);

#endif
