#!/usr/bin/python3
"""Every results file is generated entirely by its script (STYLE.md §10): for each results .md
with a script, run the script with `--render-only --out TMP` (no training: it renders from the
committed CSV, meta and notes files) and compare with the committed file byte for byte, naming
the first differing line. Also: every results .md is covered by a script (a hand-written one
fails), every notes file a results file includes exists and is included by one, and each file
opens with its run command and says how to re-render it. A hand edit of a results file fails
here; put written analysis into its .notes.md instead."""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from testlib import SRC, check, finish  # noqa: E402

RESULTS = os.path.join(SRC, "results")
# script, rendered file (relative to the repository root)
RENDERED = [
    ("experiments/run_paper_lm.py", "results/paper-lm.md"),
    ("experiments/run_paper_cls.py", "results/paper-cls.md"),
    ("experiments/run_precision.py", "results/precision-offload.md"),
    ("experiments/run_offload_train.py", "results/offload-train.md"),
    ("experiments/run_ep_traffic.py", "results/ep-traffic.md"),
    ("experiments/run_locality.py", "results/locality.md"),
    ("experiments/run_sweep_clusters.py", "results/sweep-clusters/README.md"),
    ("bench/bench_cpu.py", "results/bench-cpu.md"),
    ("bench/run_alltoall.py", "results/bench-alltoall.md"),
    ("bench/run_placement.py", "results/bench-placement.md"),
    ("experiments/run_reliability.py", "results/reliability.md"),
    ("experiments/run_sim.py", "results/sim-study.md"),
    ("experiments/run_sim.py", "results/sim-validate.md"),
    ("experiments/run_sim.py", "results/sim-scale.md"),
    ("experiments/run_sim_trajectory.py", "results/sim-trajectory.md"),
    ("experiments/run_sim_sweep.py", "results/sim-sweep.md"),
    ("experiments/run_recluster.py", "results/recluster.md"),
    ("experiments/run_drift.py", "results/drift.md"),
    ("experiments/run_sim_machine.py", "results/sim-machine.md"),
    ("experiments/run_sim_width.py", "results/sim-width.md"),
]
# written by analysis/report from run logs that are not committed (run_sweep_clusters.py copies
# it); nothing committed can re-render it
NOT_RENDERED = {"results/sweep-clusters/report.md"}
# results only a GPU machine produces (tests/gpu/device-check.sh): their notes file may wait for
# them, and once the .md is committed it is re-rendered like the others
GPU_ONLY = [("bench/bench_gpu.py", "results/bench-gpu.md")]
RENDERED += [(s, md) for s, md in GPU_ONLY if os.path.exists(os.path.join(SRC, md))]
NOTES_RE = re.compile(r"^## Notes \(written by hand, `([^`]+)`\)$", re.M)


def first_difference(a, b):
    """(1-based line number, committed line, rendered line) of the first difference, or None."""
    la, lb = a.split("\n"), b.split("\n")
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else "<end of file>"
        y = lb[i] if i < len(lb) else "<end of file>"
        if x != y:
            return i + 1, x, y
    return None if a == b else (len(la), "<bytes differ>", "<bytes differ>")


def render(script, tmp):
    p = subprocess.run(["/usr/bin/python3", os.path.join(SRC, script), "--render-only", "--out", tmp],
                       capture_output=True, text=True, cwd=SRC, timeout=120)
    return p


def main():
    # the comparison itself must catch a hand edit: one changed character in a copy of a file
    with open(os.path.join(SRC, RENDERED[0][1]), encoding="utf-8") as f:
        text = f.read()
    edited = text.replace("|", "!", 1)
    d = first_difference(text, edited)
    check(d is not None and d[0] == text[:text.index("|")].count("\n") + 1,
          f"the comparison finds a one-character hand edit and names its line ({d[0] if d else None})")
    check(first_difference(text, text + "\n") is not None, "the comparison finds an added trailing newline")

    # every results .md is rendered by a script
    mds = set()
    for dirpath, _, files in os.walk(RESULTS):
        for fn in files:
            if fn.endswith(".md") and not fn.endswith(".notes.md"):
                mds.add(os.path.relpath(os.path.join(dirpath, fn), SRC))
    covered = {md for _, md in RENDERED} | NOT_RENDERED
    check(mds <= covered, f"every results .md has a script that renders it (uncovered: {sorted(mds - covered)})")

    included = set()
    with tempfile.TemporaryDirectory(prefix="dcmoe-results-") as tmp:
        for script, md in RENDERED:
            out = os.path.join(tmp, script.replace("/", "_"))
            p = render(script, out)
            if not check(p.returncode == 0, f"{script} --render-only exits 0"
                         + ("" if p.returncode == 0 else f": {p.stderr.strip()[-600:]}")):
                continue
            got_path = os.path.join(out, os.path.basename(md))
            if not check(os.path.exists(got_path), f"{script} --render-only --out writes {os.path.basename(md)}"):
                continue
            with open(got_path, encoding="utf-8") as f:
                got = f.read()
            with open(os.path.join(SRC, md), encoding="utf-8") as f:
                committed = f.read()
            d = first_difference(committed, got)
            check(d is None, f"{md} equals what `{script} --render-only` writes"
                  + ("" if d is None else f"; first difference at line {d[0]}:\n#   committed: {d[1][:300]}\n#   rendered:  {d[2][:300]}"))
            m = re.search(r"^Command: `([^`]+)`", committed, re.M)
            check(m is not None and m.group(1).split()[:2] == ["/usr/bin/python3", script],
                  f"{md} states its run command (`/usr/bin/python3 {script} ...`)")
            check(f"{script} --render-only" in committed, f"{md} says that `{script} --render-only` re-renders it")
            notes = NOTES_RE.findall(committed)
            check(len(notes) == 1, f"{md} includes one notes file ({notes})")
            for n in notes:
                included.add(n)
                check(os.path.exists(os.path.join(SRC, n)), f"{md}: its notes file {n} exists")

    notes_files = set()
    for dirpath, _, files in os.walk(RESULTS):
        for fn in files:
            if fn.endswith(".notes.md"):
                notes_files.add(os.path.relpath(os.path.join(dirpath, fn), SRC))
    pending = {md[:-3] + ".notes.md" for _, md in GPU_ONLY if not os.path.exists(os.path.join(SRC, md))}
    notes_files -= pending
    check(notes_files <= included, f"every notes file is included by a results file (orphans: {sorted(notes_files - included)})")
    finish()


if __name__ == "__main__":
    main()
