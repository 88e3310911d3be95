"""Read the HDF5 metrics file written by h5log back with h5py, as analysis/ does.

Drives tests/test_h5log (found at $DCMOE_BUILD_ROOT/tests/test_h5log):
  --write PATH          steps 1..57, flushed every 10, closed: every value, step and attribute
                        must come back exactly, string attributes as Python str;
  --write-and-die PATH  the same, killed by SIGKILL before closing: h5py must open the file
                        with swmr=True and see at least the 50 flushed rows, all correct.
The expected values mirror the *_at functions in tests/test_h5log.c.
Run with /usr/bin/python3 (Debian's h5py and numpy)."""
import os
import signal
import subprocess
import sys
import tempfile

import h5py
import numpy as np

L, E = 3, 5
N_FIRST, FLUSH, EVAL_EVERY = 57, 10, 5
CONFIG_TEXT = "model:\n  name: t\u00e9st \u2713\n  d_model: 64\n"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testlib import check, failures, finish  # noqa: E402


# ---- the fixture's values (tests/test_h5log.c, phase 0), as functions of the steps ----
def loss_at(s):
    return 0.5 * s.astype(np.float64) + 0.125


def tpe_at(s):
    l, e = np.arange(L), np.arange(E)
    return (100 * s[:, None, None] + 10 * l[None, :, None] + e[None, None, :]).astype(np.float32)


def tokens_at(s):
    return (np.int64(1) << 40) + 4096 * s


def cv2_at(s):
    return 0.25 * np.arange(L)[None, :] + s.astype(np.float64)[:, None] / 64.0


def eval_at(s):
    return 2.0 + s.astype(np.float64) / 8.0


VALUES = {
    "train/loss": loss_at,
    "moe/tokens_per_expert": tpe_at,
    "train/tokens": tokens_at,
    "moe/balance/cv2": cv2_at,
    "eval/loss": eval_at,
}

DTYPES = {
    "train/loss": np.float64,
    "moe/tokens_per_expert": np.float32,
    "train/tokens": np.int64,
    "moe/balance/cv2": np.float64,
    "eval/loss": np.float64,
}


def compare(what, got, want):
    same = got.shape == want.shape and np.array_equal(got, want)
    detail = ""
    if not same and got.shape == want.shape:
        i = tuple(np.argwhere(got != want)[0])
        detail = f" (first difference at {i}: got {got[i]!r} want {want[i]!r})"
    elif not same:
        detail = f" (shape {got.shape} vs {want.shape})"
    check(same, f"{what} {want.shape} exact" + detail)


def check_series(f, name, want_steps, at_least=False):
    """compare /name/{step,value} with the fixture; with at_least, the file may also hold rows
    past want_steps (written after the last flush), which must be right too"""
    try:
        step = f[name + "/step"]
        value = f[name + "/value"]
    except KeyError as e:
        check(False, f"{name}: missing dataset ({e})")
        return
    want_steps = np.asarray(want_steps, dtype=np.int64)
    n = len(want_steps)
    rows = min(step.shape[0], value.shape[0])
    if at_least:
        ok_len = check(rows >= n, f"{name}: {rows} rows readable, want at least {n}")
    else:
        ok_len = check(step.shape[0] == n and value.shape[0] == n,
                       f"{name}: step {step.shape[0]} rows, value {value.shape[0]} rows, want {n}")
    if not ok_len:
        return
    check(step.dtype == np.int64, f"{name}/step dtype int64 (got {step.dtype})")
    check(value.dtype == DTYPES[name], f"{name}/value dtype {np.dtype(DTYPES[name])} (got {value.dtype})")
    check(value.maxshape[0] is None and value.chunks is not None,
          f"{name}/value chunked with unlimited rows (chunks {value.chunks}, maxshape {value.maxshape})")
    got_steps = step[:n]
    same_steps = np.array_equal(got_steps, want_steps)
    check(same_steps, f"{name}/step == {want_steps[0]}..{want_steps[-1]}"
          + ("" if same_steps else f" (got {got_steps[:8]}...)"))
    compare(f"{name}/value", value[:n], VALUES[name](want_steps))
    if at_least and rows > n:
        extra = step[n:rows]
        check(bool(np.all(np.diff(np.concatenate([want_steps[-1:], extra])) > 0)),
              f"{name}: {rows - n} rows past the flush have increasing steps {extra}")
        compare(f"{name}/value rows past the flush", value[n:rows], VALUES[name](extra))


