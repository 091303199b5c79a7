"""Prompt building, emotion-word tokens, soft-prompt injection, projector and posteriors."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from emoq_serve.config import LABEL_SETS
from emoq_serve.model.llm import emotion_posteriors, load_tokenizer, tokenizer_corpus, train_tokenizer
from emoq_serve.model.projector import Projector
from emoq_serve.model.prompt import (
    ANSWER_PREFIX,
    PLACEHOLDER,
    PromptBuilder,
    check_single_token_words,
    emotion_word_token_ids,
    inject_soft_prompt,
)

LABELS = LABEL_SETS["synthetic4"]
TRANSCRIPTS = ["I can't believe you did that!", "It is a calm day at the office.", "Oh well, whatever."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_tok")
    train_tokenizer(tokenizer_corpus(TRANSCRIPTS * 20, LABELS), 512, out)
    return load_tokenizer(out)


def test_trained_tokenizer_is_qwen_style(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    for special in ("<|im_start|>", "<|im_end|>", PLACEHOLDER):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    # Byte-level: any text round-trips, including characters never seen in training.
    assert tokenizer.decode(tokenizer.encode("Ünïcode ✓ 42", add_special_tokens=False)) == "Ünïcode ✓ 42"


def test_emotion_words_are_single_tokens(tokenizer):
    ids = check_single_token_words(tokenizer, LABELS)
    assert len(set(ids)) == len(LABELS)
    for word, i in zip(LABELS, ids):
        assert tokenizer.decode([i]) == " " + word  # the leading space lives in the token
    with pytest.raises(ValueError, match="'xylophonic' is not a single token"):
        check_single_token_words(tokenizer, ["xylophonic"])


def test_first_token_rule_scores_a_multi_token_word_by_its_first_token(tokenizer):
    """"xylophonic" is several tokens for this tokenizer: "single" refuses it, "first" scores it
    by its first token; the manifest section records the rule in use."""
    from export.bundle_writer import prompt_section

    prefix = len(tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False))
    cont = tokenizer.encode(f"{ANSWER_PREFIX} xylophonic", add_special_tokens=False)[prefix:]
    assert len(cont) > 1
    ids = emotion_word_token_ids(tokenizer, ["neutral", "xylophonic"], "first")
    assert ids == [check_single_token_words(tokenizer, ["neutral"])[0], cont[0]]
    builder = PromptBuilder(tokenizer, LABELS, {"happy": "xylophonic"}, 1, "first")
    assert builder.emotion_token_ids[LABELS.index("happy")] == cont[0]
    assert builder.answer_ids(LABELS.index("happy")) == [cont[0], tokenizer.eos_token_id]
    assert prompt_section(builder)["emotion_word_rule"] == "first"
    assert prompt_section(PromptBuilder(tokenizer, LABELS, {}, 1))["emotion_word_rule"] == "single"
    with pytest.raises(ValueError, match="'xylophonic' is not a single token.*emotion_word_rule='first'"):
        PromptBuilder(tokenizer, LABELS, {"happy": "xylophonic"}, 1)


def test_first_token_rule_requires_distinct_first_tokens(tokenizer):
    with pytest.raises(ValueError, match="do not map to distinct first tokens"):
        emotion_word_token_ids(tokenizer, ["xylophonic", "xylophonist"], "first")
    with pytest.raises(ValueError, match="emotion_word_rule must be one of"):
        emotion_word_token_ids(tokenizer, LABELS, "last")


def test_unknown_emotion_word_label_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="not in"):
        PromptBuilder(tokenizer, LABELS, {"bored": "neutral"}, 1)


@pytest.mark.parametrize("k", [1, 3])
def test_encode_ends_at_answer_prefix_with_k_placeholders(tokenizer, k):
    builder = PromptBuilder(tokenizer, LABELS, {}, k)
    ids, positions = builder.encode("Oh well, whatever.", "Ses01F")
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)
    assert "Speaker: Ses01F" in text and "Transcript: Oh well, whatever." in text
    assert len(positions) == k and all(ids[p] == builder.placeholder_id for p in positions)
    assert sum(t == builder.placeholder_id for t in ids) == k
    # Unknown speaker: no speaker line; a literal placeholder in the transcript is dropped.
    ids2, positions2 = builder.encode(f"sneaky {PLACEHOLDER} text", None)
    assert "Speaker:" not in tokenizer.decode(ids2) and len(positions2) == k
    # The answer continues the prompt exactly as tokenizing the full text would.
    full = tokenizer.encode(tokenizer.decode(ids) + " angry" + tokenizer.eos_token, add_special_tokens=False)
    assert full == ids + builder.answer_ids(LABELS.index("angry"))


def test_text_only_prompt_drops_the_audio_line_and_nothing_else(tokenizer):
    builder = PromptBuilder(tokenizer, LABELS, {}, 3)
    ids, positions = builder.encode("Oh well, whatever.", "Ses01F", soft=False)
    assert positions == [] and builder.placeholder_id not in ids
    soft_text = tokenizer.decode(builder.encode("Oh well, whatever.", "Ses01F")[0])
    assert tokenizer.decode(ids) == soft_text.replace("\nAudio: " + PLACEHOLDER * 3, "")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)


def test_placeholder_is_added_to_a_tokenizer_without_it(tokenizer):
    """A real Qwen folder has no <AUDIO>: the builder adds it as one special token."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != PLACEHOLDER]
    spec["model"]["vocab"]["<|unused|>"] = spec["model"]["vocab"].pop(PLACEHOLDER)  # keep ids dense
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        chat_template=tokenizer.chat_template,
    )
    assert PLACEHOLDER not in bare.get_vocab()
    assert len(bare.encode(PLACEHOLDER, add_special_tokens=False)) > 1
    builder = PromptBuilder(bare, LABELS, {}, 1)
    assert len(bare.encode(PLACEHOLDER, add_special_tokens=False)) == 1
    ids, positions = builder.encode("hello", None)
    assert ids[positions[0]] == builder.placeholder_id == bare.convert_tokens_to_ids(PLACEHOLDER)


