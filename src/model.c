/* model.c: parameter table, initialisation, forward and backward of the transformer.
 * Legend: B T D H V F L E C N = batch (this rank), seq, d_model, heads, vocab, FFN width,
 * layers, experts, classes, tokens (B*T). Matrices are [in, out]: y = x W. */
#include "model.h"
#include "gradsync.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const param_kind_names[PARAM_N_KINDS] = {
    "embedding", "attention", "norm", "dense_ffn", "router", "expert", "head", "base", "factor"};

static int layer_is_moe(const Config *c, int l) {
    return c->moe.kind != MOE_KIND_DENSE && (l % c->moe.every) == 0;
}

static ParamTensor *add_tensor(Model *m, const char *name, int kind, int cat, int n_dims,
                               int d0, int d1, int d2, float std, int one) {
    if (m->n_tensors == m->cap_tensors) {
        m->cap_tensors = m->cap_tensors ? 2 * m->cap_tensors : 64;
        m->tensors = realloc(m->tensors, sizeof(ParamTensor) * (size_t)m->cap_tensors);
        ASSERTF(m->tensors, "out of memory for %d parameter tensors", m->cap_tensors);
    }
    ParamTensor *t = &m->tensors[m->n_tensors++];
    memset(t, 0, sizeof *t);
    str_fmt(t->name, sizeof t->name, "%s", name);
    t->kind = kind; t->cat = cat; t->n_dims = n_dims;
    t->dims[0] = d0; t->dims[1] = d1; t->dims[2] = d2;
    t->n = (size_t)d0 * (n_dims > 1 ? d1 : 1) * (n_dims > 2 ? d2 : 1);
    t->offset = m->n_cat[cat];
    m->n_cat[cat] += (t->n + 15) & ~(size_t)15;   /* 64-byte aligned views */
    t->decay = n_dims >= 2;
    t->init_std = std;
    t->init_one = one;
    t->layer = -1;
    if (!strncmp(name, "h.", 2)) t->layer = atoi(name + 2);
    t->full0 = d0;
    t->n_full = t->n;
    return t;
}

/* an expert-parallel tensor: this rank holds `local0` of the `d0` leading rows */
static void add_ep_tensor(Model *m, const char *name, int kind, int unit, int d0, int local0, int d1, int d2, float std) {
    ParamTensor *t = add_tensor(m, name, kind, PCAT_EXPERT, 3, local0, d1, d2, std, 0);
    t->ep_unit = unit;
    t->full0 = d0;
    t->n_full = (size_t)d0 * d1 * d2;
    t->full_offset = m->n_expert_full;
    m->n_expert_full += (t->n_full + 15) & ~(size_t)15;
}

/* the parameter table, in a fixed order (init, checkpoints and the reference test use it) */
static void plan_params(Model *m) {
    const Config *c = &m->cfg;
    int D = m->D, V = m->V, T = m->T, L = m->L;
    float std = (float)c->model.init_std, std_out = (float)(c->model.init_std / sqrt(2.0 * L));
    char nm[64];
    add_tensor(m, "wte", PARAM_EMBED, PCAT_DENSE, 2, V, D, 0, std, 0);
    add_tensor(m, "wpe", PARAM_EMBED, PCAT_DENSE, 2, T, D, 0, std, 0);
    for (int l = 0; l < L; l++) {
        const MoeLayer *f = &m->ffn[l];
        str_fmt(nm, sizeof nm, "h.%d.ln1.w", l); add_tensor(m, nm, PARAM_NORM, PCAT_DENSE, 1, D, 0, 0, 0, 1);
        str_fmt(nm, sizeof nm, "h.%d.ln1.b", l); add_tensor(m, nm, PARAM_NORM, PCAT_DENSE, 1, D, 0, 0, 0, 0);
        str_fmt(nm, sizeof nm, "h.%d.attn.qkv", l); add_tensor(m, nm, PARAM_ATTN, PCAT_DENSE, 2, D, 3 * D, 0, std, 0);
        str_fmt(nm, sizeof nm, "h.%d.attn.proj", l); add_tensor(m, nm, PARAM_ATTN, PCAT_DENSE, 2, D, D, 0, std_out, 0);
        str_fmt(nm, sizeof nm, "h.%d.ln2.w", l); add_tensor(m, nm, PARAM_NORM, PCAT_DENSE, 1, D, 0, 0, 0, 1);
        str_fmt(nm, sizeof nm, "h.%d.ln2.b", l); add_tensor(m, nm, PARAM_NORM, PCAT_DENSE, 1, D, 0, 0, 0, 0);
        if (f->kind == MOE_KIND_DENSE) {
            str_fmt(nm, sizeof nm, "h.%d.ffn.w1", l); add_tensor(m, nm, PARAM_DENSE_FFN, PCAT_DENSE, 2, D, f->F1, 0, std, 0);
            str_fmt(nm, sizeof nm, "h.%d.ffn.w2", l); add_tensor(m, nm, PARAM_DENSE_FFN, PCAT_DENSE, 2, f->F, D, 0, std_out, 0);
        } else if (f->kind == MOE_KIND_CLUSTERED) {
            /* factors start so that A B^T has about half the std of a base entry */
            float sf = (float)sqrt(0.5 * std / sqrt((double)f->r)), sfo = (float)sqrt(0.5 * std_out / sqrt((double)f->r));
            str_fmt(nm, sizeof nm, "h.%d.ffn.router", l); add_tensor(m, nm, PARAM_ROUTER, PCAT_DENSE, 2, D, f->E, 0, std, 0);
            int Gl = m->ep[l].n_slots, El = Gl * f->K;   /* primaries, then replica slots */
            str_fmt(nm, sizeof nm, "h.%d.ffn.base1", l); add_ep_tensor(m, nm, PARAM_BASE, 2, f->G, Gl, D, f->F1, std);
            str_fmt(nm, sizeof nm, "h.%d.ffn.base2", l); add_ep_tensor(m, nm, PARAM_BASE, 2, f->G, Gl, f->F, D, std_out);
            str_fmt(nm, sizeof nm, "h.%d.ffn.a1", l); add_ep_tensor(m, nm, PARAM_FACTOR, 1, f->E, El, D, f->r, sf);
            str_fmt(nm, sizeof nm, "h.%d.ffn.b1", l); add_ep_tensor(m, nm, PARAM_FACTOR, 1, f->E, El, f->F1, f->r, sf);
            str_fmt(nm, sizeof nm, "h.%d.ffn.a2", l); add_ep_tensor(m, nm, PARAM_FACTOR, 1, f->E, El, f->F, f->r, sfo);
            str_fmt(nm, sizeof nm, "h.%d.ffn.b2", l); add_ep_tensor(m, nm, PARAM_FACTOR, 1, f->E, El, D, f->r, sfo);
            if (model_masters(m)) {
                /* per-expert FP32 masters (trained); the six tensors above are their projection */
                for (int i = m->n_tensors - 6; i < m->n_tensors; i++) m->tensors[i].derived = 1;
                str_fmt(nm, sizeof nm, "h.%d.ffn.m1", l); add_ep_tensor(m, nm, PARAM_EXPERT, 1, f->E, El, D, f->F1, std);
                str_fmt(nm, sizeof nm, "h.%d.ffn.m2", l); add_ep_tensor(m, nm, PARAM_EXPERT, 1, f->E, El, f->F, D, std_out);
            }
        } else {
            str_fmt(nm, sizeof nm, "h.%d.ffn.router", l); add_tensor(m, nm, PARAM_ROUTER, PCAT_DENSE, 2, D, f->E, 0, std, 0);
            int El = m->ep[l].n_slots;   /* primaries, then replica slots */
            str_fmt(nm, sizeof nm, "h.%d.ffn.experts.w1", l); add_ep_tensor(m, nm, PARAM_EXPERT, 1, f->E, El, D, f->F1, std);
            str_fmt(nm, sizeof nm, "h.%d.ffn.experts.w2", l); add_ep_tensor(m, nm, PARAM_EXPERT, 1, f->E, El, f->F, D, std_out);
        }
    }
    add_tensor(m, "lnf.w", PARAM_NORM, PCAT_DENSE, 1, D, 0, 0, 0, 1);
    add_tensor(m, "lnf.b", PARAM_NORM, PCAT_DENSE, 1, D, 0, 0, 0, 0);
    if (m->task == TASK_CLASSIFY) add_tensor(m, "cls.w", PARAM_HEAD, PCAT_DENSE, 2, D, m->C, 0, std, 0);
}

