"""The local sweep launcher (`dcmoe sweep run FILE --launcher local`):
  - a 2-run sweep (1 and 2 ranks) runs both to DONE and writes plan.tsv + resolved configs;
  - a second invocation skips both (nothing rewritten);
  - a run stopped mid-way (--stop-at on its resolved config) is resumed by the launcher and ends
    with exactly the final loss of the uninterrupted run;
  - SIGTERM to the launcher makes the running trainer checkpoint (forwarded as SIGUSR1); the next
    invocation resumes that run from the checkpoint and completes it;
  - a run folder killed before its first checkpoint is moved aside and started again;
  - a sweep of run.mode simulate runs `dcmoe simulate` for every point (one process each: sim.nodes x
    ep_size grid), each to DONE with a simulated log; `dcmoe train` refuses such a config;
  - --pack K (slurm, dry run): simulate runs share array tasks K at a time (packs.tsv), and the array
    script run by hand for each task completes every run of its line;
  - a chained sweep (sweep.blocks): 2 trained runs with n_groups 2 and 4 recording routing traces,
    then 2 simulate runs whose sim.trace "@train" resolves to the trained run with the same
    n_groups; slurm (dry run) submits the simulations as a second array after the first
    (afterok), the array script refuses a simulation whose trained run is not DONE; the local
    launcher runs the trained runs first and each simulation replays its own run's trace
    (dispatch/combine bytes equal at every recorded step); analysis/report pairs them;
  - bad options fail with a message naming what is allowed."""
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testlib as T  # noqa: E402


def sweep_run(path, *extra, timeout=300):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([T.EXE, "sweep", "run", path, "--launcher", "local"] + list(extra), capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=os.path.dirname(path))


def final(run_dir):
    s, v = T.series(os.path.join(run_dir, "metrics.h5"), "train/loss")
    return int(s[-1]), float(v[-1])


CHAIN = """sim:
  nodes: 2
  gpus_per_node: 1
  hardware: cpu
sweep:
  zip:
    moe.n_groups: [2, 4]
    name: [g2, g4]
  blocks:
    train:
      set: {ranks: 2, log.trace_interval: 4, topology.nodes: 2, topology.ranks_per_node: 1}
    sim:
      set: {run.mode: simulate, sim.routing: trace, sim.trace: "@train"}
"""


