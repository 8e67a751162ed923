"""Ratio tables (markdown) from a pytest-benchmark JSON file: each group's slower entries over its
fastest, and the zoo groups' queries over their floors and over one vectorised training round.

    python benchmarks/ratios.py benchmarks/results/cpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


ZOO_QUERIES = ("dice_e", "cascade", "influence_matrix", "dice_gt_samples")
ZOO_TARGETS = {"dice_e": (2.0, 15.0), "cascade": (2.0, None), "influence_matrix": (2.0, None), "dice_gt_samples": (2.0, None)}  # issue 18, item 4


def ratio_rows(report: dict) -> list[str]:
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for bench in report["benchmarks"]:
        if bench["group"].startswith("zoo "):
            continue  # zoo_rows
        label = bench["name"].rstrip("]").split("[")[-1].split("-")[-1]  # the last parameter id
        groups[bench["group"]].append((label, bench["stats"]["min"]))
    rows = ["| group | fastest | min (ms) | slower | min (ms) | ratio |", "|---|---|---:|---|---:|---:|"]
    for group, entries in sorted(groups.items()):
        (fastest, t_fastest), *slower = sorted(entries, key=lambda e: e[1])
        for slow, t_slow in slower:
            rows.append(f"| {group} | {fastest} | {t_fastest * 1e3:.2f} | {slow} | {t_slow * 1e3:.2f} | {t_slow / t_fastest:.2f}x |")
    return rows


def zoo_rows(report: dict) -> list[str]:
    """Per zoo model and query: its time over its floor's (timed side by side) and over one
    vectorised round; FLOPs of both, and the floor as its FLOPs at the machine's GEMM rate."""
    entries = {(b["extra_info"]["model"], b["extra_info"]["job"]): b for b in report["benchmarks"] if b["group"].startswith("zoo ")}
    if not entries:
        return []
    models = list(dict.fromkeys(model for model, _ in entries))
    rows = ["| model | query | min ms | floor ms | x floor (target) | x round (target) | GFLOP | floor GFLOP | "
            "floor at GEMM rate ms | x that |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda b: b["stats"]["min"] * 1e3
    for model in models:
        round_ = entries.get((model, "round"))
        if round_:
            info = round_["extra_info"]
            rows.append(f"| {model} | round | {ms(round_):.1f} | | | 1x | {info['gflop']:.3f} | | | |")
        for query in ZOO_QUERIES:
            bench, floor = entries.get((model, query)), entries.get((model, f"{query}_floor"))
            if bench is None:
                continue
            floor_target, round_target = ZOO_TARGETS[query]
            cells = [model, query, f"{ms(bench):.1f}"]
            if floor:
                x_floor = ms(bench) / ms(floor)
                cells += [f"{ms(floor):.1f}", f"{x_floor:.2f}x (<= {floor_target:g}: {'met' if x_floor <= floor_target else 'not met'})"]
            else:
                cells += ["", "no floor"]
            if round_:
                x_round = ms(bench) / ms(round_)
                verdict = f" (<= {round_target:g}: {'met' if x_round <= round_target else 'not met'})" if round_target else ""
                cells.append(f"{x_round:.1f}x{verdict}")
            else:
                cells.append("")
            cells.append(f"{bench['extra_info']['gflop']:.3f}")
            if floor:
                info = floor["extra_info"]
                at_rate = info["gflop"] / info["gemm_gflops"] * 1e3
                cells += [f"{info['gflop']:.3f}", f"{at_rate:.1f}", f"{ms(bench) / at_rate:.1f}x"]
            else:
                cells += ["", "", ""]
            rows.append("| " + " | ".join(cells) + " |")
    info = next(iter(entries.values()))["extra_info"]
    rows.append(f"\nGEMM rate (1024^3, float32, {info['threads']} thread(s)): {info['gemm_gflops']:.1f} GFLOP/s. "
                f"One copy of all nodes' state (N x S x D floats): {info['state_mb']:.2f} MiB.")
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python {sys.argv[0]} BENCHMARK_JSON  (the file make bench writes: benchmarks/results/cpu.json)")
    with open(sys.argv[1]) as f:
        report = json.load(f)
    info = report["machine_info"]
    commit = report["commit_info"]
    print(f"{info['cpu']['brand_raw']}, {info['cpu']['count']} cores, python {info['python_version']}, "
          f"commit {commit['id'][:7]}{' with uncommitted changes' if commit.get('dirty') else ''}, {report['datetime'][:10]}\n")
    rows = ratio_rows(report)
    if len(rows) > 2:
        print("\n".join(rows))
    zoo = zoo_rows(report)
    if zoo:
        print(("\n" if len(rows) > 2 else "") + "Zoo (issue 18, item 4): each query over its floor and over one vectorised round, timed side by side\n")
        print("\n".join(zoo))
