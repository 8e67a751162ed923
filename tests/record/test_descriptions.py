"""Self-describing saved runs (dk.RunDescription) and the command line on them: `dicekern score RUN_DIR`,
and cascade, validate and detect with RUN_DIR."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dicekern as dk
import run_factories
from conftest import TOL, assert_close, random_run
from dicekern.apps.cli import main
from test_plots import is_png

TESTS = Path(__file__).resolve().parent
MLP = dict(inputs=3, hidden=4, classes=3)  # conftest.random_run's model
DESCRIPTION = dk.RunDescription("run_factories:tanh_mlp", MLP, metadata={"topology": "random directed", "seed": 5})


def described_run(**kwargs):
    return random_run(5, rounds=5, seed=5, model=run_factories.tanh_mlp(**MLP), loss_fn=dk.losses.softmax_cross_entropy,
                      description=DESCRIPTION, **kwargs)


@pytest.fixture
def saved(tmp_path):
    """A described run saved to tmp_path/run and its test set written to tmp_path/test.safetensors."""
    run = described_run()
    run.trajectory.save(tmp_path / "run")
    save_file({"inputs": run.test[0], "targets": run.test[1]}, tmp_path / "test.safetensors")
    return run, tmp_path / "run", tmp_path / "test.safetensors"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_described_run_loads_without_its_model(saved) -> None:
    run, path, _ = saved
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


def test_a_factory_that_cannot_be_imported_is_named(saved, tmp_path, monkeypatch) -> None:
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


def test_score_in_a_subprocess_equals_dice_e_on_the_loaded_run(saved, tmp_path) -> None:
    run, path, test_file = saved
    out = tmp_path / "scores"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "dicekern", "score", str(path), "--test", str(test_file), "--steps", "1:3",
                           "--hops", "2", "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = dk.Trajectory.load(path)
    rows = read_csv(out / "scores.csv")
    assert {int(r["step"]) for r in rows} == {1, 2} and len(rows) == 2 * 5 * 5
    for step in (1, 2):
        expected = dk.dice_e(loaded, step, run.test, 2)
        written = torch.zeros_like(expected)
        for r in rows:
            if int(r["step"]) == step:
                written[int(r["node"]), int(r["sample"])] = float(r["score"])
        assert_close(written, expected, TOL[torch.float64].same)
    results = json.loads((out / "results.json").read_text())
    meta = results["metadata"]
    assert meta["steps"] == [1, 2] and meta["hops"] == 2 and (meta["N"], meta["B"], meta["M"]) == (5, 5, 6)
    assert meta["topology"] == "random directed" and meta["seed"] == 5 and meta["optimizer"] == loaded.optimizer.to_dict()
    assert meta["versions"]["torch"] == torch.__version__ and meta["command_line"][:2] == ["dicekern", "score"]
    pointer = json.loads((path / "CURRENT").read_text())  # the save the command read
    assert meta["saved_as"] == {"directory": str(path.resolve()), "snapshot": pointer["snapshot"], "manifest_sha256": pointer["sha256"]}
    assert loaded.saved_as == meta["saved_as"] and run.trajectory.saved_as is None
    matrix = dk.influence_matrix(loaded, 1, run.test, 2)
    assert_close(torch.tensor(results["influence_matrix"]["1"], dtype=torch.float64), matrix, TOL[torch.float64].same)
    totals = {(int(r["step"]), int(r["node"])): float(r["total"]) for r in read_csv(out / "node_totals.csv")}
    assert_close(torch.tensor([totals[(1, k)] for k in range(5)], dtype=torch.float64), dk.dice_e(loaded, 1, run.test, 2).sum(1), TOL[torch.float64].same)
    assert is_png(out / "influence_matrix.png") and is_png(out / "contribution.png")


def test_score_of_a_run_whose_factory_is_gone_exits_1_naming_it(saved, tmp_path) -> None:
    _, path, test_file = saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "dicekern", "score", str(path), "--test", str(test_file), "--out", str(tmp_path / "o"),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert "run_factories:tanh_mlp" in done.stderr and "Traceback" not in done.stderr


def test_score_per_hop_from_npz(saved, tmp_path) -> None:
    run, path, _ = saved
    np.savez(tmp_path / "test.npz", inputs=run.test[0].numpy(), targets=run.test[1].numpy().astype(np.int32))
    out = tmp_path / "per_hop"
    assert main(["score", str(path), "--test", str(tmp_path / "test.npz"), "--step", "2", "--hops", "2", "--per-hop", "--out", str(out),
                 "--no-progress"]) == 0
    rows = read_csv(out / "scores.csv")
    shares = torch.tensor([[float(r[f"hop_{s}"]) for s in range(3)] for r in rows], dtype=torch.float64)
    scores = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64)
    assert_close(shares.sum(1), scores, TOL[torch.float64].same)
    per_hop = dk.dice_e(dk.Trajectory.load(path), 2, run.test, 2, per_hop=True)  # (hops+1, N, B)
    assert_close(shares, per_hop.flatten(1).T, TOL[torch.float64].same)
    matrix_rows = read_csv(out / "influence_matrix.csv")
    hops = torch.tensor([[float(r[f"hop_{s}"]) for s in range(3)] for r in matrix_rows], dtype=torch.float64)
    assert_close(hops.sum(1), torch.tensor([float(r["influence"]) for r in matrix_rows], dtype=torch.float64), TOL[torch.float64].same)
    assert_close(hops, dk.influence_matrix(dk.Trajectory.load(path), 2, run.test, 2).flatten(1).T, TOL[torch.float64].same)
    assert is_png(out / "decay.png")


def test_cascade_validate_and_detect_read_a_run(saved, tmp_path) -> None:
    run, path, test_file = saved
    common = [str(path), "--test", str(test_file), "--no-progress"]
    assert main(["cascade", *common, "--source", "2", "--step", "1", "--hops", "2", "--out", str(tmp_path / "c")]) == 0
    flow = json.loads((tmp_path / "c" / "results.json").read_text())["cascade"]
    assert_close(torch.tensor(flow, dtype=torch.float64), dk.cascade(run.trajectory, 1, 2, run.test, 2), TOL[torch.float64].same)
    assert main(["validate", *common, "--step", "1", "--hops", "2", "--gt-nodes", "2", "--out", str(tmp_path / "v")]) == 0
    rows = json.loads((tmp_path / "v" / "results.json").read_text())["per_hop"]
    estimate = dk.dice_e(run.trajectory, 1, run.test, 2, per_hop=True)[:, :2]
    truth = dk.dice_gt_samples(run.trajectory, 1, run.test, 2, nodes=[0, 1], per_hop=True)
    assert [r["hop"] for r in rows] == [0, 1, 2]
    assert rows[1]["hop_alone"]["pearson"] == pytest.approx(dk.analysis.pearson(estimate[1], truth[1]), rel=TOL[torch.float64].same)
    assert rows[2]["hops_0_to_s"]["rel_error"] == pytest.approx(dk.analysis.relative_error(estimate.sum(0), truth.sum(0)), rel=TOL[torch.float64].same)
    assert main(["detect", *common, "--hops", "1", "2", "--anomalous", "3", "--out", str(tmp_path / "d")]) == 0
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    expected = dk.analysis.node_scores(run.trajectory, results["metadata"]["steps"], run.test, 2)
    assert_close(torch.tensor(results["scores"]["2"], dtype=torch.float64), expected, TOL[torch.float64].same)
    assert set(results["auc"]) == {"1", "2"} and is_png(tmp_path / "d" / "anomaly.png")


def test_run_dir_arguments_are_checked(saved, tmp_path, capsys) -> None:
    _, path, test_file = saved
    out = str(tmp_path / "o")
    for argv, message in (
        (["cascade", str(path), "--out", out], "RUN_DIR needs --test"),
        (["cascade", str(path), "--test", str(test_file), "--nodes", "4", "--out", out], "--nodes describes the bundled digits run"),
        (["cascade", "--test", str(test_file), "--out", out], "--test goes with RUN_DIR"),
        (["score", str(path), "--test", str(test_file), "--step", "1", "--steps", "1:2", "--out", out], "not allowed with argument"),
        (["score", str(path), "--test", str(test_file), "--steps", "3:1", "--out", out], "A:B must have A < B"),
        (["detect", str(path), "--test", str(test_file), "--seeds", "2", "--out", out], "with RUN_DIR use --anomalous"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_test = tmp_path / "bad.npz"
    np.savez(bad_test, inputs=np.zeros((4, 3)), labels=np.zeros(4, dtype=np.int64))
    for argv, message in (
        (["score", str(path), "--test", str(bad_test), "--out", out], "must hold exactly the arrays ['inputs', 'targets'], found ['inputs', 'labels']"),
        (["score", str(path), "--test", str(tmp_path / "none.npz"), "--out", out], "does not exist"),
        (["score", str(path), "--test", str(test_file), "--step", "4", "--hops", "3", "--out", out], "round 6 is missing"),
        (["cascade", str(path), "--test", str(test_file), "--source", "7", "--step", "1", "--hops", "1", "--out", out], "source must be a node index in [0, 5)"),
        (["score", str(empty), "--test", str(test_file), "--out", out], "holds no saved trajectory"),
    ):
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    np.savez(bad_test, inputs=np.zeros((4, 3), dtype=object), targets=np.zeros(4, dtype=np.int64))
    assert main(["score", str(path), "--test", str(bad_test), "--out", out]) == 1
    assert "cannot be read" in capsys.readouterr().err  # an object array needs pickle, which is never allowed


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


def test_a_factory_changed_since_the_save_is_caught(saved, monkeypatch) -> None:
    _, path, _ = saved
    monkeypatch.setattr(run_factories, "tanh_mlp", dk.rebuildable(run_factories.relu_mlp))
    with pytest.raises(ValueError, match="'run_factories:tanh_mlp' builds now computes other outputs .* the factory changed since the save"):
        dk.Trajectory.load(path)


def test_a_version_3_manifest_still_loads(saved) -> None:
    from test_storage import republish, snapshot

    run, path, _ = saved
    manifest = json.loads((snapshot(path) / "manifest.json").read_text())
    for field in ("description", "fingerprint"):
        del manifest[field]
    manifest["version"] = 3
    republish(path, manifest)
    with pytest.raises(ValueError, match="saved without a dk.RunDescription"):
        dk.Trajectory.load(path)
    loaded = dk.Trajectory.load(path, run_factories.tanh_mlp(**MLP), dk.losses.softmax_cross_entropy)
    torch.testing.assert_close(dk.dice_e(loaded, 1, run.test, 2), dk.dice_e(run.trajectory, 1, run.test, 2), rtol=0, atol=0)


def test_cascade_and_validate_default_to_the_first_round_that_fits(saved, tmp_path, capsys) -> None:
    run, path, test_file = saved
    assert main(["cascade", str(path), "--test", str(test_file), "--hops", "2", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["metadata"]["step"] == 0 and results["metadata"]["test_file"]["path"] == str(test_file.resolve())
    assert results["metadata"]["test_file"]["sha256"] == hashlib.sha256(test_file.read_bytes()).hexdigest()
    assert main(["score", str(path), "--test", str(test_file), "--steps", "1:5", "--hops", "2", "--out", str(tmp_path / "s")]) == 1
    assert "round 4 cannot be scored with hops 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(path), "--test", str(test_file), "--out", str(path / "results")])
    assert exit_info.value.code == 2 and "is inside RUN_DIR" in capsys.readouterr().err


def test_checking_windows_of_a_saved_run_reads_no_round(saved, monkeypatch) -> None:
    """dicekern score checks every round it will score before any work, from the manifest alone."""
    from dicekern.record import storage

    _, path, _ = saved
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
