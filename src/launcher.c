/* launcher.c: the sweep launchers (local sequential mpirun; Slurm job array + report job).
 * The sweep folder is the contract between the launchers, the slurm/ scripts and analysis/report:
 *   plan.tsv            index, id, name, ranks, config, run_dir, settings, needs (one run per
 *                       line, tab-separated, absolute paths, a header line first; needs = the
 *                       comma-separated indices of the runs whose logs the run reads, in a chained
 *                       sweep: sweep.blocks with sim.trace / sim.aggregate "@block")
 *   configs/<id>.yaml   the resolved config of each run (what `dcmoe train` reads)
 *   logs/               console output of every run (local: <id>.out; Slurm: slurm-<job>_<task>.out)
 *   slurm-jobs.txt      the sbatch commands and job ids (slurm)
 *   packs.tsv           with --pack K (slurm): task, run indices (comma-separated) of each array
 *                       task; up to K consecutive unfinished simulate runs share a task
 * A run folder is complete when it holds DONE (written by train after the last step).
 * Chained sweeps: the local launcher runs the runs in plan order (blocks in file order, so the
 * trained runs come first) and does not start a run whose needs are not DONE; the Slurm
 * launcher submits one array per stage (stage = 1 + the largest stage of a run's needs), each
 * later array with --dependency=afterok on the earlier ones, and the report after all of them.
 * Does not: run under MPI, parse the sweep block (sweep.c) or decide anything inside a Slurm job
 * (slurm/dcmoe-job.sh applies the same DONE / checkpoint rule there). */
#include "launcher.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "checkpoint.h"
#include "train.h"

#define LPATH 4096

static volatile sig_atomic_t g_child = 0;     /* pid of the running mpirun (local) */
static volatile sig_atomic_t g_stop = 0;      /* signals received: 1 = checkpoint and stop, 2+ = kill */

/* first signal: ask the trainer to checkpoint (mpirun forwards SIGUSR1 to every rank);
 * a second one: terminate the run */
static void on_signal(int sig) {
    (void)sig;
    g_stop++;
    if (g_child > 0) kill((pid_t)g_child, g_stop == 1 ? SIGUSR1 : SIGTERM);
}

static void abs_path(const char *p, char *dst, size_t cap) {
    if (p[0] == '/') { str_fmt(dst, cap, "%s", p); return; }
    char cwd[LPATH];
    if (!getcwd(cwd, sizeof cwd)) str_fmt(cwd, sizeof cwd, ".");
    while (p[0] == '.' && p[1] == '/') p += 2;
    if (!strcmp(p, ".") || !p[0]) str_fmt(dst, cap, "%s", cwd);
    else str_fmt(dst, cap, "%s/%s", cwd, p);
}

static bool is_exec(const char *p) { return access(p, X_OK) == 0; }

static bool find_in_path(const char *prog, char *dst, size_t cap) {
    const char *path = getenv("PATH");
    if (!path) path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        const char *colon = strchr(path, ':');
        size_t n = colon ? (size_t)(colon - path) : strlen(path);
        if (n > 0 && n < LPATH - 64) {
            char cand[LPATH];
            str_fmt(cand, sizeof cand, "%.*s/%s", (int)n, path, prog);
            if (is_exec(cand)) { str_fmt(dst, cap, "%s", cand); return true; }
        }
        if (!colon) break;
        path = colon + 1;
    }
    return false;
}

static void self_exe(char *dst, size_t cap) {
    ssize_t n = readlink("/proc/self/exe", dst, cap - 1);
    if (n <= 0) { str_fmt(dst, cap, "dcmoe"); return; }
    dst[n] = 0;
}

/* the source tree holding slurm/ and analysis/: $DCMOE_ROOT, the working directory, or the
 * parents of the executable's folder (build/dcmoe -> .) */
static Status find_root(const char *exe, char *dst, size_t cap) {
    char cand[4][LPATH], probe[LPATH + 64];
    int n = 0;
    const char *env = getenv("DCMOE_ROOT");
    if (env && env[0]) str_fmt(cand[n++], LPATH, "%s", env);
    abs_path(".", cand[n++], LPATH);
    char dir[LPATH];
    str_fmt(dir, sizeof dir, "%s", exe);
    for (int up = 0; up < 2; up++) {       /* <root>/build/dcmoe, <root>/build/sub/dcmoe */
        char *slash = strrchr(dir, '/');
        if (!slash || slash == dir) break;
        *slash = 0;                         /* dir = the folder above */
        char *s2 = strrchr(dir, '/');
        if (!s2 || s2 == dir) break;
        str_fmt(cand[n++], LPATH, "%.*s", (int)(s2 - dir), dir);
    }
    for (int i = 0; i < n; i++) {
        str_fmt(probe, sizeof probe, "%s/slurm/sweep-array.sbatch", cand[i]);
        if (file_exists(probe)) { str_fmt(dst, cap, "%s", cand[i]); return status_ok(); }
    }
    return status_errorf("cannot find the dcmoe source tree (slurm/sweep-array.sbatch): looked in $DCMOE_ROOT, "
                         "the working directory and beside %s; set DCMOE_ROOT", exe);
}

