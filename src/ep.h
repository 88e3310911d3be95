/* ep: expert parallelism. Every MoE layer's experts are owned by ranks in placement units
 * (an expert group of the clustered model, one expert of the standard MoE; a group's base
 * and all its members live on one rank). EpMap says where every expert lives; EpX is the
 * per-layer dispatch/combine exchange:
 *   source side: each token is sent ONCE per distinct destination rank of its kept experts
 *   (the clustered model's groups, the standard MoE's experts), with the list of
 *   (local expert slot, gate) entries it carries there;
 *   destination side: rows and entries arrive in (source rank, row) order, the layer computes
 *   one output row per received row (gates applied, members summed) and sends it back;
 *   backward mirrors both exchanges (dout rows out; dx rows and per-entry dgate back).
 * Who sends what to whom is planned by exchange.h's pure planner (exchange_stage_build);
 * this file is the MPI executor of such a plan: counts go first (one MPI_Alltoall), then
 * the entries and rows (MPI_Alltoallv), exactly as the plan lists them. Every byte passes the
 * communicator's profiled wrappers (phases dispatch / combine), through an ExchangeExecutor.
 * Replicated hot units (parallel.replicas, EpMap.rep_unit): n_rep extra unit slots per rank,
 * after the per_rank primary slots, hold copies of the most loaded units on nodes other than
 * their owner's; routing sends a token's entries to the copy on its own node when there is
 * one (EpMap.route_dest / route_slot), the owner otherwise. The model keeps the copies
 * bitwise equal to their primary (model.h: model_ep_replicas_*).
 * Placement proposals (ep_propose_ex) turn the co-selection statistics into a new placement with
 * comm/placement.c's partitioner: replica-aware (the planned copies weigh loads and affinities),
 * spreading preferred units over the nodes under the home bias; under node-aware routing the
 * statistics' pairs come from the units tokens prefer (ep_stats_add_pairs, router_preferred).
 * Does not: decide routing (moe.c, clustered.c) or partition graphs (comm/placement.c). */
#ifndef DCMOE_EP_H
#define DCMOE_EP_H

#include <stdint.h>
#include "backend.h"
#include "comm.h"
#include "exchange.h"
#include "placement.h"
#include "topology.h"

typedef struct EpMap {
    int P, rank;
    int E, K;                    /* experts; experts per placement unit (1 = standard MoE) */
    int U, per_rank;             /* units (E / K) and units per rank */
    Placement place;             /* unit -> (owner rank, local slot) */
    int32_t *expert_owner;       /* [E] */
    int32_t *expert_lslot;       /* [E] local expert slot on its owner: slot(unit) * K + index in unit */
    int32_t *lslot_expert;       /* [n_slots * K] global expert held in each local slot of this rank (-1: empty replica slot) */
    int32_t *lunit;              /* [n_slots] global unit held in each local unit slot of this rank (-1: empty) */
    /* co-selection statistics for topology-aware placement */
    double *affinity;            /* [U, U] EMA of pair counts (global) */
    double *load;                /* [U] EMA of token-unit selections (global) */
    double *aff_step;            /* [U, U + 1] this step's local pair counts (+ per-unit load) */
    int have_stats;
    int collect;                 /* 1 while training: epx_plan adds to aff_step */
    int pref_pairs;              /* 1: the pairs come from ep_stats_add_pairs (node-aware routing), epx_plan adds loads only */
    int version;                 /* bumped by every ep_map_refresh (caches of the maps compare it) */
    /* nodes (ep_map_set_topology): routing's view of where the experts are */
    const Topology *topo;        /* the EP group's topology (NULL = one node) */
    int n_nodes, home_node;      /* nodes of the EP group; this rank's node */
    int32_t *expert_node;        /* [E] node of each expert's owner (refreshed with the maps) */
    /* replicated hot units (ep_map_set_replicas): local unit slots per_rank .. n_slots - 1 */
    int R;                       /* copies per layer this map may place (parallel.replicas, capped) */
    int n_rep, n_slots;          /* replica unit slots per rank (ceil(R / P)); per_rank + n_rep */
    int32_t *rep_unit;           /* [P * n_rep] unit copied in replica slot s of rank r (-1 = empty) */
    int32_t *route_dest;         /* [E] where this rank sends expert e: the copy on its node, else the owner */
    int32_t *route_slot;         /* [E] the local expert slot there */
} EpMap;

