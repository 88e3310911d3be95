"""Integration test of precision modes and offloading through the dcmoe CLI (tiny clustered
model, a few steps): QAT changes training and is rank-count independent; its quantisation
error is logged; a storage run's checkpoint evaluates with the stored FP16/INT4 experts close
to FP32; offloaded evaluation under a one-group cap (host and file tier) gives exactly the
same loss; memory series exist; unsupported combinations fail with clear errors (training with
offloading on cuda among them: the stored-format evaluation may offload on cuda, training may not)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testlib import check, finish, run, series, tiny_config, tmpdir  # noqa: E402

import numpy as np  # noqa: E402

CLUSTERED = """precision:
  mode: {mode}
  int4_group: 16
"""


def cfg(d, name, mode, steps=12, extra=""):
    p = tiny_config(os.path.join(d, name + ".yaml"), d, name, CLUSTERED.format(mode=mode) + extra)
    text = open(p).read().replace("kind: standard", "kind: clustered\n  n_groups: 4\n  rank: 4")
    text = text.replace("steps: 12", f"steps: {steps}").replace("interval: 0\n  keep", "interval: 0\n  keep")
    open(p, "w").write(text)
    return p


def losses(d, name):
    return series(os.path.join(d, name, "metrics.h5"), "train/loss")[1]


d = tmpdir("dcmoe_prec_")

# ---- QAT: differs from fp32, equal at 1 and 2 ranks, error logged ----
for name, mode, ranks in [("fp32_2", "fp32", 1), ("qat_1", "qat", 1), ("qat_2", "qat", 2)]:
    run(["train", cfg(d, name, mode, steps=2), "--quiet"], ranks=ranks)
lf, lq1, lq2 = losses(d, "fp32_2"), losses(d, "qat_1"), losses(d, "qat_2")
check(len(lq1) == 2 and np.max(np.abs(lq1 - lf)) > 1e-7, f"qat losses {lq1} differ from fp32 {lf}")
check(np.max(np.abs(lq1 - lq2)) <= 2e-4, f"qat losses at 1 and 2 ranks agree within 2e-4 (max diff {np.max(np.abs(lq1 - lq2)):.2e})")
st, qe = series(os.path.join(d, "qat_1", "metrics.h5"), "precision/quant_err")
# relative Frobenius errors ||q(W) - W|| / ||W||:
# - bases, FP16: round to nearest moves every (normal-range) element by at most 2^-11 of its
#   value, so the ratio is <= 2^-11 = 4.9e-4; random mantissas give ~2e-4, so >= 1e-4 (a
#   wider format such as bf16 would exceed the bound, an FP32 copy fall below it);
# - factors, INT4 asymmetric groups of 16: each element is off by at most scale/2 with
#   scale = range/15, hence <= sqrt(2*16)/30 = 0.19 whatever the values; for Gaussian
#   factors (the initialisation; 2 steps later still nearly so) a Monte Carlo of this
#   quantiser gives 0.0650 with sd 0.0007 over a layer's ~4k factor elements. The window
#   0.055..0.075 is that value +-15%, room for the factors' drift from Gaussian, and fails
#   for a wrong group size or bit width (INT3 doubles it, groups of 32 give ~0.075+).
check(qe.shape[1:] == (2, 2) and np.all(qe[:, :, 0] >= 1e-4) and np.all(qe[:, :, 0] <= 2.0 ** -11)
      and np.all(qe[:, :, 1] >= 0.055) and np.all(qe[:, :, 1] <= 0.075),
      f"precision/quant_err [step, layer, (bases, factors)] logged: {qe[-1].tolist()} "
      "(bases in [1e-4, 2^-11], factors in [0.055, 0.075])")
ms, mb = series(os.path.join(d, "qat_2", "metrics.h5"), "mem/bytes")
_, hwm = series(os.path.join(d, "qat_2", "metrics.h5"), "mem/vmhwm")
check(ms[0] == 0 and mb.shape[1:] == (2, 8) and np.all(mb[:, :, 0] > 0) and np.all(mb[:, :, 4] > 0) and np.all(hwm > 0),
      f"mem/bytes [step, rank, kind] at start and log steps {ms.tolist()}, measured VmHWM per rank {hwm[-1].tolist()}")

# ---- storage: train, evaluate FP32 vs stored vs stored + offloading ----
sc = cfg(d, "st", "storage", steps=12)
run(["train", sc, "--quiet"])
ck = os.path.join(d, "st", "ckpt", "step_00000012")


def ev(args, tag):
    p = run(["eval", sc] + args)
    check(p.returncode == 0, f"eval {' '.join(args)} runs")
    with open(os.path.join(ck, tag)) as f:
        return json.load(f)


e32 = ev(["--precision", "fp32"], "eval_valid_fp32.json")
eq = ev([], "eval_valid_stored.json")
check(abs(eq["ppl"] / e32["ppl"] - 1) < 0.03, f"stored-format ppl {eq['ppl']:.4f} within 3% of fp32 {e32['ppl']:.4f}")
check(eq["peak_resident_expert_bytes"][0] < e32["fp32_expert_param_bytes"][0] / 2,
      f"stored experts {eq['peak_resident_expert_bytes'][0]} B vs fp32 {e32['fp32_expert_param_bytes'][0]} B")
for tier in ["host", "file"]:
    eo = ev(["--set", "offload.enabled=true", "--set", "offload.max_resident_groups=1", "--set", f"offload.tier={tier}"],
            "eval_valid_stored_offload.json")
    check(eo["loss"] == eq["loss"], f"offload {tier} cap 1: loss {eo['loss']!r} == resident {eq['loss']!r} exactly")
    check(eo["misses"][0] > 0 and eo["peak_resident_expert_bytes"][0] < eq["peak_resident_expert_bytes"][0],
          f"offload {tier}: {eo['misses'][0]:.0f} misses, peak resident {eo['peak_resident_expert_bytes'][0]:.0f} B "
          f"< all resident {eq['peak_resident_expert_bytes'][0]:.0f} B")
p = run(["eval", sc, "--set", "offload.enabled=true", "--set", "offload.max_resident_groups=1"], ranks=2)
with open(os.path.join(ck, "eval_valid_stored_offload.json")) as f:
    e2 = json.load(f)
check(p.returncode == 0 and abs(e2["loss"] - eq["loss"]) <= 1e-5 and e2["ranks"] == 2,
      f"offloaded eval at 2 ranks: loss {e2['loss']:.6f} vs {eq['loss']:.6f}")

# ---- errors ----
p = run(["train", cfg(d, "offtrain", "qat", extra="offload:\n  enabled: true\n")], check_rc=False)
err = [ln for ln in p.stderr.splitlines() if "error" in ln]
check(p.returncode != 0 and "needs fp32 or storage" in p.stderr, "train with offload.enabled and qat fails clearly: "
      + (err[0][:160] if err else p.stderr[-200:]))
p = run(["train", cfg(d, "offcuda", "storage", extra="offload:\n  enabled: true\n"), "--set", "run.backend=cuda"],
        check_rc=False)
check(p.returncode != 0 and "training-time offloading works on host memory only" in p.stderr,
      "train with offload.enabled and run.backend=cuda fails clearly (eval may offload on cuda): "
      + next((ln for ln in p.stderr.splitlines() if "offloading" in ln), p.stderr[-160:])[:200])
run(["train", cfg(d, "f32", "fp32", steps=2), "--quiet"])
p = run(["eval", os.path.join(d, "f32.yaml"), "--precision", "stored"], check_rc=False)
check(p.returncode != 0 and "experts.q" in p.stderr, "stored eval of an fp32 run fails clearly: " + p.stderr.strip()[:160])
p = run(["eval", sc, "--precision", "int8"], check_rc=False)
check(p.returncode != 0 and "--precision int8" in p.stderr, "bad --precision rejected")
finish()
