/* h5log: the per-run HDF5 metrics file (see h5log.h).
 *
 * Layout: every series is a group /a/b/name holding
 *   value [n_rows, dims...]  chunked [chunk_rows, dims...], first dim unlimited
 *   step  [n_rows] int64     chunked [STEP_CHUNK_ROWS], fill value -1 (= never written)
 * The file is created with libver bounds (LATEST, LATEST), which SWMR requires.
 *
 * Writes: h5log_append copies the row into the series' buffer (chunk_rows rows). A full buffer
 * or h5log_flush writes the buffered block: extend value, write it, extend step, write it. So a
 * reader sees value rows no later than their steps, and the step count is the row count to
 * trust. h5log_flush then calls H5Dflush on every changed dataset (SWMR) or H5Fflush.
 *
 * Errors: HDF5's automatic stack printing is switched off; every failure becomes a Status
 * naming the file, the object and the innermost HDF5 message. */
#include "h5log.h"

#include <hdf5.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define STEP_CHUNK_ROWS 256
#define STEP_FILL (-1)
#define SCHEMA_VERSION 1

/* ---- types ---- */

static hid_t file_type(int type) {
    switch (type) {
    case H5LOG_F64: return H5T_IEEE_F64LE;
    case H5LOG_F32: return H5T_IEEE_F32LE;
    case H5LOG_I64: return H5T_STD_I64LE;
    default: return -1;
    }
}

static hid_t mem_type(int type) {
    switch (type) {
    case H5LOG_F64: return H5T_NATIVE_DOUBLE;
    case H5LOG_F32: return H5T_NATIVE_FLOAT;
    case H5LOG_I64: return H5T_NATIVE_INT64;
    default: return -1;
    }
}

static size_t type_size(int type) { return type == H5LOG_F32 ? 4 : 8; }

static const char *type_name(int type) {
    switch (type) {
    case H5LOG_F64: return "f64";
    case H5LOG_F32: return "f32";
    case H5LOG_I64: return "i64";
    default: return "?";
    }
}

/* ---- errors ---- */

typedef struct ErrDetail { char text[256]; bool got; } ErrDetail;

static herr_t err_walk_cb(unsigned n, const H5E_error2_t *e, void *data) {
    ErrDetail *d = data;
    if (n == 0 && e && e->desc) {      /* walking upward: n == 0 is the innermost error */
        snprintf(d->text, sizeof d->text, "%s", e->desc);
        d->got = true;
    }
    return 0;
}

/* a Status "<file>: <what>: <innermost HDF5 message>"; clears the HDF5 error stack */
static Status hdf5_error(const H5log *lg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static Status hdf5_error(const H5log *lg, const char *fmt, ...) {
    char what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    ErrDetail d = {{0}, false};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, err_walk_cb, &d);
    H5Eclear2(H5E_DEFAULT);
    if (d.got) return status_errorf("%s: %s: %s", lg->path, what, d.text);
    return status_errorf("%s: %s", lg->path, what);
}

static void keep_error(H5log *lg, Status st) {
    if (!STATUS_OK(st) && STATUS_OK(lg->err)) lg->err = st;
}

static void silence_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

/* ---- paths ---- */

/* "a/b" or "/a/b/" -> "/a/b"; "" or "/" -> "/" */
static Status norm_path(const H5log *lg, const char *in, char *out, size_t cap) {
    if (!in) return status_errorf("%s: object path is NULL", lg->path);
    size_t n = strlen(in);
    while (n > 0 && in[n - 1] == '/') n--;
    const char *p = in;
    while (n > 0 && *p == '/') { p++; n--; }
    if (n + 2 > cap) return status_errorf("%s: object path '%s' is too long (max %zu)", lg->path, in, cap - 2);
    out[0] = '/';
    memcpy(out + 1, p, n);
    out[n + 1] = 0;
    return status_ok();
}

/* does the object at abs_path exist? every prefix is checked, since H5Lexists needs the
 * intermediate groups to exist. returns 1, 0, or -1 on an HDF5 error */
static int path_exists(hid_t loc, const char *abs_path) {
    if (strcmp(abs_path, "/") == 0) return 1;
    char buf[1024];
    size_t n = strlen(abs_path);
    if (n >= sizeof buf) return -1;
    memcpy(buf, abs_path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        char c = buf[i];
        buf[i] = 0;
        htri_t e = H5Lexists(loc, buf, H5P_DEFAULT);
        buf[i] = c;
        if (e <= 0) return e < 0 ? -1 : 0;
    }
    return 1;
}

static hid_t lcpl_intermediate(void) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    if (lcpl >= 0 && H5Pset_create_intermediate_group(lcpl, 1) < 0) {
        H5Pclose(lcpl);
        return -1;
    }
    return lcpl;
}

