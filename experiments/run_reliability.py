#!/usr/bin/python3
"""Reliability campaign (issue 10): kill -9, a rank dies, disk full.

1. kill -9: an uninterrupted 2-rank run of experiments/reliability.yaml is the reference. Each
   trial starts the same run, SIGKILLs mpirun or one rank at a moment drawn from the trial's
   seed (a random delay, the creation of a .tmp_step_* checkpoint folder, the publication of a
   step_* folder, the pruning of one, an HDF5 write of metrics.h5, just after the final
   checkpoint), waits until every process of the job is gone, checks the run folder (every
   metrics*.h5 opens with h5py in SWMR read mode and reads whole; every step_* folder holding
   COMPLETE verifies: COMPLETE text, model.bin magic, version, section CRCs, step, rank count),
   and restarts with `--resume`, until a launch ends by itself with DONE. The finished run must
   equal the reference bitwise (final checkpoint's params.* / adam_*.* sections, train/loss
   steps and values), hold the reference's eval/* rows once and one final/* row each; a last
   `--resume` of the finished run must exit 0 and leave metrics.h5 unchanged.
2. a rank dies: SIGKILL one rank (not mpirun) after the first checkpoints; mpirun must end the
   job within seconds, non-zero, naming the lost rank and its pid; every checkpoint verifies.
3. disk full: the run folder on a small tmpfs (root: mount -t tmpfs; skipped when mount is
   refused): the third checkpoint or a log flush (checkpoint.interval 0) runs out of space;
   the run must exit non-zero soon with an error saying so, leave earlier checkpoints and the
   log readable, and `--resume` after `mount -o remount,size=...` must finish bitwise equal to
   the reference. The offload file tier: an unwritable offload.dir, and one out of space.

usage: nice -n 10 /usr/bin/python3 experiments/run_reliability.py [--trials 100] [--seed 1]
           [--rank-trials 10] [--time-budget SECONDS] [--work runs/reliability] [--no-disk]
       /usr/bin/python3 experiments/run_reliability.py --render-only [--out DIR]
The run step writes results/reliability.{csv,meta.json} and renders results/reliability.md,
which also includes results/reliability.notes.md (by hand) and results/reliability-fuzz.csv
(the fuzzing campaign, when present). --time-budget stops starting kill trials once spent (the
file states the number run). Run from anywhere; needs build/dcmoe, mpirun, h5py and numpy.
tests/test_reliability.py imports this module for its short version."""
import argparse
import csv
import ctypes
import hashlib
import os
import platform
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resultslib as rl  # noqa: E402

ROOT = rl.ROOT
NAME = "reliability"
SCRIPT = "experiments/run_reliability.py"
EXE = os.environ.get("DCMOE_EXE", os.path.join(ROOT, "build", "dcmoe"))
CONFIG = os.path.join(ROOT, "experiments", "reliability.yaml")
RUN_NAME = "reliability"      # run.name in experiments/reliability.yaml
STEPS = 48                     # train.steps there
CKPT_INTERVAL = 4              # checkpoint.interval there
MAX_LAUNCHES = 12              # a trial gives up after this many launches
CSV_COLUMNS = ["part", "case", "seed", "kills", "moments", "launches", "recovery", "bitwise_equal", "eval_rows_ok",
               "final_once", "h5_always_readable", "bad_checkpoint_seen", "done_resume_ok", "exit_s", "passed",
               "symptom"]

# ---------------------------------------------------------------------------------------------
# inotify (Linux), to kill at file-system events: a checkpoint folder appearing, an HDF5 write

IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    def __init__(self):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.paths = {}

    def add(self, path, mask=IN_MODIFY | IN_MOVED_TO | IN_CREATE):
        if path in self.paths.values():
            return True
        wd = _libc.inotify_add_watch(self.fd, path.encode(), ctypes.c_uint32(mask))
        if wd >= 0:
            self.paths[wd] = path
        return wd >= 0

    def read(self, timeout):
        """[(folder, name, mask)] of the events ready within timeout seconds"""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return []
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, off = [], 0
        while off + 16 <= len(buf):
            wd, mask, _cookie, n = struct.unpack_from("iIII", buf, off)
            name = buf[off + 16:off + 16 + n].split(b"\0")[0].decode(errors="replace")
            off += 16 + n
            if wd in self.paths:
                out.append((self.paths[wd], name, mask))
        return out

    def close(self):
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# processes of one job: mpirun is started in a new session, its ranks inherit the session id

def session_procs(sid):
    """{pid: (comm, state)} of the live processes in session sid"""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out[int(d)] = (comm, fields[0])
    return out


def rank_pids(sid):
    """{rank: pid} of the dcmoe processes of the job"""
    out = {}
    for pid, (comm, _) in session_procs(sid).items():
        if comm != "dcmoe":
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=", 1)[1])] = pid
    return out


def wait_session_gone(sid, timeout):
    """seconds until no process of the session is left, or None (still alive after timeout)"""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not session_procs(sid):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def kill_session(sid):
    for pid in session_procs(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def mpirun_cmd(cfg, out_dir, sets, resume, quiet=True, ranks=2):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), EXE, "train", cfg,
           "--set", f"run.out_dir={out_dir}"]
    for s in sets:
        cmd += ["--set", s]
    if quiet:
        cmd.append("--quiet")
    if resume:
        cmd.append("--resume")
    return cmd


def job_env():
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    return env