RunState launcher_run_state(const char *run_dir) {
    char p[LPATH + 32], ck[LPATH + 64] = "";
    str_fmt(p, sizeof p, "%s/DONE", run_dir);
    if (file_exists(p)) return RUN_DONE;
    if (STATUS_OK(checkpoint_find_latest(run_dir, ck, sizeof ck)) && ck[0]) return RUN_RESUMABLE;
    str_fmt(p, sizeof p, "%s/metrics.h5", run_dir);
    return file_exists(p) ? RUN_PARTIAL : RUN_NEW;
}

static const char *state_name(RunState s) {
    static const char *names[] = {"new", "partial (no complete checkpoint)", "resumable", "done"};
    return names[s];
}

/* a run folder killed before its first checkpoint: keep it for inspection under another name */
static Status move_aside(const char *run_dir, char *moved, size_t cap) {
    for (int k = 1; k < 1000; k++) {
        str_fmt(moved, cap, "%s.partial-%d", run_dir, k);
        struct stat sb;
        if (stat(moved, &sb) != 0) {
            if (rename(run_dir, moved) != 0)
                return status_errorf("%s: cannot move the partial run aside to %s: %s", run_dir, moved, strerror(errno));
            return status_ok();
        }
    }
    return status_errorf("%s: too many partial copies beside it", run_dir);
}

static void file_stem(const char *path, char *dst, size_t cap) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    const char *dot = strrchr(b, '.');
    size_t n = dot && dot != b ? (size_t)(dot - b) : strlen(b);
    str_fmt(dst, cap, "%.*s", (int)n, b);
}

/* ---- the sweep folder ---- */

typedef struct Planned {
    char config[LPATH];      /* absolute path of configs/<id>.yaml */
    char run_dir[LPATH];     /* absolute run folder */
} Planned;

static Status write_sweep_dir(const Sweep *sw, const char *file, const char *dir, Planned *pl) {
    char p[LPATH + 64];
    TRY(dir_make_p(dir));
    str_fmt(p, sizeof p, "%s/configs", dir);
    TRY(dir_make_p(p));
    str_fmt(p, sizeof p, "%s/logs", dir);
    TRY(dir_make_p(p));
    size_t cap = 256, len = 0;
    char *tsv = malloc(cap);
    if (!tsv) return status_errorf("out of memory");
    tsv[0] = 0;
    for (int i = -1; i < sw->n_runs; i++) {
        char line[LPATH * 3 + SWEEP_MAX_KEYS * 2 * 256];
        int n;
        if (i < 0) n = snprintf(line, sizeof line, "index\tid\tname\tranks\tconfig\trun_dir\tsettings\tneeds\n");
        else {
            const SweepRun *r = &sw->runs[i];
            char rd[LPATH];
            train_run_dir(&r->cfg, rd, sizeof rd);
            abs_path(rd, pl[i].run_dir, sizeof pl[i].run_dir);
            str_fmt(pl[i].config, sizeof pl[i].config, "%s/configs/%s.yaml", dir, r->id);
            char *y = config_to_yaml(&r->cfg);
            char head[1024];
            int hn = snprintf(head, sizeof head, "# run %d (%s) of the sweep %s, ranks=%d; written by dcmoe sweep run\n",
                              r->index, r->id, file, r->ranks);
            size_t yl = strlen(y);
            char *txt = malloc((size_t)hn + yl + 1);
            if (!txt) { free(y); free(tsv); return status_errorf("out of memory"); }
            memcpy(txt, head, (size_t)hn);
            memcpy(txt + hn, y, yl + 1);
            Status st = file_write_atomic(pl[i].config, txt, (size_t)hn + yl);
            free(txt);
            free(y);
            if (!STATUS_OK(st)) { free(tsv); return st; }
            n = snprintf(line, sizeof line, "%d\t%s\t%s\t%d\t%s\t%s\t", r->index, r->id, r->name, r->ranks,
                         pl[i].config, pl[i].run_dir);
            for (int j = 0; j < r->n_sets && n > 0 && (size_t)n < sizeof line; j++)
                n += snprintf(line + n, sizeof line - (size_t)n, "%s%s", j ? " " : "", r->sets[j]);
            for (int j = 0; j < r->n_needs && n > 0 && (size_t)n < sizeof line; j++)
                n += snprintf(line + n, sizeof line - (size_t)n, "%s%d", j ? "," : "\t", r->needs[j]);
            if (r->n_needs == 0 && n > 0 && (size_t)n < sizeof line - 1) line[n++] = '\t';
            if (n > 0 && (size_t)n < sizeof line - 1) { line[n++] = '\n'; line[n] = 0; }
        }
        if (n < 0 || (size_t)n >= sizeof line) { free(tsv); return status_errorf("sweep plan line %d too long", i); }
        if (len + (size_t)n + 1 > cap) {
            while (len + (size_t)n + 1 > cap) cap *= 2;
            char *t = realloc(tsv, cap);
            if (!t) { free(tsv); return status_errorf("out of memory"); }
            tsv = t;
        }
        memcpy(tsv + len, line, (size_t)n + 1);
        len += (size_t)n;
    }
    str_fmt(p, sizeof p, "%s/plan.tsv", dir);
    Status st = file_write_atomic(p, tsv, len);
    free(tsv);
    return st;
}

