"""Trajectories on disk: round trip, laziness, and a clear error for every kind of damage."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import cross_entropy, random_run


@pytest.fixture
def saved(tmp_path):
    run = random_run(4, rounds=3, seed=3)
    run.trajectory.save(tmp_path)
    return run, tmp_path


def load(run, path, **kwargs) -> dk.Trajectory:
    return dk.Trajectory.load(path, run.trajectory.objective.model, cross_entropy, **kwargs)


@pytest.mark.parametrize("optimizer", [None, dk.optim.Adam(weight_decay=0.1)], ids=["sgd", "adam"])
def test_round_trip_gives_identical_rounds_and_scores(optimizer, tmp_path) -> None:
    run = random_run(4, rounds=3, seed=3, optimizer=optimizer, lr=0.05, mix_state=optimizer is not None)
    run.trajectory.save(tmp_path)
    loaded = load(run, tmp_path)
    assert loaded.steps == run.trajectory.steps
    assert loaded.optimizer == run.trajectory.optimizer and loaded.mix_state == run.trajectory.mix_state
    for t in loaded.steps:
        a, b = loaded[t], run.trajectory[t]
        assert torch.equal(a.params, b.params) and a.has_batch == b.has_batch
        assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        if a.has_batch:
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and torch.equal(a.W, b.W)
            assert torch.equal(a.lr, b.lr)
    torch.testing.assert_close(dk.dice_e(loaded, 0, run.test, 2), dk.dice_e(run.trajectory, 0, run.test, 2), rtol=0, atol=0)
    assert loaded.verify().ok


def test_rounds_are_read_lazily_and_checked_one_by_one(saved) -> None:
    run, path = saved
    loaded = load(run, path, cache_rounds=1)
    (path / "round_000000002.safetensors").write_bytes(b"garbage")
    assert torch.equal(loaded[0].params, run.trajectory[0].params)  # round 2 was never read
    with pytest.raises(ValueError, match="round 2 .* corrupted or truncated"):
        loaded[2]


def test_truncated_corrupted_and_missing_rounds_are_named(saved) -> None:
    run, path = saved
    file = path / "round_000000001.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="round 1 .* corrupted or truncated"):
        dk.dice_e(load(run, path), 0, run.test, 2)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    file.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="round 1 .* checksum"):
        load(run, path)[1]
    file.unlink()
    with pytest.raises(ValueError, match="round 1 .* cannot be read"):
        load(run, path)[1]


def test_manifest_problems(saved) -> None:
    run, path = saved
    with pytest.raises(ValueError, match="do not match the saved ones"):
        dk.Trajectory.load(path, nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)), cross_entropy)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["rounds"]["0"]["shapes"]["params"] = [5, 31]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="round 0 .* checksum|round 0 .* does not match"):
        load(run, path)[0]
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json cannot be read"):
        load(run, path)
    with pytest.raises(ValueError, match="holds no manifest.json"):
        load(run, path / "elsewhere")


def test_a_crash_mid_save_never_loads_as_another_valid_run(saved, monkeypatch) -> None:
    """Overwrite a saved run with another, crashing after two round files: old rounds or errors, never new data."""
    run, path = saved
    other = random_run(4, rounds=3, seed=99)
    real_replace, calls = os.replace, []

    def crash_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_third)
    with pytest.raises(OSError):
        other.trajectory.save(path)
    monkeypatch.undo()
    loaded = load(run, path)
    for t in loaded.steps:
        try:
            rnd = loaded[t]
        except ValueError as error:
            assert "checksum" in str(error)
            continue
        assert torch.equal(rnd.params, run.trajectory[t].params)
    fresh = path / "fresh"
    monkeypatch.setattr(os, "replace", crash_on_third)
    calls.clear()
    with pytest.raises(OSError):
        other.trajectory.save(fresh)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="holds no manifest.json"):
        load(run, fresh)