class Launch:
    """one mpirun of dcmoe train, optionally SIGKILLed at a planned moment.
    plan: {"target": "mpirun" | "rank0" | "rank1", "moment": "delay" | "ckpt_write" | "publish" |
           "prune" | "h5_write" | "final", "k": n-th matching event, "after": seconds after it}"""

    def __init__(self, log_prefix, cfg, out_dir, sets=(), resume=False, quiet=True, args=()):
        self.log_prefix, self.out_dir = log_prefix, out_dir
        self.run_dir = os.path.join(out_dir, RUN_NAME)
        self.cmd = mpirun_cmd(cfg, out_dir, list(sets), resume, quiet) + list(args)
        self.killed = None          # description of the kill, if one happened
        self.kill_target_pid = None
        self.rc = None
        self.exit_s = None          # seconds from the kill to mpirun's exit
        self.gone_s = None          # seconds from the kill until no process of the job was left
        self.orphans_killed = 0     # processes still alive 15 s after the kill (then SIGKILLed)
        self.event = ""             # the file-system event the kill followed
        self.acted = False          # a plan with an action (not a kill) was carried out

    def run(self, plan=None, timeout=300):
        os.makedirs(self.out_dir, exist_ok=True)
        out = open(self.log_prefix + ".out", "w")
        err = open(self.log_prefix + ".err", "w")
        ckpt_dir = os.path.join(self.run_dir, "ckpt")
        before = set(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else set()
        t0 = time.monotonic()
        p = subprocess.Popen(self.cmd, stdout=out, stderr=err, start_new_session=True, env=job_env(), cwd=ROOT)
        sid = p.pid
        try:
            if plan is None:
                self.rc = p.wait(timeout=timeout)
            else:
                self._watch(p, sid, plan, t0, timeout, before)
        except subprocess.TimeoutExpired:
            kill_session(sid)
            p.wait()
            self.rc = "timeout"
        finally:
            out.close()
            err.close()
        if wait_session_gone(sid, 2.0) is None:   # a normal exit leaves nothing behind
            kill_session(sid)
            self.orphans_killed += 1
        return self

    def _watch(self, p, sid, plan, t0, timeout, before):
        ino = Inotify()
        ckpt_dir = os.path.join(self.run_dir, "ckpt")
        count, fire_at = 0, None
        if plan["moment"] == "delay":
            fire_at = t0 + plan["after"]

        def matches(folder, name, mask):
            m = plan["moment"]
            if m == "progress":
                return False
            if m == "h5_write":
                return folder == self.run_dir and name == "metrics.h5" and mask & IN_MODIFY
            if folder != ckpt_dir:
                return False
            if m == "ckpt_write":
                return mask & IN_CREATE and name.startswith(".tmp_step_")
            if m == "publish":
                return mask & IN_MOVED_TO and name.startswith("step_")
            if m == "prune":
                return mask & IN_MOVED_TO and name.startswith(".del_step_")
            if m == "final":
                return mask & IN_MOVED_TO and name == f"step_{STEPS:08d}"
            return False

        def watch_tree():
            ev = []
            ino.add(self.out_dir)
            if os.path.isdir(self.run_dir):
                ino.add(self.run_dir)
            if os.path.isdir(ckpt_dir) and ckpt_dir not in ino.paths.values():
                ino.add(ckpt_dir)
                # entries made after the launch but before the watch existed count as events
                # (mkdir ckpt, then .tmp_step_ at once)
                for n in sorted(set(os.listdir(ckpt_dir)) - before):
                    ev.append((ckpt_dir, n, IN_CREATE if n.startswith(".tmp_") else IN_MOVED_TO))
            return ev

        pending = watch_tree()
        try:
            while p.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise subprocess.TimeoutExpired(self.cmd, timeout)
                if plan and plan["moment"] == "progress" and fire_at is None:
                    with open(self.log_prefix + ".out", errors="replace") as f:
                        if last_progress_step(f.read()) >= plan["k"]:
                            fire_at = time.monotonic()
                if fire_at is not None and time.monotonic() >= fire_at:
                    if "action" in plan:      # not a kill: do it once and watch on
                        plan["action"]()
                        plan, fire_at = None, None
                        self.acted = True
                        continue
                    self._kill(p, sid, plan, t0)
                    return
                wait = 0.005 if fire_at is None else max(0.0, min(0.005, fire_at - time.monotonic()))
                events = pending + ino.read(wait)
                pending = []
                for folder, name, mask in events:
                    if (folder == self.out_dir and name == RUN_NAME) or (folder == self.run_dir and name == "ckpt"):
                        pending += watch_tree()
                    if plan and fire_at is None and matches(folder, name, mask):
                        count += 1
                        if count == plan["k"]:
                            fire_at = time.monotonic() + plan["after"]
                            self.event = f"{name}"
                if plan and fire_at is not None and time.monotonic() >= fire_at and "action" not in plan:
                    self._kill(p, sid, plan, t0)
                    return
            self.rc = p.returncode
        finally:
            ino.close()

    def _kill(self, p, sid, plan, t0):
        target, pid = plan["target"], p.pid
        if target.startswith("rank"):
            pid = rank_pids(sid).get(int(target[4:]))
            if pid is None:          # not started yet (or already gone): the launcher instead
                target, pid = "mpirun", p.pid
        t_kill = time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.kill_target_pid = pid
        where = f"{plan['moment']}" + (f"#{plan['k']}:{self.event}" if plan["moment"] != "delay" else "")
        self.killed = f"{target}@{where}+{t_kill - t0:.2f}s"
        try:
            self.rc = p.wait(timeout=30)
            self.exit_s = time.monotonic() - t_kill
        except subprocess.TimeoutExpired:
            self.rc = "hung"
        gone = wait_session_gone(sid, 15.0)
        if gone is None:
            kill_session(sid)
            self.orphans_killed += 1
            wait_session_gone(sid, 5.0)
        self.gone_s = time.monotonic() - t_kill

    def text(self, which):
        with open(self.log_prefix + "." + which, errors="replace") as f:
            return f.read()

    def last_error(self):
        """dcmoe's last error line (else mpirun's first complaint, else the last line)"""
        lines = [ln.strip() for ln in self.text("err").splitlines() if ln.strip()]
        ours = [ln for ln in lines if ln.startswith("dcmoe:") and "error" in ln] or [ln for ln in lines if ln.startswith("dcmoe")]
        theirs = [ln for ln in lines if "mpirun noticed" in ln or "aborted" in ln]
        pick = ours[-1] if ours else theirs[0] if theirs else lines[-1] if lines else f"rc {self.rc}, nothing on stderr"
        return pick[:240]


# ---------------------------------------------------------------------------------------------
# checks of a run folder

def verify_checkpoint(ck_dir):
    """None if the checkpoint folder verifies (the format at the top of src/checkpoint.c), else
    what is wrong"""
    try:
        with open(os.path.join(ck_dir, "COMPLETE"), "rb") as f:
            marker = f.read(200).decode(errors="replace")
    except OSError as e:
        return f"COMPLETE unreadable: {e}"
    m = re.fullmatch(r"step (\d+) ranks (\d+)\n?", marker)
    if not m:
        return f"COMPLETE holds {marker[:40]!r}, expected 'step N ranks P'"
    step, ranks = int(m.group(1)), int(m.group(2))
    try:
        with open(os.path.join(ck_dir, "model.bin"), "rb") as f:
            img = f.read()
    except OSError as e:
        return f"model.bin unreadable: {e}"
    if len(img) < 16 or img[:8] != b"DCMOECK1":
        return f"model.bin: bad magic ({len(img)} bytes)"
    ver, n_sec = struct.unpack_from("<II", img, 8)
    if ver != 1:
        return f"model.bin: version {ver}"
    off, sec = 16, {}
    for i in range(n_sec):
        if off + 64 > len(img):
            return f"model.bin: truncated at section {i + 1} of {n_sec}"
        name = img[off:off + 48].split(b"\0")[0].decode(errors="replace")
        n, crc = struct.unpack_from("<QI", img, off + 48)
        off += 64
        if n > len(img) - off:
            return f"model.bin: section {name} truncated"
        if zlib.crc32(img[off:off + n]) != crc:
            return f"model.bin: CRC mismatch in section {name}"
        sec[name] = img[off:off + n]
        off += n
    if off != len(img):
        return f"model.bin: {len(img) - off} trailing bytes"
    if "pos" not in sec or len(sec["pos"]) < 8:
        return "model.bin: no pos section"
    pos_step = struct.unpack_from("<q", sec["pos"])[0]
    if pos_step != step:
        return f"COMPLETE says step {step}, model.bin holds {pos_step}"
    if "ranks" in sec and struct.unpack_from("<i", sec["ranks"])[0] != ranks:
        return f"COMPLETE says {ranks} ranks, model.bin {struct.unpack_from('<i', sec['ranks'])[0]}"
    if os.path.basename(ck_dir) != f"step_{step:08d}":
        return f"folder name vs step {step}"
    return None


def checkpoint_sections(ck_dir):
    return rl_read_sections(os.path.join(ck_dir, "model.bin"))


def rl_read_sections(path):
    with open(path, "rb") as f:
        img = f.read()
    n_sec = struct.unpack_from("<I", img, 12)[0]
    off, out = 16, {}
    for _ in range(n_sec):
        name = img[off:off + 48].split(b"\0")[0].decode()
        n = struct.unpack_from("<Q", img, off + 48)[0]
        off += 64
        out[name] = img[off:off + n]
        off += n
    return out


def complete_checkpoints(run_dir):
    d = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d)
                  if n.startswith("step_") and "." not in n and os.path.exists(os.path.join(d, n, "COMPLETE")))


