/* test_offload: the residency manager under forced tiny caps (1-2 slots) with random access
 * sequences — content never lost or mixed, LRU order, pins, idle eviction, EMA prefetch,
 * statistics that add up — for the host and file tiers; file-tier I/O errors (corrupt, removed,
 * truncated, foreign file, unusable folder) give clear errors; codecs (quant FP16/INT4 and a
 * custom one); memory accounting (memacct) including the measured process peak; in-place units
 * (the trainer's mode: caller-owned memory, cap at end_step, eviction/fetch hooks, fetch_all).
 * Device slots (OffloadOptions.be) on two host backends: the CPU backend (synchronous copies:
 * statistics and contents must equal host slots') and a deferring backend built on it whose
 * side-stream copies run only when their event (or a later one) is waited for, the worst
 * order a real side stream may take: every unit handed out must already hold its content, and
 * no buffer may be freed or reused while a pending transfer still reads or writes it.
 * Does not: test the trainer integration (test_offload_train.py does) or a real GPU. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "offload.h"
#include "memacct.h"
#include "quant.h"
#include "harness.h"
#include "backend.h"

static char tmpdir[256];

enum { N_SPANS = 3 };
static const size_t span_bytes[N_SPANS] = {100, 4096 + 12, 8};

static void fill_random(Rng *rng, uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rng_u64(rng);
}

static void make_spans(OffloadSpan *sp) {
    memset(sp, 0, sizeof(OffloadSpan) * N_SPANS);
    for (int s = 0; s < N_SPANS; s++) {
        sp[s].bytes = span_bytes[s];
        sp[s].kind = s == 1 ? MEM_KIND_OPTIM : MEM_KIND_PARAM_FP32;
        sp[s].stored_kind = sp[s].kind;
    }
}

static int unit_equals(OffloadManager *m, int unit, uint8_t *const *shadow) {
    for (int s = 0; s < N_SPANS; s++)
        if (memcmp(offload_span(m, unit, s), shadow[s], span_bytes[s]) != 0) return 0;
    return 1;
}

static void remove_dir_files(const char *dir, const char *name, int n_units) {
    OffloadManager fake;
    memset(&fake, 0, sizeof fake);
    str_fmt(fake.dir, sizeof fake.dir, "%s", dir);
    str_fmt(fake.name, sizeof fake.name, "%s", name ? name : "");
    for (int u = 0; u < n_units; u++) {
        char p[1024];
        offload_unit_path(&fake, u, p, sizeof p);
        unlink(p);
    }
    rmdir(dir);
}

/* ---- the deferring backend: the CPU backend whose side-stream copies wait in a queue until
 * wait_event / sync_event of their ticket or a later one (or sync) runs them in order ---- */
typedef struct Pending { uint64_t t; char *dst; const char *src; size_t n; char *snap; } Pending;
static struct {
    Pending q[4096];
    int n;
    uint64_t next;
    struct { void *p; size_t n; } buf[4096];   /* live buffers of alloc / host_alloc_pinned */
    int n_buf;
    long hazards;        /* a buffer freed, or a source changed, while a copy of it is pending */
    long copies, waits, syncs, pinned_allocs;
} DQ;
static BackendOps defer_ops;
static void dq_run(uint64_t upto) {
    int k = 0;
    for (; k < DQ.n && DQ.q[k].t <= upto; k++) {
        if (memcmp(DQ.q[k].src, DQ.q[k].snap, DQ.q[k].n) != 0) DQ.hazards++;
        memmove(DQ.q[k].dst, DQ.q[k].src, DQ.q[k].n);
        xfree(DQ.q[k].snap);
    }
    memmove(DQ.q, DQ.q + k, sizeof(Pending) * (size_t)(DQ.n - k));
    DQ.n -= k;
}
static uint64_t dq_push(void *dst, const void *src, size_t n) {
    ASSERT(DQ.n < (int)(sizeof DQ.q / sizeof DQ.q[0]));
    char *snap = xmalloc(n ? n : 1);
    memcpy(snap, src, n);
    DQ.q[DQ.n++] = (Pending){++DQ.next, dst, src, n, snap};
    DQ.copies++;
    return DQ.next;
}
static void *dq_track(void *p, size_t n) {
    ASSERT(DQ.n_buf < (int)(sizeof DQ.buf / sizeof DQ.buf[0]));
    DQ.buf[DQ.n_buf].p = p;
    DQ.buf[DQ.n_buf++].n = n;
    return p;
}
/* a buffer is freed: a pending copy into or out of it is a hazard */
static void dq_untrack(void *p) {
    if (!p) return;
    for (int b = 0; b < DQ.n_buf; b++) {
        if (DQ.buf[b].p != p) continue;
        const char *lo = p, *hi = lo + DQ.buf[b].n;
        for (int k = 0; k < DQ.n; k++)
            if ((DQ.q[k].dst < hi && DQ.q[k].dst + DQ.q[k].n > lo) || (DQ.q[k].src < hi && DQ.q[k].src + DQ.q[k].n > lo))
                DQ.hazards++;
        DQ.buf[b] = DQ.buf[--DQ.n_buf];
        return;
    }
}
static uint64_t d_to_dev(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; return dq_push(dst, src, n); }
static uint64_t d_to_host(void *ctx, void *dst, const void *src, size_t n) { (void)ctx; return dq_push(dst, src, n); }
static void d_wait(void *ctx, uint64_t ev) { (void)ctx; if (ev) { DQ.waits++; dq_run(ev); } }
static void d_sync_ev(void *ctx, uint64_t ev) { (void)ctx; if (ev) { DQ.syncs++; dq_run(ev); } }
static void d_sync(void *ctx) { (void)ctx; dq_run(UINT64_MAX); }
static void *d_pinned(void *ctx, size_t n) { (void)ctx; DQ.pinned_allocs++; return dq_track(xcalloc(n ? n : 1), n); }
static void *d_alloc(void *ctx, size_t n) { (void)ctx; return dq_track(xcalloc(n ? n : 1), n); }
static void d_free_pinned(void *ctx, void *p) { (void)ctx; dq_untrack(p); xfree(p); }
static void d_free(void *ctx, void *p) { (void)ctx; dq_untrack(p); xfree(p); }
static Backend defer_backend(void) {
    Backend cpu;
    Status s = backend_cpu_init(&cpu, 1);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    defer_ops = *cpu.ops;
    defer_ops.name = "cpu-deferred";
    defer_ops.copy_to_device_async = d_to_dev; defer_ops.copy_to_host_async = d_to_host;
    defer_ops.wait_event = d_wait; defer_ops.sync_event = d_sync_ev; defer_ops.sync = d_sync;
    defer_ops.host_alloc_pinned = d_pinned; defer_ops.host_free_pinned = d_free_pinned; defer_ops.free = d_free;
    defer_ops.alloc = d_alloc;
    cpu.ops = &defer_ops;
    return cpu;
}

