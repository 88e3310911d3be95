#define _POSIX_C_SOURCE 200809L
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <libgen.h>
#include <math.h>

int util_rank = -1;
void (*util_abort_hook)(int code) = NULL;

Status status_errorf(const char *fmt, ...) {
    Status s;
    s.code = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s.msg, sizeof s.msg, fmt, ap);
    va_end(ap);
    return s;
}

void util_fatal(const char *file, int line, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (util_rank >= 0) fprintf(stderr, "dcmoe: [rank %d] %s:%d: %s\n", util_rank, file, line, buf);
    else fprintf(stderr, "dcmoe: %s:%d: %s\n", file, line, buf);
    fflush(stderr);
    if (util_abort_hook) util_abort_hook(1);
    abort();
}

void *xmalloc(size_t n) {
    void *p = NULL;
    if (n == 0) n = 64;
    size_t rounded = (n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, rounded) != 0 || !p)
        util_fatal(__FILE__, __LINE__, "out of memory allocating %zu bytes", n);
    return p;
}

void *xcalloc(size_t n) {
    void *p = xmalloc(n);
    memset(p, 0, n ? n : 64);
    return p;
}

void xfree(void *p) { free(p); }

double time_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* slicing-by-8 (8 table lookups per 8 bytes; ~8x the byte-wise loop, same results).
 * The tables are built on first use; the build is idempotent, so a race between threads
 * only repeats the same writes. */
static uint32_t crc_table[8][256];
static int crc_table_ready = 0;

static void crc_table_build(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    crc_table_ready = 1;
}

uint32_t crc32_update(uint32_t crc, const void *data, size_t n) {
    if (!crc_table_ready) crc_table_build();
    const uint8_t *p = data;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
              crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
    }
    for (; n > 0; n--, p++) crc = crc_table[0][(crc ^ *p) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void rng_init(Rng *r, uint64_t seed, uint64_t rank, uint64_t purpose) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull ^ (rank + 1) * 0xD1B54A32D192ED03ull ^ purpose * 0xABC98388FB8FAC03ull;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rng_u64(Rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double rng_uniform(Rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

float rng_normal(Rng *r) {
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

uint64_t rng_below(Rng *r, uint64_t n) {
    if (n <= 1) return 0;
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do { x = rng_u64(r); } while (x >= lim);
    return x % n;
}

void dir_fsync(const char *dir) {
    int fd = open(dir, O_RDONLY);
    if (fd >= 0) { fsync(fd); close(fd); }
}

Status file_write_atomic(const char *path, const void *data, size_t n) { return file_write_replace(path, data, n, 1); }

Status file_write_replace(const char *path, const void *data, size_t n, int sync) {
    char tmp[4096];
    str_fmt(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return status_errorf("%s: cannot create: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = n;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd); unlink(tmp);
            return status_errorf("%s: write failed: %s", tmp, strerror(e));
        }
        p += w; left -= (size_t)w;
    }
    if (sync && fsync(fd) != 0) { int e = errno; close(fd); unlink(tmp); return status_errorf("%s: fsync failed: %s", tmp, strerror(e)); }
    if (close(fd) != 0) { int e = errno; unlink(tmp); return status_errorf("%s: close failed: %s", tmp, strerror(e)); }
    if (rename(tmp, path) != 0) { int e = errno; unlink(tmp); return status_errorf("%s: rename failed: %s", path, strerror(e)); }
    if (!sync) return status_ok();
    char dcopy[4096];
    str_fmt(dcopy, sizeof dcopy, "%s", path);
    dir_fsync(dirname(dcopy));
    return status_ok();
}

Status run_lock_acquire(const char *dir, int *fd, char *stale, size_t stale_cap) {
    char path[4096];
    str_fmt(path, sizeof path, "%s/LOCK", dir);
    *fd = -1;
    if (stale_cap) stale[0] = 0;
    for (int attempt = 0; attempt < 8; attempt++) {
        int f = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (f < 0) return status_errorf("%s: cannot open the run lock: %s", path, strerror(errno));
        char held[256] = "";
        ssize_t nr = pread(f, held, sizeof held - 1, 0);
        held[nr > 0 ? nr : 0] = 0;
        char *nl = strchr(held, '\n');
        if (nl) *nl = 0;
        if (flock(f, LOCK_EX | LOCK_NB) != 0) {
            int e = errno;
            close(f);
            if (e == EWOULDBLOCK)
                return status_errorf("%s: the run folder is in use by %s (another dcmoe process; wait for it, or "
                                     "use another run.name)", dir, held[0] ? held : "another process");
            return status_errorf("%s: cannot lock: %s", path, strerror(e));
        }
        /* the file may have been removed by its previous holder between open and flock */
        struct stat a, b;
        if (fstat(f, &a) != 0 || stat(path, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
            close(f);
            continue;
        }
        if (held[0] && stale_cap) str_fmt(stale, stale_cap, "%.200s", held);
        char host[128] = "unknown", text[256];
        gethostname(host, sizeof host - 1);
        host[sizeof host - 1] = 0;
        int n = snprintf(text, sizeof text, "host %s pid %d\n", host, (int)getpid());
        if (ftruncate(f, 0) != 0 || pwrite(f, text, (size_t)n, 0) != n) {
            int e = errno;
            close(f);
            return status_errorf("%s: cannot write the run lock: %s", path, strerror(e));
        }
        *fd = f;
        return status_ok();
    }
    return status_errorf("%s: the run lock keeps changing hands; is another dcmoe starting in this folder?", path);
}

void run_lock_release(const char *dir, int fd) {
    if (fd < 0) return;
    char path[4096];
    str_fmt(path, sizeof path, "%s/LOCK", dir);
    unlink(path);
    close(fd);
}

Status file_read_all(const char *path, void **data, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return status_errorf("%s: cannot open: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return status_errorf("%s: cannot seek", path); }
    long len = ftell(f);
    if (len < 0) { fclose(f); return status_errorf("%s: cannot tell size", path); }
    rewind(f);
    char *buf = malloc((size_t)len + 1);
    if (!buf) { fclose(f); return status_errorf("%s: out of memory (%ld bytes)", path, len); }
    size_t got = fread(buf, 1, (size_t)len, f);
    fclose(f);
    if (got != (size_t)len) { free(buf); return status_errorf("%s: short read (%zu of %ld bytes)", path, got, len); }
    buf[len] = 0;
    *data = buf;
    *n = (size_t)len;
    return status_ok();
}

bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

Status dir_make_p(const char *path) {
    char buf[4096];
    str_fmt(buf, sizeof buf, "%s", path);
    size_t len = strlen(buf);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return status_errorf("%s: cannot create directory: %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    struct stat sb;
    if (stat(path, &sb) != 0) return status_errorf("%s: cannot create directory: %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return status_errorf("%s: exists and is not a directory", path);
    return status_ok();
}

void str_fmt(char *dst, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(dst, cap, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap) util_fatal(__FILE__, __LINE__, "string too long (%d >= %zu): %.60s...", n, cap, dst);
}