/* bind the views of one parameter-shaped set (params or grads) in table order */
static float *view_next(const Model *m, float *base[PCAT_N], int *i) {
    const ParamTensor *t = &m->tensors[(*i)++];
    return base[t->cat] + t->offset;
}

static void bind_views(Model *m, float *base[PCAT_N], ModelParams *v) {
    int i = 0;
#define NEXT() view_next(m, base, &i)
    v->wte = NEXT();
    v->wpe = NEXT();
    for (int l = 0; l < m->L; l++) {
        LayerParams *lp = &v->layers[l];
        lp->ln1_w = NEXT(); lp->ln1_b = NEXT();
        lp->qkv = NEXT(); lp->proj = NEXT();
        lp->ln2_w = NEXT(); lp->ln2_b = NEXT();
        memset(&lp->ffn, 0, sizeof lp->ffn);
        if (m->ffn[l].kind == MOE_KIND_DENSE) {
            lp->ffn.w1 = NEXT(); lp->ffn.w2 = NEXT();
        } else if (m->ffn[l].kind == MOE_KIND_CLUSTERED) {
            lp->ffn.router = NEXT();
            lp->ffn.base1 = NEXT(); lp->ffn.base2 = NEXT();
            lp->ffn.a1 = NEXT(); lp->ffn.b1 = NEXT(); lp->ffn.a2 = NEXT(); lp->ffn.b2 = NEXT();
            if (model_masters(m)) { lp->ffn.w1 = NEXT(); lp->ffn.w2 = NEXT(); }
        } else {
            lp->ffn.router = NEXT();
            lp->ffn.w1 = NEXT(); lp->ffn.w2 = NEXT();
        }
    }
    v->lnf_w = NEXT();
    v->lnf_b = NEXT();
    v->cls_w = m->task == TASK_CLASSIFY ? NEXT() : NULL;
#undef NEXT
    ASSERT(i == m->n_tensors);
}

/* EP groups of parallel.ep_size ranks (topology_ep_groups): ep_comm over my group (position
 * = EP rank), rep_comm over the ranks at my position in every group, and my group's topology */
static Status ep_groups_setup(Model *m, const Config *cfg, Comm *comm) {
    int P = comm->size, S = cfg->parallel.ep_size ? cfg->parallel.ep_size : P;
    if (S > P || P % S != 0)
        return status_errorf("parallel.ep_size=%d must divide the %d ranks of the run (0 = all ranks in one "
                             "expert-parallel group)", cfg->parallel.ep_size, P);
    const Topology *t = comm->topo;
    m->ep_size = S;
    m->n_ep_groups = P / S;
    int *group_of = m->ep_group_of_rank = xcalloc(sizeof(int) * (size_t)P);
    int *pos_of = m->ep_pos_of_rank = xcalloc(sizeof(int) * (size_t)P);
    if (S == P) {
        for (int r = 0; r < P; r++) pos_of[r] = r;
        m->ep_comm = comm;
        m->ep_topo = (Topology *)t;
        return status_ok();
    }
    ASSERT(topology_ep_groups(t, P, S, group_of, pos_of) == 0);
    if (!topology_ep_congruent(t, P, S, group_of, pos_of)) {
        return status_errorf("parallel.ep_size=%d: the expert-parallel groups would have different node layouts "
                             "(%d nodes of uneven size); choose an ep_size that divides the ranks per node or is a "
                             "multiple of it", S, t ? t->n_nodes : 1);
    }
    m->ep_owned = 1;
    m->ep_group = group_of[comm->rank];
    m->ep_comm = xcalloc(sizeof(Comm));
    m->rep_comm = xcalloc(sizeof(Comm));
    comm_split(comm, group_of[comm->rank], pos_of[comm->rank], m->ep_comm);
    comm_split(comm, pos_of[comm->rank], group_of[comm->rank], m->rep_comm);
    if (t) {
        m->ep_topo = xcalloc(sizeof(Topology));
        topology_subset(m->ep_topo, t, m->ep_comm->world_of, S);
        m->ep_comm->topo = m->ep_topo;
    }
    return status_ok();
}

static void *balloc(Model *m, size_t bytes) {
    m->act_bytes += bytes;
    return m->be->ops->alloc(m->be->ctx, bytes);
}

