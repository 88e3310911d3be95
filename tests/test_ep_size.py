"""mpi suite: expert-parallel groups smaller than the world (parallel.ep_size, EP x DP) on 4
(oversubscribed) ranks as a virtual 2 nodes x 2 ranks.
- 1 rank, 4 ranks with ep_size 4 (the world), 2 (one group per node) and 1 give equal losses
  (float tolerance) for the standard and the clustered MoE, with re-clustering and placement
  running, flat and two-level;
- with ep_size = ranks per node, dispatch and combine never leave the node, and the traffic
  profiler's bytes equal the analytic volume of a fixed routing (every token to every expert
  of its group, dropless) for dispatch, combine and both gradient allreduces (dense over the
  world, experts over the replicas);
- migrating units every step inside the EP groups leaves the model bitwise unchanged, and so
  does offloading idle units (offload.enabled) under EP groups;
- checkpoints stay canonical: a run saved at (4 ranks, ep_size 2) resumes bitwise at the same
  layout, and at (4, ep_size 4), (2, the world) and 1 rank with matching losses and every
  expert intact;
- an ep_size that does not divide the ranks is an error naming the key."""
import os
import shutil
import numpy as np
from testlib import rel_err, train_tiny, check, expert_rows_bad, finish, read_checkpoint, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-epsize-")
VIRT = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=2"]
CLUS = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4",
        "--set", "clustering.interval=4", "--set", "clustering.warmup=2", "--set", "clustering.min_gain=0"]
PLACE = ["--set", "parallel.placement=topology", "--set", "parallel.place_interval=2", "--set", "parallel.min_gain=0"]


def train(name, ranks, sets):
    return train_tiny(d, name, ranks, sets)





# ---- equal losses at every EP layout ----
for kind, sets in {"standard": PLACE, "clustered": CLUS + PLACE + ["--set", "moe.top_groups=2"]}.items():
    h1, _, _ = train(f"eq-{kind}-1", 1, sets)
    if not os.path.exists(h1):
        continue
    _, l1 = series(h1, "train/loss")
    _, e1 = series(h1, "eval/loss")
    for ep, exch in ((4, "flat"), (2, "flat"), (2, "two_level"), (1, "flat")):
        h, _, _ = train(f"eq-{kind}-ep{ep}-{exch}", 4, sets + VIRT + ["--set", f"parallel.ep_size={ep}",
                                                                   "--set", f"parallel.exchange={exch}"])
        if not os.path.exists(h):
            continue
        _, l4 = series(h, "train/loss")
        _, e4 = series(h, "eval/loss")
        check(len(l1) == 12 and rel_err(l1, l4) < 2e-4 and rel_err(e1, e4) < 2e-4,
              f"{kind}: 1 rank vs 4 ranks ep_size {ep} ({exch}) train and eval losses equal "
              f"(rel {rel_err(l1, l4):.2e}, eval {rel_err(e1, e4):.2e})")
        if ep == 2:
            _, inter = series(h, "comm/summary/inter_bytes")
            check(np.all(inter[:, 1:3] == 0), f"{kind}: ep_size = ranks per node ({exch}): no dispatch/combine byte "
                                              f"crosses the node ({inter[:, 1:3].sum():.0f})")
            if kind == "clustered" and exch == "flat":
                _, ev = series(h, "cluster/events")
                _, mb = series(h, "parallel/migration_bytes")
                check(len(ev) > 0, f"clustered ep_size 2: re-clustering ran ({len(ev)} events)")
                check(mb.sum() > 0, f"clustered ep_size 2: units migrated inside the EP groups ({mb.sum():.0f} bytes)")

# ---- analytic bytes at ep_size 2: E = 4 experts, k = 4, dropless ----
h, _, _ = train("bytes", 4, VIRT + ["--set", "parallel.ep_size=2", "--set", "moe.n_experts=4", "--set", "moe.top_k=4",
                                    "--set", "moe.dropless=true", "--set", "parallel.place_interval=0",
                                    "--set", "checkpoint.interval=12"])
