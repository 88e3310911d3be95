/* calib.c: `dcmoe bench calibrate` and the hardware file (see calib.h).
 * Legend: B T D F V H N E k = batch, seq, d_model, expert width, vocab, heads, tokens (B T),
 * experts, experts per token; M N K = GEMM shape. */
#include "calib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/utsname.h>
#include <time.h>
#include <yaml.h>

#include "backend.h"
#include "router.h"
#include "sim.h"

const char *const hw_op_names[HW_OP_N] = {
    "layernorm_fwd", "layernorm_bwd", "attention_fwd", "attention_bwd", "act_fwd", "act_bwd", "xent_fwd", "xent_bwd",
    "embed_fwd", "embed_bwd", "rows", "adamw", "sumsq", "router_fwd", "router_bwd"};

void hwfile_free(HwFile *h) {
    if (!h) return;
    free(h->gemm);
    free(h->alltoall);
    free(h->allreduce);
    free(h->straggle);
    h->straggle = NULL;
    h->n_straggle = 0;
    h->gemm = NULL;
    h->alltoall = h->allreduce = NULL;
    h->n_gemm = h->n_alltoall = h->n_allreduce = 0;
}

/* ---- the loader (libyaml's document tree: every node knows its line and column) ---- */

typedef struct Ld { yaml_document_t doc; const char *name; } Ld;

static Status at(const Ld *L, const yaml_node_t *n, const char *fmt, const char *what) {
    return status_errorf("%s:%zu:%zu: %s %s", L->name, n->start_mark.line + 1, n->start_mark.column + 1, what, fmt);
}

static const char *scalar(const yaml_node_t *n) { return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL; }

static Status num(const Ld *L, const yaml_node_t *n, const char *what, double lo, double *out) {
    const char *s = scalar(n);
    char *end = NULL;
    double v = s ? strtod(s, &end) : NAN;
    if (!s || end == s || *end || !isfinite(v)) return at(L, n, "expected a number", what);
    if (v < lo) {
        char msg[96];
        str_fmt(msg, sizeof msg, "%g is below its minimum %g", v, lo);
        return at(L, n, msg, what);
    }
    *out = v;
    return status_ok();
}

/* a mapping's value by key; *n_keys counts the keys seen so unknown ones can be reported */
static yaml_node_t *get(const Ld *L, yaml_node_t *map, const char *key) {
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        const char *k = scalar(yaml_document_get_node((yaml_document_t *)&L->doc, p->key));
        if (k && !strcmp(k, key)) return yaml_document_get_node((yaml_document_t *)&L->doc, p->value);
    }
    return NULL;
}

static Status only_keys(const Ld *L, yaml_node_t *map, const char *section, const char *const *keys, int n) {
    if (map->type != YAML_MAPPING_NODE) return at(L, map, "expected a mapping", section);
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *kn = yaml_document_get_node((yaml_document_t *)&L->doc, p->key);
        const char *k = scalar(kn);
        int ok = 0;
        for (int i = 0; i < n && k; i++) ok |= !strcmp(k, keys[i]);
        if (!ok) {
            char msg[160];
            str_fmt(msg, sizeof msg, "unknown field '%s'", k ? k : "?");
            return at(L, kn, msg, section);
        }
    }
    for (int i = 0; i < n; i++)
        if (!get(L, map, keys[i])) {
            char msg[160];
            str_fmt(msg, sizeof msg, "missing field '%s'", keys[i]);
            return at(L, map, msg, section);
        }
    return status_ok();
}

static Status load_curve(const Ld *L, yaml_node_t *seq, const char *section, HwPoint **out, int *n_out) {
    if (seq->type != YAML_SEQUENCE_NODE) return at(L, seq, "expected a list of {bytes, seconds, spread}", section);
    int n = (int)(seq->data.sequence.items.top - seq->data.sequence.items.start);
    *out = calloc((size_t)(n ? n : 1), sizeof(HwPoint));
    *n_out = 0;
    static const char *const keys[] = {"bytes", "seconds", "spread"};
    for (int i = 0; i < n; i++) {
        yaml_node_t *it = yaml_document_get_node((yaml_document_t *)&L->doc, seq->data.sequence.items.start[i]);
        TRY(only_keys(L, it, section, keys, 3));
        HwPoint *p = &(*out)[i];
        TRY(num(L, get(L, it, "bytes"), section, 0, &p->bytes));
        TRY(num(L, get(L, it, "seconds"), section, 0, &p->seconds));
        TRY(num(L, get(L, it, "spread"), section, 0, &p->spread));
        if (i > 0 && p->bytes <= (*out)[i - 1].bytes)
            return at(L, get(L, it, "bytes"), "sizes must increase down the list", section);
        (*n_out)++;
    }
    return status_ok();
}

