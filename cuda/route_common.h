/* route_common: the per-token arithmetic of MoE routing, shared by the host router
 * (src/router.c), the CPU backend's routing slots (src/backend_cpu.c) and the CUDA routing
 * kernels (cuda/backend_cuda.cu, one thread per token). Under nvcc every function is
 * __host__ __device__ (KC_FN of kernels_common.h); a C compiler sees static inline functions.
 * The code is the router's host code moved here unchanged in operation order (softmax in
 * double with libm exp/log, selection ties to the lower id, double accumulation of the
 * backward), so the CPU backend gives the bits the host router gave. On the device, exp/log in
 * double are CUDA's (within 1 ulp of libm's), so probabilities, gates and the backward may
 * differ from the CPU in the last bit; selections by logit (aux_free bias, two stages) are
 * exact, selection by probability (one stage, no bias) follows the probabilities' bits.
 * Include after backend.h (RouteSelArgs, RouteBwdArgs).
 * Does not: loop over tokens, allocate, node-limited routing (host only: src/router.c), or the
 * capacity queues (integer work done by the backends' route_count / route_keep).
 *
 * Legend: N E k G K TG = tokens, experts, experts per token, groups, experts per group, groups
 * per token; t = the token a function works on. */
#ifndef DCMOE_ROUTE_COMMON_H
#define DCMOE_ROUTE_COMMON_H

#include "kernels_common.h"

#ifndef INFINITY
#define INFINITY (1.0f / 0.0f)
#endif

/* p[E] = softmax(l[E]) with double accumulation; returns the log-sum-exp */
KC_FN double rc_softmax_row(const float *l, float *p, int E) {
    float mx = l[0];
    for (int e = 1; e < E; e++) if (l[e] > mx) mx = l[e];
    double sum = 0;
    for (int e = 0; e < E; e++) sum += exp((double)l[e] - mx);
    for (int e = 0; e < E; e++) p[e] = (float)(exp((double)l[e] - mx) / sum);
    return mx + log(sum);
}

KC_FN int rc_better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

/* one stage, token t: softmax row with log-sum-exp, top-k by probability (ties: lower id), or
 * by logit + bias_e with a bias (the gates stay the unbiased probs); renormalised gates */
KC_FN void rc_select_one(const RouteSelArgs *a, int t) {
    int E = a->E, k = a->k;
    const float *l = a->logits + (size_t)t * E, *bias = a->bias;
    float *p = a->probs + (size_t)t * E;
    a->lse[t] = rc_softmax_row(l, p, E);
    int32_t *sel = a->expert + (size_t)t * k;
    float *gate = a->gate + (size_t)t * k;
    double gsum = 0;
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int q = 0; q < s; q++) taken |= sel[q] == e;
            if (taken) continue;
            if (best < 0) best = e;
            else if (bias ? l[e] + bias[e] > l[best] + bias[best] : p[e] > p[best]) best = e;
        }
        sel[s] = best;
        gate[s] = p[best];
        gsum += p[best];
    }
    if (a->renorm)
        for (int s = 0; s < k; s++) gate[s] = (float)(gate[s] / gsum);
}

/* selection score of expert i: logit + bias */
KC_FN float rc_sel(const RouteSelArgs *a, const float *l, int i) { return l[i] + (a->bias ? a->bias[i] : 0.0f); }

/* two stages, token t, part 1: group scores (top-2 members' or the mean logit), the group
 * softmax q[t, G] and the group selection scores lsel[t, G] (which the host may still shift by
 * the home bias and filter by node before part 2) */
