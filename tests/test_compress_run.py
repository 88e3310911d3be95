"""mpi suite: warm-up as a standard MoE, then the one-shot compression event
(clustering.compress_at) in one run. A clustered config with compress_at 5 trains a standard
MoE for steps 1..5 (its losses equal a plain standard run's, bitwise), compresses after step 5
(one /cluster/compress row per MoE layer: weight and output errors in (0, 1), co-selection
fraction in [0, 1], probe losses before and after, the clustered model's parameter counts),
then trains the clustered model; re-clustering keeps working after it (its warm-up counts from
the compression). The co-selection fraction equals the one recomputed from the routing
trace (dropless: the trace holds every token's top-k) as an EMA over the warm-up steps and the
partition logged in cluster/group_of. Stopped before the event (step 3), at it (5) or after it
(7) and resumed, the run gives bitwise the uninterrupted losses, eval losses and compression
row. 4 ranks (flat expert parallelism, and ep_size 2 on a virtual 2x2 topology) give the
1-rank losses within the tolerance of test_ep_size. Per-event metrics of a 58-step run with
forced moves: jaccard_compress (cluster/events) equals the Jaccard of the logged partition to
the compression's; cluster/event_followup has one row per event (the compression's too) with
the probe loss 25 and 50 steps later (NaN past the end), bitwise the evaluation of the same
batches at those steps; stopped after the compression or with follow-ups pending and
resumed, the same rows; 2 ranks, the same rows. Bad input: compress_at with moe.kind
standard, compress_at >= train.steps are refused naming the key."""
import os
import sys
import numpy as np
from testlib import partition_jaccards, rel_err, train_tiny, SRC, check, finish, run, series, stop_and_resume, tiny_config, tmpdir

sys.path.insert(0, os.path.join(SRC, "analysis"))
import dcmoe_logs  # noqa: E402

d = tmpdir("dcmoe-compress-")
COMP = ["--set", "moe.kind=clustered", "--set", "moe.n_groups=4", "--set", "moe.rank=4",
        "--set", "clustering.compress_at=5", "--set", "clustering.interval=4", "--set", "clustering.warmup=2",
        "--set", "clustering.min_gain=0", "--set", "clustering.probe_batches=2", "--set", "moe.dropless=true"]


def train(name, ranks, sets, extra=()):
    return train_tiny(d, name, ranks, list(sets) + list(extra))



