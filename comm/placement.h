/* placement: which rank owns each placement unit (an expert group in the clustered model,
 * an expert in the standard MoE). Every rank owns the same number of units
 * (n_units / n_ranks), held in local slots 0..per_rank-1. Three policies:
 *  - contiguous: unit u on rank u / per_rank (Megatron's default);
 *  - eplb: DeepSeek-EPLB-style hierarchical packing: units sorted by load (heaviest first)
 *    go to the least-loaded node with room, then inside each node to the least-loaded rank;
 *  - topology: graph partitioning of the co-selection affinity A (A[u][v] = how often a
 *    token selects both u and v), units -> nodes minimising the inter-node cut weight, then
 *    inside each node units -> ranks for the inter-rank cut; each level by METIS k-way or
 *    by greedy growth + Kernighan-Lin swap passes (small levels: both, the better kept).
 * All functions are deterministic (same inputs -> same placement on every rank).
 * Does not: move weights (migration is the model's job) or measure affinity. */
#ifndef DCMOE_PLACEMENT_H
#define DCMOE_PLACEMENT_H

#include "topology.h"

typedef struct Placement {
    int n_units, n_ranks, per_rank;
    int *owner;              /* [n_units] owning rank */
    int *slot;               /* [n_units] local slot on the owner */
    int *unit_at;            /* [n_ranks * per_rank] unit in (rank, slot) */
} Placement;

/* n_units must be a multiple of n_ranks (error otherwise, naming both) */
Status placement_init(Placement *p, int n_units, int n_ranks);
void placement_free(Placement *p);
void placement_copy(Placement *dst, const Placement *src);
int placement_equal(const Placement *a, const Placement *b);
/* the three policies; load [n_units] (may be NULL = uniform), affinity [n_units^2] symmetric */
void placement_contiguous(Placement *p);
void placement_eplb(Placement *p, const double *load, const Topology *t);
void placement_topology(Placement *p, const double *affinity, const double *load, const Topology *t,
                        int refine_passes);
/* the same with a load cap: every rank's summed load stays at most (1 + max_imbalance) x the
 * mean (rank MaxVio <= max_imbalance) where the unit loads allow it: the greedy growth only
 * takes units that fit, over-cap parts are repaired by the swaps that cost the least cut
 * (last, between ranks of different nodes if a node has no room), and refinement makes no
 * swap that adds excess. A heuristic: no guarantee when the cap is barely feasible.
 * INFINITY (or load NULL) = placement_topology. */
void placement_topology_capped(Placement *p, const double *affinity, const double *load, const Topology *t,
                               int refine_passes, double max_imbalance);
/* which graph partitioner splits each level (units -> nodes, then a node's units -> its ranks):
 *  - KL: greedy growth + Kernighan-Lin swap passes (O(m^3) a pass on m units);
 *  - METIS: multilevel k-way (METIS_PartGraphKway, fixed seed; vertex weights = unit count and
 *    load, edge weights = affinity, scaled to integers; load tolerance = max_imbalance),
 *    then exact sizes by the moves that add the least cut, the load-cap repair, and
 *    size-preserving swap refinement (refine_passes passes);
 *  - AUTO (what placement_topology[_capped] use): up to PLACEMENT_KL_MAX units in a level both,
 *    keeping METIS's split only where it is strictly better; above that METIS alone. */
enum PlacementPartitioner { PLACEMENT_PART_AUTO = 0, PLACEMENT_PART_KL = 1, PLACEMENT_PART_METIS = 2 };
#define PLACEMENT_KL_MAX 128
void placement_topology_part(Placement *p, const double *affinity, const double *load, const Topology *t,
                             int refine_passes, double max_imbalance, int partitioner);
/* the same with a separate affinity per level and a background load per rank:
 * aff_node [U, U] drives units -> nodes, aff_rank [U, U] a node's units -> its ranks (and the
 * final over-cap repair); rank_bg [n_ranks] (NULL = none) is load a rank already carries
 * (e.g. replicas of other units): it counts in the mean the cap is taken from and lowers the
 * room left on that rank and its node. placement_topology_part(a, a, load, NULL) = this. */
void placement_topology_ex(Placement *p, const double *aff_node, const double *aff_rank, const double *load,
                           const double *rank_bg, const Topology *t, int refine_passes, double max_imbalance,
                           int partitioner);
/* sum of affinity over unit pairs split across nodes (level 0) or ranks (level 1) */
double placement_cut(const Placement *p, const double *affinity, const Topology *t, int level);
/* max over ranks of the summed load / mean - 1 (MaxVio at rank level) */
double placement_rank_maxvio(const Placement *p, const double *load);
/* rebuild slot/unit_at from owner (units keep ascending order inside a rank) */
void placement_fill_slots(Placement *p);

#endif
