/* offload: the residency manager (see offload.h) — slots or in-place units, LRU, idle and cap
 * eviction, EMA prefetch, the host and file backing tiers with the one unit file format (header,
 * CRC32, payload; atomic temp + rename writes, checked reads), codecs, per-step statistics;
 * host slots (malloc) or device slots (backend memory, pinned host buffers, transfers on the
 * backend's side stream ordered by events: dev_load, dev_unload).
 * Does not: know what the units mean (hooks do), or overlap the file tier's reads or the
 * codecs' work with anything (they run on the calling thread). */
#include "offload.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define OFFLOAD_MAGIC "DCMOFFL1"
#define OFFLOAD_VERSION 1u

/* file tier: one file per unit = header + encoded spans (each at an 8-byte aligned offset) */
typedef struct OffloadFileHeader {
    char magic[8];           /* OFFLOAD_MAGIC */
    uint32_t version;
    uint32_t unit;
    uint32_t n_spans;
    uint32_t crc;            /* CRC32 of the payload */
    uint64_t payload;        /* encoded bytes after the header */
} OffloadFileHeader;
_Static_assert(sizeof(OffloadFileHeader) == 32, "offload file header is 32 bytes");

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* ---------------------------------------------------------------------------------------
 * the quant codec */

static size_t qcodec_bytes(const void *ctx, size_t raw_bytes) {
    const OffloadQuantSpec *q = ctx;
    int count = q->count > 0 ? q->count : 1;
    ASSERTF(raw_bytes == (size_t)count * q->rows * q->cols * sizeof(float),
            "offload: quant codec for %d x [%d,%d] given a span of %zu bytes", count, q->rows, q->cols, raw_bytes);
    return (size_t)count * align_up(qtensor_bytes(q->fmt, q->rows, q->cols, q->group), 8);
}

static void qcodec_encode(const void *ctx, void *dst, const void *src, size_t raw_bytes) {
    const OffloadQuantSpec *q = ctx;
    int count = q->count > 0 ? q->count : 1;
    size_t stride = align_up(qtensor_bytes(q->fmt, q->rows, q->cols, q->group), 8), n = (size_t)q->rows * q->cols;
    (void)raw_bytes;
    for (int i = 0; i < count; i++) {
        QTensor t;
        Status s = qtensor_view(&t, q->fmt, q->rows, q->cols, q->group, (char *)dst + i * stride);
        ASSERTF(STATUS_OK(s), "%s", s.msg);
        qtensor_encode(&t, (const float *)src + i * n);
    }
}

static void qcodec_decode(const void *ctx, void *dst, const void *src, size_t raw_bytes) {
    const OffloadQuantSpec *q = ctx;
    int count = q->count > 0 ? q->count : 1;
    size_t stride = align_up(qtensor_bytes(q->fmt, q->rows, q->cols, q->group), 8), n = (size_t)q->rows * q->cols;
    (void)raw_bytes;
    for (int i = 0; i < count; i++) {
        QTensor t;
        Status s = qtensor_view(&t, q->fmt, q->rows, q->cols, q->group, (char *)src + i * stride);
        ASSERTF(STATUS_OK(s), "%s", s.msg);
        qtensor_decode(&t, (float *)dst + i * n);
    }
}

OffloadCodec offload_codec_quant(const OffloadQuantSpec *spec) {
    OffloadCodec c = {qcodec_bytes, qcodec_encode, qcodec_decode, spec};
    return c;
}

void offload_options_from_config(OffloadOptions *o, const OffloadConfig *c) {
    o->max_resident = c->enabled ? c->max_resident_groups : 0;
    o->idle_steps = c->enabled ? c->idle_steps : 0;
    o->tier = c->tier;
    o->dir = c->dir;
    o->prefetch = c->enabled ? c->prefetch : PREFETCH_NONE;
    o->prefetch_ema = c->prefetch_ema;
}

/* ---------------------------------------------------------------------------------------
 * bookkeeping */

#define BUMP(m, field, v) do { (m)->step_stats.field += (v); (m)->total_stats.field += (v); } while (0)

static size_t span_enc_bytes(const OffloadSpan *s) {
    return s->codec.encoded_bytes ? s->codec.encoded_bytes(s->codec.ctx, s->bytes) : s->bytes;
}

/* slot bytes of span s including its alignment padding (the spans tile the slot exactly) */
static size_t span_slot_bytes(const OffloadManager *m, int s) {
    return (s + 1 < m->n_spans ? m->raw_off[s + 1] : m->raw_bytes) - m->raw_off[s];
}

