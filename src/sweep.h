/* sweep: the `sweep:` block of an experiment file — `grid` (Cartesian product, the last key
 * varies fastest) and `zip` (paired lists of equal length) over any config keys, plus `ranks`
 * (MPI ranks per run) and `name` (a run-name suffix) — expanded deterministically into numbered
 * runs with stable ids; every run's config is built and validated before anything runs.
 * Chains (train small, then simulate large): `blocks:` names stages that run in file order;
 * each block has its own `set` (fixed key: value), `grid` and `zip`, and every block's runs take
 * every point of the shared (top-level) grid/zip. In a simulate run, sim.trace or sim.aggregate
 * "@<block>" resolves to the metrics.h5 of the run of that earlier block with the same shared
 * values (and the same values of keys both blocks sweep); the run then needs that run
 * (SweepRun.needs: the launchers run or submit it first). Errors name file:line:column.
 * Does not: launch anything (launcher.c). Owns its arrays; free is safe twice. */
#ifndef DCMOE_SWEEP_H
#define DCMOE_SWEEP_H

#include "config.h"

#define SWEEP_MAX_KEYS 32
#define SWEEP_MAX_VALUE 120  /* bytes of one swept value: "key=value" fits a SweepRun.sets entry */
#define SWEEP_MAX_BLOCKS 16
#define SWEEP_MAX_NEEDS 2    /* runs one run reads (sim.trace, sim.aggregate) */

typedef struct SweepAxis {
    char key[128];           /* dotted config key, "ranks" or "name" */
    int n_values;
    char **values;           /* scalar texts as written */
    int line, column;        /* of the key, for messages */
} SweepAxis;

/* a named stage of a chained sweep (sweep.blocks.<name>) */
typedef struct SweepBlock {
    char name[64];
    int line, column;        /* of the name */
    int n_set, n_grid, n_zip;
    SweepAxis set[SWEEP_MAX_KEYS];       /* one value each */
    SweepAxis grid[SWEEP_MAX_KEYS], zip[SWEEP_MAX_KEYS];
} SweepBlock;

typedef struct SweepRun {
    int index;               /* 0-based, expansion order (block by block, in file order) */
    int block;               /* index into Sweep.blocks; -1 without blocks */
    int shared_point;        /* point of the shared grid/zip */
    int n_needs;
    int needs[SWEEP_MAX_NEEDS];   /* indices of runs whose logs this run reads (earlier blocks) */
    int ref_line[2], ref_column[2];   /* where an "@block" sim.trace / sim.aggregate was set (0: the config) */
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
    int n_blocks;
    SweepBlock *blocks;      /* NULL without a blocks: section */
    int n_runs;
    SweepRun *runs;
} Sweep;

/* read the sweep block of `path` and expand it over `base` (the file's config with any --set
 * overrides already applied). A file without a sweep block is one run. Errors name the file,
 * line:column and key, or the run and the key that made its config invalid. */
Status sweep_plan(const char *path, const Config *base, Sweep *sw);

/* the stage of run i: 0 without needs, else 1 + the largest stage of the runs it needs */
int sweep_stage(const Sweep *sw, int i);
void sweep_free(Sweep *sw);

#endif