static Status check_open(const H5log *lg, const char *what) {
    if (!lg->is_open) return status_errorf("h5log: %s on a log that is not open", what);
    return status_ok();
}

/* with SWMR, no object or attribute may be created once writing has started */
static Status check_not_swmr_writing(const H5log *lg, const char *what, const char *obj) {
    if (lg->writing && lg->swmr)
        return status_errorf("%s: %s '%s' after h5log_start: SWMR files accept new objects and "
                             "attributes only before writing starts", lg->path, what, obj);
    return status_ok();
}

/* ---- attributes ---- */

static Status attr_write(H5log *lg, const char *obj_path, const char *name, hid_t ftype, hid_t mtype,
                         const void *value) {
    TRY(check_open(lg, "attribute write"));
    char path[512];
    TRY(norm_path(lg, obj_path, path, sizeof path));
    if (!name || !name[0]) return status_errorf("%s: empty attribute name on '%s'", lg->path, path);
    TRY(check_not_swmr_writing(lg, "attribute", name));
    int e = path_exists(lg->file, path);
    if (e < 0) return hdf5_error(lg, "cannot look up '%s' for attribute '%s'", path, name);
    if (e == 0) {   /* a group that does not exist yet: create it (and its parents) */
        hid_t lcpl = lcpl_intermediate();
        hid_t g = lcpl >= 0 ? H5Gcreate2(lg->file, path, lcpl, H5P_DEFAULT, H5P_DEFAULT) : -1;
        if (lcpl >= 0) H5Pclose(lcpl);
        if (g < 0) return hdf5_error(lg, "cannot create group '%s' for attribute '%s'", path, name);
        H5Gclose(g);
    }
    hid_t obj = H5Oopen(lg->file, path, H5P_DEFAULT);
    if (obj < 0) return hdf5_error(lg, "cannot open '%s' for attribute '%s'", path, name);
    Status st = status_ok();
    htri_t has = H5Aexists(obj, name);
    if (has < 0 || (has > 0 && H5Adelete(obj, name) < 0)) {
        st = hdf5_error(lg, "cannot replace attribute '%s' on '%s'", name, path);
    } else {
        hid_t space = H5Screate(H5S_SCALAR);
        hid_t a = space >= 0 ? H5Acreate2(obj, name, ftype, space, H5P_DEFAULT, H5P_DEFAULT) : -1;
        if (a < 0) st = hdf5_error(lg, "cannot create attribute '%s' on '%s'", name, path);
        else if (H5Awrite(a, mtype, value) < 0) st = hdf5_error(lg, "cannot write attribute '%s' on '%s'", name, path);
        if (a >= 0) H5Aclose(a);
        if (space >= 0) H5Sclose(space);
    }
    H5Oclose(obj);
    return st;
}

Status h5log_attr_str(H5log *lg, const char *obj_path, const char *name, const char *value) {
    TRY(check_open(lg, "attribute write"));
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0 || H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0) {
        if (t >= 0) H5Tclose(t);
        return hdf5_error(lg, "cannot make a string type for attribute '%s'", name ? name : "");
    }
    const char *v = value ? value : "";
    Status st = attr_write(lg, obj_path, name, t, t, &v);
    H5Tclose(t);
    return st;
}

Status h5log_attr_i64(H5log *lg, const char *obj_path, const char *name, int64_t value) {
    return attr_write(lg, obj_path, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}

Status h5log_attr_f64(H5log *lg, const char *obj_path, const char *name, double value) {
    return attr_write(lg, obj_path, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

/* ---- create / open ---- */

static hid_t fapl_latest(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl >= 0 && H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST) < 0) {
        H5Pclose(fapl);
        return -1;
    }
    return fapl;
}

static void log_reset(H5log *lg, const char *path, bool swmr, int flush_interval) {
    memset(lg, 0, sizeof *lg);
    lg->file = -1;
    lg->swmr = swmr;
    lg->flush_interval = flush_interval < 1 ? 1 : flush_interval;
    lg->err = status_ok();
    snprintf(lg->path, sizeof lg->path, "%s", path ? path : "");
}

Status h5log_create(H5log *lg, const char *path, bool swmr, int flush_interval) {
    log_reset(lg, path, swmr, flush_interval);
    if (!path || !path[0]) return status_errorf("h5log_create: empty file path");
    if (strlen(path) >= sizeof lg->path) return status_errorf("h5log_create: file path too long: %s", path);
    silence_hdf5();
    hid_t fapl = fapl_latest();
    if (fapl < 0) return hdf5_error(lg, "cannot set up file access properties");
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0) return hdf5_error(lg, "cannot create HDF5 file");
    lg->file = f;
    lg->is_open = true;
    Status st = h5log_attr_i64(lg, "/", "schema_version", SCHEMA_VERSION);
    if (!STATUS_OK(st)) h5log_close(lg);
    return st;
}

