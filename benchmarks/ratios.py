"""Ratio table (markdown) from a pytest-benchmark JSON file: each group's slower entries over its fastest.

    python benchmarks/ratios.py benchmarks/results/cpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def ratio_rows(report: dict) -> list[str]:
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for bench in report["benchmarks"]:
        label = bench["name"].rstrip("]").split("[")[-1].split("-")[-1]  # the last parameter id
        groups[bench["group"]].append((label, bench["stats"]["min"]))
    rows = ["| group | fastest | min (ms) | slower | min (ms) | ratio |", "|---|---|---:|---|---:|---:|"]
    for group, entries in sorted(groups.items()):
        (fastest, t_fastest), *slower = sorted(entries, key=lambda e: e[1])
        for slow, t_slow in slower:
            rows.append(f"| {group} | {fastest} | {t_fastest * 1e3:.2f} | {slow} | {t_slow * 1e3:.2f} | {t_slow / t_fastest:.2f}x |")
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python {sys.argv[0]} BENCHMARK_JSON  (the file make bench writes: benchmarks/results/cpu.json)")
    with open(sys.argv[1]) as f:
        report = json.load(f)
    info = report["machine_info"]
    print(f"{info['cpu']['brand_raw']}, {info['cpu']['count']} cores, python {info['python_version']}, "
          f"commit {report['commit_info']['id'][:7]}, {report['datetime'][:10]}\n")
    print("\n".join(ratio_rows(report)))
