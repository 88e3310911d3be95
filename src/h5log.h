/* h5log: the per-run HDF5 metrics file. Series are chunked extendible datasets with a step
 * axis (H5MD-like: /group/name/value [n, dims...] and /group/name/step [n]); all are declared
 * before writing starts (SWMR needs that), then appended each step and flushed every
 * flush_interval steps so a killed run leaves a readable file.
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
    uint64_t n_rows;
    size_t row_elems;
} H5logSeries;

typedef struct H5log {
    int64_t file;            /* hid_t; < 0 when closed */
    char path[1024];
    bool swmr, writing;
    int flush_interval;
    int n_series;
    H5logSeries series[H5LOG_MAX_SERIES];
} H5log;

/* create (truncate) a file; attrs are set with h5log_attr_* before h5log_start */
Status h5log_create(H5log *lg, const char *path, bool swmr, int flush_interval);
/* reopen an existing file for appending (resume): series are found by path, rows past
 * max_step are dropped so the resumed run continues the series without duplicates */
Status h5log_open_append(H5log *lg, const char *path, bool swmr, int flush_interval, long max_step);
/* declare a series (before h5log_start); returns its id (index) or -1 on error */
int h5log_series(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims);
Status h5log_attr_str(H5log *lg, const char *obj_path, const char *name, const char *value);
Status h5log_attr_i64(H5log *lg, const char *obj_path, const char *name, int64_t value);
Status h5log_attr_f64(H5log *lg, const char *obj_path, const char *name, double value);
/* a one-off dataset written in full (e.g. /params/by_kind) before h5log_start */
Status h5log_write_array(H5log *lg, const char *path, int type, int n_dims, const uint64_t *dims,
                         const void *data);
/* begin appending (starts SWMR write mode if enabled) */
Status h5log_start(H5log *lg);
/* append one row (row_elems values of the series type) at step */
Status h5log_append(H5log *lg, int id, long step, const void *row);
/* call once per step: flushes every flush_interval steps */
Status h5log_step_done(H5log *lg, long step);
Status h5log_flush(H5log *lg);
void h5log_close(H5log *lg);

#endif