/* random access sequences; the shadow copy is the truth */
static OffloadStats test_random(enum OffloadTier tier, int cap, int idle, enum PrefetchKind pf, uint64_t seed,
                                const Backend *be) {
    enum { NU = 7, STEPS = 80 };
    Rng rng;
    rng_init(&rng, seed, 0, RNG_TEST);
    OffloadSpan sp[N_SPANS];
    make_spans(sp);
    char dir[512];
    str_fmt(dir, sizeof dir, "%s/rand_%d_%d_%d_%d%s", tmpdir, (int)tier, cap, idle, (int)pf, be ? be->ops->name : "");
    MemAcct acct;
    memacct_init(&acct);
    OffloadOptions o = {.n_units = NU, .n_spans = N_SPANS, .spans = sp, .max_resident = cap, .idle_steps = idle,
                        .tier = tier, .dir = dir, .name = "L00", .prefetch = pf, .prefetch_ema = 0.3, .acct = &acct,
                        .no_fsync = cap != 1,    /* both write paths; fsync is slow on a busy disk */
                        .be = be};
    OffloadManager m;
    Status s = offload_init(&m, &o);
    ok(STATUS_OK(s), "init tier=%d cap=%d idle=%d prefetch=%d slots=%s: %s", (int)tier, cap, idle, (int)pf,
       be ? be->ops->name : "host", s.msg);
    uint8_t *shadow[NU][N_SPANS];
    for (int u = 0; u < NU; u++) {
        for (int k = 0; k < N_SPANS; k++) {
            shadow[u][k] = xmalloc(span_bytes[k]);
            fill_random(&rng, shadow[u][k], span_bytes[k]);
        }
        s = offload_write_unit(&m, u, (const void *const *)shadow[u]);
        ASSERTF(STATUS_OK(s), "%s", s.msg);
    }
    long bad_content = 0, bad_cap = 0, bad_hit = 0, bad_ptr = 0;
    int64_t my_hits = 0, my_acq = 0, my_fail = 0;
    int n_slots = cap ? cap : NU;
    for (long step = 0; step < STEPS; step++) {
        offload_begin_step(&m, step);
        /* sometimes pin a set first (as after stage-1 routing) */
        int pinned[2], n_pin = 0;
        if (rng_below(&rng, 3) == 0) {
            n_pin = 1 + (int)rng_below(&rng, (uint64_t)(n_slots < 2 ? n_slots : 2));
            for (int i = 0; i < n_pin; i++) pinned[i] = (int)rng_below(&rng, NU);
            if (n_pin == 2 && pinned[0] == pinned[1]) n_pin = 1;
            for (int i = 0; i < n_pin; i++) { my_acq++; my_hits += offload_is_resident(&m, pinned[i]); }
            s = offload_pin(&m, pinned, n_pin, OFFLOAD_READ);
            ASSERTF(STATUS_OK(s), "%s", s.msg);
        }
        void *pin_ptr[2];
        for (int i = 0; i < n_pin; i++) pin_ptr[i] = offload_span(&m, pinned[i], 1);
        int n_acc = 1 + (int)rng_below(&rng, 4);
        for (int a = 0; a < n_acc; a++) {
            int u = (int)rng_below(&rng, NU);
            bool pinned_full = n_pin >= n_slots;
            bool is_pinned = false;
            for (int i = 0; i < n_pin; i++) is_pinned |= pinned[i] == u;
            if (pinned_full && !is_pinned && !offload_is_resident(&m, u)) {
                s = offload_acquire(&m, u, OFFLOAD_READ, NULL);
                my_acq++;
                my_fail++;
                if (STATUS_OK(s) || !strstr(s.msg, "pinned")) bad_cap++;
                continue;
            }
            bool was = offload_is_resident(&m, u);
            my_acq++;
            my_hits += was;
            int64_t h0 = offload_step_stats(&m)->hits;
            bool write = rng_below(&rng, 2) == 0;
            void *p[N_SPANS];
            s = offload_acquire(&m, u, write ? OFFLOAD_WRITE : OFFLOAD_READ, p);
            ASSERTF(STATUS_OK(s), "%s", s.msg);
            if ((offload_step_stats(&m)->hits - h0) != (was ? 1 : 0)) bad_hit++;
            if (!unit_equals(&m, u, shadow[u])) bad_content++;
            for (int k = 0; k < N_SPANS; k++) if (p[k] != offload_span(&m, u, k)) bad_ptr++;
            if (write) {
                int k = (int)rng_below(&rng, N_SPANS);
                fill_random(&rng, shadow[u][k], span_bytes[k]);
                memcpy(p[k], shadow[u][k], span_bytes[k]);
            }
            if (offload_step_stats(&m)->resident_units > n_slots) bad_cap++;
        }
        for (int i = 0; i < n_pin; i++) offload_wait(&m, pinned[i]);   /* device slots: pinned, not yet waited for */
        for (int i = 0; i < n_pin; i++)
            if (!offload_is_resident(&m, pinned[i]) || offload_span(&m, pinned[i], 1) != pin_ptr[i] ||
                !unit_equals(&m, pinned[i], shadow[pinned[i]]))
                bad_ptr++;
        const OffloadStats *st = offload_step_stats(&m);
        if (st->hits + st->misses != st->acquires) bad_hit++;
        s = offload_end_step(&m);
        ASSERTF(STATUS_OK(s), "%s", s.msg);
        if (memacct_tier_current(&acct, MEM_TIER_DEVICE) != offload_step_stats(&m)->resident_bytes) bad_cap++;
    }
    const OffloadStats *t = offload_total_stats(&m);
    OffloadStats ret = *t;
    ok(bad_content == 0, "tier=%d cap=%d idle=%d pf=%d: every acquire returns the unit's own content (%ld wrong)",
       (int)tier, cap, idle, (int)pf, bad_content);
    ok(bad_ptr == 0, "pinned units stay put for the whole step; span pointers agree (%ld wrong)", bad_ptr);
    ok(bad_cap == 0, "residency never exceeds %d slots; over-pinned acquires fail; memacct tracks resident bytes (%ld wrong)",
       n_slots, bad_cap);
    ok(bad_hit == 0 && t->hits + t->misses == t->acquires && t->acquires == my_acq && t->hits == my_hits,
       "hits %lld + misses %lld == acquires %lld (expected %lld, hits %lld)", (long long)t->hits,
       (long long)t->misses, (long long)t->acquires, (long long)my_acq, (long long)my_hits);
    int64_t io = (int64_t)m.enc_bytes + (tier == OFFLOAD_FILE ? 32 : 0);
    /* every unit was written to the backing tier first, so every fetch reads one full unit */
    ok(t->bytes_in == (t->misses - my_fail + t->prefetches) * io && t->bytes_out == t->writebacks * io,
       "bytes in %lld == (misses %lld - failed %lld + prefetches %lld) x %lld; out %lld == writebacks %lld x unit",
       (long long)t->bytes_in, (long long)t->misses, (long long)my_fail, (long long)t->prefetches, (long long)io,
       (long long)t->bytes_out, (long long)t->writebacks);
    ok(t->peak_resident_bytes <= (int64_t)n_slots * (int64_t)m.raw_bytes && t->peak_resident_bytes > 0,
       "peak resident %lld bytes <= %d slots x %zu", (long long)t->peak_resident_bytes, n_slots, m.raw_bytes);
    if (idle && cap == 0) ok(t->idle_evictions > 0, "idle eviction happened (%lld)", (long long)t->idle_evictions);
    if (pf == PREFETCH_EMA) ok(t->prefetches > 0, "EMA prefetch happened (%lld, %lld hit)", (long long)t->prefetches,
                               (long long)t->prefetch_hits);
    /* final content of every unit, wherever it lives; then after flush + eviction of all */
    long bad_final = 0;
    uint8_t *buf[N_SPANS];
    for (int k = 0; k < N_SPANS; k++) buf[k] = xmalloc(span_bytes[k]);
    for (int pass = 0; pass < 2; pass++) {
        for (int u = 0; u < NU; u++) {
            s = offload_read_unit(&m, u, (void *const *)buf);
            ASSERTF(STATUS_OK(s), "%s", s.msg);
            for (int k = 0; k < N_SPANS; k++) bad_final += memcmp(buf[k], shadow[u][k], span_bytes[k]) != 0;
        }
        offload_begin_step(&m, STEPS);
        s = offload_flush(&m);
        ASSERTF(STATUS_OK(s), "%s", s.msg);
        for (int u = 0; u < NU; u++) { s = offload_evict(&m, u); ASSERTF(STATUS_OK(s), "%s", s.msg); }
    }
    ok(bad_final == 0 && offload_step_stats(&m)->resident_units == 0,
       "read_unit returns every unit intact, before and after flush + evict-all (%ld wrong)", bad_final);
    for (int k = 0; k < N_SPANS; k++) xfree(buf[k]);
    offload_free(&m);
    offload_free(&m);
    ok(memacct_tier_current(&acct, MEM_TIER_DEVICE) == 0 && memacct_tier_current(&acct, MEM_TIER_HOST) == 0 &&
       memacct_tier_current(&acct, MEM_TIER_FILE) == 0, "offload_free returns every accounted byte");
    for (int u = 0; u < NU; u++)
        for (int k = 0; k < N_SPANS; k++) xfree(shadow[u][k]);
    if (tier == OFFLOAD_FILE) remove_dir_files(dir, "L00", NU);
    return ret;
}