KC_FN void rc_two_scores(const RouteSelArgs *a, int t) {
    int E = a->E, G = a->G, K = a->K;
    const float *l = a->logits + (size_t)t * E;
    float *qt = a->q + (size_t)t * G, *ls = a->lsel + (size_t)t * G;   /* qt holds the scores lam first */
    for (int g = 0; g < G; g++) {
        const int32_t *mem = a->members + (size_t)g * K;
        if (a->score_top2 && K >= 2) {
            int b0 = -1, b1 = -1;   /* top-2 members by selection score */
            for (int j = 0; j < K; j++) {
                int i = mem[j];
                if (b0 < 0 || rc_better(rc_sel(a, l, i), i, rc_sel(a, l, b0), b0)) { b1 = b0; b0 = i; }
                else if (b1 < 0 || rc_better(rc_sel(a, l, i), i, rc_sel(a, l, b1), b1)) b1 = i;
            }
            a->gtop2[((size_t)t * G + g) * 2] = b0;
            a->gtop2[((size_t)t * G + g) * 2 + 1] = b1;
            qt[g] = l[b0] + l[b1];
            ls[g] = rc_sel(a, l, b0) + rc_sel(a, l, b1);
        } else {
            double s = 0, s2 = 0;
            for (int j = 0; j < K; j++) { s += l[mem[j]]; s2 += rc_sel(a, l, mem[j]); }
            qt[g] = (float)(s / K);
            ls[g] = (float)(s2 / K);
        }
    }
    float mx = qt[0];
    for (int g = 1; g < G; g++) if (qt[g] > mx) mx = qt[g];
    double zs = 0;
    for (int g = 0; g < G; g++) zs += exp((double)qt[g] - mx);
    for (int g = 0; g < G; g++) qt[g] = (float)(exp((double)qt[g] - mx) / zs);
}

/* index j of the chosen group gs[j] that holds expert e (members [G, K]), -1 if none */
KC_FN int rc_group_pos(const int32_t *members, int K, const int32_t *gs, int TG, int e) {
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++)
            if (members[(size_t)gs[j] * K + q] == e) return j;
    return -1;
}

/* two stages, token t, part 2: the top TG groups by lsel among the allowed ones (gallow [G],
 * NULL = all), softmax over the chosen groups' members, top-k experts by selection score,
 * gates (renormalised or the product q_g p~), the log-sum-exp of all E logits. Returns 0, or
 * -1 when fewer than TG groups are allowed (only with gallow). */
KC_FN int rc_two_choose(const RouteSelArgs *a, int t, const int8_t *gallow) {
    int E = a->E, G = a->G, K = a->K, k = a->k, TG = a->TG;
    const int32_t *members = a->members;
    const float *l = a->logits + (size_t)t * E, *ls = a->lsel + (size_t)t * G, *qt = a->q + (size_t)t * G;
    int32_t *gs = a->group + (size_t)t * TG;
    for (int j = 0; j < TG; j++) {
        int best = -1;
        for (int g = 0; g < G; g++) {
            if (gallow && !gallow[g]) continue;
            int taken = 0;
            for (int q = 0; q < j; q++) taken |= gs[q] == g;
            if (!taken && (best < 0 || rc_better(ls[g], g, ls[best], best))) best = g;
        }
        if (best < 0) return -1;
        gs[j] = best;
    }
    /* stage 2: softmax over the chosen groups' members, top-k by selection score */
    float *pt = a->probs + (size_t)t * E;
    for (int i = 0; i < E; i++) pt[i] = 0.0f;
    float lm = -INFINITY;
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; if (l[i] > lm) lm = l[i]; }
    double ps = 0;
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; ps += exp((double)l[i] - lm); }
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++) {
            int i = members[(size_t)gs[j] * K + q];
            pt[i] = (float)(exp((double)l[i] - lm) / ps);
        }
    int32_t *tk = a->expert + (size_t)t * k;
    float *gt = a->gate + (size_t)t * k;
    double gsum = 0;
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int j = 0; j < TG; j++)
            for (int q = 0; q < K; q++) {
                int i = members[(size_t)gs[j] * K + q], taken = 0;
                for (int u = 0; u < s; u++) taken |= tk[u] == i;
                if (!taken && (best < 0 || rc_better(rc_sel(a, l, i), i, rc_sel(a, l, best), best))) best = i;
            }
        tk[s] = best;
        gt[s] = pt[best];
        gsum += pt[best];
    }
    if (a->gate_product) {
        /* gate = q_g x p renormalised over the chosen experts of the expert's group */
        for (int j = 0; j < TG; j++) {
            double zg = 0;
            for (int s = 0; s < k; s++)
                if (rc_group_pos(members, K, gs, TG, tk[s]) == j) zg += pt[tk[s]];
            for (int s = 0; s < k; s++)
                if (rc_group_pos(members, K, gs, TG, tk[s]) == j) gt[s] = (float)(qt[gs[j]] * (pt[tk[s]] / zg));
        }
    } else if (a->renorm)
        for (int s = 0; s < k; s++) gt[s] = (float)(gt[s] / gsum);
    /* z-loss over every expert logit */
    float am = l[0];
    for (int i = 1; i < E; i++) if (l[i] > am) am = l[i];
    double as = 0;
    for (int i = 0; i < E; i++) as += exp((double)l[i] - am);
    a->lse[t] = am + log(as);
    return 0;
}

