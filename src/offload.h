/* offload: THE residency manager of dcmoe (one per rank and layer) over n_units units — the
 * stored expert groups of inference (precision.c) and the trained expert units with their Adam
 * moments (residency.c). A unit is a fixed list of byte spans; every unit has the same spans.
 * The resident tier is either a pool of max_resident slots the manager owns, or the caller's
 * own memory ("in place": locate gives each span's fixed address; every unit starts resident
 * and max_resident is enforced at end_step). A unit that is not resident lives in the backing
 * tier — host memory or one file per unit (header + CRC32 + payload, atomic temp + rename) —
 * optionally in a smaller encoded form (a per-span codec, e.g. FP16/INT4 from quant.h). LRU
 * eviction of unpinned units, idle eviction after idle_steps, optional EMA predictive prefetch,
 * hooks on fetch and eviction, per-step statistics.
 * Device slots (OffloadOptions.be): the slot pool is the backend's memory (be->alloc), the host
 * tier, the file staging buffer and a transfer buffer are pinned host memory
 * (host_alloc_pinned); a fetch is copy_to_device_async on the backend's side stream (the file
 * tier reads the file into the pinned staging buffer first: file -> pinned -> device), whose
 * event the compute stream waits for (wait_event) only when the unit's pointers are handed out
 * (offload_acquire with spans, offload_wait), so the EMA prefetch's copies issued at end_step
 * overlap the next step's compute; a writeback copies the slot to the pinned transfer buffer and
 * waits (sync_event). A host buffer is reused or freed only after its last transfer's
 * sync_event. With the CPU backend the same code runs with synchronous memcpys: the bytes and
 * statistics are those of host slots.
 * Does not: talk to other ranks, decide what a unit contains, or (device slots) keep units in
 * place (locate) or call hooks (on_fetch, on_evict would see device pointers; refused).
 * The file tier is this manager's scratch
 * (files are rewritten freely and not a checkpoint; use offload_read_unit to save units).
 * Memory: the manager owns the slots, the host copies and a staging buffer; pointers from
 * offload_acquire / offload_span are valid until the unit is evicted, i.e. until the next
 * acquire, pin or end_step call that may evict it — pin a unit to keep its pointers for a step.
 * A host copy made stale by a dirty resident unit is freed at once (a unit's bytes are then in
 * one tier only); a stale file stays until it is overwritten.
 *
 * Step protocol (one training step):
 *   offload_begin_step(m, step);                 // clears last step's pins and step stats
 *   offload_pin(m, groups, n, OFFLOAD_WRITE);    // after stage-1 routing: fetch all, pin them
 *   ... compute with offload_span(m, unit, span) ...   (or offload_acquire one at a time)
 *   offload_end_step(m);                         // EMA, idle eviction, cap, prefetch
 * Counting: every acquire (and every unit of a pin, and every unit offload_fetch_all brings
 * back) is one access: a hit if the unit was resident, a miss otherwise (a failed acquire too);
 * hits + misses == acquires. bytes_in/bytes_out are bytes read from / written to the backing
 * tier (encoded size, spans at 8-byte aligned offsets; file tier: payload + 32-byte header).
 * Writes happen only for dirty units (OFFLOAD_WRITE, or an on_fetch that modified the unit). */
#ifndef DCMOE_OFFLOAD_H
#define DCMOE_OFFLOAD_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "util.h"
#include "config.h"
#include "memacct.h"
#include "quant.h"
#include "backend.h"

/* ---- codecs: how a span is stored outside the resident tier ---- */
typedef struct OffloadCodec {
    /* bytes of the encoded form of a span of raw_bytes */
    size_t (*encoded_bytes)(const void *ctx, size_t raw_bytes);
    /* dst[encoded_bytes] <- src[raw_bytes];  dst[raw_bytes] <- src[encoded_bytes]
     * dst is 8-byte aligned in both directions */
    void (*encode)(const void *ctx, void *dst, const void *src, size_t raw_bytes);
    void (*decode)(const void *ctx, void *dst, const void *src, size_t raw_bytes);
    const void *ctx;         /* must outlive the manager */
} OffloadCodec;

/* a span holding `count` FP32 matrices [rows, cols] stored in fmt (quant.h layouts) */
typedef struct OffloadQuantSpec {
    enum QFormat fmt;
    int count, rows, cols, group;
} OffloadQuantSpec;
/* a codec over spec (spec must outlive the manager); the span's bytes must be
 * count*rows*cols*4. Lossy for fp16/int4: a fetched unit holds decode(encode(x)). */
OffloadCodec offload_codec_quant(const OffloadQuantSpec *spec);

typedef struct OffloadSpan {
    size_t bytes;            /* raw (resident) bytes; the same for every unit */
    enum MemKind kind;       /* accounting kind while resident */
    enum MemKind stored_kind;/* accounting kind of the backing copy */
    OffloadCodec codec;      /* all NULL = stored verbatim */
} OffloadSpan;