/* open read-write with the latest format, recovering a file left by a killed SWMR writer:
 * - its superblock is still marked "open for writing", so the open fails; it is retried with
 *   the status flags cleared (what h5clear -s does), through the library's fapl property;
 * - its superblock's end-of-allocation is stale (older than the flushed data): it is raised
 *   to the end of the file (what h5clear --increment does), else the library cannot read the
 *   newer metadata and H5Fclose truncates the file to the stale size, losing the rows. */
static hid_t open_rdwr(const char *path, bool *recovered) {
    *recovered = false;
    hid_t fapl = fapl_latest();
    if (fapl < 0) return -1;
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, fapl);
    if (f < 0 && H5Pexist(fapl, "clear_status_flags") > 0) {
        hbool_t clear = 1;
        if (H5Pset(fapl, "clear_status_flags", &clear) >= 0) {
            hid_t f2 = H5Fopen(path, H5F_ACC_RDWR, fapl);
            if (f2 >= 0) {
                H5Eclear2(H5E_DEFAULT);
                f = f2;
                *recovered = true;
            }
        }
    }
    H5Pclose(fapl);
    if (f < 0) return f;
    haddr_t eoa = 0;
    hsize_t size = 0;   /* max(end of file, end of allocation) */
    if (H5Fget_eoa(f, &eoa) >= 0 && H5Fget_filesize(f, &size) >= 0 && size > eoa) {
        if (H5Fincrement_filesize(f, 0) < 0) {
            H5Fclose(f);
            return -1;
        }
        *recovered = true;
    }
    return f;
}

