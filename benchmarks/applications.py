"""Does DICE help its users? DICE against the baselines a practitioner would try first (issue 12).

    python benchmarks/applications.py          # about 5 minutes; tables to stdout, JSON to results/

Every experiment trains the bundled digits (16 nodes, exponential graph, plain SGD lr 0.1, batch
16, 24 rounds, float64) once per seed, 10 seeds, and reports the mean and the 95% t-interval over
seeds. The 200 held-out digits are split: the first 100 are the test objective DICE scores
against, the last 100 evaluate the retrained models, so no result is judged on the data that
chose it.

1. Node detection: 3 of 16 nodes corrupted ("flip": every label wrong, "noise": features in
   Gaussian noise, "free_rider": batches copied from two samples); ROC AUC of ranking nodes by
   DICE node scores (hops 1 and 3, rounds 10..) and by each node baseline of dk.baselines.
2. Mislabelled samples: 10% of the labels of 8 random nodes flipped; ROC AUC of ranking the
   samples of the scored rounds by their DICE totals (OnlineDICE, hops 3, summed over the rounds
   a sample is used), their mean training loss and their mean gradient norm.
3. Counterfactual removal, same runs: remove the k% of all training digits with the highest DICE
   totals, the highest training loss, or at random; retrain with the same seed; change of the
   evaluation loss and accuracy (mean over the nodes' final models) against no removal.
4. Whole-run fidelity, same runs: each node's ledger total (OnlineDICE, hops 1..5, order 1 and
   2) against leaving that node's data out of the whole run by exact replay (its lr set to 0
   every round), measured as the change of the mean test loss of the final models; Pearson and
   relative error over the 16 nodes, per seed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

import dicekern as dk
from dicekern.curvature.round import gossip_round

SEEDS = range(10)
NODES, ROUNDS, BATCH, HOPS = 16, 24, 16, 3
KINDS = ("flip", "noise", "free_rider")
REMOVE = (0.01, 0.05, 0.10)


def interval(values: list[float]) -> dict:
    """Mean and the half-width of its 95% t-interval over seeds."""
    values = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": float(values.mean()), "half_width": float(half), "values": values.tolist()}


def shown(summary: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * summary['mean']:.{digits}f} ± {scale * summary['half_width']:.{digits}f}"


def mislabelled_run(seed: int, exclude=()) -> dk.examples.DigitsRun:
    noisy = np.random.default_rng(seed).choice(NODES, NODES // 2, replace=False)
    return dk.examples.digits_run(NODES, ROUNDS, batch_size=BATCH, seed=seed, mislabel={int(k): 0.1 for k in noisy}, exclude=exclude)


def split(test):
    """(scoring test set, evaluation set): the first and the last 100 held-out digits."""
    x, y = test
    return (x[:100], y[:100]), (x[100:], y[100:])


def final_quality(run: dk.examples.DigitsRun, evaluation) -> tuple[float, float]:
    """Mean over nodes of the final models' evaluation loss and accuracy."""
    traj = run.trajectory
    theta = traj[traj.steps[-1]].params
    x, y = evaluation
    outputs = torch.func.vmap(traj.objective.outputs, in_dims=(0, None))(theta, x)  # (N, M, K)
    loss = traj.objective.test_losses(theta, evaluation).mean().item()
    accuracy = (outputs.argmax(-1) == y).double().mean().item()
    return loss, accuracy


def ledger_of(run: dk.examples.DigitsRun, test, hops: int, order: int = 1) -> dk.OnlineDICE:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, test, hops, order=order)
    traj = run.trajectory
    for t in traj.steps:
        r = traj[t]
        batch = (r.inputs, r.targets, r.lr, r.W) if r.has_batch else ()
        ledger.record(t, traj.params(t), *batch, sample_ids=run.sample_ids[t] if r.has_batch else None)
    return ledger


def node_detection() -> dict:
    results = {}
    for kind in KINDS:
        found = dk.analysis.anomaly_experiment(kind, SEEDS, num_nodes=NODES, corrupted=3, rounds=ROUNDS, hops=(1, HOPS), batch_size=BATCH)
        scores = {f"DICE, hops {h}": aucs for h, aucs in found["auc"].items()} | found["baseline_auc"]
        results[kind] = {name: interval(aucs) for name, aucs in scores.items()}
    return results


