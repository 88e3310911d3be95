/* ep.c: expert maps and the dispatch/combine exchange of expert parallelism (see ep.h). */
#include "ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "traffic.h"

void ep_map_init(EpMap *em, int P, int rank, int E, int K) {
    memset(em, 0, sizeof *em);
    em->P = P; em->rank = rank; em->E = E; em->K = K;
    em->U = E / K;
    Status st = placement_init(&em->place, em->U, P);
    ASSERTF(STATUS_OK(st), "%s", st.msg);
    em->per_rank = em->place.per_rank;
    em->expert_owner = xcalloc(sizeof(int32_t) * E);
    em->expert_lslot = xcalloc(sizeof(int32_t) * E);
    em->n_slots = em->per_rank;
    em->lslot_expert = xcalloc(sizeof(int32_t) * (size_t)em->per_rank * K);
    em->lunit = xcalloc(sizeof(int32_t) * em->per_rank);
    em->route_dest = xcalloc(sizeof(int32_t) * E);
    em->route_slot = xcalloc(sizeof(int32_t) * E);
    em->affinity = xcalloc(sizeof(double) * (size_t)em->U * em->U);
    em->load = xcalloc(sizeof(double) * em->U);
    em->aff_step = xcalloc(sizeof(double) * (size_t)em->U * (em->U + 1));
    em->expert_node = xcalloc(sizeof(int32_t) * E);
    em->n_nodes = 1;
    ep_map_refresh(em, NULL);
}

void ep_map_free(EpMap *em) {
    if (!em) return;
    placement_free(&em->place);
    xfree(em->expert_owner); xfree(em->expert_lslot); xfree(em->lslot_expert); xfree(em->lunit);
    xfree(em->affinity); xfree(em->load); xfree(em->aff_step); xfree(em->expert_node);
    xfree(em->rep_unit); xfree(em->route_dest); xfree(em->route_slot);
    memset(em, 0, sizeof *em);
}

void ep_map_refresh(EpMap *em, const int32_t *members) {
    int K = em->K;
    em->version++;
    for (int u = 0; u < em->U; u++) {
        int owner = em->place.owner[u], slot = em->place.slot[u];
        for (int j = 0; j < K; j++) {
            int e = members ? members[(size_t)u * K + j] : u * K + j;
            em->expert_owner[e] = owner;
            em->expert_lslot[e] = slot * K + j;
            if (owner == em->rank) em->lslot_expert[slot * K + j] = e;
        }
        if (owner == em->rank) em->lunit[slot] = u;
    }
    for (int e = 0; e < em->E; e++) em->expert_node[e] = em->topo ? em->topo->node_of[em->expert_owner[e]] : 0;
    /* routing: the owner, or the copy on this rank's node (at most one per node) */
    memcpy(em->route_dest, em->expert_owner, sizeof(int32_t) * em->E);
    memcpy(em->route_slot, em->expert_lslot, sizeof(int32_t) * em->E);
    for (int r = 0; r < em->P; r++)
        for (int s = 0; s < em->n_rep; s++) {
            int u = em->rep_unit[r * em->n_rep + s], ls = em->per_rank + s;
            if (r == em->rank) em->lunit[ls] = u;
            for (int j = 0; j < K; j++) {
                int e = u < 0 ? -1 : members ? members[(size_t)u * K + j] : u * K + j;
                if (r == em->rank) em->lslot_expert[ls * K + j] = e;
                if (e >= 0 && em->topo && em->topo->node_of[r] == em->home_node) {
                    em->route_dest[e] = r;
                    em->route_slot[e] = ls * K + j;
                }
            }
        }
}

void ep_map_set_topology(EpMap *em, const Topology *topo) {
    em->topo = topo && topo->n_ranks == em->P ? topo : NULL;
    em->n_nodes = em->topo ? em->topo->n_nodes : 1;
    em->home_node = em->topo ? em->topo->node_of[em->rank] : 0;
    for (int e = 0; e < em->E; e++) em->expert_node[e] = em->topo ? em->topo->node_of[em->expert_owner[e]] : 0;
}

void ep_map_set_replicas(EpMap *em, int R) {
    int nn = em->topo ? em->n_nodes : 1;
    long cap = (long)em->U * (nn - 1);
    em->R = R <= 0 || nn < 2 ? 0 : (int)(R < cap ? R : cap);
    em->n_rep = (em->R + em->P - 1) / em->P;
    em->n_slots = em->per_rank + em->n_rep;
    xfree(em->rep_unit); xfree(em->lslot_expert); xfree(em->lunit);
    int n_rep_all = em->P * em->n_rep;
    em->rep_unit = xmalloc(sizeof(int32_t) * (size_t)(n_rep_all > 0 ? n_rep_all : 1));
    for (int i = 0; i < em->P * em->n_rep; i++) em->rep_unit[i] = -1;
    em->lslot_expert = xcalloc(sizeof(int32_t) * (size_t)em->n_slots * em->K);
    em->lunit = xcalloc(sizeof(int32_t) * em->n_slots);
    /* the membership is the identity or whatever the last refresh used; the caller refreshes
     * with its members after any change (the copies are empty now, so only primaries count) */
    ep_map_refresh(em, NULL);
}

/* rank loads under a copy count per unit: every copy carries load / copies */
static void rank_loads(const EpMap *em, const int *copies, const int32_t *rep, double *rl) {
    for (int r = 0; r < em->P; r++) rl[r] = 0;
    for (int u = 0; u < em->U; u++) rl[em->place.owner[u]] += em->load[u] / copies[u];
    for (int i = 0; i < em->P * em->n_rep; i++)
        if (rep[i] >= 0) rl[i / em->n_rep] += em->load[rep[i]] / copies[rep[i]];
}