static void acct_resident(OffloadManager *m, int sign) {
    for (int s = 0; s < m->n_spans; s++)
        if (m->acct && !m->locate) memacct_add(m->acct, MEM_TIER_DEVICE, m->spans[s].kind, sign * (int64_t)span_slot_bytes(m, s));
    int64_t d = sign * (int64_t)m->raw_bytes;
    OffloadStats *st[2] = {&m->step_stats, &m->total_stats};
    for (int i = 0; i < 2; i++) {
        st[i]->resident_bytes += d;
        st[i]->resident_units += sign;
        if (st[i]->resident_bytes > st[i]->peak_resident_bytes) st[i]->peak_resident_bytes = st[i]->resident_bytes;
    }
}

static void acct_backing(OffloadManager *m, enum MemTier tier, int sign) {
    if (!m->acct) return;
    for (int s = 0; s < m->n_spans; s++)
        memacct_add(m->acct, tier, m->spans[s].stored_kind, sign * (int64_t)span_enc_bytes(&m->spans[s]));
}

void offload_unit_path(const OffloadManager *m, int unit, char *buf, size_t cap) {
    if (m->name[0]) str_fmt(buf, cap, "%s/%s_unit%05d.off", m->dir, m->name, unit);
    else str_fmt(buf, cap, "%s/unit%05d.off", m->dir, unit);
}

static void encode_unit(const OffloadManager *m, void *enc, const void *const *src) {
    for (int s = 0; s < m->n_spans; s++) {
        const OffloadSpan *sp = &m->spans[s];
        char *d = (char *)enc + m->enc_off[s];
        if (sp->codec.encode) sp->codec.encode(sp->codec.ctx, d, src[s], sp->bytes);
        else memcpy(d, src[s], sp->bytes);
    }
}

static void decode_unit(const OffloadManager *m, void *const *dst, const void *enc) {
    for (int s = 0; s < m->n_spans; s++) {
        const OffloadSpan *sp = &m->spans[s];
        const char *e = (const char *)enc + m->enc_off[s];
        if (sp->codec.decode) sp->codec.decode(sp->codec.ctx, dst[s], e, sp->bytes);
        else memcpy(dst[s], e, sp->bytes);
    }
}

/* span pointers of unit in slot (its place in the caller's memory when in place); ptrs[n_spans] */
static void unit_ptrs(const OffloadManager *m, int unit, int slot, void **ptrs) {
    for (int s = 0; s < m->n_spans; s++)
        ptrs[s] = m->locate ? m->locate(m->ctx, unit, s) : (char *)m->slot_mem[slot] + m->raw_off[s];
}

/* ---- host buffers of device slots: pinned, reused or freed only after their last transfer ---- */
static bool dev(const OffloadManager *m) { return m->be != NULL; }
static void ev_sync(const OffloadManager *m, uint64_t *ev) {
    if (*ev) m->be->ops->sync_event(m->be->ctx, *ev);
    *ev = 0;
}
static void *host_buf_alloc(const OffloadManager *m, size_t bytes) {
    return dev(m) ? m->be->ops->host_alloc_pinned(m->be->ctx, bytes ? bytes : 1) : xmalloc(bytes ? bytes : 1);
}
static void host_buf_free(const OffloadManager *m, void *p) {
    if (dev(m)) m->be->ops->host_free_pinned(m->be->ctx, p);
    else xfree(p);
}
static void host_copy_free(OffloadManager *m, int unit) {
    if (dev(m)) ev_sync(m, &m->host_ev[unit]);
    host_buf_free(m, m->host[unit]);
    m->host[unit] = NULL;
}

/* the resident copy of unit is now newer than its backing copy: a host copy is garbage */
static void mark_dirty(OffloadManager *m, int unit) {
    m->units[unit].dirty = true;
    if (m->tier != OFFLOAD_HOST || !m->host[unit]) return;
    acct_backing(m, MEM_TIER_HOST, -1);
    host_copy_free(m, unit);
    m->host[unit] = NULL;
    m->units[unit].backed = false;
}

/* ---------------------------------------------------------------------------------------
 * the backing tiers */

static Status file_write_unit(OffloadManager *m, int unit) {
    OffloadFileHeader h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, OFFLOAD_MAGIC, 8);
    h.version = OFFLOAD_VERSION;
    h.unit = (uint32_t)unit;
    h.n_spans = (uint32_t)m->n_spans;
    h.payload = m->enc_bytes;
    h.crc = crc32_update(0, (char *)m->stage + sizeof h, m->enc_bytes);
    memcpy(m->stage, &h, sizeof h);
    char path[1024];
    offload_unit_path(m, unit, path, sizeof path);
    Status s = file_write_replace(path, m->stage, sizeof h + m->enc_bytes, !m->no_fsync);
    if (!STATUS_OK(s)) return status_errorf("offload: unit %d: writing the file tier failed: %s", unit, s.msg);
    return status_ok();
}

