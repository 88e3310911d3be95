"""PyTorch reference for the hand-written C model: logits, loss, aux/z losses, routing and EVERY
gradient, for the dense FFN, the standard top-k MoE (with and without capacity drops, with
and without gate renormalisation, dropless), the clustered MoE (two-stage routing, group and
expert capacity, group and in-group balance losses, aux-loss-free bias, base + low-rank
experts) and the classification head (mean and last pooling).

The clustered layer is computed NAIVELY here: every expert's full W1_i = base1[g(i)] +
a1_i b1_i^T and W2_i = base2[g(i)] + a2_i b2_i^T is rebuilt and applied to its tokens, so the
comparison proves the C base-reuse computation exact. A base-reuse computation written in
torch is checked against the naive one (outputs and gradients) as a sanity check.

tests/reference_dump (C) builds a small model for a named case, runs one forward + backward
and writes a record file (format documented at the top of tests/reference_dump.c). This
script rebuilds the same model independently in PyTorch float64 (Mixtral-style MoE: a loop
over experts with index_add, an explicit capacity queue), loads the same weights and batch,
differentiates with autograd and compares.

Criterion per tensor (C float32 = a, PyTorch float64 = b):
    ||a-b|| / ||b|| <= 1e-4   and   |a-b| <= atol + 1e-3 |b| elementwise, atol = 1e-5 max|b|

Run with /usr/bin/python3 (numpy, torch). The dump program is found at
$DCMOE_BUILD_ROOT/tests/reference_dump, else argv[1]. Exit 0 pass, 1 fail, 77 skip (no torch).
DCMOE_REF_PERTURB=case:tensor (e.g. "moe:grad.h.0.ffn.router") perturbs one element of that C
tensor before comparing, to see the test fail.
"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as Fn
except ImportError:  # pragma: no cover
    print("# SKIP: torch is not importable by", sys.executable, flush=True)
    sys.exit(77)

CASES = ["dense-gelu", "dense-swiglu", "moe", "moe-capacity", "moe-swiglu-norenorm",
         "moe-dropless", "moe-ties", "classify", "classify-last",
         "clustered", "clustered-capacity", "clustered-top2-swiglu", "clustered-2groups",
         "clustered-classify", "clustered-auxfree"]
REL_TOL = 1e-4      # ||a-b|| / ||b||
RTOL = 1e-3         # elementwise, relative part
ATOL_FRAC = 1e-5    # elementwise absolute part, as a fraction of max|b|
NEAR_TIE = 1e-5     # a probability gap this small can flip a float32 top-k choice
NEAR_TIE_SCORE = 1e-5   # the same for a (logit-scale) selection score or group score
REUSE_TOL = 1e-10   # naive vs base-reuse torch computation (both float64)
EXACT_TIE = 1e-12   # float64 probabilities this close are an exact tie (tied router columns)

MAGIC = b"DCMOEREF"
VERSION = 1
DTYPES = {0: np.float32, 1: np.int32, 2: np.float64}
DTYPE_TEXT = 3


# ------------------------------------------------------------------------------------------
# record file
# ------------------------------------------------------------------------------------------

def load_records(path):
    """{name: np.ndarray or str} in file order."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != MAGIC:
        raise ValueError(f"{path}: not a reference dump (magic {buf[:8]!r}, expected {MAGIC!r})")
    (ver,) = struct.unpack_from("<I", buf, 8)
    if ver != VERSION:
        raise ValueError(f"{path}: format version {ver}, this reader knows {VERSION}: "
                         "rebuild tests/reference_dump and this test from the same tree")
    off, recs = 12, {}
    while off < len(buf):
        (nl,) = struct.unpack_from("<I", buf, off); off += 4
        name = buf[off:off + nl].decode(); off += nl
        dt, nd = struct.unpack_from("<II", buf, off); off += 8
        dims = struct.unpack_from(f"<{nd}I", buf, off); off += 4 * nd
        n = int(np.prod(dims)) if nd else 1
        if dt == DTYPE_TEXT:
            recs[name] = buf[off:off + n].decode(); off += n
            continue
        if dt not in DTYPES:
            raise ValueError(f"{path}: record {name}: unknown dtype {dt}")
        dtype = np.dtype(DTYPES[dt]).newbyteorder("<")
        arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off).reshape(dims)
        off += n * dtype.itemsize
        recs[name] = arr.astype(DTYPES[dt])
    return recs


# ------------------------------------------------------------------------------------------
# the model, written independently in PyTorch (float64)
# ------------------------------------------------------------------------------------------

def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def attention(x, wqkv, wproj, H):
    B, T, D = x.shape
    hd = D // H
    q, k, v = (x @ wqkv).split(D, dim=-1)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, H, hd).transpose(1, 2)
    v = v.view(B, T, H, hd).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, D)
    return y @ wproj