def chain(tmp, runs):
    """train small, then simulate: each simulated run replays the trace of the run with its groups"""
    import h5py
    import numpy as np
    cfg = T.tiny_config(os.path.join(tmp, "chain.yaml"), runs, "ch", extra=CHAIN)
    text = open(cfg).read().replace("  kind: standard\n", "  kind: clustered\n  n_groups: 2\n  top_groups: 1\n  rank: 4\n")
    open(cfg, "w").write(text)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([T.EXE, "sweep", "run", cfg, "--launcher", "slurm", "--dry-run"], capture_output=True, text=True,
                       env=env, cwd=tmp)
    arrays = re.findall(r"^\$ .*--array=.*$", p.stdout, re.M)
    rep = re.findall(r"^\$ .*report.sbatch.*$", p.stdout, re.M)
    T.check(p.returncode == 0 and len(arrays) == 2 and "--array=0-1" in arrays[0] and "--ntasks=2" in arrays[0]
            and "--dependency" not in arrays[0] and "--array=2-3" in arrays[1] and "--ntasks=1" in arrays[1]
            and "--dependency=afterok:DRYRUN" in arrays[1] and rep and "--dependency=afterany:DRYRUN:DRYRUN" in rep[0],
            f"slurm: the trained runs in one array, the simulations in a second one after it (afterok) "
            f"({p.stderr.strip()[-200:]}{arrays})")
    sdir = os.path.join(runs, "sweep-chain")
    plan = open(os.path.join(sdir, "plan.tsv")).read().splitlines() if os.path.exists(os.path.join(sdir, "plan.tsv")) else []
    T.check(len(plan) == 5 and plan[0].endswith("\tneeds") and [ln.split("\t")[-1] for ln in plan[1:]] == ["", "", "0", "1"],
            f"plan.tsv: the simulations need runs 0 and 1 ({[ln.split(chr(9))[-1] for ln in plan[1:]]})")
    q = subprocess.run(["bash", os.path.join(T.SRC, "slurm", "sweep-array.sbatch"), sdir], capture_output=True, text=True,
                       env=dict(env, DCMOE_ROOT=T.SRC, DCMOE_EXE=T.EXE, SLURM_ARRAY_TASK_ID="3"), timeout=120)
    T.check(q.returncode != 0 and "reads the log of run 1" in q.stderr and not os.path.exists(os.path.join(runs, "ch-sim-g4")),
            f"the array script refuses a simulation whose trained run is not complete ({q.stderr.strip()[-200:]})")
    p = sweep_run(cfg)
    order = re.findall(r"^\[\d/4\] \S+ (\S+)", p.stdout, re.M)
    T.check(p.returncode == 0 and order == ["ch-train-g2", "ch-train-g4", "ch-sim-g2", "ch-sim-g4"] and
            all(os.path.exists(os.path.join(runs, n, "DONE")) for n in order),
            f"local: trained runs first, then the simulations, all DONE ({order}; {p.stderr.strip()[-300:]})")
    for g in ("g2", "g4"):
        sh, th = os.path.join(runs, f"ch-sim-{g}", "metrics.h5"), os.path.join(runs, f"ch-train-{g}", "metrics.h5")
        if not (os.path.exists(sh) and os.path.exists(th)):
            T.check(False, f"{g}: both logs exist")
            continue
        with h5py.File(sh, "r") as f:
            src = str(f.attrs["routing_source"])
        with h5py.File(th, "r", swmr=True) as f:
            cfg_text = f.attrs["config"]
            cfg_text = cfg_text.decode() if isinstance(cfg_text, bytes) else str(cfg_text)
            groups = int(re.search(r"^  n_groups: (\d+)$", cfg_text, re.M).group(1))
        same = True
        for k in ("comm/summary/intra_bytes", "comm/summary/inter_bytes"):
            ts, tv = T.series(th, k)
            ss, sv = T.series(sh, k)
            idx = np.searchsorted(ts, ss)
            same &= len(ss) == 3 and np.array_equal(ts[idx], ss) and np.array_equal(tv[idx][:, 1:3], sv[:, 1:3])
        T.check(src == f"trace {th}" and groups == int(g[1:]) and same,
                f"ch-sim-{g} replays the trace of ch-train-{g} (n_groups {groups}): dispatch/combine bytes equal at the "
                f"recorded steps ({src})")
    out = os.path.join(tmp, "rep-chain")
    r = subprocess.run([sys.executable, os.path.join(T.SRC, "analysis", "report"), sdir, "-o", out], capture_output=True,
                       text=True, timeout=300)
    md = open(os.path.join(out, "report.md")).read() if r.returncode == 0 else ""
    T.check(r.returncode == 0 and "| ch-sim-g2 | ch-train-g2 | trace |" in md and "| ch-sim-g4 | ch-train-g4 | trace |" in md,
            f"analysis/report pairs each simulation with its trained run ({r.stderr.strip()[-200:]})")