void ep_map_init(EpMap *em, int P, int rank, int E, int K);
void ep_map_free(EpMap *em);
/* recompute the expert maps from em->place and the unit membership members [U * K]
 * (NULL = unit u holds expert u; clustered: member j of group g is members[g * K + j]) */
void ep_map_refresh(EpMap *em, const int32_t *members);
/* the EP group's topology (indices = EP ranks; NULL = one node): fills expert_node, n_nodes,
 * home_node now and at every refresh */
void ep_map_set_topology(EpMap *em, const Topology *topo);

/* parallel.replicas = R copies per layer (after ep_map_set_topology; 0 = off): n_rep =
 * ceil(R' / P) replica slots per rank with R' = min(R, U * (n_nodes - 1)) (a unit has at most
 * one copy per node besides its owner's); no replicas with one node. Starts empty. */
void ep_map_set_replicas(EpMap *em, int R);
/* the replica map for the current placement and load statistics (pure, identical on every
 * rank): copies go, one at a time, to the unit with the highest load per copy (load / copies;
 * ties: lower id; units without load get none), each on the least loaded rank (load / copies of
 * every unit it holds) with a free replica slot on a node that holds neither the unit nor a
 * copy of it, preferring a rank that held the same copy before; a copy kept on its rank keeps
 * its slot. Before statistics exist: none. out [P * n_rep]; returns the copies placed. */
int ep_replicas_choose(const EpMap *em, int32_t *out);
/* the copies as a list in (rank, slot) order: unit [R] and rank [R] (-1 past the end);
 * returns how many */
int ep_replicas_list(const EpMap *em, int32_t *unit, int32_t *rank);

/* co-selection pairs from the units each token prefers (router_preferred) [N, n] (-1 = none),
 * while collecting; with pref_pairs set epx_plan then counts only the loads */
void ep_stats_add_pairs(EpMap *em, int N, int n, const int32_t *units);

/* co-selection of one batch: the distinct units of each token's kept selections (sel [N, k]
 * global expert ids; kept [N, k] < 0 = dropped, NULL = all kept; sel < 0 = none) add one load
 * per (token, unit) and, unless pref_pairs, one pair count per ordered pair of them to aff_step
 * (epx_plan calls it while collecting; the simulator with its drawn routing) */
void ep_stats_add(EpMap *em, int N, int k, const int32_t *sel, const int32_t *kept);
/* end of a training step: sum aff_step over ranks, fold into the EMAs (rate ema; the first
 * step sets them), clear aff_step (collective) */
void ep_stats_step(EpMap *em, Comm *comm, double ema);
/* the fold alone (aff_step already global: one process, the simulator) */
void ep_stats_fold(EpMap *em, double ema);
/* a new placement for the policy (contiguous, eplb, topology) from the statistics; returns
 * 1 when it differs from the current one and improves the policy's objective (inter-node
 * cut of the co-selection affinity, plus the inter-rank cut as a tie-break, for topology;
 * rank-level load MaxVio for eplb) by more than min_gain (the caller then migrates with
 * model_ep_relayout). ep_propose = ep_propose_ex with default options. */
int ep_propose(const EpMap *em, int policy, const Topology *topo, int refine_passes, double max_imbalance,
               double min_gain, Placement *out);