def test_inject_replaces_only_placeholder_rows():
    torch.manual_seed(0)
    tokens = torch.randn(10, 8)
    soft = torch.randn(2, 8, requires_grad=True)
    out = inject_soft_prompt(tokens, [3, 4], soft)
    keep = [i for i in range(10) if i not in (3, 4)]
    assert torch.equal(out[keep], tokens[keep]) and torch.equal(out[[3, 4]], soft.detach())
    out.sum().backward()
    assert torch.equal(soft.grad, torch.ones_like(soft))
    assert not torch.equal(tokens[3], out[3].detach())  # the input was not modified in place

    batched = torch.randn(3, 10, 8)
    soft_b = torch.randn(3, 2, 8)
    pos = torch.tensor([[1, 2], [5, 6], [8, 9]])
    out_b = inject_soft_prompt(batched, pos, soft_b)
    for b in range(3):
        assert torch.equal(out_b[b], inject_soft_prompt(batched[b], pos[b], soft_b[b]))


def test_projector_shapes_and_keys():
    proj = Projector(in_dim=16, llm_hidden=8, num_soft_tokens=3, hidden=32)
    assert proj(torch.randn(5, 16)).shape == (5, 3, 8)
    assert sorted(proj.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


def test_emotion_posteriors_are_restricted_softmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ids = [7, 3, 42, 11]
    post = emotion_posteriors(logits, ids)
    assert torch.allclose(post.sum(-1), torch.ones(4))
    expected = torch.exp(logits[:, ids]) / torch.exp(logits[:, ids]).sum(-1, keepdim=True)
    assert torch.allclose(post, expected, atol=1e-6)
    # Only the emotion-token logits matter: changing any other logit changes nothing.
    other = logits.clone()
    other[:, 0] += 100.0
    assert torch.equal(emotion_posteriors(other, ids), post)