Status model_init(Model *m, const Config *cfg, int vocab_size, int n_classes, int B_max,
                  const Backend *be, Comm *comm) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->be = be;
    m->comm = comm;
    m->V = vocab_size; m->T = cfg->model.seq_len; m->D = cfg->model.d_model;
    m->H = cfg->model.n_head; m->L = cfg->model.n_layer; m->task = cfg->model.task;
    m->C = n_classes; m->B_max = B_max;
    if (m->D % m->H != 0) return status_errorf("model.n_head=%d does not divide model.d_model=%d", m->H, m->D);
    if (m->task == TASK_CLASSIFY && m->C < 2) return status_errorf("classification needs >= 2 classes (got %d)", m->C);
    int act = cfg->model.activation == ACT_SWIGLU ? ACT_KIND_SWIGLU : ACT_KIND_GELU;
    m->ffn = xcalloc(sizeof(MoeLayer) * m->L);
    for (int l = 0; l < m->L; l++) {
        if (layer_is_moe(cfg, l)) moe_layer_setup(&m->ffn[l], &cfg->moe, cfg->moe.kind, m->D, cfg->moe.d_ff_expert, act);
        else moe_layer_setup(&m->ffn[l], &cfg->moe, MOE_KIND_DENSE, m->D, config_d_ff_dense(cfg), act);
    }
    m->cstate = xcalloc(sizeof(ClusterState) * m->L);
    for (int l = 0; l < m->L; l++) {
        MoeLayer *f = &m->ffn[l];
        if (f->kind == MOE_KIND_STANDARD) {   /* aux-loss-free selection bias (moe_update_bias) */
            m->cstate[l].bias = xcalloc(sizeof(float) * f->E);
            f->cs = &m->cstate[l];
            if (cfg->clustering.compress_at > 0) {   /* warm-up of a compression run: co-activation statistics */
                m->cstate[l].coact = xcalloc(sizeof(double) * (size_t)f->E * f->E);
                m->cstate[l].coact_n = xcalloc(sizeof(double) * (size_t)f->E);
                if (cfg->clustering.svd_space == SVD_SPACE_OUTPUT) {   /* and the experts' input statistics */
                    m->cstate[l].in_cov = xcalloc(sizeof(double) * (size_t)f->E * f->D * f->D);
                    m->cstate[l].hid_cov = xcalloc(sizeof(double) * (size_t)f->E * f->F * f->F);
                    m->cstate[l].cov_n = xcalloc(sizeof(double) * (size_t)f->E);
                }
            }
        }
        if (f->kind != MOE_KIND_CLUSTERED) continue;
        ClusterState *cs = &m->cstate[l];
        cs->group_of = xcalloc(sizeof(int32_t) * f->E);
        cs->members = xcalloc(sizeof(int32_t) * f->E);
        cs->group_ref = xcalloc(sizeof(int32_t) * f->E);
        for (int i = 0; i < f->E; i++) { cs->group_of[i] = cs->group_ref[i] = i / f->K; cs->members[i] = i; }
        cs->ref_known = 1;
        cs->bias = xcalloc(sizeof(float) * f->E);
        cs->mu_hidden = cfg->clustering.mu_source == MU_HIDDEN;
        cs->mu_dim = cs->mu_hidden ? m->D : f->E;
        if (cfg->clustering.mu_source == MU_COACT) {   /* unconstrained co-activation (recluster_mu_step) */
            cs->coact = xcalloc(sizeof(double) * (size_t)f->E * f->E);
            cs->coact_n = xcalloc(sizeof(double) * f->E);
        }
        cs->mu = xcalloc(sizeof(float) * (size_t)f->E * cs->mu_dim);
        cs->mu_sum_store = xcalloc(sizeof(double) * (size_t)f->E * (cs->mu_dim + 1));
        cs->mu_seen = xcalloc(sizeof(int32_t) * f->E);
        f->cs = cs;
    }
    /* expert parallelism: every MoE layer's units (groups or experts) split over the ranks
     * of an EP group */
    TRY(ep_groups_setup(m, cfg, comm));
    if (cfg->parallel.replicas > 0 && cfg->offload.enabled)
        return status_errorf("parallel.replicas=%d: replicated units and training-time offloading (offload.enabled) "
                             "cannot be combined; set one of them off", cfg->parallel.replicas);
    Comm *xc = m->ep_comm;
    m->ep = xcalloc(sizeof(EpMap) * m->L);
    for (int l = 0; l < m->L; l++) {
        MoeLayer *f = &m->ffn[l];
        if (f->kind == MOE_KIND_DENSE) continue;
        int K = f->kind == MOE_KIND_CLUSTERED ? f->K : 1, U = f->E / K;
        if (U % xc->size != 0)
            return status_errorf("%s=%d cannot be split evenly over %d ranks%s (expert parallelism gives every "
                                 "rank of an expert-parallel group the same number of whole %s)",
                                 f->kind == MOE_KIND_CLUSTERED ? "moe.n_groups" : "moe.n_experts", U, xc->size,
                                 m->n_ep_groups > 1 ? " (parallel.ep_size)" : "",
                                 f->kind == MOE_KIND_CLUSTERED ? "groups" : "experts");
        ep_map_init(&m->ep[l], xc->size, xc->rank, f->E, K);
        ep_map_set_topology(&m->ep[l], m->ep_topo);
        ep_map_set_replicas(&m->ep[l], cfg->parallel.replicas);
        f->ep = &m->ep[l];
        /* node-limited routing needs enough units on the M nodes a token may use */
        int M = cfg->moe.max_nodes, nn = m->ep[l].n_nodes;
        if (M > 0 && M < nn) {
            int need = f->kind == MOE_KIND_CLUSTERED ? f->top_groups : f->k;
            if ((long)M * (U / nn) < need)
                return status_errorf("moe.max_nodes=%d: %d node(s) hold %d %s (%d per node of %d), fewer than the %d "
                                     "a token selects (%s)", M, M, M * (U / nn),
                                     f->kind == MOE_KIND_CLUSTERED ? "groups" : "experts", U / nn, nn, need,
                                     f->kind == MOE_KIND_CLUSTERED ? "moe.top_groups" : "moe.top_k");
        }
        f->ep_comm = xc;
        f->two_level = cfg->parallel.exchange == EXCHANGE_TWO_LEVEL;
        f->index = l;
    }
    plan_params(m);
    for (int c = 0; c < PCAT_N; c++) {
        size_t bytes = sizeof(float) * (m->n_cat[c] ? m->n_cat[c] : 1);
        m->params[c] = be->ops->alloc(be->ctx, bytes);
        m->grads[c] = be->ops->alloc(be->ctx, bytes);
        m->adam_m[c] = be->ops->alloc(be->ctx, bytes);
        m->adam_v[c] = be->ops->alloc(be->ctx, bytes);
    }
    m->p.layers = xcalloc(sizeof(LayerParams) * m->L);
    m->g.layers = xcalloc(sizeof(LayerParams) * m->L);
    bind_views(m, m->params, &m->p);
    bind_views(m, m->grads, &m->g);

    /* activations for B_max sequences */
    int B = B_max, T = m->T, D = m->D, H = m->H, N = B * T, L = m->L;
    m->tokens = balloc(m, sizeof(int32_t) * N);
    m->targets = balloc(m, sizeof(int32_t) * N);
    m->lengths = balloc(m, sizeof(int32_t) * B);
    m->res = xcalloc(sizeof(float *) * (L + 1));
    for (int l = 0; l <= L; l++) m->res[l] = balloc(m, sizeof(float) * N * D);
    m->acts = xcalloc(sizeof(LayerActs) * L);
    for (int l = 0; l < L; l++) {
        LayerActs *a = &m->acts[l];
        a->ln1 = balloc(m, sizeof(float) * N * D);
        a->ln1_mean = balloc(m, sizeof(float) * N);
        a->ln1_rstd = balloc(m, sizeof(float) * N);
        a->qkv = balloc(m, sizeof(float) * N * 3 * D);
        a->att = balloc(m, sizeof(float) * (size_t)B * H * T * T);
        a->atty = balloc(m, sizeof(float) * N * D);
        a->res_mid = balloc(m, sizeof(float) * N * D);
        a->ln2 = balloc(m, sizeof(float) * N * D);
        a->ln2_mean = balloc(m, sizeof(float) * N);
        a->ln2_rstd = balloc(m, sizeof(float) * N);
        TRY(moe_state_init(&a->moe, &m->ffn[l], be, comm, N));
    }
    m->lnf = balloc(m, sizeof(float) * N * D);
    m->lnf_mean = balloc(m, sizeof(float) * N);
    m->lnf_rstd = balloc(m, sizeof(float) * N);
    size_t n_logits = m->task == TASK_LM ? (size_t)N * m->V : (size_t)B * m->C;
    m->logits = balloc(m, sizeof(float) * n_logits);
    m->losses = balloc(m, sizeof(float) * (N > B ? N : B));
    m->pooled = balloc(m, sizeof(float) * B * D);
    m->d_a = balloc(m, sizeof(float) * N * D);
    m->d_b = balloc(m, sizeof(float) * N * D);
    m->d_c = balloc(m, sizeof(float) * N * D);
    m->dqkv = balloc(m, sizeof(float) * N * 3 * D);
    m->datt = balloc(m, sizeof(float) * (size_t)B * H * T * T);
    m->dpooled = balloc(m, sizeof(float) * B * D);
    if (cfg->parallel.overlap_allreduce) {
        m->gsync = xcalloc(sizeof(GradSync));
        TRY(gradsync_init(m->gsync, m, cfg->parallel.bucket_mb));
    }
    return status_ok();
}

