/* test_h5log: the HDF5 metrics log (write, flush, resume with truncation, attributes, arrays,
 * errors) checked through the HDF5 C API, and metrics_load on hand-computed cases.
 *   test_h5log                       run the tests (files in a temporary folder)
 *   test_h5log --write PATH          only write the fixture file (steps 1..57, flushed every 10)
 *   test_h5log --write-and-die PATH  the same, then SIGKILL itself before closing
 * test_h5log_readback.py drives the last two and checks the files with h5py; the fixture's
 * values are defined by the *_at functions below, which that script mirrors.
 * L E = layers, experts of the [L, E] series. */
#include "harness.h"
#include "h5log.h"
#include "metrics.h"

#include <hdf5.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define L 3
#define E 5
#define FLUSH 10
#define N_FIRST 57      /* steps of the first run */
#define RESUME_AT 40    /* the checkpoint step the resumed run restarts from */
#define N_TOTAL 60
#define EVAL_EVERY 5

/* ---- the fixture: phase 0 = first run, phase 1 = the resumed run ---- */
static double loss_at(long s, int phase) { return 0.5 * (double)s + 0.125 + 1000.0 * phase; }
static float tpe_at(long s, int l, int e, int phase) { return (float)(100 * s + 10 * l + e) + 0.5f * (float)phase; }
static int64_t tokens_at(long s, int phase) { return ((int64_t)1 << 40) + 4096 * (int64_t)s + 7 * phase; }
static double cv2_at(long s, int l, int phase) { return 0.25 * l + (double)s / 64.0 + 2.0 * phase; }
static double eval_at(long s, int phase) { return 2.0 + (double)s / 8.0 + 3.0 * phase; }

static const char *CONFIG_TEXT = "model:\n  name: t\xc3\xa9st \xe2\x9c\x93\n  d_model: 64\n";
static const double BY_KIND[4] = {1.5, 2.5, 1e6, 7};
static const int64_t SHAPE[2][3] = {{1, 2, 3}, {4, 5, 6}};

typedef struct Ids { int loss, tpe, tokens, cv2, eval; } Ids;

static Status declare(H5log *lg, Ids *id) {
    uint64_t dle[2] = {L, E}, dl[1] = {L};
    id->loss = h5log_series(lg, "train/loss", H5LOG_F64, 0, NULL);
    id->tpe = h5log_series(lg, "moe/tokens_per_expert", H5LOG_F32, 2, dle);
    id->tokens = h5log_series(lg, "/train/tokens", H5LOG_I64, 0, NULL);
    id->cv2 = h5log_series(lg, "moe/balance/cv2/", H5LOG_F64, 1, dl);
    id->eval = h5log_series(lg, "eval/loss", H5LOG_F64, 0, NULL);
    if (id->loss < 0 || id->tpe < 0 || id->tokens < 0 || id->cv2 < 0 || id->eval < 0) return lg->err;
    return status_ok();
}

static Status write_attrs(H5log *lg) {
    TRY(h5log_attr_str(lg, "/", "config", CONFIG_TEXT));
    TRY(h5log_attr_i64(lg, "/", "world_size", 2));
    TRY(h5log_attr_f64(lg, "/", "lr", 3e-4));
    TRY(h5log_attr_str(lg, "/", "note", "first"));
    TRY(h5log_attr_str(lg, "/", "note", "second"));   /* replaces */
    TRY(h5log_attr_str(lg, "/train/loss", "units", "nats"));
    TRY(h5log_attr_str(lg, "/meta/host", "name", "node01"));   /* creates /meta/host */
    uint64_t d4[1] = {4}, d23[2] = {2, 3};
    TRY(h5log_write_array(lg, "params/by_kind", H5LOG_F64, 1, d4, BY_KIND));
    TRY(h5log_attr_str(lg, "/params/by_kind", "kinds", "dense,bases,factors,routers"));
    TRY(h5log_write_array(lg, "params/shape", H5LOG_I64, 2, d23, SHAPE));
    double total = 42.5;
    TRY(h5log_write_array(lg, "params/total", H5LOG_F64, 0, NULL, &total));
    return status_ok();
}

