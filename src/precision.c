/* precision.c: QAT shadow weights, the experts.q stored-format section and the stored-format
 * inference path with optional offloading (see precision.h for the layout).
 *
 * Legend: D F F1 E G K r Gl = d_model, expert width, F or 2F (SwiGLU), experts, groups,
 * experts per group, residual rank, groups on this rank. */
#include "precision.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define Q_MAGIC "DCMOEQ01"
#define Q_VERSION 1u

static const char *const tnames[6] = {"base1", "base2", "a1", "b1", "a2", "b2"};

static const ParamTensor *layer_tensor(const Model *m, int l, int which) {
    char nm[64];
    str_fmt(nm, sizeof nm, "h.%d.ffn.%s", l, tnames[which]);
    for (int i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, nm)) return &m->tensors[i];
    ASSERTF(0, "precision: tensor %s not in the model", nm);
    return NULL;
}

/* rows, cols and format of tensor `which` (one group's base or one expert's factor) */
static void tshape(const MoeLayer *f, int which, int *rows, int *cols) {
    switch (which) {
    case 0: *rows = f->D; *cols = f->F1; break;
    case 1: *rows = f->F; *cols = f->D; break;
    case 2: *rows = f->D; *cols = f->r; break;
    case 3: *rows = f->F1; *cols = f->r; break;
    case 4: *rows = f->F; *cols = f->r; break;
    default: *rows = f->D; *cols = f->r; break;
    }
}
static enum QFormat tfmt(int which) { return which < 2 ? QFORMAT_F16 : QFORMAT_INT4; }
static size_t tbytes(const MoeLayer *f, int which, int group) {
    int rows, cols;
    tshape(f, which, &rows, &cols);
    return qtensor_bytes(tfmt(which), rows, cols, which < 2 ? 0 : group);
}

static int n_clustered(const Model *m) {
    int n = 0;
    for (int l = 0; l < m->L; l++) n += m->ffn[l].kind == MOE_KIND_CLUSTERED;
    return n;
}

/* ---- setup ---- */

static void views_from_params(Precision *pr) {
    Model *m = pr->m;
    for (int l = 0; l < m->L; l++) pr->views[l] = m->p.layers[l].ffn;
}

Status prec_init(Precision *pr, Model *m) {
    memset(pr, 0, sizeof *pr);
    pr->m = m;
    pr->mode = m->cfg.precision.mode;
    pr->group = m->cfg.precision.int4_group;
    pr->n_clustered = n_clustered(m);
    pr->layers = xcalloc(sizeof(PrecLayer) * (size_t)(m->L ? m->L : 1));
    pr->views = xcalloc(sizeof(MoeParams) * (size_t)(m->L ? m->L : 1));
    pr->qerr = xcalloc(sizeof(double) * 2 * (size_t)(pr->n_clustered ? pr->n_clustered : 1));
    views_from_params(pr);
    if (pr->mode == PRECISION_QAT && pr->n_clustered > 0) {
        const Backend *be = m->be;
        size_t n = m->n_cat[PCAT_EXPERT] ? m->n_cat[PCAT_EXPERT] : 1;
        pr->shadow = be->ops->alloc(be->ctx, sizeof(float) * n);
        pr->host = xmalloc(sizeof(float) * n);      /* prec_measure's host copy of the shadow */
        for (int l = 0; l < m->L; l++) {
            if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
            MoeParams *v = &pr->views[l];
            const MoeParams *p = &m->p.layers[l].ffn;
            float *const base = m->params[PCAT_EXPERT];
            float **dst[6] = {&v->base1, &v->base2, &v->a1, &v->b1, &v->a2, &v->b2};
            const float *src[6] = {p->base1, p->base2, p->a1, p->b1, p->a2, p->b2};
            for (int w = 0; w < 6; w++) *dst[w] = pr->shadow + (src[w] - base);
        }
        m->ffn_view = pr->views;
        prec_qat_refresh(pr);
    }
    return status_ok();
}

