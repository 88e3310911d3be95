"""Regression tests for the defects found by trying dcmoe as a new user would (issue 10):
resume at and after the last step, damaged checkpoints, --resume-from, a run killed before its
first checkpoint, signals during start-up and to one rank, SIGUSR1 through mpirun, the run-folder
lock, non-finite losses, the config's layer limit. Each check failed before its fix."""
import hashlib
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import testlib as tl  # noqa: E402
from testlib import check  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

T = tl.tmpdir("dcmoe_hard_")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]


def cfg(name, extra="", steps=12, interval=4, keep=3):
    p = os.path.join(T, name + ".yaml")
    tl.tiny_config(p, T, name, extra)
    text = open(p).read().replace("steps: 12", f"steps: {steps}").replace("interval: 0", f"interval: {interval}")
    text = text.replace("keep: 3", f"keep: {keep}")
    open(p, "w").write(text)
    return p


def run_dir(name):
    return os.path.join(T, name)


def h5(name):
    return os.path.join(run_dir(name), "metrics.h5")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def ser(name, key):
    with h5py.File(h5(name), "r", swmr=True) as f:
        return np.array(f[key]["step"][...]), np.array(f[key]["value"][...])


def params(ckpt_dir):
    return tl.read_checkpoint(os.path.join(ckpt_dir, "model.bin"))


# ---- reference: an uninterrupted 2-rank run ----
ref = cfg("ref")
p = tl.run(["train", ref, "--quiet"], ranks=2)
check(p.returncode == 0, "reference run exits 0")
ref_loss = ser("ref", "train/loss")
ref_final = ser("ref", "final/valid_ppl")

# ---- defect 2: --resume of a finished run says so and changes nothing ----
before = sha(h5("ref"))
p = tl.run(["train", ref, "--resume", "--quiet"], ranks=2)
check(p.returncode == 0 and "already complete" in p.stdout, "resume of a DONE run says it is complete")
check(sha(h5("ref")) == before, "resume of a DONE run leaves metrics.h5 byte for byte unchanged")
check(len(ser("ref", "final/valid_ppl")[0]) == 1, "resume of a DONE run adds no final/* row")

# ---- defect 2: killed after the final checkpoint, before the final rows and DONE ----
for variant in ("rows-lost", "rows-kept"):
    name = "last_" + variant.replace("-", "_")
    c = cfg(name)
    tl.run(["train", c, "--quiet"], ranks=2)
    os.remove(os.path.join(run_dir(name), "DONE"))
    if variant == "rows-lost":
        with h5py.File(h5(name), "r+") as f:   # what a kill before the final rows' flush leaves
            for k in ("final/valid_ppl", "final/test_ppl", "final/test_loss"):
                for d in ("step", "value"):
                    f[k][d].resize(0, axis=0)
    p = tl.run(["train", c, "--resume", "--quiet"], ranks=2)
    check(p.returncode == 0, f"{variant}: resume at the last step exits 0")
    check(os.path.exists(os.path.join(run_dir(name), "DONE")), f"{variant}: resume at the last step writes DONE")
    fs, fv = ser(name, "final/valid_ppl")
    check(len(fs) == 1 and fs[0] == 12, f"{variant}: exactly one final/valid_ppl row, at step 12 (rows: {list(fs)})")
    check(len(fv) == 1 and fv[0] == ref_final[1][0] and fv[0] > 1.0,
          f"{variant}: final valid ppl {fv} equals the uninterrupted run's {ref_final[1]} (not 0)")
    es, _ = ser(name, "eval/ppl")
    check(list(es).count(12) == 1, f"{variant}: one eval/ppl row at the last step (steps {list(es)})")
    check("valid ppl 0.00" not in p.stdout, f"{variant}: no 'valid ppl 0.00' printed")

