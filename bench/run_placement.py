#!/usr/bin/python3
"""Topology placement at scale: Kernighan-Lin (the hand-written partitioner), METIS and AUTO
(what the trainer uses: both up to PLACEMENT_KL_MAX units a level, the better kept; METIS above)
on synthetic co-selection affinities with planted clusters (one cluster per node), for U units
in two series: 8 ranks a node with one unit a rank (U / 8 nodes; U = 1024 is the issue's 1024
units on 128 nodes), and 4 ranks a node with 8 units a rank (U / 32 nodes). Runs
build/bench/bench_placement once per (shape, method, seed), writes results/bench-placement.csv
and .meta.json, then renders results/bench-placement.md from them and the hand-written
results/bench-placement.notes.md.

usage: /usr/bin/python3 bench/run_placement.py [--seeds 3] [--kl-max 1024] [--build build]
       /usr/bin/python3 bench/run_placement.py --render-only [--out DIR]
--kl-max: the largest U Kernighan-Lin is run at (it is O(U^3) a pass); --render-only runs
nothing; --out DIR writes the .md to DIR."""
import argparse
import csv
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import resultslib as rl  # noqa: E402

ROOT = rl.ROOT
NAME = "bench-placement"
SCRIPT = "bench/run_placement.py"
METHODS = ["kl", "metis", "auto"]
SERIES = [("8 ranks a node, 1 unit a rank", 8, 1, [32, 128, 512, 1024, 4096]),
          ("4 ranks a node, 8 units a rank", 4, 8, [128, 512, 1024, 4096])]
GOAL_S = 1.0     # issue 11: 1024 units on 128 nodes in under a second


def shapes():
    for title, rpn, per, units in SERIES:
        for u in units:
            yield title, u, u // (rpn * per), rpn


def run_all(a):
    exe = os.path.join(a.build, "bench", "bench_placement")
    rows, header = [], None
    for _, u, n, rpn in shapes():
        for m in METHODS:
            if m == "kl" and u > a.kl_max:
                continue
            for seed in range(1, a.seeds + 1):
                cmd = [exe, "--units", str(u), "--nodes", str(n), "--rpn", str(rpn), "--method", m,
                       "--seed", str(seed), "--header"]
                print("running:", " ".join(cmd[1:-1]), flush=True)
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout.splitlines()
                header = out[0]
                rows.append(out[1])
                print("   ", out[1], flush=True)
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w") as f:
        f.write(header + "\n" + "\n".join(rows) + "\n")
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "seeds": a.seeds, "kl_max": a.kl_max,
                         "build": os.path.relpath(a.build, ROOT), "cpus": os.cpu_count(),
                         "loadavg_at_end": round(os.getloadavg()[0], 2)})


def load():
    with open(os.path.join(rl.RESULTS, NAME + ".csv")) as f:
        return list(csv.DictReader(f))


def mean(xs):
    return sum(xs) / len(xs)


def agg(rows, u, n, rpn, m):
    rs = [r for r in rows if int(r["units"]) == u and int(r["nodes"]) == n and int(r["rpn"]) == rpn and r["method"] == m]
    if not rs:
        return None
    f = lambda k: mean([float(r[k]) for r in rs])   # noqa: E731
    return {"n": len(rs), "cpu": f("cpu_s"), "wall": f("wall_s"), "cut": f("cut_node"), "rcut": f("cut_rank"),
            "planted": f("planted_node"), "contig": f("contig_node"), "maxvio": f("maxvio"),
            "cmaxvio": f("contig_maxvio"), "valid": all(r["valid"] == "1" for r in rs)}


def render(out_dir):
    meta = rl.read_meta(NAME)
    rows = load()
    L = ["# Topology placement at scale: Kernighan-Lin vs METIS (microbenchmark)", "",
         f"Command: `{meta['command']}` (from the repository root, with `build/bench/bench_placement` built by meson; "
         f"{meta['seeds']} seeds a shape, means shown; Kernighan-Lin run up to U = {meta['kl_max']}; "
         f"{meta['cpus']} CPUs, load average {meta['loadavg_at_end']} at the end of the run).", "",
         rl.rerender(SCRIPT, ["results/bench-placement.csv", "results/bench-placement.meta.json"]), "",
         "Affinity: one planted cluster per node (10 + U(0,1) inside, neighbouring cluster pairs 2 + U(0,1) at "
         "density 1/2, 16 random noise partners a unit at U(0,2)), unit loads exp(0.5 z), the trainer's default "
         "load cap `parallel.max_imbalance` 0.25 and 8 refinement passes. *cpu s* is the process CPU time of one "
         "placement call (the machine is shared, so wall time is also shown); *cut* is the inter-node co-selection "
         "weight (the objective), */planted* the cut over the planted clusters' (which ignore the load cap, so "
         "below 1 is impossible and above 1 is partly the price of the cap), *rank cut* the inter-rank weight, "
         "*MaxVio* the heaviest rank's load over the mean - 1 (with one unit a rank it is fixed by the units).", ""]
    for title, rpn, per, units in SERIES:
        L += [f"## {title}", "",
              "| U | nodes x ranks | method | cpu s | wall s | cut | /planted | /contiguous | rank cut | MaxVio | valid |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for u in units:
            n = u // (rpn * per)
            for m in METHODS:
                s = agg(rows, u, n, rpn, m)
                if s is None:
                    L.append(f"| {u} | {n} x {rpn} | {m} | not run (O(U^3)) | | | | | | | |")
                    continue
                L.append(f"| {u} | {n} x {rpn} | {m} | {s['cpu']:.3f} | {s['wall']:.3f} | {s['cut']:.0f} | "
                         f"{s['cut'] / s['planted']:.4f} | {s['cut'] / s['contig']:.3f} | {s['rcut']:.0f} | "
                         f"{s['maxvio']:.3f} | {'yes' if s['valid'] else 'NO'} |")
        L.append("")
    goal = agg(rows, 1024, 128, 8, "auto")
    kl = agg(rows, 1024, 128, 8, "kl")
    if goal:
        line = (f"Goal (issue 11): 1024 units on 128 nodes x 8 ranks in under {GOAL_S:.0f} s: AUTO takes "
                f"{goal['cpu']:.3f} s CPU ({goal['wall']:.3f} s wall) — "
                + ("**met**" if goal["cpu"] < GOAL_S else "**not met**"))
        if kl:
            d = 100 * (goal["cut"] / kl["cut"] - 1)
            line += (f"; its cut is {abs(d):.2f}% {'above' if d > 0 else 'below'} Kernighan-Lin's "
                     f"({kl['cpu']:.3f} s CPU)")
        L += [line + ".", ""]
    L.append(rl.notes(NAME))
    return rl.write_md(out_dir, NAME, "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kl-max", type=int, default=1024)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