int ep_replicas_choose(const EpMap *em, int32_t *out) {
    int P = em->P, U = em->U, NR = em->n_rep, nn = em->n_nodes;
    for (int i = 0; i < P * NR; i++) out[i] = -1;
    if (!NR || !em->have_stats || !em->topo) return 0;
    const int *node_of = em->topo->node_of;
    int *copies = xmalloc(sizeof(int) * U), *freeslots = xmalloc(sizeof(int) * P);
    char *on_node = xcalloc((size_t)U * nn);                 /* [U, nodes] a copy of u is there */
    int32_t *chosen = xmalloc(sizeof(int32_t) * (size_t)P * NR);   /* per rank, in choice order */
    double *rl = xmalloc(sizeof(double) * P);
    for (int u = 0; u < U; u++) { copies[u] = 1; on_node[(size_t)u * nn + node_of[em->place.owner[u]]] = 1; }
    for (int r = 0; r < P; r++) freeslots[r] = NR;
    for (int i = 0; i < P * NR; i++) chosen[i] = -1;
    int n = 0;
    for (int it = 0; it < em->R; it++) {
        rank_loads(em, copies, chosen, rl);
        int best = -1, brank = -1;
        for (int u = 0; u < U; u++) {
            if (!(em->load[u] > 0)) continue;
            if (best >= 0 && !(em->load[u] / copies[u] > em->load[best] / copies[best])) continue;
            /* an eligible rank: a free slot on a node without a copy of u; the rank that held
             * this copy before first, else the least loaded (ties: lower rank) */
            int pick = -1, prev = -1;
            for (int r = 0; r < P; r++) {
                if (!freeslots[r] || on_node[(size_t)u * nn + node_of[r]]) continue;
                for (int s = 0; s < NR; s++) if (em->rep_unit[r * NR + s] == u && prev < 0) prev = r;
                if (pick < 0 || rl[r] < rl[pick]) pick = r;
            }
            if (pick < 0) continue;
            best = u;
            brank = prev >= 0 ? prev : pick;
        }
        if (best < 0) break;
        chosen[brank * NR + (NR - freeslots[brank])] = best;
        freeslots[brank]--;
        copies[best]++;
        on_node[(size_t)best * nn + node_of[brank]] = 1;
        n++;
    }
    /* slots: a copy the rank held before keeps its slot, the others fill the free slots in order */
    for (int r = 0; r < P; r++) {
        const int32_t *old = em->rep_unit + (size_t)r * NR;
        int32_t *dst = out + (size_t)r * NR;
        char *placed = xcalloc((size_t)NR);
        for (int c = 0; c < NR; c++) {
            int u = chosen[r * NR + c];
            for (int s = 0; s < NR && u >= 0; s++)
                if (old[s] == u && dst[s] < 0) { dst[s] = u; placed[c] = 1; break; }
        }
        for (int c = 0; c < NR; c++) {
            int u = chosen[r * NR + c];
            if (u < 0 || placed[c]) continue;
            int s = 0;
            while (dst[s] >= 0) s++;
            dst[s] = u;
        }
        xfree(placed);
    }
    xfree(copies); xfree(freeslots); xfree(on_node); xfree(chosen); xfree(rl);
    return n;
}

int ep_replicas_list(const EpMap *em, int32_t *unit, int32_t *rank) {
    int n = 0;
    for (int i = 0; i < em->R; i++) unit[i] = rank[i] = -1;
    for (int i = 0; i < em->P * em->n_rep && n < em->R; i++)
        if (em->rep_unit[i] >= 0) { unit[n] = em->rep_unit[i]; rank[n] = i / em->n_rep; n++; }
    return n;
}

void epx_init(EpX *x, const Backend *be, int P, int D, int n_src_max, int kmax) {
    epx_init_cap(x, be, P, D, n_src_max, kmax, (size_t)n_src_max * kmax);
}

/* host array of n elements, zeroed, replacing *p (contents are not kept: every caller
 * refills the array after growing it) */
static void host_grow(void *pp, size_t elem, size_t n) {
    void **p = (void **)pp;
    xfree(*p);
    *p = xcalloc(elem * (n ? n : 1));
}
static void dev_grow(const Backend *be, void *pp, size_t bytes) {
    void **p = (void **)pp;
    if (*p) be->ops->free(be->ctx, *p);
    *p = be->ops->alloc(be->ctx, bytes ? bytes : sizeof(float));
}

void epx_reserve_src(EpX *x, const Backend *be, int n_src) {
    if (x->scnt && n_src <= x->n_src_max) return;
    x->n_src_max = n_src > x->n_src_max ? n_src : x->n_src_max;
    size_t S = (size_t)x->n_src_max * x->kmax, D = (size_t)x->D;
    host_grow(&x->srow_token, sizeof(int32_t), S);
    host_grow(&x->tok_row, sizeof(int32_t), S);
    host_grow(&x->sent, sizeof(EpEntry), S);
    host_grow(&x->ts_entry, sizeof(int32_t), S);
    host_grow(&x->sval, sizeof(float), S);
    dev_grow(be, &x->srow_token_d, sizeof(int32_t) * S);
    dev_grow(be, &x->tok_row_d, sizeof(int32_t) * S);
    dev_grow(be, &x->sbuf, sizeof(float) * S * D);
    if (be->kind != BACKEND_CPU) host_grow(&x->hs, sizeof(float), S * D);
}

