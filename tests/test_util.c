/* test_util: the base utilities of src/util.h.
 * - str_fmt: fits, exact fit, and truncation is fatal (checked in a forked child);
 * - status_errorf: message kept, an over-long message truncated inside the Status; TRY;
 * - CRC32: the IEEE/zlib check vectors, every split of an incremental update, and the
 *   slicing-by-8 path against a bit-at-a-time reference at every length and alignment;
 * - files: file_write_atomic / file_write_replace + file_read_all round trips (empty, binary,
 *   overwrite), no temporary file left behind, errors naming the path for a missing
 *   directory, a regular file used as a directory and (when not root) a read-only directory;
 *   file_exists; dir_make_p (nested, idempotent, trailing slash, under a regular file);
 * - RNG streams: same (seed, rank, purpose) -> same bits, others differ; ranges of
 *   rng_uniform and rng_below; rng_normal moments;
 * - xmalloc/xcalloc: 64-byte aligned, xcalloc zeroed; time_now monotonic. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>

#include "harness.h"
#include "util.h"

static char root[256];

/* run fn in a child; 1 if the child died of SIGABRT (util_fatal without MPI aborts) */
static int child_aborts(void (*fn)(void)) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        /* keep the expected fatal message out of the TAP stream */
        if (!freopen("/dev/null", "w", stderr)) _exit(3);
        fn();
        _exit(0);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid) return 0;
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT;
}

static void fmt_overflow(void) {
    char small[8];
    str_fmt(small, sizeof small, "%s", "12345678");   /* 8 chars + NUL in 8 bytes */
}

static void test_str_fmt(void) {
    char b[8];
    str_fmt(b, sizeof b, "%d-%s", 12, "ab");
    ok(!strcmp(b, "12-ab"), "str_fmt formats: '%s'", b);
    str_fmt(b, sizeof b, "%s", "1234567");
    ok(!strcmp(b, "1234567"), "str_fmt: 7 characters fit in 8 bytes exactly");
    ok(child_aborts(fmt_overflow), "str_fmt: 8 characters in 8 bytes abort (truncation is fatal)");
}

static Status fails_with(int k) { return k ? status_errorf("failure %d at %s", k, "here") : status_ok(); }
static Status try_chain(int k, int *reached) {
    TRY(fails_with(k));
    *reached = 1;
    return status_ok();
}

static void test_status(void) {
    Status s = status_ok();
    ok(STATUS_OK(s) && s.msg[0] == 0, "status_ok is ok with an empty message");
    s = status_errorf("x.yaml:%d:%d: bad", 3, 7);
    ok(!STATUS_OK(s) && !strcmp(s.msg, "x.yaml:3:7: bad"), "status_errorf keeps the message: '%s'", s.msg);
    char big[2000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    s = status_errorf("%s", big);
    ok(!STATUS_OK(s) && strlen(s.msg) == sizeof s.msg - 1, "an over-long message is truncated to %zu chars", sizeof s.msg - 1);
    int reached = 0;
    s = try_chain(2, &reached);
    ok(!STATUS_OK(s) && !reached && !strcmp(s.msg, "failure 2 at here"), "TRY returns the error early");
    s = try_chain(0, &reached);
    ok(STATUS_OK(s) && reached, "TRY passes on success");
}

/* bit-at-a-time CRC-32 (reflected polynomial 0xEDB88320), the definition */
static uint32_t crc_ref(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    return ~c;
}

static void test_crc32(void) {
    /* check values of CRC-32/ISO-HDLC (zlib's crc32) */
    const char *v[4] = {"", "a", "123456789", "The quick brown fox jumps over the lazy dog"};
    const uint32_t want[4] = {0x00000000u, 0xE8B7BE43u, 0xCBF43926u, 0x414FA339u};
    for (int i = 0; i < 4; i++) {
        uint32_t c = crc32_update(0, v[i], strlen(v[i]));
        ok(c == want[i], "crc32('%s') = %08x, expected %08x", v[i], c, want[i]);
    }
    const char *s = v[3];
    size_t n = strlen(s);
    int splits_ok = 1;
    for (size_t k = 0; k <= n; k++) splits_ok &= crc32_update(crc32_update(0, s, k), s + k, n - k) == want[3];
    ok(splits_ok, "crc32 updated in two pieces equals one pass, for every split point");
    uint8_t buf[300];
    Rng r;
    rng_init(&r, 1, 0, RNG_TEST);
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)rng_u64(&r);
    int ref_ok = 1;
    for (size_t off = 0; off < 8; off++)
        for (size_t len = 0; len + off <= sizeof buf; len++)
            if (crc32_update(0, buf + off, len) != crc_ref(buf + off, len)) { ref_ok = 0; break; }
    ok(ref_ok, "crc32 (slicing-by-8) equals the bitwise definition at every length 0..299 and offset 0..7");
    uint32_t c0 = crc32_update(0, buf, sizeof buf);
    buf[150] ^= 0x10;
    ok(crc32_update(0, buf, sizeof buf) != c0, "a one-bit change changes the crc");
}

