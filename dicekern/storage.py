"""Trajectories on disk: one safetensors file per round and a JSON manifest with checksums.

Every file is written to a temporary name, flushed to disk and renamed into place, the manifest
last: a crash mid-save leaves the previous manifest (whose checksums then reject any round file
that changed) or none, never a directory that loads as a different valid run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from dicekern.objective import LossFn, NodeObjective
from dicekern.optim import spec_from_dict
from dicekern.trajectory import Round, Trajectory

FORMAT = "dicekern-trajectory"
VERSION = 2
MANIFEST = "manifest.json"
STATE_PREFIX = "state."


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_trajectory(traj: Trajectory, directory: str | os.PathLike) -> None:
    """Write every recorded round of traj under directory (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = traj.objective.layout
    rounds = {}
    for step in traj.steps:
        rnd = traj[step]
        tensors = {"params": rnd.params}
        if rnd.has_batch:
            tensors.update(inputs=rnd.inputs, targets=rnd.targets, lr=rnd.lr, W=rnd.W)
        tensors.update({STATE_PREFIX + name: value for name, value in (rnd.state or {}).items()})
        tensors = {name: value.contiguous().cpu() for name, value in tensors.items()}
        data = save_tensors(tensors)
        name = f"round_{step:09d}.safetensors"
        _write_atomic(directory / name, data)
        rounds[str(step)] = {
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "parameters": [[name, list(shape)] for name, shape in zip(layout.names, layout.shapes)],
        "num_nodes": traj.num_nodes,
        "optimizer": traj.optimizer.to_dict(),
        "mix_state": traj.mix_state,
        "dtype": str(traj.dtype).removeprefix("torch."),
        "rounds": rounds,
    }
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


class RoundFiles(Mapping):
    """step -> Round, read from disk on first access and checked against the manifest.

    Keeps the newest ``cache_rounds`` rounds in memory, so a run longer than memory can be scored
    round by round.
    """

    def __init__(self, directory: Path, manifest: dict, device: torch.device | str, cache_rounds: int, stateless: bool):
        self._directory = directory
        self._stateless = stateless  # a stateless optimizer's rounds all carry the empty state
        self._entries = {int(step): entry for step, entry in manifest["rounds"].items()}
        self._device = torch.device(device)
        self._cache: OrderedDict[int, Round] = OrderedDict()
        self._cache_rounds = cache_rounds

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._entries))

    def __contains__(self, step: object) -> bool:
        return step in self._entries

    def __getitem__(self, step: int) -> Round:
        if step not in self._entries:
            raise KeyError(step)
        if step in self._cache:
            self._cache.move_to_end(step)
            return self._cache[step]
        rnd = self._read(step)
        self._cache[step] = rnd
        while len(self._cache) > self._cache_rounds:
            self._cache.popitem(last=False)
        return rnd

    def _read(self, step: int) -> Round:
        entry = self._entries[step]
        path = self._directory / entry["file"]
        where = f"round {step} ({path})"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ValueError(f"{where} cannot be read: {error}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{where} is corrupted or truncated: its checksum does not match the manifest")
        try:
            tensors = load_tensors(data)
        except Exception as error:  # safetensors raises its own error types on malformed files
            raise ValueError(f"{where} is not a valid safetensors file: {error}") from None
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
        if shapes != entry["shapes"] or dtypes != entry["dtypes"]:
            raise ValueError(f"{where} does not match the manifest: {shapes} {dtypes}, expected {entry['shapes']} {entry['dtypes']}")
        tensors = {k: v.to(self._device) for k, v in tensors.items()}
        state = {k.removeprefix(STATE_PREFIX): v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if "inputs" not in tensors:
            return Round(tensors["params"], state=state if state or self._stateless else None)
        return Round(tensors["params"], tensors["inputs"], tensors["targets"], tensors["lr"], tensors["W"], state)


def load_trajectory(
    directory: str | os.PathLike, model: nn.Module, loss_fn: LossFn, *, device: torch.device | str = "cpu", cache_rounds: int = 8
) -> Trajectory:
    """Open a saved trajectory lazily; rounds are read (and checked) when first used.

    Raises:
        ValueError: no or malformed manifest, a model whose parameters differ from the saved
            ones; on access, a missing, truncated, corrupted or mismatched round, named.
    """
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} holds no {MANIFEST}: not a saved trajectory (or its save did not finish)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{directory / MANIFEST} cannot be read: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{directory / MANIFEST} is not a {FORMAT} manifest of version {VERSION}")
    objective = NodeObjective(model, loss_fn)
    expected = [[name, list(shape)] for name, shape in zip(objective.layout.names, objective.layout.shapes)]
    if manifest["parameters"] != expected:
        raise ValueError(f"the model's parameters {expected} do not match the saved ones {manifest['parameters']}")
    if not manifest["rounds"]:
        raise ValueError(f"{directory / MANIFEST} lists no rounds")
    optimizer = spec_from_dict(manifest["optimizer"])
    rounds = RoundFiles(directory, manifest, device, cache_rounds, optimizer.stateless)
    return Trajectory(objective, rounds, optimizer, mix_state=manifest["mix_state"])
