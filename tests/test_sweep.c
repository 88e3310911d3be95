/* test_sweep: expansion of the sweep: block (grid order, zip pairing, ranks, names, stable
 * ids) and its errors (unequal zip lists, unknown keys, out-of-range values, rank counts that
 * do not divide the batch, duplicate run names), each naming file:line:column or the run. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "harness.h"
#include "sweep.h"

static const char *write_tmp(const char *text) {
    static char path[64];
    snprintf(path, sizeof path, "/tmp/dcmoe-sweep-%d.yaml", (int)getpid());
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

static Status plan(const char *text, Sweep *sw) {
    const char *path = write_tmp(text);
    Config c;
    config_defaults(&c);
    Status st = config_load_file(&c, path);
    if (!STATUS_OK(st)) return st;
    return sweep_plan(path, &c, sw);
}

static int contains(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

int main(void) {
    Sweep sw;
    const char *good =
        "run:\n  name: exp\nmoe:\n  kind: clustered\n"
        "sweep:\n"
        "  grid:\n"
        "    moe.n_groups: [4, 8]\n"
        "    clustering.interval: [100, 400]\n"
        "  zip:\n"
        "    ranks: [1, 2]\n"
        "    name: [a, b]\n";
    Status st = plan(good, &sw);
    ok(STATUS_OK(st), "grid x zip expands (%s)", st.msg);
    ok(sw.n_runs == 8, "2 x 2 grid x 2 zip = 8 runs (%d)", sw.n_runs);
    if (sw.n_runs == 8) {
        ok(sw.runs[0].cfg.moe.n_groups == 4 && sw.runs[0].cfg.clustering.interval == 100 && sw.runs[0].ranks == 1,
           "run 0: first values everywhere");
        ok(sw.runs[1].cfg.clustering.interval == 400 && sw.runs[1].cfg.moe.n_groups == 4, "last grid key varies fastest");
        ok(sw.runs[2].cfg.moe.n_groups == 8, "then the first grid key");
        ok(sw.runs[4].ranks == 2 && !strncmp(sw.runs[4].name, "exp-b-r004-", 11), "the zip tuple is slowest (run 4: ranks 2, name %s)", sw.runs[4].name);
        ok(!strcmp(sw.runs[4].cfg.run.name, sw.runs[4].name), "run.name set to the run name (%s)", sw.runs[4].name);
        char ids[8][32];
        for (int i = 0; i < 8; i++) memcpy(ids[i], sw.runs[i].id, 32);
        sweep_free(&sw);
        plan(good, &sw);
        int same = 1;
        for (int i = 0; i < 8; i++) same &= !strcmp(ids[i], sw.runs[i].id);
        ok(same, "ids are stable between expansions (%s ...)", ids[0]);
    }
    sweep_free(&sw);
    st = plan("run:\n  name: x\n", &sw);
    ok(STATUS_OK(st) && sw.n_runs == 1, "no sweep block: one run");
    sweep_free(&sw);

    st = plan("sweep:\n  zip:\n    moe.top_k: [1, 2]\n    run.seed: [1, 2, 3]\n", &sw);
    ok(!STATUS_OK(st) && contains(st.msg, ":4:5:") && contains(st.msg, "equal lengths"), "unequal zip lists: %s", st.msg);
    sweep_free(&sw);
    st = plan("sweep:\n  grid:\n    moe.n_expert: [4, 8]\n", &sw);
    ok(!STATUS_OK(st) && contains(st.msg, ":3:5:") && contains(st.msg, "moe.n_expert") && contains(st.msg, "n_experts"),
       "unknown key, with a suggestion: %s", st.msg);
    sweep_free(&sw);
    st = plan("sweep:\n  grid:\n    moe.top_k: [2, 0]\n", &sw);
    ok(!STATUS_OK(st) && contains(st.msg, "run 1") && contains(st.msg, "out of range"), "out-of-range value names the run: %s", st.msg);
    sweep_free(&sw);
    st = plan("train:\n  batch_size: 6\nsweep:\n  grid:\n    ranks: [2, 4]\n", &sw);
    ok(!STATUS_OK(st) && contains(st.msg, "not divisible by ranks=4"), "ranks must divide the batch: %s", st.msg);
    sweep_free(&sw);
    st = plan("sweep:\n  zip:\n    name: [a, b]\n    run.seed: [1, 2]\n", &sw);
    ok(STATUS_OK(st) && !strcmp(sw.runs[0].name, "run-a") && !strcmp(sw.runs[1].name, "run-b"),
       "unique names are used as they are (%s, %s)", sw.runs[0].name, sw.n_runs > 1 ? sw.runs[1].name : "");
    sweep_free(&sw);
    st = plan("sweep:\n  zip:\n    name: [a, a]\n    run.seed: [1, 2]\n", &sw);
    ok(STATUS_OK(st) && strcmp(sw.runs[0].name, sw.runs[1].name) != 0 && contains(sw.runs[0].name, sw.runs[0].id),
       "colliding names get the run id (%s)", sw.runs[0].name);
    sweep_free(&sw);
    st = plan("sweep:\n  fan:\n    run.seed: [1]\n", &sw);
    ok(!STATUS_OK(st) && contains(st.msg, "sweep.fan") && contains(st.msg, "grid, zip"), "unknown sweep kind: %s", st.msg);
    sweep_free(&sw);
    st = plan("sweep:\n  grid:\n    moe.n_groups: [3, 4]\nmoe:\n  kind: clustered\n", &sw);
    ok(!STATUS_OK(st) && contains(st.msg, "run 0") && contains(st.msg, "n_groups=3"), "cross-key check per run: %s", st.msg);
    sweep_free(&sw);
    unlink(write_tmp(""));
    return harness_done();
}
