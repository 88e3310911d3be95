"""mpi suite: verified re-clustering (clustering.verify) with proposals from the unconstrained
co-activation (clustering.mu_source = coact, alpha 0). An event that moves experts is kept only
when the probe loss rises by at most clustering.max_probe_increase, else it is undone bitwise:
  - threshold -10 (every moving event rejected): every such event is logged rolled back, and
    the train losses are bitwise those of the same run without re-clustering;
  - threshold +10 (every event kept): bitwise the unverified run (same losses, same groups);
  - the logged decision equals (probe after - probe before > threshold) for a threshold in
    between; 2 ranks give the 1-rank losses; stopped and resumed, bitwise the uninterrupted run
    (the co-activation EMA is in the checkpoint);
  - jaccard_compress (column 18, the partition after the event against the reference, here
    the initial contiguous grouping): 1 at every event of the run whose moves are all rolled
    back; < 1 once the unverified run has moved experts, and equal to the Jaccard recomputed
    from cluster/group_of (overlap-maximising relabelling, mean over groups);
  - clustering.verify with offloading is refused naming both keys."""
import os
import h5py
import numpy as np
from testlib import check, finish, partition_jaccards, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-verify-")
BASE = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=2", "--set", "moe.rank=4", "--set", "train.steps=16",
        "--set", "clustering.interval=4", "--set", "clustering.warmup=2", "--set", "clustering.min_gain=0",
        "--set", "clustering.alpha=0", "--set", "clustering.mu_source=coact", "--set", "clustering.probe_batches=2",
        "--set", "moe.dropless=true", "--set", "checkpoint.interval=4"]
COL = {"accepted": 3, "moved": 4, "probe_before": 10, "probe_after": 11, "rolled_back": 17, "jaccard_compress": 18}
NCOL = 19


def train(name, sets, ranks=1, extra=()):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    p = run(["train", cfg, "--quiet"] + BASE + sets + list(extra), ranks=ranks)
    check(p.returncode == 0, f"{name}: {ranks}-rank run exits 0 ({p.stderr.strip()[-300:]})")
    return os.path.join(d, name, "metrics.h5"), cfg


h_static, _ = train("static", ["--set", "clustering.enabled=false"])
h_free, _ = train("unverified", ["--set", "clustering.enabled=true"])
h_keep, _ = train("keep", ["--set", "clustering.verify=true", "--set", "clustering.max_probe_increase=10"])
h_rej, _ = train("reject", ["--set", "clustering.verify=true", "--set", "clustering.max_probe_increase=-10"])
loss = {k: series(h, "train/loss")[1] for k, h in
        [("static", h_static), ("unverified", h_free), ("keep", h_keep), ("reject", h_rej)]}
_, ev_free = series(h_free, "cluster/events")
moved = ev_free[:, :, COL["accepted"]] * ev_free[:, :, COL["moved"]]
check(ev_free.shape[2] == NCOL and moved.sum() > 0,
      f"the unverified run's events move experts ({int(moved.sum())} moves; {NCOL} columns)")
with h5py.File(h_free, "r") as f:
    cols = str(f["cluster/events"].attrs["columns"]).split(",")
check(len(cols) == NCOL and cols[COL["rolled_back"]] == "rolled_back" and cols[-1] == "jaccard_compress",
      f"columns attribute names {NCOL} columns, jaccard_compress appended last ({cols[-3:]})")
# jaccard_compress against the initial contiguous grouping (no compression event in this run)
jc = ev_free[:, :, COL["jaccard_compress"]]
firsts = [int(np.argmax(moved[:, l] > 0)) for l in range(jc.shape[1])]
check(all(moved[fi, l] > 0 and np.all(jc[:fi, l] == 1.0) and jc[fi, l] < 1.0 for l, fi in enumerate(firsts))
      and np.all((jc > 0) & (jc <= 1)),
      f"unverified: per layer jaccard_compress 1 before its first move, < 1 at it (events {firsts}: "
      f"{[float(jc[fi, l]) for l, fi in enumerate(firsts)]})")
_, gof_free = series(h_free, "cluster/group_of")
E_, G_ = gof_free.shape[2], 2
contig = np.arange(E_) // (E_ // G_)
ok_j = all(round(float(jc[i, l]), 12) in partition_jaccards(contig, gof_free[i, l].astype(int), G_)
           for i in range(jc.shape[0]) for l in range(jc.shape[1]))
