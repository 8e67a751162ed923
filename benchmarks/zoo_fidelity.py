"""Zoo fidelity (issue 18, item 2): per-sample DICE-E against DICE-GT, hop by hop, on every zoo model.

Setting: every model of ``dicekern.zoo`` at the size in ``SIZES`` (D printed), N = 8 nodes on the
exponential graph (in-degree 3 plus self), one torch.optim SGD per node with lr 0.05, momentum 0.9
and weight decay 5e-4, recorded live with ``rec.record(t, models, x, y, W=W, optimizers=opts)`` and
gossiped with ``dk.mix_``. The data is learnable: ten random class prototypes drawn with
``zoo.random_data`` plus standard normal noise, the same for every dtype (drawn in float32, then
cast). Rounds 0..3 warm the run up (momentum buffers, BatchNorm statistics); round STEP = 4 is
scored with hops 3 against the mean loss of M = 64 test points.

Each row is one (dtype, batch) run from the same seed: float32 and float64, each at batch 16, 64
and 128. ``dk.dice_e(per_hop=True)`` of the samples of the nodes in ``GT_NODES`` (nodes 0 and 1;
node 0 alone at batch 128) is compared with ``dk.dice_gt_samples(per_hop=True)`` of the same
samples: per hop s the Pearson correlation and the relative error ||e - gt|| / ||gt|| of hop s
alone, and of their sum over hops. Every float32 row also gets the noise of its ground truth from
its float64 twin: the Pearson of float32 DICE-GT, and of float32 DICE-E, against float64 DICE-GT,
per hop. Wall times are of one recorded run, the faster of two dice_e calls and one
dice_gt_samples call, on 2 threads.

``python benchmarks/zoo_fidelity.py`` writes ``results/zoo_fidelity.json`` and prints the tables;
``--quick`` runs tiny models at batch 16 only and writes nothing; ``--models`` picks models.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dicekern as dk
from dicekern import zoo

N, HOPS, STEP, M, SEED = 8, 3, 4, 64, 0
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
SIZES: dict[str, dict[str, Any]] = {
    "resnet-bn": dict(width=8, blocks=[1, 1]),
    "resnet-gn": dict(width=8, blocks=[1, 1]),
    "vit": dict(image_size=8, patch=4, dim=16, depth=1, heads=2),
    "cnn1d": dict(width=8, length=16),
    "mlp": dict(hidden=32),
}
QUICK_SIZES: dict[str, dict[str, Any]] = {
    "resnet-bn": dict(width=4, blocks=[1]),
    "resnet-gn": dict(width=4, blocks=[1], groups=2),
    "vit": dict(image_size=4, patch=2, dim=8, depth=1, heads=2),
    "cnn1d": dict(width=4, length=8),
    "mlp": dict(hidden=8),
}
LR = 0.05
BATCHES = (16, 64, 128)
GT_NODES = {16: [0, 1], 64: [0, 1], 128: [0]}  # the source nodes whose every sample is replayed
RESULTS = Path(__file__).parent / "results" / "zoo_fidelity.json"


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax cross-entropy, (B,)."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def learnable_data(name: str, shape: tuple[int, ...], prototypes: torch.Tensor, generator: torch.Generator,
                   size: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the given leading shape: the target's prototype plus standard normal noise, float32."""
    noise, targets = zoo.random_data(name, *shape, generator=generator, **size)
    return prototypes[targets] + noise, targets