/* read and verify the file of unit into m->stage (header + payload) */
static Status file_read_unit(OffloadManager *m, int unit) {
    char path[1024];
    offload_unit_path(m, unit, path, sizeof path);
    size_t want = sizeof(OffloadFileHeader) + m->enc_bytes;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return status_errorf("offload: unit %d: %s: cannot open: %s (the file tier lost this unit)", unit, path,
                             strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return status_errorf("offload: unit %d: %s: cannot stat: %s", unit, path, strerror(e));
    }
    if ((size_t)st.st_size != want) {
        close(fd);
        return status_errorf("offload: unit %d: %s: %lld bytes, expected %zu (truncated or from another layout)",
                             unit, path, (long long)st.st_size, want);
    }
    size_t got = 0;
    while (got < want) {
        ssize_t r = read(fd, (char *)m->stage + got, want - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int e = r < 0 ? errno : 0;
            close(fd);
            return status_errorf("offload: unit %d: %s: short read (%zu of %zu bytes)%s%s", unit, path, got, want,
                                 e ? ": " : "", e ? strerror(e) : "");
        }
        got += (size_t)r;
    }
    close(fd);
    OffloadFileHeader h;
    memcpy(&h, m->stage, sizeof h);
    if (memcmp(h.magic, OFFLOAD_MAGIC, 8) != 0)
        return status_errorf("offload: unit %d: %s: not an offload file (bad magic)", unit, path);
    if (h.version != OFFLOAD_VERSION)
        return status_errorf("offload: unit %d: %s: version %u, expected %u", unit, path, h.version, OFFLOAD_VERSION);
    if (h.unit != (uint32_t)unit || h.n_spans != (uint32_t)m->n_spans || h.payload != m->enc_bytes)
        return status_errorf("offload: unit %d: %s: holds unit %u with %u spans and %llu bytes, expected unit %d, "
                             "%d spans, %zu bytes", unit, path, h.unit, h.n_spans, (unsigned long long)h.payload,
                             unit, m->n_spans, m->enc_bytes);
    uint32_t crc = crc32_update(0, (char *)m->stage + sizeof h, m->enc_bytes);
    if (crc != h.crc)
        return status_errorf("offload: unit %d: %s: CRC mismatch (stored %08x, computed %08x): the file is corrupt",
                             unit, path, h.crc, crc);
    return status_ok();
}

/* store src[n_spans] (raw) as unit's backing copy */
static Status backing_store(OffloadManager *m, int unit, const void *const *src) {
    OffloadUnitState *u = &m->units[unit];
    if (m->tier == OFFLOAD_HOST) {
        if (!m->host[unit]) {
            m->host[unit] = host_buf_alloc(m, m->enc_bytes);
            acct_backing(m, MEM_TIER_HOST, +1);
        }
        if (dev(m)) ev_sync(m, &m->host_ev[unit]);   /* a fetch may still read the old copy */
        encode_unit(m, m->host[unit], src);
    } else {
        if (dev(m)) ev_sync(m, &m->stage_ev);
        encode_unit(m, (char *)m->stage + sizeof(OffloadFileHeader), src);
        TRY(file_write_unit(m, unit));
        if (!u->backed) acct_backing(m, MEM_TIER_FILE, +1);
    }
    u->backed = true;
    return status_ok();
}

/* load unit's backing copy into dst[n_spans] (raw); zeros if never stored */
static Status backing_load(OffloadManager *m, int unit, void *const *dst) {
    if (!m->units[unit].backed) {
        for (int s = 0; s < m->n_spans; s++) memset(dst[s], 0, m->spans[s].bytes);
        return status_ok();
    }
    if (m->tier == OFFLOAD_HOST) {
        decode_unit(m, dst, m->host[unit]);
    } else {
        if (dev(m)) ev_sync(m, &m->stage_ev);
        TRY(file_read_unit(m, unit));
        decode_unit(m, dst, (char *)m->stage + sizeof(OffloadFileHeader));
    }
    return status_ok();
}

/* ---- device slots: the backing tier <-> the slot over the side stream ---- */

static void *xfer_buf(OffloadManager *m) {
    if (!m->xfer) {
        m->xfer = host_buf_alloc(m, m->raw_bytes);
        if (m->acct) memacct_add(m->acct, MEM_TIER_HOST, MEM_KIND_SCRATCH, (int64_t)(m->raw_bytes ? m->raw_bytes : 1));
    }
    return m->xfer;
}