void model_free(Model *m) {
    if (m && m->gsync) { gradsync_free(m->gsync); xfree(m->gsync); m->gsync = NULL; }
    if (m) free(m->tensors);
    if (!m || !m->be) { if (m) memset(m, 0, sizeof *m); return; }
    const Backend *be = m->be;
#define BF(p) do { if (p) be->ops->free(be->ctx, p); } while (0)
    for (int c = 0; c < PCAT_N; c++) { BF(m->params[c]); BF(m->grads[c]); BF(m->adam_m[c]); BF(m->adam_v[c]); }
    BF(m->tokens); BF(m->targets); BF(m->lengths);
    if (m->res) for (int l = 0; l <= m->L; l++) BF(m->res[l]);
    if (m->acts) for (int l = 0; l < m->L; l++) {
        LayerActs *a = &m->acts[l];
        BF(a->ln1); BF(a->ln1_mean); BF(a->ln1_rstd); BF(a->qkv); BF(a->att); BF(a->atty);
        BF(a->res_mid); BF(a->ln2); BF(a->ln2_mean); BF(a->ln2_rstd);
        moe_state_free(&a->moe, be);
    }
    BF(m->lnf); BF(m->lnf_mean); BF(m->lnf_rstd); BF(m->logits); BF(m->losses); BF(m->pooled);
    BF(m->d_a); BF(m->d_b); BF(m->d_c); BF(m->dqkv); BF(m->datt); BF(m->dpooled);
#undef BF
    if (m->cstate) for (int l = 0; l < m->L; l++) {
        ClusterState *cs = &m->cstate[l];
        xfree(cs->group_of); xfree(cs->members); xfree(cs->bias); xfree(cs->mu); xfree(cs->mu_sum_store); xfree(cs->mu_seen);
        xfree(cs->coact); xfree(cs->coact_n); xfree(cs->group_ref);
        xfree(cs->in_cov); xfree(cs->hid_cov); xfree(cs->cov_n);
    }
    xfree(m->cstate);
    if (m->ep) for (int l = 0; l < m->L; l++) if (m->ep[l].E) ep_map_free(&m->ep[l]);
    xfree(m->ep);
    xfree(m->ep_group_of_rank); xfree(m->ep_pos_of_rank);
    if (m->ep_owned) {
        comm_free(m->ep_comm); comm_free(m->rep_comm);
        xfree(m->ep_comm); xfree(m->rep_comm);
        if (m->ep_topo) { topology_free(m->ep_topo); xfree(m->ep_topo); }
    }
    xfree(m->res); xfree(m->acts); xfree(m->ffn); xfree(m->p.layers); xfree(m->g.layers);
    memset(m, 0, sizeof *m);
}

void model_init_params(Model *m) {
    Rng r;
    rng_init(&r, (uint64_t)m->cfg.run.seed, 0, RNG_INIT);
    for (int c = 0; c < PCAT_N; c++) {
        size_t n = m->n_cat[c] ? m->n_cat[c] : 1;
        float *host = xcalloc(sizeof(float) * n);
        for (int i = 0; i < m->n_tensors; i++) {
            const ParamTensor *t = &m->tensors[i];
            if (t->cat != c) continue;
            float *dst = host + t->offset;
            if (!t->ep_unit) {
                for (size_t j = 0; j < t->n; j++)
                    dst[j] = t->init_one ? 1.0f : (t->init_std > 0 ? t->init_std * rng_normal(&r) : 0.0f);
                continue;
            }
            /* every rank draws the whole tensor (same values at any rank count), keeps its rows */
            size_t row = t->n / t->dims[0];
            float *full = xmalloc(sizeof(float) * t->n_full);
            for (size_t j = 0; j < t->n_full; j++) full[j] = t->init_std * rng_normal(&r);
            /* shared (upcycling): row 0 (expert 0, or group 0's base) copied to every row plus noise
             * from its own stream, so the main stream stays as with independent draws */
            if (m->cfg.moe.expert_init == EXPERT_INIT_SHARED && (t->kind == PARAM_EXPERT || t->kind == PARAM_BASE)) {
                Rng nr;
                rng_init(&nr, (uint64_t)m->cfg.run.seed, 1 + (uint64_t)i, RNG_INIT);
                size_t rl = t->n_full / t->full0;
                for (int q = 1; q < t->full0; q++)
                    for (size_t j = 0; j < rl; j++)
                        full[(size_t)q * rl + j] = full[j] + (float)(m->cfg.moe.init_noise * t->init_std) * rng_normal(&nr);
            }
            for (int q = 0; q < t->dims[0]; q++) {
                int g = model_ep_row(m, t, m->ep_comm->rank, q);
                if (g >= 0) memcpy(dst + (size_t)q * row, full + (size_t)g * row, sizeof(float) * row);
            }
            xfree(full);
        }
        m->be->ops->from_host(m->be->ctx, m->params[c], host, sizeof(float) * n);
        m->be->ops->zero(m->be->ctx, m->adam_m[c], sizeof(float) * n);
        m->be->ops->zero(m->be->ctx, m->adam_v[c], sizeof(float) * n);
        xfree(host);
    }
}

/* unit slot of leading-dim row s: primaries 0..per_rank-1, then the replica slots */
static int row_unit_slot(const EpMap *em, const ParamTensor *t, int s) { return t->ep_unit == 2 ? s : s / em->K; }

int model_ep_row(const Model *m, const ParamTensor *t, int r, int s) {
    const EpMap *em = &m->ep[t->layer];
    int K = em->K, us = row_unit_slot(em, t, s);
    int u = us < em->per_rank ? em->place.unit_at[r * em->per_rank + us] : em->rep_unit[r * em->n_rep + us - em->per_rank];
    if (u < 0) return -1;
    if (t->ep_unit == 2) return u;
    const int32_t *mem = K > 1 ? m->cstate[t->layer].members : NULL;
    return mem ? mem[(size_t)u * K + s % K] : u * K + s % K;
}

void model_ep_gather(Model *m, float *const *local, float **full, int n) {
    Comm *comm = m->ep_comm;
    const Backend *be = m->be;
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *mine = xmalloc(sizeof(float) * (nl ? nl : 1));
    float *all = xmalloc(sizeof(float) * (nl ? nl : 1) * comm->size);
    for (int a = 0; a < n; a++) {
        be->ops->to_host(be->ctx, mine, local[a], sizeof(float) * nl);
        comm_allgather_bytes(comm, mine, all, sizeof(float) * nl);
        memset(full[a], 0, sizeof(float) * m->n_expert_full);
        for (int i = 0; i < m->n_tensors; i++) {
            const ParamTensor *t = &m->tensors[i];
            if (!t->ep_unit) continue;
            size_t row = t->n / t->dims[0];
            /* the primaries only: the canonical layout holds every unit once */
            int nq = m->ep[t->layer].per_rank * param_unit_rows(t, m->ep[t->layer].K);
            for (int r = 0; r < comm->size; r++)
                for (int q = 0; q < nq; q++)
                    memcpy(full[a] + t->full_offset + (size_t)model_ep_row(m, t, r, q) * row,
                           all + (size_t)r * nl + t->offset + (size_t)q * row, sizeof(float) * row);
        }
    }
    xfree(mine);
    xfree(all);
}

