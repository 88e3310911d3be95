#!/usr/bin/python3
"""run_fuzz.py: the libFuzzer campaign of issue 10 over the tests/fuzz targets.

Runs each target once (one process, -jobs not used; under `nice -n 10`) with ASan+UBSan for a
time or an execution budget, restarting it after a crash until the budget is spent, and writes
results/reliability-fuzz.csv: per target the executions and seconds actually run, exec/s, the
distinct crashes found (by their first frames in dcmoe code), the corpus size at the end and the
command. Crash inputs are kept under WORK/<target>/artifacts/; turn each into a regression file
under tests/fuzz/regressions/<target>/ (fuzz_replay runs those in every build).

Build the fuzzers first (clang, libFuzzer):
    CC=clang meson setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false
    ninja -C build-fuzz $(printf 'tests/fuzz/fuzz_%s ' config config_set sweep wikitext brown glue checkpoint h5log)
Then, e.g.:
    experiments/run_fuzz.py --build build-fuzz --measure 20            # exec/s of every target
    experiments/run_fuzz.py --build build-fuzz --time config=1200,checkpoint=180,...
    experiments/run_fuzz.py --build build-fuzz --runs config=100000000
The seed corpora in tests/fuzz/corpus/ are only read; new inputs go to WORK/<target>/corpus/.
"""
import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_DIR = os.path.join(ROOT, "tests", "fuzz")
TARGETS = ["config", "config_set", "sweep", "wikitext", "brown", "glue", "checkpoint", "h5log"]
FUNCTIONS = {
    "config": "config_load_string (+ config_to_yaml round trip)",
    "config_set": "config_set (+ config_to_yaml round trip)",
    "sweep": "sweep_plan",
    "wikitext": "data_load wikitext",
    "brown": "data_load brown + brown_genre",
    "glue": "data_load glue",
    "checkpoint": "checkpoint_verify_image",
    "h5log": "h5log_open_append (+ series, append, close)",
}
GOALS = {t: 10**7 for t in TARGETS}
GOALS["config"] = 10**8
# inputs longer than this are not generated: the seeds fit, and short inputs run faster
MAX_LEN = {"config": 2100, "config_set": 256, "sweep": 2100, "wikitext": 1024, "brown": 4096, "glue": 4096,
           "checkpoint": 16384, "h5log": 24576}
CSV_FIELDS = ["target", "function", "executions", "seconds", "exec_per_s", "crashes", "crash_runs", "corpus_files",
              "corpus_bytes", "goal_executions", "source", "command"]



def portable(arg, args):
    """an argument as it reads on any machine: the fuzz build and work folders as BUILD and WORK,
    paths in the repository relative to its root"""
    arg = arg.replace(os.path.abspath(args.build) + "/", "BUILD/").replace(os.path.abspath(args.work) + "/", "WORK/")
    return arg.replace(ROOT + "/", "")

def parse_budget(text, name):
    """'config=1200,checkpoint=60' or a bare number for every target"""
    out = {}
    if not text:
        return out
    for part in text.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            if k not in TARGETS:
                sys.exit(f"run_fuzz.py: {name}: unknown target '{k}' (targets: {', '.join(TARGETS)})")
            out[k] = int(float(v))
        else:
            for t in TARGETS:
                out[t] = int(float(part))
    return out


def corpus_size(d):
    files = [os.path.join(d, f) for f in os.listdir(d)] if os.path.isdir(d) else []
    files = [f for f in files if os.path.isfile(f)]
    return len(files), sum(os.path.getsize(f) for f in files)


def crash_signature(log):
    """first stack frames inside dcmoe sources (or the harness message) of a crash log"""
    frames = re.findall(r"#\d+ 0x[0-9a-f]+ in (\S+) (\S+/(?:src|comm|tests/fuzz)/[^:\s]+):(\d+)", log)
    frames = [f for f in frames if not f[0].startswith(("__", "fuzzer::"))]
    if frames:
        return " <- ".join(f"{fn} {os.path.basename(path)}:{line}" for fn, path, line in frames[:3])
    m = re.search(r"^(fuzz \w+: .*|dcmoe: .*assertion.*|SUMMARY: .*)$", log, re.M)
    return m.group(1) if m else "unknown"


def git_source(build):
    """the commit the fuzzers were built from (the build dir's source tree), and whether its
    src/ or comm/ had uncommitted changes"""
    src = ROOT
    try:
        with open(os.path.join(build, "meson-info", "meson-info.json")) as f:
            src = json.load(f)["directories"]["source"]
    except (OSError, KeyError, ValueError):
        pass

    def git(*a):
        r = subprocess.run(["git", "-C", src] + list(a), capture_output=True, text=True)
        return r.stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "comm")
    return rev + ("+uncommitted src changes" if dirty else "")