/* the same random sequences with device slots: the CPU backend and the deferring one give the
 * host slots' statistics exactly (the time fields aside) and every check of test_random */
static void test_device_slots(enum OffloadTier tier, int cap, int idle, enum PrefetchKind pf, uint64_t seed) {
    Backend cpu, dfr = defer_backend();
    Status s = backend_cpu_init(&cpu, 1);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    OffloadStats h = test_random(tier, cap, idle, pf, seed, NULL);
    OffloadStats c = test_random(tier, cap, idle, pf, seed, &cpu);
    memset(&DQ, 0, sizeof DQ);
    OffloadStats d = test_random(tier, cap, idle, pf, seed, &dfr);
    h.stall_s = c.stall_s = d.stall_s = h.background_s = c.background_s = d.background_s = 0;
    ok(memcmp(&h, &c, sizeof h) == 0 && memcmp(&h, &d, sizeof h) == 0,
       "device slots tier=%d cap=%d pf=%d: statistics equal host slots' (acquires %lld misses %lld prefetches %lld "
       "writebacks %lld bytes in %lld out %lld)", (int)tier, cap, (int)pf, (long long)h.acquires, (long long)h.misses,
       (long long)h.prefetches, (long long)h.writebacks, (long long)h.bytes_in, (long long)h.bytes_out);
    ok(DQ.copies >= h.misses - 1 && DQ.waits > 0 && DQ.pinned_allocs > 0 && DQ.hazards == 0 && DQ.n == 0,
       "deferred side stream: %ld copies, %ld compute waits, %ld host syncs, %ld pinned buffers, %ld buffers freed "
       "under a pending copy (0), %d left pending at the end (0)", DQ.copies, DQ.waits, DQ.syncs, DQ.pinned_allocs,
       DQ.hazards, DQ.n);
}

static OffloadManager small_mgr(int cap, int idle, enum OffloadTier tier, const char *dir, OffloadSpan *sp) {
    make_spans(sp);
    OffloadOptions o = {.n_units = 4, .n_spans = N_SPANS, .spans = sp, .max_resident = cap, .idle_steps = idle,
                        .tier = tier, .dir = dir, .prefetch = PREFETCH_NONE};
    OffloadManager m;
    Status s = offload_init(&m, &o);
    ASSERTF(STATUS_OK(s), "%s", s.msg);
    return m;
}

