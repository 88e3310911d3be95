/* exchange: the pure planner of expert parallelism's dispatch/combine. From the routing
 * decisions (per token and top-k slot: expert, kept, gate), an expert -> destination map and
 * the topology it computes who sends which rows to whom: per destination the rows (a token is
 * sent ONCE per distinct destination of its kept pairs) and entries (one per kept pair: row,
 * slot at the destination, gate), the send permutation (row -> token, destination-major), the
 * combine map (token -> its rows) and each pair's entry index. Flat (source -> owner) or
 * two-level (source -> node peer -> owner; see ep.h).
 * Does not: communicate, touch a backend or the profiler. Memory: an ExchangeStage either
 * views arrays its caller owns (ep.c's EpX) or owns them (exchange_stage_init/free); an
 * ExchangePlan owns its stages and matrices.
 *
 * Who executes a plan (the seam for other executors):
 *   - MPI: ep.c. epx_plan_to builds this rank's ExchangeStage with exchange_stage_build, then
 *     its executor exchanges the counts (alltoall), entries and rows (alltoallv through Comm)
 *     and moves exactly the rows the stage lists.
 *   - NCCL: the same ExchangeStage drives ncclSend/ncclRecv pairs per destination (a Comm
 *     whose CommOps.alltoallv_bytes is NCCL-backed, or an ExchangeExecutor below).
 *   - simulator / cost model: exchange_plan_build over every rank's route gives the whole
 *     (source, destination) picture without running anything; exchange_plan_bytes returns the
 *     byte matrix an executor would move, to be costed against a topology.
 *
 * Legend: P N k E D = ranks, tokens on a source rank, top-k slots, experts, row width. */
#ifndef DCMOE_EXCHANGE_H
#define DCMOE_EXCHANGE_H

#include <stddef.h>
#include <stdint.h>
#include "topology.h"

typedef struct ExchangeEntry { int32_t row, slot; float gate; } ExchangeEntry;

/* one source rank's side of one stage */
typedef struct ExchangeStage {
    int P, n_max, kmax;          /* destinations; capacity in tokens and slots per token */
    int N, n_rows, n_ent;        /* tokens planned, rows and entries sent */
    size_t *rows;                /* [P] rows to each destination */
    size_t *ents;                /* [P] entries to each destination */
    int32_t *row_token;          /* [n_rows] token of each send row, destination-major (send permutation) */
    int32_t *tok_row;            /* [N, kmax] send rows of each token (-1 pad; combine map) */
    ExchangeEntry *ent;          /* [n_ent] entries, row relative to the destination block */
    int32_t *ts_entry;           /* [N, kmax] entry index of each (token, slot), -1 = not sent */
    int owns;                    /* 1: the arrays belong to the stage (exchange_stage_init) */
} ExchangeStage;

void exchange_stage_init(ExchangeStage *s, int P, int n_max, int kmax);
void exchange_stage_free(ExchangeStage *s);
/* the plan of N tokens: sel [N, k] expert ids, kept [N, k] (>= 0 kept), gate [N, k]; the
 * pair goes to dest[sel] and lands in slot[sel] there. Destination-major: for each
 * destination, the tokens (ascending) with a kept pair there; a token's entries in slot order. */
void exchange_stage_build(ExchangeStage *s, int N, int k, const int32_t *sel, const int32_t *kept,
                          const float *gate, const int32_t *dest, const int32_t *slot);
/* the distinct nodes each token's rows go to, summed over tokens (exact up to 64 nodes;
 * beyond, nodes >= 63 share a bit) */
double exchange_stage_nodes_touched(const ExchangeStage *s, const Topology *topo);

/* two-level: the stage-A destination (node peer) of every expert for source rank `me`: the
 * rank on the owner's node with me's index inside its node (modulo that node's size) */
void exchange_peer_map(const Topology *topo, int me, const int32_t *owner, int E, int32_t *peer);

/* One source rank's routing, as the planner reads it (a Route's expert/pos/gate arrays) */
typedef struct ExchangeRoute {
    int N, k;
    const int32_t *sel;          /* [N, k] */
    const int32_t *kept;         /* [N, k] >= 0 kept */
    const float *gate;           /* [N, k] */
} ExchangeRoute;

typedef struct ExchangePlan {
    int P, E, k, two_level;
    ExchangeStage *a;            /* [P] stage A of each source rank (flat: the only stage) */
    ExchangeStage *b;            /* [P] stage B of each node peer (two-level; NULL when flat) */
    size_t *rows;                /* [P, P] rows src -> dst over all stages (dispatch direction) */
    size_t *ents;                /* [P, P] entries src -> dst over all stages */
    size_t n_messages;           /* non-empty (src, dst) row messages with src != dst, all stages */
} ExchangePlan;

/* the whole picture for P source ranks' routes: owner [E] / lslot [E] where each expert
 * lives and its local slot there; topo (n_ranks = P) is needed for two_level. Returns 0, or
 * -1 when two_level is asked for without a topology. */
int exchange_plan_build(ExchangePlan *pl, const ExchangeRoute *routes, int P, const int32_t *owner,
                        const int32_t *lslot, int E, const Topology *topo, int two_level);
void exchange_plan_free(ExchangePlan *pl);

/* bytes the forward DISPATCH of a plan moves from src to dst (src != dst; 0 on the diagonal),
 * as ep.c's MPI executor sends them: per stage, the counts message (2 int64 to every other
 * rank), the entries and the rows (D floats each). out [P, P]. The forward COMBINE moves the
 * rows back: exchange_plan_combine_bytes gives out[dst * P + src] = rows[src, dst] * D * 4
 * summed over stages. The traffic profiler can book these matrices instead of the wrappers'
 * per-call counts. */
void exchange_plan_dispatch_bytes(const ExchangePlan *pl, int D, double *out);
void exchange_plan_combine_bytes(const ExchangePlan *pl, int D, double *out);

/* An executor moves what a stage says. ep.c fills one for MPI (through Comm's profiled
 * alltoall/alltoallv); an NCCL executor fills the same slots with grouped ncclSend/ncclRecv,
 * and the simulator's executor charges exchange_plan_*_bytes to its cost model instead of
 * moving data. Counts and displacements are in BYTES, [P] each. */
typedef struct ExchangeExecutor {
    const char *name;
    /* every rank sends n bytes to every rank */
    void (*alltoall)(void *ctx, const void *send, void *recv, size_t n, int phase);
    void (*alltoallv)(void *ctx, const void *send, const size_t *sc, const size_t *sd, void *recv,
                      const size_t *rc, const size_t *rd, int phase);
    void *ctx;
} ExchangeExecutor;

#endif
