"""Command line: ``python -m dicekern {demo,cascade,validate,detect} [--help]``.

Exit status: 0 on success, 1 when the library rejects the request (its message on stderr), 2 for
bad command-line arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dicekern import analysis, examples, plots
from dicekern.checks import check_node
from dicekern.demo import DemoConfig, run_demo
from dicekern.ground_truth import dice_gt_samples
from dicekern.influence import cascade, dice_e


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicekern", description="DICE: data influence cascades in gossip learning (digits by default)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--out", type=Path, default=Path(f"out/{name}"), help=f"folder for JSON and PNG (default: out/{name})")
        sub.add_argument("--force", action="store_true", help="overwrite the results already in --out")
        sub.add_argument("--nodes", type=_positive, default=16, help="gossip nodes (default 16)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--optimizer", choices=list(examples.OPTIMIZER_PRESETS), default="sgd",
                         help="every node's local optimizer (default sgd; momentum: 0.9; adam: torch defaults), at its preset lr")
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
        return sub

    demo = command("demo", "train on digits, score every sample over hops, check against DICE-GT")
    demo.add_argument("--step", type=_non_negative, default=DemoConfig.step, help=f"round whose samples are scored (default {DemoConfig.step})")
    demo.add_argument("--hops", type=_non_negative, default=DemoConfig.hops, help=f"rounds after it that are followed (default {DemoConfig.hops})")
    flow = command("cascade", "how one node's batch influences every node, hop by hop, drawn on the graph")
    flow.add_argument("--source", type=_non_negative, default=0, help="node whose batch is followed")
    flow.add_argument("--step", type=_non_negative, default=20, help="round whose batch is followed (default 20)")
    flow.add_argument("--hops", type=_non_negative, default=3, help="rounds after it that are followed (default 3)")
    check = command("validate", "DICE-E of single samples against exact DICE-GT replay, per hop")
    check.add_argument("--step", type=_non_negative, default=20, help="round whose samples are scored (default 20)")
    check.add_argument("--hops", type=_non_negative, default=3, help="rounds after it that are followed (default 3)")
    check.add_argument("--gt-nodes", type=_positive, default=4, help="nodes whose samples are replayed one by one")
    detect = command("detect", "flag nodes with corrupted data by their DICE score; ROC AUC over seeds")
    detect.add_argument("--kind", choices=["flip", "noise"], default="flip", help="labels flipped or features drowned in noise")
    detect.add_argument("--corrupted", type=_positive, default=3, help="corrupted nodes per run")
    detect.add_argument("--seeds", type=_positive, default=3, help="runs, one per seed")
    detect.add_argument("--hops", type=_positive, nargs="+", default=[1, 3], help="hop counts to compare (default 1 3)")
    return parser


def _rounds(args) -> int:
    """Rounds to train so that round step and its hops are recorded (hops 0 still needs round step's batch)."""
    return args.step + max(args.hops, 1)


def _cascade(args) -> dict:
    check_node("source", args.source, args.nodes)  # before any training
    run = examples.digits_run(args.nodes, _rounds(args), seed=args.seed, optimizer=args.optimizer, progress=not args.no_progress)
    flow = cascade(run.trajectory, args.step, args.source, run.test, args.hops)
    plots.cascade_on_graph(run.trajectory[args.step].W, flow, args.source, args.out / "cascade.png")
    print(f"cascade of node {args.source}'s batch at round {args.step} (negative lowers a node's test loss)")
    for s, row in enumerate(flow):
        reached = int((row != 0).sum())
        print(f"hop {s}: total {row.sum().item():+.3e} over {reached} node(s)")
    return {"source": args.source, "step": args.step, "cascade": flow.tolist()}


def _validate(args) -> dict:
    run = examples.digits_run(args.nodes, _rounds(args), seed=args.seed, optimizer=args.optimizer, progress=not args.no_progress)
    nodes = list(range(min(args.gt_nodes, args.nodes)))
    estimate = dice_e(run.trajectory, args.step, run.test, args.hops, per_hop=True)[:, nodes]
    truth = dice_gt_samples(run.trajectory, args.step, run.test, args.hops, nodes=nodes, per_hop=True, progress=not args.no_progress)
    plots.estimate_vs_truth(estimate.sum(0), truth.sum(0), args.out / "e_vs_gt.png")
    rows = []
    print(f"{'hops 0..s':>9}  {'pearson':>9}  {'rel.err':>8}")
    for s in range(args.hops + 1):
        e, g = estimate[: s + 1].sum(0).flatten(), truth[: s + 1].sum(0).flatten()
        rows.append({"hops": s, "pearson": analysis.pearson(e, g), "rel_error": analysis.relative_error(e, g)})
        print(f"{s:>9}  {rows[-1]['pearson']:>9.6f}  {rows[-1]['rel_error']:>8.2e}")
    return {"nodes": nodes, "per_hops": rows}


def _detect(args) -> dict:
    if args.corrupted >= args.nodes:
        raise ValueError(f"--corrupted {args.corrupted} must leave some clean nodes among --nodes {args.nodes}")
    results = analysis.anomaly_experiment(args.kind, range(args.seed, args.seed + args.seeds), num_nodes=args.nodes,
                                          corrupted=args.corrupted, hops=tuple(args.hops), optimizer=args.optimizer,
                                          progress=not args.no_progress)
    print(f"ROC AUC of ranking nodes by DICE score ({args.kind}, {args.corrupted} of {args.nodes} nodes corrupted, {args.seeds} seeds)")
    for h, aucs in results["auc"].items():
        print(f"hops {h}: mean {np.mean(aucs):.3f}  per seed {', '.join(f'{a:.2f}' for a in aucs)}")
    first, deepest = results["runs"][0], max(args.hops)
    plots.anomaly_ranking(torch.tensor(first["scores"][deepest]), first["anomalous"], args.out / "anomaly.png",
                          auc=results["auc"][deepest][0])
    return results


def _prepare_out(parser: argparse.ArgumentParser, args) -> None:
    """--out checked and created before any work: a folder we can write, without results unless --force."""
    out = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a folder")
    if (out / "results.json").exists() and not args.force:
        parser.error(f"--out {out} already holds results; pass --force to overwrite them, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        parser.error(f"--out {out} cannot be written: {error.strerror or error}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _prepare_out(parser, args)
    if args.command == "demo":
        config = DemoConfig(num_nodes=args.nodes, step=args.step, hops=args.hops, seed=args.seed, optimizer=args.optimizer,
                            gt_nodes=min(DemoConfig.gt_nodes, args.nodes))
        try:
            run_demo(args.out, config, progress=not args.no_progress)
        except ValueError as error:
            print(f"dicekern demo: error: {error}", file=sys.stderr)
            return 1
        return 0
    try:
        results = {"cascade": _cascade, "validate": _validate, "detect": _detect}[args.command](args)
    except ValueError as error:
        print(f"dicekern {args.command}: error: {error}", file=sys.stderr)
        return 1
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}/results.json and its picture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
