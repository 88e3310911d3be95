/* sweep.c: parse and expand the `sweep:` block (libyaml events; marks are 0-based, messages
 * 1-based), including chained `blocks:` and their "@block" references (see sweep.h). */
#include "sweep.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

typedef struct Parser {
    yaml_parser_t p;
    yaml_event_t ev;
    const char *file;
} Parser;

static Status next(Parser *ps) {
    yaml_event_delete(&ps->ev);
    if (!yaml_parser_parse(&ps->p, &ps->ev))
        return status_errorf("%s:%zu:%zu: YAML syntax error: %s", ps->file, ps->p.problem_mark.line + 1,
                             ps->p.problem_mark.column + 1, ps->p.problem ? ps->p.problem : "?");
    return status_ok();
}

static const char *event_kind(const yaml_event_t *ev) {
    switch (ev->type) {
    case YAML_MAPPING_START_EVENT: return "a mapping";
    case YAML_SEQUENCE_START_EVENT: return "a sequence";
    case YAML_SCALAR_EVENT: return "a scalar";
    default: return "something else";
    }
}

/* skip the node that starts at the current event (scalar, sequence or mapping) */
static Status skip_node(Parser *ps) {
    int depth = 0;
    do {
        yaml_event_type_t t = ps->ev.type;
        if (t == YAML_SEQUENCE_START_EVENT || t == YAML_MAPPING_START_EVENT) depth++;
        if (t == YAML_SEQUENCE_END_EVENT || t == YAML_MAPPING_END_EVENT) depth--;
        if (depth > 0) TRY(next(ps));
    } while (depth > 0);
    return status_ok();
}

/* the parser at a key of a sweep mapping: a new axis named by it (line and column kept) */
static Status new_axis(Parser *ps, const char *kind, SweepAxis *axes, int *n_axes, SweepAxis **out) {
    if (*n_axes >= SWEEP_MAX_KEYS) return status_errorf("%s: sweep.%s: more than %d keys", ps->file, kind, SWEEP_MAX_KEYS);
    size_t line = ps->ev.start_mark.line + 1, col = ps->ev.start_mark.column + 1;
    if (ps->ev.type != YAML_SCALAR_EVENT)
        return status_errorf("%s:%zu:%zu: sweep.%s: expected a key name (a config key, ranks or name), got %s",
                             ps->file, line, col, kind, event_kind(&ps->ev));
    const char *key = (const char *)ps->ev.data.scalar.value;
    if (ps->ev.data.scalar.length >= sizeof axes->key || strlen(key) != ps->ev.data.scalar.length)
        return status_errorf("%s:%zu:%zu: sweep.%s: key '%.40s...' is not a config key (at most %zu bytes, no NUL)",
                             ps->file, line, col, kind, key, sizeof axes->key - 1);
    SweepAxis *ax = &axes[(*n_axes)++];
    memset(ax, 0, sizeof *ax);
    ax->line = (int)line;
    ax->column = (int)col;
    memcpy(ax->key, key, ps->ev.data.scalar.length + 1);
    *out = ax;
    return status_ok();
}

/* a scalar value of axis ax, at most SWEEP_MAX_VALUE bytes */
static Status check_value(Parser *ps, const char *kind, const SweepAxis *ax) {
    if (ps->ev.data.scalar.length > SWEEP_MAX_VALUE)
        return status_errorf("%s:%zu:%zu: sweep.%s.%s: value of %zu bytes is too long (at most %d)", ps->file,
                             ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1, kind, ax->key,
                             ps->ev.data.scalar.length, SWEEP_MAX_VALUE);
    return status_ok();
}

/* key: [v1, v2, ...] mappings of one sweep kind (grid, zip) or, one_value, key: value (a
 * block's fixed settings) */