# ---- defect 6: damaged newest checkpoint -> fall back, say which and why; --resume-from ----
c = cfg("damaged")
p = tl.run(["train", c, "--quiet", "--stop-at", "8"], ranks=2)
ck8 = os.path.join(run_dir("damaged"), "ckpt", "step_00000008", "model.bin")
img = bytearray(open(ck8, "rb").read())
img[len(img) // 2] ^= 0x40
open(ck8, "wb").write(bytes(img))
p = tl.run(["train", c, "--resume", "--quiet"], ranks=2)
check(p.returncode == 0, "resume past a damaged newest checkpoint exits 0")
check("step_00000008" in p.stderr and "checksum" in p.stderr, "the skipped checkpoint is named with the reason")
check("resumed from" in p.stdout and "step_00000004" in p.stdout, "it resumes from the newest checkpoint that verifies")
s, v = ser("damaged", "train/loss")
check(np.array_equal(s, ref_loss[0]) and np.array_equal(v, ref_loss[1]), "the fallback continuation equals the uninterrupted run bitwise")

c = cfg("from")
tl.run(["train", c, "--quiet", "--stop-at", "8"], ranks=2)
p = tl.run(["train", c, "--resume-from", os.path.join(run_dir("from"), "ckpt", "step_00000004"), "--quiet"], ranks=2)
check(p.returncode == 0 and "step_00000004" in p.stdout, "--resume-from DIR resumes from that checkpoint")
s, v = ser("from", "train/loss")
check(np.array_equal(v, ref_loss[1]), "--resume-from continuation equals the uninterrupted run bitwise")

# ---- defect 6: COMPLETE text is checked, not trusted ----
c = cfg("marker")
tl.run(["train", c, "--quiet", "--stop-at", "8"], ranks=2)
mk = os.path.join(run_dir("marker"), "ckpt", "step_00000008", "COMPLETE")
open(mk, "w").write("step 8 ranks 4\n")
p = tl.run(["train", c, "--resume", "--quiet"], ranks=2)
check("says 4 ranks" in p.stderr and "step_00000004" in p.stdout,
      "an edited rank count in COMPLETE is refused (the checkpoint is skipped), not trusted")
check(not os.path.exists(os.path.join(run_dir("marker"), "metrics.ranks4.h5")), "the log is not set aside on an edited marker")
check(not any(f.startswith("rank_") for f in os.listdir(os.path.join(run_dir("marker"), "ckpt", "step_00000012"))),
      "no unread rank_*.bin files are written")

# ---- defect 6: a run killed before its first checkpoint is recoverable from the CLI ----
c = cfg("nock")
tl.run(["train", c, "--quiet"], ranks=2)
for f in os.listdir(os.path.join(run_dir("nock"), "ckpt")):
    subprocess.run(["rm", "-rf", os.path.join(run_dir("nock"), "ckpt", f)])
os.remove(os.path.join(run_dir("nock"), "DONE"))
p = tl.run(["train", c, "--quiet"], ranks=2, check_rc=False)
check(p.returncode != 0 and "--resume" in p.stderr, "a plain start on it is refused and points at --resume")
p = tl.run(["train", c, "--resume", "--quiet"], ranks=2)
check(p.returncode == 0 and "restarting from step 0" in p.stdout, "--resume restarts a run that has no checkpoint yet")
check(os.path.exists(os.path.join(run_dir("nock"), "metrics.before-restart.h5")), "the earlier log is kept")
check(np.array_equal(ser("nock", "train/loss")[1], ref_loss[1]), "the restarted run equals the reference")

# ---- defect 6: a signal during start-up, and a signal that reaches only one rank ----
c = cfg("startsig", steps=400, interval=0)
pr = subprocess.Popen([tl.EXE, "train", c, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
# once main() runs (the run folder's lock appears; before that the dynamic loader may still be
# mapping the CUDA libraries, where no program can catch a signal), during data loading
lock = os.path.join(run_dir("startsig"), "LOCK")
for _ in range(600):
    if os.path.exists(lock):
        break
    time.sleep(0.005)
pr.send_signal(signal.SIGTERM)
out, err = pr.communicate(timeout=120)
ck = os.path.join(run_dir("startsig"), "ckpt")
check(pr.returncode == 0 and "during start-up" in out and os.path.isdir(ck) and os.listdir(ck) == ["step_00000000"],
      f"SIGTERM during start-up: a checkpoint and exit 0 (rc {pr.returncode}; {out.strip()[-200:]} {err.strip()[-200:]})")

c = cfg("onerank", steps=1000000, interval=0)   # stopped by the signal below
pr = subprocess.Popen(MPIRUN + ["-n", "2", tl.EXE, "train", c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True, env=ENV)
rank1 = None
for _ in range(100):
    time.sleep(0.1)
    kids = subprocess.run(["pgrep", "-P", str(pr.pid)], capture_output=True, text=True).stdout.split()
    for k in kids:
        try:
            envs = open(f"/proc/{k}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"OMPI_COMM_WORLD_RANK=1" in envs:
            rank1 = int(k)
    if rank1 and os.path.exists(h5("onerank")):
        break
time.sleep(1.0)
if rank1:
    os.kill(rank1, signal.SIGUSR1)
out, err = pr.communicate(timeout=120)
check(rank1 is not None and "signal SIGUSR1 received" in out and "--stop-at" not in out,
      "a signal that reaches only rank 1 is reported as a signal by rank 0")
check(pr.returncode == 0, "and the job checkpoints and exits 0")

# ---- defect 11: SIGUSR1 to mpirun reaches every rank (what the launch scripts send on SIGTERM) ----
c = cfg("mpisig", steps=1000000, interval=0)   # stopped by the signal below
pr = subprocess.Popen(MPIRUN + ["-n", "2", tl.EXE, "train", c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True, env=ENV)
for _ in range(100):
    time.sleep(0.1)
    if os.path.exists(h5("mpisig")):
        break
time.sleep(1.0)
pr.send_signal(signal.SIGUSR1)
out, err = pr.communicate(timeout=120)
check(pr.returncode == 0 and "checkpoint written" in out, "SIGUSR1 to mpirun: every rank checkpoints, exit 0")

# ---- two runs, one folder: the lock ----
c = cfg("lock", steps=1000000, interval=0)   # stopped by SIGUSR1 below; long enough to outlive the two refused starts
pa = subprocess.Popen(MPIRUN + ["-n", "1", tl.EXE, "train", c, "--quiet"], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, env=ENV)
for _ in range(100):
    time.sleep(0.1)
    if os.path.exists(os.path.join(run_dir("lock"), "LOCK")):
        break
pb = tl.run(["train", c, "--quiet"], ranks=1, check_rc=False)
check(pb.returncode != 0 and "in use by host" in pb.stderr and "pid" in pb.stderr,
      f"a second start on a folder in use is refused naming the holder ({pb.stderr.strip()[-160:]})")
pb = tl.run(["train", c, "--resume", "--quiet"], ranks=1, check_rc=False)
check(pb.returncode != 0 and "in use by host" in pb.stderr, "a concurrent --resume is refused too")
pa.send_signal(signal.SIGUSR1)
pa.communicate(timeout=120)
check(not os.path.exists(os.path.join(run_dir("lock"), "LOCK")), "the lock is removed when the run ends")
open(os.path.join(run_dir("lock"), "LOCK"), "w").write("host deadhost pid 999999\n")
pb = tl.run(["train", c, "--resume", "--quiet", "--stop-at", "5"], ranks=1, check_rc=False)
check(pb.returncode == 0 and "taking over the lock" in pb.stderr, "a stale lock of a dead process is detected and taken over")

# ---- NaN/Inf: stop naming step, rank and batch, keep the last good checkpoint; or skip the step ----
c = cfg("nan")
envn = dict(ENV, DCMOE_TEST_NAN_AT="6:1")
p = subprocess.run(MPIRUN + ["-n", "2", tl.EXE, "train", c, "--quiet"], capture_output=True, text=True, env=envn)
check(p.returncode != 0 and "step 6" in p.stderr and "rank 1" in p.stderr and "sequences 4..7" in p.stderr,
      f"a non-finite loss stops the run naming step, rank and batch ({p.stderr.strip()[-300:]})")
cks = sorted(os.listdir(os.path.join(run_dir("nan"), "ckpt")))
check(cks == ["step_00000004"], f"the last good checkpoint is kept and nothing newer written ({cks})")
s, v = ser("nan", "train/loss")
check(s[-1] == 6 and np.isnan(v[-1]) and np.array_equal(v[:-1], ref_loss[1][:5]), "the log holds steps 1..6, step 6 NaN")
c = cfg("nanskip", "  on_nonfinite: skip_step\n".join(["", ""]) if False else "")
text = open(c).read().replace("train:\n", "train:\n  on_nonfinite: skip_step\n")
open(c, "w").write(text)
p = subprocess.run(MPIRUN + ["-n", "2", tl.EXE, "train", c, "--quiet"], capture_output=True, text=True, env=envn)
s, v = ser("nanskip", "train/loss")
check(p.returncode == 0 and len(s) == 12 and np.isnan(v[5]) and np.isfinite(v[6:]).all(),
      "train.on_nonfinite: skip_step skips the update and finishes")

# ---- defect 7: a model at the config's layer limit logs its MoE layer list (was a 512-byte strcat) ----
c = cfg("layers", steps=1, interval=0)
text = open(c).read().replace("n_layer: 2", "n_layer: 1024").replace("d_model: 32", "d_model: 8").replace("n_head: 4", "n_head: 1")
text = text.replace("n_experts: 8", "n_experts: 2").replace("d_ff_expert: 32", "d_ff_expert: 4").replace("top_k: 2", "top_k: 1")
open(c, "w").write(text)
p = tl.run(["train", c, "--quiet"], ranks=1)
ok = p.returncode == 0
if ok:
    with h5py.File(h5("layers"), "r") as f:
        lay = f["moe"].attrs["layers"]
        lay = lay.decode() if isinstance(lay, bytes) else lay
    ok = lay == ",".join(str(i) for i in range(1024))
check(ok, "1024 MoE layers (the config limit): the /moe layers attribute lists all of them")

tl.finish()
