"""analysis/dcmoe_logs.py and analysis/report on fixture logs made here by tiny runs:
  - the tidy tables (series, scalars, expert load, re-clustering events and their follow-ups,
    summary) hold exactly the HDF5 values, and so does scalars.csv read back;
  - analysis/report writes report.md, report.html (PNGs inlined), the CSV tables and non-trivial PNGs;
  - it works on a live run (SWMR read while training) and on a run killed with SIGKILL;
  - simulated runs are listed beside trained ones and paired with the run they predict (by the
    trace or aggregate they read, or by name): predicted vs measured holds exactly the logged
    numbers at the replayed steps, and a trace replay predicts every byte per step (Δ = 0%)."""
import csv
import re
import glob
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testlib as T  # noqa: E402

sys.path.insert(0, os.path.join(T.SRC, "analysis"))
import h5py  # noqa: E402
import numpy as np  # noqa: E402

import dcmoe_logs as dl  # noqa: E402

REPORT = os.path.join(T.SRC, "analysis", "report")
CLUSTERED = """moe:
  kind: clustered
  n_experts: 8
  n_groups: 2
  top_k: 2
  d_ff_expert: 32
  rank: 4
clustering:
  interval: 4
  warmup: 2
  min_gain: 0.0
"""


def h5_series(path):
    out = {}
    with h5py.File(path, "r", swmr=True) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "step" in obj and "value" in obj:
                out[name] = (obj["step"][...], obj["value"][...])
        f.visititems(visit)
    return out


def png_ok(path):
    import matplotlib.image as mpimg
    if not os.path.exists(path) or os.path.getsize(path) < 8000:
        return False
    img = mpimg.imread(path)
    return img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and float(img[..., :3].std()) > 0.02


def report(path, out):
    return subprocess.run([sys.executable, REPORT, path, "-o", out], capture_output=True, text=True, timeout=300)