static Status read_mapping(Parser *ps, const char *kind, SweepAxis *axes, int *n_axes, int one_value) {
    if (ps->ev.type != YAML_MAPPING_START_EVENT)
        return status_errorf("%s:%zu:%zu: sweep.%s: expected a mapping of key: %s", ps->file, ps->ev.start_mark.line + 1,
                             ps->ev.start_mark.column + 1, kind, one_value ? "value" : "[values]");
    for (;;) {
        TRY(next(ps));
        if (ps->ev.type == YAML_MAPPING_END_EVENT) return status_ok();
        SweepAxis *ax = NULL;
        TRY(new_axis(ps, kind, axes, n_axes, &ax));
        TRY(next(ps));
        if (one_value) {
            if (ps->ev.type != YAML_SCALAR_EVENT)
                return status_errorf("%s:%d:%d: sweep.%s.%s: expected one value (lists belong in the block's grid or zip)",
                                     ps->file, ax->line, ax->column, kind, ax->key);
            TRY(check_value(ps, kind, ax));
            ax->values = malloc(sizeof(char *));
            ax->values[0] = strdup((const char *)ps->ev.data.scalar.value);
            ax->n_values = 1;
            continue;
        }
        if (ps->ev.type != YAML_SEQUENCE_START_EVENT)
            return status_errorf("%s:%d:%d: sweep.%s.%s: expected a list of values", ps->file, ax->line, ax->column, kind, ax->key);
        for (;;) {
            TRY(next(ps));
            if (ps->ev.type == YAML_SEQUENCE_END_EVENT) break;
            if (ps->ev.type != YAML_SCALAR_EVENT)
                return status_errorf("%s:%zu:%zu: sweep.%s.%s: values must be scalars", ps->file,
                                     ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1, kind, ax->key);
            TRY(check_value(ps, kind, ax));
            ax->values = realloc(ax->values, sizeof(char *) * (ax->n_values + 1));
            ax->values[ax->n_values++] = strdup((const char *)ps->ev.data.scalar.value);
        }
        if (ax->n_values == 0)
            return status_errorf("%s:%d:%d: sweep.%s.%s: empty list", ps->file, ax->line, ax->column, kind, ax->key);
    }
}
static Status read_axes(Parser *ps, const char *kind, SweepAxis *axes, int *n_axes) { return read_mapping(ps, kind, axes, n_axes, 0); }
static Status read_set(Parser *ps, const char *kind, SweepAxis *axes, int *n_axes) { return read_mapping(ps, kind, axes, n_axes, 1); }

