"""The bundle pieces both engines share: tokenizers, heads, prompt embeddings, input batches.

Both engines must compute exactly what the stage-2 model computes, so this module reuses the
model's own code (`collate` for padding and transcript tokenisation, `PromptBuilder` and
`inject_soft_prompt` for the prompt, `Projector` for the soft tokens, `AuxHead` for a bundle of
the stage-1 model) instead of re-deriving it.
The LLM is not needed to build prompt embeddings: `embed_tokens[ids]` is its first layer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle, BundleError
from emoq_serve.data.batching import collate
from emoq_serve.data.types import Example
from emoq_serve.hostinfo import library_versions
from emoq_serve.model.heads import AuxHead
from emoq_serve.model.projector import Projector
from emoq_serve.model.prompt import PromptBuilder, inject_soft_prompt
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.types import Prediction, Utterance


def engine_device(bundle: Bundle, cfg: RuntimeConfig, engine: str) -> torch.device:
    """What both engines do first: refuse models they cannot serve (before loading anything
    heavy), set the torch thread count, and resolve the device."""
    if not bundle.model_config.llm.use_former:
        raise BundleError(f"this bundle's model has no former (use_former=False); the {engine} engine serves "
                          "former-based models only")
    torch.set_num_threads(cfg.torch_threads)
    return torch.device(cfg.resolved_device())


class StageClock:
    """Milliseconds per pipeline stage: `lap(stage)` closes the stage that just ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = (now - self._clock) * 1e3
        self._clock = now


def engine_info(bundle: Bundle, engine: str, llm_backend: str, device: str, dtype: str,
                packages: tuple[str, ...]) -> dict[str, str]:
    """GetModelInfo's fields for an engine: bundle identity, how it runs, library versions."""
    return {
        "bundle_id": bundle.bundle_id,
        "preset": bundle.model_config.preset,
        "engine": engine,
        "llm_backend": llm_backend,
        "device": device,
        "dtype": dtype,
        # The earlier turns the model reads (the server keeps that many per conversation stream).
        "context_turns": str(bundle.model_config.former.context_turns),
        **library_versions("emoq-serve", *packages),
    }


def text_tokenizer(bundle: Bundle) -> Any:
    """The former's transcript tokenizer, as exported."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundle.file(names.FORMER_TOKENIZER_DIR)))


def prompt_builder(bundle: Bundle) -> PromptBuilder:
    """The chat-prompt builder over the merged LLM's tokenizer, checked against the manifest.

    A tokenizer that maps the emotion words to other ids than export recorded would score the
    wrong tokens silently, so a mismatch refuses to load.
    """
    from emoq_serve.model.llm import load_tokenizer

    cfg = bundle.model_config
    prompt = bundle.manifest["prompt"]
    builder = PromptBuilder(load_tokenizer(bundle.file(names.LLM_DIR)), cfg.labels, prompt["emotion_words"],
                            int(prompt["num_soft_tokens"]), prompt.get("emotion_word_rule", "single"))
    if list(builder.emotion_token_ids) != list(prompt["emotion_token_ids"]):
        raise BundleError(f"the bundle's LLM tokenizer maps the emotion words to {builder.emotion_token_ids}, "
                          f"but the manifest records {prompt['emotion_token_ids']}")
    return builder


def load_heads(bundle: Bundle) -> tuple[torch.Tensor, nn.Module]:
    """(pool_u [H,d], what reads the pooled embedding) from heads.safetensors, with its trained
    weights: the projector of an "llm" bundle, or the auxiliary head of an "aux" bundle."""
    heads = load_file(str(bundle.file(names.HEADS)))
    name = "projector" if bundle.head == "llm" else "aux_head"
    state = {k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(f"{name}.")}
    if bundle.head == "llm":
        hidden, in_dim = state["fc1.weight"].shape
        out_dim = state["fc2.weight"].shape[0]
        k = int(bundle.manifest["prompt"]["num_soft_tokens"])
        head: nn.Module = Projector(in_dim, out_dim // k, k, hidden)
    else:
        hidden, in_dim = state["net.0.weight"].shape
        head = AuxHead(in_dim, hidden, state["net.3.weight"].shape[0])
    head.load_state_dict(state)
    return heads["pool_u"], head.eval()


def model_batch(bundle: Bundle, tokenizer: Any, utterances: list[Utterance]) -> dict[str, Any]:
    """The padded batch the stage-2 model would see, with the bundle's modality ablation applied.

    Utterances become `Example`s so `collate` does the padding and tokenisation; empty audio is
    the missing-audio case (length 0), an empty transcript the missing-text case.
    """
    cfg = bundle.model_config
    examples = [Example(str(i), u.audio if len(u.audio) else None, u.transcript, 0, u.speaker, context=u.context)
                for i, u in enumerate(utterances)]
    batch = collate(examples, tokenizer, cfg.former.max_text_tokens, cfg.former.context_turns)
    if cfg.llm.modality == "audio":
        batch["text_mask"] = torch.zeros_like(batch["text_mask"])
        batch["transcripts"] = [""] * len(utterances)
    return batch


def text_only(bundle: Bundle, frame_mask: torch.Tensor) -> torch.Tensor:
    """The frame mask the model uses: all False for a text-only ("text" modality) model."""
    return torch.zeros_like(frame_mask) if bundle.model_config.llm.modality == "text" else frame_mask


class PromptEmbedder:
    """Soft prompt [B,K,H] + transcripts -> one prompt embedding [T_i,H] per utterance."""

    def __init__(self, builder: PromptBuilder, embed_tokens: torch.Tensor) -> None:
        self.builder = builder
        self.embed_tokens = embed_tokens

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> PromptEmbedder:
        table = load_file(str(bundle.file(names.EMBED_TOKENS)))["weight"]
        return cls(prompt_builder(bundle), table)

    @property
    def emotion_token_ids(self) -> list[int]:
        return list(self.builder.emotion_token_ids)

    def __call__(self, soft: torch.Tensor, transcripts: list[str], speakers: list[str | None]) -> list[torch.Tensor]:
        embeds = []
        for row, (text, speaker) in enumerate(zip(transcripts, speakers)):
            ids, positions = self.builder.encode(text, speaker)
            tokens = self.embed_tokens[torch.tensor(ids)]
            embeds.append(inject_soft_prompt(tokens, positions, soft[row]))
        return embeds


def predictions(labels: tuple[str, ...], posteriors: np.ndarray, timings_ms: dict[str, float]) -> list[Prediction]:
    """One `Prediction` per row; every row of a batch carries the batch's stage timings."""
    return [Prediction(labels[int(np.argmax(p))], p, dict(timings_ms)) for p in posteriors]
