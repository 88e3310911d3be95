"""integration: `dcmoe bench calibrate` feeds `dcmoe simulate`.
- a quick calibration under mpirun -n 2 with a model config writes a hardware file with the
  config's GEMM shapes (the head [N, V] x [V, D] products at the 2-rank batch), every op, and
  all-to-all / allreduce curves whose times are positive and whose sizes increase;
- dcmoe simulate with sim.hardware_file reads it: the run's root attributes carry the file,
  its date and description; the time split adds up to the step; the predicted head GEMMs'
  forward share is at least their measured time (the op list includes them); dense models
  simulate too (no MoE layers, no exchange);
- a one-rank file cannot predict 2 ranks (named error), a missing file names sim.hardware_file
  and the path, a damaged file gives file:line:column."""
import os
import re
import h5py
import numpy as np
from testlib import check, finish, run, run_plain, tiny_config, tmpdir

d = tmpdir("dcmoe-calib-")
cfg = tiny_config(os.path.join(d, "c.yaml"), d, "c")
hw2, hw1 = os.path.join(d, "hw2.yaml"), os.path.join(d, "hw1.yaml")
p = run(["bench", "calibrate", cfg, "--quick", "--out", hw2], ranks=2)
check(p.returncode == 0 and os.path.exists(hw2), f"bench calibrate -n 2 writes the file ({p.stderr.strip()[-300:]})")
text = open(hw2).read() if os.path.exists(hw2) else ""
check("ranks: 2" in text and "format: dcmoe-hardware-1" in text, "file header: format, ranks 2")
# the tiny config: 8 sequences x 16 tokens over 2 ranks = 64 tokens per rank, vocab <= 400, d_model 32
vocab = max([int(x) for x in re.findall(r"ta: 0, tb: 1, m: 64, n: (\d+), k: 32,", text)] or [0])
check(vocab > 32, f"the config's head GEMM shape [64 x 32] x [32 x V] is in the grid (V = {vocab})")
for sec in ("alltoall", "allreduce"):
    rows = re.findall(r"\{bytes: (\d+), seconds: ([0-9.e+-]+)", text.split(sec + ":")[1].split("\n\n")[0].split("allreduce:")[0])
    b = [float(x) for x, _ in rows]
    s = [float(y) for _, y in rows]
    check(len(b) >= 2 and all(x < y for x, y in zip(b, b[1:])) and all(t > 0 for t in s),
          f"{sec}: {len(b)} sizes, increasing, positive times")
ops = re.findall(r"^  (\w+): \{ns: ([0-9.e+-]+)", text, re.M)
check(len(ops) == 15 and all(float(v) > 0 for _, v in ops), f"15 ops with positive ns ({len(ops)})")

SIM = ["--set", "sim.nodes=1", "--set", "sim.gpus_per_node=2", "--set", "parallel.ep_size=0", "--set", "sim.tokens_per_rank=64",
       "--set", "sim.sample_tokens=0", "--set", "sim.samples=1"]


def simulate(name, extra):
    return run_plain(["simulate", cfg, "--quiet", "--set", f"run.name={name}"] + SIM + extra)


p = simulate("s", ["--set", f"sim.hardware_file={hw2}"])
check(p.returncode == 0, f"simulate with the file exits 0 ({p.stderr.strip()[-300:]})")
h5 = os.path.join(d, "s", "metrics.h5")
if os.path.exists(h5):
    with h5py.File(h5, "r") as f:
        a = dict(f.attrs)
        check(a.get("hardware_file") == hw2 and "bench calibrate" in a.get("calibration", "")
              and a.get("hardware_file_date", "").endswith("Z") and "2 MPI rank" in a.get("hardware_file_description", ""),
              "root attributes: file, date, description, calibration")
        split, tb = f["perf/time_split/value"][0], f["sim/time_breakdown/value"][0]
        check(abs(split.sum() - tb[7]) <= 1e-9 * tb[7] and tb[7] > 0, f"time split adds up to the step ({split.sum()} vs {tb[7]})")
        # the head's forward GEMM alone, from the file's own rate at that shape, is inside the forward time
        m = re.search(rf"ta: 0, tb: 1, m: 64, n: {vocab}, k: 32, gflops: ([0-9.e+-]+)", text)
        if m:
            head = 2 * 64 * vocab * 32 / (float(m.group(1)) * 1e9)
            check(tb[0] >= head, f"forward compute {tb[0]:.3g} s >= the head GEMM's {head:.3g} s")
p = simulate("dense", ["--set", f"sim.hardware_file={hw2}", "--set", "moe.kind=dense"])
check(p.returncode == 0, f"a dense model simulates ({p.stderr.strip()[-200:]})")
if p.returncode == 0:
    with h5py.File(os.path.join(d, "dense", "metrics.h5"), "r") as f:
        tb = f["sim/time_breakdown/value"][0]
        check(tb[2] == 0 and tb[3] == 0 and tb[4] > 0, "dense: no exchange, an allreduce")

# one-rank file for 2 GPUs; missing file; damaged file
p = run_plain(["bench", "calibrate", "--quick", "--out", hw1])
check(p.returncode == 0 and "ranks: 1" in open(hw1).read(), "one-rank calibration")
p = simulate("one", ["--set", f"sim.hardware_file={hw1}"])
check(p.returncode != 0 and "one rank" in p.stderr and "mpirun -n 2" in p.stderr, f"1-rank file, 2 GPUs: named error ({p.stderr.strip()})")
p = simulate("miss", ["--set", f"sim.hardware_file={d}/nope.yaml"])
check(p.returncode != 0 and "sim.hardware_file" in p.stderr and "nope.yaml" in p.stderr, f"missing file: named ({p.stderr.strip()})")
bad = os.path.join(d, "bad.yaml")
with open(bad, "w") as f:
    f.write(text.replace("copy_gbs:", "copy_gbz:", 1))
p = simulate("bad", ["--set", f"sim.hardware_file={bad}"])
check(p.returncode != 0 and re.search(r"bad\.yaml:\d+:\d+: memory: unknown field 'copy_gbz'", p.stderr) is not None,
      f"damaged file: located error ({p.stderr.strip()})")
finish()
