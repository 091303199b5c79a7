"""What an engine feeds the model: the padded batch the stage-2 model would see, with the bundle's
modality ablation applied, and the transcript tokenizer that batch is made with.

`collate` (the training code's own padding and tokenisation) builds the batch, so both engines
compute exactly what the model computes.
"""

from __future__ import annotations

from typing import Any

import torch

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.data.batching import collate
from emoq_serve.data.types import Example
from emoq_serve.executors.types import Utterance


def text_tokenizer(bundle: Bundle) -> Any:
    """The former's transcript tokenizer, as exported."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundle.file(names.FORMER_TOKENIZER_DIR)))


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
