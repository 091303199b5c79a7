"""The MELD recipes: the stratified subset they train on, what each hands its trainer (every
recipe, trainers stubbed: no training), and one real run of the MiniLM ones on a MELD-format tree."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from test_eval import write_meld_split
from torch import nn

from emoq_serve.config import LABEL_SETS, TrainConfig
from emoq_serve.data import load_corpus
from emoq_serve.data.types import Corpus, Example
from training.common import PARAM_GROUPS, make_optimizer
from training.recipes import MELD_TEXT_BASE_TRAIN, RECIPES, main, run_recipe, stratified_subset


def _corpus(counts: list[int]) -> Corpus:
    train = [Example(f"t{c}_{i}", None, f"text {i}", c) for c, n in enumerate(counts) for i in range(n)]
    return Corpus(("a", "b", "c"), train, train[:2], [])


def test_stratified_subset_keeps_class_balance_and_is_seeded() -> None:
    corpus = _corpus([100, 30, 3])
    sub = stratified_subset(corpus, 0.3, seed=0)
    assert Counter(e.label for e in sub.train) == {0: 30, 1: 9, 2: 1}
    assert sub.dev == corpus.dev
    assert [e.id for e in sub.train] == [e.id for e in stratified_subset(corpus, 0.3, seed=0).train]
    assert [e.id for e in sub.train] != [e.id for e in stratified_subset(corpus, 0.3, seed=1).train]
    assert stratified_subset(corpus, 1.0, seed=0) is corpus
    with pytest.raises(ValueError, match="train_fraction"):
        stratified_subset(corpus, 0.0, seed=0)
    dev = stratified_subset(Corpus(corpus.labels, corpus.dev, corpus.train, []), 0.3, seed=0, split="dev")
    assert Counter(e.label for e in dev.dev) == {0: 30, 1: 9, 2: 1} and dev.train == corpus.dev


@pytest.fixture
def stubbed_trainers(monkeypatch) -> list[dict]:
    """The trainers `run_recipe` calls, replaced by stubs that record their arguments."""
    import training.stage1
    import training.stage2

    calls: list[dict] = []

    def stub(stage: int):
        def train(model_cfg, train_cfg, corpus, out_dir, opts=None):
            calls.append({"stage": stage, "model": model_cfg, "train": train_cfg, "corpus": corpus, "opts": opts})
            Path(out_dir).mkdir(parents=True)  # as the trainers do
            return {"best_dev": {"wa": 0.5, "ua": 0.5, "wf1": 0.5}, "seconds": 1.0}
        return train

    monkeypatch.setattr(training.stage1, "train_stage1", stub(1))
    monkeypatch.setattr(training.stage2, "train_stage2", stub(2))
    return calls


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_hands_its_trainer_its_settings(name, stubbed_trainers, tmp_path, capsys) -> None:
    """Through the command line, for 7 classes: the preset, former and training settings each recipe
    names; the stage-2 ones train a text-only model with SmolLM2 from the stage-1 run given."""
    write_meld_split(tmp_path / "train_sent_emo.csv", 14, 0)
    write_meld_split(tmp_path / "dev_sent_emo.csv", 7, 1)
    recipe = RECIPES[name]
    flags = ["--from-stage1", str(tmp_path / "stage1")] if recipe.stage == 2 else []
    assert main([name, "--data", str(tmp_path), "--classes", "7", "--out", str(tmp_path / "run"), *flags]) == 0
    (call,) = stubbed_trainers
    assert call["stage"] == recipe.stage and call["train"] == recipe.train
    assert call["model"].preset == recipe.preset and call["model"].labels == LABEL_SETS["meld7"]
    if recipe.stage == 1:
        former = call["model"].former
        assert (former.num_queries, former.max_text_tokens, former.context_turns) == (
            recipe.num_queries, recipe.max_text_tokens, recipe.context_turns)
        # The base recipe's former is MPNet-base (its relative position bias), trained in bf16.
        assert (former.relative_attention_buckets > 0) == (name == "meld-text-base") == call["train"].bf16
    else:
        opts = call["opts"]
        assert (opts.stage1_dir, opts.modality, opts.llm_preset, opts.zero_shot) == (
            str(tmp_path / "stage1"), "text", "smollm2", True)
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"]
    assert stored["name"] == name and stored["classes"] == 7 and f"{name} 7-class: dev WA" in capsys.readouterr().out


def test_context_turns_override_reaches_the_model(stubbed_trainers, tmp_path) -> None:
    """The dialogue-context variant: K earlier turns, a model setting (the checkpoint keeps its
    FormerConfig: tests/test_aux_bundle.py exports one with context); the override does not leak
    into the recipe."""
    write_meld_split(tmp_path / "train_sent_emo.csv", 14, 0)
    write_meld_split(tmp_path / "dev_sent_emo.csv", 7, 1)
    assert RECIPES["meld-text-context"].context_turns == 1
    run_recipe("meld-text-context", str(tmp_path), 4, tmp_path / "ctx", context_turns=2, epochs=1)
    (call,) = stubbed_trainers
    assert call["model"].former.context_turns == 2 and call["train"].epochs == 1
    assert call["model"].former.max_text_tokens == RECIPES["meld-text-context"].max_text_tokens
    stored = json.loads((tmp_path / "ctx" / "summary.json").read_text())["recipe"]
    assert stored["context_turns"] == 2 and RECIPES["meld-text-context"].context_turns == 1


def test_the_base_llm_recipe_mirrors_the_minilm_one() -> None:
    """meld-text-base-llm is meld-text-llm on the MPNet former: only the former body's rate (the
    base recipe's) and bf16 autocast differ."""
    base, minilm = RECIPES["meld-text-base-llm"], RECIPES["meld-text-llm"]
    assert (base.train.lr, base.train.bf16) == (MELD_TEXT_BASE_TRAIN.lr, True) != (minilm.train.lr, minilm.train.bf16)
    assert dataclasses.replace(base, train=dataclasses.replace(base.train, lr=minilm.train.lr, bf16=False)) == minilm