static Status load_doc(HwFile *h, Ld *L) {
    yaml_node_t *root = yaml_document_get_root_node(&L->doc);
    if (!root) return status_errorf("%s: empty hardware file (write one with `dcmoe bench calibrate --out FILE`)", L->name);
    static const char *const top[] = {"format", "date", "description", "ranks", "threads", "memory", "ops", "gemm",
                                      "alltoall", "allreduce", "straggle"};
    TRY(only_keys(L, root, "hardware file", top, 11));
    yaml_node_t *n = get(L, root, "format");
    if (!scalar(n) || strcmp(scalar(n), "dcmoe-hardware-1") != 0)
        return at(L, n, "expected 'dcmoe-hardware-1' (a file written by `dcmoe bench calibrate`)", "format:");
    if (!scalar(get(L, root, "date"))) return at(L, get(L, root, "date"), "expected a string", "date:");
    if (!scalar(get(L, root, "description"))) return at(L, get(L, root, "description"), "expected a string", "description:");
    str_fmt(h->date, sizeof h->date, "%s", scalar(get(L, root, "date")));
    str_fmt(h->description, sizeof h->description, "%s", scalar(get(L, root, "description")));
    double v;
    TRY(num(L, get(L, root, "ranks"), "ranks:", 1, &v));
    h->ranks = (int)v;
    TRY(num(L, get(L, root, "threads"), "threads:", 1, &v));
    h->threads = (int)v;
    yaml_node_t *mem = get(L, root, "memory");
    static const char *const mk[] = {"copy_gbs", "triad_gbs", "copy_cold_gbs"};
    TRY(only_keys(L, mem, "memory:", mk, get(L, mem, "copy_cold_gbs") ? 3 : 2));
    TRY(num(L, get(L, mem, "copy_gbs"), "memory.copy_gbs:", 1e-9, &h->copy_gbs));
    TRY(num(L, get(L, mem, "triad_gbs"), "memory.triad_gbs:", 1e-9, &h->triad_gbs));
    h->copy_cold_gbs = h->copy_gbs;   /* optional (files written before it existed) */
    if (get(L, mem, "copy_cold_gbs")) TRY(num(L, get(L, mem, "copy_cold_gbs"), "memory.copy_cold_gbs:", 1e-9, &h->copy_cold_gbs));
    yaml_node_t *ops = get(L, root, "ops");
    TRY(only_keys(L, ops, "ops:", hw_op_names, HW_OP_N));
    for (int i = 0; i < HW_OP_N; i++) {
        char sec[64];
        str_fmt(sec, sizeof sec, "ops.%s:", hw_op_names[i]);
        yaml_node_t *o = get(L, ops, hw_op_names[i]);
        static const char *const ok[] = {"ns", "spread"};
        TRY(only_keys(L, o, sec, ok, 2));
        TRY(num(L, get(L, o, "ns"), sec, 0, &h->op_ns[i]));
        TRY(num(L, get(L, o, "spread"), sec, 0, &h->op_spread[i]));
    }
    yaml_node_t *g = get(L, root, "gemm");
    if (g->type != YAML_SEQUENCE_NODE || g->data.sequence.items.top == g->data.sequence.items.start)
        return at(L, g, "expected a non-empty list of {ta, tb, m, n, k, gflops, spread}", "gemm:");
    int ng = (int)(g->data.sequence.items.top - g->data.sequence.items.start);
    h->gemm = calloc((size_t)ng, sizeof(HwGemm));
    static const char *const gk[] = {"ta", "tb", "m", "n", "k", "gflops", "spread"};
    for (int i = 0; i < ng; i++) {
        yaml_node_t *it = yaml_document_get_node(&L->doc, g->data.sequence.items.start[i]);
        TRY(only_keys(L, it, "gemm:", gk, 7));
        HwGemm *e = &h->gemm[i];
        double x[5];
        for (int q = 0; q < 5; q++) {
            TRY(num(L, get(L, it, gk[q]), "gemm:", q < 2 ? 0 : 1, &x[q]));
            if (q < 2 && x[q] > 1) return at(L, get(L, it, gk[q]), "expected 0 or 1", "gemm:");
        }
        e->ta = (int)x[0]; e->tb = (int)x[1]; e->M = (int)x[2]; e->N = (int)x[3]; e->K = (int)x[4];
        TRY(num(L, get(L, it, "gflops"), "gemm:", 1e-9, &e->gflops));
        TRY(num(L, get(L, it, "spread"), "gemm:", 0, &e->spread));
        h->n_gemm++;
    }
    TRY(load_curve(L, get(L, root, "alltoall"), "alltoall:", &h->alltoall, &h->n_alltoall));
    TRY(load_curve(L, get(L, root, "allreduce"), "allreduce:", &h->allreduce, &h->n_allreduce));
    yaml_node_t *sg = get(L, root, "straggle");
    if (sg->type != YAML_SEQUENCE_NODE) return at(L, sg, "expected a list of {interval_s, overhead, spread}", "straggle:");
    int nsg = (int)(sg->data.sequence.items.top - sg->data.sequence.items.start);
    h->straggle = calloc((size_t)(nsg ? nsg : 1), sizeof(HwStrag));
    static const char *const sk[] = {"interval_s", "overhead", "spread"};
    for (int i = 0; i < nsg; i++) {
        yaml_node_t *it = yaml_document_get_node(&L->doc, sg->data.sequence.items.start[i]);
        TRY(only_keys(L, it, "straggle:", sk, 3));
        HwStrag *p = &h->straggle[i];
        TRY(num(L, get(L, it, "interval_s"), "straggle:", 1e-12, &p->interval_s));
        TRY(num(L, get(L, it, "overhead"), "straggle:", -1, &p->overhead));
        TRY(num(L, get(L, it, "spread"), "straggle:", 0, &p->spread));
        if (i > 0 && p->interval_s <= h->straggle[i - 1].interval_s)
            return at(L, get(L, it, "interval_s"), "intervals must increase down the list", "straggle:");
        h->n_straggle++;
    }
    if (h->ranks > 1 && (h->n_alltoall < 2 || h->n_allreduce < 2))
        return at(L, root, "needs at least 2 alltoall and 2 allreduce sizes (measured between ranks > 1)", "hardware file:");
    return status_ok();
}

Status hwfile_load_string(HwFile *h, const char *yaml, size_t len, const char *name) {
    memset(h, 0, sizeof *h);
    str_fmt(h->path, sizeof h->path, "%s", name);
    yaml_parser_t p;
    Ld L = {.name = name};
    if (!yaml_parser_initialize(&p)) return status_errorf("%s: cannot initialise the YAML parser", name);
    yaml_parser_set_input_string(&p, (const unsigned char *)yaml, len);
    if (!yaml_parser_load(&p, &L.doc)) {
        Status st = status_errorf("%s:%zu:%zu: YAML syntax error: %s", name, p.problem_mark.line + 1, p.problem_mark.column + 1,
                                  p.problem ? p.problem : "?");
        yaml_parser_delete(&p);
        return st;
    }
    yaml_parser_delete(&p);
    Status st = load_doc(h, &L);
    yaml_document_delete(&L.doc);
    if (!STATUS_OK(st)) hwfile_free(h);
    return st;
}

Status hwfile_load(HwFile *h, const char *path) {
    memset(h, 0, sizeof *h);
    void *data = NULL;
    size_t n = 0;
    if (!file_exists(path)) return status_errorf("%s: no such hardware file (write one with `dcmoe bench calibrate --out %s`)", path, path);
    TRY(file_read_all(path, &data, &n));
    Status st = hwfile_load_string(h, data, n, path);
    free(data);
    return st;
}