/* column c of the loss sums over tokens 0..N-1 in order (double): c < E the probs, E <= c <
 * E + G the group softmax q, c = E + G the squared log-sum-exp */
KC_FN double rc_sum_column(const RouteSelArgs *a, int c) {
    int E = a->E, G = a->G;
    double acc = 0;
    for (int t = 0; t < a->N; t++) {
        if (c < E) acc += a->probs[(size_t)t * E + c];
        else if (c < E + G) acc += a->q[(size_t)t * G + (c - E)];
        else acc += a->lse[t] * a->lse[t];
    }
    return acc;
}

/* ---- backward ---- */

/* gradient of one token's top-k gates with respect to the chosen experts' probabilities:
 * dg[s] = dloss/dgate_s (0 for dropped slots); renormalised gates g_s = p_s / Z give
 * inc[s] = (dg_s - sum_j dg_j g_j) / Z, raw gates inc[s] = dg_s */
KC_FN void rc_gate_backward(int k, const int32_t *sel, const float *gate, const float *probs, const double *dg,
                            int renorm, double *inc) {
    if (!renorm) {
        for (int s = 0; s < k; s++) inc[s] = dg[s];
        return;
    }
    double Z = 0, dot = 0;
    for (int s = 0; s < k; s++) {
        Z += probs[sel[s]];
        dot += dg[s] * gate[s];
    }
    for (int s = 0; s < k; s++) inc[s] = (dg[s] - dot) / Z;
}

/* the largest top-k the backward supports (per-token arrays on the stack) */
#define RC_MAX_K 64

/* one stage, token t: gates -> probs (+ the aux coefficient) -> softmax backward + z-loss.
 * dpt[e] = (float)fcoef_e + (float)inc[s] for the chosen expert sel[s] (top-k experts are
 * distinct, so this is the host's float scratch row computed on the fly) */
KC_FN float rc_dpt(const RouteBwdArgs *a, const int32_t *sel, const double *inc, int e) {
    float v = (float)a->fcoef[e];
    for (int s = 0; s < a->k; s++) if (sel[s] == e) v += (float)inc[s];
    return v;
}
KC_FN void rc_backward_one(const RouteBwdArgs *a, int t) {
    int E = a->E, k = a->k;
    const float *pr = a->probs + (size_t)t * E;
    const int32_t *sel = a->expert + (size_t)t * k;
    const float *gate = a->gate + (size_t)t * k;
    double dg[RC_MAX_K], inc[RC_MAX_K];
    for (int s = 0; s < k; s++) dg[s] = a->dgate[(size_t)t * k + s];
    rc_gate_backward(k, sel, gate, pr, dg, a->renorm, inc);
    double s_pd = 0;
    for (int e = 0; e < E; e++) s_pd += (double)pr[e] * rc_dpt(a, sel, inc, e);
    float *dl = a->dlogits + (size_t)t * E;
    double zc = a->z_coef * a->lse[t];
    for (int e = 0; e < E; e++) dl[e] = (float)(pr[e] * ((double)rc_dpt(a, sel, inc, e) - s_pd) + zc * pr[e]);
}

/* dp of candidate i (a member of a chosen group): its aux coefficient plus its gate gradient */
KC_FN double rc_dp(const RouteBwdArgs *a, const int32_t *tk, const double *inc, int product, int i) {
    double v = a->fcoef[i];
    if (!product)
        for (int s = 0; s < a->k; s++) if (tk[s] == i) v += inc[s];
    return v;
}

