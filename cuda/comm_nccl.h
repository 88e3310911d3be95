/* comm_nccl: NCCL as a Comm's device collectives (parallel.collectives = nccl): the gradient
 * allreduce and the expert exchange's row all-to-allv run on device pointers, with no host
 * staging. MPI stays for everything else (counts, routing metadata, statistics, checkpoints),
 * and the traffic profiler books NCCL's bytes exactly as MPI's (comm_dev_* in comm.c).
 * The non-blocking gradient sum (parallel.overlap_allreduce) overlaps the backward: its own
 * NCCL communicator and stream, ordered after the compute stream by an event.
 * Does not: choose the device (the CUDA backend did: one GPU per rank, local rank) or overlap
 * the exchange with compute (each blocking call ends with a stream synchronisation). */
#ifndef DCMOE_COMM_NCCL_H
#define DCMOE_COMM_NCCL_H

#include "comm.h"

/* collective over c: rank 0 creates the NCCL id, c broadcasts it, every rank joins; sets
 * c->dops / c->dctx (freed by comm_free). async: also the second communicator and the stream
 * of the non-blocking sum (without it, comm_dev_iallreduce_sum_f32 must not be called on c).
 * Error status without NCCL (a build without CUDA). */
Status comm_nccl_attach(Comm *c, int async);

#endif
