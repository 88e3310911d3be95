#!/usr/bin/python3
"""What re-clustering and placement events cost at 4096 GPUs, from `dcmoe simulate` trajectories
of experiments/sim-study.yaml's clustered model (DeepSeek-V3-sized: 58 MoE layers, E = 256 in 32
groups of 8, top-8, 4096 tokens per GPU, H800 nodes of 8 GPUs, EP groups of 32 GPUs, planted
routing with coherence 0.8): the re-clustering interval swept from 100 to 1600 steps over 3200
steps (sim.recluster_moved = 0.1 of the experts move per event), the host-side event work at the
trainer's rate (sim.host_gflops 20) and as a what-if on the GPU (0.6 x 989 TFLOP/s), the
standard MoE (placement re-runs only) beside it; plus the wall time of a 1000-step trajectory
with every step's routing drawn (the issue's <= 5 minutes). Writes
results/sim-trajectory.{csv,meta.json,md}.

usage: /usr/bin/python3 experiments/run_sim_trajectory.py
       /usr/bin/python3 experiments/run_sim_trajectory.py --render-only [--out DIR]"""
import argparse
import csv
import os
import subprocess
import sys

import resultslib as rl

ROOT = rl.ROOT
SCRIPT = "experiments/run_sim_trajectory.py"
CFG = "experiments/sim-study.yaml"
EXE = os.environ.get("DCMOE_EXE", os.path.join(ROOT, "build", "dcmoe"))
STEPS = 3200
DEVICE_GFLOPS = 0.6 * 989e3      # the what-if: event work at the preset's achieved GEMM rate
BASE = ["sim.nodes=512", "sim.gpus_per_node=8", "sim.samples=1", "sim.distinct_layers=1", f"sim.steps={STEPS}",
        "sim.redraw_interval=50", "parallel.place_interval=200", "parallel.traffic_interval=100000"]
CLU = ["moe.kind=clustered", "sim.routing=planted", "parallel.ep_size=32", "clustering.enabled=true",
       "clustering.warmup=0", "sim.recluster_moved=0.1"]
COLS = ["name", "label", "interval", "steps", "events", "experts_moved", "units_migrated", "steady_step_s",
        "event_s", "rc_compute_s", "rc_comm_s", "migration_s", "overhead_pct", "rc_inter_gb", "rc_intra_gb",
        "migration_gb", "event_inter_bytes_per_step", "moe_inter_bytes_per_step", "wall_s"]


def variants():
    v = []
    for iv in (100, 200, 400, 800, 1600):
        v.append((f"clu-i{iv}", f"clustered, re-cluster every {iv}, host work 20 GFLOP/s", iv,
                  CLU + [f"clustering.interval={iv}", "sim.host_gflops=20"]))
    for iv in (100, 1600):
        v.append((f"clu-i{iv}-dev", f"clustered, re-cluster every {iv}, event work on the GPU", iv,
                  CLU + [f"clustering.interval={iv}", f"sim.host_gflops={DEVICE_GFLOPS:.0f}"]))
    v.append(("clu-static", "clustered, no re-clustering (placement re-runs only)", 0,
              ["moe.kind=clustered", "sim.routing=planted", "parallel.ep_size=32", "clustering.enabled=false"]))
    v.append(("std", "standard MoE, max_nodes 4 (placement re-runs only)", 0,
              ["moe.kind=standard", "sim.routing=uniform", "parallel.ep_size=256", "moe.max_nodes=4"]))
    return v