def bad_checkpoints(run_dir):
    out = []
    for ck in complete_checkpoints(run_dir):
        why = verify_checkpoint(ck)
        if why:
            out.append(f"{os.path.basename(ck)}: {why}")
    return out


def newest_good_checkpoint(run_dir):
    good = [ck for ck in complete_checkpoints(run_dir) if verify_checkpoint(ck) is None]
    return good[-1] if good else None


def h5_problems(run_dir):
    """what fails when every metrics*.h5 of the folder is opened (SWMR read) and read whole;
    also rows with a negative step"""
    import h5py
    out = []
    if not os.path.isdir(run_dir):
        return out
    for n in sorted(os.listdir(run_dir)):
        if not (n.startswith("metrics") and n.endswith(".h5")):
            continue
        path = os.path.join(run_dir, n)
        try:
            with h5py.File(path, "r", swmr=True) as f:
                bad = []

                def visit(name, obj):
                    if isinstance(obj, h5py.Dataset):
                        a = obj[()]
                        if name.endswith("/step") and len(a) and a.min() < 0:
                            bad.append(f"{name} holds step {a.min()}")
                f.visititems(visit)
                out += [f"{n}: {b}" for b in bad]
        except Exception as e:  # noqa: BLE001 (any failure to read is the finding)
            out.append(f"{n}: {type(e).__name__}: {str(e)[:160]}")
    return out


def read_series(h5path):
    """{series: (steps, values)} of every series in the file"""
    import h5py
    import numpy as np
    out = {}
    with h5py.File(h5path, "r", swmr=True) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "step" in obj and "value" in obj:
                out[name] = (np.array(obj["step"][()]), np.array(obj["value"][()]))
        f.visititems(visit)
    return out


