"""integration: `dcmoe simulate`.
- a simulated run writes metrics.h5 in the trainer's schema (perf/step_s, perf/time_split,
  comm/summary/*, comm/dispatch, comm/node_bytes, comm/rank_sent) plus sim/* and DONE; the time
  breakdown adds up (step = compute + exposed communication + optimizer);
- the gradient allreduce bytes it books equal what the trainer's profiler booked for the same
  model on the same topology (4 ranks as 2 virtual nodes x 2; dense over the world, and the
  expert replicas with parallel.ep_size 2): the same ring accounting;
- ep_size = GPUs per node keeps every dispatch/combine byte inside the node; two-level moves
  fewer inter-node bytes than flat for the same routing; node-limited routing caps nodes per
  token;
- bad sim input is a located error: an unknown preset names the key and the allowed values,
  an ep_size that does not divide the GPUs names parallel.ep_size, an unknown sim key names it;
- `--validate published` prints DeepEP's rows with predictions; its exit status says whether
  a predicted row is out of tolerance (the normal-kernel rows must be within 15%);
- byte-exact replay: a run trained with log.trace_interval 1 on 4 ranks (2 virtual nodes x 2)
  and simulated with sim.routing trace books, at every step, exactly the trainer's allreduce,
  dispatch, combine and migration bytes (intra and inter node), parallel/migration_bytes and
  comm/dispatch rows, pairs, nodes and tokens: flat, two-level, ep_size 2, and clustered with
  units migrating every 2 steps;
  a missing trace file is an error naming sim.trace; a 4-rank trace replays tiled on 16 GPUs
  (4x the tokens and pairs), a cluster that is not a multiple of the traced ranks is an error;
- aggregate routing: a logged load on half the experts sends every pair to the rank holding
  them; a file with another expert count is an error naming sim.aggregate."""
import os
import re
import h5py
import numpy as np
from testlib import check, finish, run, run_plain, series, tiny_config, tmpdir

d = tmpdir("dcmoe-sim-")


def sim(name, sets, cfg_extra=""):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name, cfg_extra)
    p = run_plain(["simulate", cfg, "--quiet"] + sets)
    check(p.returncode == 0, f"{name}: simulate exits 0 ({p.stderr.strip()[-200:]})")
    return os.path.join(d, name, "metrics.h5")


SMALL = ["--set", "sim.nodes=2", "--set", "sim.gpus_per_node=4", "--set", "sim.tokens_per_rank=512",
         "--set", "sim.sample_tokens=0", "--set", "moe.n_experts=16", "--set", "moe.top_k=2", "--set", "sim.steps=3"]
h = sim("base", SMALL)
if os.path.exists(h):
    check(os.path.exists(os.path.join(d, "base", "DONE")), "DONE written")
    with h5py.File(h, "r") as f:
        names = set()
        f.visit(names.add)
        need = ["perf/step_s", "perf/tok_s", "perf/time_split", "comm/summary/intra_bytes", "comm/summary/inter_bytes",
                "comm/dispatch", "comm/node_bytes", "comm/rank_sent", "sim/time_breakdown", "sim/layer_s", "sim/step_band",
                "sim/mem_bytes"]
        check(all(n in names for n in need), f"trainer schema + sim series present (missing {[n for n in need if n not in names]})")
        check(f.attrs["mode"] == "simulate" and f.attrs["world_size"] == 8, "root attributes: mode, world_size")
        tb = f["sim/time_breakdown/value"][...]
        band = f["sim/step_band/value"][...]
        step = f["perf/step_s/value"][...]
    check(len(step) == 3 and np.allclose(tb[:, 0] + tb[:, 1] + tb[:, 6] + tb[:, 5], tb[:, 7], rtol=1e-12),
          "step = forward + backward compute + exposed communication + optimizer")
    check(np.all(band[:, 0] <= band[:, 1]) and np.all(band[:, 1] <= band[:, 2]) and np.all(step >= band[:, 0]),
          "uncertainty band: min <= mean <= max over routing draws")
    with h5py.File(h, "r") as f:
        tpe = f["moe/tokens_per_expert/value"][...]
        cv2 = f["moe/balance/cv2/value"][...]
        memb = f["mem/bytes/value"][...]
        smem = f["sim/mem_bytes/value"][...]
    loads = tpe / tpe.mean(axis=2, keepdims=True)
    check(tpe.shape[1:] == (2, 16) and np.allclose(tpe.sum(axis=2), 8 * 512 * 2) and
          np.allclose(cv2, loads.var(axis=2)), "moe/tokens_per_expert: GPUs x tokens x top-k pairs per layer; cv2 as the trainer's")
    check(memb.shape[1:] == (8, 8) and np.allclose(memb[-1, 0].sum(), smem[-1, 3]),
          "mem/bytes [ranks, kinds] in the trainer's schema, summing to the estimate of sim/mem_bytes")

