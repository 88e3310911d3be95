/* residency: offloading of idle expert units while TRAINING (offload.enabled in dcmoe train),
 * as a client of the residency manager (offload.h), one manager per MoE layer on this rank.
 * A unit is a placement unit of the layer (a clustered group, or a standard-MoE expert): its
 * FP32 parameters and both Adam moments, which stay in place in the model's expert arrays while
 * resident. The manager decides when a unit leaves — unused for offload.idle_steps steps, or
 * beyond offload.max_resident_groups resident units after a step (LRU) — and keeps it in its
 * host or file tier (offload.h's unit file format); this module then gives the unit's pages back
 * to the OS (madvise), so the measured resident set shrinks. When a batch routes tokens to it
 * (known after the dispatch, before any expert runs) it is fetched back and the AdamW steps it
 * missed are replayed with zero gradients (the update an idle unit gets anyway: momentum and
 * weight decay), with each skipped step's learning rate and step number, so training with
 * offloading gives bitwise the losses of training without it. The optimizer skips offloaded
 * units (m->ep_resident); gradients stay allocated (they are zero for an idle unit).
 * Does not: prefetch, work with a non-host backend, or offload non-expert parameters. */
#ifndef DCMOE_RESIDENCY_H
#define DCMOE_RESIDENCY_H

#include "model.h"

typedef struct ResidencyStats {
    double hits, misses, evictions, bytes_in, bytes_out, stall_s, resident_units, units;
} ResidencyStats;

typedef struct ResidencyLayer ResidencyLayer;   /* private: a layer's manager and unit layout */

typedef struct Residency {
    Model *m;
    int enabled;
    long step;                   /* the step being trained (catch-up target; the trainer sets it on resume) */
    ResidencyLayer *layers;      /* [L] */
    int8_t **resident;           /* [L][per_rank] 1 = resident: the model's view (m->ep_resident) */
    float *zero;                 /* zero gradient for the catch-up */
    ResidencyStats taken;        /* counters up to the last residency_take_step */
} Residency;

/* set up for model m (after model_init): every unit starts resident */
Status residency_init(Residency *r, Model *m, const OffloadConfig *oc, const char *run_dir);
void residency_free(Residency *r);
/* the forward of layer l will compute local units units[0..n): fetch them (with catch-up) */
Status residency_need(Residency *r, int l, const int32_t *units, int n);
/* after the optimizer step `step`: evict idle units and units beyond the cap */
Status residency_end_step(Residency *r, long step);
/* bring every unit back (before checkpoints, re-clustering, migration, the end) */
Status residency_fetch_all(Residency *r);
/* this step's counters (then reset) */
ResidencyStats residency_take_step(Residency *r);

#endif
