"""mpi suite: a run stopped at step 5 (--stop-at, which checkpoints) and resumed with
--resume ends bitwise-identical to an uninterrupted run: every logged loss, the eval
losses and the final parameters (checkpoint payload). Also with 2 ranks."""
import os
import numpy as np
from testlib import check, finish, run, series, tiny_config, tmpdir


def payload(ckdir):
    """parameter/optimizer bytes of a checkpoint's model.bin (header sections after 'config')"""
    with open(os.path.join(ckdir, "model.bin"), "rb") as f:
        data = f.read()
    off, out = 16, {}
    n_sec = int.from_bytes(data[12:16], "little")
    for _ in range(n_sec):
        name = data[off:off + 48].split(b"\0")[0].decode()
        n = int.from_bytes(data[off + 48:off + 56], "little")
        off += 64
        out[name] = data[off:off + n]
        off += n
    return out


d = tmpdir("dcmoe-resume-")
CLUSTERED = """clustering:
  interval: 4
  warmup: 2
  min_gain: 0.0
"""
for ranks, kind in ((1, "standard"), (2, "standard"), (1, "clustered"), (2, "clustered")):
    tag = f"{kind}-{ranks}"
    extra = CLUSTERED if kind == "clustered" else ""
    cfg = tiny_config(os.path.join(d, f"{tag}.yaml"), d, f"full{tag}", extra)
    if kind == "clustered":
        text = open(cfg).read().replace("kind: standard", "kind: clustered\n  n_groups: 2\n  rank: 4")
        open(cfg, "w").write(text)
    p = run(["train", cfg, "--quiet"], ranks=ranks)
    check(p.returncode == 0, f"{tag}: uninterrupted run")
    name = f"split{tag}"
    p1 = run(["train", cfg, "--quiet", "--set", f"run.name={name}", "--stop-at", "5"], ranks=ranks)
    check(p1.returncode == 0 and "--stop-at reached" in p1.stdout, f"{tag}: run stops at step 5")
    p2 = run(["train", cfg, "--quiet", "--set", f"run.name={name}", "--resume"], ranks=ranks)
    check(p2.returncode == 0 and "resumed from" in p2.stdout, f"{tag}: --resume continues")
    if p.returncode or p1.returncode or p2.returncode:
        continue
    full = os.path.join(d, f"full{tag}", "metrics.h5")
    split = os.path.join(d, name, "metrics.h5")
    s_a, l_a = series(full, "train/loss")
    s_b, l_b = series(split, "train/loss")
    check(np.array_equal(s_a, s_b), f"{tag}: same logged steps {list(s_b)}")
    check(np.array_equal(l_a, l_b), f"{tag}: train losses bitwise identical after resume")
    _, e_a = series(full, "eval/loss")
    _, e_b = series(split, "eval/loss")
    check(np.array_equal(e_a, e_b), f"{tag}: eval losses bitwise identical")
    ck_a = payload(os.path.join(d, f"full{tag}", "ckpt", "step_00000012"))
    ck_b = payload(os.path.join(d, name, "ckpt", "step_00000012"))
    same = all(ck_a[k] == ck_b[k] for k in ck_a if k.startswith(("params", "adam", "cluster")))
    check(same, f"{tag}: final parameters, Adam moments and clustering state bitwise identical")
    if kind == "clustered":
        check("cluster" in ck_a, f"{tag}: checkpoint carries the clustering state")
        s_e, _ = series(split, "cluster/events")
        check(list(s_e) == [4, 8], f"{tag}: re-clustering events at steps 4 and 8 on both sides of the stop ({list(s_e)})")
    # resuming a finished run does nothing harmful; a second resume keeps the log intact
finish()
