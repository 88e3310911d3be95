/* memacct: the per-tier, per-kind byte registry with peaks, and the kernel's measure of the
 * process peak (VmHWM). Does not: allocate tracked memory or talk to other ranks. */
#include "memacct.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

void memacct_init(MemAcct *m) { memset(m, 0, sizeof *m); }

void memacct_add(MemAcct *m, enum MemTier tier, enum MemKind kind, int64_t bytes) {
    ASSERT((int)tier >= 0 && tier < MEM_N_TIERS && (int)kind >= 0 && kind < MEM_N_KINDS);
    int64_t c = m->cur[tier][kind] + bytes;
    ASSERTF(c >= 0, "memacct: %s/%s would go negative (%lld - %lld)", memacct_tier_name(tier),
            memacct_kind_name(kind), (long long)m->cur[tier][kind], (long long)-bytes);
    m->cur[tier][kind] = c;
    if (c > m->peak[tier][kind]) m->peak[tier][kind] = c;
    m->tier_cur[tier] += bytes;
    if (m->tier_cur[tier] > m->tier_peak[tier]) m->tier_peak[tier] = m->tier_cur[tier];
}

int64_t memacct_kind_current(const MemAcct *m, enum MemKind kind) {
    int64_t s = 0;
    for (int t = 0; t < MEM_N_TIERS; t++) s += m->cur[t][kind];
    return s;
}

void memacct_reset_peaks(MemAcct *m) {
    for (int t = 0; t < MEM_N_TIERS; t++) {
        for (int k = 0; k < MEM_N_KINDS; k++) m->peak[t][k] = m->cur[t][k];
        m->tier_peak[t] = m->tier_cur[t];
    }
}

const char *memacct_tier_name(enum MemTier t) {
    static const char *names[MEM_N_TIERS] = {"device", "host", "file"};
    return (int)t >= 0 && t < MEM_N_TIERS ? names[t] : "?";
}

const char *memacct_kind_name(enum MemKind k) {
    static const char *names[MEM_N_KINDS] = {"param_fp32", "param_fp16", "param_int4", "grad",
                                             "optim", "act", "comm", "scratch"};
    return (int)k >= 0 && k < MEM_N_KINDS ? names[k] : "?";
}

/* "Key:   123 kB" -> bytes */
static int find_kb(const char *text, const char *key, int64_t *out) {
    size_t kl = strlen(key);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, key, kl) == 0 && p[kl] == ':') {
            char *end;
            long long v = strtoll(p + kl + 1, &end, 10);
            if (end == p + kl + 1) return 0;
            while (*end == ' ' || *end == '\t') end++;
            if (strncmp(end, "kB", 2) != 0) return 0;
            *out = (int64_t)v * 1024;
            return 1;
        }
    }
    return 0;
}

Status memacct_proc_parse(MemProc *out, const char *text, const char *name) {
    memset(out, 0, sizeof *out);
    if (!find_kb(text, "VmRSS", &out->rss))
        return status_errorf("%s: no 'VmRSS: <n> kB' line", name);
    if (!find_kb(text, "VmHWM", &out->hwm))
        return status_errorf("%s: no 'VmHWM: <n> kB' line", name);
    return status_ok();
}

Status memacct_proc(MemProc *out) {
    /* /proc files report size 0, so read by stream rather than file_read_all */
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return status_errorf("/proc/self/status: cannot open (no procfs?)");
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return memacct_proc_parse(out, buf, "/proc/self/status");
}

static void appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
    if (*len + 1 >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (w < 0) return;
    *len += (size_t)w < cap - *len ? (size_t)w : cap - *len - 1;
}

size_t memacct_format(const MemAcct *m, char *buf, size_t cap) {
    size_t len = 0;
    if (cap == 0) return 0;
    buf[0] = 0;
    appendf(buf, cap, &len, "%-8s %-11s %14s %14s\n", "tier", "kind", "current", "peak");
    for (int t = 0; t < MEM_N_TIERS; t++) {
        for (int k = 0; k < MEM_N_KINDS; k++)
            if (m->cur[t][k] || m->peak[t][k])
                appendf(buf, cap, &len, "%-8s %-11s %14lld %14lld\n", memacct_tier_name(t), memacct_kind_name(k),
                        (long long)m->cur[t][k], (long long)m->peak[t][k]);
        if (m->tier_cur[t] || m->tier_peak[t])
            appendf(buf, cap, &len, "%-8s %-11s %14lld %14lld\n", memacct_tier_name(t), "total",
                    (long long)m->tier_cur[t], (long long)m->tier_peak[t]);
    }
    return len;
}