static void test_lru_pins_idle(void) {
    OffloadSpan sp[N_SPANS];
    OffloadManager m = small_mgr(2, 0, OFFLOAD_HOST, NULL, sp);
    offload_begin_step(&m, 0);
    int order[] = {0, 1, 0, 2};
    for (int i = 0; i < 4; i++) ASSERT(STATUS_OK(offload_acquire(&m, order[i], OFFLOAD_WRITE, NULL)));
    ok(offload_is_resident(&m, 0) && !offload_is_resident(&m, 1) && offload_is_resident(&m, 2),
       "LRU: after 0 1 0 2 with 2 slots, 1 (least recently used) was evicted");
    ASSERT(STATUS_OK(offload_acquire(&m, 3, OFFLOAD_READ, NULL)));
    ok(!offload_is_resident(&m, 0) && offload_is_resident(&m, 2) && offload_is_resident(&m, 3),
       "LRU: then 3 evicts 0");
    offload_end_step(&m);
    offload_begin_step(&m, 1);
    int need[] = {2};
    ASSERT(STATUS_OK(offload_pin(&m, need, 1, OFFLOAD_READ)));
    ASSERT(STATUS_OK(offload_acquire(&m, 3, OFFLOAD_READ, NULL)));     /* 3 is now more recent than 2 */
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, NULL)));
    ok(offload_is_resident(&m, 2) && offload_is_resident(&m, 0) && !offload_is_resident(&m, 3),
       "a pinned unit is never the victim: 0 evicts 3, not the older but pinned 2");
    int three[] = {0, 1, 3};
    Status s = offload_pin(&m, three, 3, OFFLOAD_READ);
    ok(!STATUS_OK(s) && strstr(s.msg, "only 2 resident slots"), "pinning more units than slots fails: %s", s.msg);
    int two[] = {0, 2};
    ASSERT(STATUS_OK(offload_pin(&m, two, 2, OFFLOAD_READ)));
    s = offload_acquire(&m, 1, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "pinned"), "acquiring with every slot pinned fails: %s", s.msg);
    s = offload_evict(&m, 2);
    ok(!STATUS_OK(s), "evicting a pinned unit fails: %s", s.msg);
    offload_unpin(&m, 2);
    ok(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_READ, NULL)) && !offload_is_resident(&m, 2), "after unpin it can go");
    offload_end_step(&m);
    offload_free(&m);

    /* idle eviction: cap 0 (all may be resident), idle 2 */
    m = small_mgr(0, 2, OFFLOAD_HOST, NULL, sp);
    offload_begin_step(&m, 0);
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_WRITE, NULL)));
    memset(offload_span(&m, 0, 0), 7, span_bytes[0]);
    ASSERT(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_WRITE, NULL)));
    offload_end_step(&m);
    bool res[4];
    for (long step = 1; step <= 2; step++) {
        offload_begin_step(&m, step);
        ASSERT(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_READ, NULL)));
        offload_end_step(&m);
        res[step] = offload_is_resident(&m, 0);
    }
    ok(res[1] && !res[2] && offload_is_resident(&m, 1) && offload_total_stats(&m)->idle_evictions == 1,
       "idle eviction: unit 0 unused for 2 steps leaves at the end of step 2, unit 1 stays");
    offload_begin_step(&m, 3);
    uint8_t *p[N_SPANS];
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, (void **)p)));
    ok(p[0][0] == 7 && p[0][99] == 7 && offload_step_stats(&m)->misses == 1, "the idle-evicted unit comes back intact");
    offload_end_step(&m);
    offload_free(&m);

    /* EMA prefetch: a unit used every step, evicted, is fetched back at end_step */
    make_spans(sp);
    OffloadOptions o = {.n_units = 4, .n_spans = N_SPANS, .spans = sp, .max_resident = 2, .tier = OFFLOAD_HOST,
                        .prefetch = PREFETCH_EMA, .prefetch_ema = 0.5};
    ASSERT(STATUS_OK(offload_init(&m, &o)));
    for (long step = 0; step < 4; step++) {
        offload_begin_step(&m, step);
        ASSERT(STATUS_OK(offload_acquire(&m, 3, OFFLOAD_WRITE, NULL)));
        offload_end_step(&m);
    }
    offload_begin_step(&m, 4);
    ASSERT(STATUS_OK(offload_evict(&m, 3)));
    ASSERT(STATUS_OK(offload_end_step(&m)));
    ok(offload_is_resident(&m, 3) && offload_step_stats(&m)->prefetches == 1, "EMA prefetch brings the frequent unit back");
    offload_begin_step(&m, 5);
    ASSERT(STATUS_OK(offload_acquire(&m, 3, OFFLOAD_READ, NULL)));
    ok(offload_step_stats(&m)->hits == 1 && offload_step_stats(&m)->prefetch_hits == 1, "and its next use is a prefetch hit");
    offload_end_step(&m);
    offload_free(&m);
}

/* on_fetch: count calls, refuse unit 2 */
static int fetch_calls[4];
static Status hook(void *ctx, int unit, void *const *spans, bool *modified) {
    fetch_calls[unit]++;
    ((uint8_t *)spans[0])[0] += *(int *)ctx;
    *modified = unit == 1;
    if (unit == 2) return status_errorf("hook refuses unit %d", unit);
    return status_ok();
}

static void test_fetch_hook(void) {
    OffloadSpan sp[N_SPANS];
    make_spans(sp);
    int add = 5;
    OffloadOptions o = {.n_units = 4, .n_spans = N_SPANS, .spans = sp, .max_resident = 1, .tier = OFFLOAD_HOST,
                        .on_fetch = hook, .ctx = &add};
    OffloadManager m;
    ASSERT(STATUS_OK(offload_init(&m, &o)));
    offload_begin_step(&m, 0);
    uint8_t *p[N_SPANS];
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, (void **)p)));
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, (void **)p)));
    ok(fetch_calls[0] == 1 && p[0][0] == 5, "on_fetch runs once per fetch (not on hits) and may edit the unit");
    ASSERT(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_READ, NULL)));
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, (void **)p)));
    ok(fetch_calls[0] == 2 && p[0][0] == 5, "unmodified: the unit is not written back (refetched as zeros, +5 again)");
    ASSERT(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_READ, (void **)p)));
    ok(fetch_calls[1] == 2 && p[0][0] == 10, "modified: the hook's edit was written back on eviction (5 + 5)");
    Status s = offload_acquire(&m, 2, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "hook refuses unit 2") && !offload_is_resident(&m, 2), "an on_fetch error propagates: %s", s.msg);
    offload_free(&m);
}

/* in place (the trainer's use): units live in the caller's arrays, all start resident, the cap
 * holds after end_step (not within a step), hooks see every eviction and fetch, a unit's bytes
 * are in one tier at a time, fetch_all restores without refreshing recency */
