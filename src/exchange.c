/* exchange.c: the pure dispatch/combine planner (see exchange.h).
 * Legend: P N k E D = ranks, tokens on a source rank, top-k slots, experts, row width. */
#include "exchange.h"

#include <string.h>

#include "util.h"

void exchange_stage_init(ExchangeStage *s, int P, int n_max, int kmax) {
    memset(s, 0, sizeof *s);
    size_t S = (size_t)(n_max ? n_max : 1) * kmax;
    s->P = P; s->n_max = n_max; s->kmax = kmax; s->owns = 1;
    s->rows = xcalloc(sizeof(size_t) * P);
    s->ents = xcalloc(sizeof(size_t) * P);
    s->row_token = xcalloc(sizeof(int32_t) * S);
    s->tok_row = xcalloc(sizeof(int32_t) * S);
    s->ent = xcalloc(sizeof(ExchangeEntry) * S);
    s->ts_entry = xcalloc(sizeof(int32_t) * S);
}

void exchange_stage_free(ExchangeStage *s) {
    if (!s) return;
    if (s->owns) {
        xfree(s->rows); xfree(s->ents); xfree(s->row_token); xfree(s->tok_row); xfree(s->ent); xfree(s->ts_entry);
    }
    memset(s, 0, sizeof *s);
}

void exchange_stage_build(ExchangeStage *s, int N, int k, const int32_t *sel, const int32_t *kept,
                          const float *gate, const int32_t *dest, const int32_t *slot) {
    int P = s->P, kmax = s->kmax;
    ASSERTF(N <= s->n_max && k <= kmax, "exchange_stage_build: %d tokens x %d slots exceed the plan's %d x %d",
            N, k, s->n_max, kmax);
    s->N = N;
    memset(s->rows, 0, sizeof(size_t) * P);
    memset(s->ents, 0, sizeof(size_t) * P);
    for (size_t i = 0; i < (size_t)N * kmax; i++) { s->tok_row[i] = -1; s->ts_entry[i] = -1; }
    /* destination-major: for each destination, the tokens (ascending) with a kept pair there */
    int n_rows = 0, n_ent = 0;
    for (int d = 0; d < P; d++) {
        int row0 = n_rows;
        for (int t = 0; t < N; t++) {
            int here = 0;
            for (int q = 0; q < k; q++) {
                size_t ts = (size_t)t * k + q;
                if (kept[ts] < 0 || dest[sel[ts]] != d) continue;
                if (!here) {
                    s->row_token[n_rows] = t;
                    int j = 0;
                    while (s->tok_row[(size_t)t * kmax + j] >= 0) j++;
                    s->tok_row[(size_t)t * kmax + j] = n_rows;
                    n_rows++;
                    here = 1;
                }
                s->ent[n_ent].row = n_rows - 1 - row0;
                s->ent[n_ent].slot = slot[sel[ts]];
                s->ent[n_ent].gate = gate[ts];
                s->ts_entry[(size_t)t * kmax + q] = n_ent;
                n_ent++;
                s->ents[d]++;
            }
        }
        s->rows[d] = (size_t)(n_rows - row0);
    }
    s->n_rows = n_rows;
    s->n_ent = n_ent;
}

double exchange_stage_nodes_touched(const ExchangeStage *s, const Topology *topo) {
    ASSERTF(topo->n_ranks >= s->P, "exchange_stage_nodes_touched: topology of %d ranks, plan of %d", topo->n_ranks, s->P);
    uint64_t *mask = xcalloc(sizeof(uint64_t) * (size_t)(s->N ? s->N : 1));
    int row = 0;
    for (int d = 0; d < s->P; d++)
        for (size_t q = 0; q < s->rows[d]; q++, row++) {
            int node = topo->node_of[d];
            mask[s->row_token[row]] |= (uint64_t)1 << (node < 64 ? node : 63);
        }
    double n = 0;
    for (int t = 0; t < s->N; t++) n += __builtin_popcountll(mask[t]);
    xfree(mask);
    return n;
}

void exchange_peer_map(const Topology *topo, int me, const int32_t *owner, int E, int32_t *peer) {
    int li = topo->local_index[me];
    for (int e = 0; e < E; e++) {
        int node = topo->node_of[owner[e]], p = -1;
        for (int r = 0; r < topo->n_ranks; r++)
            if (topo->node_of[r] == node && topo->local_index[r] == li % topo->node_size[node]) { p = r; break; }
        ASSERTF(p >= 0, "exchange_peer_map: node %d has no peer for rank %d", node, me);
        peer[e] = p;
    }
}

/* add a stage's (this source's) rows / entries to the plan's matrices */
static void add_stage(ExchangePlan *pl, int src, const ExchangeStage *s) {
    int P = pl->P;
    for (int d = 0; d < P; d++) {
        pl->rows[(size_t)src * P + d] += s->rows[d];
        pl->ents[(size_t)src * P + d] += s->ents[d];
        if (d != src && s->rows[d]) pl->n_messages++;
    }
}

