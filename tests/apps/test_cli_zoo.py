"""The zoo on the command line (issue 18, item 6): `demo` and `validate --model NAME` train the
zoo's models on the bundled digits with per-node torch modules and optimizers and check DICE-E
against DICE-GT hop by hop; a saved zoo run rebuilds its model from its description in `score`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import dicekern as dk
from conftest import TOL, assert_close, is_png, read_csv
from dicekern import zoo
from dicekern.apps import demo, examples
from dicekern.apps.cli import main

MODELS = list(zoo.MODELS)  # resnet-bn, resnet-gn, vit, cnn1d, mlp
TINY = ["--nodes", "4", "--step", "2", "--hops", "2", "--batch-size", "4", "--no-progress"]
# sanity, not fidelity: at batch 4 a removed sample is a quarter of its batch, and the first-order
# estimate is measured at Pearson 0.87..1.0 per hop on these runs (README, "--model", has batch 16)
AGREES = 0.8
# the engine's refusal of BatchNorm before it explained their buffers: any such refusal still gets DICE-GT
REFUSAL = ("the model has BatchNorm layers ['1']: DICE-E does not explain their running statistics yet "
           "(dice_gt and dice_gt_samples replay them exactly); use GroupNorm or LayerNorm")


def factory(name: str) -> str:
    return f"dicekern.zoo:{zoo.MODELS[name].factory.__name__}"


def results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("command", ["demo", "validate", "cascade"])
def test_a_bad_model_is_a_one_line_error_listing_the_choices(command: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", "resnet50", "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith(f"dicekern {command}: error: argument --model: invalid choice: 'resnet50'")
    assert all(f"'{name}'" in error for name in MODELS) and not (tmp_path / "o").exists()


def test_model_belongs_to_the_bundled_run(tmp_path, capsys) -> None:
    """A saved run brings its own model; detect's experiment trains the MLP only."""
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(tmp_path / "run"), "--test", str(tmp_path / "t.npz"), "--model", "vit", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "--model describes the bundled digits run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", "--model", "vit", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "unrecognized arguments: --model" in capsys.readouterr().err


def test_every_model_takes_a_digit() -> None:
    assert {name: examples.digit_shape(name) for name in MODELS} == {
        "resnet-bn": (1, 8, 8), "resnet-gn": (1, 8, 8), "vit": (1, 8, 8), "cnn1d": (1, 64), "mlp": (64,)}
    with pytest.raises(ValueError, match="model must be one of"):
        examples.digits_run(4, 2, model="resnet50")


@pytest.mark.slow  # trains a zoo model (about 1 s)
@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_a_zoo_digits_run_is_a_described_torch_optim_loop(optimizer: str) -> None:
    """Per-node modules and torch.optim optimizers of the preset: the recorder reads the preset's
    spec, every transition replays, and the description rebuilds the model it trained."""
    run = examples.digits_run(4, 3, batch_size=5, model="resnet-gn", optimizer=optimizer)
    traj = run.trajectory
    assert traj.optimizer == examples.OPTIMIZER_PRESETS[optimizer][0] and traj.verify().ok
    described = zoo.description("resnet-gn", {"data": "sklearn digits", "topology": "exponential", "seed": 0}, **examples.DIGITS_MODELS["resnet-gn"])
    assert traj.description == dataclasses.replace(described, loss="softmax_cross_entropy")  # the recorder names its dk.losses loss
    assert tuple(traj[0].inputs.shape) == (4, 5, 1, 8, 8) and tuple(run.test[0].shape) == (examples.TEST_SIZE, 1, 8, 8)
    assert traj.dtype == torch.float64 and not torch.equal(traj[3].params, traj[0].params)


