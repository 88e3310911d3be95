"""dcmoe_logs: load dcmoe HDF5 logs (one run, a sweep folder, or a folder of runs) into tidy
tables — plain dicts of equal-length numpy arrays (no pandas needed; `pandas.DataFrame(table)`
works when pandas is there) — and write them as CSV.

    import sys; sys.path.insert(0, "analysis")
    import dcmoe_logs as dl
    runs = dl.load("runs/sweep-sweep-clusters")         # a sweep folder, a run folder, or a folder of runs
    summary = dl.summary_table(runs)                    # one row per run: settings + final numbers
    loss = dl.series_table(runs, "train/loss")          # run, step, index, value (long / tidy)
    load = dl.expert_load_table(runs)                   # run, step, layer, expert, tokens
    events = dl.events_table(runs)                      # run, step, the cluster/events columns (per layer)
    follow = dl.followup_table(runs)                    # run, step, event_step, kind, probe losses +25/+50
    dl.write_csv(summary, "summary.csv")
    pairs = dl.pair_runs(runs)                          # (simulated, trained, rule): predicted vs measured
    pvm = dl.predicted_vs_measured_table(pairs)         # pair, quantity, predicted, measured, delta_pct

A log is read with SWMR (a live run) and falls back to a plain read (a killed non-SWMR run);
step and value datasets are cut to their common length, so a run being written is consistent.
Values are the HDF5 values, unchanged (float64 CSV cells are written with 17 significant digits).
Does not: plot (analysis/report does) or write HDF5.
"""
import csv
import os
import re

import h5py
import numpy as np

__all__ = ["Run", "load", "load_run", "load_sweep", "series_table", "scalars_table", "expert_load_table",
           "events_table", "followup_table", "compress_table", "summary_table", "write_csv", "parse_config", "read_plan",
           "pair_runs", "compare_pair", "predicted_vs_measured_table", "simulated_table", "PHASES"]


def parse_config(text):
    """the resolved YAML that dcmoe stores (two levels: `section:` then `  key: value`) -> {"a.b": "v"}"""
    out, section = {}, ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):\s*(.*?)\s*$", line)
        if not m:
            continue
        indent, key, val = m.groups()
        if not indent:
            section = key
            if val:
                out[key] = val.strip('"')
        else:
            out[f"{section}.{key}"] = val.strip('"')
    return out


def read_plan(sweep_dir):
    """plan.tsv of a sweep folder -> list of dicts (index, id, name, ranks, config, run_dir, settings)"""
    rows = []
    with open(os.path.join(sweep_dir, "plan.tsv")) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            if line.strip():
                rows.append(dict(zip(header, line.rstrip("\n").split("\t"))))
    return rows


def _open(path):
    try:
        return h5py.File(path, "r", swmr=True)
    except OSError:
        try:
            return h5py.File(path, "r")
        except OSError as e:
            raise OSError(f"{path}: cannot open ({e}); a file killed while open without SWMR may need "
                          f"`h5clear -s {path}`") from e