Status hwfile_write(const HwFile *h, const char *path) {
    size_t cap = 4096 + (size_t)(h->n_gemm + h->n_alltoall + h->n_allreduce + HW_OP_N) * 160;
    char *buf = xmalloc(cap);
    size_t len = 0;
#define OUT(...) do { int w_ = snprintf(buf + len, cap - len, __VA_ARGS__); len += (size_t)(w_ > 0 ? w_ : 0); } while (0)
    OUT("# dcmoe hardware file, written by `dcmoe bench calibrate`; read by dcmoe simulate (sim.hardware_file).\n"
        "# Every figure is a median over repeats; spread = (max - min) / median of the repeats.\n");
    OUT("format: dcmoe-hardware-1\ndate: \"%s\"\ndescription: \"%s\"\nranks: %d\nthreads: %d\n", h->date, h->description,
        h->ranks, h->threads);
    OUT("memory:   # GB/s per rank, every rank streaming at once (copy: a = b; triad: a = b + s c)\n"
        "  copy_gbs: %.4g\n  triad_gbs: %.4g\n  copy_cold_gbs: %.4g  # 512 KiB after the caches were evicted (the exchange's rows to self)\n",
        h->copy_gbs, h->triad_gbs, h->copy_cold_gbs);
    OUT("ops:      # the trainer's backend ops, ns per unit (calib.h: per element, per B H T T hd, per parameter, per token x expert)\n");
    for (int i = 0; i < HW_OP_N; i++) OUT("  %s: {ns: %.5g, spread: %.3f}\n", hw_op_names[i], h->op_ns[i], h->op_spread[i]);
    OUT("gemm:     # sgemm per rank: C[m,n] = op(A)[m,k] op(B)[k,n], ta/tb = operand transposed\n");
    for (int i = 0; i < h->n_gemm; i++) {
        const HwGemm *g = &h->gemm[i];
        OUT("  - {ta: %d, tb: %d, m: %d, n: %d, k: %d, gflops: %.4g, spread: %.3f}\n", g->ta, g->tb, g->M, g->N, g->K, g->gflops,
            g->spread);
    }
    OUT("alltoall: # one alltoallv between the ranks: bytes each rank sends to the others -> seconds (slowest rank; caches evicted before each call, as after compute)%s\n",
        h->n_alltoall ? "" : "\n  []");
    for (int i = 0; i < h->n_alltoall; i++)
        OUT("  - {bytes: %.0f, seconds: %.5g, spread: %.3f}\n", h->alltoall[i].bytes, h->alltoall[i].seconds, h->alltoall[i].spread);
    OUT("allreduce: # one float32 sum allreduce over the ranks: buffer bytes -> seconds (slowest rank; caches evicted before each call)%s\n",
        h->n_allreduce ? "" : "\n  []");
    for (int i = 0; i < h->n_allreduce; i++)
        OUT("  - {bytes: %.0f, seconds: %.5g, spread: %.3f}\n", h->allreduce[i].bytes, h->allreduce[i].seconds, h->allreduce[i].spread);
    OUT("straggle: # the same work on every rank, then a synchronisation: slowest / mean rank time - 1, by interval%s\n",
        h->n_straggle ? "" : "\n  []");
    for (int i = 0; i < h->n_straggle; i++)
        OUT("  - {interval_s: %.5g, overhead: %.4f, spread: %.4f}\n", h->straggle[i].interval_s, h->straggle[i].overhead,
            h->straggle[i].spread);
#undef OUT
    ASSERT(len < cap);
    Status st = file_write_atomic(path, buf, len);
    xfree(buf);
    return st;
}

/* ---- interpolation ---- */

double hwfile_gemm_s(const HwFile *h, int ta, int tb, int M, int N, int K) {
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    double flops = 2.0 * M * N * K, lm = log((double)M), ln = log((double)N), lk = log((double)K);
    /* the 4 nearest shapes of this transposition (any transposition if none) */
    int best[4] = {-1, -1, -1, -1};
    double bd[4] = {INFINITY, INFINITY, INFINITY, INFINITY};
    for (int pass = 0; pass < 2 && best[0] < 0; pass++)
        for (int i = 0; i < h->n_gemm; i++) {
            const HwGemm *g = &h->gemm[i];
            if (pass == 0 && (g->ta != ta || g->tb != tb)) continue;
            double a = lm - log((double)g->M), b = ln - log((double)g->N), c = lk - log((double)g->K);
            double d = a * a + b * b + c * c;
            if (d == 0) return flops / (g->gflops * 1e9);
            for (int q = 0; q < 4; q++)
                if (d < bd[q]) {
                    for (int z = 3; z > q; z--) { bd[z] = bd[z - 1]; best[z] = best[z - 1]; }
                    bd[q] = d;
                    best[q] = i;
                    break;
                }
        }
    if (best[0] < 0) return 0;
    /* inverse-distance weights on the time per FLOP (1 / rate) */
    double wsum = 0, inv = 0;
    for (int q = 0; q < 4 && best[q] >= 0; q++) {
        double w = 1.0 / bd[q];
        wsum += w;
        inv += w / h->gemm[best[q]].gflops;
    }
    return flops * (inv / wsum) / 1e9;
}

double hwfile_curve_s(const HwPoint *p, int n, double bytes) {
    if (n <= 0) return 0;
    if (n == 1 || bytes <= p[0].bytes) return p[0].seconds;
    int i = 1;
    while (i < n - 1 && p[i].bytes < bytes) i++;
    double x0 = p[i - 1].bytes, x1 = p[i].bytes, y0 = p[i - 1].seconds, y1 = p[i].seconds;
    double t = y0 + (y1 - y0) * (bytes - x0) / (x1 - x0);
    return t > p[0].seconds ? t : p[0].seconds;
}

double hwfile_straggle(const HwFile *h, double t) {
    int n = h->n_straggle;
    if (n <= 0 || t <= 0) return 0;
    const HwStrag *s = h->straggle;
    if (t <= s[0].interval_s) return s[0].overhead;
    if (t >= s[n - 1].interval_s) return s[n - 1].overhead;
    int i = 1;
    while (s[i].interval_s < t) i++;
    double a = log(t / s[i - 1].interval_s) / log(s[i].interval_s / s[i - 1].interval_s);
    return s[i - 1].overhead + a * (s[i].overhead - s[i - 1].overhead);
}

