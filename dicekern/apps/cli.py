"""Command line: ``python -m dicekern {demo,score,attribute,cascade,validate,detect} [--help]``.

``score`` and ``attribute`` read a saved run; ``cascade``, ``validate`` and ``detect`` read one (RUN_DIR) or train
the bundled digits. Exit status: 0 on success, 1 when the library rejects the request (its
message on stderr), 2 for bad command-line arguments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicekern.apps import analysis, examples, plots, report
from dicekern.core import extras
from dicekern.core.checks import check_node
from dicekern.apps.demo import DemoConfig, dice_e_refusal, run_demo
from dicekern.truth.ground_truth import dice_gt_samples
from dicekern.engine.queries import cascade, dice_e, final_influence, influence_matrix, node_contributions
from dicekern.apps.report import write_csv, write_json
from dicekern.record.storage import read_test_set
from dicekern.record.trajectory import Trajectory

TRUST = (
    "RUN_DIR is a folder written by Trajectory.save with a dk.RunDescription. Loading it imports the "
    "modules the run names, which runs their top-level code as `import` would, and calls only the model "
    "factory and loss their authors marked with @dk.rebuildable; nothing is unpickled. TEST is a "
    ".safetensors or .npz file holding exactly `inputs` (M, ...) and `targets` (M, ...). Put RUN_DIR "
    "before options that take several values (--hops, --anomalous)."
)
BUNDLED = {  # option -> (default, help): the bundled digits run, when no RUN_DIR is given
    "nodes": (16, "gossip nodes (default 16)"),
    "topology": ("exponential", f"graph of the gossip: {', '.join(examples.TOPOLOGIES)} (default exponential)"),
    "rounds": (None, "training rounds (default: just enough for the query; detect: 24)"),
    "batch_size": (16, "samples per node and round (default 16)"),
    "lr": (None, "learning rate (default: the optimizer's preset)"),
    "optimizer": ("sgd", "every node's local optimizer: sgd, momentum (0.9) or adam (default sgd)"),
    "seed": (0, "seed of the data split, the batches and the initial model (default 0)"),
    "model": ("mlp", f"the model every node trains: {', '.join(examples.DIGITS_MODELS)} (dk.zoo's, sized for 8x8 digits; "
                     "default mlp, the 64-32-10 tanh MLP)"),
}
MODEL_COMMANDS = ("demo", "cascade", "validate")  # the commands that train any zoo model (detect trains the MLP)

DIGITS_EXPERIMENT = {"kind": "flip", "corrupted": 3, "seeds": 3}  # detect's defaults on digits
DIGITS_STEP = 20  # the round cascade and validate follow on digits


def _integer(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
    return number


def _positive(value: str) -> int:
    return _integer(value, 1)


def _non_negative(value: str) -> int:
    return _integer(value, 0)


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _step_range(value: str) -> range:
    start, sep, stop = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"must be A:B (rounds A to B-1), got {value!r}")
    first, end = _non_negative(start), _non_negative(stop)
    if end <= first:
        raise argparse.ArgumentTypeError(f"A:B must have A < B, got {value!r}")
    return range(first, end)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicekern", description="DICE: data influence cascades in gossip learning", epilog=TRUST)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, *, run: str | None) -> argparse.ArgumentParser:
        """A subcommand; run: "required" or "optional" RUN_DIR (then --test), or None (bundled digits only)."""
        sub = commands.add_parser(name, help=text, description=text, epilog=TRUST if run else None)
        if run:
            sub.add_argument("run", metavar="RUN_DIR", type=Path, nargs=None if run == "required" else "?",
                             help="a saved run" + ("" if run == "required" else " (default: train the bundled digits)"))
            sub.add_argument("--test", metavar="TEST", type=Path, help="test set file (.safetensors or .npz with inputs and targets)")
        if run != "required":
            group = sub.add_argument_group("bundled digits run" + (" (without RUN_DIR)" if run else ""))
            types = {"nodes": _positive, "rounds": _positive, "batch_size": _positive, "lr": _positive_float, "seed": _non_negative}
            choices = {"topology": list(examples.TOPOLOGIES), "optimizer": list(examples.OPTIMIZER_PRESETS),
                       "model": list(examples.DIGITS_MODELS)}
            for option, (_, text) in BUNDLED.items():
                if option == "model" and name not in MODEL_COMMANDS:
                    continue
                group.add_argument(f"--{option.replace('_', '-')}", type=types.get(option, str), choices=choices.get(option), help=text)
        sub.add_argument("--out", type=Path, default=Path(f"out/{name}"), help=f"folder for results.json, CSV and PNG (default: out/{name})")
        sub.add_argument("--force", action="store_true", help="overwrite the results already in --out")
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
        return sub

    demo = command("demo", "train on digits, score every sample over hops, check against DICE-GT", run=None)
    demo.add_argument("--step", type=_non_negative, default=DemoConfig.step, help=f"round whose samples are scored (default {DemoConfig.step})")
    demo.add_argument("--hops", type=_non_negative, default=DemoConfig.hops, help=f"rounds after it that are followed (default {DemoConfig.hops})")
    score = command("score", "DICE-E of every sample of a saved run, node totals and the node influence matrix", run="required")
    steps = score.add_mutually_exclusive_group()
    steps.add_argument("--step", type=_non_negative, help="the one round to score (default: every round with --hops rounds after it)")
    steps.add_argument("--steps", type=_step_range, metavar="A:B", help="score rounds A..B-1")
    score.add_argument("--hops", type=_non_negative, default=3, help="rounds after each scored round that are followed (default 3)")
    score.add_argument("--per-hop", action="store_true", help="also write every hop's share of each score")
    attribute = command("attribute", "what every sample and every node's data did to the final models of a saved run (one reverse sweep), "
                        "with reward shares", run="required")
    attribute.add_argument("--order", type=int, choices=[1, 2],
                           help="node contributions: 1 sums the samples' first-order scores; 2 takes the removal to second order "
                                "(default: 2, or 1 for a BatchNorm model, which order 2 does not take)")
    flow = command("cascade", "how one node's batch influences every node, hop by hop, drawn on the graph", run="optional")
    flow.add_argument("--source", type=_non_negative, default=0, help="node whose batch is followed (default 0)")
    flow.add_argument("--step", type=_non_negative, help=f"round whose batch is followed (default: {DIGITS_STEP} on digits, the first that fits in RUN_DIR)")
    flow.add_argument("--hops", type=_non_negative, default=3, help="rounds after it that are followed (default 3)")
    check = command("validate", "DICE-E of single samples against exact DICE-GT replay, hop by hop", run="optional")
    check.add_argument("--step", type=_non_negative, help=f"round whose samples are scored (default: {DIGITS_STEP} on digits, the first that fits in RUN_DIR)")
    check.add_argument("--hops", type=_non_negative, default=3, help="rounds after it that are followed (default 3)")
    check.add_argument("--gt-nodes", type=_positive, default=4, help="nodes whose samples are replayed one by one (default 4)")
    detect = command("detect", "rank nodes by how their data changed the others' test loss; on digits, flag corrupted nodes (ROC AUC over seeds)",
                     run="optional")
    detect.add_argument("--hops", type=_positive, nargs="+", default=[1, 3], help="hop counts to compare (default 1 3)")
    detect.add_argument("--steps", type=_step_range, metavar="A:B", help="RUN_DIR: rounds whose scores are summed (default: all that fit)")
    detect.add_argument("--anomalous", type=_non_negative, nargs="+", default=[], help="RUN_DIR: nodes known to be corrupted, for the ROC AUC")
    detect.add_argument("--kind", choices=["flip", "noise", "free_rider"],
                        help="digits: labels flipped, features drowned in noise, or batches copied from two samples (default flip)")
    detect.add_argument("--corrupted", type=_positive, help="digits: corrupted nodes per run (default 3)")
    detect.add_argument("--seeds", type=_positive, help="digits: runs, one per seed (default 3)")
    return parser


@dataclass
class Source:
    """What a command scores: a trajectory and a test set, and how to describe them in results.json."""

    trajectory: Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    name: str
    topology: str | None
    seed: int | None
    test_file: dict | None = None  # path and sha256 of TEST
    model: str | None = None  # the bundled run's model (a name of dk.zoo.MODELS); a saved run's description names its own


def _check_sources(parser: argparse.ArgumentParser, args) -> None:
    """RUN_DIR with --test and no bundled options, or the bundled options alone; defaults filled in."""
    run = getattr(args, "run", None)
    given = [option for option in BUNDLED if getattr(args, option, None) is not None]
    if run is not None:
        if given:
            parser.error(f"--{given[0].replace('_', '-')} describes the bundled digits run; RUN_DIR {run} brings its own")
        if args.test is None:
            parser.error("RUN_DIR needs --test TEST, the test set to score against")
        if any(getattr(args, option, None) is not None for option in DIGITS_EXPERIMENT):
            parser.error("--kind, --corrupted and --seeds describe the digits experiment; with RUN_DIR use --anomalous")
        if args.out.resolve().is_relative_to(run.resolve()):
            parser.error(f"--out {args.out} is inside RUN_DIR {run}: keep results out of the run's folder")
        return
    if getattr(args, "test", None) is not None:
        parser.error("--test goes with RUN_DIR; the bundled digits run brings its own test set")
    if getattr(args, "anomalous", []):
        parser.error("--anomalous goes with RUN_DIR; the digits experiment corrupts its own nodes")
    defaults = {option: default for option, (default, _) in BUNDLED.items()}
    if args.command == "detect":
        defaults.update(DIGITS_EXPERIMENT)
    for option, default in defaults.items():
        if getattr(args, option, None) is None:
            setattr(args, option, default)


def _source(args, hops: int) -> Source:
    """The saved run and test file of the command line, or the bundled digits trained for the query."""
    if args.run is not None:
        traj = Trajectory.load(args.run)
        described = traj.description.metadata if traj.description else {}
        test, digest = read_test_set(args.test, traj.dtype)
        test_file = {"path": str(args.test.resolve()), "sha256": digest}
        return Source(traj, test, str(args.run.resolve()), described.get("topology"), described.get("seed"), test_file)
    step = DIGITS_STEP if args.step is None else args.step
    rounds = examples.rounds_needed(step, hops, args.rounds)
    run = examples.digits_run(args.nodes, rounds, batch_size=args.batch_size, lr=args.lr, graph=args.topology, seed=args.seed,
                              optimizer=args.optimizer, progress=not args.no_progress, model=args.model)
    return Source(run.trajectory, run.test, "bundled digits", args.topology, args.seed, model=args.model)


def _metadata(source: Source, argv: list[str], **query) -> dict:
    """What results.json says about the run, its test set and the query (step or steps, hops)."""
    traj = source.trajectory
    batch = next((traj[t].inputs.shape[1] for t in traj.steps if traj[t].has_batch), None)
    return report.run_metadata(run=source.name, model=source.model, saved_as=traj.saved_as, test_file=source.test_file, **query, num_nodes=traj.num_nodes, batch_size=batch,
                               test_points=len(source.test[0]), dtype=traj.dtype, topology=source.topology, optimizer=traj.optimizer,
                               seed=source.seed, description=traj.description, command_line=["dicekern", *argv])


def _caption(source: Source, text: str) -> str:
    traj = source.trajectory
    name = source.name if source.model is None else f"{source.name}, {source.model}"
    return f"run: {name} ({traj.num_nodes} nodes, {report.describe_optimizer(traj.optimizer)}); {text}; {len(source.test[0])} test points"


def _scored_steps(traj: Trajectory, chosen: range | int | None, hops: int, *, first_only: bool = False) -> list[int]:
    """The rounds to score, each checked before any work: those chosen, or every round (the first
    one with first_only) that a hops-hop query can start from."""
    if chosen is not None:
        steps = [chosen] if isinstance(chosen, int) else list(chosen)
        for t in steps:
            try:
                traj.check_window(t, hops)
            except ValueError as error:
                raise ValueError(f"round {t} cannot be scored with hops {hops}: {error}") from None
        return steps

    def scoreable(step: int) -> bool:
        try:
            traj.check_window(step, hops)
        except ValueError:
            return False
        return True

    steps = []
    for t in traj.steps:
        if scoreable(t):
            steps.append(t)
            if first_only:
                break
    if not steps:
        raise ValueError(f"no round of the run has its batch and {hops} recorded rounds after it (recorded: {traj.steps[0]}..{traj.steps[-1]})")
    return steps


def _query_step(args, traj: Trajectory, hops: int) -> int:
    """--step, or its default: DIGITS_STEP on digits, the first round that fits in a saved run."""
    if args.step is not None or args.run is None:
        return DIGITS_STEP if args.step is None else args.step
    return _scored_steps(traj, None, hops, first_only=True)[0]


def _score(args, argv: list[str]) -> dict:
    source = _source(args, args.hops)
    traj, test, hops = source.trajectory, source.test, args.hops
    steps = _scored_steps(traj, args.step if args.step is not None else args.steps, hops)
    scores, per_hop, matrices = {}, {}, {}
    for t in extras.progress(steps, enabled=not args.no_progress, description="scoring rounds"):
        if args.per_hop:
            per_hop[t] = dice_e(traj, t, test, hops, per_hop=True)  # (hops+1, N, B)
        scores[t] = per_hop[t].sum(0) if args.per_hop else dice_e(traj, t, test, hops)  # (N, B)
        matrices[t] = influence_matrix(traj, t, test, hops)  # (hops+1, N_source, N_receiver)
    hop_names = [f"hop_{s}" for s in range(hops + 1)] if args.per_hop else []
    sample_rows, matrix_rows = [], []
    for t in steps:
        n, b = scores[t].shape
        for node in range(n):
            for sample in range(b):
                shares = per_hop[t][:, node, sample].tolist() if args.per_hop else []
                sample_rows.append([t, node, sample, scores[t][node, sample].item(), *shares])
            for receiver in range(n):
                shares = matrices[t][:, node, receiver].tolist() if args.per_hop else []
                matrix_rows.append([t, node, receiver, matrices[t][:, node, receiver].sum().item(), *shares])
    totals = torch.stack([scores[t].sum(1) for t in steps])  # (rounds, N)
    write_csv(args.out, "scores.csv", ["step", "node", "sample", "score", *hop_names], sample_rows)
    write_csv(args.out, "node_totals.csv", ["step", "node", "total"], [[t, k, totals[i, k].item()] for i, t in enumerate(steps) for k in range(traj.num_nodes)])
    write_csv(args.out, "influence_matrix.csv", ["step", "source", "receiver", "influence", *hop_names], matrix_rows)

    span = f"round {steps[0]}" if len(steps) == 1 else f"rounds {steps[0]}..{steps[-1]} ({len(steps)} rounds)"
    caption = _caption(source, f"{span}, hops 0..{hops}")
    summed = torch.stack([matrices[t].sum(0) for t in steps]).sum(0)
    plots.influence_heatmap(summed, args.out / "influence_matrix.png", title=f"node influence over hops 0..{hops}, {span}", caption=caption)
    plots.contribution_over_rounds(steps, totals, args.out / "contribution.png", caption=caption)
    if args.per_hop:
        plots.decay_over_hops(torch.cat([per_hop[t] for t in steps], dim=1), args.out / "decay.png", caption=caption)
    print(f"scored {len(steps)} round(s) of {source.name}: {sum(s.numel() for s in scores.values())} samples, hops 0..{hops}")
    order = totals.sum(0).argsort()
    print("nodes whose data helped most (lowest total): " + ", ".join(f"{int(k)} ({totals.sum(0)[k].item():+.3e})" for k in order[:3]))
    return {
        "metadata": _metadata(source, argv, steps=steps, hops=hops),
        "scores": {str(t): scores[t].tolist() for t in steps},
        "per_hop_scores": {str(t): per_hop[t].tolist() for t in steps} if args.per_hop else None,
        "node_totals": {str(t): totals[i].tolist() for i, t in enumerate(steps)},
        "influence_matrix": {str(t): matrices[t].tolist() for t in steps},
    }


def _attribute(args, argv: list[str]) -> dict:
    source = _source(args, 1)
    traj, test = source.trajectory, source.test
    first, last = traj.steps[0], traj.steps[-1]
    progress = not args.no_progress
    if args.order is None:
        args.order = 1 if traj.objective.buffer_layout else 2
        print(f"node contributions at order {args.order}" + (" (a BatchNorm model takes order 1)" if args.order == 1 else ""))
    per_sample = final_influence(traj, test, progress=progress)  # (T, N, B)
    first_order = per_sample.sum(dim=(0, 2))
    second_order = node_contributions(traj, test, order=2, progress=progress) if args.order == 2 else None
    chosen = first_order if second_order is None else second_order
    split = analysis.shares(chosen)
    rounds, n, batch = per_sample.shape
    write_csv(args.out, "samples.csv", ["round", "node", "sample", "influence"],
              [[first + i, k, b, per_sample[i, k, b].item()] for i in range(rounds) for k in range(n) for b in range(batch)])
    columns = ["node", "order_1"] + (["order_2"] if second_order is not None else []) + ["benefit", "share"]
    write_csv(args.out, "nodes.csv", columns,
              [[k, first_order[k].item()] + ([second_order[k].item()] if second_order is not None else []) + [split.benefit[k].item(), split.share[k].item()]
               for k in range(n)])
    caption = _caption(source, f"rounds {first}..{last - 1} on the final models of round {last}, order {args.order}")
    plots.contribution_shares(split, args.out / "shares.png", caption=caption)
    best = split.share.argsort(descending=True)[:3]
    print(f"attributed {rounds} round(s) of {source.name} to its final models (round {last}): {per_sample.numel()} samples, order {args.order}")
    print("largest shares: " + ", ".join(f"node {int(k)} ({split.share[k].item():+.1%})" for k in best))
    print("harmful nodes (their data raised the test loss): " + (", ".join(map(str, split.harmful)) or "none"))
    return {
        "metadata": _metadata(source, argv, rounds=[first, last], order=args.order),
        "node_contributions": {"order_1": first_order.tolist(), "order_2": None if second_order is None else second_order.tolist()},
        "shares": split.share.tolist(),
        "benefit": split.benefit.tolist(),
        "harmful": split.harmful,
        "summary": {"final_round": last, "scored_rounds": rounds, "total_effect": chosen.sum().item(),
                    "most_helpful": int(best[0]), "harmful": len(split.harmful)},
    }


def _cascade(args, argv: list[str]) -> dict:
    if args.run is None:
        check_node("source", args.source, args.nodes)  # before any training
    source = _source(args, args.hops)
    traj = source.trajectory
    step = _query_step(args, traj, args.hops)
    check_node("source", args.source, traj.num_nodes)
    flow = cascade(traj, step, args.source, source.test, args.hops)
    caption = _caption(source, f"round {step}, hops 0..{args.hops}, node {args.source}'s batch of {traj[step].inputs.shape[1]}")
    plots.cascade_on_graph(traj[step].W, flow, args.source, args.out / "cascade.png", caption=caption)
    print(f"cascade of node {args.source}'s batch at round {step} (negative lowers a node's test loss)")
    for s, row in enumerate(flow):
        reached = int((row != 0).sum())
        print(f"hop {s}: total {row.sum().item():+.3e} over {reached} node(s)")
    return {"metadata": _metadata(source, argv, step=step, hops=args.hops), "source": args.source, "cascade": flow.tolist()}


def _shown(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _validate(args, argv: list[str]) -> dict:
    source = _source(args, args.hops)
    traj, test = source.trajectory, source.test
    step = _query_step(args, traj, args.hops)
    nodes = list(range(min(args.gt_nodes, traj.num_nodes)))
    refusal = dice_e_refusal(traj, step, test, args.hops)  # None: DICE-E scores this run
    estimate = None if refusal else dice_e(traj, step, test, args.hops, per_hop=True)[:, nodes]  # (hops+1, nodes, B)
    truth = dice_gt_samples(traj, step, test, args.hops, nodes=nodes, per_hop=True, progress=not args.no_progress)
    samples = f"{truth[0].numel()} samples of nodes {nodes[0]}..{nodes[-1]}"
    rows = []
    if refusal:
        print(f"DICE-E is not available for this run: {refusal}")
        print(f"DICE-GT of {samples}, hop by hop:\n{'hop':>3}  {'mean |DICE-GT|':>14}")
    else:
        plots.estimate_vs_truth_per_hop(estimate, truth, args.out / "e_vs_gt.png", caption=_caption(source, f"round {step}, hops 0..{args.hops}, {samples}"))
        print(f"DICE-E against DICE-GT on {samples}")
        print(f"{'hop':>3}  {'pearson(hop)':>12}  {'spearman(hop)':>13}  {'rel.err(hop)':>12}  {'pearson(0..hop)':>15}  {'rel.err(0..hop)':>15}")
    for s in range(args.hops + 1):
        gt_size = truth[s].abs().mean().item()
        if refusal:
            rows.append({"hop": s, "hop_alone": None, "hops_0_to_s": None, "dice_gt_mean_abs": gt_size})
            print(f"{s:>3}  {gt_size:>14.3e}")
            continue
        alone, total = analysis.agreement(estimate[s], truth[s]), analysis.agreement(estimate[: s + 1].sum(0), truth[: s + 1].sum(0))
        rows.append({"hop": s, "hop_alone": alone, "hops_0_to_s": total, "dice_gt_mean_abs": gt_size})
        print(f"{s:>3}  {_shown(alone['pearson'], '12.6f')}  {_shown(alone['spearman'], '13.6f')}  {_shown(alone['rel_error'], '12.2e')}  "
              f"{_shown(total['pearson'], '15.6f')}  {_shown(total['rel_error'], '15.2e')}")
    return {"metadata": _metadata(source, argv, step=step, hops=args.hops), "nodes": nodes, "dice_e_unavailable": refusal,
            "per_hop": rows, "dice_e": None if estimate is None else estimate.tolist(), "dice_gt": truth.tolist()}


def _detect(args, argv: list[str]) -> dict:
    return (_detect_in_run if args.run is not None else _detect_on_digits)(args, argv)


def _detect_in_run(args, argv: list[str]) -> dict:
    source = _source(args, max(args.hops))
    traj, deepest = source.trajectory, max(args.hops)
    for node in args.anomalous:
        check_node("--anomalous node", node, traj.num_nodes)
    steps = _scored_steps(traj, args.steps, deepest)
    scores = {h: analysis.node_scores(traj, steps, source.test, h) for h in extras.progress(args.hops, enabled=not args.no_progress, description="node scores")}
    auc = {h: analysis.detection_auc(scores[h], args.anomalous) for h in args.hops} if args.anomalous else None
    print(f"node scores over rounds {steps[0]}..{steps[-1]} (positive: the node's data raised the others' test loss)")
    for h in args.hops:
        ranked = scores[h].argsort(descending=True)[:5]
        suffix = f"  ROC AUC {auc[h]:.3f}" if auc else ""
        print(f"hops {h}: most harmful {', '.join(f'{int(k)} ({scores[h][k].item():+.2e})' for k in ranked)}{suffix}")
    caption = _caption(source, f"rounds {steps[0]}..{steps[-1]}, hops 1..{deepest}")
    plots.anomaly_ranking(scores[deepest], args.anomalous, args.out / "anomaly.png", auc=auc[deepest] if auc else None, caption=caption)
    return {"metadata": _metadata(source, argv, steps=steps, hops=args.hops), "scores": {h: s.tolist() for h, s in scores.items()},
            "anomalous": args.anomalous, "auc": auc}


def _detect_on_digits(args, argv: list[str]) -> dict:
    if args.corrupted >= args.nodes:
        raise ValueError(f"--corrupted {args.corrupted} must leave some clean nodes among --nodes {args.nodes}")
    rounds = args.rounds or analysis.ANOMALY_ROUNDS
    results = analysis.anomaly_experiment(args.kind, range(args.seed, args.seed + args.seeds), num_nodes=args.nodes,
                                          corrupted=args.corrupted, rounds=rounds, hops=tuple(args.hops), optimizer=args.optimizer,
                                          graph=args.topology, batch_size=args.batch_size, lr=args.lr, progress=not args.no_progress)
    print(f"ROC AUC of ranking nodes by each score, higher = more suspicious ({args.kind}, {args.corrupted} of {args.nodes} nodes corrupted, {args.seeds} seeds)")
    rows = {f"DICE, hops {h}": aucs for h, aucs in results["auc"].items()} | results["baseline_auc"]
    width = max(map(len, rows))
    for name, aucs in rows.items():
        print(f"{name:<{width}}  mean {np.mean(aucs):.3f}  per seed {', '.join(f'{a:.2f}' for a in aucs)}")
    first, deepest = results["runs"][0], max(args.hops)
    optimizer = examples.OPTIMIZER_PRESETS[args.optimizer][0]
    caption = (f"run: bundled digits ({args.nodes} nodes, {args.topology}, {report.describe_optimizer(optimizer)}), seed {first['seed']}; "
               f"rounds {results['scored_from']}..{rounds - deepest}, hops 1..{deepest}")
    plots.anomaly_ranking(torch.tensor(first["scores"][deepest]), first["anomalous"], args.out / "anomaly.png",
                          auc=results["auc"][deepest][0], caption=caption)
    results["metadata"] = report.run_metadata(
        run="bundled digits, one run per seed", model="mlp", steps={h: list(range(results["scored_from"], rounds - h + 1)) for h in args.hops},
        hops=args.hops, num_nodes=args.nodes, batch_size=args.batch_size, test_points=examples.TEST_SIZE, dtype=torch.float64,
        topology=args.topology, optimizer=optimizer, seed=list(range(args.seed, args.seed + args.seeds)), description=None,
        command_line=["dicekern", *argv],
    )
    return results


def _prepare_out(parser: argparse.ArgumentParser, args) -> list[Path]:
    """--out checked and created before any work: a folder we can write, without results unless
    --force. Returns the folders created here, innermost first."""
    out = args.out
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    if (out / "results.json").exists() and not args.force:
        parser.error(f"--out {out} already holds results; pass --force to overwrite them, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        parser.error(f"--out {out} cannot be written: {error.strerror or error}")
    return created


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    _check_sources(parser, args)
    created = _prepare_out(parser, args)
    try:
        return _run(args, argv)
    finally:
        for folder in created:  # a command that wrote nothing leaves no empty folder behind
            try:
                folder.rmdir()  # refuses a folder that is not empty
            except OSError:
                break


def _run(args, argv: list[str]) -> int:
    """The command, on a prepared --out; its exit status."""
    try:
        if args.command == "demo":
            config = DemoConfig(num_nodes=args.nodes, model=args.model, graph=args.topology, step=args.step, hops=args.hops, rounds=args.rounds,
                                batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, seed=args.seed,
                                gt_nodes=min(DemoConfig.gt_nodes, args.nodes))
            run_demo(args.out, config, progress=not args.no_progress, command_line=["dicekern", *argv])
            return 0
        results = {"score": _score, "attribute": _attribute, "cascade": _cascade, "validate": _validate, "detect": _detect}[args.command](args, argv)
    except (ValueError, TypeError, extras.MissingExtra) as error:
        print(f"dicekern {args.command}: error: {error}", file=sys.stderr)
        return 1
    write_json(args.out, "results.json", results)
    print(f"wrote {args.out}/results.json and its pictures")
    return 0
