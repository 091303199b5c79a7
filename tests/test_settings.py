"""Settings are checked when built: a `Literal` setting outside its values fails at construction,
naming the config, the field and what it allows, not later where the value is used."""

from __future__ import annotations

import re

import pytest

from emoq_serve.config import PRESETS, AudioEncoderConfig, LLMConfig, ModelConfig, preset
from emoq_serve.executors.config import RUNTIME_PRESETS, RuntimeConfig, runtime_preset
from emoq_serve.server.config import ServerConfig


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ServerConfig(asr="sometimes"), "ServerConfig.asr must be one of off, auto, always; got 'sometimes'"),
    (lambda: RuntimeConfig(device="tpu"), "RuntimeConfig.device must be one of cpu, cuda, auto; got 'tpu'"),
    (lambda: RuntimeConfig(llm_backend="llama.cpp"), "RuntimeConfig.llm_backend must be one of vllm, transformers"),
    (lambda: runtime_preset("cpu").replace(dtype="fp16"), "RuntimeConfig.dtype must be one of float32, bfloat16, auto"),
    (lambda: RuntimeConfig(graph_runtime="tensorrt"), "RuntimeConfig.graph_runtime must be one of onnxruntime, openvino"),
    (lambda: RuntimeConfig(audio_precision="int8"), "RuntimeConfig.audio_precision must be one of float32, float16"),
    (lambda: LLMConfig(modality="video"), "LLMConfig.modality must be one of both, audio, text; got 'video'"),
    (lambda: LLMConfig(emotion_word_rule="last"), "LLMConfig.emotion_word_rule must be one of single, first"),
    (lambda: AudioEncoderConfig(feat_extract_norm="batch"), "AudioEncoderConfig.feat_extract_norm must be one of group, layer"),
    # A stored config (checkpoint or bundle) is checked as it is read back.
    (lambda: ModelConfig.from_dict({**preset("tiny").to_dict(), "llm": {**preset("tiny").to_dict()["llm"], "modality": "txt"}}),
     "LLMConfig.modality must be one of both, audio, text; got 'txt'"),
])
def test_a_bad_setting_fails_when_built(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_every_default_and_preset_builds():
    ServerConfig(), RuntimeConfig(), ModelConfig()
    for name in RUNTIME_PRESETS:
        runtime_preset(name)
    for name in PRESETS:
        preset(name)
