"""mpi suite: replicated hot units (parallel.replicas, EPLB's redundant experts) on 4
(oversubscribed) ranks as a virtual 2 nodes x 2 ranks (and 4 nodes x 1 with ep_size 2).
- 1 rank vs 4 ranks with parallel.replicas 2 give equal train and eval losses (float
  tolerance; routing does not change, only where rows are computed), standard and clustered
  (with re-clustering, which refills every copy), flat and two-level, and inside EP groups of
  2 (ep_size 2 on 4 nodes x 1, so every group spans 2 nodes);
- copies exist after the first placement, sit on a node other than their owner's, and stay
  bitwise equal to their primary after training steps (parallel/replica_mismatch, a CRC-32 of
  params and both Adam moments of every copy against its primary, all zero); a copy flipped
  by one bit is seen there and the checkpoint refuses to save;
- inter-node dispatch and combine bytes go down against the same run without replicas;
- memory: each rank holds exactly one more unit per MoE layer (params, grads, Adam);
- checkpoints stay canonical (every expert once), resume bitwise at the same layout, and
  load at 1 rank with every expert intact;
- replicas with training-time offloading is an error naming both keys."""
import os
import shutil
import numpy as np
from testlib import rel_err, check, checkpoint_table, expert_rows_bad, finish, read_checkpoint, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-replicas-")
VIRT = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=2"]
VIRT4 = ["--set", "topology.nodes=4", "--set", "topology.ranks_per_node=1", "--set", "parallel.ep_size=2"]
REP = ["--set", "parallel.replicas=2"]
PLACE = ["--set", "parallel.placement=topology", "--set", "parallel.place_interval=2", "--set", "parallel.min_gain=0"]
CLUS = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4", "--set", "moe.top_groups=2",
        "--set", "clustering.interval=4", "--set", "clustering.warmup=2", "--set", "clustering.min_gain=0"]


def train(name, ranks, sets, env=None, ok_rc=True):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        p = run(["train", cfg, "--quiet"] + sets, ranks=ranks, check_rc=ok_rc)
    finally:
        os.environ.clear()
        os.environ.update(old)
    if ok_rc:
        check(p.returncode == 0, f"{name}: {ranks}-rank run exits 0")
    return os.path.join(d, name, "metrics.h5"), cfg, p





def replicas_ok(h, what, node_of_ep_rank, standard):
    """copies present after placement, never on their owner's node (standard: unit = expert),
    bitwise equal to their primary at every log step"""
    _, units = series(h, "parallel/replicas")
    _, ranks = series(h, "parallel/replica_rank")
    _, owner = series(h, "parallel/owner")
    _, bad = series(h, "parallel/replica_mismatch")
    n_copies = int((units[-1] >= 0).sum())
    check(n_copies == 2 * units.shape[1], f"{what}: every MoE layer holds its 2 copies at the end ({n_copies})")
    if standard:
        wrong = [(row, layer, int(units[row, layer, q]))
                 for row in range(len(units)) for layer in range(units.shape[1]) for q in range(units.shape[2])
                 if units[row, layer, q] >= 0 and node_of_ep_rank(int(ranks[row, layer, q])) ==
                 node_of_ep_rank(int(owner[row, layer, int(units[row, layer, q])]))]
        check(not wrong, f"{what}: no copy on its owner's node ({wrong[:3]})")
    check(len(bad) >= 3 and np.all(bad == 0), f"{what}: copies bitwise equal to their primary at every log step "
                                              f"(mismatches {bad.sum():.0f} over {len(bad)} rows)")


