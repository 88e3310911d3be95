#!/usr/bin/python3
"""This-machine check of `dcmoe simulate`: for the quickstart model (dense, standard, clustered) at
1 and 2 ranks. First one untimed run per MoE case records its routing (log.trace_interval=1;
training is deterministic, so the timed runs route the same). Then 3 times each: measure the
machine with `dcmoe bench calibrate CONFIG --model-only` (1 rank, or 2 under mpirun), predict
the step from that hardware file ONLY (no timing of a training run is used: the trace gives the
routing, nothing else), then train the case for a few steps with log.sync_wait (the wait for the
slowest rank timed apart from the transfers); compare the medians per step and per component
(forward and backward including their exchanges, the exchange and gradient-allreduce
transfers, the wait, the optimizer bucket). The machine is shared, so each prediction is
calibrated right before the run it predicts. Writes results/sim-machine.{csv,meta.json,md};
the hardware files and runs stay in runs/sim-machine/.

usage: /usr/bin/python3 experiments/run_sim_machine.py [--steps N] [--repeats R]
       /usr/bin/python3 experiments/run_sim_machine.py --render-only [--out DIR]
--render-only rebuilds results/sim-machine.md from results/sim-machine.{csv,meta.json} and the
hand-written results/sim-machine.notes.md (nothing is run; no h5py)."""
import argparse
import shutil
import csv
import os
import subprocess
import sys

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "sim-machine"
SCRIPT = "experiments/run_sim_machine.py"
CFG = "experiments/quickstart.yaml"
EXE = os.environ.get("DCMOE_EXE", os.path.join(ROOT, "build", "dcmoe"))
MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
OUT = os.path.join(ROOT, "runs", NAME)
VARIANTS = [("dense", "dense FFN (d_ff 512)", ["moe.kind=dense"]),
            ("standard", "standard MoE, 8 experts, top-2", ["moe.kind=standard"]),
            ("clustered", "clustered MoE, 4 groups of 2, rank 4", ["moe.kind=clustered", "moe.n_groups=4", "moe.rank=4"])]
RANKS = [1, 2]
COMPONENTS = ["step", "forward", "backward", "exchange", "allreduce", "wait", "optimizer"]
LABELS = {"step": "step", "forward": "forward (incl. its exchange)", "backward": "backward (incl. its exchange)",
          "exchange": "exchange transfer (dispatch + combine)", "allreduce": "gradient allreduce transfer",
          "wait": "wait for the slowest rank (before every collective of the step)",
          "optimizer": "optimizer bucket without its waits (loss and norm reductions, AdamW, bookkeeping)"}
TOL = {"step": 10.0}
COLS = ["variant", "ranks", "component", "measured_ms", "measured_spread", "predicted_ms", "predicted_spread", "delta_pct",
        "paired_pct"]


def hwfile(v, P, rep):
    return os.path.join(OUT, f"hw-{v}-{P}-{rep}.yaml")


def launch(P, args):
    return ([EXE] if P == 1 else MPI + ["-n", str(P), EXE]) + args


def calibrate(v, P, rep, sets):
    cmd = launch(P, ["bench", "calibrate", os.path.join(ROOT, CFG), "--model-only", "--out", hwfile(v, P, rep)] +
                 [x for s in sets + ["run.threads=1"] for x in ("--set", s)])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"calibrate failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    print(p.stdout.strip(), flush=True)


def common_sets(name, sets):
    return [x for s in sets + [f"run.name={name}", f"run.out_dir={OUT}", "run.threads=1"] for x in ("--set", s)]


def run_train(name, P, sets, steps, extra):
    """`dcmoe train` of the case for `steps` steps (no evaluation); its metrics.h5"""
    cmd = launch(P, ["train", os.path.join(ROOT, CFG), "--quiet"] +
                 common_sets(name, sets + [f"train.steps={steps}", "train.eval_interval=0", "train.eval_batches=1",
                                           f"log.flush_interval={steps}", extra]))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{name} failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return os.path.join(OUT, name, "metrics.h5")