void model_ep_scatter(Model *m, float *const *full, float **local, int n) {
    const Backend *be = m->be;
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *mine = xcalloc(sizeof(float) * (nl ? nl : 1));
    for (int a = 0; a < n; a++) {
        for (int i = 0; i < m->n_tensors; i++) {
            const ParamTensor *t = &m->tensors[i];
            if (!t->ep_unit) continue;
            size_t row = t->n / t->dims[0];
            /* primaries and the copies in the replica slots (an empty slot is zero) */
            for (int q = 0; q < t->dims[0]; q++) {
                int g = model_ep_row(m, t, m->ep_comm->rank, q);
                if (g >= 0) memcpy(mine + t->offset + (size_t)q * row, full[a] + t->full_offset + (size_t)g * row, sizeof(float) * row);
                else memset(mine + t->offset + (size_t)q * row, 0, sizeof(float) * row);
            }
        }
        be->ops->from_host(be->ctx, local[a], mine, sizeof(float) * nl);
    }
    xfree(mine);
}

size_t model_ep_unit_floats(const Model *m, int l) {
    size_t n = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->ep_unit && t->layer == l) n += (size_t)param_unit_rows(t, m->ep[l].K) * (t->n / t->dims[0]);
    }
    return n;
}

void model_ep_unit_copy(const Model *m, int l, float *const arr[3], int slot, float *buf, int out) {
    for (int a = 0; a < 3; a++)
        for (int i = 0; i < m->n_tensors; i++) {
            const ParamTensor *t = &m->tensors[i];
            if (!t->ep_unit || t->layer != l) continue;
            size_t n = (size_t)param_unit_rows(t, m->ep[l].K) * (t->n / t->dims[0]);
            float *span = arr[a] + t->offset + (size_t)slot * n;
            if (out) memcpy(buf, span, sizeof(float) * n);
            else memcpy(span, buf, sizeof(float) * n);
            buf += n;
        }
}

size_t model_ep_relayout(Model *m, int l, const Placement *np) {
    Comm *comm = m->ep_comm;
    const Backend *be = m->be;
    EpMap *em = &m->ep[l];
    int P = comm->size, me = comm->rank, U = em->U;
    const Placement *op = &em->place;
    size_t uf = 3 * model_ep_unit_floats(m, l);          /* params + Adam m + v of one unit */
    /* byte counts: units that change owner travel from the old owner to the new one */
    size_t *sc = xcalloc(sizeof(size_t) * P), *sd = xcalloc(sizeof(size_t) * P);
    size_t *rc = xcalloc(sizeof(size_t) * P), *rd = xcalloc(sizeof(size_t) * P);
    for (int u = 0; u < U; u++) {
        if (op->owner[u] == np->owner[u]) continue;
        if (op->owner[u] == me) sc[np->owner[u]] += uf * sizeof(float);
        if (np->owner[u] == me) rc[op->owner[u]] += uf * sizeof(float);
    }
    size_t ns = 0, nr = 0;
    for (int r = 0; r < P; r++) { sd[r] = ns; ns += sc[r]; rd[r] = nr; nr += rc[r]; }
    size_t nl = m->n_cat[PCAT_EXPERT];
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    float *host[3], *next[3];
    for (int a = 0; a < 3; a++) {
        host[a] = xmalloc(sizeof(float) * (nl ? nl : 1));
        be->ops->to_host(be->ctx, host[a], arr[a], sizeof(float) * nl);
        next[a] = xmalloc(sizeof(float) * (nl ? nl : 1));
        memcpy(next[a], host[a], sizeof(float) * nl);
    }
    char *sbuf = xmalloc(ns ? ns : 1), *rbuf = xmalloc(nr ? nr : 1);
    /* pack: destination-major, units ascending */
    size_t *fill = xcalloc(sizeof(size_t) * P);
    for (int u = 0; u < U; u++) {
        int d = np->owner[u];
        if (op->owner[u] != me || d == me) continue;
        model_ep_unit_copy(m, l, host, op->slot[u], (float *)(sbuf + sd[d] + fill[d]), 1);
        fill[d] += uf * sizeof(float);
    }
    comm_alltoallv_bytes(comm, sbuf, sc, sd, rbuf, rc, rd, COMM_PHASE_MIGRATION);
    /* unpack into the new slots: kept units move slot locally, arrived units from rbuf */
    memset(fill, 0, sizeof(size_t) * P);
    float *tmp = xmalloc(sizeof(float) * (uf ? uf : 1));
    for (int u = 0; u < U; u++) {
        int o = op->owner[u];
        if (np->owner[u] != me) continue;
        const float *src = tmp;
        if (o != me) { src = (const float *)(rbuf + rd[o] + fill[o]); fill[o] += uf * sizeof(float); }
        else model_ep_unit_copy(m, l, host, op->slot[u], tmp, 1);
        model_ep_unit_copy(m, l, next, np->slot[u], (float *)src, 0);
    }
    for (int a = 0; a < 3; a++) {
        be->ops->from_host(be->ctx, arr[a], next[a], sizeof(float) * nl);
        xfree(host[a]);
        xfree(next[a]);
    }
    placement_copy(&em->place, np);
    ep_map_refresh(em, em->K > 1 ? m->cstate[l].members : NULL);
    xfree(tmp); xfree(sbuf); xfree(rbuf); xfree(fill); xfree(sc); xfree(sd); xfree(rc); xfree(rd);
    return ns;
}

/* ---- replicated hot units (parallel.replicas): copies in the replica slots ---- */

/* one unit slot of layer l in a backend array laid out like the expert category (the
 * layer's expert tensors in table order) to the host buffer (out = 1) or back (out = 0) */
static void unit_span_io(const Model *m, int l, float *arr, int slot, float *buf, int out) {
    const Backend *be = m->be;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (!t->ep_unit || t->layer != l) continue;
        size_t n = (size_t)param_unit_rows(t, m->ep[l].K) * (t->n / t->dims[0]);
        float *span = arr + t->offset + (size_t)slot * n;
        if (out) be->ops->to_host(be->ctx, buf, span, sizeof(float) * n);
        else be->ops->from_host(be->ctx, span, buf, sizeof(float) * n);
        buf += n;
    }
}

int model_ep_has_replicas(const Model *m) {
    for (int l = 0; l < m->L; l++)
        if (m->ep[l].E && m->ep[l].n_rep) return 1;
    return 0;
}

