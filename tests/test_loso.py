"""`emoq train loso`: IEMOCAP's five leave-one-session-out folds in one command, on the fixture
tree (IEMOCAP itself is not on this machine), both stages per fold with the tiny preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data import _make_iemocap

from emoq_serve.cli import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOQ_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_five_folds_in_turn_reported_each_and_as_mean_and_std(tmp_path, capsys, monkeypatch):
    _make_iemocap(tmp_path / "IEMOCAP")
    out = tmp_path / "loso"
    argv = ["train", "loso", "--data", f"iemocap:{tmp_path / 'IEMOCAP'}", "--preset", "tiny", "--epochs", "1",
            "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((out / "loso.json").read_text())
    folds = report["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3, 4, 5] and report["stages"] == 2
    assert [f["test_session"] for f in folds] == [f"Session{k}" for k in range(1, 6)]
    assert all(f["test_examples"] == 10 and f["train_examples"] + f["dev_examples"] == 40 for f in folds)
    for k in range(1, 6):  # both stages trained, the stage-2 summary's test figures reported
        stage2 = json.loads((out / f"fold{k}" / "stage2" / "summary.json").read_text())
        assert (out / f"fold{k}" / "stage1" / "best" / "config.json").is_file()
        assert folds[k - 1]["test"] == {m: stage2["test"][m] for m in ("wa", "ua", "wf1")}
    for m in ("wa", "ua", "wf1"):
        values = [f["test"][m] for f in folds]
        assert report["mean"][m] == pytest.approx(np.mean(values)) and report["std"][m] == pytest.approx(np.std(values))
    table = capsys.readouterr().out
    assert "Session3" in table and f"{100 * report['mean']['ua']:8.1f}" in table.splitlines()[-2]

    # Run again: every fold is read back, none retrained.
    import training.loso

    monkeypatch.setattr(training.loso, "run_fold", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    assert main(argv) == 0
    assert json.loads((out / "loso.json").read_text()) == report


def test_loso_needs_the_iemocap_folder_without_a_fold(tmp_path):
    for bad in ("meld:/x", "iemocap", f"iemocap:{tmp_path}:3"):
        with pytest.raises(SystemExit, match="iemocap:DIR"):
            main(["train", "loso", "--data", bad, "--out", str(tmp_path / "o")])


def test_mean_and_population_std_over_folds():
    from training.loso import format_loso, summarise

    folds = [{"fold": k, "test_session": f"Session{k}", "test": {"wa": wa, "ua": ua, "wf1": 0.5}}
             for k, (wa, ua) in enumerate([(0.5, 0.4), (0.7, 0.6), (0.6, 0.5)], start=1)]
    report = summarise(folds)
    assert report["mean"]["wa"] == pytest.approx(0.6) and report["std"]["wa"] == pytest.approx(np.sqrt(0.02 / 3))
    assert report["std"]["wf1"] == 0.0
    assert format_loso(report).splitlines()[-1].split()[-3:] == ["8.2", "8.2", "0.0"]