def train(name, P, sets, steps):
    import h5py
    with h5py.File(run_train(name, P, sets, steps, "log.sync_wait=true"), "r") as f:
        steps_v = f["perf/step_s/step"][()]
        keep = steps_v > 5                      # the first steps fault pages in and grow buffers
        step = f["perf/step_s/value"][()][keep]
        split = f["perf/time_split/value"][()][f["perf/time_split/step"][()] > 5]
        ct = f["comm/summary/time_s/value"][()][f["comm/summary/time_s/step"][()] > 5]
        wt = f["comm/summary/wait_s/value"][()][f["comm/summary/wait_s/step"][()] > 5]
        wsp = f["perf/wait_split/value"][()][f["perf/wait_split/step"][()] > 5]   # the waits inside each split column
        cols = f["comm/summary/time_s"].attrs["columns"]
        cols = (cols.decode() if isinstance(cols, bytes) else cols).split(",")
    d, c, a = (cols.index(x) for x in ("dispatch", "combine", "allreduce"))
    return {"step": np.median(step), "forward": np.median(split[:, 0]), "backward": np.median(split[:, 1]),
            "exchange": np.median(ct[:, d] + ct[:, c]), "allreduce": np.median(ct[:, a]),
            "wait": np.median(wt.sum(axis=1)), "optimizer": np.median(split[:, 3] - wsp[:, 3])}


def trace_run(v, P, sets, steps):
    """the routing the measured runs will make (training is deterministic: same seed, same ranks,
    the same routing bit for bit), recorded by one untimed run; None for the dense model"""
    if "moe.kind=dense" in sets:
        return None
    return run_train(f"trace-{v}-{P}", P, sets, steps, "log.trace_interval=1")


def simulate(name, P, sets, hw, trace):
    import h5py
    tok = 16 // P * 64                          # quickstart: 16 sequences of 64 tokens per step
    route = (["sim.routing=trace", f"sim.trace={trace}"] if trace else
             [f"sim.tokens_per_rank={tok}", "sim.sample_tokens=0", "sim.samples=3", "sim.routing=uniform"])
    cmd = [EXE, "simulate", os.path.join(ROOT, CFG), "--quiet"] + common_sets(
        name, sets + [f"sim.hardware_file={hw}", "sim.hardware=cpu", "sim.nodes=1", f"sim.gpus_per_node={P}",
                      "parallel.ep_size=0", "sim.distinct_layers=2"] + route)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{name} failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    with h5py.File(os.path.join(OUT, name, "metrics.h5"), "r") as f:
        steps = f["perf/time_split/step"][()]
        keep = steps > 5 if trace else steps > 0    # a trace: the same steps as the measured median
        split = f["perf/time_split/value"][()][keep]
        tb = f["sim/time_breakdown/value"][()][keep]
        band = np.median(f["sim/step_band/value"][()][keep], axis=0)
        wt = f["comm/summary/wait_s/value"][()][keep]   # the waits, as log.sync_wait measures them
        imb = f["sim/imbalance_s/value"][()][keep]      # the part of wt[combine] the breakdown books in compute
    pred = {"step": tb[:, 7], "forward": split[:, 0], "backward": split[:, 1],
            "exchange": tb[:, 2] + tb[:, 3] - (wt[:, 1] + wt[:, 2] - imb[:, 0] - imb[:, 1]),
            "allreduce": tb[:, 4] - wt[:, 0], "wait": wt.sum(axis=1),
            "optimizer": split[:, 3] - wt[:, 4]}         # other: the loss reduction's wait, inside the bucket
    return {c: float(np.median(x)) for c, x in pred.items()}, band


def run_all(args):
    shutil.rmtree(OUT, ignore_errors=True)      # every file under it is this script's own output
    os.makedirs(OUT, exist_ok=True)
    load0 = os.getloadavg()
    pred, meas = {}, {}
    traces = {(v, P): trace_run(v, P, sets, args.steps) for v, _, sets in VARIANTS for P in RANKS}
    for rep in range(args.repeats):             # interleaved, so a change in the machine's load hits every case
        for v, _, sets in VARIANTS:
            for P in RANKS:
                calibrate(v, P, rep, sets)      # right before the run it predicts
                pr = simulate(f"sim-{v}-{P}-{rep}", P, sets, hwfile(v, P, rep), traces[(v, P)])
                m = train(f"train-{v}-{P}-{rep}", P, sets, args.steps)
                pred.setdefault((v, P), []).append(pr)
                meas.setdefault((v, P), []).append(m)
                print(f"{v:9s} P={P} run {rep}: step {1e3 * m['step']:.1f} ms (predicted {1e3 * pr[0]['step']:.1f})", flush=True)
    load1 = os.getloadavg()
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for v, _, _ in VARIANTS:
            for P in RANKS:
                for c in COMPONENTS:
                    xs = np.array([m[c] for m in meas[(v, P)]])
                    ps = np.array([pr[c] for pr, _ in pred[(v, P)]])
                    med, pmed = float(np.median(xs)), float(np.median(ps))
                    spread = float((xs.max() - xs.min()) / med) if med > 0 else 0.0
                    pspread = float((ps.max() - ps.min()) / pmed) if pmed > 0 else 0.0
                    delta = 100 * (pmed / med - 1) if med > 0 else float("nan")
                    # each prediction against the run it was calibrated right before
                    paired = " ".join(f"{100 * (p / m - 1):.1f}" for p, m in zip(ps, xs)) if med > 0 else ""
                    w.writerow([v, P, c, f"{1e3 * med:.4g}", f"{spread:.3f}", f"{1e3 * pmed:.4g}", f"{pspread:.3f}",
                                f"{delta:.1f}", paired])
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "config": CFG, "steps": args.steps,
                         "repeats": args.repeats, "loadavg_1min_start_end": [round(load0[0], 2), round(load1[0], 2)],
                         "cores": os.cpu_count()})


