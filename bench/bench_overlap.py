#!/usr/bin/env python3
"""bench_overlap: the overlapped gradient allreduce (parallel.overlap_allreduce) against the
blocking one on a small dense model: the quickstart experiment with moe.kind=dense (or any
config), R ranks, repeats alternating off / on. Per run: the median over the steps after the
warm-up of the step time (perf/step_s, slowest rank), the exposed allreduce (perf/time_split
column 2, rank 0) and, with overlap, the time the dense sum was in flight
(comm/summary/allreduce_overlap_s column 0). Prints one line per run and the median and the
spread (min..max) of those medians per mode. A benchmark, not a test: CPU timings on a shared
machine are noisy; read the spreads.

  /usr/bin/python3 bench/bench_overlap.py [--ranks 2] [--steps 60] [--repeats 3] [--skip 10]
      [--config experiments/quickstart.yaml] [--set key=value ...]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def series(h5, name):
    with h5py.File(h5, "r") as f:
        return np.array(f[name]["value"][...])


def one(exe, cfg, ranks, steps, sets, overlap, out, name, bucket_mb):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), exe, "train", cfg, "--quiet",
           "--set", f"run.out_dir={out}", "--set", f"run.name={name}", "--set", f"train.steps={steps}",
           "--set", "train.eval_interval=0", "--set", "train.eval_batches=1",
           "--set", f"parallel.overlap_allreduce={'true' if overlap else 'false'}",
           "--set", f"parallel.bucket_mb={bucket_mb}"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=SRC)
    if p.returncode != 0:
        sys.exit(f"bench_overlap: failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return os.path.join(out, name, "metrics.h5")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exe", default=os.path.join(SRC, "build", "dcmoe"))
    ap.add_argument("--config", default=os.path.join(SRC, "experiments", "quickstart.yaml"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the medians")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", default="4")
    ap.add_argument("--set", action="append", default=["moe.kind=dense"],
                    help="extra config overrides (default: moe.kind=dense)")
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="dcmoe-bench-overlap-")
    rows = {False: [], True: []}
    print(f"# {a.config} {' '.join(a.set)}, {a.ranks} ranks, {a.steps} steps (medians over steps > {a.skip}), "
          f"bucket_mb {a.bucket_mb}")
    print("mode     run  step_ms  exposed_allreduce_ms  in_flight_ms  backward_ms")
    for rep in range(a.repeats):
        for ov in (False, True):
            h5 = one(a.exe, a.config, a.ranks, a.steps, a.set, ov, out, f"{'on' if ov else 'off'}{rep}", a.bucket_mb)
            step = series(h5, "perf/step_s")[a.skip:]
            split = series(h5, "perf/time_split")[a.skip:]
            infl = series(h5, "comm/summary/allreduce_overlap_s")[a.skip:, 0] if ov else split[:, 2]
            r = (1e3 * np.median(step), 1e3 * np.median(split[:, 2]), 1e3 * np.median(infl), 1e3 * np.median(split[:, 1]))
            rows[ov].append(r)
            print(f"{'on ' if ov else 'off'}      {rep:3d}  {r[0]:7.2f}  {r[1]:20.3f}  {r[2]:12.3f}  {r[3]:11.2f}", flush=True)
    print("# median (min..max) of the per-run medians")
    for ov in (False, True):
        x = np.array(rows[ov])
        cols = [f"{np.median(x[:, i]):.3f} ({x[:, i].min():.3f}..{x[:, i].max():.3f})" for i in range(4)]
        print(f"{'on ' if ov else 'off'}  step_ms {cols[0]}  exposed_ms {cols[1]}  in_flight_ms {cols[2]}  backward_ms {cols[3]}")


if __name__ == "__main__":
    main()
