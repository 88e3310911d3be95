/* residency.c: training-time offloading of idle expert units (see residency.h) — what is
 * training-specific: the unit's spans in the model's arrays, giving their pages back, the AdamW
 * catch-up, the step clock. Tiers, eviction order, the file format and counting are offload.c's.
 * Does not: work on a device backend (train.c refuses offload.enabled with run.backend=cuda):
 * the units are in place (locate) in host arrays and the AdamW catch-up hook (on_fetch) runs
 * on host pointers; offload.c's device slots allow neither. */
#include "residency.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "offload.h"
#include "optim.h"

/* a unit of layer l has 3 * nt spans: params, Adam m, Adam v, each over the layer's nt expert
 * tensors in table order (the order of model_ep_unit_copy) */
struct ResidencyLayer {
    OffloadManager om;           /* units = this rank's units of the layer */
    Model *m;
    int nt;
    const ParamTensor **tensor;  /* [nt] */
    size_t *floats;              /* [nt] floats of one unit in each tensor */
    long *off_since;             /* [per_rank] first step whose update the unit missed */
    int8_t *resident;            /* [per_rank] = Residency.resident[l] */
    const float *zero;           /* [max floats] */
};

static float *expert_array(const Model *m, int a) {
    return a == 0 ? m->params[PCAT_EXPERT] : a == 1 ? m->adam_m[PCAT_EXPERT] : m->adam_v[PCAT_EXPERT];
}

/* where span s of unit u lives (looked up each time: migration may move the arrays) */
static void *locate(void *ctx, int u, int s) {
    const ResidencyLayer *ly = ctx;
    int i = s % ly->nt;
    return expert_array(ly->m, s / ly->nt) + ly->tensor[i]->offset + (size_t)u * ly->floats[i];
}

/* the unit is safe in the backing tier: give the whole pages inside its spans back to the OS
 * (they read as zeros until written) and zero the partial pages at both ends */
static void on_evict(void *ctx, int u, void *const *spans) {
    ResidencyLayer *ly = ctx;
    long pg = sysconf(_SC_PAGESIZE);
    for (int s = 0; s < 3 * ly->nt; s++) {
        uintptr_t a = (uintptr_t)spans[s], b = a + sizeof(float) * ly->floats[s % ly->nt];
        uintptr_t a2 = (a + (uintptr_t)pg - 1) / (uintptr_t)pg * (uintptr_t)pg, b2 = b / (uintptr_t)pg * (uintptr_t)pg;
        if (b2 > a2) madvise((void *)a2, b2 - a2, MADV_DONTNEED);
        memset((void *)a, 0, (size_t)(a2 > b ? b - a : a2 - a));
        if (b2 >= a2) memset((void *)b2, 0, b - b2);
    }
    ly->resident[u] = 0;
    ly->off_since[u] = ly->om.step + 1;    /* evicted at the end of step om.step: its update is in */
}

/* the unit is back: replay the AdamW updates it missed while away, in step order, with zero
 * gradients. The optimizer updates every resident unit in place each step, so it is dirty. */
static Status on_fetch(void *ctx, int u, void *const *spans, bool *modified) {
    ResidencyLayer *ly = ctx;
    const Model *m = ly->m;
    const TrainConfig *tc = &m->cfg.train;
    for (long st = ly->off_since[u]; st < ly->om.step; st++)
        for (int i = 0; i < ly->nt; i++)
            m->be->ops->adamw(m->be->ctx, spans[i], ly->zero, spans[ly->nt + i], spans[2 * ly->nt + i], ly->floats[i],
                              (float)optim_lr(tc, st), (float)tc->beta1, (float)tc->beta2, (float)tc->eps,
                              ly->tensor[i]->decay ? (float)tc->weight_decay : 0.0f, (int)(st + 1));
    ly->resident[u] = 1;
    *modified = true;
    return status_ok();
}

/* a layer's manager runs step r->step (the trainer sets r->step on resume, between steps) */
static OffloadManager *layer_om(Residency *r, int l) {
    OffloadManager *om = &r->layers[l].om;
    if (om->step != r->step) offload_begin_step(om, r->step);
    return om;
}

