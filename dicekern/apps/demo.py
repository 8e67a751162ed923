"""The main job: train a gossip run on digits, score every sample with DICE-E, check against DICE-GT.

The model is the bundled tanh MLP or any of the zoo's (``DemoConfig.model``). A run whose model the
engine refuses (``plan_query`` raises a ValueError) still gets its DICE-GT, with the refusal's
message in place of the comparison: see :func:`dice_e_refusal`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dicekern.apps import examples, plots
from dicekern.truth import walks
from dicekern.apps.analysis import pearson, relative_error
from dicekern.truth.ground_truth import dice_gt_samples
from dicekern.engine.queries import cascade, dice_e
from dicekern.engine.last_layer import last_layer
from dicekern.engine.plan import plan_query
from dicekern.record.trajectory import Trajectory
from dicekern.apps.report import describe_optimizer, run_metadata, write_json


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and scores (defaults: the issue's 16-node setting)."""

    num_nodes: int = 16
    model: str = "mlp"  # a name of dk.zoo.MODELS, built for the digits by dk.examples.DIGITS_MODELS
    graph: str = "exponential"
    step: int = 30
    hops: int = 3
    rounds: int | None = None  # None: step + max(hops, 1), just enough
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float | None = None  # None: the optimizer preset's (dk.examples.OPTIMIZER_PRESETS)
    hidden: int = 32  # the MLP's (model "mlp")
    gt_nodes: int = 8
    top: int = 5
    seed: int = 0


def _timed(fn: Callable[[], torch.Tensor], *, warmup: bool = True) -> tuple[torch.Tensor, float]:
    """Result and seconds of fn; warmup first calls it once, to leave out torch.func's one-off set-up."""
    if warmup:
        fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def dice_e_refusal(traj: Trajectory, step: int, test: tuple[torch.Tensor, torch.Tensor], hops: int) -> str | None:
    """None when DICE-E can score this query; otherwise the message of the ValueError with which the
    engine refuses the run (``plan_query``, which every DICE-E query runs first, checks the model,
    optimizer and options before any work). The window is checked first, so a bad step still raises."""
    traj.check_window(step, hops)
    try:
        plan_query(traj, step, test, hops)
    except ValueError as refusal:
        return str(refusal)
    return None


def _last_layer(traj: Trajectory, test, step: int, hops: int, total: torch.Tensor, gt: torch.Tensor, gt_nodes: list[int]) -> tuple[dict, float | None]:
    """Last-layer mode against full DICE-E and DICE-GT, or why it does not apply to this model."""
    try:
        head_traj, head_test = last_layer(traj, test)
    except ValueError as refusal:  # not an nn.Sequential ending in nn.Linear, or BatchNorm
        return {"unavailable": str(refusal)}, None
    head_scores, seconds = _timed(lambda: dice_e(head_traj, step, head_test, hops))  # (N, B)
    return {
        "pearson_vs_full_dice_e": pearson(head_scores, total),
        "pearson_vs_dice_gt": pearson(head_scores[gt_nodes], gt.sum(0)),
        "rel_error_vs_full_dice_e": relative_error(head_scores, total),
    }, seconds


def _walks_unavailable(traj: Trajectory, step: int) -> str | None:
    """Why the paper's walk-by-walk reference does not apply to this run, or None when it does."""
    if not traj.optimizer.is_plain_sgd:
        return "the paper's walks are those of plain SGD"
    if traj[step].buffers is not None:
        return "the paper's walks do not carry BatchNorm's running statistics"
    return None