check(ok_j, "unverified: every jaccard_compress equals the Jaccard of the logged group_of to the contiguous grouping")
check(not np.array_equal(loss["static"], loss["unverified"]), "moving experts changes the training (not a no-op)")
check(np.array_equal(loss["keep"], loss["unverified"]), "threshold +10: every event kept, bitwise the unverified run")
check(np.array_equal(series(h_keep, "cluster/group_of")[1], series(h_free, "cluster/group_of")[1]),
      "threshold +10: the same groups as the unverified run at every event")
_, ev_keep = series(h_keep, "cluster/events")
check(np.all(ev_keep[:, :, COL["rolled_back"]] == 0), "threshold +10: no event rolled back")
_, ev_rej = series(h_rej, "cluster/events")
mv = ev_rej[:, :, COL["accepted"]] * ev_rej[:, :, COL["moved"]] > 0
rb = ev_rej[:, :, COL["rolled_back"]] == 1
check(mv.sum() > 0 and np.array_equal(mv, rb), f"threshold -10: every moving event rolled back ({int(rb.sum())} layer-events)")
check(np.array_equal(loss["reject"], loss["static"]),
      "threshold -10: train losses bitwise those of the run without re-clustering (the rollback is exact)")
_, gof_rej = series(h_rej, "cluster/group_of")
check(np.all(gof_rej == gof_rej[0]), "threshold -10: the logged groups never change")
check(np.all(ev_rej[:, :, COL["jaccard_compress"]] == 1.0),
      f"threshold -10: jaccard_compress 1 at every event, moving ones rolled back included "
      f"({ev_rej[:, :, COL['jaccard_compress']].min():.3f} min)")
# a threshold between the two: the logged decision follows the logged probe losses
dp = ev_free[:, 0, COL["probe_after"]] - ev_free[:, 0, COL["probe_before"]]
mid = float(np.median(dp))
h_mid, cfg_mid = train("mid", ["--set", "clustering.verify=true", "--set", f"clustering.max_probe_increase={mid!r}"])
_, ev_mid = series(h_mid, "cluster/events")
dmid = ev_mid[:, 0, COL["probe_after"]] - ev_mid[:, 0, COL["probe_before"]]
moves = (ev_mid[:, :, COL["accepted"]] * ev_mid[:, :, COL["moved"]]).sum(axis=1) > 0
want = moves & (dmid > mid)
check(np.array_equal(ev_mid[:, :, COL["rolled_back"]].max(axis=1) == 1, want),
      f"threshold {mid:.4g}: rolled back exactly where probe after - before > threshold ({int(want.sum())} of {len(want)})")
# 2 ranks, and stop / resume (the coact EMA is checkpointed)
h2, _ = train("mid-2r", ["--set", "clustering.verify=true", "--set", f"clustering.max_probe_increase={mid!r}"], ranks=2)
l1, l2 = series(h_mid, "train/loss")[1], series(h2, "train/loss")[1]
rel = float(np.max(np.abs(l1 - l2) / np.abs(l1)))
check(rel < 1e-4, f"2 ranks: train losses equal the 1-rank run's (max rel {rel:.2e})")
cfg_r = os.path.join(d, "resumed.yaml")
tiny_config(cfg_r, d, "resumed")
sets = BASE + ["--set", "clustering.verify=true", "--set", f"clustering.max_probe_increase={mid!r}"]
p = run(["train", cfg_r, "--quiet", "--stop-at", "8"] + sets)
p2 = run(["train", cfg_r, "--quiet", "--resume"] + sets)
check(p.returncode == 0 and p2.returncode == 0, "stop at 8, resume")
check(np.array_equal(series(os.path.join(d, "resumed", "metrics.h5"), "train/loss")[1], l1),
      "stopped at step 8 and resumed: bitwise the uninterrupted losses")
# bad input
cfg_b = os.path.join(d, "bad.yaml")
tiny_config(cfg_b, d, "bad")
p = run(["train", cfg_b] + BASE + ["--set", "clustering.verify=true", "--set", "offload.enabled=true"], check_rc=False)
check(p.returncode != 0 and "clustering.verify" in p.stderr and "offload.enabled" in p.stderr,
      f"verify with offloading refused: {p.stderr.strip()[-200:]!r}")
finish()
