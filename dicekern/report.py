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

from dicekern.snapshots import replace_file


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


def write_json(folder: Path, name: str, value: object) -> Path:
    return replace_file(folder / name, json.dumps(value, indent=2, default=str).encode())


def write_csv(folder: Path, name: str, header: list[str], rows: list[list]) -> Path:
    """A CSV whose floats keep 17 significant digits, so they read back bit for bit."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[format(v, ".17g") if isinstance(v, float) else v for v in row] for row in rows])
    return replace_file(folder / name, text.getvalue().encode())
