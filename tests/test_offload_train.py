"""integration: training-time offloading of idle expert units (offload.enabled in dcmoe train).
With every unit idle after one step evicted and at most one resident unit per layer (LRU),
a run with offloading gives bitwise the losses and the final checkpointed experts (weights
and Adam moments) of the same run without it: the AdamW steps an offloaded unit missed are
replayed when it comes back. Clustered (groups, file tier) and standard MoE (experts, host
tier), 1 and 2 ranks. The counters add up: every eviction writes one unit and every miss reads
one back; file-tier units are offload.c's unit files (magic DCMOFFL1, 32-byte header + payload),
the same format as the inference path's. Re-placement between steps (which fetches every unit
back) keeps the losses bitwise too."""
import os
import numpy as np
from testlib import check, finish, read_checkpoint, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-offtrain-")
CLUS = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4",
        "--set", "clustering.enabled=false"]
OFF = ["--set", "offload.enabled=true", "--set", "offload.idle_steps=1", "--set", "offload.max_resident_groups=1"]


def ckpt_sections(run_name):
    return read_checkpoint(os.path.join(d, run_name, "ckpt", "step_00000012", "model.bin"))


cases = [("clustered-file", CLUS + ["--set", "offload.tier=file"], 1),
         ("clustered-file-2r", CLUS + ["--set", "offload.tier=file"], 2),
         ("standard-host", ["--set", "moe.n_experts=8"], 1),
         # placement every 3 steps fetches every unit back between the optimizer and the end
         # of the step: the catch-up must include that step (32 experts: some idle each step)
         ("standard-place-2r", ["--set", "moe.n_experts=32", "--set", "parallel.place_interval=3",
                                "--set", "parallel.placement=eplb", "--set", "parallel.min_gain=0"], 2)]
for name, sets, ranks in cases:
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    p0 = run(["train", cfg, "--quiet", "--set", f"run.name={name}-ref"] + sets, ranks=ranks)
    p1 = run(["train", cfg, "--quiet", "--set", f"run.name={name}-off"] + sets + OFF, ranks=ranks)
    if not check(p0.returncode == 0 and p1.returncode == 0, f"{name}: runs with and without offloading exit 0"):
        continue
    _, l0 = series(os.path.join(d, f"{name}-ref", "metrics.h5"), "train/loss")
    _, l1 = series(os.path.join(d, f"{name}-off", "metrics.h5"), "train/loss")
    check(len(l0) == 12 and (l0 == l1).all(), f"{name}: losses with offloading bitwise equal to without")
    _, ot = series(os.path.join(d, f"{name}-off", "metrics.h5"), "offload/train")
    ev, miss = ot[:, 2].sum(), ot[:, 1].sum()
    check(ev > 0 and miss > 0, f"{name}: units were evicted ({ev:.0f}) and fetched back ({miss:.0f} misses)")
    # (a re-placement step ends with every unit fetched back: the cap applies again a step later)
    capped = ot[:, 6] if "place" not in name else ot[np.arange(len(ot)) % 3 != 2, 6]
    check(ot[:, 4].sum() > 0 and (capped <= ranks * 2).all(),
          f"{name}: bytes written out ({ot[:, 4].sum():.0f}); at most one resident unit per layer and rank after each step")
    a, b = ckpt_sections(f"{name}-ref"), ckpt_sections(f"{name}-off")
    check(all(a[k] == b[k] for k in ("params.expert", "adam_m.expert", "adam_v.expert")),
          f"{name}: final experts (weights and Adam moments) identical")
    bin_, bout = ot[:, 3].sum(), ot[:, 4].sum()
    unit = bout / ev
    check(unit == int(unit) and bin_ == miss * unit,
          f"{name}: bytes out {bout:.0f} = {ev:.0f} evictions x {unit:.0f}; bytes in {bin_:.0f} = {miss:.0f} misses x unit")
    if "file" in name:
        off = os.path.join(d, f"{name}-off", "offload")
        files = sorted(os.listdir(off))
        heads = [open(os.path.join(off, f), "rb").read(8) for f in files]
        sizes = {os.path.getsize(os.path.join(off, f)) for f in files}
        check(len(files) > 0 and all(h == b"DCMOFFL1" for h in heads) and sizes == {unit},
              f"{name}: file tier used ({len(files)} unit files, offload.c's format, {sizes} bytes = bytes per eviction)")
# a file tier that cannot be created is a clear error at start-up, naming the key and the path
blocker = os.path.join(d, "a-file")
open(blocker, "w").write("x")
cfg = os.path.join(d, "bad-dir.yaml")
tiny_config(cfg, d, "bad-dir")
p = run(["train", cfg, "--quiet"] + CLUS + OFF + ["--set", "offload.tier=file", "--set", f"offload.dir={blocker}/sub"],
        check_rc=False)
check(p.returncode != 0 and "offload.dir" in p.stderr and blocker in p.stderr,
      f"unwritable offload.dir fails clearly ({p.stderr.strip().splitlines()[0][:160] if p.stderr.strip() else ''})")
finish()
