/* residency.c: training-time offloading of idle expert units (see residency.h). */
#include "residency.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "optim.h"

#define RES_MAGIC "DCMRES01"

/* the spans (arrays x the layer's expert tensors) of unit slot s of layer l, in the order of
 * model_ep_unit_copy */
typedef void (*SpanFn)(void *ctx, float *span, size_t n, const ParamTensor *t, int array);

static void for_spans(Model *m, int l, int s, SpanFn fn, void *ctx) {
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    int K = m->ep[l].K;
    for (int a = 0; a < 3; a++)
        for (int i = 0; i < m->n_tensors; i++) {
            const ParamTensor *t = &m->tensors[i];
            if (!t->ep_unit || t->layer != l) continue;
            size_t row = t->n / t->dims[0], nr = (size_t)param_unit_rows(t, K);
            fn(ctx, arr[a] + t->offset + (size_t)s * nr * row, nr * row, t, a);
        }
}

/* give the whole pages inside a span back to the OS (they read as zeros until written) */
static void release_span(void *ctx, float *span, size_t n, const ParamTensor *t, int array) {
    (void)ctx; (void)t; (void)array;
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)span, b = (uintptr_t)(span + n);
    uintptr_t a2 = (a + (uintptr_t)pg - 1) / (uintptr_t)pg * (uintptr_t)pg, b2 = b / (uintptr_t)pg * (uintptr_t)pg;
    if (b2 > a2) madvise((void *)a2, b2 - a2, MADV_DONTNEED);
    /* the partial pages at both ends stay; zero the rest of the span so nothing stale remains */
    memset(span, 0, (size_t)(a2 > b ? b - a : a2 - a));
    if (b2 >= a2) memset((void *)b2, 0, b - b2);
}

typedef struct Replay { Model *m; const float *zero; long step; } Replay;

/* AdamW with a zero gradient on the params span; its m and v spans follow at the same
 * tensor offsets in the moment arrays */
static void replay_span(void *ctx, float *span, size_t n, const ParamTensor *t, int array) {
    if (array != 0) return;
    Replay *rp = ctx;
    Model *m = rp->m;
    const TrainConfig *tc = &m->cfg.train;
    size_t off = (size_t)(span - m->params[PCAT_EXPERT]);
    m->be->ops->adamw(m->be->ctx, span, rp->zero, m->adam_m[PCAT_EXPERT] + off, m->adam_v[PCAT_EXPERT] + off, n,
                      (float)optim_lr(tc, rp->step), (float)tc->beta1, (float)tc->beta2, (float)tc->eps,
                      t->decay ? (float)tc->weight_decay : 0.0f, (int)(rp->step + 1));
}

static void unit_path(const Residency *r, int l, int s, char *buf, size_t cap) {
    str_fmt(buf, cap, "%s/rank%04d_layer%03d_unit%04d.bin", r->dir, r->m->comm->rank, l, s);
}

Status residency_init(Residency *r, Model *m, const OffloadConfig *oc, const char *run_dir) {
    memset(r, 0, sizeof *r);
    r->m = m;
    r->enabled = oc->enabled;
    if (!r->enabled) return status_ok();
    if (m->be->kind != BACKEND_CPU)
        return status_errorf("offload.enabled: training-time offloading needs the CPU backend (host-visible parameters)");
    r->idle_steps = oc->idle_steps;
    r->cap = oc->max_resident_groups;
    r->tier = oc->tier;
    if (oc->dir[0]) str_fmt(r->dir, sizeof r->dir, "%s", oc->dir);
    else str_fmt(r->dir, sizeof r->dir, "%s/offload", run_dir);
    if (r->tier == OFFLOAD_FILE) {
        Status st = dir_make_p(r->dir);
        if (!STATUS_OK(st)) return status_errorf("offload.dir: %s", st.msg);
    }
    int L = m->L;
    r->resident = xcalloc(sizeof(int8_t *) * L);
    r->last_used = xcalloc(sizeof(long *) * L);
    r->off_since = xcalloc(sizeof(long *) * L);
    r->host = xcalloc(sizeof(float **) * L);
    r->unit_floats = xcalloc(sizeof(size_t) * L);
    size_t zmax = 1;
    for (int l = 0; l < L; l++) {
        if (!m->ep[l].E) continue;
        int U = m->ep[l].per_rank;
        r->resident[l] = xcalloc(sizeof(int8_t) * U);
        r->last_used[l] = xcalloc(sizeof(long) * U);
        r->off_since[l] = xcalloc(sizeof(long) * U);
        r->host[l] = xcalloc(sizeof(float *) * U);
        for (int u = 0; u < U; u++) r->resident[l][u] = 1;
        r->unit_floats[l] = model_ep_unit_floats(m, l);
        if (r->unit_floats[l] > zmax) zmax = r->unit_floats[l];
    }
    r->zero = xcalloc(sizeof(float) * zmax);
    m->ep_resident = r->resident;
    return status_ok();
}

void residency_free(Residency *r) {
    if (!r || !r->enabled) return;
    for (int l = 0; l < r->m->L; l++) {
        if (!r->resident[l]) continue;
        for (int u = 0; u < r->m->ep[l].per_rank; u++) xfree(r->host[l][u]);
        xfree(r->resident[l]); xfree(r->last_used[l]); xfree(r->off_since[l]); xfree(r->host[l]);
    }
    r->m->ep_resident = NULL;
    xfree(r->resident); xfree(r->last_used); xfree(r->off_since); xfree(r->host); xfree(r->unit_floats);
    xfree(r->zero);
    memset(r, 0, sizeof *r);
}

