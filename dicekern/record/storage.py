"""Trajectories on disk: one safetensors file per round and a JSON manifest with their checksums,
inside a crash-safe folder (``dicekern.core.snapshots``).

A save is published whole or not at all. A load trusts nothing it reads: the manifest is
checksummed by the folder's pointer and validated field by field, file names must be plain names
of regular files inside the folder (no links, sizes bounded by the declared shapes), and every
round goes through the same checks as ``Recorder.record`` when it is first read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from dicekern.core.checks import check_int
from dicekern.record.description import RunDescription, check_describes, described
from dicekern.curvature.protocol import LossFn
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.core.optim import OptimizerSpec, spec_from_dict
from dicekern.core.snapshots import open_snapshot, parse_json_object, publish, read_file, write_file
from dicekern.record.rounds import BatchLayout, LazyRounds, Round, check_round



class RecordedRun(Protocol):
    """What storage reads of a run to save it (``dk.Trajectory`` is one)."""

    objective: TorchFuncBackend
    optimizer: OptimizerSpec
    mix_state: bool
    mix_buffers: bool
    description: RunDescription | None

    @property
    def steps(self) -> tuple[int, ...]: ...
    @property
    def num_nodes(self) -> int: ...
    @property
    def dtype(self) -> torch.dtype: ...
    def __getitem__(self, step: int) -> Round: ...

FORMAT = "dicekern-trajectory"
VERSION = 5  # 5 added BatchNorm buffers and mix_buffers, 4 the run's description; versions 3 and 4 still load
READABLE_VERSIONS = (3, 4, 5)
MANIFEST = "manifest.json"
STATE_PREFIX = "state."
BUFFERS = ("buffers.running", "buffers.counters")  # a BatchNorm model's running statistics (N, D_b) and counters (N, L)
MANIFEST_MAX_BYTES = 1 << 30
HEADER_MAX_BYTES = 1 << 20  # a round file's safetensors header, on top of its declared tensor bytes
DTYPES = {name: getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
FLOATS = ("float16", "bfloat16", "float32", "float64")
BATCH = ("inputs", "targets", "lr", "W")


def round_file(step: int) -> str:
    return f"round_{step:09d}.safetensors"


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def write_run(traj: RecordedRun, folder: Path, description: RunDescription | None = None) -> str:
    """Write every round of traj and its manifest (with description, default traj's) into the
    (new, empty) folder; returns the manifest's name."""
    description = description or traj.description
    layout = traj.objective.layout
    rounds = {}
    total_nodes = traj.num_nodes
    for step in traj.steps:
        rnd = traj[step]
        tensors = {"params": rnd.params}
        if rnd.has_batch:
            tensors.update(inputs=rnd.inputs, targets=rnd.targets, lr=rnd.lr, W=rnd.W)
            total_nodes = rnd.W.shape[0]
        tensors.update({STATE_PREFIX + name: value for name, value in (rnd.state or {}).items()})
        if rnd.buffers is not None:
            tensors.update(zip(BUFFERS, rnd.buffers))
        tensors = {name: value.contiguous().cpu() for name, value in tensors.items()}
        data = save_tensors(tensors)
        write_file(folder, round_file(step), data)
        rounds[str(step)] = {
            "file": round_file(step),
            "sha256": hashlib.sha256(data).hexdigest(),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "dtypes": {k: _dtype_name(v) for k, v in tensors.items()},
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "parameters": [[name, list(shape)] for name, shape in zip(layout.names, layout.shapes)],
        "num_nodes": traj.num_nodes,
        "total_nodes": total_nodes,
        "dtype": str(traj.dtype).removeprefix("torch."),
        "optimizer": traj.optimizer.to_dict(),
        "mix_state": traj.mix_state,
        "mix_buffers": traj.mix_buffers,
        "description": None if description is None else description.to_dict(),
        "fingerprint": None if description is None else _fingerprint(traj),
        "rounds": rounds,
    }
    write_file(folder, MANIFEST, json.dumps(manifest, indent=1).encode())
    return MANIFEST


def _fingerprint(traj: RecordedRun) -> dict | None:
    """Node 0's outputs on the first sample of the first round with a batch: what a rebuilt model
    must reproduce on load, so that a factory changed since the save is caught."""
    step = next((t for t in traj.steps if traj[t].has_batch), None)
    if step is None:
        return None
    rnd = traj[step]
    with torch.no_grad():
        outputs = traj.objective.outputs(rnd.params[0], rnd.inputs[0, :1])
    return {"step": step, "outputs": [float(v) for v in outputs.flatten()]}


def _check_fingerprint(fingerprint: object, run: SavedRun, where: str) -> None:
    """The rebuilt model reproduces the saved outputs (within float32 rounding)."""
    if not isinstance(fingerprint, dict) or set(fingerprint) != {"step", "outputs"} or fingerprint["step"] not in run.rounds \
            or not isinstance(fingerprint["outputs"], list) or not all(isinstance(v, float) for v in fingerprint["outputs"]):
        raise ValueError(f"{where}: field 'fingerprint' must be {{'step': a recorded round, 'outputs': [numbers]}}")
    rnd = run.rounds[fingerprint["step"]]
    if not rnd.has_batch:
        raise ValueError(f"{where}: field 'fingerprint' names round {fingerprint['step']}, which has no batch")
    with torch.no_grad():
        outputs = run.objective.outputs(rnd.params[0], rnd.inputs[0, :1]).flatten()
    expected = torch.tensor(fingerprint["outputs"], dtype=outputs.dtype, device=outputs.device)
    if outputs.shape != expected.shape or not torch.allclose(outputs, expected, rtol=1e-5, atol=1e-5 * max(expected.abs().max().item(), 1.0)):
        raise ValueError(f"{where}: the model that {run.description.model!r} builds now computes other outputs than the model the run was saved "
                         f"with (node 0, first sample of round {fingerprint['step']}): the factory changed since the save")


def save_trajectory(traj: RecordedRun, directory: str | os.PathLike, description: RunDescription | None = None) -> None:
    """Publish every recorded round of traj as the new content of directory (created if missing),
    with description (checked against traj's model, loss and first batch) or traj's own."""
    if not traj.steps:
        raise ValueError("the trajectory is empty: there is nothing to save")
    if description is not None:
        description = described(description, traj.objective)
        first = next((traj[t] for t in traj.steps if traj[t].has_batch), None)
        if first is not None:
            check_describes(description, traj.objective, first.params[0], first.inputs[0])
    publish(directory, lambda folder: write_run(traj, folder, description))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the run's description and every round's file entry."""

    optimizer: OptimizerSpec
    mix_state: bool
    mix_buffers: bool
    num_nodes: int
    total_nodes: int
    dtype: torch.dtype
    rounds: dict[int, dict]


def parse_description(manifest: dict, where: str) -> RunDescription | None:
    """The description in a manifest's fields (None when saved without one), after its format and version."""
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{where} is not a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}")
    fields = manifest.get("description")
    return None if fields is None else RunDescription.from_dict(fields, where)


