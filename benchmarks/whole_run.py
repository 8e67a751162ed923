"""Whole-run attribution against exact replay, and whether it answers the user's question (issue 19).

    python benchmarks/whole_run.py          # about 8 minutes on 2 CPU cores (one torch thread); tables to stdout, JSON to results/

The runs are those of benchmarks/applications.py: the bundled digits, 16 nodes, exponential
graph, 24 rounds, batch 16, float64, 10 seeds; the first 100 held-out digits are the test
objective (the mean test loss of the 16 final models) unless said otherwise. Two optimizers:
plain SGD lr 0.1 and SGD with momentum 0.9 (digits_run's "momentum" preset, lr 0.05).

A. Issue 19, item 2 targets. Per seed and optimizer:
   - node level: dk.node_contributions order 1 and 2 against dk.final_gt(remove=range(16))
     (each node's data removed from every round, replayed to the final models); Pearson and
     relative error over the 16 nodes. Target for order 2: relative error <= 0.10 and Pearson
     >= 0.995 on every seed.
   - sample level: 200 random (round, node, sample) triples (rounds 0..23), each removed alone
     at its round and replayed to the end; dk.final_influence against dk.final_gt. Target
     Pearson >= 0.999, relative error <= 0.05.
   - diagnosis of order 2's error. Order 2 (since commit 9c1a335) carries the removal of each
     node's data to second order through every round (d1, d2: the first and second derivatives of
     the state in the scale of the removed weights; delta_2nd = d1 - d2/2) and reads the final test
     loss's change along delta_2nd by Simpson's rule. Next to the exact perturbation of the final
     models delta_exact (the replay's theta^T minus the factual): the exact loss at
     theta^T - delta_2nd isolates the error left in the perturbation (no loss-side error); Simpson
     on delta_exact isolates the final loss beyond cubic (no dynamics error). For comparison, the
     linearised delta_lin (d1, order 1's forward sweep) read by Simpson, exactly, and by the
     trapezoid (order 2's definition before 9c1a335); and the trapezoid on delta_2nd (what
     Simpson's rule adds on the new perturbation).
   - wall time of node_contributions order 1 and 2 and of final_gt(remove=range(16)) (the 16 exact
     leave-one-node-out replays), measured side by side in this process, best of 3 interleaved.
B. Issue 19, item 6.
   - LDS: per seed, 50 random subsets of 4 of the 16 nodes whose data is removed from every
     round together (final_gt, one replay each); Spearman between the replayed change and the
     sum over the subset of each method's per-node score. Per-node scores are read as "loss
     with minus loss without" (harmful positive), the direction of dk.baselines; data size
     enters negated (more data, more helpful). The additive oracle sums the 16 exact
     leave-one-node-out replays: the best any additive per-node score can do. The ledger
     (OnlineDICE totals, hops 3, as applications.py computes them) runs under plain SGD only
     (applications.ledger_of records no optimizer state).
   - corrupted nodes: dk.analysis.anomaly_experiment's setup (3 of 16 nodes "flip" or "noise",
     rounds 10.. scored, all 200 held-out digits as the test objective, as in applications.py);
     ROC AUC of ranking the nodes by node_contributions (order 1, 2), the ledger totals, the
     exact leave-node-out replay, DICE node scores and the baselines.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import dicekern as dk
from applications import BATCH, HOPS, NODES, ROUNDS, SEEDS, interval, ledger_of, shown, split
from dicekern.curvature.round import gossip_round
from dicekern.engine.queries import plan_whole_run
from dicekern.engine.sweep import RunSweep

OPTIMIZERS = ("sgd", "momentum")
TRIPLES, SUBSETS, REMOVED, REPEATS = 200, 50, 4, 3
KINDS = ("flip", "noise")
TARGETS = {"order 2": (0.995, 0.10), "samples": (0.999, 0.05)}  # (Pearson at least, relative error at most)


def agreement(estimate: torch.Tensor, truth: torch.Tensor) -> dict:
    return {"pearson": dk.analysis.pearson(estimate, truth), "rel_error": dk.analysis.relative_error(estimate, truth)}


def exact_perturbations(traj: dk.Trajectory) -> torch.Tensor:
    """(N, N, D): [j] theta^T minus theta^T replayed with node j's samples weighted 0 at every round."""
    objective, spec = traj.objective, traj.optimizer
    final = traj[traj.steps[-1]].params
    result = []
    for j in range(NODES):
        first = traj[traj.steps[0]]
        theta, state = first.params, first.state
        for t in traj.steps[:-1]:
            r = traj[t]
            weights = torch.full(r.inputs.shape[:2], 1.0 / BATCH, dtype=theta.dtype)
            weights[j] = 0.0
            _, theta, state, _ = gossip_round(objective, spec, theta, state, r.inputs, r.targets, r.lr, r.W, weights, mix_state=traj.mix_state)
        result.append(final - theta)
    return torch.stack(result)