static void print_argv(const char *prefix, char *const *argv) {
    printf("%s", prefix);
    for (int i = 0; argv[i]; i++) printf("%s%s", i ? " " : "", argv[i]);
    printf("\n");
}

/* fork + exec argv; stdout/stderr to log (append) or, with capture, into out[cap]; returns
 * the exit code (128 + signal when killed) or -1 when it could not start */
static int spawn(char *const *argv, const char *log, char *out, size_t cap, bool track) {
    int pipefd[2] = {-1, -1};
    if (out && pipe(pipefd) != 0) return -1;
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        if (track) setpgid(0, 0);   /* a terminal Ctrl-C reaches the launcher only; it forwards */
        if (out) {
            dup2(pipefd[1], 1);
            close(pipefd[0]);
            close(pipefd[1]);
        } else if (log) {
            int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); close(fd); }
        }
        execv(argv[0], argv);
        fprintf(stderr, "dcmoe sweep run: cannot execute %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    if (track) g_child = pid;
    if (out) {
        close(pipefd[1]);
        size_t n = 0;
        ssize_t k;
        while (n + 1 < cap && (k = read(pipefd[0], out + n, cap - 1 - n)) != 0) {
            if (k < 0) { if (errno == EINTR) continue; break; }
            n += (size_t)k;
        }
        out[n] = 0;
        close(pipefd[0]);
    }
    int ws = 0;
    while (waitpid(pid, &ws, 0) < 0) {
        if (errno != EINTR) { ws = 0x7f00; break; }
    }
    if (track) g_child = 0;
    if (WIFEXITED(ws)) return WEXITSTATUS(ws);
    if (WIFSIGNALED(ws)) return 128 + WTERMSIG(ws);
    return -1;
}

/* ---- local: one run after the other ---- */

