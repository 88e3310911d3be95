/* model: the pre-LN decoder-only transformer (token + position embeddings, causal multi-head
 * attention, LayerNorm, FFN = dense or MoE per layer, tied LM head; or a sequence
 * classification head), forward and backward by hand, with every parameter in one
 * allocation per category (dense, expert) and tensors as views (llm.c style).
 * clustering.mode masters: a clustered layer also holds per-expert FP32 masters (m1, m2), the
 * trained tensors; its bases and factors are marked derived (their projection, recluster.h).
 * Does not: run the optimizer loop or talk to the data (train.c does); owns its parameter,
 * gradient, optimizer-state and activation memory.
 *
 * Legend: B T D H V F L E C N = batch (this rank), seq, d_model, heads, vocab, FFN width,
 * layers, experts, classes, tokens (B*T). Matrices are [in, out] row-major: y = x W. */
#ifndef DCMOE_MODEL_H
#define DCMOE_MODEL_H

#include <stdint.h>
#include "backend.h"
#include "comm.h"
#include "config.h"
#include "moe.h"
#include "clustered.h"
#include "ep.h"
#include "topology.h"

enum ParamKind { PARAM_EMBED = 0, PARAM_ATTN = 1, PARAM_NORM = 2, PARAM_DENSE_FFN = 3,
                 PARAM_ROUTER = 4, PARAM_EXPERT = 5, PARAM_HEAD = 6, PARAM_BASE = 7,
                 PARAM_FACTOR = 8, PARAM_N_KINDS = 9 };
enum ParamCat { PCAT_DENSE = 0, PCAT_EXPERT = 1, PCAT_N = 2 };
extern const char *const param_kind_names[PARAM_N_KINDS];


typedef struct ParamTensor {
    char name[64];           /* e.g. "h.3.ffn.w1" */
    int kind;                /* enum ParamKind */
    int cat;                 /* enum ParamCat */
    int n_dims;
    int dims[3];
    size_t n;                /* elements */
    size_t offset;           /* elements into the category allocation */
    int decay;               /* weight decay applies (matrices) */
    float init_std;          /* normal init std; 0 with init_one for LayerNorm weights */
    int init_one;
    int layer;               /* transformer block, -1 outside blocks */
    int ep_unit;             /* expert parallel: 0 = replicated, 1 = rows are experts, 2 = rows are groups */
    int full0;               /* leading dimension over all ranks (dims[0] is this rank's slots) */
    size_t n_full;           /* elements over all ranks */
    size_t full_offset;      /* elements into the canonical (all-experts) expert category */
    int derived;             /* 1: recomputed from other tensors, not trained (clustering.mode masters: the
                                clustered layer's bases and factors, projected from the masters m1, m2); the
                                optimizer skips it and its gradient stays zero */
} ParamTensor;

typedef struct LayerParams {
    float *ln1_w, *ln1_b;    /* [D] */
    float *qkv;              /* [D, 3D] */
    float *proj;             /* [D, D] */
    float *ln2_w, *ln2_b;    /* [D] */
    MoeParams ffn;
} LayerParams;

typedef struct ModelParams {
    float *wte;              /* [V, D] (tied LM head) */
    float *wpe;              /* [T, D] */
    LayerParams *layers;     /* [L] */
    float *lnf_w, *lnf_b;    /* [D] */
    float *cls_w;            /* [D, C] classification head (task classify) */
} ModelParams;

typedef struct LayerActs {
    float *ln1, *ln1_mean, *ln1_rstd;   /* [N,D] [N] [N] */
    float *qkv;                         /* [N,3D] */
    float *att;                         /* [B,H,T,T] */
    float *atty;                        /* [N,D] */
    float *res_mid;                     /* [N,D] */
    float *ln2, *ln2_mean, *ln2_rstd;   /* [N,D] [N] [N] */
    MoeState moe;
} LayerActs;