def simulated_beside_trained(tmp):
    """a 2-rank run (2 virtual nodes x 1) trained with routing traces, `dcmoe simulate` of its
    trace on the same topology (paired by provenance), an aggregate simulation at 4 GPUs (paired,
    not comparable), and a copy named <trained>_sim (paired by name)"""
    import shutil
    d = os.path.join(tmp, "pv")
    cfg = T.tiny_config(os.path.join(tmp, "pv.yaml"), d, "pv")
    virt = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=1"]
    T.run(["train", cfg, "--quiet", "--set", "log.trace_interval=2", "--set", "log.sync_wait=true"] + virt, ranks=2)
    th = os.path.join(d, "pv", "metrics.h5")
    with h5py.File(th, "r", swmr=True) as f:
        vocab = int(f.attrs["vocab_size"])
    sim = ["simulate", cfg, "--quiet", "--set", "sim.hardware=cpu"]
    p1 = T.run_plain(sim + ["--set", "run.name=pv-sim", "--set", "sim.routing=trace", "--set", f"sim.trace={th}",
                            "--set", "sim.nodes=2", "--set", "sim.gpus_per_node=1", "--set", f"data.vocab_max={vocab}"])
    p2 = T.run_plain(sim + ["--set", "run.name=pv-agg4", "--set", "sim.routing=aggregate", "--set", f"sim.aggregate={th}",
                            "--set", "sim.nodes=2", "--set", "sim.gpus_per_node=2", "--set", "sim.tokens_per_rank=64"])
    if not T.check(p1.returncode == 0 and p2.returncode == 0, f"simulations of the traced run exit 0 ({p1.stderr[-200:]}"
                                                              f"{p2.stderr[-200:]})"):
        return
    os.makedirs(os.path.join(d, "pv_sim"))
    shutil.copy(os.path.join(d, "pv-sim", "metrics.h5"), os.path.join(d, "pv_sim", "metrics.h5"))
    with h5py.File(os.path.join(d, "pv_sim", "metrics.h5"), "a") as f:
        f.attrs["routing_source"] = "uniform"
    runs = dl.load(d)
    pairs = sorted((s.name, t.name, rule) for s, t, rule in dl.pair_runs(runs))
    T.check(pairs == [("pv-agg4", "pv", "aggregate"), ("pv-sim", "pv", "trace"), ("pv_sim", "pv", "name")],
            f"simulated runs pair with the trained run by trace, aggregate and name ({pairs})")

    out = os.path.join(tmp, "rep-pv")
    p = report(d, out)
    T.check(p.returncode == 0, f"report on trained + simulated runs exits 0 ({p.stderr.strip()[-300:]})")
    for f in ("predicted_vs_measured.png", "simulated.png"):
        T.check(png_ok(os.path.join(out, f)), f"{f} is a non-trivial image")
    md = open(os.path.join(out, "report.md")).read() if p.returncode == 0 else ""
    T.check("## Predicted vs measured" in md and "| pv-sim | pv | trace |" in md and "| pv_sim | pv | name |" in md
            and "pv-agg4 ↔ pv (aggregate): not compared, 4 simulated GPUs vs 2 trained ranks" in md,
            "report.md: a predicted-vs-measured table for both comparable pairs; the 4-GPU one is listed as not compared")
    T.check(re.search(r"\| pv-sim \| simulate \| done \|", md) is not None and re.search(r"\| pv \| train \| done \|", md)
            is not None, "the runs table lists the simulated runs beside the trained one (mode column)")
    rows = [r for r in csv.DictReader(open(os.path.join(out, "predicted_vs_measured.csv"))) if r["simulated"] == "pv-sim"] \
        if os.path.exists(os.path.join(out, "predicted_vs_measured.csv")) else []
    q = {r["quantity"]: r for r in rows}
    # independent: the trained run's numbers at the recorded steps, straight from the HDF5 logs
    ts, _ = T.series(th, "trace/routing")
    hs = h5_series(th)
    sh = h5_series(os.path.join(d, "pv-sim", "metrics.h5"))
    idx = np.searchsorted(hs["perf/step_s"][0], ts)
    split, tsec = hs["perf/time_split"][1][idx], hs["comm/summary/time_s"][1][idx]
    wsec = hs["comm/summary/wait_s"][1][idx]          # log.sync_wait: the waits apart from the transfers
    exch = tsec[:, 1] + tsec[:, 2] + wsec[:, 1] + wsec[:, 2]
    want = {"step time": np.median(hs["perf/step_s"][1][idx]),
            "compute": np.median(np.maximum(split[:, 0] + split[:, 1] - exch, 0)),
            "exposed communication": np.median(split[:, 2] + exch),
            "optimizer": np.median(split[:, 3]),
            "wait for the slowest rank": np.median(wsec.sum(axis=1)),
            "inter-node bytes/step: total": hs["comm/summary/inter_bytes"][1][idx].sum(axis=1).mean(),
            "inter-node bytes/step: dispatch": hs["comm/summary/inter_bytes"][1][idx][:, 1].mean()}
    got_ok = all(k in q and float(q[k]["measured"]) == float(v) for k, v in want.items())
    T.check(got_ok, "measured = the trained log at the replayed steps (step, compute, exposed comm, optimizer, bytes): "
            + ", ".join(f"{k} {q[k]['measured'] if k in q else '?'} vs {v}" for k, v in want.items()))
    tb = sh["sim/time_breakdown"][1]
    T.check("step time" in q and float(q["step time"]["predicted"]) == float(np.median(tb[:, 7]))
            and float(q["exposed communication"]["predicted"]) == float(np.median(tb[:, 6])),
            "predicted = the simulated log's sim/time_breakdown medians")
    byte_rows = [r for k, r in q.items() if r["unit"] == "B"]
    T.check(len(byte_rows) == 10 and float(q["inter-node bytes/step: total"]["measured"]) > 0
            and all(float(r["delta_pct"]) == 0.0 for r in byte_rows),
            f"the trace replay predicts every intra/inter-node byte per step exactly: Δ = 0% in {len(byte_rows)} rows")
    T.check(all(np.isfinite(float(q[k]["delta_pct"])) for k in ("step time", "compute", "optimizer")),
            "time rows carry a finite Δ%: " + ", ".join(f"{k} {float(q[k]['delta_pct']):+.1f}%" for k in
                                                     ("step time", "compute", "exposed communication", "optimizer") if k in q))
    # a folder holding only the simulated run: the trained log it names is read from its path
    alone = os.path.join(tmp, "pv-alone")
    shutil.copytree(os.path.join(d, "pv-sim"), os.path.join(alone, "pv-sim"))
    p = report(alone, os.path.join(tmp, "rep-alone"))
    T.check(p.returncode == 0 and png_ok(os.path.join(tmp, "rep-alone", "predicted_vs_measured.png")),
            f"a simulated run alone is compared with the trained log its trace came from ({p.stderr.strip()[-200:]})")
    p = subprocess.run([sys.executable, REPORT, d, "-o", os.path.join(tmp, "rep-bad"), "--pair", "pv-agg4=nosuch"],
                       capture_output=True, text=True, timeout=120)
    T.check(p.returncode == 2 and "nosuch" in p.stderr, f"--pair naming no trained run is an error ({p.stderr.strip()[-200:]})")


