#!/usr/bin/python3
"""Plot several dcmoe runs side by side from their HDF5 logs: training loss, validation
perplexity, load CV² (mean over MoE layers) and tokens/s against the step, one PNG.

usage: /usr/bin/python3 analysis/compare_runs.py OUT.png RUN_DIR [RUN_DIR ...]
Each RUN_DIR holds a metrics.h5 (a live run is read in SWMR mode)."""
import os
import sys

import h5py
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run_dir):
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r", swmr=True) as f:
        out = {}
        for key in ("train/loss", "eval/ppl", "moe/balance/cv2", "perf/tok_s", "moe/balance_group/cv2"):
            if key in f and len(f[key + "/step"]) > 0:
                out[key] = (np.array(f[key + "/step"]), np.array(f[key + "/value"]))
        return out


def smooth(y, w=20):
    if len(y) < w:
        return y
    k = np.ones(w) / w
    return np.convolve(y, k, mode="valid")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, runs = sys.argv[1], sys.argv[2:]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        name = os.path.basename(os.path.normpath(r))
        d = load(r)
        c = colors[i % len(colors)]   # one colour per run in every panel
        if "train/loss" in d:
            s, v = d["train/loss"]
            ax[0, 0].plot(s[len(s) - len(smooth(v)):], smooth(v), label=name, color=c)
        if "eval/ppl" in d:
            s, v = d["eval/ppl"]
            ax[0, 1].plot(s, v, marker="o", label=name, color=c)
        if "moe/balance/cv2" in d:
            s, v = d["moe/balance/cv2"]
            m = v.mean(axis=1)
            ax[1, 0].plot(s[len(s) - len(smooth(m)):], smooth(m), label=name, color=c)
        if "perf/tok_s" in d:
            s, v = d["perf/tok_s"]
            ax[1, 1].plot(s[len(s) - len(smooth(v)):], smooth(v), label=name, color=c)
    ax[0, 0].set(title="training loss (20-step mean)", xlabel="step", ylabel="loss")
    ax[0, 1].set(title="validation perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    ax[1, 0].set(title="load CV² = Var(n_e)/mean², mean over MoE layers",
                 xlabel="step", ylabel="CV²", yscale="log")
    ax[1, 1].set(title="tokens/s (20-step mean; shared machine)",
                 xlabel="step", ylabel="tokens/s")
    for a in ax.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
