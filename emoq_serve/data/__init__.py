"""Labelled corpora for training and evaluation, behind one spec string.

`load_corpus` is the single entry point the trainers and the CLI use, so a run's `--data`
flag names its corpus completely: `synthetic[:N]`, `iemocap:DIR[:FOLD]`, `meld:DIR[:4|7]`.
"""

from __future__ import annotations

from emoq_serve.data.types import Corpus, Example

__all__ = ["Corpus", "Example", "load_corpus"]


def path_and_number(rest: str) -> tuple[str, int | None]:
    """`path[:number]` -> (path, number); the path itself may contain ':'."""
    head, sep, tail = rest.rpartition(":")
    return (head, int(tail)) if sep and tail.isdigit() else (rest, None)


def load_corpus(spec: str, seed: int = 0) -> Corpus:
    """Load a corpus by spec:

    - `synthetic` / `synthetic:N`: the generated corpus, N train clips per class (default
      150; dev and test get ceil(N/4) per class), deterministic by `seed`;
    - `iemocap:DIR` / `iemocap:DIR:FOLD`: 4 classes, Session FOLD (default 5) as test;
    - `meld:DIR` / `meld:DIR:4` / `meld:DIR:7`: the official split, 4 classes by default.

    Real corpora have fixed splits, so `seed` only affects the synthetic one.
    """
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        from emoq_serve.data.synthetic import make_corpus

        if rest and not rest.isdigit():
            raise ValueError(f"bad corpus spec {spec!r}: expected synthetic or synthetic:N")
        return make_corpus(int(rest), seed) if rest else make_corpus(seed=seed)
    path, number = path_and_number(rest)
    if not path:
        raise ValueError(f"bad corpus spec {spec!r}: {kind} needs a folder, e.g. {kind}:/data/{kind}")
    if kind == "iemocap":
        from emoq_serve.data.iemocap import load_iemocap

        return load_iemocap(path, number if number is not None else 5)
    if kind == "meld":
        from emoq_serve.data.meld import load_meld

        return load_meld(path, number if number is not None else 4)
    raise ValueError(f"unknown corpus {kind!r} in {spec!r}; use synthetic[:N], iemocap:DIR[:FOLD] or meld:DIR[:4|7]")
