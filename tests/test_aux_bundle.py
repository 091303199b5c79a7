"""A bundle of the stage-1 model ("aux": the former and its auxiliary head, no LLM): export with
parity, the serving engines and `emoq serve` answering with the head's posteriors, `emoq eval
--bundle` matching `--checkpoint`, and `--verify` naming a perturbed head. The tiny stage-1 model
reads two earlier turns (dialogue context), so the bundle path is checked with context too."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
from server_harness import RunningServer, config, tone
from test_eval import _EMOTIONS, write_meld_split
from test_export import emoq_export, perturb_safetensors, rehash

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.cli import main
from emoq_serve.client.api import recognize_request
from emoq_serve.config import preset
from emoq_serve.data.batching import collate
from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.executors.config import runtime_preset
from emoq_serve.executors.types import Utterance

CONTEXT = (("Ross", "We were on a break!"), ("Rachel", "Fine."))


@pytest.fixture(scope="module")
def aux(tmp_path_factory):
    """(stage-1 run folder, its aux bundle, a MELD-format tree), the bundle exported through `emoq export`."""
    from emoq_serve.data import load_corpus

    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("aux")
    write_meld_split(root / "dev_sent_emo.csv", 23, 1)
    cfg = preset("tiny", labels=_EMOTIONS)
    cfg.former.context_turns = 2
    model = EmoQStage1(cfg).eval()
    # A random former's z differs little between inputs: centre the head on the split's mean z
    # (and scale it), so the differences decide the class and a wrong z shows in the predictions.
    dev = load_corpus(f"meld:{root}:7").dev
    with torch.no_grad():
        z = model(collate(dev, model.text_tokenizer, cfg.former.max_text_tokens, 2))[0]
        first = model.aux_head.net[0]
        first.weight.normal_(std=50.0)
        first.bias.copy_(-first.weight @ z.mean(0))
    model.save(root / "run" / "best")
    assert emoq_export(["--checkpoint", str(root / "run"), "--out", str(root / "bundle")]) == 0
    return root / "run", root / "bundle", root


def eager_posteriors(run, utterances: list[Utterance]) -> np.ndarray:
    from emoq_serve.data.types import Example

    model = EmoQStage1.load(run / "best").eval()
    examples = [Example(str(i), u.audio if len(u.audio) else None, u.transcript, 0, u.speaker, context=u.context)
                for i, u in enumerate(utterances)]
    batch = collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens, model.cfg.former.context_turns)
    with torch.no_grad():
        return torch.softmax(model(batch)[1], -1).numpy()


@pytest.mark.slow
def test_aux_bundle_holds_no_llm_and_its_parity_covers_the_head(aux):
    _, bundle_dir, _ = aux
    bundle = Bundle.open(bundle_dir)
    assert bundle.head == "aux" and bundle.manifest["prompt"] == {}
    assert not (bundle_dir / names.LLM_DIR).exists() and not (bundle_dir / names.EMBED_TOKENS).exists()
    parity = bundle.manifest["parity"]
    assert set(parity["stages"]) == {"audio_frames", "former_states", "embedding", "posteriors"}
    assert parity["posterior_max_abs"] <= 1e-4 and "trained_model" not in parity
    assert bundle.model_config.former.context_turns == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnx", "eager"])
def test_both_engines_serve_the_heads_posteriors(aux, engine):
    from emoq_serve.executors import load_recognizer

    run, bundle_dir, _ = aux
    utterances = [Utterance(tone(0.7), "oh my god", "Monica", CONTEXT), Utterance(tone(1.3, freq=330), "no way"),
                  Utterance(np.zeros(0, np.float32), "text alone", None, CONTEXT[:1])]
    recognizer = load_recognizer(bundle_dir, runtime_preset("test"), engine)

    async def run_all():
        try:
            return await recognizer.recognize(utterances)
        finally:
            await recognizer.close()

    got = np.stack([p.probabilities for p in asyncio.run(run_all())])
    np.testing.assert_allclose(got, eager_posteriors(run, utterances), atol=1e-5)
    assert recognizer.info()["llm_backend"] == "none (auxiliary head)"


@pytest.mark.slow
def test_emoq_serve_answers_with_the_aux_bundle(aux):
    from emoq_serve.executors.pipeline import OnnxPipeline

    run, bundle_dir, _ = aux
    bundle = Bundle.open(bundle_dir)
    with RunningServer(lambda: OnnxPipeline(bundle, runtime_preset("test")), config(batcher={"max_queue_delay_ms": 5})) as srv:
        result = srv.stub.Recognize(recognize_request(tone(0.9), 16_000, "leave me alone"), timeout=30).result
    (expected,) = eager_posteriors(run, [Utterance(tone(0.9), "leave me alone")])
    np.testing.assert_allclose([s.probability for s in result.scores], expected, atol=1e-5)
    assert result.label == _EMOTIONS[int(expected.argmax())] and result.timing.llm_ms == 0


@pytest.mark.slow
def test_eval_bundle_matches_eval_checkpoint(aux, tmp_path, capsys):
    """On a MELD-format dev split whose dialogues give every later turn its context."""
    run, bundle_dir, tree = aux
    scores = {}
    for source in (["--checkpoint", str(run)], ["--bundle", str(bundle_dir)]):
        out = tmp_path / source[0].strip("-")
        assert main(["eval", *source, "--data", f"meld:{tree}", "--classes", "7", "--out", str(out)]) == 0
        scores[source[0]] = json.loads((out / "eval_dev.json").read_text())
    for metric in ("wa", "ua", "wf1"):
        assert abs(scores["--checkpoint"][metric] - scores["--bundle"][metric]) <= 1e-3, metric
    assert scores["--checkpoint"]["confusion_matrix"] == scores["--bundle"]["confusion_matrix"]
    # Example by example too, from the reports' rows (the split's later turns read their
    # dialogue's earlier ones).
    from emoq_serve.data import load_corpus

    dev = load_corpus(f"meld:{tree}:7").dev
    assert sum(bool(e.context) for e in dev) > len(dev) // 2
    by_checkpoint, by_bundle = scores["--checkpoint"]["predictions"], scores["--bundle"]["predictions"]
    assert [row["id"] for row in by_checkpoint] == [e.id for e in dev]
    assert len({row["predicted"] for row in by_checkpoint}) >= 3  # the centred head tells the examples apart
    assert by_bundle == by_checkpoint


@pytest.mark.slow
def test_verify_names_a_perturbed_aux_head(aux, tmp_path, capsys):
    _, bundle_dir, _ = aux
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    assert emoq_export(["--verify", str(broken)]) == 0
    perturb_safetensors(broken / names.HEADS, "aux_head.net.3.weight")
    rehash(broken)
    assert emoq_export(["--verify", str(broken)]) == 1
    assert f"FAILED: {names.HEADS} (aux_head) does not reproduce the model" in capsys.readouterr().err
