/* targets.c: the fuzz targets (see targets.h). Inputs that hold several files (the corpus
 * readers) separate them with FUZZ_FILE_SEP; missing parts become empty files. Properties
 * checked beyond "no crash": a config that loads dumps to YAML that reloads to the same bytes;
 * h5log leaves no HDF5 object open after h5log_close. */
#include "targets.h"

#include "checkpoint.h"
#include "config.h"
#include "data.h"
#include "h5log.h"
#include "sweep.h"

#include <errno.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char scratch[256];   /* the scratch folder; "" until fuzz_setup */

static void fuzz_cleanup(void) {
    static const char *const names[] = {"sweep.yaml", "wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens",
                                        "ca01", "ca02", "ca03", "cb01", "ck01", "cr09", "cats.txt", "train.tsv", "dev.tsv",
                                        "dev_matched.tsv", "metrics.h5", NULL};
    if (!scratch[0]) return;
    char p[512];
    for (int i = 0; names[i]; i++) {
        snprintf(p, sizeof p, "%s/%s", scratch, names[i]);
        unlink(p);
    }
    rmdir(scratch);
    scratch[0] = 0;
}

void fuzz_setup(void) {
    if (scratch[0]) return;
    const char *base = "/dev/shm";
    struct stat st;
    if (stat(base, &st) != 0 || !S_ISDIR(st.st_mode) || access(base, W_OK) != 0) {
        base = getenv("TMPDIR");
        if (!base || !base[0]) base = "/tmp";
    }
    snprintf(scratch, sizeof scratch, "%s/dcmoe-fuzz-XXXXXX", base);
    if (!mkdtemp(scratch)) {
        fprintf(stderr, "fuzz: cannot create a scratch folder %s: %s\n", scratch, strerror(errno));
        abort();
    }
    atexit(fuzz_cleanup);
}

static void scratch_path(char *out, size_t cap, const char *name) {
    fuzz_setup();
    snprintf(out, cap, "%s/%s", scratch, name);
}

/* write bytes to scratch/name (replacing it); the harness cannot go on without it */
static void put_file(const char *name, const void *data, size_t n) {
    char p[512];
    scratch_path(p, sizeof p, name);
    FILE *f = fopen(p, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) {
        fprintf(stderr, "fuzz: cannot write %s: %s\n", p, strerror(errno));
        abort();
    }
}

/* part k (0-based) of the input split at FUZZ_FILE_SEP; empty when there are fewer parts */
static void part(const uint8_t *data, size_t n, int k, const uint8_t **p, size_t *len) {
    size_t start = 0;
    for (int i = 0; i < k; i++) {
        const uint8_t *sep = memchr(data + start, FUZZ_FILE_SEP, n - start);
        if (!sep) { *p = data + n; *len = 0; return; }
        start = (size_t)(sep - data) + 1;
    }
    const uint8_t *sep = memchr(data + start, FUZZ_FILE_SEP, n - start);
    *p = data + start;
    *len = sep ? (size_t)(sep - (data + start)) : n - start;
}

/* ---- config loader ---- */

/* a valid config dumps to YAML that loads back to the same Config, byte for byte */
static void check_roundtrip(const Config *c, const char *what) {
    char *y = config_to_yaml(c);
    Config back;
    config_defaults(&back);
    Status s = config_load_string(&back, y, strlen(y), "resolved.yaml");
    if (!STATUS_OK(s)) {
        fprintf(stderr, "fuzz %s: the resolved YAML of an accepted config does not load: %s\n--- resolved\n%s",
                what, s.msg, y);
        abort();
    }
    if (memcmp(&back, c, sizeof back) != 0) {
        fprintf(stderr, "fuzz %s: the resolved YAML loads to another config\n--- resolved\n%s", what, y);
        abort();
    }
    free(y);
}

static int run_config(const uint8_t *data, size_t n) {
    Config c;
    config_defaults(&c);
    Status s = config_load_string(&c, (const char *)data, n, "fuzz.yaml");
    if (!STATUS_OK(s)) return 0;
    (void)config_validate(&c);
    check_roundtrip(&c, "config");
    return 1;
}