def swept_perturbations(traj: dk.Trajectory, test, order: int) -> torch.Tensor:
    """(N, N, D): [j] the change of the final params from node j's data by RunSweep's forward sweep:
    order 1, the linearised delta_lin (d1); order 2, delta_2nd = d1 - d2 / 2, the removal carried to
    second order through every round (what node_contributions(order=2) reads since 9c1a335)."""
    sweep = RunSweep(plan_whole_run(traj, test, None, {}, "diagnosis"))
    delta = None
    for tau in range(sweep.first, sweep.last):
        delta = sweep.advance(delta, tau, torch.arange(NODES), order=order)
    if order == 2:
        delta = delta[0] - 0.5 * delta[1]
    return delta[:, :, 0].permute(1, 0, 2)


def diagnose(traj: dk.Trajectory, test, gt: torch.Tensor, order2: torch.Tensor) -> dict:
    """Relative errors (over the 16 nodes) of order 2's two approximations, each alone, and of the
    pieces of the previous order 2 (trapezoid on delta_lin) for comparison."""
    theta = traj[traj.steps[-1]].params
    loss = lambda params: traj.objective.test_losses(params, test).mean()
    grad = torch.func.grad(loss)
    g = grad(theta)
    exact, linear, second = exact_perturbations(traj), swept_perturbations(traj, test, 1), swept_perturbations(traj, test, 2)
    change = lambda deltas: torch.stack([loss(theta) - loss(theta - d) for d in deltas])
    simpson = lambda deltas: torch.stack([((g + 4 * grad(theta - 0.5 * d) + grad(theta - d)) * d).sum() / 6 for d in deltas])
    trapezoid = lambda deltas: torch.stack([0.5 * ((g + grad(theta - d)) * d).sum() for d in deltas])
    rows = {
        "exact loss on delta_exact (replay check)": change(exact),
        "Simpson on delta_2nd (order 2 recomputed)": simpson(second),
        "exact loss on delta_2nd (order 2's dynamics error only)": change(second),
        "trapezoid on delta_2nd (the rule alone: trapezoid instead of Simpson)": trapezoid(second),
        "Simpson on delta_exact (loss beyond cubic only)": simpson(exact),
        "Simpson on delta_lin (linearised perturbation)": simpson(linear),
        "exact loss on delta_lin (linearisation's dynamics error only)": change(linear),
        "trapezoid on delta_lin (order 2 before 9c1a335)": trapezoid(linear),
        "first order on delta_exact (all loss curvature dropped)": torch.stack([(g * d).sum() for d in exact]),
    }
    result = {name: agreement(value, gt) for name, value in rows.items()}
    result["Simpson on delta_2nd (order 2 recomputed)"]["max_abs_vs_node_contributions"] = float(
        (rows["Simpson on delta_2nd (order 2 recomputed)"] - order2).abs().max())
    result["max |order 2| (scale)"] = float(order2.abs().max())
    result["||delta_lin - delta_exact|| / ||delta_exact||"] = dk.analysis.relative_error(linear, exact)
    result["||delta_2nd - delta_exact|| / ||delta_exact||"] = dk.analysis.relative_error(second, exact)
    return result