typedef struct EpPlaceOpts {
    /* placement spreads co-selected units over the nodes (moe.home_bias: a token then finds
     * a unit it wants on its own node): the node level maximises the co-selection cut, the
     * rank level still minimises it; the objective's node term is the affinity kept inside
     * the nodes */
    int spread;
    int replica_blind;           /* ignore parallel.replicas (the pre-issue-12 placement; tests) */
} EpPlaceOpts;
typedef struct EpPlaceInfo {     /* one layer's placement decision (logged: parallel/placement) */
    double obj_before, obj_after;   /* objective of the current / proposed placement (0: not compared) */
    int accepted;                /* the proposal is taken */
    int moved;                   /* units whose owner the proposal changes */
    int copies;                  /* replicas planned (replica-aware placement) */
    double maxvio_before, maxvio_after;   /* rank load MaxVio counting the copies (replicas only) */
} EpPlaceInfo;
/* replica-aware (parallel.replicas > 0, statistics present, not replica_blind): the copy
 * counts ep_replicas_choose picks are planned first; a unit with c copies counts load / c on
 * its owner, and its co-selection affinity is scaled by the share of tokens that reach the
 * owner ((n - c + 1) / n of the n nodes hold no copy); with a load cap the placement is then
 * re-run with the copies chosen for it as background load on their ranks, and the round with
 * the lower rank MaxVio counting the copies is kept. Deterministic. info may be NULL. */
int ep_propose_ex(const EpMap *em, int policy, const Topology *topo, int refine_passes, double max_imbalance,
                  double min_gain, const EpPlaceOpts *opts, Placement *out, EpPlaceInfo *info);
/* rank load MaxVio of placement p with the copies ep_replicas_choose picks for it (each
 * holder of a unit with c copies carries load / c) */
double ep_placement_maxvio(const EpMap *em, const Placement *p);

typedef ExchangeEntry EpEntry;  /* (row, slot, gate): exchange.h */

typedef struct EpX {
    int P, D, kmax;
    int n_src_max;               /* source tokens capacity (grows: epx_reserve_src) */
    size_t rows_cap, ents_cap;   /* receive rows / entries capacity: the high-water mark of
                                    what arrived (epx_plan grows them from the counts) */
    /* source side (this rank's tokens) */
    int N, n_srows, n_sent;
    size_t *scnt, *sent_cnt;     /* [P] rows / entries to each destination */
    int32_t *srow_token;         /* [n_srows] token of each send row, destination-major */
    int32_t *tok_row;            /* [N, kmax] send rows of each token (-1 pad) */
    EpEntry *sent;               /* [n_sent] entries, row relative to the destination block */
    int32_t *ts_entry;           /* [N, kmax] sent-entry index of each (token, slot), -1 = not sent */
    /* destination side */
    int n_rrows, n_recv;
    size_t *rcnt, *recv_cnt;     /* [P] rows / entries from each source */
    EpEntry *recv;               /* [n_recv] entries, row = index into the received rows */
    /* scratch */
    size_t *b_sc, *b_sd, *b_rc, *b_rd;   /* [P] byte counts and displacements */
    float *sval, *rval;          /* per-entry scalars (dgate) */
    int32_t *srow_token_d, *tok_row_d;   /* device copies */
    float *sbuf;                 /* [n_srows, D] device */
    float *rbuf;                 /* [rows_cap, D] device */
    /* recv, rval: [ents_cap]; srow_token, tok_row, sent, ts_entry, sval: [n_src_max * kmax] */
    float *hs, *hr;              /* host staging for non-host backends (NULL on the CPU) */
} EpX;

/* n_src_max tokens per rank, kmax = top-k, D = row width. The receive side does not grow
 * with P: it starts at rows_cap rows and entries (epx_init: n_src_max * kmax, what a rank
 * receives when the load is balanced) and epx_plan grows it to what the counts exchange
 * announces when a step needs more (never shrinks, so a steady state allocates nothing;
 * buffer contents are not kept across a growth, every plan refills them). */
void epx_init(EpX *x, const Backend *be, int P, int D, int n_src_max, int kmax);
void epx_init_cap(EpX *x, const Backend *be, int P, int D, int n_src_max, int kmax, size_t rows_cap);
void epx_free(EpX *x, const Backend *be);
/* grow (never shrink) the source side to n_src tokens / the receive side to rows, ents */
void epx_reserve_src(EpX *x, const Backend *be, int n_src);
void epx_reserve_recv(EpX *x, const Backend *be, size_t rows, size_t ents);
/* build the exchange for N tokens: sel [N, k] global expert ids, kept [N, k] (>= 0 kept),
 * gate [N, k]; exchanges counts and entries (collective). Also feeds the traffic profiler's
 * dispatch statistics (rows, pairs, nodes touched, tokens). */