enum { IP_NU = 5 };
static uint8_t *ip_base[N_SPANS];
static int ip_evicted[IP_NU], ip_fetched[IP_NU];
static void *ip_locate(void *ctx, int unit, int span) { (void)ctx; return ip_base[span] + (size_t)unit * span_bytes[span]; }
static void ip_evict(void *ctx, int unit, void *const *spans) {
    (void)ctx;
    ip_evicted[unit]++;
    for (int s = 0; s < N_SPANS; s++) memset(spans[s], 0xEE, span_bytes[s]);   /* "pages given back" */
}
static Status ip_fetch(void *ctx, int unit, void *const *spans, bool *modified) {
    (void)ctx; (void)spans;
    ip_fetched[unit]++;
    *modified = true;
    return status_ok();
}

static void test_in_place(enum OffloadTier tier) {
    OffloadSpan sp[N_SPANS];
    make_spans(sp);
    char dir[512];
    str_fmt(dir, sizeof dir, "%s/inplace%d", tmpdir, (int)tier);
    MemAcct acct;
    memacct_init(&acct);
    OffloadOptions o = {.n_units = IP_NU, .n_spans = N_SPANS, .spans = sp, .max_resident = 2, .idle_steps = 2,
                        .tier = tier, .dir = dir, .name = "ip", .no_fsync = true, .acct = &acct,
                        .locate = ip_locate, .on_fetch = ip_fetch, .on_evict = ip_evict};
    Rng rng;
    rng_init(&rng, 77 + (uint64_t)tier, 0, RNG_TEST);
    uint8_t *shadow[IP_NU][N_SPANS];
    for (int s = 0; s < N_SPANS; s++) ip_base[s] = xmalloc(span_bytes[s] * IP_NU);
    for (int u = 0; u < IP_NU; u++)
        for (int s = 0; s < N_SPANS; s++) {
            shadow[u][s] = xmalloc(span_bytes[s]);
            fill_random(&rng, shadow[u][s], span_bytes[s]);
            memcpy(ip_locate(NULL, u, s), shadow[u][s], span_bytes[s]);
        }
    memset(ip_evicted, 0, sizeof ip_evicted);
    memset(ip_fetched, 0, sizeof ip_fetched);
    OffloadManager m;
    Status st = offload_init(&m, &o);
    ok(STATUS_OK(st), "in place, tier %d: init: %s", (int)tier, st.msg);
    bool all = true, where = true;
    for (int u = 0; u < IP_NU; u++) {
        all &= offload_is_resident(&m, u);
        for (int s = 0; s < N_SPANS; s++) where &= offload_span(&m, u, s) == ip_locate(NULL, u, s);
    }
    ok(all && where && memacct_tier_current(&acct, MEM_TIER_DEVICE) == 0,
       "every unit starts resident at the caller's address; the caller's memory is not accounted as slots");
    /* step 0: all 5 used (over the cap of 2 within the step), the caller writes them */
    offload_begin_step(&m, 0);
    for (int u = 0; u < IP_NU; u++) ASSERT(STATUS_OK(offload_acquire(&m, u, OFFLOAD_WRITE, NULL)));
    bool over = offload_step_stats(&m)->resident_units == IP_NU && offload_step_stats(&m)->evictions == 0;
    for (int u = 0; u < IP_NU; u++) {
        fill_random(&rng, shadow[u][1], span_bytes[1]);
        memcpy(ip_locate(NULL, u, 1), shadow[u][1], span_bytes[1]);
    }
    ASSERT(STATUS_OK(offload_end_step(&m)));
    ok(over && offload_is_resident(&m, 3) && offload_is_resident(&m, 4) && !offload_is_resident(&m, 0) &&
       !offload_is_resident(&m, 1) && !offload_is_resident(&m, 2) && ip_evicted[0] == 1 && ip_evicted[2] == 1 &&
       ip_evicted[3] == 0, "the cap holds after end_step, not within the step; the 2 most recent stay; on_evict per eviction");
    int64_t io = (int64_t)m.enc_bytes + (tier == OFFLOAD_FILE ? 32 : 0);
    enum MemTier bt = tier == OFFLOAD_HOST ? MEM_TIER_HOST : MEM_TIER_FILE;
    int64_t copy = (int64_t)(span_bytes[0] + span_bytes[1] + span_bytes[2]);   /* accounted without padding */
    ok(memacct_tier_current(&acct, bt) == 3 * copy, "3 backing copies accounted in the %s tier",
       memacct_tier_name(bt));
    /* step 1: unit 0 comes back with its content (the hook scribbled over the caller's pages) */
    offload_begin_step(&m, 1);
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_WRITE, NULL)));
    bool same = true;
    for (int s = 0; s < N_SPANS; s++) same &= memcmp(ip_locate(NULL, 0, s), shadow[0][s], span_bytes[s]) == 0;
    ok(same && ip_fetched[0] == 1 && offload_step_stats(&m)->misses == 1 && offload_step_stats(&m)->bytes_in == io,
       "a fetched unit comes back in place intact; on_fetch ran; one miss of %lld bytes", (long long)io);
    if (tier == OFFLOAD_HOST)
        ok(memacct_tier_current(&acct, MEM_TIER_HOST) == 2 * copy && m.host[0] == NULL,
           "host tier: the copy of the fetched (modified) unit is freed: its bytes are in one tier only");
    ASSERT(STATUS_OK(offload_end_step(&m)));   /* 3 (older) leaves for the cap; 4 stays */
    offload_begin_step(&m, 2);
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_WRITE, NULL)));
    ASSERT(STATUS_OK(offload_end_step(&m)));   /* 4 unused since step 0: idle */
    ok(offload_is_resident(&m, 0) && !offload_is_resident(&m, 3) && !offload_is_resident(&m, 4) &&
       offload_total_stats(&m)->idle_evictions == 1 && offload_step_stats(&m)->resident_units == 1,
       "LRU then idle eviction in place (%lld idle)", (long long)offload_total_stats(&m)->idle_evictions);
    /* fetch_all: every unit back, counted as misses, recency not refreshed */
    offload_begin_step(&m, 3);
    ASSERT(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_WRITE, NULL)));
    int64_t miss0 = offload_step_stats(&m)->misses;
    ASSERT(STATUS_OK(offload_fetch_all(&m)));
    const OffloadStats *ss = offload_step_stats(&m);
    same = true;
    for (int u = 0; u < IP_NU; u++)
        for (int s = 0; s < N_SPANS; s++) same &= memcmp(ip_locate(NULL, u, s), shadow[u][s], span_bytes[s]) == 0;
    ok(same && ss->resident_units == IP_NU && ss->misses == miss0 + 3 && ss->hits + ss->misses == ss->acquires,
       "fetch_all: all %d units back intact, %lld misses (3 restored)", IP_NU, (long long)ss->misses);
    ASSERT(STATUS_OK(offload_end_step(&m)));
    ok(offload_is_resident(&m, 0) && offload_is_resident(&m, 1) && offload_step_stats(&m)->resident_units == 2,
       "after fetch_all the units really used (0, 1) stay and the restored ones leave again");
    const OffloadStats *t = offload_total_stats(&m);
    ok(t->bytes_out == t->writebacks * io && t->writebacks == t->evictions && t->bytes_in == (t->misses) * io,
       "bytes out %lld == writebacks %lld x %lld; in %lld == misses x unit", (long long)t->bytes_out,
       (long long)t->writebacks, (long long)io, (long long)t->bytes_in);
    offload_free(&m);
    ok(memacct_tier_current(&acct, MEM_TIER_HOST) == 0 && memacct_tier_current(&acct, MEM_TIER_FILE) == 0,
       "offload_free returns every accounted byte");
    if (tier == OFFLOAD_FILE) remove_dir_files(dir, "ip", IP_NU);
    o.prefetch = PREFETCH_EMA;
    o.prefetch_ema = 0.5;
    st = offload_init(&m, &o);
    ok(!STATUS_OK(st) && strstr(st.msg, "prefetch"), "in place with prefetch is refused: %s", st.msg);
    offload_free(&m);
    OffloadOptions o2 = {.n_units = 3, .n_spans = N_SPANS, .spans = sp, .max_resident = 2, .tier = OFFLOAD_HOST};
    ASSERT(STATUS_OK(offload_init(&m, &o2)));
    st = offload_fetch_all(&m);
    ok(!STATUS_OK(st) && strstr(st.msg, "slot for each"), "fetch_all with fewer slots than units fails: %s", st.msg);
    offload_free(&m);
    for (int u = 0; u < IP_NU; u++)
        for (int s = 0; s < N_SPANS; s++) xfree(shadow[u][s]);
    for (int s = 0; s < N_SPANS; s++) xfree(ip_base[s]);
}