void epx_reserve_recv(EpX *x, const Backend *be, size_t rows, size_t ents) {
    if (ents > x->ents_cap || !x->recv) {
        x->ents_cap = ents > x->ents_cap ? ents : x->ents_cap;
        host_grow(&x->recv, sizeof(EpEntry), x->ents_cap);
        host_grow(&x->rval, sizeof(float), x->ents_cap);
    }
    if (rows > x->rows_cap || !x->rbuf) {
        x->rows_cap = rows > x->rows_cap ? rows : x->rows_cap;
        dev_grow(be, &x->rbuf, sizeof(float) * x->rows_cap * x->D);
        if (be->kind != BACKEND_CPU) host_grow(&x->hr, sizeof(float), x->rows_cap * x->D);
    }
}

void epx_init_cap(EpX *x, const Backend *be, int P, int D, int n_src_max, int kmax, size_t rows_cap) {
    memset(x, 0, sizeof *x);
    x->P = P; x->D = D; x->kmax = kmax;
    x->scnt = xcalloc(sizeof(size_t) * P);
    x->sent_cnt = xcalloc(sizeof(size_t) * P);
    x->rcnt = xcalloc(sizeof(size_t) * P);
    x->recv_cnt = xcalloc(sizeof(size_t) * P);
    x->b_sc = xcalloc(sizeof(size_t) * P);
    x->b_sd = xcalloc(sizeof(size_t) * P);
    x->b_rc = xcalloc(sizeof(size_t) * P);
    x->b_rd = xcalloc(sizeof(size_t) * P);
    x->n_src_max = -1;
    epx_reserve_src(x, be, n_src_max);
    epx_reserve_recv(x, be, rows_cap, rows_cap);
}

void epx_free(EpX *x, const Backend *be) {
    if (!x || !x->scnt) return;
    xfree(x->scnt); xfree(x->sent_cnt); xfree(x->rcnt); xfree(x->recv_cnt);
    xfree(x->b_sc); xfree(x->b_sd); xfree(x->b_rc); xfree(x->b_rd);
    xfree(x->srow_token); xfree(x->tok_row); xfree(x->sent); xfree(x->ts_entry); xfree(x->recv);
    xfree(x->sval); xfree(x->rval); xfree(x->hs); xfree(x->hr);
    be->ops->free(be->ctx, x->srow_token_d); be->ops->free(be->ctx, x->tok_row_d);
    be->ops->free(be->ctx, x->sbuf); be->ops->free(be->ctx, x->rbuf);
    memset(x, 0, sizeof *x);
}

/* byte counts/displacements of a per-rank element count vector */
static void bytes_of(const size_t *cnt, size_t elem, int P, size_t *bc, size_t *bd) {
    size_t off = 0;
    for (int r = 0; r < P; r++) { bc[r] = cnt[r] * elem; bd[r] = off; off += bc[r]; }
}

void ep_stats_step(EpMap *em, Comm *comm, double ema) {
    comm_allreduce_sum_f64(comm, em->aff_step, (size_t)em->U * (em->U + 1));
    ep_stats_fold(em, ema);
}

void ep_stats_fold(EpMap *em, double ema) {
    int U = em->U;
    size_t n = (size_t)U * (U + 1);
    double a = em->have_stats ? ema : 1.0;
    for (int u = 0; u < U; u++) {
        for (int v = 0; v < U; v++)
            em->affinity[(size_t)u * U + v] = (1 - a) * em->affinity[(size_t)u * U + v] + a * em->aff_step[(size_t)u * (U + 1) + v];
        em->load[u] = (1 - a) * em->load[u] + a * em->aff_step[(size_t)u * (U + 1) + U];
    }
    em->have_stats = 1;
    memset(em->aff_step, 0, sizeof(double) * n);
}

/* a view of em with placement p (read-only: for ep_replicas_choose on a candidate) */
static EpMap view_with(const EpMap *em, const Placement *p) {
    EpMap v = *em;
    v.place = *p;
    return v;
}

/* copies per unit (1 + replicas) that ep_replicas_choose picks for placement p; returns the
 * replicas placed, rep [P * n_rep] gets them (may be NULL) */
static int copy_counts(const EpMap *em, const Placement *p, int *copies, int32_t *rep) {
    int n_all = em->P * em->n_rep;
    int32_t *r = rep ? rep : xmalloc(sizeof(int32_t) * (size_t)(n_all > 0 ? n_all : 1));
    for (int u = 0; u < em->U; u++) copies[u] = 1;
    int n = 0;
    if (em->n_rep) {
        EpMap v = view_with(em, p);
        n = ep_replicas_choose(&v, r);
        for (int i = 0; i < n_all; i++) if (r[i] >= 0) copies[r[i]]++;
    }
    if (!rep) xfree(r);
    return n;
}

double ep_placement_maxvio(const EpMap *em, const Placement *p) {
    int P = em->P, U = em->U, n_all = P * em->n_rep;
    int *copies = xmalloc(sizeof(int) * U);
    int32_t *rep = xmalloc(sizeof(int32_t) * (size_t)(n_all > 0 ? n_all : 1));
    copy_counts(em, p, copies, rep);
    double *rl = xcalloc(sizeof(double) * P), total = 0, mx = 0;
    for (int u = 0; u < U; u++) { rl[p->owner[u]] += em->load[u] / copies[u]; total += em->load[u]; }
    for (int i = 0; i < n_all; i++) if (rep[i] >= 0) rl[i / em->n_rep] += em->load[rep[i]] / copies[rep[i]];
    for (int r = 0; r < P; r++) if (rl[r] > mx) mx = rl[r];
    xfree(copies); xfree(rep); xfree(rl);
    return total > 0 ? mx / (total / P) - 1.0 : 0.0;
}

