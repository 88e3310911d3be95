/* test_checkpoint: the checkpoint format through its public API on a tiny one-rank model
 * (clustered MoE, so the cluster and placement sections are present):
 * - save + load round trip: parameters, Adam moments and the training position bitwise, the
 *   clustered layers' reference partitions (section cluster.ref) and a caller's own section
 *   (checkpoint_save_with, read back with checkpoint_read_section_opt; an absent one is found 0);
 * - a folder holds model.bin and COMPLETE only (no rank_*.bin), checkpoint_verify reports
 *   the step and the rank count;
 * - a flipped byte in model.bin and a truncated model.bin are refused, naming the file;
 * - COMPLETE edited to another step or another rank count is refused by checkpoint_verify;
 * - checkpoint_find_latest_valid skips a damaged newest checkpoint, returns the older one
 *   and says which one it skipped and why;
 * - keep = 1 leaves exactly one step_* folder and no .del_* / .tmp_* leftovers; keep = 2 two;
 * - a model of another shape is refused naming the differing tensor. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "checkpoint.h"
#include "comm.h"
#include "config.h"
#include "harness.h"
#include "model.h"

enum { V = 29, B = 3 };

static char run[256];

static void make_cfg(Config *cfg, int d_model) {
    config_defaults(cfg);
    cfg->model.d_model = d_model; cfg->model.n_layer = 2; cfg->model.n_head = 2; cfg->model.seq_len = 8;
    cfg->moe.kind = MOE_KIND_CLUSTERED; cfg->moe.n_experts = 8; cfg->moe.top_k = 2; cfg->moe.d_ff_expert = 8;
    cfg->moe.every = 1; cfg->moe.n_groups = 4; cfg->moe.rank = 2;
    cfg->run.seed = 5;
}

static Status new_model(Model *m, Comm *comm, const Backend *be, int d_model, uint64_t seed) {
    Config cfg;
    make_cfg(&cfg, d_model);
    cfg.run.seed = seed;
    TRY(model_init(m, &cfg, V, 0, B, be, comm));
    model_init_params(m);
    return status_ok();
}

/* entries of run/ckpt whose name starts with prefix */
static int count_prefix(const char *prefix) {
    char dir[300];
    snprintf(dir, sizeof dir, "%s/ckpt", run);
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (!strncmp(e->d_name, prefix, strlen(prefix))) n++;
    closedir(d);
    return n;
}

static int count_in(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (!strncmp(e->d_name, prefix, strlen(prefix))) n++;
    closedir(d);
    return n;
}

static int same_state(const Model *a, const Model *b) {
    int same = 1;
    for (int c = 0; c < PCAT_N; c++) {
        size_t n = sizeof(float) * a->n_cat[c];
        same &= !memcmp(a->params[c], b->params[c], n) && !memcmp(a->adam_m[c], b->adam_m[c], n) &&
                !memcmp(a->adam_v[c], b->adam_v[c], n);
    }
    return same;
}

static void step_dir(char *dst, size_t cap, long step) { snprintf(dst, cap, "%s/ckpt/step_%08ld", run, step); }

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return 0;
    fputs(text, f);
    return fclose(f) == 0;
}

/* the skipped report is one line per folder: join them for the TAP line */
static void one_line(char *s) {
    for (; *s; s++)
        if (*s == '\n') *s = s[1] ? ' ' : 0;
}

static void copy_file(const char *from, const char *to) {
    void *d = NULL;
    size_t n = 0;
    if (STATUS_OK(file_read_all(from, &d, &n))) {
        Status st = file_write_replace(to, d, n, 0);
        if (!STATUS_OK(st)) printf("# %s\n", st.msg);
    }
    free(d);
}