/* ---- measuring ---- */

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* median and relative spread of n samples */
static double median_spread(double *s, int n, double *spread) {
    qsort(s, (size_t)n, sizeof(double), cmp_d);
    double med = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    *spread = med > 0 ? (s[n - 1] - s[0]) / med : 0;
    return med;
}

#define REPEATS 5

/* time fn(arg) in blocks of `inner` calls sized to ~target seconds; REPEATS blocks; seconds per
 * call (median) */
typedef void (*TimedFn)(void *arg);
static double time_fn(TimedFn fn, void *arg, double target, double *spread) {
    fn(arg);   /* warm up: pages, BLAS threads */
    double t0 = time_now();
    fn(arg);
    double one = time_now() - t0;
    int inner = one > 0 ? (int)(target / one) : 1000;
    if (inner < 1) inner = 1;
    if (inner > 100000) inner = 100000;
    double s[REPEATS];
    for (int r = 0; r < REPEATS; r++) {
        t0 = time_now();
        for (int i = 0; i < inner; i++) fn(arg);
        s[r] = (time_now() - t0) / inner;
    }
    return median_spread(s, REPEATS, spread);
}

typedef struct GemmArg { const Backend *be; int ta, tb, M, N, K; float *a, *b, *c; } GemmArg;
static void gemm_fn(void *p) {
    GemmArg *g = p;
    int lda = g->ta ? g->M : g->K, ldb = g->tb ? g->K : g->N;
    g->be->ops->gemm(g->be->ctx, g->ta, g->tb, g->M, g->N, g->K, 1.0f, g->a, lda, g->b, ldb, 0.0f, g->c, g->N);
}

/* the straggling test's unit of work: one sgemm, then the next chunk of a streamed buffer
 * (one of STRAG_BLOCKS) */
#define STRAG_BLOCKS 5
typedef struct StragArg { GemmArg *g; float *set[STRAG_BLOCKS], *x; size_t n, chunk, pos; } StragArg;
static void strag_fn(void *p) {
    StragArg *a = p;
    gemm_fn(a->g);
    if (a->pos + a->chunk > a->n) a->pos = 0;
    float *x = a->x + a->pos;
    for (size_t i = 0; i < a->chunk; i++) x[i] = x[i] * 0.5f + 0.5f;
    a->pos += a->chunk;
}

typedef struct OpArg {
    const Backend *be;
    int op, B, T, D, H, F, V, E, k, n;
    float *x, *y, *z, *w, *bb, *mean, *rstd, *att, *scr, *m1, *m2;
    int32_t *tok, *idx;
    Route *rt;
    const MoeConfig *mc;
} OpArg;

static void op_fn(void *p) {
    OpArg *a = p;
    const BackendOps *o = a->be->ops;
    void *cx = a->be->ctx;
    int N = a->B * a->T;
    switch (a->op) {
    case HW_OP_LAYERNORM_FWD: o->layernorm_forward(cx, a->y, a->mean, a->rstd, a->x, a->w, a->bb, N, a->D); break;
    case HW_OP_LAYERNORM_BWD: o->layernorm_backward(cx, a->z, a->m1, a->m2, a->y, a->x, a->w, a->mean, a->rstd, N, a->D); break;
    case HW_OP_ATTENTION_FWD: o->attention_forward(cx, a->y, a->att, a->x, a->B, a->T, a->D, a->H); break;
    case HW_OP_ATTENTION_BWD: o->attention_backward(cx, a->z, a->scr, a->y, a->x, a->att, a->B, a->T, a->D, a->H); break;
    case HW_OP_ACT_FWD: o->act_forward(cx, ACT_KIND_GELU, a->y, a->x, N, a->F); break;
    case HW_OP_ACT_BWD: o->act_backward(cx, ACT_KIND_GELU, a->z, a->y, a->x, N, a->F); break;
    case HW_OP_XENT_FWD: o->xent_forward(cx, a->y, a->x, a->tok, N, a->V); break;
    case HW_OP_XENT_BWD: o->xent_backward(cx, a->z, a->x, a->tok, 1.0f, N, a->V); break;
    case HW_OP_EMBED_FWD: o->embed_forward(cx, a->y, a->tok, a->x, a->w, a->B, a->T, a->D); break;
    case HW_OP_EMBED_BWD: o->embed_backward(cx, a->z, a->m1, a->y, a->tok, a->B, a->T, a->D); break;
    case HW_OP_ROWS: o->gather_rows(cx, a->y, a->x, a->idx, a->n, a->D); break;
    case HW_OP_ADAMW: o->adamw(cx, a->x, a->y, a->m1, a->m2, (size_t)a->n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3); break;
    case HW_OP_SUMSQ: (void)o->sumsq(cx, a->x, (size_t)a->n); break;
    case HW_OP_ROUTER_FWD: router_select(a->rt, a->mc, NULL, NULL, N, NULL); break;
    case HW_OP_ROUTER_BWD: router_backward(a->rt, a->mc, NULL, a->rt->dgate); break;
    }
}

/* units of each op at the arg's sizes */
static double op_units(const OpArg *a) {
    double N = (double)a->B * a->T;
    switch (a->op) {
    case HW_OP_LAYERNORM_FWD: case HW_OP_LAYERNORM_BWD: case HW_OP_EMBED_FWD: case HW_OP_EMBED_BWD: return N * a->D;
    case HW_OP_ATTENTION_FWD: case HW_OP_ATTENTION_BWD: return (double)a->B * a->H * a->T * a->T * (a->D / a->H);
    case HW_OP_ACT_FWD: case HW_OP_ACT_BWD: return N * a->F;
    case HW_OP_XENT_FWD: case HW_OP_XENT_BWD: return N * a->V;
    case HW_OP_ROWS: return (double)a->n * a->D;
    case HW_OP_ADAMW: case HW_OP_SUMSQ: return a->n;
    default: return N * a->E;   /* router */
    }
}

