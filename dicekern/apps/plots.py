"""Pictures of influence as PNG files that a reader understands without the code.

Every picture has a title, a caption line for the run it comes from, node labels on graphs and a
colour bar wherever colour carries a value. Figures are drawn on matplotlib's Agg canvas
directly, never through pyplot, so the caller's backend stays as it was; each file is written
whole or not at all.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> import dicekern as dk
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     dk.plots.influence_heatmap(torch.randn(5, 5), Path(folder) / "matrix.png", caption="run 1, round 3").name
    'matrix.png'
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dicekern.core import extras
from dicekern.apps.analysis import Shares, agreement
from dicekern.core.checks import as_tensor, check_node
from dicekern.core.snapshots import replace_file

if TYPE_CHECKING:
    import networkx as nx
    from matplotlib.axes import Axes
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

INFLUENCE = "influence on test loss"
CAPTION_INCHES = 0.35
DPI = 120


def graph_layout(W: torch.Tensor) -> dict[int, np.ndarray]:
    """Positions by node for the undirected support graph of W (self-loops left out).

    A ring goes on a circle in cycle order, a 2-D torus on its rows x cols grid; any other
    connected graph of up to 200 nodes gets a Kamada-Kawai layout, the rest a seeded spring layout.

    Args:
        W: (N, N) mixing matrix; W[k, j] != 0 is an edge between k and j.

    Example:
        >>> import dicekern as dk
        >>> graph_layout(dk.topology.ring(6))[0].round(3).tolist()  # node 0 at the top of the circle
        [0.0, 1.0]
    """
    return _layout(_support_graph(W))


def cascade_on_graph(W: torch.Tensor, flow: torch.Tensor, source: int, path: str | os.PathLike, *, caption: str = "") -> Path:
    """One graph per hop, each node coloured and sized by how much ``source``'s batch moved its test loss.

    Hops 1..R share one symmetric colour scale; hop 0 (the update itself, often far larger) has its own.

    Args:
        W: (N, N) mixing matrix of the round (its non-zeros are the edges drawn).
        flow: (hops+1, N) from :func:`dicekern.cascade`: entry [s, k] is node k's share at hop s.
        source: node whose batch the cascade follows (circled).
    """
    nx = _networkx()
    graph = _support_graph(W)
    n = graph.number_of_nodes()
    flow = _cpu("flow", flow)
    if flow.dim() != 2 or flow.shape[1] != n:
        raise ValueError(f"flow must have shape (hops+1, N) with N = {n} nodes of W, got {tuple(flow.shape)}")
    source = check_node("source", source, n)
    values = flow.numpy()
    hops = len(values) - 1
    layout = _layout(graph)
    shared = _symmetric_limit(values[1:])
    fig, axes = _panels(hops + 1, caption, width=3.6, height=3.4)
    for s, ax in enumerate(axes):
        limit = shared if s else _symmetric_limit(values[0])
        sizes = 60 + 540 * np.abs(values[s]) / limit
        nx.draw_networkx_edges(graph, layout, ax=ax, alpha=0.2)
        nodes = nx.draw_networkx_nodes(graph, layout, ax=ax, node_color=values[s], cmap="RdBu_r", vmin=-limit, vmax=limit,
                                       node_size=sizes, edgecolors="gray", linewidths=0.4)
        nx.draw_networkx_nodes(graph, layout, nodelist=[source], ax=ax, node_color="none", node_size=sizes[source] + 300,
                               edgecolors="black", linewidths=1.5)
        nx.draw_networkx_labels(graph, layout, ax=ax, font_size=6,
                                font_color={k: "white" if abs(v) > 0.6 * limit else "black" for k, v in enumerate(values[s])})
        _colorbar(fig, nodes, ax)
        ax.set_title("hop 0: the update itself (own scale)" if s == 0 else f"hop {s}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_axis_off()
    fig.suptitle(f"How node {source}'s batch (circled) moves each node's test loss, hop by hop\n"
                 "blue: lowered it, red: raised it; node size: |influence|" + (f"; hops 1..{hops} share one scale" if hops else ""))
    return _save(fig, path)


def estimate_vs_truth(estimate: torch.Tensor, truth: torch.Tensor, path: str | os.PathLike, *, label: str = "DICE-E",
                      caption: str = "") -> Path:
    """Scatter of an estimate against DICE-GT with the line y = x; Pearson, Spearman and relative error in the title.

    Args:
        estimate, truth: scores of the same samples, any equal shape, e.g. (nodes, B).
    """
    estimate, truth = _same_shape(estimate, truth)
    fig, (ax,) = _panels(1, caption, width=5.0, height=5.0)
    _scatter(ax, estimate.flatten(), truth.flatten(), label, f"{label} vs DICE-GT ({estimate.numel()} samples)")
    return _save(fig, path)


def estimate_vs_truth_per_hop(estimate: torch.Tensor, truth: torch.Tensor, path: str | os.PathLike, *, label: str = "DICE-E",
                              caption: str = "") -> Path:
    """One scatter per hop s (that hop's term alone), then one of the sums over hops 0..R.

    Args:
        estimate, truth: (hops+1, ...) per-hop scores of the same samples, e.g. from
            ``dice_e(per_hop=True)[:, nodes]`` and ``dice_gt_samples(nodes=nodes, per_hop=True)``.
    """
    estimate, truth = _same_shape(estimate, truth)
    if estimate.dim() < 2:
        raise ValueError(f"estimate and truth must have shape (hops+1, ...) with scores per hop, got {tuple(estimate.shape)}")
    hops = len(estimate) - 1
    fig, axes = _panels(hops + 2, caption, width=3.6, height=3.8)
    for s, ax in enumerate(axes[:-1]):
        _scatter(ax, estimate[s].flatten(), truth[s].flatten(), label, f"hop {s} alone")
    _scatter(axes[-1], estimate.sum(0).flatten(), truth.sum(0).flatten(), label, f"hops 0..{hops} (sum)")
    fig.suptitle(f"{label} against DICE-GT (exact replay), hop by hop, {estimate[0].numel()} samples")
    return _save(fig, path)


def decay_over_hops(per_hop: torch.Tensor, path: str | os.PathLike, *, caption: str = "") -> Path:
    """Mean |influence| of a sample at each hop, log scale.

    Summed over receivers, a sample's influence need not shrink with hops: mixing spreads it.

    Args:
        per_hop: (hops+1, ...) per-hop scores, e.g. (hops+1, N, B) from ``dice_e(per_hop=True)``.
    """
    per_hop = _cpu("per_hop", per_hop)
    if per_hop.dim() < 2 or per_hop.numel() == 0:
        raise ValueError(f"per_hop must have shape (hops+1, ...) with scores per hop, got {tuple(per_hop.shape)}")
    magnitude = per_hop.abs().flatten(1).mean(1).numpy()
    fig, (ax,) = _panels(1, caption, width=5.5, height=3.8)
    ax.semilogy(range(len(magnitude)), magnitude, marker="o")
    ax.set(xlabel="hop s (rounds after the update)", ylabel=f"mean |{INFLUENCE}| per sample", xticks=range(len(magnitude)),
           title=f"How a sample's influence changes with hops\n(summed over receivers, mean over {per_hop[0].numel()} samples)")
    return _save(fig, path)


def anomaly_ranking(scores: torch.Tensor, anomalous: Sequence[int], path: str | os.PathLike, *, auc: float | None = None,
                    caption: str = "") -> Path:
    """Nodes sorted by score (positive: their data raised the others' test loss), known anomalous nodes in red.

    Args:
        scores: (N,) DICE score of each node on the other nodes.
        anomalous: nodes known to be corrupted; empty when unknown (then every bar is gray).
        auc: ROC AUC of the ranking, shown in the title when given.
    """
    scores = _cpu("scores", scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must have shape (N,), got {tuple(scores.shape)}")
    n = len(scores)
    marked = {check_node("anomalous node", node, n) for node in anomalous}
    order = np.argsort(-scores.numpy(), kind="stable")
    fig, (ax,) = _panels(1, caption, width=min(max(6.5, 0.35 * n), 14.0), height=3.8)
    ax.bar(range(n), scores.numpy()[order], color=["tab:red" if node in marked else "tab:gray" for node in order])
    ax.axhline(0, color="black", linewidth=0.6)
    ticks = _ticks(n)
    title = "Nodes ranked by DICE score\n(positive: their data raised the others' test loss)"
    notes = (["red: known corrupted"] if marked else []) + ([] if auc is None else [f"ROC AUC {auc:.2f}"])
    if notes:
        title += "\n" + ", ".join(notes)
    ax.set(xticks=ticks, xticklabels=[str(order[i]) for i in ticks], xlabel="node (ranked)",
           ylabel=f"DICE score ({INFLUENCE}\nof the other nodes)", title=title)
    return _save(fig, path)


def contribution_shares(shares: Shares, path: str | os.PathLike, *, caption: str = "") -> Path:
    """Each node's share of the benefit to the final models (``dk.analysis.shares``), largest first;
    harmful nodes' negative shares in red, below the axis.

    Args:
        shares: the nodes' benefits and shares.
    """
    share = _cpu("share", shares.share)
    n = len(share)
    order = np.argsort(-share.numpy(), kind="stable")
    fig, (ax,) = _panels(1, caption, width=min(max(6.5, 0.35 * n), 14.0), height=3.8)
    values = share.numpy()[order]
    ax.bar(range(n), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.axhline(0, color="black", linewidth=0.6)
    ticks = _ticks(n)
    title = "Each node's share of what the data did to the final models"
    title += f"\n(red: {len(shares.harmful)} node(s) whose data raised the test loss)" if shares.harmful else "\n(every node's data helped)"
    ax.set(xticks=ticks, xticklabels=[str(order[i]) for i in ticks], xlabel="node (ranked)",
           ylabel="share of the benefit\n(negative: harmful)", title=title)
    return _save(fig, path)


def influence_heatmap(matrix: torch.Tensor, path: str | os.PathLike, *, title: str = "node influence (source -> receiver)",
                      caption: str = "") -> Path:
    """Node-to-node influence as a heat map on a symmetric diverging scale (blue: lowered the loss).

    Args:
        matrix: (N_source, N_receiver), e.g. one hop of :func:`dicekern.influence_matrix` or its sum over hops.
    """
    matrix = _square("matrix", matrix).numpy()
    n = len(matrix)
    limit = _symmetric_limit(matrix)
    side = min(4.0 + 0.12 * n, 10.0)
    fig, (ax,) = _panels(1, caption, width=side + 1.2, height=side)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax, shrink=0.8, label="influence of the source's data on the receiver's test loss\n(blue: lowered it, red: raised it)")
    ticks = _ticks(n)
    ax.set(xticks=ticks, yticks=ticks, xlabel="receiver node", ylabel="source node", title=title)
    ax.tick_params(labelsize=7)
    return _save(fig, path)


def contribution_over_rounds(steps: Sequence[int], per_round: torch.Tensor, path: str | os.PathLike, *, caption: str = "") -> Path:
    """Each node's influence on the test loss summed over the scored rounds so far, one line per node.

    Args:
        steps: the R scored round numbers.
        per_round: (R, N) each node's total influence in each scored round, e.g. the per-round
            node totals of :class:`dicekern.OnlineDICE`.
    """
    per_round = _cpu("per_round", per_round)
    steps = np.asarray(steps)
    if per_round.dim() != 2 or per_round.shape[0] == 0:
        raise ValueError(f"per_round must have shape (R, N) with one row per scored round, got {tuple(per_round.shape)}")
    if steps.shape != (per_round.shape[0],):
        raise ValueError(f"steps must list the R = {per_round.shape[0]} rounds of per_round's rows, got shape {steps.shape}")
    colormaps = extras.optional("matplotlib", "dk.plots", "apps").colormaps
    MaxNLocator = extras.optional("matplotlib.ticker", "dk.plots", "apps").MaxNLocator

    cumulative = per_round.cumsum(0).numpy()
    n = cumulative.shape[1]
    fig, (ax,) = _panels(1, caption, width=8.0, height=4.5)
    marker = "o" if len(steps) <= 30 else None
    if n <= 20:
        for k in range(n):  # tab20's even colours first: neighbouring nodes never get a pair's two shades
            ax.plot(steps, cumulative[:, k], marker=marker, markersize=3, color=colormaps["tab20"]((2 * k) % 20 + (2 * k) // 20),
                    label=f"node {k}")
        fig.legend(loc="outside right upper", fontsize=7, ncols=1 if n <= 10 else 2)
    else:
        ax.plot(steps, cumulative, color="lightgray", linewidth=0.7)
        extreme = np.argsort(-np.abs(cumulative[-1]), kind="stable")[:5]
        heights = _spread(cumulative[-1, extreme], gap=0.04 * (np.ptp(cumulative) or 1.0))
        for k, height in zip(extreme, heights):
            (line,) = ax.plot(steps, cumulative[:, k], marker=marker, markersize=3)
            ax.annotate(f"node {k}", (steps[-1], height), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7,
                        color=line.get_color(), annotation_clip=False)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel=f"cumulative {INFLUENCE}\n(negative: helped)",
           title=f"Each node's contribution to the test loss over {len(steps)} scored rounds"
           + ("" if n <= 20 else f"\n(the 5 largest of {n} nodes labelled)"))
    return _save(fig, path)


def _cpu(name: str, value: object) -> torch.Tensor:
    return as_tensor(name, value).detach().to("cpu", torch.float64)


def _square(name: str, value: object) -> torch.Tensor:
    matrix = _cpu(name, value)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.numel() == 0:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(matrix.shape)}")
    return matrix


def _same_shape(estimate: object, truth: object) -> tuple[torch.Tensor, torch.Tensor]:
    estimate, truth = _cpu("estimate", estimate), _cpu("truth", truth)
    if estimate.shape != truth.shape or estimate.numel() == 0:
        raise ValueError(f"estimate and truth must have the same non-empty shape, got {tuple(estimate.shape)} and {tuple(truth.shape)}")
    return estimate, truth


def _support_graph(W: object) -> nx.Graph:
    """Undirected graph of W's off-diagonal non-zeros: who mixes with whom, either way."""
    nx = _networkx()
    edges = _square("W", W).numpy() != 0
    edges |= edges.T
    np.fill_diagonal(edges, False)
    return nx.from_numpy_array(edges.astype(float))


def _layout(graph: nx.Graph) -> dict[int, np.ndarray]:
    nx = _networkx()
    n = graph.number_of_nodes()
    connected = nx.is_connected(graph)
    if n >= 3 and connected and all(degree == 2 for _, degree in graph.degree()):
        ring = [u for u, _ in nx.find_cycle(graph, source=0)]
        angles = np.pi / 2 - 2 * np.pi * np.arange(n) / n  # clockwise from the top
        return {node: np.array([np.cos(a), np.sin(a)]) for node, a in zip(ring, angles)}
    cells = _torus_cells(graph)
    if cells is not None:
        return {node: np.array([col, -row], dtype=float) for node, (row, col) in cells.items()}
    if connected and n <= 200:
        return nx.kamada_kawai_layout(graph)
    return nx.spring_layout(graph, seed=0)


def _torus_cells(graph: nx.Graph) -> dict[int, tuple[int, int]] | None:
    """(row, col) of each node when graph is a rows x cols torus with rows, cols >= 3, else None.

    Nodes numbered row by row (as :func:`dicekern.core.topology.torus` does) keep that order; others
    take the cells of any isomorphism.
    """
    nx = _networkx()
    n = graph.number_of_nodes()
    # every torus node has degree 4; testing that first keeps the isomorphism search off other graphs
    if any(degree != 4 for _, degree in graph.degree()):
        return None
    grids = {(rows, n // rows): nx.grid_2d_graph(rows, n // rows, periodic=True) for rows in range(3, n // 3 + 1) if n % rows == 0}
    for (_, cols), grid in grids.items():
        if all(grid.has_edge(divmod(u, cols), divmod(v, cols)) for u, v in graph.edges):
            return {node: divmod(node, cols) for node in graph}
    for (rows, cols), grid in grids.items():
        mapping = nx.vf2pp_isomorphism(graph, grid) if rows <= cols else None
        if mapping is not None:
            return mapping
    return None


def _spread(heights: np.ndarray, gap: float) -> np.ndarray:
    """Heights moved up just enough that sorted neighbours are at least gap apart (labels that do not overlap)."""
    spread = heights.astype(float)
    order = np.argsort(spread, kind="stable")
    for below, above in zip(order, order[1:]):
        spread[above] = max(spread[above], spread[below] + gap)
    return spread


def _symmetric_limit(values: np.ndarray) -> float:
    """max |values|, or 1 when all are zero, so a colour scale from -limit to limit is never empty."""
    return float(np.abs(values).max(initial=0.0)) or 1.0


def _ticks(n: int) -> range:
    """Tick positions for n nodes: every node up to 32, else about 32 evenly spaced."""
    return range(0, n, math.ceil(n / 32))


def _agreement(estimate: torch.Tensor, truth: torch.Tensor) -> str:
    """Pearson, Spearman and relative error ||e - g|| / ||g||, "n/a" where undefined."""
    numbers = agreement(estimate, truth)
    shown = {name: "n/a" if value is None else f"{value:.2e}" if name == "rel_error" else f"{value:.5f}" for name, value in numbers.items()}
    return f"Pearson {shown['pearson']}, Spearman {shown['spearman']}\nrelative error {shown['rel_error']}"


def _scatter(ax: Axes, estimate: torch.Tensor, truth: torch.Tensor, label: str, title: str) -> None:
    """Estimate against truth (flat tensors) with the line y = x, agreement in the title."""
    ax.scatter(truth.numpy(), estimate.numpy(), s=10, alpha=0.7)
    lo, hi = min(estimate.min(), truth.min()).item(), max(estimate.max(), truth.max()).item()
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    ax.set_title(f"{title}\n{_agreement(estimate, truth)}", fontsize=9)
    ax.set(xlabel="DICE-GT (exact replay)", ylabel=label)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))


def _colorbar(fig: Figure, mappable: ScalarMappable, ax: Axes) -> None:
    fig.colorbar(mappable, ax=ax, shrink=0.8, label=INFLUENCE)


def _panels(count: int, caption: str, *, width: float, height: float, columns: int = 4) -> tuple[Figure, list[Axes]]:
    """A figure of count panels of width x height inches, at most ``columns`` a row, and the caption at the bottom."""
    # imported here so that `import dicekern` does not load matplotlib
    FigureCanvasAgg = extras.optional("matplotlib.backends.backend_agg", "dk.plots", "apps").FigureCanvasAgg
    Figure = extras.optional("matplotlib.figure", "dk.plots", "apps").Figure

    cols = min(count, columns)
    rows = math.ceil(count / cols)
    margin = CAPTION_INCHES if caption else 0.0
    fig = Figure(figsize=(width * cols, height * rows + margin), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if caption:
        bottom = margin / (height * rows + margin)
        fig.get_layout_engine().set(rect=(0.0, bottom, 1.0, 1.0 - bottom))
        fig.text(0.5, bottom / 2, caption, ha="center", va="center", fontsize=8, color="dimgray", wrap=True)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.remove()
    return fig, axes[:count]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write fig as a PNG at path, atomically (``snapshots.replace_file``): a crash never leaves half a picture."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return replace_file(path, buffer.getvalue())


def _networkx():
    return extras.optional("networkx", "dk.plots", "apps")