static int n_entries_with(const char *dir, const char *needle) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, needle)) n++;
    closedir(d);
    return n;
}

static void test_files(void) {
    char path[600], sub[512];
    snprintf(path, sizeof path, "%s/a.bin", root);
    uint8_t data[1000];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 37);   /* includes NUL bytes */
    Status st = file_write_atomic(path, data, sizeof data);
    ok(STATUS_OK(st), "file_write_atomic writes %s (%s)", path, st.msg);
    ok(file_exists(path), "file_exists sees it");
    void *back = NULL;
    size_t n = 0;
    st = file_read_all(path, &back, &n);
    ok(STATUS_OK(st) && n == sizeof data && !memcmp(back, data, n) && ((char *)back)[n] == 0,
       "file_read_all returns the same %zu bytes, NUL-terminated", n);
    free(back);
    st = file_write_atomic(path, "xyz", 3);
    back = NULL;
    n = 0;
    if (STATUS_OK(st)) st = file_read_all(path, &back, &n);
    ok(STATUS_OK(st) && n == 3 && !memcmp(back, "xyz", 3), "a second write replaces the file (%zu bytes)", n);
    free(back);
    snprintf(path, sizeof path, "%s/empty", root);
    back = NULL;
    n = 1;
    st = file_write_replace(path, "", 0, 0);
    if (STATUS_OK(st)) st = file_read_all(path, &back, &n);
    ok(STATUS_OK(st) && n == 0, "file_write_replace (no fsync) of 0 bytes reads back empty (%s)", st.msg);
    free(back);
    ok(n_entries_with(root, ".tmp") == 0, "no temporary file left in %s", root);

    /* failures name the path */
    snprintf(path, sizeof path, "%s/no_such_dir/x.bin", root);
    st = file_write_atomic(path, data, 10);
    ok(!STATUS_OK(st) && strstr(st.msg, "no_such_dir/x.bin"), "write into a missing folder fails naming it: %s", st.msg);
    ok(!file_exists(path), "nothing was created there");
    snprintf(path, sizeof path, "%s/a.bin/x.bin", root);
    st = file_write_atomic(path, data, 10);
    ok(!STATUS_OK(st) && strstr(st.msg, "a.bin/x.bin"), "write under a regular file fails naming it: %s", st.msg);
    snprintf(sub, sizeof sub, "%s/ro", root);
    if (geteuid() != 0) {
        mkdir(sub, 0500);
        snprintf(path, sizeof path, "%s/x.bin", sub);
        st = file_write_atomic(path, data, 10);
        ok(!STATUS_OK(st) && strstr(st.msg, "ro/x.bin"), "write into a read-only folder fails naming it: %s", st.msg);
        chmod(sub, 0700);
        rmdir(sub);
    } else {
        printf("# running as root: a read-only folder is writable, that case is not checked\n");
    }
    snprintf(path, sizeof path, "%s/missing.bin", root);
    back = NULL;
    st = file_read_all(path, &back, &n);
    ok(!STATUS_OK(st) && strstr(st.msg, "missing.bin") && back == NULL, "reading a missing file fails naming it: %s", st.msg);
    ok(!file_exists(path), "file_exists is false for a missing file");

    /* dir_make_p */
    snprintf(sub, sizeof sub, "%s/d1/d2/d3", root);
    st = dir_make_p(sub);
    struct stat sb;
    ok(STATUS_OK(st) && stat(sub, &sb) == 0 && S_ISDIR(sb.st_mode), "dir_make_p creates nested folders");
    ok(STATUS_OK(dir_make_p(sub)), "dir_make_p on an existing folder is fine");
    snprintf(sub, sizeof sub, "%s/d1/d4/", root);
    ok(STATUS_OK(dir_make_p(sub)) && stat(sub, &sb) == 0 && S_ISDIR(sb.st_mode), "dir_make_p with a trailing slash");
    snprintf(sub, sizeof sub, "%s/a.bin/d5", root);
    st = dir_make_p(sub);
    ok(!STATUS_OK(st) && strstr(st.msg, "a.bin/d5"), "dir_make_p under a regular file fails naming it: %s", st.msg);
}

