"""The LLM: a local tokenizer for built models, the model itself, LoRA, posteriors.

Built presets (tiny/small/base) have no hub to download from, so they get a Qwen-style byte-level
BPE tokenizer trained here (same special tokens and chat template as Qwen2.5) and a randomly
initialised `Qwen2ForCausalLM`. Presets with `LLMConfig.path` load a real causal LM of any family
transformers loads (the paper preset a Qwen2.5 folder, `smollm2` a Llama-family GGUF) with its
own tokenizer and chat template. Everything after this module sees the same kind of objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import copy

import torch

from emoq_serve.config import LLMConfig, resolve_local_path
from emoq_serve.model.prompt import PLACEHOLDER, SYSTEM_PROMPT, answer_text, user_message

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen2's pre-tokenizer split (digits one by one, words with their leading space).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2.5's chat template without the tool-calling branches.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: How often each answer line enters the tokenizer corpus: enough for BPE to merge every emotion
#: word (with its leading space) into one token even in a 1k vocabulary.
ANSWER_REPEATS = 200


def tokenizer_corpus(transcripts: Iterable[str], words: Sequence[str]) -> list[str]:
    """Texts to train a built LLM's tokenizer on: transcripts, the prompt template, the answers."""
    texts = [SYSTEM_PROMPT, "system user assistant"]
    for t in transcripts:
        texts.append(t)
        texts.append(user_message(t, "Ses01F", 1).replace(PLACEHOLDER, ""))
    for w in words:
        texts.extend([answer_text(w)] * ANSWER_REPEATS)
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, placeholder: bool = True,
                    chat_template: str = CHAT_TEMPLATE):
    """Train a Qwen-style byte-level BPE tokenizer and save it (with chat template) to `out_dir`.

    `placeholder=False` leaves `<AUDIO>` out, as in a real Qwen2.5 folder (tests of that layout).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [*SPECIAL_TOKENS, PLACEHOLDER] if placeholder else list(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=special[1:],
        chat_template=chat_template,
    )
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast


def build_or_load_tokenizer(cfg: LLMConfig, words: Sequence[str], transcripts: Iterable[str], out_dir: str | Path):
    """The real model's tokenizer (`cfg.path`), or one trained on the corpus and saved to `out_dir`."""
    if cfg.path:
        return load_tokenizer(resolve_local_path(cfg.path), cfg.gguf_file)
    train_tokenizer(tokenizer_corpus(transcripts, words), cfg.tokenizer_vocab, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """A saved LLM tokenizer (a built one, a real model's folder, or the one inside a GGUF file),
    left-padding, with a pad token (the eos token when the model defines none)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        # Padding is always masked out, so any existing token serves.
        tok.pad_token = tok.eos_token
    return tok


def dequantised_copy(model):
    """The same weights in a plain model of the same class, without the GGUF quantization config.

    transformers refuses `save_pretrained` (hence peft's merge-then-save, and the bundle) on a
    GGUF-loaded model even though its weights are already dequantised, so the loaded model is
    rebuilt from its config minus `quantization_config` and given the state dict.
    """
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    dtype = model.get_input_embeddings().weight.dtype
    plain = type(model)(config).to(dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied models list the shared lm_head weight once or twice depending on the loader.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"dequantised copy does not match: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def build_or_load_llm(cfg: LLMConfig, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The base causal LM: `cfg.path` (+ `cfg.gguf_file`) loaded, or a seeded random Qwen2 sized by `cfg`.

    The embedding table covers the tokenizer (vocab_size = max(cfg.vocab_size, len(tokenizer))),
    so tokens added later (the placeholder) always have a row.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.path is not None:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(resolve_local_path(cfg.path), dtype=dtype, **kwargs)
        if cfg.gguf_file:
            model = dequantised_copy(model)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = Qwen2Config(
        vocab_size=max(cfg.vocab_size, len(tokenizer)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def apply_lora(model, cfg: LLMConfig):
    """Wrap the base LM with peft LoRA adapters; the base weights are frozen by peft."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def emotion_posteriors(last_logits: torch.Tensor, emotion_token_ids: Sequence[int]) -> torch.Tensor:
    """[B,V] logits at the last prompt position -> [B,C] softmax over the emotion-word logits."""
    ids = torch.as_tensor(list(emotion_token_ids), dtype=torch.long, device=last_logits.device)
    return torch.softmax(last_logits.index_select(-1, ids).float(), dim=-1)