@pytest.mark.slow  # trains, scores and replays a zoo model on digits (1-4 s each)
@pytest.mark.parametrize("name", MODELS)
def test_demo_with_every_model(name: str, tmp_path, capsys) -> None:
    assert main(["demo", "--model", name, "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    saved = results(tmp_path)
    assert saved["config"]["model"] == name and saved["metadata"]["model"] == name and saved["dice_e_unavailable"] is None
    description = saved["metadata"]["description"]
    assert (description is None) if name == "mlp" else (description["model"] == factory(name))
    rows = saved["per_hop"]
    assert [r["hop"] for r in rows] == [0, 1, 2] and all(r["pearson_hop"] > AGREES and r["pearson_total"] > AGREES for r in rows)
    assert all(r["dice_gt_mean_abs"] > 0 for r in rows) and saved["samples"] == {"dice_e": 16, "dice_gt": 16}
    assert f"nodes of {name}" in out and "DICE-E vs DICE-GT" in out
    assert all(is_png(tmp_path / picture) for picture in ("cascade.png", "e_vs_gt.png", "decay.png"))
    if name == "resnet-bn":  # neither the paper's walks nor last-layer mode carry BatchNorm's statistics: said, not compared
        assert saved["cascade_vs_walks_rel_error"] is None and "BatchNorm" in saved["walk_reference_unavailable"]
        assert "BatchNorm" in saved["last_layer"]["unavailable"]
    else:
        assert saved["cascade_vs_walks_rel_error"] < TOL[torch.float64].chain
    if name == "vit":  # not an nn.Sequential ending in nn.Linear
        assert "nn.Sequential" in saved["last_layer"]["unavailable"]


@pytest.mark.slow  # trains, scores and replays a zoo model on digits (1-3 s each)
@pytest.mark.parametrize("name", MODELS)
def test_validate_with_every_model(name: str, tmp_path, capsys) -> None:
    assert main(["validate", "--model", name, "--gt-nodes", "2", "--out", str(tmp_path), *TINY]) == 0
    saved = results(tmp_path)
    assert saved["metadata"]["model"] == name and saved["dice_e_unavailable"] is None and saved["nodes"] == [0, 1]
    estimate, truth = (torch.tensor(saved[key], dtype=torch.float64) for key in ("dice_e", "dice_gt"))  # (hops+1, nodes, B)
    assert estimate.shape == truth.shape == (3, 2, 4)
    for s, row in enumerate(saved["per_hop"]):  # each row is that hop's agreement of the numbers written beside it
        assert row["hop_alone"]["pearson"] == pytest.approx(dk.analysis.pearson(estimate[s], truth[s]), rel=1e-12)
        assert row["hops_0_to_s"]["pearson"] > AGREES and row["hop_alone"]["pearson"] > AGREES
        assert row["dice_gt_mean_abs"] == pytest.approx(truth[s].abs().mean().item(), rel=1e-12)
    assert is_png(tmp_path / "e_vs_gt.png") and "DICE-E against DICE-GT on 8 samples of nodes 0..1" in capsys.readouterr().out


@pytest.mark.slow  # trains a zoo model with progress bars
def test_progress_bars_of_a_zoo_run(tmp_path, capsys) -> None:
    assert main(["validate", "--model", "cnn1d", "--gt-nodes", "1", "--out", str(tmp_path), *TINY[:-1]]) == 0
    err = capsys.readouterr().err
    assert "gossip training (cnn1d)" in err and "DICE-GT replays" in err


@pytest.mark.slow  # trains a zoo model on digits
def test_cascade_with_a_zoo_model(tmp_path) -> None:
    assert main(["cascade", "--model", "vit", "--source", "1", "--out", str(tmp_path), *TINY]) == 0
    saved = results(tmp_path)
    assert saved["metadata"]["model"] == "vit" and len(saved["cascade"]) == 3 and is_png(tmp_path / "cascade.png")


@pytest.mark.slow  # trains and replays the BatchNorm ResNet
@pytest.mark.parametrize("command", ["demo", "validate"])
def test_a_model_dice_e_refuses_still_gets_dice_gt(command: str, tmp_path, capsys, monkeypatch) -> None:
    """When the engine refuses a model up front (as it refused BatchNorm before it carried the
    running statistics), the command trains and records the run, replays DICE-GT, and says in one
    line, and in results.json, why DICE-E is not there; exit status 0."""
    def refuse(*args, **kwargs):
        raise ValueError(REFUSAL)

    monkeypatch.setattr(demo, "plan_query", refuse)
    extra = ["--gt-nodes", "2"] if command == "validate" else []
    assert main([command, "--model", "resnet-bn", "--out", str(tmp_path), *extra, *TINY]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "DICE-E is not available" in line] == [f"DICE-E is not available for this run: {REFUSAL}"]
    saved = results(tmp_path)
    assert saved["dice_e_unavailable"] == REFUSAL
    rows = saved["per_hop"]
    assert [r["hop"] for r in rows] == [0, 1, 2] and all(r["dice_gt_mean_abs"] > 0 for r in rows)
    if command == "validate":
        assert saved["dice_e"] is None and torch.tensor(saved["dice_gt"]).shape == (3, 2, 4)
        assert all(r["hop_alone"] is None for r in rows) and not (tmp_path / "e_vs_gt.png").exists()
    else:
        assert all(r["pearson_hop"] is None for r in rows) and saved["samples"] == {"dice_e": None, "dice_gt": 16}
        assert saved["cascade"] is None and is_png(tmp_path / "decay.png") and not (tmp_path / "e_vs_gt.png").exists()


@pytest.mark.slow  # trains zoo models, saves them and scores them from the command line
@pytest.mark.parametrize("name", ["cnn1d", "resnet-gn", "resnet-bn"])
def test_score_rebuilds_a_saved_zoo_run_from_its_description(name: str, tmp_path) -> None:
    """A zoo run saved with its description loads with no model passed: `score` rebuilds the
    factory's model (BatchNorm buffers from disk too) and writes DICE-E of the run as trained."""
    from safetensors.torch import save_file

    run = examples.digits_run(3, 4, batch_size=3, model=name)
    run.trajectory.save(tmp_path / "run")
    test = (run.test[0][:12], run.test[1][:12])
    save_file({"inputs": test[0].contiguous(), "targets": test[1]}, tmp_path / "test.safetensors")
    out = tmp_path / "scores"
    assert main(["score", str(tmp_path / "run"), "--test", str(tmp_path / "test.safetensors"), "--steps", "1:3", "--hops", "1",
                 "--per-hop", "--out", str(out), "--no-progress"]) == 0
    saved = results(out)
    assert saved["metadata"]["description"]["model"] == factory(name) and saved["metadata"]["model"] is None
    assert saved["metadata"]["description"]["model_kwargs"] == zoo.arguments(name, **examples.DIGITS_MODELS[name])
    loaded = dk.Trajectory.load(tmp_path / "run")
    assert type(loaded.objective.model) is type(run.model) and (loaded[1].buffers is not None) == (name == "resnet-bn")
    rows = read_csv(out / "scores.csv")
    for step in (1, 2):
        expected = dk.dice_e(run.trajectory, step, test, 1)  # the run in memory, never saved
        written = torch.zeros_like(expected)
        for r in rows:
            if int(r["step"]) == step:
                written[int(r["node"]), int(r["sample"])] = float(r["score"])
        assert_close(written, expected, TOL[torch.float64].same)
    assert is_png(out / "influence_matrix.png") and is_png(out / "decay.png")


@pytest.mark.slow  # trains a BatchNorm ResNet on digits, saves it and attributes it from the command line
def test_attribute_a_saved_batchnorm_run(tmp_path) -> None:
    """`attribute` on a saved resnet-bn run rebuilds it (buffers from disk), takes order 1 by default and writes
    final_influence of the run as trained."""
    from safetensors.torch import save_file

    run = examples.digits_run(3, 3, batch_size=3, model="resnet-bn")
    run.trajectory.save(tmp_path / "run")
    test = (run.test[0][:12], run.test[1][:12])
    save_file({"inputs": test[0].contiguous(), "targets": test[1]}, tmp_path / "test.safetensors")
    out = tmp_path / "attribution"
    assert main(["attribute", str(tmp_path / "run"), "--test", str(tmp_path / "test.safetensors"), "--out", str(out), "--no-progress"]) == 0
    assert results(out)["metadata"]["order"] == 1  # the default for a BatchNorm model, which order 2 does not take
    expected = dk.final_influence(run.trajectory, test)  # the run in memory, never saved
    written = torch.zeros_like(expected)
    for r in read_csv(out / "samples.csv"):
        written[int(r["round"]), int(r["node"]), int(r["sample"])] = float(r["influence"])
    assert_close(written, expected, TOL[torch.float64].same)
    assert is_png(out / "shares.png")