static Status append_steps(H5log *lg, const Ids *id, long from, long to, int phase) {
    for (long s = from; s <= to; s++) {
        double loss = loss_at(s, phase);
        float tpe[L * E];
        double cv2[L];
        for (int l = 0; l < L; l++) {
            cv2[l] = cv2_at(s, l, phase);
            for (int e = 0; e < E; e++) tpe[l * E + e] = tpe_at(s, l, e, phase);
        }
        int64_t tok = tokens_at(s, phase);
        TRY(h5log_append(lg, id->loss, s, &loss));
        TRY(h5log_append(lg, id->tpe, s, tpe));
        TRY(h5log_append(lg, id->tokens, s, &tok));
        TRY(h5log_append(lg, id->cv2, s, cv2));
        if (s % EVAL_EVERY == 0) {
            double ev = eval_at(s, phase);
            TRY(h5log_append(lg, id->eval, s, &ev));
        }
        TRY(h5log_step_done(lg, s));
    }
    return status_ok();
}

/* the first run: steps 1..N_FIRST; with die, SIGKILL before closing (rows 51..57 unflushed) */
static Status write_fixture(const char *path, int die, bool swmr) {
    H5log lg;
    Ids id;
    Status st = h5log_create(&lg, path, swmr, FLUSH);
    if (STATUS_OK(st)) st = declare(&lg, &id);
    if (STATUS_OK(st)) st = write_attrs(&lg);
    if (STATUS_OK(st)) st = h5log_start(&lg);
    if (STATUS_OK(st)) st = append_steps(&lg, &id, 1, N_FIRST, 0);
    if (STATUS_OK(st) && die) {
        fflush(stdout);
        raise(SIGKILL);
    }
    h5log_close(&lg);
    return st;
}

/* the resumed run: back to max_step, then steps max_step+1..N_TOTAL in phase 1 */
static Status resume_fixture(const char *path, long max_step, bool swmr, bool *recovered) {
    H5log lg;
    Ids id;
    Status st = h5log_open_append(&lg, path, swmr, FLUSH, max_step);
    *recovered = lg.recovered;
    if (STATUS_OK(st)) st = declare(&lg, &id);
    if (STATUS_OK(st)) st = h5log_start(&lg);
    if (STATUS_OK(st)) st = append_steps(&lg, &id, max_step + 1, N_TOTAL, 1);
    h5log_close(&lg);
    h5log_close(&lg);   /* safe twice */
    return st;
}

/* ---- reading back with the HDF5 C API ---- */

/* the whole dataset as mtype (malloc'd); dims[0..rank) out; NULL if it cannot be read */
static void *read_all(hid_t f, const char *path, hid_t mtype, int *rank, hsize_t *dims) {
    hid_t d = H5Dopen2(f, path, H5P_DEFAULT);
    if (d < 0) return NULL;
    hid_t sp = H5Dget_space(d);
    *rank = H5Sget_simple_extent_ndims(sp);
    H5Sget_simple_extent_dims(sp, dims, NULL);
    size_t n = (size_t)H5Sget_simple_extent_npoints(sp);
    void *buf = malloc((n ? n : 1) * H5Tget_size(mtype));
    if (H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
        free(buf);
        buf = NULL;
    }
    H5Sclose(sp);
    H5Dclose(d);
    return buf;
}

/* expected steps of a series from the two runs: first run 1..first_max (every `every`),
 * then resumed (phase 1) first_max+1..N_TOTAL; phase_out[i] tells which run wrote row i */
static int expected_steps(long first_max, long every, long *steps, int *phase_out) {
    int n = 0;
    for (long s = 1; s <= N_TOTAL; s++) {
        if (s % every) continue;
        steps[n] = s;
        phase_out[n] = s > first_max;
        n++;
    }
    return n;
}