int main(void) {
    Comm comm;
    comm_single_init(&comm);
    Backend be;
    ok(STATUS_OK(backend_cpu_init(&be, 1)), "cpu backend");
    snprintf(run, sizeof run, "test_checkpoint_run_%d", (int)getpid());
    Model a, b;
    Status st = new_model(&a, &comm, &be, 16, 5);
    ok(STATUS_OK(st), "model a (%s)", st.msg);
    st = new_model(&b, &comm, &be, 16, 6);
    ok(STATUS_OK(st), "model b, another seed (%s)", st.msg);
    /* non-trivial Adam moments */
    for (int c = 0; c < PCAT_N; c++)
        for (size_t i = 0; i < a.n_cat[c]; i++) {
            a.adam_m[c][i] = 0.001f * (float)(i % 97) - 0.03f;
            a.adam_v[c][i] = 1e-4f * (float)(i % 89);
        }
    ok(!same_state(&a, &b), "the two models differ before loading");

    /* ---- round trip ---- */
    for (int l = 0; l < a.L; l++) {   /* a reference partition that is not the initial one; b's unknown */
        for (int i = 0; i < a.ffn[l].E; i++) a.cstate[l].group_ref[i] = (int32_t)((i + l + 1) % a.ffn[l].G);
        b.cstate[l].ref_known = 0;
    }
    TrainPos pos = {3, 4567, 12.5, 5};
    const double mine[3] = {8, 0.5, -2};
    CheckpointSection sec = {"run.test", mine, sizeof mine};
    st = checkpoint_save_with(run, &a, &pos, 1, &sec, 1);
    ok(STATUS_OK(st), "save step 3 with a section of the caller's (%s)", st.msg);
    char ck3[512], path[600];
    step_dir(ck3, sizeof ck3, 3);
    TrainPos p2;
    memset(&p2, 0, sizeof p2);
    st = checkpoint_load(ck3, &b, &p2);
    ok(STATUS_OK(st), "load %s (%s)", ck3, st.msg);
    ok(same_state(&a, &b), "parameters and Adam moments round trip bitwise");
    ok(p2.step == 3 && p2.tokens_seen == 4567 && p2.elapsed_s == 12.5 && p2.seed == 5,
       "training position round trips (step %lld, tokens %lld)", (long long)p2.step, (long long)p2.tokens_seen);
    int ref_same = 1;
    for (int l = 0; l < a.L; l++)
        ref_same &= b.cstate[l].ref_known == 1 &&
                    !memcmp(a.cstate[l].group_ref, b.cstate[l].group_ref, sizeof(int32_t) * a.ffn[l].E);
    ok(ref_same, "reference partitions (cluster.ref) round trip");
    {
        void *d = NULL;
        size_t nd = 0;
        int found = -1;
        st = checkpoint_read_section_opt(ck3, "run.test", &comm, &d, &nd, &found);
        ok(STATUS_OK(st) && found == 1 && nd == sizeof mine && !memcmp(d, mine, sizeof mine),
           "the caller's section reads back (found %d, %zu bytes) (%s)", found, nd, st.msg);
        xfree(d);
        d = NULL;
        st = checkpoint_read_section_opt(ck3, "run.absent", &comm, &d, &nd, &found);
        ok(STATUS_OK(st) && found == 0 && d == NULL && nd == 0, "an absent optional section: found 0 (%s)", st.msg);
        st = checkpoint_read_section(ck3, "run.absent", &comm, &d, &nd);
        ok(!STATUS_OK(st) && strstr(st.msg, "run.absent") && strstr(st.msg, "missing"),
           "an absent required section is an error: %.200s", st.msg);
    }
    ok(count_in(ck3, "rank_") == 0, "no rank_*.bin files are written");
    snprintf(path, sizeof path, "%s/model.bin", ck3);
    ok(file_exists(path), "model.bin present");
    snprintf(path, sizeof path, "%s/COMPLETE", ck3);
    ok(file_exists(path), "COMPLETE present");
    CheckpointInfo info = {-1, -1};
    st = checkpoint_verify(ck3, &info);
    ok(STATUS_OK(st) && info.step == 3 && info.ranks == 1, "checkpoint_verify: step %lld, %d rank(s) (%s)",
       (long long)info.step, info.ranks, st.msg);

    /* ---- a model of another shape ---- */
    Model c;
    st = new_model(&c, &comm, &be, 24, 5);
    ok(STATUS_OK(st), "model c with d_model 24");
    st = checkpoint_load(ck3, &c, &p2);
    ok(!STATUS_OK(st) && strstr(st.msg, "model.bin") && strstr(st.msg, "shape mismatch"),
       "loading into another shape is refused: %.200s", st.msg);
    model_free(&c);

    /* ---- pruning: keep = 1, then keep = 2 ---- */
    pos.step = 5;
    ok(STATUS_OK(checkpoint_save(run, &a, &pos, 1)), "save step 5 (keep 1)");
    pos.step = 7;
    ok(STATUS_OK(checkpoint_save(run, &a, &pos, 1)), "save step 7 (keep 1)");
    char ck7[512], ck9[512];
    step_dir(ck7, sizeof ck7, 7);
    step_dir(ck9, sizeof ck9, 9);
    ok(count_prefix("step_") == 1 && file_exists(ck7), "keep 1: exactly one step_* folder, step 7 (%d)", count_prefix("step_"));
    ok(count_prefix(".del_") == 0 && count_prefix(".tmp_") == 0, "keep 1: no .del_* or .tmp_* leftovers");
    pos.step = 9;
    ok(STATUS_OK(checkpoint_save(run, &a, &pos, 2)), "save step 9 (keep 2)");
    ok(count_prefix("step_") == 2 && file_exists(ck7) && file_exists(ck9), "keep 2: steps 7 and 9 remain");
    ok(count_prefix(".del_") == 0 && count_prefix(".tmp_") == 0, "keep 2: no leftovers");
    char found[600], skipped[2048];
    st = checkpoint_find_latest_valid(run, found, sizeof found, skipped, sizeof skipped);
    ok(STATUS_OK(st) && !strcmp(found, ck9) && skipped[0] == 0, "find_latest_valid: %s, nothing skipped", found);

    /* ---- damage the newest (step 9), keeping a pristine copy of its model.bin ---- */
    char mb[600], keepcopy[600];
    snprintf(mb, sizeof mb, "%s/model.bin", ck9);
    snprintf(keepcopy, sizeof keepcopy, "%s/model.bin.orig", run);
    copy_file(mb, keepcopy);
    void *img = NULL;
    size_t n = 0;
    st = file_read_all(mb, &img, &n);
    ok(STATUS_OK(st) && n > 1000, "read model.bin (%zu bytes)", n);
    unsigned char *bytes = img;
    bytes[n / 2] ^= 0x40;   /* inside a parameter or moment section */
    ok(STATUS_OK(file_write_replace(mb, img, n, 0)), "flip one byte in the middle of model.bin");
    st = checkpoint_verify(ck9, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, mb) && strstr(st.msg, "checksum"), "verify refuses the flipped byte: %s", st.msg);
    st = checkpoint_load(ck9, &b, &p2);
    ok(!STATUS_OK(st) && strstr(st.msg, mb) && strstr(st.msg, "checksum"), "load refuses the flipped byte: %s", st.msg);
    st = checkpoint_find_latest_valid(run, found, sizeof found, skipped, sizeof skipped);
    one_line(skipped);
    ok(STATUS_OK(st) && !strcmp(found, ck7), "find_latest_valid falls back to step 7: %s", found);
    ok(strstr(skipped, "skipped") && strstr(skipped, "step_00000009") && strstr(skipped, "checksum"),
       "and says which one it skipped and why: %.300s", skipped);
    checkpoint_find_latest(run, found, sizeof found);
    ok(!strcmp(found, ck9), "(checkpoint_find_latest, marker only, still names step 9)");

    /* truncated */
    bytes[n / 2] ^= 0x40;
    ok(STATUS_OK(file_write_replace(mb, img, n - 100, 0)), "truncate model.bin by 100 bytes");
    st = checkpoint_verify(ck9, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, mb) && strstr(st.msg, "truncated"), "verify refuses the truncated file: %s", st.msg);
    st = checkpoint_load(ck9, &b, &p2);
    ok(!STATUS_OK(st) && strstr(st.msg, mb) && strstr(st.msg, "truncated"), "load refuses the truncated file: %s", st.msg);
    st = checkpoint_verify_image("mem.bin", img, 10, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, "mem.bin"), "verify_image refuses 10 bytes: %s", st.msg);
    free(img);
    copy_file(keepcopy, mb);
    ok(STATUS_OK(checkpoint_verify(ck9, &info)) && info.step == 9, "the restored model.bin verifies again");

    /* COMPLETE edited */
    char marker[600];
    snprintf(marker, sizeof marker, "%s/COMPLETE", ck9);
    ok(write_text(marker, "step 8 ranks 1\n"), "edit COMPLETE to step 8");
    st = checkpoint_verify(ck9, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, "COMPLETE") && strstr(st.msg, "step 8"), "verify refuses another step: %s", st.msg);
    st = checkpoint_find_latest_valid(run, found, sizeof found, skipped, sizeof skipped);
    one_line(skipped);
    ok(!strcmp(found, ck7) && strstr(skipped, "step_00000009"), "find_latest_valid skips it: %.200s", skipped);
    ok(write_text(marker, "step 9 ranks 4\n"), "edit COMPLETE to 4 ranks");
    st = checkpoint_verify(ck9, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, "COMPLETE") && strstr(st.msg, "4 ranks"), "verify refuses another rank count: %s", st.msg);
    ok(write_text(marker, "garbage"), "edit COMPLETE to garbage");
    st = checkpoint_verify(ck9, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, "COMPLETE"), "verify refuses an unreadable marker: %s", st.msg);
    ok(write_text(marker, "step 9 ranks 1\n"), "restore COMPLETE");
    st = checkpoint_verify(ck9, &info);
    ok(STATUS_OK(st) && info.step == 9 && info.ranks == 1, "step 9 verifies again (%s)", st.msg);
    /* model.bin missing */
    ok(remove(mb) == 0, "remove step 9's model.bin");
    st = checkpoint_verify(ck9, &info);
    ok(!STATUS_OK(st) && strstr(st.msg, "model.bin"), "verify refuses a folder without model.bin: %s", st.msg);
    st = checkpoint_find_latest_valid(run, found, sizeof found, skipped, sizeof skipped);
    ok(!strcmp(found, ck7), "find_latest_valid falls back to step 7 again");
    /* nothing valid at all */
    snprintf(mb, sizeof mb, "%s/model.bin", ck7);
    ok(remove(mb) == 0, "remove step 7's model.bin too");
    st = checkpoint_find_latest_valid(run, found, sizeof found, skipped, sizeof skipped);
    ok(STATUS_OK(st) && found[0] == 0 && strstr(skipped, "step_00000007") && strstr(skipped, "step_00000009"),
       "no valid checkpoint: empty path, both listed as skipped");

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", run);
    if (system(cmd) != 0) printf("# could not remove %s\n", run);
    model_free(&a); model_free(&b);
    backend_free(&be);
    return harness_done();
}
