"""integration suite: every data path trains end to end on its fixture and `dcmoe eval`
evaluates the saved checkpoint: WikiText LM, the five GLUE tasks (with their metric: accuracy,
F1 or MCC) and the Brown-genre task, with dense, standard and clustered FFNs. The standalone
evaluation reproduces the last in-training evaluation's metric (or perplexity)."""
import json
import os
import re
from testlib import FIXTURES, check, finish, run, run_plain, series, tmpdir

d = tmpdir("dcmoe-tasks-")
BASE = """run:
  name: {name}
  out_dir: {out}
  seed: 5
  threads: 1
data:
  kind: {kind}
  path: {path}
  glue_task: "{task}"
  vocab_max: 300
model:
  d_model: 32
  n_layer: 2
  n_head: 4
  seq_len: {T}
  task: {mtask}
moe:
  kind: {moe}
  n_experts: 4
  top_k: 2
  d_ff_expert: 16
  n_groups: 2
  rank: 2
train:
  batch_size: 4
  steps: 6
  warmup_steps: 2
  eval_interval: 3
  eval_batches: 0
  log_interval: 3
"""
cases = [
    ("wikitext", "wikitext", os.path.join(FIXTURES, "wikitext"), "", 8, "lm", "standard", "ppl"),
    ("sst2", "glue", os.path.join(FIXTURES, "glue", "sst2"), "sst2", 16, "classify", "standard", "accuracy"),
    ("cola", "glue", os.path.join(FIXTURES, "glue", "cola"), "cola", 16, "classify", "dense", "mcc"),
    ("mrpc", "glue", os.path.join(FIXTURES, "glue", "mrpc"), "mrpc", 24, "classify", "clustered", "f1"),
    ("qqp", "glue", os.path.join(FIXTURES, "glue", "qqp"), "qqp", 24, "classify", "standard", "f1"),
    ("mnli", "glue", os.path.join(FIXTURES, "glue", "mnli"), "mnli", 24, "classify", "clustered", "accuracy"),
    ("genre", "brown_genre", os.path.join(FIXTURES, "brown"), "", 16, "classify", "clustered", "accuracy"),
]
for name, kind, path, task, T, mtask, moe, metric in cases:
    cfg = os.path.join(d, name + ".yaml")
    with open(cfg, "w") as f:
        f.write(BASE.format(name=name, out=d, kind=kind, path=path, task=task, T=T, mtask=mtask, moe=moe))
    p = run(["train", cfg, "--quiet"], ranks=1)
    check(p.returncode == 0, f"{name} ({moe}): trains")
    if p.returncode:
        continue
    h5 = os.path.join(d, name, "metrics.h5")
    steps, ev = series(h5, "eval/metric" if mtask == "classify" else "eval/ppl")
    check(list(steps) == [3, 6], f"{name}: evaluated at steps 3 and 6 ({list(steps)})")
    if mtask == "classify":
        m = re.findall(r"valid (\w+) ([-0-9.]+)", p.stdout)
        check(bool(m) and m[-1][0] == metric and abs(float(m[-1][1]) - ev[-1]) < 1e-4,
              f"{name}: headline metric is {metric} and matches the log ({m[-1] if m else None} vs {ev[-1]:.4f})")
    q = run_plain(["eval", cfg, "--split", "valid"])
    want = "ppl" if mtask == "lm" else metric
    check(q.returncode == 0 and want in q.stdout, f"{name}: dcmoe eval on the checkpoint ({q.stdout.strip()[:120]})")
    if q.returncode:
        continue
    # the standalone evaluation of the final checkpoint recomputes the last in-training
    # evaluation from the saved weights: the same predictions, so the same metric exactly
    # (a count ratio: any difference is at least one example, >= 1/n), and the same loss and
    # perplexity up to the order of the loss sum (double over <= 10^4 tokens: 1e-9 relative;
    # a weight that did not round-trip would move the loss by far more)
    with open(os.path.join(d, name, "ckpt", "step_00000006", "eval_valid_fp32.json")) as f:
        js = json.load(f)
    check(js["step"] == 6 and js["n"] > 0, f"{name}: eval report of step {js['step']}, {js['n']} examples/tokens")
    _, el = series(h5, "eval/loss")
    check(abs(js["loss"] / el[-1] - 1) <= 1e-9, f"{name}: dcmoe eval's loss {js['loss']:.9f} equals the logged final "
          f"loss {el[-1]:.9f} (the same weights on the same examples)")
    if mtask == "classify":
        lo = -1.0 if metric == "mcc" else 0.0
        check(lo <= js["metric"] <= 1.0 and abs(js["metric"] - ev[-1]) <= 1e-12,
              f"{name}: dcmoe eval's {metric} {js['metric']:.6f} equals the logged final {metric} {ev[-1]:.6f}")
        if metric == "accuracy":
            k = js["metric"] * js["n"]
            check(abs(k - round(k)) < 1e-9, f"{name}: accuracy {js['metric']:.6f} is a whole number of the "
                  f"{js['n']} examples ({k:.6f})")
    else:
        check(abs(js["ppl"] / ev[-1] - 1) <= 1e-9, f"{name}: dcmoe eval's ppl {js['ppl']:.6f} equals the logged "
              f"final ppl {ev[-1]:.6f}")
finish()