def parse_manifest(manifest: dict, where: str, objective: TorchFuncBackend) -> Manifest:
    """Every other field of a manifest's JSON checked, after ``parse_description``; errors are
    ValueErrors that name where and the field."""

    def field(name: str, kind: type | tuple[type, ...]):
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise ValueError(f"{where}: field {name!r} is missing or not a {getattr(kind, '__name__', kind)}")
        return value

    expected = [[name, list(shape)] for name, shape in zip(objective.layout.names, objective.layout.shapes)]
    if field("parameters", list) != expected:
        raise ValueError(f"{where}: the model's parameters {expected} do not match the saved ones {manifest['parameters']}")
    num_nodes, total_nodes = field("num_nodes", int), field("total_nodes", int)
    if num_nodes < 1 or total_nodes < num_nodes:
        raise ValueError(f"{where}: fields 'num_nodes' {num_nodes} and 'total_nodes' {total_nodes} must satisfy 1 <= num_nodes <= total_nodes")
    if field("dtype", str) not in FLOATS:
        raise ValueError(f"{where}: field 'dtype' must be one of {list(FLOATS)}, got {manifest['dtype']!r}")
    try:
        optimizer = spec_from_dict(field("optimizer", dict))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: field 'optimizer': {error}") from None
    mix_state = field("mix_state", bool)
    mix_buffers = field("mix_buffers", bool) if manifest["version"] >= 5 else False
    entries = field("rounds", dict)
    if not entries:
        raise ValueError(f"{where}: field 'rounds' lists no rounds")
    dtype = DTYPES[manifest["dtype"]]
    rounds, batch_layouts = {}, set()
    for key, entry in entries.items():
        if not re.fullmatch(r"-?[0-9]+", key) or str(int(key)) != key:
            raise ValueError(f"{where}: round key {key!r} is not a canonical integer")
        step = int(key)
        _check_entry(entry, step, f"{where}: round {key}", optimizer, num_nodes, total_nodes, objective, manifest["dtype"])
        if _has_batch(entry):
            batch_layouts.add(tuple((tuple(entry["shapes"][k][2:]), entry["dtypes"][k]) for k in ("inputs", "targets")))
        rounds[step] = entry
    if len(batch_layouts) > 1:
        raise ValueError(f"{where}: the rounds' batches differ in per-sample shape or dtype: {sorted(batch_layouts)}")
    return Manifest(optimizer, mix_state, mix_buffers, num_nodes, total_nodes, dtype, rounds)