void prec_free(Precision *pr) {
    if (!pr || !pr->m) { if (pr) memset(pr, 0, sizeof *pr); return; }
    Model *m = pr->m;
    if (m->ffn_view == pr->views) m->ffn_view = NULL;
    for (int l = 0; l < m->L; l++) {
        PrecLayer *pl = &pr->layers[l];
        if (pl->offload) offload_free(&pl->om);
        if (pl->blob) m->be->ops->free(m->be->ctx, pl->blob);
        xfree(pl->qv);
    }
    if (pr->shadow) m->be->ops->free(m->be->ctx, pr->shadow);
    xfree(pr->host);
    xfree(pr->layers); xfree(pr->views); xfree(pr->qerr);
    memset(pr, 0, sizeof *pr);
}

/* ---- QAT ---- */

/* one stored-format block of the expert category: group q of tensor w (bases 0-1 FP16, factors
 * 2-5 INT4) of the ci-th clustered layer, at offset off, [rows, cols] */
typedef struct QBlock { size_t off; int rows, cols, w, ci; } QBlock;

/* every block, in (layer, tensor, group) order; returns the count (*out: xmalloc'd) */
static int qblocks(const Precision *pr, QBlock **out) {
    const Model *m = pr->m;
    int n = 0, ci = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED)
            for (int w = 0; w < 6; w++) n += layer_tensor(m, l, w)->dims[0];
    QBlock *b = xmalloc(sizeof(QBlock) * (size_t)(n ? n : 1));
    n = 0;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        for (int w = 0; w < 6; w++) {
            const ParamTensor *t = layer_tensor(m, l, w);
            int rows, cols;
            tshape(f, w, &rows, &cols);
            for (int q = 0; q < t->dims[0]; q++) b[n++] = (QBlock){t->offset + (size_t)q * rows * cols, rows, cols, w, ci};
        }
        ci++;
    }
    *out = b;
    return n;
}

/* QAT: shadow = fake_quant(masters) on the backend: one copy of the expert category (the
 * non-clustered layers' experts stay as they are), then the fake_quant slot on every
 * clustered tensor (bases FP16, factors INT4). No host traffic. */
static void shadow_build(Precision *pr) {
    Model *m = pr->m;
    const Backend *be = m->be;
    size_t n = m->n_cat[PCAT_EXPERT];
    be->ops->copy(be->ctx, pr->shadow, m->params[PCAT_EXPERT], sizeof(float) * n);
    QBlock *b;
    int nb = qblocks(pr, &b);
    for (int i = 0; i < nb; i++)
        quant_fake_dev(be, pr->shadow + b[i].off, b[i].rows, b[i].cols, tfmt(b[i].w), b[i].w < 2 ? 0 : pr->group);
    xfree(b);
}

/* the relative errors of the stored formats: host copies of the masters and of their
 * fake-quantised values (QAT: the shadow as built; storage: quant_fake on the host), summed
 * per clustered layer over bases and factors, then over the ranks (collective) */
static void measure(Precision *pr) {
    Model *m = pr->m;
    const Backend *be = m->be;
    size_t n = m->n_cat[PCAT_EXPERT];
    float *master = xmalloc(sizeof(float) * (n ? n : 1));
    if (!pr->host) pr->host = xmalloc(sizeof(float) * (n ? n : 1));
    be->ops->to_host(be->ctx, master, m->params[PCAT_EXPERT], sizeof(float) * n);
    if (pr->shadow) be->ops->to_host(be->ctx, pr->host, pr->shadow, sizeof(float) * n);
    else memcpy(pr->host, master, sizeof(float) * n);
    double *acc = xcalloc(sizeof(double) * 4 * (size_t)pr->n_clustered);   /* per layer: err2, ref2 (bases, factors) */
    size_t scratch_max = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED)
            for (int w = 0; w < 6; w++) {
                size_t b = tbytes(&m->ffn[l], w, pr->group);
                if (b > scratch_max) scratch_max = b;
            }
    void *scratch = pr->shadow ? NULL : xmalloc(scratch_max + 16);
    QBlock *b;
    int nb = qblocks(pr, &b);
    double e2 = 0, r2 = 0;   /* one tensor's sums over its groups, then into its layer's slots */
    for (int i = 0; i < nb; i++) {
        const QBlock *k = &b[i];
        size_t per = (size_t)k->rows * k->cols;
        float *xq = pr->host + k->off;
        const float *ref = master + k->off;
        if (!pr->shadow) quant_fake(xq, k->rows, k->cols, tfmt(k->w), k->w < 2 ? 0 : pr->group, scratch);
        for (size_t j = 0; j < per; j++) {
            double d = (double)xq[j] - ref[j];
            e2 += d * d;
            r2 += (double)ref[j] * ref[j];
        }
        if (i + 1 == nb || b[i + 1].w != k->w || b[i + 1].ci != k->ci) {
            acc[4 * k->ci + (k->w < 2 ? 0 : 2)] += e2;
            acc[4 * k->ci + (k->w < 2 ? 1 : 3)] += r2;
            e2 = r2 = 0;
        }
    }
    xfree(b);
    xfree(scratch);
    xfree(master);
    comm_allreduce_sum_f64(m->comm, acc, 4 * (size_t)pr->n_clustered);
    for (int i = 0; i < pr->n_clustered; i++) {
        pr->qerr[2 * i] = acc[4 * i + 1] > 0 ? sqrt(acc[4 * i] / acc[4 * i + 1]) : 0;
        pr->qerr[2 * i + 1] = acc[4 * i + 3] > 0 ? sqrt(acc[4 * i + 2] / acc[4 * i + 3]) : 0;
    }
    xfree(acc);
}