static void corrupt_byte(const char *path, long off) {
    int fd = open(path, O_RDWR);
    ASSERT(fd >= 0);
    unsigned char c;
    ASSERT(pread(fd, &c, 1, off) == 1);
    c ^= 0x5A;
    ASSERT(pwrite(fd, &c, 1, off) == 1);
    close(fd);
}

static void test_file_errors(void) {
    char dir[512];
    str_fmt(dir, sizeof dir, "%s/errs", tmpdir);
    OffloadSpan sp[N_SPANS];
    OffloadManager m = small_mgr(1, 0, OFFLOAD_FILE, dir, sp);
    Rng rng;
    rng_init(&rng, 9, 0, RNG_TEST);
    uint8_t *src[N_SPANS];
    for (int k = 0; k < N_SPANS; k++) { src[k] = xmalloc(span_bytes[k]); fill_random(&rng, src[k], span_bytes[k]); }
    for (int u = 0; u < 4; u++) ASSERT(STATUS_OK(offload_write_unit(&m, u, (const void *const *)src)));
    char path[1024], path1[1024];
    offload_unit_path(&m, 3, path, sizeof path);
    offload_unit_path(&m, 1, path1, sizeof path1);
    offload_begin_step(&m, 0);

    corrupt_byte(path, 32 + 500);
    Status s = offload_acquire(&m, 3, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "CRC mismatch") && strstr(s.msg, path) && strstr(s.msg, "unit 3"),
       "corrupt payload: %s", s.msg);
    ok(!offload_is_resident(&m, 3) && offload_step_stats(&m)->resident_units == 0, "a failed fetch leaves nothing resident");
    corrupt_byte(path, 32 + 500);          /* repair */
    ok(STATUS_OK(offload_acquire(&m, 3, OFFLOAD_READ, NULL)) && memcmp(offload_span(&m, 3, 1), src[1], span_bytes[1]) == 0,
       "repaired file reads back");
    corrupt_byte(path, 0);
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, NULL)));       /* 3 leaves (clean: no rewrite) */
    s = offload_acquire(&m, 3, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "bad magic"), "bad magic: %s", s.msg);
    corrupt_byte(path, 0);

    ASSERT(truncate(path, 100) == 0);
    s = offload_acquire(&m, 3, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "100 bytes, expected") && strstr(s.msg, path), "truncated file: %s", s.msg);
    unlink(path);
    s = offload_acquire(&m, 3, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "cannot open") && strstr(s.msg, "unit 3") && strstr(s.msg, path),
       "missing file: %s", s.msg);
    s = offload_read_unit(&m, 3, (void *const *)src);
    ok(!STATUS_OK(s) && strstr(s.msg, "cannot open"), "read_unit reports it too");

    /* another unit's file in its place */
    void *whole;
    size_t n;
    ASSERT(STATUS_OK(file_read_all(path1, &whole, &n)));
    ASSERT(STATUS_OK(file_write_atomic(path, whole, n)));
    free(whole);
    s = offload_acquire(&m, 3, OFFLOAD_READ, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "holds unit 1"), "foreign unit's file: %s", s.msg);
    offload_free(&m);
    remove_dir_files(dir, NULL, 4);

    /* a folder that cannot exist: a path under a regular file (root can write anywhere) */
    char file[512], bad[600];
    str_fmt(file, sizeof file, "%s/plainfile", tmpdir);
    ASSERT(STATUS_OK(file_write_atomic(file, "x", 1)));
    str_fmt(bad, sizeof bad, "%s/sub", file);
    make_spans(sp);
    OffloadOptions o = {.n_units = 2, .n_spans = N_SPANS, .spans = sp, .max_resident = 1, .tier = OFFLOAD_FILE, .dir = bad};
    s = offload_init(&m, &o);
    ok(!STATUS_OK(s) && strstr(s.msg, bad), "unusable folder: %s", s.msg);
    offload_free(&m);
    /* the folder disappears after init: the write-back error names the file and unit */
    str_fmt(dir, sizeof dir, "%s/gone", tmpdir);
    o.dir = dir;
    ASSERT(STATUS_OK(offload_init(&m, &o)));
    rmdir(dir);
    ASSERT(file_write_atomic(dir, "x", 1).code == 0);    /* now a regular file */
    offload_begin_step(&m, 0);
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_WRITE, NULL)));
    s = offload_acquire(&m, 1, OFFLOAD_WRITE, NULL);
    ok(!STATUS_OK(s) && strstr(s.msg, "unit 0") && strstr(s.msg, "writing the file tier failed") && strstr(s.msg, dir),
       "unwritable tier on eviction: %s", s.msg);
    ok(offload_is_resident(&m, 0), "the unit that could not be written back stays resident (not lost)");
    offload_free(&m);
    unlink(dir);
    unlink(file);
    o.tier = OFFLOAD_FILE;
    o.dir = "";
    s = offload_init(&m, &o);
    ok(!STATUS_OK(s) && strstr(s.msg, "offload.dir"), "file tier without a folder: %s", s.msg);
    for (int k = 0; k < N_SPANS; k++) xfree(src[k]);
}

