"""IEMOCAP reader for the released folder layout, with leave-one-session-out folds.

Layout (as distributed): `Session{1..5}/dialog/EmoEvaluation/<dialog>.txt` holds the
utterance labels, `Session*/dialog/transcriptions/<dialog>.txt` the transcripts and
`Session*/sentences/wav/<dialog>/<utterance>.wav` the audio. The standard 4-class setup keeps
neutral, angry, sad and happy with excited merged into happy (5,531 utterances); the rest
(frustrated, surprised, ...) is dropped.

Fold k tests on Session k, which keeps the test speakers unseen (each session has its own
two actors). Dev is carved from the training sessions by dialog, never by utterance, so dev
shares no conversation with train: every `DEV_EVERY`-th dialog of the sorted training dialogs.
"""

from __future__ import annotations

import re
from pathlib import Path

from emoq_serve.audio import load_audio
from emoq_serve.config import LABEL_SETS
from emoq_serve.data.types import Corpus, Example

LABELS = LABEL_SETS["iemocap4"]
#: Evaluation codes kept, mapped to class names (excited merges into happy).
CODE_TO_LABEL = {"neu": "neutral", "ang": "angry", "sad": "sad", "hap": "happy", "exc": "happy"}
NUM_SESSIONS = 5
DEV_EVERY = 10  # one training dialog in ten goes to dev

# `[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]`
_EVAL_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\s+(\S+)\s+(\S+)\s+\[")
# `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`
_TRANSCRIPT_LINE = re.compile(r"^(\S+) \[[\d.]+-[\d.]+\]:\s?(.*)$")


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _session_examples(session_dir: Path) -> list[tuple[str, Example]]:
    """(dialog, example) for every kept utterance of one session, in file order."""
    session = int(session_dir.name.removeprefix("Session"))
    out = []
    for eval_file in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
        dialog = eval_file.stem
        transcripts: dict[str, str] = {}
        transcript_file = session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
        if transcript_file.is_file():
            for line in _read_lines(transcript_file):
                if m := _TRANSCRIPT_LINE.match(line):
                    transcripts[m.group(1)] = m.group(2).strip()
        for line in _read_lines(eval_file):
            m = _EVAL_LINE.match(line)
            if m is None or m.group(2) not in CODE_TO_LABEL:
                continue
            utt = m.group(1)
            wav = session_dir / "sentences" / "wav" / dialog / f"{utt}.wav"
            out.append((dialog, Example(
                id=utt,
                audio=load_audio(wav) if wav.is_file() else None,
                transcript=transcripts.get(utt, ""),
                label=LABELS.index(CODE_TO_LABEL[m.group(2)]),
                # The utterance's own speaker: session + the gender letter of its last id part.
                speaker=f"Ses{session:02d}{utt.rsplit('_', 1)[-1][0]}",
            )))
    return out


def load_iemocap(root: str | Path, fold: int = 5) -> Corpus:
    """The 4-class corpus with Session `fold` as test (1..5); see the module doc for dev."""
    root = Path(root)
    if not 1 <= fold <= NUM_SESSIONS:
        raise ValueError(f"IEMOCAP fold must be 1..{NUM_SESSIONS}; got {fold}")
    sessions = [root / f"Session{s}" for s in range(1, NUM_SESSIONS + 1)]
    missing = [s.name for s in sessions if not (s / "dialog" / "EmoEvaluation").is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} is not an IEMOCAP release: no dialog/EmoEvaluation in {', '.join(missing)}")
    test = [ex for _, ex in _session_examples(sessions[fold - 1])]
    train_pairs = [p for s in sessions if s != sessions[fold - 1] for p in _session_examples(s)]
    dev_dialogs = set(sorted({d for d, _ in train_pairs})[::DEV_EVERY])
    return Corpus(
        labels=LABELS,
        train=[ex for d, ex in train_pairs if d not in dev_dialogs],
        dev=[ex for d, ex in train_pairs if d in dev_dialogs],
        test=test,
    )