/* device slot s <- unit's backing copy: zeros (on the compute stream) if never stored, else
 * per span one copy_to_device_async from the pinned host copy or the pinned file staging
 * buffer (a codec decodes into the pinned transfer buffer first); slot_ev[s] = the last copy */
static Status dev_load(OffloadManager *m, int unit, int s) {
    const BackendOps *op = m->be->ops;
    void *cx = m->be->ctx;
    char *slot = m->slot_mem[s];
    if (!m->units[unit].backed) {
        ev_sync(m, &m->slot_ev[s]);   /* an older copy into this slot must not land after the zeros */
        for (int q = 0; q < m->n_spans; q++) op->zero(cx, slot + m->raw_off[q], m->spans[q].bytes);
        return status_ok();
    }
    const char *enc;
    if (m->tier == OFFLOAD_HOST) enc = m->host[unit];
    else {
        ev_sync(m, &m->stage_ev);
        TRY(file_read_unit(m, unit));
        enc = (const char *)m->stage + sizeof(OffloadFileHeader);
    }
    uint64_t ev = 0;
    bool coded = false;
    for (int q = 0; q < m->n_spans; q++) {
        const OffloadSpan *sp = &m->spans[q];
        const void *src = enc + m->enc_off[q];
        if (sp->codec.decode) {
            if (!coded) { xfer_buf(m); ev_sync(m, &m->xfer_ev); coded = true; }
            sp->codec.decode(sp->codec.ctx, (char *)m->xfer + m->raw_off[q], src, sp->bytes);
            src = (const char *)m->xfer + m->raw_off[q];
        }
        uint64_t e = op->copy_to_device_async(cx, slot + m->raw_off[q], src, sp->bytes);
        if (e) ev = e;
    }
    m->slot_ev[s] = ev;
    if (m->tier == OFFLOAD_HOST) m->host_ev[unit] = ev;
    else m->stage_ev = ev;
    if (coded) m->xfer_ev = ev;
    return status_ok();
}

/* the raw content of device slot s in the pinned transfer buffer (copy_to_host_async after the
 * compute enqueued so far, then the host waits); ptrs[n_spans] point into it */
static void dev_unload(OffloadManager *m, int s, void **ptrs) {
    const BackendOps *op = m->be->ops;
    void *cx = m->be->ctx;
    char *x = xfer_buf(m);
    ev_sync(m, &m->xfer_ev);
    uint64_t ev = 0;
    for (int q = 0; q < m->n_spans; q++) {
        uint64_t e = op->copy_to_host_async(cx, x + m->raw_off[q], (const char *)m->slot_mem[s] + m->raw_off[q],
                                            m->spans[q].bytes);
        if (e) ev = e;
        ptrs[q] = x + m->raw_off[q];
    }
    m->xfer_ev = ev;
    ev_sync(m, &m->xfer_ev);
}

/* give slot s's memory back (after its last copy: a copy must not land in freed memory) */
static void slot_release(OffloadManager *m, int s) {
    if (!m->slot_mem[s]) return;
    if (dev(m)) {
        ev_sync(m, &m->slot_ev[s]);
        m->be->ops->free(m->be->ctx, m->slot_mem[s]);
    } else xfree(m->slot_mem[s]);
    m->slot_mem[s] = NULL;
}

static int64_t backing_io_bytes(const OffloadManager *m) {
    return (int64_t)m->enc_bytes + (m->tier == OFFLOAD_FILE ? (int64_t)sizeof(OffloadFileHeader) : 0);
}

/* ---------------------------------------------------------------------------------------
 * residency */

static Status writeback(OffloadManager *m, int unit) {
    OffloadUnitState *u = &m->units[unit];
    void **p = (void **)m->slot_ptrs;
    if (dev(m)) dev_unload(m, u->slot, p);
    else unit_ptrs(m, unit, u->slot, p);
    TRY(backing_store(m, unit, (const void *const *)p));
    u->dirty = false;
    BUMP(m, writebacks, 1);
    BUMP(m, bytes_out, backing_io_bytes(m));
    return status_ok();
}

/* remove unit from its slot (writing back if dirty); release_mem frees the slot memory */
static Status evict_unit(OffloadManager *m, int unit, bool release_mem, bool idle) {
    OffloadUnitState *u = &m->units[unit];
    if (u->slot < 0) return status_ok();
    if (u->dirty) TRY(writeback(m, unit));
    int s = u->slot;
    if (m->on_evict) {
        unit_ptrs(m, unit, s, m->slot_ptrs);
        m->on_evict(m->ctx, unit, m->slot_ptrs);
    }
    m->slot_unit[s] = -1;
    u->slot = -1;
    u->prefetched = false;
    if (release_mem) slot_release(m, s);
    acct_resident(m, -1);
    BUMP(m, evictions, 1);
    if (idle) BUMP(m, idle_evictions, 1);
    return status_ok();
}

