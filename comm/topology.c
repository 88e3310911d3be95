/* topology.c: which node every rank is on. Real: every rank contributes a node key (Slurm's
 * SLURM_NODEID when set, else the hostname) through one allgather, and nodes are numbered
 * by first appearance in rank order. Virtual: rank r is on node r / ranks_per_node.
 * Does not: measure link speeds (the bandwidths and latency are copied from the config for
 * the cost model) or decide where experts go (placement.c). */
#include "topology.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NODE_KEY_BYTES 256

void topology_free(Topology *t) {
    if (!t) return;
    xfree(t->node_of);
    xfree(t->local_index);
    xfree(t->node_size);
    memset(t, 0, sizeof *t);
}

void topology_subset(Topology *out, const Topology *t, const int *ranks, int n) {
    memset(out, 0, sizeof *out);
    out->n_ranks = n;
    out->node_of = xcalloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    int *renum = xcalloc(sizeof(int) * (size_t)(t->n_nodes > 0 ? t->n_nodes : 1)), next = 0;
    for (int q = 0; q < t->n_nodes; q++) renum[q] = -1;
    for (int i = 0; i < n; i++) {
        int node = t->node_of[ranks[i]];
        if (renum[node] < 0) renum[node] = next++;
        out->node_of[i] = renum[node];
    }
    xfree(renum);
    out->n_nodes = next;
    out->node_size = xcalloc(sizeof(int) * (size_t)(next > 0 ? next : 1));
    out->local_index = xcalloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++) out->local_index[i] = out->node_size[out->node_of[i]]++;
    out->is_virtual = t->is_virtual;
    str_fmt(out->source, sizeof out->source, "%s", t->source);
    out->intra_gbps = t->intra_gbps;
    out->inter_gbps = t->inter_gbps;
    out->latency_us = t->latency_us;
}

int topology_ep_groups(const Topology *t, int n_ranks, int ep_size, int *group_of, int *pos_of) {
    if (ep_size < 1 || n_ranks % ep_size != 0) return -1;
    int *order = xcalloc(sizeof(int) * (size_t)n_ranks);
    int n = 0;
    if (t) {
        for (int node = 0; node < t->n_nodes; node++)
            for (int r = 0; r < n_ranks; r++)
                if (t->node_of[r] == node) order[n++] = r;   /* local index order = rank order */
    } else {
        for (int r = 0; r < n_ranks; r++) order[n++] = r;
    }
    ASSERT(n == n_ranks);
    /* block b = order[b*S .. (b+1)*S); number the blocks by their lowest rank */
    int n_groups = n_ranks / ep_size;
    int *low = xcalloc(sizeof(int) * (size_t)n_groups), *id = xcalloc(sizeof(int) * (size_t)n_groups);
    for (int b = 0; b < n_groups; b++) {
        low[b] = n_ranks;
        for (int i = 0; i < ep_size; i++) if (order[b * ep_size + i] < low[b]) low[b] = order[b * ep_size + i];
    }
    for (int b = 0; b < n_groups; b++) {
        id[b] = 0;
        for (int c = 0; c < n_groups; c++) id[b] += low[c] < low[b];
    }
    for (int b = 0; b < n_groups; b++)
        for (int i = 0; i < ep_size; i++) {
            group_of[order[b * ep_size + i]] = id[b];
            pos_of[order[b * ep_size + i]] = i;
        }
    xfree(order); xfree(low); xfree(id);
    return 0;
}

int topology_ep_congruent(const Topology *t, int n_ranks, int ep_size, const int *group_of, const int *pos_of) {
    if (!t) return 1;
    int n_groups = n_ranks / ep_size;
    int *at = xcalloc(sizeof(int) * (size_t)n_ranks);   /* [group, pos] -> rank */
    for (int r = 0; r < n_ranks; r++) at[group_of[r] * ep_size + pos_of[r]] = r;
    int ok = 1;
    for (int g = 1; g < n_groups && ok; g++)
        for (int i = 0; i < ep_size && ok; i++)
            for (int j = 0; j < ep_size && ok; j++)
                ok = topology_same_node(t, at[i], at[j]) == topology_same_node(t, at[g * ep_size + i], at[g * ep_size + j]);
    xfree(at);
    return ok;
}

static void copy_links(Topology *t, const TopologyConfig *cfg) {
    if (!cfg) return;
    t->intra_gbps = cfg->intra_gbps;
    t->inter_gbps = cfg->inter_gbps;
    t->latency_us = cfg->latency_us;
}

/* node_of[] is filled: derive n_nodes, node_size[] and local_index[] */
static void fill_counts(Topology *t) {
    int n_nodes = 0;
    for (int r = 0; r < t->n_ranks; r++)
        if (t->node_of[r] + 1 > n_nodes) n_nodes = t->node_of[r] + 1;
    t->n_nodes = n_nodes;
    t->node_size = xcalloc(sizeof(int) * (size_t)(n_nodes > 0 ? n_nodes : 1));
    t->local_index = xcalloc(sizeof(int) * (size_t)t->n_ranks);
    for (int r = 0; r < t->n_ranks; r++) t->local_index[r] = t->node_size[t->node_of[r]]++;
}