def simulate(name, sets, steps_override=None, timed=False):
    import h5py
    import numpy as np
    out = os.path.join(ROOT, "runs", "sim-trajectory")
    cmd = [EXE, "simulate", os.path.join(ROOT, CFG), "--quiet", "--set", f"run.name={name}", "--set", f"run.out_dir={out}"]
    for s in BASE + sets + ([f"sim.steps={steps_override}"] if steps_override else []):
        cmd += ["--set", s]
    if timed:
        cmd = ["/usr/bin/time", "-f", "%e %M", "taskset", "-c", "0"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{name} failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    wall = float(p.stderr.strip().splitlines()[-1].split()[0]) if timed else 0.0
    rss = float(p.stderr.strip().splitlines()[-1].split()[1]) / 1024 if timed else 0.0
    with h5py.File(os.path.join(out, name, "metrics.h5"), "r") as f:
        tb = f["sim/time_breakdown/value"][...]
        ev = f["sim/event_s/value"][...]
        intra = f["comm/summary/intra_bytes/value"][...]
        inter = f["comm/summary/inter_bytes/value"][...]
        n_ev = len(f["cluster/events/step"]) if "cluster/events" in f else 0
    steps = len(tb)
    ev_s = ev[:, 0] + ev[:, 1] + ev[:, 2]
    return dict(steps=steps, events=n_ev, experts_moved=ev[:, 3].sum(), units_migrated=ev[:, 4].sum(),
                steady_step_s=float(np.median(tb[:, 7])), event_s=ev_s.sum(), rc_compute_s=ev[:, 0].sum(),
                rc_comm_s=ev[:, 1].sum(), migration_s=ev[:, 2].sum(), overhead_pct=100 * ev_s.sum() / tb[:, 7].sum(),
                rc_inter_gb=inter[:, 5].sum() / 1e9, rc_intra_gb=intra[:, 5].sum() / 1e9,
                migration_gb=(inter[:, 3].sum() + intra[:, 3].sum()) / 1e9,
                event_inter_bytes_per_step=(inter[:, 3].sum() + inter[:, 5].sum()) / steps,
                moe_inter_bytes_per_step=(inter[:, 1].sum() + inter[:, 2].sum()) / steps, wall_s=wall, rss_mib=rss)


def run_all(args):
    rows = []
    for name, label, iv, sets in variants():
        r = simulate(name, sets)
        r.update(name=name, label=label, interval=iv)
        rows.append(r)
        print(f"{name:14s}: {r['events']} events, {r['event_s']:.1f} s of events ({r['overhead_pct']:.2f}% of "
              f"{r['steps']} steps), re-clustering inter-node {r['rc_inter_gb']:.2f} GB", flush=True)
    with open(os.path.join(rl.RESULTS, "sim-trajectory.csv"), "w") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for r in rows:
            w.writerow([r[c] if isinstance(r[c], str) else f"{r[c]:.6g}" for c in COLS])
    # scale: a 1000-step trajectory with every step's routing drawn, re-clustering every 100
    # steps and placement every 200, one process on one core
    t = simulate("scale-1000", CLU + ["clustering.interval=100", "sim.redraw_interval=1"], steps_override=1000, timed=True)
    print(f"1000-step trajectory: {t['wall_s']:.1f} s, {t['rss_mib']:.0f} MiB", flush=True)
    rl.write_meta("sim-trajectory", {
        "command": rl.command(SCRIPT, sys.argv[1:]), "config": CFG, "base_settings": " ".join(BASE),
        "scale_1000": {"wall_s": t["wall_s"], "max_rss_mib": t["rss_mib"], "events": t["events"],
                       "settings": "the clustered row's settings with clustering.interval=100, sim.steps=1000, "
                                   "sim.redraw_interval=1 (every step drawn); /usr/bin/time, taskset -c 0"}})


def render(out_dir):
    meta = rl.read_meta("sim-trajectory")
    with open(os.path.join(rl.RESULTS, "sim-trajectory.csv")) as f:
        rows = list(csv.DictReader(f))
    g = lambda r, k: float(r[k])   # noqa: E731
    L = ["# Re-clustering and placement events at 4096 GPUs (simulated trajectories)\n",
         f"Command: `{meta['command']}`; config `{meta['config']}` with `{meta['base_settings']}`; clustered rows "
         f"add `{' '.join(CLU)}`. " + rl.rerender(SCRIPT, ["results/sim-trajectory.csv", "results/sim-trajectory.meta.json"]) + "\n",
         "Every row is one `dcmoe simulate` trajectory of the steps given. *Events* are re-clustering events (all 58 MoE "
         "layers each); *overhead* is the events' seconds over the steady steps' seconds; bytes are summed over the "
         "trajectory and all 4096 GPUs.\n",
         "| run | interval | steps | events | experts moved | units migrated | steady step s | event s (host work / exchanges / migration) "
         "| overhead | re-clustering bytes inter / intra GB | migration GB | event inter-node B/step vs MoE exchange |",
         "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|"]
    for r in rows:
        ratio = g(r, "event_inter_bytes_per_step") / g(r, "moe_inter_bytes_per_step") if g(r, "moe_inter_bytes_per_step") else 0
        L.append(f"| {r['label']} | {int(g(r, 'interval')) or '-'} | {int(g(r, 'steps'))} | {int(g(r, 'events'))} | "
                 f"{g(r, 'experts_moved'):.0f} | {g(r, 'units_migrated'):.0f} | {g(r, 'steady_step_s'):.3f} | "
                 f"{g(r, 'event_s'):.1f} ({g(r, 'rc_compute_s'):.1f} / {g(r, 'rc_comm_s'):.2f} / {g(r, 'migration_s'):.2f}) | "
                 f"{g(r, 'overhead_pct'):.2f}% | {g(r, 'rc_inter_gb'):.2f} / {g(r, 'rc_intra_gb'):.2f} | {g(r, 'migration_gb'):.2f} | "
                 f"{g(r, 'event_inter_bytes_per_step') / 1e6:.1f} MB ({100 * ratio:.3f}% of "
                 f"{g(r, 'moe_inter_bytes_per_step') / 1e9:.1f} GB) |")
    s = meta["scale_1000"]
    ok = s["wall_s"] <= 300
    L += ["", "## Scale: a 1000-step trajectory\n",
          f"{s['settings']}: **{s['wall_s']:.1f} s** wall, {s['max_rss_mib']:.0f} MiB peak resident, {s['events']} "
          f"re-clustering events; goal <= 5 minutes: **{'met' if ok else 'not met'}**.\n", rl.notes("sim-trajectory")]
    return rl.write_md(out_dir, "sim-trajectory", "\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