/* the placement objective: eplb: rank MaxVio of the (effective) loads; topology: the
 * inter-node cut of the (effective) affinity plus 1e-3 x the inter-rank cut; with spread the
 * node term is the affinity kept INSIDE the nodes instead (placement spreads co-selected units) */
static double objective(const EpMap *em, int policy, const Topology *topo, const Placement *p, const double *aff,
                        const double *load, int spread) {
    if (policy == PLACEMENT_EPLB) return placement_rank_maxvio(p, load);
    double node = placement_cut(p, aff, topo, 0);
    if (spread) {
        double tot = 0;
        for (size_t i = 0; i < (size_t)em->U * em->U; i++) tot += aff[i];
        for (int u = 0; u < em->U; u++) tot -= aff[(size_t)u * em->U + u];
        node = 0.5 * tot - node;
    }
    return node + 1e-3 * placement_cut(p, aff, topo, 1);
}

/* balance polish counting the copies: with the copies ep_replicas_choose picks for p fixed as
 * background load, swap units between the heaviest rank and another one while that lowers the
 * heavier of the two and does not raise the objective (node term, plus 1e-3 x the rank cut, of
 * the symmetrised affinity aff; spread: the node term counts the affinity inside the nodes).
 * load [U] per holder (load / copies). Greedy, deterministic (ties: lower ids). */
static void polish_with_copies(const EpMap *em, const Topology *t, Placement *p, const double *aff,
                               const double *load, int spread) {
    int U = em->U, P = em->P, n_all = P * em->n_rep;
    int *c = xmalloc(sizeof(int) * U);
    int32_t *rep = xmalloc(sizeof(int32_t) * (size_t)(n_all > 0 ? n_all : 1));
    copy_counts(em, p, c, rep);
    double *rl = xcalloc(sizeof(double) * P), tot = 0;
    for (int i = 0; i < n_all; i++) if (rep[i] >= 0) rl[i / em->n_rep] += em->load[rep[i]] / c[rep[i]];
    for (int u = 0; u < U; u++) { rl[p->owner[u]] += load[u]; tot += load[u]; }
    double leps = 1e-12 * (tot > 0 ? tot : 1), oeps = 0;
    for (size_t i = 0; i < (size_t)U * U; i++) oeps += fabs(aff[i]);
    oeps = 1e-9 * (oeps > 0 ? oeps : 1);
    const int *node = t->node_of;
    for (int it = 0; it < 4 * U; it++) {
        int h = 0;
        for (int r = 1; r < P; r++) if (rl[r] > rl[h] + leps) h = r;
        int bu = -1, bv = -1;
        double bmax = rl[h] - leps, bobj = 0;
        for (int u = 0; u < U; u++) {
            if (p->owner[u] != h) continue;
            for (int v = 0; v < U; v++) {
                int b = p->owner[v];
                if (b == h) continue;
                double nh = rl[h] - load[u] + load[v], nb = rl[b] - load[v] + load[u];
                double mx = nh > nb ? nh : nb;
                if (!(mx < bmax - leps)) continue;
                /* objective change of moving u to b and v to h */
                double dn = 0, dr = 0;
                for (int w = 0; w < U; w++) {
                    if (w == u || w == v) continue;
                    int rw = p->owner[w];
                    double auw = 0.5 * (aff[(size_t)u * U + w] + aff[(size_t)w * U + u]);
                    double avw = 0.5 * (aff[(size_t)v * U + w] + aff[(size_t)w * U + v]);
                    dn += auw * ((node[b] != node[rw]) - (node[h] != node[rw])) +
                          avw * ((node[h] != node[rw]) - (node[b] != node[rw]));
                    dr += auw * ((b != rw) - (h != rw)) + avw * ((h != rw) - (b != rw));
                }
                double dobj = (spread ? -dn : dn) + 1e-3 * dr;
                if (dobj > oeps) continue;
                bu = u; bv = v; bmax = mx; bobj = dobj;
            }
        }
        (void)bobj;
        if (bu < 0) break;
        int b = p->owner[bv];
        rl[h] += load[bv] - load[bu];
        rl[b] += load[bu] - load[bv];
        p->owner[bu] = b;
        p->owner[bv] = h;
    }
    placement_fill_slots(p);
    xfree(c); xfree(rep); xfree(rl);
}

int ep_propose(const EpMap *em, int policy, const Topology *topo, int refine_passes, double max_imbalance,
               double min_gain, Placement *out) {
    return ep_propose_ex(em, policy, topo, refine_passes, max_imbalance, min_gain, NULL, out, NULL);
}