/* the least recently used resident unpinned unit (lowest index on ties), or -1 */
static int lru_victim(const OffloadManager *m) {
    int victim = -1;
    for (int u = 0; u < m->n_units; u++) {
        const OffloadUnitState *st = &m->units[u];
        if (st->slot < 0 || st->pinned) continue;
        if (victim < 0 || st->tick < m->units[victim].tick) victim = u;
    }
    return victim;
}

/* a slot for a new unit: a free one, else the LRU unpinned unit's (evicted) */
static Status find_slot(OffloadManager *m, int for_unit, int *slot) {
    for (int s = 0; s < m->n_slots; s++)
        if (m->slot_unit[s] < 0) { *slot = s; return status_ok(); }
    int victim = lru_victim(m);
    if (victim < 0)
        return status_errorf("offload: unit %d needs a slot but all %d resident slots hold pinned units "
                             "(raise offload.max_resident_groups or unpin)", for_unit, m->n_slots);
    *slot = m->units[victim].slot;
    return evict_unit(m, victim, false, false);
}

/* bring unit into a slot (not counted as hit or miss here) */
static Status fetch(OffloadManager *m, int unit) {
    int s = -1;
    TRY(find_slot(m, unit, &s));
    if (!m->slot_mem[s] && !m->locate)
        m->slot_mem[s] = dev(m) ? m->be->ops->alloc(m->be->ctx, m->raw_bytes ? m->raw_bytes : 1)
                                : xmalloc(m->raw_bytes ? m->raw_bytes : 1);
    void **p = (void **)m->slot_ptrs;
    unit_ptrs(m, unit, s, p);
    Status st = dev(m) ? dev_load(m, unit, s) : backing_load(m, unit, p);
    bool modified = false;
    if (STATUS_OK(st) && m->on_fetch) st = m->on_fetch(m->ctx, unit, p, &modified);
    if (!STATUS_OK(st)) {
        slot_release(m, s);
        return st;
    }
    if (m->units[unit].backed) BUMP(m, bytes_in, backing_io_bytes(m));
    m->slot_unit[s] = unit;
    m->units[unit].slot = s;
    m->units[unit].dirty = false;
    if (modified) mark_dirty(m, unit);
    acct_resident(m, +1);
    return status_ok();
}

/* ---------------------------------------------------------------------------------------
 * public */