static void check_series_steps(hid_t f, const char *name, const long *steps, int n) {
    char p[256];
    snprintf(p, sizeof p, "%s/step", name);
    int rank = 0;
    hsize_t dims[4] = {0};
    int64_t *got = read_all(f, p, H5T_NATIVE_INT64, &rank, dims);
    int good = got && rank == 1 && dims[0] == (hsize_t)n;
    for (int i = 0; good && i < n; i++) good = got[i] == steps[i];
    ok(good, "%s: %d steps %ld..%ld (got %llu rows)", p, n, steps[0], steps[n - 1], (unsigned long long)dims[0]);
    free(got);
}

/* verify the whole file after a first run (up to first_max) and a resumed run to N_TOTAL */
static void verify_file(const char *path, long first_max) {
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ok(f >= 0, "reopen %s read-only", path);
    if (f < 0) return;
    long steps[N_TOTAL];
    int phase[N_TOTAL];
    int n = expected_steps(first_max, 1, steps, phase);
    int rank = 0;
    hsize_t dims[4] = {0};

    check_series_steps(f, "/train/loss", steps, n);
    double *loss = read_all(f, "/train/loss/value", H5T_NATIVE_DOUBLE, &rank, dims);
    int good = loss && rank == 1 && dims[0] == (hsize_t)n;
    for (int i = 0; good && i < n; i++) good = loss[i] == loss_at(steps[i], phase[i]);
    ok(good, "/train/loss/value: exact, resumed values after step %ld", first_max);
    free(loss);

    check_series_steps(f, "/moe/tokens_per_expert", steps, n);
    float *tpe = read_all(f, "/moe/tokens_per_expert/value", H5T_NATIVE_FLOAT, &rank, dims);
    good = tpe && rank == 3 && dims[0] == (hsize_t)n && dims[1] == L && dims[2] == E;
    for (int i = 0; good && i < n; i++)
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++) good = good && tpe[((size_t)i * L + l) * E + e] == tpe_at(steps[i], l, e, phase[i]);
    ok(good, "/moe/tokens_per_expert/value: f32 [%d, %d, %d] exact", n, L, E);
    free(tpe);

    check_series_steps(f, "/train/tokens", steps, n);
    int64_t *tok = read_all(f, "/train/tokens/value", H5T_NATIVE_INT64, &rank, dims);
    good = tok && rank == 1 && dims[0] == (hsize_t)n;
    for (int i = 0; good && i < n; i++) good = tok[i] == tokens_at(steps[i], phase[i]);
    ok(good, "/train/tokens/value: i64 exact (values above 2^40)");
    free(tok);

    check_series_steps(f, "/moe/balance/cv2", steps, n);
    double *cv2 = read_all(f, "/moe/balance/cv2/value", H5T_NATIVE_DOUBLE, &rank, dims);
    good = cv2 && rank == 2 && dims[0] == (hsize_t)n && dims[1] == L;
    for (int i = 0; good && i < n; i++)
        for (int l = 0; l < L; l++) good = good && cv2[i * L + l] == cv2_at(steps[i], l, phase[i]);
    ok(good, "/moe/balance/cv2/value: [%d, %d] exact", n, L);
    free(cv2);

    int ne = expected_steps(first_max, EVAL_EVERY, steps, phase);
    check_series_steps(f, "/eval/loss", steps, ne);
    double *ev = read_all(f, "/eval/loss/value", H5T_NATIVE_DOUBLE, &rank, dims);
    good = ev && rank == 1 && dims[0] == (hsize_t)ne;
    for (int i = 0; good && i < ne; i++) good = ev[i] == eval_at(steps[i], phase[i]);
    ok(good, "/eval/loss/value: every %d steps, exact", EVAL_EVERY);
    free(ev);

    /* chunked, unlimited first dimension */
    hid_t d = H5Dopen2(f, "/moe/tokens_per_expert/value", H5P_DEFAULT);
    hid_t dcpl = H5Dget_create_plist(d);
    hsize_t chunk[3] = {0}, maxd[3] = {0}, cur[3];
    int crank = H5Pget_chunk(dcpl, 3, chunk);
    hid_t sp = H5Dget_space(d);
    H5Sget_simple_extent_dims(sp, cur, maxd);
    ok(H5Pget_layout(dcpl) == H5D_CHUNKED && crank == 3 && chunk[0] >= 1 && chunk[1] == L && chunk[2] == E &&
       maxd[0] == H5S_UNLIMITED, "value dataset chunked [%llu, %d, %d], unlimited rows",
       (unsigned long long)chunk[0], L, E);
    H5Sclose(sp);
    H5Pclose(dcpl);
    H5Dclose(d);

    /* attributes */
    int64_t sv = 0, ws = 0;
    double lr = 0;
    hid_t a = H5Aopen_by_name(f, "/", "schema_version", H5P_DEFAULT, H5P_DEFAULT);
    ok(a >= 0 && H5Aread(a, H5T_NATIVE_INT64, &sv) >= 0 && sv == 1, "root attribute schema_version = 1");
    if (a >= 0) H5Aclose(a);
    a = H5Aopen_by_name(f, "/", "world_size", H5P_DEFAULT, H5P_DEFAULT);
    ok(a >= 0 && H5Aread(a, H5T_NATIVE_INT64, &ws) >= 0 && ws == 2, "root attribute world_size = 2");
    if (a >= 0) H5Aclose(a);
    a = H5Aopen_by_name(f, "/", "lr", H5P_DEFAULT, H5P_DEFAULT);
    ok(a >= 0 && H5Aread(a, H5T_NATIVE_DOUBLE, &lr) >= 0 && lr == 3e-4, "root attribute lr = 3e-4");
    if (a >= 0) H5Aclose(a);
    struct { const char *obj, *name, *want; } sattrs[] = {
        {"/", "config", CONFIG_TEXT}, {"/", "note", "second"}, {"/train/loss", "units", "nats"},
        {"/meta/host", "name", "node01"}, {"/params/by_kind", "kinds", "dense,bases,factors,routers"},
    };
    hid_t st = H5Tcopy(H5T_C_S1);
    H5Tset_size(st, H5T_VARIABLE);
    H5Tset_cset(st, H5T_CSET_UTF8);
    for (size_t i = 0; i < sizeof sattrs / sizeof sattrs[0]; i++) {
        char *v = NULL;
        a = H5Aopen_by_name(f, sattrs[i].obj, sattrs[i].name, H5P_DEFAULT, H5P_DEFAULT);
        hid_t at = a >= 0 ? H5Aget_type(a) : -1;
        int is_utf8 = at >= 0 && H5Tget_cset(at) == H5T_CSET_UTF8 && H5Tis_variable_str(at) > 0;
        int read_ok = a >= 0 && H5Aread(a, st, &v) >= 0;
        ok(read_ok && is_utf8 && v && strcmp(v, sattrs[i].want) == 0, "string attribute %s @%s (vlen UTF-8)",
           sattrs[i].obj, sattrs[i].name);
        if (v) H5free_memory(v);
        if (at >= 0) H5Tclose(at);
        if (a >= 0) H5Aclose(a);
    }
    H5Tclose(st);

    /* one-off arrays */
    double *bk = read_all(f, "/params/by_kind", H5T_NATIVE_DOUBLE, &rank, dims);
    ok(bk && rank == 1 && dims[0] == 4 && memcmp(bk, BY_KIND, sizeof BY_KIND) == 0, "array /params/by_kind");
    free(bk);
    int64_t *sh = read_all(f, "/params/shape", H5T_NATIVE_INT64, &rank, dims);
    ok(sh && rank == 2 && dims[0] == 2 && dims[1] == 3 && memcmp(sh, SHAPE, sizeof SHAPE) == 0,
       "array /params/shape [2, 3] i64");
    free(sh);
    double *tot = read_all(f, "/params/total", H5T_NATIVE_DOUBLE, &rank, dims);
    ok(tot && rank == 0 && *tot == 42.5, "scalar array /params/total");
    free(tot);
    H5Fclose(f);
}