int ep_propose_ex(const EpMap *em, int policy, const Topology *topo, int refine_passes, double max_imbalance,
                  double min_gain, const EpPlaceOpts *opts, Placement *out, EpPlaceInfo *info) {
    int U = em->U, P = em->P;
    EpPlaceOpts o = opts ? *opts : (EpPlaceOpts){0};
    EpPlaceInfo inf = {0};
    Status st = placement_init(out, U, P);
    ASSERTF(STATUS_OK(st), "%s", st.msg);
    int stats = em->have_stats;
    int use_rep = stats && em->n_rep && !o.replica_blind && topo && policy != PLACEMENT_CONTIGUOUS;
    int spread = o.spread && stats && topo && topo->n_nodes > 1 && policy == PLACEMENT_TOPOLOGY;
    /* effective statistics: a unit with c copies (owner included) carries load / c on each
     * rank holding it (ep_replicas_choose's model), and a token goes to its owner only from
     * the n - c + 1 of n nodes that hold no copy, so the unit's co-selection counts in the
     * cut with the weight s = (n - c + 1) / n. The copy counts are what ep_replicas_choose
     * picks on the current placement (they depend on the loads, hardly on the placement). */
    double *load = em->load, *aff = em->affinity;
    int *copies = xmalloc(sizeof(int) * U);
    for (int u = 0; u < U; u++) copies[u] = 1;
    if (use_rep) {
        inf.copies = copy_counts(em, &em->place, copies, NULL);
        int nn = em->n_nodes;
        load = xmalloc(sizeof(double) * U);
        aff = xmalloc(sizeof(double) * (size_t)U * U);
        for (int u = 0; u < U; u++) load[u] = em->load[u] / copies[u];
        for (int u = 0; u < U; u++)
            for (int v = 0; v < U; v++) {
                double su = (double)(nn - copies[u] + 1) / nn, sv = (double)(nn - copies[v] + 1) / nn;
                aff[(size_t)u * U + v] = em->affinity[(size_t)u * U + v] * su * sv;
            }
    }
    /* spread: the node level minimises the complement (max - A off the diagonal), i.e.
     * maximises the node cut of A at fixed node sizes; the rank level keeps A */
    double *aff_node = aff;
    if (spread) {
        double amax = 0;
        for (size_t i = 0; i < (size_t)U * U; i++) if (aff[i] > amax) amax = aff[i];
        aff_node = xmalloc(sizeof(double) * (size_t)U * U);
        for (int u = 0; u < U; u++)
            for (int v = 0; v < U; v++)
                aff_node[(size_t)u * U + v] = u == v ? 0.0 : amax - 0.5 * (aff[(size_t)u * U + v] + aff[(size_t)v * U + u]);
    }
    if (policy == PLACEMENT_EPLB) placement_eplb(out, stats ? load : NULL, topo);
    else if (policy == PLACEMENT_TOPOLOGY) {
        double mi = stats ? max_imbalance : INFINITY;
        placement_topology_ex(out, aff_node, aff, stats ? load : NULL, NULL, topo, refine_passes, mi,
                              PLACEMENT_PART_AUTO);
        if (use_rep && !isinf(mi)) {
            /* round 2: the copies chosen for round 1's placement are background load on
             * their ranks; keep the round whose rank MaxVio counting the copies is lower */
            int n_all = P * em->n_rep;
            int32_t *rep = xmalloc(sizeof(int32_t) * (size_t)n_all);
            int *c1 = xmalloc(sizeof(int) * U);
            copy_counts(em, out, c1, rep);
            double *bg = xcalloc(sizeof(double) * P);
            for (int i = 0; i < n_all; i++) if (rep[i] >= 0) bg[i / em->n_rep] += em->load[rep[i]] / c1[rep[i]];
            Placement p2 = {0};
            st = placement_init(&p2, U, P);
            ASSERTF(STATUS_OK(st), "%s", st.msg);
            placement_topology_ex(&p2, aff_node, aff, load, bg, topo, refine_passes, mi, PLACEMENT_PART_AUTO);
            double v1 = ep_placement_maxvio(em, out), v2 = ep_placement_maxvio(em, &p2);
            if (v2 < v1 - 1e-12) { placement_copy(out, &p2); v1 = v2; }
            /* then swaps off the heaviest rank that keep the objective, with the copies as load */
            placement_copy(&p2, out);
            polish_with_copies(em, topo, &p2, aff, load, spread);
            if (ep_placement_maxvio(em, &p2) < v1 - 1e-12) placement_copy(out, &p2);
            placement_free(&p2);
            xfree(rep); xfree(c1); xfree(bg);
        }
    } else placement_contiguous(out);
    for (int u = 0; u < U; u++) inf.moved += out->owner[u] != em->place.owner[u];
    int accept;
    if (stats && policy != PLACEMENT_CONTIGUOUS) {
        inf.obj_before = objective(em, policy, topo, &em->place, aff, load, spread);
        inf.obj_after = objective(em, policy, topo, out, aff, load, spread);
    }
    if (stats) {
        inf.maxvio_before = ep_placement_maxvio(em, &em->place);
        inf.maxvio_after = ep_placement_maxvio(em, out);
    }
    if (placement_equal(out, &em->place)) accept = 0;
    else if (policy == PLACEMENT_CONTIGUOUS || !stats) accept = 1;
    else {
        accept = inf.obj_after < inf.obj_before * (1.0 - min_gain);
        /* with copies the rank loads move at every event (the copies follow the loads): a
         * proposal that keeps the objective and lowers the rank MaxVio counting the copies by
         * more than min_gain is taken too */
        if (!accept && use_rep)
            accept = inf.obj_after <= inf.obj_before + 1e-9 * (fabs(inf.obj_before) + 1) &&
                     inf.maxvio_after < inf.maxvio_before - min_gain;
    }
    inf.accepted = accept;
    if (info) *info = inf;
    if (load != em->load) xfree(load);
    if (aff != em->affinity) xfree(aff);
    if (aff_node != aff) xfree(aff_node);
    xfree(copies);
    return accept;
}

void ep_stats_add(EpMap *em, int N, int k, const int32_t *sel, const int32_t *kept) {
    int U = em->U, K = em->K;
    for (int t = 0; t < N; t++) {
        int units[64], n = 0;
        for (int s = 0; s < k && n < 64; s++) {
            size_t ts = (size_t)t * k + s;
            if ((kept && kept[ts] < 0) || sel[ts] < 0) continue;
            int u = em->place.unit_at[em->expert_owner[sel[ts]] * em->per_rank + em->expert_lslot[sel[ts]] / K];
            int dup = 0;
            for (int j = 0; j < n; j++) dup |= units[j] == u;
            if (!dup) units[n++] = u;
        }
        for (int i = 0; i < n; i++) {
            em->aff_step[(size_t)units[i] * (U + 1) + U] += 1;
            for (int j = 0; j < n && !em->pref_pairs; j++)
                if (j != i) em->aff_step[(size_t)units[i] * (U + 1) + units[j]] += 1;
        }
    }
}