void epx_plan(EpX *x, EpMap *em, const Backend *be, Comm *comm, int N, int k, const int32_t *sel,
              const int32_t *kept, const float *gate);
/* the same with explicit per-expert destination ranks and entry slots; stats = 0 leaves
 * the co-selection statistics and the dispatch profile alone (a forwarding stage) */
void epx_plan_to(EpX *x, EpMap *em, const Backend *be, Comm *comm, int N, int k, const int32_t *sel,
                 const int32_t *kept, const float *gate, const int32_t *dest, const int32_t *slot, int stats);
/* rows out: src [N, D] token rows -> x->rbuf [n_rrows, D] (collective) */
void epx_send_rows(EpX *x, const Backend *be, Comm *comm, const float *src, int phase);
/* rows back: rsrc [n_rrows, D] -> x->sbuf [n_srows, D] (collective) */
void epx_return_rows(EpX *x, const Backend *be, Comm *comm, const float *rsrc, int phase);
/* y[t] += sum of the token's returned rows (x->sbuf), in destination order */
void epx_combine(EpX *x, const Backend *be, float *y);
/* per-entry scalars back: rvals [n_recv] (receive order) -> x->sval [n_sent] (collective) */
void epx_return_scalars(EpX *x, Comm *comm, const float *rvals, int phase);

/* What the MoE layers use: the flat exchange (parallel.exchange: flat) or the two-level one
 * (two_level): stage A sends each token once per destination NODE, to its node peer (the
 * rank there with the same index inside its node); stage B forwards inside the node to the
 * owners; on the way back the peer sums a token's partial outputs before the inter-node hop,
 * so inter-node bytes are paid once per (token, node) instead of once per (token, rank). */
typedef struct EpPath {
    int two_level, E, k;
    EpX a, b;                    /* a: source -> owner (flat) or node peer; b: peer -> owner */
    const Topology *topo;
    int32_t *peer_of_expert;     /* [E] stage-A destination of each expert (this rank's peers) */
    int peer_version;            /* EpMap version peer_of_expert was computed for (-1 = never) */
    int32_t *gid;                /* [E] identity: stage-A entries carry global expert ids */
    int32_t *selB, *keptB;       /* [rows_A, k] stage-B routing of the peer's rows */
    float *gateB;
    int32_t *a_to_b;             /* [entries received in A] stage-B sent-entry index */
    float *yA;                   /* [rows_A, D] partial sums at the peer */
    size_t rows_a_cap, ents_a_cap;   /* capacity of selB/keptB/gateB/yA and a_to_b (grow in epp_plan) */
    /* the last plan's dispatch rows this rank sends to OTHER ranks of its node / of other
     * nodes, both stages (per-layer locality: comm/intra_fraction) */
    double rows_intra, rows_inter;
} EpPath;

void epp_init(EpPath *pp, const Backend *be, const EpMap *em, const Topology *topo, int two_level, int D,
              int n_max, int k);
void epp_free(EpPath *pp, const Backend *be);
/* backend bytes of the row send/receive buffers now (memory accounting: the high-water
 * mark, since they only grow) */
size_t epp_buffer_bytes(const EpPath *pp);
void epp_plan(EpPath *pp, EpMap *em, const Backend *be, Comm *comm, int N, int k, const int32_t *sel,
              const int32_t *kept, const float *gate);
/* the exchange whose received rows (rbuf) and entries the experts compute on */
const EpX *epp_final(const EpPath *pp);
void epp_send_rows(EpPath *pp, const Backend *be, Comm *comm, const float *src);
/* rows computed for the final received rows go back; y[t] += the token's sum */
void epp_return_combine(EpPath *pp, const Backend *be, Comm *comm, const float *rsrc, float *y);
/* per-entry scalars (final receive order) back to the sources: pp->a.sval[pp->a.ts_entry[ts]] */
void epp_return_scalars(EpPath *pp, Comm *comm, const float *rvals);

#endif
