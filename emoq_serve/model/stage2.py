"""Stage 2: the EmoQ-Former's utterance vector as a soft prompt to a LoRA-tuned causal LLM.

z = pool(former(audio frames, transcript)) -> projector -> K soft tokens written over the
`<AUDIO>` placeholder(s) of the chat prompt -> LLM logits at the last prompt position, read at
the emotion-word token ids -> softmax = posteriors. Training appends the answer (emotion word +
end-of-turn token) and minimises a token-weighted causal LM loss on it.

Prompts of a batch differ in length, so they are left-padded: every prompt then ends at the same
column, the answer logits are the last few positions (`logits_to_keep`, no [B,T,V] tensor), and
explicit position ids (cumsum of the mask) make a padded row compute exactly what it computes
alone.

Ablations (stored in `LLMConfig`, so a checkpoint rebuilds the same model): `modality` "audio"
blanks the transcript everywhere, "text" masks out every audio frame; `use_former=False` injects
the raw audio frames' masked mean instead of the former's pooled query states.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from emoq_serve.config import ModelConfig
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.emoq import AUDIO_DIR, CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE
from emoq_serve.model.feature_cache import FeatureCache
from emoq_serve.model.former import EmoQFormer
from emoq_serve.model.llm import apply_lora, build_or_load_llm, emotion_posteriors, load_tokenizer
from emoq_serve.model.projector import Projector
from emoq_serve.model.prompt import PromptBuilder, inject_soft_prompt

STAGE = 2
LORA_DIR = "lora"
LLM_TOKENIZER_DIR = "llm_tokenizer"
LLM_BASE_DIR = "llm_base"


def answer_loss_terms(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum over its answer tokens of w * CE, sum of w), each [B]. The loss of any set of
    rows is sum(first) / sum(second), so shards of a batch (DDP ranks) add their terms up."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    w = weights.to(ce.dtype)
    return (w * ce).sum(-1), w.sum(-1)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token-weighted causal LM loss: sum(w * CE) / sum(w) over every answer token of the batch.

    logits [B,A,V] predict targets [B,A]; weights [B,A] (the emotion word weighs more than the
    end-of-turn token, so the class decision dominates the gradient).
    """
    numerator, denominator = answer_loss_terms(logits, targets, weights)
    return numerator.sum() / denominator.sum()


