/* util: status codes with messages, the always-on ASSERT, timing, CRC32, RNG streams,
 * and atomic file writes. Used by every other module.
 * Does not: allocate long-lived memory (callers own every buffer they pass in).
 * Status messages live in a fixed buffer inside the Status value itself. */
#ifndef DCMOE_UTIL_H
#define DCMOE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdbool.h>

#define DCMOE_VERSION "0.1.0"

/* ---- status: expected failures travel up as values ---- */
typedef struct Status {
    int code;           /* 0 = ok */
    char msg[512];
} Status;

static inline Status status_ok(void) { Status s; s.code = 0; s.msg[0] = 0; return s; }
Status status_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define STATUS_OK(s) ((s).code == 0)
/* return the status from the enclosing function if it is an error */
#define TRY(expr) do { Status try_s_ = (expr); if (!STATUS_OK(try_s_)) return try_s_; } while (0)

/* ---- always-on invariant checks: print rank, file, line and abort (MPI_Abort in MPI runs) ---- */
void util_fatal(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), noreturn));
#define ASSERT(cond) do { if (!(cond)) util_fatal(__FILE__, __LINE__, "assertion failed: %s", #cond); } while (0)
#define ASSERTF(cond, ...) do { if (!(cond)) util_fatal(__FILE__, __LINE__, __VA_ARGS__); } while (0)

/* set by the communicator so fatal errors name the rank and abort every rank */
extern int util_rank;
extern void (*util_abort_hook)(int code);

void *xmalloc(size_t n);         /* aborts on failure, 64-byte aligned */
void *xcalloc(size_t n);         /* zeroed, 64-byte aligned */
void xfree(void *p);

double time_now(void);           /* monotonic seconds */

/* ---- CRC32 (IEEE, as zlib) ---- */
uint32_t crc32_update(uint32_t crc, const void *data, size_t n);

/* ---- RNG: xoshiro256** streams derived from (seed, rank, purpose) ---- */
typedef struct Rng { uint64_t s[4]; } Rng;
enum RngPurpose { RNG_INIT = 1, RNG_DATA = 2, RNG_DROPOUT = 3, RNG_CLUSTER = 4, RNG_EVAL = 5, RNG_TEST = 6 };
void rng_init(Rng *r, uint64_t seed, uint64_t rank, uint64_t purpose);
uint64_t rng_u64(Rng *r);
double rng_uniform(Rng *r);                 /* [0,1) */
float rng_normal(Rng *r);                   /* N(0,1), Box-Muller, no cached state */
uint64_t rng_below(Rng *r, uint64_t n);     /* [0,n) without modulo bias */

/* ---- files ---- */
/* write the whole buffer to path atomically: path.tmp, fsync, rename, fsync dir */
Status file_write_atomic(const char *path, const void *data, size_t n);
/* the same, with the fsyncs only when sync != 0 (temp file + rename either way) */
Status file_write_replace(const char *path, const void *data, size_t n, int sync);
Status file_read_all(const char *path, void **data, size_t *n);   /* caller frees with free() */
bool file_exists(const char *path);
Status dir_make_p(const char *path);        /* mkdir -p */
/* fsync a directory so a rename inside it is durable */
void dir_fsync(const char *dir);

/* ---- run-folder lock: one process owns a run folder at a time ---- */
/* takes DIR/LOCK with flock (released by the kernel when the holder dies, so a stale lock of
 * a dead process is taken over) and writes "host pid" into it. Fails, naming the holder's
 * host and pid, if a live process holds it. *fd is the lock (keep it open; -1 on failure);
 * *stale gets the previous holder's text when a dead holder's lock was taken over ("" if none). */
Status run_lock_acquire(const char *dir, int *fd, char *stale, size_t stale_cap);
/* releases and removes the lock; safe with fd < 0 */
void run_lock_release(const char *dir, int fd);

/* snprintf into a fixed buffer; aborts on truncation (paths and names) */
void str_fmt(char *dst, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