typedef struct MemArg { float *a, *b, *c; size_t n; int triad; } MemArg;
static void mem_fn(void *p) {
    MemArg *m = p;
    if (m->triad) for (size_t i = 0; i < m->n; i++) m->a[i] = m->b[i] + 3.0f * m->c[i];
    else memcpy(m->a, m->b, sizeof(float) * m->n);
}

/* the caches as a collective (or the exchange's copy to self) of the trainer meets them:
 * evicted by the compute before it. Every rank walks (read-modify-write, one byte per line) a
 * buffer of twice its last-level cache, 16 to 64 MiB (virtual machines may report the host's
 * whole L3: this one reports 508 MiB; with a 64 MiB walk the calls time as the trainer's do,
 * measured call by call inside a 2-rank quickstart run) */
typedef struct Evict { unsigned char *buf; size_t n; } Evict;

static void evict_init(Evict *e) {
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    size_t n = l3 > 0 ? 2 * (size_t)l3 : (size_t)64 << 20;
    if (n < ((size_t)16 << 20)) n = (size_t)16 << 20;
    if (n > ((size_t)64 << 20)) n = (size_t)64 << 20;
    e->n = n;
    e->buf = xcalloc(n);
    for (size_t i = 0; i < n; i += 4096) e->buf[i] = 1;   /* fault the pages in before any timing */
}

static void evict(Evict *e) {
    for (size_t i = 0; i < e->n; i += 64) e->buf[i]++;
}

/* one call of a collective as the trainer makes it, in lockstep (a barrier); this rank's
 * seconds. The caches are evicted by the compute before it. An all-to-all's payload was then
 * just written by the gather that packs the rows (modified lines in this core's cache); an
 * allreduce's payload, the gradients, was written over the whole backward and is mostly out of
 * the caches when the sum starts. The payload buffers are the ones calib_run allocated first
 * (the memory a buffer lands on matters more than its cache state: see there) */
#define COLL_SAMPLES 15
#define COLL_BUFS 5

/* one call of fn as the trainer meets it: median seconds of COLL_SAMPLES calls (after two
 * untimed ones), each after an eviction of the caches and prep(arg), which is not timed */
static double time_cold(TimedFn prep, TimedFn fn, void *arg, Evict *ev, double *spread) {
    double s[COLL_SAMPLES];
    for (int r = -2; r < COLL_SAMPLES; r++) {
        evict(ev);
        if (prep) prep(arg);
        double t0 = time_now();
        fn(arg);
        if (r >= 0) s[r] = time_now() - t0;
    }
    return median_spread(s, COLL_SAMPLES, spread);
}
static double time_coll_once(Comm *comm, Evict *ev, int kind, size_t bytes, void *sb, void *rb, size_t *sc, size_t *sd,
                             size_t *rc, size_t *rd) {
    int P = comm->size;
    size_t off = 0;
    for (int d = 0; d < P; d++) {   /* bytes split evenly over the other ranks, packed */
        size_t per = d == comm->rank ? 0 : bytes / (size_t)(P - 1);
        sc[d] = rc[d] = per;
        sd[d] = rd[d] = off;
        off += per;
    }
    if (kind == 1)   /* the gradients: written by the backward, then evicted by the rest of it */
        for (size_t i = 0; i < bytes / sizeof(float); i++) ((float *)sb)[i] = (float)(i % 97) * 1e-3f;
    evict(ev);
    if (kind == 0) memset(sb, 0, bytes);
    comm_barrier(comm);
    double t0 = time_now();
    if (kind == 0) comm_alltoallv_bytes(comm, sb, sc, sd, rb, rc, rd, COMM_PHASE_OTHER);
    else comm_allreduce_sum_f32(comm, sb, bytes / sizeof(float), COMM_PHASE_OTHER);
    return time_now() - t0;
}

/* a GEMM's first operand written, as the activation a layer has just produced */
static void gemm_write_a(void *p) {
    GemmArg *g = p;
    size_t na = (size_t)g->M * g->K;
    for (size_t i = 0; i < na; i++) g->a[i] = (float)((i * 37 % 101) - 50) * 0.01f;
}

/* a copy of the exchange's rows to self */
typedef struct CopyArg { char *src, *dst; size_t n; } CopyArg;
static void copy_fn(void *p) {
    CopyArg *c = p;
    memmove(c->dst, c->src, c->n);
    c->src[c->n / 2] += c->dst[c->n / 3];   /* the copy is used */
}

static int shape_seen(const HwGemm *g, int n, int ta, int tb, int M, int N, int K) {
    for (int i = 0; i < n; i++)
        if (g[i].ta == ta && g[i].tb == tb && g[i].M == M && g[i].N == N && g[i].K == K) return 1;
    return 0;
}

