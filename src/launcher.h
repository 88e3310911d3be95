/* launcher: `dcmoe sweep run FILE --launcher local|slurm` — writes the sweep folder (plan.tsv and
 * one resolved config per run), then either runs each planned run in turn under `mpirun -n
 * <ranks>` (local: skips runs marked DONE, resumes runs with a complete checkpoint) or submits
 * one Slurm job array from slurm/sweep-array.sbatch plus a dependent report job (slurm); a
 * chained sweep (sweep.blocks, "@block" references) gets one array per stage, each after the
 * one before (afterok).
 * Does not: use MPI itself (it runs before MPI_Init, so the mpirun it starts is not nested in an
 * MPI job), train, or plan the sweep (sweep.c). Owns nothing beyond one call. */
#ifndef DCMOE_LAUNCHER_H
#define DCMOE_LAUNCHER_H

#include <stdbool.h>
#include "sweep.h"

typedef enum LauncherKind { LAUNCHER_LOCAL = 0, LAUNCHER_SLURM = 1 } LauncherKind;

typedef struct LaunchOptions {
    LauncherKind kind;
    int throttle;            /* slurm: at most this many array tasks at once (%N); 0 = no limit */
    int pack;                /* slurm: up to this many simulate runs per array task (packs.tsv); <= 1 = one run per task */
    bool dry_run;            /* write the sweep folder and print the commands, run nothing */
    const char *sweep_file;  /* the experiment file (for names and messages) */
    const char *sweep_dir;   /* NULL: <run.out_dir>/sweep-<file stem> (<file stem> if it starts with "sweep") */
} LaunchOptions;

/* state of a run folder, as the launchers and slurm/dcmoe-job.sh decide it */
typedef enum RunState {
    RUN_NEW = 0,             /* no run folder or no metrics.h5 */
    RUN_PARTIAL = 1,         /* metrics.h5 but no complete checkpoint: moved aside, started again */
    RUN_RESUMABLE = 2,       /* a complete checkpoint (ckpt/step_NNNNNNNN/COMPLETE): continue with --resume */
    RUN_DONE = 3             /* DONE marker (written by train when train.steps is reached): skip */
} RunState;

RunState launcher_run_state(const char *run_dir);

/* run or submit a planned sweep; *n_failed counts runs that failed (local) */
Status launcher_run(const Sweep *sw, const LaunchOptions *opt, int *n_failed);

/* the `dcmoe sweep run|status` subcommands (argv[0] = "run" or "status"); returns the exit code */
int launcher_main(int argc, char **argv);

#endif