/* two stages, token t: gates -> in-group softmax, group balance through q, z-loss -> logits */
KC_FN void rc_backward_two(const RouteBwdArgs *a, int t) {
    int E = a->E, G = a->G, K = a->K, k = a->k, TG = a->TG;
    const int32_t *members = a->members;
    const double *fcoef_g = a->fcoef + E;
    const float *pt = a->probs + (size_t)t * E, *qt = a->q + (size_t)t * G, *l = a->logits + (size_t)t * E;
    const int32_t *gs = a->group + (size_t)t * TG, *tk = a->expert + (size_t)t * k;
    const float *gt = a->gate + (size_t)t * k;
    float *dl = a->dlogits + (size_t)t * E;
    for (int i = 0; i < E; i++) dl[i] = 0;
    double dg[RC_MAX_K], inc[RC_MAX_K], ag[RC_MAX_K], atot = 0;
    for (int j = 0; j < TG && j < RC_MAX_K; j++) ag[j] = 0;
    int product = a->gate_product;
    for (int s = 0; s < k; s++) dg[s] = (double)a->dgate[(size_t)t * k + s];
    if (!product) {
        rc_gate_backward(k, tk, gt, pt, dg, a->renorm, inc);
    } else {
        /* gate_s = q_g p~_s, p~ = p renormalised over C_g (the chosen experts of group g):
         * within the group dl_i += q_g p~_i (dg_i - sum_C dg p~); through q: A_g = sum_C dg gate */
        for (int j = 0; j < TG; j++) {
            double zg = 0, dot = 0;
            for (int s = 0; s < k; s++)
                if (rc_group_pos(members, K, gs, TG, tk[s]) == j) zg += pt[tk[s]];
            for (int s = 0; s < k; s++)
                if (rc_group_pos(members, K, gs, TG, tk[s]) == j) dot += dg[s] * (pt[tk[s]] / zg);
            for (int s = 0; s < k; s++) {
                if (rc_group_pos(members, K, gs, TG, tk[s]) != j) continue;
                double pn = pt[tk[s]] / zg;
                dl[tk[s]] += (float)(qt[gs[j]] * pn * (dg[s] - dot));
                ag[j] += dg[s] * gt[s];
            }
            atot += ag[j];
        }
    }
    double spd = 0;
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++) { int i = members[(size_t)gs[j] * K + q]; spd += pt[i] * rc_dp(a, tk, inc, product, i); }
    for (int j = 0; j < TG; j++)
        for (int q = 0; q < K; q++) {
            int i = members[(size_t)gs[j] * K + q];
            dl[i] += (float)(pt[i] * (rc_dp(a, tk, inc, product, i) - spd));
        }
    /* group balance: dq_g = coef_g; softmax backward to the group scores */
    double sqd = 0;
    for (int gg = 0; gg < G; gg++) sqd += qt[gg] * fcoef_g[gg];
    for (int gg = 0; gg < G; gg++) {
        double dlam = qt[gg] * (fcoef_g[gg] - sqd);
        if (product) {   /* the task term through q_g: A_g - q_g sum A */
            double av = 0;
            for (int j = 0; j < TG; j++) if (gs[j] == gg) av = ag[j];
            dlam += av - qt[gg] * atot;
        }
        if (dlam == 0) continue;
        if (a->score_top2 && K >= 2) {
            dl[a->gtop2[((size_t)t * G + gg) * 2]] += (float)dlam;
            dl[a->gtop2[((size_t)t * G + gg) * 2 + 1]] += (float)dlam;
        } else {
            for (int q = 0; q < K; q++) dl[members[(size_t)gg * K + q]] += (float)(dlam / K);
        }
    }
    if (a->z_coef != 0) {
        double zc = a->z_coef * a->lse[t];
        for (int i = 0; i < E; i++) dl[i] += (float)(zc * exp((double)l[i] - a->lse[t]));
    }
}

#endif
