"""One process per node: a gossip trainer on torch.distributed that records with dicekern.

    torchrun --standalone --nproc-per-node 4 -m dicekern.apps.torchrun --rounds 12 --hops 3

Every rank is one node with its own non-IID share of the digits. Each round it records its model
(one row), its batch, lr and W into a DistributedOnlineDICE ledger, takes an SGD step on its own
batch, then gossips: its model goes point to point only to the neighbours that weigh it (the
same exchange the chains use). At the end rank 0 prints every node's total contribution.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.distributed as dist

from dicekern.apps import examples
from dicekern.core import topology
from dicekern.distributed import BlockMixer, DistributedOnlineDICE, node_block
from dicekern.core.losses import softmax_cross_entropy
from dicekern.curvature.round import local_update
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.core.optim import SGD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        node_indices, features, labels, test_indices = examples.digits_split(n)
        x_all, y_all = torch.tensor(features), torch.tensor(labels)
        test = (x_all[test_indices], y_all[test_indices])
        torch.manual_seed(0)  # the same initial model on every node
        model = examples.mlp().double()
        objective = TorchFuncBackend(model, softmax_cross_entropy)
        theta = objective.layout.flatten({k: p.detach()[None] for k, p in model.named_parameters()})  # (1, D): this node
        W = topology.exponential(n)
        gossip = BlockMixer([W], [node_block(n, r, n) for r in range(n)], rank)
        ledger = DistributedOnlineDICE(model, softmax_cross_entropy, test, args.hops, num_nodes=n)
        lr = torch.full((1,), args.lr, dtype=theta.dtype)
        rng = np.random.default_rng(rank)
        for t in range(args.rounds):
            batch = torch.tensor(rng.choice(node_indices[rank], args.batch_size, replace=False))
            x, y = x_all[batch][None], y_all[batch][None]  # this node's (1, B, ...)
            ledger.record(t, objective.layout.unflatten(theta), x, y, args.lr, W)
            half = local_update(objective, SGD(), theta, {}, x, y, lr).half
            theta = gossip(0, half[:, None], transpose=False)[:, 0]
        ledger.record(args.rounds, objective.layout.unflatten(theta))
        totals = [None] * n
        dist.all_gather_object(totals, ledger.node_totals.tolist())
        if rank == 0:
            print(f"{n} nodes, {args.rounds} rounds, DICE-E^({args.hops}) of rounds {ledger.scored_steps[0]}..{ledger.scored_steps[-1]}")
            print("node  total contribution to the test loss (negative helps)")
            for node, (total,) in enumerate(totals):
                print(f"{node:>4}  {total:+.4e}")
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