static Status evict(Residency *r, int l, int s) {
    Model *m = r->m;
    size_t n = 3 * r->unit_floats[l];
    float *buf = xmalloc(sizeof(float) * n);
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    model_ep_unit_copy(m, l, arr, s, buf, 1);
    if (r->tier == OFFLOAD_FILE) {
        char path[2304];
        unit_path(r, l, s, path, sizeof path);
        size_t bytes = 16 + sizeof(float) * n;
        char *img = xmalloc(bytes);
        uint32_t crc = crc32_update(0, buf, sizeof(float) * n), nn = (uint32_t)n;
        memcpy(img, RES_MAGIC, 8);
        memcpy(img + 8, &nn, 4);
        memcpy(img + 12, &crc, 4);
        memcpy(img + 16, buf, sizeof(float) * n);
        Status st = file_write_replace(path, img, bytes, 0);
        xfree(img);
        xfree(buf);
        if (!STATUS_OK(st)) return status_errorf("offload (layer %d, unit %d): %s", l, s, st.msg);
    } else {
        r->host[l][s] = buf;
    }
    for_spans(m, l, s, release_span, NULL);
    r->resident[l][s] = 0;
    r->off_since[l][s] = r->step + 1;      /* the update of step `step` has been applied */
    r->now.evictions++;
    r->now.bytes_out += sizeof(float) * (double)n;
    return status_ok();
}

static Status fetch(Residency *r, int l, int s) {
    Model *m = r->m;
    size_t n = 3 * r->unit_floats[l];
    float *buf = r->host[l][s];
    void *img = NULL;
    if (r->tier == OFFLOAD_FILE) {
        char path[2304];
        unit_path(r, l, s, path, sizeof path);
        size_t len = 0;
        Status st = file_read_all(path, &img, &len);
        if (!STATUS_OK(st)) return status_errorf("offload (layer %d, unit %d): %s", l, s, st.msg);
        uint32_t nn = 0, crc = 0;
        if (len >= 16) { memcpy(&nn, (char *)img + 8, 4); memcpy(&crc, (char *)img + 12, 4); }
        if (len != 16 + sizeof(float) * n || memcmp(img, RES_MAGIC, 8) != 0 || nn != n) {
            free(img);
            return status_errorf("%s: not the offloaded copy of layer %d unit %d (%zu bytes, expected %zu)", path, l, s,
                                 len, 16 + sizeof(float) * n);
        }
        if (crc32_update(0, (char *)img + 16, sizeof(float) * n) != crc) {
            free(img);
            return status_errorf("%s: checksum mismatch (offloaded copy of layer %d unit %d is corrupt)", path, l, s);
        }
        buf = (float *)((char *)img + 16);
    }
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    model_ep_unit_copy(m, l, arr, s, buf, 0);
    if (img) free(img);
    else { xfree(r->host[l][s]); r->host[l][s] = NULL; }
    /* the AdamW updates the unit missed while away, in step order */
    for (long st = r->off_since[l][s]; st < r->step; st++) {
        Replay rp = {m, r->zero, st};
        for_spans(m, l, s, replay_span, &rp);
    }
    r->resident[l][s] = 1;
    r->now.misses++;
    r->now.bytes_in += sizeof(float) * (double)n;
    return status_ok();
}

Status residency_need(Residency *r, int l, const int32_t *units, int n) {
    if (!r->enabled) return status_ok();
    double t0 = time_now();
    for (int i = 0; i < n; i++) {
        int s = units[i];
        if (r->resident[l][s]) r->now.hits++;
        else TRY(fetch(r, l, s));
        r->last_used[l][s] = r->step;
    }
    r->now.stall_s += time_now() - t0;
    return status_ok();
}

Status residency_end_step(Residency *r, long step) {
    if (!r->enabled) return status_ok();
    Model *m = r->m;
    r->step = step;
    for (int l = 0; l < m->L; l++) {
        if (!r->resident[l]) continue;
        int U = m->ep[l].per_rank, n_res = 0;
        for (int s = 0; s < U; s++) {
            if (r->resident[l][s] && step - r->last_used[l][s] >= r->idle_steps) TRY(evict(r, l, s));
            n_res += r->resident[l][s];
        }
        while (r->cap > 0 && n_res > r->cap) {     /* least recently used first (lowest slot on ties) */
            int v = -1;
            for (int s = 0; s < U; s++)
                if (r->resident[l][s] && (v < 0 || r->last_used[l][s] < r->last_used[l][v])) v = s;
            TRY(evict(r, l, v));
            n_res--;
        }
    }
    r->step = step + 1;
    return status_ok();
}

Status residency_fetch_all(Residency *r) {
    if (!r->enabled) return status_ok();
    for (int l = 0; l < r->m->L; l++) {
        if (!r->resident[l]) continue;
        for (int s = 0; s < r->m->ep[l].per_rank; s++)
            if (!r->resident[l][s]) TRY(fetch(r, l, s));
    }
    return status_ok();
}

ResidencyStats residency_take_step(Residency *r) {
    ResidencyStats s = r->now;
    if (r->enabled)
        for (int l = 0; l < r->m->L; l++) {
            if (!r->resident[l]) continue;
            for (int u = 0; u < r->m->ep[l].per_rank; u++) { s.units++; s.resident_units += r->resident[l][u]; }
        }
    r->total.hits += s.hits; r->total.misses += s.misses; r->total.evictions += s.evictions;
    r->total.bytes_in += s.bytes_in; r->total.bytes_out += s.bytes_out; r->total.stall_s += s.stall_s;
    memset(&r->now, 0, sizeof r->now);
    return s;
}
