/* sweep.c: parse and expand the `sweep:` block (libyaml events; marks are 0-based, messages
 * 1-based). */
#include "sweep.h"

#include <stdlib.h>
#include <string.h>
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

/* key: [v1, v2, ...] mappings of one sweep kind */
static Status read_axes(Parser *ps, const char *kind, SweepAxis *axes, int *n_axes) {
    if (ps->ev.type != YAML_MAPPING_START_EVENT)
        return status_errorf("%s:%zu:%zu: sweep.%s: expected a mapping of key: [values]", ps->file,
                             ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1, kind);
    for (;;) {
        TRY(next(ps));
        if (ps->ev.type == YAML_MAPPING_END_EVENT) return status_ok();
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
        TRY(next(ps));
        if (ps->ev.type != YAML_SEQUENCE_START_EVENT)
            return status_errorf("%s:%d:%d: sweep.%s.%s: expected a list of values", ps->file, ax->line, ax->column, kind, ax->key);
        for (;;) {
            TRY(next(ps));
            if (ps->ev.type == YAML_SEQUENCE_END_EVENT) break;
            if (ps->ev.type != YAML_SCALAR_EVENT)
                return status_errorf("%s:%zu:%zu: sweep.%s.%s: values must be scalars", ps->file,
                                     ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1, kind, ax->key);
            if (ps->ev.data.scalar.length > SWEEP_MAX_VALUE)
                return status_errorf("%s:%zu:%zu: sweep.%s.%s: value of %zu bytes is too long (at most %d)", ps->file,
                                     ps->ev.start_mark.line + 1, ps->ev.start_mark.column + 1, kind, ax->key,
                                     ps->ev.data.scalar.length, SWEEP_MAX_VALUE);
            ax->values = realloc(ax->values, sizeof(char *) * (ax->n_values + 1));
            ax->values[ax->n_values++] = strdup((const char *)ps->ev.data.scalar.value);
        }
        if (ax->n_values == 0)
            return status_errorf("%s:%d:%d: sweep.%s.%s: empty list", ps->file, ax->line, ax->column, kind, ax->key);
    }
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
                    st = status_errorf("%s:%zu:%zu: sweep: expected a mapping with grid and/or zip", path,
                                       ps.ev.start_mark.line + 1, ps.ev.start_mark.column + 1);
                    break;
                }
                for (;;) {
                    st = next(&ps);
                    if (!STATUS_OK(st) || ps.ev.type == YAML_MAPPING_END_EVENT) break;
                    if (ps.ev.type != YAML_SCALAR_EVENT) {
                        st = status_errorf("%s:%zu:%zu: sweep: expected grid or zip, got %s", path,
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
                    else st = status_errorf("%s:%zu:%zu: sweep.%s: unknown (allowed: grid, zip)", path, l, c, kind);
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
    }
    str_fmt(run->sets[run->n_sets++], sizeof run->sets[0], "%s=%s", key, value);
    return status_ok();
}

Status sweep_plan(const char *path, const Config *base, Sweep *sw) {
    memset(sw, 0, sizeof *sw);
    TRY(parse_block(path, sw));
    int n_zip = 1;
    for (int i = 0; i < sw->n_zip; i++) {
        if (i > 0 && sw->zip[i].n_values != sw->zip[0].n_values)
            return status_errorf("%s:%d:%d: sweep.zip.%s has %d values but sweep.zip.%s has %d (zip lists pair up, so "
                                 "they need equal lengths)", path, sw->zip[i].line, sw->zip[i].column, sw->zip[i].key,
                                 sw->zip[i].n_values, sw->zip[0].key, sw->zip[0].n_values);
        n_zip = sw->zip[i].n_values;
    }
    long n = n_zip;
    for (int i = 0; i < sw->n_grid; i++) n *= sw->grid[i].n_values;
    if (n > 100000) return status_errorf("%s: sweep expands to %ld runs (limit 100000)", path, n);
    sw->n_runs = (int)n;
    sw->runs = xcalloc(sizeof(SweepRun) * (size_t)n);
    for (int r = 0; r < sw->n_runs; r++) {
        SweepRun *run = &sw->runs[r];
        run->index = r;
        run->ranks = 1;
        run->cfg = *base;
        str_fmt(run->name, sizeof run->name, "%s", base->run.name);
        /* grid digits: last axis fastest, the zip tuple slowest */
        long rest = r;
        int digit[SWEEP_MAX_KEYS];
        for (int i = sw->n_grid - 1; i >= 0; i--) { digit[i] = (int)(rest % sw->grid[i].n_values); rest /= sw->grid[i].n_values; }
        int zi = (int)rest;
        for (int i = 0; i < sw->n_zip; i++) TRY(apply(run, sw->zip[i].key, sw->zip[i].values[zi], path, &sw->zip[i]));
        for (int i = 0; i < sw->n_grid; i++) TRY(apply(run, sw->grid[i].key, sw->grid[i].values[digit[i]], path, &sw->grid[i]));
        uint32_t h = 0;
        for (int i = 0; i < run->n_sets; i++) h = crc32_update(h, run->sets[i], strlen(run->sets[i]) + 1);
        str_fmt(run->id, sizeof run->id, "r%03d-%08x", r, (unsigned)h);
        Status st = config_validate(&run->cfg);
        if (!STATUS_OK(st)) return status_errorf("%s: sweep run %d (%s): %s", path, r, run->id, st.msg);
        if (run->cfg.train.batch_size % run->ranks)
            return status_errorf("%s: sweep run %d (%s): train.batch_size=%d is not divisible by ranks=%d", path, r,
                                 run->id, run->cfg.train.batch_size, run->ranks);
    }
    /* run names: base[-name]; when those are not unique every run also gets its id */
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
    return status_ok();
}

void sweep_free(Sweep *sw) {
    if (!sw) return;
    SweepAxis *lists[2] = {sw->grid, sw->zip};
    int counts[2] = {sw->n_grid, sw->n_zip};
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < counts[k]; i++) {
            for (int v = 0; v < lists[k][i].n_values; v++) free(lists[k][i].values[v]);
            free(lists[k][i].values);
        }
    xfree(sw->runs);
    memset(sw, 0, sizeof *sw);
}
