/* sweep: the `sweep:` block of an experiment file — `grid` (Cartesian product, the last key
 * varies fastest) and `zip` (paired lists of equal length) over any config keys, plus `ranks`
 * (MPI ranks per run) and `name` (a run-name suffix) — expanded deterministically into numbered
 * runs with stable ids; every run's config is built and validated before anything runs.
 * Does not: launch anything (the launchers of issue 6 will). Owns its arrays; free is safe twice. */
#ifndef DCMOE_SWEEP_H
#define DCMOE_SWEEP_H

#include "config.h"

#define SWEEP_MAX_KEYS 32
#define SWEEP_MAX_VALUE 120  /* bytes of one swept value: "key=value" fits a SweepRun.sets entry */

typedef struct SweepAxis {
    char key[128];           /* dotted config key, "ranks" or "name" */
    int n_values;
    char **values;           /* scalar texts as written */
    int line, column;        /* of the key, for messages */
} SweepAxis;

typedef struct SweepRun {
    int index;               /* 0-based, expansion order */
    char id[32];             /* "r003-1a2b3c4d": index + CRC32 of the assignments */
    char name[160];          /* run.name of this run */
    int ranks;               /* MPI ranks (the `ranks` key, default 1) */
    int n_sets;
    char sets[SWEEP_MAX_KEYS * 2][256];  /* "key=value" assignments applied to the base config */
    Config cfg;              /* the resolved, validated config */
} SweepRun;

typedef struct Sweep {
    int n_grid, n_zip;
    SweepAxis grid[SWEEP_MAX_KEYS], zip[SWEEP_MAX_KEYS];
    int n_runs;
    SweepRun *runs;
} Sweep;

/* read the sweep block of `path` and expand it over `base` (the file's config with any --set
 * overrides already applied). A file without a sweep block is one run. Errors name the file,
 * line:column and key, or the run and the key that made its config invalid. */
Status sweep_plan(const char *path, const Config *base, Sweep *sw);
void sweep_free(Sweep *sw);

#endif
