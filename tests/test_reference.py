"""PyTorch reference for the hand-written C model: logits, loss, aux/z losses, routing and EVERY
gradient, for the dense FFN, the standard top-k MoE (with and without capacity drops, with
and without gate renormalisation, dropless) and the classification head (mean and last
pooling).

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
         "moe-dropless", "moe-ties", "classify", "classify-last"]
REL_TOL = 1e-4      # ||a-b|| / ||b||
RTOL = 1e-3         # elementwise, relative part
ATOL_FRAC = 1e-5    # elementwise absolute part, as a fraction of max|b|
NEAR_TIE = 1e-5     # a probability gap this small can flip a float32 top-k choice
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


def ffn(x, w1, w2, act):
    """x [n,D], w1 [D,F] (gelu) or [D,2F] = [W1 | W3] (swiglu), w2 [F,D]."""
    h = x @ w1
    if act == "gelu":
        a = gelu_tanh(h)
    else:
        F = w2.shape[0]
        a = Fn.silu(h[:, :F]) * h[:, F:]
    return a @ w2


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
        if is_moe:
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
    loss.backward()

    drops = []
    for l, info in routing.items():
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