def run_target(t, args, seconds, runs):
    exe = os.path.join(args.build, "tests", "fuzz", "fuzz_" + t)
    if not os.access(exe, os.X_OK):
        sys.exit(f"run_fuzz.py: {exe} is missing: build with -Dfuzz=true (see the docstring)")
    work = os.path.join(args.work, t)
    corpus = os.path.join(work, "corpus")
    arts = os.path.join(work, "artifacts")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(arts, exist_ok=True)
    seeds = os.path.join(FUZZ_DIR, "corpus", t)
    dict_path = os.path.join(FUZZ_DIR, "dict", t + ".dict")
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:symbolize=1"
    env["LSAN_OPTIONS"] = "suppressions=" + os.path.join(FUZZ_DIR, "lsan.supp")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    total_exec, total_s, crash_runs, sigs = 0, 0.0, 0, {}
    command = None
    log_path = os.path.join(work, "fuzz.log")
    with open(log_path, "w") as log_f:
        while True:
            left_s = seconds - total_s if seconds else None
            left_runs = runs - total_exec if runs else None
            if (left_s is not None and left_s < 1) or (left_runs is not None and left_runs < 1):
                break
            cmd = ["nice", "-n", "10", exe, "-print_final_stats=1", "-timeout=20", "-rss_limit_mb=2048",
                   f"-max_len={MAX_LEN[t]}", "-artifact_prefix=" + arts + "/"]
            if os.path.exists(dict_path):
                cmd.append("-dict=" + dict_path)
            cmd.append(f"-max_total_time={int(left_s)}" if left_s is not None else f"-runs={left_runs}")
            cmd += [corpus, seeds]
            if command is None:
                command = " ".join(shlex.quote(portable(c, args)) for c in cmd)
            t0 = time.monotonic()
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace")
            dt = time.monotonic() - t0
            log_f.write(p.stdout)
            m = re.findall(r"stat::number_of_executed_units: (\d+)", p.stdout)
            n = int(m[-1]) if m else 0
            if not m:   # killed before the final stats: take the last progress line
                prog = re.findall(r"^#(\d+)\s", p.stdout, re.M)
                n = int(prog[-1]) if prog else 0
            total_exec += n
            total_s += dt
            if p.returncode != 0:
                crash_runs += 1
                sig = crash_signature(p.stdout)
                art = re.findall(r"Test unit written to (\S+)", p.stdout)
                sigs.setdefault(sig, art[-1] if art else "")
                print(f"  {t}: crash after {n} executions: {sig}\n    input: {art[-1] if art else '?'}", flush=True)
                if crash_runs >= args.max_crash_runs:
                    print(f"  {t}: {crash_runs} crashing runs, stopping this target", flush=True)
                    break
                continue
            if n == 0:
                break
    files, nbytes = corpus_size(corpus)
    row = {"target": t, "function": FUNCTIONS[t], "executions": total_exec, "seconds": round(total_s, 1),
           "exec_per_s": round(total_exec / total_s) if total_s > 0 else 0, "crashes": len(sigs),
           "crash_runs": crash_runs, "corpus_files": files, "corpus_bytes": nbytes, "goal_executions": GOALS[t],
           "source": git_source(args.build), "command": command}
    return row, sigs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build-fuzz"), help="meson build dir with -Dfuzz=true")
    ap.add_argument("--work", default="/tmp/dcmoe-fuzz-work", help="generated corpora, crash inputs, logs")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    ap.add_argument("--time", default="", help="seconds per target: N (every target) or t=N,t=N")
    ap.add_argument("--runs", default="", help="executions per target: N or t=N,t=N (instead of --time)")
    ap.add_argument("--measure", type=float, default=0, help="only measure exec/s: this many seconds per target")
    ap.add_argument("--max-crash-runs", type=int, default=20, help="stop a target after this many crashing runs")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "reliability-fuzz.csv"))
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            sys.exit(f"run_fuzz.py: unknown target '{t}' (targets: {', '.join(TARGETS)})")
    times = parse_budget(args.time, "--time")
    runs = parse_budget(args.runs, "--runs")
    if args.measure:
        times = {t: args.measure for t in targets}
        runs = {}
    rows = []
    if os.path.exists(args.out) and not args.measure:   # keep the rows of targets not rerun now
        with open(args.out) as f:
            rows = [r for r in csv.DictReader(f) if r["target"] not in targets]
    for t in targets:
        if t not in times and t not in runs:
            sys.exit(f"run_fuzz.py: no --time or --runs budget for target '{t}'")
        print(f"{t}: {'%d s' % times[t] if t in times else '%d executions' % runs[t]}", flush=True)
        row, sigs = run_target(t, args, times.get(t), runs.get(t))
        print(f"  {t}: {row['executions']} executions in {row['seconds']} s = {row['exec_per_s']} exec/s, "
              f"{row['crashes']} distinct crashes, corpus {row['corpus_files']} files", flush=True)
        for sig, art in sigs.items():
            print(f"    crash: {sig}  ({art})")
        if args.measure:
            continue
        rows = [r for r in rows if r["target"] != t] + [row]
        rows.sort(key=lambda r: TARGETS.index(r["target"]))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", newline="") as f:   # rewritten after every target: partial results survive
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow(r)
    if not args.measure:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
