"""Turning examples into padded tensors, and grouping them by length so padding stays small.

`collate` is the one place that decides padding and masks, so training, evaluation and the
eager baseline feed the model identical batches. An example without audio gets length 0 and
one without a transcript an all-False text mask: the model treats both as missing modalities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from emoq_serve.data.types import Example, Turn

#: Fewer free positions than this after the utterance itself: its context is left out.
MIN_CONTEXT_TOKENS = 4


def _turn_text(speaker: str | None, text: str) -> str:
    return f"{speaker}: {text}" if speaker else text


def encode_text(tokenizer: Any, transcript: str, speaker: str | None, context: tuple[Turn, ...],
                max_text_tokens: int, context_turns: int) -> list[int]:
    """The former's token ids for one utterance. Without context (`context_turns` 0) the
    transcript alone. With K > 0 a pair: "speaker: transcript", then the last K earlier turns as
    "speaker: text", newest first and separated by the tokenizer's separator, so truncation at
    `max_text_tokens` drops the oldest context and never the utterance itself."""
    if not context_turns:
        return tokenizer(transcript, truncation=True, max_length=max_text_tokens)["input_ids"]
    first = _turn_text(speaker, transcript)
    ids = tokenizer(first, truncation=True, max_length=max_text_tokens)["input_ids"]
    prior = [_turn_text(s, t) for s, t in context if t.strip()][-context_turns:]
    if not prior or not transcript.strip() or len(ids) + MIN_CONTEXT_TOKENS > max_text_tokens:
        return ids
    sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " | "
    return tokenizer(first, sep.join(reversed(prior)), truncation="only_second", max_length=max_text_tokens)["input_ids"]


def collate(examples: list[Example], tokenizer: Any, max_text_tokens: int, context_turns: int = 0) -> dict[str, Any]:
    """Batch examples: waveforms [B,S] float32 zero-padded (S >= 1), lengths [B] int64,
    input_ids [B,T] int64 with the tokenizer's special tokens, text_mask [B,T] bool (T >= 1),
    labels [B] int64, transcripts and speakers as lists. With `context_turns` K > 0 the former's
    text also holds each example's last K earlier turns (`encode_text`)."""
    lengths = [0 if ex.audio is None else len(ex.audio) for ex in examples]
    waveforms = torch.zeros(len(examples), max(max(lengths, default=0), 1), dtype=torch.float32)
    for row, ex in enumerate(examples):
        if ex.audio is not None:
            waveforms[row, : len(ex.audio)] = torch.from_numpy(np.asarray(ex.audio, dtype=np.float32))
    transcripts = [ex.transcript for ex in examples]
    if context_turns:
        rows = [{"input_ids": encode_text(tokenizer, ex.transcript, ex.speaker, ex.context, max_text_tokens, context_turns)}
                for ex in examples]
        enc = tokenizer.pad(rows, return_tensors="pt")
    else:
        enc = tokenizer(transcripts, padding=True, truncation=True, max_length=max_text_tokens, return_tensors="pt")
    input_ids, text_mask = enc["input_ids"].long(), enc["attention_mask"].bool()
    if input_ids.shape[1] == 0:  # tokenizers without special tokens give T=0 for all-empty text
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(examples), 1), pad, dtype=torch.long)
        text_mask = torch.zeros(len(examples), 1, dtype=torch.bool)
    # An empty transcript is a missing modality, not a sentence made of [CLS][SEP].
    text_mask[torch.tensor([not t.strip() for t in transcripts], dtype=torch.bool)] = False
    return {
        "waveforms": waveforms,
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "input_ids": input_ids,
        "text_mask": text_mask,
        "labels": torch.tensor([ex.label for ex in examples], dtype=torch.int64),
        "transcripts": transcripts,
        "speakers": [ex.speaker for ex in examples],
    }


class BucketBatchSampler:
    """Batches of indices of similar length (a `DataLoader` batch_sampler).

    Each epoch shuffles the indices, sorts them by length within windows of
    `batch_size * bucket_factor`, cuts batches and shuffles the batch order: padding drops
    (HuBERT cost grows with the longest clip) while batches stay random across epochs.
    Without shuffling, batches come in sorted order, which suits evaluation.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 bucket_factor: int = 50, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.bucket_factor, self.drop_last = bucket_factor, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle, so every epoch (and a resumed run) sees a reproducible order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        window = self.batch_size * self.bucket_factor if self.shuffle else len(order)
        order = np.concatenate([order[i:i + window][np.argsort(self.lengths[order[i:i + window]], kind="stable")]
                                for i in range(0, len(order), window)] or [order])
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous slice of a global batch (sizes differ by at most one, earlier
    ranks take the extra rows; a rank gets none when the batch is smaller than the world).
    Contiguous, so the ranks' slices concatenated in rank order are the global batch again."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return [int(i) for i in np.array_split(np.asarray(indices, dtype=np.int64), world_size)[rank]]
