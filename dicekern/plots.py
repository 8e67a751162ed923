"""Pictures of influence, saved as PNG with matplotlib (Agg, no screen needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dicekern.analysis import pearson


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cascade_on_graph(W: torch.Tensor, flow: torch.Tensor, source: int, path: str | Path) -> Path:
    """One panel per hop: the graph of W, node size and colour by e[s, k] (blue helps, red hurts).

    Args:
        W: (N, N) mixing matrix (its non-zeros are the edges drawn).
        flow: (hops+1, N) from :func:`dicekern.cascade`.
    """
    plt = _pyplot()
    n, hops = W.shape[0], flow.shape[0] - 1
    graph = nx.from_numpy_array((W.T.cpu().numpy() != 0).astype(float), create_using=nx.DiGraph)
    graph.remove_edges_from(nx.selfloop_edges(graph))
    layout = nx.circular_layout(graph)
    limit = max(flow[1:].abs().max().item() if hops else 0.0, 1e-30)
    fig, axes = plt.subplots(1, hops + 1, figsize=(3.2 * (hops + 1), 3.6), squeeze=False)
    for s, ax in enumerate(axes[0]):
        values = flow[s].cpu().numpy()
        scale = limit if s else max(abs(values).max(), 1e-30)  # hop 0 is often 10x the rest
        nx.draw_networkx_edges(graph, layout, ax=ax, alpha=0.15, arrows=False)
        nodes = nx.draw_networkx_nodes(graph, layout, ax=ax, node_color=values, cmap="RdBu_r", vmin=-scale, vmax=scale,
                                       node_size=60 + 600 * np.abs(values) / scale, edgecolors="black", linewidths=0.4)
        nx.draw_networkx_nodes(graph, layout, nodelist=[source], ax=ax, node_color="none", node_size=900, edgecolors="black", linewidths=1.5)
        ax.set_title(f"hop {s}" + (" (own scale)" if s == 0 and hops else ""))
        ax.axis("off")
        if s == hops:
            fig.colorbar(nodes, ax=ax, shrink=0.7, label="influence")
    fig.suptitle(f"influence cascade of node {source}'s batch over {n} nodes")
    fig.tight_layout()
    return _save(fig, path)


def estimate_vs_truth(estimate: torch.Tensor, truth: torch.Tensor, path: str | Path, *, label: str = "DICE-E") -> Path:
    """Scatter of an estimate against DICE-GT, Pearson and Spearman in the title."""
    from scipy.stats import spearmanr

    plt = _pyplot()
    e, g = estimate.flatten().cpu().numpy(), truth.flatten().cpu().numpy()
    correlation, spearman = pearson(estimate, truth), spearmanr(e, g).statistic
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(g, e, s=12)
    lo, hi = min(e.min(), g.min()), max(e.max(), g.max())
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    ax.set(xlabel="DICE-GT (exact replay)", ylabel=label, title=f"{label} vs DICE-GT\nPearson {correlation:.5f}, Spearman {spearman:.5f}")
    fig.tight_layout()
    return _save(fig, path)


def decay_over_hops(per_hop: torch.Tensor, path: str | Path) -> Path:
    """Mean |influence| of a sample at each hop, log scale: (hops+1, ...) from dice_e(per_hop=True).

    Summed over receivers, a sample's influence need not shrink with hops: mixing spreads it.
    """
    plt = _pyplot()
    magnitude = per_hop.abs().flatten(1).mean(1).cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(range(len(magnitude)), magnitude, marker="o")
    ax.set(xlabel="hop s", ylabel="mean |sum_k e[s, k]| per sample", title="influence per hop (summed over receivers)",
           xticks=range(len(magnitude)))
    fig.tight_layout()
    return _save(fig, path)


def anomaly_ranking(scores: torch.Tensor, anomalous: Sequence[int], path: str | Path, *, auc: float | None = None) -> Path:
    """Nodes sorted by score (positive: their data hurt the others), the truly anomalous in red."""
    plt = _pyplot()
    values = scores.cpu().numpy()
    order = np.argsort(-values)
    colours = ["tab:red" if node in set(anomalous) else "tab:gray" for node in order]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(values)), 3.5))
    ax.bar(range(len(values)), values[order], color=colours)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(xticks=range(len(values)), xticklabels=[str(n) for n in order], xlabel="node (ranked)", ylabel="DICE score on other nodes",
           title="anomaly ranking (red: corrupted)" + ("" if auc is None else f", ROC AUC {auc:.2f}"))
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
