/* test_calib: the hardware file of `dcmoe bench calibrate`: a written file reads back field for
 * field; every bad input is an error naming file:line:column and the field (unknown field,
 * missing field, not a number, below the minimum, sizes not increasing, wrong format, a missing
 * file); the interpolation: a measured GEMM shape gives exactly 2 M N K / rate, an unmeasured one
 * a rate between its neighbours', the collective curve is linear between measured sizes and
 * extended beyond them, the straggling overhead linear in log interval and clamped. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "harness.h"

static char *good_yaml(void) {
    static char buf[8192];
    size_t n = 0;
    n += (size_t)snprintf(buf + n, sizeof buf - n,
                          "format: dcmoe-hardware-1\ndate: \"2026-01-01T00:00:00Z\"\ndescription: \"test cpu\"\nranks: 2\nthreads: 1\n"
                          "memory:\n  copy_gbs: 10\n  triad_gbs: 12\nops:\n");
    for (int i = 0; i < HW_OP_N; i++) n += (size_t)snprintf(buf + n, sizeof buf - n, "  %s: {ns: %d.5, spread: 0.1}\n", hw_op_names[i], i + 1);
    n += (size_t)snprintf(buf + n, sizeof buf - n,
                          "gemm:\n"
                          "  - {ta: 0, tb: 0, m: 16, n: 128, k: 128, gflops: 10, spread: 0.01}\n"
                          "  - {ta: 0, tb: 0, m: 256, n: 128, k: 128, gflops: 40, spread: 0.01}\n"
                          "  - {ta: 1, tb: 0, m: 128, n: 128, k: 256, gflops: 30, spread: 0.01}\n"
                          "alltoall:\n"
                          "  - {bytes: 100, seconds: 1.0e-6, spread: 0.1}\n"
                          "  - {bytes: 1100, seconds: 2.0e-6, spread: 0.1}\n"
                          "  - {bytes: 2100, seconds: 4.0e-6, spread: 0.1}\n"
                          "allreduce:\n"
                          "  - {bytes: 64, seconds: 2.0e-6, spread: 0.1}\n"
                          "  - {bytes: 1064, seconds: 3.0e-6, spread: 0.1}\n"
                          "straggle:\n"
                          "  - {interval_s: 0.001, overhead: 0.1, spread: 0.01}\n"
                          "  - {interval_s: 0.004, overhead: 0.3, spread: 0.01}\n");
    return buf;
}

/* replace the first occurrence of `from` in the good file by `to`, load it, expect an error
 * containing every string of want (NULL-terminated) */
static void expect_error(const char *from, const char *to, const char *const *want, const char *what) {
    char *g = good_yaml(), buf[8192];
    char *p = strstr(g, from);
    ok(p != NULL, "%s: the edit applies", what);
    if (!p) return;
    size_t pre = (size_t)(p - g);
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)pre, g, to, p + strlen(from));
    HwFile h;
    Status st = hwfile_load_string(&h, buf, strlen(buf), "hw.yaml");
    int all = !STATUS_OK(st);
    for (int i = 0; want[i] && all; i++) all = strstr(st.msg, want[i]) != NULL;
    ok(all, "%s: error '%s'", what, STATUS_OK(st) ? "(none)" : st.msg);
    if (STATUS_OK(st)) hwfile_free(&h);
}

