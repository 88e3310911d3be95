/* residency: offloading of idle expert groups while TRAINING (offload.enabled in dcmoe train).
 * A placement unit of a MoE layer on this rank (a clustered group, or a standard-MoE expert)
 * unused for offload.idle_steps steps, or beyond offload.max_resident_groups resident units
 * (least recently used first), leaves the resident tier: its FP32 parameters and both Adam
 * moments are copied to the host tier (a heap buffer) or the file tier (one file per unit,
 * temp + rename, CRC-checked on read) and their pages are returned to the OS (madvise), so
 * the measured resident set shrinks. When a batch routes tokens to it (known after the
 * dispatch, before any expert runs) it is fetched back and the AdamW steps it missed are
 * replayed with zero gradients (the update an idle unit gets anyway: momentum and weight
 * decay), with each skipped step's learning rate and step number, so training with
 * offloading gives bitwise the losses of training without it. The optimizer skips offloaded
 * units; gradients stay allocated (they are zero for an idle unit).
 * Does not: prefetch, work with a non-host backend, or offload non-expert parameters. */
#ifndef DCMOE_RESIDENCY_H
#define DCMOE_RESIDENCY_H

#include "model.h"

typedef struct ResidencyStats {
    double hits, misses, evictions, bytes_in, bytes_out, stall_s, resident_units, units;
} ResidencyStats;

typedef struct Residency {
    Model *m;
    int enabled, idle_steps, cap, tier;
    char dir[2048];
    long step;                   /* the step being trained (catch-up target) */
    int8_t **resident;           /* [L][per_rank] */
    long **last_used;            /* [L][per_rank] */
    long **off_since;            /* [L][per_rank] first step whose update the unit missed */
    float ***host;               /* [L][per_rank] host-tier copies (NULL when resident or file tier) */
    size_t *unit_floats;         /* [L] floats of one unit per array (params, m, v each) */
    float *zero;                 /* zero gradient for the catch-up */
    ResidencyStats now, total;
    Status err;                  /* first fetch error (the layer hook cannot return one) */
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
