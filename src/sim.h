/* sim: `dcmoe simulate`, the step-time, traffic and memory model of a training run at a scale
 * this machine cannot run (8 to thousands of GPUs). From an experiment's YAML (model, moe,
 * parallel) plus its sim: section it draws routing (synthetic generators, scored by the
 * trainer's own router: router_select with node limits, home bias and the clustered two
 * stages), places units as the trainer does (comm/placement.c), counts every exchange's rows,
 * entries and messages per (source, destination) with the planner's rules (exchange.h: one
 * row per token and destination rank, or per destination node then owner for two-level), and
 * costs them with a bulk-synchronous alpha-beta max-load model per link class (NVLink inside
 * a node, the NIC between nodes, NIC sharing and spine taper), a ring allreduce for the
 * gradients, and GEMM time from the hardware preset; or, with sim.hardware_file (a file of
 * `dcmoe bench calibrate`, calib.h), every GEMM and backend op the trainer runs per rank costed
 * from the measured curves, and the exchanges and allreduce from the measured all-to-all(v) and
 * allreduce curves. Routing comes from the synthetic generators or a trained run's recorded
 * trace (sim.routing: trace, replayed byte for byte, migrations included) or a trained run's
 * per-expert loads (sim.routing: aggregate). Over sim.steps the timeline holds the trainer's
 * events: placement re-runs (parallel.place_interval, the trainer's ep_propose_ex on the
 * co-selection statistics of the drawn routing) with their migrations, and for the clustered
 * model re-clustering events (clustering.interval; sim.recluster_moved of the experts move;
 * host work at sim.host_gflops, exchanges by recluster.c's byte rules) followed by a placement
 * re-run; sim.redraw_interval reuses a drawn step between draws so 1000-step trajectories at
 * thousands of GPUs take seconds. It writes metrics.h5 in the trainer's schema (perf,
 * comm/summary, comm/dispatch, comm/node_bytes, comm/rank_sent and rank_recv,
 * moe/tokens_per_expert, moe/balance/cv2, mem/bytes, parallel/placement,
 * parallel/migration_bytes, cluster/events) plus the sim series and DONE.
 * `dcmoe simulate --validate published` replays DeepEP's published V1 kernel numbers with
 * DeepEP's own byte accounting, fits the model's link bandwidths on the calibration rows and
 * prints predicted vs published for the others (exit 1 when a row is out of tolerance).
 * Does not: model packet-level congestion, pipeline parallelism, replicated units
 * (parallel.replicas), the compression event (clustering.compress_at), verified re-clustering's
 * probe evaluations, or which experts a real re-clustering would move (the moves are drawn); a
 * hardware file's collectives hold only for the rank count it was measured on.
 *
 * Legend: P S R = GPUs, EP group size, replicas of a unit (P / S); N k E D = tokens per rank,
 * experts per token, experts, d_model. */
#ifndef DCMOE_SIM_H
#define DCMOE_SIM_H

#include <stdint.h>
#include "config.h"
#include "topology.h"
#include "util.h"

/* per-rank and per-node counts of one exchange stage (dispatch direction), scaled to
 * tokens_per_rank; the row and entry counts follow exchange.h's rules */
typedef struct SimTraffic {
    int P, n_nodes;
    double *rows_intra_s, *rows_inter_s, *rows_intra_r, *rows_inter_r;   /* [P] rows to / from OTHER ranks, same node or not */
    double *ents_intra_s, *ents_inter_s, *ents_intra_r, *ents_inter_r;   /* [P] entries */
    double *msgs_intra, *msgs_inter;     /* [P] non-empty messages sent */
    double *recv_entries;    /* [P] entries received (incl. from self): expert work of the rank */
    double *recv_rows;       /* [P] rows received (incl. from self) */
    double *node_rows;       /* [nodes, nodes] rows between different ranks, by node */
    double *node_ents;       /* [nodes, nodes] their entries */
    double rows_total, pairs_total, nodes_touched, tokens;   /* all ranks (comm/dispatch columns) */
} SimTraffic;

/* count one flat exchange from routes: sel [S, n, k] global expert ids (all kept), owner [E]
 * rank of each expert, topo over S ranks; scale = tokens_per_rank / n. Two-level adds the
 * node-peer stage (rows per destination node to the peer, then peer -> owners). */
void sim_traffic_count(SimTraffic *tr, const int32_t *sel, int S, int n, int k, const int32_t *owner,
                       const Topology *topo, int two_level, double scale);
void sim_traffic_free(SimTraffic *tr);

/* the GEMM shapes one rank of cfg's model runs per training step at P ranks (uniform
 * routing's expert rows): `dcmoe bench calibrate` measures them; returns the count (<= cap) */
typedef struct SimGemmShape { int ta, tb, M, N, K; } SimGemmShape;
int sim_gemm_shapes(const Config *cfg, int P, SimGemmShape *out, int cap);
/* the parameters one rank of cfg's model holds at P ranks (the replicated part and its share
 * of the expert units): what its optimizer steps over */
double sim_local_params(const Config *cfg, int P);

/* `dcmoe simulate`: the run described by cfg (its sim: section), written to
 * run.out_dir/run.name; prints a summary line per step */
Status sim_run(const Config *cfg, int quiet);
/* `dcmoe simulate --validate published`: prints the table; returns the number of rows out of
 * tolerance (0 = every row within its tolerance) */
int sim_validate_published(FILE *out);

#endif