typedef struct OffloadOptions {
    int n_units;
    int n_spans;
    const OffloadSpan *spans;    /* [n_spans], copied */
    int max_resident;            /* slots; 0 = every unit has a slot (no cap) */
    int idle_steps;              /* evict a unit unused for this many steps; 0 = never */
    enum OffloadTier tier;       /* OFFLOAD_HOST | OFFLOAD_FILE */
    const char *dir;             /* file tier: folder (created); copied */
    const char *name;            /* file tier: file name prefix, e.g. "layer03" (may be NULL) */
    bool no_fsync;               /* file tier: temp + rename without fsync (the files are scratch:
                                  * still never torn, but not durable across a machine crash) */
    enum PrefetchKind prefetch;  /* PREFETCH_NONE | PREFETCH_EMA */
    double prefetch_ema;         /* EMA rate a: ema = (1-a) ema + a [used this step] */
    double prefetch_min;         /* prefetch units with ema >= this (0 = 0.25) */
    MemAcct *acct;               /* optional: slot bytes go to DEVICE (not in place), copies to HOST/FILE */
    /* optional, in place: span s of unit u lives at locate(ctx, u, s), a fixed address in the
     * caller's memory (e.g. the model's expert arrays), which the caller may write while the
     * unit is resident. The manager then owns no slots: every unit starts resident with the
     * content found there (dirty: it has no backing copy yet); within a step any number of units
     * may be resident and offload_end_step evicts down to max_resident (LRU). Not with prefetch. */
    void *(*locate)(void *ctx, int unit, int span);
    /* optional: called after a unit's content arrives (demand fetch, prefetch, fetch_all),
     * before anyone sees it; e.g. the trainer catching up the AdamW steps a group skipped
     * while offloaded (run them with zero gradients, in order, for bitwise-equal training).
     * Set *modified (starts false) when the content changed, so eviction writes it back.
     * An error leaves the unit non-resident and is returned to the caller. */
    Status (*on_fetch)(void *ctx, int unit, void *const *spans, bool *modified);
    /* optional: called when a unit has left the resident tier (its content is safe in the
     * backing tier), with its span pointers; e.g. giving the pages of an in-place unit back */
    void (*on_evict)(void *ctx, int unit, void *const *spans);
    void *ctx;                   /* for locate, on_fetch, on_evict */
    /* optional: device slots in this backend's memory (see the top of this file); NULL = host
     * slots (malloc). Not with locate, on_fetch or on_evict. Must outlive the manager. */
    const Backend *be;
} OffloadOptions;

/* fill max_resident, idle_steps, tier, dir, prefetch, prefetch_ema from the config section;
 * with enabled = false: no cap, no idle eviction, no prefetch (every unit stays resident).
 * n_units, spans, name, acct are the caller's; dir points into c, and the caller replaces an
 * empty dir by <run dir>/offload */
void offload_options_from_config(OffloadOptions *o, const OffloadConfig *c);

typedef struct OffloadStats {
    int64_t acquires, hits, misses;
    int64_t prefetches;          /* units fetched ahead by the EMA predictor */
    int64_t prefetch_hits;       /* first accesses that found a prefetched unit */
    int64_t evictions;           /* units that left the resident tier (any reason) */
    int64_t idle_evictions;      /* of which for idleness */
    int64_t writebacks;          /* evictions/flushes that wrote a dirty unit back */
    int64_t bytes_in, bytes_out; /* backing-tier bytes read / written */
    double stall_s;              /* time inside acquire/pin moving data (compute waits) */
    double background_s;         /* time inside end_step (idle writebacks, prefetch) */
    int64_t resident_bytes;      /* raw bytes in occupied slots, now */
    int64_t peak_resident_bytes; /* max of resident_bytes over the step / the run */
    int resident_units;
} OffloadStats;

enum OffloadAccess { OFFLOAD_READ = 0, OFFLOAD_WRITE = 1 };

typedef struct OffloadUnitState {  /* private */
    int slot;                    /* -1 = not resident */
    bool backed;                 /* the backing copy holds the unit (false: never written = zeros) */
    bool dirty;                  /* the resident copy is newer than the backing copy */
    bool pinned;
    bool used;                   /* accessed in the current step */
    bool prefetched;             /* fetched by the predictor and not accessed since */
    int64_t tick;                /* LRU clock at the last access */
    long last_step;              /* step of the last access (or of the fetch) */
    double ema;
} OffloadUnitState;