class Run:
    """one run's log in memory: series[name] = (step [n] int64, value [n, ...]); attrs; config"""

    def __init__(self, run_dir, name=None, settings=None, plan=None):
        self.dir = run_dir
        self.name = name or os.path.basename(os.path.normpath(run_dir))
        self.settings = dict(settings or {})     # swept key -> value (as written in the sweep)
        self.plan = plan or {}
        self.series, self.dataset_attrs, self.arrays = {}, {}, {}
        self.attrs, self.config = {}, {}
        self.path = os.path.join(run_dir, "metrics.h5")
        self.error = None
        if not os.path.exists(self.path):
            self.error = "no metrics.h5 (not started)"
            return
        try:
            self._read()
        except OSError as e:
            self.error = str(e)

    def _read(self):
        with _open(self.path) as f:
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            self.config = parse_config(str(self.attrs.get("config", "")))

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and "step" in obj and "value" in obj:
                    s, v = obj["step"], obj["value"]
                    for d in (s, v):
                        if hasattr(d, "refresh"):
                            try:
                                d.refresh()
                            except Exception:  # noqa: BLE001 - not in SWMR mode
                                pass
                    n = min(s.shape[0], v.shape[0])
                    self.series[name] = (np.array(s[:n]), np.array(v[:n]))
                    self.dataset_attrs[name] = {k: (a.decode() if isinstance(a, bytes) else a)
                                                for k, a in obj.attrs.items()}
                elif isinstance(obj, h5py.Dataset) and not name.endswith(("/step", "/value")):
                    self.arrays[name] = np.array(obj[...])
                    self.dataset_attrs[name] = {k: (a.decode() if isinstance(a, bytes) else a)
                                                for k, a in obj.attrs.items()}
                if isinstance(obj, h5py.Group) and len(obj.attrs) and name not in self.dataset_attrs:
                    self.dataset_attrs[name] = {k: (a.decode() if isinstance(a, bytes) else a)
                                                for k, a in obj.attrs.items()}
            f.visititems(visit)

    # ---- facts ----
    def has(self, name):
        return name in self.series and len(self.series[name][0]) > 0

    @property
    def mode(self):
        """"simulate" for a `dcmoe simulate` log (root attribute mode), else "train" """
        return "simulate" if str(self.attrs.get("mode", "")) == "simulate" else "train"

    @property
    def is_sim(self):
        return self.mode == "simulate"

    def steps_planned(self):
        key = "sim.steps" if self.is_sim else "train.steps"
        try:
            return int(self.config.get(key, "0"))
        except ValueError:
            return 0

    def last_step(self):
        name = "perf/step_s" if self.is_sim else "train/loss"
        return int(self.series[name][0][-1]) if self.has(name) else 0

    def routing_file(self):
        """(kind, path) of a simulated run made from a trained run's log (root attribute
        routing_source "trace PATH" or "aggregate PATH (...)"), else (None, None)"""
        src = str(self.attrs.get("routing_source", ""))
        if src.startswith("trace "):
            return "trace", src[len("trace "):].strip()
        if src.startswith("aggregate "):
            return "aggregate", src[len("aggregate "):].split(" (moe/tokens_per_expert")[0].strip()
        return None, None

    @property
    def state(self):
        if self.error:
            return "missing" if "not started" in self.error else "unreadable"
        if os.path.exists(os.path.join(self.dir, "DONE")):
            return "done"
        return f"incomplete ({self.last_step()}/{self.steps_planned()} steps)"

    def moe_layers(self):
        txt = self.dataset_attrs.get("moe", {}).get("layers", "")
        return [int(x) for x in str(txt).split(",") if x.strip() != ""]

    def clustered_layers(self):
        """layer ids of the clustered layers (rows of moe/tokens_per_group and cluster/*)"""
        return self.moe_layers() if self.config.get("moe.kind") == "clustered" else []

    def column_labels(self, name):
        """labels of the row elements of a series (layers, ranks, named columns) or None"""
        a = self.dataset_attrs.get(name, {})
        cols = a.get("columns")
        if cols:
            return _split_columns(str(cols))
        v = self.series[name][1]
        if v.ndim == 2:
            if name.startswith("moe/balance/") and len(self.moe_layers()) == v.shape[1]:
                return [f"layer{l}" for l in self.moe_layers()]
            if name.startswith("moe/balance_group/"):
                cl = self.moe_layers() if self.config.get("moe.kind") == "clustered" else []
                if len(cl) == v.shape[1]:
                    return [f"layer{l}" for l in cl]
            if name.startswith("perf/rank_"):
                return [f"rank{r}" for r in range(v.shape[1])]
        return None

    def label(self):
        if self.settings:
            return " ".join(f"{k.split('.')[-1]}={v}" for k, v in self.settings.items() if k != "name")
        return self.name


def _split_columns(text):
    """'a,b (note, more),c (unit)' -> ['a', 'b', 'c']: commas inside parentheses do not split,
    parenthetical notes are dropped"""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        if depth == 0 and ch != ")":
            cur += ch
    parts.append(cur)
    return [" ".join(p.split()) for p in parts]


def load_run(run_dir, **kw):
    return Run(run_dir, **kw)


def _settings(text):
    out = {}
    for tok in (text or "").split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


