"""The stage-2 chat prompt: template, emotion-word tokens and soft-prompt injection.

The prompt is built once as token ids (ending exactly after "Emotion:"), so the emotion word is
the very next token and its logit at the last position is all inference needs. The audio enters
as K soft tokens written over the `<AUDIO>` placeholder embeddings. The runtime builds the same
embeddings without the LLM (`embed_tokens[ids]`, then `inject_soft_prompt`), which is why this
module depends on nothing but a tokenizer and torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emoq_serve.config import EMOTION_WORD_RULES

PLACEHOLDER = "<AUDIO>"
ANSWER_PREFIX = "Emotion:"
SYSTEM_PROMPT = (
    "You are an emotion recognizer. Given a speaker's utterance as audio and its transcript, "
    "answer with one word: the emotion expressed."
)


def user_message(transcript: str, speaker: str | None, num_soft_tokens: int) -> str:
    """The user turn: speaker (when known), transcript, and the audio placeholder(s).

    A literal placeholder inside the transcript or speaker is removed, so the prompt always holds
    exactly K placeholder tokens. K = 0 leaves the audio line out (the zero-shot, text-only prompt).
    """
    lines = []
    if speaker:
        lines.append(f"Speaker: {speaker.replace(PLACEHOLDER, '')}")
    lines.append(f"Transcript: {transcript.replace(PLACEHOLDER, '')}")
    if num_soft_tokens:
        lines.append(f"Audio: {PLACEHOLDER * num_soft_tokens}")
    return "\n".join(lines)


def answer_text(word: str) -> str:
    """The assistant's answer for one class, e.g. "Emotion: angry" (the word follows a space)."""
    return f"{ANSWER_PREFIX} {word}"


def emotion_word_token_ids(tokenizer, words: Sequence[str], rule: str = "single") -> list[int]:
    """The token id each class is scored by: the word's continuation after "Emotion:".

    Byte-level BPE tokenizers (Qwen's, SmolLM2's) fold the leading space into the word token
    (" angry"), so the continuation is found by tokenizing the prefix with and without the word.
    rule "single": ValueError unless the continuation is one token. rule "first": a multi-token
    word is scored by its first token. Either way the ids must be distinct, or two classes would
    share one score.
    """
    if rule not in EMOTION_WORD_RULES:
        raise ValueError(f"emotion_word_rule must be one of {EMOTION_WORD_RULES}, got {rule!r}")
    prefix = tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    ids, pieces = [], []
    for word in words:
        full = tokenizer.encode(answer_text(word), add_special_tokens=False)
        extra = full[len(prefix):]
        pieces.append(tokenizer.convert_ids_to_tokens(extra))
        if full[: len(prefix)] != prefix or not extra or (rule == "single" and len(extra) != 1):
            raise ValueError(
                f"emotion word {word!r} is not a single token after {ANSWER_PREFIX!r} for this tokenizer "
                f"(continuation {' ' + word!r} -> {len(extra)} tokens {pieces[-1]}); choose another word "
                "through LLMConfig.emotion_words, or score it by its first token "
                "(LLMConfig.emotion_word_rule='first')"
            )
        ids.append(extra[0])
    if len(set(ids)) != len(ids):
        shared = {w: p[0] for w, p, i in zip(words, pieces, ids) if ids.count(i) > 1}
        raise ValueError(f"emotion words {list(words)} do not map to distinct {'first ' if rule == 'first' else ''}"
                         f"tokens: {ids} (shared: {shared}); choose other words through LLMConfig.emotion_words")
    return ids


def check_single_token_words(tokenizer, words: Sequence[str]) -> list[int]:
    """`emotion_word_token_ids` under the "single" rule."""
    return emotion_word_token_ids(tokenizer, words, "single")


def resolve_emotion_words(labels: Sequence[str], emotion_words: dict[str, str]) -> dict[str, str]:
    """label -> word for every label (a label without an entry is its own word)."""
    unknown = set(emotion_words) - set(labels)
    if unknown:
        raise ValueError(f"emotion_words names labels {sorted(unknown)} that are not in {list(labels)}")
    return {label: emotion_words.get(label, label) for label in labels}


class PromptBuilder:
    """Token ids of the chat prompt for one utterance, and the emotion-word token ids."""

    def __init__(self, tokenizer, labels: tuple[str, ...], emotion_words: dict[str, str], num_soft_tokens: int,
                 emotion_word_rule: str = "single"):
        if num_soft_tokens < 1:
            raise ValueError(f"num_soft_tokens must be >= 1, got {num_soft_tokens}")
        self.tokenizer = tokenizer
        self.labels = tuple(labels)
        self.num_soft_tokens = num_soft_tokens
        self.placeholder_token = PLACEHOLDER
        if PLACEHOLDER not in tokenizer.get_vocab():
            # A real Qwen folder lacks it; its embedding row is never read (the soft prompt
            # overwrites it), so any id the embedding table covers will do.
            tokenizer.add_special_tokens({"additional_special_tokens": [PLACEHOLDER]})
        self.placeholder_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.emotion_words = resolve_emotion_words(self.labels, emotion_words)
        self.emotion_word_rule = emotion_word_rule
        self.emotion_token_ids = emotion_word_token_ids(
            tokenizer, [self.emotion_words[l] for l in self.labels], emotion_word_rule
        )
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no eos token to end the answer with")
        self.end_token_id: int = tokenizer.eos_token_id

    def encode(self, transcript: str, speaker: str | None, soft: bool = True) -> tuple[list[int], list[int]]:
        """(prompt ids ending right after "Emotion:", positions of the K placeholder tokens).

        soft=False: the same prompt without the audio line and its placeholders (no positions),
        which a pretrained LLM can answer zero-shot from the transcript alone."""
        k = self.num_soft_tokens if soft else 0
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_message(transcript, speaker, k)},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text + ANSWER_PREFIX, add_special_tokens=False)
        positions = [i for i, t in enumerate(ids) if t == self.placeholder_id]
        if len(positions) != k:
            raise ValueError(f"prompt holds {len(positions)} placeholder tokens, expected {k}")
        return ids, positions

    def answer_ids(self, label_index: int) -> list[int]:
        """Target tokens after the prompt: the emotion word and the end-of-turn token.

        Under the "first" rule the word is its first token only: that is all scoring reads, and
        every class keeps a two-token answer so a batch's targets stack."""
        return [self.emotion_token_ids[label_index], self.end_token_id]


def inject_soft_prompt(token_embeds: torch.Tensor, positions, soft: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the placeholder rows replaced by the soft prompt (differentiable).

    Unbatched: token_embeds [T,H], positions [K], soft [K,H]. Batched: [B,T,H], [B,K], [B,K,H].
    """
    positions = torch.as_tensor(positions, dtype=torch.long, device=token_embeds.device)
    out = token_embeds.clone()
    if token_embeds.dim() == 2:
        out[positions] = soft.to(out.dtype)
    else:
        rows = torch.arange(out.shape[0], device=out.device).unsqueeze(1).expand_as(positions)
        out[rows, positions] = soft.to(out.dtype)
    return out