static Status run_local(const Sweep *sw, const LaunchOptions *opt, const char *dir, const Planned *pl, int *n_failed) {
    char mpirun[LPATH], exe[LPATH];
    if (!find_in_path("mpirun", mpirun, sizeof mpirun))
        return status_errorf("--launcher local: mpirun not found in PATH (install openmpi-bin)");
    self_exe(exe, sizeof exe);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (opt->throttle > 0)
        printf("note: --throttle applies to --launcher slurm; the local launcher runs one run at a time\n");
    if (opt->pack > 1) printf("note: --pack applies to --launcher slurm; the local launcher runs one run at a time\n");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    int n_done = 0, n_run = 0;
    for (int i = 0; i < sw->n_runs && !g_stop; i++) {
        const SweepRun *r = &sw->runs[i];
        RunState s = launcher_run_state(pl[i].run_dir);
        printf("[%d/%d] %s %s ranks=%d: %s", i + 1, sw->n_runs, r->id, r->name, r->ranks, state_name(s));
        if (s == RUN_DONE) { printf(", skipped\n"); n_done++; continue; }
        printf("\n");
        /* a run that reads another run's log (a chained sweep) starts only when that run is complete */
        int missing = -1;
        for (int q = 0; q < r->n_needs && !opt->dry_run; q++)
            if (launcher_run_state(pl[r->needs[q]].run_dir) != RUN_DONE) missing = r->needs[q];
        if (missing >= 0) {
            printf("  not started: it reads the log of run %d (%s), which is not complete\n", missing, sw->runs[missing].name);
            (*n_failed)++;
            continue;
        }
        if (s == RUN_PARTIAL && !opt->dry_run) {
            char moved[LPATH + 64];
            Status st = move_aside(pl[i].run_dir, moved, sizeof moved);
            if (!STATUS_OK(st)) { fprintf(stderr, "dcmoe: error: %s\n", st.msg); (*n_failed)++; continue; }
            printf("  moved the partial run (killed before its first checkpoint) to %s; starting again\n", moved);
        }
        char n_str[16];
        snprintf(n_str, sizeof n_str, "%d", r->ranks);
        char *argv[16];
        int a = 0;
        if (r->cfg.run.mode == RUN_MODE_SIMULATE) {
            /* one process models the whole cluster; a simulation has no checkpoint: rerun */
            argv[a++] = exe;
            argv[a++] = "simulate";
            argv[a++] = (char *)pl[i].config;
            argv[a++] = "--quiet";
        } else {
            argv[a++] = mpirun;
            if (geteuid() == 0) argv[a++] = "--allow-run-as-root";
            if (r->ranks > cores) argv[a++] = "--oversubscribe";
            argv[a++] = "-n";
            argv[a++] = n_str;
            argv[a++] = exe;
            argv[a++] = "train";
            argv[a++] = (char *)pl[i].config;
            if (s == RUN_RESUMABLE) argv[a++] = "--resume";
        }
        argv[a] = NULL;
        char log[LPATH + 64];
        str_fmt(log, sizeof log, "%s/logs/%s.out", dir, r->id);
        print_argv("  $ ", argv);
        if (opt->dry_run) continue;
        printf("  log: %s\n", log);
        double t0 = time_now();
        int rc = spawn(argv, log, NULL, 0, true);
        double dt = time_now() - t0;
        n_run++;
        RunState after = launcher_run_state(pl[i].run_dir);
        if (rc == 0 && after == RUN_DONE) printf("  complete in %.1f s\n", dt);
        else if (rc == 0) printf("  stopped after %.1f s with a checkpoint (run the sweep again to resume it)\n", dt);
        else {
            printf("  FAILED (exit %d) after %.1f s; see %s\n", rc, dt, log);
            (*n_failed)++;
        }
        fflush(stdout);
    }
    if (g_stop) printf("interrupted: the current run checkpointed; `dcmoe sweep run` again continues the sweep\n");
    if (!opt->dry_run)
        printf("sweep %s: %d run(s) already complete, %d started, %d failed; folder %s\n", opt->sweep_file, n_done,
               n_run, *n_failed, dir);
    return status_ok();
}

/* ---- slurm: one array job + one dependent report job ---- */

static Status submit(char **argv, bool dry, const char *what, char *job_id, size_t cap, FILE *record) {
    print_argv("$ ", argv);
    if (record) {
        for (int i = 0; argv[i]; i++) fprintf(record, "%s'%s'", i ? " " : "", argv[i]);
        fprintf(record, "\n");
    }
    if (dry) { str_fmt(job_id, cap, "DRYRUN"); return status_ok(); }
    char out[1024];
    int rc = spawn(argv, NULL, out, sizeof out, false);
    if (rc != 0) return status_errorf("sbatch (%s) failed with exit %d: %s", what, rc, out);
    char *semi = strpbrk(out, ";\n");
    if (semi) *semi = 0;
    if (!out[0]) return status_errorf("sbatch (%s) printed no job id", what);
    str_fmt(job_id, cap, "%s", out);
    if (record) fprintf(record, "# %s job id: %s\n", what, job_id);
    return status_ok();
}

static char *grow(char *p, size_t cap) {
    char *q = realloc(p, cap);
    ASSERT(q != NULL);
    return q;
}

/* the array of one stage: --pack K lines appended to packs.tsv (tasks numbered from *n_tasks on)
 * or ranges of unfinished run indices; *n_todo = array tasks, *max_ranks of its runs */
