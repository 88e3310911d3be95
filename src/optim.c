/* optim.c: schedule, gradient reduction, clipping and AdamW. */
#include "optim.h"
#include "gradsync.h"

#include <math.h>

double optim_lr(const TrainConfig *tc, long step) {
    double lr = tc->lr, floor_lr = tc->lr * tc->min_lr_frac;
    if (tc->warmup_steps > 0 && step < tc->warmup_steps)
        return lr * (double)(step + 1) / (double)tc->warmup_steps;
    long decay = tc->steps - tc->warmup_steps;
    if (decay <= 0) return lr;
    double prog = (double)(step - tc->warmup_steps) / (double)decay;
    if (prog > 1) prog = 1;
    return floor_lr + 0.5 * (lr - floor_lr) * (1.0 + cos(M_PI * prog));
}

/* dense parameters over the world; an expert's gradient is complete inside its EP group
 * (every token of the group routed to it arrived at its owner), so expert gradients are
 * summed only over the replicas of the unit, one per EP group (rep_comm; none when the EP
 * group is the world). The gradients are backend memory: comm_dev_* (NCCL when attached).
 * With parallel.overlap_allreduce the dense sum ran in buckets during the backward
 * (gradsync.h); the expert sum over rep_comm stays blocking. */
void optim_reduce_grads(Model *m) {
    /* parallel.overlap_allreduce: the backward started the dense buckets; wait for them */
    if (m->gsync && m->gsync->armed) gradsync_finish(m->gsync);
    else if (m->n_cat[PCAT_DENSE])
        comm_dev_allreduce_sum_f32(m->comm, m->grads[PCAT_DENSE], m->n_cat[PCAT_DENSE], COMM_PHASE_ALLREDUCE);
    if (m->rep_comm && m->rep_comm->size > 1 && m->n_cat[PCAT_EXPERT])
        comm_dev_allreduce_sum_f32(m->rep_comm, m->grads[PCAT_EXPERT], m->n_cat[PCAT_EXPERT], COMM_PHASE_ALLREDUCE);
    /* replicated hot units: last, so the owner's sum is the final value its copies receive */
    if (model_ep_has_replicas(m)) model_ep_replicas_reduce(m);
}

/* global norm: the replicated dense part once, plus every expert once (the ranks of one EP
 * group hold each expert once; every group holds the same summed gradients; copies of
 * replicated units are not counted) */
double optim_grad_norm(const Model *m) {
    double dense = 0, expert = 0;
    if (m->n_cat[PCAT_DENSE]) dense = m->be->ops->sumsq(m->be->ctx, m->grads[PCAT_DENSE], m->n_cat[PCAT_DENSE]);
    if (model_ep_has_replicas(m)) expert = model_ep_primary_sumsq(m, m->grads[PCAT_EXPERT]);
    else if (m->n_cat[PCAT_EXPERT]) expert = m->be->ops->sumsq(m->be->ctx, m->grads[PCAT_EXPERT], m->n_cat[PCAT_EXPERT]);
    comm_allreduce_sum_f64(m->ep_comm ? m->ep_comm : m->comm, &expert, 1);
    return sqrt(dense + expert);
}

double optim_step(Model *m, long step, double lr) {
    double norm = optim_grad_norm(m);
    optim_step_norm(m, step, lr, norm);
    return norm;
}

void optim_step_norm(Model *m, long step, double lr, double norm) {
    const TrainConfig *tc = &m->cfg.train;
    if (tc->grad_clip > 0 && norm > tc->grad_clip) {
        float s = (float)(tc->grad_clip / (norm + 1e-6));
        for (int c = 0; c < PCAT_N; c++)
            if (m->n_cat[c]) m->be->ops->scale(m->be->ctx, m->grads[c], s, m->n_cat[c]);
    }
    for (int i = 0; i < m->n_tensors; i++) {
        const ParamTensor *t = &m->tensors[i];
        int c = t->cat;
        if (t->derived) continue;   /* masters mode: the projection is recomputed, not trained */
        if (t->ep_unit && m->ep_resident && m->ep_resident[t->layer]) {
            /* per unit: an offloaded unit is skipped (its missed updates are replayed when it returns) */
            int nr = param_unit_rows(t, m->ep[t->layer].K);
            size_t span = (size_t)nr * (t->n / t->dims[0]);
            for (int u = 0; u < m->ep[t->layer].per_rank; u++) {
                if (!m->ep_resident[t->layer][u]) continue;
                size_t o = t->offset + (size_t)u * span;
                m->be->ops->adamw(m->be->ctx, m->params[c] + o, m->grads[c] + o, m->adam_m[c] + o, m->adam_v[c] + o, span,
                                  (float)lr, (float)tc->beta1, (float)tc->beta2, (float)tc->eps,
                                  t->decay ? (float)tc->weight_decay : 0.0f, (int)(step + 1));
            }
            continue;
        }
        m->be->ops->adamw(m->be->ctx, m->params[c] + t->offset, m->grads[c] + t->offset,
                          m->adam_m[c] + t->offset, m->adam_v[c] + t->offset, t->n, (float)lr,
                          (float)tc->beta1, (float)tc->beta2, (float)tc->eps,
                          t->decay ? (float)tc->weight_decay : 0.0f, (int)(step + 1));
    }
}
