"""mpi suite: clustering.mode masters (issue 14 item 3, second bullet) through the dcmoe CLI.
The clustered layers train per-expert FP32 masters (h.L.ffn.m1/m2 in the checkpoint's tensor
table, the standard MoE's layout) through their projection (bases = member mean, factors =
rank-r SVD), refreshed every clustering.project_interval steps:
- a 24-step run trains (the loss falls), logs cluster/project at step 0 and every interval
  (errors in (0, 1)), the root attribute clustering_mode, and its re-clustering events;
- stopped between projections, at an event and after it, and resumed: bitwise the same losses,
  projection rows and events;
- 2 ranks (expert parallel, two groups per rank): the 1-rank losses within float tolerance;
- with the masters' features alone (alpha 1) events move experts; 4 ranks on 2 virtual nodes
  with replicas and topology placement (groups migrate with their masters) give the same moves
  and the 1-rank losses within float tolerance, with every replica bitwise its primary;
- with clustering.compress_at, the warm-up's experts become the masters bitwise, Adam
  moments included (checkpoint at the compression step against a standard MoE's);
- precision.mode storage: the stored FP16/INT4 experts are made from the projection and
  evaluate close to FP32;
- refused, naming the key: masters with moe.kind standard, masters with training-time
  offloading."""
import os
import sys

import numpy as np
from testlib import check, finish, read_checkpoint, checkpoint_table, rel_err, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-masters-")
MST = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4",
       "--set", "clustering.mode=masters", "--set", "clustering.project_interval=3",
       "--set", "clustering.interval=6", "--set", "clustering.warmup=2", "--set", "clustering.min_gain=0",
       "--set", "clustering.probe_batches=2", "--set", "moe.dropless=true", "--set", "train.steps=24",
       "--set", "train.eval_interval=12"]


def cfg(name):
    p = os.path.join(d, name + ".yaml")
    tiny_config(p, d, name)
    return p


def train(name, ranks=1, extra=(), stop=None, resume=False):
    args = ["train", cfg(name), "--quiet"] + MST + list(extra)
    if stop:
        args += ["--stop-at", str(stop)]
    if resume:
        args += ["--resume"]
    return run(args, ranks=ranks)


def h5(name):
    return os.path.join(d, name, "metrics.h5")


# ---- one run ----
p = train("full")
check(p.returncode == 0, "masters run exits 0")
if p.returncode == 0:
    _, loss = series(h5("full"), "train/loss")
    check(len(loss) == 24 and loss[-4:].mean() < loss[:4].mean() - 0.2,
          f"the loss falls: first 4 steps {loss[:4].mean():.3f}, last 4 {loss[-4:].mean():.3f}")
    sp, pj = series(h5("full"), "cluster/project")
    check(list(sp) == list(range(0, 25, 3)) and pj.shape[1:] == (2, 3),
          f"cluster/project at step 0 and every 3 steps, [layer, (mean, max, seconds)]: steps {list(sp)}, "
          f"shape {pj.shape}")
    check(np.all((pj[:, :, 0] > 0) & (pj[:, :, 0] <= pj[:, :, 1]) & (pj[:, :, 1] < 1) & (pj[:, :, 2] > 0)),
          f"projection errors mean <= max in (0, 1), seconds > 0: {pj[-1].tolist()}")
    se, ev = series(h5("full"), "cluster/events")
    check(list(se) == [6, 12, 18] and ev.shape[1:] == (2, 19), f"events at 6, 12, 18 with 19 columns ({list(se)})")
    import h5py
    with h5py.File(h5("full"), "r") as f:
        mode = f.attrs.get("clustering_mode")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        note = f["cluster/project"].attrs.get("columns")
    check(mode == "masters", f"root attribute clustering_mode = {mode}")
    check(note is not None, "cluster/project documents its columns")
    ck = read_checkpoint(os.path.join(d, "full", "ckpt", "step_00000024", "model.bin"))
    names = [t[0] for t in checkpoint_table(ck)]
    check("h.0.ffn.m1" in names and "h.1.ffn.m2" in names and names.index("h.0.ffn.m1") == names.index("h.0.ffn.b2") + 1,
          "checkpoint tensor table: masters h.L.ffn.m1/m2 after the projection's tensors")

    # ---- bitwise resume ----
    for stop in (4, 6, 7):
        name = f"split{stop}"
        p1 = train(name, stop=stop)
        p2 = train(name, resume=True)
        check(p1.returncode == 0 and p2.returncode == 0 and "resumed from" in p2.stdout, f"stop at {stop}, resume")
        if not os.path.exists(h5(name)):
            continue
        _, lb = series(h5(name), "train/loss")
        _, pb = series(h5(name), "cluster/project")
        _, eb = series(h5(name), "cluster/events")
        check(np.array_equal(loss, lb), f"stopped at {stop}: losses bitwise the uninterrupted run's")
        check(np.array_equal(pj[:, :, :2], pb[:, :, :2]) and np.array_equal(ev[:, :, :9], eb[:, :, :9]) and
              np.array_equal(ev[:, :, 10:], eb[:, :, 10:]),
              f"stopped at {stop}: projection rows and event rows (but seconds) bitwise")

    # ---- 2 ranks: two groups per rank ----
    p = train("r2", ranks=2)
    if check(p.returncode == 0, "2-rank masters run exits 0"):
        _, l2 = series(h5("r2"), "train/loss")
        check(rel_err(loss, l2) < 2e-4, f"2 ranks: the 1-rank losses (rel {rel_err(loss, l2):.2e})")