static Status stage_array(const Sweep *sw, const LaunchOptions *opt, const Planned *pl, const int *stage, int s,
                          char *array, size_t cap, char **tsv, size_t *tcap, size_t *tlen, int *n_tasks, int *n_todo,
                          int *max_ranks) {
    size_t al = 0;
    *n_todo = 0;
    *max_ranks = 1;
    array[0] = 0;
    int first_task = *n_tasks;
    for (int i = 0; i < sw->n_runs;) {
        if (stage[i] != s) { i++; continue; }
        RunState st = launcher_run_state(pl[i].run_dir);
        printf("%4d  %s  %-32s ranks=%d  %s\n", i, sw->runs[i].id, sw->runs[i].name, sw->runs[i].ranks, state_name(st));
        if (st == RUN_DONE) { i++; continue; }
        if (sw->runs[i].ranks > *max_ranks) *max_ranks = sw->runs[i].ranks;
        int j = i;          /* the run i, then more: up to K simulate runs (pack) or a range of unfinished runs */
        int sim = sw->runs[i].cfg.run.mode == RUN_MODE_SIMULATE, n_in = 1;
        if (opt->pack > 1) {
            if (*tlen + 64 > *tcap) { *tcap = 2 * *tcap + 64; *tsv = grow(*tsv, *tcap); }
            *tlen += (size_t)snprintf(*tsv + *tlen, *tcap - *tlen, "%d\t%d", *n_tasks, i);
        }
        while (j + 1 < sw->n_runs && stage[j + 1] == s && (opt->pack <= 1 || (sim && n_in < opt->pack))) {
            RunState sj = launcher_run_state(pl[j + 1].run_dir);
            if (opt->pack <= 1 && sj == RUN_DONE) break;
            if (opt->pack > 1 && sj != RUN_DONE && sw->runs[j + 1].cfg.run.mode != RUN_MODE_SIMULATE) break;
            j++;
            printf("%4d  %s  %-32s ranks=%d  %s\n", j, sw->runs[j].id, sw->runs[j].name, sw->runs[j].ranks, state_name(sj));
            if (sj == RUN_DONE) continue;
            if (sw->runs[j].ranks > *max_ranks) *max_ranks = sw->runs[j].ranks;
            if (opt->pack > 1) {
                if (*tlen + 32 > *tcap) { *tcap = 2 * *tcap + 64; *tsv = grow(*tsv, *tcap); }
                *tlen += (size_t)snprintf(*tsv + *tlen, *tcap - *tlen, ",%d", j);
                n_in++;
            }
        }
        if (opt->pack > 1) {
            *tlen += (size_t)snprintf(*tsv + *tlen, *tcap - *tlen, "\n");
            (*n_tasks)++;
            (*n_todo)++;
        } else {
            int k = j > i ? snprintf(array + al, cap - al, "%s%d-%d", *n_todo ? "," : "", i, j)
                          : snprintf(array + al, cap - al, "%s%d", *n_todo ? "," : "", i);
            if (k < 0 || (size_t)k >= cap - al - 16) return status_errorf("too many runs for one --array list");
            al += (size_t)k;
            *n_todo += j - i + 1;
        }
        i = j + 1;
    }
    if (opt->pack > 1 && *n_todo > 0)
        al = (size_t)snprintf(array, cap, *n_todo > 1 ? "%d-%d" : "%d", first_task, *n_tasks - 1);
    if (opt->throttle > 0 && *n_todo > 0) snprintf(array + al, cap - al, "%%%d", opt->throttle);
    return status_ok();
}