# ---- the allreduce accounting equals the trainer's ----
VIRT = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=2"]
for ep in (0, 2):
    name = f"train-ep{ep}"
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    p = run(["train", cfg, "--quiet", "--set", f"parallel.ep_size={ep}"] + VIRT, ranks=4)
    if not check(p.returncode == 0, f"{name}: 4-rank training run exits 0"):
        continue
    th = os.path.join(d, name, "metrics.h5")
    with h5py.File(th, "r", swmr=True) as f:
        vocab = int(f.attrs["vocab_size"])
    _, ti = series(th, "comm/summary/intra_bytes")
    _, tn = series(th, "comm/summary/inter_bytes")
    sh = sim(f"sim-ep{ep}", ["--set", "sim.nodes=2", "--set", "sim.gpus_per_node=2", "--set", f"parallel.ep_size={ep}",
                             "--set", f"data.vocab_max={vocab}", "--set", "sim.tokens_per_rank=32"])
    if os.path.exists(sh):
        _, si = series(sh, "comm/summary/intra_bytes")
        _, sn = series(sh, "comm/summary/inter_bytes")
        check(si[0, 0] == ti[0, 0] and sn[0, 0] == tn[0, 0],
              f"ep_size {ep}: simulated allreduce bytes = the trainer's (intra {si[0, 0]:.0f} vs {ti[0, 0]:.0f}, "
              f"inter {sn[0, 0]:.0f} vs {tn[0, 0]:.0f})")

# ---- locality options in the simulator ----
h_flat = sim("flat", SMALL)
h_node = sim("epnode", SMALL + ["--set", "parallel.ep_size=4"])
h_two = sim("two", SMALL + ["--set", "parallel.exchange=two_level", "--set", "moe.top_k=4"])
h_flat4 = sim("flat4", SMALL + ["--set", "moe.top_k=4"])
h_lim = sim("limit", SMALL + ["--set", "sim.nodes=4", "--set", "sim.gpus_per_node=2", "--set", "moe.top_k=4",
                              "--set", "moe.max_nodes=1"])
h_free = sim("free", SMALL + ["--set", "sim.nodes=4", "--set", "sim.gpus_per_node=2", "--set", "moe.top_k=4"])
if all(os.path.exists(x) for x in (h_flat, h_node, h_two, h_flat4, h_lim, h_free)):
    _, n_node = series(h_node, "comm/summary/inter_bytes")
    _, n_flat = series(h_flat, "comm/summary/inter_bytes")
    check(np.all(n_node[:, 1:3] == 0) and np.all(n_flat[:, 1:3] > 0),
          "ep_size = GPUs per node: no dispatch/combine byte crosses a node (flat EP over the world: some do)")
    _, a = series(h_flat4, "comm/summary/inter_bytes")
    _, b = series(h_two, "comm/summary/inter_bytes")
    check(b[:, 1:3].sum() < a[:, 1:3].sum(), f"two-level: fewer inter-node bytes than flat ({b[:, 1:3].sum():.3g} < {a[:, 1:3].sum():.3g})")
    _, dl = series(h_lim, "comm/dispatch")
    _, dfree = series(h_free, "comm/dispatch")
    check(np.allclose(dl[:, 2] / dl[:, 3], 1.0) and np.all(dfree[:, 2] / dfree[:, 3] > 1.5),
          f"max_nodes 1: one node per token ({(dl[:, 2] / dl[:, 3]).max():.3f}); without: {(dfree[:, 2] / dfree[:, 3]).mean():.2f}")

# ---- bad input ----
cfg = os.path.join(d, "bad.yaml")
tiny_config(cfg, d, "bad")
p = run_plain(["simulate", cfg, "--set", "sim.hardware=b200"])
check(p.returncode != 0 and "sim.hardware" in p.stderr and "h800" in p.stderr,
      f"unknown preset: error names the key and the presets ({p.stderr.strip()[:160]!r})")