def test_loss(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """model's mean loss on the test set in eval mode (BatchNorm's running statistics)."""
    model.eval()
    with torch.no_grad():
        loss = float(cross_entropy(model(test[0]), test[1]).mean())
    model.train()
    return loss


def gossip_run(name: str, dtype: torch.dtype, batch: int,
               size: dict[str, Any]) -> tuple[dk.Trajectory, tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """Rounds 0..STEP+HOPS of the momentum + weight decay gossip run, recorded live; returns
    (trajectory, test set, facts: D and node 0's test loss before and after). The init and data
    are drawn in float32 from SEED, then cast to dtype."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    first = zoo.build(name, torch.float32, **size)
    prototypes = zoo.random_data(name, 10, generator=g, **size)[0]
    test_x, test_y = learnable_data(name, (M,), prototypes, g, size)
    models = [zoo.build(name, torch.float32, **size) for _ in range(N)]
    for model in models:
        model.load_state_dict(first.state_dict())
        model.to(dtype)
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) for m in models]
    rec = dk.Recorder(models[0], cross_entropy, optimizer=opts)
    W = dk.topology.exponential(N, dtype=dtype)
    test = (test_x.to(dtype), test_y)
    before = test_loss(models[0], test)
    for t in range(STEP + HOPS):
        x, y = learnable_data(name, (N, batch), prototypes, g, size)
        x = x.to(dtype)
        rec.record(t, models, x, y, W=W, optimizers=opts)
        for k, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            cross_entropy(model(x[k]), y[k]).mean().backward()
            opt.step()
        dk.mix_(models, W)
    rec.record(STEP + HOPS, models, optimizers=opts)
    facts = {"D": sum(p.numel() for p in first.parameters()), "test_loss_before": before,
             "test_loss_after": test_loss(models[0], test)}
    return rec.trajectory(), test, facts


def per_hop(metric, estimate: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """metric of every hop's (nodes, B) block alone."""
    return [metric(estimate[s].double(), truth[s].double()) for s in range(estimate.shape[0])]


def score(name: str, dtype: torch.dtype, batch: int, size: dict[str, Any]) -> dict[str, Any]:
    """One row: the run, DICE-E and DICE-GT of the GT_NODES' samples, their agreement per hop, wall times."""
    start = time.perf_counter()
    traj, test, facts = gossip_run(name, dtype, batch, size)
    record_s = time.perf_counter() - start
    nodes = GT_NODES[batch]
    dice_e_s = float("inf")
    for _ in range(2):  # the faster of two calls: the first pays for tracing
        start = time.perf_counter()
        e = dk.dice_e(traj, STEP, test, HOPS, per_hop=True)[:, nodes]
        dice_e_s = min(dice_e_s, time.perf_counter() - start)
    start = time.perf_counter()
    gt = dk.dice_gt_samples(traj, STEP, test, HOPS, nodes=nodes, per_hop=True)
    dice_gt_s = time.perf_counter() - start
    return {
        "model": name, **facts, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "nodes": nodes,
        "pearson": per_hop(dk.analysis.pearson, e, gt), "rel_error": per_hop(dk.analysis.relative_error, e, gt),
        "pearson_total": dk.analysis.pearson(e.sum(0).double(), gt.sum(0).double()),
        "rel_error_total": dk.analysis.relative_error(e.sum(0).double(), gt.sum(0).double()),
        "record_s": record_s, "dice_e_s": dice_e_s, "dice_gt_s": dice_gt_s,
        "dice_e": e.double().tolist(), "dice_gt": gt.double().tolist(),
    }


def add_noise(rows: list[dict[str, Any]]) -> None:
    """To every float32 row, from its float64 twin (same model, batch): Pearson and relative error
    per hop of its DICE-GT, and Pearson per hop of its DICE-E, against the twin's DICE-GT."""
    twins = {(r["model"], r["batch"]): r for r in rows if r["dtype"] == "float64"}
    for row in rows:
        if row["dtype"] == "float32":
            truth = torch.tensor(twins[row["model"], row["batch"]]["dice_gt"])
            gt, e = torch.tensor(row["dice_gt"]), torch.tensor(row["dice_e"])
            row["gt_vs_float64_gt"] = per_hop(dk.analysis.pearson, gt, truth)
            row["gt_rel_error_vs_float64_gt"] = per_hop(dk.analysis.relative_error, gt, truth)
            row["e_vs_float64_gt"] = per_hop(dk.analysis.pearson, e, truth)


def fidelity_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per hop s, Pearson (r) and relative error (rel) of DICE-E against DICE-GT, then of the sum over hops."""
    hops = range(HOPS + 1)
    lines = ["| model | D | dtype | B | " + " | ".join(f"r s={s} | rel s={s}" for s in hops) + " | r all | rel all |",
             "|---|---:|---|---:|" + "---:|---:|" * (HOPS + 2)]
    for r in rows:
        cells = " | ".join(f"{r['pearson'][s]:.4f} | {r['rel_error'][s]:.3f}" for s in hops)
        lines.append(f"| {r['model']} | {r['D']} | {r['dtype']} | {r['batch']} | {cells} | "
                     f"{r['pearson_total']:.4f} | {r['rel_error_total']:.3f} |")
    return "\n".join(lines)


def noise_table(rows: list[dict[str, Any]]) -> str:
    """Markdown, float32 rows: per hop, DICE-GT against float64 DICE-GT (Pearson / relative error)
    and DICE-E against float64 DICE-GT (Pearson); wall times of both dtypes."""
    hops = range(HOPS + 1)
    twins = {(r["model"], r["batch"]): r for r in rows if r["dtype"] == "float64"}
    lines = ["| model | B | samples | " + " | ".join(f"GT32 vs GT64 s={s}" for s in hops) + " | "
             + " | ".join(f"E32 vs GT64 s={s}" for s in hops) + " | dice_e (s) f32 / f64 | dice_gt_samples (s) f32 / f64 |",
             "|---|---:|---:|" + "---:|" * (2 * len(hops) + 2)]
    for r in (r for r in rows if r["dtype"] == "float32"):
        twin = twins[r["model"], r["batch"]]
        gt = [f"{r['gt_vs_float64_gt'][s]:.4f} / {r['gt_rel_error_vs_float64_gt'][s]:.0e}" for s in hops]
        e = [f"{r['e_vs_float64_gt'][s]:.4f}" for s in hops]
        lines.append(f"| {r['model']} | {r['batch']} | {len(r['nodes']) * r['batch']} | " + " | ".join(gt + e)
                     + f" | {r['dice_e_s']:.2f} / {twin['dice_e_s']:.2f} | {r['dice_gt_s']:.1f} / {twin['dice_gt_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """Run every model's rows, write the JSON (not with --quick) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 16 only; writes nothing")
    parser.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=list(zoo.MODELS))
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    batches = (16,) if args.quick else BATCHES
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        for dtype, batch in [(dtype, b) for dtype in (torch.float32, torch.float64) for b in batches]:
            rows.append(score(name, dtype, batch, sizes[name]))
            r = rows[-1]
            print(f"{name} {r['dtype']} B={batch} D={r['D']}: pearson {[round(p, 4) for p in r['pearson']]}, test loss "
                  f"{r['test_loss_before']:.3f} -> {r['test_loss_after']:.3f}, record {r['record_s']:.1f} s, dice_e "
                  f"{r['dice_e_s']:.2f} s, dice_gt_samples {r['dice_gt_s']:.1f} s", flush=True)
    add_noise(rows)
    total_s = time.perf_counter() - start
    print(fidelity_table(rows), noise_table(rows), sep="\n\n")
    print(f"total {total_s:.0f} s")
    if not args.quick:
        settings_doc = {"N": N, "hops": HOPS, "step": STEP, "M": M, "seed": SEED, "lr": LR, "momentum": MOMENTUM,
                        "weight_decay": WEIGHT_DECAY, "sizes": SIZES, "graph": "exponential", "gt_nodes": GT_NODES,
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "total_s": total_s,
                        "load_average_at_end": os.getloadavg()}
        for row in rows:  # the per-sample scores stay out of the file: the script makes them again
            del row["dice_e"], row["dice_gt"]
        RESULTS.write_text(json.dumps({"settings": settings_doc, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