static Status run_slurm(const Sweep *sw, const LaunchOptions *opt, const char *dir, const Planned *pl) {
    char sbatch[LPATH], exe[LPATH], root[LPATH], cwd[LPATH];
    if (!find_in_path("sbatch", sbatch, sizeof sbatch)) {
        if (!opt->dry_run) return status_errorf("--launcher slurm: sbatch not found in PATH (install slurm-client)");
        str_fmt(sbatch, sizeof sbatch, "sbatch");
    }
    self_exe(exe, sizeof exe);
    TRY(find_root(exe, root, sizeof root));
    abs_path(".", cwd, sizeof cwd);
    /* stages: runs that read another run's log (a chained sweep's "@block") go in a later array
     * that starts after the earlier one succeeded (--dependency=afterok) */
    int *stage = xmalloc(sizeof(int) * (size_t)sw->n_runs), n_stages = 1;
    for (int i = 0; i < sw->n_runs; i++) {
        stage[i] = sweep_stage(sw, i);
        if (stage[i] + 1 > n_stages) n_stages = stage[i] + 1;
    }
    char packs_path[LPATH + 32] = "";
    size_t tcap = 64 + (size_t)sw->n_runs * 12, tlen = 0;
    char *tsv = opt->pack > 1 ? xmalloc(tcap) : NULL;
    if (tsv) tlen += (size_t)snprintf(tsv, tcap, "task\tindices\n");
    if (opt->pack > 1) str_fmt(packs_path, sizeof packs_path, "%s/packs.tsv", dir);
    char stem[256], rec_path[LPATH + 32], opt_array[8300], opt_ntasks[32], opt_name[300], opt_out[LPATH + 64],
         opt_chdir[LPATH + 16], opt_export[4 * LPATH], script[LPATH + 64], rscript[LPATH + 64], opt_dep[1024],
         opt_rname[300], opt_rout[LPATH + 64], sdir[LPATH];
    file_stem(opt->sweep_file, stem, sizeof stem);
    str_fmt(sdir, sizeof sdir, "%s", dir);
    str_fmt(rec_path, sizeof rec_path, "%s/slurm-jobs.txt", dir);
    FILE *record = opt->dry_run ? NULL : fopen(rec_path, "a");
    str_fmt(opt_chdir, sizeof opt_chdir, "--chdir=%s", cwd);
    str_fmt(opt_export, sizeof opt_export, "--export=ALL,DCMOE_ROOT=%s,DCMOE_EXE=%s,DCMOE_SWEEP_DIR=%s,DCMOE_PACKS=%s", root, exe,
            dir, packs_path);
    str_fmt(script, sizeof script, "%s/slurm/sweep-array.sbatch", root);
    str_fmt(rscript, sizeof rscript, "%s/slurm/report.sbatch", root);
    /* the arrays: plan every stage first (packs.tsv is written before anything is submitted) */
    char (*arrays)[8192] = xcalloc(sizeof *arrays * (size_t)n_stages);
    int *todo = xcalloc(sizeof(int) * (size_t)n_stages), *ranks = xcalloc(sizeof(int) * (size_t)n_stages), n_tasks = 0;
    Status st = status_ok();
    for (int s = 0; s < n_stages && STATUS_OK(st); s++) {
        if (n_stages > 1) printf("stage %d%s:\n", s, s ? " (reads the logs of the stage before)" : "");
        st = stage_array(sw, opt, pl, stage, s, arrays[s], sizeof arrays[s], &tsv, &tcap, &tlen, &n_tasks, &todo[s], &ranks[s]);
    }
    if (STATUS_OK(st) && tsv) {
        st = file_write_atomic(packs_path, tsv, tlen);
        if (STATUS_OK(st) && n_tasks > 0) printf("--pack %d: %d array task(s) (%s)\n", opt->pack, n_tasks, packs_path);
    }
    xfree(tsv);
    char ids[64][64];
    int n_ids = 0, n_all = 0;
    for (int s = 0; s < n_stages && STATUS_OK(st); s++) {
        if (todo[s] == 0) continue;
        n_all += todo[s];
        str_fmt(opt_array, sizeof opt_array, "--array=%s", arrays[s]);
        str_fmt(opt_ntasks, sizeof opt_ntasks, "--ntasks=%d", ranks[s]);
        if (s == 0) str_fmt(opt_name, sizeof opt_name, "--job-name=dcmoe-%s", stem);
        else str_fmt(opt_name, sizeof opt_name, "--job-name=dcmoe-%s-stage%d", stem, s);
        str_fmt(opt_out, sizeof opt_out, "--output=%s/logs/slurm-%%A_%%a.out", dir);
        /* afterok: every task of the earlier arrays completed (a failed trained run holds its simulations) */
        size_t dl = (size_t)snprintf(opt_dep, sizeof opt_dep, "--dependency=afterok");
        for (int q = 0; q < n_ids && dl < sizeof opt_dep - 70; q++) dl += (size_t)snprintf(opt_dep + dl, sizeof opt_dep - dl, ":%s", ids[q]);
        char *argv[12];
        int a = 0;
        argv[a++] = sbatch; argv[a++] = "--parsable"; argv[a++] = opt_name; argv[a++] = opt_array; argv[a++] = opt_ntasks;
        argv[a++] = opt_out; argv[a++] = opt_chdir; argv[a++] = opt_export;
        if (n_ids > 0) argv[a++] = opt_dep;
        argv[a++] = script; argv[a++] = sdir; argv[a] = NULL;
        if (n_ids >= 64) { st = status_errorf("more than 64 stages"); break; }
        st = submit(argv, opt->dry_run, "array", ids[n_ids], sizeof ids[0], record);
        if (STATUS_OK(st))
            printf("%s job array %s: %d %s (indices %s)%s\n", opt->dry_run ? "would submit" : "submitted", ids[n_ids], todo[s],
                   opt->pack > 1 ? "task(s) of packed runs" : "run(s)", arrays[s],
                   n_ids > 0 ? " after the earlier array(s) succeed (afterok)" : "");
        n_ids++;
    }
    if (STATUS_OK(st) && n_all == 0) printf("every run is complete; submitting only the report\n");
    if (STATUS_OK(st)) {
        char report_id[64];
        str_fmt(opt_rname, sizeof opt_rname, "--job-name=dcmoe-%s-report", stem);
        str_fmt(opt_rout, sizeof opt_rout, "--output=%s/logs/report-%%j.out", dir);
        size_t dl = (size_t)snprintf(opt_dep, sizeof opt_dep, "--dependency=afterany");
        for (int q = 0; q < n_ids && dl < sizeof opt_dep - 70; q++) dl += (size_t)snprintf(opt_dep + dl, sizeof opt_dep - dl, ":%s", ids[q]);
        char *argv[] = {sbatch, "--parsable", opt_rname, "--ntasks=1", opt_rout, opt_chdir, opt_export,
                        n_ids > 0 ? opt_dep : NULL, NULL, NULL, NULL};
        int a = n_ids > 0 ? 8 : 7;
        argv[a++] = rscript;
        argv[a++] = sdir;
        argv[a] = NULL;
        st = submit(argv, opt->dry_run, "report", report_id, sizeof report_id, record);
        if (STATUS_OK(st))
            printf("%s report job %s (runs after the array%s end%s): %s/report/report.html\n",
                   opt->dry_run ? "would submit" : "submitted", report_id, n_ids > 1 ? "s" : "", n_ids > 1 ? "" : "s", dir);
    }
    if (record) fclose(record);
    xfree(arrays);
    xfree(todo);
    xfree(ranks);
    xfree(stage);
    if (STATUS_OK(st) && !opt->dry_run) printf("sweep folder %s (job ids and commands in slurm-jobs.txt)\n", dir);
    return st;
}

