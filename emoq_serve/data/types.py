"""The in-memory form of a labelled corpus, shared by every reader and by the trainers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: One earlier turn of the same conversation: (speaker or None, what was said).
Turn = tuple[str | None, str]


@dataclass
class Example:
    """One utterance. `audio` is mono float32 at 16 kHz, or None for a text-only example
    (e.g. MELD without its audio archive); `label` indexes the corpus' `labels`."""

    id: str
    audio: np.ndarray | None
    transcript: str
    label: int
    speaker: str | None = None
    #: Synthetic data only: which modality carries the emotion ("both", "text", "prosody"),
    #: so evaluations can report the single-modality cases separately. None for real data.
    cue: str | None = None
    #: The turns before this one in its dialogue, oldest first (past only, never later turns);
    #: a model with `FormerConfig.context_turns` K > 0 reads the last K of them.
    context: tuple[Turn, ...] = ()


@dataclass
class Corpus:
    """A label set and its three splits; class indices follow `labels`."""

    labels: tuple[str, ...]
    train: list[Example]
    dev: list[Example]
    test: list[Example]

    def splits(self) -> dict[str, list[Example]]:
        """The splits by name, in train/dev/test order (for summaries and loops)."""
        return {"train": self.train, "dev": self.dev, "test": self.test}