p = run_plain(["simulate", cfg, "--set", "sim.nodes=2", "--set", "sim.gpus_per_node=4", "--set", "parallel.ep_size=3"])
check(p.returncode != 0 and "parallel.ep_size=3" in p.stderr, f"ep_size 3 of 8 GPUs: located error ({p.stderr.strip()[:160]!r})")
with open(cfg, "a") as f:
    f.write("sim:\n  nodes: 2\n  gpu_per_node: 4\n")
p = run_plain(["simulate", cfg])
check(p.returncode != 0 and "gpu_per_node" in p.stderr and re.search(r"bad\.yaml:\d+", p.stderr) is not None,
      f"unknown sim key: error names file:line and the key ({p.stderr.strip()[:160]!r})")

# ---- byte-exact replay of recorded routing ----
CLU = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=8", "--set", "moe.rank=4", "--set", "moe.top_groups=2",
       "--set", "clustering.enabled=false"]
REPLAY = {"flat": CLU, "two-level": CLU + ["--set", "parallel.exchange=two_level"],
          "ep_size2": CLU + ["--set", "parallel.ep_size=2"],
          "migrating": CLU + ["--set", "parallel.placement=topology", "--set", "parallel.place_interval=2",
                              "--set", "parallel.min_gain=0"],
          "standard-drops": ["--set", "moe.capacity_factor=0.6"]}
for name, sets in REPLAY.items():
    cfg = os.path.join(d, f"rp-{name}.yaml")
    tiny_config(cfg, d, f"rp-{name}")
    p = run(["train", cfg, "--quiet", "--set", "log.trace_interval=1"] + sets + VIRT, ranks=4)
    if not check(p.returncode == 0, f"replay {name}: 4-rank training run with traces exits 0"):
        continue
    th = os.path.join(d, f"rp-{name}", "metrics.h5")
    with h5py.File(th, "r", swmr=True) as f:
        vocab = int(f.attrs["vocab_size"])
    p = run_plain(["simulate", cfg, "--quiet", "--set", f"run.name=sp-{name}", "--set", "sim.routing=trace",
                   "--set", f"sim.trace={th}", "--set", "sim.nodes=2", "--set", "sim.gpus_per_node=2",
                   "--set", f"data.vocab_max={vocab}"] + sets)
    if not check(p.returncode == 0, f"replay {name}: simulate exits 0 ({p.stderr.strip()[-200:]})"):
        continue
    sh = os.path.join(d, f"sp-{name}", "metrics.h5")
    same = True
    for k, cols in (("comm/summary/intra_bytes", [0, 1, 2, 3]), ("comm/summary/inter_bytes", [0, 1, 2, 3]),
                    ("comm/dispatch", [0, 1, 2, 3])):
        st, a = series(th, k)
        ss, b = series(sh, k)
        same &= list(st) == list(ss) and np.array_equal(a[:, cols], b[:, cols])
        if not same:
            bad = [i for i in range(min(len(a), len(b))) if not np.array_equal(a[i, cols], b[i, cols])][:3]
            print(f"# {name} {k}: steps differ at rows {bad}: trainer {a[bad][:, cols].tolist()} sim {b[bad][:, cols].tolist()}")
            break
    mst, mig = series(th, "parallel/migration_bytes")   # the trainer writes it on log and migration steps
    sst, smig = series(sh, "parallel/migration_bytes")
    at = dict(zip(sst.tolist(), smig.tolist()))
    same &= all(at.get(int(t)) == v for t, v in zip(mst, mig))
    _, drop = series(th, "moe/balance/drop")
    check(same, f"replay {name}: every step's allreduce, dispatch, combine and migration bytes and dispatch rows equal the trainer's"
                + (f" (migrated {mig.sum():.0f} bytes)" if name == "migrating" else "")
                + (f" (dropped {drop.mean():.2f} of the pairs)" if name == "standard-drops" else ""))