Status launcher_run(const Sweep *sw, const LaunchOptions *opt, int *n_failed) {
    *n_failed = 0;
    if (sw->n_runs <= 0) return status_errorf("%s: the sweep has no runs", opt->sweep_file);
    char dir[LPATH], stem[256];
    if (opt->sweep_dir && opt->sweep_dir[0]) abs_path(opt->sweep_dir, dir, sizeof dir);
    else {
        char rel[LPATH];
        file_stem(opt->sweep_file, stem, sizeof stem);
        str_fmt(rel, sizeof rel, "%s/%s%s", sw->runs[0].cfg.run.out_dir, strncmp(stem, "sweep", 5) ? "sweep-" : "", stem);
        abs_path(rel, dir, sizeof dir);
    }
    Planned *pl = calloc((size_t)sw->n_runs, sizeof *pl);
    if (!pl) return status_errorf("out of memory");
    Status st = write_sweep_dir(sw, opt->sweep_file, dir, pl);
    if (STATUS_OK(st)) {
        printf("sweep %s: %d run(s); plan and resolved configs in %s\n", opt->sweep_file, sw->n_runs, dir);
        if (opt->kind == LAUNCHER_LOCAL) st = run_local(sw, opt, dir, pl, n_failed);
        else st = run_slurm(sw, opt, dir, pl);
    }
    free(pl);
    fflush(stdout);
    return st;
}

static void usage_run(void) {
    printf("usage: dcmoe sweep run FILE.yaml --launcher local|slurm [--throttle N] [--pack K] [--dry-run] [--dir DIR] [--set k=v]...\n\n"
           "Plans the sweep (as `dcmoe sweep plan`), writes DIR (default <run.out_dir>/sweep-<file stem>, or <run.out_dir>/<file stem>\n"
           "when the stem starts with \"sweep\"): plan.tsv,\n"
           "configs/<id>.yaml (each run's resolved config) and logs/, then\n"
           "  local   runs each run in turn: mpirun -n <ranks> dcmoe train configs/<id>.yaml; runs whose folder\n"
           "          holds DONE are skipped, runs with a complete checkpoint resume (--resume), runs killed before\n"
           "          their first checkpoint are moved aside and started again. Ctrl-C / SIGTERM: the current run\n"
           "          checkpoints and the sweep stops (a second signal kills it).\n"
           "  slurm   submits one job array of the unfinished runs (slurm/sweep-array.sbatch; task id = run index,\n"
           "          --throttle N = at most N at once) and a report job after it (--dependency=afterany).\n"
           "          --pack K: up to K consecutive unfinished simulate runs per array task (packs.tsv: task id ->\n"
           "          run indices), for sweeps of many short simulations; train runs keep a task each.\n"
           "  chained sweeps (sweep.blocks; a simulate run's sim.trace / sim.aggregate \"@<block>\" reads the log of\n"
           "          that block's run with the same shared values): local runs them in plan order and skips a run\n"
           "          whose trained run is not complete; slurm submits one array per stage, each later one with\n"
           "          --dependency=afterok on the earlier ones.\n"
           "  --dry-run  write the folder and print the commands; run and submit nothing.\n");
}