@pytest.mark.slow
def test_meld_text_recipe_runs_end_to_end(tmp_path) -> None:
    root = tmp_path / "meld"
    root.mkdir()
    write_meld_split(root / "train_sent_emo.csv", 40, 0)
    write_meld_split(root / "dev_sent_emo.csv", 12, 1)
    summary = run_recipe("meld-text", str(root), 4, tmp_path / "run", train_fraction=0.5, epochs=1)
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert RECIPES["meld-text"].train_fraction == 1.0  # the override did not leak into the recipe
    assert stored["recipe"]["name"] == "meld-text" and stored["recipe"]["classes"] == 4
    assert stored["recipe"]["train_examples"] == len(stratified_subset(load_corpus(f"meld:{root}:4"), 0.5, 0).train)
    assert stored["recipe"]["train_fraction"] == 0.5 and stored["recipe"]["num_queries"] == 4
    assert stored["recipe"]["train"]["select_metric"] == "wf1"
    assert summary["best_epoch"] == 1 and 0.0 <= summary["best_dev"]["wf1"] <= 1.0
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["model_config"]
    assert config["labels"] == list(LABEL_SETS["meld4"]) and config["former"]["num_queries"] == 4

    # The stage-2 recipe from that run: SmolLM2 with LoRA, scored zero-shot first on the same dev subset.
    with pytest.raises(ValueError, match="--from-stage1"):
        run_recipe("meld-text-llm", str(root), 4, tmp_path / "llm")
    llm = run_recipe("meld-text-llm", str(root), 4, tmp_path / "llm", train_fraction=0.2, from_stage1=str(tmp_path / "run"),
                     dev_fraction=0.5)
    full = load_corpus(f"meld:{root}:4")
    assert llm["recipe"]["stage"] == 2 and llm["recipe"]["train_examples"] == len(stratified_subset(full, 0.2, 0).train)
    assert llm["recipe"]["dev_examples"] == len(stratified_subset(full, 0.5, 0, split="dev").dev) < len(full.dev)
    assert set(llm["zero_shot_dev"]) >= {"wa", "ua", "wf1"} and set(llm["stage1_dev"]) >= {"wa", "ua", "wf1"}
    config = json.loads((tmp_path / "llm" / "best" / "config.json").read_text())["model_config"]
    assert config["llm"]["path"] == "smollm2" and config["llm"]["modality"] == "text"
    assert config["former"]["num_queries"] == 4  # the stage-1 checkpoint's former
    # The dialogue-context variant's override: test_context_turns_override_reaches_the_model.


def test_lr_groups_give_the_aux_head_its_own_rate() -> None:
    """The recipe's main lever: the auxiliary head trains at its group's rate, the rest at `lr`."""
    model = nn.ModuleDict({"former": nn.Linear(3, 3), "aux_head": nn.Linear(3, 2)})
    opt = make_optimizer(model, TrainConfig(lr=1e-4, lr_groups={PARAM_GROUPS["aux_head"]: 2e-3}))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lrs[id(p)] for p in model["former"].parameters()} == {1e-4}
    assert {lrs[id(p)] for p in model["aux_head"].parameters()} == {2e-3}
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    plain = make_optimizer(model, TrainConfig(lr=1e-4))
    assert {g["lr"] for g in plain.param_groups} == {1e-4}
