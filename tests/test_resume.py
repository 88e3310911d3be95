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
for ranks in (1, 2):
    cfg = tiny_config(os.path.join(d, f"r{ranks}.yaml"), d, f"full{ranks}")
    p = run(["train", cfg, "--quiet"], ranks=ranks)
    check(p.returncode == 0, f"{ranks} rank(s): uninterrupted run")
    name = f"split{ranks}"
    p1 = run(["train", cfg, "--quiet", "--set", f"run.name={name}", "--stop-at", "5"], ranks=ranks)
    check(p1.returncode == 0 and "--stop-at reached" in p1.stdout, f"{ranks} rank(s): run stops at step 5")
    p2 = run(["train", cfg, "--quiet", "--set", f"run.name={name}", "--resume"], ranks=ranks)
    check(p2.returncode == 0 and "resumed from" in p2.stdout, f"{ranks} rank(s): --resume continues")
    if p.returncode or p1.returncode or p2.returncode:
        continue
    full = os.path.join(d, f"full{ranks}", "metrics.h5")
    split = os.path.join(d, name, "metrics.h5")
    s_a, l_a = series(full, "train/loss")
    s_b, l_b = series(split, "train/loss")
    check(np.array_equal(s_a, s_b), f"{ranks} rank(s): same logged steps {list(s_b)}")
    check(np.array_equal(l_a, l_b), f"{ranks} rank(s): train losses bitwise identical after resume")
    _, e_a = series(full, "eval/loss")
    _, e_b = series(split, "eval/loss")
    check(np.array_equal(e_a, e_b), f"{ranks} rank(s): eval losses bitwise identical")
    ck_a = payload(os.path.join(d, f"full{ranks}", "ckpt", "step_00000012"))
    ck_b = payload(os.path.join(d, name, "ckpt", "step_00000012"))
    same = all(ck_a[k] == ck_b[k] for k in ck_a if k.startswith(("params", "adam")))
    check(same, f"{ranks} rank(s): final parameters and Adam moments bitwise identical")
    # resuming a finished run does nothing harmful; a second resume keeps the log intact
finish()