def render(out_dir):
    meta = rl.read_meta(NAME)
    with open(os.path.join(rl.RESULTS, NAME + ".csv")) as f:
        rows = list(csv.DictReader(f))
    labels = {v: l for v, l, _ in VARIANTS}
    L = ["# Simulator on this machine: predicted from calibration only vs measured\n",
         f"Command: `{meta['command']}` (`{meta['config']}`: d_model 128, 2 layers, seq 64, 16 sequences per step, "
         f"vocabulary 10000). For each case, {meta['repeats']} times: `dcmoe bench calibrate {meta['config']} --model-only` "
         "(the model's GEMM shapes, the trainer's ops, one collective size per octave; on 1 rank or under `mpirun -n 2`), "
         "then `dcmoe simulate` with that `sim.hardware_file` and the routing of the case (`sim.routing: trace`, "
         "recorded once by an untimed run with `log.trace_interval: 1`; the dense model has none), "
         f"then `dcmoe train` for {meta['steps']} steps with `log.sync_wait: true` (a timed barrier before every "
         "collective of the step: the wait for the slowest rank is measured apart from the transfers). Predicted and "
         f"measured: the median over steps 6..{meta['steps']} of each run; "
         f"the table gives the median over the {meta['repeats']} runs and over the {meta['repeats']} predictions; "
         "spread = (max - min) / median over the repeats; Δ% compares the two medians (the target's measure); "
         "paired Δ% gives each repeat's prediction against the run it was calibrated right before (the machine's "
         "speed drifts between repeats more than within a pair). "
         + rl.rerender(SCRIPT, [f"results/{NAME}.csv", f"results/{NAME}.meta.json"]) + "\n",
         f"Targets: step within ±10%, each component within ±20%. The machine had {meta['cores']} cores and a 1-minute "
         f"load average of {meta['loadavg_1min_start_end'][0]} at the start and {meta['loadavg_1min_start_end'][1]} at "
         "the end of the run (" + ("other jobs shared it" if max(meta["loadavg_1min_start_end"]) > float(meta["cores"])
                                   else "no more than its own runs: nothing else shared the cores") + ").\n",
         "| model | ranks | component | measured ms | spread | predicted ms | spread | Δ% | target | paired Δ% per repeat |",
         "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    n_ok = n_all = s_ok = s_all = 0
    for r in rows:
        c, d = r["component"], float(r["delta_pct"])
        tol = TOL.get(c, 20.0)
        meas = float(r["measured_ms"])
        small = c in ("exchange", "allreduce", "wait") and meas < 0.05 or d != d
        ok = abs(d) <= tol
        if c == "step":
            s_all += 1
            s_ok += ok
        elif not small:
            n_all += 1
            n_ok += ok
        verdict = "n/a (below 0.05 ms)" if small else ("met" if ok else "not met")
        L.append(f"| {labels[r['variant']]} | {r['ranks']} | {LABELS[c]} | {meas:.3g} | {100 * float(r['measured_spread']):.0f}% | "
                 f"{float(r['predicted_ms']):.3g} | {100 * float(r['predicted_spread']):.0f}% | {'-' if small else f'{d:+.1f}%'} | "
                 f"{verdict}{'' if small else f' (±{tol:.0f}%)'} | "
                 f"{'-' if small or not r.get('paired_pct') else ', '.join(f'{float(x):+.1f}' for x in r['paired_pct'].split())} |")
    L += ["", f"Step time within ±10%: {s_ok} of {s_all} cases. Components within ±20% (those above 0.05 ms): "
          f"{n_ok} of {n_all}.", "", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