def _has_batch(entry: dict) -> bool:
    """Whether a round's manifest entry (its shapes already checked) holds a batch: inputs, targets, lr, W."""
    return "inputs" in entry["shapes"]


def _check_entry(entry: object, step: int, where: str, optimizer: OptimizerSpec, n: int, total: int, objective: TorchFuncBackend,
                 dtype: str) -> None:
    """One round's entry: its file name, checksum, and tensors of the shapes and dtypes the run implies."""
    if not isinstance(entry, dict) or set(entry) != {"file", "sha256", "shapes", "dtypes"}:
        raise ValueError(f"{where}: the entry must have exactly the fields file, sha256, shapes, dtypes")
    if entry["file"] != round_file(step):
        raise ValueError(f"{where}: field 'file' must be {round_file(step)!r}, got {entry['file']!r}")
    if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise ValueError(f"{where}: field 'sha256' must be 64 hex digits")
    shapes, dtypes = entry["shapes"], entry["dtypes"]
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict) or set(shapes) != set(dtypes):
        raise ValueError(f"{where}: fields 'shapes' and 'dtypes' must name the same tensors")
    state = {STATE_PREFIX + k for k in (*optimizer.state_blocks, *optimizer.state_counters)}
    buffers = set(BUFFERS) if objective.buffer_layout else set()
    names = set(shapes) - {"params"} - set(BATCH) - buffers
    has_batch = _has_batch(entry)
    if "params" not in shapes or (has_batch and not set(BATCH) <= set(shapes)) or (not has_batch and set(BATCH) & set(shapes)) or not names <= state:
        raise ValueError(f"{where}: tensors {sorted(shapes)} are not params, [inputs, targets, lr, W] and the state of {optimizer}")
    if not buffers <= set(shapes):
        raise ValueError(f"{where}: the model has BatchNorm layers, so every round must hold {sorted(buffers)}; tensors are {sorted(shapes)}")
    if has_batch and names != state and not optimizer.stateless:
        raise ValueError(f"{where}: a round with a batch must hold the optimizer state {sorted(state)}")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{where}: field 'shapes.{name}' must be a list of sizes")
        if dtypes[name] not in DTYPES:
            raise ValueError(f"{where}: field 'dtypes.{name}' {dtypes[name]!r} is not a tensor dtype")
    dim = objective.layout.dim
    expect = {"params": ([n, dim], dtype), "lr": ([n], dtype), "W": ([total, total], dtype)}
    if buffers:
        expect.update({BUFFERS[0]: ([n, objective.buffer_layout.dim], dtype), BUFFERS[1]: ([n, len(objective.buffer_layout.modules)], "int64")})
    for name in optimizer.state_blocks:
        expect[STATE_PREFIX + name] = ([n, dim], dtype)
    for name in optimizer.state_counters:
        expect[STATE_PREFIX + name] = ([n], "bool" if name == "has_buffer" else "int64")
    for name, (shape, kind) in expect.items():
        if name in shapes and (shapes[name] != shape or dtypes[name] != kind):
            raise ValueError(f"{where}: {name} is {shapes[name]} {dtypes[name]}, expected {shape} {kind}")
    if has_batch:
        inputs, targets = shapes["inputs"], shapes["targets"]
        if len(inputs) < 2 or inputs[0] != n or targets[:2] != inputs[:2] or dtypes["inputs"] != dtype:
            raise ValueError(f"{where}: inputs {inputs} {dtypes['inputs']} and targets {targets} must be (N={n}, B, ...), inputs in {dtype}")