/* one --set assignment per line */
static int run_config_set(const uint8_t *data, size_t n) {
    Config c;
    config_defaults(&c);
    char line[2048];
    size_t i = 0;
    int accepted = 1;
    while (i < n) {
        const uint8_t *nl = memchr(data + i, '\n', n - i);
        size_t len = nl ? (size_t)(nl - (data + i)) : n - i;
        size_t k = len < sizeof line - 1 ? len : sizeof line - 1;
        memcpy(line, data + i, k);
        line[k] = 0;   /* an embedded NUL ends the assignment, as in argv */
        accepted &= STATUS_OK(config_set(&c, line));
        i += len + 1;
    }
    (void)config_validate(&c);
    check_roundtrip(&c, "config_set");
    return accepted;
}

/* ---- sweep expander: the file's config (defaults where it does not load), then sweep_plan ---- */

static int run_sweep(const uint8_t *data, size_t n) {
    char path[512];
    scratch_path(path, sizeof path, "sweep.yaml");
    put_file("sweep.yaml", data, n);
    Config base;
    config_defaults(&base);
    Config loaded = base;
    if (STATUS_OK(config_load_string(&loaded, (const char *)data, n, path))) base = loaded;
    Sweep sw;
    Status s = sweep_plan(path, &base, &sw);
    if (STATUS_OK(s)) {
        for (int r = 0; r < sw.n_runs; r++)
            if (!memchr(sw.runs[r].name, 0, sizeof sw.runs[r].name) || sw.runs[r].ranks < 1) {
                fprintf(stderr, "fuzz sweep: run %d has a bad name or rank count\n", r);
                abort();
            }
    }
    sweep_free(&sw);
    sweep_free(&sw);   /* safe twice */
    return STATUS_OK(s);
}

/* ---- corpus readers ---- */

static void data_config(DataConfig *dc, int kind) {
    Config c;
    config_defaults(&c);
    *dc = c.data;
    dc->kind = kind;
    fuzz_setup();
    snprintf(dc->path, sizeof dc->path, "%s", scratch);
    dc->vocab_max = 40;      /* small enough that <unk> is exercised */
    dc->min_freq = 1;
    dc->lowercase = true;
    dc->valid_frac = 0.2;
    dc->test_frac = 0.2;
}

static int load_and_free(const DataConfig *dc, int task, int seq_len) {
    Dataset ds;
    Status s = data_load(dc, task, seq_len, NULL, &ds);
    if (STATUS_OK(s)) data_free(&ds);
    data_free(&ds);   /* safe twice */
    return STATUS_OK(s);
}

/* train, valid and test tokens files */
static int run_wikitext(const uint8_t *data, size_t n) {
    static const char *const files[3] = {"wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"};
    for (int k = 0; k < 3; k++) {
        const uint8_t *p;
        size_t len;
        part(data, n, k, &p, &len);
        put_file(files[k], p, len);
    }
    DataConfig dc;
    data_config(&dc, DATA_WIKITEXT);
    return load_and_free(&dc, TASK_LM, 4);
}

/* six Brown files in four genres and the file list cats.txt (part 7 of the input; the six
 * files when the input has no part 7), read as an LM corpus and as the genre task */
static int run_brown(const uint8_t *data, size_t n) {
    static const char *const files[6] = {"ca01", "ca02", "ca03", "cb01", "ck01", "cr09"};
    for (int k = 0; k < 6; k++) {
        const uint8_t *p;
        size_t len;
        part(data, n, k, &p, &len);
        put_file(files[k], p, len);
    }
    const uint8_t *p;
    size_t len;
    part(data, n, 6, &p, &len);
    static const char cats[] = "ca01 news\nca02 news\nca03 news\ncb01 editorial\nck01 fiction\ncr09 humor\n";
    if (len == 0) put_file("cats.txt", cats, sizeof cats - 1);
    else put_file("cats.txt", p, len);
    DataConfig dc;
    data_config(&dc, DATA_BROWN);
    int accepted = load_and_free(&dc, TASK_LM, 4);
    data_config(&dc, DATA_BROWN_GENRE);
    return load_and_free(&dc, TASK_CLASSIFY, 6) & accepted;
}