def run_demo(
    out_dir: Path, config: DemoConfig = DemoConfig(), *, progress: bool = True, echo: Callable[[str], None] = print,
    command_line: list[str] | None = None,
) -> dict:
    """Run the demo, print its table, write ``results.json``, ``cascade.png``, ``e_vs_gt.png`` and ``decay.png``.

    Returns:
        The numbers written to results.json.
    """
    rounds = examples.rounds_needed(config.step, config.hops, config.rounds)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = examples.digits_run(
        config.num_nodes, rounds, batch_size=config.batch_size, lr=config.lr,
        graph=config.graph, hidden=config.hidden, seed=config.seed, optimizer=config.optimizer, progress=progress, model=config.model,
    )
    traj, test, step, hops = run.trajectory, run.test, config.step, config.hops
    report = traj.verify()
    echo(f"trained {config.num_nodes} nodes of {config.model} for {traj.steps[-1]} rounds ({config.graph} graph, {traj.optimizer}); "
         f"replay mismatch {report.max_rel_mismatch:.1e} of the update over {report.rounds_checked} rounds")

    refusal = dice_e_refusal(traj, step, test, hops)  # None: DICE-E scores this run
    gt_nodes = list(range(0, config.num_nodes, max(config.num_nodes // config.gt_nodes, 1)))[: config.gt_nodes]
    source = gt_nodes[0]
    per_hop = flow = walk_error = t_dice_e = t_cascade = t_walks = None
    walk_note = _walks_unavailable(traj, step)
    if refusal is None:
        per_hop, t_dice_e = _timed(lambda: dice_e(traj, step, test, hops, per_hop=True))  # (hops+1, N, B)
    gt, t_gt = _timed(lambda: dice_gt_samples(traj, step, test, hops, nodes=gt_nodes, per_hop=True, progress=progress), warmup=False)
    if refusal is None:
        flow, t_cascade = _timed(lambda: cascade(traj, step, source, test, hops))
        if walk_note is None:
            by_walks, t_walks = _timed(lambda: walks.dice_e_walks(traj, step, source, test, hops))
            walk_error = relative_error(flow, by_walks)

    rows = []
    for s in range(hops + 1):
        row = {"hop": s, "pearson_hop": None, "rel_error_hop": None, "pearson_total": None, "rel_error_total": None}
        if per_hop is not None:
            estimate = per_hop[:, gt_nodes]  # (hops+1, len(gt_nodes), B)
            row.update({
                "pearson_hop": pearson(estimate[s], gt[s]),
                "rel_error_hop": relative_error(estimate[s], gt[s]),
                "pearson_total": pearson(estimate[: s + 1].sum(0), gt[: s + 1].sum(0)),
                "rel_error_total": relative_error(estimate[: s + 1].sum(0), gt[: s + 1].sum(0)),
            })
        row["dice_gt_mean_abs"] = gt[s].abs().mean().item()
        rows.append(row)
    labels = traj[step].targets
    head, t_head, ranked = {"unavailable": "needs DICE-E"}, None, {"most_helpful": [], "most_harmful": []}
    if per_hop is not None:
        total = per_hop.sum(0)  # (N, B)
        order = total.flatten().argsort()

        def describe(index: int) -> dict:
            node, b = divmod(int(index), total.shape[1])
            return {"node": node, "sample": b, "label": int(labels[node, b]), "dice_e": float(total[node, b])}

        ranked = {"most_helpful": [describe(i) for i in order[: config.top]], "most_harmful": [describe(i) for i in order.flip(0)[: config.top]]}
        head, t_head = _last_layer(traj, test, step, hops, total, gt, gt_nodes)

    results = {
        "config": asdict(config),
        "metadata": run_metadata(run="bundled digits", model=config.model, step=step, hops=hops, num_nodes=config.num_nodes,
                                 batch_size=config.batch_size, test_points=len(test[0]), dtype=traj.dtype, topology=config.graph,
                                 optimizer=traj.optimizer, seed=config.seed, description=traj.description, command_line=command_line or []),
        "replay_mismatch": report.max_rel_mismatch,
        "dice_e_unavailable": refusal,
        "per_hop": rows,
        **ranked,
        "cascade_source": source,
        "cascade": None if flow is None else flow.tolist(),
        "cascade_vs_walks_rel_error": walk_error,
        "walk_reference_unavailable": walk_note,
        "last_layer": head,
        "seconds": {"dice_e_all_samples": t_dice_e, "dice_e_last_layer": t_head, "cascade_one_source": t_cascade,
                    "walk_reference_one_source": t_walks, "dice_gt_subset": t_gt},
        "samples": {"dice_e": None if per_hop is None else int(per_hop[0].numel()), "dice_gt": int(gt[0].numel())},
    }
    caption = (f"run: bundled digits, {config.model} ({config.num_nodes} nodes, {config.graph}, {describe_optimizer(traj.optimizer)}, "
               f"seed {config.seed}); round {step}, hops 0..{hops}; {len(test[0])} test points")
    if per_hop is None:
        plots.decay_over_hops(gt, out_dir / "decay.png", caption=f"{caption}; DICE-GT of {gt[0].numel()} samples replayed")
        pictures = "decay.png (of DICE-GT)"
    else:
        plots.cascade_on_graph(traj[step].W, flow, source, out_dir / "cascade.png", caption=f"{caption}; node {source}'s batch")
        plots.estimate_vs_truth_per_hop(per_hop[:, gt_nodes], gt, out_dir / "e_vs_gt.png", caption=f"{caption}; {gt[0].numel()} samples replayed")
        plots.decay_over_hops(per_hop, out_dir / "decay.png", caption=f"{caption}; {per_hop[0].numel()} samples")
        pictures = "cascade.png, e_vs_gt.png and decay.png"
    write_json(out_dir, "results.json", results)
    _print_table(results, echo)
    echo(f"wrote {out_dir / 'results.json'}, {pictures} there")
    return results


def _print_table(results: dict, echo: Callable[[str], None]) -> None:
    n = results["samples"]
    if results["dice_e_unavailable"] is not None:
        echo(f"\nDICE-E is not available for this run: {results['dice_e_unavailable']}")
        echo(f"DICE-GT on {n['dice_gt']} samples (per-sample removal), replayed in {results['seconds']['dice_gt_subset']:.3f}s")
        echo(f"{'hop':>3}  {'mean |DICE-GT|':>14}")
        for r in results["per_hop"]:
            echo(f"{r['hop']:>3}  {r['dice_gt_mean_abs']:>14.3e}")
        return
    echo(f"\nDICE-E vs DICE-GT on {n['dice_gt']} samples (per-sample removal); DICE-E scored {n['dice_e']} samples")
    echo(f"{'hop':>3}  {'pearson(hop)':>12}  {'rel.err(hop)':>12}  {'pearson(<=hop)':>14}  {'rel.err(<=hop)':>14}")
    for r in results["per_hop"]:
        echo(f"{r['hop']:>3}  {r['pearson_hop']:>12.6f}  {r['rel_error_hop']:>12.2e}  {r['pearson_total']:>14.6f}  {r['rel_error_total']:>14.2e}")
    for title, key in (("most helpful (lowers the test loss)", "most_helpful"), ("most harmful", "most_harmful")):
        echo(f"\n{title}:")
        for r in results[key]:
            echo(f"  node {r['node']:>2}  sample {r['sample']:>2}  label {r['label']}  DICE-E {r['dice_e']:+.3e}")
    head = results["last_layer"]
    if "unavailable" in head:
        echo(f"\nlast-layer approximation (dk.last_layer): not available: {head['unavailable']}")
    else:
        echo(f"\nlast-layer approximation (dk.last_layer): Pearson {head['pearson_vs_full_dice_e']:.4f} with full DICE-E, "
             f"{head['pearson_vs_dice_gt']:.4f} with DICE-GT; relative error {head['rel_error_vs_full_dice_e']:.2f} against full DICE-E")
    sec = results["seconds"]
    walks = f"n/a ({results['walk_reference_unavailable']})"
    if results["cascade_vs_walks_rel_error"] is not None:
        walks = f"{sec['walk_reference_one_source']:.3f}s (agrees to {results['cascade_vs_walks_rel_error']:.1e})"
    echo(f"\ntimes: dice_e (all samples) {sec['dice_e_all_samples']:.3f}s | cascade (node {results['cascade_source']}) "
         f"{sec['cascade_one_source']:.3f}s | walk reference (same) {walks} | DICE-GT ({n['dice_gt']} replays) {sec['dice_gt_subset']:.3f}s")