class RoundFiles(LazyRounds):
    """step -> Round, read from disk on first access, checked against the manifest and through the
    checks of ``Recorder.record``; the newest ``cache_rounds`` are kept (see LazyRounds)."""

    def __init__(self, root: Path, parts: tuple[str, ...], manifest: Manifest, objective: TorchFuncBackend, device: torch.device, cache_rounds: int):
        super().__init__(manifest.rounds, self._read, cache_rounds, has_batch=lambda step: _has_batch(manifest.rounds[step]))
        self._root, self._parts, self._manifest, self._objective = root, parts, manifest, objective
        self._device = device
        self._layout: BatchLayout | None = None

    def _read(self, step: int) -> Round:
        entry = self._manifest.rounds[step]
        path = self._root.joinpath(*self._parts, entry["file"])
        where = f"round {step} ({path})"
        declared = sum(prod(shape) * DTYPES[entry["dtypes"][name]].itemsize for name, shape in entry["shapes"].items())
        data = read_file(self._root, (*self._parts, entry["file"]), declared + HEADER_MAX_BYTES)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{where} is corrupted or truncated: its checksum does not match the manifest")
        try:
            tensors = load_tensors(data)
        except Exception as error:  # safetensors raises its own error types on malformed files
            raise ValueError(f"{where} is not a valid safetensors file: {error}") from None
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        dtypes = {k: _dtype_name(v) for k, v in tensors.items()}
        if shapes != entry["shapes"] or dtypes != entry["dtypes"]:
            raise ValueError(f"{where} does not match the manifest: {shapes} {dtypes}, expected {entry['shapes']} {entry['dtypes']}")
        t = {k: v.to(self._device) for k, v in tensors.items()}
        state = {k.removeprefix(STATE_PREFIX): v for k, v in t.items() if k.startswith(STATE_PREFIX)} or None
        layout = self._objective.buffer_layout
        buffers = layout.unflatten(*(t[name] for name in BUFFERS)) if layout else None
        rnd = check_round(self._manifest.optimizer, t["params"], t.get("inputs"), t.get("targets"), t.get("lr"), t.get("W"), state,
                          total_nodes=self._manifest.total_nodes, where=where, buffers=buffers, buffer_layout=layout)
        if rnd.has_batch:
            self._layout = self._layout or BatchLayout.of(self._objective, rnd.params[0], rnd.inputs[0], rnd.targets[0])
            self._layout.check(self._objective.loss_fn, rnd.inputs, rnd.targets, lead=2, what=where)
        return rnd


@dataclass(frozen=True)
class SavedRun:
    """A saved run, opened: what a Trajectory is built from (its rounds are read lazily)."""

    objective: TorchFuncBackend
    rounds: RoundFiles
    optimizer: OptimizerSpec
    mix_state: bool
    mix_buffers: bool
    description: RunDescription | None
    saved_as: dict | None = None  # {"directory", "snapshot", "manifest_sha256"} of the save it was opened from