# ---- the event in one run ----
h, cfg, p = train("full", 1, COMP, ["--set", "log.trace_interval=1"])   # the trace does not change training
hs, _, _ = train("std", 1, ["--set", "moe.dropless=true"])
if os.path.exists(h) and os.path.exists(hs):
    s, loss = series(h, "train/loss")
    _, loss_std = series(hs, "train/loss")
    check(len(loss) == 12 and np.array_equal(loss[:5], loss_std[:5]),
          "warm-up: steps 1..5 are the standard MoE's, bitwise")
    check(not np.array_equal(loss[5:], loss_std[5:]), "after the compression the model differs from the standard MoE")
    sc, comp = series(h, "cluster/compress")
    check(list(sc) == [5] and comp.shape == (1, 2, 14), f"one compression row at step 5 for 2 layers ({list(sc)}, {comp.shape})")
    if comp.shape == (1, 2, 14):
        c = comp[0]
        check(np.all(c[:, 0] == [0, 1]) and np.all(c[:, 1] == 0), "columns: layer ids, partition learned")
        check(np.all((c[:, 2] > 0) & (c[:, 2] <= c[:, 3]) & (c[:, 3] < 1)),
              f"weight-space error mean <= max, in (0, 1): {c[:, 2:4].tolist()}")
        check(np.all((c[:, 4] > 0) & (c[:, 4] <= c[:, 5]) & (c[:, 5] < 1.5)),
              f"output-space error mean <= max: {c[:, 4:6].tolist()}")
        check(np.all((c[:, 6] >= 0) & (c[:, 6] <= 1)) and np.allclose(c[:, 7], 1 / 7),
              f"co-selection fraction in [0, 1], random expectation (K-1)/(E-1) = 1/7: {c[:, 6:8].tolist()}")
        check(np.all(np.isfinite(c[:, 10:12])) and np.all(c[:, 10:12] > 0), f"probe losses {c[0, 10:12].tolist()}")
        # E=8, G=4, r=4, D=32, F=32, GELU: bases G*(D*F + F*D), factors E*r*(D+F+F+D), 2 layers
        check(np.all(c[:, 13] == 2 * (4 * 2 * 32 * 32 + 8 * 4 * 4 * 32)), f"expert parameters after: {c[0, 13]:.0f}")
    check("compress step 5 |" in p.stdout, "console line of the event")
    tab = dcmoe_logs.compress_table([dcmoe_logs.load_run(os.path.join(d, "full"))])
    check(list(tab["step"]) == [5, 5] and np.allclose(tab["coselect_frac"], comp[0, :, 6]),
          "analysis loader: compress_table has the event's rows by column name")
    cfg_text = dcmoe_logs.load_run(os.path.join(d, "full")).config
    check(cfg_text.get("moe.kind") == "clustered", f"the log's config is the run's (moe.kind {cfg_text.get('moe.kind')})")
    se, _ = series(h, "cluster/events")
    check(list(se) == [8], f"re-clustering after the compression: events at step 8 only ({list(se)})")
    _, ev = series(h, "eval/loss")
    check(len(ev) == 2 and np.all(np.isfinite(ev)), "eval losses finite")

    # ---- bitwise resume across the event ----
    for stop in (3, 5, 7):
        hb = stop_and_resume(cfg, d, f"split{stop}", stop, COMP)
        if hb is None:
            continue
        _, lb = series(hb, "train/loss")
        _, eb = series(hb, "eval/loss")
        _, cb = series(hb, "cluster/compress")
        check(np.array_equal(loss, lb) and np.array_equal(ev, series(hb, "eval/loss")[1]),
              f"stopped at {stop} and resumed: train and eval losses bitwise equal")
        check(np.array_equal(comp[:, :, :8], cb[:, :, :8]) and np.array_equal(comp[:, :, 10:], cb[:, :, 10:]),
              f"stopped at {stop} and resumed: the same compression row (errors, co-selection, probe losses)")

    # ---- 1 rank vs 4 ranks ----
    for tag, sets in (("flat", []), ("ep2", ["--set", "parallel.ep_size=2", "--set", "topology.nodes=2",
                                              "--set", "topology.ranks_per_node=2"])):
        h4, _, _ = train(f"r4-{tag}", 4, COMP + sets)
        if not os.path.exists(h4):
            continue
        _, l4 = series(h4, "train/loss")
        _, e4 = series(h4, "eval/loss")
        _, c4 = series(h4, "cluster/compress")
        check(rel_err(loss, l4) < 2e-4 and rel_err(ev, e4) < 2e-4,
              f"4 ranks ({tag}) vs 1 rank: losses equal (rel {rel_err(loss, l4):.2e}, eval {rel_err(ev, e4):.2e})")
        check(c4.shape == comp.shape and np.allclose(c4[:, :, 2:4], comp[:, :, 2:4], rtol=1e-3),
              f"4 ranks ({tag}): the same weight-space errors")

    # ---- the co-activation statistics, recomputed from the routing trace (dropless: every
    # selected pair is kept, so the trace holds each token's flat top-k) ----
    ht = h
    if True:
        st, tr = series(ht, "trace/routing")          # [steps, layers, ranks, tokens * k]
        sg, gof = series(ht, "cluster/group_of")
        _, ct = series(ht, "cluster/compress")
        check(5 in list(sg), f"the compression's partition is logged in cluster/group_of at step 5 ({list(sg)})")
        if 5 in list(sg) and len(st) >= 5:
            E, k, beta = 8, 2, 0.05
            g5 = gof[list(sg).index(5)]
            for layer in range(2):
                ema = None
                for step in range(5):
                    sel = tr[step, layer, 0].reshape(-1, k)
                    c = np.zeros((E, E))
                    for row in sel:
                        for a in range(k):
                            for b in range(a + 1, k):
                                if row[a] != row[b]:
                                    c[row[a], row[b]] += 1
                                    c[row[b], row[a]] += 1
                    c /= len(sel)
                    ema = c if ema is None else (1 - beta) * ema + beta * c
                iu = np.triu_indices(E, 1)
                same = (g5[layer][:, None] == g5[layer][None, :])[iu]
                want = ema[iu][same].sum() / ema[iu].sum()
                check(abs(ct[0, layer, 6] - want) < 1e-9,
                      f"layer {layer}: co-selection fraction {ct[0, layer, 6]:.6f} = the one recomputed from the "
                      f"routing trace and the logged partition ({want:.6f})")