def timed(calls: dict, repeats: int) -> tuple[dict, dict]:
    """Each call's result and its best wall time (s) over repeats, the calls interleaved in one process."""
    results, seconds = {}, {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            results[name] = call()
            seconds[name].append(time.perf_counter() - started)
    return results, {name: min(values) for name, values in seconds.items()}


def random_triples(seed: int) -> list[tuple[int, int, int]]:
    flat = np.random.default_rng(2000 + seed).choice(ROUNDS * NODES * BATCH, TRIPLES, replace=False)
    return [tuple(int(v) for v in np.unravel_index(i, (ROUNDS, NODES, BATCH))) for i in flat]


def lds(scores: dict[str, torch.Tensor], subsets: list[list[int]], truth: torch.Tensor) -> dict[str, float | None]:
    """Spearman between each score's sum over every subset and the replayed change (None: a constant prediction)."""
    result = {}
    for name, score in scores.items():
        predicted = np.array([float(score[s].sum()) for s in subsets])
        result[name] = None if np.ptp(predicted) == 0 else float(stats.spearmanr(predicted, truth.numpy()).statistic)
    return result


def fidelity_and_lds(optimizer: str, seed: int) -> dict:
    run = dk.examples.digits_run(NODES, ROUNDS, batch_size=BATCH, seed=seed, optimizer=optimizer)
    traj = run.trajectory
    test, _ = split(run.test)
    found, seconds = timed({"final_gt(remove=range(16))": lambda: dk.final_gt(traj, test, remove=list(range(NODES))),
                            "node_contributions order 1": lambda: dk.node_contributions(traj, test, order=1),
                            "node_contributions order 2": lambda: dk.node_contributions(traj, test, order=2)}, REPEATS)
    gt, order1, order2 = found.values()
    influence = dk.final_influence(traj, test)
    triples = random_triples(seed)
    sample_gt = dk.final_gt(traj, test, remove=triples)
    sample_est = torch.stack([influence[t - traj.steps[0], j, b] for t, j, b in triples])
    early = torch.tensor([t < ROUNDS // 3 for t, _, _ in triples])
    late = torch.tensor([t >= 2 * ROUNDS // 3 for t, _, _ in triples])
    entry = {
        "seed": seed,
        "seconds": seconds,
        "node": {"order 1": agreement(order1, gt), "order 2": agreement(order2, gt)},
        "samples": agreement(sample_est, sample_gt),
        "samples by round": {name: agreement(sample_est[m], sample_gt[m]) for name, m in
                             (("early (0-7)", early), ("middle (8-15)", ~early & ~late), ("late (16-23)", late))},
        "diagnosis": diagnose(traj, test, gt, order2),
    }
    rng = np.random.default_rng(3000 + seed)
    subsets = [sorted(int(j) for j in rng.choice(NODES, REMOVED, replace=False)) for _ in range(SUBSETS)]
    truth = dk.final_gt(traj, test, remove=subsets)
    sizes = torch.tensor([len(ix) for ix in dk.examples.digits_split(NODES, seed=seed)[0]], dtype=torch.float64)
    scores = {"additive oracle (sum of leave-one-node-out replays)": gt}
    if optimizer == "sgd":
        scores["ledger totals (OnlineDICE, hops 3)"] = ledger_of(run, test, HOPS).node_totals
    scores |= {"node_contributions order 1": order1, "node_contributions order 2": order2}
    scores |= {name: baseline(traj, range(ROUNDS), test) for name, baseline in dk.baselines.NODE_BASELINES.items()}
    scores["data size (negated)"] = -sizes
    entry["lds"] = lds(scores, subsets, truth)
    entry["data sizes"] = sizes.tolist()
    return entry


def detection(kind: str) -> dict:
    found = dk.analysis.anomaly_experiment(kind, SEEDS, num_nodes=NODES, corrupted=3, rounds=ROUNDS, hops=(1, HOPS), batch_size=BATCH)
    aucs = {name: [] for name in ("node_contributions order 1", "node_contributions order 2", "ledger totals (OnlineDICE, hops 3)",
                                  "exact leave-node-out replay (final_gt)")}
    for entry in found["runs"]:
        bad = entry["anomalous"]
        run = dk.examples.digits_run(NODES, ROUNDS, batch_size=BATCH, seed=entry["seed"], corrupt={b: kind for b in bad})
        traj = run.trajectory
        scores = (dk.node_contributions(traj, run.test, order=1), dk.node_contributions(traj, run.test, order=2),
                  ledger_of(run, run.test, HOPS).node_totals, dk.final_gt(traj, run.test, remove=list(range(NODES))))
        for name, score in zip(aucs, scores):
            aucs[name].append(dk.analysis.detection_auc(score, bad))
    aucs |= {f"DICE node scores, hops {h} (rounds 10..)": values for h, values in found["auc"].items()}
    aucs |= {f"{name} (rounds 10..)": values for name, values in found["baseline_auc"].items()}
    return {name: interval(values) for name, values in aucs.items()}


def summary(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "undefined (constant)"
    text = shown(interval(kept)) if len(kept) > 1 else f"{kept[0]:.3f}"
    return text if len(kept) == len(values) else f"{text} ({len(values) - len(kept)} seeds undefined)"


def main() -> None:
    torch.set_num_threads(1)  # the models are tiny: a second thread only contends (10x slower on a shared 2-core machine)
    started = time.perf_counter()
    results: dict = {"fidelity": {}, "detection": {}}
    for optimizer in OPTIMIZERS:
        results["fidelity"][optimizer] = []
        for seed in SEEDS:
            results["fidelity"][optimizer].append(fidelity_and_lds(optimizer, seed))
            print(f"{optimizer} seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for kind in KINDS:
        results["detection"][kind] = detection(kind)
        print(f"detection {kind} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    results["seconds"] = time.perf_counter() - started
    out = Path(__file__).parent / "results" / "whole_run.json"
    out.write_text(json.dumps(results, indent=1))

    ok = lambda a, target: "yes" if a["pearson"] >= target[0] and a["rel_error"] <= target[1] else "**no**"
    for optimizer, entries in results["fidelity"].items():
        print(f"\n## A. {optimizer}: per seed, against final_gt (Pearson / relative error)\n")
        print("| seed | order 1 | order 2 | order 2 met | 200 samples | samples met | delta_lin vs delta_exact | delta_2nd vs delta_exact |\n"
              "|---:|---|---|---|---|---|---:|---:|")
        for e in entries:
            n1, n2, s = e["node"]["order 1"], e["node"]["order 2"], e["samples"]
            print(f"| {e['seed']} | {n1['pearson']:.4f} / {n1['rel_error']:.3f} | {n2['pearson']:.4f} / {n2['rel_error']:.3f} | "
                  f"{ok(n2, TARGETS['order 2'])} | {s['pearson']:.6f} / {s['rel_error']:.4f} | {ok(s, TARGETS['samples'])} | "
                  f"{e['diagnosis']['||delta_lin - delta_exact|| / ||delta_exact||']:.3f} | "
                  f"{e['diagnosis']['||delta_2nd - delta_exact|| / ||delta_exact||']:.3f} |")
        met = sum(ok(e["node"]["order 2"], TARGETS["order 2"]) == "yes" for e in entries)
        print(f"\norder 2 meets both targets on {met} of {len(entries)} seeds; samples on "
              f"{sum(ok(e['samples'], TARGETS['samples']) == 'yes' for e in entries)} of {len(entries)}")
        print(f"\n### A. {optimizer}: wall time per seed (s, best of {REPEATS}, side by side in this process)\n")
        names = list(entries[0]["seconds"])
        print("| seed | " + " | ".join(names) + " | order 2 / final_gt | order 2 / order 1 |\n|---:|" + "---:|" * (len(names) + 2))
        for e in entries:
            t = e["seconds"]
            print(f"| {e['seed']} | " + " | ".join(f"{t[n]:.3f}" for n in names) +
                  f" | {t['node_contributions order 2'] / t['final_gt(remove=range(16))']:.1f} | "
                  f"{t['node_contributions order 2'] / t['node_contributions order 1']:.0f} |")
        print(f"\n### A. {optimizer}: samples by round of removal, mean over seeds (Pearson / relative error)\n")
        print("| rounds | Pearson | relative error |\n|---|---:|---:|")
        for part in entries[0]["samples by round"]:
            rows = [e["samples by round"][part] for e in entries]
            print(f"| {part} | {shown(interval([r['pearson'] for r in rows]), digits=6)} | {shown(interval([r['rel_error'] for r in rows]), digits=4)} |")
        print(f"\n### A. {optimizer}: order 2's error taken apart, node level, mean ± 95% interval over seeds\n")
        print("| estimate against final_gt | Pearson | relative error |\n|---|---:|---:|")
        for name in ("order 1", "order 2"):
            print(f"| node_contributions {name} | {shown(interval([e['node'][name]['pearson'] for e in entries]), digits=4)} | "
                  f"{shown(interval([e['node'][name]['rel_error'] for e in entries]))} |")
        for name, first in entries[0]["diagnosis"].items():
            if isinstance(first, dict):
                print(f"| {name} | {shown(interval([e['diagnosis'][name]['pearson'] for e in entries]), digits=4)} | "
                      f"{shown(interval([e['diagnosis'][name]['rel_error'] for e in entries]), digits=4)} |")
        for name in ("||delta_lin - delta_exact|| / ||delta_exact||", "||delta_2nd - delta_exact|| / ||delta_exact||"):
            print(f"| {name} | | {shown(interval([e['diagnosis'][name] for e in entries]), digits=4)} |")
        print("\nmax |Simpson on delta_2nd - node_contributions order 2| / max |order 2|: "
              f"{max(e['diagnosis']['Simpson on delta_2nd (order 2 recomputed)']['max_abs_vs_node_contributions'] / e['diagnosis']['max |order 2| (scale)'] for e in entries):.1e}")
        print(f"\n## B. {optimizer}: LDS (Spearman, {SUBSETS} subsets of {REMOVED} nodes), mean ± 95% interval over seeds; per seed\n")
        print("| per-node score | LDS | per seed |\n|---|---:|---|")
        for name in entries[0]["lds"]:
            values = [e["lds"][name] for e in entries]
            print(f"| {name} | {summary(values)} | " + " ".join("nan" if v is None else f"{v:.2f}" for v in values) + " |")
    print("\n## B. Corrupted nodes (3 of 16): ROC AUC, mean ± 95% interval over seeds\n")
    names = list(results["detection"][KINDS[0]])
    print("| score | " + " | ".join(KINDS) + " |\n|---|" + "---:|" * len(KINDS))
    for name in names:
        print(f"| {name} | " + " | ".join(shown(results["detection"][kind][name]) for kind in KINDS) + " |")
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