void prec_qat_refresh(Precision *pr) {
    if (pr->mode == PRECISION_QAT && pr->shadow) shadow_build(pr);
}

void prec_measure(Precision *pr) {
    if (pr->n_clustered > 0 && pr->mode != PRECISION_FP32) measure(pr);
}

/* ---- experts.q ---- */

static size_t q_header_bytes(const Model *m) { return 16 + 32 * (size_t)n_clustered(m); }

static size_t q_layer_bytes(const MoeLayer *f, int group) {
    return (size_t)f->G * (tbytes(f, 0, group) + tbytes(f, 1, group)) +
           (size_t)f->E * (tbytes(f, 2, group) + tbytes(f, 3, group) + tbytes(f, 4, group) + tbytes(f, 5, group));
}

size_t prec_q_bytes(const Model *m, int group) {
    size_t n = q_header_bytes(m);
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED) n += q_layer_bytes(&m->ffn[l], group);
    return n;
}

/* byte offset of tensor `which`, row (group or expert) `row` of layer l's data block */
static size_t q_tensor_off(const MoeLayer *f, int group, int which, int row) {
    size_t off = 0;
    for (int w = 0; w < which; w++) off += (size_t)(w < 2 ? f->G : f->E) * tbytes(f, w, group);
    return off + (size_t)row * tbytes(f, which, group);
}

void prec_q_pack(const Model *m, const float *full, int group, void *out) {
    unsigned char *o = out;
    memcpy(o, Q_MAGIC, 8);
    uint32_t hv[2] = {Q_VERSION, (uint32_t)n_clustered(m)};
    memcpy(o + 8, hv, 8);
    size_t off = 16;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        int32_t rec[8] = {l, f->G, f->K, f->D, f->F, f->F1, f->r, group};
        memcpy(o + off, rec, sizeof rec);
        off += sizeof rec;
    }
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        for (int w = 0; w < 6; w++) {
            const ParamTensor *t = layer_tensor(m, l, w);
            int rows, cols;
            tshape(f, w, &rows, &cols);
            size_t per = (size_t)rows * cols, tb = tbytes(f, w, group);
            for (int q = 0; q < t->full0; q++) {
                QTensor qt;
                /* the blob is written in place (2-byte aligned: every size is even) */
                Status s = qtensor_view(&qt, tfmt(w), rows, cols, w < 2 ? 0 : group, o + off);
                ASSERTF(STATUS_OK(s), "%s", s.msg);
                qtensor_encode(&qt, full + t->full_offset + (size_t)q * per);
                off += tb;
            }
        }
    }
    ASSERT(off == prec_q_bytes(m, group));
}

