/* checkpoint.c: the checkpoint format.
 * model.bin = header { magic "DCMOECK1", u32 version, u32 n_sections } then sections
 * { char name[48], u64 n_bytes, u32 crc32, u32 pad, bytes }. Sections: "pos" (TrainPos),
 * "table" (tensor names and shapes, text), "config" (resolved YAML), then "params.<cat>",
 * "adam_m.<cat>", "adam_v.<cat>" for each parameter category, "cluster" (clustering state),
 * "cluster.ref" (each clustered layer's reference partition; optional on load: a checkpoint
 * without it leaves the reference unknown in a compression run) and "placement"
 * (expert-parallel owners and co-selection statistics per MoE layer), the training run's own
 * sections ("run.*", checkpoint_save_with: opaque here), and with
 * precision.mode storage or qat "experts.q": the clustered experts in their stored formats
 * (FP16 bases, INT4 factors, canonical order; layout in precision.h), which `dcmoe eval`
 * computes from. Load ignores it (training resumes from the FP32 masters).
 * The expert category is stored in its canonical layout (every expert, global order) at any
 * rank count: saving gathers every rank's experts, loading re-lays them out to this run's
 * placement, so a checkpoint written at P ranks loads at any P' that divides the units. */
#include "checkpoint.h"
#include "precision.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CK_MAGIC "DCMOECK1"
#define CK_VERSION 1u
static const char *const cat_names[PCAT_N] = {"dense", "expert"};

typedef struct Buf { char *p; size_t n, cap; } Buf;

static void buf_put(Buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        char *q = realloc(b->p, cap);
        ASSERTF(q, "out of memory growing checkpoint buffer to %zu bytes", cap);
        b->p = q; b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

typedef struct SecHeader { char name[48]; uint64_t n_bytes; uint32_t crc, pad; } SecHeader;

static void put_section(Buf *b, const char *name, const void *data, size_t n) {
    SecHeader h;
    memset(&h, 0, sizeof h);
    str_fmt(h.name, sizeof h.name, "%s", name);
    h.n_bytes = n;
    h.crc = crc32_update(0, data, n);
    buf_put(b, &h, sizeof h);
    buf_put(b, data, n);
}

static char *tensor_table_text(const Model *m) {
    Buf b = {0};
    char line[160];
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        int n = snprintf(line, sizeof line, "%s %d %d %d %d %zu\n", t->name, t->cat, t->full0,
                         t->n_dims > 1 ? t->dims[1] : 0, t->n_dims > 2 ? t->dims[2] : 0,
                         t->ep_unit ? t->full_offset : t->offset);
        buf_put(&b, line, (size_t)n);
    }
    buf_put(&b, "", 1);
    return b.p;
}

/* the clustering state of every clustered layer, packed: per layer group_of, members,
 * mu_seen (i32 [E] each), bias [E] and mu [E, Pm] (f32), n_events and n_accepted (i32);
 * per standard layer its aux-free bias [E] (f32) and, in the warm-up of a compression run,
 * the co-activation EMA [E, E] and selection EMA [E] (f64), with clustering.svd_space = output
 * followed by the experts' input and hidden second moments [E, D, D], [E, F, F] and their step
 * counts [E] (f64); per clustered layer with
 * clustering.mu_source = coact the same two EMAs after n_accepted */
static size_t cluster_blob_size(const Model *m) {
    size_t n = 0;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        if (f->kind == MOE_KIND_STANDARD) {
            if (f->cfg.balance == BALANCE_AUX_FREE) n += 4 * (size_t)f->E;
            if (m->cstate[l].coact) n += 8 * ((size_t)f->E * f->E + (size_t)f->E);
            if (m->cstate[l].in_cov) n += 8 * (size_t)f->E * ((size_t)f->D * f->D + (size_t)f->F * f->F + 1);
            continue;
        }
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        n += 4 * (3 * (size_t)f->E) + 4 * ((size_t)f->E + (size_t)f->E * m->cstate[l].mu_dim) + 8;
        if (m->cstate[l].coact) n += 8 * ((size_t)f->E * f->E + (size_t)f->E);
    }
    return n;
}

