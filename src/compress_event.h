/* compress_event: warm-up as a standard MoE, then one compression into the clustered layout
 * (clustering.compress_at = S, moe.kind clustered; issue 14 item 2). Steps before S train a
 * standard MoE (the same experts, top_k, d_ff_expert, router and expert_init); after step S
 * the run builds the clustered model and this module fills it from the standard one:
 *  - co-activation statistics of the warm-up: per MoE layer an E x E EMA (rate
 *    clustering.ema_beta, per token of the global batch) of how often experts i and j are
 *    both in one token's flat top-k (before capacity), and of each expert's selections;
 *    kept in the standard layers' ClusterState and checkpointed;
 *  - the partition (clustering.compress_partition): learned = balanced k-means (cluster.c)
 *    on weight features ([w1_i, w2_i] centred on the all-expert mean, count-sketched to
 *    clustering.proj_dim) fused by clustering.alpha with co-activation features (rows of the
 *    affinity C_ij / sqrt(n_i n_j), diagonal = the row's largest off-diagonal entry); random
 *    = a seeded balanced shuffle; contiguous = experts gK..gK+K-1 in group g; the chosen
 *    partition is also kept as the layer's reference partition (ClusterState.group_ref,
 *    checkpointed), which later re-clustering events are compared with (jaccard_compress);
 *  - the refit (compress.c): base = member mean, residual = rank-r truncated SVD;
 *  - the non-expert tensors (embeddings, attention, norms, router) move with their Adam
 *    moments by name, the aux-free bias is kept, the expert tensors' Adam state starts at 0.
 * Every rank of every EP group gathers its group's experts (canonical layout) and computes
 * the same partition and refit (per-group random streams), so the result does not depend
 * on the rank count; then it keeps its own slots.
 * Does not: build or free models, evaluate probe losses, log, or swap the caches that hold
 * the model (train.c does). */
#ifndef DCMOE_COMPRESS_EVENT_H
#define DCMOE_COMPRESS_EVENT_H

#include "model.h"

#define COMPRESS_N_COLS 14
/* one row per MoE layer (the /cluster/compress columns, in this order) */
typedef struct CompressEvent {
    int layer;
    int partition;                         /* enum CompressPartition */
    double werr_mean, werr_max;            /* ||W_i - What_i|| / ||W_i|| over [w1 | w2], mean / max over experts */
    double oerr_mean, oerr_max;            /* ||E_i(X) - Ehat_i(X)|| / ||E_i(X)|| on a sample X of the layer's inputs */
    double cosel;                          /* share of the co-activation mass whose two experts share a group */
    double cosel_random;                   /* its expectation under a random balanced partition: (K-1)/(E-1) */
    double seconds;                        /* the layer's partition and refit */
    double bytes;                          /* bytes this rank received gathering the experts (whole event) */
    double probe_before, probe_after;      /* loss on the fixed probe batches (train.c) */
    double params_total, params_expert;    /* parameters of the clustered model: all, and bases + factors */
} CompressEvent;

/* the config of the model for a run that has completed `steps_done` steps: cfg itself, or
 * (compress_at > 0 and steps_done < compress_at) a copy with moe.kind standard */
void compress_phase_config(const Config *cfg, long steps_done, Config *out);
/* 1 while m is the warm-up model of a compression run (standard layers with statistics) */
int compress_pending(const Model *m);
/* fold the last forward's top-k selections into the co-activation EMA (collective over the
 * world: one allreduce of E^2 + E + 1 doubles per MoE layer) */
void compress_coact_step(Model *m);
/* clustering.svd_space = output (called by compress_coact_step for layer l): fold the last
 * forward's rows each expert received (inputs [D], hidden activations [F]) into the EMA of its
 * second moments; the sums are exact (rows quantised to 2^-10, clamped at +-64), so for the same
 * rows the statistics are bitwise the same at any rank count (one allreduce of E (D^2 + F^2 + 1)
 * doubles). Experts that received no rows keep their EMA. */
void compress_cov_step(Model *m, int l, double beta);

/* the pure parts (also used by the tests). W1 [E, n1], W2 [E, n2]: each expert's flattened
 * up and down matrices; coact [E, E] and cnt [E] the statistics (NULL: none). */
/* weight features w [E, Pw] (Pw = proj_dim, or n1 + n2 when proj_dim is 0), centred on the
 * all-expert mean; unnormalised (cluster_fuse_features normalises rows) */
void compress_weight_features(const float *W1, const float *W2, int E, size_t n1, size_t n2, int proj_dim, float *w);
/* co-activation features f [E, E] */
void compress_coact_features(const double *coact, const double *cnt, int E, float *f);
/* the partition group_of [E] (balanced: E/G experts per group) */
void compress_partition(const float *W1, const float *W2, int E, size_t n1, size_t n2, const double *coact,
                        const double *cnt, int G, const ClusterConfig *cc, uint64_t seed, int layer, int32_t *group_of);
/* share of sum_{i<j} coact_ij with group_of[i] == group_of[j] (0 when there is no mass) */
double compress_coselect_fraction(const double *coact, int E, const int32_t *group_of);
/* refit of one layer under group_of: bases [G, D, F1] and [G, F, D], factors (by expert)
 * a1 [E, D, r], b1 [E, F1, r], a2 [E, F, r], b2 [E, D, r]; werr [E] the relative error over
 * both matrices. W1 [E, D, F1], W2 [E, F, D]. Randomised SVDs draw from (seed, layer, group).
 * cov1 [E, D, D] / cov2 [E, F, F]: each expert's input / hidden second moment, the up / down
 * residuals are then fitted in output space (compress_refit_group_weighted); NULL = weight space. */
void compress_refit_layer(const float *W1, const float *W2, int E, int D, int F1, int F, int r, int G,
                          const int32_t *group_of, const ClusterConfig *cc, uint64_t seed, int layer, uint64_t purpose,
                          const double *cov1, const double *cov2,
                          float *base1, float *base2, float *a1, float *b1, float *a2, float *b2, double *werr);

/* the event: nw is a freshly initialised clustered model (model_init + model_init_params
 * with the run's config), old the warm-up model. x[l] [nx, D] (rank 0: a sample of MoE
 * layer l's inputs, NULL elsewhere) for the output-space errors. Collective over the world.
 * Writes one row per MoE layer to ev (probe losses left 0); returns the rows. */
int compress_event_run(Model *old, Model *nw, long step, float *const *x, int nx, CompressEvent *ev);

#endif