Status residency_init(Residency *r, Model *m, const OffloadConfig *oc, const char *run_dir) {
    memset(r, 0, sizeof *r);
    r->m = m;
    r->enabled = oc->enabled;
    if (!r->enabled) return status_ok();
    if (m->be->kind != BACKEND_CPU)
        return status_errorf("offload.enabled: training-time offloading needs the CPU backend (host-visible parameters)");
    if (model_masters(m))
        return status_errorf("offload.enabled with clustering.mode=masters: training-time offloading of the masters "
                             "(and the projection refreshed from them) is not supported; train with "
                             "offload.enabled=false (dcmoe eval can still offload the stored formats, which are made "
                             "from the projection)");
    char dir[2048];
    if (oc->dir[0]) str_fmt(dir, sizeof dir, "%s", oc->dir);
    else str_fmt(dir, sizeof dir, "%s/offload", run_dir);
    int L = m->L;
    r->layers = xcalloc(sizeof(ResidencyLayer) * L);
    r->resident = xcalloc(sizeof(int8_t *) * L);
    size_t zmax = 1;
    for (int l = 0; l < L; l++) {
        if (!m->ep[l].E) continue;
        ResidencyLayer *ly = &r->layers[l];
        int U = m->ep[l].per_rank;
        ly->m = m;
        ly->tensor = xcalloc(sizeof(ParamTensor *) * m->n_tensors);
        ly->floats = xcalloc(sizeof(size_t) * m->n_tensors);
        for (int i = 0; i < m->n_tensors; i++) {
            const ParamTensor *t = &m->tensors[i];
            if (!t->ep_unit || t->layer != l) continue;
            ly->tensor[ly->nt] = t;
            ly->floats[ly->nt] = (size_t)param_unit_rows(t, m->ep[l].K) * (t->n / t->dims[0]);
            if (ly->floats[ly->nt] > zmax) zmax = ly->floats[ly->nt];
            ly->nt++;
        }
        ly->off_since = xcalloc(sizeof(long) * U);
        ly->resident = r->resident[l] = xcalloc(sizeof(int8_t) * U);
        for (int u = 0; u < U; u++) r->resident[l][u] = 1;
        OffloadSpan *spans = xcalloc(sizeof(OffloadSpan) * 3 * ly->nt);
        for (int s = 0; s < 3 * ly->nt; s++) {
            spans[s].bytes = sizeof(float) * ly->floats[s % ly->nt];
            spans[s].kind = spans[s].stored_kind = s < ly->nt ? MEM_KIND_PARAM_FP32 : MEM_KIND_OPTIM;
        }
        OffloadOptions o;
        memset(&o, 0, sizeof o);
        offload_options_from_config(&o, oc);
        char name[64];
        str_fmt(name, sizeof name, "rank%04d_layer%03d", m->comm->rank, l);
        o.n_units = U; o.n_spans = 3 * ly->nt; o.spans = spans;
        o.prefetch = PREFETCH_NONE; o.dir = dir; o.name = name; o.no_fsync = true;
        o.locate = locate; o.on_fetch = on_fetch; o.on_evict = on_evict; o.ctx = ly;
        Status st = U > 0 && ly->nt > 0 ? offload_init(&ly->om, &o) : status_ok();
        xfree(spans);
        if (!STATUS_OK(st)) {
            residency_free(r);
            return status_errorf("layer %d: %s", l, st.msg);
        }
    }
    r->zero = xcalloc(sizeof(float) * zmax);
    for (int l = 0; l < L; l++) r->layers[l].zero = r->zero;
    m->ep_resident = r->resident;
    return status_ok();
}

void residency_free(Residency *r) {
    if (!r || !r->enabled || !r->layers) return;
    for (int l = 0; l < r->m->L; l++) {
        ResidencyLayer *ly = &r->layers[l];
        offload_free(&ly->om);
        xfree(ly->tensor); xfree(ly->floats); xfree(ly->off_since); xfree(r->resident[l]);
    }
    r->m->ep_resident = NULL;
    xfree(r->layers); xfree(r->resident); xfree(r->zero);
    memset(r, 0, sizeof *r);
}

Status residency_need(Residency *r, int l, const int32_t *units, int n) {
    if (!r->enabled) return status_ok();
    OffloadManager *om = layer_om(r, l);
    for (int i = 0; i < n; i++) {
        Status st = offload_acquire(om, units[i], OFFLOAD_WRITE, NULL);
        if (!STATUS_OK(st)) return status_errorf("layer %d: %s", l, st.msg);
    }
    return status_ok();
}

Status residency_end_step(Residency *r, long step) {
    if (!r->enabled) return status_ok();
    r->step = step;
    for (int l = 0; l < r->m->L; l++) {
        if (!r->layers[l].om.n_units) continue;
        Status st = offload_end_step(layer_om(r, l));
        if (!STATUS_OK(st)) return status_errorf("layer %d: %s", l, st.msg);
    }
    r->step = step + 1;
    return status_ok();
}

Status residency_fetch_all(Residency *r) {
    if (!r->enabled) return status_ok();
    for (int l = 0; l < r->m->L; l++) {
        if (!r->layers[l].om.n_units) continue;
        Status st = offload_fetch_all(layer_om(r, l));
        if (!STATUS_OK(st)) return status_errorf("layer %d: %s", l, st.msg);
    }
    return status_ok();
}

ResidencyStats residency_take_step(Residency *r) {
    ResidencyStats sum = {0}, s;
    if (r->enabled)
        for (int l = 0; l < r->m->L; l++) {
            const OffloadManager *om = &r->layers[l].om;
            if (!om->n_units) continue;
            const OffloadStats *t = offload_total_stats(om);
            sum.hits += (double)t->hits; sum.misses += (double)t->misses; sum.evictions += (double)t->evictions;
            sum.bytes_in += (double)t->bytes_in; sum.bytes_out += (double)t->bytes_out; sum.stall_s += t->stall_s;
            sum.resident_units += t->resident_units; sum.units += om->n_units;
        }
    s = sum;
    s.hits -= r->taken.hits; s.misses -= r->taken.misses; s.evictions -= r->taken.evictions;
    s.bytes_in -= r->taken.bytes_in; s.bytes_out -= r->taken.bytes_out; s.stall_s -= r->taken.stall_s;
    r->taken = sum;
    return s;
}
