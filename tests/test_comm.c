/* test_comm: the device-collectives seam of Comm (DevCommOps; parallel.collectives = nccl
 * attaches NCCL there): with ops attached, comm_dev_* call them with the caller's pointers and
 * counts and book the same statistics as the host path; without, they fall back to the host
 * ops; comm_free releases the attached context; comm_nccl_attach in a build without CUDA is an
 * error naming the key. Does not: run NCCL (tests/gpu/device-check.sh does, on a GPU). */
#include <string.h>

#include "comm_nccl.h"
#include "config_build.h"
#include "harness.h"

typedef struct Rec { int allreduce, alltoallv, freed; const void *send; void *recv; size_t n, sc0; } Rec;

static void rec_allreduce(void *ctx, float *dbuf, size_t n) {
    Rec *r = ctx;
    r->allreduce++;
    r->recv = dbuf;
    r->n = n;
}
static void rec_alltoallv(void *ctx, const void *send, const size_t *sc, const size_t *sd, void *recv, const size_t *rc,
                          const size_t *rd) {
    Rec *r = ctx;
    (void)sd; (void)rc; (void)rd;
    r->alltoallv++;
    r->send = send;
    r->recv = recv;
    r->sc0 = sc[0];
}
static void rec_free(void *ctx) { ((Rec *)ctx)->freed++; }
static const DevCommOps rec_ops = {.name = "recorder", .allreduce_sum_f32 = rec_allreduce,
                                   .alltoallv_bytes = rec_alltoallv, .free_ctx = rec_free};

int main(void) {
    Comm c;
    comm_single_init(&c);
    float src[4] = {1, 2, 3, 4}, dst[4] = {0};
    size_t sc[1] = {sizeof src}, sd[1] = {0}, rc[1] = {sizeof src}, rd[1] = {0};
    /* no device ops: the host path (the single-process all-to-allv copies to itself) */
    ok(!comm_has_dev(&c), "a fresh communicator has no device collectives");
    comm_dev_alltoallv_bytes(&c, src, sc, sd, dst, rc, rd, COMM_PHASE_DISPATCH);
    ok(memcmp(src, dst, sizeof src) == 0, "without device ops the host all-to-allv moves the bytes");
    uint64_t calls_host = c.stats.calls[COMM_PHASE_DISPATCH];
    /* attached: every call goes to the device ops with the caller's pointers */
    Rec r = {0};
    c.dops = &rec_ops;
    c.dctx = &r;
    ok(comm_has_dev(&c), "attached ops are seen");
    memset(dst, 0, sizeof dst);
    comm_dev_alltoallv_bytes(&c, src, sc, sd, dst, rc, rd, COMM_PHASE_DISPATCH);
    ok(r.alltoallv == 1 && r.send == src && r.recv == dst && r.sc0 == sizeof src && dst[0] == 0,
       "all-to-allv goes to the device ops (called %d times, the host path not taken)", r.alltoallv);
    ok(c.stats.calls[COMM_PHASE_DISPATCH] == calls_host + 1, "the device call is booked like the host one (%llu calls)",
       (unsigned long long)c.stats.calls[COMM_PHASE_DISPATCH]);
    comm_dev_allreduce_sum_f32(&c, src, 4, COMM_PHASE_ALLREDUCE);
    ok(r.allreduce == 0 && c.stats.calls[COMM_PHASE_ALLREDUCE] == 1 && c.stats.bytes[COMM_PHASE_ALLREDUCE] == 0,
       "one rank: the allreduce is booked but not called, as on the host path");
    comm_free(&c);
    ok(r.freed == 1, "comm_free releases the device context");
    /* the NCCL attach: without CUDA it is an error naming the key (with CUDA it needs a GPU,
     * which tests/gpu/device-check.sh provides) */
    if (!HAVE_CUDA) {
        Comm s;
        comm_single_init(&s);
        Status st = comm_nccl_attach(&s, 1);
        ok(!STATUS_OK(st) && strstr(st.msg, "parallel.collectives=nccl") && !comm_has_dev(&s),
           "no CUDA: comm_nccl_attach is an error naming the key (%s)", st.msg);
        comm_free(&s);
    }
    return harness_done();
}
