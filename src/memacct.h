/* memacct: memory accounting — a registry of bytes per tier (device/resident, host, file) and
 * per kind (parameters by precision, gradients, optimizer state, activations, communication
 * buffers, scratch), each with its current and peak value, plus the process peak measured by
 * the kernel (VmHWM / VmRSS from /proc/self/status).
 * Does not: allocate or track pointers (callers report what they allocate and free), lock
 * (one registry per rank, used from one thread), or write logs (callers copy the numbers out).
 * Memory: MemAcct is a plain value; memacct_init zeroes it, nothing to free. */
#ifndef DCMOE_MEMACCT_H
#define DCMOE_MEMACCT_H

#include <stddef.h>
#include <stdint.h>
#include "util.h"

enum MemTier {
    MEM_TIER_DEVICE = 0,     /* the resident tier: GPU memory, or the CPU backend's working set */
    MEM_TIER_HOST = 1,       /* host memory used as an offload tier (or pinned staging) */
    MEM_TIER_FILE = 2,       /* bytes in offload files */
    MEM_N_TIERS = 3
};

enum MemKind {
    MEM_KIND_PARAM_FP32 = 0,
    MEM_KIND_PARAM_FP16 = 1,
    MEM_KIND_PARAM_INT4 = 2,  /* packed nibbles plus their FP16 scales and zeros */
    MEM_KIND_GRAD = 3,
    MEM_KIND_OPTIM = 4,       /* Adam moments */
    MEM_KIND_ACT = 5,         /* activations saved for backward */
    MEM_KIND_COMM = 6,        /* communication buffers */
    MEM_KIND_SCRATCH = 7,     /* workspaces (dequantise blocks, staging) */
    MEM_N_KINDS = 8
};

typedef struct MemAcct {
    int64_t cur[MEM_N_TIERS][MEM_N_KINDS];
    int64_t peak[MEM_N_TIERS][MEM_N_KINDS];   /* peak of each cell on its own */
    int64_t tier_cur[MEM_N_TIERS];            /* sum over kinds */
    int64_t tier_peak[MEM_N_TIERS];           /* peak of the sum (not the sum of peaks) */
} MemAcct;

void memacct_init(MemAcct *m);
/* bytes > 0 allocates, < 0 releases; a cell going below zero is an ASSERT failure */
void memacct_add(MemAcct *m, enum MemTier tier, enum MemKind kind, int64_t bytes);
static inline void memacct_sub(MemAcct *m, enum MemTier tier, enum MemKind kind, int64_t bytes) {
    memacct_add(m, tier, kind, -bytes);
}
static inline int64_t memacct_current(const MemAcct *m, enum MemTier t, enum MemKind k) { return m->cur[t][k]; }
static inline int64_t memacct_peak(const MemAcct *m, enum MemTier t, enum MemKind k) { return m->peak[t][k]; }
static inline int64_t memacct_tier_current(const MemAcct *m, enum MemTier t) { return m->tier_cur[t]; }
static inline int64_t memacct_tier_peak(const MemAcct *m, enum MemTier t) { return m->tier_peak[t]; }
/* current bytes of one kind summed over tiers */
int64_t memacct_kind_current(const MemAcct *m, enum MemKind kind);
/* peaks restart from the current values (e.g. after start-up, to measure steady state) */
void memacct_reset_peaks(MemAcct *m);
/* the parameter kind of a stored precision: 0 fp32, 1 fp16, 2 int4 (enum QFormat values) */
static inline enum MemKind memacct_param_kind(int qformat) {
    return qformat == 1 ? MEM_KIND_PARAM_FP16 : qformat == 2 ? MEM_KIND_PARAM_INT4 : MEM_KIND_PARAM_FP32;
}

const char *memacct_tier_name(enum MemTier t);   /* "device", "host", "file" */
const char *memacct_kind_name(enum MemKind k);   /* "param_fp32", ..., "scratch" */

/* measured process memory, bytes; from /proc/self/status */
typedef struct MemProc {
    int64_t rss;             /* VmRSS: resident now */
    int64_t hwm;             /* VmHWM: peak resident ("high water mark") */
} MemProc;
Status memacct_proc(MemProc *out);
/* the same from a status file's text (for tests; the text need not be NUL-free beyond n) */
Status memacct_proc_parse(MemProc *out, const char *text, const char *name);

/* a human table (one line per non-zero tier x kind, current and peak, then totals) into buf;
 * returns the length written (truncated at cap - 1) */
size_t memacct_format(const MemAcct *m, char *buf, size_t cap);

#endif