static Status q_parse(const Model *m, const void *q, size_t n, const char *what, int *group_out) {
    const unsigned char *b = q;
    if (n < 16 || memcmp(b, Q_MAGIC, 8) != 0)
        return status_errorf("%s: not a stored-expert section (bad magic; expected %s)", what, Q_MAGIC);
    uint32_t hv[2];
    memcpy(hv, b + 8, 8);
    if (hv[0] != Q_VERSION) return status_errorf("%s: experts.q version %u, this build reads %u", what, hv[0], Q_VERSION);
    if ((int)hv[1] != n_clustered(m))
        return status_errorf("%s: %u clustered layers, the model has %d", what, hv[1], n_clustered(m));
    if (n < q_header_bytes(m)) return status_errorf("%s: truncated header (%zu bytes)", what, n);
    size_t off = 16;
    int group = -1;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        int32_t rec[8];
        memcpy(rec, b + off, sizeof rec);
        off += sizeof rec;
        int32_t want[7] = {l, f->G, f->K, f->D, f->F, f->F1, f->r};
        if (memcmp(rec, want, sizeof want) != 0)
            return status_errorf("%s: layer record (layer %d G %d K %d D %d F %d F1 %d r %d) does not match the model "
                                 "(layer %d G %d K %d D %d F %d F1 %d r %d)", what, rec[0], rec[1], rec[2], rec[3],
                                 rec[4], rec[5], rec[6], l, f->G, f->K, f->D, f->F, f->F1, f->r);
        if (rec[7] < 2 || rec[7] % 2) return status_errorf("%s: bad INT4 group %d", what, rec[7]);
        if (group >= 0 && rec[7] != group) return status_errorf("%s: mixed INT4 groups", what);
        group = rec[7];
    }
    if (group < 0) group = 64;
    if (n != prec_q_bytes(m, group))
        return status_errorf("%s: %zu bytes, the model needs %zu (INT4 group %d)", what, n, prec_q_bytes(m, group), group);
    *group_out = group;
    return status_ok();
}

Status prec_q_check(const Model *m, const void *q, size_t n, const char *what) {
    int group;
    return q_parse(m, q, n, what, &group);
}

/* start of layer l's data block */
static size_t q_layer_start(const Model *m, int l, int group) {
    size_t off = q_header_bytes(m);
    for (int i = 0; i < l; i++)
        if (m->ffn[i].kind == MOE_KIND_CLUSTERED) off += q_layer_bytes(&m->ffn[i], group);
    return off;
}

void prec_q_decode(const Model *m, const void *q, float *full) {
    const unsigned char *b = q;
    int32_t rec[8] = {0};
    if (n_clustered(m) > 0) memcpy(rec, b + 16, sizeof rec);   /* every record holds the same group */
    int group = rec[7];
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        size_t start = q_layer_start(m, l, group);
        for (int w = 0; w < 6; w++) {
            const ParamTensor *t = layer_tensor(m, l, w);
            int rows, cols;
            tshape(f, w, &rows, &cols);
            for (int row = 0; row < t->full0; row++) {
                QTensor qt;
                Status s2 = qtensor_view(&qt, tfmt(w), rows, cols, w < 2 ? 0 : group,
                                         (void *)(b + start + q_tensor_off(f, group, w, row)));
                ASSERTF(STATUS_OK(s2), "%s", s2.msg);
                qtensor_decode(&qt, full + t->full_offset + (size_t)row * rows * cols);
            }
        }
    }
}

/* ---- stored-format inference ---- */

static void set_err(Precision *pr, Status s) {
    if (!pr->has_err) { pr->err = s; pr->has_err = 1; }
}

/* span s of a group's unit: 0 base1, 1 base2, 2..5 the K members' a1, b1, a2, b2 */
static int views_of(PrecLayer *pl, unsigned char *const *spans, MoeQGroup *out) {
    int K = pl->K;
    QTensor *v = pl->qv;
    int rows, cols;
    MoeLayer f;
    memset(&f, 0, sizeof f);
    f.D = pl->D; f.F = pl->F; f.F1 = pl->F1; f.r = pl->r;
    for (int w = 0; w < 2; w++) {
        tshape(&f, w, &rows, &cols);
        Status s = qtensor_view(&v[w], QFORMAT_F16, rows, cols, 0, spans[w]);
        ASSERTF(STATUS_OK(s), "%s", s.msg);
    }
    for (int w = 2; w < 6; w++) {
        tshape(&f, w, &rows, &cols);
        size_t tb = qtensor_bytes(QFORMAT_INT4, rows, cols, pl->group);
        for (int j = 0; j < K; j++) {
            Status s = qtensor_view(&v[2 + (w - 2) * K + j], QFORMAT_INT4, rows, cols, pl->group, spans[w] + (size_t)j * tb);
            ASSERTF(STATUS_OK(s), "%s", s.msg);
        }
    }
    for (int i = 0; i < 2 + 4 * K; i++) v[i].dev = pl->dev;
    out->base1 = &v[0]; out->base2 = &v[1];
    out->a1 = &v[2]; out->b1 = &v[2 + K]; out->a2 = &v[2 + 2 * K]; out->b2 = &v[2 + 3 * K];
    return 0;
}

