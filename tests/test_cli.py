"""The command line: every command, its --help, its outputs and its exit status."""

from __future__ import annotations

import json

import pytest

from dicekern.__main__ import main
from test_plots import is_png

SMALL = ["--nodes", "5", "--no-progress"]


@pytest.mark.parametrize("command", ["demo", "cascade", "validate", "detect"])
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_demo(optimizer: str, tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--step", "2", "--hops", "1", "--optimizer", optimizer, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "DICE-E vs DICE-GT" in out and is_png(tmp_path / "cascade.png")
    assert ("Adam(" in out) == (optimizer == "adam") and json.loads((tmp_path / "results.json").read_text())["config"]["optimizer"] == optimizer


def test_cascade(tmp_path, capsys) -> None:
    assert main(["cascade", "--out", str(tmp_path), "--source", "3", "--step", "2", "--hops", "2", *SMALL]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["source"] == 3
    assert is_png(tmp_path / "cascade.png") and "hop 2:" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_validate(optimizer: str, tmp_path) -> None:
    assert main(["validate", "--out", str(tmp_path), "--step", "3", "--hops", "2", "--gt-nodes", "2", "--optimizer", optimizer, *SMALL]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["per_hops"]
    assert [r["hops"] for r in rows] == [0, 1, 2] and all(r["pearson"] > 0.99 for r in rows)
    assert is_png(tmp_path / "e_vs_gt.png")


def test_detect(tmp_path, capsys) -> None:
    assert main(["detect", "--out", str(tmp_path), "--seeds", "1", "--corrupted", "2", "--hops", "1", "2", *SMALL]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["auc"]) == {"1", "2"} and is_png(tmp_path / "anomaly.png")
    assert "ROC AUC" in capsys.readouterr().out


def test_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    import dicekern.examples

    monkeypatch.setattr(dicekern.examples, "digits_run", lambda *a, **k: pytest.fail("trained before checking the arguments"))
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


def test_hops_zero_and_force(tmp_path) -> None:
    assert main(["cascade", "--out", str(tmp_path), "--step", "2", "--hops", "0", *SMALL]) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())["cascade"]) == 1
    assert main(["cascade", "--out", str(tmp_path), "--step", "2", "--hops", "1", "--force", *SMALL]) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())["cascade"]) == 2


def test_help_texts(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "default: out/demo" in text and "round whose samples are scored" in text and "rounds after it" in text


def test_exit_status_for_bad_requests(capsys, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["cascade", "--hops", "-1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert main(["detect", "--corrupted", "5", "--out", str(out), *SMALL]) == 1