def load_sweep(sweep_dir):
    runs = []
    for row in read_plan(sweep_dir):
        runs.append(Run(row["run_dir"], name=row["name"], settings=_settings(row.get("settings")), plan=row))
    return runs


def load(path):
    """a sweep folder (plan.tsv), a run folder (metrics.h5) or a folder of run folders -> [Run]"""
    if os.path.isfile(os.path.join(path, "plan.tsv")):
        return load_sweep(path)
    if os.path.isfile(os.path.join(path, "metrics.h5")):
        return [Run(path)]
    subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "metrics.h5")))
    if not subs:
        raise FileNotFoundError(f"{path}: neither a sweep folder (plan.tsv), a run folder (metrics.h5) "
                                f"nor a folder of run folders")
    return [Run(os.path.join(path, d)) for d in subs]


# ---- tidy tables: dict of column -> numpy array ----

def _concat(parts, columns):
    if not parts:
        return {c: np.array([]) for c in columns}
    return {c: np.concatenate([np.asarray(p[c]) for p in parts]) for c in columns}


def series_table(runs, name):
    """one row per (run, step, element): run, step, index, value. `index` is "" for scalar rows,
    the column label (layer3, rank1, named column) or the flat element number otherwise"""
    parts = []
    for r in runs:
        if not r.has(name):
            continue
        s, v = r.series[name]
        v2 = v.reshape(len(s), -1)
        k = v2.shape[1]
        if v.ndim == 1:
            idx = np.array([""] * len(s), dtype=object)
        else:
            labels = r.column_labels(name) if v.ndim == 2 else None
            if labels is None or len(labels) != k:
                labels = [str(i) for i in range(k)] if v.ndim == 2 else \
                    [",".join(map(str, ix)) for ix in np.ndindex(*v.shape[1:])]
            idx = np.tile(np.array(labels, dtype=object), len(s))
        parts.append({"run": np.array([r.name] * (len(s) * k), dtype=object), "step": np.repeat(s, k),
                      "index": idx, "value": v2.reshape(-1)})
    return _concat(parts, ["run", "step", "index", "value"])


def scalars_table(runs, max_elems=16):
    """every series whose rows hold at most max_elems numbers, long form: run, metric, step, index, value"""
    names = sorted({n for r in runs for n in r.series if r.has(n) and
                    int(np.prod(r.series[n][1].shape[1:], dtype=np.int64)) <= max_elems})
    parts = []
    for n in names:
        t = series_table(runs, n)
        if len(t["run"]):
            t["metric"] = np.array([n] * len(t["run"]), dtype=object)
            parts.append(t)
    return _concat(parts, ["run", "metric", "step", "index", "value"])


def expert_load_table(runs, name="moe/tokens_per_expert"):
    """run, step, layer, expert, tokens from a [n, layers, E] series (layer = model layer id)"""
    parts = []
    for r in runs:
        if not r.has(name):
            continue
        s, v = r.series[name]
        n, L, E = v.shape
        layers = r.moe_layers() if name == "moe/tokens_per_expert" else r.clustered_layers()
        if len(layers) != L:
            layers = list(range(L))
        parts.append({"run": np.array([r.name] * (n * L * E), dtype=object), "step": np.repeat(s, L * E),
                      "layer": np.tile(np.repeat(np.array(layers), E), n), "expert": np.tile(np.arange(E), n * L),
                      "tokens": v.reshape(-1)})
    return _concat(parts, ["run", "step", "layer", "expert", "tokens"])


def followup_table(runs):
    """the probe loss 25 and 50 steps after each event (cluster/event_followup): run, step (when
    the row was written), event_step, kind (0 re-clustering, 1 compression), probe_loss_before,
    probe_loss_after, probe_loss_25, probe_loss_50 (NaN: training ended first). Join with
    events_table / compress_table on (run, step == event_step)."""
    return events_table(runs, "cluster/event_followup")