static Status truncate_series(H5log *lg, hid_t g, const char *gpath, long max_step) {
    Status st = status_ok();
    hid_t ds = H5Dopen2(g, "step", H5P_DEFAULT);
    hid_t dv = ds >= 0 ? H5Dopen2(g, "value", H5P_DEFAULT) : -1;
    hid_t ss = ds >= 0 ? H5Dget_space(ds) : -1;
    hid_t sv = dv >= 0 ? H5Dget_space(dv) : -1;
    int rank_s = ss >= 0 ? H5Sget_simple_extent_ndims(ss) : -1;
    int rank_v = sv >= 0 ? H5Sget_simple_extent_ndims(sv) : -1;
    hsize_t dim_s[1], dim_v[1 + H5LOG_MAX_DIMS];
    int64_t *steps = NULL;
    if (rank_s != 1 || rank_v < 1 || rank_v > 1 + H5LOG_MAX_DIMS) {
        st = hdf5_error(lg, "series '%s': expected step [n] and value [n, up to %d dims]", gpath, H5LOG_MAX_DIMS);
        goto done;
    }
    H5Sget_simple_extent_dims(ss, dim_s, NULL);
    H5Sget_simple_extent_dims(sv, dim_v, NULL);
    hsize_t n = dim_s[0] < dim_v[0] ? dim_s[0] : dim_v[0], keep = 0;
    hsize_t file_size = 0;
    if (H5Fget_filesize(lg->file, &file_size) < 0) { st = hdf5_error(lg, "cannot get the file size"); goto done; }
    /* a written step takes 8 bytes of the file: a count above one per byte comes from a damaged
     * header (and would make the buffer below overflow or exhaust memory) */
    if (n > file_size + STEP_CHUNK_ROWS) {
        st = status_errorf("%s: series '%s' claims %llu rows, more than a %llu-byte file can hold (damaged file)",
                           lg->path, gpath, (unsigned long long)n, (unsigned long long)file_size);
        goto done;
    }
    if (n > 0) {
        steps = xmalloc(n * sizeof *steps);
        hid_t ms = H5Screate_simple(1, &n, NULL);
        hsize_t start = 0;
        herr_t r = ms >= 0 ? H5Sselect_hyperslab(ss, H5S_SELECT_SET, &start, NULL, &n, NULL) : -1;
        if (r >= 0) r = H5Dread(ds, H5T_NATIVE_INT64, ms, ss, H5P_DEFAULT, steps);
        if (ms >= 0) H5Sclose(ms);
        if (r < 0) { st = hdf5_error(lg, "series '%s': cannot read steps", gpath); goto done; }
        while (keep < n && steps[keep] >= 0 && (max_step < 0 || steps[keep] <= max_step)) keep++;
    }
    if (dim_v[0] > 0) {
        /* read one value row (the last kept one, else the first): this loads the value chunk
         * index while a damaged block is still an error. Once SWMR writing starts, HDF5 retries a
         * metadata block with a bad checksum 100 times with doubling sleeps, which never ends. */
        int nd = rank_v;
        hsize_t start[1 + H5LOG_MAX_DIMS] = {0}, count[1 + H5LOG_MAX_DIMS];
        size_t row_elems = 1;
        count[0] = 1;
        start[0] = keep > 0 ? keep - 1 : 0;
        for (int i = 1; i < nd; i++) {
            count[i] = dim_v[i];
            if (dim_v[i] > ((hsize_t)1 << 24) || (row_elems *= dim_v[i] ? dim_v[i] : 1) > ((size_t)1 << 24)) {
                st = status_errorf("%s: series '%s': rows of more than 2^24 values are not an h5log series",
                                   lg->path, gpath);
                goto done;
            }
        }
        double *row = xmalloc(row_elems * sizeof *row);
        hid_t ms = H5Screate_simple(nd, count, NULL);
        herr_t r = ms >= 0 ? H5Sselect_hyperslab(sv, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
        if (r >= 0) r = H5Dread(dv, H5T_NATIVE_DOUBLE, ms, sv, H5P_DEFAULT, row);
        if (ms >= 0) H5Sclose(ms);
        xfree(row);
        if (r < 0) { st = hdf5_error(lg, "series '%s': cannot read values", gpath); goto done; }
    }
    if (keep != dim_s[0] && H5Dset_extent(ds, &keep) < 0) {
        st = hdf5_error(lg, "series '%s': cannot truncate step to %llu rows", gpath, (unsigned long long)keep);
        goto done;
    }
    if (keep != dim_v[0]) {
        dim_v[0] = keep;
        if (H5Dset_extent(dv, dim_v) < 0)
            st = hdf5_error(lg, "series '%s': cannot truncate value to %llu rows", gpath, (unsigned long long)keep);
    }
done:
    xfree(steps);
    if (sv >= 0) H5Sclose(sv);
    if (ss >= 0) H5Sclose(ss);
    if (dv >= 0) H5Dclose(dv);
    if (ds >= 0) H5Dclose(ds);
    return st;
}

static int is_dataset(hid_t g, const char *name) {
    htri_t e = H5Lexists(g, name, H5P_DEFAULT);
    if (e <= 0) return 0;
    hid_t o = H5Oopen(g, name, H5P_DEFAULT);
    if (o < 0) { H5Eclear2(H5E_DEFAULT); return 0; }
    int r = H5Iget_type(o) == H5I_DATASET;
    H5Oclose(o);
    return r;
}

/* truncate every series in group g (and below) to the rows with 0 <= step <= max_step */
static Status truncate_all(H5log *lg, hid_t g, const char *gpath, long max_step, int depth) {
    if (depth > 32) return status_errorf("%s: groups nested deeper than 32 at '%s'", lg->path, gpath);
    if (is_dataset(g, "step") && is_dataset(g, "value")) TRY(truncate_series(lg, g, gpath, max_step));
    H5G_info_t info;
    if (H5Gget_info(g, &info) < 0) return hdf5_error(lg, "cannot list group '%s'", gpath);
    for (hsize_t i = 0; i < info.nlinks; i++) {
        char name[256];
        ssize_t len = H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
        if (len < 0) return hdf5_error(lg, "cannot list group '%s'", gpath);
        if ((size_t)len >= sizeof name) continue;   /* not a name h5log writes */
        hid_t o = H5Oopen(g, name, H5P_DEFAULT);
        if (o < 0) { H5Eclear2(H5E_DEFAULT); continue; }   /* dangling soft link etc. */
        Status st = status_ok();
        if (H5Iget_type(o) == H5I_GROUP) {
            char sub[1024];
            snprintf(sub, sizeof sub, "%s%s%s", gpath, strcmp(gpath, "/") == 0 ? "" : "/", name);
            st = truncate_all(lg, o, sub, max_step, depth + 1);
        }
        H5Oclose(o);
        TRY(st);
    }
    return status_ok();
}

Status h5log_open_append(H5log *lg, const char *path, bool swmr, int flush_interval, long max_step) {
    log_reset(lg, path, swmr, flush_interval);
    if (!path || !path[0]) return status_errorf("h5log_open_append: empty file path");
    if (strlen(path) >= sizeof lg->path) return status_errorf("h5log_open_append: file path too long: %s", path);
    silence_hdf5();
    hid_t f = open_rdwr(path, &lg->recovered);
    if (f < 0) return hdf5_error(lg, "cannot open HDF5 file for appending");
    lg->file = f;
    lg->is_open = true;
    lg->appending = true;
    Status st = status_ok();
    /* check the schema before touching anything */
    int64_t version = -1;
    htri_t has = H5Aexists_by_name(f, "/", "schema_version", H5P_DEFAULT);
    if (has > 0) {
        hid_t a = H5Aopen_by_name(f, "/", "schema_version", H5P_DEFAULT, H5P_DEFAULT);
        if (a < 0 || H5Aread(a, H5T_NATIVE_INT64, &version) < 0) version = -1;
        if (a >= 0) H5Aclose(a);
        H5Eclear2(H5E_DEFAULT);
    }
    if (has <= 0) {
        H5Eclear2(H5E_DEFAULT);
        st = status_errorf("%s: no root attribute schema_version: not a dcmoe metrics file", path);
    } else if (version != SCHEMA_VERSION) {
        st = status_errorf("%s: schema_version is %lld, this build reads %d (start a new run or use a "
                           "matching dcmoe version)", path, (long long)version, SCHEMA_VERSION);
    }
    if (STATUS_OK(st)) {
        hid_t root = H5Gopen2(f, "/", H5P_DEFAULT);
        if (root < 0) st = hdf5_error(lg, "cannot open the root group");
        else {
            st = truncate_all(lg, root, "/", max_step, 0);
            H5Gclose(root);
        }
    }
    if (!STATUS_OK(st)) { h5log_close(lg); return st; }
    return status_ok();
}

/* ---- series ---- */

/* rows per chunk: 256 for small rows, fewer (down to 64) to keep a chunk <= 256 KiB, and fewer
 * still (down to 1) only to keep a chunk <= 1 MiB */
static uint64_t pick_chunk_rows(size_t row_bytes) {
    uint64_t rows = 256;
    while (rows > 64 && rows * row_bytes > (256u << 10)) rows /= 2;
    while (rows > 1 && rows * row_bytes > (1u << 20)) rows /= 2;
    return rows;
}

static hid_t create_dataset(hid_t file, const char *path, hid_t ftype, int rank, const hsize_t *dims,
                            const hsize_t *maxdims, const hsize_t *chunk, const void *fill_native) {
    hid_t space = H5Screate_simple(rank, dims, maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hid_t lcpl = lcpl_intermediate();
    hid_t d = -1;
    if (space >= 0 && dcpl >= 0 && lcpl >= 0 && H5Pset_chunk(dcpl, rank, chunk) >= 0 &&
        (!fill_native || H5Pset_fill_value(dcpl, H5T_NATIVE_INT64, fill_native) >= 0))
        d = H5Dcreate2(file, path, ftype, space, lcpl, dcpl, H5P_DEFAULT);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (space >= 0) H5Sclose(space);
    return d;
}

/* open an existing series and check it matches the declaration */
static Status series_open(H5log *lg, H5logSeries *s, const char *gpath) {
    char p[600];
    snprintf(p, sizeof p, "%s/value", gpath);
    s->h5_value = H5Dopen2(lg->file, p, H5P_DEFAULT);
    if (s->h5_value < 0) return hdf5_error(lg, "series '%s' exists but has no dataset 'value'", gpath);
    snprintf(p, sizeof p, "%s/step", gpath);
    s->h5_step = H5Dopen2(lg->file, p, H5P_DEFAULT);
    if (s->h5_step < 0) return hdf5_error(lg, "series '%s' exists but has no dataset 'step'", gpath);
    hid_t t = H5Dget_type(s->h5_value);
    hid_t sp = H5Dget_space(s->h5_value);
    hid_t ssp = H5Dget_space(s->h5_step);
    Status st = status_ok();
    if (t < 0 || sp < 0 || ssp < 0) {
        st = hdf5_error(lg, "series '%s': cannot inspect datasets", gpath);
    } else {
        H5T_class_t cls = H5Tget_class(t);
        size_t size = H5Tget_size(t);
        H5T_class_t want = s->type == H5LOG_I64 ? H5T_INTEGER : H5T_FLOAT;
        int rank = H5Sget_simple_extent_ndims(sp);
        hsize_t d[1 + H5LOG_MAX_DIMS] = {0}, ds[1] = {0};
        bool shape_ok = rank == 1 + s->n_dims;
        if (shape_ok) {
            H5Sget_simple_extent_dims(sp, d, NULL);
            for (int i = 0; i < s->n_dims; i++) shape_ok = shape_ok && d[1 + i] == s->dims[i];
        }
        if (cls != want || size != type_size(s->type)) {
            st = status_errorf("%s: series '%s' in the file has another element type than the declared %s",
                               lg->path, gpath, type_name(s->type));
        } else if (!shape_ok || H5Sget_simple_extent_ndims(ssp) != 1) {
            char want_s[128] = "[n", got_s[128] = "[n";
            for (int i = 0; i < s->n_dims; i++) {
                size_t l = strlen(want_s);
                snprintf(want_s + l, sizeof want_s - l, ",%llu", (unsigned long long)s->dims[i]);
            }
            for (int i = 1; i < rank && i < 1 + H5LOG_MAX_DIMS; i++) {
                size_t l = strlen(got_s);
                snprintf(got_s + l, sizeof got_s - l, ",%llu", (unsigned long long)d[i]);
            }
            st = status_errorf("%s: series '%s' has rows %s] in the file but is declared %s]",
                               lg->path, gpath, got_s, want_s);
        } else {
            H5Sget_simple_extent_dims(ssp, ds, NULL);
            if (ds[0] != d[0])   /* truncate_all made them equal; anything else is a bug */
                st = status_errorf("%s: series '%s' has %llu steps but %llu values", lg->path, gpath,
                                   (unsigned long long)ds[0], (unsigned long long)d[0]);
            s->n_rows = d[0];
        }
    }
    if (ssp >= 0) H5Sclose(ssp);
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    return st;
}

static Status series_create(H5log *lg, H5logSeries *s, const char *gpath) {
    char p[600];
    hsize_t dims[1 + H5LOG_MAX_DIMS], maxdims[1 + H5LOG_MAX_DIMS], chunk[1 + H5LOG_MAX_DIMS];
    int rank = 1 + s->n_dims;
    dims[0] = 0;
    maxdims[0] = H5S_UNLIMITED;
    chunk[0] = s->chunk_rows;
    for (int i = 0; i < s->n_dims; i++) dims[1 + i] = maxdims[1 + i] = chunk[1 + i] = s->dims[i];
    snprintf(p, sizeof p, "%s/value", gpath);
    s->h5_value = create_dataset(lg->file, p, file_type(s->type), rank, dims, maxdims, chunk, NULL);
    if (s->h5_value < 0) return hdf5_error(lg, "cannot create dataset '%s'", p);
    snprintf(p, sizeof p, "%s/step", gpath);
    hsize_t schunk = STEP_CHUNK_ROWS;
    int64_t fill = STEP_FILL;
    s->h5_step = create_dataset(lg->file, p, H5T_STD_I64LE, 1, dims, maxdims, &schunk, &fill);
    if (s->h5_step < 0) return hdf5_error(lg, "cannot create dataset '%s'", p);
    s->n_rows = 0;
    return status_ok();
}

static void series_release(H5logSeries *s) {
    if (s->h5_value >= 0) H5Dclose(s->h5_value);
    if (s->h5_step >= 0) H5Dclose(s->h5_step);
    s->h5_value = s->h5_step = -1;
    xfree(s->buf);
    xfree(s->buf_step);
    s->buf = NULL;
    s->buf_step = NULL;
    s->n_buf = s->cap_buf = 0;
}

static Status series_declare(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims,
                             int *id) {
    TRY(check_open(lg, "h5log_series"));
    char gpath[sizeof lg->series[0].path + 1];   /* "/" + the stored path */
    TRY(norm_path(lg, path, gpath, sizeof gpath));
    if (strcmp(gpath, "/") == 0) return status_errorf("%s: series path is empty", lg->path);
    if (lg->writing) return status_errorf("%s: series '%s' declared after h5log_start", lg->path, gpath);
    if (file_type(type) < 0) return status_errorf("%s: series '%s': unknown type %d", lg->path, gpath, type);
    if (n_dims < 0 || n_dims > H5LOG_MAX_DIMS || (n_dims > 0 && !dims))
        return status_errorf("%s: series '%s': n_dims = %d, expected 0..%d", lg->path, gpath, n_dims, H5LOG_MAX_DIMS);
    if (lg->n_series >= H5LOG_MAX_SERIES)
        return status_errorf("%s: series '%s': more than %d series", lg->path, gpath, H5LOG_MAX_SERIES);
    for (int i = 0; i < lg->n_series; i++)
        if (strcmp(lg->series[i].path, gpath + 1) == 0)
            return status_errorf("%s: series '%s' declared twice", lg->path, gpath);
    H5logSeries *s = &lg->series[lg->n_series];
    memset(s, 0, sizeof *s);
    s->h5_value = s->h5_step = -1;
    memcpy(s->path, gpath + 1, strlen(gpath));   /* fits: norm_path checked the length */
    s->type = type;
    s->n_dims = n_dims;
    s->row_elems = 1;
    for (int i = 0; i < n_dims; i++) {
        if (dims[i] == 0) return status_errorf("%s: series '%s': dims[%d] is 0", lg->path, gpath, i);
        s->dims[i] = dims[i];
        s->row_elems *= (size_t)dims[i];
    }
    s->row_bytes = s->row_elems * type_size(type);
    s->chunk_rows = pick_chunk_rows(s->row_bytes);
    int e = lg->appending ? path_exists(lg->file, gpath) : 0;
    Status st;
    if (e < 0) st = hdf5_error(lg, "cannot look up series '%s'", gpath);
    else if (e > 0) st = series_open(lg, s, gpath);
    else st = series_create(lg, s, gpath);
    if (!STATUS_OK(st)) {
        series_release(s);
        return st;
    }
    s->cap_buf = s->chunk_rows;
    s->buf = xmalloc(s->cap_buf * s->row_bytes);
    s->buf_step = xmalloc(s->cap_buf * sizeof *s->buf_step);
    *id = lg->n_series++;
    return status_ok();
}

int h5log_series(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims) {
    int id = -1;
    Status st = series_declare(lg, path, type, n_dims, dims, &id);
    if (!STATUS_OK(st)) {
        keep_error(lg, st);
        return -1;
    }
    return id;
}

/* ---- one-off arrays ---- */

Status h5log_write_array(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims,
                         const void *data) {
    TRY(check_open(lg, "h5log_write_array"));
    char p[512];
    TRY(norm_path(lg, path, p, sizeof p));
    TRY(check_not_swmr_writing(lg, "dataset", p));
    if (file_type(type) < 0) return status_errorf("%s: array '%s': unknown type %d", lg->path, p, type);
    if (n_dims < 0 || n_dims > H5LOG_MAX_DIMS + 1 || (n_dims > 0 && !dims))
        return status_errorf("%s: array '%s': n_dims = %d, expected 0..%d", lg->path, p, n_dims, H5LOG_MAX_DIMS + 1);
    int e = path_exists(lg->file, p);
    if (e < 0) return hdf5_error(lg, "cannot look up '%s'", p);
    if (e > 0 && H5Ldelete(lg->file, p, H5P_DEFAULT) < 0) return hdf5_error(lg, "cannot replace '%s'", p);
    hsize_t hd[H5LOG_MAX_DIMS + 1];
    for (int i = 0; i < n_dims; i++) hd[i] = dims[i];
    hid_t space = n_dims == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(n_dims, hd, NULL);
    hid_t lcpl = lcpl_intermediate();
    hid_t d = space >= 0 && lcpl >= 0
                  ? H5Dcreate2(lg->file, p, file_type(type), space, lcpl, H5P_DEFAULT, H5P_DEFAULT) : -1;
    Status st = status_ok();
    if (d < 0) st = hdf5_error(lg, "cannot create dataset '%s'", p);
    else if (H5Dwrite(d, mem_type(type), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
        st = hdf5_error(lg, "cannot write dataset '%s'", p);
    if (d >= 0) H5Dclose(d);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (space >= 0) H5Sclose(space);
    return st;
}

/* ---- writing ---- */

Status h5log_start(H5log *lg) {
    TRY(check_open(lg, "h5log_start"));
    if (!STATUS_OK(lg->err)) {
        Status st = lg->err;
        lg->err = status_ok();
        return st;
    }
    if (lg->writing) return status_ok();
    if (lg->swmr && H5Fstart_swmr_write(lg->file) < 0) return hdf5_error(lg, "cannot start SWMR writing");
    lg->writing = true;
    return status_ok();
}

/* write hyperslab rows [row0, row0 + n) of dataset d (rank 1 + n_dims), extending it first */
static herr_t extend_and_write(hid_t d, hid_t mtype, uint64_t row0, uint64_t n, int n_dims,
                               const uint64_t *dims, const void *buf) {
    hsize_t ext[1 + H5LOG_MAX_DIMS], start[1 + H5LOG_MAX_DIMS] = {0}, count[1 + H5LOG_MAX_DIMS];
    ext[0] = row0 + n;
    start[0] = row0;
    count[0] = n;
    for (int i = 0; i < n_dims; i++) ext[1 + i] = count[1 + i] = dims[i];
    if (H5Dset_extent(d, ext) < 0) return -1;
    hid_t fs = H5Dget_space(d);
    hid_t ms = H5Screate_simple(1 + n_dims, count, NULL);
    herr_t r = fs >= 0 && ms >= 0 ? H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
    if (r >= 0) r = H5Dwrite(d, mtype, ms, fs, H5P_DEFAULT, buf);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return r;
}

/* write the buffered rows of one series: value first, then step, so the step count never runs
 * ahead of written values. On failure the extents are rolled back and the rows stay buffered. */
static Status series_write_block(H5log *lg, H5logSeries *s) {
    if (s->n_buf == 0) return status_ok();
    if (extend_and_write(s->h5_value, mem_type(s->type), s->n_rows, s->n_buf, s->n_dims, s->dims, s->buf) < 0 ||
        extend_and_write(s->h5_step, H5T_NATIVE_INT64, s->n_rows, s->n_buf, 0, NULL, s->buf_step) < 0) {
        Status st = hdf5_error(lg, "cannot write %llu rows of series '/%s' at row %llu", (unsigned long long)s->n_buf,
                             s->path, (unsigned long long)s->n_rows);
        hsize_t ext[1 + H5LOG_MAX_DIMS];
        ext[0] = s->n_rows;
        for (int i = 0; i < s->n_dims; i++) ext[1 + i] = s->dims[i];
        H5Dset_extent(s->h5_value, ext);
        H5Dset_extent(s->h5_step, ext);
        H5Eclear2(H5E_DEFAULT);
        return st;
    }
    s->n_rows += s->n_buf;
    s->n_buf = 0;
    s->dirty = true;
    return status_ok();
}

Status h5log_append(H5log *lg, int id, long step, const void *row) {
    Status st = check_open(lg, "h5log_append");
    if (STATUS_OK(st) && (id < 0 || id >= lg->n_series))
        st = status_errorf("%s: h5log_append: no series with id %d (declared: %d)", lg->path, id, lg->n_series);
    if (STATUS_OK(st) && step < 0)
        st = status_errorf("%s: series '/%s': step %ld < 0", lg->path, lg->series[id].path, step);
    if (STATUS_OK(st) && !row)
        st = status_errorf("%s: series '/%s': NULL row at step %ld", lg->path, lg->series[id].path, step);
    if (STATUS_OK(st)) {
        H5logSeries *s = &lg->series[id];
        if (s->n_buf == s->cap_buf) st = series_write_block(lg, s);
        if (STATUS_OK(st)) {
            memcpy((char *)s->buf + s->n_buf * s->row_bytes, row, s->row_bytes);
            s->buf_step[s->n_buf] = step;
            s->n_buf++;
        }
    }
    if (lg->is_open) keep_error(lg, st);
    return st;
}

Status h5log_flush(H5log *lg) {
    TRY(check_open(lg, "h5log_flush"));
    Status first = lg->err;
    lg->err = status_ok();
    for (int i = 0; i < lg->n_series; i++) {
        Status st = series_write_block(lg, &lg->series[i]);
        if (STATUS_OK(first)) first = st;
    }
    if (lg->swmr) {
        for (int i = 0; i < lg->n_series; i++) {
            H5logSeries *s = &lg->series[i];
            if (!s->dirty) continue;
            if (H5Dflush(s->h5_value) < 0 || H5Dflush(s->h5_step) < 0) {
                Status st = hdf5_error(lg, "cannot flush series '/%s'", s->path);
                if (STATUS_OK(first)) first = st;
                continue;
            }
            s->dirty = false;
        }
    } else if (H5Fflush(lg->file, H5F_SCOPE_LOCAL) < 0) {
        Status st = hdf5_error(lg, "cannot flush the file");
        if (STATUS_OK(first)) first = st;
    } else {
        for (int i = 0; i < lg->n_series; i++) lg->series[i].dirty = false;
    }
    return first;
}

Status h5log_step_done(H5log *lg, long step) {
    TRY(check_open(lg, "h5log_step_done"));
    if (step % lg->flush_interval == 0) return h5log_flush(lg);
    Status st = lg->err;
    lg->err = status_ok();
    return st;
}

void h5log_close(H5log *lg) {
    if (!lg->is_open) {
        lg->file = -1;
        return;
    }
    lg->err = status_ok();   /* kept errors were already returned by the calls that made them */
    Status st = h5log_flush(lg);
    if (!STATUS_OK(st)) fprintf(stderr, "dcmoe: warning: closing %s: %s\n", lg->path, st.msg);
    for (int i = 0; i < lg->n_series; i++) series_release(&lg->series[i]);
    lg->n_series = 0;
    if (H5Fclose(lg->file) < 0) {
        st = hdf5_error(lg, "cannot close the file");
        fprintf(stderr, "dcmoe: warning: %s\n", st.msg);
    }
    lg->file = -1;
    lg->is_open = false;
    lg->writing = false;
}

long h5log_last_step(H5log *lg, int id) {
    if (!lg->is_open || id < 0 || id >= lg->n_series) return -1;
    H5logSeries *s = &lg->series[id];
    if (s->n_buf > 0) return (long)s->buf_step[s->n_buf - 1];
    if (s->n_rows == 0) return -1;
    int64_t v = -1;
    hid_t fs = H5Dget_space(s->h5_step);
    hsize_t start = s->n_rows - 1, count = 1;
    hid_t ms = H5Screate_simple(1, &count, NULL);
    herr_t r = fs >= 0 && ms >= 0 ? H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &count, NULL) : -1;
    if (r >= 0) r = H5Dread(s->h5_step, H5T_NATIVE_INT64, ms, fs, H5P_DEFAULT, &v);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    if (r < 0) { H5Eclear2(H5E_DEFAULT); return -1; }
    return (long)v;
}

Status h5log_repair(const char *path, long max_step) {
    H5log lg;
    memset(&lg, 0, sizeof lg);
    lg.file = -1;
    Status st = h5log_open_append(&lg, path, false, 1, max_step);
    h5log_close(&lg);
    return st;
}