int main(void) {
    HwFile h;
    char *g = good_yaml();
    Status st = hwfile_load_string(&h, g, strlen(g), "hw.yaml");
    ok(STATUS_OK(st), "a good file loads (%s)", st.msg);
    if (!STATUS_OK(st)) return harness_done();
    ok(h.ranks == 2 && h.threads == 1 && h.n_gemm == 3 && h.n_alltoall == 3 && h.n_allreduce == 2, "counts read");
    ok(h.copy_gbs == 10 && h.triad_gbs == 12 && !strcmp(h.description, "test cpu") && !strcmp(h.date, "2026-01-01T00:00:00Z"),
       "memory, description, date read");
    int ops_ok = 1;
    for (int i = 0; i < HW_OP_N; i++) ops_ok &= h.op_ns[i] == i + 1.5 && h.op_spread[i] == 0.1;
    ok(ops_ok, "every op's ns and spread read");
    ok(h.gemm[2].ta == 1 && h.gemm[2].tb == 0 && h.gemm[2].M == 128 && h.gemm[2].K == 256 && h.gemm[2].gflops == 30, "gemm row read");

    /* write -> load round trip */
    char path[] = "/tmp/dcmoe-calib-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    st = hwfile_write(&h, path);
    HwFile h2;
    Status st2 = STATUS_OK(st) ? hwfile_load(&h2, path) : st;
    ok(STATUS_OK(st2), "written file reads back (%s)", st2.msg);
    if (STATUS_OK(st2)) {
        int same = h2.ranks == h.ranks && h2.n_gemm == h.n_gemm && h2.n_alltoall == h.n_alltoall && h2.copy_gbs == h.copy_gbs;
        for (int i = 0; i < h.n_gemm; i++) same &= h2.gemm[i].M == h.gemm[i].M && h2.gemm[i].gflops == h.gemm[i].gflops;
        for (int i = 0; i < HW_OP_N; i++) same &= fabs(h2.op_ns[i] - h.op_ns[i]) < 1e-9;
        for (int i = 0; i < h.n_alltoall; i++) same &= h2.alltoall[i].seconds == h.alltoall[i].seconds;
        ok(same, "round trip keeps every value");
        hwfile_free(&h2);
    }
    unlink(path);

    /* interpolation */
    double t = hwfile_gemm_s(&h, 0, 0, 16, 128, 128), want = 2.0 * 16 * 128 * 128 / 10e9;
    ok(fabs(t - want) < 1e-15, "measured shape: 2MNK / rate (%.6g vs %.6g)", t, want);
    t = hwfile_gemm_s(&h, 1, 0, 128, 128, 256);
    ok(fabs(t - 2.0 * 128 * 128 * 256 / 30e9) < 1e-15, "measured transposed shape uses its own rate");
    double rate = 2.0 * 64 * 128 * 128 / hwfile_gemm_s(&h, 0, 0, 64, 128, 128) / 1e9;
    ok(rate > 10 && rate < 40, "unmeasured shape between its neighbours' rates (%.2f GFLOP/s)", rate);
    /* M = 64 is equidistant in log M from 16 and 256: inverse-distance weights are equal among
     * the NN shapes, and the TN shape is not used (same transposition exists) */
    double want_rate = 1.0 / (0.5 / 10 + 0.5 / 40);
    ok(fabs(rate - want_rate) < 1e-9, "equidistant shapes: harmonic mean of the rates (%.6f vs %.6f)", rate, want_rate);
    ok(fabs(hwfile_curve_s(h.alltoall, h.n_alltoall, 600) - 1.5e-6) < 1e-15, "curve: linear between sizes");
    ok(fabs(hwfile_curve_s(h.alltoall, h.n_alltoall, 3100) - 6.0e-6) < 1e-15, "curve: last segment extended");
    ok(hwfile_curve_s(h.alltoall, h.n_alltoall, 10) == 1.0e-6, "curve: below the smallest size, its time");
    ok(h.n_straggle == 2 && fabs(hwfile_straggle(&h, 0.002) - 0.2) < 1e-12, "straggle: linear in log interval (%.6f)",
       hwfile_straggle(&h, 0.002));
    ok(hwfile_straggle(&h, 1e-6) == 0.1 && hwfile_straggle(&h, 1.0) == 0.3, "straggle: end values beyond the intervals");
    hwfile_free(&h);

    /* bad input: located errors naming the field */
    expect_error("copy_gbs: 10", "copy_gbs: fast", (const char *const[]){"hw.yaml:7:13:", "memory.copy_gbs", "number", NULL},
                 "not a number");
    expect_error("copy_gbs: 10", "copy_gbs: -1", (const char *const[]){"hw.yaml:7:13:", "memory.copy_gbs", "minimum", NULL},
                 "below the minimum");
    expect_error("  triad_gbs: 12\n", "  triad_gbs: 12\n  flops: 3\n", (const char *const[]){"hw.yaml:9:3:", "unknown field 'flops'", NULL},
                 "unknown field");
    expect_error("  triad_gbs: 12\n", "", (const char *const[]){"hw.yaml:7:3:", "missing field 'triad_gbs'", NULL},
                 "missing field");
    expect_error("format: dcmoe-hardware-1", "format: other", (const char *const[]){"hw.yaml:1:9:", "format", NULL}, "wrong format");
    expect_error("{bytes: 2100", "{bytes: 1000", (const char *const[]){"alltoall", "increase", NULL}, "sizes not increasing");
    expect_error("ta: 1,", "ta: 2,", (const char *const[]){"gemm", "0 or 1", NULL}, "bad transposition flag");
    expect_error("  router_bwd:", "  router_bwx:", (const char *const[]){"unknown field 'router_bwx'", NULL}, "misspelt op");
    expect_error("interval_s: 0.004", "interval_s: 0.0005", (const char *const[]){"straggle", "increase", NULL},
                 "straggle intervals not increasing");
    expect_error("memory:\n", "memory: [\n", (const char *const[]){"hw.yaml:", "YAML syntax error", NULL}, "syntax error");
    st = hwfile_load(&h, "/nonexistent/hw.yaml");
    ok(!STATUS_OK(st) && strstr(st.msg, "/nonexistent/hw.yaml") && strstr(st.msg, "bench calibrate"),
       "missing file: named, with the command that writes one (%s)", st.msg);
    return harness_done();
}