Status calib_run(Comm *comm, const CalibOptions *o) {
    Backend be;
    TRY(backend_cpu_init(&be, o->threads > 0 ? o->threads : 1));
    HwFile h;
    memset(&h, 0, sizeof h);
    h.ranks = comm->size;
    h.threads = be.threads > 0 ? be.threads : 1;
    double target = o->quick ? 0.002 : 0.02;
    int rank0 = comm->rank == 0;
    /* the collectives' payload buffers, allocated and written first, as the trainer's are at
     * its start: on this virtual machine a buffer's speed in a collective between processes
     * depends on the memory it landed on, and the first memory a new process gets is the slow
     * kind (a 5.7 MB allreduce: 1.6-2.0 ms on the first buffers a process allocated, 0.9-1.0 ms
     * on ones allocated after a few hundred MB; consecutive buffers share the draw). Used in
     * turn, COLL_BUFS of each: the median over them */
    size_t top = (size_t)64 << 18;
    int n_buf = comm->size < 2 ? 0 : o->quick ? 2 : COLL_BUFS;
    char *sbv[COLL_BUFS], *rbv[COLL_BUFS], *gbv[COLL_BUFS];
    for (int b = 0; b < n_buf; b++) {
        gbv[b] = xmalloc(top + 64); sbv[b] = xmalloc(top + 64); rbv[b] = xmalloc(top + 64);
        memset(gbv[b], 0, top + 64); memset(sbv[b], 0, top + 64); memset(rbv[b], 0, top + 64);
    }
    /* -- GEMM grid: the three transpositions the trainer uses, rows from expert-sized to a
     *    batch, widths around the model's; plus the config's exact shapes -- */
    int cap = 4096;
    HwGemm *grid = xcalloc(sizeof(HwGemm) * (size_t)cap);
    int ng = 0;
    static const int tt[3][2] = {{0, 0}, {0, 1}, {1, 0}};
    static const int Ms[] = {8, 32, 128, 512, 2048}, NKs[][2] = {{128, 128}, {384, 128}, {128, 384}, {256, 128}, {128, 256},
                                                                 {512, 128}, {128, 512}, {64, 64}, {8, 128}, {128, 8}};
    int nM = o->quick ? 2 : o->model_only ? 0 : 5, nNK = o->quick ? 2 : 10;
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < nM; i++)
            for (int j = 0; j < nNK; j++)
                grid[ng++] = (HwGemm){tt[t][0], tt[t][1], Ms[i], NKs[j][0], NKs[j][1], 0, 0};
    if (o->cfg) {
        SimGemmShape *sh = xmalloc(sizeof(SimGemmShape) * 512);
        int ns = sim_gemm_shapes(o->cfg, comm->size, sh, 512);
        for (int i = 0; i < ns && ng < cap; i++)
            if (!shape_seen(grid, ng, sh[i].ta, sh[i].tb, sh[i].M, sh[i].N, sh[i].K))
                grid[ng++] = (HwGemm){sh[i].ta, sh[i].tb, sh[i].M, sh[i].N, sh[i].K, 0, 0};
        xfree(sh);
    }
    size_t big = 0;
    for (int i = 0; i < ng; i++) {
        size_t a = (size_t)grid[i].M * grid[i].K, b = (size_t)grid[i].K * grid[i].N, c = (size_t)grid[i].M * grid[i].N;
        if (a > big) big = a;
        if (b > big) big = b;
        if (c > big) big = c;
    }
    GemmArg ga = {.be = &be};
    ga.a = be.ops->alloc(be.ctx, sizeof(float) * big);
    ga.b = be.ops->alloc(be.ctx, sizeof(float) * big);
    ga.c = be.ops->alloc(be.ctx, sizeof(float) * big);
    for (size_t i = 0; i < big; i++) { ga.a[i] = (float)((i * 37 % 101) - 50) * 0.01f; ga.b[i] = ga.a[i]; }
    /* a call shorter than 2 ms is timed as the trainer meets it, one call at a time:
     * the caches evicted by the compute before it and the first operand just written (the
     * activation a layer has just produced; the weights and the output cold). In a loop the
     * operands stay in the caches: the quickstart's expert GEMMs ran 8-25% slower in a
     * training run than in a loop, its rank-4 ones 10-33% */
    Evict gev;
    evict_init(&gev);
    for (int i = 0; i < ng; i++) {
        ga.ta = grid[i].ta; ga.tb = grid[i].tb; ga.M = grid[i].M; ga.N = grid[i].N; ga.K = grid[i].K;
        comm_barrier(comm);   /* every rank runs the shape at once, as in a step */
        double sp, t = time_fn(gemm_fn, &ga, target, &sp);
        if (t < 2e-3 && !o->quick) t = time_cold(gemm_write_a, gemm_fn, &ga, &gev, &sp);
        grid[i].gflops = 2.0 * ga.M * ga.N * (double)ga.K / t / 1e9;
        grid[i].spread = sp;
    }
    xfree(gev.buf);
    be.ops->free(be.ctx, ga.a); be.ops->free(be.ctx, ga.b); be.ops->free(be.ctx, ga.c);
    h.gemm = malloc(sizeof(HwGemm) * (size_t)ng);
    memcpy(h.gemm, grid, sizeof(HwGemm) * (size_t)ng);
    h.n_gemm = ng;
    xfree(grid);
    /* -- memory bandwidth: 3 arrays of 8 MiB (beyond the caches) -- */
    {
        size_t n = o->quick ? (size_t)1 << 18 : (size_t)1 << 21;
        MemArg m = {xcalloc(sizeof(float) * n), xcalloc(sizeof(float) * n), xcalloc(sizeof(float) * n), n, 0};
        double sp;
        comm_barrier(comm);
        h.copy_gbs = 2.0 * sizeof(float) * n / time_fn(mem_fn, &m, target * 5, &sp) / 1e9;
        m.triad = 1;
        comm_barrier(comm);
        h.triad_gbs = 3.0 * sizeof(float) * n / time_fn(mem_fn, &m, target * 5, &sp) / 1e9;
        xfree(m.a); xfree(m.b); xfree(m.c);
        /* a copy of 512 KiB (an exchange's rows to self) after compute evicted the caches */
        Evict ev;
        evict_init(&ev);
        CopyArg cp = {.n = (size_t)512 << 10};
        cp.src = xcalloc(cp.n);
        cp.dst = xcalloc(cp.n);
        h.copy_cold_gbs = 2.0 * cp.n / time_cold(NULL, copy_fn, &cp, &ev, &sp) / 1e9;
        xfree(cp.src); xfree(cp.dst); xfree(ev.buf);
    }
    /* -- the trainer's non-GEMM ops at the model's sizes (or a small default model) -- */
    {
        OpArg a = {.be = &be, .B = 8, .T = 64, .D = 128, .H = 4, .F = 256, .V = 10000, .E = 8, .k = 2};
        MoeConfig mc;
        Config dflt;
        config_defaults(&dflt);
        mc = o->cfg ? o->cfg->moe : dflt.moe;
        if (o->cfg) {
            const Config *c = o->cfg;
            a.T = c->model.seq_len; a.D = c->model.d_model; a.H = c->model.n_head; a.F = c->moe.d_ff_expert;
            a.V = c->data.vocab_max; a.E = c->moe.n_experts > 1 ? c->moe.n_experts : 8; a.k = c->moe.top_k;
            a.B = c->train.batch_size / comm->size > 0 ? c->train.batch_size / comm->size : 1;
        }
        if (o->quick) { a.B = 2; a.V = a.V < 2000 ? a.V : 2000; }
        mc.kind = MOE_KIND_STANDARD; mc.n_experts = a.E; mc.top_k = a.k; mc.max_nodes = 0; mc.home_bias = 0;
        int N = a.B * a.T;
        size_t nx = (size_t)N * (size_t)(a.V > 3 * a.D ? a.V : 3 * a.D);
        if ((size_t)N * a.F > nx) nx = (size_t)N * a.F;
        size_t natt = (size_t)a.B * a.H * a.T * a.T;
        a.n = o->quick ? 1 << 16 : 1 << 20;
        /* AdamW and the gradient norm over the parameters one rank of the model holds (up to
         * 16M: beyond every cache, the rate per parameter no longer changes) */
        double n_local = o->cfg && !o->quick ? sim_local_params(o->cfg, comm->size) : a.n;
        int n_opt = n_local > (double)(1 << 24) ? 1 << 24 : n_local < 1 ? 1 : (int)n_local;
        if ((size_t)a.n > nx) nx = (size_t)a.n;
        if ((size_t)n_opt > nx) nx = (size_t)n_opt;
        float **bufs[] = {&a.x, &a.y, &a.z, &a.m1, &a.m2};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) *bufs[i] = be.ops->alloc(be.ctx, sizeof(float) * nx);
        for (size_t i = 0; i < nx; i++) a.x[i] = (float)((i * 37 % 101) - 50) * 0.01f;
        a.w = be.ops->alloc(be.ctx, sizeof(float) * (size_t)(a.V > a.T ? a.V : a.T) * a.D);
        a.bb = be.ops->alloc(be.ctx, sizeof(float) * a.D);
        a.mean = be.ops->alloc(be.ctx, sizeof(float) * N);
        a.rstd = be.ops->alloc(be.ctx, sizeof(float) * N);
        a.att = be.ops->alloc(be.ctx, sizeof(float) * natt);
        a.scr = be.ops->alloc(be.ctx, sizeof(float) * natt);
        a.tok = xmalloc(sizeof(int32_t) * N);
        for (int i = 0; i < N; i++) a.tok[i] = (int32_t)((i * 7919) % a.V);
        int nrows = a.n / a.D;
        a.idx = xmalloc(sizeof(int32_t) * (size_t)nrows);
        for (int i = 0; i < nrows; i++) a.idx[i] = (int32_t)((i * 7919) % nrows);
        Route rt;
        router_init(&rt, N, a.E, a.k, 0, 0);
        for (size_t i = 0; i < (size_t)N * a.E; i++) rt.logits[i] = a.x[i];
        router_select(&rt, &mc, NULL, NULL, N, NULL);
        for (size_t i = 0; i < (size_t)N * a.k; i++) { rt.dgate[i] = 0.01f; rt.pos[i] = 0; }
        a.rt = &rt;
        a.mc = &mc;
        for (int op = 0; op < HW_OP_N; op++) {
            a.op = op;
            int n_keep = a.n;
            if (op == HW_OP_ROWS) a.n = nrows;   /* rows gathered */
            if (op == HW_OP_ADAMW || op == HW_OP_SUMSQ) a.n = n_opt;
            comm_barrier(comm);   /* every rank runs the op at once, as in a step */
            double sp, t = time_fn(op_fn, &a, target, &sp);
            h.op_ns[op] = t / op_units(&a) * 1e9;
            h.op_spread[op] = sp;
            a.n = n_keep;
        }
        router_free(&rt);
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be.ops->free(be.ctx, *bufs[i]);
        be.ops->free(be.ctx, a.w); be.ops->free(be.ctx, a.bb); be.ops->free(be.ctx, a.mean); be.ops->free(be.ctx, a.rstd);
        be.ops->free(be.ctx, a.att); be.ops->free(be.ctx, a.scr);
        xfree(a.tok); xfree(a.idx);
    }
    /* -- collectives between the ranks: bytes per rank 64 B .. 16 MiB, two sizes per octave -- */
    if (comm->size > 1) {
        int P = comm->size, nmax = o->quick ? 6 : 37;
        size_t *sc = xcalloc(sizeof(size_t) * P), *sd = xcalloc(sizeof(size_t) * P), *rc = xcalloc(sizeof(size_t) * P),
               *rd = xcalloc(sizeof(size_t) * P);
        h.alltoall = calloc((size_t)nmax, sizeof(HwPoint));
        h.allreduce = calloc((size_t)nmax, sizeof(HwPoint));
        Evict ev;
        evict_init(&ev);
        /* rounds outermost, every size once per round: a burst of the machine's load hits all
         * sizes alike instead of bending the curve; two rounds of warm-up */
        int n_samp = o->quick ? 3 : COLL_SAMPLES, n_sz = 0;
        size_t ab_of[40];
        for (int i = 0; i < nmax; i += o->model_only ? 2 : 1) ab_of[n_sz++] = (size_t)(64.0 * pow(2.0, i / 2.0)) / 4 * 4;
        double *samp = xcalloc(sizeof(double) * 2 * (size_t)n_sz * COLL_SAMPLES);   /* [kind, size, sample] */
        for (int r = -2; r < n_samp; r++)
            for (int i = 0; i < n_sz; i++)
                for (int kind = 0; kind < 2; kind++) {
                    size_t bytes = kind == 0 ? ab_of[i] / (size_t)(P - 1) * (size_t)(P - 1) : ab_of[i];
                    int b = ((r + 2) + i) % n_buf;
                    double t = time_coll_once(comm, &ev, kind, bytes, kind == 0 ? sbv[b] : gbv[b], rbv[b], sc, sd, rc, rd);
                    if (r >= 0) samp[((size_t)kind * n_sz + i) * COLL_SAMPLES + r] = t;
                }
        comm_allreduce_max_f64(comm, samp, 2 * (size_t)n_sz * COLL_SAMPLES);   /* the slowest rank, call by call */
        for (int i = 0; i < n_sz; i++) {
            double sp, t = median_spread(samp + (size_t)i * COLL_SAMPLES, n_samp, &sp);
            h.alltoall[h.n_alltoall++] = (HwPoint){(double)(ab_of[i] / (size_t)(P - 1) * (size_t)(P - 1)), t, sp};
            t = median_spread(samp + ((size_t)n_sz + i) * COLL_SAMPLES, n_samp, &sp);
            h.allreduce[h.n_allreduce++] = (HwPoint){(double)ab_of[i], t, sp};
        }
        xfree(samp);
        for (int b = 0; b < n_buf; b++) { xfree(sbv[b]); xfree(rbv[b]); xfree(gbv[b]); }
        xfree(sc); xfree(sd); xfree(rc); xfree(rd); xfree(ev.buf);
        /* straggling: the same work on every rank, then a max-allreduce of the rank's own time
         * (the synchronisation), for intervals of ~0.5 to 32 ms. The unit of work is the
         * trainer's mix: a 128^3 sgemm and a read-modify-write pass over the next 512 KiB of a
         * buffer beyond the caches (the trainer's step is about half GEMMs, half memory-bound
         * ops; a GEMM-only unit measured a third to a half of the straggling this mix does, in
         * two 2-rank tests of both a minute apart). Each block of syncs streams its own buffer */
        int n = 128;
        GemmArg g = {.be = &be, .M = n, .N = n, .K = n};
        g.a = be.ops->alloc(be.ctx, sizeof(float) * n * n);
        g.b = be.ops->alloc(be.ctx, sizeof(float) * n * n);
        g.c = be.ops->alloc(be.ctx, sizeof(float) * n * n);
        StragArg sa = {.g = &g, .n = o->quick ? (size_t)1 << 20 : (size_t)8 << 20, .chunk = (size_t)128 << 10};
        for (int b = 0; b < STRAG_BLOCKS; b++) {
            sa.set[b] = xmalloc(sizeof(float) * sa.n);
            for (size_t i = 0; i < sa.n; i++) sa.set[b][i] = 1.0f;
        }
        sa.x = sa.set[0];
        double sp, unit = time_fn(strag_fn, &sa, target, &sp);
        comm_allreduce_max_f64(comm, &unit, 1);
        static const double ints[] = {0.5e-3, 2e-3, 8e-3, 32e-3};
        int n_int = o->quick ? 2 : 4, blocks = STRAG_BLOCKS, per = o->quick ? 2 : 8;
        h.straggle = calloc((size_t)n_int, sizeof(HwStrag));
        for (int q = 0; q < n_int; q++) {
            double reps_d = ints[q] / unit;
            comm_allreduce_max_f64(comm, &reps_d, 1);
            int reps = reps_d < 1 ? 1 : (int)reps_d;
            double ov[STRAG_BLOCKS], t_sum = 0;
            for (int b = 0; b < blocks; b++) {
                double mx = 0, mean = 0;
                sa.x = sa.set[(b + q) % STRAG_BLOCKS];
                comm_barrier(comm);
                for (int i = 0; i < per; i++) {
                    double t0 = time_now();
                    for (int r = 0; r < reps; r++) strag_fn(&sa);
                    double t[2] = {time_now() - t0, 0};
                    t[1] = t[0];
                    comm_allreduce_max_f64(comm, t, 1);
                    comm_allreduce_sum_f64(comm, t + 1, 1);
                    mx += t[0];
                    mean += t[1] / P;
                    t_sum += t[1] / P;
                }
                ov[b] = mean > 0 ? mx / mean - 1 : 0;
            }
            double lo = ov[0], hi = ov[0];
            for (int b = 1; b < blocks; b++) { if (ov[b] < lo) lo = ov[b]; if (ov[b] > hi) hi = ov[b]; }
            double med = median_spread(ov, blocks, &sp);
            h.straggle[h.n_straggle++] = (HwStrag){t_sum / (blocks * per), med, hi - lo};
        }
        for (int b = 0; b < STRAG_BLOCKS; b++) xfree(sa.set[b]);
        be.ops->free(be.ctx, g.a); be.ops->free(be.ctx, g.b); be.ops->free(be.ctx, g.c);
        /* by increasing interval (a change of the machine's load can reorder them); equal ones merged */
        for (int i = 1; i < h.n_straggle; i++)
            for (int j = i; j > 0 && h.straggle[j].interval_s < h.straggle[j - 1].interval_s; j--) {
                HwStrag x = h.straggle[j]; h.straggle[j] = h.straggle[j - 1]; h.straggle[j - 1] = x;
            }
        int w = 0;
        for (int i = 0; i < h.n_straggle; i++)
            if (w == 0 || h.straggle[i].interval_s > h.straggle[w - 1].interval_s) h.straggle[w++] = h.straggle[i];
        h.n_straggle = w;
    }
    backend_free(&be);
    /* -- provenance: date and a description without host names or paths -- */
    time_t now = time(NULL);
    struct tm tmv;
    gmtime_r(&now, &tmv);
    strftime(h.date, sizeof h.date, "%Y-%m-%dT%H:%M:%SZ", &tmv);
    char cpu[256] = "unknown CPU";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "model name", 10)) {
                char *c = strchr(line, ':');
                if (c) {
                    c++;
                    while (*c == ' ') c++;
                    c[strcspn(c, "\n\"")] = 0;
                    str_fmt(cpu, sizeof cpu, "%s", c);
                }
                break;
            }
        fclose(f);
    }
    struct utsname u;
    const char *mach = uname(&u) == 0 ? u.machine : "?";
    str_fmt(h.description, sizeof h.description, "%s (%s), %d MPI rank(s) x %d BLAS thread(s), OpenBLAS sgemm fp32%s", cpu,
            mach, h.ranks, h.threads, o->quick ? ", quick grid" : o->model_only ? ", the model's GEMM shapes only" : "");
    Status st = status_ok();
    if (rank0) {
        st = hwfile_write(&h, o->out);
        if (STATUS_OK(st)) {
            double best = 0;
            for (int i = 0; i < h.n_gemm; i++) if (h.gemm[i].gflops > best) best = h.gemm[i].gflops;
            printf("calibrated %s: %d GEMM shapes (best %.1f GFLOP/s per rank), copy %.1f / triad %.1f GB/s, %d ops, "
                   "%d alltoall and %d allreduce sizes between %d rank(s) -> %s\n", h.description, h.n_gemm, best, h.copy_gbs,
                   h.triad_gbs, HW_OP_N, h.n_alltoall, h.n_allreduce, h.ranks, o->out);
        }
    }
    hwfile_free(&h);
    return st;
}