def read_run(
    root: Path, parts: tuple[str, ...], manifest_bytes: bytes, model: nn.Module | None, loss_fn: LossFn | None, device, cache_rounds: int
) -> SavedRun:
    """The run whose manifest (already read and checksummed) sits at root/parts; model and loss_fn
    None are rebuilt from its description. The run keeps the description only when what it
    describes was not overridden."""
    where = str(root.joinpath(*parts, MANIFEST))
    fields = parse_json_object(manifest_bytes, where)
    description = parse_description(fields, where)
    if model is None or loss_fn is None:
        if description is None:
            raise ValueError(f"{where}: the run was saved without a dk.RunDescription; pass the model and loss_fn it was recorded with")
        if description.loss is None and loss_fn is None:
            raise ValueError(f"{where}: the run's description names no loss; pass the loss_fn it was recorded with")
    overridden = model is not None or (loss_fn is not None and description is not None and description.loss is not None)
    model = description.build_model(DTYPES.get(fields.get("dtype"), torch.float32)) if model is None else model
    loss_fn = description.build_loss() if loss_fn is None else loss_fn
    description = None if overridden else description
    objective = TorchFuncBackend(model, loss_fn)
    manifest = parse_manifest(fields, where, objective)
    rounds = RoundFiles(root, parts, manifest, objective, torch.device(device), cache_rounds)
    run = SavedRun(objective, rounds, manifest.optimizer, manifest.mix_state, manifest.mix_buffers, description)
    if description is not None and fields.get("fingerprint") is not None:
        _check_fingerprint(fields["fingerprint"], run, where)
    return run


def open_run(
    directory: str | os.PathLike, model: nn.Module | None = None, loss_fn: LossFn | None = None, *,
    device: torch.device | str = "cpu", cache_rounds: int = 8,
) -> SavedRun:
    """Open the run saved in directory; rounds are read (and checked) when first used. model and
    loss_fn default to those the run's description rebuilds.

    Raises:
        ValueError: nothing saved, a malformed manifest, no description to rebuild a missing model
            or loss, a factory that cannot be imported, a model whose parameters differ from the
            saved ones; on access, a missing, truncated, corrupted, mismatched or invalid round, named.
    """
    cache_rounds = check_int("cache_rounds", cache_rounds, minimum=1)
    directory = Path(directory)
    snapshot, manifest = open_snapshot(directory, what="trajectory", index=MANIFEST)
    run = read_run(directory, (snapshot.name,), manifest, model, loss_fn, device, cache_rounds)
    saved_as = {"directory": str(directory.resolve()), "snapshot": snapshot.name, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    return replace(run, saved_as=saved_as)


TEST_SET_KEYS = {"inputs", "targets"}


def read_test_set(path: str | os.PathLike, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    """A test set from a .safetensors or .npz file holding exactly ``inputs`` (M, ...) and ``targets``
    (M, ...): inputs (floating point) and floating targets in dtype, integer targets as int64.
    Neither format can hold code: .npz is read with allow_pickle=False. Returns ((inputs,
    targets), the sha256 of the bytes they were parsed from).

    Raises:
        ValueError: a missing or unreadable file, another format, other arrays, integer inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"test file {path} does not exist or is not a file")
    if path.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"test file {path} must be a .safetensors or .npz file")
    data = path.read_bytes()  # read once: the sha256 returned is of the bytes parsed
    try:
        if path.suffix == ".safetensors":
            arrays = load_tensors(data)
        else:
            import numpy as np

            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: torch.from_numpy(npz[name].copy()) for name in npz.files}
    except Exception as error:  # safetensors and numpy raise their own error types on malformed files
        raise ValueError(f"test file {path} cannot be read: {error}") from None
    if set(arrays) != TEST_SET_KEYS:
        raise ValueError(f"test file {path} must hold exactly the arrays {sorted(TEST_SET_KEYS)}, found {sorted(arrays)}")
    inputs, targets = arrays["inputs"], arrays["targets"]
    if not inputs.is_floating_point():
        raise ValueError(f"test file {path}: inputs must be floating point, got {inputs.dtype}")
    if targets.dtype == torch.bool:
        raise ValueError(f"test file {path}: targets must be numbers (class indices or values), got bool")
    targets = targets.to(dtype) if targets.is_floating_point() else targets.to(torch.int64)
    return (inputs.to(dtype), targets), hashlib.sha256(data).hexdigest()