typedef struct Model {
    Config cfg;
    const Backend *be;
    Comm *comm;                         /* the world: dense gradients, routing statistics, logs */
    /* expert parallelism over EP groups of parallel.ep_size ranks (ep.h): the dispatch /
     * combine exchange, placement, migration and gathers of expert tensors run over ep_comm
     * (= comm when ep_size is the world); rep_comm joins the ranks that hold the same units
     * in every EP group (their expert gradients are summed there; NULL when there is one EP
     * group). Owned by the model. */
    Comm *ep_comm, *rep_comm;
    Topology *ep_topo;                  /* this EP group's ranks (EP-local indices) and their nodes
                                           (NULL without a topology; the world's when ep_size = world) */
    int ep_size, ep_group, n_ep_groups; /* ranks per EP group, this rank's group, groups */
    int ep_owned;                       /* 1: ep_comm, rep_comm, ep_topo were split here (freed by model_free) */
    int *ep_group_of_rank, *ep_pos_of_rank;  /* [world] EP group and position of every rank */
    int V, T, D, H, L, C, task;
    int B_max;                          /* activation capacity (sequences on this rank) */
    MoeLayer *ffn;                      /* [L] layer kinds (dense or MoE per moe.every) */
    ClusterState *cstate;               /* [L] clustering state (clustered layers only) */
    EpMap *ep;                          /* [L] where each MoE layer's experts live (MoE layers only) */
    size_t n_expert_full;               /* elements of the canonical expert category (all experts) */
    int8_t **ep_resident;               /* [L][units on this rank]: 0 = offloaded (optimizer skips it); NULL = all resident */
    int collect_mu;                     /* accumulate activation centroids in forward (training) */
    /* [L] or NULL: the FFN weights forward and backward read instead of p.layers[l].ffn
     * (precision.c: QAT shadow copies, stored-format experts); gradients still go to g.
     * Not owned by the model. */
    const MoeParams *ffn_view;
    int n_tensors;
    ParamTensor *tensors;    /* [cap_tensors], grown as the tensor table is planned */
    int cap_tensors;
    size_t n_cat[PCAT_N];               /* elements per category */
    float *params[PCAT_N], *grads[PCAT_N], *adam_m[PCAT_N], *adam_v[PCAT_N];
    ModelParams p, g;                   /* views into params / grads */
    /* activations */
    int32_t *tokens;                    /* [N] device copy of the inputs */
    int32_t *targets;                   /* [N] */
    int32_t *lengths;                   /* [B] */
    float **res;                        /* [L+1] each [N,D]: residual stream into layer l */
    LayerActs *acts;                    /* [L] */
    float *lnf, *lnf_mean, *lnf_rstd;   /* [N,D] [N] [N] */
    float *logits;                      /* [N,V] (LM) or [B,C] (classify); dlogits in place */
    float *losses;                      /* [N] */
    float *pooled;                      /* [B,D] */
    float *d_a, *d_b, *d_c, *dqkv, *datt, *dpooled;  /* backward scratch */
    /* last forward */
    int B, n_targets_local;
    double loss_sum;                    /* local sum of token (or example) losses */
    double aux_loss, z_loss;            /* summed over layers, global */
    size_t act_bytes;
    /* parallel.overlap_allreduce: the dense gradients' bucketed non-blocking sum, started by
     * model_backward as layers finish and completed by optim_reduce_grads (gradsync.h);
     * owned; NULL = one blocking allreduce after the backward */
    struct GradSync *gsync;
} Model;

Status model_init(Model *m, const Config *cfg, int vocab_size, int n_classes, int B_max,
                  const Backend *be, Comm *comm);
void model_free(Model *m);
/* deterministic init from cfg->run.seed (identical on every rank) */
void model_init_params(Model *m);
size_t model_n_params(const Model *m);
/* parameters by kind (total) and active per token (top-k experts only) */
void model_param_counts(const Model *m, double by_kind[PARAM_N_KINDS], double *total, double *active);
/* 1 when the clustered layers train per-expert masters through their projection
 * (clustering.mode masters; the tensors h.L.ffn.m1 [E, D, F1], h.L.ffn.m2 [E, F, D] follow b2,
 * laid out by expert slot like the factors; p/g.layers[l].ffn.w1/w2 view them) */