/* a custom codec: bytes stored XOR 0xA5 and reversed (lossless, visibly different on disk) */
static size_t xor_bytes(const void *ctx, size_t raw) { (void)ctx; return raw; }
static void xor_enc(const void *ctx, void *dst, const void *src, size_t raw) {
    (void)ctx;
    for (size_t i = 0; i < raw; i++) ((uint8_t *)dst)[raw - 1 - i] = ((const uint8_t *)src)[i] ^ 0xA5;
}
static void xor_dec(const void *ctx, void *dst, const void *src, size_t raw) {
    (void)ctx;
    for (size_t i = 0; i < raw; i++) ((uint8_t *)dst)[i] = ((const uint8_t *)src)[raw - 1 - i] ^ 0xA5;
}

static void test_codecs(enum OffloadTier tier, const Backend *be) {
    enum { D = 96, R = 8, CNT = 2 };
    OffloadQuantSpec q16 = {QFORMAT_F16, CNT, D, R, 0}, q4 = {QFORMAT_INT4, CNT, D, R, 64};
    OffloadSpan sp[3];
    memset(sp, 0, sizeof sp);
    sp[0].bytes = CNT * D * R * 4; sp[0].kind = MEM_KIND_PARAM_FP32; sp[0].stored_kind = MEM_KIND_PARAM_FP16;
    sp[0].codec = offload_codec_quant(&q16);
    sp[1].bytes = CNT * D * R * 4; sp[1].kind = MEM_KIND_PARAM_FP32; sp[1].stored_kind = MEM_KIND_PARAM_INT4;
    sp[1].codec = offload_codec_quant(&q4);
    OffloadCodec x = {xor_bytes, xor_enc, xor_dec, NULL};
    sp[2].bytes = 333; sp[2].kind = MEM_KIND_OPTIM; sp[2].stored_kind = MEM_KIND_OPTIM; sp[2].codec = x;
    char dir[512];
    str_fmt(dir, sizeof dir, "%s/codec%d", tmpdir, (int)tier);
    MemAcct acct;
    memacct_init(&acct);
    OffloadOptions o = {.n_units = 3, .n_spans = 3, .spans = sp, .max_resident = 1, .tier = tier, .dir = dir,
                        .name = "q", .acct = &acct, .be = be};
    OffloadManager m;
    Status s = offload_init(&m, &o);
    ok(STATUS_OK(s), "codec manager init (slots: %s): %s", be ? be->ops->name : "host", s.msg);
    Rng rng;
    rng_init(&rng, 11, 0, RNG_TEST);
    float *w16 = xmalloc(sp[0].bytes), *w4 = xmalloc(sp[1].bytes), *e16 = xmalloc(sp[0].bytes), *e4 = xmalloc(sp[1].bytes);
    uint8_t *opt = xmalloc(333);
    for (int i = 0; i < CNT * D * R; i++) { w16[i] = 0.1f * rng_normal(&rng); w4[i] = 0.1f * rng_normal(&rng); }
    fill_random(&rng, opt, 333);
    memcpy(e16, w16, sp[0].bytes);
    memcpy(e4, w4, sp[1].bytes);
    for (int c = 0; c < CNT; c++) {
        quant_fake(e16 + c * D * R, D, R, QFORMAT_F16, 0, NULL);
        quant_fake(e4 + c * D * R, D, R, QFORMAT_INT4, 64, NULL);
    }
    offload_begin_step(&m, 0);
    float *p[3];
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_WRITE, (void **)p)));
    memcpy(p[0], w16, sp[0].bytes);
    memcpy(p[1], w4, sp[1].bytes);
    memcpy(p[2], opt, 333);
    ASSERT(STATUS_OK(offload_acquire(&m, 1, OFFLOAD_WRITE, NULL)));     /* evicts 0 through the codecs */
    ok(m.enc_bytes < m.raw_bytes / 2, "stored unit %zu bytes vs %zu resident", m.enc_bytes, m.raw_bytes);
    ASSERT(STATUS_OK(offload_acquire(&m, 0, OFFLOAD_READ, (void **)p)));
    ok(memcmp(p[0], e16, sp[0].bytes) == 0, "FP16 span comes back as decode(encode(x)) exactly");
    ok(memcmp(p[1], e4, sp[1].bytes) == 0, "INT4 span comes back as decode(encode(x)) exactly");
    ok(memcmp(p[2], opt, 333) == 0, "custom codec span comes back bit for bit");
    enum MemTier bt = tier == OFFLOAD_HOST ? MEM_TIER_HOST : MEM_TIER_FILE;
    /* units 0 and 1 have both been written back once */
    ok(memacct_current(&acct, bt, MEM_KIND_PARAM_FP16) == (int64_t)(2 * CNT * qtensor_bytes(QFORMAT_F16, D, R, 0)) &&
       memacct_current(&acct, bt, MEM_KIND_PARAM_INT4) > 0 &&
       memacct_current(&acct, MEM_TIER_DEVICE, MEM_KIND_PARAM_FP32) == (int64_t)(sp[0].bytes + sp[1].bytes),
       "memacct: stored copies by precision in the %s tier, resident FP32 on device", memacct_tier_name(bt));
    if (tier == OFFLOAD_FILE) {
        char path[1024];
        offload_unit_path(&m, 0, path, sizeof path);
        void *whole;
        size_t n;
        ASSERT(STATUS_OK(file_read_all(path, &whole, &n)));
        ok(n == 32 + m.enc_bytes && memcmp(whole, "DCMOFFL1", 8) == 0, "file = 32-byte header + %zu encoded bytes", m.enc_bytes);
        free(whole);
    }
    offload_free(&m);
    if (tier == OFFLOAD_FILE) remove_dir_files(dir, "q", 3);
    xfree(w16); xfree(w4); xfree(e16); xfree(e4); xfree(opt);
}