Status offload_init(OffloadManager *m, const OffloadOptions *o) {
    memset(m, 0, sizeof *m);
    if (o->n_units <= 0) return status_errorf("offload: n_units=%d must be positive", o->n_units);
    if (o->n_spans <= 0 || !o->spans) return status_errorf("offload: a unit needs at least one span");
    if (o->max_resident < 0) return status_errorf("offload: max_resident=%d must be >= 0", o->max_resident);
    if (o->idle_steps < 0) return status_errorf("offload: idle_steps=%d must be >= 0", o->idle_steps);
    if (o->tier != OFFLOAD_HOST && o->tier != OFFLOAD_FILE) return status_errorf("offload: unknown tier %d", (int)o->tier);
    if (o->prefetch == PREFETCH_EMA && !(o->prefetch_ema > 0 && o->prefetch_ema <= 1))
        return status_errorf("offload: prefetch_ema=%g must be in (0, 1]", o->prefetch_ema);
    if (o->locate && o->prefetch != PREFETCH_NONE)
        return status_errorf("offload: in-place units (locate) cannot be prefetched");
    if (o->be && (o->locate || o->on_fetch || o->on_evict))
        return status_errorf("offload: device slots (a backend given) cannot be in place (locate) or call on_fetch / "
                             "on_evict (they would see backend memory)");
    if (o->tier == OFFLOAD_FILE) {
        if (!o->dir || !o->dir[0]) return status_errorf("offload: the file tier needs a folder (offload.dir)");
        if (strlen(o->dir) >= sizeof m->dir) return status_errorf("offload: folder name too long: %s", o->dir);
        Status s = dir_make_p(o->dir);
        if (!STATUS_OK(s)) return status_errorf("offload: cannot create the file-tier folder (offload.dir): %s", s.msg);
        str_fmt(m->dir, sizeof m->dir, "%s", o->dir);
        struct stat st;
        if (stat(m->dir, &st) != 0 || !S_ISDIR(st.st_mode))
            return status_errorf("offload: file-tier folder %s is not a directory", m->dir);
    }
    if (o->name) {
        if (strlen(o->name) >= sizeof m->name) return status_errorf("offload: name too long: %s", o->name);
        str_fmt(m->name, sizeof m->name, "%s", o->name);
    }
    m->n_units = o->n_units;
    m->n_spans = o->n_spans;
    m->max_resident = o->max_resident == 0 || o->max_resident > o->n_units ? o->n_units : o->max_resident;
    m->n_slots = o->locate ? o->n_units : m->max_resident;
    m->idle_steps = o->idle_steps;
    m->tier = o->tier;
    m->prefetch = o->prefetch;
    m->prefetch_ema = o->prefetch_ema;
    m->prefetch_min = o->prefetch_min > 0 ? o->prefetch_min : 0.25;
    m->acct = o->acct;
    m->no_fsync = o->no_fsync;
    m->locate = o->locate;
    m->on_fetch = o->on_fetch;
    m->on_evict = o->on_evict;
    m->ctx = o->ctx;
    m->be = o->be;
    m->spans = xmalloc(sizeof(OffloadSpan) * (size_t)m->n_spans);
    memcpy(m->spans, o->spans, sizeof(OffloadSpan) * (size_t)m->n_spans);
    m->raw_off = xmalloc(sizeof(size_t) * (size_t)m->n_spans);
    m->enc_off = xmalloc(sizeof(size_t) * (size_t)m->n_spans);
    m->slot_ptrs = xmalloc(sizeof(void *) * (size_t)m->n_spans);
    for (int s = 0; s < m->n_spans; s++) {
        const OffloadSpan *sp = &m->spans[s];
        if ((sp->codec.encode == NULL) != (sp->codec.decode == NULL) ||
            (sp->codec.encode != NULL) != (sp->codec.encoded_bytes != NULL)) {
            offload_free(m);
            return status_errorf("offload: span %d: a codec needs encoded_bytes, encode and decode", s);
        }
        m->raw_off[s] = m->raw_bytes;
        m->raw_bytes = align_up(m->raw_bytes + sp->bytes, 64);
        m->enc_off[s] = m->enc_bytes;
        m->enc_bytes = align_up(m->enc_bytes + span_enc_bytes(sp), 8);
    }
    m->units = xcalloc(sizeof(OffloadUnitState) * (size_t)m->n_units);
    for (int u = 0; u < m->n_units; u++) m->units[u].slot = -1;
    m->slot_unit = xmalloc(sizeof(int) * (size_t)m->n_slots);
    for (int s = 0; s < m->n_slots; s++) m->slot_unit[s] = -1;
    if (m->locate)   /* in place: the caller's memory already holds every unit, not yet backed */
        for (int u = 0; u < m->n_units; u++) {
            m->slot_unit[u] = u;
            m->units[u].slot = u;
            m->units[u].dirty = true;
            acct_resident(m, +1);
        }
    m->slot_mem = xcalloc(sizeof(void *) * (size_t)m->n_slots);
    m->host = xcalloc(sizeof(void *) * (size_t)m->n_units);
    m->mark = xcalloc(sizeof(int) * (size_t)m->n_units);
    m->slot_ev = xcalloc(sizeof(uint64_t) * (size_t)m->n_slots);
    m->host_ev = xcalloc(sizeof(uint64_t) * (size_t)m->n_units);
    if (m->tier == OFFLOAD_FILE) {
        m->stage = host_buf_alloc(m, sizeof(OffloadFileHeader) + m->enc_bytes);
        if (m->acct) memacct_add(m->acct, MEM_TIER_HOST, MEM_KIND_SCRATCH, (int64_t)(sizeof(OffloadFileHeader) + m->enc_bytes));
    }
    return status_ok();
}

void offload_free(OffloadManager *m) {
    if (dev(m)) m->be->ops->sync(m->be->ctx);   /* the device is idle: no transfer in flight */
    if (m->units) {
        for (int u = 0; u < m->n_units; u++) {
            if (m->units[u].slot >= 0) acct_resident(m, -1);
            if (m->host && m->host[u]) { acct_backing(m, MEM_TIER_HOST, -1); host_copy_free(m, u); }
            if (m->tier == OFFLOAD_FILE && m->units[u].backed) acct_backing(m, MEM_TIER_FILE, -1);
        }
    }
    if (m->slot_mem)
        for (int s = 0; s < m->n_slots; s++) slot_release(m, s);
    if (m->stage && m->acct)
        memacct_sub(m->acct, MEM_TIER_HOST, MEM_KIND_SCRATCH, (int64_t)(sizeof(OffloadFileHeader) + m->enc_bytes));
    if (m->stage) host_buf_free(m, m->stage);
    if (m->xfer && m->acct) memacct_sub(m->acct, MEM_TIER_HOST, MEM_KIND_SCRATCH, (int64_t)(m->raw_bytes ? m->raw_bytes : 1));
    if (m->xfer) host_buf_free(m, m->xfer);
    xfree(m->slot_ev);
    xfree(m->host_ev);
    xfree(m->spans);
    xfree(m->raw_off);
    xfree(m->enc_off);
    xfree(m->slot_ptrs);
    xfree(m->units);
    xfree(m->slot_unit);
    xfree(m->slot_mem);
    xfree(m->host);
    xfree(m->mark);
    memset(m, 0, sizeof *m);
}