def events_table(runs, dataset="cluster/events"):
    """re-clustering events: run, step, then the named columns of cluster/events (or of
    another per-layer event series with a `columns` attribute)"""
    parts, cols = [], None
    for r in runs:
        if not r.has(dataset):
            continue
        s, v = r.series[dataset]
        labels = r.column_labels(dataset) or [f"c{i}" for i in range(v.shape[-1])]
        cols = cols or labels
        v2 = v.reshape(-1, v.shape[-1])
        k = v.shape[1] if v.ndim == 3 else 1
        part = {"run": np.array([r.name] * len(v2), dtype=object), "step": np.repeat(s, k)}
        for i, c in enumerate(labels):
            part[c] = v2[:, i]
        parts.append(part)
    return _concat(parts, ["run", "step"] + (cols or []))


def compress_table(runs):
    """compression events (clustering.compress_at): run, step, then the named columns of
    cluster/compress, one row per MoE layer"""
    return events_table(runs, "cluster/compress")


def _last(r, name, reduce=None):
    if not r.has(name):
        return np.nan
    v = r.series[name][1][-1]
    return float(reduce(v) if reduce else np.asarray(v).reshape(-1)[0])


def _tail_mean(r, name, frac=0.1):
    """mean over the last frac of the rows (and over row elements)"""
    if not r.has(name):
        return np.nan
    v = r.series[name][1]
    k = max(1, int(round(len(v) * frac)))
    return float(np.mean(v[-k:]))


def summary_table(runs):
    """one row per run: name, settings, state, steps and the headline numbers (NaN where absent)"""
    keys = []
    for r in runs:
        keys += [k for k in r.settings if k not in keys and k != "name"]
    rows = []
    for r in runs:
        row = {"run": r.name}
        for k in keys:
            row[k] = r.settings.get(k, "")
        row["mode"] = r.mode
        row["state"] = r.state
        row["steps"] = r.last_step()
        row["world_size"] = int(r.attrs.get("world_size", 0)) if r.attrs else 0
        row["final_train_loss"] = _last(r, "train/loss")
        row["last_valid_loss"] = _last(r, "eval/loss")
        row["last_valid_ppl"] = _last(r, "eval/ppl")
        row["final_valid_ppl"] = _last(r, "final/valid_ppl")
        row["final_test_ppl"] = _last(r, "final/test_ppl")
        row["cv2_last10pct"] = _tail_mean(r, "moe/balance/cv2")
        row["group_cv2_last10pct"] = _tail_mean(r, "moe/balance_group/cv2")
        row["tok_s_mean"] = float(np.mean(r.series["perf/tok_s"][1])) if r.has("perf/tok_s") else np.nan
        row["step_s_median"] = float(np.median(r.series["perf/step_s"][1])) if r.has("perf/step_s") else np.nan
        n_ev = moved = 0
        if r.has("cluster/events"):
            s, v = r.series["cluster/events"]
            labels = r.column_labels("cluster/events") or []
            n_ev = len(s)
            if "moved_experts" in labels:
                moved = int(np.sum(v[..., labels.index("moved_experts")]))
        row["recluster_events"] = n_ev
        row["moved_experts"] = moved
        pk = r.dataset_attrs.get("params/by_kind", {})
        row["params_total"] = float(pk["total"]) if "total" in pk else np.nan
        row["params_active"] = float(pk["active"]) if "active" in pk else np.nan
        row["peak_rss_MiB"] = (_last(r, "perf/rank_peak_rss_bytes", np.max) / 2**20
                               if r.has("perf/rank_peak_rss_bytes") else np.nan)
        row["allreduce_GiB"] = (float(np.sum(r.series["comm/summary/allreduce_bytes"][1])) / 2**30
                                if r.has("comm/summary/allreduce_bytes") else np.nan)
        rows.append(row)
    cols = list(rows[0].keys()) if rows else ["run"]
    return {c: np.array([row[c] for row in rows], dtype=object if isinstance(rows[0][c], str) else None)
            for c in cols}


def _cell(x):
    if isinstance(x, (float, np.floating)):
        return "" if np.isnan(x) else repr(float(x))
    if isinstance(x, (np.integer,)):
        return str(int(x))
    return str(x)


def write_csv(table, path):
    """write a dict-of-arrays table; floats as repr (round-trips exactly), NaN as empty"""
    cols = list(table.keys())
    n = len(table[cols[0]]) if cols else 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n):
            w.writerow([_cell(table[c][i]) for c in cols])
    return path


# ---- simulated runs beside trained ones ----

