"""mpi suite: expert parallelism on 4 (oversubscribed) ranks as a virtual 2 nodes x 2 ranks.
- 1 vs 4 ranks give equal losses (float tolerance) for dense, standard and clustered models;
- the traffic profiler's bytes equal the analytic volume of a fixed routing (every token to
  every expert: E = P = k = 4, dropless), split exactly into intra- and inter-node bytes;
- the two-level exchange (node peer, then owner) gives the flat exchange's losses with
  fewer inter-node bytes;
- migrating expert groups every step (placement re-run each step) leaves the model exactly
  as it is without migration (bitwise losses and checkpointed experts, grad_clip off);
- a checkpoint written at 4 ranks loads at 2 and at 1 rank: the continued losses match the
  4-rank run and every expert's weights come back intact."""
import os
import shutil
import numpy as np
from testlib import check, expert_rows_bad, finish, read_checkpoint, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-ep-")
VIRT = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=2"]
CLUS = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4",
        "--set", "clustering.interval=4", "--set", "clustering.warmup=2"]


def train(name, ranks, sets, extra=""):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name, extra)
    p = run(["train", cfg, "--quiet"] + sets, ranks=ranks)
    check(p.returncode == 0, f"{name}: {ranks}-rank run exits 0")
    return os.path.join(d, name, "metrics.h5"), cfg, p


read_ckpt = read_checkpoint




# ---- 1 vs 4 ranks ----
for name, sets in {"dense": ["--set", "moe.kind=dense"], "standard": [], "clustered": CLUS}.items():
    h1, _, _ = train(f"eq-{name}-1", 1, sets)
    h4, _, _ = train(f"eq-{name}-4", 4, sets + VIRT)
    if not (os.path.exists(h1) and os.path.exists(h4)):
        continue
    _, l1 = series(h1, "train/loss")
    _, l4 = series(h4, "train/loss")
    rel = np.max(np.abs(l1 - l4) / np.abs(l1))
    check(len(l1) == 12 and rel < 2e-4, f"{name}: 1 vs 4 ranks (expert parallel) losses equal within 2e-4 ({rel:.2e})")
    _, e1 = series(h1, "eval/loss")
    _, e4 = series(h4, "eval/loss")
    check(np.max(np.abs(e1 - e4) / np.abs(e1)) < 2e-4, f"{name}: 1 vs 4 ranks eval losses equal")

# ---- analytic bytes: E = P = k = 4, dropless: every token goes to every rank ----
h, _, _ = train("bytes", 4, VIRT + ["--set", "moe.n_experts=4", "--set", "moe.top_k=4", "--set", "moe.dropless=true",
                                    "--set", "parallel.place_interval=0"])
if os.path.exists(h):
    N, D, layers, P = 2 * 16, 32, 2, 4          # tokens per rank, d_model, MoE layers, ranks
    row = 4 * D
    disp_pair = layers * (16 + 12 * N + row * N + row * N)    # counts, entries, x rows, dout rows
    comb_pair = layers * (row * N + row * N + 4 * N)          # y rows, dx rows, dgates
    _, intra = series(h, "comm/summary/intra_bytes")
    _, inter = series(h, "comm/summary/inter_bytes")
    # 12 ordered rank pairs: 8 cross the virtual node boundary, 4 stay inside a node
    check(np.all(inter[:, 1] == 8 * disp_pair) and np.all(intra[:, 1] == 4 * disp_pair),
          f"dispatch bytes per step = analytic (inter {8 * disp_pair}, intra {4 * disp_pair}; got {inter[0, 1]:.0f}, {intra[0, 1]:.0f})")
    check(np.all(inter[:, 2] == 8 * comb_pair) and np.all(intra[:, 2] == 4 * comb_pair),
          f"combine bytes per step = analytic (inter {8 * comb_pair}, intra {4 * comb_pair}; got {inter[0, 2]:.0f}, {intra[0, 2]:.0f})")
    check(np.all(inter[:, 3] == 0) and np.all(intra[:, 3] == 0), "no migration bytes without re-placement")
    check(np.all(intra[:, 0] + inter[:, 0] > 0), "allreduce traffic booked")
    _, disp = series(h, "comm/dispatch")
    check(np.all(disp[:, 0] == N * P * layers * P) and np.all(disp[:, 3] == N * layers * P),
          f"dispatch rows {disp[0, 0]:.0f} = tokens x ranks x layers x ranks, token-layers {disp[0, 3]:.0f}")
    check(np.all(disp[:, 2] == 2 * disp[:, 3]), "every token touches both virtual nodes")
    _, mat = series(h, "comm/bytes")
    m = mat[-1]
    check(np.all(np.diag(m[1]) == 0) and np.all(m[1] + np.eye(4) * disp_pair == disp_pair),
          "(src, dst) dispatch matrix: every off-diagonal entry = analytic pair volume")
    _, msg = series(h, "comm/msgs")
    # per layer and pair: counts, entries and x rows (forward), dout rows (backward)
    check(np.all(msg[-1][1] + np.eye(4) * layers * 4 == layers * 4), "(src, dst) dispatch messages = 4 per layer and pair")

