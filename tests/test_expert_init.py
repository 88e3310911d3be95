"""integration: moe.expert_init. With shared (upcycling) every expert starts as expert 0's draw
plus noise of moe.init_noise x the init std (clustered: every group's base as group 0's), at 1
and at 4 ranks alike; independent draws are as before (the default, bitwise unchanged: the
other tests pin it). Read from the checkpoint after one step at a negligible learning rate."""
import os
import numpy as np
from testlib import check, checkpoint_table, finish, read_checkpoint, run, tiny_config, tmpdir

d = tmpdir("dcmoe-init-")
ONE = ["--set", "train.steps=1", "--set", "train.lr=1e-12", "--set", "train.warmup_steps=0", "--set", "checkpoint.interval=1",
       "--set", "train.eval_interval=0", "--set", "train.eval_batches=1"]


def expert_rows(name, ranks, sets):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    p = run(["train", cfg, "--quiet"] + ONE + sets, ranks=ranks)
    if not check(p.returncode == 0, f"{name}: run exits 0"):
        return None
    ck = read_checkpoint(os.path.join(d, name, "ckpt", "step_00000001", "model.bin"))
    a = np.frombuffer(ck["params.expert"], dtype=np.float32)
    return {t: a[off:off + n].reshape(d0, -1) for (t, cat, d0, n, off) in checkpoint_table(ck) if cat == 1}


for kind, sets, shared_kind in (("standard", [], "experts.w1"), ("clustered", ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4",
                                                                              "--set", "moe.rank=4"], "base1")):
    ind = expert_rows(f"{kind}-ind", 1, sets)
    sh = expert_rows(f"{kind}-shared", 1, sets + ["--set", "moe.expert_init=shared"])
    sh4 = expert_rows(f"{kind}-shared4", 4, sets + ["--set", "moe.expert_init=shared"])
    if ind is None or sh is None or sh4 is None:
        continue
    for tname, rows in sh.items():
        if not tname.endswith(shared_kind):
            continue
        rel = np.linalg.norm(rows[1:] - rows[0], axis=1) / np.linalg.norm(rows[0])
        rel_ind = np.linalg.norm(ind[tname][1:] - ind[tname][0], axis=1) / np.linalg.norm(ind[tname][0])
        check(np.all(rel < 0.03) and np.all(rel > 0.003), f"{kind} shared {tname}: every row = row 0 + ~1% noise "
                                                             f"(relative distance {rel.min():.4f}..{rel.max():.4f})")
        check(np.all(rel_ind > 1.0), f"{kind} independent {tname}: rows are independent draws ({rel_ind.min():.2f}..)")
        check(np.array_equal(rows, sh4[tname]), f"{kind} shared {tname}: the same at 1 and 4 ranks")
finish()