/* blocks: {name: {set: {...}, grid: {...}, zip: {...}}, ...} */
static Status read_blocks(Parser *ps, Sweep *sw) {
    if (ps->ev.type != YAML_MAPPING_START_EVENT)
        return status_errorf("%s:%zu:%zu: sweep.blocks: expected a mapping of block name: {set, grid, zip}", ps->file,
                             ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1);
    if (!sw->blocks) sw->blocks = xcalloc(sizeof(SweepBlock) * SWEEP_MAX_BLOCKS);
    for (;;) {
        TRY(next(ps));
        if (ps->ev.type == YAML_MAPPING_END_EVENT) break;
        size_t line = ps->ev.start_mark.line + 1, col = ps->ev.start_mark.column + 1;
        const char *name = ps->ev.type == YAML_SCALAR_EVENT ? (const char *)ps->ev.data.scalar.value : "";
        if (ps->ev.type != YAML_SCALAR_EVENT || !name[0] || ps->ev.data.scalar.length >= sizeof sw->blocks->name ||
            strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") != strlen(name))
            return status_errorf("%s:%zu:%zu: sweep.blocks: expected a block name (letters, digits, _ - ., at most %zu bytes)",
                                 ps->file, line, col, sizeof sw->blocks->name - 1);
        if (sw->n_blocks >= SWEEP_MAX_BLOCKS)
            return status_errorf("%s:%zu:%zu: sweep.blocks: more than %d blocks", ps->file, line, col, SWEEP_MAX_BLOCKS);
        for (int b = 0; b < sw->n_blocks; b++)
            if (!strcmp(sw->blocks[b].name, name))
                return status_errorf("%s:%zu:%zu: sweep.blocks.%s: a second block of that name (the first is at line %d)",
                                     ps->file, line, col, name, sw->blocks[b].line);
        SweepBlock *bl = &sw->blocks[sw->n_blocks++];
        str_fmt(bl->name, sizeof bl->name, "%s", name);
        bl->line = (int)line;
        bl->column = (int)col;
        TRY(next(ps));
        if (ps->ev.type != YAML_MAPPING_START_EVENT)
            return status_errorf("%s:%d:%d: sweep.blocks.%s: expected a mapping with set, grid and/or zip (may be {})",
                                 ps->file, bl->line, bl->column, bl->name);
        for (;;) {
            TRY(next(ps));
            if (ps->ev.type == YAML_MAPPING_END_EVENT) break;
            char kind[32], where[128];
            size_t l = ps->ev.start_mark.line + 1, c = ps->ev.start_mark.column + 1;
            str_fmt(kind, sizeof kind, "%.31s", ps->ev.type == YAML_SCALAR_EVENT ? (const char *)ps->ev.data.scalar.value : "?");
            str_fmt(where, sizeof where, "blocks.%s.%s", bl->name, kind);
            TRY(next(ps));
            if (!strcmp(kind, "set")) TRY(read_set(ps, where, bl->set, &bl->n_set));
            else if (!strcmp(kind, "grid")) TRY(read_axes(ps, where, bl->grid, &bl->n_grid));
            else if (!strcmp(kind, "zip")) TRY(read_axes(ps, where, bl->zip, &bl->n_zip));
            else return status_errorf("%s:%zu:%zu: sweep.blocks.%s.%s: unknown (allowed: set, grid, zip)", ps->file, l, c,
                                      bl->name, kind);
        }
    }
    if (sw->n_blocks == 0)
        return status_errorf("%s:%zu:%zu: sweep.blocks: no block (name at least one, e.g. train: {} and sim: {set: ...})",
                             ps->file, ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1);
    return status_ok();
}

static Status parse_block(const char *path, Sweep *sw) {
    void *text;
    size_t n;
    TRY(file_read_all(path, &text, &n));
    Parser ps;
    memset(&ps, 0, sizeof ps);
    ps.file = path;
    yaml_parser_initialize(&ps.p);
    yaml_parser_set_input_string(&ps.p, text, n);
    Status st = status_ok();
    int depth = 0, done = 0;
    while (STATUS_OK(st) && !done) {
        st = next(&ps);
        if (!STATUS_OK(st)) break;
        switch (ps.ev.type) {
        case YAML_STREAM_END_EVENT: done = 1; break;
        case YAML_MAPPING_START_EVENT: depth++; break;
        case YAML_MAPPING_END_EVENT: depth--; break;
        case YAML_SCALAR_EVENT:
            if (depth == 1 && !strcmp((const char *)ps.ev.data.scalar.value, "sweep")) {
                st = next(&ps);
                if (!STATUS_OK(st)) break;
                if (ps.ev.type != YAML_MAPPING_START_EVENT) {
                    st = status_errorf("%s:%zu:%zu: sweep: expected a mapping with grid, zip and/or blocks", path,
                                       ps.ev.start_mark.line + 1, ps.ev.start_mark.column + 1);
                    break;
                }
                for (;;) {
                    st = next(&ps);
                    if (!STATUS_OK(st) || ps.ev.type == YAML_MAPPING_END_EVENT) break;
                    if (ps.ev.type != YAML_SCALAR_EVENT) {
                        st = status_errorf("%s:%zu:%zu: sweep: expected grid, zip or blocks, got %s", path,
                                           ps.ev.start_mark.line + 1, ps.ev.start_mark.column + 1, event_kind(&ps.ev));
                        break;
                    }
                    char kind[32];
                    str_fmt(kind, sizeof kind, "%.31s", (const char *)ps.ev.data.scalar.value);
                    size_t l = ps.ev.start_mark.line + 1, c = ps.ev.start_mark.column + 1;
                    st = next(&ps);
                    if (!STATUS_OK(st)) break;
                    if (!strcmp(kind, "grid")) st = read_axes(&ps, "grid", sw->grid, &sw->n_grid);
                    else if (!strcmp(kind, "zip")) st = read_axes(&ps, "zip", sw->zip, &sw->n_zip);
                    else if (!strcmp(kind, "blocks")) st = read_blocks(&ps, sw);
                    else st = status_errorf("%s:%zu:%zu: sweep.%s: unknown (allowed: grid, zip, blocks)", path, l, c, kind);
                    if (!STATUS_OK(st)) break;
                }
            } else if (depth == 1) {
                st = next(&ps);   /* a value of another section: skip it */
                if (STATUS_OK(st)) st = skip_node(&ps);
            }
            break;
        default: break;
        }
    }
    yaml_event_delete(&ps.ev);
    yaml_parser_delete(&ps.p);
    free(text);
    return st;
}

static Status apply(SweepRun *run, const char *key, const char *value, const char *path, const SweepAxis *ax) {
    if (!strcmp(key, "ranks")) {
        char *end;
        long r = strtol(value, &end, 10);
        if (*end || r < 1 || r > 4096)
            return status_errorf("%s:%d:%d: sweep ranks: '%s' is not a rank count in [1, 4096]", path, ax->line, ax->column, value);
        run->ranks = (int)r;
    } else if (!strcmp(key, "name")) {
        size_t used = strlen(run->name);
        if (used + 1 + strlen(value) >= sizeof run->name)
            return status_errorf("%s:%d:%d: sweep run %d: name '%s-%.40s' is longer than run.name allows (%zu bytes)",
                                 path, ax->line, ax->column, run->index, run->name, value, sizeof run->cfg.run.name - 1);
        str_fmt(run->name + used, sizeof run->name - used, "-%s", value);
    } else {
        char set[256];
        str_fmt(set, sizeof set, "%s=%s", key, value);
        Status st = config_set(&run->cfg, set);
        if (!STATUS_OK(st))
            return status_errorf("%s:%d:%d: sweep run %d: %s", path, ax->line, ax->column, run->index, st.msg);
        int k = !strcmp(key, "sim.trace") ? 0 : !strcmp(key, "sim.aggregate") ? 1 : -1;
        if (k >= 0) { run->ref_line[k] = ax->line; run->ref_column[k] = ax->column; }
    }
    if (run->n_sets >= (int)(sizeof run->sets / sizeof run->sets[0]))
        return status_errorf("%s:%d:%d: sweep run %d: more than %zu settings", path, ax->line, ax->column, run->index,
                             sizeof run->sets / sizeof run->sets[0]);
    str_fmt(run->sets[run->n_sets++], sizeof run->sets[0], "%s=%s", key, value);
    return status_ok();
}

/* points of a grid + zip: zip length (1 without zip) x the grid's value counts */
static Status count_points(const char *path, const char *kind, const SweepAxis *grid, int n_grid, const SweepAxis *zip,
                           int n_zip, long *n) {
    long z = 1;
    for (int i = 0; i < n_zip; i++) {
        if (i > 0 && zip[i].n_values != zip[0].n_values)
            return status_errorf("%s:%d:%d: sweep.%szip.%s has %d values but sweep.%szip.%s has %d (zip lists pair up, so "
                                 "they need equal lengths)", path, zip[i].line, zip[i].column, kind, zip[i].key,
                                 zip[i].n_values, kind, zip[0].key, zip[0].n_values);
        z = zip[i].n_values;
    }
    for (int i = 0; i < n_grid; i++) z *= grid[i].n_values;
    *n = z;
    return status_ok();
}

/* apply point p of a grid + zip (grid digits: last axis fastest, the zip tuple slowest) */
static Status apply_point(SweepRun *run, long p, const SweepAxis *grid, int n_grid, const SweepAxis *zip, int n_zip,
                          const char *path) {
    long rest = p;
    int digit[SWEEP_MAX_KEYS];
    for (int i = n_grid - 1; i >= 0; i--) { digit[i] = (int)(rest % grid[i].n_values); rest /= grid[i].n_values; }
    int zi = (int)rest;
    for (int i = 0; i < n_zip; i++) TRY(apply(run, zip[i].key, zip[i].values[zi], path, &zip[i]));
    for (int i = 0; i < n_grid; i++) TRY(apply(run, grid[i].key, grid[i].values[digit[i]], path, &grid[i]));
    return status_ok();
}

/* the value a run's assignments give key (the last one), or NULL */
static const char *run_value(const SweepRun *r, const char *key) {
    size_t n = strlen(key);
    const char *v = NULL;
    for (int i = 0; i < r->n_sets; i++)
        if (!strncmp(r->sets[i], key, n) && r->sets[i][n] == '=') v = r->sets[i] + n + 1;
    return v;
}

static int block_sweeps(const SweepBlock *b, const char *key) {
    for (int i = 0; i < b->n_grid; i++) if (!strcmp(b->grid[i].key, key)) return 1;
    for (int i = 0; i < b->n_zip; i++) if (!strcmp(b->zip[i].key, key)) return 1;
    return 0;
}

/* sim.trace / sim.aggregate = "@block" of the simulate runs -> the metrics.h5 of the run of that
 * block with the same shared point and the same values of every key both blocks sweep */
static Status resolve_refs(const char *path, Sweep *sw) {
    static const char *const keys[2] = {"sim.trace", "sim.aggregate"};
    char cwd[2048];
    if (!getcwd(cwd, sizeof cwd)) str_fmt(cwd, sizeof cwd, ".");
    for (int i = 0; i < sw->n_runs; i++) {
        SweepRun *r = &sw->runs[i];
        for (int k = 0; k < 2; k++) {
            char *val = k ? r->cfg.sim.aggregate : r->cfg.sim.trace;
            if (val[0] != '@') continue;
            if (r->cfg.run.mode != RUN_MODE_SIMULATE) { val[0] = 0; continue; }   /* a trained run does not read it */
            char at[256];
            if (r->ref_line[k] > 0) str_fmt(at, sizeof at, "%s:%d:%d: sweep run %d (%s)", path, r->ref_line[k], r->ref_column[k], i, r->name);
            else str_fmt(at, sizeof at, "%s: sweep run %d (%s), %s from the config", path, i, r->name, keys[k]);
            const char *bname = val + 1;
            if (sw->n_blocks == 0)
                return status_errorf("%s: %s=%s: a reference to another run of the sweep needs sweep.blocks (named stages; "
                                     "this sweep has none)", at, keys[k], val);
            int tb = -1;
            for (int b = 0; b < sw->n_blocks; b++) if (!strcmp(sw->blocks[b].name, bname)) tb = b;
            if (tb < 0) {
                char names[1024] = "";
                size_t used = 0;
                for (int b = 0; b < sw->n_blocks && used < sizeof names - 80; b++)
                    used += (size_t)snprintf(names + used, sizeof names - used, "%s@%s", b ? ", " : "", sw->blocks[b].name);
                return status_errorf("%s: %s=%s: no block named '%s' (allowed: %s)", at, keys[k], val, bname, names);
            }
            if (tb >= r->block)
                return status_errorf("%s: %s=%s: block '%s' does not come before block '%s' (a run reads the logs of runs "
                                     "of earlier blocks only; blocks run in file order)", at, keys[k], val, bname,
                                     sw->blocks[r->block].name);
            const SweepBlock *own = &sw->blocks[r->block], *tgt = &sw->blocks[tb];
            int match = -1, n_match = 0;
            char cands[512] = "";
            size_t cu = 0;
            for (int j = 0; j < sw->n_runs; j++) {
                const SweepRun *t = &sw->runs[j];
                if (t->block != tb || t->shared_point != r->shared_point) continue;
                int same = 1;
                for (int a = 0; a < tgt->n_grid + tgt->n_zip && same; a++) {
                    const char *key = a < tgt->n_grid ? tgt->grid[a].key : tgt->zip[a - tgt->n_grid].key;
                    if (!block_sweeps(own, key)) continue;
                    const char *va = run_value(r, key), *vb = run_value(t, key);
                    same = va && vb && !strcmp(va, vb);
                }
                if (!same) continue;
                match = j;
                n_match++;
                if (cu < sizeof cands - 80) cu += (size_t)snprintf(cands + cu, sizeof cands - cu, "%s%s", n_match > 1 ? ", " : "", t->name);
            }
            if (n_match == 0)
                return status_errorf("%s: %s=%s: no run of block '%s' has this run's shared values and the values of the keys "
                                     "both blocks sweep", at, keys[k], val, bname);
            if (n_match > 1)
                return status_errorf("%s: %s=%s: %d runs of block '%s' match (%s): sweep the keys that tell them apart in "
                                     "block '%s' too", at, keys[k], val, n_match, bname, cands, own->name);
            const SweepRun *t = &sw->runs[match];
            if (t->cfg.run.mode == RUN_MODE_SIMULATE)
                return status_errorf("%s: %s=%s: the runs of block '%s' are simulations (run.mode simulate), not trained runs",
                                     at, keys[k], val, bname);
            const ModelConfig *ma = &r->cfg.model, *mb = &t->cfg.model;
            if (r->cfg.moe.n_experts != t->cfg.moe.n_experts || ma->n_layer != mb->n_layer || r->cfg.moe.kind != t->cfg.moe.kind)
                return status_errorf("%s: %s=%s: %s has moe.kind %d, moe.n_experts=%d, model.n_layer=%d; this run %d, %d, %d "
                                     "(the routing of one model does not fit another)", at, keys[k], val, t->name,
                                     (int)t->cfg.moe.kind, t->cfg.moe.n_experts, mb->n_layer, (int)r->cfg.moe.kind,
                                     r->cfg.moe.n_experts, ma->n_layer);
            if (k == 0) {
                int gpus = r->cfg.sim.nodes * r->cfg.sim.gpus_per_node;
                if (t->cfg.log.trace_interval <= 0)
                    return status_errorf("%s: sim.trace=%s: %s records no routing (log.trace_interval is 0): set "
                                         "log.trace_interval > 0 in block '%s'", at, val, t->name, bname);
                if (t->ranks < 1 || gpus % t->ranks)
                    return status_errorf("%s: sim.trace=%s: %s is trained on %d rank(s), this run simulates sim.nodes=%d x "
                                         "sim.gpus_per_node=%d = %d GPUs (a trace replays on the ranks that recorded it or, "
                                         "tiled, on a multiple of them; sim.routing aggregate with sim.aggregate=%s simulates "
                                         "other sizes)", at, val, t->name, t->ranks, r->cfg.sim.nodes, r->cfg.sim.gpus_per_node,
                                         gpus, val);
                if (t->cfg.moe.top_k != r->cfg.moe.top_k)
                    return status_errorf("%s: sim.trace=%s: %s has moe.top_k=%d, this run %d", at, val, t->name,
                                         t->cfg.moe.top_k, r->cfg.moe.top_k);
            }
            char file[4200];
            if (t->cfg.run.out_dir[0] == '/') str_fmt(file, sizeof file, "%s/%s/metrics.h5", t->cfg.run.out_dir, t->name);
            else str_fmt(file, sizeof file, "%s/%s/%s/metrics.h5", cwd, t->cfg.run.out_dir, t->name);
            if (strlen(file) >= sizeof r->cfg.sim.trace)
                return status_errorf("%s: %s=%s: the path %s is too long", at, keys[k], val, file);
            str_fmt(val, sizeof r->cfg.sim.trace, "%s", file);
            int dup = 0;
            for (int q = 0; q < r->n_needs; q++) dup |= r->needs[q] == match;
            if (!dup) r->needs[r->n_needs++] = match;
        }
    }
    return status_ok();
}

Status sweep_plan(const char *path, const Config *base, Sweep *sw) {
    memset(sw, 0, sizeof *sw);
    TRY(parse_block(path, sw));
    long n_shared = 1;
    TRY(count_points(path, "", sw->grid, sw->n_grid, sw->zip, sw->n_zip, &n_shared));
    int nb = sw->n_blocks > 0 ? sw->n_blocks : 1;
    long per[SWEEP_MAX_BLOCKS], n = 0;
    for (int b = 0; b < nb; b++) {
        per[b] = 1;
        if (sw->n_blocks) {
            char kind[96];
            const SweepBlock *bl = &sw->blocks[b];
            str_fmt(kind, sizeof kind, "blocks.%s.", bl->name);
            TRY(count_points(path, kind, bl->grid, bl->n_grid, bl->zip, bl->n_zip, &per[b]));
        }
        n += n_shared * per[b];
        if (n > 100000) return status_errorf("%s: sweep expands to more than 100000 runs", path);
    }
    sw->n_runs = (int)n;
    sw->runs = xcalloc(sizeof(SweepRun) * (size_t)n);
    int r = 0;
    for (int b = 0; b < nb; b++)
        for (long sp = 0; sp < n_shared; sp++)
            for (long q = 0; q < per[b]; q++, r++) {
                SweepRun *run = &sw->runs[r];
                const SweepBlock *bl = sw->n_blocks ? &sw->blocks[b] : NULL;
                run->index = r;
                run->block = bl ? b : -1;
                run->shared_point = (int)sp;
                run->ranks = 1;
                run->cfg = *base;
                if (bl) str_fmt(run->name, sizeof run->name, "%s-%s", base->run.name, bl->name);
                else str_fmt(run->name, sizeof run->name, "%s", base->run.name);
                if (bl) str_fmt(run->sets[run->n_sets++], sizeof run->sets[0], "block=%s", bl->name);
                TRY(apply_point(run, sp, sw->grid, sw->n_grid, sw->zip, sw->n_zip, path));
                if (bl) {
                    for (int i = 0; i < bl->n_set; i++) TRY(apply(run, bl->set[i].key, bl->set[i].values[0], path, &bl->set[i]));
                    TRY(apply_point(run, q, bl->grid, bl->n_grid, bl->zip, bl->n_zip, path));
                }
                uint32_t h = 0;
                for (int i = 0; i < run->n_sets; i++) h = crc32_update(h, run->sets[i], strlen(run->sets[i]) + 1);
                str_fmt(run->id, sizeof run->id, "r%03d-%08x", r, (unsigned)h);
                Status st = config_validate(&run->cfg);
                if (!STATUS_OK(st)) return status_errorf("%s: sweep run %d (%s): %s", path, r, run->id, st.msg);
                if (run->cfg.train.batch_size % run->ranks)
                    return status_errorf("%s: sweep run %d (%s): train.batch_size=%d is not divisible by ranks=%d", path, r,
                                         run->id, run->cfg.train.batch_size, run->ranks);
            }
    /* run names: base[-block][-name]; when those are not unique every run also gets its id */
    int unique = 1;
    for (int i = 0; i < sw->n_runs && unique; i++)
        for (int j = 0; j < i && unique; j++) unique = strcmp(sw->runs[i].name, sw->runs[j].name) != 0;
    for (int i = 0; i < sw->n_runs; i++) {
        SweepRun *run = &sw->runs[i];
        char full[sizeof run->name + sizeof run->id + 1];
        snprintf(full, sizeof full, "%s%s%s", run->name, unique ? "" : "-", unique ? "" : run->id);
        if (strlen(full) >= sizeof run->cfg.run.name)
            return status_errorf("%s: sweep run %d: name '%s' is longer than run.name allows (%zu bytes)", path, i,
                                 full, sizeof run->cfg.run.name - 1);
        str_fmt(run->name, sizeof run->name, "%s", full);
        str_fmt(run->cfg.run.name, sizeof run->cfg.run.name, "%s", full);
    }
    return resolve_refs(path, sw);
}

int sweep_stage(const Sweep *sw, int i) {
    int s = 0;
    for (int q = 0; q < sw->runs[i].n_needs; q++) {
        int t = sweep_stage(sw, sw->runs[i].needs[q]) + 1;
        if (t > s) s = t;
    }
    return s;
}

static void free_axes(SweepAxis *axes, int n) {
    for (int i = 0; i < n; i++) {
        for (int v = 0; v < axes[i].n_values; v++) free(axes[i].values[v]);
        free(axes[i].values);
    }
}

void sweep_free(Sweep *sw) {
    if (!sw) return;
    free_axes(sw->grid, sw->n_grid);
    free_axes(sw->zip, sw->n_zip);
    for (int b = 0; b < sw->n_blocks && sw->blocks; b++) {
        free_axes(sw->blocks[b].set, sw->blocks[b].n_set);
        free_axes(sw->blocks[b].grid, sw->blocks[b].n_grid);
        free_axes(sw->blocks[b].zip, sw->blocks[b].n_zip);
    }
    xfree(sw->blocks);
    xfree(sw->runs);
    memset(sw, 0, sizeof *sw);
}