if os.path.exists(h):
    N, D, F, layers, P, S, E = 2 * 16, 32, 32, 2, 4, 2, 4   # tokens per rank, d_model, expert width, ...
    row = 4 * D
    per_dst = E // S                       # entries a token carries to each rank of its group
    # per ordered pair inside an EP group, per MoE layer: counts (2 int64), entries (12 bytes),
    # x rows out, dout rows out (backward); y rows back, dx rows back, dgates back
    disp_pair = layers * (16 + 12 * per_dst * N + row * N + row * N)
    comb_pair = layers * (row * N + row * N + 4 * per_dst * N)
    _, intra = series(h, "comm/summary/intra_bytes")
    _, inter = series(h, "comm/summary/inter_bytes")
    # 2 groups x 2 ordered pairs, all inside a node
    check(np.all(intra[:, 1] == 4 * disp_pair) and np.all(inter[:, 1] == 0),
          f"dispatch bytes per step = analytic ({4 * disp_pair} intra, 0 inter; got {intra[0, 1]:.0f}, {inter[0, 1]:.0f})")
    check(np.all(intra[:, 2] == 4 * comb_pair) and np.all(inter[:, 2] == 0),
          f"combine bytes per step = analytic ({4 * comb_pair} intra, 0 inter; got {intra[0, 2]:.0f}, {inter[0, 2]:.0f})")
    # gradient allreduce, booked as a ring: 2 (n-1) chunks of ceil(elements / n) floats to the
    # successor. Dense over the world (0->1, 2->3 inside a node; 1->2, 3->0 across), experts over
    # the replicas {0, 2} and {1, 3} (always across the virtual node boundary).
    ckp = os.path.join(d, "bytes", "ckpt", "step_00000012", "model.bin")
    ck = read_checkpoint(ckp) if os.path.exists(ckp) else None
    check(ck is not None, "the bytes run wrote its step-12 checkpoint")
    n_expert_full = layers * E * 2 * D * F          # w1 [E, D, F] + w2 [E, F, D] per MoE layer
    n_local = n_expert_full // S
    n_dense = None
    if ck is not None:
        n_dense = len(ck["params.dense"]) // 4
        check(len(ck["params.expert"]) // 4 == n_expert_full, "checkpoint holds every expert once (canonical)")
    if n_dense is not None:
        dense_per = 2 * (P - 1) * -(-n_dense // P) * 4
        exp_per = 2 * (P // S - 1) * -(-n_local // (P // S)) * 4
        check(np.all(intra[:, 0] == 2 * dense_per) and np.all(inter[:, 0] == 2 * dense_per + 4 * exp_per),
              f"allreduce bytes = dense ring over the world + expert ring over the replicas "
              f"(intra {2 * dense_per}, inter {2 * dense_per + 4 * exp_per}; got {intra[0, 0]:.0f}, {inter[0, 0]:.0f})")

# ---- migration inside the EP groups preserves the model exactly ----
mig = CLUS + VIRT + ["--set", "parallel.ep_size=2", "--set", "moe.n_groups=8", "--set", "moe.top_groups=2",
                     "--set", "train.grad_clip=0", "--set", "clustering.enabled=false", "--set", "parallel.min_gain=0",
                     "--set", "parallel.max_imbalance=1000", "--set", "parallel.placement=topology"]
ha, _, _ = train("mig-every", 4, mig + ["--set", "parallel.place_interval=1"])
hb, _, _ = train("mig-never", 4, mig + ["--set", "parallel.place_interval=0"])
if os.path.exists(ha) and os.path.exists(hb):
    _, mb = series(ha, "parallel/migration_bytes")
    _, la = series(ha, "train/loss")
    _, lb = series(hb, "train/loss")
    check(mb.sum() > 0, f"ep_size 2: units migrated inside the groups ({mb.sum():.0f} bytes)")
    check(np.array_equal(la, lb), "ep_size 2: losses with migration every step bitwise equal to losses without")
    ho, _, _ = train("mig-never-offload", 4, mig + ["--set", "parallel.place_interval=0", "--set", "offload.enabled=true",
                                                   "--set", "offload.idle_steps=1", "--set", "offload.max_resident_groups=1"])
    if os.path.exists(ho):
        _, lo = series(ho, "train/loss")
        _, ot = series(ho, "offload/train")
        check(ot[:, 2].sum() > 0 and np.array_equal(lo, lb),
              f"ep_size 2 with offloading ({ot[:, 2].sum():.0f} evictions): losses bitwise equal to without")

# ---- checkpoints: save at (4, ep 2), resume at other layouts ----
ck = CLUS + ["--set", "checkpoint.interval=6", "--set", "clustering.enabled=false"]
h42, cfg42, _ = train("ck42", 4, ck + VIRT + ["--set", "parallel.ep_size=2"])
if os.path.exists(h42):
    _, l42 = series(h42, "train/loss")
    ref = read_checkpoint(os.path.join(d, "ck42", "ckpt", "step_00000012", "model.bin"))
    for ranks, ep in ((4, 2), (4, 4), (2, 0), (1, 0)):
        name = f"ck42-to{ranks}-ep{ep}"
        shutil.copytree(os.path.join(d, "ck42"), os.path.join(d, name))
        shutil.rmtree(os.path.join(d, name, "ckpt", "step_00000012"))
        os.remove(os.path.join(d, name, "DONE"))   # as if killed after step 6
        sets = ck + ["--set", f"run.name={name}", "--set", f"parallel.ep_size={ep}"] + (VIRT if ranks == 4 else [])
        p = run(["train", cfg42, "--quiet", "--resume"] + sets, ranks=ranks)
        check(p.returncode == 0, f"(4 ranks, ep_size 2) checkpoint resumed at {ranks} rank(s), ep_size {ep}")
        if p.returncode != 0:
            continue
        st_, lr_ = series(os.path.join(d, name, "metrics.h5"), "train/loss")
        if (ranks, ep) == (4, 2):
            check(list(st_)[-6:] == list(range(7, 13)) and np.array_equal(lr_[-6:], l42[6:]),
                  "resume at the same (4, ep_size 2) layout: steps 7..12 bitwise equal")
        else:
            r = rel_err(l42[6:], lr_[-6:])
            check(list(st_)[-6:] == list(range(7, 13)) and r < 2e-4,
                  f"steps 7..12 at {ranks} rank(s), ep_size {ep} match the (4, 2) run ({r:.2e})")
        got = read_checkpoint(os.path.join(d, name, "ckpt", "step_00000012", "model.bin"))
        bad = expert_rows_bad(ref, got)
        check(not bad, f"every expert row intact after (4, 2) -> ({ranks}, {ep}) ({len(bad)} bad: {bad[:3]})")

# ---- bad ep_size ----
cfg = os.path.join(d, "bad.yaml")
tiny_config(cfg, d, "bad")
p = run(["train", cfg, "--quiet", "--set", "parallel.ep_size=3"] + VIRT, ranks=4, check_rc=False)
check(p.returncode != 0 and "parallel.ep_size=3" in p.stderr and "4 ranks" in p.stderr,
      f"ep_size 3 at 4 ranks is an error naming the key ({p.stderr.strip()[-160:]!r})")
finish()