void offload_begin_step(OffloadManager *m, long step) {
    m->step = step;
    for (int u = 0; u < m->n_units; u++) { m->units[u].pinned = false; m->units[u].used = false; }
    OffloadStats keep = m->step_stats;
    memset(&m->step_stats, 0, sizeof m->step_stats);
    m->step_stats.resident_bytes = keep.resident_bytes;
    m->step_stats.resident_units = keep.resident_units;
    m->step_stats.peak_resident_bytes = keep.resident_bytes;
}

Status offload_acquire(OffloadManager *m, int unit, enum OffloadAccess acc, void **spans) {
    ASSERTF(unit >= 0 && unit < m->n_units, "offload: unit %d out of range [0, %d)", unit, m->n_units);
    OffloadUnitState *u = &m->units[unit];
    BUMP(m, acquires, 1);
    if (u->slot >= 0) {
        BUMP(m, hits, 1);
        if (u->prefetched) { BUMP(m, prefetch_hits, 1); u->prefetched = false; }
    } else {
        BUMP(m, misses, 1);
        double t0 = time_now();
        Status s = fetch(m, unit);
        double dt = time_now() - t0;
        m->step_stats.stall_s += dt;
        m->total_stats.stall_s += dt;
        TRY(s);
    }
    u->tick = ++m->clock;
    u->last_step = m->step;
    u->used = true;
    if (acc == OFFLOAD_WRITE) mark_dirty(m, unit);
    if (spans) {
        unit_ptrs(m, unit, u->slot, spans);
        offload_wait(m, unit);
    }
    return status_ok();
}

void offload_wait(OffloadManager *m, int unit) {
    ASSERT(unit >= 0 && unit < m->n_units);
    ASSERTF(m->units[unit].slot >= 0, "offload: unit %d is not resident (acquire or pin it first)", unit);
    if (!dev(m)) return;
    uint64_t ev = m->slot_ev[m->units[unit].slot];
    if (ev) m->be->ops->wait_event(m->be->ctx, ev);
}

Status offload_pin(OffloadManager *m, const int *units, int n, enum OffloadAccess acc) {
    /* distinct units this step will hold pinned: those already pinned plus the new ones */
    int need = 0;
    for (int u = 0; u < m->n_units; u++) {
        m->mark[u] = m->units[u].pinned;
        need += m->mark[u];
    }
    for (int i = 0; i < n; i++) {
        ASSERTF(units[i] >= 0 && units[i] < m->n_units, "offload: unit %d out of range [0, %d)", units[i], m->n_units);
        if (!m->mark[units[i]]) { m->mark[units[i]] = 1; need++; }
    }
    if (need > m->n_slots)
        return status_errorf("offload: step %ld needs %d distinct units pinned but there are only %d resident slots "
                             "(raise offload.max_resident_groups)", m->step, need, m->n_slots);
    /* pin the whole set first so fetching one member never evicts another */
    for (int i = 0; i < n; i++) m->units[units[i]].pinned = true;
    for (int i = 0; i < n; i++) TRY(offload_acquire(m, units[i], acc, NULL));
    return status_ok();
}

void offload_unpin(OffloadManager *m, int unit) {
    ASSERT(unit >= 0 && unit < m->n_units);
    m->units[unit].pinned = false;
}

void *offload_span(const OffloadManager *m, int unit, int span) {
    ASSERT(unit >= 0 && unit < m->n_units && span >= 0 && span < m->n_spans);
    ASSERTF(m->units[unit].slot >= 0, "offload: unit %d is not resident (acquire or pin it first)", unit);
    if (m->locate) return m->locate(m->ctx, unit, span);
    return (char *)m->slot_mem[m->units[unit].slot] + m->raw_off[span];
}

Status offload_evict(OffloadManager *m, int unit) {
    ASSERT(unit >= 0 && unit < m->n_units);
    if (m->units[unit].pinned) return status_errorf("offload: unit %d is pinned this step and cannot be evicted", unit);
    return evict_unit(m, unit, true, false);
}

