#!/usr/bin/python3
"""The 108-run simulated sweep of experiments/sim-sweep.yaml through the sweep launcher (groups x
nodes 16-512 x re-clustering interval x placement x exchange; one `dcmoe simulate` per run), then
analysis/report on the sweep folder; writes results/sim-sweep.{csv,meta.json,md}: every run's
steady step time, event overhead, inter-node bytes per token and event traffic, and the views a
reader asks for (what placement and the exchange save at each scale, what the re-clustering
interval costs).

usage: /usr/bin/python3 experiments/run_sim_sweep.py
       /usr/bin/python3 experiments/run_sim_sweep.py --render-only [--out DIR]"""
import argparse
import csv
import os
import subprocess
import sys
import time

import resultslib as rl

ROOT = rl.ROOT
SCRIPT = "experiments/run_sim_sweep.py"
CFG = "experiments/sim-sweep.yaml"
EXE = os.environ.get("DCMOE_EXE", os.path.join(ROOT, "build", "dcmoe"))
SWEEP_DIR = os.path.join(ROOT, "runs", "sim-sweep", "sweep-sim-sweep")
COLS = ["id", "groups", "nodes", "gpus", "interval", "placement", "exchange", "steady_step_s", "step_s_mean", "event_s",
        "overhead_pct", "inter_bytes_per_token", "event_bytes_per_step", "units_migrated", "experts_moved", "mem_gib"]