# ---- equal losses, copies equal to their primaries ----
runs = {}
for kind, base in {"standard": PLACE, "clustered": PLACE + CLUS}.items():
    h1, _, _ = train(f"{kind}-1", 1, base)
    if not os.path.exists(h1):
        continue
    _, l1 = series(h1, "train/loss")
    _, e1 = series(h1, "eval/loss")
    layouts = [("flat", VIRT), ("ep2", VIRT4)] + ([("two_level", VIRT + ["--set", "parallel.exchange=two_level"])]
                                                  if kind == "standard" else [])
    for lay, sets in layouts:
        extra = ["--set", "checkpoint.interval=6"] if (kind, lay) == ("clustered", "flat") else []
        h, cfg, _ = train(f"{kind}-{lay}", 4, base + sets + REP + extra)
        if not os.path.exists(h):
            continue
        runs[(kind, lay)] = (h, cfg)
        _, l4 = series(h, "train/loss")
        _, e4 = series(h, "eval/loss")
        check(len(l1) == 12 and rel_err(l1, l4) < 2e-4 and rel_err(e1, e4) < 2e-4,
              f"{kind}: 1 rank vs 4 ranks with 2 replicas ({lay}) train and eval losses equal "
              f"(rel {rel_err(l1, l4):.2e}, eval {rel_err(e1, e4):.2e})")
        replicas_ok(h, f"{kind} {lay}", (lambda r: r) if lay == "ep2" else (lambda r: r // 2), kind == "standard")

# ---- fewer inter-node dispatch / combine bytes; one more unit per rank and MoE layer ----
h0, _, _ = train("standard-flat-off", 4, PLACE + VIRT)
if os.path.exists(h0) and ("standard", "flat") in runs:
    h = runs[("standard", "flat")][0]
    _, i0 = series(h0, "comm/summary/inter_bytes")
    _, i2 = series(h, "comm/summary/inter_bytes")
    # copies exist from the placement after step 2: compare steps 3..12
    d0, d2 = i0[2:, 1].sum(), i2[2:, 1].sum()
    c0, c2 = i0[2:, 2].sum(), i2[2:, 2].sum()
    check(d2 < 0.95 * d0 and c2 < 0.95 * c0, f"inter-node dispatch / combine bytes with 2 replicas below the run without "
                                             f"(dispatch {d2:.0f} vs {d0:.0f}, combine {c2:.0f} vs {c0:.0f})")
    _, m0 = series(h0, "mem/bytes")
    _, m2 = series(h, "mem/bytes")
    unit = 4 * 2 * 32 * 32                # one expert (w1 [D, F] + w2 [F, D]) in bytes
    extra = m2[-1] - m0[-1]               # [ranks, kinds]: param_fp32, ..., grad, optim
    check(np.all(extra[:, 0] == 2 * unit) and np.all(extra[:, 3] == 2 * unit) and np.all(extra[:, 4] == 4 * unit),
          f"memory per rank: one replica slot per MoE layer (params {extra[0, 0]:.0f}, grads {extra[0, 3]:.0f}, "
          f"Adam {extra[0, 4]:.0f} bytes more; want {2 * unit}, {2 * unit}, {4 * unit})")

# ---- checkpoints: canonical, resume bitwise, load at 1 rank ----
if ("clustered", "flat") in runs:
    hc, cfgc = runs[("clustered", "flat")]
    _, lc = series(hc, "train/loss")
    src = os.path.join(d, "clustered-flat")
    ref = read_checkpoint(os.path.join(src, "ckpt", "step_00000012", "model.bin"))
    n_full = sum(n for (_, cat, _, n, _) in checkpoint_table(ref) if cat == 1)
    check("replicas" in ref and len(ref["params.expert"]) // 4 >= n_full and len(ref["params.expert"]) // 4 < n_full + 64,
          f"checkpoint: a replicas section, every expert stored once ({len(ref['params.expert']) // 4} floats, "
          f"{n_full} in the table)")
    for ranks in (4, 1):
        name = f"ck-to{ranks}"
        shutil.copytree(src, os.path.join(d, name))
        shutil.rmtree(os.path.join(d, name, "ckpt", "step_00000012"))
        os.remove(os.path.join(d, name, "DONE"))   # as if killed after step 6
        sets = PLACE + CLUS + REP + ["--set", "checkpoint.interval=6", "--set", f"run.name={name}"] + (VIRT if ranks == 4 else [])
        p = run(["train", cfgc, "--quiet", "--resume"] + sets, ranks=ranks)
        check(p.returncode == 0, f"replicated checkpoint resumed at {ranks} rank(s)")
        if p.returncode != 0:
            continue
        st_, lr_ = series(os.path.join(d, name, "metrics.h5"), "train/loss")
        if ranks == 4:
            check(list(st_)[-6:] == list(range(7, 13)) and np.array_equal(lr_[-6:], lc[6:]),
                  "resume at the same layout (4 ranks, 2 replicas): steps 7..12 bitwise equal")
        else:
            r = rel_err(lc[6:], lr_[-6:])
            check(list(st_)[-6:] == list(range(7, 13)) and r < 2e-4, f"steps 7..12 at 1 rank match the 4-rank run ({r:.2e})")
        got = read_checkpoint(os.path.join(d, name, "ckpt", "step_00000012", "model.bin"))
        a = np.frombuffer(ref["params.expert"], dtype=np.float32)
        b = np.frombuffer(got["params.expert"], dtype=np.float32)
        if ranks == 4:
            check(np.array_equal(a, b), "same layout: the step-12 experts bitwise equal")
            continue
        bad = expert_rows_bad(ref, got)
        check(not bad, f"every expert row intact after 4 ranks with replicas -> 1 rank ({len(bad)} bad: {bad[:3]})")

# ---- a copy that differs is seen, and no checkpoint is written of it ----
hf, _, p = train("flip", 4, PLACE + VIRT + REP + ["--set", "checkpoint.interval=6"],
                 env={"DCMOE_TEST_REPLICA_FLIP_AT": "4"}, ok_rc=False)
check(p.returncode != 0 and "differ from their primary" in p.stderr,
      f"a copy flipped by one bit after step 4: the step-6 checkpoint is refused ({p.stderr.strip()[-200:]!r})")
if os.path.exists(hf):
    st_, bad = series(hf, "parallel/replica_mismatch")
    check(4 in list(st_) and bad[list(st_).index(4)].sum() > 0,
          f"parallel/replica_mismatch sees the flipped copies at step 4 ({bad.tolist()})")
check(not os.path.exists(os.path.join(d, "flip", "ckpt", "step_00000006")), "no step-6 checkpoint of diverged copies")

# ---- replicas and offloading ----
cfg = os.path.join(d, "bad.yaml")
tiny_config(cfg, d, "bad")
p = run(["train", cfg, "--quiet", "--set", "offload.enabled=true"] + REP + VIRT, ranks=4, check_rc=False)
check(p.returncode != 0 and "parallel.replicas" in p.stderr and "offload.enabled" in p.stderr,
      f"replicas with offloading is an error naming both keys ({p.stderr.strip()[-160:]!r})")
finish()