/* first line: the GLUE task name; then train.tsv, FUZZ_FILE_SEP, the dev file */
static int run_glue(const uint8_t *data, size_t n) {
    const uint8_t *nl = memchr(data, '\n', n);
    size_t tn = nl ? (size_t)(nl - data) : n;
    DataConfig dc;
    data_config(&dc, DATA_GLUE);
    size_t k = tn < sizeof dc.glue_task - 1 ? tn : sizeof dc.glue_task - 1;
    memcpy(dc.glue_task, data, k);
    dc.glue_task[k] = 0;
    const uint8_t *rest = nl ? nl + 1 : data + n;
    size_t rn = (size_t)(data + n - rest);
    const uint8_t *p;
    size_t len;
    part(rest, rn, 0, &p, &len);
    put_file("train.tsv", p, len);
    part(rest, rn, 1, &p, &len);
    put_file("dev.tsv", p, len);
    put_file("dev_matched.tsv", p, len);
    return load_and_free(&dc, TASK_CLASSIFY, 8);
}

/* ---- checkpoint reader: the image as given, then with every section CRC made right so
 * the fuzzer also reaches what is checked after the checksums ---- */

static int run_checkpoint(const uint8_t *data, size_t n) {
    CheckpointInfo info;
    int accepted = STATUS_OK(checkpoint_verify_image("model.bin", data, n, &info));
    if (n < 16) return accepted;
    uint8_t *img = malloc(n);
    if (!img) abort();
    memcpy(img, data, n);
    uint32_t n_sec;
    memcpy(&n_sec, img + 12, 4);
    size_t off = 16;
    const size_t hdr = 48 + 8 + 4 + 4;   /* name, n_bytes, crc, pad (checkpoint.c SecHeader) */
    for (uint32_t i = 0; i < n_sec && off + hdr <= n; i++) {
        uint64_t len;
        memcpy(&len, img + off + 48, 8);
        off += hdr;
        if (len > n - off) break;
        uint32_t crc = crc32_update(0, img + off, (size_t)len);
        memcpy(img + off - 8, &crc, 4);
        off += (size_t)len;
    }
    Status s = checkpoint_verify_image("model.bin", img, n, &info);
    if (STATUS_OK(s) && (info.step < 0 || info.ranks < 0)) {
        fprintf(stderr, "fuzz checkpoint: verified image reports step %lld ranks %d\n", (long long)info.step,
                info.ranks);
        abort();
    }
    free(img);
    return accepted;
}

/* ---- HDF5 log repair: open for appending (truncating rows after step 1), re-declare two
 * series the trainer writes, append one row and close ---- */

static int run_h5log(const uint8_t *data, size_t n) {
    char path[512];
    scratch_path(path, sizeof path, "metrics.h5");
    put_file("metrics.h5", data, n);
    H5log lg;
    Status s = h5log_open_append(&lg, path, true, 1, 1);
    int accepted = STATUS_OK(s);
    if (accepted) {
        uint64_t dims[1] = {4};
        int loss = h5log_series(&lg, "train/loss", H5LOG_F64, 0, NULL);
        int disp = h5log_series(&lg, "comm/dispatch", H5LOG_I64, 1, dims);
        if (loss >= 0 && disp >= 0 && STATUS_OK(h5log_start(&lg))) {
            double v = 1.5;
            int64_t row[4] = {1, 2, 3, 4};
            (void)h5log_append(&lg, loss, 2, &v);
            (void)h5log_append(&lg, disp, 2, row);
            accepted = STATUS_OK(h5log_step_done(&lg, 2));
        } else {
            accepted = 0;
        }
    }
    h5log_close(&lg);
    h5log_close(&lg);   /* safe twice */
    ssize_t open_ids = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (open_ids != 0) {   /* every file, group, dataset, space and type h5log opened is closed */
        fprintf(stderr, "fuzz h5log: %zd HDF5 objects still open after h5log_close\n", open_ids);
        abort();
    }
    return accepted;
}

const FuzzTarget fuzz_targets[] = {
    {"config", run_config, "config_load_string"},
    {"config_set", run_config_set, "config_set"},
    {"sweep", run_sweep, "sweep_plan"},
    {"wikitext", run_wikitext, "data_load (wikitext)"},
    {"brown", run_brown, "data_load (brown, brown_genre)"},
    {"glue", run_glue, "data_load (glue)"},
    {"checkpoint", run_checkpoint, "checkpoint_verify_image"},
    {"h5log", run_h5log, "h5log_open_append"},
};
const int fuzz_n_targets = (int)(sizeof fuzz_targets / sizeof fuzz_targets[0]);

const FuzzTarget *fuzz_target_find(const char *name) {
    for (int i = 0; i < fuzz_n_targets; i++)
        if (strcmp(fuzz_targets[i].name, name) == 0) return &fuzz_targets[i];
    return NULL;
}