static void cluster_blob(Model *m, char *buf, int unpack) {
    size_t off = 0;
#define MOVE(ptr, bytes) do { if (unpack) memcpy((ptr), buf + off, (bytes)); else memcpy(buf + off, (ptr), (bytes)); off += (bytes); } while (0)
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *f = &m->ffn[l];
        /* the standard layer's aux-free bias (the only state it has besides its parameters) */
        if (f->kind == MOE_KIND_STANDARD) {
            if (f->cfg.balance == BALANCE_AUX_FREE) MOVE(m->cstate[l].bias, 4 * (size_t)f->E);
            /* the co-activation statistics of a compression run's warm-up (clustering.compress_at) */
            if (m->cstate[l].coact) {
                MOVE(m->cstate[l].coact, 8 * (size_t)f->E * f->E);
                MOVE(m->cstate[l].coact_n, 8 * (size_t)f->E);
            }
            /* clustering.svd_space = output: the experts' input statistics */
            if (m->cstate[l].in_cov) {
                MOVE(m->cstate[l].in_cov, 8 * (size_t)f->E * f->D * f->D);
                MOVE(m->cstate[l].hid_cov, 8 * (size_t)f->E * f->F * f->F);
                MOVE(m->cstate[l].cov_n, 8 * (size_t)f->E);
            }
            continue;
        }
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        ClusterState *cs = &m->cstate[l];
        size_t E = (size_t)f->E;
        MOVE(cs->group_of, 4 * E);
        MOVE(cs->members, 4 * E);
        MOVE(cs->mu_seen, 4 * E);
        MOVE(cs->bias, 4 * E);
        MOVE(cs->mu, 4 * E * cs->mu_dim);
        MOVE(&cs->n_events, 4);
        MOVE(&cs->n_accepted, 4);
        /* clustering.mu_source = coact: the unconstrained co-activation EMA */
        if (cs->coact) {
            MOVE(cs->coact, 8 * E * E);
            MOVE(cs->coact_n, 8 * E);
        }
    }
#undef MOVE
}

/* the reference partitions (ClusterState.group_ref): per clustered layer i32 ref_known, i32 group_ref[E] */
static size_t ref_blob_size(const Model *m) {
    size_t n = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED) n += 4 + 4 * (size_t)m->ffn[l].E;
    return n;
}

static void ref_blob(Model *m, char *buf, int unpack) {
    size_t off = 0;
    for (int l = 0; l < m->L; l++) {
        if (m->ffn[l].kind != MOE_KIND_CLUSTERED) continue;
        ClusterState *cs = &m->cstate[l];
        size_t E = (size_t)m->ffn[l].E;
        int32_t known = cs->ref_known;
        if (unpack) { memcpy(&known, buf + off, 4); cs->ref_known = known; memcpy(cs->group_ref, buf + off + 4, 4 * E); }
        else { memcpy(buf + off, &known, 4); memcpy(buf + off + 4, cs->group_ref, 4 * E); }
        off += 4 + 4 * E;
    }
}

/* elements of a category as stored (the expert category in its canonical layout) */
static size_t stored_elems(const Model *m, int c) { return c == PCAT_EXPERT ? m->n_expert_full : m->n_cat[c]; }

/* placement per MoE layer: i32 P, i32 U, i32 have_stats, i32 owner[U], f64 load[U], f64 affinity[U*U] */
static size_t placement_blob_size(const Model *m) {
    size_t n = 0;
    for (int l = 0; l < m->L; l++) {
        const EpMap *em = &m->ep[l];
        if (!em->E) continue;
        n += 12 + 4 * (size_t)em->U + 8 * (size_t)em->U + 8 * (size_t)em->U * em->U;
    }
    return n;
}

static void placement_pack(const Model *m, char *buf) {
    size_t off = 0;
    for (int l = 0; l < m->L; l++) {
        const EpMap *em = &m->ep[l];
        if (!em->E) continue;
        int32_t hdr[3] = {em->P, em->U, em->have_stats};
        memcpy(buf + off, hdr, 12); off += 12;
        for (int u = 0; u < em->U; u++) { int32_t o = em->place.owner[u]; memcpy(buf + off, &o, 4); off += 4; }
        memcpy(buf + off, em->load, 8 * (size_t)em->U); off += 8 * (size_t)em->U;
        memcpy(buf + off, em->affinity, 8 * (size_t)em->U * em->U); off += 8 * (size_t)em->U * em->U;
    }
}

/* statistics always come back; owners only when the checkpoint was written at this rank count
 * (otherwise the run's own placement stands: contiguous, re-placed at the next interval) */
static void placement_unpack(Model *m, const char *buf) {
    size_t off = 0;
    for (int l = 0; l < m->L; l++) {
        EpMap *em = &m->ep[l];
        if (!em->E) continue;
        int32_t hdr[3];
        memcpy(hdr, buf + off, 12); off += 12;
        if (hdr[0] == em->P)
            for (int u = 0; u < em->U; u++) { int32_t o; memcpy(&o, buf + off + 4 * (size_t)u, 4); em->place.owner[u] = o; }
        off += 4 * (size_t)em->U;
        memcpy(em->load, buf + off, 8 * (size_t)em->U); off += 8 * (size_t)em->U;
        memcpy(em->affinity, buf + off, 8 * (size_t)em->U * em->U); off += 8 * (size_t)em->U * em->U;
        em->have_stats = hdr[2];
        placement_fill_slots(&em->place);
        ep_map_refresh(em, em->K > 1 ? m->cstate[l].members : NULL);
    }
}

/* replicated hot units (parallel.replicas), an optional section written when a layer has
 * replica slots: per MoE layer i32 P, i32 n_rep, i32 rep_unit[P * n_rep]. Loaded only at
 * the same EP size, replica slots and placement, and only when every copy still sits on a
 * node without another copy of its unit (otherwise the run starts without copies and
 * re-chooses them at the next placement) */
