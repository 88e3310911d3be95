/* replay.c: run every fuzz target over every file of its committed seed corpus
 * (corpus/<target>/) and of its crash regressions (regressions/<target>/); this is the unit
 * test that keeps fixed crashes fixed, built by any compiler and without libFuzzer.
 *   fuzz_replay DIR                  every target (DIR = tests/fuzz)
 *   fuzz_replay DIR TARGET [FILE...] one target: its folders, or just the files given
 *   fuzz_replay --make-h5-seeds OUT  write the h5log seed files (a closed log, logs left by
 *                                    writers killed after a flush, with and without SWMR)
 * A crash aborts the process; the "# TARGET FILE" line printed before each run names the
 * input. */
#include "targets.h"
#include "../harness.h"

#include "h5log.h"
#include "util.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int name_cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void replay_file(const FuzzTarget *t, const char *path) {
    void *data = NULL;
    size_t n = 0;
    Status s = file_read_all(path, &data, &n);
    if (!STATUS_OK(s)) { ok(0, "%s: %s", t->name, s.msg); return; }
    printf("# %s %s\n", t->name, path);
    fflush(stdout);
    int accepted = t->run(data, n);
    free(data);
    ok(1, "%s: %s (%zu bytes) through %s: %s", t->name, path, n, t->what, accepted ? "accepted" : "rejected");
}

/* every regular file in dir (sorted); -1 when the folder is missing */
static int replay_dir(const FuzzTarget *t, const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    char **names = NULL;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        names = realloc(names, sizeof *names * (size_t)(n + 1));
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, name_cmp);
    for (int i = 0; i < n; i++) {
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        replay_file(t, path);
        free(names[i]);
    }
    free(names);
    return n;
}

static void replay_target(const FuzzTarget *t, const char *root) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/corpus/%s", root, t->name);
    int n_seeds = replay_dir(t, dir);
    ok(n_seeds > 0, "%s: %d seed files in %s", t->name, n_seeds, dir);
    snprintf(dir, sizeof dir, "%s/regressions/%s", root, t->name);
    int n_reg = replay_dir(t, dir);
    printf("# %s: %d regression files\n", t->name, n_reg < 0 ? 0 : n_reg);
}

/* ---- h5log seeds ---- */

static void h5_write(const char *path, bool swmr, int n_steps, bool close_it) {
    H5log lg;
    Status s = h5log_create(&lg, path, swmr, 1);
    uint64_t dims[1] = {4};
    int loss = -1, disp = -1;
    if (STATUS_OK(s)) s = h5log_attr_str(&lg, "/", "git_revision", "seed");
    if (STATUS_OK(s)) {
        loss = h5log_series(&lg, "train/loss", H5LOG_F64, 0, NULL);
        disp = h5log_series(&lg, "comm/dispatch", H5LOG_I64, 1, dims);
        s = h5log_start(&lg);
    }
    for (int step = 0; step < n_steps && STATUS_OK(s); step++) {
        double v = 3.0 - 0.1 * step;
        int64_t row[4] = {step, 1, 2, 3};
        s = h5log_append(&lg, loss, step, &v);
        if (STATUS_OK(s)) s = h5log_append(&lg, disp, step, row);
        if (STATUS_OK(s)) s = h5log_step_done(&lg, step);
    }
    if (!STATUS_OK(s)) { fprintf(stderr, "%s\n", s.msg); exit(1); }
    if (close_it) h5log_close(&lg);
    else _exit(0);   /* a killed writer: no close, nothing flushed beyond the last step */
}

static int make_h5_seeds(const char *out) {
    struct { const char *name; bool swmr; int steps; bool close_it; } seeds[] = {
        {"closed.h5", true, 3, true},
        {"closed_noswmr.h5", false, 3, true},
        {"killed_swmr.h5", true, 3, false},
        {"killed_noswmr.h5", false, 3, false},
        {"empty_series.h5", true, 0, true},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", out, seeds[i].name);
        pid_t pid = fork();
        if (pid == 0) {
            h5_write(path, seeds[i].swmr, seeds[i].steps, seeds[i].close_it);
            _exit(0);
        }
        int st = 0;
        if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "cannot write %s\n", path);
            return 1;
        }
        printf("wrote %s\n", path);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--make-h5-seeds") == 0) return make_h5_seeds(argv[2]);
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR [TARGET [FILE...]] | --make-h5-seeds OUTDIR\n", argv[0]);
        return 2;
    }
    fuzz_setup();
    if (argc == 2) {
        for (int i = 0; i < fuzz_n_targets; i++) replay_target(&fuzz_targets[i], argv[1]);
        return harness_done();
    }
    const FuzzTarget *t = fuzz_target_find(argv[2]);
    if (!t) {
        fprintf(stderr, "unknown target '%s' (targets:", argv[2]);
        for (int i = 0; i < fuzz_n_targets; i++) fprintf(stderr, " %s", fuzz_targets[i].name);
        fprintf(stderr, ")\n");
        return 2;
    }
    if (argc == 3) replay_target(t, argv[1]);
    for (int i = 3; i < argc; i++) replay_file(t, argv[i]);
    return harness_done();
}
