/* traffic: the communication profiler. Every byte the communicator's personalised
 * exchanges send is counted per (phase, destination rank) on the sending rank, with the
 * number of messages, the rows (tokens) per destination for dispatch, and the time per
 * phase. At the end of a step every rank sums its own row into intra- and inter-node bytes
 * (an allreduce of a few scalars), per-rank marginals (bytes sent and received per phase:
 * O(P) per rank) and, on the steps that log them, a node x node matrix (O(nodes²)) and, only
 * up to rank_matrix_max ranks, the full [phase, src, dst] rank matrices (O(P²), gathered).
 * There is no padding counter: dcmoe's exchanges send exact per-destination counts
 * (alltoallv, never buffers padded to a capacity), and dropped token-expert pairs are not
 * sent at all, so the exchange phases carry payload only (rows, entries, counts).
 * Does not: send anything itself besides that gather, or write HDF5 (train.c does). */
#ifndef DCMOE_TRAFFIC_H
#define DCMOE_TRAFFIC_H

#include <stdbool.h>
#include <stdint.h>
#include "comm.h"
#include "topology.h"

typedef struct TrafficStep {             /* one step, global (valid on every rank) */
    double intra[COMM_N_PHASES];         /* bytes between different ranks of one node */
    double inter[COMM_N_PHASES];         /* bytes between nodes */
    double seconds[COMM_N_PHASES];       /* max over ranks of the time spent in the phase */
    double wait[COMM_N_PHASES];          /* mean over ranks of the timed wait before the phase's
                                            collectives (Comm.sync_wait; 0 without it) */
    double msgs[COMM_N_PHASES];
    double rows_dispatched;              /* payload rows sent by dispatch (incl. to self) */
    double pairs_routed;                 /* token-expert pairs those rows carry (dedup factor = pairs/rows) */
    double nodes_touched;                /* sum over tokens of distinct nodes its rows went to */
    double tokens;                       /* tokens routed (denominator of per-token figures) */
} TrafficStep;

typedef struct Traffic {
    int P, rank, n_nodes;
    int rank_matrix_max;     /* rank x rank matrices only when P <= this (0: never) */
    const Topology *topo;
    uint64_t *bytes;         /* [phase, P] this rank -> dst, this step */
    uint64_t *msgs;          /* [phase, P] */
    double seconds[COMM_N_PHASES];
    double wait[COMM_N_PHASES];
    double rows, pairs, nodes_touched, tokens;   /* this rank, this step */
    /* filled by traffic_step_end (global, on every rank) */
    double *sent, *recv;     /* [phase, P] bytes each rank sent / received this step (self excluded) */
    double *node_matrix;     /* [phase, nodes(src), nodes(dst)] bytes, on steps with matrices */
    bool has_rank_matrix;    /* P <= rank_matrix_max */
    uint64_t *matrix;        /* [phase, P(src), P(dst)] of the last step with matrices; NULL if !has_rank_matrix */
    uint64_t *msg_matrix;    /* [phase, P(src), P(dst)] messages, the same */
    uint64_t *total;         /* [phase, P, P] since the start (sum of the gathered matrices); NULL likewise */
} Traffic;

/* rank_matrix_max: keep rank x rank matrices only up to this many ranks (parallel.rank_matrix_max) */
void traffic_init(Traffic *tr, int P, int rank, const Topology *topo, int rank_matrix_max);
void traffic_free(Traffic *tr);
void traffic_add(Traffic *tr, int phase, int dst, uint64_t bytes, uint64_t msgs);
void traffic_add_time(Traffic *tr, int phase, double seconds);
void traffic_add_wait(Traffic *tr, int phase, double seconds);
/* dispatch bookkeeping of one layer call on this rank */
void traffic_add_dispatch(Traffic *tr, double rows, double pairs, double nodes_touched, double tokens);
/* collective: sum the step's counters into *out and the marginals; with matrices (the same
 * value on every rank) also node_matrix and, when has_rank_matrix, matrix/msg_matrix/total;
 * reset the step counters */
void traffic_step_end(Traffic *tr, Comm *c, TrafficStep *out, bool matrices);

#endif