def main():
    tmp = T.tmpdir("dcmoe-launcher-")
    runs = os.path.join(tmp, "runs")
    sw = T.tiny_config(os.path.join(tmp, "two.yaml"), runs, "two",
                       extra="sweep:\n  zip:\n    ranks: [1, 2]\n    name: [p1, p2]\n")
    t0 = time.time()
    p = sweep_run(sw)
    print("".join("# " + l + "\n" for l in p.stdout.splitlines()), flush=True)
    T.check(p.returncode == 0, f"2-run sweep exits 0 ({p.stderr.strip()[-300:]})")
    sdir = os.path.join(runs, "sweep-two")
    T.check(os.path.exists(os.path.join(sdir, "plan.tsv")), "plan.tsv written")
    plan = open(os.path.join(sdir, "plan.tsv")).read().splitlines()
    T.check(len(plan) == 3 and plan[0].startswith("index\tid\tname\tranks"), "plan.tsv: header + 2 runs")
    for n in ("two-p1", "two-p2"):
        T.check(os.path.exists(os.path.join(runs, n, "DONE")), f"{n} complete (DONE)")
    T.check(re.search(r"mpirun .*-n 2 .*dcmoe train", p.stdout) is not None, "the 2-rank run is started with -n 2")
    ws = [int(T.series(os.path.join(runs, n, "metrics.h5"), "train/loss")[0][-1]) for n in ("two-p1", "two-p2")]
    T.check(ws == [12, 12], f"both runs trained 12 steps ({ws})")
    print(f"# first invocation {time.time() - t0:.1f} s", flush=True)

    # second invocation: everything is DONE
    mt = os.path.getmtime(os.path.join(runs, "two-p1", "metrics.h5"))
    p = sweep_run(sw)
    T.check(p.returncode == 0 and p.stdout.count("done, skipped") == 2 and "0 started" in p.stdout,
            "a second invocation skips both runs")
    T.check(os.path.getmtime(os.path.join(runs, "two-p1", "metrics.h5")) == mt, "the skipped run's log is untouched")

    # an interrupted run (stopped after step 6 with a checkpoint) is resumed by the launcher
    one = T.tiny_config(os.path.join(tmp, "one.yaml"), runs, "one", extra="sweep:\n  zip:\n    name: [stopped]\n")
    p = sweep_run(one, "--dry-run")
    T.check(p.returncode == 0 and "one-stopped" in p.stdout and not os.path.exists(os.path.join(runs, "one-stopped")),
            "--dry-run writes the plan and runs nothing")
    cfg = os.path.join(runs, "sweep-one", "configs")
    cfg = os.path.join(cfg, sorted(os.listdir(cfg))[0])
    T.run(["train", cfg, "--stop-at", "6", "--quiet"], ranks=1)
    T.check(not os.path.exists(os.path.join(runs, "one-stopped", "DONE")), "the stopped run is not DONE")
    p = sweep_run(one)
    T.check(p.returncode == 0 and "resumable" in p.stdout and "--resume" in p.stdout,
            "the launcher resumes the stopped run with --resume")
    log = open(os.path.join(runs, "sweep-one", "logs", os.path.basename(cfg).replace(".yaml", ".out"))).read()
    T.check("resumed from" in log and "at step 6" in log, "the run log says it resumed at step 6")
    T.check(final(os.path.join(runs, "one-stopped")) == final(os.path.join(runs, "two-p1")),
            f"resumed final loss equals the uninterrupted run's: {final(os.path.join(runs, 'one-stopped'))} vs "
            f"{final(os.path.join(runs, 'two-p1'))}")

    # SIGTERM to the launcher: the trainer checkpoints, the next invocation resumes it
    lng = T.tiny_config(os.path.join(tmp, "long.yaml"), runs, "long", extra="sweep:\n  zip:\n    name: [x]\n")
    text = open(lng).read().replace("steps: 12", "steps: 4000").replace("interval: 0", "interval: 100")
    open(lng, "w").write(text.replace("eval_interval: 6", "eval_interval: 2000").replace("log_interval: 4", "log_interval: 1000"))
    rd = os.path.join(runs, "long-x")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([T.EXE, "sweep", "run", lng, "--launcher", "local"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
    t1 = time.time()
    while time.time() - t1 < 120 and not (os.path.isdir(os.path.join(rd, "ckpt")) and
                                          any(os.path.exists(os.path.join(rd, "ckpt", d, "COMPLETE"))
                                              for d in os.listdir(os.path.join(rd, "ckpt")))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped = not os.path.exists(os.path.join(rd, "DONE"))
    T.check(proc.returncode == 3 and stopped and "stopped after" in out,
            f"SIGTERM: the launcher stops after the trainer checkpointed (rc {proc.returncode}, DONE absent: {stopped})")
    if not T.check(os.path.exists(rd), "the long run folder exists"):
        print(out)
    p = sweep_run(lng)
    T.check(p.returncode == 0 and "resumable" in p.stdout and os.path.exists(os.path.join(rd, "DONE")),
            "the next invocation resumes and completes the signalled run")
    T.check(final(rd)[0] == 4000, f"the resumed run reached step 4000 ({final(rd)})")

    # killed before the first checkpoint: moved aside, started again
    part = T.tiny_config(os.path.join(tmp, "part.yaml"), runs, "part", extra="sweep:\n  zip:\n    name: [y]\n")
    os.makedirs(os.path.join(runs, "part-y"))
    open(os.path.join(runs, "part-y", "metrics.h5"), "w").write("killed before its first checkpoint")
    p = sweep_run(part)
    T.check(p.returncode == 0 and "partial" in p.stdout and os.path.exists(os.path.join(runs, "part-y", "DONE")) and
            os.path.exists(os.path.join(runs, "part-y.partial-1", "metrics.h5")),
            "a partial run folder is moved aside (part-y.partial-1) and the run starts again")

    # a sweep of simulations
    simc = T.tiny_config(os.path.join(tmp, "sim.yaml"), runs, "sim",
                         extra="sim:\n  gpus_per_node: 4\n  tokens_per_rank: 256\n"
                               "sweep:\n  grid:\n    run.mode: [simulate]\n    sim.nodes: [1, 2]\n    parallel.ep_size: [0, 4]\n")
    p = sweep_run(simc)
    T.check(p.returncode == 0, f"simulate sweep exits 0 ({p.stderr.strip()[-300:]})")
    import h5py
    done = [d for d in sorted(os.listdir(runs)) if d.startswith("sim-") and os.path.exists(os.path.join(runs, d, "DONE"))]
    modes = []
    for d in done:
        with h5py.File(os.path.join(runs, d, "metrics.h5"), "r") as f:
            modes.append((f.attrs["mode"], int(f.attrs["world_size"]), int(f.attrs["ep_size"])))
    T.check(len(done) == 4 and all(m[0] == "simulate" for m in modes) and sorted({m[1] for m in modes}) == [4, 8]
            and sorted(m[2] for m in modes) == [4, 4, 4, 8],
            f"4 simulated runs, one per grid point, at 4 and 8 GPUs, EP groups of 4 or all ({modes})")
    one = T.tiny_config(os.path.join(tmp, "sim1.yaml"), runs, "sim1", extra="sim:\n  gpus_per_node: 4\n")
    with open(one) as f:
        text = f.read().replace("  peak_gflops: 100.0\n", "  peak_gflops: 100.0\n  mode: simulate\n")
    with open(one, "w") as f:
        f.write(text)
    p = T.run_plain(["train", one])
    T.check(p.returncode != 0 and "run.mode is simulate" in p.stderr, f"dcmoe train refuses a simulate config ({p.stderr.strip()[:120]})")

    # --pack K (slurm): 6 simulate runs in array tasks of up to 4 (packs.tsv); the array script
    # run by hand for each task (no Slurm needed) completes every run of its line
    pk = T.tiny_config(os.path.join(tmp, "pk.yaml"), runs, "pk",
                       extra="sim:\n  gpus_per_node: 4\n  tokens_per_rank: 128\n"
                             "sweep:\n  grid:\n    run.mode: [simulate]\n    sim.nodes: [1, 2]\n    sim.samples: [1, 2, 3]\n")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([T.EXE, "sweep", "run", pk, "--launcher", "slurm", "--dry-run", "--pack", "4"], capture_output=True,
                       text=True, env=env, cwd=tmp)
    pdir = os.path.join(runs, "sweep-pk")
    packs = open(os.path.join(pdir, "packs.tsv")).read().splitlines() if os.path.exists(os.path.join(pdir, "packs.tsv")) else []
    T.check(p.returncode == 0 and packs == ["task\tindices", "0\t0,1,2,3", "1\t4,5"] and "--array=0-1" in p.stdout
            and "DCMOE_PACKS=" + os.path.join(pdir, "packs.tsv") in p.stdout,
            f"--pack 4: 6 runs in 2 array tasks ({packs}; {p.stderr.strip()[-200:]})")
    for task in ("0", "1"):
        q = subprocess.run(["bash", os.path.join(T.SRC, "slurm", "sweep-array.sbatch"), pdir], capture_output=True, text=True,
                           env=dict(env, DCMOE_ROOT=T.SRC, DCMOE_EXE=T.EXE, DCMOE_PACKS=os.path.join(pdir, "packs.tsv"),
                                    SLURM_ARRAY_TASK_ID=task), timeout=300)
        T.check(q.returncode == 0, f"packed task {task} exits 0 ({q.stderr.strip()[-200:]})")
    pdone = [d for d in os.listdir(runs) if d.startswith("pk-") and os.path.exists(os.path.join(runs, d, "DONE"))]
    T.check(len(pdone) == 6, f"every packed run complete ({len(pdone)} of 6)")
    p = subprocess.run([T.EXE, "sweep", "run", pk, "--launcher", "slurm", "--dry-run", "--pack", "4"], capture_output=True,
                       text=True, env=env, cwd=tmp)
    T.check("every run is complete" in p.stdout, "--pack: a complete sweep submits only the report")

    chain(tmp, runs)

    # errors
    p = sweep_run(sw, "--pack", "0")
    T.check(p.returncode == 2 and "--pack 0" in p.stderr, f"--pack 0 is refused ({p.stderr.strip()})")
    p = sweep_run(sw.replace("two.yaml", "two.yaml"), "--throttle", "0")
    T.check(p.returncode == 2 and "--throttle 0" in p.stderr, f"--throttle 0 is refused ({p.stderr.strip()})")
    p = subprocess.run([T.EXE, "sweep", "run", sw, "--launcher", "pbs"], capture_output=True, text=True)
    T.check(p.returncode == 2 and "allowed: local, slurm" in p.stderr, f"--launcher pbs is refused ({p.stderr.strip()})")
    p = subprocess.run([T.EXE, "sweep", "run", sw], capture_output=True, text=True)
    T.check(p.returncode == 2 and "--launcher" in p.stderr, "a missing --launcher is refused")
    print(f"# launcher tests took {time.time() - t0:.1f} s", flush=True)
    T.finish()


if __name__ == "__main__":
    main()
