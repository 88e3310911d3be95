/* main.c: the dcmoe command line: train, eval, config, sweep, simulate, bench calibrate, version. Every subcommand runs
 * under MPI (a plain `dcmoe ...` is a one-rank job); fatal errors end every rank. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calib.h"
#include "comm.h"
#include "config.h"
#include "config_build.h"
#include "launcher.h"
#include "sim.h"
#include "sweep.h"
#include "evaluate.h"
#include "train.h"
#include "util.h"

static void usage_main(void) {
    printf("dcmoe %s: a Mixture-of-Experts trainer with dynamic expert clustering\n\n"
           "usage: dcmoe <command> [options]   (run under mpirun -n P for data parallelism)\n\n"
           "commands:\n"
           "  train CONFIG.yaml   train a model (see `dcmoe train --help`)\n"
           "  eval CONFIG.yaml    evaluate a run's checkpoint (see `dcmoe eval --help`)\n"
           "  config [CONFIG]     print the resolved config, or --reference for every key\n"
           "  sweep plan FILE     expand and validate the file's sweep: block (runs, ids, settings)\n"
           "  sweep run FILE      run a sweep: --launcher local|slurm (see `dcmoe sweep run --help`)\n"
           "  sweep status FILE   state of every planned run: new, partial, resumable, done\n"
           "  simulate CONFIG     predict step time, traffic and memory at a scale you cannot run (see simulate --help)\n"
           "  bench calibrate     measure this machine into a hardware file for simulate (see bench calibrate --help)\n"
           "  version             print version and build facts\n", DCMOE_VERSION);
}

static void usage_train(void) {
    printf("usage: dcmoe train CONFIG.yaml [--set key.path=value]... [--resume | --resume-from DIR] [--print-config] [--quiet]\n\n"
           "  --set k=v        override one key (repeatable), e.g. --set moe.top_k=1\n"
           "  --resume         continue the run (out_dir/name) from its newest checkpoint that verifies\n"
           "                   (damaged newer ones are reported and skipped); the continuation is bitwise\n"
           "                   identical to an uninterrupted run. A run with no checkpoint yet restarts\n"
           "                   from step 0 (its old log is kept); a finished run (DONE) is left as it is\n"
           "  --resume-from DIR  continue from this checkpoint folder (e.g. an older ckpt/step_*)\n"
           "  --print-config   print the resolved config and exit\n"
           "  --quiet          no per-step progress lines\n"
           "  --stop-at N      checkpoint and stop after step N (continue later with --resume)\n"
           "Outputs in run.out_dir/run.name: metrics.h5, vocab.txt, ckpt/step_*/, DONE (after the last step)\n");
}

static void usage_eval(void) {
    printf("usage: dcmoe eval CONFIG.yaml [--set k=v]... [--checkpoint DIR] [--split valid|test]\n"
           "                  [--precision fp32|stored]\n\n"
           "Evaluates the newest complete checkpoint of the run (or DIR) and prints loss and\n"
           "perplexity (language modelling) or the task metric (classification).\n"
           "  --precision stored  clustered experts computed from the checkpoint's FP16/INT4 section\n"
           "                      (experts.q; the default when precision.mode is storage or qat)\n"
           "  --precision fp32    from the FP32 masters (the default in fp32 mode)\n"
           "With --set offload.enabled=true the stored groups live under a residency manager\n"
           "(offload.max_resident_groups, offload.tier, offload.dir, offload.prefetch); the\n"
           "statistics go to <checkpoint>/eval_<split>_<precision>.json.\n");
}

static void usage_simulate(void) {
    printf("usage: dcmoe simulate CONFIG.yaml [--set k=v]... [--quiet]\n"
           "       dcmoe simulate --validate published\n\n"
           "Simulates training steps of the experiment's model (model.*, moe.*, parallel.ep_size, parallel.exchange)\n"
           "on the cluster of its sim: section (sim.nodes x sim.gpus_per_node GPUs, sim.hardware preset, dtypes,\n"
           "overlap, routing generator): the trainer's router picks the experts, the exchange is counted with the\n"
           "planner's rules and costed per link class; with sim.hardware_file: FILE (written by `dcmoe bench calibrate`)\n"
           "every GEMM and op of the trainer and its collectives are costed from that file's measured curves.\n"
           "Writes run.out_dir/run.name/metrics.h5 (the trainer's perf/*\n"
           "and comm/* series plus sim/*) and DONE.\n"
           "  --validate published  replay DeepEP's published V1 numbers with DeepEP's byte accounting, fit the\n"
           "                        link model on the calibration rows and print predicted vs published (exit 1\n"
           "                        when a predicted row is out of tolerance)\n");
}