def run_state(run_dir, steps=STEPS):
    """what the comparison with the reference uses"""
    st = {"series": {}, "sections": {}, "steps": steps}
    h5 = os.path.join(run_dir, "metrics.h5")
    if os.path.exists(h5):
        st["series"] = read_series(h5)
    ck = os.path.join(run_dir, "ckpt", f"step_{steps:08d}")
    if os.path.exists(os.path.join(ck, "COMPLETE")) and verify_checkpoint(ck) is None:
        st["sections"] = checkpoint_sections(ck)
    return st


def compare(ref, run_dir):
    """(bitwise_equal, eval_rows_ok, final_once, what differs)"""
    import numpy as np
    got = run_state(run_dir, ref["steps"])
    diffs = []
    par = [k for k in ref["sections"] if k.startswith(("params.", "adam_m.", "adam_v."))]
    if not got["sections"]:
        diffs.append(f"no verifying final checkpoint step_{ref['steps']:08d}")
    else:
        d = [k for k in par if got["sections"].get(k) != ref["sections"][k]]
        if d:
            diffs.append("final checkpoint differs in " + ",".join(d))
    rs, gs = ref["series"], got["series"]
    if "train/loss" not in gs:
        diffs.append("no train/loss")
    else:
        if not np.array_equal(rs["train/loss"][0], gs["train/loss"][0]):
            diffs.append(f"train/loss steps differ ({len(gs['train/loss'][0])} rows vs {len(rs['train/loss'][0])})")
        elif not np.array_equal(rs["train/loss"][1], gs["train/loss"][1]):
            diffs.append("train/loss values differ")
    bitwise = not diffs
    eval_ok = True
    for k in [k for k in rs if k.startswith("eval/")]:
        if k not in gs or not np.array_equal(rs[k][0], gs[k][0]) or (k == "eval/loss" and not np.array_equal(rs[k][1], gs[k][1])):
            eval_ok = False
            diffs.append(f"{k}: steps {list(gs[k][0]) if k in gs else None} vs {list(rs[k][0])}")
            break
    final_once = True
    for k in [k for k in rs if k.startswith("final/")]:
        if k not in gs or len(gs[k][0]) != 1 or not np.array_equal(rs[k][1], gs[k][1]):
            final_once = False
            diffs.append(f"{k}: rows {list(gs[k][1]) if k in gs else None} vs {list(rs[k][1])}")
            break
    return bitwise, eval_ok, final_once, "; ".join(diffs)