def leave_node_out_changes(run: dk.examples.DigitsRun, test) -> torch.Tensor:
    """(N,) mean test loss of the final models with every node's data minus without node j's (exact replay)."""
    traj = run.trajectory
    objective, spec = traj.objective, traj.optimizer
    final = lambda theta: objective.test_losses(theta, test).mean()
    with_all = final(traj[traj.steps[-1]].params)
    changes = []
    for j in range(NODES):
        first = traj[0]
        theta, state = first.params, first.state
        for t in traj.steps[:-1]:
            r = traj[t]
            rates = r.lr.clone()
            rates[j] = 0.0  # node j never steps on its data; it still mixes
            _, theta, state, _ = gossip_round(objective, spec, theta, state, r.inputs, r.targets, rates, r.W)
        changes.append(with_all - final(theta))
    return torch.stack(changes)


def samples_removal_fidelity() -> dict:
    detection = {name: [] for name in ("DICE totals (hops 3)", "training loss", "gradient norm")}
    removal = {(strategy, k): {"loss": [], "accuracy": []} for strategy in ("DICE totals", "training loss", "random") for k in REMOVE}
    fidelity = {(order, h): {"pearson": [], "rel_error": []} for order in (1, 2) for h in range(1, 6)}
    for seed in SEEDS:
        run = mislabelled_run(seed)
        test, evaluation = split(run.test)
        traj, ids = run.trajectory, run.sample_ids
        ledger = ledger_of(run, test, HOPS)
        scored = sorted(ledger.sample_totals)
        steps = list(range(ROUNDS))
        loss = dk.baselines.by_sample(dk.baselines.sample_losses(traj, steps), ids)
        norm = dk.baselines.by_sample(dk.baselines.sample_grad_norms(traj, steps), ids)
        truth = run.mislabeled[scored].numpy()
        for name, score in zip(detection, (ledger.sample_totals, loss, norm)):
            detection[name].append(roc_auc_score(truth, [score[i] for i in scored]))

        base_loss, base_accuracy = final_quality(run, evaluation)
        training = np.unique(np.concatenate([ix for ix in dk.examples.digits_split(NODES, seed=seed)[0]]))
        rng = np.random.default_rng(1000 + seed)
        for k in REMOVE:
            count = round(k * len(training))
            chosen = {
                "DICE totals": sorted(scored, key=lambda i: -ledger.sample_totals[i])[:count],
                "training loss": sorted(loss, key=lambda i: -loss[i])[:count],
                "random": rng.choice(training, count, replace=False).tolist(),
            }
            for strategy, removed in chosen.items():
                new_loss, new_accuracy = final_quality(mislabelled_run(seed, exclude=removed), evaluation)
                removal[strategy, k]["loss"].append(new_loss - base_loss)
                removal[strategy, k]["accuracy"].append(new_accuracy - base_accuracy)

        truth_changes = leave_node_out_changes(run, test)
        for order, h in fidelity:
            totals = ledger_of(run, test, h, order).node_totals
            fidelity[order, h]["pearson"].append(dk.analysis.pearson(totals, truth_changes))
            fidelity[order, h]["rel_error"].append(dk.analysis.relative_error(totals, truth_changes))
        print(f"seed {seed} done", file=sys.stderr)
    return {
        "detection": {name: interval(aucs) for name, aucs in detection.items()},
        "removal": {f"{strategy}, {round(100 * k)}%": {m: interval(v) for m, v in values.items()} for (strategy, k), values in removal.items()},
        "fidelity": {f"order {order}, hops {h}": {m: interval(v) for m, v in values.items()} for (order, h), values in fidelity.items()},
    }


def main() -> None:
    started = time.perf_counter()
    results = {"nodes": node_detection(), **samples_removal_fidelity()}
    results["seconds"] = time.perf_counter() - started
    out = Path(__file__).parent / "results" / "applications.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"## 1. Node detection: ROC AUC, mean ± 95% interval over {len(SEEDS)} seeds\n")
    names = list(results["nodes"][KINDS[0]])
    print("| score | " + " | ".join(KINDS) + " |\n|---|" + "---:|" * len(KINDS))
    for name in names:
        print(f"| {name} | " + " | ".join(shown(results["nodes"][kind][name]) for kind in KINDS) + " |")
    print("\n## 2. Mislabelled samples: ROC AUC\n\n| score | AUC |\n|---|---:|")
    for name, summary in results["detection"].items():
        print(f"| {name} | {shown(summary)} |")
    print("\n## 3. Removal and retraining: change against no removal (evaluation set)\n")
    print("| removed | evaluation loss change | accuracy change (points) |\n|---|---:|---:|")
    for name, summary in results["removal"].items():
        print(f"| {name} | {shown(summary['loss'], digits=4)} | {shown(summary['accuracy'], 100, 2)} |")
    print("\n## 4. Whole-run fidelity: ledger node totals against leaving the node out\n")
    print("| ledger | Pearson | relative error |\n|---|---:|---:|")
    for name, summary in results["fidelity"].items():
        print(f"| {name} | {shown(summary['pearson'])} | {shown(summary['rel_error'])} |")
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
