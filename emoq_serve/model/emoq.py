"""The stage-1 model: frozen HuBERT + EmoQ-Former + auxiliary head, with checkpoint I/O.

A checkpoint folder is self-contained and pickle-free:
  config.json        {"stage": 1, "model_config": ModelConfig.to_dict()}
  model.safetensors  former.* and aux_head.* tensors
  audio_encoder/     HF HuBERT folder (written when the encoder was built from the config;
                     an encoder loaded from `cfg.audio.path` is referenced, not copied)
  text_tokenizer/    the transcript tokenizer
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from emoq_serve.config import ModelConfig
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.feature_cache import FeatureCache
from emoq_serve.model.former import EmoQFormer, load_text_tokenizer
from emoq_serve.model.heads import AuxHead
from emoq_serve.model.text_init import init_from_pretrained

STAGE = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
AUDIO_DIR = "audio_encoder"
TOKENIZER_DIR = "text_tokenizer"


def read_checkpoint_config(directory: str | Path) -> tuple[ModelConfig, int]:
    """The `ModelConfig` and stage number stored in a checkpoint folder."""
    meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
    return ModelConfig.from_dict(meta["model_config"]), int(meta["stage"])


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder itself, or a training run folder (then its best/)."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).exists() and (folder / "best" / CONFIG_FILE).exists():
        folder = folder / "best"
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no checkpoint in {path} (expected {CONFIG_FILE} or best/{CONFIG_FILE})")
    return folder


class EmoQStage1(nn.Module):
    """batch dict (see `emoq_serve.data.batching.collate`) -> (z [B,D], logits [B,C]).

    `_weights_dir` is for `load`: it points the encoder and tokenizer at a checkpoint's copies
    and skips `text_init` (the checkpoint's former weights replace it anyway).
    """

    def __init__(self, cfg: ModelConfig, _weights_dir: Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        audio_cfg, former_cfg = cfg.audio, cfg.former
        if _weights_dir is not None:
            if (_weights_dir / AUDIO_DIR).is_dir():
                audio_cfg = dataclasses.replace(audio_cfg, path=str(_weights_dir / AUDIO_DIR))
            former_cfg = dataclasses.replace(former_cfg, tokenizer=str(_weights_dir / TOKENIZER_DIR))
        self.audio_encoder = AudioEncoder(audio_cfg)
        self.text_tokenizer = load_text_tokenizer(former_cfg)
        self.former = EmoQFormer(cfg.former, self.audio_encoder.hidden_size, len(self.text_tokenizer))
        if cfg.former.text_init and _weights_dir is None:
            init_from_pretrained(self.former, cfg.former.text_init)
        self.aux_head = AuxHead(cfg.former.hidden_size, cfg.former.aux_hidden, len(cfg.labels), cfg.former.dropout)
        self._cache = FeatureCache(self.audio_encoder, cfg.audio.cache_dir) if cfg.audio.cache_dir else None

    @classmethod
    def from_parts(cls, cfg: ModelConfig, audio_encoder: AudioEncoder, former: EmoQFormer, text_tokenizer: object,
                   aux_head: AuxHead) -> EmoQStage1:
        """The model around already-built parts (e.g. a bundle's eager files), nothing initialised."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.cfg, model.text_tokenizer, model._cache = cfg, text_tokenizer, None
        model.audio_encoder, model.former, model.aux_head = audio_encoder, former, aux_head
        return model

    def encode_audio(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-encoder features, through the on-disk cache when `cfg.audio.cache_dir` is set."""
        encode = self._cache if self._cache is not None else self.audio_encoder
        frames, frame_mask = encode(waveforms, lengths)
        device = self.former.queries.device
        return frames.to(device), frame_mask.to(device)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled, L2-normalised utterance embedding z [B,D]."""
        frames, frame_mask = self.encode_audio(batch["waveforms"], batch["lengths"])
        device = frames.device
        return self.former.embed(frames, frame_mask, batch["input_ids"].to(device), batch["text_mask"].to(device))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(batch)
        return z, self.aux_head(z)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """former.* and aux_head.* (the encoder is frozen and stored in its own HF folder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("audio_encoder.")}

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = self.cfg.to_dict()
        config["audio"]["cache_dir"] = None  # a property of the training machine, not the model
        meta = {"stage": STAGE, "model_config": config}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, out / WEIGHTS_FILE, metadata={"stage": str(STAGE)})
        if not self.cfg.audio.path:
            self.audio_encoder.save_pretrained(out / AUDIO_DIR)
        self.text_tokenizer.save_pretrained(str(out / TOKENIZER_DIR))

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> EmoQStage1:
        """Rebuild from a `save` folder; outputs are identical to the saved model's."""
        folder = Path(directory)
        cfg, _ = read_checkpoint_config(folder)
        model = cls(cfg, _weights_dir=folder)
        tensors = load_file(folder / WEIGHTS_FILE, device=str(map_location))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("audio_encoder.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")
        return model.to(map_location)