def file_digest(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. kill -9 trials

def reference(work, sets=(), steps=STEPS):
    """the uninterrupted run (sets must give train.steps=steps when it is not STEPS): its state
    and duration"""
    out = os.path.join(work, "ref")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.monotonic()
    L = Launch(os.path.join(out, "launch0"), CONFIG, out, sets).run()
    dur = time.monotonic() - t0
    run_dir = os.path.join(out, RUN_NAME)
    if L.rc != 0 or not os.path.exists(os.path.join(run_dir, "DONE")):
        raise RuntimeError(f"reference run failed (rc {L.rc}): {L.last_error()} (see {L.log_prefix}.err)")
    st = run_state(run_dir, steps)
    st["duration"] = dur
    st["model_bytes"] = os.path.getsize(os.path.join(run_dir, "ckpt", f"step_{steps:08d}", "model.bin"))
    st["h5_bytes"] = os.path.getsize(os.path.join(run_dir, "metrics.h5"))
    return st


MOMENTS = [("delay", 0.35), ("ckpt_write", 0.2), ("publish", 0.08), ("prune", 0.07), ("h5_write", 0.15),
           ("final", 0.15)]
TARGETS = [("mpirun", 0.4), ("rank0", 0.3), ("rank1", 0.3)]


def _pick(rng, table):
    x, acc = rng.random(), 0.0
    for v, w in table:
        acc += w
        if x < acc:
            return v
    return table[-1][0]


def random_plan(rng, ref_duration):
    m = _pick(rng, MOMENTS)
    plan = {"target": _pick(rng, TARGETS), "moment": m, "k": 1, "after": 0.0}
    if m == "delay":
        plan["after"] = rng.uniform(0.0, ref_duration)
    elif m in ("ckpt_write", "publish", "prune"):
        plan["k"] = rng.randint(1, STEPS // CKPT_INTERVAL - 1)
        plan["after"] = rng.uniform(0.0, 0.004)
    elif m == "h5_write":
        plan["k"] = rng.randint(1, 60)
    else:  # final: just after the last checkpoint (its eval rows, DONE, the log's close)
        plan["after"] = rng.uniform(0.0, 0.05)
    return plan


def kill_trial(ref, work, seed, plans=None, tag=None, keep=False):
    """one trial; plans: an explicit list of kill plans (else 1-3 drawn from the seed).
    Returns the CSV row (dict) plus 'details' (list of strings). The trial's folder is deleted
    when it passed, unless keep."""
    rng = random.Random(seed)
    plans = list(plans) if plans is not None else [random_plan(rng, ref["duration"]) for _ in range(rng.randint(1, 3))]
    out = os.path.join(work, tag or f"trial{seed}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    run_dir = os.path.join(out, RUN_NAME)
    kills, details, recovery, symptoms = [], [], [], []
    h5_bad, ck_bad = [], []
    resume, launches, fails = False, 0, 0
    done = False
    while launches < MAX_LAUNCHES:
        plan = plans[len(kills)] if len(kills) < len(plans) else None
        L = Launch(os.path.join(out, f"launch{launches}"), CONFIG, out, resume=resume)
        L.run(plan)
        launches += 1
        if L.killed:
            kills.append(L.killed)
            if L.orphans_killed:
                details.append(f"{L.killed}: processes still alive 15 s after the kill (SIGKILLed)")
            for b in h5_problems(run_dir):
                h5_bad.append(f"after kill {len(kills)} ({L.killed}): {b}")
            for b in bad_checkpoints(run_dir):
                ck_bad.append(f"after kill {len(kills)} ({L.killed}): {b}")
            resume, fails = True, 0
            continue
        if plan is not None:            # the planned moment never came: the run ended by itself
            plans = plans[:len(kills)]
        if L.rc == 0 and os.path.exists(os.path.join(run_dir, "DONE")):
            done = True
            break
        fails += 1
        msg = L.last_error()
        symptoms.append(f"launch {launches - 1} ({'--resume' if resume else 'fresh'}) exit {L.rc}: {msg}")
        if fails >= 3:
            break
        if resume and newest_good_checkpoint(run_dir) is None:
            # killed before its first checkpoint: try the CLI's fresh start, then a hand cleanup
            if fails == 1:
                recovery.append("fresh start after --resume refused")
                resume = False
            else:
                recovery.append("run folder deleted by hand")
                shutil.rmtree(run_dir, ignore_errors=True)
                resume = False
        elif not resume:
            recovery.append("run folder deleted by hand")
            shutil.rmtree(run_dir, ignore_errors=True)
    row = {"part": "kill", "case": tag or f"trial{seed}", "seed": seed, "kills": len(kills),
           "moments": "; ".join(kills), "launches": launches, "recovery": "; ".join(recovery) or "cli",
           "h5_always_readable": "yes" if not h5_bad else "no",
           "bad_checkpoint_seen": "yes" if ck_bad else "no"}
    if done:
        bitwise, eval_ok, final_once, diffs = compare(ref, run_dir)
        if diffs:
            symptoms.append(diffs)
        # a requeue of the finished run: exit 0, nothing changed
        h5 = os.path.join(run_dir, "metrics.h5")
        before = file_digest(h5)
        L = Launch(os.path.join(out, "done-resume"), CONFIG, out, resume=True).run()
        changed = file_digest(h5) != before
        _, _, final_once2, diffs2 = compare(ref, run_dir)
        done_ok = L.rc == 0 and not changed and final_once2
        if not done_ok:
            symptoms.append(f"--resume of the finished run: exit {L.rc}, metrics.h5 {'changed' if changed else 'unchanged'}"
                            + (f", {diffs2}" if not final_once2 else ""))
    else:
        bitwise = eval_ok = final_once = done_ok = False
        symptoms.append("never reached DONE")
    row.update(bitwise_equal=yn(bitwise), eval_rows_ok=yn(eval_ok), final_once=yn(final_once),
               done_resume_ok=yn(done_ok), exit_s="")
    row["passed"] = yn(bitwise and eval_ok and final_once and done_ok and not h5_bad and not ck_bad
                       and not recovery)
    row["symptom"] = " | ".join(symptoms + h5_bad[:2] + ck_bad[:2])[:600]
    row["details"] = details + h5_bad + ck_bad + symptoms
    if row["passed"] == "yes" and not keep:
        shutil.rmtree(out, ignore_errors=True)   # ~10 MB of checkpoints; failed trials stay
    return row


def yn(b):
    return "yes" if b else "no"


# ---------------------------------------------------------------------------------------------
# 2. a rank dies

def rank_dies_trial(work, seed, rank):
    """SIGKILL one rank after the second checkpoint; mpirun must end the job within seconds,
    non-zero, naming the rank (a wrong pid in the message is noted, not failed: Open MPI 4.1
    prints "PID 0" in some containers); every checkpoint must verify"""
    rng = random.Random(seed)
    out = os.path.join(work, f"rankdies{seed}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    plan = {"target": f"rank{rank}", "moment": "publish", "k": 2, "after": rng.uniform(0.0, 0.2)}
    # a long run, so the kill lands mid-training
    L = Launch(os.path.join(out, "launch0"), CONFIG, out, sets=["train.steps=100000"]).run(plan)
    run_dir = os.path.join(out, RUN_NAME)
    text = L.text("err") + L.text("out")
    named = re.search(rf"rank {rank}\b[^\n]*(PID \d+)", text)
    sym, notes = [], []
    if named and named.group(1) != f"PID {L.kill_target_pid}":
        notes.append(f"note: the message names rank {rank} but '{named.group(1)}', the pid was {L.kill_target_pid}")
    # "within seconds": 1-2 s measured (issue 10); 5 s leaves room for a loaded machine
    ok_exit = L.rc not in (0, None, "hung") and L.exit_s is not None and L.exit_s < 5
    if not L.killed or not L.killed.startswith(f"rank{rank}"):
        sym.append(f"rank {rank} was not killed ({L.killed})")
    if not ok_exit:
        sym.append(f"mpirun exit {L.rc} after {L.exit_s} s")
    if not named:
        m = re.search(r"[^\n]*(noticed|rank)[^\n]*", L.text("err"))
        sym.append(f"stderr does not name rank {rank}: " + (m.group(0)[:200] if m else L.last_error()))
    bad = bad_checkpoints(run_dir)
    newest = newest_good_checkpoint(run_dir)
    if bad or newest is None:
        sym.append(f"checkpoints: {bad or 'none complete'}")
    h5 = h5_problems(run_dir)
    sym += h5
    if L.orphans_killed:
        sym.append("processes still alive 15 s after the kill")
    return {"part": "rank_dies", "case": f"rank{rank}", "seed": seed, "kills": 1, "moments": L.killed or "",
            "launches": 1, "recovery": "", "bitwise_equal": "", "eval_rows_ok": "", "final_once": "",
            "h5_always_readable": yn(not h5), "bad_checkpoint_seen": yn(bool(bad)), "done_resume_ok": "",
            "exit_s": f"{L.exit_s:.2f}" if L.exit_s is not None else "", "passed": yn(not sym),
            "symptom": " | ".join(sym + notes)[:600], "details": sym + notes}


# ---------------------------------------------------------------------------------------------
# 3. disk full

class Tmpfs:
    def __init__(self, path, size):
        self.path, self.mounted = path, False
        os.makedirs(path, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
        self.error = p.stderr.strip() if p.returncode else None
        self.mounted = p.returncode == 0

    def resize(self, size):
        subprocess.run(["mount", "-o", f"remount,size={size}", self.path], check=True, capture_output=True)

    def close(self):
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], capture_output=True)
            self.mounted = False


def tmpfs_permitted(work):
    t = Tmpfs(os.path.join(work, "tmpfs-probe"), "64k")
    ok, err = t.mounted, t.error
    t.close()
    return ok, err


def _disk_row(case, sym, extra=None):
    row = {"part": "disk", "case": case, "seed": "", "kills": "", "moments": "", "launches": "", "recovery": "",
           "bitwise_equal": "", "eval_rows_ok": "", "final_once": "", "h5_always_readable": "",
           "bad_checkpoint_seen": "", "done_resume_ok": "", "exit_s": "", "passed": yn(not sym),
           "symptom": " | ".join(sym)[:600], "details": sym}
    row.update(extra or {})
    return row


def last_progress_step(text):
    steps = [int(m) for m in re.findall(r"^step +(\d+)/", text, re.M)]
    return max(steps) if steps else 0


LOG_STEPS = 300   # the log case: past 256 steps, where every per-step series needs its second chunk


def fill(path, leave):
    """a filler file taking all the free space of the file system of `path` but `leave` bytes"""
    st = os.statvfs(path)
    n = st.f_bavail * st.f_frsize - leave
    with open(os.path.join(path, "filler"), "wb") as f:
        while n > 0:
            k = min(n, 1 << 20)
            f.write(b"\0" * k)
            n -= k


def disk_full_case(ref, work, case):
    """case 'checkpoint': the run folder on a tmpfs with room for the log and two and a half
    checkpoints (keep 2 needs three while saving), so the third checkpoint runs out of space.
    case 'log': checkpoint.interval 0, train.steps 300 and a roomy tmpfs that a filler file fills
    up (16 KiB left) at step 100: the log's per-step series need their second chunk (256 rows
    each) after step 256, and that flush runs out of space. Then the tmpfs is enlarged (the
    filler removed) and --resume must finish the run, bitwise equal to an uninterrupted one."""
    out = os.path.join(work, f"disk-{case}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    S, H = ref["model_bytes"], ref["h5_bytes"]
    mnt = os.path.join(out, "mnt")
    plan, sets = None, []
    if case == "checkpoint":
        size = int(H + 2.5 * S) + 64 * 1024
    else:
        sets = ["checkpoint.interval=0", f"train.steps={LOG_STEPS}"]
        try:
            ref = reference(os.path.join(out, "ref"), sets, LOG_STEPS)
        except RuntimeError as e:
            return _disk_row(case, [f"the {LOG_STEPS}-step reference: {e}"])
        size = 64 << 20
        plan = {"moment": "progress", "k": 100, "after": 0.0, "action": lambda: fill(mnt, 16 << 10)}
    t = Tmpfs(mnt, size)
    if not t.mounted:
        return _disk_row(case, [], {"passed": "skipped", "symptom": f"mount refused: {t.error}"})
    sym = []
    try:
        run_dir = os.path.join(mnt, RUN_NAME)
        L = Launch(os.path.join(out, "launch0"), CONFIG, mnt, sets, quiet=False).run(plan, timeout=180)
        err = L.text("err")
        reached = last_progress_step(L.text("out"))
        steps = ref["steps"]
        if plan and not L.acted:
            sym.append(f"the run ended (exit {L.rc}) before step {plan['k']}, where the disk was to be filled")
        if L.rc == 0:
            sym.append(f"exit 0 on a full disk (reached step {reached})")
        if not re.search(r"No space left|ENOSPC|disk full|out of space", err, re.I):
            sym.append(f"stderr does not say the disk is full: {L.last_error()}")
        if case == "log" and reached >= steps:
            sym.append(f"trained on to step {reached} of {steps} after the log write failed (at step 257)")
        ck_bad = bad_checkpoints(run_dir)
        if ck_bad:
            sym.append(f"bad checkpoint: {ck_bad[0]}")
        if case == "checkpoint" and newest_good_checkpoint(run_dir) is None:
            sym.append("no earlier checkpoint verifies")
        h5 = h5_problems(run_dir)
        sym += [f"log: {h}" for h in h5[:3]]
        if os.path.exists(os.path.join(mnt, "filler")):
            os.unlink(os.path.join(mnt, "filler"))
        t.resize(f"{max(64 << 20, 8 * (S + H))}")
        L2 = Launch(os.path.join(out, "launch1"), CONFIG, mnt, sets, resume=True).run(timeout=180)
        done_ok = L2.rc == 0 and os.path.exists(os.path.join(run_dir, "DONE"))
        if not done_ok:
            sym.append(f"--resume after enlarging the tmpfs: exit {L2.rc}: {L2.last_error()}")
            bitwise = eval_ok = final_once = False
        else:
            bitwise, eval_ok, final_once, diffs = compare(ref, run_dir)
            if diffs:
                sym.append(f"after resume: {diffs}")
        extra = {"launches": 2, "bitwise_equal": yn(bitwise), "eval_rows_ok": yn(eval_ok), "final_once": yn(final_once),
                 "h5_always_readable": yn(not h5), "bad_checkpoint_seen": yn(bool(ck_bad)),
                 "moments": f"first run reached step {reached} of {steps}, exit {L.rc}: {L.last_error()}"[:300]}
        return _disk_row(case, sym, extra)
    finally:
        t.close()


OFFLOAD_SETS = ["moe.kind=clustered", "moe.n_groups=4", "moe.rank=4", "clustering.enabled=false",
                "offload.enabled=true", "offload.idle_steps=1", "offload.max_resident_groups=1", "offload.tier=file"]


def offload_case(work, case):
    """'unwritable': offload.dir below a regular file; 'full': offload.dir on a 16 KiB tmpfs"""
    out = os.path.join(work, f"offload-{case}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t = None
    if case == "unwritable":
        blocker = os.path.join(out, "blocker")
        open(blocker, "w").close()
        odir = os.path.join(blocker, "sub")
    else:
        t = Tmpfs(os.path.join(out, "mnt"), "16k")
        if not t.mounted:
            return _disk_row(f"offload-{case}", [], {"passed": "skipped", "symptom": f"mount refused: {t.error}"})
        odir = t.path
    try:
        L = Launch(os.path.join(out, "launch0"), CONFIG, out, OFFLOAD_SETS + [f"offload.dir={odir}"]).run(timeout=120)
        err = L.text("err")
        sym = []
        if L.rc == 0:
            sym.append("exit 0")
        if "offload" not in err or odir not in err:
            sym.append(f"stderr does not name offload.dir / {odir}: {L.last_error()}")
        if case == "full" and not re.search(r"No space left|ENOSPC|disk full|out of space", err, re.I):
            sym.append("stderr does not say the disk is full")
        return _disk_row(f"offload-{case}", sym, {"moments": f"exit {L.rc}: {L.last_error()}"[:300], "launches": 1})
    finally:
        if t:
            t.close()


# ---------------------------------------------------------------------------------------------
# results

def write_csv(rows, work):
    """the rows, with the work folder's path written as $WORK"""
    with open(os.path.join(rl.RESULTS, NAME + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: v.replace(work, "$WORK") if isinstance(v, str) else v for k, v in r.items()})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_table(rows, cols, heads=None):
    out = ["| " + " | ".join(heads or cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
    return "\n".join(out)


def render(out_dir):
    meta = rl.read_meta(NAME)
    rows = read_csv(os.path.join(rl.RESULTS, NAME + ".csv"))
    kill = [r for r in rows if r["part"] == "kill"]
    rank = [r for r in rows if r["part"] == "rank_dies"]
    disk = [r for r in rows if r["part"] == "disk"]
    L = ["# Reliability campaign: kill -9, a rank dies, disk full", "",
         "Generated entirely by `" + SCRIPT + "`; do not edit by hand (notes go in `results/reliability.notes.md`).", "",
         "Command: `" + meta["command"] + "`", "",
         rl.rerender(SCRIPT, ["results/reliability.csv", "results/reliability.meta.json"]), "",
         f"Run {meta['date']} at {meta['git_revision']} (dcmoe binary sha256 {meta.get('dcmoe_sha256', '?')}…) "
         f"on {meta['machine']}, {meta['wall_s'] / 60:.1f} min under `nice -n 10`; "
         f"config `experiments/reliability.yaml` ({STEPS} steps, a checkpoint every {CKPT_INTERVAL}, keep 2, "
         "2 ranks); the reference run was repeated and "
         + ("reproduced itself bitwise." if meta.get("reference_reproducible") else "**did not reproduce itself**."), ""]
    n = len(kill)
    cnt = lambda col: sum(r[col] == "yes" for r in kill)  # noqa: E731
    L += ["## 1. kill -9", "",
          f"**{n} trials** ({meta['trials_requested']} requested"
          + (f"; the time budget of {meta['time_budget_s']:.0f} s stopped the rest" if n < meta["trials_requested"] else "")
          + f", seeds {meta['seed']}000 + trial). "
          f"Kills: {sum(int(r['kills'] or 0) for r in kill)}.", "",
          "| outcome | trials |", "|---|---:|",
          f"| final parameters and train/loss bitwise equal to the uninterrupted run | {cnt('bitwise_equal')} of {n} |",
          f"| eval/* rows as in the uninterrupted run | {cnt('eval_rows_ok')} of {n} |",
          f"| one final/* row each, equal to the uninterrupted run | {cnt('final_once')} of {n} |",
          f"| every metrics*.h5 opened (h5py, SWMR read) and read whole after every kill | {cnt('h5_always_readable')} of {n} |",
          f"| a step_* folder holding COMPLETE failed verification | {cnt('bad_checkpoint_seen')} of {n} |",
          f"| recovered with the CLI alone (`--resume` after every kill) | {sum(r['recovery'] == 'cli' for r in kill)} of {n} |",
          f"| `--resume` of the finished run: exit 0, metrics.h5 unchanged | {cnt('done_resume_ok')} of {n} |",
          f"| **trial passed every check** | **{cnt('passed')} of {n}** |", ""]
    kinds = {}
    for r in kill:
        for k in filter(None, r["moments"].split("; ")):
            key = k.split("+")[0].split("#")[0]
            kinds[key] = kinds.get(key, 0) + 1
    L += ["Kills by target and moment: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ".", "",
          "Moments: `delay` a random time after launch; `ckpt_write#k` k-th `.tmp_step_*` folder created (+0-4 ms); "
          "`publish#k` k-th `step_*` folder renamed into place; `prune#k` k-th folder moved aside for deletion; "
          "`h5_write#k` k-th write to metrics.h5; `final` just after the final checkpoint (+0-50 ms). "
          "The time is from the launch.", "",
          md_table(kill, ["case", "kills", "moments", "launches", "recovery", "bitwise_equal", "eval_rows_ok", "final_once",
                          "h5_always_readable", "bad_checkpoint_seen", "done_resume_ok", "passed", "symptom"],
                   ["trial", "kills", "kills (target@moment+time)", "launches", "recovery", "bitwise", "eval rows",
                    "final once", "h5 readable", "bad ckpt", "DONE resume", "passed", "symptom"]), ""]
    L += ["## 2. A rank dies", "",
          "One rank (not mpirun) is SIGKILLed 0-0.2 s after the second checkpoint of a long run. Passed: mpirun "
          "exits non-zero within 5 s, stderr names the rank (a pid in the message that is not the killed rank's is noted), every checkpoint verifies, the log reads.", "",
          f"Passed {sum(r['passed'] == 'yes' for r in rank)} of {len(rank)}; mpirun exited "
          + (f"{min(float(r['exit_s']) for r in rank if r['exit_s']):.2f}-{max(float(r['exit_s']) for r in rank if r['exit_s']):.2f} s"
             if any(r["exit_s"] for r in rank) else "(no exit time)") + " after the kill.", "",
          md_table(rank, ["case", "seed", "moments", "exit_s", "bad_checkpoint_seen", "h5_always_readable", "passed", "symptom"],
                   ["killed", "seed", "kill", "exit s", "bad ckpt", "h5 readable", "passed", "symptom"]), ""]
    L += ["## 3. Disk full / unwritable", "",
          "`checkpoint`: the run folder on a tmpfs with room for the log and 2.5 checkpoints (keep 2 needs 3 while "
          "saving); `log`: checkpoint.interval 0, 300 steps, and a filler file leaving 16 KiB free at step 100 (the per-step series need their second 256-row chunk after step 256; the reference is an uninterrupted 300-step run); then `mount -o remount,size=64m` and "
          "`--resume` must finish bitwise equal to the reference. `offload-unwritable`: offload.dir below a regular "
          "file; `offload-full`: offload.dir on a 16 KiB tmpfs (offload.tier file, clustered MoE).", "",
          md_table(disk, ["case", "moments", "bitwise_equal", "h5_always_readable", "bad_checkpoint_seen", "passed", "symptom"],
                   ["case", "first run", "bitwise after resume", "log readable", "bad ckpt", "passed", "symptom"]), ""]
    fuzz = os.path.join(rl.RESULTS, "reliability-fuzz.csv")
    if os.path.exists(fuzz):
        frows = read_csv(fuzz)
        cols = list(frows[0].keys()) if frows else []
        L += ["## Fuzzing (from `results/reliability-fuzz.csv`)", "", md_table(frows, cols) if cols else "(empty)", ""]
    L.append(rl.notes(NAME))
    return rl.write_md(out_dir, NAME, "\n".join(L))


def git_revision():
    p = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rank-trials", type=int, default=10)
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; start no kill trial after that (0 = none)")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "reliability"))
    ap.add_argument("--no-disk", action="store_true", help="leave out the tmpfs cases")
    rl.add_args(ap)
    a = ap.parse_args()
    if a.render_only:
        print(render(a.out))
        return
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    # a private copy of the trainer: a rebuild of build/ during the campaign changes nothing
    global EXE
    exe = os.path.join(work, "dcmoe")
    shutil.copy2(EXE, exe)
    EXE = exe
    exe_sha = file_digest(exe)[:16]
    t0 = time.monotonic()
    ref = reference(work)
    ref2 = reference(os.path.join(work, "ref2"))
    reproducible = compare(ref, os.path.join(work, "ref2", "ref", RUN_NAME))[0]
    print(f"reference: {ref['duration']:.1f} s, model.bin {ref['model_bytes']} B, metrics.h5 {ref['h5_bytes']} B, "
          f"reproducible {reproducible}", flush=True)
    del ref2
    rows = []
    for i in range(a.trials):
        if a.time_budget and time.monotonic() - t0 > a.time_budget:
            break
        seed = a.seed * 1000 + i
        r = kill_trial(ref, work, seed)
        rows.append(r)
        print(f"trial {i} seed {seed}: kills {r['kills']} [{r['moments']}] bitwise {r['bitwise_equal']} "
              f"passed {r['passed']} {r['symptom'][:200]}", flush=True)
    for i in range(a.rank_trials):
        r = rank_dies_trial(work, a.seed * 1000 + 900 + i, i % 2)
        rows.append(r)
        print(f"rank dies {i}: {r['moments']} exit {r['exit_s']} s passed {r['passed']} {r['symptom'][:200]}", flush=True)
    if not a.no_disk:
        for case in ("checkpoint", "log"):
            r = disk_full_case(ref, work, case)
            rows.append(r)
            print(f"disk {case}: passed {r['passed']} {r['symptom'][:300]}", flush=True)
    for case in ("unwritable",) + (() if a.no_disk else ("full",)):
        r = offload_case(work, case)
        rows.append(r)
        print(f"offload {case}: passed {r['passed']} {r['symptom'][:300]}", flush=True)
    write_csv(rows, work)
    rl.write_meta(NAME, {"command": rl.command(SCRIPT, sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                         "git_revision": git_revision(), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                         "wall_s": time.monotonic() - t0, "trials_requested": a.trials, "seed": a.seed,
                         "time_budget_s": a.time_budget, "reference_reproducible": bool(reproducible),
                         "reference_s": ref["duration"], "dcmoe_sha256": exe_sha})
    print(render(a.out))


if __name__ == "__main__":
    main()
