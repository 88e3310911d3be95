"""mpi suite: log.sync_wait (a timed barrier before every blocking collective of a training
step, so the wait for the slowest rank is logged apart from the transfer).
- on vs off at 2 ranks (standard MoE and dense): losses and gradient norms bitwise equal, the
  profiler books the same bytes and messages; comm/summary/wait_s exists only with it on, with
  the phase columns, non-negative, nothing in the migration and recluster phases;
- a planted straggler (DCMOE_TEST_SLOW_RANK=1:MS: rank 1 sleeps MS ms before every forward):
  the other rank's wait, averaged over the ranks, is at least 0.8 MS / 2 per step (median; 0.5
  MS / 2 at every step, for a loaded machine), booked at
  the first synchronisation of the step (other: the MoE router's capacity counts, the dense
  model's loss reduction), and comm/summary/time_s (the transfer alone) stays far below it;
  the step time still holds the straggler's sleep; perf/time_split's columns still add up to
  the step;
- 1 rank: the series is all zeros (nobody to wait for)."""
import os
import numpy as np
from testlib import check, finish, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-syncwait-")
ON = ["--set", "log.sync_wait=true"]
COMM = ["comm/summary/intra_bytes", "comm/summary/inter_bytes", "comm/summary/msgs"]
PH = "allreduce,dispatch,combine,migration,other,recluster".split(",")
SLOW_MS = 30.0


def train(name, ranks, sets, slow=None):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    env = os.environ.pop("DCMOE_TEST_SLOW_RANK", None)
    if slow:
        os.environ["DCMOE_TEST_SLOW_RANK"] = slow
    try:
        p = run(["train", cfg, "--quiet"] + sets, ranks=ranks)
    finally:
        os.environ.pop("DCMOE_TEST_SLOW_RANK", None)
        if env is not None:
            os.environ["DCMOE_TEST_SLOW_RANK"] = env
    check(p.returncode == 0, f"{name}: {ranks}-rank run exits 0")
    if p.returncode != 0:
        return None
    h5 = os.path.join(d, name, "metrics.h5")
    out = {k: series(h5, k)[1] for k in ["train/loss", "train/grad_norm", "perf/time_split", "perf/step_s",
                                         "comm/summary/time_s"] + COMM}
    import h5py
    with h5py.File(h5, "r") as f:
        out["wait"] = f["comm/summary/wait_s/value"][()] if "comm/summary/wait_s" in f else None
        out["wsplit"] = f["perf/wait_split/value"][()] if "perf/wait_split" in f else None
        if out["wait"] is not None:
            cols = f["comm/summary/wait_s"].attrs["columns"]
            out["cols"] = (cols.decode() if isinstance(cols, bytes) else cols).split(",")
    return out


for kind, ks in {"moe": [], "dense": ["--set", "moe.kind=dense"]}.items():
    off = train(f"{kind}-off", 2, ks)
    on = train(f"{kind}-on", 2, ks + ON)
    if not (off and on):
        continue
    check(np.array_equal(off["train/loss"], on["train/loss"]) and np.array_equal(off["train/grad_norm"], on["train/grad_norm"]),
          f"{kind}: losses and gradient norms bitwise equal with log.sync_wait on and off")
    for k in COMM:
        check(np.array_equal(off[k], on[k]), f"{kind}: {k} equal with log.sync_wait on and off")
    check(off["wait"] is None and off["wsplit"] is None, f"{kind}: no comm/summary/wait_s, perf/wait_split without log.sync_wait")
    w = on["wait"]
    check(w is not None and w.shape == (12, 6) and on.get("cols") == PH,
          f"{kind}: comm/summary/wait_s is [steps, phases] with the phase columns "
          f"({None if w is None else w.shape}, {on.get('cols')})")
    if w is None or w.shape != (12, 6):
        continue
    check(np.all(w >= 0) and np.all(w[:, PH.index("migration")] == 0) and np.all(w[:, PH.index("recluster")] == 0),
          f"{kind}: waits non-negative, none in the migration and recluster phases")
    timed = ["dispatch", "combine", "allreduce", "other"] if kind == "moe" else ["allreduce", "other"]
    check(all(w[:, PH.index(c)].sum() > 0 for c in timed),
          f"{kind}: a timed barrier in every phase that synchronises ({', '.join(timed)})")

    # the planted straggler
    slow = train(f"{kind}-slow", 2, ks + ON, slow=f"1:{SLOW_MS:g}")
    if not slow or slow["wait"] is None:
        continue
    ws, ts = slow["wait"][1:], slow["comm/summary/time_s"][1:]    # step 1 grows its buffers
    first = PH.index("other")
    per_step = ws.sum(axis=1)
    check(np.median(per_step) >= 0.8 * SLOW_MS / 2e3 and np.all(per_step >= 0.5 * SLOW_MS / 2e3),
          f"{kind}: a rank sleeping {SLOW_MS:g} ms per step makes the other wait: mean over ranks >= "
          f"{0.8 * SLOW_MS / 2:.0f} ms per step in the median, >= {0.5 * SLOW_MS / 2:.1f} ms at every step "
          f"(median {1e3 * np.median(per_step):.1f}, min {1e3 * per_step.min():.1f} ms)")
    check(np.all(ws[:, first] >= 0.5 * SLOW_MS / 2e3),
          f"{kind}: the wait is booked at the step's first synchronisation ({PH[first]}; min "
          f"{1e3 * ws[:, first].min():.1f} ms)")
    tr = ts[:, PH.index("dispatch")] + ts[:, PH.index("combine")] + ts[:, PH.index("allreduce")]
    check(np.median(tr) < 0.25 * SLOW_MS / 1e3,
          f"{kind}: comm/summary/time_s holds the transfer alone (median {1e3 * np.median(tr):.2f} ms, "
          f"below a quarter of the sleep)")
    check(np.all(slow["perf/step_s"][1:] >= SLOW_MS / 1e3),
          f"{kind}: the step time (slowest rank) holds the sleep (min {1e3 * slow['perf/step_s'][1:].min():.1f} ms)")
    # rank 0's waits by perf/time_split column: inside their column, and the sleeper's share where
    # rank 0 first synchronises (the MoE forward's capacity counts; the dense loss reduction)
    ws2, sp = slow["wsplit"], slow["perf/time_split"]
    col = 0 if kind == "moe" else 3
    check(ws2 is not None and ws2.shape == sp.shape and np.all(ws2 >= 0) and np.all(ws2 <= sp + 1e-6)
          and np.median(ws2[1:, col]) >= 0.8 * SLOW_MS / 1e3,
          f"{kind}: perf/wait_split: each column's wait lies inside its perf/time_split column, and rank 0 waits for "
          f"the sleeper in the {['forward', 'backward', 'allreduce', 'optimizer'][col]} column (median "
          f"{1e3 * np.median(ws2[1:, col]) if ws2 is not None else float('nan'):.1f} ms)")
    dev = np.max(np.abs(slow["perf/time_split"].sum(axis=1) - slow["perf/step_s"]) / slow["perf/step_s"])
    check(dev < 0.25, f"{kind}: perf/time_split still adds up to about the step with the waits inside (max rel dev {dev:.2f})")

# one rank: nothing to wait for
one = train("moe-one", 1, ON)
if one and one["wait"] is not None:
    check(np.all(one["wait"] == 0), "1 rank: comm/summary/wait_s is all zeros")
finish()
