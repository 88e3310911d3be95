"""mpi suite: the re-clustering event's traffic in the training log (4 ranks, a virtual
2 nodes x 2 ranks). The event runs where the experts live: only the parameter features of
every rank's experts go to every other rank, the members that change rank travel to their new
group's owner, and the owners send the refit groups' error statistics. Checked from
metrics.h5 (comm/summary, comm/bytes, cluster/*):
- the bytes booked to phase `recluster` (the 6th comm/summary column) are 0 on every step's
  row except the row after an event, and there they equal the analytic volume, per (src, dst)
  rank pair and in total (features [El * Pw floats] to every other rank + the moved members'
  reconstructed rows + 16 bytes per refit group to every other rank);
- they are far below the old event's all-gather of every expert's weights and both Adam
  moments to every rank;
- the event books nothing to the other phases: migration and other stay 0, allreduce bytes
  per step are the same on event rows as on every other row;
- a 1-rank run of the same config makes the same clustering decisions (group_of rows)."""
import os
import numpy as np
from testlib import check, finish, run, series, tiny_config, tmpdir

d = tmpdir("dcmoe-recluster-comm-")
P, E, G, D, F, R, PW = 4, 16, 8, 32, 32, 4, 16
K, GL = E // G, G // P
SETS = ["--set", "moe.kind=clustered", "--set", f"moe.n_experts={E}", "--set", f"moe.n_groups={G}",
        "--set", f"moe.rank={R}", "--set", f"moe.d_ff_expert={F}", "--set", "moe.top_groups=2",
        "--set", "clustering.interval=3", "--set", "clustering.warmup=2", "--set", f"clustering.proj_dim={PW}",
        "--set", "clustering.alpha=0", "--set", "clustering.min_gain=0", "--set", "clustering.reset_adam=true",
        "--set", "parallel.placement=contiguous", "--set", "parallel.place_interval=0",
        "--set", "parallel.traffic_interval=1"]
VIRT = ["--set", "topology.nodes=2", "--set", "topology.ranks_per_node=2"]


def train(name, ranks, sets):
    cfg = os.path.join(d, f"{name}.yaml")
    tiny_config(cfg, d, name)
    p = run(["train", cfg, "--quiet"] + sets, ranks=ranks)
    check(p.returncode == 0, f"{name}: {ranks}-rank run exits 0")
    return os.path.join(d, name, "metrics.h5")


