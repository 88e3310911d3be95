"""Slurm integration against a real one-node Slurm started by tests/slurm_harness.py (as root):
  1. slurm/run.sbatch runs a tiny run to completion (DONE, every step logged);
  2. `dcmoe sweep run --launcher slurm --throttle 1` submits one array (one task per run) and a
     report job that depends on it; both runs complete and the report is written;
  3. forced preemption: `scontrol requeue` of a running job; the requeued job resumes from a
     complete checkpoint and ends with exactly the final loss of an uninterrupted run;
  4. the pre-timeout path: USR1 to the batch shell (what --signal=B:USR1@90 sends) makes the
     trainer checkpoint and the script requeue the job, which then resumes and finishes with the
     uninterrupted final loss;
  5. the same through a real time limit (--time=2 --signal=B:USR1@80).
  6. a chained sweep (train, then simulate its trace): the simulations' array waits for the
     trained runs' array (--dependency=afterok) and every run completes.
  0. (no Slurm) a USR1 before the trainer starts leaves the job script alive and requeues it.
Skips (77) when not root or Slurm is not installed."""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testlib as T  # noqa: E402
import signal  # noqa: E402
from slurm_harness import SlurmCluster  # noqa: E402


def final_loss(run_dir):
    s, v = T.series(os.path.join(run_dir, "metrics.h5"), "train/loss")
    return int(s[-1]), float(v[-1])


def long_config(tmp, name):
    cfg = T.tiny_config(os.path.join(tmp, name + ".yaml"), os.path.join(tmp, "runs"), name)
    text = open(cfg).read()
    text = text.replace("steps: 12", "steps: 1500").replace("interval: 0", "interval: 100")
    text = text.replace("eval_interval: 6", "eval_interval: 1000").replace("log_interval: 4", "log_interval: 500")
    text = text.replace("keep: 3", "keep: 2")
    open(cfg, "w").write(text)
    return cfg


def has_checkpoint(run_dir):
    ck = os.path.join(run_dir, "ckpt")
    return os.path.isdir(ck) and any(os.path.exists(os.path.join(ck, d, "COMPLETE")) for d in os.listdir(ck))