static void usage_bench(void) {
    printf("usage: [mpirun -n P] dcmoe bench calibrate [CONFIG.yaml] [--set k=v]... [--out FILE] [--quick] [--model-only]\n\n"
           "Measures this machine into a hardware file (YAML) that `dcmoe simulate` reads with\n"
           "sim.hardware_file: FILE: sgemm GFLOP/s over a grid of shapes (plus CONFIG's model shapes at P ranks),\n"
           "copy and triad memory bandwidth, the trainer's non-GEMM ops per element (LayerNorm, attention,\n"
           "activation, cross-entropy, embedding, row gathers, AdamW, the router), and alltoallv and allreduce\n"
           "over sizes 64 B .. 16 MiB (two per octave) between the P ranks; every point is a median of 5 repeats with its spread.\n"
           "  --out FILE   the hardware file (default hardware.yaml)\n"
           "  --quick      a tiny grid (seconds; for tests)\n"
           "  --model-only only CONFIG's GEMM shapes and one collective size per octave (a short calibration\n"
           "               taken right before the runs it is to predict)\n"
           "Run.threads of CONFIG (default 1) sets the BLAS threads per rank.\n");
}

static void usage_config(void) {
    printf("usage: dcmoe config [CONFIG.yaml] [--set k=v]...   print the resolved config\n"
           "       dcmoe config --reference                      Markdown table of every key\n");
}

/* an error every rank reached together (config, data, checkpoint and training errors are
 * agreed between ranks): rank 0 prints the one-line message, every rank exits cleanly */
static int fail(Comm *comm, Status st) {
    if (comm->rank == 0) {
        fprintf(stderr, "dcmoe: error: %s\n", st.msg);
        fflush(stderr);
    }
    MPI_Finalize();
    return 2;
}

typedef struct Args {
    const char *config;
    const char *sets[64];
    int n_sets;
    int resume, print_config, quiet, reference, help;
    const char *checkpoint, *split, *precision, *resume_from, *validate, *out;
    int quick, model_only;
    long stop_at;
} Args;

static Status parse_args(int argc, char **argv, int first, Args *a) {
    memset(a, 0, sizeof *a);
    a->split = "valid";
    for (int i = first; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) a->help = 1;
        else if (!strcmp(s, "--resume")) a->resume = 1;
        else if (!strcmp(s, "--print-config")) a->print_config = 1;
        else if (!strcmp(s, "--quiet")) a->quiet = 1;
        else if (!strcmp(s, "--reference")) a->reference = 1;
        else if (!strcmp(s, "--quick")) a->quick = 1;
        else if (!strcmp(s, "--model-only")) a->model_only = 1;
        else if (!strcmp(s, "--stop-at")) {
            if (i + 1 >= argc) return status_errorf("%s needs a value", s);
            char *end;
            a->stop_at = strtol(argv[++i], &end, 10);
            if (*end || a->stop_at <= 0) return status_errorf("--stop-at %s: expected a positive step count", argv[i]);
        }
        else if (!strcmp(s, "--set") || !strcmp(s, "--checkpoint") || !strcmp(s, "--split") ||
                 !strcmp(s, "--precision") || !strcmp(s, "--resume-from") || !strcmp(s, "--validate") || !strcmp(s, "--out")) {
            if (i + 1 >= argc) return status_errorf("%s needs a value", s);
            const char *v = argv[++i];
            if (!strcmp(s, "--set")) {
                if (a->n_sets >= 64) return status_errorf("too many --set options (max 64)");
                a->sets[a->n_sets++] = v;
            } else if (!strcmp(s, "--checkpoint")) a->checkpoint = v;
            else if (!strcmp(s, "--resume-from")) a->resume_from = v;
            else if (!strcmp(s, "--precision")) a->precision = v;
            else if (!strcmp(s, "--validate")) a->validate = v;
            else if (!strcmp(s, "--out")) a->out = v;
            else a->split = v;
        } else if (!strncmp(s, "--set=", 6)) {
            if (a->n_sets >= 64) return status_errorf("too many --set options (max 64)");
            a->sets[a->n_sets++] = s + 6;
        } else if (s[0] == '-') return status_errorf("unknown option %s (see --help)", s);
        else if (!a->config) a->config = s;
        else return status_errorf("unexpected argument %s (one config file only)", s);
    }
    return status_ok();
}