Status topology_virtual(Topology *t, int n_ranks, const TopologyConfig *cfg) {
    memset(t, 0, sizeof *t);
    if (n_ranks < 1) return status_errorf("topology: rank count %d must be positive", n_ranks);
    if (!cfg || cfg->nodes < 1 || cfg->ranks_per_node < 1)
        return status_errorf("topology.nodes=%d and topology.ranks_per_node=%d: a virtual topology needs "
                             "both positive (nodes * ranks_per_node = %d ranks)",
                             cfg ? cfg->nodes : 0, cfg ? cfg->ranks_per_node : 0, n_ranks);
    if ((long long)cfg->nodes * cfg->ranks_per_node != n_ranks)
        return status_errorf("topology.nodes=%d x topology.ranks_per_node=%d = %lld ranks, but the run has %d ranks",
                             cfg->nodes, cfg->ranks_per_node, (long long)cfg->nodes * cfg->ranks_per_node, n_ranks);
    t->n_ranks = n_ranks;
    t->node_of = xcalloc(sizeof(int) * (size_t)n_ranks);
    for (int r = 0; r < n_ranks; r++) t->node_of[r] = r / cfg->ranks_per_node;
    fill_counts(t);
    t->is_virtual = 1;
    str_fmt(t->source, sizeof t->source, "virtual");
    copy_links(t, cfg);
    return status_ok();
}

/* SLURM_NTASKS, when set and a positive integer, must equal the communicator size */
static Status check_slurm_ntasks(int size) {
    const char *s = getenv("SLURM_NTASKS");
    if (!s || !*s) return status_ok();
    char *end = NULL;
    long n = strtol(s, &end, 10);
    if (end == s || *end != 0 || n < 1)
        return status_errorf("topology: SLURM_NTASKS=\"%s\" is not a positive integer", s);
    if (n != size)
        return status_errorf("topology: SLURM_NTASKS=%ld but the communicator has %d ranks "
                             "(launch as many MPI ranks as Slurm tasks, e.g. srun -n %ld)", n, size, n);
    return status_ok();
}

Status topology_init(Topology *t, Comm *c, const TopologyConfig *cfg) {
    memset(t, 0, sizeof *t);
    if (cfg && cfg->nodes > 0) return topology_virtual(t, c->size, cfg);
    if (cfg && cfg->ranks_per_node > 0)
        return status_errorf("topology.ranks_per_node=%d needs topology.nodes > 0 (got %d; 0 = real topology)",
                             cfg->ranks_per_node, cfg->nodes);
    TRY(check_slurm_ntasks(c->size));

    /* every rank's key, fixed width so one allgather carries them all */
    char mine[NODE_KEY_BYTES];
    memset(mine, 0, sizeof mine);
    const char *slurm = getenv("SLURM_NODEID");
    int from_slurm = slurm && *slurm;
    if (from_slurm) {
        snprintf(mine, sizeof mine, "slurm:%s", slurm);
    } else {
        char host[NODE_KEY_BYTES - 8];
        memset(host, 0, sizeof host);
        if (gethostname(host, sizeof host - 1) != 0) str_fmt(host, sizeof host, "unknown-host");
        snprintf(mine, sizeof mine, "host:%s", host);
    }
    char *all = xcalloc((size_t)NODE_KEY_BYTES * (size_t)c->size);
    comm_allgather_bytes(c, mine, all, NODE_KEY_BYTES);
    /* the key source must agree on all ranks (a mixed run would split one node in two);
     * every rank sees the same gathered keys, so every rank returns the same status */
    for (int r = 1; r < c->size; r++) {
        const char *key = all + (size_t)r * NODE_KEY_BYTES;
        if ((strncmp(key, "slurm:", 6) == 0) != (strncmp(all, "slurm:", 6) == 0)) {
            Status s = status_errorf("topology: rank 0 has node key \"%.64s\" but rank %d has \"%.64s\" "
                                     "(SLURM_NODEID must be set on all ranks or on none)", all, r, key);
            xfree(all);
            return s;
        }
    }

    t->n_ranks = c->size;
    t->node_of = xcalloc(sizeof(int) * (size_t)c->size);
    int n_nodes = 0;
    for (int r = 0; r < c->size; r++) {
        const char *key = all + (size_t)r * NODE_KEY_BYTES;
        int node = -1;
        for (int q = 0; q < r && node < 0; q++)
            if (memcmp(key, all + (size_t)q * NODE_KEY_BYTES, NODE_KEY_BYTES) == 0) node = t->node_of[q];
        t->node_of[r] = node >= 0 ? node : n_nodes++;
    }
    xfree(all);
    fill_counts(t);
    t->is_virtual = 0;
    str_fmt(t->source, sizeof t->source, "%s", from_slurm ? "slurm" : c->size == 1 ? "single" : "hostname");
    copy_links(t, cfg);
    return status_ok();
}

void topology_describe(const Topology *t, char *buf, size_t cap) {
    if (!buf || cap == 0) return;
    if (!t || !t->node_of) { snprintf(buf, cap, "no topology"); return; }
    int lo = t->n_ranks, hi = 0;
    for (int n = 0; n < t->n_nodes; n++) {
        if (t->node_size[n] < lo) lo = t->node_size[n];
        if (t->node_size[n] > hi) hi = t->node_size[n];
    }
    const char *nodes_word = t->n_nodes == 1 ? "node" : "nodes";
    if (lo == hi)
        snprintf(buf, cap, "%s %d %s x %d %s", t->source, t->n_nodes, nodes_word, hi, hi == 1 ? "rank" : "ranks");
    else
        snprintf(buf, cap, "%s %d %s x %d-%d ranks (%d ranks)", t->source, t->n_nodes, nodes_word, lo, hi, t->n_ranks);
}