static size_t replicas_blob_size(const Model *m) {
    size_t n = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ep[l].E) n += 8 + 4 * (size_t)m->ep[l].P * m->ep[l].n_rep;
    return n;
}

static void replicas_pack(const Model *m, char *buf) {
    size_t off = 0;
    for (int l = 0; l < m->L; l++) {
        const EpMap *em = &m->ep[l];
        if (!em->E) continue;
        int32_t hdr[2] = {em->P, em->n_rep};
        memcpy(buf + off, hdr, 8); off += 8;
        memcpy(buf + off, em->rep_unit, 4 * (size_t)em->P * em->n_rep); off += 4 * (size_t)em->P * em->n_rep;
    }
}

static void replicas_unpack(Model *m, const char *buf, size_t n) {
    size_t off = 0;
    for (int l = 0; l < m->L; l++) {
        EpMap *em = &m->ep[l];
        if (!em->E) continue;
        int32_t hdr[2];
        if (off + 8 > n) return;
        memcpy(hdr, buf + off, 8); off += 8;
        size_t len = 4 * (size_t)(hdr[0] > 0 ? hdr[0] : 0) * (size_t)(hdr[1] > 0 ? hdr[1] : 0);
        if (off + len > n) return;
        if (hdr[0] == em->P && hdr[1] == em->n_rep && em->n_rep && em->topo) {
            const int32_t *ru = (const int32_t *)(buf + off);
            int ok = 1, NR = em->n_rep;
            for (int i = 0; i < em->P * NR && ok; i++) {
                int u = ru[i], node = em->topo->node_of[i / NR];
                if (u < 0) continue;
                ok = u < em->U && em->topo->node_of[em->place.owner[u]] != node;
                for (int j = 0; j < i && ok; j++) ok = !(ru[j] == u && em->topo->node_of[j / NR] == node);
            }
            for (int i = 0; i < em->P * NR; i++) em->rep_unit[i] = ok ? ru[i] : -1;
            ep_map_refresh(em, em->K > 1 ? m->cstate[l].members : NULL);
        }
        off += len;
    }
}

static int step_dir_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* sorted names of complete step_* folders; caller frees each and the array */
static int list_complete(const char *ckdir, char ***names) {
    DIR *d = opendir(ckdir);
    *names = NULL;
    if (!d) return 0;
    int n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "step_", 5) != 0 || strchr(e->d_name, '.')) continue;
        char marker[4096];
        str_fmt(marker, sizeof marker, "%s/%s/COMPLETE", ckdir, e->d_name);
        if (!file_exists(marker)) continue;
        if (n == cap) { cap = cap ? 2 * cap : 8; *names = realloc(*names, sizeof(char *) * cap); }
        (*names)[n++] = strdup(e->d_name);
    }
    closedir(d);
    if (n) qsort(*names, (size_t)n, sizeof(char *), step_dir_cmp);
    return n;
}

