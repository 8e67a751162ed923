"""The command line on self-describing saved runs (dk.RunDescription, tests/record/test_descriptions.py):
`dicekern score RUN_DIR`, and cascade, validate and detect with RUN_DIR."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dicekern as dk
from conftest import TESTS, TOL, assert_close, is_png, read_csv
from dicekern.apps.cli import main


@pytest.mark.slow  # a `python -m dicekern` subprocess
def test_score_in_a_subprocess_equals_dice_e_on_the_loaded_run(described_saved, tmp_path) -> None:
    run, path, test_file = described_saved
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


@pytest.mark.slow  # a `python -m dicekern` subprocess
def test_score_of_a_run_whose_factory_is_gone_exits_1_naming_it(described_saved, tmp_path) -> None:
    _, path, test_file = described_saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "dicekern", "score", str(path), "--test", str(test_file), "--out", str(tmp_path / "o"),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert "run_factories:tanh_mlp" in done.stderr and "Traceback" not in done.stderr


def test_score_per_hop_from_npz(described_saved, tmp_path) -> None:
    run, path, _ = described_saved
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


def test_cascade_validate_and_detect_read_a_run(described_saved, tmp_path) -> None:
    run, path, test_file = described_saved
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


def test_run_dir_arguments_are_checked(described_saved, tmp_path, capsys) -> None:
    _, path, test_file = described_saved
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


def test_cascade_and_validate_default_to_the_first_round_that_fits(described_saved, tmp_path, capsys) -> None:
    run, path, test_file = described_saved
    assert main(["cascade", str(path), "--test", str(test_file), "--hops", "2", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["metadata"]["step"] == 0 and results["metadata"]["test_file"]["path"] == str(test_file.resolve())
    assert results["metadata"]["test_file"]["sha256"] == hashlib.sha256(test_file.read_bytes()).hexdigest()
    assert main(["score", str(path), "--test", str(test_file), "--steps", "1:5", "--hops", "2", "--out", str(tmp_path / "s")]) == 1
    assert "round 4 cannot be scored with hops 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(path), "--test", str(test_file), "--out", str(path / "results")])
    assert exit_info.value.code == 2 and "is inside RUN_DIR" in capsys.readouterr().err


def test_attribute_writes_what_the_sweeps_compute(described_saved, tmp_path, capsys) -> None:
    """`attribute RUN_DIR` writes final_influence per sample, both orders of node_contributions per
    node with their shares (a harmful node's share negative), the picture and a summary."""
    run, path, test_file = described_saved
    out = tmp_path / "attribution"
    assert main(["attribute", str(path), "--test", str(test_file), "--out", str(out), "--no-progress"]) == 0
    loaded = dk.Trajectory.load(path)
    expected = dk.final_influence(loaded, run.test)
    rows = read_csv(out / "samples.csv")
    assert len(rows) == expected.numel()
    written = torch.zeros_like(expected)
    for r in rows:
        written[int(r["round"]), int(r["node"]), int(r["sample"])] = float(r["influence"])
    assert_close(written, expected, TOL[torch.float64].same)
    nodes = read_csv(out / "nodes.csv")
    order_2 = dk.node_contributions(loaded, run.test, order=2)
    assert_close(torch.tensor([float(r["order_2"]) for r in nodes], dtype=torch.float64), order_2, TOL[torch.float64].same)
    assert_close(torch.tensor([float(r["order_1"]) for r in nodes], dtype=torch.float64), expected.sum(dim=(0, 2)), TOL[torch.float64].same)
    shares = dk.analysis.shares(order_2)
    assert_close(torch.tensor([float(r["share"]) for r in nodes], dtype=torch.float64), shares.share, TOL[torch.float64].same)
    results = json.loads((out / "results.json").read_text())
    assert results["harmful"] == shares.harmful and results["metadata"]["rounds"] == [0, 5] and results["metadata"]["order"] == 2
    assert is_png(out / "shares.png")
    printed = capsys.readouterr().out
    assert "attributed 5 round(s)" in printed and "harmful nodes" in printed


def test_attribute_order_1_skips_the_forward_sweeps(described_saved, tmp_path) -> None:
    run, path, test_file = described_saved
    out = tmp_path / "attribution"
    assert main(["attribute", str(path), "--test", str(test_file), "--order", "1", "--out", str(out), "--no-progress"]) == 0
    nodes = read_csv(out / "nodes.csv")
    assert "order_2" not in nodes[0]
    expected = dk.analysis.shares(dk.node_contributions(dk.Trajectory.load(path), run.test))
    assert_close(torch.tensor([float(r["share"]) for r in nodes], dtype=torch.float64), expected.share, TOL[torch.float64].same)