void ep_stats_add_pairs(EpMap *em, int N, int n, const int32_t *units) {
    int U = em->U;
    if (!em->collect) return;
    for (int t = 0; t < N; t++) {
        const int32_t *u = units + (size_t)t * n;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++)
                if (u[i] != u[j] && u[i] >= 0 && u[j] >= 0) em->aff_step[(size_t)u[i] * (U + 1) + u[j]] += 1;
    }
}

/* the MPI executor: Comm's profiled wrappers (the traffic profiler sees every byte there).
 * An NCCL executor fills the same two slots; see exchange.h. */
static void mpi_alltoall(void *ctx, const void *send, void *recv, size_t n, int phase) {
    comm_alltoall_bytes((Comm *)ctx, send, recv, n, phase);
}
static void mpi_alltoallv(void *ctx, const void *send, const size_t *sc, const size_t *sd, void *recv,
                          const size_t *rc, const size_t *rd, int phase) {
    comm_alltoallv_bytes((Comm *)ctx, send, sc, sd, recv, rc, rd, phase);
}
static ExchangeExecutor exec_mpi(Comm *comm) {
    return (ExchangeExecutor){.name = "mpi", .alltoall = mpi_alltoall, .alltoallv = mpi_alltoallv, .ctx = comm};
}

void epx_plan(EpX *x, EpMap *em, const Backend *be, Comm *comm, int N, int k, const int32_t *sel,
              const int32_t *kept, const float *gate) {
    epx_plan_to(x, em, be, comm, N, k, sel, kept, gate, em->route_dest, em->route_slot, 1);
}

void epx_plan_to(EpX *x, EpMap *em, const Backend *be, Comm *comm, int N, int k, const int32_t *sel,
                 const int32_t *kept, const float *gate, const int32_t *dest, const int32_t *slot, int stats) {
    ASSERTF(N <= x->n_src_max && k <= x->kmax, "epx_plan: %d tokens x %d slots exceed the buffers", N, k);
    int P = x->P;
    x->N = N;
    if (stats && em->collect) ep_stats_add(em, N, k, sel, kept);
    /* the plan (pure): this rank's rows and entries per destination, viewing EpX's arrays */
    ExchangeStage pl = {.P = P, .n_max = x->n_src_max, .kmax = x->kmax, .rows = x->scnt, .ents = x->sent_cnt,
                        .row_token = x->srow_token, .tok_row = x->tok_row, .ent = x->sent,
                        .ts_entry = x->ts_entry};
    exchange_stage_build(&pl, N, k, sel, kept, gate, dest, slot);
    int n_rows = pl.n_rows;
    x->n_srows = n_rows;
    x->n_sent = pl.n_ent;
    /* nodes touched in this communicator's numbering (an EP group's topology) */
    Traffic *tr = comm_traffic(comm);
    const Topology *topo = comm->topo && comm->topo->n_ranks == P ? comm->topo : NULL;
    if (tr && stats)
        traffic_add_dispatch(tr, n_rows, (double)pl.n_ent, topo ? exchange_stage_nodes_touched(&pl, topo) : 0,
                             N);
    ExchangeExecutor ex = exec_mpi(comm);

    /* counts first: [rows, entries] per destination */
    int64_t *cs = xcalloc(sizeof(int64_t) * 2 * P), *cr = xcalloc(sizeof(int64_t) * 2 * P);
    for (int d = 0; d < P; d++) { cs[2 * d] = (int64_t)x->scnt[d]; cs[2 * d + 1] = (int64_t)x->sent_cnt[d]; }
    ex.alltoall(ex.ctx, cs, cr, 2 * sizeof(int64_t), COMM_PHASE_DISPATCH);
    size_t rows = 0, ents = 0;
    for (int s = 0; s < P; s++) {
        x->rcnt[s] = (size_t)cr[2 * s];
        x->recv_cnt[s] = (size_t)cr[2 * s + 1];
        rows += x->rcnt[s];
        ents += x->recv_cnt[s];
    }
    xfree(cs); xfree(cr);
    /* the receive side holds exactly what arrives (high-water mark; never shrinks) */
    epx_reserve_recv(x, be, rows, ents);
    x->n_rrows = (int)rows;
    x->n_recv = (int)ents;
    /* entries */
    bytes_of(x->sent_cnt, sizeof(EpEntry), P, x->b_sc, x->b_sd);
    bytes_of(x->recv_cnt, sizeof(EpEntry), P, x->b_rc, x->b_rd);
    ex.alltoallv(ex.ctx, x->sent, x->b_sc, x->b_sd, x->recv, x->b_rc, x->b_rd, COMM_PHASE_DISPATCH);
    /* rows relative to the source block -> index into the received rows */
    size_t e0 = 0, r0 = 0;
    for (int s = 0; s < P; s++) {
        for (size_t q = 0; q < x->recv_cnt[s]; q++) x->recv[e0 + q].row += (int32_t)r0;
        e0 += x->recv_cnt[s];
        r0 += x->rcnt[s];
    }
    be->ops->from_host(be->ctx, x->srow_token_d, x->srow_token, sizeof(int32_t) * (size_t)(n_rows ? n_rows : 1));
    be->ops->from_host(be->ctx, x->tok_row_d, x->tok_row, sizeof(int32_t) * (size_t)N * x->kmax);
}

