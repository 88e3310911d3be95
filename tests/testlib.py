"""Shared helpers for the Python integration tests: locate the build, write configs, run
dcmoe under mpirun, read the HDF5 metrics. Run with /usr/bin/python3 (h5py, numpy)."""
import os
import subprocess
import sys
import tempfile

SRC = os.environ.get("DCMOE_SOURCE_ROOT", os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
BUILD = os.environ.get("DCMOE_BUILD_ROOT", os.path.join(SRC, "build"))
EXE = os.environ.get("DCMOE_EXE", os.path.join(BUILD, "dcmoe"))
FIXTURES = os.path.join(SRC, "tests", "fixtures")

failures = []


def check(cond, msg):
    print(("ok - " if cond else "not ok - ") + msg, flush=True)
    if not cond:
        failures.append(msg)
    return cond


def finish():
    if failures:
        print(f"# {len(failures)} check(s) failed:", flush=True)
        for f in failures:
            print(f"#   {f}", flush=True)
        sys.exit(1)
    print("# all checks passed", flush=True)
    sys.exit(0)


def tiny_config(path, out_dir, name, extra=""):
    """A small, fast LM config on the Brown-format fixture."""
    text = f"""run:
  name: {name}
  out_dir: {out_dir}
  seed: 11
  threads: 1
  peak_gflops: 100.0
data:
  kind: brown
  path: {FIXTURES}/brown
  vocab_max: 400
model:
  d_model: 32
  n_layer: 2
  n_head: 4
  seq_len: 16
moe:
  kind: standard
  n_experts: 8
  top_k: 2
  d_ff_expert: 32
train:
  batch_size: 8
  steps: 12
  lr: 3.0e-3
  warmup_steps: 3
  eval_interval: 6
  eval_batches: 2
  log_interval: 4
log:
  flush_interval: 4
  expert_interval: 2
checkpoint:
  interval: 0
  keep: 3
{extra}"""
    with open(path, "w") as f:
        f.write(text)
    return path


def run(args, ranks=1, check_rc=True, timeout=600):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), EXE] + list(args)
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check_rc and p.returncode != 0:
        print("command failed:", " ".join(cmd), "\n--- stdout\n", p.stdout[-4000:], "\n--- stderr\n", p.stderr[-4000:], flush=True)
    return p


def run_plain(args, check_rc=False, timeout=300):
    """dcmoe without mpirun (a singleton MPI job)"""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return subprocess.run([EXE] + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def series(h5path, name):
    import h5py
    import numpy as np
    with h5py.File(h5path, "r", swmr=True) as f:
        return np.array(f[name]["step"][...]), np.array(f[name]["value"][...])


def tmpdir(prefix):
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR", "/tmp"))


def read_checkpoint(path):
    """sections of a checkpoint's model.bin as {name: bytes} (CRCs not checked here)"""
    import struct
    with open(path, "rb") as f:
        img = f.read()
    assert img[:8] == b"DCMOECK1", f"{path}: not a dcmoe checkpoint"
    n_sec = struct.unpack_from("<I", img, 12)[0]
    off, out = 16, {}
    for _ in range(n_sec):
        name = img[off:off + 48].split(b"\0")[0].decode()
        n = struct.unpack_from("<Q", img, off + 48)[0]
        off += 64
        out[name] = img[off:off + n]
        off += n
    return out


def checkpoint_table(sec):
    """the tensor table of a checkpoint (read_checkpoint's dict): (name, category, rows, elements, offset)"""
    rows = []
    for line in sec["table"].split(b"\0")[0].decode().strip().splitlines():
        name, cat, d0, d1, d2, offset = line.split()
        rows.append((name, int(cat), int(d0), int(d0) * (int(d1) or 1) * (int(d2) or 1), int(offset)))
    return rows


def expert_rows_bad(ref, got, tol=1e-3):
    """the expert rows (one per expert or group of every expert tensor) of checkpoint got that are
    zero or differ from ref's by more than tol (relative); [] when every expert is intact"""
    import numpy as np
    a = np.frombuffer(ref["params.expert"], dtype=np.float32)
    b = np.frombuffer(got["params.expert"], dtype=np.float32)
    bad = []
    for (tname, cat, d0, n, off) in checkpoint_table(ref):
        if cat != 1:
            continue
        ra, rb = a[off:off + n].reshape(d0, -1), b[off:off + n].reshape(d0, -1)
        for i in range(d0):
            err = np.linalg.norm(ra[i] - rb[i]) / max(np.linalg.norm(ra[i]), 1e-30)
            if not (np.linalg.norm(rb[i]) > 0 and err < tol):
                bad.append(f"{tname}[{i}] rel err {err:.2e}")
    return bad


def partition_jaccards(ref, cur, G):
    """the mean Jaccard of matched groups (dcmoe's cluster_jaccard after cluster_match_ids) of
    partition cur against ref ([E] group ids in [0, G)), as a set: one value for every
    relabelling of cur that maximises its overlap with ref (the C matching breaks ties its own
    way, and tied relabellings can differ in Jaccard)"""
    import itertools
    import numpy as np
    ref, cur = np.asarray(ref, dtype=int), np.asarray(cur, dtype=int)
    best, vals = -1, set()
    for perm in itertools.permutations(range(G)):
        c = np.array(perm)[cur]
        ov = int(np.sum(c == ref))
        if ov < best:
            continue
        j = np.mean([np.sum((ref == g) & (c == g)) / max(1, np.sum((ref == g) | (c == g))) for g in range(G)])
        if ov > best:
            best, vals = ov, set()
        vals.add(round(float(j), 12))
    return vals


def rel_err(a, b):
    """max relative difference of two loss series (1.0 when their lengths differ)"""
    import numpy as np
    if len(a) != len(b):
        return 1.0
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(a))))


def train_tiny(d, name, ranks, args):
    """dcmoe train of tiny_config(d/name.yaml) with extra command-line args under `ranks` ranks,
    checked to exit 0: (metrics.h5 path, config path, the CompletedProcess)"""
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    p = run(["train", cfg, "--quiet"] + list(args), ranks=ranks)
    check(p.returncode == 0, f"{name}: {ranks}-rank run exits 0")
    return os.path.join(d, name, "metrics.h5"), cfg, p


def stop_and_resume(cfg, out_dir, name, stop, sets=(), ranks=1):
    """dcmoe train of cfg as run `name`, stopped after step `stop` (--stop-at), then resumed to
    the end (--resume), both checked; the run's metrics.h5, or None when it was not written"""
    base = ["train", cfg, "--quiet", "--set", f"run.name={name}"]
    p1 = run(base + ["--stop-at", str(stop)] + list(sets), ranks=ranks)
    p2 = run(base + ["--resume"] + list(sets), ranks=ranks)
    check(p1.returncode == 0 and p2.returncode == 0 and "resumed from" in p2.stdout, f"stop at {stop}, resume")
    h = os.path.join(out_dir, name, "metrics.h5")
    return h if os.path.exists(h) else None