# the traffic phases of comm/summary/* (enum CommPhase), when a log has no columns attribute
PHASES = ["allreduce", "dispatch", "combine", "migration", "other", "recluster"]
SIM_SUFFIXES = ("-sim", "_sim")


def _real(path):
    return os.path.realpath(os.path.abspath(path))


def pair_runs(runs, explicit=None, load_missing=True):
    """pair each simulated run with the trained run it predicts: [(sim, trained, rule)].
    Rules, first match wins:
      explicit    explicit = {sim name: trained name} (analysis/report --pair SIM=TRAINED);
      trace / aggregate
                  the simulated run's routing_source names a trained run's metrics.h5 (sim.routing
                  trace or aggregate); a log outside `runs` is loaded when load_missing (its
                  Run.dir is where it lies) — matched by real path, then by path suffix;
      name        the simulated run is named <trained>-sim or <trained>_sim.
    A simulated run that matches nothing is not paired."""
    explicit = dict(explicit or {})
    trained = [r for r in runs if not r.error and not r.is_sim]
    by_name = {r.name: r for r in trained}
    by_path = {_real(r.path): r for r in trained}
    out = []
    for s in runs:
        if s.error or not s.is_sim:
            continue
        if s.name in explicit:
            t = by_name.get(explicit[s.name])
            if t is None:
                raise KeyError(f"--pair {s.name}={explicit[s.name]}: no trained run named {explicit[s.name]!r} "
                               f"(trained runs: {', '.join(sorted(by_name)) or 'none'})")
            out.append((s, t, "explicit"))
            continue
        kind, path = s.routing_file()
        t = None
        if path:
            cands = [path] if os.path.isabs(path) else [path, os.path.join(os.path.dirname(s.dir), path),
                                                        os.path.join(s.dir, path)]
            for c in cands:
                t = by_path.get(_real(c))
                if t:
                    break
            if t is None and not os.path.isabs(path):
                tail = os.path.normpath(path)
                hits = [r for p, r in by_path.items() if p.endswith(os.sep + tail)]
                t = hits[0] if len(hits) == 1 else None
            if t is None and load_missing:
                for c in cands:
                    if os.path.isfile(c):
                        t = Run(os.path.dirname(_real(c)))
                        t = None if t.error or t.is_sim else t
                        if t:
                            break
            if t is not None:
                out.append((s, t, kind))
                continue
        for suf in SIM_SUFFIXES:
            if s.name.endswith(suf) and s.name[:-len(suf)] in by_name:
                out.append((s, by_name[s.name[:-len(suf)]], "name"))
                break
    return out


def _phase_cols(r, name):
    labels = r.column_labels(name) or PHASES
    return {c.strip(): i for i, c in enumerate(labels)}


def _time_parts(r, steps):
    """per-step seconds [n, 4]: compute, exposed communication, optimizer, step, at `steps`.
    simulated: sim/time_breakdown (forward + backward compute, exposed communication, optimizer,
    step); trained: perf/time_split (forward, backward, allreduce, optimizer) with the dispatch
    and combine seconds of comm/summary/time_s (max over ranks; absent: 0) and, with
    log.sync_wait, the waits before them (comm/summary/wait_s: time_s then holds the transfer
    alone) moved from forward + backward to communication, and perf/step_s"""
    def at(name):
        s, v = r.series[name]
        idx = {int(x): i for i, x in enumerate(s)}
        return np.array([v[idx[int(x)]] for x in steps], dtype=np.float64)
    if r.is_sim and r.has("sim/time_breakdown"):
        tb = at("sim/time_breakdown")        # fwd, bwd, dispatch, combine, allreduce, optimizer, exposed, step
        return np.stack([tb[:, 0] + tb[:, 1], tb[:, 6], tb[:, 5], tb[:, 7]], axis=1)
    sp = at("perf/time_split")               # forward, backward, allreduce, optimizer
    a2a = np.zeros(len(steps))
    if r.has("comm/summary/time_s") and set(int(x) for x in steps) <= set(int(x) for x in r.series["comm/summary/time_s"][0]):
        ts = at("comm/summary/time_s")
        ph = _phase_cols(r, "comm/summary/time_s")
        a2a = ts[:, ph.get("dispatch", 1)] + ts[:, ph.get("combine", 2)]
        if _has_steps(r, "comm/summary/wait_s", steps):
            ws = at("comm/summary/wait_s")
            pw = _phase_cols(r, "comm/summary/wait_s")
            a2a = a2a + ws[:, pw.get("dispatch", 1)] + ws[:, pw.get("combine", 2)]
    step = at("perf/step_s")
    return np.stack([np.maximum(sp[:, 0] + sp[:, 1] - a2a, 0.0), sp[:, 2] + a2a, sp[:, 3], step], axis=1)