def wait_for(cond, timeout, step=0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(step)
    return False


def show(path):
    if os.path.exists(path):
        print("# --- " + path + "\n" + "".join("# " + l for l in open(path).readlines()[-25:]), flush=True)


def early_signal(tmp):
    """a USR1 that reaches the job script before the trainer starts is remembered (not bash's
    default, which kills the script): no trainer starts and the job requeues. No Slurm needed: a
    fake scontrol records what the script asks of it."""
    fake = os.path.join(tmp, "fakebin")
    os.makedirs(fake, exist_ok=True)
    calls = os.path.join(tmp, "scontrol.calls")
    with open(os.path.join(fake, "scontrol"), "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >> {calls}\n')
    os.chmod(os.path.join(fake, "scontrol"), 0o755)
    script = (f'. {T.SRC}/slurm/dcmoe-job.sh; kill -USR1 $$; '
              f'dcmoe_train cfg.yaml 1 {tmp}/runs/early; echo "rc=$?"')
    env = dict(os.environ, PATH=fake + os.pathsep + os.environ["PATH"], SLURM_JOB_ID="4242",
               DCMOE_EXE="/bin/false", DCMOE_ROOT=T.SRC)
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    asked = open(calls).read() if os.path.exists(calls) else ""
    T.check(r.returncode == 0 and "rc=0" in r.stdout and "not starting it" in r.stdout and
            "requeue 4242" in asked and "train cfg.yaml" not in r.stdout,
            "early USR1: the job script survives it, starts no trainer and requeues the job")
    if T.failures:
        print("# " + r.stdout.replace("\n", "\n# ") + r.stderr, flush=True)


def chained_sweep(sc, tmp):
    """6. train small, then simulate: two arrays, the second with afterok on the first"""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_launcher import CHAIN
    cfg = T.tiny_config(os.path.join(tmp, "chain.yaml"), os.path.join(tmp, "runs"), "ch", extra=CHAIN)
    text = open(cfg).read().replace("  kind: standard\n", "  kind: clustered\n  n_groups: 2\n  top_groups: 1\n  rank: 4\n")
    open(cfg, "w").write(text)
    p = subprocess.run([T.EXE, "sweep", "run", cfg, "--launcher", "slurm"], cwd=tmp, env=sc.env, capture_output=True,
                       text=True, timeout=60)
    print("".join("# " + l + "\n" for l in p.stdout.splitlines()), flush=True)
    arrs = re.findall(r"submitted job array (\d+)", p.stdout)
    rep = re.search(r"submitted report job (\d+)", p.stdout)
    if not T.check(p.returncode == 0 and len(arrs) == 2 and rep, f"chained sweep: two arrays and a report ({p.stderr.strip()})"):
        return
    dep = sc.job_info(arrs[1]).get("Dependency", "")
    T.check(f"afterok:{arrs[0]}" in dep, f"the simulations' array waits for the trained runs' array ({dep})")
    st0 = sc.wait_job(arrs[0], 240)
    st1 = sc.wait_job(arrs[1], 240)
    sc.wait_job(rep.group(1), 240)
    T.check(len(st0) == 2 and len(st1) == 2 and all(v == "COMPLETED" for v in list(st0.values()) + list(st1.values())),
            f"chained sweep: every task completed ({st0}, {st1})")
    names = ["ch-train-g2", "ch-train-g4", "ch-sim-g2", "ch-sim-g4"]
    T.check(all(os.path.exists(os.path.join(tmp, "runs", n, "DONE")) for n in names), "chained sweep: all 4 runs DONE")
    t_done = os.path.getmtime(os.path.join(tmp, "runs", "ch-train-g4", "DONE"))
    t_sim = os.path.getmtime(os.path.join(tmp, "runs", "ch-sim-g2", "metrics.h5"))
    T.check(t_sim >= t_done, "the simulations ran after the trained runs were complete")


def main():
    tmp = T.tmpdir("dcmoe-slurm-test-")
    os.chmod(tmp, 0o755)
    early_signal(tmp)
    env_extra = {"DCMOE_ROOT": T.SRC, "DCMOE_EXE": T.EXE, "OPENBLAS_NUM_THREADS": "1"}
    export = "--export=ALL," + ",".join(f"{k}={v}" for k, v in env_extra.items())
    t_all = time.time()
    with SlurmCluster() as sc:
        sc.env.update(env_extra)
        print(f"# test Slurm up in {time.time() - t_all:.1f} s ({sc.dir})", flush=True)

        # 1. one run through slurm/run.sbatch
        cfg = T.tiny_config(os.path.join(tmp, "single.yaml"), os.path.join(tmp, "runs"), "single")
        out = os.path.join(tmp, "single.out")
        job = sc.sbatch([export, f"--chdir={tmp}", f"--output={out}", "--ntasks=2",
                         os.path.join(T.SRC, "slurm", "run.sbatch"), cfg])
        st = sc.wait_job(job, 180)
        ok = T.check(st.get(job) == "COMPLETED", f"run.sbatch job {job} completed ({st})")
        rd = os.path.join(tmp, "runs", "single")
        T.check(os.path.exists(os.path.join(rd, "DONE")), "run.sbatch: the run folder holds DONE")
        log = open(out).read() if os.path.exists(out) else ""
        T.check("MPI launch: mpirun (DCMOE_MPI_LAUNCH=auto, MpiDefault=none)" in log,
                "DCMOE_MPI_LAUNCH=auto picks mpirun where MpiDefault=none")
        if ok:
            s, _ = T.series(os.path.join(rd, "metrics.h5"), "train/loss")
            T.check(list(s) == list(range(1, 13)), "run.sbatch: 12 steps logged")
        else:
            show(out)

        print(f"# [{time.time() - t_all:.1f} s] run.sbatch done", flush=True)
        # 2. a sweep through the Slurm launcher: one array + a dependent report job
        sweep = T.tiny_config(os.path.join(tmp, "sw.yaml"), os.path.join(tmp, "runs"), "sw",
                              extra="sweep:\n  zip:\n    ranks: [1, 2]\n    name: [r1, r2]\n")
        p = subprocess.run([T.EXE, "sweep", "run", sweep, "--launcher", "slurm", "--throttle", "1"],
                           cwd=tmp, env=sc.env, capture_output=True, text=True, timeout=60)
        print("".join("# " + l + "\n" for l in p.stdout.splitlines()), flush=True)
        T.check(p.returncode == 0, f"sweep run --launcher slurm exits 0 ({p.stderr.strip()})")
        m_arr = re.search(r"submitted job array (\d+)", p.stdout)
        m_rep = re.search(r"submitted report job (\d+)", p.stdout)
        if T.check(m_arr is not None and m_rep is not None, "the launcher prints the array and report job ids"):
            arr, rep = m_arr.group(1), m_rep.group(1)
            info = sc.job_info(rep)
            T.check(f"afterany:{arr}" in info.get("Dependency", ""),
                    f"report job {rep} depends on the array ({info.get('Dependency')})")
            st = sc.wait_job(arr, 240)
            T.check(len(st) == 2 and all(v == "COMPLETED" for v in st.values()), f"array tasks completed: {st}")
            arr_info = sc.job_info(arr)
            T.check("%1" in arr_info.get("ArrayTaskThrottle", "") or arr_info.get("ArrayTaskThrottle") == "1",
                    f"array throttle 1 ({arr_info.get('ArrayTaskThrottle')})")
            st = sc.wait_job(rep, 240)
            T.check(st.get(rep) == "COMPLETED", f"report job completed ({st})")
            sdir = os.path.join(tmp, "runs", "sweep-sw")
            for n in ("sw-r1", "sw-r2"):
                T.check(os.path.exists(os.path.join(tmp, "runs", n, "DONE")), f"sweep run {n} DONE")
            rep_html = os.path.join(sdir, "report", "report.html")
            if not T.check(os.path.exists(rep_html) and os.path.getsize(rep_html) > 1000,
                           "the report job wrote report/report.html"):
                for f in sorted(os.listdir(os.path.join(sdir, "logs"))):
                    show(os.path.join(sdir, "logs", f))
            # a second submission skips the complete runs: only the report is submitted
            p2 = subprocess.run([T.EXE, "sweep", "run", sweep, "--launcher", "slurm"], cwd=tmp, env=sc.env,
                                capture_output=True, text=True, timeout=60)
            T.check("every run is complete" in p2.stdout and "submitted job array" not in p2.stdout,
                    "a second sweep submission submits no array (every run DONE)")
            m2 = re.search(r"submitted report job (\d+)", p2.stdout)
            if m2:
                sc.wait_job(m2.group(1), 120)

        print(f"# [{time.time() - t_all:.1f} s] sweep done", flush=True)
        chained_sweep(sc, tmp)
        print(f"# [{time.time() - t_all:.1f} s] chained sweep done", flush=True)
        # reference: the same long run uninterrupted, outside Slurm, same rank count
        ref_cfg = long_config(tmp, "ref")
        t0 = time.time()
        T.run(["train", ref_cfg, "--quiet"], ranks=2)
        t_ref = time.time() - t0
        ref_step, ref_loss = final_loss(os.path.join(tmp, "runs", "ref"))
        print(f"# uninterrupted reference: step {ref_step} loss {ref_loss!r} ({t_ref:.1f} s)", flush=True)

        # 3. forced preemption with scontrol requeue, and 4. the USR1 path
        for name, how in (("requeued", "requeue"), ("signalled", "usr1")):
            cfg = long_config(tmp, name)
            # same config as the reference apart from run.name
            open(cfg, "w").write(open(ref_cfg).read().replace("name: ref", f"name: {name}"))
            rd = os.path.join(tmp, "runs", name)
            out = os.path.join(tmp, name + ".out")
            job = sc.sbatch([export, f"--chdir={tmp}", f"--output={out}", "--ntasks=2",
                             os.path.join(T.SRC, "slurm", "run.sbatch"), cfg])
            if not T.check(wait_for(lambda: has_checkpoint(rd), 120), f"{how}: job {job} wrote a checkpoint"):
                show(out)
                continue
            if how == "requeue":
                sc.run(["scontrol", "requeue", job])
            else:
                sc.run(["scancel", "--signal=USR1", "--batch", job])
            st = sc.wait_job(job, 240)
            info = sc.job_info(job)
            T.check(st.get(job) == "COMPLETED", f"{how}: job {job} completed after the interruption ({st})")
            T.check(int(info.get("Restarts", "0")) >= 1, f"{how}: the job was requeued (Restarts={info.get('Restarts')})")
            log = open(out).read() if os.path.exists(out) else ""
            resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
            T.check(len(resumed) >= 1 and 0 < int(resumed[-1]) < ref_step,
                    f"{how}: the requeued job resumed from a checkpoint mid-run (steps {resumed})")
            if how == "usr1":
                T.check("signal SIGUSR1 received: checkpoint written" in log and "requeueing job" in log,
                        "usr1: the trainer checkpointed on the signal and the script requeued the job")
            if os.path.exists(os.path.join(rd, "metrics.h5")):
                step, loss = final_loss(rd)
                T.check(step == ref_step and loss == ref_loss,
                        f"{how}: final loss {loss!r} at step {step} equals the uninterrupted {ref_loss!r}")
            if T.failures:
                show(out)
            print(f"# [{time.time() - t_all:.1f} s] {how} done", flush=True)

        # 5. the real time-limit path: --time=2 --signal=B:USR1@80. slurmctld checks time limits
        # every 30 s and signals a job once its end is less than 80 + 30 s away, so USR1 comes
        # 10-40 s into the job: never in its first seconds, where (with --time=1 @50, signalled at
        # the first check) the signal once raced the job's start and was lost, and the job ran
        # into its limit. The script checkpoints and requeues, the requeued job resumes (then it
        # is cancelled: every start would be signalled again before this long run ends)
        cfg = T.tiny_config(os.path.join(tmp, "limit.yaml"), os.path.join(tmp, "runs"), "limit")
        text = open(cfg).read().replace("steps: 12", "steps: 1000000").replace("interval: 0", "interval: 1000")
        open(cfg, "w").write(text.replace("eval_interval: 6", "eval_interval: 0").replace("log_interval: 4", "log_interval: 100000"))
        out = os.path.join(tmp, "limit.out")
        job = sc.sbatch([export, f"--chdir={tmp}", f"--output={out}", "--time=2", "--signal=B:USR1@80",
                         os.path.join(T.SRC, "slurm", "run.sbatch"), cfg])
        resumed = wait_for(lambda: os.path.exists(out) and "resumed from" in open(out).read(), 200, 0.5)
        log = open(out).read() if os.path.exists(out) else ""
        sc.run(["scancel", job], check=False)
        T.check(resumed and "received SIGUSR1" in log and "signal SIGUSR1 received: checkpoint written" in log and
                "requeueing job" in log, "time limit: USR1 before the limit -> checkpoint -> requeue -> resumed")
        if not resumed:
            show(out)
        print(f"# [{time.time() - t_all:.1f} s] time-limit signal done", flush=True)
        if T.failures:
            print(sc.logs(), flush=True)
    # a trainer whose job was cancelled while it ran can outlive the job when the daemons stop
    # (proctrack/linuxproc): stop every process of this test (its command line names our folder)
    left = reap(tmp)
    print(f"# processes of this test still running at the end, stopped: {left}", flush=True)
    print(f"# Slurm tests took {time.time() - t_all:.1f} s", flush=True)
    T.finish()


def reap(tag):
    """SIGTERM, then SIGKILL, every process whose command line contains tag; returns how many"""
    def pids():
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if tag in cmd:
                out.append(int(d))
        return out
    found = pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while pids() and time.time() - t0 < 10:
            time.sleep(0.2)
    return len(found)


if __name__ == "__main__":
    main()