size_t model_ep_replicas_update(Model *m, int l, int force, int *changed) {
    EpMap *em = &m->ep[l];
    if (!em->n_rep) return 0;
    Comm *comm = m->ep_comm;
    int P = comm->size, me = comm->rank, NR = em->n_rep;
    int32_t *nu = xmalloc(sizeof(int32_t) * (size_t)P * NR);
    ep_replicas_choose(em, nu);
    /* a slot whose copy changed (or every filled slot when forced: the units' contents
     * changed, e.g. re-clustering) gets params + Adam moments from the unit's owner */
    size_t uf = model_ep_unit_floats(m, l), ub = 3 * uf * sizeof(float);
    size_t *sc = xcalloc(sizeof(size_t) * P), *sd = xcalloc(sizeof(size_t) * P);
    size_t *rc = xcalloc(sizeof(size_t) * P), *rd = xcalloc(sizeof(size_t) * P);
    int diff = 0;
    for (int i = 0; i < P * NR; i++) {
        diff |= nu[i] != em->rep_unit[i];
        if (nu[i] < 0 || (nu[i] == em->rep_unit[i] && !force)) continue;
        int r = i / NR, o = em->place.owner[nu[i]];
        if (o == me) sc[r] += ub;
        if (r == me) rc[o] += ub;
    }
    size_t ns = 0, nr = 0;
    for (int r = 0; r < P; r++) { sd[r] = ns; ns += sc[r]; rd[r] = nr; nr += rc[r]; }
    char *sbuf = xmalloc(ns ? ns : 1), *rbuf = xmalloc(nr ? nr : 1);
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    /* pack at the owners: destination-major, (rank, slot) ascending */
    size_t *fill = xcalloc(sizeof(size_t) * P);
    for (int i = 0; i < P * NR; i++) {
        if (nu[i] < 0 || (nu[i] == em->rep_unit[i] && !force) || em->place.owner[nu[i]] != me) continue;
        int r = i / NR;
        float *dst = (float *)(sbuf + sd[r] + fill[r]);
        for (int a = 0; a < 3; a++) unit_span_io(m, l, arr[a], em->place.slot[nu[i]], dst + a * uf, 1);
        fill[r] += ub;
    }
    comm_alltoallv_bytes(comm, sbuf, sc, sd, rbuf, rc, rd, COMM_PHASE_MIGRATION);
    /* unpack into my replica slots in the same order; a slot that became empty is zeroed */
    memset(fill, 0, sizeof(size_t) * P);
    float *zero = xcalloc(sizeof(float) * (uf ? uf : 1));
    for (int s = 0; s < NR; s++) {
        int i = me * NR + s, ls = em->per_rank + s;
        if (nu[i] < 0) {
            if (em->rep_unit[i] >= 0)
                for (int a = 0; a < 3; a++) unit_span_io(m, l, arr[a], ls, zero, 0);
            continue;
        }
        if (nu[i] == em->rep_unit[i] && !force) continue;
        int o = em->place.owner[nu[i]];
        const float *src = (const float *)(rbuf + rd[o] + fill[o]);
        for (int a = 0; a < 3; a++) unit_span_io(m, l, arr[a], ls, (float *)src + a * uf, 0);
        fill[o] += ub;
    }
    memcpy(em->rep_unit, nu, sizeof(int32_t) * (size_t)P * NR);
    ep_map_refresh(em, em->K > 1 ? m->cstate[l].members : NULL);
    if (changed) *changed |= diff;
    xfree(zero); xfree(nu); xfree(sbuf); xfree(rbuf); xfree(fill); xfree(sc); xfree(sd); xfree(rc); xfree(rd);
    return ns;
}

void model_ep_replicas_reduce(Model *m) {
    Comm *comm = m->ep_comm;
    int P = comm->size, me = comm->rank;
    for (int l = 0; l < m->L; l++) {
        EpMap *em = &m->ep[l];
        if (!em->E || !em->n_rep) continue;
        int NR = em->n_rep, any = 0;
        for (int i = 0; i < P * NR; i++) any |= em->rep_unit[i] >= 0;
        if (!any) continue;
        size_t uf = model_ep_unit_floats(m, l), ub = uf * sizeof(float);
        float *g = m->grads[PCAT_EXPERT];
        size_t *sc = xcalloc(sizeof(size_t) * P), *sd = xcalloc(sizeof(size_t) * P);
        size_t *rc = xcalloc(sizeof(size_t) * P), *rd = xcalloc(sizeof(size_t) * P);
        for (int i = 0; i < P * NR; i++) {
            int u = em->rep_unit[i];
            if (u < 0) continue;
            int r = i / NR, o = em->place.owner[u];
            if (r == me) sc[o] += ub;
            if (o == me) rc[r] += ub;
        }
        size_t ns = 0, nr = 0;
        for (int r = 0; r < P; r++) { sd[r] = ns; ns += sc[r]; rd[r] = nr; nr += rc[r]; }
        char *sbuf = xmalloc(ns ? ns : 1), *rbuf = xmalloc(nr ? nr : 1);
        /* copies -> owners: my replica slots in slot order (destination-major) */
        size_t *fill = xcalloc(sizeof(size_t) * P);
        for (int s = 0; s < NR; s++) {
            int u = em->rep_unit[me * NR + s];
            if (u < 0) continue;
            int o = em->place.owner[u];
            unit_span_io(m, l, g, em->per_rank + s, (float *)(sbuf + sd[o] + fill[o]), 1);
            fill[o] += ub;
        }
        comm_alltoallv_bytes(comm, sbuf, sc, sd, rbuf, rc, rd, COMM_PHASE_ALLREDUCE);
        /* owners: own gradient first, then the copies' by ascending (rank, slot) */
        float *acc = xcalloc(sizeof(float) * (size_t)em->per_rank * (uf ? uf : 1));
        char *have = xcalloc((size_t)em->per_rank);
        memset(fill, 0, sizeof(size_t) * P);
        for (int i = 0; i < P * NR; i++) {
            int u = em->rep_unit[i];
            if (u < 0 || em->place.owner[u] != me) continue;
            int r = i / NR, ps = em->place.slot[u];
            float *a = acc + (size_t)ps * uf;
            if (!have[ps]) { unit_span_io(m, l, g, ps, a, 1); have[ps] = 1; }
            const float *in = (const float *)(rbuf + rd[r] + fill[r]);
            for (size_t j = 0; j < uf; j++) a[j] += in[j];
            fill[r] += ub;
        }
        /* the sums: into the owners' slots and back to every copy (the reverse exchange) */
        memset(fill, 0, sizeof(size_t) * P);
        for (int i = 0; i < P * NR; i++) {
            int u = em->rep_unit[i];
            if (u < 0 || em->place.owner[u] != me) continue;
            int r = i / NR;
            memcpy(rbuf + rd[r] + fill[r], acc + (size_t)em->place.slot[u] * uf, ub);
            fill[r] += ub;
        }
        for (int ps = 0; ps < em->per_rank; ps++)
            if (have[ps]) unit_span_io(m, l, g, ps, acc + (size_t)ps * uf, 0);
        comm_alltoallv_bytes(comm, rbuf, rc, rd, sbuf, sc, sd, COMM_PHASE_ALLREDUCE);
        memset(fill, 0, sizeof(size_t) * P);
        for (int s = 0; s < NR; s++) {
            int u = em->rep_unit[me * NR + s];
            if (u < 0) continue;
            int o = em->place.owner[u];
            unit_span_io(m, l, g, em->per_rank + s, (float *)(sbuf + sd[o] + fill[o]), 0);
            fill[o] += ub;
        }
        xfree(acc); xfree(have); xfree(sbuf); xfree(rbuf); xfree(fill); xfree(sc); xfree(sd); xfree(rc); xfree(rd);
    }
}

double model_ep_primary_sumsq(const Model *m, const float *arr) {
    double s = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        if (t->cat != PCAT_EXPERT || !t->ep_unit) continue;
        const EpMap *em = &m->ep[t->layer];
        size_t n = (size_t)em->per_rank * param_unit_rows(t, em->K) * (t->n / t->dims[0]);
        if (n) s += m->be->ops->sumsq(m->be->ctx, arr + t->offset, n);
    }
    return s;
}

