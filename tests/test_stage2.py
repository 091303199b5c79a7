"""Stage 2 end to end on the tiny preset: injection, weighted loss, posteriors, grads, save/load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emoq_serve.config import ModelConfig, preset
from emoq_serve.data.batching import collate
from emoq_serve.data.types import Example
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.former import EmoQFormer, load_text_tokenizer
from emoq_serve.model.llm import build_or_load_tokenizer
from emoq_serve.model.prompt import resolve_emotion_words
from emoq_serve.model.stage2 import EmoQStage2, answer_loss
from training import stage2
from training.common import PARAM_GROUPS, make_optimizer

TRANSCRIPTS = [
    "I can't believe you did that!",
    "It is a calm day at the office.",
    "Oh well, whatever.",
    "This is the best news I have heard all year, thank you so much.",
    "",
]


def make_examples(n: int, seed: int = 0) -> list[Example]:
    """Utterances of different audio and transcript lengths (so padding matters), some speakers
    unknown, one without transcript."""
    rng = np.random.default_rng(seed)
    return [
        Example(
            id=f"u{i}",
            audio=(0.1 * rng.standard_normal(int(rng.integers(2_000, 6_000)))).astype(np.float32),
            transcript=TRANSCRIPTS[i % len(TRANSCRIPTS)],
            label=i % 4,
            speaker=None if i % 3 == 0 else f"spk{i}",
        )
        for i in range(n)
    ]


def build_model(cfg: ModelConfig, tok_dir, use_former: bool = True) -> EmoQStage2:
    """A tiny stage-2 model with random weights and a non-zero LoRA update (lora_B starts at 0,
    which would hide a LoRA path that is not wired in)."""
    torch.manual_seed(0)
    audio = AudioEncoder(cfg.audio)
    text_tok = load_text_tokenizer(cfg.former)
    former = EmoQFormer(cfg.former, audio.hidden_size, len(text_tok)) if use_former else None
    words = list(resolve_emotion_words(cfg.labels, cfg.llm.emotion_words).values())
    llm_tok = build_or_load_tokenizer(cfg.llm, words, TRANSCRIPTS * 10, tok_dir)
    model = EmoQStage2.build(cfg, audio, former, text_tok, llm_tok)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


def batch_of(model: EmoQStage2, examples: list[Example]) -> dict:
    return collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> EmoQStage2:
    return build_model(preset("tiny"), tmp_path_factory.mktemp("tok"))


def test_answer_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    targets = torch.tensor([[0, 1], [1, 2]])
    weights = torch.tensor([[5.0, 1.0], [5.0, 1.0]])
    ce = [
        -np.log(np.exp(2) / (np.exp(2) + 2)),
        -np.log(np.e / (np.e + 2)),
        -np.log(1 / (2 + np.exp(3))),
        -np.log(1 / 3),
    ]
    expected = (5 * ce[0] + ce[1] + 5 * ce[2] + ce[3]) / 12
    assert answer_loss(logits, targets, weights).item() == pytest.approx(expected, rel=1e-6)


def test_injected_embeddings_hold_projector_output_only_at_placeholders(model):
    batch = batch_of(model, make_examples(3))
    captured = {}

    def grab(_module, _args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.llm.get_base_model().model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.predict(batch)
    finally:
        handle.remove()
    inputs = model.prompt_inputs(batch["transcripts"], batch["speakers"])
    with torch.no_grad():
        tokens = model.llm.get_input_embeddings()(inputs["input_ids"])
        soft = model.projector(model.utterance_vector(batch))
    embeds = captured["embeds"]
    is_placeholder = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    rows = torch.arange(3)[:, None]
    is_placeholder[rows, inputs["placeholders"]] = True
    assert (inputs["input_ids"][is_placeholder] == model.prompt.placeholder_id).all()
    assert torch.equal(embeds[~is_placeholder], tokens[~is_placeholder])
    assert torch.equal(embeds[rows, inputs["placeholders"]], soft)
    assert not torch.allclose(embeds[is_placeholder], tokens[is_placeholder])


def test_left_padding_masks_and_positions(model):
    batch = batch_of(model, make_examples(3))
    inputs = model.prompt_inputs(batch["transcripts"], batch["speakers"])
    ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padded, ends aligned
    for b in range(3):
        alone, _ = model.prompt.encode(batch["transcripts"][b], batch["speakers"][b])
        n = len(alone)
        assert ids[b, -n:].tolist() == alone and mask[b].sum() == n
        assert pos[b, -n:].tolist() == list(range(n))


def test_weighted_loss_equals_hand_computation_through_the_llm(model):
    batch = batch_of(model, make_examples(3))
    answers = [model.prompt.answer_ids(int(y)) for y in batch["labels"]]
    inputs = model.prompt_inputs(batch["transcripts"], batch["speakers"], answers)
    with torch.no_grad():
        soft = model.projector(model.utterance_vector(batch))
        embeds = model.llm.get_input_embeddings()(inputs["input_ids"])
        rows = torch.arange(3)[:, None]
        embeds[rows, inputs["placeholders"]] = soft
        full = model.llm(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"]
        ).logits  # [B,T,V], every position
        loss = model.loss(batch)
    logp = F.log_softmax(full.double(), dim=-1)
    w = model.cfg.llm.emotion_word_weight
    num = den = 0.0
    for b, (word, end) in enumerate(answers):
        # The answer is the last two tokens; position t predicts token t+1.
        num += -w * logp[b, -3, word].item() - logp[b, -2, end].item()
        den += w + 1.0
    assert loss.item() == pytest.approx(num / den, rel=1e-5)
    assert answers[0][1] == model.llm_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_loss_from_every_position_equals_the_answer_only_loss(model):
    batch = batch_of(model, make_examples(3))
    with torch.no_grad():
        assert model.loss(batch, all_positions=True).item() == pytest.approx(model.loss(batch).item(), rel=1e-6)


def test_posteriors_sum_to_one_and_ignore_batch_composition(model):
    examples = make_examples(5)
    with torch.no_grad():
        together = model.predict(batch_of(model, examples))
        alone = torch.cat([model.predict(batch_of(model, [e])) for e in examples])
        shuffled = model.predict(batch_of(model, [examples[3], examples[0], examples[4]]))
    assert together.shape == (5, 4)
    assert torch.allclose(together.sum(-1), torch.ones(5), atol=1e-6)
    assert (together > 0).all()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled, together[[3, 0, 4]], atol=1e-5, rtol=0)
    assert together.std(0).max() > 1e-4  # the inputs actually matter


def test_zero_shot_scores_the_llm_alone_on_the_text_prompt(model):
    """predict(soft_prompt=False): each row is the LLM's emotion-word softmax on its text-only
    prompt, computed alone; the audio (and the former) no longer enter."""
    examples = make_examples(4)
    batch = batch_of(model, examples)
    inputs = model.prompt_inputs(batch["transcripts"], batch["speakers"], soft=False)
    assert inputs["placeholders"].shape == (4, 0) and not (inputs["input_ids"] == model.prompt.placeholder_id).any()
    words = model.prompt.emotion_token_ids
    with torch.no_grad():
        zero = model.predict(batch, soft_prompt=False)
        for i, e in enumerate(examples):
            ids, _ = model.prompt.encode(e.transcript, e.speaker, soft=False)
            last = model.llm(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(zero[i], torch.softmax(last[words], -1), atol=1e-5, rtol=0)
        louder = batch_of(model, [dataclasses.replace(e, audio=3 * e.audio[::-1].copy()) for e in examples])
        torch.testing.assert_close(model.predict(louder, soft_prompt=False), zero, atol=0, rtol=0)
        assert (model.predict(louder) - model.predict(batch)).abs().max() > 1e-4  # the soft prompt does read it


def test_only_lora_former_and_projector_get_gradients(model):
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        model.loss(batch_of(model, make_examples(4))).backward()
        for name, p in model.named_parameters():
            trainable = name.startswith(("former.", "projector.")) or "lora_" in name
            assert p.requires_grad == trainable, name
            if not trainable:
                assert p.grad is None, name
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        for part in ("former.", "projector.", "lora_B"):
            assert sum(g.abs().sum() for n, g in grads.items() if part in n) > 0, part
        assert any("lora_A" in n and g.abs().sum() > 0 for n, g in grads.items())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_small_preset_learning_rates_reach_every_trainable_part(model):
    """The small preset's `lr_groups` put the projector and LoRA at their rate and the former's
    fresh parts at theirs; the MiniLM-initialised body (here: self-attention) keeps `lr`."""
    cfg = stage2.train_config("small")
    lrs = {id(p): g["lr"] for g in make_optimizer(model, cfg).param_groups for p in g["params"]}
    by_name = {name: lrs.get(id(p)) for name, p in model.named_parameters()}
    groups = cfg.lr_groups
    assert {by_name[n] for n in by_name if n.startswith("projector.")} == {groups[PARAM_GROUPS["projector"]]}
    assert {by_name[n] for n in by_name if ".lora_" in n} == {groups[PARAM_GROUPS["lora"]]}
    assert {by_name[n] for n in by_name if ".cross_attn." in n or n == "former.queries"} == {groups[PARAM_GROUPS["former_fresh"]]}
    assert {by_name[n] for n in by_name if ".self_attn.q." in n and n.startswith("former.")} == {cfg.lr}
    assert all(lr is None for n, lr in by_name.items() if n.startswith("llm.") and ".lora_" not in n)  # frozen


def test_save_load_reproduces_posteriors(model, tmp_path):
    batch = batch_of(model, make_examples(4))
    model.save(tmp_path)
    for name in ("config.json", "model.safetensors", "lora/adapter_model.safetensors",
                 "llm_base/model.safetensors", "llm_tokenizer/tokenizer.json", "audio_encoder/config.json"):
        assert (tmp_path / name).exists(), name
    loaded = EmoQStage2.load(tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(batch), model.predict(batch), atol=1e-6, rtol=0)
    assert loaded.prompt.emotion_token_ids == model.prompt.emotion_token_ids
    resumed = EmoQStage2.load(tmp_path, trainable=True)
    assert any("lora_" in n and p.requires_grad for n, p in resumed.named_parameters())


def test_modality_ablations_ignore_the_dropped_modality(model, tmp_path):
    tiny = preset("tiny")
    examples = make_examples(2)
    other_text = [dataclasses.replace(e, transcript="Completely different words here.") for e in examples]
    other_audio = [dataclasses.replace(e, audio=np.flip(e.audio).copy() * 3) for e in examples]

    def outputs(m: EmoQStage2, exs: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            batch = batch_of(m, exs)
            return m.utterance_vector(batch), m.predict(batch)

    # The full model sees both modalities.
    z, post = outputs(model, examples)
    assert not torch.allclose(outputs(model, other_audio)[0], z, atol=1e-6)
    assert not torch.allclose(outputs(model, other_text)[1], post, atol=1e-5)

    audio_only = build_model(dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, modality="audio")), tmp_path / "a")
    text_only = build_model(dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, modality="text")), tmp_path / "t")
    for m, changed in ((audio_only, other_text), (text_only, other_audio)):
        z, post = outputs(m, examples)
        z2, post2 = outputs(m, changed)
        assert torch.isfinite(post).all()
        torch.testing.assert_close(z2, z, atol=1e-6, rtol=0)
        torch.testing.assert_close(post2, post, atol=1e-6, rtol=0)

    no_former = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, use_former=False))
    raw = build_model(no_former, tmp_path / "raw", use_former=False)
    z, post = outputs(raw, examples)
    assert raw.former is None and z.shape == (2, raw.audio_encoder.hidden_size)
    assert not torch.allclose(outputs(raw, other_audio)[0], z, atol=1e-6)
    assert torch.allclose(post.sum(-1), torch.ones(2), atol=1e-6)


def test_emotion_word_that_is_not_one_token_fails_clearly(tmp_path):
    cfg = preset("tiny")
    cfg.llm.emotion_words = {"happy": "overjoyedness"}
    words = list(resolve_emotion_words(cfg.labels, {}).values())  # tokenizer never saw the word
    tok = build_or_load_tokenizer(cfg.llm, words, TRANSCRIPTS, tmp_path)
    with pytest.raises(ValueError, match="'overjoyedness' is not a single token"):
        EmoQStage2.build(cfg, AudioEncoder(cfg.audio), None, load_text_tokenizer(cfg.former), tok)


@pytest.mark.slow
def test_train_stage2_from_stage1_then_resume(tmp_path):
    from emoq_serve.data import load_corpus
    from emoq_serve.model.emoq import EmoQStage1
    from training.stage2 import Stage2Options, train_config, train_stage2

    corpus = load_corpus("synthetic:2", seed=0)
    cfg = preset("tiny", labels=corpus.labels)
    torch.manual_seed(0)
    EmoQStage1(cfg).save(tmp_path / "stage1" / "best")
    opts = Stage2Options(stage1_dir=str(tmp_path / "stage1"), feature_cache=str(tmp_path / "features"))
    out = tmp_path / "stage2"
    summary = train_stage2(cfg, train_config("tiny", epochs=1, batch_size=8), corpus, out, opts)
    assert set(summary["stage1_dev"]) == {"wa", "ua", "wf1"} and summary["best_epoch"] == 1
    assert 0.0 <= summary["test"]["wa"] <= 1.0
    resumed = train_stage2(cfg, train_config("tiny", epochs=2, batch_size=8), corpus, out, opts, resume=True)
    assert len((out / "log.jsonl").read_text().splitlines()) == 2 and resumed["epochs"] == 2
    best = EmoQStage2.load(out / "best")
    assert best.cfg.llm.use_former and best.cfg.audio.cache_dir is None