static Status load_config(const Args *a, Config *cfg) {
    config_defaults(cfg);
    if (a->config) TRY(config_load_file(cfg, a->config));
    for (int i = 0; i < a->n_sets; i++) TRY(config_set(cfg, a->sets[i]));
    return config_validate(cfg);
}

int main(int argc, char **argv) {
    /* `sweep run` starts mpirun itself, so it must not be an MPI process */
    if (argc >= 3 && !strcmp(argv[1], "sweep") && (!strcmp(argv[2], "run") || !strcmp(argv[2], "status")))
        return launcher_main(argc - 2, argv + 2);
    /* before anything slow: a SIGTERM during start-up must not be lost */
    train_install_signal_handlers();
    MPI_Init(&argc, &argv);
    Comm comm;
    Status st = comm_mpi_init(&comm);
    if (!STATUS_OK(st)) { fprintf(stderr, "dcmoe: error: %s\n", st.msg); MPI_Finalize(); return 2; }
    train_install_signal_handlers();   /* again: MPI_Init may have installed its own */
    if (comm.rank != 0) { /* only rank 0 talks to people */ }
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        if (comm.rank == 0) usage_main();
        MPI_Finalize();
        return argc < 2 ? 1 : 0;
    }
    const char *cmd = argv[1];
    Args a;
    int rc = 0;
    if (!strcmp(cmd, "version")) {
        if (comm.rank == 0) {
            printf("dcmoe %s\ngit revision: %s\ncuda backend: %s\n", DCMOE_VERSION, DCMOE_GIT_REVISION,
                   HAVE_CUDA ? "built" : "not built");
        }
        MPI_Finalize();
        return 0;
    }
    int is_sweep = !strcmp(cmd, "sweep"), is_bench = !strcmp(cmd, "bench");
    if (is_bench && (argc < 3 || strcmp(argv[2], "calibrate") != 0)) {
        if (comm.rank == 0) usage_bench();
        MPI_Finalize();
        return argc >= 3 && (!strcmp(argv[2], "--help") || !strcmp(argv[2], "-h")) ? 0 : 2;
    }
    if (is_sweep && (argc < 3 || strcmp(argv[2], "plan") != 0)) {
        if (comm.rank == 0) printf("usage: dcmoe sweep plan FILE.yaml [--set k=v]...\n"
                                   "       dcmoe sweep run FILE.yaml --launcher local|slurm [...] (see sweep run --help)\n\n"
                                   "Expands the file's sweep: block (grid: Cartesian product, last key fastest;\n"
                                   "zip: paired lists; keys: any config key, `ranks`, `name`; blocks: named stages,\n"
                                   "each with set/grid/zip, where a simulate run's sim.trace or sim.aggregate \"@<block>\"\n"
                                   "reads the log of that block's run with the same shared values) into numbered runs\n"
                                   "with stable ids, validates every run's config, and prints the plan.\n");
        MPI_Finalize();
        return argc >= 3 && (!strcmp(argv[2], "--help") || !strcmp(argv[2], "-h")) ? 0 : 2;
    }
    st = parse_args(argc, argv, is_sweep || is_bench ? 3 : 2, &a);
    if (!STATUS_OK(st)) return fail(&comm, st);
    Config cfg;
    if (!strcmp(cmd, "train")) {
        if (a.help) { if (comm.rank == 0) usage_train(); MPI_Finalize(); return 0; }
        if (!a.config) return fail(&comm, status_errorf("train: missing CONFIG.yaml (see dcmoe train --help)"));
        st = load_config(&a, &cfg);
        if (!STATUS_OK(st)) return fail(&comm, st);
        if (a.print_config) {
            if (comm.rank == 0) { char *y = config_to_yaml(&cfg); fputs(y, stdout); free(y); }
            MPI_Finalize();
            return 0;
        }
        if (cfg.run.mode == RUN_MODE_SIMULATE)
            return fail(&comm, status_errorf("%s: run.mode is simulate: run it with `dcmoe simulate %s` (or set run.mode: train)",
                                             a.config, a.config));
        TrainOptions opt = {.resume = a.resume != 0, .quiet = a.quiet != 0, .stop_at = a.stop_at, .config_path = a.config,
                            .resume_from = a.resume_from};
        TrainResult res;
        st = train_run(&cfg, &opt, &comm, &res);
        if (!STATUS_OK(st)) return fail(&comm, st);
    } else if (!strcmp(cmd, "eval")) {
        if (a.help) { if (comm.rank == 0) usage_eval(); MPI_Finalize(); return 0; }
        if (!a.config) return fail(&comm, status_errorf("eval: missing CONFIG.yaml (see dcmoe eval --help)"));
        st = load_config(&a, &cfg);
        if (!STATUS_OK(st)) return fail(&comm, st);
        st = eval_run(&cfg, a.checkpoint, a.split, a.precision, &comm);
        if (!STATUS_OK(st)) return fail(&comm, st);
    } else if (is_sweep) {
        if (!a.config) return fail(&comm, status_errorf("sweep plan: missing FILE.yaml"));
        st = load_config(&a, &cfg);
        if (!STATUS_OK(st)) return fail(&comm, st);
        Sweep sw;
        st = sweep_plan(a.config, &cfg, &sw);
        if (!STATUS_OK(st)) { sweep_free(&sw); return fail(&comm, st); }
        if (comm.rank == 0) {
            printf("%d run(s) from %s\n", sw.n_runs, a.config);
            for (int i = 0; i < sw.n_runs; i++) {
                const SweepRun *r = &sw.runs[i];
                printf("%4d  %s  %-28s ranks=%d ", r->index, r->id, r->name, r->ranks);
                for (int j = 0; j < r->n_sets; j++) printf(" %s", r->sets[j]);
                for (int j = 0; j < r->n_needs; j++) printf("%s%d", j ? "," : "  (after run ", r->needs[j]);
                printf("%s\n", r->n_needs ? ": reads its log)" : "");
            }
        }
        sweep_free(&sw);
    } else if (!strcmp(cmd, "simulate")) {
        /* one process models the whole cluster: rank 0 works, other ranks (if any) wait */
        if (a.help) { if (comm.rank == 0) usage_simulate(); MPI_Finalize(); return 0; }
        if (a.validate) {
            if (strcmp(a.validate, "published") != 0)
                return fail(&comm, status_errorf("simulate --validate %s: the only reference set is 'published'", a.validate));
            if (comm.rank == 0) rc = sim_validate_published(stdout) ? 1 : 0;
        } else {
            if (!a.config) return fail(&comm, status_errorf("simulate: missing CONFIG.yaml (see dcmoe simulate --help)"));
            st = load_config(&a, &cfg);
            if (!STATUS_OK(st)) return fail(&comm, st);
            if (comm.rank == 0) st = sim_run(&cfg, a.quiet);
            if (!STATUS_OK(st)) return fail(&comm, st);
        }
    } else if (is_bench) {
        if (a.help) { if (comm.rank == 0) usage_bench(); MPI_Finalize(); return 0; }
        int have_cfg = a.config != NULL;
        st = load_config(&a, &cfg);
        if (!STATUS_OK(st)) return fail(&comm, st);
        if (a.model_only && !have_cfg) return fail(&comm, status_errorf("bench calibrate --model-only needs CONFIG.yaml (its GEMM shapes)"));
        CalibOptions co = {.out = a.out ? a.out : "hardware.yaml", .cfg = have_cfg ? &cfg : NULL, .quick = a.quick,
                           .model_only = a.model_only,
                           .threads = cfg.run.threads > 0 ? cfg.run.threads : 1};
        st = calib_run(&comm, &co);
        if (!STATUS_OK(st)) return fail(&comm, st);
    } else if (!strcmp(cmd, "config")) {
        if (a.help) { if (comm.rank == 0) usage_config(); MPI_Finalize(); return 0; }
        if (a.reference) {
            if (comm.rank == 0) { char *md = config_reference_markdown(); fputs(md, stdout); free(md); }
        } else {
            st = load_config(&a, &cfg);
            if (!STATUS_OK(st)) return fail(&comm, st);
            if (comm.rank == 0) { char *y = config_to_yaml(&cfg); fputs(y, stdout); free(y); }
        }
    } else {
        if (comm.rank == 0) fprintf(stderr, "dcmoe: error: unknown command '%s' (commands: train, eval, config, sweep, simulate, bench, version)\n", cmd);
        rc = 2;
    }
    MPI_Finalize();
    return rc;
}