# a larger cluster replays the trace tiled: GPU w routes as traced rank w mod 4 under the simulator's placement
tf = os.path.join(d, "rp-flat", "metrics.h5")
if os.path.exists(tf):
    with h5py.File(tf, "r", swmr=True) as f:
        vocab = int(f.attrs["vocab_size"])
    base = ["simulate", os.path.join(d, "rp-flat.yaml"), "--quiet", "--set", "sim.routing=trace", "--set", f"sim.trace={tf}",
            "--set", f"data.vocab_max={vocab}"] + REPLAY["flat"]
    p = run_plain(base + ["--set", "run.name=tiled", "--set", "sim.nodes=4", "--set", "sim.gpus_per_node=4", "--set", "parallel.ep_size=8"])
    if check(p.returncode == 0, f"tiled replay: a 4-rank trace on 16 GPUs exits 0 ({p.stderr.strip()[-200:]})"):
        _, dt = series(tf, "comm/dispatch")
        _, ds16 = series(os.path.join(d, "tiled", "metrics.h5"), "comm/dispatch")
        check(len(ds16) == len(dt) and np.array_equal(ds16[:, 3], 4 * dt[:, 3]) and np.array_equal(ds16[:, 1], 4 * dt[:, 1]),
              "tiled replay: 4x the traced tokens and (token, group) pairs per step")
    p = run_plain(base + ["--set", "run.name=tiled6", "--set", "sim.nodes=3", "--set", "sim.gpus_per_node=2", "--set", "parallel.ep_size=2"])
    check(p.returncode != 0 and "sim.trace=" in p.stderr and "multiple" in p.stderr,
          f"a cluster that is not a multiple of the traced ranks: named error ({p.stderr.strip()[:200]!r})")
p = run_plain(["simulate", cfg, "--set", "sim.routing=trace", "--set", f"sim.trace={d}/nope/metrics.h5",
               "--set", "sim.nodes=2", "--set", "sim.gpus_per_node=2"])
check(p.returncode != 0 and "sim.trace=" in p.stderr, f"missing trace file: error names sim.trace ({p.stderr.strip()[:160]!r})")

# ---- aggregate routing: a trained run's per-expert loads become the experts' popularity ----
agg = os.path.join(d, "agg.h5")
with h5py.File(agg, "w") as f:
    load = np.zeros((4, 2, 8))
    load[:, :, :4] = 100.0                    # every routed pair on experts 0-3: EP rank 0 of 2
    f.create_dataset("moe/tokens_per_expert/value", data=load)
    f.create_dataset("moe/tokens_per_expert/step", data=np.arange(1, 5))
AGG = ["--set", "sim.routing=aggregate", "--set", f"sim.aggregate={agg}", "--set", "sim.nodes=1", "--set", "sim.gpus_per_node=2",
       "--set", "sim.tokens_per_rank=64", "--set", "sim.sample_tokens=0", "--set", "sim.samples=1"]
h = sim("agg", AGG)
if os.path.exists(h):
    with h5py.File(h, "r") as f:
        recv = f["comm/rank_recv/value"][0][1]   # dispatch phase, [P]
        check(recv[0] > 1000 and recv[1] <= 16 * 2 * 2, f"aggregate: rank 0's experts get every pair, rank 1 only counts ({recv})")
        check("aggregate" in f.attrs["routing_source"], "aggregate: routing_source names it")
p = run_plain(["simulate", os.path.join(d, "agg.yaml"), "--quiet"] + AGG + ["--set", "moe.n_experts=16"])
check(p.returncode != 0 and "sim.aggregate=" in p.stderr and "16 experts" in p.stderr,
      f"aggregate: expert count mismatch is a named error ({p.stderr.strip()[:200]!r})")

# ---- the trajectory: re-clustering events and placement re-runs in the timeline ----
# 8 GPUs as 2 nodes x 4, the clustered model (16 experts in 8 groups of 2, one group per GPU),
# re-clustering every 4 steps from step 4 (sim.recluster_moved 0.25: 4 experts rotate), placement
# re-runs every 3 steps; routing drawn every 2 steps
TRAJ = ["--set", "sim.nodes=2", "--set", "sim.gpus_per_node=4", "--set", "sim.tokens_per_rank=256",
        "--set", "sim.sample_tokens=0", "--set", "sim.samples=1", "--set", "sim.steps=12", "--set", "sim.redraw_interval=2",
        "--set", "sim.routing=planted", "--set", "moe.kind=clustered", "--set", "moe.n_experts=16", "--set", "moe.n_groups=8",
        "--set", "moe.top_k=4", "--set", "moe.top_groups=2", "--set", "moe.rank=4", "--set", "clustering.enabled=true",
        "--set", "clustering.interval=4", "--set", "clustering.warmup=0", "--set", "clustering.proj_dim=16",
        "--set", "sim.recluster_moved=0.25", "--set", "parallel.place_interval=3", "--set", "parallel.min_gain=0",
        "--set", "parallel.traffic_interval=5"]