int model_masters(const Model *m);
/* FLOPs of one training step (forward+backward = 3x forward) per token, matmuls only; masters
 * layers: forward and input gradient through the projection, weight gradient per expert (the
 * standard MoE's); the projection's SVDs are not counted */
double model_flops_per_token(const Model *m);
/* how many layers are MoE (standard or clustered), and how many clustered */
int model_n_moe_layers(const Model *m);
int model_n_clustered_layers(const Model *m);

/* expert parallelism. The expert category of every rank holds only its slots; the
 * canonical layout is the expert category of a one-rank model (every expert, global order).
 * gather: local arrays -> canonical on every rank (allgather); scatter: canonical -> this
 * rank's slots under the current maps. n arrays at once (params, Adam m, Adam v). */
void model_ep_gather(Model *m, float *const *local, float **full, int n);
void model_ep_scatter(Model *m, float *const *full, float **local, int n);
/* move the units of MoE layer l to a new placement: units that change owner travel rank to
 * rank (params + Adam state, phase migration); returns the bytes this rank sent */
size_t model_ep_relayout(Model *m, int l, const Placement *np);
/* leading-dim rows of one placement unit in an expert-parallel tensor: a group's base has
 * one row, each of its K members one row of a factor (standard MoE: K = 1) */
static inline int param_unit_rows(const ParamTensor *t, int K) { return t->ep_unit == 2 ? 1 : K; }
/* floats of one unit of MoE layer l in ONE of the arrays (params, Adam m or v) */
size_t model_ep_unit_floats(const Model *m, int l);
/* one unit (local unit slot `slot` of layer l) of the three arrays arr[3] (laid out like the
 * expert category) packed into buf (out = 1) or unpacked from it (out = 0): arrays outer,
 * the layer's expert tensors in table order inner; 3 * model_ep_unit_floats floats */
void model_ep_unit_copy(const Model *m, int l, float *const arr[3], int slot, float *buf, int out);
/* global row (expert or group) held in leading-dim slot s of tensor t on rank r */
int model_ep_row(const Model *m, const ParamTensor *t, int r, int s);

/* replicated hot units (parallel.replicas, ep.h): the expert tensors hold n_rep replica unit
 * slots after the per_rank primaries; gather skips them, scatter and init fill them from
 * their unit. */
int model_ep_has_replicas(const Model *m);
/* re-choose the copies of MoE layer l (ep_replicas_choose) and fill every replica slot whose
 * unit changed (force: every filled slot) with params + Adam moments from the unit's owner
 * (phase migration), zero the slots that became empty, refresh the maps; *changed |= 1 when
 * the map changed. Collective over the EP group; returns the bytes this rank sent. */
size_t model_ep_replicas_update(Model *m, int l, int force, int *changed);
/* after the gradient reduction: every copy's expert gradient goes to the unit's owner, which
 * sums its own, then the copies' in ascending (rank, slot) order, and sends the sum back, so
 * owner and copies hold the same bits (phase allreduce, over the EP group) */
void model_ep_replicas_reduce(Model *m);
/* sum of squares of the primary unit slots of an array laid out like the expert category
 * (every unit once: the gradient norm) */
double model_ep_primary_sumsq(const Model *m, const float *arr);
/* replica slots whose params or Adam moments differ from their primary (CRC-32 per slot);
 * per_layer [MoE layers] or NULL. Collective over the world; returns the largest count over
 * the EP groups. */
int model_ep_replicas_mismatch(Model *m, double *per_layer);

/* LM: inputs/targets [B,T] (target < 0 = ignored). CLS: inputs [B,T], lengths [B],
 * labels [B] passed as targets. n_global = targets in the global batch (loss normaliser).
 * Returns the global-mean loss contribution of this rank's tokens plus aux losses. */
double model_forward(Model *m, const int32_t *inputs, const int32_t *targets, const int32_t *lengths,
                     int B, long n_global);
/* classification: argmax predictions of the last forward [B] */
void model_predictions(const Model *m, int32_t *pred);
void model_zero_grad(Model *m);
/* with m->gsync, also starts the dense gradients' sum bucket by bucket (optim_reduce_grads
 * completes it) */
void model_backward(Model *m, long n_global);

#endif
