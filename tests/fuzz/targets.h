/* fuzz targets: one function per input format dcmoe reads (config YAML, --set assignments,
 * sweep blocks, the WikiText, Brown and GLUE corpus readers, checkpoint images, HDF5 logs),
 * shared by the libFuzzer harnesses (fuzz_main.c, -Dfuzz=true with clang) and the corpus
 * replay test (replay.c, every build). A target returns normally on any input the code
 * rejects with a Status (and says whether it accepted it); a crash, a sanitizer report or a broken property (abort) is a bug.
 * Does not: call MPI. Owns one scratch folder (fuzz_setup), removed at exit. */
#ifndef DCMOE_FUZZ_TARGETS_H
#define DCMOE_FUZZ_TARGETS_H

#include <stddef.h>
#include <stdint.h>

typedef struct FuzzTarget {
    const char *name;        /* folder name under corpus/ and regressions/ */
    int (*run)(const uint8_t *data, size_t n);   /* 1: the input was accepted, 0: rejected */
    const char *what;        /* the function under test, for messages */
} FuzzTarget;

/* byte that separates the files of one input for the corpus-reader targets (ASCII RS) */
#define FUZZ_FILE_SEP '\x1e'

extern const FuzzTarget fuzz_targets[];
extern const int fuzz_n_targets;

/* the target of that name, or NULL */
const FuzzTarget *fuzz_target_find(const char *name);
/* create the scratch folder (in /dev/shm when it exists; else $TMPDIR or /tmp); idempotent */
void fuzz_setup(void);

#endif
