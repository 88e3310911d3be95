"""mpi suite: the compression event in output space (clustering.svd_space output). The
warm-up gathers each expert's input and hidden second moments (EMA, exact sums); the event
fits every member's residual in output space. Against the same run in weight space (the same
warm-up, bitwise: the statistics do not change training), the logged output-space error of the
compression (every expert on a sample of the last warm-up batch's layer inputs, rank 0) is lower
on every layer, the weight-space error not
lower; the training after the event differs. Stopped before the event (step 3: the statistics
come from the checkpoint) or after it (7) and resumed, the run gives bitwise the uninterrupted
losses and compression row. 2 ranks give the 1-rank losses and weight-space errors within float
tolerance (the output-space error's sample is rank 0's share of the batch, so it differs by
rank count) and an output-space error below the 1-rank weight-space run's. Bad input: svd_space output without compress_at is refused naming the key."""
import os
import numpy as np
from testlib import rel_err, train_tiny, check, finish, run, series, stop_and_resume, tiny_config, tmpdir

d = tmpdir("dcmoe-compress-out-")
COMP = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4",
        "--set", "clustering.compress_at=5", "--set", "clustering.probe_batches=2", "--set", "moe.dropless=true"]
OUT = COMP + ["--set", "clustering.svd_space=output"]

hw, _, _ = train_tiny(d, "weight", 1, COMP)
ho, cfg, _ = train_tiny(d, "output", 1, OUT)
if os.path.exists(hw) and os.path.exists(ho):
    _, lw = series(hw, "train/loss")
    _, lo = series(ho, "train/loss")
    _, cw = series(hw, "cluster/compress")
    _, co = series(ho, "cluster/compress")
    check(len(lo) == 12 and np.array_equal(lw[:5], lo[:5]), "warm-up: steps 1..5 bitwise the weight-space run's")
    check(not np.array_equal(lw[5:], lo[5:]), "after the event the output-space model differs")
    check(cw.shape == co.shape == (1, 2, 14), f"one compression row for 2 layers ({cw.shape}, {co.shape})")
    if cw.shape == co.shape == (1, 2, 14):
        check(np.all(co[0, :, 4] < cw[0, :, 4]),
              f"output-space error (probe sample) lower in output space: {co[0, :, 4].tolist()} < {cw[0, :, 4].tolist()}")
        check(np.all(co[0, :, 2] >= cw[0, :, 2] * (1 - 1e-3)),
              f"weight-space error not lower in output space: {co[0, :, 2].tolist()} >= {cw[0, :, 2].tolist()}")
        check(np.array_equal(co[0, :, 6], cw[0, :, 6]), "the same partition statistics (co-selection fraction)")
    # ---- bitwise resume across the event ----
    for stop in (3, 7):
        hb = stop_and_resume(cfg, d, f"split{stop}", stop, OUT)
        if hb is None:
            continue
        _, lb = series(hb, "train/loss")
        _, cb = series(hb, "cluster/compress")
        check(np.array_equal(lo, lb) and cb.shape == co.shape and np.array_equal(co[:, :, :8], cb[:, :, :8])
              and np.array_equal(co[:, :, 10:], cb[:, :, 10:]),
              f"stopped at {stop} and resumed: train losses and the compression row bitwise equal")
    # ---- 2 ranks ----
    h2, _, _ = train_tiny(d, "output-2r", 2, OUT)
    if os.path.exists(h2):
        _, l2 = series(h2, "train/loss")
        _, c2 = series(h2, "cluster/compress")
        check(rel_err(lo, l2) < 2e-4 and c2.shape == co.shape and np.allclose(c2[:, :, 2:4], co[:, :, 2:4], rtol=1e-3),
              f"2 ranks vs 1: losses (rel {rel_err(lo, l2):.2e}) and weight-space errors equal within tolerance")
        check(c2.shape == cw.shape and np.all(c2[0, :, 4] < cw[0, :, 4]),
              f"2 ranks: output-space error {c2[0, :, 4].tolist()} below the weight-space run's {cw[0, :, 4].tolist()}")

# ---- bad input ----
cfg = os.path.join(d, "bad.yaml")
tiny_config(cfg, d, "bad")
want = "clustering.svd_space=output needs clustering.compress_at > 0"
pb = run(["train", cfg, "--quiet", "--set", "moe.kind=clustered", "--set", "moe.n_groups=4",
          "--set", "clustering.svd_space=output"], check_rc=False)
check(pb.returncode != 0 and want in pb.stderr + pb.stdout, f"refused: {want!r} ({(pb.stderr + pb.stdout).strip()[-200:]})")
finish()
