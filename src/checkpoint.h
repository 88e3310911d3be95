/* checkpoint: atomic, checksummed training checkpoints. A checkpoint is a folder
 * ckpt/step_NNNNNNNN/ with model.bin (rank 0: every parameter and Adam moment, the tensor
 * table, the training position), rank_RRRR.bin per rank (rank-local state), and COMPLETE
 * written last; it is built under a temporary name and renamed into place, so a folder
 * named step_* is always whole. Every section carries a CRC32 that load verifies.
 * Does not: decide when to checkpoint (train.c does). */
#ifndef DCMOE_CHECKPOINT_H
#define DCMOE_CHECKPOINT_H

#include <stdint.h>
#include "model.h"

typedef struct TrainPos {
    int64_t step;            /* steps completed */
    int64_t tokens_seen;
    double elapsed_s;        /* wall time of the run so far */
    uint64_t seed;
} TrainPos;

/* collective: every rank calls. Keeps the newest `keep` checkpoints. */
Status checkpoint_save(const char *run_dir, Model *m, const TrainPos *pos, int keep);
/* path of the newest complete checkpoint folder, or "" if none */
Status checkpoint_find_latest(const char *run_dir, char *path, size_t cap);
/* collective: rank 0 reads and verifies, the state is broadcast. Errors name the file and
 * what is wrong (bad magic, version, checksum, tensor shape mismatch). */
Status checkpoint_load(const char *ckpt_dir, Model *m, TrainPos *pos);
/* the same with parts left out (inference): CKPT_LOAD_NO_ADAM leaves the Adam moments
 * untouched, CKPT_LOAD_NO_EXPERTS the expert category's FP32 parameters (the stored-format
 * eval computes the clustered experts from experts.q instead); untouched memory stays
 * unpaged, so the measured peak RSS shows what inference holds */
enum { CKPT_LOAD_ALL = 0, CKPT_LOAD_NO_ADAM = 1, CKPT_LOAD_NO_EXPERTS = 2 };
Status checkpoint_load_opts(const char *ckpt_dir, Model *m, TrainPos *pos, int flags);
/* collective: section `name` of the checkpoint's model.bin (verified), on every rank;
 * *data is malloc'd (xfree it) */
Status checkpoint_read_section(const char *ckpt_dir, const char *name, Comm *comm, void **data, size_t *n_bytes);

#endif