int exchange_plan_build(ExchangePlan *pl, const ExchangeRoute *routes, int P, const int32_t *owner,
                        const int32_t *lslot, int E, const Topology *topo, int two_level) {
    memset(pl, 0, sizeof *pl);
    if (two_level && (!topo || topo->n_ranks != P)) return -1;
    int k = 0;
    for (int r = 0; r < P; r++) if (routes[r].k > k) k = routes[r].k;
    pl->P = P; pl->E = E; pl->k = k; pl->two_level = two_level && P > 1;
    pl->rows = xcalloc(sizeof(size_t) * P * P);
    pl->ents = xcalloc(sizeof(size_t) * P * P);
    pl->a = xcalloc(sizeof(ExchangeStage) * P);
    int32_t *gid = NULL, *peer = NULL;
    if (pl->two_level) {
        gid = xcalloc(sizeof(int32_t) * E);
        peer = xcalloc(sizeof(int32_t) * E);
        for (int e = 0; e < E; e++) gid[e] = e;
    }
    /* stage A (flat: the only stage): source -> owner, or -> node peer carrying global ids */
    for (int r = 0; r < P; r++) {
        const ExchangeRoute *rt = &routes[r];
        exchange_stage_init(&pl->a[r], P, rt->N, k);
        if (pl->two_level) {
            exchange_peer_map(topo, r, owner, E, peer);
            exchange_stage_build(&pl->a[r], rt->N, rt->k, rt->sel, rt->kept, rt->gate, peer, gid);
        } else {
            exchange_stage_build(&pl->a[r], rt->N, rt->k, rt->sel, rt->kept, rt->gate, owner, lslot);
        }
        add_stage(pl, r, &pl->a[r]);
    }
    if (pl->two_level) {
        /* stage B at each peer q: the rows it received, in (source rank, row) order, each
         * forwarded to the owners of its entries (what ep.c's epp_plan does on rank q) */
        pl->b = xcalloc(sizeof(ExchangeStage) * P);
        for (int q = 0; q < P; q++) {
            int NB = 0;
            for (int r = 0; r < P; r++) NB += (int)pl->a[r].rows[q];
            int32_t *selB = xcalloc(sizeof(int32_t) * (size_t)(NB ? NB : 1) * k);
            int32_t *keptB = xcalloc(sizeof(int32_t) * (size_t)(NB ? NB : 1) * k);
            float *gateB = xcalloc(sizeof(float) * (size_t)(NB ? NB : 1) * k);
            int32_t *fill = xcalloc(sizeof(int32_t) * (size_t)(NB ? NB : 1));
            for (size_t i = 0; i < (size_t)NB * k; i++) keptB[i] = -1;
            int row0 = 0;
            for (int r = 0; r < P; r++) {
                const ExchangeStage *A = &pl->a[r];
                size_t e0 = 0;
                for (int d = 0; d < q; d++) e0 += A->ents[d];
                for (size_t i = 0; i < A->ents[q]; i++) {
                    const ExchangeEntry *en = &A->ent[e0 + i];
                    int row = row0 + en->row, s = fill[row]++;
                    ASSERTF(s < k, "exchange_plan_build: more than %d entries on one row", k);
                    selB[(size_t)row * k + s] = en->slot;
                    gateB[(size_t)row * k + s] = en->gate;
                    keptB[(size_t)row * k + s] = 0;
                }
                row0 += (int)A->rows[q];
            }
            exchange_stage_init(&pl->b[q], P, NB, k);
            exchange_stage_build(&pl->b[q], NB, k, selB, keptB, gateB, owner, lslot);
            add_stage(pl, q, &pl->b[q]);
            xfree(selB); xfree(keptB); xfree(gateB); xfree(fill);
        }
    }
    xfree(gid); xfree(peer);
    return 0;
}

void exchange_plan_free(ExchangePlan *pl) {
    if (!pl) return;
    for (int r = 0; r < pl->P; r++) {
        if (pl->a) exchange_stage_free(&pl->a[r]);
        if (pl->b) exchange_stage_free(&pl->b[r]);
    }
    xfree(pl->a); xfree(pl->b); xfree(pl->rows); xfree(pl->ents);
    memset(pl, 0, sizeof *pl);
}

void exchange_plan_dispatch_bytes(const ExchangePlan *pl, int D, double *out) {
    int P = pl->P, n_stages = pl->two_level ? 2 : 1;
    for (int s = 0; s < P; s++)
        for (int d = 0; d < P; d++) {
            size_t i = (size_t)s * P + d;
            out[i] = s == d ? 0.0
                            : (double)n_stages * 2 * sizeof(int64_t) + (double)pl->ents[i] * sizeof(ExchangeEntry) +
                                  (double)pl->rows[i] * D * sizeof(float);
        }
}

void exchange_plan_combine_bytes(const ExchangePlan *pl, int D, double *out) {
    int P = pl->P;
    for (int s = 0; s < P; s++)
        for (int d = 0; d < P; d++)
            out[(size_t)d * P + s] = s == d ? 0.0 : (double)pl->rows[(size_t)s * P + d] * D * sizeof(float);
}
