/* test_sweep: expansion of the sweep: block (grid order, zip pairing, ranks, names, stable
 * ids) and its errors (unequal zip lists, unknown keys, out-of-range values, rank counts that
 * do not divide the batch, duplicate run names), each naming file:line:column or the run;
 * chained blocks: order, names, "@block" references resolved to the matching trained run's
 * metrics.h5 (by shared values and keys both blocks sweep), needs and stages, and their
 * errors (unknown or later block, ambiguous match, no trace recorded, rank mismatch). */
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

    /* ---- chained blocks: train small, then simulate ---- */
    const char *head = "run:\n  name: exp\n  out_dir: runs\nmoe:\n  kind: clustered\n  n_groups: 2\n  top_groups: 1\n"
                       "sim:\n  nodes: 2\n  gpus_per_node: 1\n";
    char text[4096];
    snprintf(text, sizeof text, "%s%s", head,
             "sweep:\n"
             "  zip:\n"
             "    moe.n_groups: [2, 4]\n"
             "    name: [g2, g4]\n"
             "  blocks:\n"
             "    train:\n"
             "      set: {ranks: 2, log.trace_interval: 2}\n"
             "    sim:\n"
             "      set:\n"
             "        run.mode: simulate\n"
             "        sim.routing: trace\n"
             "        sim.trace: \"@train\"\n"
             "      zip:\n"
             "        sim.hardware: [h800, cpu]\n"
             "        name: [h800, cpu]\n");
    st = plan(text, &sw);
    ok(STATUS_OK(st) && sw.n_runs == 6, "2 shared points x (1 train + 2 sim) = 6 runs (%s)", st.msg);
    if (STATUS_OK(st) && sw.n_runs == 6) {
        ok(!strcmp(sw.runs[0].name, "exp-train-g2") && !strcmp(sw.runs[1].name, "exp-train-g4") &&
           sw.runs[2].cfg.run.mode == RUN_MODE_SIMULATE && sw.runs[0].cfg.run.mode == RUN_MODE_TRAIN,
           "block order: the trained runs first (%s, %s, then %s)", sw.runs[0].name, sw.runs[1].name, sw.runs[2].name);
        char cwd[1024], want[1200];
        ok(getcwd(cwd, sizeof cwd) != NULL, "cwd");
        int all = 1;
        for (int i = 2; i < 6; i++) {
            int g = sw.runs[i].cfg.moe.n_groups == 2 ? 0 : 1;
            snprintf(want, sizeof want, "%s/runs/exp-train-g%d/metrics.h5", cwd, g ? 4 : 2);
            all &= sw.runs[i].n_needs == 1 && sw.runs[i].needs[0] == g && !strcmp(sw.runs[i].cfg.sim.trace, want) &&
                    sweep_stage(&sw, i) == 1;
        }
        ok(all && !strcmp(sw.runs[5].name, "exp-sim-g4-cpu"), "each simulated run reads the trained run with its n_groups (%s: %s) and is stage 1", sw.runs[5].name, sw.runs[5].cfg.sim.trace);
        ok(sw.runs[0].n_needs == 0 && sweep_stage(&sw, 0) == 0 && !strncmp(sw.runs[2].sets[0], "block=sim", 9),
           "trained runs need nothing; settings name the block (%s)", sw.runs[2].sets[0]);
    }
    sweep_free(&sw);
    /* a key swept in both blocks pairs by its value; a reference set in the config resolves per run
     * (and is cleared in the trained runs, which do not read it) */
    snprintf(text, sizeof text, "%s  trace: \"@train\"\n%s", head,
             "sweep:\n  blocks:\n    train:\n      set: {ranks: 2, log.trace_interval: 2}\n      grid: {run.seed: [5, 6]}\n"
             "    sim:\n      set: {run.mode: simulate, sim.routing: trace}\n      grid: {run.seed: [6, 5]}\n");
    st = plan(text, &sw);
    ok(STATUS_OK(st) && sw.n_runs == 4 && sw.runs[2].needs[0] == 1 && sw.runs[3].needs[0] == 0 && !sw.runs[0].cfg.sim.trace[0],
       "a key both blocks sweep pairs by value (seed 6 -> run %d, seed 5 -> run %d); trained runs get no sim.trace (%s)",
       sw.n_runs == 4 ? sw.runs[2].needs[0] : -1, sw.n_runs == 4 ? sw.runs[3].needs[0] : -1, st.msg);
    sweep_free(&sw);

    struct { const char *sweep, *want1, *want2, *what; } bad[] = {
        {"sweep:\n  blocks:\n    train:\n      grid: {run.seed: [5, 6]}\n      set: {log.trace_interval: 2, ranks: 2}\n"
         "    sim:\n      set: {run.mode: simulate, sim.trace: \"@train\"}\n",
         "2 runs of block 'train' match", ":17:", "ambiguous match"},
        {"sweep:\n  blocks:\n    train:\n      set: {ranks: 2, log.trace_interval: 2}\n"
         "    sim:\n      set: {run.mode: simulate, sim.trace: \"@tran\"}\n",
         "no block named 'tran' (allowed: @train, @sim)", ":16:", "unknown block"},
        {"sweep:\n  blocks:\n    sim:\n      set: {run.mode: simulate, sim.trace: \"@train\"}\n"
         "    train:\n      set: {ranks: 2, log.trace_interval: 2}\n",
         "does not come before block 'sim'", ":14:", "a later block"},
        {"sweep:\n  blocks:\n    train:\n      set: {ranks: 2}\n"
         "    sim:\n      set: {run.mode: simulate, sim.trace: \"@train\"}\n",
         "log.trace_interval is 0", "exp-train", "no trace recorded"},
        {"sweep:\n  blocks:\n    train:\n      set: {ranks: 2, log.trace_interval: 2}\n"
         "    sim:\n      set: {run.mode: simulate, sim.trace: \"@train\", sim.nodes: 3, sim.gpus_per_node: 1}\n",
         "trained on 2 rank(s)", "= 3 GPUs", "ranks not dividing the GPUs"},
        {"sweep:\n  blocks:\n    a:\n      set: {run.mode: simulate}\n"
         "    sim:\n      set: {run.mode: simulate, sim.aggregate: \"@a\"}\n",
         "are simulations", "sim.aggregate=@a", "a simulate block"},
        {"sweep:\n  grid:\n    sim.trace: [\"@train\"]\n    run.mode: [simulate]\n",
         "needs sweep.blocks", ":13:", "a reference without blocks"},
        {"sweep:\n  blocks:\n    train:\n      set: {run.seed: [1, 2]}\n", "expected one value", ":14:", "a list in set"},
        {"sweep:\n  blocks:\n    train:\n      sets: {run.seed: 1}\n", "allowed: set, grid, zip", ":14:", "an unknown block key"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(text, sizeof text, "%s%s", head, bad[i].sweep);
        st = plan(text, &sw);
        ok(!STATUS_OK(st) && contains(st.msg, bad[i].want1) && contains(st.msg, bad[i].want2), "%s: %s", bad[i].what, st.msg);
        sweep_free(&sw);
    }
    unlink(write_tmp(""));
    return harness_done();
}
