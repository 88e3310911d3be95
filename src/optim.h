/* optim: learning-rate schedule (linear warmup + cosine to a floor), data-parallel gradient
 * reduction, global-norm gradient clipping and AdamW over every parameter tensor but the
 * derived ones (ParamTensor.derived: the projection of clustering.mode masters).
 * Does not: own state (Adam moments live in the model's allocations). */
#ifndef DCMOE_OPTIM_H
#define DCMOE_OPTIM_H

#include "model.h"

/* learning rate for 0-based step */
double optim_lr(const TrainConfig *tc, long step);
/* sum gradients over ranks (they already carry the 1/n_global loss scale) */
void optim_reduce_grads(Model *m);
/* global gradient L2 norm (after reduction) */
double optim_grad_norm(const Model *m);
/* clip + AdamW update for 0-based step; returns the pre-clip gradient norm */
double optim_step(Model *m, long step, double lr);
/* the same with the norm already computed by optim_grad_norm (the caller checked it is finite) */
void optim_step_norm(Model *m, long step, double lr, double norm);

#endif
