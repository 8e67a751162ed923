"""Self-describing saved runs (dk.RunDescription): a saved run rebuilds its model and loss by import
path, and descriptions that do not describe the run, or name anything but a marked factory, are refused.
The command line on such runs: tests/apps/test_cli_saved_runs.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dicekern as dk
import run_factories
from conftest import DESCRIPTION, MLP, TOL, assert_close, random_run, republish, snapshot


def test_a_described_run_loads_without_its_model(described_saved) -> None:
    run, path, _ = described_saved
    loaded = dk.Trajectory.load(path)
    assert loaded.description == DESCRIPTION.naming(dk.losses.softmax_cross_entropy)
    assert loaded.description.loss == "softmax_cross_entropy" and loaded.description.metadata["seed"] == 5
    assert loaded.objective.loss_fn == dk.losses.softmax_cross_entropy and loaded.optimizer == run.trajectory.optimizer
    assert loaded.objective.layout.names == run.trajectory.objective.layout.names
    for step in (0, 2):
        torch.testing.assert_close(dk.dice_e(loaded, step, run.test, 3), dk.dice_e(run.trajectory, step, run.test, 3), rtol=0, atol=0)
    # an explicit model wins, and the loaded run then no longer claims the description
    explicit = dk.Trajectory.load(path, run_factories.tanh_mlp(**MLP), dk.losses.softmax_cross_entropy)
    assert explicit.description is None and torch.equal(explicit[1].params, loaded[1].params)


def test_a_loss_by_import_path_and_metadata_survive_the_save(tmp_path) -> None:
    description = dk.RunDescription("run_factories:tanh_mlp", MLP, loss="run_factories:halved_cross_entropy", metadata={"note": "x"})
    run = random_run(4, rounds=3, seed=2, model=run_factories.tanh_mlp(**MLP), loss_fn=run_factories.halved_cross_entropy)
    run.trajectory.save(tmp_path, description=description)
    loaded = dk.Trajectory.load(tmp_path)
    assert loaded.objective.loss_fn is run_factories.halved_cross_entropy and loaded.description == description
    assert_close(dk.dice_e(loaded, 0, run.test, 2), dk.dice_e(run.trajectory, 0, run.test, 2), TOL[torch.float64].same)


def test_descriptions_that_do_not_describe_the_run_are_refused(tmp_path) -> None:
    model = run_factories.tanh_mlp(**MLP)
    with pytest.raises(ValueError, match="builds parameters .* but the run's model has"):
        dk.Recorder(model, dk.losses.softmax_cross_entropy, description=dk.RunDescription("run_factories:tanh_mlp", dict(MLP, hidden=5)))
    with pytest.raises(ValueError, match="outputs differ from the run's model on its first batch"):
        random_run(4, rounds=2, seed=1, model=model, loss_fn=dk.losses.softmax_cross_entropy,
                   description=dk.RunDescription("run_factories:relu_mlp", MLP))
    with pytest.raises(ValueError, match="names the loss 'squared_error', which is not the run's loss"):
        dk.Recorder(model, dk.losses.softmax_cross_entropy, description=dk.RunDescription("run_factories:tanh_mlp", MLP, loss="squared_error"))
    run = random_run(4, rounds=2, seed=1, model=model, loss_fn=dk.losses.softmax_cross_entropy)
    with pytest.raises(ValueError, match="outputs differ"):
        run.trajectory.save(tmp_path / "relu", description=dk.RunDescription("run_factories:relu_mlp", MLP))
    assert not (tmp_path / "relu").exists()
    with pytest.raises(TypeError, match="description must be a dk.RunDescription"):
        dk.Recorder(model, dk.losses.softmax_cross_entropy, description={"model": "run_factories:tanh_mlp"})


@pytest.mark.parametrize("fields, match", [
    pytest.param(dict(model="run_factories.tanh_mlp"), "model must be an import path 'package.module:factory'", id="no-colon"),
    pytest.param(dict(model="../evil:x"), "model must be an import path", id="path"),
    pytest.param(dict(model="m:f", loss="hinge"), "loss must be one of", id="loss-name"),
    pytest.param(dict(model="m:f", model_kwargs={"x": float("nan")}), "model_kwargs must hold only JSON values", id="nan"),
    pytest.param(dict(model="m:f", metadata={"when": object()}), "metadata must hold only JSON values", id="object"),
])
def test_bad_descriptions_are_named(fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        dk.RunDescription(**fields)


def test_a_factory_that_cannot_be_imported_is_named(described_saved, tmp_path, monkeypatch) -> None:
    module = tmp_path / "vanishing_factories.py"
    module.write_text("from run_factories import tanh_mlp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = random_run(4, rounds=2, seed=1, model=run_factories.tanh_mlp(**MLP), loss_fn=dk.losses.softmax_cross_entropy,
                     description=dk.RunDescription("vanishing_factories:tanh_mlp", MLP))
    run.trajectory.save(tmp_path / "run2")
    module.unlink()
    monkeypatch.delitem(sys.modules, "vanishing_factories")
    with pytest.raises(ValueError, match="cannot import model factory 'vanishing_factories:tanh_mlp': ModuleNotFoundError"):
        dk.Trajectory.load(tmp_path / "run2")
    plain = random_run(4, rounds=2, seed=1)
    plain.trajectory.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="saved without a dk.RunDescription; pass the model and loss_fn"):
        dk.Trajectory.load(tmp_path / "plain")


def test_only_marked_factories_are_called(tmp_path, monkeypatch) -> None:
    """A forged description naming any other function of the environment is refused before anything is called."""
    with pytest.raises(ValueError, match="'run_factories:unmarked_mlp' is not marked with @dk.rebuildable"):
        dk.RunDescription("run_factories:unmarked_mlp", MLP).build_model()
    planted = tmp_path / "planted"
    with pytest.raises(ValueError, match="'subprocess:getoutput' is not marked with @dk.rebuildable"):
        dk.RunDescription("subprocess:getoutput", {"cmd": f"touch {planted}"}).build_model()
    assert not planted.exists()
    with pytest.raises(ValueError, match="is not one of dk.losses: name it in the description"):
        dk.Recorder(run_factories.tanh_mlp(**MLP), run_factories.halved_cross_entropy, description=dk.RunDescription("run_factories:tanh_mlp", MLP))


def test_a_factory_in_the_running_script_is_refused(tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import dicekern as dk\nfrom torch import nn\n\n"
        "@dk.rebuildable\ndef build():\n    return nn.Linear(3, 2)\n\n"
        "print('training')\n"
        "dk.Recorder(build(), dk.losses.softmax_cross_entropy, description=dk.RunDescription('train:build'))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1 and done.stdout.count("training") == 1  # the script did not run twice
    assert "lives in the script being run" in done.stderr and "move it to a module of its own" in done.stderr


def test_a_factory_changed_since_the_save_is_caught(described_saved, monkeypatch) -> None:
    _, path, _ = described_saved
    monkeypatch.setattr(run_factories, "tanh_mlp", dk.rebuildable(run_factories.relu_mlp))
    with pytest.raises(ValueError, match="'run_factories:tanh_mlp' builds now computes other outputs .* the factory changed since the save"):
        dk.Trajectory.load(path)


def test_a_version_3_manifest_still_loads(described_saved) -> None:
    run, path, _ = described_saved
    manifest = json.loads((snapshot(path) / "manifest.json").read_text())
    for field in ("description", "fingerprint"):
        del manifest[field]
    manifest["version"] = 3
    republish(path, manifest)
    with pytest.raises(ValueError, match="saved without a dk.RunDescription"):
        dk.Trajectory.load(path)
    loaded = dk.Trajectory.load(path, run_factories.tanh_mlp(**MLP), dk.losses.softmax_cross_entropy)
    torch.testing.assert_close(dk.dice_e(loaded, 1, run.test, 2), dk.dice_e(run.trajectory, 1, run.test, 2), rtol=0, atol=0)


def test_checking_windows_of_a_saved_run_reads_no_round(described_saved, monkeypatch) -> None:
    """dicekern score checks every round it will score before any work, from the manifest alone."""
    from dicekern.record import storage

    _, path, _ = described_saved
    reads = []
    real = storage.RoundFiles._read
    monkeypatch.setattr(storage.RoundFiles, "_read", lambda self, step: reads.append(step) or real(self, step))
    traj = dk.Trajectory.load(path)
    reads.clear()  # loading a described run reads its first round, to check the rebuilt model
    for t in traj.steps[:-2]:
        traj.check_window(t, 2)
    with pytest.raises(ValueError, match="is missing from the trajectory"):
        traj.check_window(traj.steps[-2], 2)
    assert reads == []
    assert len(traj.window(1, 2)) == 3 and reads == [1, 2, 3]