def run_all(args):
    import h5py
    import numpy as np
    t0 = time.time()
    p = subprocess.run([EXE, "sweep", "run", os.path.join(ROOT, CFG), "--launcher", "local", "--dir", SWEEP_DIR],
                       capture_output=True, text=True, cwd=ROOT)
    sweep_s = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"sweep failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    t1 = time.time()
    r = subprocess.run([rl.PY, os.path.join(ROOT, "analysis", "report"), SWEEP_DIR], capture_output=True, text=True, cwd=ROOT)
    report_s = time.time() - t1
    if r.returncode != 0:
        sys.exit(f"analysis/report failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    report = [os.path.join(dp, f) for dp, _, fs in os.walk(SWEEP_DIR) for f in fs if f == "report.html"]
    with open(os.path.join(SWEEP_DIR, "plan.tsv")) as f:
        plan = list(csv.DictReader(f, delimiter="\t"))
    rows = []
    for run in plan:
        s = dict(kv.split("=", 1) for kv in run["settings"].split())
        with h5py.File(os.path.join(run["run_dir"], "metrics.h5"), "r") as f:
            tb = f["sim/time_breakdown/value"][...]
            step = f["perf/step_s/value"][...]
            ev = f["sim/event_s/value"][...]
            inter = f["comm/summary/inter_bytes/value"][...]
            intra = f["comm/summary/intra_bytes/value"][...]
            disp = f["comm/dispatch/value"][...]
            mem = f["sim/mem_bytes/value"][...]
            gpus = int(f.attrs["world_size"])
        ev_s = ev[:, 0] + ev[:, 1] + ev[:, 2]
        rows.append(dict(id=run["id"], groups=int(s["moe.n_groups"]), nodes=int(s["sim.nodes"]), gpus=gpus,
                         interval=int(s["clustering.interval"]), placement=s["parallel.placement"],
                         exchange=s["parallel.exchange"], steady_step_s=float(np.median(tb[:, 7])),
                         step_s_mean=float(step.mean()), event_s=float(ev_s.sum()),
                         overhead_pct=float(100 * ev_s.sum() / tb[:, 7].sum()),
                         inter_bytes_per_token=float((inter[:, 1] + inter[:, 2]).sum() / disp[:, 3].sum()),
                         event_bytes_per_step=float((inter[:, 3] + inter[:, 5] + intra[:, 3] + intra[:, 5]).mean()),
                         units_migrated=float(ev[:, 4].sum()), experts_moved=float(ev[:, 3].sum()),
                         mem_gib=float(mem[:, 3].max() / 2 ** 30)))
    with open(os.path.join(rl.RESULTS, "sim-sweep.csv"), "w") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for q in rows:
            w.writerow([q[c] if isinstance(q[c], str) else f"{q[c]:.6g}" for c in COLS])
    rl.write_meta("sim-sweep", {"command": rl.command(SCRIPT, sys.argv[1:]), "config": CFG,
                                "launcher": f"build/dcmoe sweep run {CFG} --launcher local --dir runs/sim-sweep/sweep-sim-sweep",
                                "report": "analysis/report runs/sim-sweep/sweep-sim-sweep",
                                "runs": len(plan), "sweep_wall_s": round(sweep_s, 1), "report_wall_s": round(report_s, 1),
                                "report_written": [rl.rel(x) for x in report]})
    print(f"{len(plan)} runs in {sweep_s:.0f} s, report in {report_s:.0f} s", flush=True)


def render(out_dir):
    meta = rl.read_meta("sim-sweep")
    with open(os.path.join(rl.RESULTS, "sim-sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    for q in rows:
        for k in COLS[1:5]:
            q[k] = int(q[k])
        for k in COLS[7:]:
            q[k] = float(q[k])

    def pick(**kw):
        return [q for q in rows if all(q[k] == v for k, v in kw.items())]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    groups = sorted({q["groups"] for q in rows})
    nodes = sorted({q["nodes"] for q in rows})
    ivs = sorted({q["interval"] for q in rows})
    L = ["# Simulated sweep: 108 trajectories through the launcher\n",
         f"Command: `{meta['command']}`, which runs `{meta['launcher']}` ({meta['runs']} runs, {meta['sweep_wall_s']:.0f} s "
         f"wall on this machine) and then `{meta['report']}` ({meta['report_wall_s']:.0f} s; wrote "
         f"{', '.join('`' + x + '`' for x in meta['report_written']) or 'nothing'}). "
         + rl.rerender(SCRIPT, ["results/sim-sweep.csv", "results/sim-sweep.meta.json"]) + "\n",
         f"Config `{meta['config']}`: a DeepSeek-V3-sized clustered MoE on H800 nodes of 8 GPUs, 1600-step trajectories. "
         "Every run's numbers are in `results/sim-sweep.csv`; below, the views the sweep was built for.\n",
         "## Placement and exchange at each scale\n",
         "Inter-node dispatch + combine bytes per routed token and MoE layer, and the steady step time (median over the trajectory; "
         "mean over the three re-clustering intervals), by placement policy and exchange.\n",
         "| groups | GPUs | contiguous, flat | contiguous, two-level | topology, flat | topology, two-level | "
         "units migrated (topology, flat) |", "|---:|---:|---|---|---|---|---:|"]
    for g in groups:
        for n in nodes:
            cells = []
            for pl in ("contiguous", "topology"):
                for ex in ("flat", "two_level"):
                    qs = pick(groups=g, nodes=n, placement=pl, exchange=ex)
                    cells.append(f"{mean([q['inter_bytes_per_token'] for q in qs]) / 1e3:.1f} kB, "
                                 f"{mean([q['steady_step_s'] for q in qs]):.3f} s")
            mig = mean([q["units_migrated"] for q in pick(groups=g, nodes=n, placement="topology", exchange="flat")])
            L.append(f"| {g} | {8 * n} | " + " | ".join(cells) + f" | {mig:.0f} |")
    L += ["", "## What the re-clustering interval costs\n",
          "Event seconds (host work, exchanges, migrations) over the steady steps' seconds, and the event traffic per step "
          "(re-clustering + migration bytes, all GPUs), for topology placement and the flat exchange.\n",
          "| groups | GPUs | " + " | ".join(f"every {iv}: overhead, event GB/step" for iv in ivs) + " |",
          "|---:|---:|" + "---|" * len(ivs)]
    for g in groups:
        for n in nodes:
            cells = []
            for iv in ivs:
                q = pick(groups=g, nodes=n, interval=iv, placement="topology", exchange="flat")[0]
                cells.append(f"{q['overhead_pct']:.1f}%, {q['event_bytes_per_step'] / 1e9:.2f}")
            L.append(f"| {g} | {8 * n} | " + " | ".join(cells) + " |")
    L += ["", rl.notes("sim-sweep")]
    return rl.write_md(out_dir, "sim-sweep", "\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
