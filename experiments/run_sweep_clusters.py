#!/usr/bin/python3
"""Run experiments/sweep-clusters.yaml (cluster count x re-clustering interval x ranks) as one
Slurm job array on a private one-node Slurm, build its report with analysis/report, copy the
report into results/sweep-clusters/ and render results/sweep-clusters/README.md from the
copied summary.csv and recluster_events.csv, README.meta.json and the hand-written
README.notes.md.

usage: /usr/bin/python3 experiments/run_sweep_clusters.py            (as root; about 6.5 minutes)
       /usr/bin/python3 experiments/run_sweep_clusters.py --render-only [--out DIR]
--render-only rebuilds README.md only (report.md, report.html and the PNGs come from the run
logs under runs/, which are not committed); --out DIR writes it to DIR."""
import argparse
import csv
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import resultslib as rl

ROOT = rl.ROOT
NAME = "sweep-clusters/README"
SCRIPT = "experiments/run_sweep_clusters.py"
DEST = os.path.join(rl.RESULTS, "sweep-clusters")
SWEEP = "runs/sweep-clusters/sweep-clusters"
SLURM = ["/usr/bin/python3", "tests/slurm_harness.py", "--run", "build/dcmoe", "sweep", "run",
         "experiments/sweep-clusters.yaml", "--launcher", "slurm", "--throttle", "1"]
REPORT = ["/usr/bin/python3", "analysis/report", SWEEP, "-o"]


def run_all():
    t0 = time.time()
    subprocess.run(SLURM, check=True, cwd=ROOT)
    tmp = tempfile.mkdtemp(prefix="dcmoe-sweep-report-")
    subprocess.run(REPORT + [tmp], check=True, cwd=ROOT)
    for f in ["report.html", "report.md", "summary.csv", "recluster_events.csv"] + [os.path.basename(p) for p in glob.glob(os.path.join(tmp, "*.png"))]:
        shutil.copy(os.path.join(tmp, f), os.path.join(DEST, f))
    shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(ROOT, SWEEP, "plan.tsv")) as f:
        plan = f.read().replace(ROOT + "/", "")          # repository-relative paths in the copy
    with open(os.path.join(DEST, "plan.tsv"), "w") as f:
        f.write(plan)
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "wall_s": time.time() - t0})


def render(out_dir):
    meta = rl.read_meta(NAME)
    with open(os.path.join(DEST, "summary.csv")) as f:
        runs = list(csv.DictReader(f))
    with open(os.path.join(DEST, "recluster_events.csv")) as f:
        ev = list(csv.DictReader(f))
    runs.sort(key=lambda r: (int(r["moe.n_groups"]), int(r["clustering.interval"]), int(r["ranks"])))
    L = ["# sweep-clusters: cluster count × re-clustering interval × ranks (Brown corpus)", "",
         "`experiments/sweep-clusters.yaml`: clustered MoE (E = 16, top-2, rank-8 residuals, d_model 64, 2 layers, "
         "2000 steps of 16 × 32 tokens), G ∈ {4, 8} × re-clustering interval T ∈ {100, 400} × ranks ∈ {1, 2}, run as one "
         "Slurm job array on the one-node Slurm of this 2-core machine.", "",
         f"Command: `{meta['command']}` (from the repository root, as root, after `meson setup build && ninja -C build` and "
         "`bash tools/fetch-data.sh`). It runs", "", "```", " ".join(SLURM), " ".join(REPORT) + " <temporary folder>", "```", "",
         "copies `report.html`, `report.md`, `summary.csv`, `recluster_events.csv`, the PNGs and the sweep's `plan.tsv` "
         "(repository-relative paths) here and writes this file. `slurm_harness.py --run` starts a private slurmctld + "
         "slurmd + munged, runs the command (which submits the job array, `--array=0-7%1`, and a report job, "
         "`--dependency=afterany:<array>`, running `slurm/report.sbatch` → `analysis/report`), waits until both have ended "
         "and stops the daemons; on a machine that already has Slurm, the `build/dcmoe sweep run ...` part alone does the "
         "same. The long tables `scalars.csv` and `expert_load.csv` are left out of the repository, and so are the run "
         "logs under `runs/`, so only this file can be re-rendered from what is committed: "
         + rl.rerender(SCRIPT, ["results/sweep-clusters/summary.csv", "results/sweep-clusters/recluster_events.csv",
                                "results/sweep-clusters/README.meta.json"]), ""]
    if "wall_s" in meta:
        L += [f"Wall time of the command: {meta['wall_s'] / 60:.1f} min.", ""]
    L += ["## What it shows", "",
          "| G | T | ranks | valid ppl | test ppl | expert CV² (last 10%) | group CV² (last 10%) | ms/step (median) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        L.append(f"| {r['moe.n_groups']} | {r['clustering.interval']} | {r['ranks']} | {float(r['final_valid_ppl']):.2f} | "
                 f"{float(r['final_test_ppl']):.2f} | {float(r['cv2_last10pct']):.3f} | {float(r['group_cv2_last10pct']):.3f} | "
                 f"{1e3 * float(r['step_s_median']):.1f} |")
    L.append("")
    for ranks in sorted({r["ranks"] for r in runs}):
        t = [int(r["steps"]) * float(r["step_s_median"]) for r in runs if r["ranks"] == ranks]
        L.append(f"- Training time at the median step time (steps × median): {min(t):.0f}–{max(t):.0f} s per {ranks}-rank run.")
    events = {(e["run"], e["step"]) for e in ev}
    secs = sum(float(e["seconds"]) for e in ev)
    L.append(f"- Re-clustering: {len(events)} events ({len(ev)} layer rows in `recluster_events.csv`), "
             f"{sum(float(e['accepted']) for e in ev):.0f} layer rows accepted, "
             f"{sum(float(e['moved_experts']) for e in ev):.0f} experts moved, largest cost reduction "
             f"{max(float(e['cost_before']) - float(e['cost_after']) for e in ev):.4f}; "
             f"{1e3 * secs / len(events):.1f} ms per event on average ({1e3 * secs / len(ev):.1f} ms per layer row).")
    L += ["", rl.notes(NAME)]
    return rl.write_md(out_dir, "README", "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    rl.add_args(ap)
    a = ap.parse_args()
    out = DEST if a.out == rl.RESULTS else a.out
    if not a.render_only:
        run_all()
    print(open(render(out)).read(), end="")


if __name__ == "__main__":
    main()
