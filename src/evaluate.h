/* evaluate: loss, perplexity and the task metric of a model on a data split, and the
 * `dcmoe eval` command (a run's checkpoint in FP32 or in its stored FP16/INT4 formats, with
 * optional offloading, reported on stdout and in <checkpoint>/eval_<split>_<precision>.json).
 * Collective: every rank calls. Does not: train or write the training log (runlog). */
#ifndef DCMOE_EVALUATE_H
#define DCMOE_EVALUATE_H

#include "config.h"
#include "data.h"
#include "model.h"
#include "precision.h"

typedef struct EvalOut { double loss, ppl, metric; long n; } EvalOut;

/* global batches of B_global windows (rank r runs its slice; padding windows have no targets),
 * at most max_batches (0 = the whole split); the traffic profiler and the placement statistics
 * are paused (evaluation traffic is not training traffic); pr may be NULL */
EvalOut evaluate(Model *m, const Dataset *ds, int split, int max_batches, int B_global, Precision *pr);

/* evaluate the newest (or given) checkpoint of a run on a split ("valid" or "test");
 * precision: "fp32", "stored" (clustered experts from the checkpoint's experts.q), or NULL =
 * stored when cfg->precision.mode is storage or qat; offloading per cfg->offload */
Status eval_run(const Config *cfg, const char *ckpt_dir, const char *split, const char *precision, Comm *comm);

#endif