Status offload_flush(OffloadManager *m) {
    for (int u = 0; u < m->n_units; u++)
        if (m->units[u].slot >= 0 && m->units[u].dirty) TRY(writeback(m, u));
    return status_ok();
}

/* EMA prefetch: bring the most-used non-resident units in, into free slots or in place of the
 * resident unit with the lowest EMA when that is under half the candidate's */
static Status prefetch_ema(OffloadManager *m) {
    for (int iter = 0; iter < m->n_slots; iter++) {
        int cand = -1;
        for (int u = 0; u < m->n_units; u++)
            if (m->units[u].slot < 0 && m->units[u].ema >= m->prefetch_min &&
                (cand < 0 || m->units[u].ema > m->units[cand].ema))
                cand = u;
        if (cand < 0) return status_ok();
        bool free_slot = false;
        for (int s = 0; s < m->n_slots; s++) free_slot |= m->slot_unit[s] < 0;
        if (!free_slot) {
            int victim = -1;
            for (int s = 0; s < m->n_slots; s++) {
                int v = m->slot_unit[s];
                if (victim < 0 || m->units[v].ema < m->units[victim].ema) victim = v;
            }
            if (!(m->units[victim].ema < 0.5 * m->units[cand].ema)) return status_ok();
            TRY(evict_unit(m, victim, false, false));
        }
        TRY(fetch(m, cand));
        OffloadUnitState *u = &m->units[cand];
        u->prefetched = true;
        u->tick = ++m->clock;
        u->last_step = m->step;
        BUMP(m, prefetches, 1);
    }
    return status_ok();
}

Status offload_end_step(OffloadManager *m) {
    double t0 = time_now();
    Status s = status_ok();
    double a = m->prefetch_ema > 0 ? m->prefetch_ema : 0.05;
    for (int u = 0; u < m->n_units; u++) {
        OffloadUnitState *st = &m->units[u];
        st->ema = (1.0 - a) * st->ema + a * (st->used ? 1.0 : 0.0);
        st->pinned = false;
        st->used = false;
    }
    if (m->idle_steps > 0)
        for (int u = 0; u < m->n_units && STATUS_OK(s); u++)
            if (m->units[u].slot >= 0 && m->step - m->units[u].last_step >= m->idle_steps)
                s = evict_unit(m, u, true, true);
    while (STATUS_OK(s) && m->step_stats.resident_units > m->max_resident) s = evict_unit(m, lru_victim(m), true, false);
    if (STATUS_OK(s) && m->prefetch == PREFETCH_EMA) s = prefetch_ema(m);
    double dt = time_now() - t0;
    m->step_stats.background_s += dt;
    m->total_stats.background_s += dt;
    return s;
}

Status offload_fetch_all(OffloadManager *m) {
    if (m->n_slots < m->n_units)
        return status_errorf("offload: fetching all %d units needs a slot for each (there are %d)", m->n_units,
                             m->n_slots);
    for (int u = 0; u < m->n_units; u++)
        if (m->units[u].slot < 0) {
            BUMP(m, acquires, 1);
            BUMP(m, misses, 1);
            TRY(fetch(m, u));
        }
    return status_ok();
}

Status offload_read_unit(OffloadManager *m, int unit, void *const *dst) {
    ASSERT(unit >= 0 && unit < m->n_units);
    const OffloadUnitState *u = &m->units[unit];
    if (u->slot >= 0) {
        if (dev(m)) offload_wait(m, unit);
        for (int s = 0; s < m->n_spans; s++) {
            if (dev(m)) m->be->ops->to_host(m->be->ctx, dst[s], offload_span(m, unit, s), m->spans[s].bytes);
            else memcpy(dst[s], offload_span(m, unit, s), m->spans[s].bytes);
        }
        return status_ok();
    }
    return backing_load(m, unit, dst);
}

Status offload_write_unit(OffloadManager *m, int unit, const void *const *src) {
    ASSERT(unit >= 0 && unit < m->n_units);
    OffloadUnitState *u = &m->units[unit];
    if (u->slot >= 0) {
        if (dev(m)) offload_wait(m, unit);
        for (int s = 0; s < m->n_spans; s++) {
            if (dev(m)) m->be->ops->from_host(m->be->ctx, offload_span(m, unit, s), src[s], m->spans[s].bytes);
            else memcpy(offload_span(m, unit, s), src[s], m->spans[s].bytes);
        }
        mark_dirty(m, unit);
        return status_ok();
    }
    return backing_store(m, unit, src);
}