# ---- two-level exchange: same model, fewer inter-node bytes ----
for name, sets in {"standard": ["--set", "moe.n_experts=16"], "clustered": CLUS + ["--set", "moe.top_groups=2"]}.items():
    hf, _, _ = train(f"x-{name}-flat", 4, sets + VIRT)
    h2, _, _ = train(f"x-{name}-two", 4, sets + VIRT + ["--set", "parallel.exchange=two_level"])
    if os.path.exists(hf) and os.path.exists(h2):
        _, lf = series(hf, "train/loss")
        _, l2 = series(h2, "train/loss")
        rel = np.max(np.abs(lf - l2) / np.abs(lf))
        check(rel < 2e-4, f"{name}: two-level exchange gives the flat exchange's losses ({rel:.2e})")
        _, inf_ = series(hf, "comm/summary/inter_bytes")
        _, in2 = series(h2, "comm/summary/inter_bytes")
        a, b = inf_[:, 1:3].sum(), in2[:, 1:3].sum()
        check(b < a, f"{name}: two-level moves fewer inter-node dispatch+combine bytes ({b:.0f} < {a:.0f})")

# ---- migration preserves the model exactly ----
mig = CLUS + VIRT + ["--set", "moe.top_groups=2", "--set", "train.grad_clip=0", "--set", "clustering.enabled=false",
                     "--set", "parallel.min_gain=0", "--set", "parallel.max_imbalance=1000"]
ha, _, _ = train("mig-every", 4, mig + ["--set", "parallel.place_interval=1"])
hb, _, _ = train("mig-never", 4, mig + ["--set", "parallel.place_interval=0"])
if os.path.exists(ha) and os.path.exists(hb):
    _, mb = series(ha, "parallel/migration_bytes")
    check(mb.sum() > 0, f"groups migrated while training ({mb.sum():.0f} bytes in {np.count_nonzero(mb)} events)")
    _, la = series(ha, "train/loss")
    _, lb = series(hb, "train/loss")
    check(np.array_equal(la, lb), "losses with migration every step are bitwise equal to losses without")
    ca = read_ckpt(os.path.join(d, "mig-every", "ckpt", "step_00000012", "model.bin"))
    cb = read_ckpt(os.path.join(d, "mig-never", "ckpt", "step_00000012", "model.bin"))
    same = all(ca[k] == cb[k] for k in ("params.expert", "adam_m.expert", "adam_v.expert"))
    check(same, "checkpointed experts (weights and Adam state) identical with and without migration")

# ---- save at 4 ranks, load at 2 and at 1 ----
ck = CLUS + ["--set", "checkpoint.interval=6", "--set", "clustering.enabled=false"]
h4, cfg4, _ = train("ck4", 4, ck + VIRT)
if os.path.exists(h4):
    _, l4 = series(h4, "train/loss")
    ref = read_ckpt(os.path.join(d, "ck4", "ckpt", "step_00000012", "model.bin"))
    for ranks in (2, 1):
        name = f"ck4-to{ranks}"
        shutil.copytree(os.path.join(d, "ck4"), os.path.join(d, name))
        shutil.rmtree(os.path.join(d, name, "ckpt", "step_00000012"))
        os.remove(os.path.join(d, name, "DONE"))   # as if killed after step 6
        p = run(["train", cfg4, "--quiet", "--resume", "--set", f"run.name={name}"] + ck, ranks=ranks)
        check(p.returncode == 0, f"4-rank checkpoint resumed at {ranks} rank(s)")
        if p.returncode != 0:
            continue
        # a new log starts at the new rank count; the 4-rank one is kept beside it
        check(os.path.exists(os.path.join(d, name, "metrics.ranks4.h5")), "the 4-rank log is kept as metrics.ranks4.h5")
        st_, lr_ = series(os.path.join(d, name, "metrics.h5"), "train/loss")
        rel = np.max(np.abs(lr_ - l4[6:]) / np.abs(l4[6:])) if len(lr_) == 6 else 1.0
        check(list(st_) == list(range(7, 13)) and rel < 2e-4, f"steps 7..12 at {ranks} rank(s) match the 4-rank run ({rel:.2e})")
        got = read_ckpt(os.path.join(d, name, "ckpt", "step_00000012", "model.bin"))
        bad = expert_rows_bad(ref, got)
        check(not bad, f"every expert row intact after 4 -> {ranks} ranks ({len(bad)} bad: {bad[:3]})")
finish()
