"""Shared plumbing of the results scripts (experiments/run_*.py, bench/*.py): every script has a
run step (train / benchmark, then write results/X.csv and results/X.meta.json) and a render
step that rebuilds results/X.md from those committed files and the hand-written notes file
results/X.notes.md alone, deterministically (STYLE.md §10). `--render-only` runs only the
render step; `--out DIR` writes the rendered files to DIR instead of results/ (what
tests/test_results_repro.py compares with the committed files). Needs only the standard
library and numpy; the run steps import h5py themselves."""
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(ROOT, "results")
PY = "/usr/bin/python3"


def add_args(ap):
    ap.add_argument("--render-only", action="store_true",
                    help="rebuild the .md from the committed CSV, meta and notes files; run nothing")
    ap.add_argument("--out", default=RESULTS,
                    help="folder the rendered .md (and nothing else) is written to (default results/)")


def command(script, argv):
    """The run command as typed from the repository root, `--render-only`/`--out` left out."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--render-only":
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        keep.append(a)
    return " ".join([PY, script] + keep)


def rel(path):
    return os.path.relpath(path, ROOT)


def read_meta(name):
    p = os.path.join(RESULTS, name + ".meta.json")
    if not os.path.exists(p):
        sys.exit(f"{rel(p)}: missing (the run step writes it; it holds the run command)")
    with open(p) as f:
        return json.load(f)


def write_meta(name, meta):
    with open(os.path.join(RESULTS, name + ".meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


def rerender(script, files):
    """The sentence saying how a results file is rebuilt without running anything."""
    return (f"`{PY} {script} --render-only` rebuilds this file from " + ", ".join(f"`{f}`" for f in files)
            + " and its notes file without running anything.")


def notes(md_name):
    """The hand-written notes file of results/<md_name>.md, included verbatim (never written by
    any script). Its absence is an error naming the file."""
    p = os.path.join(RESULTS, md_name + ".notes.md")
    if not os.path.exists(p):
        sys.exit(f"{rel(p)}: missing (the hand-written notes that {md_name}.md includes; create it, even short)")
    with open(p) as f:
        text = f.read().strip("\n")
    return f"## Notes (written by hand, `{rel(p)}`)\n\n{text}\n"


def write_md(out_dir, md_name, text):
    os.makedirs(out_dir, exist_ok=True)
    p = os.path.join(out_dir, md_name + ".md")
    with open(p, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return p


def run_main(ap, run_all, render):
    """the command line every results script shares: run (unless --render-only), then render"""
    add_args(ap)
    a = ap.parse_args()
    if not a.render_only:
        run_all(a)
    print(open(render(a.out)).read(), end="")
