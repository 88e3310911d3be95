/* calib: the measured hardware file of `dcmoe bench calibrate` and its loader. The benchmark
 * times, through the trainer's own backend and communicator, sgemm over a grid of shapes (plus
 * a config's model shapes), stream-like copy and triad bandwidth, the trainer's non-GEMM ops per
 * element (LayerNorm, attention, activation, cross-entropy, embedding, row gathers, AdamW, the
 * router's selection), and all-to-all(v) and allreduce over a dense size grid between the ranks
 * it runs on; each point is repeated (median and relative spread) and written as YAML. The
 * loader reads such a file back with file:line:column errors, and answers "how long does this
 * GEMM / op / collective take" by interpolating the measured curves.
 * Does not: model anything beyond one rank and the ranks the file was measured with (sim.c
 * does), or fit anything to training runs. A HwFile owns its arrays (hwfile_free).
 *
 * Legend: M N K = GEMM rows, columns, inner dimension (C[M,N] = op(A)[M,K] op(B)[K,N]). */
#ifndef DCMOE_CALIB_H
#define DCMOE_CALIB_H

#include <stdio.h>
#include "comm.h"
#include "config.h"
#include "util.h"

/* the trainer's non-GEMM ops, each timed per unit (ns): see hw_op_names in calib.c */
enum HwOp {
    HW_OP_LAYERNORM_FWD = 0, HW_OP_LAYERNORM_BWD,   /* per element of [N, D] */
    HW_OP_ATTENTION_FWD, HW_OP_ATTENTION_BWD,       /* per B H T T hd (the kernel's loops, incl. its small GEMMs) */
    HW_OP_ACT_FWD, HW_OP_ACT_BWD,                   /* per element of [N, F] */
    HW_OP_XENT_FWD, HW_OP_XENT_BWD,                 /* per element of [N, V] */
    HW_OP_EMBED_FWD, HW_OP_EMBED_BWD,               /* per element of [N, D] */
    HW_OP_ROWS,                                     /* gather / scatter-add of rows: per element moved */
    HW_OP_ADAMW, HW_OP_SUMSQ,                       /* per parameter */
    HW_OP_ROUTER_FWD, HW_OP_ROUTER_BWD,             /* the router's host-side selection and its backward: per token x expert */
    HW_OP_N
};

typedef struct HwGemm { int ta, tb, M, N, K; double gflops, spread; } HwGemm;
typedef struct HwPoint { double bytes, seconds, spread; } HwPoint;
/* bulk-synchronous straggling: every rank runs the same work of interval_s, then they
 * synchronise; overhead = sum over intervals of the slowest rank's time / the mean rank's - 1
 * (median over blocks; spread = max - min of the blocks' overheads) */
typedef struct HwStrag { double interval_s, overhead, spread; } HwStrag;

typedef struct HwFile {
    char path[4096];
    char date[64];                  /* UTC, ISO 8601 */
    char description[512];          /* host-independent: CPU model, BLAS, ranks, threads */
    int ranks, threads;             /* the ranks the collectives were measured between; BLAS threads per rank */
    HwGemm *gemm;                   /* [n_gemm] */
    int n_gemm;
    double copy_gbs, triad_gbs;     /* per rank, all ranks running at once */
    double copy_cold_gbs;           /* a 512 KiB copy with the caches evicted (memory.copy_cold_gbs; default copy_gbs) */
    double op_ns[HW_OP_N], op_spread[HW_OP_N];
    HwPoint *alltoall;              /* [n_alltoall] bytes each rank sends to the others in one call -> seconds */
    int n_alltoall;
    HwPoint *allreduce;             /* [n_allreduce] buffer bytes -> seconds */
    int n_allreduce;
    HwStrag *straggle;              /* [n_straggle] by increasing interval (ranks > 1) */
    int n_straggle;
} HwFile;

extern const char *const hw_op_names[HW_OP_N];

/* read a hardware file; errors name file:line:column and the field */
Status hwfile_load(HwFile *h, const char *path);
/* the same from memory (name stands for the file in messages) */
Status hwfile_load_string(HwFile *h, const char *yaml, size_t n, const char *name);
void hwfile_free(HwFile *h);
/* write h as YAML; the inverse of hwfile_load */
Status hwfile_write(const HwFile *h, const char *path);

/* seconds of one GEMM: the measured rate of the same transposition at this shape, or
 * interpolated (inverse-distance in log M, log N, log K over the 4 nearest measured shapes) */
double hwfile_gemm_s(const HwFile *h, int ta, int tb, int M, int N, int K);
/* seconds of one collective moving `bytes`: piecewise linear between measured sizes, the end
 * segments extended (clamped at the smallest size's time below it) */
double hwfile_curve_s(const HwPoint *p, int n, double bytes);
/* straggling overhead for synchronisation intervals of t seconds: linear in log t between the
 * measured intervals, the end values beyond them; 0 without measurements */
double hwfile_straggle(const HwFile *h, double t);

typedef struct CalibOptions {
    const char *out;                /* hardware file to write */
    const Config *cfg;              /* NULL or a model whose GEMM shapes and op sizes join the grid */
    int quick;                      /* a tiny grid (tests) */
    int model_only;                 /* GEMMs: only cfg's shapes; collectives one size per octave (a short
                                       calibration taken right before the runs it predicts) */
    int threads;                    /* BLAS threads per rank */
} CalibOptions;

/* `dcmoe bench calibrate`: every rank measures; rank 0 prints a summary and writes o->out */
Status calib_run(Comm *comm, const CalibOptions *o);

#endif