typedef struct OffloadManager {
    int n_units, n_spans, n_slots, idle_steps;
    int max_resident;            /* resident units after end_step (<= n_slots; in place: the cap) */
    enum OffloadTier tier;
    enum PrefetchKind prefetch;
    double prefetch_ema, prefetch_min;
    OffloadSpan *spans;          /* [n_spans] */
    size_t *raw_off, *enc_off;   /* [n_spans] offsets in a slot / in the encoded unit */
    size_t raw_bytes, enc_bytes; /* per unit */
    OffloadUnitState *units;     /* [n_units] */
    int *slot_unit;              /* [n_slots] unit in the slot or -1 */
    void **slot_mem;             /* [n_slots] raw unit memory, allocated on first use */
    void **host;                 /* [n_units] host-tier copies (encoded), allocated on write, freed when stale */
    void *stage;                 /* file tier: header + encoded unit */
    void **slot_ptrs;            /* [n_spans] scratch span pointers */
    int *mark;                   /* [n_units] scratch for offload_pin */
    char dir[512], name[64];
    bool no_fsync;
    MemAcct *acct;
    void *(*locate)(void *ctx, int unit, int span);
    Status (*on_fetch)(void *ctx, int unit, void *const *spans, bool *modified);
    void (*on_evict)(void *ctx, int unit, void *const *spans);
    void *ctx;
    const Backend *be;           /* device slots (NULL: host slots) */
    uint64_t *slot_ev;           /* [n_slots] device slots: the event of the last copy into the slot */
    uint64_t *host_ev;           /* [n_units] device slots: the last transfer reading the unit's host copy */
    uint64_t stage_ev;           /* the last transfer reading the file staging buffer */
    void *xfer;                  /* device slots: pinned [raw_bytes] for codecs and writebacks (lazy) */
    uint64_t xfer_ev;            /* the last transfer reading or writing xfer */
    long step;
    int64_t clock;
    OffloadStats step_stats, total_stats;
} OffloadManager;

Status offload_init(OffloadManager *m, const OffloadOptions *o);
void offload_free(OffloadManager *m);       /* zeroed / twice: safe; leaves files in place */

void offload_begin_step(OffloadManager *m, long step);
/* acquire every unit in units[n] (duplicates allowed) and pin it until end_step (members of
 * the set never evict each other);
 * error when more distinct units are needed than there are slots, or on I/O errors */
Status offload_pin(OffloadManager *m, const int *units, int n, enum OffloadAccess acc);
void offload_unpin(OffloadManager *m, int unit);
/* make unit resident (fetching, evicting the LRU unpinned unit if no slot is free);
 * spans (may be NULL) receives the n_spans pointers (device slots: then ordered after the
 * unit's arrival, as by offload_wait). OFFLOAD_WRITE marks the unit dirty. */
Status offload_acquire(OffloadManager *m, int unit, enum OffloadAccess acc, void **spans);
/* pointer to span s of a RESIDENT unit (ASSERT otherwise); no stats, no LRU update. Device
 * slots: backend memory whose content may still be in flight: call offload_wait before use */
void *offload_span(const OffloadManager *m, int unit, int span);
/* device slots: the compute stream's later work waits for the resident unit's arrival (its
 * fetch's event only; the host does not block). offload_acquire with spans does this itself;
 * offload_pin does not (wait per unit when it is used). Host slots: a no-op */
void offload_wait(OffloadManager *m, int unit);
/* EMA update, idle eviction, eviction down to max_resident (LRU; in place), prefetch */
Status offload_end_step(OffloadManager *m);
/* make every unit resident (before checkpoints, re-clustering, migration); needs a slot per
 * unit (no cap, or in place). Each fetch counts as a miss, but not as a use: the LRU order and
 * the idle clock keep the unit's last real access, so it leaves again when idle. */
Status offload_fetch_all(OffloadManager *m);
/* explicit eviction (writes back if dirty); no-op if not resident; error if pinned */
Status offload_evict(OffloadManager *m, int unit);
/* write every dirty resident unit back (they stay resident and become clean) */
Status offload_flush(OffloadManager *m);

/* copy unit's current content into dst[n_spans] (raw layout) wherever it lives; no stats,
 * no residency change (checkpoints, tests). A unit never written reads as zeros. */
Status offload_read_unit(OffloadManager *m, int unit, void *const *dst);
/* replace unit's content from src[n_spans] (resident copy if resident, else the backing tier) */
Status offload_write_unit(OffloadManager *m, int unit, const void *const *src);

static inline bool offload_is_resident(const OffloadManager *m, int unit) { return m->units[unit].slot >= 0; }
static inline const OffloadStats *offload_step_stats(const OffloadManager *m) { return &m->step_stats; }
static inline const OffloadStats *offload_total_stats(const OffloadManager *m) { return &m->total_stats; }
/* the file of a unit in the file tier (for messages and tests) */
void offload_unit_path(const OffloadManager *m, int unit, char *buf, size_t cap);

#endif