def _has_steps(r, name, steps):
    return r.has(name) and set(int(x) for x in steps) <= set(int(x) for x in r.series[name][0])


def _wait(r, steps):
    """median over `steps` of the wait for the slowest rank per step (comm/summary/wait_s summed
    over the phases: a trained run's log.sync_wait, a simulated run's prediction); None if absent"""
    if not _has_steps(r, "comm/summary/wait_s", steps):
        return None
    s, v = r.series["comm/summary/wait_s"]
    idx = {int(x): i for i, x in enumerate(s)}
    return float(np.median([np.sum(v[idx[int(x)]]) for x in steps]))


def _bytes_parts(r, steps):
    """mean bytes per step over `steps`: {(link, group): bytes} for link intra/inter and group
    allreduce, dispatch, combine, other (migration + other + recluster), total"""
    out = {}
    for link in ("intra", "inter"):
        name = f"comm/summary/{link}_bytes"
        if not r.has(name):
            continue
        s, v = r.series[name]
        idx = {int(x): i for i, x in enumerate(s)}
        rows = np.array([v[idx[int(x)]] for x in steps if int(x) in idx], dtype=np.float64)
        if not len(rows):
            continue
        m = rows.mean(axis=0)
        ph = _phase_cols(r, name)
        g = {p: float(m[ph[p]]) if p in ph and ph[p] < len(m) else 0.0 for p in ("allreduce", "dispatch", "combine")}
        g["other"] = float(sum(m[ph[p]] for p in ("migration", "other", "recluster") if p in ph and ph[p] < len(m)))
        g["total"] = float(m.sum())
        for k, x in g.items():
            out[(link, k)] = x
    return out


TIME_ROWS = ["step time", "compute", "exposed communication", "optimizer"]
BYTE_GROUPS = ["allreduce", "dispatch", "combine", "other", "total"]


def compare_pair(sim, trained):
    """predicted (sim) vs measured (trained) numbers of one pair: a dict with
      comparable  False when the world sizes differ (then only `why` is set)
      steps       the steps compared: the steps both logged in perf/step_s (a trace replays the
                  trained run's recorded steps under their own numbers), else every step of each
      rows        [(quantity, unit, predicted, measured, delta_pct)]: median seconds of step time,
                  compute, exposed communication, optimizer (and the wait for the slowest rank
                  when the trained run logged it: log.sync_wait); mean bytes per step intra/inter-node
                  by phase group (allreduce, dispatch, combine, other, total)
      time_pred, time_meas  medians [compute, exposed communication, optimizer, step] in seconds"""
    ws, wt = int(sim.attrs.get("world_size", 0)), int(trained.attrs.get("world_size", 0))
    if ws != wt:
        return {"comparable": False, "why": f"{ws} simulated GPUs vs {wt} trained ranks"}
    if not (sim.has("perf/step_s") and trained.has("perf/step_s") and trained.has("perf/time_split")):
        return {"comparable": False, "why": "no perf/step_s or perf/time_split"}
    ss, ts = sim.series["perf/step_s"][0], trained.series["perf/step_s"][0]
    common = np.intersect1d(ss, ts)
    same = len(common) > 0
    sp = _time_parts(sim, common if same else ss)
    tp = _time_parts(trained, common if same else ts)
    pm, mm = np.median(sp, axis=0), np.median(tp, axis=0)
    rows = []
    for i, q in zip((3, 0, 1, 2), TIME_ROWS):
        rows.append((q, "s", float(pm[i]), float(mm[i]), _delta(pm[i], mm[i])))
    wp, wm = _wait(sim, common if same else ss), _wait(trained, common if same else ts)
    if wp is not None and wm is not None:      # the trained run logged its waits (log.sync_wait)
        rows.append(("wait for the slowest rank", "s", wp, wm, _delta(wp, wm)))
    bp, bm = _bytes_parts(sim, common if same else ss), _bytes_parts(trained, common if same else ts)
    for link in ("intra", "inter"):
        for g in BYTE_GROUPS:
            if (link, g) in bp and (link, g) in bm:
                rows.append((f"{link}-node bytes/step: {g}", "B", bp[(link, g)], bm[(link, g)],
                             _delta(bp[(link, g)], bm[(link, g)])))
    return {"comparable": True, "steps": common if same else None, "n_steps": (len(common) if same else (len(ss), len(ts))),
            "rows": rows, "time_pred": pm, "time_meas": mm, "bytes_pred": bp, "bytes_meas": bm}