def gelu_tanh(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def activation(h, F, act):
    """h [n,F1] -> a [n,F]: gelu (F1 = F) or swiglu on [h1 | h3] (F1 = 2F)."""
    if act == "gelu":
        return gelu_tanh(h)
    return Fn.silu(h[:, :F]) * h[:, F:]


def ffn(x, w1, w2, act):
    """x [n,D], w1 [D,F] (gelu) or [D,2F] = [W1 | W3] (swiglu), w2 [F,D]."""
    return activation(x @ w1, w2.shape[0], act) @ w2


def route(probs, k):
    """top-k experts per token by probability, ties to the lower index (float64 decisions),
    plus the gap between the k-th and the (k+1)-th probability per token. Probabilities within
    EXACT_TIE are a tie (equal router columns can differ by an ulp in the float64 matmul)."""
    p = probs.detach().numpy()
    order = np.argsort(-p, axis=1, kind="stable")
    for row, o in zip(p, order):          # ties (up to float64 noise) to the lower index
        for _ in range(len(o)):
            swapped = False
            for j in range(len(o) - 1):
                if abs(row[o[j]] - row[o[j + 1]]) <= EXACT_TIE and o[j] > o[j + 1]:
                    o[j], o[j + 1] = o[j + 1], o[j]
                    swapped = True
            if not swapped:
                break
    sel = order[:, :k]
    ps = np.take_along_axis(p, order, axis=1)
    gap = ps[:, k - 1] - ps[:, k] if p.shape[1] > k else np.full(p.shape[0], np.inf)
    return sel, gap


def capacity_queue(sel, E, cap):
    """kept[N,k]: the queue is slot-major (every token's first choice before any second choice),
    then token order; an expert takes the first `cap` entries of its queue (cap < 0: all)."""
    N, k = sel.shape
    kept = np.zeros((N, k), dtype=bool)
    queue_pos = np.zeros(E, dtype=np.int64)
    for s in range(k):
        for t in range(N):
            e = sel[t, s]
            kept[t, s] = cap < 0 or queue_pos[e] < cap
            queue_pos[e] += 1
    return kept


def moe_layer(x, router, w1, w2, cfg, act, n_tok):
    """Standard top-k MoE on x [N,D]. n_tok = the global token count the C passes (the loss
    normaliser): capacity, f_i, P_i and the z-loss use it. Returns out, aux, z, routing."""
    N = x.shape[0]
    E, k = cfg["E"], cfg["k"]
    logits = x @ router                              # [N,E]
    probs = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)            # [N]
    sel, gap = route(probs, k)
    sel_t = torch.from_numpy(sel)
    gates = probs.gather(1, sel_t)                   # [N,k]
    if cfg["renormalize"] and k > 1:                 # dropped pairs still count in the sum
        gates = gates / gates.sum(dim=1, keepdim=True)
    cap = -1 if cfg["dropless"] else math.ceil(cfg["capacity_factor"] * n_tok * k / E)
    kept = capacity_queue(sel, E, cap)
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = np.nonzero((sel == e) & kept)
        if len(tok) == 0:
            continue
        tok_t, slot_t = torch.from_numpy(tok), torch.from_numpy(slot)
        y = ffn(x[tok_t], w1[e], w2[e], act)
        out = out.index_add(0, tok_t, gates[tok_t, slot_t].unsqueeze(1) * y)
    routed = np.bincount(sel.reshape(-1), minlength=E).astype(np.float64)
    f = torch.from_numpy(routed / (n_tok * k))      # constant: no gradient through counts
    P = probs.sum(dim=0) / n_tok
    aux = cfg["aux_loss_coef"] * E * (f * P).sum()
    z = cfg["z_loss_coef"] * (lse ** 2).sum() / n_tok
    n_routed = N * k
    info = dict(sel=sel, kept=kept, gap=gap, cap=cap, probs=probs,
                dropped_frac=(n_routed - kept.sum()) / n_routed)
    return out, aux, z, info


# ------------------------------------------------------------------------------------------
# the clustered MoE layer
# ------------------------------------------------------------------------------------------

