/* topology: which node every rank is on, real or virtual. Real: ranks sharing a host (the
 * hostname gathered over the communicator, Slurm's SLURM_NODEID when set; MPI size must
 * equal SLURM_NTASKS when that is set). Virtual (topology.nodes > 0 in YAML): rank r is on
 * node r / ranks_per_node, so one machine can emulate several nodes and count inter-node
 * bytes honestly. Also carries the link parameters of the cost model.
 * Does not: move data or decide placement (placement.h). */
#ifndef DCMOE_TOPOLOGY_H
#define DCMOE_TOPOLOGY_H

#include "comm.h"
#include "config.h"

typedef struct Topology {
    int n_ranks, n_nodes;
    int *node_of;            /* [n_ranks] node of each rank */
    int *local_index;        /* [n_ranks] index of the rank inside its node (0..) */
    int *node_size;          /* [n_nodes] ranks on each node */
    int is_virtual;          /* 1 = from topology.nodes / ranks_per_node */
    char source[32];         /* "virtual", "slurm", "hostname", "single" */
    double intra_gbps, inter_gbps, latency_us;
} Topology;

/* collective over c: real topology, or the virtual one when cfg->nodes > 0 (then
 * nodes * ranks_per_node must equal c->size: a clear error names both keys otherwise) */
Status topology_init(Topology *t, Comm *c, const TopologyConfig *cfg);
/* virtual topology without a communicator (tests, planning, the simulator) */
Status topology_virtual(Topology *t, int n_ranks, const TopologyConfig *cfg);
void topology_free(Topology *t);
/* the topology of a subset of ranks: member i is rank ranks[i] of t (nodes renumbered by
 * first appearance; links copied) */
void topology_subset(Topology *out, const Topology *t, const int *ranks, int n);
/* expert-parallel groups of ep_size ranks that follow the topology: the ranks ordered by
 * (node, index inside the node) and cut into consecutive blocks, so with ep_size = ranks per
 * node a group is one node. group_of [n_ranks] / pos_of [n_ranks] get each rank's group and
 * position inside it (t = NULL: blocks of consecutive ranks). Returns 0, or -1 when
 * ep_size does not divide the rank count. Groups are numbered by their lowest rank, so
 * rank 0 is position 0 of group 0. */
int topology_ep_groups(const Topology *t, int n_ranks, int ep_size, int *group_of, int *pos_of);
/* 1 when every EP group has the same node layout (position i of every group shares a node
 * with position j exactly when it does in group 0); placement is computed once for all
 * groups, so it needs this */
int topology_ep_congruent(const Topology *t, int n_ranks, int ep_size, const int *group_of, const int *pos_of);
static inline int topology_same_node(const Topology *t, int a, int b) {
    return t->node_of[a] == t->node_of[b];
}
/* one line for logs: "virtual 2 nodes x 2 ranks" / "hostname 1 node x 4 ranks" */
void topology_describe(const Topology *t, char *buf, size_t cap);

#endif