static int st_prepare(void *ctx, const int *g, int n) {
    PrecLayer *pl = ctx;
    if (!pl->offload) return 1;
    if (pl->pinned) return 1;
    if (n > pl->om.n_slots) return 0;   /* more groups than slots: one at a time */
    Status s = offload_pin(&pl->om, g, n, OFFLOAD_READ);
    if (!STATUS_OK(s)) { set_err(pl->owner, s); return 0; }
    pl->pinned = 1;
    return 1;
}

static int st_get(void *ctx, int g, MoeQGroup *out) {
    PrecLayer *pl = ctx;
    unsigned char *spans[6];
    if (!pl->offload) {
        unsigned char *u = pl->blob + (size_t)g * pl->unit_bytes;
        for (int s = 0; s < 6; s++) { spans[s] = u; u += pl->sp[s]; }
        return views_of(pl, spans, out);
    }
    if (pl->pinned && offload_is_resident(&pl->om, g)) {
        offload_wait(&pl->om, g);   /* the decode below waits for this group's copy only */
        for (int s = 0; s < 6; s++) spans[s] = offload_span(&pl->om, g, s);
        return views_of(pl, spans, out);
    }
    void *ptr[6];
    Status s = offload_acquire(&pl->om, g, OFFLOAD_READ, ptr);
    if (!STATUS_OK(s)) {
        set_err(pl->owner, status_errorf("layer %d, local group %d: %s", pl->layer, g, s.msg));
        return 1;
    }
    for (int q = 0; q < 6; q++) spans[q] = ptr[q];
    return views_of(pl, spans, out);
}

static int st_resident(void *ctx, int g) {
    PrecLayer *pl = ctx;
    return !pl->offload || offload_is_resident(&pl->om, g);
}