/* ---- error and edge cases ---- */

static int contains(const Status st, const char *needle) { return strstr(st.msg, needle) != NULL; }

static void test_lifecycle_errors(const char *dir) {
    H5log z;
    memset(&z, 0, sizeof z);
    h5log_close(&z);
    h5log_close(&z);
    ok(z.file < 0 && !z.is_open, "h5log_close on a zeroed struct (twice) is a no-op");
    Status st = h5log_append(&z, 0, 1, &(double){1});
    ok(!STATUS_OK(st), "append on a closed log fails: %s", st.msg);

    char p[512];
    snprintf(p, sizeof p, "%s/no/such/dir/x.h5", dir);
    H5log lg;
    st = h5log_create(&lg, p, true, 10);
    ok(!STATUS_OK(st) && contains(st, p), "create in a missing folder: %s", st.msg);
    h5log_close(&lg);
    snprintf(p, sizeof p, "%s/missing.h5", dir);
    st = h5log_open_append(&lg, p, true, 10, 5);
    ok(!STATUS_OK(st) && contains(st, p), "open_append of a missing file: %s", st.msg);
    h5log_close(&lg);

    /* an HDF5 file that is not ours */
    snprintf(p, sizeof p, "%s/foreign.h5", dir);
    hid_t f = H5Fcreate(p, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
    st = h5log_open_append(&lg, p, true, 10, 5);
    ok(!STATUS_OK(st) && contains(st, "schema_version"), "open_append of a foreign file: %s", st.msg);
    h5log_close(&lg);

    /* declarations and SWMR rules */
    snprintf(p, sizeof p, "%s/rules.h5", dir);
    st = h5log_create(&lg, p, true, 10);
    ok(STATUS_OK(st), "create %s", p);
    int a = h5log_series(&lg, "x/a", H5LOG_F64, 0, NULL);
    int dup = h5log_series(&lg, "/x/a/", H5LOG_F64, 0, NULL);
    ok(a == 0 && dup == -1 && contains(lg.err, "declared twice"), "duplicate series rejected: %s", lg.err.msg);
    st = h5log_start(&lg);
    ok(!STATUS_OK(st) && contains(st, "declared twice"), "h5log_start reports the failed declaration");
    st = h5log_start(&lg);
    ok(STATUS_OK(st), "h5log_start then succeeds");
    int late = h5log_series(&lg, "x/b", H5LOG_F64, 0, NULL);
    ok(late == -1 && contains(lg.err, "after h5log_start"), "series after start rejected: %s", lg.err.msg);
    lg.err = status_ok();
    st = h5log_attr_i64(&lg, "/", "late", 1);
    ok(!STATUS_OK(st) && contains(st, "SWMR"), "attribute after SWMR start rejected: %s", st.msg);
    st = h5log_append(&lg, 7, 1, &(double){1});
    ok(!STATUS_OK(st) && contains(st, "id 7"), "append to an unknown id: %s", st.msg);
    st = h5log_step_done(&lg, 1);
    ok(!STATUS_OK(st) && contains(st, "id 7"), "h5log_step_done returns the kept append error");
    st = h5log_step_done(&lg, 2);
    ok(STATUS_OK(st), "... once");
    h5log_close(&lg);

    /* re-declaring with another shape or type */
    st = h5log_open_append(&lg, p, true, 10, -1);
    ok(STATUS_OK(st), "open_append %s: %s", p, st.msg);
    uint64_t d2[1] = {2};
    int bad = h5log_series(&lg, "x/a", H5LOG_F64, 1, d2);
    ok(bad == -1 && contains(lg.err, "declared"), "shape mismatch on resume: %s", lg.err.msg);
    lg.err = status_ok();
    bad = h5log_series(&lg, "x/a", H5LOG_I64, 0, NULL);
    ok(bad == -1 && contains(lg.err, "element type"), "type mismatch on resume: %s", lg.err.msg);
    h5log_close(&lg);
}

/* more rows than one buffer (chunk) holds, without SWMR, flushed only at close */
static void test_many_rows(const char *dir) {
    char p[512];
    snprintf(p, sizeof p, "%s/many.h5", dir);
    H5log lg;
    Status st = h5log_create(&lg, p, false, 100000);
    int id = h5log_series(&lg, "a/b/c/x", H5LOG_F64, 0, NULL);
    uint64_t dbig[2] = {64, 1024};   /* 256 KiB rows */
    int big = h5log_series(&lg, "big", H5LOG_F32, 2, dbig);
    if (STATUS_OK(st)) st = h5log_start(&lg);
    const int n = 1000;
    float *row = malloc(sizeof(float) * 64 * 1024);
    for (long s = 0; s < n && STATUS_OK(st); s++) {
        double v = (double)s * 1.5;
        st = h5log_append(&lg, id, s, &v);
        if (s % 100 == 0 && STATUS_OK(st)) {
            for (int i = 0; i < 64 * 1024; i++) row[i] = (float)(s + i);
            st = h5log_append(&lg, big, s, row);
        }
    }
    ok(STATUS_OK(st) && id >= 0 && big >= 0, "append %d rows (non-SWMR): %s", n, st.msg);
    ok(lg.series[big].chunk_rows >= 1 && lg.series[big].chunk_rows * lg.series[big].row_bytes <= (1u << 20),
       "big rows: chunk of %llu rows stays <= 1 MiB", (unsigned long long)lg.series[big].chunk_rows);
    h5log_close(&lg);
    hid_t f = H5Fopen(p, H5F_ACC_RDONLY, H5P_DEFAULT);
    int rank = 0;
    hsize_t dims[4] = {0};
    double *x = read_all(f, "/a/b/c/x/value", H5T_NATIVE_DOUBLE, &rank, dims);
    int64_t *sx = read_all(f, "/a/b/c/x/step", H5T_NATIVE_INT64, &rank, dims);
    int good = x && sx && dims[0] == (hsize_t)n;
    for (int i = 0; good && i < n; i++) good = x[i] == i * 1.5 && sx[i] == i;
    ok(good, "%d rows across several buffer blocks read back exactly (step 0 included)", n);
    float *b = read_all(f, "/big/value", H5T_NATIVE_FLOAT, &rank, dims);
    good = b && rank == 3 && dims[0] == 10 && dims[1] == 64 && dims[2] == 1024;
    for (int r = 0; good && r < 10; r++)
        for (int i = 0; i < 64 * 1024; i++) good = good && b[(size_t)r * 64 * 1024 + i] == (float)(r * 100 + i);
    ok(good, "10 rows of [64, 1024] f32 read back exactly");
    free(x);
    free(sx);
    free(b);
    free(row);
    H5Fclose(f);
}

/* ---- metrics ---- */

static void check_load(const char *what, const double *c, int n, double cv2, double var, double maxvio,
                       double mm, double ent, double dead) {
    LoadStats s = metrics_load(c, n);
    double got[6] = {s.cv2, s.var, s.maxvio, s.max_over_mean, s.entropy, s.dead_frac};
    double want[6] = {cv2, var, maxvio, mm, ent, dead};
    close_enough(what, got, want, 6, 1e-12, 1e-12);
}

static void test_metrics(void) {
    /* [cv2, var, maxvio, max/mean, entropy, dead] */
    check_load("uniform [3,3,3,3]", (const double[]){3, 3, 3, 3}, 4, 0, 0, 0, 1, 1, 0);
    check_load("one-hot [4,0,0,0]", (const double[]){4, 0, 0, 0}, 4, 3, 3, 3, 4, 0, 0.75);
    check_load("[1,2,3,4]", (const double[]){1, 2, 3, 4}, 4, 0.2, 1.25, 0.6, 1.6, 0.9232196723355078, 0);
    check_load("[2,2,0,0]", (const double[]){2, 2, 0, 0}, 4, 1, 1, 1, 2, 0.5, 0.5);
    check_load("n=1 [5]", (const double[]){5}, 1, 0, 0, 0, 1, 0, 0);
    check_load("all zero [0,0,0]", (const double[]){0, 0, 0}, 3, 0, 0, 0, 1, 0, 1);
    double r[2] = {metrics_max_over_mean((const double[]){1, 3}, 2), metrics_max_over_mean((const double[]){0, 0}, 2)};
    close_enough("metrics_max_over_mean [1,3] and [0,0]", r, (const double[]){1.5, 1}, 2, 0, 0);
}

/* ---- main ---- */

static int rm_dir(const char *dir) {
    const char *names[] = {"run.h5", "killed.h5", "killed_plain.h5", "foreign.h5", "rules.h5", "many.h5"};
    char p[600];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        unlink(p);
    }
    return rmdir(dir);
}

