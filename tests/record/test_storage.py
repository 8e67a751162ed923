"""Trajectories on disk: round trip, laziness, and a clear error for every kind of damage, forgery
or escape from the folder."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

import dicekern as dk
from conftest import cross_entropy, random_run, republish, snapshot


@pytest.fixture
def saved(tmp_path):
    run = random_run(4, rounds=3, seed=3)
    run.trajectory.save(tmp_path / "run")
    return run, tmp_path / "run"


def load(run, path, **kwargs) -> dk.Trajectory:
    return dk.Trajectory.load(path, run.trajectory.objective.model, cross_entropy, **kwargs)


def forge_round(path, step: int, change) -> None:
    """Rewrite a round file with change(tensors) and every checksum that covers it."""
    file = snapshot(path) / f"round_{step:09d}.safetensors"
    tensors = change(dict(load_tensors(file.read_bytes())))
    data = save_tensors(tensors)
    file.write_bytes(data)
    manifest = json.loads((snapshot(path) / "manifest.json").read_text())
    entry = manifest["rounds"][str(step)]
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
    republish(path, manifest)


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


def test_saving_again_replaces_the_run_and_leaves_nothing_else(saved) -> None:
    run, path = saved
    other = random_run(4, rounds=2, seed=8)
    other.trajectory.save(path)
    assert load(run, path).steps == (0, 1, 2)
    assert sorted(p.name for p in path.iterdir() if p.name != ".lock") == ["CURRENT", snapshot(path).name]


def test_rounds_are_read_lazily_and_checked_one_by_one(saved) -> None:
    run, path = saved
    loaded = load(run, path, cache_rounds=1)
    (snapshot(path) / "round_000000002.safetensors").write_bytes(b"garbage")
    assert torch.equal(loaded[0].params, run.trajectory[0].params)  # round 2 was never read
    with pytest.raises(ValueError, match="round 2 .* corrupted or truncated"):
        loaded[2]


def test_truncated_corrupted_and_missing_rounds_are_named(saved) -> None:
    run, path = saved
    file = snapshot(path) / "round_000000001.safetensors"
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
    with pytest.raises(ValueError, match="round_000000001.safetensors cannot be read"):
        load(run, path)[1]


def test_the_manifest_is_covered_by_the_pointer(saved, tmp_path) -> None:
    run, path = saved
    with pytest.raises(ValueError, match="do not match the saved ones"):
        dk.Trajectory.load(path, nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)), cross_entropy)
    manifest = snapshot(path) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_nodes": 4', '"num_nodes": 4 '))
    with pytest.raises(ValueError, match="does not match the checksum in .*CURRENT: it was changed after the save"):
        load(run, path)
    with pytest.raises(ValueError, match="elsewhere holds no saved trajectory: it is not a folder"):
        load(run, tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no saved trajectory .*CURRENT is missing"):
        load(run, tmp_path / "empty")


FORGED = [
    pytest.param(lambda t: {**t, "W": t["W"] * 1.5}, "W is not row-stochastic", id="W-rows"),
    pytest.param(lambda t: {**t, "W": torch.eye(4, dtype=torch.float64) * 2 - t["W"]}, "W has negative entries", id="W-negative"),
    pytest.param(lambda t: {**t, "W": t["W"].masked_fill(t["W"] > 0.3, float("nan"))}, "W contains .* NaN", id="W-nan"),
    pytest.param(lambda t: {**t, "params": t["params"].masked_fill(t["params"] > 1, float("nan"))}, "params contains .* NaN", id="params-nan"),
    pytest.param(lambda t: {**t, "inputs": t["inputs"].masked_fill(t["inputs"] > 1, float("inf"))}, "inputs contains .* infinite", id="inputs-inf"),
    pytest.param(lambda t: {**t, "lr": -t["lr"]}, "lr must be non-negative and finite", id="lr-negative"),
    pytest.param(lambda t: {**t, "lr": t["lr"] * float("nan")}, "lr must be non-negative and finite", id="lr-nan"),
    pytest.param(lambda t: {**t, "targets": t["targets"].double()}, "the rounds' batches differ in per-sample shape or dtype", id="targets-dtype"),
]


@pytest.mark.parametrize("change, match", FORGED)
def test_a_round_forged_with_matching_checksums_is_checked_like_record(saved, change, match) -> None:
    run, path = saved
    forge_round(path, 1, change)
    with pytest.raises(ValueError, match=match):
        dk.dice_e(load(run, path), 0, run.test, 2)


def test_labels_out_of_range_are_named_for_dk_losses(tmp_path) -> None:
    rec = dk.Recorder(nn.Linear(3, 4), dk.losses.softmax_cross_entropy, replay_check="off")
    p = {"weight": torch.zeros(2, 4, 3), "bias": torch.zeros(2, 4)}
    rec.record(0, p, torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long), lr=0.1, W=dk.topology.ring(2))
    rec.record(1, p)
    rec.trajectory().save(tmp_path)
    forge_round(tmp_path, 0, lambda t: {**t, "targets": t["targets"] + 4})
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 4\)"):
        dk.Trajectory.load(tmp_path, nn.Linear(3, 4), dk.losses.softmax_cross_entropy)[0]


MALFORMED = [
    pytest.param(lambda m: m.pop("rounds"), "field 'rounds' is missing", id="no-rounds"),
    pytest.param(lambda m: m.update(rounds={}), "field 'rounds' lists no rounds", id="empty-rounds"),
    pytest.param(lambda m: m.update(num_nodes="4"), "field 'num_nodes' is missing or not a int", id="num-nodes-str"),
    pytest.param(lambda m: m.update(num_nodes=5), "fields 'num_nodes' 5 and 'total_nodes' 4 must satisfy", id="num-nodes-wrong"),
    pytest.param(lambda m: m.update(num_nodes=3, total_nodes=4), "params is \\[4, 31\\] float64, expected \\[3, 31\\]", id="num-nodes-fewer"),
    pytest.param(lambda m: m.update(dtype="complex64"), "field 'dtype' must be one of", id="dtype"),
    pytest.param(lambda m: m.update(dtype="float32"), "params is \\[4, 31\\] float64, expected \\[4, 31\\] float32", id="dtype-mismatch"),
    pytest.param(lambda m: m.update(optimizer={"kind": "rmsprop"}), "field 'optimizer'", id="optimizer"),
    pytest.param(lambda m: m.update(mix_state="no"), "field 'mix_state'", id="mix-state"),
    pytest.param(lambda m: m["rounds"].update({"01": m["rounds"]["1"]}), "round key '01' is not a canonical integer", id="key-01"),
    pytest.param(lambda m: m["rounds"]["1"].update(file="../../x"), "field 'file' must be 'round_000000001.safetensors'", id="traversal"),
    pytest.param(lambda m: m["rounds"]["1"].update(file="/etc/passwd"), "field 'file' must be", id="absolute"),
    pytest.param(lambda m: m["rounds"]["1"].update(sha256=7), "field 'sha256' must be 64 hex digits", id="sha"),
    pytest.param(lambda m: m["rounds"]["1"]["shapes"].update(params=[4, 30]), "params is \\[4, 30\\]", id="shape"),
    pytest.param(lambda m: m["rounds"]["1"]["shapes"].pop("W"), "fields 'shapes' and 'dtypes' must name the same tensors", id="missing-W"),
    pytest.param(lambda m: m["rounds"]["1"]["dtypes"].update(inputs="int64"), "inputs .* must be \\(N=4, B, ...\\), inputs in float64", id="int-inputs"),
]


@pytest.mark.parametrize("change, match", MALFORMED)
def test_every_malformed_manifest_field_is_named(saved, change, match) -> None:
    run, path = saved
    manifest = json.loads((snapshot(path) / "manifest.json").read_text())
    change(manifest)
    republish(path, manifest)
    with pytest.raises(ValueError, match=match) as error:
        loaded = load(run, path)
        loaded[1]
    assert "manifest.json" in str(error.value) or "round 1" in str(error.value)


def test_reads_never_leave_the_folder(saved, tmp_path) -> None:
    """Links in place of the manifest, a round or the snapshot folder, a FIFO and /dev/zero are refused, and
    the message does not depend on whether the outside target exists."""
    run, path = saved
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((snapshot(path) / "round_000000001.safetensors").read_bytes())
    round_file = snapshot(path) / "round_000000001.safetensors"
    messages = []
    for target in (outside, tmp_path / "missing", "/dev/zero"):
        round_file.unlink()
        round_file.symlink_to(target)
        with pytest.raises(ValueError, match="is a symbolic link") as error:
            load(run, path)[1]
        messages.append(str(error.value))
    assert len(set(messages)) == 1
    round_file.unlink()
    os.mkfifo(round_file)
    with pytest.raises(ValueError, match="is not a regular file"):
        load(run, path)[1]
    manifest = snapshot(path) / "manifest.json"
    (tmp_path / "manifest.json").write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="is a symbolic link"):
        load(run, path)
    real = snapshot(path)
    moved = tmp_path / "moved"
    real.rename(moved)
    real.symlink_to(moved)
    with pytest.raises(ValueError, match="a component is not a folder \\(or is a link\\)|symbolic link"):
        load(run, path)


def test_saves_never_write_through_links(tmp_path) -> None:
    """Links planted at the old temporary names and at the pointer itself: the targets outside stay untouched."""
    run = random_run(3, rounds=2, seed=1)
    path = tmp_path / "run"
    path.mkdir()
    victims = []
    for name in ("manifest.json.tmp", "round_000000000.safetensors.tmp", "CURRENT"):
        victim = tmp_path / f"victim-{len(victims)}"
        victim.write_text("keep me")
        (path / name).symlink_to(victim)
        victims.append(victim)
    run.trajectory.save(path)
    assert all(v.read_text() == "keep me" for v in victims)
    assert load(run, path).steps == (0, 1, 2)


def test_concurrent_saves_into_one_folder_leave_one_whole_run(tmp_path) -> None:
    runs = [random_run(3, rounds=2 + i, seed=i) for i in range(4)]
    threads = [threading.Thread(target=r.trajectory.save, args=(tmp_path,)) for r in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = load(runs[0], tmp_path)
    winner = next(r for r in runs if r.trajectory.steps == loaded.steps)
    for t in loaded.steps:
        assert torch.equal(loaded[t].params, winner.trajectory[t].params)


def test_bad_save_and_load_arguments(saved, tmp_path) -> None:
    run, path = saved
    with pytest.raises(ValueError, match="cache_rounds must be >= 1"):
        load(run, path, cache_rounds=-1)
    empty = dk.Recorder(run.trajectory.objective.model, cross_entropy).trajectory()
    with pytest.raises(ValueError, match="the trajectory is empty"):
        empty.save(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run.trajectory.save(tmp_path / "file")