# ---- per-event metrics: jaccard_compress against the compression's partition, and the
# follow-up probe losses 25 and 50 steps after each event (cluster/event_followup) ----
# events at 8, 16, ..., 56 (moves forced: co-activation proposals, alpha 0, min_gain 0); the
# evaluations at 33 and 58 (the last step) use the probe's batches (probe_batches =
# eval_batches = 2) on the same model, so the step-8 event's follow-ups equal them bitwise
EV = COMP + ["--set", "train.steps=58", "--set", "clustering.interval=8", "--set", "clustering.alpha=0",
             "--set", "clustering.mu_source=coact", "--set", "train.eval_interval=33", "--set", "checkpoint.interval=4"]
he, cfg_e, _ = train("ev", 1, EV)
if os.path.exists(he):
    s_ev, ev = series(he, "cluster/events")
    s_fu, fu = series(he, "cluster/event_followup")
    s_g, gof = series(he, "cluster/group_of")
    s_v, vl = series(he, "eval/loss")
    _, cp = series(he, "cluster/compress")
    import h5py
    with h5py.File(he, "r") as f:
        fcols = str(f["cluster/event_followup"].attrs["columns"]).split(",")
        ecols = str(f["cluster/events"].attrs["columns"]).split(",")
    check(fcols == ["event_step", "kind", "probe_loss_before", "probe_loss_after", "probe_loss_25", "probe_loss_50"]
          and ev.shape[2] == 19 and ecols[18] == "jaccard_compress",
          f"cluster/event_followup columns {fcols}; cluster/events ends with {ecols[-1]}")
    check(list(s_ev) == list(range(8, 57, 8)), f"events at 8..56 ({list(s_ev)})")
    want_ev = [5] + list(s_ev)
    check(list(fu[:, 0]) == want_ev and list(fu[:, 1]) == [1] + [0] * len(s_ev)
          and list(s_fu) == [min(e + 50, 58) for e in want_ev],
          f"one follow-up row per event (compression kind 1, re-clustering 0), written at event + 50 or the last step "
          f"({list(zip(fu[:, 0].astype(int), s_fu))})")
    check(np.array_equal(fu[1:, 2], ev[:, 0, 10]) and np.array_equal(fu[1:, 3], ev[:, 0, 11])
          and fu[0, 2] == cp[0, 0, 10] and fu[0, 3] == cp[0, 0, 11],
          "probe_loss_before/after: the event's own (cluster/events, cluster/compress)")
    reach25, reach50 = fu[:, 0] + 25 <= 58, fu[:, 0] + 50 <= 58
    check(np.all(np.isfinite(fu[reach25, 4])) and np.all(np.isnan(fu[~reach25, 4])) and np.all(np.isfinite(fu[reach50, 5]))
          and np.all(np.isnan(fu[~reach50, 5])) and reach50.sum() == 2,
          f"probe_loss_25/50 finite where the run reached event + 25/50 (events {list(fu[reach50, 0].astype(int))} "
          f"both), NaN where it ended first")
    v = dict(zip(s_v.astype(int), vl))
    check(33 in v and 58 in v and fu[1, 4] == v[33] and fu[1, 5] == v[58],
          f"event 8: probe_loss_25 = eval/loss at 33 ({fu[1, 4]:.6f} / {v.get(33, np.nan):.6f}), probe_loss_50 = "
          f"eval/loss at 58 ({fu[1, 5]:.6f} / {v.get(58, np.nan):.6f}) bitwise")
    # jaccard_compress: the reference is the compression's partition (group_of logged at step 5)
    jc = ev[:, :, 18]
    g5 = gof[list(s_g).index(5)]
    ok_j = all(round(float(jc[i, l]), 12) in partition_jaccards(g5[l], gof[list(s_g).index(s)][l], 4)
               for i, s in enumerate(s_ev) for l in range(jc.shape[1]))
    mv = ev[:, :, 3] * ev[:, :, 4]
    check(ok_j and mv.sum() > 0 and np.all(jc[mv.cumsum(axis=0) == 0] == 1.0) and np.any(jc < 1),
          f"jaccard_compress = the Jaccard of the logged group_of to the compression's partition at every event "
          f"(1 until a layer's first move; min {jc.min():.3f})")
    # stopped after the compression (reference from the checkpoint) and with follow-ups pending
    for stop in (7, 36):
        name = f"ev-split{stop}"
        p1 = run(["train", cfg_e, "--quiet", "--set", f"run.name={name}", "--stop-at", str(stop)] + EV)
        p2 = run(["train", cfg_e, "--quiet", "--set", f"run.name={name}", "--resume"] + EV)
        hb = os.path.join(d, name, "metrics.h5")
        check(p1.returncode == 0 and p2.returncode == 0 and os.path.exists(hb), f"events run: stop at {stop}, resume")
        if not os.path.exists(hb):
            continue
        sb, fb = series(hb, "cluster/event_followup")
        _, eb = series(hb, "cluster/events")
        keep = [c for c in range(19) if c != 9]     # all but the event's seconds
        check(np.array_equal(s_fu, sb) and np.array_equal(fu, fb, equal_nan=True)
              and np.array_equal(ev[:, :, keep], eb[:, :, keep], equal_nan=True),
              f"stopped at {stop} and resumed: the same follow-up rows and event rows (jaccard_compress included)")
    # 2 ranks: the probe evaluations are collective
    h2, _, _ = train("ev-2r", 2, EV)
    if os.path.exists(h2):
        s2, f2 = series(h2, "cluster/event_followup")
        _, e2 = series(h2, "cluster/events")
        fin = np.isfinite(fu[:, 2:])
        r2 = rel_err(fu[:, 2:][fin], f2[:, 2:][fin]) if f2.shape == fu.shape else 1.0
        check(np.array_equal(s2, s_fu) and f2.shape == fu.shape and np.array_equal(np.isfinite(f2[:, 2:]), fin)
              and np.array_equal(f2[:, :2], fu[:, :2]) and r2 < 2e-4 and np.array_equal(e2[:, :, 18], jc),
              f"2 ranks: the same follow-up rows (probe losses rel {r2:.2e}) and jaccard_compress")

# ---- bad input ----
cfg = os.path.join(d, "bad.yaml")
tiny_config(cfg, d, "bad")
for sets, want in ((["--set", "clustering.compress_at=4"], "clustering.compress_at=4 needs moe.kind=clustered"),
                   (COMP + ["--set", "clustering.compress_at=12"], "clustering.compress_at=12 must be below train.steps=12")):
    pb = run(["train", cfg, "--quiet"] + sets, check_rc=False)
    check(pb.returncode != 0 and want in pb.stderr + pb.stdout,
          f"refused: {want!r} ({(pb.stderr + pb.stdout).strip()[-200:]})")
finish()