def _delta(pred, meas):
    """(predicted - measured) / measured in %; 0 when both are 0, NaN when only measured is 0"""
    if meas == 0:
        return 0.0 if pred == 0 else float("nan")
    return float((pred - meas) / meas * 100.0)


def predicted_vs_measured_table(pairs):
    """one row per (pair, quantity): simulated, trained, rule, quantity, unit, predicted,
    measured, delta_pct (comparable pairs only)"""
    rows = []
    for s, t, rule in pairs:
        c = compare_pair(s, t)
        if not c["comparable"]:
            continue
        for q, unit, p, m, d in c["rows"]:
            rows.append({"simulated": s.name, "trained": t.name, "rule": rule, "quantity": q, "unit": unit,
                         "predicted": p, "measured": m, "delta_pct": d})
    cols = ["simulated", "trained", "rule", "quantity", "unit", "predicted", "measured", "delta_pct"]
    return {c: np.array([r[c] for r in rows], dtype=object if c in cols[:5] else np.float64) for c in cols}


def simulated_table(runs, pairs=()):
    """one row per simulated run: run, GPUs, nodes x GPUs per node, ep_size, hardware, routing
    source, median step s, compute s, exposed communication s, optimizer s, mean inter- and
    intra-node bytes per step, largest memory per GPU (sim/mem_bytes total), paired trained run"""
    paired = {s.name: (t.name, rule) for s, t, rule in pairs}
    rows = []
    for r in runs:
        if r.error or not r.is_sim or not r.has("perf/step_s"):
            continue
        steps = r.series["perf/step_s"][0]
        tp = np.median(_time_parts(r, steps), axis=0) if r.has("sim/time_breakdown") else np.full(4, np.nan)
        b = _bytes_parts(r, steps)
        mem = float(r.series["sim/mem_bytes"][1][:, -1].max()) if r.has("sim/mem_bytes") else np.nan
        t = paired.get(r.name)
        rows.append({"run": r.name, "gpus": int(r.attrs.get("world_size", 0)),
                     "nodes_x_gpus": f"{r.config.get('sim.nodes', '?')}x{r.config.get('sim.gpus_per_node', '?')}",
                     "ep_size": int(r.attrs.get("ep_size", 0)), "hardware": str(r.attrs.get("hardware", "")).split(" (")[0],
                     "routing": str(r.attrs.get("routing_source", "")), "step_s": float(np.median(r.series["perf/step_s"][1])),
                     "compute_s": float(tp[0]), "exposed_comm_s": float(tp[1]), "optimizer_s": float(tp[2]),
                     "inter_bytes_step": b.get(("inter", "total"), np.nan), "intra_bytes_step": b.get(("intra", "total"), np.nan),
                     "mem_bytes_gpu": mem, "paired_with": f"{t[0]} ({t[1]})" if t else ""})
    cols = ["run", "gpus", "nodes_x_gpus", "ep_size", "hardware", "routing", "step_s", "compute_s", "exposed_comm_s",
            "optimizer_s", "inter_bytes_step", "intra_bytes_step", "mem_bytes_gpu", "paired_with"]
    strs = {"run", "nodes_x_gpus", "hardware", "routing", "paired_with"}
    return {c: np.array([r[c] for r in rows], dtype=object if c in strs else None) for c in cols}