int main(int argc, char **argv) {
    if (argc == 3 && (strcmp(argv[1], "--write") == 0 || strcmp(argv[1], "--write-and-die") == 0)) {
        Status st = write_fixture(argv[2], strcmp(argv[1], "--write-and-die") == 0, true);
        if (!STATUS_OK(st)) {
            fprintf(stderr, "test_h5log: %s\n", st.msg);
            return 1;
        }
        return 0;
    }
    if (argc != 1) {
        fprintf(stderr, "usage: %s [--write PATH | --write-and-die PATH]\n", argv[0]);
        return 2;
    }

    test_metrics();

    const char *tmp = getenv("TMPDIR");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/dcmoe_h5log_XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    char path[600];

    /* first run to 57, resume from the checkpoint at 40, run to 60 */
    snprintf(path, sizeof path, "%s/run.h5", dir);
    bool recovered = true;
    Status st = write_fixture(path, 0, true);
    ok(STATUS_OK(st), "first run: steps 1..%d, flush every %d: %s", N_FIRST, FLUSH, st.msg);
    st = resume_fixture(path, RESUME_AT, true, &recovered);
    ok(STATUS_OK(st) && !recovered, "resume at step %d, steps %d..%d: %s", RESUME_AT, RESUME_AT + 1, N_TOTAL, st.msg);
    verify_file(path, RESUME_AT);

    /* a writer killed at 57 (50 rows flushed), resumed from a checkpoint at 50; with SWMR and
     * without (both flush every 10 steps) */
    for (int swmr = 1; swmr >= 0; swmr--) {
        snprintf(path, sizeof path, "%s/%s.h5", dir, swmr ? "killed" : "killed_plain");
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) _exit(STATUS_OK(write_fixture(path, 1, swmr)) ? 0 : 1);
        int wst = 0;
        waitpid(pid, &wst, 0);
        ok(WIFSIGNALED(wst) && WTERMSIG(wst) == SIGKILL, "%s writer killed by SIGKILL after step %d",
           swmr ? "SWMR" : "non-SWMR", N_FIRST);
        st = resume_fixture(path, 50, swmr, &recovered);
        ok(STATUS_OK(st) && recovered, "resume the killed file at step 50 (file repaired): %s", st.msg);
        verify_file(path, 50);
    }

    test_lifecycle_errors(dir);
    test_many_rows(dir);

    int rc = harness_done();
    if (rc == 0) rm_dir(dir);
    else printf("# files kept in %s\n", dir);
    return rc;
}
