/* precision: the clustered experts' number formats inside the model (DESIGN.md §1.5-6):
 * - QAT (precision.mode: qat): a shadow copy of this rank's expert arrays, refreshed from
 *   the FP32 masters (bases rounded to FP16, factors fake-quantised to INT4), that the
 *   clustered layers read in forward and in the activation-gradient products; the weight
 *   gradients go to the masters unchanged (straight-through). Relative quantisation errors
 *   per layer.
 * - the stored formats: the checkpoint section "experts.q" (layout below), and its use in
 *   inference: the clustered layers compute from FP16/INT4 tensors (clustered.c's stored
 *   path), optionally under a residency manager per layer (offload.h) with LRU, a host or
 *   file tier and EMA prefetch.
 * Backend memory: the QAT shadow, the resident stored blobs and the offloaded groups' resident
 * slots are backend memory, built and read through the backend's slots (copy, fake_quant,
 * dequant_rows via quant.c's kernels). Offloading: the residency manager runs with device slots
 * (offload.h: OffloadOptions.be): the host tier and the file staging are pinned host memory, a
 * fetch is an asynchronous copy on the backend's side stream that the compute waits for just
 * before the group's decode (offload_wait), the EMA prefetch's copies overlap the next batch.
 * prec_measure's copies are host memory.
 * Does not: train in reduced precision, or offload during training (train.c refuses
 * offload.enabled with qat; residency.c offloads host arrays in place).
 * Memory: Precision owns the shadow, the stored blobs, the managers and the MoeParams views
 * it points the model at (m->ffn_view); prec_free detaches them.
 *
 * ---- section "experts.q" (little-endian) ----
 * header: char magic[8] = "DCMOEQ01", u32 version = 1, u32 n_layers, then per clustered
 * layer (ascending layer index) 8 x i32: layer, G, K, D, F, F1, r, int4_group.
 * data: per clustered layer in the same order, in the canonical (global) order:
 *   base1[g] for g = 0..G-1   FP16 [D, F1] row-major   (QFORMAT_F16 of quant.h)
 *   base2[g] for g = 0..G-1   FP16 [F, D]
 *   a1[e] for e = 0..E-1      INT4 [D, r]   (quant.h INT4 blob: nibbles, scales, zeros)
 *   b1[e]                     INT4 [F1, r]
 *   a2[e]                     INT4 [F, r]
 *   b2[e]                     INT4 [D, r]
 * every tensor occupying qtensor_bytes(fmt, rows, cols, int4_group) bytes, no padding.
 * Group g's members are the "cluster" section's members[g*K .. g*K+K-1]. */
#ifndef DCMOE_PRECISION_H
#define DCMOE_PRECISION_H

#include <stddef.h>
#include "config.h"
#include "memacct.h"
#include "model.h"
#include "offload.h"
#include "quant.h"

typedef struct PrecLayer {
    int layer, Gl, K, D, F, F1, r, group;
    size_t sp[6];              /* span bytes of a group: base1, base2, a1 x K, b1 x K, a2 x K, b2 x K */
    size_t unit_bytes;
    unsigned char *blob;       /* [Gl, unit_bytes] stored groups, backend memory (NULL under offloading) */
    int dev;                   /* blob / the manager's slots are backend memory (views have QTensor.dev set) */
    int offload;               /* om is in use */
    OffloadManager om;
    int pinned;                /* this batch's groups were pinned by prepare */
    QTensor *qv;               /* [2 + 4K] views of the group handed out last */
    MoeStored ms;
    struct Precision *owner;
} PrecLayer;

typedef struct Precision {
    int mode;                  /* enum PrecisionMode */
    int group;                 /* INT4 group */
    Model *m;
    PrecLayer *layers;         /* [L] (clustered layers used) */
    MoeParams *views;          /* [L] what m->ffn_view points at */
    float *shadow;             /* QAT: fake-quantised copy of the expert category (backend memory) */
    float *host;               /* QAT: host staging [n_cat[EXPERT]] */
    int n_clustered;
    double *qerr;              /* [n_clustered, 2] relative Frobenius error of bases, factors */
    int stored;                /* stored formats attached (inference) */
    Status err;                /* first error of the stored path (fetch, I/O) */
    int has_err;
} Precision;

/* set up for cfg->precision.mode: QAT allocates the shadow and points the model at it;
 * other modes attach nothing (the model computes from its FP32 arrays) */
Status prec_init(Precision *pr, Model *m);
void prec_free(Precision *pr);   /* detaches m->ffn_view; zeroed / twice: safe */

/* QAT: rebuild the shadow from the masters on the backend (copy, then the fake_quant slot per
 * clustered tensor; no host traffic, not collective). Call before every forward that should
 * see the current weights. No-op in other modes. */
void prec_qat_refresh(Precision *pr);
/* qerr of the current masters in storage or qat mode, from host copies (QAT: of the shadow as
 * last built, so call prec_qat_refresh first; storage: quant_fake on the host); collective
 * (sums over ranks); no-op in fp32 mode or without clustered layers */
void prec_measure(Precision *pr);

/* experts.q from the canonical FP32 expert array full[n_expert_full] (every rank's experts,
 * global order, as model_ep_gather gives): *out (malloc'd) holds *n bytes */
size_t prec_q_bytes(const Model *m, int group);
void prec_q_pack(const Model *m, const float *full, int group, void *out);
/* check an experts.q image against the model; the error names `what` (file and section) */
Status prec_q_check(const Model *m, const void *q, size_t n, const char *what);
/* decode experts.q into a canonical FP32 expert array full[n_expert_full] (tests; the
 * non-clustered parts of full are left alone) */
void prec_q_decode(const Model *m, const void *q, float *full);

/* inference: attach the stored formats from an experts.q image (every rank holds it) for this
 * rank's groups; with oc->enabled a residency manager per clustered layer (units = local
 * groups, files under dir when the file tier is used). acct (may be NULL) receives the
 * resident stored bytes (DEVICE tier) and the backing copies. */
Status prec_attach_stored(Precision *pr, const void *q, size_t n, const OffloadConfig *oc, const char *dir,
                          MemAcct *acct);
/* around every inference forward (offloading: step protocol, EMA, idle eviction) */
void prec_begin_batch(Precision *pr, long batch);
void prec_end_batch(Precision *pr);
/* the first stored-path error (I/O, missing file) or OK */
static inline Status prec_status(const Precision *pr) { return pr->has_err ? pr->err : status_ok(); }
/* offloading statistics summed over the clustered layers (zeros without offloading) */
void prec_offload_totals(const Precision *pr, OffloadStats *out);

#endif
