"""mpi suite: a run stopped at step 5 (--stop-at, which checkpoints) and resumed with
--resume ends bitwise-identical to an uninterrupted run: every logged loss, the eval
losses and the final parameters (checkpoint payload). Also with 2 ranks. Resuming the
finished run twice more changes neither its log nor its checkpoints."""
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


def h5_snapshot(path):
    """every dataset of an HDF5 file as {path: (shape, bytes)}"""
    import h5py
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = obj[...]
                out[name] = (a.shape, a.tobytes())
        f.visititems(visit)
    return out


def tree_snapshot(root):
    """{relative path: file bytes} of every file below root"""
    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            full = os.path.join(dirpath, fn)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
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
    # resuming a finished run does nothing harmful; a second resume keeps the log intact:
    # twice --resume on the run that reached train.steps must exit 0, say so without a bogus
    # evaluation, and leave every logged series and every checkpoint byte as it was
    run_dir = os.path.join(d, name)
    log_before, ck_before = h5_snapshot(split), tree_snapshot(os.path.join(run_dir, "ckpt"))
    for k in (1, 2):
        p3 = run(["train", cfg, "--quiet", "--set", f"run.name={name}", "--resume"], ranks=ranks, check_rc=False)
        check(p3.returncode == 0 and "ppl 0.00" not in p3.stdout,
              f"{tag}: resume #{k} of the finished run exits 0 without a zero-perplexity evaluation "
              f"(rc {p3.returncode}: {(p3.stdout + p3.stderr).strip()[-160:].replace(chr(10), ' | ')})")
        log_after = h5_snapshot(split)
        changed = sorted(k2 for k2 in set(log_before) | set(log_after) if log_before.get(k2) != log_after.get(k2))
        check(not changed, f"{tag}: resume #{k} of the finished run leaves metrics.h5 unchanged (changed: {changed[:6]})")
        ck_after = tree_snapshot(os.path.join(run_dir, "ckpt"))
        check(ck_after == ck_before, f"{tag}: resume #{k} of the finished run leaves the checkpoints unchanged "
              f"({len(ck_before)} files before, {len(ck_after)} after, "
              f"{sum(ck_after.get(f) != b for f, b in ck_before.items())} changed)")
finish()
