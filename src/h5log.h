/* h5log: the per-run HDF5 metrics file. Series are chunked extendible datasets with a step
 * axis (H5MD-like: /group/name/value [n, dims...] and /group/name/step [n]); all are declared
 * before writing starts (SWMR needs that), then appended each step and flushed every
 * flush_interval steps so a killed run leaves a readable file. Appended rows are buffered in
 * memory (one block per series, owned by the H5log) and written as blocks at flush time.
 * Does not: decide what to log (train.c does). Only rank 0 opens a writer. */
#ifndef DCMOE_H5LOG_H
#define DCMOE_H5LOG_H

#include <stdint.h>
#include <stdbool.h>
#include "util.h"

#define H5LOG_MAX_SERIES 128
#define H5LOG_MAX_DIMS 3

enum H5logType { H5LOG_F64 = 0, H5LOG_F32 = 1, H5LOG_I64 = 2 };

typedef struct H5logSeries {
    char path[256];          /* e.g. "train/loss" -> /train/loss/{step,value} */
    int type;
    int n_dims;              /* dims of one row (0 = scalar per step) */
    uint64_t dims[H5LOG_MAX_DIMS];
    int64_t h5_value, h5_step;   /* hid_t */
    uint64_t n_rows;         /* rows in the file (not counting the buffer) */
    size_t row_elems;
    size_t row_bytes;        /* row_elems * element size */
    uint64_t chunk_rows;     /* rows per chunk of the value dataset */
    void *buf;               /* [cap_buf, row_elems] rows not yet written */
    int64_t *buf_step;       /* [cap_buf] */
    uint64_t n_buf, cap_buf;
    bool dirty;              /* written since the last H5Dflush */
} H5logSeries;

typedef struct H5log {
    int64_t file;            /* hid_t; < 0 when closed */
    char path[1024];
    bool is_open;            /* false on a zeroed struct: h5log_close is then a no-op */
    bool appending;          /* opened by h5log_open_append: h5log_series opens existing series */
    bool recovered;          /* open_append repaired a file left by a killed writer */
    bool swmr, writing;
    int flush_interval;
    int n_series;
    H5logSeries series[H5LOG_MAX_SERIES];
    Status err;              /* first error not yet reported (h5log_series, h5log_append) */
} H5log;

/* create (truncate) a file with root attribute schema_version = 1; attrs are set with
 * h5log_attr_* before h5log_start. lg is overwritten (it must not hold an open file).
 * flush_interval < 1 means 1. */
Status h5log_create(H5log *lg, const char *path, bool swmr, int flush_interval);
/* reopen an existing file for appending (resume): in every series of the file, rows with
 * step > max_step (and unwritten rows) are dropped so the resumed run continues without
 * duplicates (max_step < 0 keeps all rows). Series are then re-declared with h5log_series,
 * which opens them (checking type and row shape) or creates the ones not in the file.
 * A file left by a killed writer is repaired as h5clear -s --increment would (superblock
 * status flags cleared, end of allocation raised to the end of file); lg->recovered says so.
 * Do not resume while the old writer still runs. */
Status h5log_open_append(H5log *lg, const char *path, bool swmr, int flush_interval, long max_step);
/* declare a series (before h5log_start); returns its id (index) or -1 on error, with the
 * reason in lg->err (h5log_start returns it too). Steps must be >= 0. */
int h5log_series(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims);
/* attributes on any object ("/" = root; a missing group is created); an existing attribute
 * of that name is replaced. Strings are variable-length UTF-8 (h5py reads str).
 * With swmr, attributes and arrays can only be written before h5log_start. */
Status h5log_attr_str(H5log *lg, const char *obj_path, const char *name, const char *value);
Status h5log_attr_i64(H5log *lg, const char *obj_path, const char *name, int64_t value);
Status h5log_attr_f64(H5log *lg, const char *obj_path, const char *name, double value);
/* a one-off dataset written in full (e.g. /params/by_kind) before h5log_start */
Status h5log_write_array(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims,
                         const void *data);
/* begin appending (starts SWMR write mode if enabled); fails if a declaration failed */
Status h5log_start(H5log *lg);
/* append one row (row_elems values of the series type) at step; buffered in memory.
 * An error is also kept in lg->err and returned by the next h5log_step_done/h5log_flush. */
Status h5log_append(H5log *lg, int id, long step, const void *row);
/* call once per step: flushes every flush_interval steps; returns (and clears) any error
 * kept since the last call */
Status h5log_step_done(H5log *lg, long step);
/* write every buffered row (step and value datasets grow together) and flush them to disk
 * (H5Dflush per changed dataset with SWMR, H5Fflush otherwise) */
Status h5log_flush(H5log *lg);
/* step of the last row of series id (buffered or in the file), -1 if it has none */
long h5log_last_step(H5log *lg, int id);
/* reopen a closed log and drop every row whose step is invalid (< 0, e.g. a row whose step
 * write failed on a full disk) or beyond max_step (< 0: no limit), then close it */
Status h5log_repair(const char *path, long max_step);
/* flush (a failure is printed to stderr) and close everything; safe twice and on a zeroed
 * struct */
void h5log_close(H5log *lg);

#endif
