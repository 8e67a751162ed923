"""Command line: ``python -m dicekern demo [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicekern.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicekern", description="DICE influence in gossip learning")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train on digits, score every sample, check against DICE-GT")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for results.json and plots")
    demo.add_argument("--nodes", type=int, default=DemoConfig.num_nodes, help="number of gossip nodes")
    demo.add_argument("--step", type=int, default=DemoConfig.step, help="round whose samples are scored")
    demo.add_argument("--hops", type=int, default=DemoConfig.hops, help="communication hops")
    demo.add_argument("--seed", type=int, default=DemoConfig.seed)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    for name in ("nodes", "step", "hops"):
        if getattr(args, name) < (2 if name == "nodes" else 0):
            parser.error(f"--{name} is too small: {getattr(args, name)}")
    config = DemoConfig(num_nodes=args.nodes, step=args.step, hops=args.hops, seed=args.seed,
                        gt_nodes=min(DemoConfig.gt_nodes, args.nodes))
    run_demo(args.out, config, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
