"""The command line: every command, its --help, its outputs and its exit status."""

from __future__ import annotations

import json

import pytest
import torch

import dicekern as dk
from conftest import is_png
from dicekern.apps.cli import main

SMALL = ["--nodes", "5", "--no-progress"]


@pytest.mark.parametrize("command", ["demo", "score", "cascade", "validate", "detect"])
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_demo(optimizer: str, tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--step", "2", "--hops", "1", "--optimizer", optimizer, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "DICE-E vs DICE-GT" in out and is_png(tmp_path / "cascade.png")
    results = json.loads((tmp_path / "results.json").read_text())
    assert ("Adam(" in out) == (optimizer == "adam") and results["config"]["optimizer"] == optimizer
    meta = results["metadata"]
    assert (meta["step"], meta["hops"], meta["N"], meta["B"], meta["M"], meta["seed"]) == (2, 1, 5, 16, 200, 0)
    assert meta["optimizer"]["kind"] == optimizer.replace("momentum", "sgd") and meta["command_line"] is not None


def test_cascade(tmp_path, capsys) -> None:
    assert main(["cascade", "--out", str(tmp_path), "--source", "3", "--step", "2", "--hops", "2", *SMALL]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["source"] == 3
    assert is_png(tmp_path / "cascade.png") and "hop 2:" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_validate(optimizer: str, tmp_path) -> None:
    assert main(["validate", "--out", str(tmp_path), "--step", "3", "--hops", "2", "--gt-nodes", "2", "--optimizer", optimizer, *SMALL]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["per_hop"]
    assert [r["hop"] for r in rows] == [0, 1, 2] and all(r["hops_0_to_s"]["pearson"] > 0.99 for r in rows)
    assert all(set(r["hop_alone"]) == {"pearson", "spearman", "rel_error"} for r in rows)
    assert results["metadata"]["optimizer"]["kind"] in ("sgd", "adam") and results["metadata"]["step"] == 3
    assert is_png(tmp_path / "e_vs_gt.png")


def test_detect(tmp_path, capsys) -> None:
    assert main(["detect", "--out", str(tmp_path), "--seeds", "1", "--corrupted", "2", "--hops", "1", "2", *SMALL]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["auc"]) == {"1", "2"} and is_png(tmp_path / "anomaly.png")
    assert set(results["baseline_auc"]) == set(dk.baselines.NODE_BASELINES)
    first = results["runs"][0]
    run = dk.examples.digits_run(5, 24, seed=0, corrupt={b: "flip" for b in first["anomalous"]})
    expected = dk.baselines.update_distance(run.trajectory, range(10, 24))
    torch.testing.assert_close(torch.tensor(first["baselines"]["update distance (Krum)"], dtype=torch.float64), expected)
    assert results["baseline_auc"]["update distance (Krum)"] == [dk.analysis.detection_auc(expected, first["anomalous"])]
    meta = results["metadata"]
    assert meta["steps"]["1"] == list(range(10, 24)) and meta["steps"]["2"] == list(range(10, 23)) and meta["seed"] == [0]
    assert meta["N"] == 5 and meta["topology"] == "exponential" and meta["versions"]["torch"] == torch.__version__
    assert "ROC AUC" in capsys.readouterr().out


def test_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    import dicekern.apps.examples

    monkeypatch.setattr(dicekern.apps.examples, "digits_run", lambda *a, **k: pytest.fail("trained before checking the arguments"))
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "exists and is not a folder"), (tmp_path / "file" / "sub", "cannot be written")):
        with pytest.raises(SystemExit) as exit_info:
            main(["cascade", "--out", str(out), *SMALL])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--out", str(tmp_path / "done"), *SMALL])
    assert exit_info.value.code == 2 and "already holds results; pass --force" in capsys.readouterr().err
    assert main(["cascade", "--source", "9", "--out", str(tmp_path / "c"), *SMALL]) == 1
    assert "source must be a node index in [0, 5)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # the folder it made for nothing is gone
    assert main(["cascade", "--source", "9", "--out", str(tmp_path / "new" / "deeper"), *SMALL]) == 1
    assert not (tmp_path / "new").exists()  # and the parents it made for it
    (tmp_path / "kept").mkdir()
    assert main(["cascade", "--source", "9", "--out", str(tmp_path / "kept"), *SMALL]) == 1
    assert (tmp_path / "kept").is_dir()  # a folder the user made stays


def test_hops_zero_and_force(tmp_path) -> None:
    assert main(["cascade", "--out", str(tmp_path), "--step", "2", "--hops", "0", *SMALL]) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())["cascade"]) == 1
    assert main(["cascade", "--out", str(tmp_path), "--step", "2", "--hops", "1", "--force", *SMALL]) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())["cascade"]) == 2


def test_help_texts(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert "default: out/demo" in text and "round whose samples are scored" in text and "rounds after it" in text
    for option in ("--nodes", "--topology", "--rounds", "--batch-size", "--lr", "--optimizer", "--seed"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "marked with @dk.rebuildable" in text and "nothing is unpickled" in text and "--nodes" not in text


def test_exit_status_for_bad_requests(capsys, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["cascade", "--hops", "-1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert main(["detect", "--corrupted", "5", "--out", str(out), *SMALL]) == 1


def test_bundled_run_options(tmp_path) -> None:
    """--topology, --rounds, --batch-size, --lr and --seed shape the digits run, and results.json says so."""
    argv = ["cascade", "--out", str(tmp_path), "--nodes", "9", "--topology", "torus", "--rounds", "5", "--batch-size", "4",
            "--lr", "0.05", "--seed", "3", "--step", "1", "--hops", "2", "--no-progress"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    meta = results["metadata"]
    assert (meta["N"], meta["B"], meta["topology"], meta["seed"], meta["step"], meta["hops"]) == (9, 4, "torus", 3, 1, 2)
    assert meta["command_line"] == ["dicekern", *argv] and meta["versions"]["python"]
    run = dk.examples.digits_run(9, 5, batch_size=4, lr=0.05, graph="torus", seed=3)
    assert torch.equal(run.trajectory[1].W, dk.topology.torus(3, 3))
    torch.testing.assert_close(torch.tensor(results["cascade"], dtype=torch.float64), dk.cascade(run.trajectory, 1, 0, run.test, 2),
                               rtol=0, atol=0)


def test_bundled_run_options_are_checked(tmp_path, capsys) -> None:
    assert main(["cascade", "--out", str(tmp_path / "a"), "--rounds", "2", "--step", "2", "--hops", "1", *SMALL]) == 1
    assert "rounds 2 is too few" in capsys.readouterr().err
    assert main(["cascade", "--out", str(tmp_path / "b"), "--topology", "torus", *SMALL]) == 1
    assert "a torus needs N = rows x cols with both >= 3" in capsys.readouterr().err
    for bad in (["--lr", "0"], ["--batch-size", "0"], ["--topology", "hypercube"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["cascade", "--out", str(tmp_path / "c"), *bad, *SMALL])
        assert exit_info.value.code == 2