/* CRC-32 of one unit slot's params + Adam moments */
static double unit_crc(const Model *m, int l, int slot, float *tmp, size_t uf) {
    float *arr[3] = {m->params[PCAT_EXPERT], m->adam_m[PCAT_EXPERT], m->adam_v[PCAT_EXPERT]};
    uint32_t c = 0;
    for (int a = 0; a < 3; a++) {
        unit_span_io(m, l, arr[a], slot, tmp, 1);
        c = crc32_update(c, tmp, sizeof(float) * uf);
    }
    return (double)c;
}

int model_ep_replicas_mismatch(Model *m, double *per_layer) {
    Comm *comm = m->ep_comm;
    int P = comm->size, me = comm->rank, total = 0, i = 0;
    for (int l = 0; l < m->L; l++) {
        EpMap *em = &m->ep[l];
        if (!em->E) continue;
        double bad = 0;
        int NR = em->n_rep;
        if (NR) {
            size_t uf = model_ep_unit_floats(m, l), n = (size_t)P * NR;
            float *tmp = xmalloc(sizeof(float) * (uf ? uf : 1));
            double *crc = xmalloc(sizeof(double) * 2 * n);   /* [copy, primary] per replica slot, -1 = not mine */
            for (size_t q = 0; q < 2 * n; q++) crc[q] = -1;
            for (size_t q = 0; q < n; q++) {
                int u = em->rep_unit[q];
                if (u < 0) continue;
                if ((int)(q / NR) == me) crc[q] = unit_crc(m, l, em->per_rank + (int)(q % NR), tmp, uf);
                if (em->place.owner[u] == me) crc[n + q] = unit_crc(m, l, em->place.slot[u], tmp, uf);
            }
            comm_allreduce_max_f64(comm, crc, 2 * n);
            for (size_t q = 0; q < n; q++) bad += em->rep_unit[q] >= 0 && crc[q] != crc[n + q];
            xfree(tmp); xfree(crc);
        }
        if (per_layer) per_layer[i] = bad;
        total += (int)bad;
        i++;
    }
    /* every EP group checks its own copies: the world agrees on the largest count */
    double t = total;
    comm_allreduce_max_f64(m->comm, &t, 1);
    return (int)t;
}

size_t model_n_params(const Model *m) {
    size_t n = 0;
    for (int i = 0; i < m->n_tensors; i++) n += m->tensors[i].n_full;
    return n;
}

void model_param_counts(const Model *m, double by_kind[PARAM_N_KINDS], double *total, double *active) {
    for (int k = 0; k < PARAM_N_KINDS; k++) by_kind[k] = 0;
    double act = 0, tot = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        by_kind[t->kind] += (double)t->n_full;
        tot += (double)t->n_full;
        if (t->kind == PARAM_EXPERT && t->layer >= 0 && m->ffn[t->layer].kind == MOE_KIND_CLUSTERED) continue;  /* masters: the forward reads their projection */
        if (t->kind == PARAM_EXPERT || t->kind == PARAM_FACTOR) act += (double)t->n_full / t->full0 * m->cfg.moe.top_k;
        else if (t->kind == PARAM_BASE) act += (double)t->n_full / t->full0 * m->cfg.moe.top_groups;
        else act += (double)t->n_full;
    }
    *total = tot;
    *active = act;
}

double model_flops_per_token(const Model *m) {
    /* forward matmul FLOPs per token: 2 * (qkv + proj + active FFN + router) + attention
     * (2 * 2 * T/2 * D causal average) + LM head; training = 3x forward */
    double D = m->D, T = m->T, f = 0;
    for (int l = 0; l < m->L; l++) {
        const MoeLayer *ff = &m->ffn[l];
        f += 2.0 * (D * 3 * D + D * D);
        f += 2.0 * T * D;                              /* QK^T and PV, causal half of 2*2*T*D */
        if (ff->kind == MOE_KIND_CLUSTERED) {  /* base once per (token, group), low rank per expert */
            double fc = 2.0 * ff->top_groups * (D * ff->F1 + ff->F * D) + 2.0 * ff->k * ff->r * (D + ff->F1 + ff->F + D);
            /* masters: the weight gradient is per expert (x^T dh, a^T dz), a third of the standard layer's step;
               the caller's 3x counts the clustered forward three times, so replace one of them */
            f += model_masters(m) ? fc + (2.0 * ff->k * (D * ff->F1 + ff->F * D) - fc) / 3.0 : fc;
        } else
            f += 2.0 * ff->k * (D * ff->F1 + ff->F * D);
        if (ff->kind != MOE_KIND_DENSE) f += 2.0 * D * ff->E;
    }
    if (m->task == TASK_LM) f += 2.0 * D * m->V;
    return 3.0 * f;
}

double model_forward(Model *m, const int32_t *inputs, const int32_t *targets, const int32_t *lengths,
                     int B, long n_global) {
    ASSERTF(B <= m->B_max, "batch of %d sequences > capacity %d", B, m->B_max);
    const Backend *be = m->be;
    void *cx = be->ctx;
    const BackendOps *op = be->ops;
    int T = m->T, D = m->D, H = m->H, N = B * T;
    m->B = B;
    op->from_host(cx, m->tokens, inputs, sizeof(int32_t) * N);
    if (m->task == TASK_LM) op->from_host(cx, m->targets, targets, sizeof(int32_t) * N);
    else {
        op->from_host(cx, m->targets, targets, sizeof(int32_t) * B);
        op->from_host(cx, m->lengths, lengths, sizeof(int32_t) * B);
    }
    op->embed_forward(cx, m->res[0], m->tokens, m->p.wte, m->p.wpe, B, T, D);
    m->aux_loss = 0;
    m->z_loss = 0;
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == MOE_KIND_CLUSTERED)
            m->cstate[l].mu_sum = m->collect_mu && !m->cstate[l].coact ? m->cstate[l].mu_sum_store : NULL;
    for (int l = 0; l < m->L; l++) {
        const LayerParams *lp = &m->p.layers[l];
        LayerActs *a = &m->acts[l];
        op->layernorm_forward(cx, a->ln1, a->ln1_mean, a->ln1_rstd, m->res[l], lp->ln1_w, lp->ln1_b, N, D);
        op->gemm(cx, false, false, N, 3 * D, D, 1.0f, a->ln1, D, lp->qkv, 3 * D, 0.0f, a->qkv, 3 * D);
        op->attention_forward(cx, a->atty, a->att, a->qkv, B, T, D, H);
        op->copy(cx, a->res_mid, m->res[l], sizeof(float) * N * D);
        op->gemm(cx, false, false, N, D, D, 1.0f, a->atty, D, lp->proj, D, 1.0f, a->res_mid, D);
        op->layernorm_forward(cx, a->ln2, a->ln2_mean, a->ln2_rstd, a->res_mid, lp->ln2_w, lp->ln2_b, N, D);
        /* FFN output into d_a (scratch), then residual */
        /* the MoE normaliser is tokens in the global batch (every rank runs B sequences) */
        moe_forward(&m->ffn[l], be, m->comm, m->ffn_view ? &m->ffn_view[l] : &lp->ffn, &a->moe, m->d_a, a->ln2, N,
                    (long)N * m->comm->size);
        op->copy(cx, m->res[l + 1], a->res_mid, sizeof(float) * N * D);
        op->axpy(cx, m->res[l + 1], m->d_a, 1.0f, (size_t)N * D);
        m->aux_loss += a->moe.stats.aux_loss;
        m->z_loss += a->moe.stats.z_loss;
    }
    op->layernorm_forward(cx, m->lnf, m->lnf_mean, m->lnf_rstd, m->res[m->L], m->p.lnf_w, m->p.lnf_b, N, D);
    int n_rows, n_cols;
    if (m->task == TASK_LM) {
        /* logits [N,V] = lnf [N,D] wte^T */
        op->gemm(cx, false, true, N, m->V, D, 1.0f, m->lnf, D, m->p.wte, D, 0.0f, m->logits, m->V);
        n_rows = N; n_cols = m->V;
    } else {
        op->pool_forward(cx, m->cfg.model.pooling == POOL_LAST ? POOL_KIND_LAST : POOL_KIND_MEAN,
                         m->pooled, m->lnf, m->lengths, B, T, D);
        op->gemm(cx, false, false, B, m->C, D, 1.0f, m->pooled, D, m->p.cls_w, m->C, 0.0f, m->logits, m->C);
        n_rows = B; n_cols = m->C;
    }
    op->xent_forward(cx, m->losses, m->logits, m->targets, n_rows, n_cols);
    float *host = xmalloc(sizeof(float) * n_rows);
    op->to_host(cx, host, m->losses, sizeof(float) * n_rows);
    double sum = 0;
    int n_t = 0;
    const int32_t *tg = targets;
    for (int i = 0; i < n_rows; i++) if (tg[i] >= 0) { sum += host[i]; n_t++; }
    xfree(host);
    m->loss_sum = sum;
    m->n_targets_local = n_t;
    return sum / (double)n_global + m->aux_loss + m->z_loss;
}