/* the file tier's checksum (util's slicing-by-8 CRC32) against the byte-wise definition */
static uint32_t crc_ref(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc & 1) ? 0xEDB88320u ^ (crc >> 1) : crc >> 1;
    }
    return ~crc;
}

static void test_crc(void) {
    ok(crc32_update(0, "123456789", 9) == 0xCBF43926u, "crc32(\"123456789\") == 0xCBF43926");
    Rng rng;
    rng_init(&rng, 5, 0, RNG_TEST);
    uint8_t buf[300];
    fill_random(&rng, buf, sizeof buf);
    long bad = 0;
    for (size_t off = 0; off < 9; off++)
        for (size_t n = 0; n + off <= sizeof buf; n += 7) {
            if (crc32_update(0, buf + off, n) != crc_ref(0, buf + off, n)) bad++;
            size_t h = n / 3;
            if (crc32_update(crc32_update(0, buf + off, h), buf + off + h, n - h) != crc_ref(0, buf + off, n)) bad++;
        }
    ok(bad == 0, "crc32 equals the bit-wise definition for every length/alignment, also split in two (%ld wrong)", bad);
}

static void test_memacct(void) {
    MemAcct a;
    memacct_init(&a);
    memacct_add(&a, MEM_TIER_DEVICE, MEM_KIND_PARAM_FP32, 1000);
    memacct_add(&a, MEM_TIER_DEVICE, MEM_KIND_ACT, 500);
    memacct_sub(&a, MEM_TIER_DEVICE, MEM_KIND_ACT, 500);
    memacct_add(&a, MEM_TIER_DEVICE, MEM_KIND_COMM, 300);
    memacct_add(&a, MEM_TIER_HOST, MEM_KIND_PARAM_INT4, 40);
    ok(memacct_current(&a, MEM_TIER_DEVICE, MEM_KIND_ACT) == 0 && memacct_peak(&a, MEM_TIER_DEVICE, MEM_KIND_ACT) == 500,
       "memacct: current and peak per cell");
    ok(memacct_tier_current(&a, MEM_TIER_DEVICE) == 1300 && memacct_tier_peak(&a, MEM_TIER_DEVICE) == 1500,
       "memacct: tier peak is the peak of the sum (1500), not the sum of peaks (1800)");
    ok(memacct_kind_current(&a, MEM_KIND_PARAM_INT4) == 40 && memacct_param_kind(QFORMAT_INT4) == MEM_KIND_PARAM_INT4 &&
       memacct_param_kind(QFORMAT_F16) == MEM_KIND_PARAM_FP16, "memacct: kinds and precisions");
    memacct_reset_peaks(&a);
    ok(memacct_tier_peak(&a, MEM_TIER_DEVICE) == 1300 && memacct_peak(&a, MEM_TIER_DEVICE, MEM_KIND_ACT) == 0,
       "memacct: reset_peaks restarts from current");
    char buf[2048];
    size_t n = memacct_format(&a, buf, sizeof buf);
    ok(n > 0 && strstr(buf, "param_int4") && strstr(buf, "device") && strlen(buf) == n, "memacct_format (%zu chars)", n);
    char tiny[16];
    n = memacct_format(&a, tiny, sizeof tiny);
    ok(n == 15 && strlen(tiny) == 15, "memacct_format truncates safely");

    MemProc p;
    Status s = memacct_proc_parse(&p, "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n", "sample");
    ok(STATUS_OK(s) && p.hwm == 2048 * 1024 && p.rss == 1024 * 1024, "parse VmHWM/VmRSS");
    s = memacct_proc_parse(&p, "Name:\tx\nVmRSS:\t 1 kB\n", "sample");
    ok(!STATUS_OK(s) && strstr(s.msg, "VmHWM"), "missing VmHWM: %s", s.msg);
    MemProc before, after;
    s = memacct_proc(&before);
    ok(STATUS_OK(s) && before.rss > 0 && before.hwm >= before.rss, "process: rss %lld, hwm %lld", (long long)before.rss,
       (long long)before.hwm);
    size_t big = (size_t)64 << 20;
    char *mem = xmalloc(big);
    memset(mem, 1, big);
    ASSERT(STATUS_OK(memacct_proc(&after)));
    ok(after.hwm >= before.rss + (int64_t)big - (8 << 20), "touching 64 MiB raises the measured peak (%lld -> %lld)",
       (long long)before.hwm, (long long)after.hwm);
    xfree(mem);
}

int main(void) {
    str_fmt(tmpdir, sizeof tmpdir, "offload_test_XXXXXX");
    if (!mkdtemp(tmpdir)) { printf("# mkdtemp failed\n"); return 1; }
    test_crc();
    test_memacct();
    test_lru_pins_idle();
    test_fetch_hook();
    for (int tier = 0; tier < 2; tier++) {
        test_random((enum OffloadTier)tier, 1, 0, PREFETCH_NONE, 100 + tier, NULL);
        test_device_slots((enum OffloadTier)tier, 2, 0, PREFETCH_NONE, 200 + tier);
        test_device_slots((enum OffloadTier)tier, 2, 3, PREFETCH_EMA, 300 + tier);
        test_random((enum OffloadTier)tier, 0, 2, PREFETCH_NONE, 400 + tier, NULL);
        test_codecs((enum OffloadTier)tier, NULL);
        Backend dfr = defer_backend();
        memset(&DQ, 0, sizeof DQ);
        test_codecs((enum OffloadTier)tier, &dfr);
        ok(DQ.hazards == 0 && DQ.n == 0 && DQ.copies > 0, "codecs with deferred device slots: %ld copies, no hazard",
           DQ.copies);
        test_in_place((enum OffloadTier)tier);
    }
    test_file_errors();
    rmdir(tmpdir);
    return harness_done();
}