/* `dcmoe sweep status FILE`: one tab-separated line per planned run (scripts read it) */
static void print_status(const Sweep *sw) {
    printf("index\tid\tname\tranks\tstate\trun_dir\n");
    static const char *short_names[] = {"new", "partial", "resumable", "done"};
    for (int i = 0; i < sw->n_runs; i++) {
        char rd[LPATH], ad[LPATH];
        train_run_dir(&sw->runs[i].cfg, rd, sizeof rd);
        abs_path(rd, ad, sizeof ad);
        printf("%d\t%s\t%s\t%d\t%s\t%s\n", i, sw->runs[i].id, sw->runs[i].name, sw->runs[i].ranks,
               short_names[launcher_run_state(ad)], ad);
    }
}

int launcher_main(int argc, char **argv) {
    /* argv[0] is "run" or "status" */
    bool status_only = argc > 0 && !strcmp(argv[0], "status");
    argc--;
    argv++;
    LaunchOptions opt;
    memset(&opt, 0, sizeof opt);
    opt.kind = -1;
    const char *sets[64];
    int n_sets = 0;
    Status st = status_ok();
    for (int i = 0; i < argc && STATUS_OK(st); i++) {
        const char *s = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
            if (status_only) printf("usage: dcmoe sweep status FILE.yaml [--set k=v]...\n\nOne tab-separated line per "
                                    "planned run: index, id, name, ranks, state (new, partial, resumable, done), run folder.\n");
            else usage_run();
            return 0;
        }
        else if (!strcmp(s, "--dry-run")) opt.dry_run = true;
        else if (!strcmp(s, "--launcher") || !strcmp(s, "--throttle") || !strcmp(s, "--dir") || !strcmp(s, "--set") ||
                 !strcmp(s, "--pack")) {
            if (!val) { st = status_errorf("%s needs a value", s); break; }
            i++;
            if (!strcmp(s, "--launcher")) {
                if (!strcmp(val, "local")) opt.kind = LAUNCHER_LOCAL;
                else if (!strcmp(val, "slurm")) opt.kind = LAUNCHER_SLURM;
                else st = status_errorf("--launcher %s: allowed: local, slurm", val);
            } else if (!strcmp(s, "--throttle")) {
                char *end;
                long t = strtol(val, &end, 10);
                if (*end || t < 1 || t > 100000) st = status_errorf("--throttle %s: expected a count in [1, 100000]", val);
                opt.throttle = (int)t;
            } else if (!strcmp(s, "--pack")) {
                char *end;
                long t = strtol(val, &end, 10);
                if (*end || t < 1 || t > 100000) st = status_errorf("--pack %s: expected a count in [1, 100000]", val);
                opt.pack = (int)t;
            } else if (!strcmp(s, "--dir")) opt.sweep_dir = val;
            else if (n_sets < 64) sets[n_sets++] = val;
            else st = status_errorf("too many --set options (max 64)");
        } else if (s[0] == '-') st = status_errorf("unknown option %s (see dcmoe sweep run --help)", s);
        else if (!opt.sweep_file) opt.sweep_file = s;
        else st = status_errorf("unexpected argument %s (one sweep file only)", s);
    }
    if (STATUS_OK(st) && !opt.sweep_file) st = status_errorf("sweep run: missing FILE.yaml (see dcmoe sweep run --help)");
    if (STATUS_OK(st) && (int)opt.kind < 0 && !status_only) st = status_errorf("sweep run: --launcher local|slurm is required");
    if (!STATUS_OK(st)) { fprintf(stderr, "dcmoe: error: %s\n", st.msg); return 2; }
    Config base;
    config_defaults(&base);
    st = config_load_file(&base, opt.sweep_file);
    for (int i = 0; i < n_sets && STATUS_OK(st); i++) st = config_set(&base, sets[i]);
    if (STATUS_OK(st)) st = config_validate(&base);
    Sweep sw;
    memset(&sw, 0, sizeof sw);
    if (STATUS_OK(st)) st = sweep_plan(opt.sweep_file, &base, &sw);
    int n_failed = 0;
    if (STATUS_OK(st) && status_only) print_status(&sw);
    else if (STATUS_OK(st)) st = launcher_run(&sw, &opt, &n_failed);
    sweep_free(&sw);
    fflush(stdout);
    if (!STATUS_OK(st)) { fprintf(stderr, "dcmoe: error: %s\n", st.msg); return 2; }
    return n_failed > 0 ? 1 : g_stop ? 3 : 0;
}