def check_str_attr(obj, name, want):
    if not check(name in obj.attrs, f"attribute {obj.name}@{name} exists"):
        return
    v = obj.attrs[name]
    check(isinstance(v, str), f"attribute {obj.name}@{name} is str (got {type(v).__name__})")
    check(v == want, f"attribute {obj.name}@{name} == {want!r} (got {v!r})")


def check_full_file(path):
    print(f"# {path}: closed after step {N_FIRST}", flush=True)
    with h5py.File(path, "r") as f:
        steps = list(range(1, N_FIRST + 1))
        for name in ["train/loss", "moe/tokens_per_expert", "train/tokens", "moe/balance/cv2"]:
            check_series(f, name, steps)
        check_series(f, "eval/loss", [s for s in steps if s % EVAL_EVERY == 0])

        a = f.attrs
        check(a.get("schema_version") == 1 and isinstance(a.get("schema_version"), np.integer),
              f"root @schema_version == 1 (got {a.get('schema_version')!r})")
        check(a.get("world_size") == 2, f"root @world_size == 2 (got {a.get('world_size')!r})")
        check(a.get("lr") == 3e-4 and isinstance(a.get("lr"), np.floating), f"root @lr == 3e-4 (got {a.get('lr')!r})")
        check_str_attr(f, "config", CONFIG_TEXT)
        check_str_attr(f, "note", "second")
        check_str_attr(f["train/loss"], "units", "nats")
        check_str_attr(f["meta/host"], "name", "node01")
        check_str_attr(f["params/by_kind"], "kinds", "dense,bases,factors,routers")

        check(np.array_equal(f["params/by_kind"][()], np.array([1.5, 2.5, 1e6, 7.0])), "array /params/by_kind")
        check(np.array_equal(f["params/shape"][()], np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64))
              and f["params/shape"].dtype == np.int64, "array /params/shape [2, 3] int64")
        check(f["params/total"].shape == () and f["params/total"][()] == 42.5, "scalar /params/total == 42.5")

        names = []
        f.visit(names.append)
        series = sorted(n[:-len("/value")] for n in names if n.endswith("/value"))
        check(series == sorted(DTYPES), f"series in the file: {series}")


def check_killed_file(path):
    flushed = (N_FIRST // FLUSH) * FLUSH
    print(f"# {path}: killed after step {N_FIRST}, last flush at {flushed}", flush=True)
    try:
        f = h5py.File(path, "r", swmr=True)
    except OSError as e:
        check(False, f"h5py opens the killed file with swmr=True ({e})")
        return
    with f:
        check(True, "h5py opens the killed file with swmr=True")
        steps = list(range(1, flushed + 1))
        for name in ["train/loss", "moe/tokens_per_expert", "train/tokens", "moe/balance/cv2"]:
            check_series(f, name, steps, at_least=True)
        check_series(f, "eval/loss", [s for s in steps if s % EVAL_EVERY == 0], at_least=True)
        check_str_attr(f, "config", CONFIG_TEXT)


def main():
    build = os.environ.get("DCMOE_BUILD_ROOT")
    if not build:
        here = os.path.dirname(os.path.abspath(__file__))
        build = os.path.join(here, "..", "build")
    exe = os.path.join(build, "tests", "test_h5log")
    if not os.access(exe, os.X_OK):
        print(f"test_h5log_readback: writer {exe} not found or not executable "
              f"(build tests/test_h5log.c; DCMOE_BUILD_ROOT={os.environ.get('DCMOE_BUILD_ROOT')!r})", flush=True)
        sys.exit(1)

    with tempfile.TemporaryDirectory(prefix="dcmoe_h5readback_") as tmp:
        full = os.path.join(tmp, "full.h5")
        r = subprocess.run([exe, "--write", full], capture_output=True, text=True, timeout=60)
        if check(r.returncode == 0, f"{exe} --write exits 0 (got {r.returncode}) {r.stderr.strip()}"):
            check_full_file(full)

        killed = os.path.join(tmp, "killed.h5")
        r = subprocess.run([exe, "--write-and-die", killed], capture_output=True, text=True, timeout=60)
        if check(r.returncode == -signal.SIGKILL,
                 f"{exe} --write-and-die ends by SIGKILL (got {r.returncode}) {r.stderr.strip()}"):
            check_killed_file(killed)
    finish()


if __name__ == "__main__":
    main()