def masked_mean(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid frames [B,F,D] -> [B,D]; a row without valid frames gives zeros."""
    m = mask.to(frames.dtype).unsqueeze(-1)
    return (frames * m).sum(1) / m.sum(1).clamp(min=1.0)


class EmoQStage2(nn.Module):
    """Audio encoder (frozen) + EmoQ-Former + projector + peft-LoRA causal LM."""

    def __init__(
        self,
        cfg: ModelConfig,
        audio_encoder: AudioEncoder,
        former: EmoQFormer | None,
        text_tokenizer,
        llm,
        llm_tokenizer,
    ) -> None:
        super().__init__()
        if cfg.llm.use_former != (former is not None):
            raise ValueError("a former must be given exactly when cfg.llm.use_former is set")
        self.cfg = cfg
        self.audio_encoder = audio_encoder
        self.former = former
        self.text_tokenizer = text_tokenizer
        self.llm = llm
        self.llm_tokenizer = llm_tokenizer
        self.prompt = PromptBuilder(llm_tokenizer, cfg.labels, cfg.llm.emotion_words, cfg.llm.num_soft_tokens,
                                    cfg.llm.emotion_word_rule)
        in_dim = former.cfg.hidden_size if former is not None else audio_encoder.hidden_size
        llm_hidden = llm.get_input_embeddings().weight.shape[1]
        self.projector = Projector(in_dim, llm_hidden, cfg.llm.num_soft_tokens, cfg.llm.projector_hidden)
        #: Set by training so the frozen encoder runs once per utterance (same call signature).
        self.feature_cache: FeatureCache | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        audio_encoder: AudioEncoder,
        former: EmoQFormer | None,
        text_tokenizer,
        llm_tokenizer,
        seed: int = 0,
    ) -> EmoQStage2:
        """A fresh stage-2 model around given (stage-1 or new) audio/former parts.

        The prompt builder runs before the LLM is built so the placeholder token it may add to a
        real Qwen tokenizer gets an embedding row.
        """
        PromptBuilder(llm_tokenizer, cfg.labels, cfg.llm.emotion_words, cfg.llm.num_soft_tokens,
                      cfg.llm.emotion_word_rule)
        llm = apply_lora(build_or_load_llm(cfg.llm, llm_tokenizer, seed=seed), cfg.llm)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(cfg, audio_encoder, former, text_tokenizer, llm, llm_tokenizer)

    # -- forward pieces -------------------------------------------------------------------------

    def utterance_vector(self, batch: dict) -> torch.Tensor:
        """z [B,D]: the former's pooled query states (or the frames' mean without a former)."""
        encode = self.feature_cache or self.audio_encoder
        frames, frame_mask = encode(batch["waveforms"], batch["lengths"])
        device = self.projector.fc1.weight.device
        frames, frame_mask = frames.to(device), frame_mask.to(device)
        input_ids, text_mask = batch["input_ids"].to(device), batch["text_mask"].to(device)
        if self.cfg.llm.modality == "text":
            frame_mask = torch.zeros_like(frame_mask)
        if self.cfg.llm.modality == "audio":
            text_mask = torch.zeros_like(text_mask)
        if self.former is None:
            return masked_mean(frames, frame_mask)
        return self.former.embed(frames, frame_mask, input_ids, text_mask)

    def prompt_inputs(
        self, transcripts: Sequence[str], speakers: Sequence[str | None], answers: Sequence[list[int]] | None = None,
        soft: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Left-padded ids [B,T], attention mask, position ids, placeholder positions [B,K]
        ([B,0] when soft=False: the prompt without the audio line)."""
        if self.cfg.llm.modality == "audio":
            transcripts = [""] * len(transcripts)
        rows, places = [], []
        for i, (text, speaker) in enumerate(zip(transcripts, speakers)):
            ids, pos = self.prompt.encode(text, speaker, soft)
            rows.append(ids + (answers[i] if answers is not None else []))
            places.append(pos)
        width = max(len(r) for r in rows)
        pad = self.llm_tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = torch.tensor([[p + width - len(r) for p in pos] for r, pos in zip(rows, places)])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "placeholders": positions,
        }

    def _logits(self, batch: dict, answers: Sequence[list[int]] | None, keep: int, soft_prompt: bool = True) -> torch.Tensor:
        """LLM logits [B,keep,V] at the last `keep` positions of the injected prompt (+ answers);
        soft_prompt=False runs the LLM on the prompt without the audio line (former unused)."""
        inputs = self.prompt_inputs(batch["transcripts"], batch["speakers"], answers, soft_prompt)
        device = self.projector.fc1.weight.device
        embeds = self.llm.get_input_embeddings()(inputs["input_ids"].to(device))
        if soft_prompt:
            soft = self.projector(self.utterance_vector(batch))
            embeds = inject_soft_prompt(embeds, inputs["placeholders"].to(device), soft)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"].to(device),
            position_ids=inputs["position_ids"].to(device),
            logits_to_keep=keep,
            use_cache=False,
        )
        return out.logits

    def loss_terms(self, batch: dict, all_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`answer_loss_terms` of the answers for batch["labels"] (per row, [B] each). The LLM
        projects only the answer positions onto the vocabulary; all_positions=True projects every
        position, the plain causal-LM way (the same loss; benchmarks/bench_stage2_step.py's baseline)."""
        answers = [self.prompt.answer_ids(int(y)) for y in batch["labels"]]
        n = len(answers[0])
        # Left padding puts the answer last; position t predicts token t+1.
        logits = self._logits(batch, answers, keep=0 if all_positions else n + 1)[:, -(n + 1):-1]
        targets = torch.tensor(answers, device=logits.device)
        weights = torch.ones_like(targets, dtype=torch.float32)
        weights[:, 0] = self.cfg.llm.emotion_word_weight
        return answer_loss_terms(logits, targets, weights)

    def loss(self, batch: dict, all_positions: bool = False) -> torch.Tensor:
        """Weighted LM loss on the answer (emotion word, end token) for batch["labels"]."""
        numerator, denominator = self.loss_terms(batch, all_positions)
        return numerator.sum() / denominator.sum()

    def predict(self, batch: dict, soft_prompt: bool = True) -> torch.Tensor:
        """Posteriors [B,C] over cfg.labels: softmax of the emotion-word logits after "Emotion:".

        soft_prompt=False scores the LLM alone on the transcript (zero-shot before LoRA training:
        peft's LoRA starts as the identity), the baseline a tuned model must beat."""
        logits = self._logits(batch, None, keep=1, soft_prompt=soft_prompt)[:, -1]
        return emotion_posteriors(logits, self.prompt.emotion_token_ids)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Former + projector + LoRA; the audio encoder and the LLM base stay frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- checkpoint -----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Stage-1's layout plus the LLM parts (see the module docstring of `emoq`):
        config.json, model.safetensors (former.*, projector.*), audio_encoder/, text_tokenizer/,
        lora/ (peft adapter), llm_tokenizer/, and llm_base/ when the LLM was built, not loaded."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = self.cfg.to_dict()
        config["audio"]["cache_dir"] = None
        (out / CONFIG_FILE).write_text(json.dumps({"stage": STAGE, "model_config": config}, indent=2))
        weights = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        if self.former is not None:
            weights.update({f"former.{k}": v for k, v in self.former.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(out / WEIGHTS_FILE))
        self.llm.save_pretrained(str(out / LORA_DIR))
        self.llm_tokenizer.save_pretrained(str(out / LLM_TOKENIZER_DIR))
        self.text_tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        if not self.cfg.audio.path:
            self.audio_encoder.save_pretrained(out / AUDIO_DIR)
        if not self.cfg.llm.path:
            self._save_llm_base(out / LLM_BASE_DIR)

    def _save_llm_base(self, directory: Path) -> None:
        """The frozen base LM without the LoRA layers (peft wraps targets as `*.base_layer`)."""
        base = self.llm.get_base_model()
        state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
        base.save_pretrained(str(directory), state_dict=state)

    @classmethod
    def load(cls, directory: str | Path, trainable: bool = False) -> EmoQStage2:
        """Rebuild a saved model (eval mode); its posteriors equal the saved model's.

        `trainable` keeps former, projector and LoRA trainable (resuming a run); otherwise every
        parameter is frozen.
        """
        from peft import PeftModel
        from transformers import AutoTokenizer

        src = Path(directory)
        meta = json.loads((src / CONFIG_FILE).read_text())
        if meta.get("stage") != STAGE:
            raise ValueError(f"{src} holds a stage-{meta.get('stage')} checkpoint, not stage {STAGE}")
        cfg = ModelConfig.from_dict(meta["model_config"])
        audio_cfg = cfg.audio
        if (src / AUDIO_DIR).is_dir():
            audio_cfg = dataclasses.replace(audio_cfg, path=str(src / AUDIO_DIR))
        audio_encoder = AudioEncoder(audio_cfg)
        text_tokenizer = AutoTokenizer.from_pretrained(str(src / TOKENIZER_DIR))
        former = EmoQFormer(cfg.former, audio_encoder.hidden_size, len(text_tokenizer)) if cfg.llm.use_former else None
        llm_tokenizer = load_tokenizer(src / LLM_TOKENIZER_DIR)
        base_cfg = cfg.llm if cfg.llm.path else dataclasses.replace(cfg.llm, path=str(src / LLM_BASE_DIR))
        base = build_or_load_llm(base_cfg, llm_tokenizer)
        llm = PeftModel.from_pretrained(base, str(src / LORA_DIR), is_trainable=trainable)
        model = cls(cfg, audio_encoder, former, text_tokenizer, llm, llm_tokenizer)
        weights = load_file(str(src / WEIGHTS_FILE))
        model.projector.load_state_dict(_strip(weights, "projector."))
        if former is not None:
            former.load_state_dict(_strip(weights, "former."))
        if not trainable:
            model.requires_grad_(False)
        return model.eval()


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it removed (one module's state dict)."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