def ranked(scores, n):
    """first n indices per row by descending score, ties to the lower index (stable sort), and
    the gap between the n-th and the (n+1)-th score (inf when there is no (n+1)-th)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    srt = np.take_along_axis(scores, order, axis=1)
    if scores.shape[1] > n:
        gap = srt[:, n - 1] - srt[:, n]
        gap = np.where(np.isfinite(gap), gap, np.inf)
    else:
        gap = np.full(scores.shape[0], np.inf)
    return order[:, :n], gap


def cluster_route(logits, bias, members, cfg):
    """two-stage routing on logits [N,E] (torch, float64). Selection scores = logits + bias
    (bias nonzero only with balance aux_free); probabilities never see the bias. Returns the
    group scores lam (torch), the group softmax q, the chosen groups gsel [N,TG] (slot order),
    the in-group softmax probs (torch), the chosen experts esel [N,k] and the decision gaps."""
    N, E = logits.shape
    G, K = members.shape
    TG, k = cfg["top_groups"], cfg["k"]
    ln = logits.detach().numpy()
    sel = ln + (bias.astype(np.float64) if cfg["balance"] == "aux_free" else 0.0)
    mem_t = torch.from_numpy(members.astype(np.int64))
    gaps = {}
    if cfg["group_score"] == "top2" and K >= 2:
        top2 = np.zeros((N, G, 2), dtype=np.int64)
        mgap = np.full(N, np.inf)
        for g in range(G):
            o, gp = ranked(sel[:, members[g]], 2)
            top2[:, g] = members[g][o]
            mgap = np.minimum(mgap, gp)
        gaps["top2 member"] = mgap
        t2 = torch.from_numpy(top2)
        lam = logits.gather(1, t2[:, :, 0]) + logits.gather(1, t2[:, :, 1])      # [N,G]
        lsel = np.take_along_axis(sel, top2[:, :, 0], 1) + np.take_along_axis(sel, top2[:, :, 1], 1)
    else:
        lam = logits[:, mem_t].mean(dim=-1)                                       # [N,G]
        lsel = sel[:, members].mean(axis=-1)
    q = torch.softmax(lam, dim=1)
    gsel, gaps["group"] = ranked(lsel, TG)
    cand = np.zeros((N, E), dtype=bool)
    for j in range(TG):
        cand[np.arange(N)[:, None], members[gsel[:, j]]] = True
    neg = torch.full_like(logits, -math.inf)
    probs = torch.softmax(torch.where(torch.from_numpy(cand), logits, neg), dim=1)
    esel, gaps["expert"] = ranked(np.where(cand, sel, -np.inf), k)
    return lam, q, gsel, cand, probs, esel, gaps


def cluster_capacity(gsel, esel, group_of, cfg, n_tok):
    """group capacity (slot-major over the TG group slots, then token order; a (token, group)
    over capacity drops all of that token's experts in the group), then expert capacity on the
    surviving pairs (slot-major over the k slots, then token order)."""
    N, TG = gsel.shape
    k = esel.shape[1]
    G, E = cfg["G"], cfg["E"]
    if cfg["dropless"]:
        cap_g = cap_e = -1
    else:
        cap_g = math.ceil(cfg["group_capacity_factor"] * n_tok * TG / G)
        cap_e = math.ceil(cfg["capacity_factor"] * n_tok * k / E)
    gkeep = capacity_queue(gsel, G, cap_g)                     # [N,TG]
    gok = np.zeros((N, k), dtype=bool)                         # the pair's group survived
    for s in range(k):
        g = group_of[esel[:, s]]
        gok[:, s] = ((gsel == g[:, None]) & gkeep).any(axis=1)
    kept = np.zeros((N, k), dtype=bool)
    queue_pos = np.zeros(E, dtype=np.int64)
    for s in range(k):
        for t in range(N):
            if not gok[t, s]:
                continue
            e = esel[t, s]
            kept[t, s] = cap_e < 0 or queue_pos[e] < cap_e
            queue_pos[e] += 1
    return dict(cap_g=cap_g, cap=cap_e, gkeep=gkeep, gok=gok, kept=kept)


def expert_weights(base1, base2, a1, b1, a2, b2, group_of):
    """the full W1 [E,D,F1] and W2 [E,F,D] of every expert."""
    g = torch.from_numpy(group_of.astype(np.int64))
    W1 = base1[g] + torch.einsum("edr,efr->edf", a1, b1)
    W2 = base2[g] + torch.einsum("efr,edr->efd", a2, b2)
    return W1, W2


def clustered_naive(x, W, esel, kept, gates, act):
    """token output = sum over kept slots of gate * act(x W1_i) W2_i, one expert at a time."""
    W1, W2 = W
    out = torch.zeros_like(x)
    for e in range(W1.shape[0]):
        tok, slot = np.nonzero((esel == e) & kept)
        if len(tok) == 0:
            continue
        tok_t, slot_t = torch.from_numpy(tok), torch.from_numpy(slot)
        y = ffn(x[tok_t], W1[e], W2[e], act)
        out = out.index_add(0, tok_t, gates[tok_t, slot_t].unsqueeze(1) * y)
    return out


def clustered_reuse(x, params, group_of, esel, kept, gates, act):
    """the C's computation in torch: x Base1_g once per (token, group), low-rank up term per
    expert; S = sum_i gate_i a_i per (token, group), S Base2_g once, plus the gated low-rank
    down terms."""
    base1, base2, a1, b1, a2, b2 = params
    G, F = base1.shape[0], base2.shape[1]
    out = torch.zeros_like(x)
    eg = group_of[esel]                                         # [N,k] group of each pair
    for g in range(G):
        rows_tok = np.unique(np.nonzero(kept & (eg == g))[0])   # tokens with a kept pair in g
        if len(rows_tok) == 0:
            continue
        row_of = {int(t): i for i, t in enumerate(rows_tok)}
        rt = torch.from_numpy(rows_tok)
        hb = x[rt] @ base1[g]
        S = torch.zeros(len(rows_tok), F, dtype=x.dtype)
        low = torch.zeros(len(rows_tok), x.shape[1], dtype=x.dtype)
        for e in np.nonzero(group_of == g)[0]:
            tok, slot = np.nonzero((esel == e) & kept)
            if len(tok) == 0:
                continue
            rows = torch.tensor([row_of[int(t)] for t in tok], dtype=torch.int64)
            tok_t, slot_t = torch.from_numpy(tok), torch.from_numpy(slot)
            gt = gates[tok_t, slot_t].unsqueeze(1)
            h = hb[rows] + (x[tok_t] @ a1[e]) @ b1[e].t()
            a = activation(h, F, act)
            S = S.index_add(0, rows, gt * a)
            low = low.index_add(0, rows, gt * ((a @ a2[e]) @ b2[e].t()))
        out = out.index_add(0, rt, S @ base2[g] + low)
    return out


def clustered_layer(x, router, params, cs, cfg, act, n_tok):
    """clustered MoE on x [N,D]; params = (base1, base2, a1, b1, a2, b2); cs: the C layer's
    group_of, members, bias. Returns out, aux (in-group + group), z, routing info."""
    E, k, G, TG = cfg["E"], cfg["k"], cfg["G"], cfg["top_groups"]
    group_of, members, bias = cs["group_of"], cs["members"], cs["bias"]
    logits = x @ router
    lse = torch.logsumexp(logits, dim=-1)
    lam, q, gsel, cand, probs, esel, gaps = cluster_route(logits, bias, members, cfg)
    esel_t = torch.from_numpy(esel)
    gates = probs.gather(1, esel_t)
    if cfg["renormalize"] and k > 1:                 # dropped pairs still count in the sum
        gates = gates / gates.sum(dim=1, keepdim=True)
    capi = cluster_capacity(gsel, esel, group_of, cfg, n_tok)
    kept = capi["kept"]
    W = expert_weights(*params, group_of)
    out = clustered_naive(x, W, esel, kept, gates, act)

    # balance losses: f constants (counts, no gradient), P~ and Q means over n_tok tokens
    aux_free = cfg["balance"] == "aux_free"
    a_e = 0.0 if aux_free else cfg["aux_loss_coef"]
    a_g = 0.0 if aux_free else cfg["group_aux_coef"]
    counts_routed = np.bincount(esel[capi["gok"]], minlength=E).astype(np.float64)
    counts = np.bincount(esel[kept], minlength=E).astype(np.float64)
    group_counts = np.bincount(gsel.reshape(-1), minlength=G).astype(np.float64)
    f_e = torch.from_numpy(counts_routed / (n_tok * k))
    f_g = torch.from_numpy(group_counts / (n_tok * TG))
    aux_e = a_e * E * (f_e * probs.sum(dim=0) / n_tok).sum()
    aux_g = a_g * G * (f_g * q.sum(dim=0) / n_tok).sum()
    z = cfg["z_loss_coef"] * (lse ** 2).sum() / n_tok
    routed = counts_routed.sum()
    g_routed = group_counts.sum()
    g_kept = (group_counts if capi["cap_g"] < 0 else np.minimum(group_counts, capi["cap_g"])).sum()
    info = dict(clustered=True, logits=logits.detach().numpy(), sel=esel, gsel=gsel, cand=cand, kept=kept, gaps=gaps,
                cap=capi["cap"], cap_g=capi["cap_g"], gok=capi["gok"], probs=probs, q=q,
                counts_routed=counts_routed, counts=counts, group_counts=group_counts,
                dropped_frac=(routed - kept.sum()) / routed if routed > 0 else 0.0,
                group_dropped_frac=(g_routed - g_kept) / g_routed if g_routed > 0 else 0.0,
                aux_g=aux_g, x=x, params=params, W=W, gates=gates, act=act, out=out)
    return out, aux_e + aux_g, z, info


def reuse_sanity(rep, case, l, info):
    """the naive per-expert output and a base-reuse computation in torch agree, and so do their
    gradients (of a fixed random projection) w.r.t. the input, gates and every factor."""
    x, params, gates = info["x"], info["params"], info["gates"]
    group_of = info["group_of"]
    reuse = clustered_reuse(x, params, group_of, info["sel"], info["kept"], gates, info["act"])
    naive = info["out"]
    scale = float(naive.detach().abs().max())
    d_out = float((reuse - naive).detach().abs().max()) / scale
    R = torch.from_numpy(np.random.default_rng(7 + l).standard_normal(tuple(naive.shape)))
    wrt = [x, gates] + list(params)
    gn = torch.autograd.grad((naive * R).sum(), wrt, retain_graph=True, allow_unused=True)
    gr = torch.autograd.grad((reuse * R).sum(), wrt, retain_graph=True, allow_unused=True)
    d_grad = 0.0
    for a, b in zip(gn, gr):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        d_grad = max(d_grad, float((a - b).abs().max()) / max(float(a.abs().max()), 1e-300))
    rep.check(case, d_out <= REUSE_TOL and d_grad <= REUSE_TOL,
              f"layer {l}: torch naive per-expert == torch base reuse (output {d_out:.1e}, "
              f"gradients {d_grad:.1e}, relative to max)")


def torch_forward(cfg, P, recs):
    """P: name -> leaf tensor (float64, requires_grad). Returns logits, loss, aux, z, routing."""
    B, T, D, H, L = cfg["B"], cfg["T"], cfg["D"], cfg["H"], cfg["L"]
    eps = cfg["layernorm_eps"]
    act = cfg["activation"]
    inputs = torch.from_numpy(recs["inputs"].astype(np.int64))
    targets = torch.from_numpy(recs["targets"].astype(np.int64))
    n_global = int((recs["targets"] >= 0).sum())
    assert n_global == cfg["n_global"], (n_global, cfg["n_global"])
    classify = cfg["task"] == "classify"
    # the MoE normaliser (capacity, f_i, P_i, z-loss) is the number of tokens in the global
    # batch, B*T, whatever the number of targets
    n_tok = inputs.shape[0] * T
    x = P["wte"][inputs] + P["wpe"][torch.arange(T)].unsqueeze(0)
    aux_total = torch.zeros((), dtype=torch.float64)
    z_total = torch.zeros((), dtype=torch.float64)
    routing = {}
    for l in range(L):
        pre = f"h.{l}."
        x = x + attention(layernorm(x, P[pre + "ln1.w"], P[pre + "ln1.b"], eps),
                          P[pre + "attn.qkv"], P[pre + "attn.proj"], H)
        h2 = layernorm(x, P[pre + "ln2.w"], P[pre + "ln2.b"], eps).reshape(B * T, D)
        is_moe = cfg["moe_kind"] != 0 and l % cfg["every"] == 0
        if is_moe and cfg["moe_kind"] == 2:
            assert pre + "ffn.base1" in P, f"layer {l} should be clustered"
            cs = {n: recs[f"moe.{l}.{n}"] for n in ("group_of", "members", "bias")}
            params = tuple(P[pre + "ffn." + n] for n in ("base1", "base2", "a1", "b1", "a2", "b2"))
            y, aux, z, info = clustered_layer(h2, P[pre + "ffn.router"], params, cs, cfg, act, n_tok)
            aux_total = aux_total + aux
            z_total = z_total + z
            info["aux"], info["z"] = aux, z
            info["group_of"] = cs["group_of"]
            routing[l] = info
        elif is_moe:
            assert pre + "ffn.router" in P, f"layer {l} should be MoE"
            y, aux, z, info = moe_layer(h2, P[pre + "ffn.router"], P[pre + "ffn.experts.w1"],
                                        P[pre + "ffn.experts.w2"], cfg, act, n_tok)
            aux_total = aux_total + aux
            z_total = z_total + z
            info["aux"], info["z"] = aux, z
            info["tied"] = cfg.get("tied_experts", [])
            routing[l] = info
        else:
            assert pre + "ffn.w1" in P, f"layer {l} should be dense"
            y = ffn(h2, P[pre + "ffn.w1"], P[pre + "ffn.w2"], act)
        x = x + y.view(B, T, D)
    xf = layernorm(x, P["lnf.w"], P["lnf.b"], eps)
    if classify:
        lengths = torch.from_numpy(recs["lengths"].astype(np.int64))
        if cfg["pooling"] == "mean":
            mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(xf.dtype)   # [B,T]
            pooled = (xf * mask.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(1).to(xf.dtype)
        else:
            pooled = xf[torch.arange(B), lengths - 1]
        logits = pooled @ P["cls.w"]                                                   # [B,C]
        ce = Fn.cross_entropy(logits, targets, reduction="sum") / n_global
    else:
        logits = xf @ P["wte"].t()                                                     # [B,T,V]
        ce = Fn.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1,
                              reduction="sum") / n_global
    loss = ce + aux_total + z_total
    return logits, loss, aux_total, z_total, routing


# ------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------

def compare(a, b):
    """a: C (float32), b: reference (float64). Returns (ok, rel, max_abs, n_bad)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        return False, math.inf, math.inf, max(a.size, b.size)
    diff = np.abs(a - b)
    nb = float(np.linalg.norm(b))
    maxb = float(np.abs(b).max()) if b.size else 0.0
    if nb == 0.0:
        rel = 0.0 if float(np.linalg.norm(a)) == 0.0 else math.inf
    else:
        rel = float(np.linalg.norm(a - b)) / nb
    atol = ATOL_FRAC * maxb
    bad = diff > atol + RTOL * np.abs(b)
    n_bad = int(bad.sum())
    ok = rel <= REL_TOL and n_bad == 0
    return ok, rel, float(diff.max()) if diff.size else 0.0, n_bad


class Report:
    def __init__(self):
        self.failures = []
        self.worst = {}   # case -> max rel err

    def tensor(self, case, name, a, b):
        ok, rel, mx, n_bad = compare(a, b)
        self.worst[case] = max(self.worst.get(case, 0.0), rel)
        tag = "ok    " if ok else "FAIL  "
        extra = "" if ok else f"  ({n_bad} element(s) outside atol+rtol|b|)"
        print(f"  {tag}{name:<28s} rel {rel:9.2e}  max|a-b| {mx:9.2e}  max|b| "
              f"{float(np.abs(np.asarray(b)).max()):9.2e}{extra}", flush=True)
        if not ok:
            self.failures.append(f"{case}: {name} rel {rel:.2e} max abs {mx:.2e}")
        return ok

    def check(self, case, cond, msg):
        print(f"  {'ok    ' if cond else 'FAIL  '}{msg}", flush=True)
        if not cond:
            self.failures.append(f"{case}: {msg}")
        return cond


def check_routing(rep, case, l, info, recs):
    """top-k choices and kept/dropped must agree; a disagreement at a near tie is named."""
    c_sel = recs[f"moe.{l}.topk_expert"].astype(np.int64)
    c_kept = recs[f"moe.{l}.kept"].astype(bool)
    stats = recs[f"moe.{l}.stats"]          # aux, z, dropped_frac, capacity
    sel, kept, gap = info["sel"], info["kept"], info["gap"]
    bad_tok = np.nonzero((c_sel != sel).any(axis=1))[0]
    min_gap = float(gap.min())
    if len(bad_tok):
        for t in bad_tok[:5]:
            p = info["probs"][t].detach().numpy()
            top = np.sort(p)[::-1][:sel.shape[1] + 1]
            adj_gap = float(np.min(top[:-1] - top[1:]))      # closest pair among the top k+1
            both = set(c_sel[t].tolist()) | set(sel[t].tolist())
            if info.get("tied") and set(info["tied"]) <= both:
                why = "EXACT TIE of the tied experts: the tie rule differs (lower index first)"
            elif adj_gap < NEAR_TIE:
                why = "NEAR TIE (float32 vs float64 rounding), not a logic error"
            else:
                why = "NOT a tie: the routing logic differs"
            print(f"    layer {l} token {t}: C top-k {c_sel[t].tolist()} vs torch {sel[t].tolist()}, "
                  f"probs {{{', '.join(f'{e}: {p[e]:.9f}' for e in sorted(both))}}}, smallest gap "
                  f"among the top k+1 {adj_gap:.2e} -> {why}", flush=True)
    tied = info.get("tied", [])
    if tied:
        a, b = tied
        c_probs = recs[f"moe.{l}.probs"]
        rank = np.argsort(np.argsort(-info["probs"].detach().numpy(), axis=1, kind="stable"), axis=1)
        # ties that decide something: both among the top k+1 and at least one selected
        decisive = (np.minimum(rank[:, a], rank[:, b]) < sel.shape[1]) & \
                   (np.maximum(rank[:, a], rank[:, b]) <= sel.shape[1])
        exact_c = int((c_probs[:, a] == c_probs[:, b]).sum())
        info["n_decisive_ties"] = int(decisive.sum())
        rep.check(case, exact_c == c_probs.shape[0],
                  f"layer {l}: experts {a} and {b} tie exactly in the C probs for {exact_c} of "
                  f"{c_probs.shape[0]} tokens")
        rep.check(case, info["n_decisive_ties"] > 0,
                  f"layer {l}: {info['n_decisive_ties']} tokens where the tie decides the choice "
                  "or the slot order")
    rep.check(case, len(bad_tok) == 0,
              f"layer {l}: top-k experts agree for all {sel.shape[0]} tokens "
              f"(smallest k-th/(k+1)-th prob gap {min_gap:.2e})")
    rep.check(case, int(stats[3]) == info["cap"],
              f"layer {l}: capacity C {int(stats[3])} == torch {info['cap']}")
    same_kept = np.array_equal(c_kept, kept)
    rep.check(case, same_kept,
              f"layer {l}: kept/dropped agree ({int((~kept).sum())} of {kept.size} pairs dropped)")
    rep.check(case, abs(stats[2] - info["dropped_frac"]) < 1e-12,
              f"layer {l}: dropped fraction C {stats[2]:.4f} == torch {info['dropped_frac']:.4f}")
    rep.tensor(case, f"moe.{l}.probs", recs[f"moe.{l}.probs"], info["probs"].detach().numpy())
    rep.tensor(case, f"moe.{l}.aux_loss", stats[0:1], [info["aux"].item()])
    rep.tensor(case, f"moe.{l}.z_loss", stats[1:2], [info["z"].item()])
    return info["dropped_frac"]


def check_cluster_routing(rep, case, l, info, recs, cfg):
    """chosen groups, chosen experts (slot order), kept/dropped, the per-expert and per-group
    counts, capacities, dropped fractions, probabilities and the balance/z losses."""
    E, G = cfg["E"], cfg["G"]
    K = E // G
    group_of, members = recs[f"moe.{l}.group_of"], recs[f"moe.{l}.members"]
    rep.check(case, np.array_equal(group_of, np.arange(E) // K) and
              np.array_equal(members, np.arange(E).reshape(G, K)),
              f"layer {l}: fixed contiguous groups (expert i in group i/{K})")
    bias = recs[f"moe.{l}.bias"]
    if cfg["balance"] == "aux_free":
        # the bias must matter: routing without it differs for some tokens
        logits = info["probs"].new_tensor(info["logits"])
        _, _, g0, _, _, e0, _ = cluster_route(logits, np.zeros_like(bias), members, cfg)
        n_chg = int(((g0 != info["gsel"]).any(axis=1) | (e0 != info["sel"]).any(axis=1)).sum())
        rep.check(case, np.abs(bias).max() > 0 and n_chg > 0,
                  f"layer {l}: aux_free selection bias (max |b| {np.abs(bias).max():.3f}) changes the "
                  f"routing of {n_chg} tokens")
    else:
        rep.check(case, not np.any(bias), f"layer {l}: selection bias is 0 (balance aux)")
    c_sel = recs[f"moe.{l}.topk_expert"].astype(np.int64)
    c_kept = recs[f"moe.{l}.kept"].astype(bool)
    c_probs = recs[f"moe.{l}.probs"]
    stats = recs[f"moe.{l}.stats"]           # aux, z, dropped_frac, capacity
    gstats = recs[f"moe.{l}.gstats"]         # group aux, group dropped_frac
    sel, gsel, kept, gaps = info["sel"], info["gsel"], info["kept"], info["gaps"]
    N, TG = gsel.shape
    # the C's chosen groups: the groups where its in-group softmax is nonzero (whole groups)
    nz = (c_probs != 0).reshape(N, G, K)
    whole = bool(np.all(nz.all(axis=2) == nz.any(axis=2)))
    c_groups = [set(np.nonzero(nz[t].any(axis=1))[0].tolist()) for t in range(N)]
    bad_g = [t for t in range(N) if c_groups[t] != set(gsel[t].tolist())]
    bad_e = np.nonzero((c_sel != sel).any(axis=1))[0]
    for t in sorted(set(bad_g) | set(bad_e.tolist()))[:5]:
        g_gap = float(gaps["group"][t])
        e_gap = float(gaps["expert"][t])
        m_gap = float(gaps.get("top2 member", np.full(N, np.inf))[t])
        smallest = min(g_gap, e_gap, m_gap)
        why = ("NEAR TIE (float32 vs float64 rounding), not a logic error" if smallest < NEAR_TIE_SCORE
               else "NOT a tie: the routing logic differs")
        print(f"    layer {l} token {t}: C groups {sorted(c_groups[t])} experts {c_sel[t].tolist()} vs "
              f"torch groups {gsel[t].tolist()} experts {sel[t].tolist()}; score gaps: group "
              f"{g_gap:.2e}, expert {e_gap:.2e}, top-2 member {m_gap:.2e} -> {why}", flush=True)
    rep.check(case, whole, f"layer {l}: C in-group probabilities are nonzero on whole groups only")
    rep.check(case, len(bad_g) == 0,
              f"layer {l}: chosen groups agree for all {N} tokens (smallest group-score gap "
              f"{float(gaps['group'].min()):.2e}"
              + (f", top-2 member gap {float(gaps['top2 member'].min()):.2e}" if "top2 member" in gaps else "")
              + ")")
    rep.check(case, len(bad_e) == 0,
              f"layer {l}: chosen experts agree for all {N} tokens (smallest k-th/(k+1)-th "
              f"selection-score gap {float(gaps['expert'].min()):.2e})")
    rep.check(case, int(stats[3]) == info["cap"],
              f"layer {l}: expert capacity C {int(stats[3])} == torch {info['cap']} "
              f"(group capacity {info['cap_g']})")
    for nm, ref in (("group_counts", info["group_counts"]), ("counts_routed", info["counts_routed"]),
                    ("counts", info["counts"])):
        c = recs[f"moe.{l}.{nm}"]
        rep.check(case, np.array_equal(c, ref), f"layer {l}: {nm} C {c.astype(int).tolist()} == "
                  f"torch {ref.astype(int).tolist()}")
    n_gdrop = int((~info["gok"]).sum())
    rep.check(case, np.array_equal(c_kept, kept),
              f"layer {l}: kept/dropped agree ({int((~kept).sum())} of {kept.size} pairs dropped, "
              f"{n_gdrop} of them by group capacity)")
    rep.check(case, abs(gstats[1] - info["group_dropped_frac"]) < 1e-12,
              f"layer {l}: group dropped fraction C {gstats[1]:.4f} == torch "
              f"{info['group_dropped_frac']:.4f}")
    rep.check(case, abs(stats[2] - info["dropped_frac"]) < 1e-12,
              f"layer {l}: expert dropped fraction C {stats[2]:.4f} == torch {info['dropped_frac']:.4f}")
    rep.tensor(case, f"moe.{l}.probs", c_probs, info["probs"].detach().numpy())
    rep.tensor(case, f"moe.{l}.aux_loss", stats[0:1], [info["aux"].item()])
    rep.tensor(case, f"moe.{l}.group_aux_loss", gstats[0:1], [info["aux_g"].item()])
    rep.tensor(case, f"moe.{l}.z_loss", stats[1:2], [info["z"].item()])
    reuse_sanity(rep, case, l, info)
    return info["group_dropped_frac"], info["dropped_frac"]


def comparator_selfcheck(rep, case, c_grad, ref_grad):
    """the comparator must reject a perturbed gradient: one large element off by 1% of max|b|,
    and the smallest element off by 3x the absolute tolerance."""
    a = np.array(c_grad, dtype=np.float64).reshape(-1)
    b = np.asarray(ref_grad, dtype=np.float64).reshape(-1)
    maxb = np.abs(b).max()
    big = a.copy(); big[np.argmax(np.abs(b))] += 1e-2 * maxb
    small = a.copy(); small[np.argmin(np.abs(b))] += 3 * ATOL_FRAC * maxb
    rep.check(case, not compare(big, b)[0] and not compare(small, b)[0],
              "comparator rejects a perturbed gradient (1% of max on one element; 3x atol on "
              "the smallest)")


def run_case(rep, exe, case, tmp):
    path = os.path.join(tmp, case + ".bin")
    proc = subprocess.run([exe, path, case], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    for line in proc.stdout.splitlines():
        print("  # " + line)
    if not rep.check(case, proc.returncode == 0, f"reference_dump {case} exits 0 (rc {proc.returncode})"):
        return
    recs = load_records(path)
    cfg = json.loads(recs["cfg"])
    perturb = os.environ.get("DCMOE_REF_PERTURB", "")
    if perturb.startswith(case + ":"):
        tname = perturb.split(":", 1)[1]
        arr = recs[tname].copy()
        flat = arr.reshape(-1)
        i = int(np.argmax(np.abs(flat)))
        flat[i] *= 1.01
        recs[tname] = arr
        print(f"  # DCMOE_REF_PERTURB: {tname}[{i}] scaled by 1.01 (this case must FAIL)")

    pnames = [n for n in recs if f"grad.{n}" in recs]
    P = {n: torch.tensor(recs[n], dtype=torch.float64, requires_grad=True) for n in pnames}
    logits, loss, aux, z, routing = torch_forward(cfg, P, recs)
    loss.backward(retain_graph=bool(routing))   # the base-reuse sanity check differentiates again

    drops, gdrops = [], []
    for l, info in routing.items():
        if info.get("clustered"):
            gd, d = check_cluster_routing(rep, case, l, info, recs, cfg)
            gdrops.append(gd)
            drops.append(d)
        else:
            drops.append(check_routing(rep, case, l, info, recs))
    rep.tensor(case, "logits", recs["logits"], logits.detach().numpy())
    rep.tensor(case, "loss", recs["loss"], [loss.item()])
    if routing:
        rep.tensor(case, "aux_loss", recs["aux_loss"], [aux.item()])
        rep.tensor(case, "z_loss", recs["z_loss"], [z.item()])
    else:
        rep.check(case, recs["aux_loss"][0] == 0 and recs["z_loss"][0] == 0,
                  "dense model: aux and z losses are 0")
    biggest = None
    for n in pnames:
        g = P[n].grad
        ref = np.zeros(P[n].shape) if g is None else g.numpy()
        rep.tensor(case, "grad." + n, recs["grad." + n], ref)
        if biggest is None or ref.size > biggest[2].size:
            biggest = (n, recs["grad." + n], ref)
    rep.check(case, len(pnames) > 0 and all(f"grad.{n}" in recs for n in pnames),
              f"{len(pnames)} parameter tensors, each with a gradient")
    comparator_selfcheck(rep, case, biggest[1], biggest[2])
    if cfg["moe_kind"] != 0 and cfg["case"] == "moe-capacity":
        rep.check(case, any(d > 0 for d in drops), "some pairs are dropped by the capacity")
    if cfg["case"] == "clustered-capacity":
        rep.check(case, all(d > 0 for d in gdrops) and all(d > 0 for d in drops),
                  "every layer drops at group level (fractions "
                  f"{', '.join(f'{d:.3f}' for d in gdrops)}) and at expert level ("
                  f"{', '.join(f'{d:.3f}' for d in drops)})")


def find_exe():
    cands = []
    if os.environ.get("DCMOE_BUILD_ROOT"):
        cands.append(os.path.join(os.environ["DCMOE_BUILD_ROOT"], "tests", "reference_dump"))
    if len(sys.argv) > 1:
        cands.append(sys.argv[1])
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    print(f"# reference_dump not found (tried {cands or 'nothing: set DCMOE_BUILD_ROOT or pass the path'}); "
          "build it with meson (tests/reference_dump) or by hand and pass its path", flush=True)
    sys.exit(1)


def main():
    exe = find_exe()
    torch.set_num_threads(1)
    t0 = time.time()
    rep = Report()
    cases = [a for a in sys.argv[2:]] or CASES
    with tempfile.TemporaryDirectory(prefix="dcmoe_ref_") as tmp:
        for case in cases:
            print(f"# case {case}", flush=True)
            run_case(rep, exe, case, tmp)
    print("# summary: max relative error per case", flush=True)
    for case in cases:
        print(f"#   {case:<22s} {rep.worst.get(case, float('nan')):.2e}", flush=True)
    print(f"# {len(cases)} case(s) in {time.time() - t0:.1f} s", flush=True)
    if rep.failures:
        print(f"# FAILED: {len(rep.failures)} check(s)", flush=True)
        for f in rep.failures[:30]:
            print(f"#   {f}", flush=True)
        sys.exit(1)
    print("# all reference checks passed", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
