#!/usr/bin/python3
"""Run the drift experiment (experiments/drift.yaml: non-fiction, then fiction at step 400) and
write results/drift.{csv,meta.json,md}.

usage: /usr/bin/python3 experiments/run_drift.py [--jobs 2] [--only a,b] [--set k=v ...]
       /usr/bin/python3 experiments/run_drift.py --render-only [--out DIR]
Every variant runs with the seeds of run_recluster.py (paired); complete runs are not rerun (the runs and
the per-run summary are those of experiments/run_recluster.py). With --only (and --seeds) the runs trained
replace or add their rows of results/drift.csv, every other row is kept (run_recluster.merge_csv). --render-only rebuilds
results/drift.md from results/drift.{csv,meta.json} and the hand-written results/drift.notes.md."""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import resultslib as rl
import run_recluster as rr

NAME = "drift"
SCRIPT = "experiments/run_drift.py"
CONFIG = "experiments/drift.yaml"
SEEDS = rr.SEEDS
SWITCH = 400
# masters mode: the projection refreshed every step (results/recluster.md: every 50 steps is
# far worse than every 10; every step costs about 0.2 s per projection and layer pair, well under 2x the run)
PROJECT_INTERVAL = 1
MASTERS = ["clustering.mode=masters", f"clustering.project_interval={PROJECT_INTERVAL}"]
# name, --set list, static twin, what it is
VARIANTS = [
    ("standard", ["moe.kind=standard", "clustering.compress_at=0"], "", "standard MoE (shared init), no compression"),
    ("static", ["clustering.alpha=0"], "", "warm-up, learned compression at step 200 (co-activation partition, alpha 0, as the rows below), static"),
    ("dynamic", ["clustering.enabled=true", "clustering.mu_source=coact", "clustering.alpha=0"], "static",
     "as static, then re-clustering every 100 steps after the switch, proposed from the unconstrained co-activation "
     "(forced moves)"),
    ("verified", ["clustering.enabled=true", "clustering.mu_source=coact", "clustering.alpha=0", "clustering.verify=true",
                  "clustering.max_probe_increase=0"], "static", "as dynamic, each event kept only if the probe loss does not rise"),
    ("static-output", ["clustering.alpha=0", "clustering.svd_space=output"], "static",
     "as static with the compression's residual SVD in output space (weighted by each expert's warm-up inputs)"),
    ("masters-static", ["clustering.alpha=0"] + MASTERS, "static",
     "as static in masters mode (per-expert FP32 masters trained through their projection, refreshed every "
     + (f"{PROJECT_INTERVAL} steps" if PROJECT_INTERVAL > 1 else "step") + "), static"),
    ("masters-dynamic", ["clustering.enabled=true", "clustering.mu_source=coact", "clustering.alpha=0"] + MASTERS,
     "masters-static", "as masters-static, then re-clustering of the masters every 100 steps after the switch "
     "(proposals as dynamic; a move loses nothing, the next projection rebuilds the changed groups)"),
]
COLS = rr.COLS + ["ppl_at_switch", "ppl_after_100"]


def eval_at(h5, step):
    import h5py
    with h5py.File(h5, "r", swmr=True) as f:
        s = np.array(f["eval/ppl/step"])
        v = np.array(f["eval/ppl/value"])
    i = np.where(s == step)[0]
    return float(v[i[-1]]) if len(i) else float("nan")


def run_all(a):
    only = a.only.split(",") if a.only else None
    sets_of = {name: sets for name, sets, _, _ in VARIANTS}
    bad = [n for n in only or [] if n not in sets_of]
    if bad:
        sys.exit(f"--only {','.join(bad)}: no such variant (variants: {', '.join(sets_of)})")
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else SEEDS
    if seeds != SEEDS and not only:
        sys.exit("--seeds needs --only (a results file needs every seed)")
    # --only runs its variants in the order given; the table keeps VARIANTS' order
    jobs = [(name, sets_of[name], seed) for name in (only or sets_of) for seed in seeds]
    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        h5s = list(ex.map(lambda j: rr.run(a, *j, config=CONFIG, group=NAME), jobs))

    def summary(h5):
        r = rr.summarize(h5)
        r["ppl_at_switch"] = eval_at(h5, SWITCH)
        r["ppl_after_100"] = eval_at(h5, SWITCH + 100)
        return r
    if only:   # a partial run updates its rows of the results file
        rr.merge_csv(NAME, SCRIPT, COLS, [(name, seed, summary(h5)) for (name, _, seed), h5 in zip(jobs, h5s)])
        return
    lines = [",".join(["variant", "seed"] + COLS[2:])]
    for (name, _, seed), h5 in zip(jobs, h5s):
        r = summary(h5)
        lines.append(",".join([name, str(seed)] + [f"{r[k]:.6g}" for k in COLS[2:]]))
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "seeds": SEEDS, "switch_at": SWITCH})


def render(out_dir):
    meta, by, seeds, series = rr.load_table(NAME)

    lines = ["# Drift: non-fiction, then fiction; does dynamic re-clustering follow the shift?", "",
             f"Command: `{meta['command']}` (config `{CONFIG}`: the model of experiments/recluster.yaml, trained on the "
             f"Brown non-fiction genres a-j until step {meta['switch_at']} and on the fiction genres k-r after it; "
             "validation and test are fiction files only; the clustered rows are compressed at step 200 with the "
             f"learned partition from the co-activation (clustering.alpha 0); seeds {', '.join(map(str, seeds))} in every row "
             "unless the row says otherwise, mean ± sd; paired differences over the seeds both rows have). "
             + rr.updates_sentence(meta) + rl.rerender(SCRIPT, [f"results/{NAME}.csv", f"results/{NAME}.meta.json"]), "",
             f"| variant | fiction valid ppl at step {meta['switch_at']} (before the switch) | 100 steps after | final valid ppl | "
             "final test ppl | re-cluster events accepted / rolled back / layer-events | experts moved | refit err | probe Δloss | "
             "event s (compression, events, projections) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _, _, desc in VARIANTS:
        if name not in by:
            continue
        events, moved, refit, probe = rr.event_cells(lambda k: float(np.nanmean(series(name, k))))
        lines.append(f"| **{name}**: {desc}{rr.seeds_note(by, seeds, name)} | {rr.fmt_ms(series(name, 'ppl_at_switch'))} | "
                     f"{rr.fmt_ms(series(name, 'ppl_after_100'))} | {rr.fmt_ms(series(name, 'valid_ppl'))} | "
                     f"{rr.fmt_ms(series(name, 'test_ppl'))} | {events} | {moved} | {refit} | {probe} | "
                     f"{rr.fmt_ms(series(name, 'event_s'), 1)} |")
    lines += ["", "## Paired differences (valid perplexity on fiction, same seed)", "",
              "| variant | twin | Δ final valid ppl | Δ 100 steps after the switch | seeds better |", "|---|---|---:|---:|---:|"]
    for name, _, twin, _ in VARIANTS:
        if not twin or name not in by or twin not in by:
            continue
        cs = rr.common_seeds(by, seeds, name, twin)
        d = series(name, "valid_ppl", cs) - series(twin, "valid_ppl", cs)
        d1 = series(name, "ppl_after_100", cs) - series(twin, "ppl_after_100", cs)
        lines.append(f"| {name} | {twin} | {rr.fmt_ms(d)} | {rr.fmt_ms(d1)} | {int(np.sum(d < 0))}/{len(d)} |")
    lines += ["", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(lines))


def main():
    rr.study_main(run_all, render)


if __name__ == "__main__":
    main()