Status prec_attach_stored(Precision *pr, const void *q, size_t n, const OffloadConfig *oc, const char *dir,
                          MemAcct *acct) {
    Model *m = pr->m;
    int group;
    TRY(q_parse(m, q, n, "experts.q", &group));
    pr->group = group;
    const unsigned char *b = q;
    /* the stored path replaces the QAT shadow, if any */
    views_from_params(pr);
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        PrecLayer *pl = &pr->layers[l];
        const EpMap *em = &m->ep[l];
        pl->owner = pr;
        pl->layer = l; pl->Gl = em->per_rank; pl->K = f->K; pl->D = f->D; pl->F = f->F; pl->F1 = f->F1;
        pl->r = f->r; pl->group = group;
        pl->sp[0] = tbytes(f, 0, group);
        pl->sp[1] = tbytes(f, 1, group);
        for (int w = 2; w < 6; w++) pl->sp[w] = (size_t)f->K * tbytes(f, w, group);
        pl->unit_bytes = 0;
        for (int w = 0; w < 6; w++) pl->unit_bytes += pl->sp[w];
        pl->qv = xcalloc(sizeof(QTensor) * (size_t)(2 + 4 * f->K));
        size_t start = q_layer_start(m, l, group);
        /* this rank's groups, unit layout: base1, base2, then per factor its K members */
        unsigned char *blob = xmalloc(pl->unit_bytes * (size_t)(pl->Gl ? pl->Gl : 1));
        for (int s = 0; s < pl->Gl; s++) {
            unsigned char *u = blob + (size_t)s * pl->unit_bytes;
            int gg = em->lunit[s];
            for (int w = 0; w < 2; w++) {
                memcpy(u, b + start + q_tensor_off(f, group, w, gg), pl->sp[w]);
                u += pl->sp[w];
            }
            for (int w = 2; w < 6; w++) {
                size_t tb = tbytes(f, w, group);
                for (int j = 0; j < f->K; j++) {
                    int e = em->lslot_expert[s * f->K + j];
                    memcpy(u, b + start + q_tensor_off(f, group, w, e), tb);
                    u += tb;
                }
            }
        }
        if (oc && oc->enabled) {
            OffloadSpan spans[6];
            memset(spans, 0, sizeof spans);
            for (int w = 0; w < 6; w++) {
                spans[w].bytes = pl->sp[w];
                spans[w].kind = spans[w].stored_kind = w < 2 ? MEM_KIND_PARAM_FP16 : MEM_KIND_PARAM_INT4;
            }
            OffloadOptions o;
            memset(&o, 0, sizeof o);
            offload_options_from_config(&o, oc);
            char name[64];
            str_fmt(name, sizeof name, "r%04d_layer%02d", m->comm->rank, l);
            o.n_units = pl->Gl; o.n_spans = 6; o.spans = spans;
            o.dir = dir; o.name = name; o.no_fsync = true; o.acct = acct;
            /* device slots in the backend's memory (pinned host tier, side-stream fetches);
             * the kernels decode the slots through the dequant_rows slot, as the resident blobs */
            o.be = m->be;
            Status s = offload_init(&pl->om, &o);
            if (!STATUS_OK(s)) { xfree(blob); return s; }
            pl->offload = 1;
            pl->dev = 1;
            for (int g = 0; g < pl->Gl; g++) {
                const void *src[6];
                const unsigned char *u = blob + (size_t)g * pl->unit_bytes;
                for (int w = 0; w < 6; w++) { src[w] = u; u += pl->sp[w]; }
                s = offload_write_unit(&pl->om, g, src);
                if (!STATUS_OK(s)) { xfree(blob); return s; }
            }
            xfree(blob);
        } else {
            /* resident in backend memory: the kernels decode it through the dequant_rows slot */
            const Backend *be = m->be;
            size_t bytes = pl->unit_bytes * (size_t)pl->Gl;
            pl->blob = be->ops->alloc(be->ctx, bytes ? bytes : 1);
            if (bytes) be->ops->from_host(be->ctx, pl->blob, blob, bytes);
            xfree(blob);
            pl->dev = 1;
            if (acct) {
                memacct_add(acct, MEM_TIER_DEVICE, MEM_KIND_PARAM_FP16, (int64_t)(pl->sp[0] + pl->sp[1]) * pl->Gl);
                memacct_add(acct, MEM_TIER_DEVICE, MEM_KIND_PARAM_INT4,
                            (int64_t)(pl->sp[2] + pl->sp[3] + pl->sp[4] + pl->sp[5]) * pl->Gl);
            }
        }
        pl->ms.prepare = st_prepare;
        pl->ms.get = st_get;
        pl->ms.resident = st_resident;
        pl->ms.ctx = pl;
        pr->views[l].stored = &pl->ms;
    }
    pr->stored = 1;
    m->ffn_view = pr->views;
    return status_ok();
}

void prec_begin_batch(Precision *pr, long batch) {
    if (!pr->stored) return;
    for (int l = 0; l < pr->m->L; l++) {
        PrecLayer *pl = &pr->layers[l];
        pl->pinned = 0;
        if (pl->offload) offload_begin_step(&pl->om, batch);
    }
}

void prec_end_batch(Precision *pr) {
    if (!pr->stored) return;
    for (int l = 0; l < pr->m->L; l++) {
        PrecLayer *pl = &pr->layers[l];
        pl->pinned = 0;
        if (!pl->offload) continue;
        Status s = offload_end_step(&pl->om);
        if (!STATUS_OK(s)) set_err(pr, s);
    }
}

void prec_offload_totals(const Precision *pr, OffloadStats *out) {
    memset(out, 0, sizeof *out);
    if (!pr->stored) return;
    for (int l = 0; l < pr->m->L; l++) {
        const PrecLayer *pl = &pr->layers[l];
        if (!pl->offload) continue;
        const OffloadStats *t = offload_total_stats(&pl->om);
        out->acquires += t->acquires; out->hits += t->hits; out->misses += t->misses;
        out->prefetches += t->prefetches; out->prefetch_hits += t->prefetch_hits;
        out->evictions += t->evictions; out->idle_evictions += t->idle_evictions;
        out->writebacks += t->writebacks; out->bytes_in += t->bytes_in; out->bytes_out += t->bytes_out;
        out->stall_s += t->stall_s; out->background_s += t->background_s;
        out->resident_bytes += t->resident_bytes; out->peak_resident_bytes += t->peak_resident_bytes;
        out->resident_units += t->resident_units;
    }
}
