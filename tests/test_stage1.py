"""Stage-1 training end to end on the synthetic corpus: it learns, checkpoints reload exactly,
resume replays an unbroken run, and the `emoq train` parsers are wired."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from safetensors.torch import load_file

from emoq_serve.config import preset
from emoq_serve.data import load_corpus
from emoq_serve.model.emoq import EmoQStage1
from training import stage1
from training.cli import register
from training.stage1 import evaluate, train_config, train_stage1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoq")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_tiny_stage1_separates_classes_and_reloads(tmp_path):
    corpus = load_corpus("synthetic:40", seed=0)
    cfg = preset("tiny", labels=corpus.labels)
    cfg.audio.cache_dir = str(tmp_path / "features")
    tc = train_config("tiny", threads=1)
    started = time.perf_counter()
    summary = train_stage1(cfg, tc, corpus, tmp_path / "run")
    seconds = time.perf_counter() - started
    print(f"tiny stage 1: {seconds:.1f} s, best epoch {summary['best_epoch']}, dev {summary['best_dev']}, "
          f"test WA {summary['test']['wa']:.3f} UA {summary['test']['ua']:.3f}")
    assert summary["best_dev"]["ua"] > 0.6  # chance is 0.25
    assert summary["test"]["ua"] > 0.5
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, tc.epochs + 1))
    assert log[-1]["train_loss"] < log[0]["train_loss"]

    # The best checkpoint reloads to the exact model that scored the recorded dev metrics.
    best = EmoQStage1.load(tmp_path / "run" / "best")
    recorded = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["dev"]
    assert evaluate(best, corpus.dev, tc.batch_size) == recorded
    again = EmoQStage1.load(tmp_path / "run" / "best").eval()
    from emoq_serve.data.batching import collate

    batch = collate(corpus.dev[:5], best.text_tokenizer, cfg.former.max_text_tokens)
    best.eval()
    z1, l1 = best(batch)
    z2, l2 = again(batch)
    assert torch.equal(z1, z2) and torch.equal(l1, l2)


def test_resume_replays_an_unbroken_run(tmp_path, monkeypatch):
    corpus = load_corpus("synthetic:4", seed=1)
    cfg = preset("tiny", labels=corpus.labels)
    tc = train_config("tiny", epochs=3, batch_size=8, threads=1)

    def weights(folder):
        return load_file(folder / "last" / "model.safetensors")

    train_stage1(cfg, tc, corpus, tmp_path / "full")

    real_batches = stage1.iterate_batches

    def crash_in_third_epoch(examples, model, batch_size, shuffle_seed=None, epoch=0, **shard):
        if shuffle_seed is not None and epoch == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_batches(examples, model, batch_size, shuffle_seed, epoch, **shard)

    monkeypatch.setattr(stage1, "iterate_batches", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_stage1(cfg, tc, corpus, tmp_path / "cut")
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 1
    train_stage1(cfg, tc, corpus, tmp_path / "cut", resume=True)
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for name in full:
        torch.testing.assert_close(cut[name], full[name], atol=1e-6, rtol=1e-5, msg=name)
    full_log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    cut_log = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert len(cut_log) == 3
    assert json.loads(cut_log[2])["dev"] == json.loads(full_log[2])["dev"]


def test_train_cli_runs_stage1_and_wires_stage2(tmp_path, capsys):
    args = _parser().parse_args(
        ["train", "stage1", "--preset", "tiny", "--data", "synthetic:4", "--out", str(tmp_path / "cli"),
         "--epochs", "1", "--batch-size", "8", "--select-metric", "uar", "--threads", "1"]
    )
    assert args.func(args) == 0
    assert "best epoch 1" in capsys.readouterr().out
    assert (tmp_path / "cli" / "best" / "model.safetensors").exists()
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["select_metric"] == "ua"

    stage2 = _parser().parse_args(["train", "stage2", "--stage1", "ckpt", "--out", "o"])
    assert stage2.stage == "stage2" and callable(stage2.func) and stage2.from_stage1 == "ckpt"
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "stage1", "--out", "o", "--select-metric", "bogus"])