h = sim("traj", TRAJ)
if os.path.exists(h):
    with h5py.File(h, "r") as f:
        cfgd = {}
        ev_steps = f["cluster/events/step"][...]
        ev = f["cluster/events/value"][...]
        evs = f["sim/event_s/value"][...]
        rc_intra = f["comm/summary/intra_bytes/value"][:, 5] + f["comm/summary/inter_bytes/value"][:, 5]
        mig = f["comm/summary/intra_bytes/value"][:, 3] + f["comm/summary/inter_bytes/value"][:, 3]
        pl_steps = f["parallel/placement/step"][...]
        pl = f["parallel/placement/value"][...]
        step_s = f["perf/step_s/value"][...]
        tb = f["sim/time_breakdown/value"][...]
        nm_steps = f["comm/node_bytes/step"][...]
        d_model = int(re.search(r"d_model: (\d+)", f.attrs["config"]).group(1))
    check(list(ev_steps) == [4, 8] and ev.shape[1:] == (2, 19),
          f"re-clustering every clustering.interval steps, not at the last step (events at {list(ev_steps)})")
    # features: every GPU sends its 2 experts' proj_dim floats to the 7 others; plus the moved rows and statistics
    feat = 8 * 7 * 4.0 * 2 * 16
    check(all(rc_intra[t - 1] >= 2 * feat for t in ev_steps) and np.all(np.delete(rc_intra, np.array(ev_steps) - 1) == 0),
          f"event bytes booked in their step, phase recluster (>= the feature all-gather {2 * feat:.0f} B; {rc_intra[np.array(ev_steps) - 1]})")
    check(np.all(ev[:, :, 4] >= 1) and np.all(ev[:, :, 4] <= 4) and np.all(ev[:, :, 3] == 1),
          f"each event moves at most round(0.25 x 16) = 4 experts per layer ({ev[:, 0, 4]})")
    check(np.allclose(step_s - tb[:, 7], evs[:, 0] + evs[:, 1] + evs[:, 2]) and np.all(evs[np.array(ev_steps) - 1, 0] > 0),
          "perf/step_s = the steady step + the events' seconds (sim/event_s)")
    check(list(pl_steps) == [3, 4, 6, 8, 9], f"placement re-runs every 3 steps and after each event ({list(pl_steps)})")
    moved_units = pl[:, 0, 3]
    check(np.all((mig > 0) == np.isin(np.arange(1, 13), pl_steps[moved_units > 0])),
          f"migration bytes exactly at the steps whose placement moved units ({list(pl_steps[moved_units > 0])})")
    check(list(nm_steps) == [5, 10, 12], f"node matrices every parallel.traffic_interval steps and at the last ({list(nm_steps)})")
    # between draws a step repeats the last drawn one, unless an event changed the layout
    check(tb[1, 7] == tb[0, 7] and tb[2, 7] != tb[1, 7], "sim.redraw_interval 2: step 2 reuses step 1's draw, step 3 draws")

# ---- published numbers ----
p = run_plain(["simulate", "--validate", "published"], timeout=300)
rows = [r for r in p.stdout.splitlines() if r.startswith("| dispatch") or r.startswith("| combine")]
normal = [r for r in rows[:8]]
deltas = [float(r.split("|")[-2].strip().rstrip(" OUT").rstrip("%")) for r in normal if "predicted" in r]
out = [r for r in rows if r.rstrip().endswith("OUT |")]
check(len(rows) == 18 and len(deltas) == 4 and all(abs(x) <= 15 for x in deltas),
      f"DeepEP normal kernels: every predicted row within 15% ({deltas})")
check((p.returncode != 0) == (len(out) > 0), f"exit status {p.returncode} says whether a row is out of tolerance ({len(out)} out)")
ll = [float(r.split("|")[-2].strip().rstrip(" OUT").rstrip("%")) for r in rows[8:] if "predicted" in r]
check(len(ll) == 6 and all(abs(x) <= 10 for x in ll) and p.returncode == 0,
      f"DeepEP low-latency kernels (fitted on EP16 and EP64): EP32/128/256 within 10% ({ll})")
finish()