/* one row exchange: send [count_s rows] -> recv [count_r rows] of backend memory: the device
 * collectives when attached (NCCL), else MPI with host staging for a non-CPU backend */
static void exchange_rows(EpX *x, const Backend *be, Comm *comm, const float *send, const size_t *cs,
                          float *recv, const size_t *cr, size_t n_send, size_t n_recv, float *hs, float *hr,
                          int phase) {
    size_t row = sizeof(float) * (size_t)x->D;
    bytes_of(cs, row, x->P, x->b_sc, x->b_sd);
    bytes_of(cr, row, x->P, x->b_rc, x->b_rd);
    if (comm_has_dev(comm)) {   /* NCCL on the backend's buffers: no staging */
        comm_dev_alltoallv_bytes(comm, send, x->b_sc, x->b_sd, recv, x->b_rc, x->b_rd, phase);
        return;
    }
    ExchangeExecutor ex = exec_mpi(comm);
    if (!hs) {
        ex.alltoallv(ex.ctx, send, x->b_sc, x->b_sd, recv, x->b_rc, x->b_rd, phase);
        return;
    }
    be->ops->to_host(be->ctx, hs, send, row * n_send);
    ex.alltoallv(ex.ctx, hs, x->b_sc, x->b_sd, hr, x->b_rc, x->b_rd, phase);
    be->ops->from_host(be->ctx, recv, hr, row * n_recv);
}

void epx_send_rows(EpX *x, const Backend *be, Comm *comm, const float *src, int phase) {
    if (x->n_srows) be->ops->gather_rows(be->ctx, x->sbuf, src, x->srow_token_d, x->n_srows, x->D);
    exchange_rows(x, be, comm, x->sbuf, x->scnt, x->rbuf, x->rcnt, (size_t)x->n_srows, (size_t)x->n_rrows,
                  x->hs, x->hr, phase);
}

void epx_return_rows(EpX *x, const Backend *be, Comm *comm, const float *rsrc, int phase) {
    exchange_rows(x, be, comm, rsrc, x->rcnt, x->sbuf, x->scnt, (size_t)x->n_rrows, (size_t)x->n_srows,
                  x->hr, x->hs, phase);
}

void epx_combine(EpX *x, const Backend *be, float *y) {
    be->ops->combine_rows(be->ctx, y, x->sbuf, x->tok_row_d, NULL, x->N, x->kmax, x->D);
}

void epx_return_scalars(EpX *x, Comm *comm, const float *rvals, int phase) {
    bytes_of(x->recv_cnt, sizeof(float), x->P, x->b_rc, x->b_rd);
    bytes_of(x->sent_cnt, sizeof(float), x->P, x->b_sc, x->b_sd);
    ExchangeExecutor ex = exec_mpi(comm);
    ex.alltoallv(ex.ctx, rvals, x->b_rc, x->b_rd, x->sval, x->b_sc, x->b_sd, phase);
}

/* ---- the layer-facing path: flat (one exchange) or two-level (node peer, then owner) ---- */

static void epp_reserve_peer(EpPath *pp, const Backend *be, size_t rows_a, size_t ents_a);

void epp_init(EpPath *pp, const Backend *be, const EpMap *em, const Topology *topo, int two_level, int D,
              int n_max, int k) {
    memset(pp, 0, sizeof *pp);
    int P = em->P;
    pp->two_level = two_level && P > 1 && topo;
    pp->E = em->E;
    pp->k = k;
    epx_init(&pp->a, be, P, D, n_max, k);
    if (!pp->two_level) return;
    /* stage B runs over the rows a peer received (each with up to k entries); every
     * buffer sized by them starts at this rank's own pairs and grows in epp_plan */
    size_t rows_a = pp->a.rows_cap;
    epx_init_cap(&pp->b, be, P, D, n_max, k, rows_a);
    pp->topo = topo;
    pp->peer_of_expert = xcalloc(sizeof(int32_t) * em->E);
    pp->peer_version = -1;
    pp->gid = xcalloc(sizeof(int32_t) * em->E);
    for (int e = 0; e < em->E; e++) pp->gid[e] = e;
    epp_reserve_peer(pp, be, rows_a, pp->a.ents_cap);
}

/* the peer's stage-B routing arrays and partial sums for rows_a rows / ents_a entries
 * received in stage A (grow only) */
static void epp_reserve_peer(EpPath *pp, const Backend *be, size_t rows_a, size_t ents_a) {
    size_t k = (size_t)pp->k;
    if (rows_a > pp->rows_a_cap || !pp->yA) {
        pp->rows_a_cap = rows_a > pp->rows_a_cap ? rows_a : pp->rows_a_cap;
        host_grow(&pp->selB, sizeof(int32_t), pp->rows_a_cap * k);
        host_grow(&pp->keptB, sizeof(int32_t), pp->rows_a_cap * k);
        host_grow(&pp->gateB, sizeof(float), pp->rows_a_cap * k);
        dev_grow(be, &pp->yA, sizeof(float) * pp->rows_a_cap * pp->a.D);
    }
    if (ents_a > pp->ents_a_cap || !pp->a_to_b) {
        pp->ents_a_cap = ents_a > pp->ents_a_cap ? ents_a : pp->ents_a_cap;
        host_grow(&pp->a_to_b, sizeof(int32_t), pp->ents_a_cap);
    }
}

void epp_free(EpPath *pp, const Backend *be) {
    if (!pp) return;
    epx_free(&pp->a, be);
    if (pp->two_level) {
        epx_free(&pp->b, be);
        xfree(pp->peer_of_expert); xfree(pp->gid); xfree(pp->selB); xfree(pp->keptB); xfree(pp->gateB);
        xfree(pp->a_to_b);
        be->ops->free(be->ctx, pp->yA);
    }
    memset(pp, 0, sizeof *pp);
}

