/* checkpoint: atomic, checksummed training checkpoints. A checkpoint is a folder
 * ckpt/step_NNNNNNNN/ with model.bin (written by rank 0: every parameter and Adam moment,
 * the tensor table, the training position, the rank count, optional sections of the training
 * run's own state) and COMPLETE ("step N ranks P", checked against model.bin) written
 * last; it is built under a temporary name and renamed
 * into place, and pruning moves a folder out of the step_* names before deleting it, so a
 * folder named step_* holding COMPLETE is whole unless its files were damaged afterwards.
 * Every section carries a CRC32 that load verifies.
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
/* a section of the caller's own state, stored as given (names "run.*", distinct from the
 * model's sections); read back with checkpoint_read_section_opt */
typedef struct CheckpointSection {
    const char *name;
    const void *data;        /* rank 0's is written */
    size_t n_bytes;
} CheckpointSection;
/* checkpoint_save with extra sections */
Status checkpoint_save_with(const char *run_dir, Model *m, const TrainPos *pos, int keep, const CheckpointSection *extra,
                            int n_extra);
/* path of the newest complete checkpoint folder, or "" if none (marker only, nothing verified) */
Status checkpoint_find_latest(const char *run_dir, char *path, size_t cap);

/* what a verified checkpoint says about itself */
typedef struct CheckpointInfo {
    int64_t step;            /* steps completed (the "pos" section) */
    int ranks;               /* rank count it was written at */
} CheckpointInfo;
/* verify one checkpoint folder without a model: COMPLETE present and consistent with
 * model.bin, every section's CRC, the "pos" section. Errors name the file and the fault. */
Status checkpoint_verify(const char *ckpt_dir, CheckpointInfo *info);
/* verify a model.bin image in memory (magic, version, section table, CRCs); `file` names it
 * in messages. Pure: no I/O (the fuzz target for the checkpoint reader). */
Status checkpoint_verify_image(const char *file, const void *img, size_t n, CheckpointInfo *info);
/* the newest checkpoint that verifies: path "" if none. Every newer complete-looking folder
 * that fails verification is reported in `skipped` (one line each, "" if none). */
Status checkpoint_find_latest_valid(const char *run_dir, char *path, size_t cap, char *skipped, size_t skipped_cap);
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
/* the same for a section that may be absent: *found = 0 (and *data NULL, *n_bytes 0) when
 * the verified checkpoint lacks it; any other fault is an error. found NULL = required. */
Status checkpoint_read_section_opt(const char *ckpt_dir, const char *name, Comm *comm, void **data, size_t *n_bytes,
                                   int *found);

#endif
