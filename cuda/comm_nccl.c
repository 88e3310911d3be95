/* comm_nccl.c: the NCCL device collectives of a Comm (see comm_nccl.h). Every blocking call
 * runs on the legacy default stream, the stream the CUDA backend's kernels and cuBLAS calls
 * use, so it is ordered after the kernels that produced its input, and it synchronises before
 * returning (the caller may read the result on the host next). The non-blocking sum
 * (parallel.overlap_allreduce) runs on a second communicator and a non-blocking stream, after
 * an event recorded on the legacy stream; its request is a completion event. Point-to-point all-to-allv is one NCCL
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
    /* non-blocking sums (parallel.overlap_allreduce): their own communicator, so they never
     * interleave with the blocking calls on `comm` in a different order on different ranks,
     * and a non-blocking stream (cudaStreamNonBlocking: the legacy stream's kernels do not
     * wait for it) */
    ncclComm_t acomm;
    cudaStream_t astream;
} NcclCtx;

/* one non-blocking sum: the event its completion records on the communication stream */
typedef struct NcclReq { cudaEvent_t done; } NcclReq;

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

/* ordered after everything queued on the legacy stream so far (the backward kernels that
 * produced dbuf), run on the communication stream; test/wait on its completion event */
static void *nccl_iallreduce_f32(void *ctx, float *dbuf, size_t n) {
    NcclCtx *x = ctx;
    if (n == 0) return NULL;
    NcclReq *q = calloc(1, sizeof *q);
    if (!q) die("iallreduce", "out of memory");
    cudaEvent_t ready;
    CUDA_OK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "event create");
    CUDA_OK(cudaEventRecord(ready, cudaStreamLegacy), "event record");
    CUDA_OK(cudaStreamWaitEvent(x->astream, ready, 0), "stream wait");
    CUDA_OK(cudaEventDestroy(ready), "event destroy");
    NCCL_OK(ncclAllReduce(dbuf, dbuf, n, ncclFloat32, ncclSum, x->acomm, x->astream), "iallreduce");
    CUDA_OK(cudaEventCreateWithFlags(&q->done, cudaEventDisableTiming), "event create");
    CUDA_OK(cudaEventRecord(q->done, x->astream), "event record");
    return q;
}

static int nccl_test(void *ctx, void *req) {
    (void)ctx;
    NcclReq *q = req;
    cudaError_t e = cudaEventQuery(q->done);
    if (e == cudaErrorNotReady) return 0;
    CUDA_OK(e, "iallreduce test");
    CUDA_OK(cudaEventDestroy(q->done), "event destroy");
    free(q);
    return 1;
}

/* the host waits (the caller reads the gradient norm next); the legacy stream's later work
 * (the optimizer) is ordered after the sum as well */
static void nccl_wait(void *ctx, void *req) {
    (void)ctx;
    NcclReq *q = req;
    CUDA_OK(cudaEventSynchronize(q->done), "iallreduce wait");
    CUDA_OK(cudaStreamWaitEvent(cudaStreamLegacy, q->done, 0), "stream wait");
    CUDA_OK(cudaEventDestroy(q->done), "event destroy");
    free(q);
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
    if (x->astream) cudaStreamDestroy(x->astream);
    if (x->acomm) ncclCommDestroy(x->acomm);
    ncclCommDestroy(x->comm);
    free(x);
}

static const DevCommOps nccl_ops = {
    .name = "nccl",
    .allreduce_sum_f32 = nccl_allreduce_f32,
    .iallreduce_sum_f32 = nccl_iallreduce_f32,
    .test = nccl_test,
    .wait = nccl_wait,
    .alltoallv_bytes = nccl_alltoallv,
    .free_ctx = nccl_free,
};

/* rank 0 makes an NCCL id, c broadcasts it, every rank joins (collective over c) */
static Status join(Comm *c, ncclComm_t *out, const char *what) {
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    /* every rank takes part in the broadcast, so a failure on rank 0 is agreed below */
    ncclResult_t r = c->rank == 0 ? ncclGetUniqueId(&id) : ncclSuccess;
    double bad = r != ncclSuccess;
    comm_allreduce_max_f64(c, &bad, 1);
    if (bad > 0)
        return status_errorf("parallel.collectives=nccl: ncclGetUniqueId (%s) failed on rank 0%s%s", what,
                             r != ncclSuccess ? ": " : "", r != ncclSuccess ? ncclGetErrorString(r) : "");
    comm_bcast_bytes(c, &id, sizeof id, 0);
    r = ncclCommInitRank(out, c->size, id, c->rank);
    if (r != ncclSuccess) {
        *out = NULL;
        return status_errorf("parallel.collectives=nccl: ncclCommInitRank (%s; rank %d of %d) failed: %s", what, c->rank,
                             c->size, ncclGetErrorString(r));
    }
    return status_ok();
}

Status comm_nccl_attach(Comm *c, int async) {
    if (c->dops) return status_ok();
    NcclCtx *x = calloc(1, sizeof *x);
    if (!x) return status_errorf("parallel.collectives=nccl: out of memory");
    x->rank = c->rank;
    x->size = c->size;
    Status st = join(c, &x->comm, "collectives");
    if (!STATUS_OK(st)) { free(x); return st; }
    if (async) {
        st = join(c, &x->acomm, "overlapped gradient allreduce");
        if (STATUS_OK(st)) {
            cudaError_t e = cudaStreamCreateWithFlags(&x->astream, cudaStreamNonBlocking);
            if (e != cudaSuccess)
                st = status_errorf("parallel.overlap_allreduce: cudaStreamCreateWithFlags failed: %s", cudaGetErrorString(e));
        }
        if (!STATUS_OK(st)) { nccl_free(x); return st; }
    }
    c->dops = &nccl_ops;
    c->dctx = x;
    return status_ok();
}
