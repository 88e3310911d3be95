/* comm_nccl: NCCL as a Comm's device collectives (parallel.collectives = nccl): the gradient
 * allreduce and the expert exchange's row all-to-allv run on device pointers, with no host
 * staging. MPI stays for everything else (counts, routing metadata, statistics, checkpoints),
 * and the traffic profiler books NCCL's bytes exactly as MPI's (comm_dev_* in comm.c).
 * Does not: choose the device (the CUDA backend did: one GPU per rank, local rank) or overlap
 * anything with compute (each call ends with a stream synchronisation). */
#ifndef DCMOE_COMM_NCCL_H
#define DCMOE_COMM_NCCL_H

#include "comm.h"

/* collective over c: rank 0 creates the NCCL id, c broadcasts it, every rank joins; sets
 * c->dops / c->dctx (freed by comm_free). Error status without NCCL (a build without CUDA). */
Status comm_nccl_attach(Comm *c);

#endif
