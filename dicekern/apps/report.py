"""What the command line and the demo write beside their pictures: JSON and CSV, each replaced
atomically, and the provenance every results.json carries."""

from __future__ import annotations

import csv
import io
import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from dicekern.record.description import RunDescription
from dicekern.core.optim import OptimizerSpec
from dicekern.engine.options import DiceOptions
from dicekern.core.snapshots import replace_file


def provenance(command_line: list[str]) -> dict:
    """The versions that produced a result and the command line that asked for it."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"versions": {"dicekern": version("dicekern"), "torch": torch.__version__, "triton": version("triton"),
                         "numpy": np.__version__, "python": platform.python_version()},
            "command_line": list(command_line)}


def describe_optimizer(spec: OptimizerSpec) -> str:
    """A spec in a few words for captions: its kind and the settings that differ from the kind's defaults."""
    fields, defaults = spec.to_dict(), type(spec)().to_dict()
    changed = [f"{name}={value}" for name, value in fields.items() if name != "kind" and value != defaults.get(name)]
    return " ".join([fields["kind"], *changed])


def run_metadata(
    *, run: str, num_nodes: int, batch_size: int | None, test_points: int, dtype: torch.dtype, topology: str | None,
    optimizer: OptimizerSpec, seed: object, description: RunDescription | None, command_line: list[str],
    options: DiceOptions = DiceOptions(), model: str | None = None, **query,
) -> dict:
    """What every results.json says about the run, the query (step or steps, hops, options, ...) and its provenance.

    model: the name of the bundled run's model in ``dk.zoo.MODELS`` ("mlp", "resnet-gn", ...); None
    for a saved run, whose description names its factory.
    """
    return {
        "run": run, "model": model, **query, "options": options.to_dict(), "N": num_nodes, "B": batch_size, "M": test_points,
        "dtype": str(dtype).removeprefix("torch."), "topology": topology, "optimizer": optimizer.to_dict(), "seed": seed,
        "description": None if description is None else description.to_dict(), **provenance(command_line),
    }


def write_json(folder: Path, name: str, value: object) -> Path:
    """folder/name holds value as JSON (undefined numbers must already be None: no NaN is written)."""
    return replace_file(folder / name, json.dumps(value, indent=2, default=str, allow_nan=False).encode())


def write_csv(folder: Path, name: str, header: list[str], rows: list[list]) -> Path:
    """A CSV whose floats keep 17 significant digits, so they read back bit for bit."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[format(v, ".17g") if isinstance(v, float) else v for v in row] for row in rows])
    return replace_file(folder / name, text.getvalue().encode())