h4 = train("r4", P, SETS + VIRT)
h1 = train("r1", 1, SETS)
if os.path.exists(h4):
    import h5py
    with h5py.File(h4, "r", swmr=True) as f:
        cols = str(f["comm/summary/intra_bytes"].attrs["columns"]).split(",")
        kinds = str(f["params/by_kind"].attrs["kinds"]).split(",")
        by_kind = f["params/by_kind"][()]
    check(len(cols) == 6 and cols[5] == "recluster", f"comm/summary columns name 6 phases, the last recluster ({cols})")
    ph = {c: i for i, c in enumerate(cols)}
    rs = ph["recluster"]
    s_c, intra = series(h4, "comm/summary/intra_bytes")
    _, inter = series(h4, "comm/summary/inter_bytes")
    byt = intra + inter
    check(byt.shape[1] == 6, f"comm/summary rows have 6 phases ({byt.shape})")
    s_m, mat = series(h4, "comm/bytes")
    check(np.array_equal(s_m, s_c) and mat.shape[1:] == (6, P, P), f"comm/bytes every step, [6, {P}, {P}]")
    s_e, evs = series(h4, "cluster/events")
    s_g, gof = series(h4, "cluster/group_of")
    _, owner = series(h4, "parallel/owner")
    NC = gof.shape[1]                    # clustered layers (every layer of tiny_config)
    moving = int(np.sum((evs[:, :, 3] == 1) & (evs[:, :, 4] > 0)))
    check(len(s_e) >= 2 and moving >= 1, f"{len(s_e)} events x {NC} layers, {moving} accepted and moving experts")
    # contiguous placement, never re-placed: group g lives on the owner of its first initial member
    gown = owner[0, :, ::K].astype(int)
    check(np.all(gown == np.arange(G) // GL), f"groups placed contiguously ({gown[0]})")
    n1, n2 = D * F, F * D
    row = n1 + n2                        # reset_adam: the moments do not travel
    want_rows = {}
    old = np.tile(np.arange(E) // K, (NC, 1))   # the initial grouping is contiguous
    crossed = 0                          # (layer, rank pair)s that carried members at some event
    for i, s in enumerate(s_e):
        m = np.zeros((P, P))
        for c in range(NC):
            new = gof[i, c].astype(int)
            mc = np.full((P, P), 4.0 * GL * K * PW)   # features of each rank's experts to every other rank
            changed = [g for g in range(G) if not np.array_equal(old[c] == g, new == g)]
            for g in changed:
                mc[gown[c, g], :] += 16.0    # the group's (error sum, max) to every other rank
                for e in np.nonzero(new == g)[0]:
                    src = gown[c, old[c, e]]
                    if src != gown[c, g]:
                        mc[src, gown[c, g]] += 4.0 * row
            np.fill_diagonal(mc, 0)
            crossed += int(np.sum(mc > 4.0 * GL * K * PW + 16.0 * G))
            check(len(changed) == int(evs[i, c, 5]),
                  f"event at step {s}, layer {c}: {len(changed)} changed groups = groups_refit")
            m += mc
            old[c] = new
        want_rows[int(s) + 1] = m        # the event runs after step s: its bytes land in the next row
        check(evs.shape[2] == 19 and evs[i, :, 16].sum() == m.sum(),
              f"event at step {s}: the bytes column ({evs[i, :, 16].sum():.0f}) = analytic {m.sum():.0f}")
        wi, wc, mi, mcr = (evs[i, :, j] for j in (12, 13, 14, 15))
        check(np.all(np.abs(np.concatenate([wi, wc, mi, mcr])) <= 1 + 1e-9) and np.all(wi > wc),
              f"event at step {s}: feature cosines in [-1, 1], weights within > across groups "
              f"({wi.mean():.3f} vs {wc.mean():.3f}: the self-confirmation the issue names)")
    check(crossed > 0, f"members crossed ranks ({crossed} rank pairs carried members)")
    expert_floats = by_kind[kinds.index("base")] + by_kind[kinds.index("factor")]
    old_gather = 3 * 4.0 * expert_floats * (P - 1) * P
    for s, b, mm in zip(s_c, byt, mat):
        w = want_rows.get(int(s))
        if w is None:
            check(b[rs] == 0 and np.all(mm[rs] == 0), f"step {s}: no recluster bytes outside events")
            continue
        check(b[rs] == w.sum(), f"step {s}: recluster bytes {b[rs]:.0f} = analytic {w.sum():.0f}")
        check(np.array_equal(mm[rs], w), f"step {s}: recluster (src, dst) matrix = analytic per rank pair")
        check(b[rs] * 10 < old_gather,
              f"step {s}: {b[rs]:.0f} bytes, {100 * b[rs] / old_gather:.1f}% of the old full gather ({old_gather:.0f})")
    check(len(want_rows) == len(s_e) and all(s in set(s_c.astype(int)) for s in want_rows),
          "every event's bytes are in a logged row")
    check(np.all(byt[:, ph["migration"]] == 0) and np.all(byt[:, ph["other"]] == 0),
          "no migration or other bytes on any step (the event books only to recluster)")
    ar = byt[:, ph["allreduce"]]
    check(np.all(ar == ar[0]) and ar[0] > 0, f"allreduce bytes the same on every step, event rows included ({ar[0]:.0f})")
    if os.path.exists(h1):
        s1, g1 = series(h1, "cluster/group_of")
        check(np.array_equal(s1, s_g) and np.array_equal(g1, gof), "1 and 4 ranks: identical group_of at every event")
        _, e1 = series(h1, "cluster/events")
        check(np.allclose(e1[:, 0, 1:3], evs[:, 0, 1:3], rtol=1e-5) and np.array_equal(e1[:, 0, 3:6], evs[:, 0, 3:6]),
              "1 and 4 ranks: same event costs, accepted, moved, groups refit")
        _, l1 = series(h1, "train/loss")
        _, l4 = series(h4, "train/loss")
        rel = np.max(np.abs(l1 - l4) / np.abs(l1))
        check(rel < 2e-4, f"1 vs 4 ranks train losses within 2e-4 across the events ({rel:.2e})")
finish()