def main():
    tmp = T.tmpdir("dcmoe-analysis-")
    runs = os.path.join(tmp, "runs")
    # fixture logs: a clustered run on 2 ranks (re-clustering events, group loads) and a standard one
    cfg = T.tiny_config(os.path.join(tmp, "c.yaml"), runs, "clus", extra="")
    text = open(cfg).read()
    text = text[:text.index("moe:")] + CLUSTERED + text[text.index("train:"):]
    open(cfg, "w").write(text)
    T.run(["train", cfg, "--quiet"], ranks=2)
    T.run(["train", T.tiny_config(os.path.join(tmp, "s.yaml"), runs, "std"), "--quiet"], ranks=1)
    loaded = dl.load(runs)
    T.check([r.name for r in loaded] == ["clus", "std"], f"a folder of runs loads both ({[r.name for r in loaded]})")

    # tables equal the HDF5 values exactly
    sc = dl.scalars_table(loaded)
    n_checked, bad = 0, []
    for r in loaded:
        for name, (s, v) in h5_series(os.path.join(r.dir, "metrics.h5")).items():
            if int(np.prod(v.shape[1:], dtype=np.int64)) > 16 or len(s) == 0:
                continue
            m = (sc["run"] == r.name) & (sc["metric"] == name)
            k = int(np.prod(v.shape[1:], dtype=np.int64))
            if not (np.array_equal(sc["step"][m], np.repeat(s, k)) and
                    np.array_equal(sc["value"][m].astype(v.dtype), v.reshape(-1), equal_nan=True)):
                bad.append(f"{r.name}:{name}")
            n_checked += 1
    T.check(n_checked >= 20 and not bad, f"scalars table == HDF5 for {n_checked} series (mismatches: {bad})")
    c = next(r for r in loaded if r.name == "clus")
    h = h5_series(os.path.join(c.dir, "metrics.h5"))
    el = dl.expert_load_table([c])
    s, v = h["moe/tokens_per_expert"]
    T.check(np.array_equal(el["tokens"], v.reshape(-1)) and np.array_equal(el["step"], np.repeat(s, v.shape[1] * v.shape[2]))
            and list(el["expert"][:8]) == list(range(8)), "expert load table == moe/tokens_per_expert")
    ev = dl.events_table([c])
    s, v = h["cluster/events"]
    T.check(len(s) >= 2, f"the fixture has re-clustering events ({len(s)})")
    cols = [x for x in ev if x not in ("run", "step")]
    T.check(len(cols) == 19 and np.array_equal(np.stack([ev[x] for x in cols], 1), v.reshape(-1, 19), equal_nan=True),
            "events table == cluster/events (19 named columns)")
    ft = dl.followup_table([c])
    s_f, v_f = h["cluster/event_followup"]
    T.check(list(ft)[2:] == ["event_step", "kind", "probe_loss_before", "probe_loss_after", "probe_loss_25",
                             "probe_loss_50"] and np.array_equal(ft["step"], s_f)
            and np.array_equal(np.stack([ft[x] for x in list(ft)[2:]], 1), v_f, equal_nan=True)
            and list(ft["event_step"]) == list(s),
            "followup table == cluster/event_followup (one row per event, 6 named columns)")
    lt = dl.series_table([c], "moe/balance/cv2")
    T.check(list(lt["index"][:2]) == ["layer0", "layer1"], f"per-layer rows are labelled by layer ({list(lt['index'][:2])})")
    summ = dl.summary_table(loaded)
    T.check(summ["final_train_loss"][0] == float(h["train/loss"][1][-1]) and summ["state"][0] == "done",
            "summary: final train loss == last train/loss, state done")

    # the report
    out = os.path.join(tmp, "rep")
    t0 = time.time()
    p = report(runs, out)
    print(f"# report on 2 runs: {time.time() - t0:.1f} s", flush=True)
    T.check(p.returncode == 0, f"analysis/report exits 0 ({p.stderr.strip()[-500:]})")
    for f in ("report.md", "report.html", "summary.csv", "scalars.csv", "expert_load.csv", "recluster_events.csv",
              "event_followup.csv"):
        T.check(os.path.exists(os.path.join(out, f)) and os.path.getsize(os.path.join(out, f)) > 100, f"{f} written")
    for f in ("loss.png", "load_cv2.png", "expert_load.png", "throughput.png", "recluster.png", "comm.png", "memory.png"):
        T.check(png_ok(os.path.join(out, f)), f"{f} is a non-trivial image")
    html = open(os.path.join(out, "report.html")).read()
    T.check(html.count("data:image/png;base64,") >= 7 and "<table>" in html and "clus" in html,
            "report.html inlines every PNG and holds the runs table")
    rows = list(csv.DictReader(open(os.path.join(out, "scalars.csv"))))
    s, v = h["train/loss"]
    got = [float(r["value"]) for r in rows if r["run"] == "clus" and r["metric"] == "train/loss"]
    T.check(got == [float(x) for x in v], "scalars.csv read back == train/loss exactly")

    # series another module may add (/comm per-phase bytes, /mem, /offload) are tabled and plotted
    # generically when present
    import shutil
    extra_dir = os.path.join(tmp, "extra", "withcomm")
    os.makedirs(extra_dir)
    shutil.copy(os.path.join(runs, "clus", "metrics.h5"), os.path.join(extra_dir, "metrics.h5"))
    open(os.path.join(extra_dir, "DONE"), "w").write("steps 12\n")
    steps = np.arange(1, 13, dtype=np.int64)
    added = {"comm/fixture/bytes_intra_inter": np.arange(24, dtype=np.float64).reshape(12, 2) * 1e6,
             "mem/fixture_resident_bytes": np.linspace(1e6, 2e6, 12),
             "offload/groups_offloaded": np.arange(12, dtype=np.float64).reshape(12, 1) % 3,
             "mem/fixture_bytes": np.arange(12 * 2 * 9, dtype=np.float64).reshape(12, 2, 9) * 1e5}
    with h5py.File(os.path.join(extra_dir, "metrics.h5"), "a") as f:
        for name, val in added.items():
            g = f.create_group(name)
            g.create_dataset("step", data=steps)
            g.create_dataset("value", data=val)
        f["comm/fixture/bytes_intra_inter"].attrs["columns"] = "intra,inter"
        f["mem/fixture_bytes"].attrs["axes"] = "rank, kind (a,b,c,d,e,f,g,h,i): bytes per rank and kind"
    ex = dl.load(os.path.join(tmp, "extra"))
    st = dl.scalars_table(ex)
    for name, val in added.items():
        t = dl.series_table(ex, name)
        T.check(np.array_equal(t["value"], val.reshape(-1)), f"{name}: table == the added HDF5 values")
        if val[0].size <= 16:
            m = st["metric"] == name
            T.check(np.array_equal(st["value"][m], val.reshape(-1)), f"{name}: scalars table == the added values")
    m = st["metric"] == "comm/fixture/bytes_intra_inter"
    T.check(list(st["index"][m][:2]) == ["intra", "inter"], "named columns label the rows (intra, inter)")
    p = report(os.path.join(tmp, "extra"), os.path.join(tmp, "rep-extra"))
    md = open(os.path.join(tmp, "rep-extra", "report.md")).read() if p.returncode == 0 else ""
    T.check(p.returncode == 0 and all(f"`{n}`" in md for n in added) and
            png_ok(os.path.join(tmp, "rep-extra", "comm.png")) and png_ok(os.path.join(tmp, "rep-extra", "memory.png")),
            f"report plots the added /comm, /mem and /offload series ({p.stderr.strip()[-300:]})")
    T.check("/comm series" not in md.split("## Not plotted")[-1] if "## Not plotted" in md else True,
            "comm is not listed as skipped")

    simulated_beside_trained(tmp)

    # a live run, read while it trains; then killed with SIGKILL
    lng = T.tiny_config(os.path.join(tmp, "live.yaml"), runs, "live")
    text = open(lng).read().replace("steps: 12", "steps: 200000").replace("flush_interval: 4", "flush_interval: 20")
    open(lng, "w").write(text.replace("eval_interval: 6", "eval_interval: 100000"))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(["mpirun", "--allow-run-as-root", "-n", "1", T.EXE, "train", lng, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    live_dir = os.path.join(runs, "live")
    try:
        t0 = time.time()
        n = 0
        while time.time() - t0 < 60 and n < 200:
            time.sleep(0.3)
            try:
                n = len(dl.Run(live_dir).series.get("train/loss", ([], []))[0])
            except Exception:  # noqa: BLE001 - not created yet
                n = 0
        p = report(live_dir, os.path.join(tmp, "rep-live"))
        T.check(proc.poll() is None, "the live run was still training while the report read it")
        T.check(p.returncode == 0 and png_ok(os.path.join(tmp, "rep-live", "loss.png")),
                f"report on a live run ({n}+ steps logged) ({p.stderr.strip()[-300:]})")
    finally:
        for pid in [int(x) for x in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]:
            os.kill(pid, signal.SIGKILL)   # the trainer rank(s) that this test's mpirun started
        proc.kill()
        proc.wait()
    time.sleep(0.5)
    p = report(live_dir, os.path.join(tmp, "rep-killed"))
    md = open(os.path.join(tmp, "rep-killed", "report.md")).read() if p.returncode == 0 else ""
    T.check(p.returncode == 0 and "incomplete" in md and png_ok(os.path.join(tmp, "rep-killed", "loss.png")),
            f"report on a killed run says it is incomplete ({p.stderr.strip()[-300:]})")
    k = dl.Run(live_dir)
    T.check(k.has("train/loss") and len(k.series["train/loss"][0]) >= n, "the killed run's flushed rows are read")
    print("# files:", " ".join(os.path.basename(x) for x in sorted(glob.glob(os.path.join(out, "*")))), flush=True)
    T.finish()


if __name__ == "__main__":
    main()