void model_predictions(const Model *m, int32_t *pred) {
    int B = m->B, C = m->C;
    float *host = xmalloc(sizeof(float) * B * C);
    m->be->ops->to_host(m->be->ctx, host, m->logits, sizeof(float) * B * C);
    for (int b = 0; b < B; b++) {
        int best = 0;
        for (int c = 1; c < C; c++) if (host[b * C + c] > host[b * C + best]) best = c;
        pred[b] = best;
    }
    xfree(host);
}

void model_zero_grad(Model *m) {
    for (int c = 0; c < PCAT_N; c++)
        m->be->ops->zero(m->be->ctx, m->grads[c], sizeof(float) * (m->n_cat[c] ? m->n_cat[c] : 1));
}

void model_backward(Model *m, long n_global) {
    const Backend *be = m->be;
    void *cx = be->ctx;
    const BackendOps *op = be->ops;
    int B = m->B, T = m->T, D = m->D, H = m->H, N = B * T;
    float *dres = m->d_a, *dmid = m->d_b, *dtmp = m->d_c;
    float scale = (float)(1.0 / (double)n_global);
    GradSync *gs = m->gsync;
    if (gs) gradsync_begin(gs);
    op->zero(cx, dtmp, sizeof(float) * N * D);
    if (m->task == TASK_LM) {
        op->xent_backward(cx, m->logits, m->logits, m->targets, scale, N, m->V);
        /* dwte [V,D] += dlogits^T lnf;  dlnf [N,D] = dlogits wte */
        op->gemm(cx, true, false, m->V, D, N, 1.0f, m->logits, m->V, m->lnf, D, 1.0f, m->g.wte, D);
        op->gemm(cx, false, false, N, D, m->V, 1.0f, m->logits, m->V, m->p.wte, D, 0.0f, dtmp, D);
    } else {
        op->xent_backward(cx, m->logits, m->logits, m->targets, scale, B, m->C);
        op->gemm(cx, true, false, D, m->C, B, 1.0f, m->pooled, D, m->logits, m->C, 1.0f, m->g.cls_w, m->C);
        op->gemm(cx, false, true, B, D, m->C, 1.0f, m->logits, m->C, m->p.cls_w, m->C, 0.0f, m->dpooled, D);
        op->pool_backward(cx, m->cfg.model.pooling == POOL_LAST ? POOL_KIND_LAST : POOL_KIND_MEAN,
                          dtmp, m->dpooled, m->lengths, B, T, D);
    }
    op->zero(cx, dres, sizeof(float) * N * D);
    op->layernorm_backward(cx, dres, m->g.lnf_w, m->g.lnf_b, dtmp, m->res[m->L], m->p.lnf_w,
                           m->lnf_mean, m->lnf_rstd, N, D);
    for (int l = m->L - 1; l >= 0; l--) {
        const LayerParams *lp = &m->p.layers[l];
        LayerParams *gp = &m->g.layers[l];
        LayerActs *a = &m->acts[l];
        /* res[l+1] = res_mid + ffn(ln2(res_mid)) */
        op->copy(cx, dmid, dres, sizeof(float) * N * D);
        op->zero(cx, dtmp, sizeof(float) * N * D);
        moe_backward(&m->ffn[l], be, m->comm, m->ffn_view ? &m->ffn_view[l] : &lp->ffn, &gp->ffn, &a->moe, dtmp, dres, a->ln2);
        op->layernorm_backward(cx, dmid, gp->ln2_w, gp->ln2_b, dtmp, a->res_mid, lp->ln2_w,
                               a->ln2_mean, a->ln2_rstd, N, D);
        /* res_mid = res[l] + atty proj */
        op->gemm(cx, true, false, D, D, N, 1.0f, a->atty, D, dmid, D, 1.0f, gp->proj, D);
        op->gemm(cx, false, true, N, D, D, 1.0f, dmid, D, lp->proj, D, 0.0f, dtmp, D);
        op->zero(cx, m->dqkv, sizeof(float) * N * 3 * D);
        op->attention_backward(cx, m->dqkv, m->datt, dtmp, a->qkv, a->att, B, T, D, H);
        op->gemm(cx, true, false, D, 3 * D, N, 1.0f, a->ln1, D, m->dqkv, 3 * D, 1.0f, gp->qkv, 3 * D);
        op->gemm(cx, false, true, N, D, 3 * D, 1.0f, m->dqkv, 3 * D, lp->qkv, 3 * D, 0.0f, dtmp, D);
        op->copy(cx, dres, dmid, sizeof(float) * N * D);
        op->layernorm_backward(cx, dres, gp->ln1_w, gp->ln1_b, dtmp, m->res[l], lp->ln1_w,
                               a->ln1_mean, a->ln1_rstd, N, D);
        if (gs) gradsync_ready(gs, l);   /* layer l's dense gradients (and the tail's) are final */
    }
    op->embed_backward(cx, m->g.wte, m->g.wpe, dres, m->tokens, B, T, D);
    if (gs) gradsync_ready(gs, -1);
}

int model_masters(const Model *m) {
    return m->cfg.clustering.mode == CLUSTER_MODE_MASTERS && m->cfg.moe.kind == MOE_KIND_CLUSTERED;
}

int model_n_moe_layers(const Model *m) {
    int n = 0;
    for (int l = 0; l < m->L; l++) n += m->ffn[l].kind != MOE_KIND_DENSE;
    return n;
}

int model_n_clustered_layers(const Model *m) {
    int n = 0;
    for (int l = 0; l < m->L; l++) n += m->ffn[l].kind == MOE_KIND_CLUSTERED;
    return n;
}