# ---- moves under expert parallelism: 4 ranks on 2 virtual nodes, replicas, placement ----
MOVE = ["--set", "clustering.alpha=1.0"]   # the masters' features alone: the events move experts
EP4 = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=2", "--set", "parallel.replicas=2",
       "--set", "parallel.placement=topology", "--set", "parallel.place_interval=4", "--set", "parallel.min_gain=0"]
pa, pb = train("mv1", extra=MOVE), train("mv4", ranks=4, extra=MOVE + EP4)
if check(pa.returncode == 0 and pb.returncode == 0, "moving runs at 1 rank and 4 ranks (replicas, placement) exit 0"):
    _, la = series(h5("mv1"), "train/loss")
    _, lb = series(h5("mv4"), "train/loss")
    _, ea = series(h5("mv1"), "cluster/events")
    _, eb = series(h5("mv4"), "cluster/events")
    _, mig = series(h5("mv4"), "parallel/migration_bytes")
    _, bad = series(h5("mv4"), "parallel/replica_mismatch")
    check(ea[:, :, 4].sum() > 0 and np.array_equal(ea[:, :, 4], eb[:, :, 4]),
          f"events move experts ({ea[:, :, 4].tolist()}), the same at 4 ranks")
    check(rel_err(la, lb) < 2e-4, f"4 ranks with replicas and migrations: the 1-rank losses (rel {rel_err(la, lb):.2e})")
    check(mig.sum() > 0 and bad.max() == 0, f"groups migrated ({mig.sum():.0f} B), replicas bitwise their primaries")
    check(eb[:, :, 16].sum() > 0, f"the events' bytes (masters travel with their group) are booked: {eb[:, :, 16].tolist()}")

# ---- compression: the warm-up's experts become the masters ----
cmp_args = ["--set", "clustering.compress_at=5"]
p1 = train("cmp", extra=cmp_args, stop=5)
ps = run(["train", cfg("std5"), "--quiet", "--set", "moe.dropless=true", "--set", "train.steps=24",
          "--set", "train.eval_interval=12", "--stop-at", "5"])
if check(p1.returncode == 0 and ps.returncode == 0, "compression run and standard run stopped at step 5"):
    a = read_checkpoint(os.path.join(d, "cmp", "ckpt", "step_00000005", "model.bin"))
    b = read_checkpoint(os.path.join(d, "std5", "ckpt", "step_00000005", "model.bin"))
    ta = {t[0]: t for t in checkpoint_table(a)}
    tb = {t[0]: t for t in checkpoint_table(b)}
    same = True
    for sec in ("params.expert", "adam_m.expert", "adam_v.expert"):
        xa = np.frombuffer(a[sec], dtype=np.float32)
        xb = np.frombuffer(b[sec], dtype=np.float32)
        for l in range(2):
            for mw, ew in (("m1", "experts.w1"), ("m2", "experts.w2")):
                _, _, _, na, oa = ta[f"h.{l}.ffn.{mw}"]
                _, _, _, nb, ob = tb[f"h.{l}.ffn.{ew}"]
                same &= na == nb and np.array_equal(xa[oa:oa + na], xb[ob:ob + nb])
    check(same, "compression in masters mode: masters and their Adam moments are the warm-up's experts, bitwise")
    p2 = train("cmp", extra=cmp_args, resume=True)
    if check(p2.returncode == 0, "the compression run continues to step 24"):
        sp, _ = series(h5("cmp"), "cluster/project")
        check(5 in list(sp) and 0 not in list(sp), f"projections from the compression on ({list(sp)})")

# ---- stored formats from the projection ----
p = train("st", extra=["--set", "precision.mode=storage", "--set", "precision.int4_group=16", "--set", "train.steps=12"])
if check(p.returncode == 0, "precision.mode storage with masters trains"):
    sc = cfg("st")
    args = MST + ["--set", "precision.mode=storage", "--set", "precision.int4_group=16", "--set", "train.steps=12"]
    e32 = run(["eval", sc, "--precision", "fp32"] + args)
    eq = run(["eval", sc] + args)
    eo = run(["eval", sc, "--set", "offload.enabled=true", "--set", "offload.max_resident_groups=1"] + args)
    import json
    ckd = os.path.join(d, "st", "ckpt", "step_00000012")
    if check(e32.returncode == 0 and eq.returncode == 0 and eo.returncode == 0, "eval fp32, stored, stored+offload"):
        j32 = json.load(open(os.path.join(ckd, "eval_valid_fp32.json")))
        jq = json.load(open(os.path.join(ckd, "eval_valid_stored.json")))
        jo = json.load(open(os.path.join(ckd, "eval_valid_stored_offload.json")))
        check(abs(jq["ppl"] / j32["ppl"] - 1) < 0.03 and jo["loss"] == jq["loss"],
              f"stored (projection) ppl {jq['ppl']:.4f} within 3% of fp32 {j32['ppl']:.4f}; offloaded the same loss")

# ---- refused ----
p = run(["train", cfg("bad1"), "--quiet", "--set", "clustering.mode=masters"], check_rc=False)
def said(p, key):
    return next((ln for ln in p.stderr.splitlines() if key in ln), "(no such line)")


check(p.returncode != 0 and "clustering.mode=masters needs moe.kind=clustered" in p.stderr,
      f"masters with moe.kind standard refused: {said(p, 'clustering.mode')}")
p = run(["train", cfg("bad2"), "--quiet"] + MST + ["--set", "offload.enabled=true"], check_rc=False)
check(p.returncode != 0 and "offload.enabled with clustering.mode=masters" in p.stderr,
      f"masters with training-time offloading refused: {said(p, 'clustering.mode')}")
finish()
