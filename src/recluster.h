/* recluster: the online re-clustering event of the clustered MoE layers (DESIGN.md §1.2-1.3):
 * activation centroids (EMA of the router-logit vectors, or hidden inputs, of each expert's
 * tokens), parameter features (reconstructed weights under a fixed count-sketch projection),
 * the fused balanced k-means with min-gain hysteresis (cluster.c), and the refit of every
 * group whose membership changed (compress.c), with optional Adam-state reset.
 * Expert-parallel (over the model's EP communicator): each rank reconstructs and sketches
 * only the experts it owns; only the features [E, Pw] are exchanged, and every rank runs the
 * same deterministic clustering on them (the centroids are replicated). A group stays on its
 * rank: its owner refits it, receiving the reconstructed weights (and, without the Adam
 * reset, the factor moments) of members that come from other ranks. Every byte is booked to
 * phase recluster; the event's statistics are global. Each group's refit uses its own random
 * stream (seed, layer, step, group), so results do not depend on the rank count.
 * recluster_jaccard_ref compares a layer's current partition with its reference partition
 * (ClusterState.group_ref: the compression event's, else the initial contiguous grouping).
 * clustering.mode masters: the features are the masters' (centred on the all-expert mean, not
 * a reconstruction that shares its group's base), a moved member carries its masters and all
 * its Adam moments unchanged, and a changed group's refit is its new projection (nothing is
 * lost: the masters are the trained weights); recluster_project recomputes the projection of
 * every group from the masters (train.c: step 0, every clustering.project_interval steps,
 * after the compression).
 * Does not: log or evaluate probe losses, or re-place the groups (train.c does). */
#ifndef DCMOE_RECLUSTER_H
#define DCMOE_RECLUSTER_H

#include "cluster.h"
#include "model.h"

#define RECLUSTER_N_COLS 10
#define RECLUSTER_N_EXTRA 7   /* logged after the two probe-loss columns (see runlog_event) */
/* one row per clustered layer and event */
typedef struct ReclusterEvent {
    int layer;
    double cost_before, cost_after;      /* clustering cost of the old / chosen partition */
    int accepted, n_moved, n_groups_refit;
    double jaccard;
    double recon_err_mean, recon_err_max;  /* relative reconstruction error of the refit experts */
    double seconds;
    /* self-confirmation, on the partition before the event: mean pairwise cosine of the
     * parameter features (weight sketches) and of the activation centroids between experts of
     * the same group and of different groups */
    double w_cos_within, w_cos_cross, mu_cos_within, mu_cos_cross;
    double bytes;                        /* the event's recluster-phase bytes, all ranks */
    int rolled_back;                     /* clustering.verify: the accepted change was undone (probe loss rose) */
    double jaccard_ref;                  /* the partition in force after the event (a rollback undone) against the
                                            reference partition (recluster_jaccard_ref; train.c fills it) */
} ReclusterEvent;

/* fold this step's collected centroid sums into the EMA (collective: sums over ranks) */
void recluster_mu_step(Model *m);
/* the event: returns the number of clustered layers (rows written to ev[0..n)) */
int recluster_run(Model *m, long step, ReclusterEvent *ev);
/* Jaccard similarity (cluster_jaccard after cluster_match_ids, as the event's own jaccard
 * column) of clustered layer l's current partition to its reference partition; NaN when the
 * reference is unknown or l is not clustered. Local, no communication. */
double recluster_jaccard_ref(const Model *m, int l);
/* clustering.mode masters: recompute every clustered layer's projection (bases, factors) from
 * its masters on this rank's unit slots (primaries and replicas; base = member mean, residual
 * = rank-r truncated SVD with the group's stream for `step`, so the result does not depend on
 * the rank count). Local, except that err_mean / err_max [clustered layers] (NULL: not wanted)
 * get the relative errors |W_i - proj(W_i)| / |W_i| over both matrices, mean and max over the
 * layer's experts, reduced over the EP group (then collective). Returns the layers projected
 * (0 outside masters mode). Does not touch the Adam moments. */
int recluster_project(Model *m, long step, double *err_mean, double *err_max);
/* first step at which events may happen */
long recluster_warmup(const Config *cfg);

#endif