static void test_rng(void) {
    Rng a, b, c, d;
    rng_init(&a, 42, 3, RNG_DATA);
    rng_init(&b, 42, 3, RNG_DATA);
    rng_init(&c, 42, 3, RNG_INIT);
    rng_init(&d, 42, 4, RNG_DATA);
    int same = 1, diff_p = 0, diff_r = 0;
    for (int i = 0; i < 100; i++) {
        uint64_t x = rng_u64(&a);
        same &= x == rng_u64(&b);
        diff_p += x != rng_u64(&c);
        diff_r += x != rng_u64(&d);
    }
    ok(same, "same (seed, rank, purpose) gives the same stream");
    ok(diff_p == 100 && diff_r == 100, "another purpose or rank gives another stream (%d, %d of 100 differ)", diff_p, diff_r);
    Rng r;
    rng_init(&r, 7, 0, RNG_TEST);
    int in_range = 1, hist[7] = {0};
    double s1 = 0, s2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        double u = rng_uniform(&r);
        in_range &= u >= 0 && u < 1;
        uint64_t k = rng_below(&r, 7);
        in_range &= k < 7;
        if (k < 7) hist[k]++;
        double z = rng_normal(&r);
        s1 += z;
        s2 += z * z;
    }
    ok(in_range && rng_below(&r, 1) == 0 && rng_below(&r, 0) == 0, "rng_uniform in [0,1), rng_below(7) in 0..6, below(1) = below(0) = 0");
    /* each bin ~ Binomial(n, 1/7): sd = sqrt(n p (1-p)) ~ 156; 6 sd ~ 940 */
    int hist_ok = 1;
    for (int k = 0; k < 7; k++) hist_ok &= fabs(hist[k] - n / 7.0) < 940;
    ok(hist_ok, "rng_below(7) is uniform within 6 sd (%d %d %d %d %d %d %d)", hist[0], hist[1], hist[2], hist[3], hist[4], hist[5], hist[6]);
    /* mean of n N(0,1) has sd 1/sqrt(n) ~ 0.0022; the variance estimate sd ~ sqrt(2/n) ~ 0.0032: 6 sd */
    double mean = s1 / n, var = s2 / n - mean * mean;
    ok(fabs(mean) < 0.014 && fabs(var - 1) < 0.02, "rng_normal mean %.4f, variance %.4f", mean, var);
}

static void test_memory_time(void) {
    int aligned = 1;
    for (size_t n = 0; n < 300; n += 37) {
        unsigned char *p = xcalloc(n);
        aligned &= ((uintptr_t)p % 64) == 0;
        for (size_t i = 0; i < n; i++) aligned &= p[i] == 0;
        xfree(p);
        p = xmalloc(n);
        aligned &= ((uintptr_t)p % 64) == 0;
        xfree(p);
    }
    ok(aligned, "xmalloc/xcalloc are 64-byte aligned and xcalloc zeroes");
    double t0 = time_now(), t1 = time_now();
    ok(t1 >= t0 && t0 > 0, "time_now is monotonic");
}

int main(void) {
    snprintf(root, sizeof root, "test_util_%d", (int)getpid());
    if (mkdir(root, 0755) != 0) { printf("cannot create %s: %s\n", root, strerror(errno)); return 1; }
    test_str_fmt();
    test_status();
    test_crc32();
    test_files();
    test_rng();
    test_memory_time();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (system(cmd) != 0) printf("# could not remove %s\n", root);
    return harness_done();
}