static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[4096];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        str_fmt(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

/* parallel.ep_size < world: the ranks at one EP position hold the same units; their
 * parameters and Adam moments must agree bit for bit (CRC-32 of each array, compared by a
 * max and a min over the replicas). Collective over the world. */
static Status replicas_check(Model *m) {
    if (!m->rep_comm) return status_ok();
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *host = xmalloc(sizeof(float) * (nl ? nl : 1));
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    double hi[3], lo[3];
    for (int a = 0; a < 3; a++) {
        m->be->ops->to_host(m->be->ctx, host, arr[a], sizeof(float) * nl);
        hi[a] = (double)crc32_update(0, host, sizeof(float) * nl);
        lo[a] = -hi[a];
    }
    xfree(host);
    comm_allreduce_max_f64(m->rep_comm, hi, 3);
    comm_allreduce_max_f64(m->rep_comm, lo, 3);
    double bad = 0;
    for (int a = 0; a < 3; a++) bad += hi[a] != -lo[a];
    comm_allreduce_max_f64(m->comm, &bad, 1);
    if (bad > 0)
        return status_errorf("checkpoint: the replicas of the expert units (parallel.ep_size=%d, %d EP groups) "
                             "are not bitwise equal; refusing to save a checkpoint of diverged replicas",
                             m->ep_size, m->n_ep_groups);
    return status_ok();
}

/* the optional sections packed from the model: fn fills a buffer of n bytes; one section (1)
 * or none when n = 0 (0) */
typedef void (*PackFn)(Model *m, char *buf);
static void pack_placement(Model *m, char *buf) { placement_pack(m, buf); }
static void pack_replicas(Model *m, char *buf) { replicas_pack(m, buf); }
static void pack_cluster(Model *m, char *buf) { cluster_blob(m, buf, 0); }
static void pack_ref(Model *m, char *buf) { ref_blob(m, buf, 0); }
static int put_packed(Buf *b, const char *name, size_t n, Model *m, PackFn fn) {
    if (!n) return 0;
    char *blob = xmalloc(n);
    fn(m, blob);
    put_section(b, name, blob, n);
    xfree(blob);
    return 1;
}

Status checkpoint_save(const char *run_dir, Model *m, const TrainPos *pos, int keep) {
    return checkpoint_save_with(run_dir, m, pos, keep, NULL, 0);
}

Status checkpoint_save_with(const char *run_dir, Model *m, const TrainPos *pos, int keep, const CheckpointSection *extra,
                            int n_extra) {
    Comm *comm = m->comm;
    const Backend *be = m->be;
    char ckdir[4096], tmpdir[4096], final[4096], path[4096];
    str_fmt(ckdir, sizeof ckdir, "%s/ckpt", run_dir);
    str_fmt(final, sizeof final, "%s/step_%08lld", ckdir, (long long)pos->step);
    str_fmt(tmpdir, sizeof tmpdir, "%s/.tmp_step_%08lld", ckdir, (long long)pos->step);
    Status st = status_ok();
    int ok = 1;
    if (comm->rank == 0) {
        st = dir_make_p(ckdir);
        if (STATUS_OK(st)) { remove_tree(tmpdir); st = dir_make_p(tmpdir); }
        ok = STATUS_OK(st);
    }
    comm_bcast_bytes(comm, &ok, sizeof ok, 0);
    if (!ok) return comm->rank == 0 ? st : status_errorf("checkpoint: rank 0 could not create %s", tmpdir);

    /* the replicas of every expert unit (one per EP group) must be bitwise equal: checked
     * before anything is written */
    TRY(replicas_check(m));
    /* replicated hot units (parallel.replicas): every copy bitwise equal to its primary */
    if (model_ep_has_replicas(m)) {
        int bad = model_ep_replicas_mismatch(m, NULL);
        if (bad > 0)
            return status_errorf("checkpoint: %d copies of replicated units (parallel.replicas=%d) differ from their "
                                 "primary; refusing to save a checkpoint of diverged copies", bad,
                                 m->cfg.parallel.replicas);
    }
    /* every expert, from every rank of EP group 0 (which holds rank 0), in the canonical
     * layout (collective over that group) */
    float *full[3] = {NULL, NULL, NULL};
    {
        float *loc[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
        for (int a = 0; a < 3; a++) full[a] = xmalloc(sizeof(float) * (m->n_expert_full ? m->n_expert_full : 1));
        if (m->ep_group == 0) model_ep_gather(m, loc, full, 3);
    }
    if (comm->rank == 0) {
        Buf b = {0};
        uint32_t hdr[2] = {CK_VERSION, 0};
        buf_put(&b, CK_MAGIC, 8);
        size_t n_sec_at = b.n + 4;
        buf_put(&b, hdr, sizeof hdr);
        uint32_t n_sec = 0;
        put_section(&b, "pos", pos, sizeof *pos); n_sec++;
        char *table = tensor_table_text(m);
        put_section(&b, "table", table, strlen(table) + 1); n_sec++;
        free(table);
        char *yaml = config_to_yaml(&m->cfg);
        put_section(&b, "config", yaml, strlen(yaml) + 1); n_sec++;
        free(yaml);
        for (int c = 0; c < PCAT_N; c++) {
            size_t bytes = sizeof(float) * stored_elems(m, c);
            float *host = xmalloc(bytes ? bytes : 4);
            float *srcs[3] = {m->params[c], m->adam_m[c], m->adam_v[c]};
            const char *what[3] = {"params", "adam_m", "adam_v"};
            for (int k = 0; k < 3; k++) {
                char nm[48];
                str_fmt(nm, sizeof nm, "%s.%s", what[k], cat_names[c]);
                if (c == PCAT_EXPERT) memcpy(host, full[k], bytes);
                else be->ops->to_host(be->ctx, host, srcs[k], bytes);
                put_section(&b, nm, host, bytes); n_sec++;
            }
            xfree(host);
        }
        n_sec += put_packed(&b, "placement", placement_blob_size(m), m, pack_placement);
        if (model_ep_has_replicas(m)) n_sec += put_packed(&b, "replicas", replicas_blob_size(m), m, pack_replicas);
        n_sec += put_packed(&b, "cluster", cluster_blob_size(m), m, pack_cluster);
        n_sec += put_packed(&b, "cluster.ref", ref_blob_size(m), m, pack_ref);
        for (int i = 0; i < n_extra; i++) { put_section(&b, extra[i].name, extra[i].data, extra[i].n_bytes); n_sec++; }
        int n_clus = 0;
        for (int l = 0; l < m->L; l++) n_clus += m->ffn[l].kind == MOE_KIND_CLUSTERED;
        if (n_clus > 0 && m->cfg.precision.mode != PRECISION_FP32) {
            size_t qb = prec_q_bytes(m, m->cfg.precision.int4_group);
            char *blob = xmalloc(qb);
            prec_q_pack(m, full[0], m->cfg.precision.int4_group, blob);
            put_section(&b, "experts.q", blob, qb); n_sec++;
            xfree(blob);
        }
        int32_t n_ranks = comm->size;
        put_section(&b, "ranks", &n_ranks, sizeof n_ranks); n_sec++;
        memcpy(b.p + n_sec_at, &n_sec, 4);
        str_fmt(path, sizeof path, "%s/model.bin", tmpdir);
        st = file_write_atomic(path, b.p, b.n);
        free(b.p);
    }
    for (int a = 0; a < 3; a++) xfree(full[a]);
    ok = STATUS_OK(st);
    double bad = ok ? 0 : 1;
    comm_allreduce_max_f64(comm, &bad, 1);
    if (bad > 0) return ok ? status_errorf("checkpoint: another rank failed to write its shard in %s", tmpdir) : st;

    if (comm->rank == 0) {
        char marker[256];
        int n = snprintf(marker, sizeof marker, "step %lld ranks %d\n", (long long)pos->step, comm->size);
        str_fmt(path, sizeof path, "%s/COMPLETE", tmpdir);
        st = file_write_atomic(path, marker, (size_t)n);
        /* a folder named step_* is whole: an older copy of the same step is moved aside
         * (never deleted before the new one is in place), and pruning moves a folder out of
         * the step_* namespace before deleting its files, so a kill at any moment leaves
         * either a complete checkpoint or a .del_* folder that nothing reads */
        if (STATUS_OK(st)) {
            char aside[4096];
            str_fmt(aside, sizeof aside, "%s/.del_%s", ckdir, final + strlen(ckdir) + 1);
            remove_tree(aside);
            if (file_exists(final) && rename(final, aside) != 0)
                st = status_errorf("%s: could not move the older copy aside: %s", final, strerror(errno));
            else if (rename(tmpdir, final) != 0) st = status_errorf("%s: rename to %s failed: %s", tmpdir, final, strerror(errno));
            else { dir_fsync(ckdir); remove_tree(aside); }
        }
        if (STATUS_OK(st) && keep > 0) {
            char **names;
            int n_c = list_complete(ckdir, &names);
            for (int i = 0; i < n_c; i++) {
                if (i < n_c - keep) {
                    char aside[4096];
                    str_fmt(path, sizeof path, "%s/%s", ckdir, names[i]);
                    str_fmt(aside, sizeof aside, "%s/.del_%s", ckdir, names[i]);
                    remove_tree(aside);
                    if (rename(path, aside) == 0) { dir_fsync(ckdir); remove_tree(aside); }
                }
                free(names[i]);
            }
            free(names);
        }
    }
    ok = STATUS_OK(st);
    comm_bcast_bytes(comm, &ok, sizeof ok, 0);
    if (!ok && comm->rank != 0) return status_errorf("checkpoint: rank 0 failed to finish %s", final);
    return st;
}

Status checkpoint_find_latest(const char *run_dir, char *path, size_t cap) {
    char ckdir[4096];
    str_fmt(ckdir, sizeof ckdir, "%s/ckpt", run_dir);
    char **names;
    int n = list_complete(ckdir, &names);
    path[0] = 0;
    if (n > 0) str_fmt(path, cap, "%s/%s", ckdir, names[n - 1]);
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    return status_ok();
}

/* find a section by name in a verified file image */
static Status find_section(const char *file, const char *img, size_t n, const char *name,
                           const char **data, size_t *len) {
    size_t off = 16;
    uint32_t n_sec;
    memcpy(&n_sec, img + 12, 4);
    for (uint32_t i = 0; i < n_sec; i++) {
        SecHeader h;
        if (off + sizeof h > n) break;
        memcpy(&h, img + off, sizeof h);
        off += sizeof h;
        if (h.n_bytes > n - off) return status_errorf("%s: truncated in section '%.48s' (checkpoint is damaged)", file, h.name);
        if (!strncmp(h.name, name, sizeof h.name)) { *data = img + off; *len = h.n_bytes; return status_ok(); }
        off += h.n_bytes;
    }
    return status_errorf("%s: section '%s' missing (checkpoint is damaged or from another version)", file, name);
}

static Status verify_image(const char *file, const char *img, size_t n) {
    if (n < 16 || memcmp(img, CK_MAGIC, 8) != 0)
        return status_errorf("%s: not a dcmoe checkpoint (bad magic; expected %s)", file, CK_MAGIC);
    uint32_t ver, n_sec;
    memcpy(&ver, img + 8, 4);
    memcpy(&n_sec, img + 12, 4);
    if (ver != CK_VERSION) return status_errorf("%s: checkpoint version %u, this build reads %u", file, ver, CK_VERSION);
    size_t off = 16;
    for (uint32_t i = 0; i < n_sec; i++) {
        SecHeader h;
        if (off + sizeof h > n) return status_errorf("%s: truncated (section %u of %u missing; checkpoint is damaged)", file, i + 1, n_sec);
        memcpy(&h, img + off, sizeof h);
        off += sizeof h;
        if (h.n_bytes > n - off) return status_errorf("%s: truncated in section '%.48s' (checkpoint is damaged)", file, h.name);
        if (crc32_update(0, img + off, h.n_bytes) != h.crc)
            return status_errorf("%s: checksum mismatch in section '%.48s' (checkpoint is corrupt)", file, h.name);
        off += h.n_bytes;
    }
    if (off != n) return status_errorf("%s: %zu trailing bytes after the last section (checkpoint is damaged)", file, n - off);
    return status_ok();
}

Status checkpoint_verify_image(const char *file, const void *img, size_t n, CheckpointInfo *info) {
    TRY(verify_image(file, img, n));
    const char *d = NULL;
    size_t len = 0;
    TRY(find_section(file, img, n, "pos", &d, &len));
    TrainPos pos;
    if (len != sizeof pos) return status_errorf("%s: section 'pos' has %zu bytes, expected %zu", file, len, sizeof pos);
    memcpy(&pos, d, sizeof pos);
    if (pos.step < 0) return status_errorf("%s: section 'pos' holds step %lld (checkpoint is damaged)", file, (long long)pos.step);
    info->step = pos.step;
    info->ranks = 0;   /* unknown: checkpoints before the "ranks" section say it in COMPLETE only */
    if (STATUS_OK(find_section(file, img, n, "ranks", &d, &len))) {
        int32_t r;
        if (len != sizeof r) return status_errorf("%s: section 'ranks' has %zu bytes, expected %zu", file, len, sizeof r);
        memcpy(&r, d, sizeof r);
        if (r <= 0) return status_errorf("%s: section 'ranks' holds %d (checkpoint is damaged)", file, (int)r);
        info->ranks = r;
    }
    return status_ok();
}

/* COMPLETE holds "step N ranks P\n"; it must agree with the verified model.bin */
static Status verify_marker(const char *ckpt_dir, CheckpointInfo *info) {
    char path[4096];
    str_fmt(path, sizeof path, "%s/COMPLETE", ckpt_dir);
    char *text = NULL;
    size_t n_text = 0;
    if (!file_exists(path)) return status_errorf("%s: missing (checkpoint unfinished or not a checkpoint folder)", path);
    TRY(file_read_all(path, (void **)&text, &n_text));
    char tmp[128];
    str_fmt(tmp, sizeof tmp, "%.*s", (int)(n_text < 100 ? n_text : 100), text ? text : "");
    free(text);
    long long step = -1;
    int ranks = 0;
    if (sscanf(tmp, "step %lld ranks %d", &step, &ranks) != 2 || step < 0 || ranks <= 0)
        return status_errorf("%s: expected 'step N ranks P', found '%.40s' (checkpoint is damaged)", path, tmp);
    if (step != info->step)
        return status_errorf("%s: says step %lld but model.bin holds step %lld (checkpoint is damaged)", path, step,
                             (long long)info->step);
    if (info->ranks > 0 && ranks != info->ranks)
        return status_errorf("%s: says %d ranks but model.bin was written at %d (checkpoint is damaged)", path, ranks,
                             info->ranks);
    info->ranks = ranks;
    return status_ok();
}

Status checkpoint_verify(const char *ckpt_dir, CheckpointInfo *info) {
    char path[4096];
    str_fmt(path, sizeof path, "%s/model.bin", ckpt_dir);
    void *img = NULL;
    size_t n = 0;
    if (!file_exists(path)) return status_errorf("%s: missing (checkpoint is damaged)", path);
    TRY(file_read_all(path, &img, &n));
    Status st = checkpoint_verify_image(path, img, n, info);
    free(img);
    TRY(st);
    return verify_marker(ckpt_dir, info);
}

Status checkpoint_find_latest_valid(const char *run_dir, char *path, size_t cap, char *skipped, size_t skipped_cap) {
    char ckdir[4096];
    str_fmt(ckdir, sizeof ckdir, "%s/ckpt", run_dir);
    char **names;
    int n = list_complete(ckdir, &names);
    path[0] = 0;
    if (skipped_cap) skipped[0] = 0;
    size_t used = 0;
    for (int i = n - 1; i >= 0; i--) {
        char dir[4096];
        str_fmt(dir, sizeof dir, "%s/%s", ckdir, names[i]);
        CheckpointInfo info;
        Status st = checkpoint_verify(dir, &info);
        if (STATUS_OK(st)) { str_fmt(path, cap, "%s", dir); break; }
        if (used + 1 < skipped_cap) {
            int k = snprintf(skipped + used, skipped_cap - used, "skipped %s: %s\n", dir, st.msg);
            if (k > 0) used += (size_t)k < skipped_cap - used ? (size_t)k : skipped_cap - used - 1;
        }
    }
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    return status_ok();
}

static Status load_rank0(const char *ckpt_dir, Model *m, TrainPos *pos, char **img_out, size_t *n_out) {
    char path[4096];
    str_fmt(path, sizeof path, "%s/COMPLETE", ckpt_dir);
    if (!file_exists(path)) return status_errorf("%s: no COMPLETE marker (checkpoint unfinished or not a checkpoint folder)", ckpt_dir);
    str_fmt(path, sizeof path, "%s/model.bin", ckpt_dir);
    void *img;
    size_t n;
    TRY(file_read_all(path, &img, &n));
    Status st = verify_image(path, img, n);
    const char *d = NULL;
    size_t len = 0;
    if (STATUS_OK(st)) st = find_section(path, img, n, "pos", &d, &len);
    if (STATUS_OK(st) && len != sizeof *pos) st = status_errorf("%s: section 'pos' has %zu bytes, expected %zu", path, len, sizeof *pos);
    if (STATUS_OK(st)) memcpy(pos, d, sizeof *pos);
    if (STATUS_OK(st)) st = find_section(path, img, n, "table", &d, &len);
    if (STATUS_OK(st)) {
        char *want = tensor_table_text(m);
        if (len != strlen(want) + 1 || memcmp(want, d, len) != 0) {
            /* name the first differing tensor line */
            const char *a = want, *b = d;
            while (*a && *a == *b) { a++; b++; }
            while (a > want && a[-1] != '\n') { a--; b--; }
            const char *ea = strchr(a, '\n'), *eb = memchr(b, '\n', len - (size_t)(b - d));
            st = status_errorf("%s: model shape mismatch: checkpoint has '%.*s', config gives '%.*s'",
                               path, eb ? (int)(eb - b) : 0, b, ea ? (int)(ea - a) : 0, a);
        }
        free(want);
    }
    for (int c = 0; c < PCAT_N && STATUS_OK(st); c++) {
        const char *what[3] = {"params", "adam_m", "adam_v"};
        for (int k = 0; k < 3 && STATUS_OK(st); k++) {
            char nm[48];
            str_fmt(nm, sizeof nm, "%s.%s", what[k], cat_names[c]);
            st = find_section(path, img, n, nm, &d, &len);
            if (STATUS_OK(st) && len != sizeof(float) * stored_elems(m, c))
                st = status_errorf("%s: section '%s' has %zu bytes, the model needs %zu", path, nm, len,
                                   sizeof(float) * stored_elems(m, c));
        }
    }
    size_t cb = cluster_blob_size(m);
    if (STATUS_OK(st) && cb) {
        st = find_section(path, img, n, "cluster", &d, &len);
        if (STATUS_OK(st) && len != cb)
            st = status_errorf("%s: section 'cluster' has %zu bytes, the model needs %zu", path, len, cb);
    }
    size_t rfb = ref_blob_size(m);
    if (STATUS_OK(st) && rfb && STATUS_OK(find_section(path, img, n, "cluster.ref", &d, &len)) && len != rfb)
        st = status_errorf("%s: section 'cluster.ref' has %zu bytes, the model needs %zu", path, len, rfb);
    size_t pb = placement_blob_size(m);
    if (STATUS_OK(st) && pb) {
        st = find_section(path, img, n, "placement", &d, &len);
        if (STATUS_OK(st) && len != pb)
            st = status_errorf("%s: section 'placement' has %zu bytes, the model needs %zu", path, len, pb);
    }
    if (!STATUS_OK(st)) { free(img); return st; }
    *img_out = img;
    *n_out = n;
    return status_ok();
}

/* a verified section of rank 0's image, of the expected size, on every rank (caller frees) */
static char *bcast_section(Comm *comm, const char *path, const char *img, size_t n, const char *name, size_t size) {
    char *blob = xmalloc(size);
    if (comm->rank == 0) {
        const char *d = NULL;
        size_t len = 0;
        Status s2 = find_section(path, img, n, name, &d, &len);
        ASSERTF(STATUS_OK(s2) && len == size, "%s", s2.msg);
        memcpy(blob, d, size);
    }
    comm_bcast_bytes(comm, blob, size, 0);
    return blob;
}

Status checkpoint_load(const char *ckpt_dir, Model *m, TrainPos *pos) {
    return checkpoint_load_opts(ckpt_dir, m, pos, CKPT_LOAD_ALL);
}

Status checkpoint_load_opts(const char *ckpt_dir, Model *m, TrainPos *pos, int flags) {
    Comm *comm = m->comm;
    const Backend *be = m->be;
    char *img = NULL;
    size_t n = 0;
    Status st = status_ok();
    if (comm->rank == 0) st = load_rank0(ckpt_dir, m, pos, &img, &n);
    int ok = STATUS_OK(st);
    comm_bcast_bytes(comm, &ok, sizeof ok, 0);
    if (!ok) return comm->rank == 0 ? st : status_errorf("%s: rank 0 could not load the checkpoint", ckpt_dir);
    comm_bcast_bytes(comm, pos, sizeof *pos, 0);
    char path[4096];
    str_fmt(path, sizeof path, "%s/model.bin", ckpt_dir);
    size_t cb = cluster_blob_size(m);
    if (cb) {
        char *blob = bcast_section(comm, path, img, n, "cluster", cb);
        cluster_blob(m, blob, 1);
        xfree(blob);
    }
    /* the reference partitions; a checkpoint without them: the initial contiguous grouping
     * (model_init's) is right unless the run compressed (then it is unknown) */
    size_t rfb = ref_blob_size(m);
    if (rfb) {
        int32_t have = 0;
        const char *d = NULL;
        size_t len = 0;
        if (comm->rank == 0) have = STATUS_OK(find_section(path, img, n, "cluster.ref", &d, &len));
        comm_bcast_bytes(comm, &have, sizeof have, 0);
        if (have) {
            char *blob = bcast_section(comm, path, img, n, "cluster.ref", rfb);
            ref_blob(m, blob, 1);
            xfree(blob);
        } else
            for (int l = 0; l < m->L; l++)
                if (m->ffn[l].kind == MOE_KIND_CLUSTERED) m->cstate[l].ref_known = m->cfg.clustering.compress_at <= 0;
    }
    size_t pb = placement_blob_size(m);
    if (pb) {
        char *blob = bcast_section(comm, path, img, n, "placement", pb);
        placement_unpack(m, blob);
        xfree(blob);
    }
    /* the copies of replicated units (optional section; the slots are filled by the scatter) */
    if (model_ep_has_replicas(m)) {
        uint64_t rn = 0;
        const char *d = NULL;
        size_t len = 0;
        if (comm->rank == 0 && STATUS_OK(find_section(path, img, n, "replicas", &d, &len))) rn = len;
        comm_bcast_bytes(comm, &rn, sizeof rn, 0);
        if (rn) {
            char *blob = xmalloc((size_t)rn);
            if (comm->rank == 0) memcpy(blob, d, (size_t)rn);
            comm_bcast_bytes(comm, blob, (size_t)rn, 0);
            replicas_unpack(m, blob, (size_t)rn);
            xfree(blob);
        }
    }
    for (int c = 0; c < PCAT_N; c++) {
        if (c == PCAT_EXPERT && (flags & CKPT_LOAD_NO_EXPERTS)) continue;
        size_t bytes = sizeof(float) * stored_elems(m, c);
        float *host = xmalloc(bytes ? bytes : 4);
        float *dsts[3] = {m->params[c], m->adam_m[c], m->adam_v[c]};
        const char *what[3] = {"params", "adam_m", "adam_v"};
        for (int k = 0; k < 3; k++) {
            if (k > 0 && (flags & CKPT_LOAD_NO_ADAM)) continue;
            if (comm->rank == 0) {
                char nm[48];
                const char *d = NULL;
                size_t len = 0;
                str_fmt(nm, sizeof nm, "%s.%s", what[k], cat_names[c]);
                Status s2 = find_section(path, img, n, nm, &d, &len);
                ASSERTF(STATUS_OK(s2) && len == bytes, "%s", s2.msg);
                memcpy(host, d, bytes);
            }
            comm_bcast_bytes(comm, host, bytes, 0);
            /* experts: this rank's slots of the canonical arrays */
            if (c == PCAT_EXPERT) model_ep_scatter(m, &host, &dsts[k], 1);
            else be->ops->from_host(be->ctx, dsts[k], host, bytes);
        }
        xfree(host);
    }
    free(img);
    return status_ok();
}

Status checkpoint_read_section(const char *ckpt_dir, const char *name, Comm *comm, void **data, size_t *n_bytes) {
    return checkpoint_read_section_opt(ckpt_dir, name, comm, data, n_bytes, NULL);
}

Status checkpoint_read_section_opt(const char *ckpt_dir, const char *name, Comm *comm, void **data, size_t *n_bytes,
                                   int *found) {
    char path[4096];
    str_fmt(path, sizeof path, "%s/model.bin", ckpt_dir);
    Status st = status_ok();
    uint64_t n = 0, present = 1;
    void *img = NULL, *out = NULL;
    if (comm->rank == 0) {
        size_t ni = 0;
        st = file_read_all(path, &img, &ni);
        if (STATUS_OK(st)) st = verify_image(path, img, ni);
        const char *d = NULL;
        size_t len = 0;
        if (STATUS_OK(st)) {
            Status fs = find_section(path, img, ni, name, &d, &len);
            if (STATUS_OK(fs)) { n = len; out = xmalloc(len ? len : 1); memcpy(out, d, len); }
            else if (found) present = 0;   /* optional: absent is an answer (the image verified) */
            else st = fs;
        }
        free(img);
    }
    uint64_t hdr[3] = {STATUS_OK(st) ? 1u : 0u, n, present};
    comm_bcast_bytes(comm, hdr, sizeof hdr, 0);
    if (!hdr[0]) return comm->rank == 0 ? st : status_errorf("%s: rank 0 could not read section '%s'", path, name);
    if (found) *found = hdr[2] != 0;
    if (!hdr[2]) { *data = NULL; *n_bytes = 0; return status_ok(); }
    if (comm->rank != 0) out = xmalloc(hdr[1] ? hdr[1] : 1);
    comm_bcast_bytes(comm, out, (size_t)hdr[1], 0);
    *data = out;
    *n_bytes = (size_t)hdr[1];
    return status_ok();
}