const EpX *epp_final(const EpPath *pp) { return pp->two_level ? &pp->b : &pp->a; }

/* rows of one stage to other ranks on this rank's node / elsewhere (no topology: one node) */
static void count_locality(EpPath *pp, const EpX *x, const Comm *comm) {
    const Topology *t = comm->topo && comm->topo->n_ranks == x->P ? comm->topo : NULL;
    for (int d = 0; d < x->P; d++) {
        if (d == comm->rank || !x->scnt[d]) continue;
        if (!t || topology_same_node(t, d, comm->rank)) pp->rows_intra += (double)x->scnt[d];
        else pp->rows_inter += (double)x->scnt[d];
    }
}

void epp_plan(EpPath *pp, EpMap *em, const Backend *be, Comm *comm, int N, int k, const int32_t *sel,
              const int32_t *kept, const float *gate) {
    pp->rows_intra = pp->rows_inter = 0;
    if (!pp->two_level) {
        epx_plan(&pp->a, em, be, comm, N, k, sel, kept, gate);
        count_locality(pp, &pp->a, comm);
        return;
    }
    const Topology *t = pp->topo;
    /* stage A: one row per (token, destination node), to the rank of that node with this
     * rank's index inside its node (the node peer), entries carry global expert ids. The
     * destination node is the owner's, or this node when a copy of the unit is here */
    if (pp->peer_version != em->version) {    /* the owners or copies changed since the last plan */
        exchange_peer_map(t, comm->rank, em->route_dest, em->E, pp->peer_of_expert);
        pp->peer_version = em->version;
    }
    epx_plan_to(&pp->a, em, be, comm, N, k, sel, kept, gate, pp->peer_of_expert, pp->gid, 1);
    /* stage B: the peer forwards each received row to the owners of its entries (or the
     * copies on its node: a row reaches a node other than the source's only when that node
     * holds the owner, and then no copy lives there) */
    const EpX *A = &pp->a;
    int NB = A->n_rrows;
    epp_reserve_peer(pp, be, (size_t)NB, (size_t)A->n_recv);
    epx_reserve_src(&pp->b, be, NB);
    for (size_t i = 0; i < (size_t)NB * k; i++) { pp->keptB[i] = -1; pp->selB[i] = 0; pp->gateB[i] = 0; }
    int32_t *fill = xcalloc(sizeof(int32_t) * (NB ? NB : 1));
    for (int i = 0; i < A->n_recv; i++) {
        int r = A->recv[i].row, s = fill[r]++;
        ASSERT(s < k);
        pp->selB[(size_t)r * k + s] = A->recv[i].slot;
        pp->gateB[(size_t)r * k + s] = A->recv[i].gate;
        pp->keptB[(size_t)r * k + s] = 0;
    }
    epx_plan_to(&pp->b, em, be, comm, NB, k, pp->selB, pp->keptB, pp->gateB, em->route_dest, em->route_slot, 0);
    count_locality(pp, &pp->a, comm);
    count_locality(pp, &pp->b, comm);
    memset(fill, 0, sizeof(int32_t) * (NB ? NB : 1));
    for (int i = 0; i < A->n_recv; i++) {
        int r = A->recv[i].row, s = fill[r]++;
        pp->a_to_b[i] = pp->b.ts_entry[(size_t)r * k + s];
    }
    xfree(fill);
}

void epp_send_rows(EpPath *pp, const Backend *be, Comm *comm, const float *src) {
    epx_send_rows(&pp->a, be, comm, src, COMM_PHASE_DISPATCH);
    if (pp->two_level) epx_send_rows(&pp->b, be, comm, pp->a.rbuf, COMM_PHASE_DISPATCH);
}

void epp_return_combine(EpPath *pp, const Backend *be, Comm *comm, const float *rsrc, float *y) {
    if (pp->two_level) {
        /* owners -> peer: the peer sums a row's partial outputs before the inter-node hop */
        epx_return_rows(&pp->b, be, comm, rsrc, COMM_PHASE_COMBINE);
        int nA = pp->a.n_rrows;
        be->ops->zero(be->ctx, pp->yA, sizeof(float) * (size_t)(nA ? nA : 1) * pp->a.D);
        epx_combine(&pp->b, be, pp->yA);
        rsrc = pp->yA;
    }
    epx_return_rows(&pp->a, be, comm, rsrc, COMM_PHASE_COMBINE);
    epx_combine(&pp->a, be, y);
}

void epp_return_scalars(EpPath *pp, Comm *comm, const float *rvals) {
    if (pp->two_level) {
        epx_return_scalars(&pp->b, comm, rvals, COMM_PHASE_COMBINE);
        for (int i = 0; i < pp->a.n_recv; i++) pp->a.rval[i] = pp->b.sval[pp->a_to_b[i]];
        rvals = pp->a.rval;
    }
    epx_return_scalars(&pp->a, comm, rvals, COMM_PHASE_COMBINE);
}

static size_t epx_buffer_bytes(const EpX *x) {
    if (!x->scnt) return 0;
    return sizeof(float) * ((size_t)x->n_src_max * x->kmax + x->rows_cap) * (size_t)x->D;
}

size_t epp_buffer_bytes(const EpPath *pp) {
    size_t n = epx_buffer_bytes(&pp->a) + epx_buffer_bytes(&pp->b);
    if (pp->two_level && pp->yA) n += sizeof(float) * pp->rows_a_cap * pp->a.D;
    return n;
}
