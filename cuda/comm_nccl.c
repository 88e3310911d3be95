/* comm_nccl.c: the NCCL device collectives of a Comm (see comm_nccl.h). Every call runs on
 * the legacy default stream, the stream the CUDA backend's kernels and cuBLAS calls use, so it
 * is ordered after the kernels that produced its input, and it synchronises before returning
 * (the caller may read the result on the host next). Point-to-point all-to-allv is one NCCL
 * group of ncclSend/ncclRecv pairs, one per peer with bytes to move. */
#include "comm_nccl.h"

#include <cuda_runtime.h>
/* nccl.h declares a few functions without prototypes */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <nccl.h>
#pragma GCC diagnostic pop
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct NcclCtx {
    ncclComm_t comm;
    int rank, size;
} NcclCtx;

/* a failed NCCL or CUDA call inside a collective cannot be returned through the void slots:
 * report it and end every rank (as MPI's default error handler does) */
static void die(const char *what, const char *err) {
    fprintf(stderr, "dcmoe: error: NCCL %s failed: %s\n", what, err);
    fflush(stderr);
    abort();
}
#define NCCL_OK(call, what) do { ncclResult_t r_ = (call); if (r_ != ncclSuccess) die(what, ncclGetErrorString(r_)); } while (0)
#define CUDA_OK(call, what) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) die(what, cudaGetErrorString(e_)); } while (0)

static void nccl_allreduce_f32(void *ctx, float *dbuf, size_t n) {
    NcclCtx *x = ctx;
    if (n == 0) return;
    NCCL_OK(ncclAllReduce(dbuf, dbuf, n, ncclFloat32, ncclSum, x->comm, cudaStreamLegacy), "allreduce");
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy), "allreduce synchronisation");
}

static void nccl_alltoallv(void *ctx, const void *send, const size_t *sc, const size_t *sd, void *recv,
                           const size_t *rc, const size_t *rd) {
    NcclCtx *x = ctx;
    NCCL_OK(ncclGroupStart(), "group start");
    for (int p = 0; p < x->size; p++) {
        if (sc[p]) NCCL_OK(ncclSend((const char *)send + sd[p], sc[p], ncclChar, p, x->comm, cudaStreamLegacy), "send");
        if (rc[p]) NCCL_OK(ncclRecv((char *)recv + rd[p], rc[p], ncclChar, p, x->comm, cudaStreamLegacy), "recv");
    }
    NCCL_OK(ncclGroupEnd(), "group end");
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy), "all-to-allv synchronisation");
}

static void nccl_free(void *ctx) {
    NcclCtx *x = ctx;
    if (!x) return;
    ncclCommDestroy(x->comm);
    free(x);
}

static const DevCommOps nccl_ops = {
    .name = "nccl",
    .allreduce_sum_f32 = nccl_allreduce_f32,
    .alltoallv_bytes = nccl_alltoallv,
    .free_ctx = nccl_free,
};

Status comm_nccl_attach(Comm *c) {
    if (c->dops) return status_ok();
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    /* every rank takes part in the broadcast, so a failure on rank 0 is agreed below */
    ncclResult_t r = c->rank == 0 ? ncclGetUniqueId(&id) : ncclSuccess;
    double bad = r != ncclSuccess;
    comm_allreduce_max_f64(c, &bad, 1);
    if (bad > 0)
        return status_errorf("parallel.collectives=nccl: ncclGetUniqueId failed on rank 0%s%s",
                             r != ncclSuccess ? ": " : "", r != ncclSuccess ? ncclGetErrorString(r) : "");
    comm_bcast_bytes(c, &id, sizeof id, 0);
    NcclCtx *x = calloc(1, sizeof *x);
    if (!x) return status_errorf("parallel.collectives=nccl: out of memory");
    x->rank = c->rank;
    x->size = c->size;
    r = ncclCommInitRank(&x->comm, c->size, id, c->rank);
    if (r != ncclSuccess) {
        free(x);
        return status_errorf("parallel.collectives=nccl: ncclCommInitRank (rank %d of %d) failed: %s", c->rank, c->size,
                             ncclGetErrorString(r));
    }
    c->dops = &nccl_ops;
    c->dctx = x;
    return status_ok();
}
