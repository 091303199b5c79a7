"""The frozen speech encoder: transformers' HuBERT, with a frame mask derived from sample lengths.

Padding convention (Hugging Face's): models with `feat_extract_norm="layer"` (HuBERT-large)
take an `attention_mask`; models with `"group"` (HuBERT-base) must NOT get one — their
processors never return it and passing it degrades batched inference — so for them the padded
tail is only zeroed. Either way the padding is zeroed and `frame_mask` marks the valid frames,
computed exactly through the conv stack; "group" models are therefore not padding-invariant
(see ARCHITECTURE.md), "layer" models are.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from emoq_serve.config import AudioEncoderConfig, resolve_local_path

log = logging.getLogger(__name__)


def hubert_config(cfg: AudioEncoderConfig) -> HubertConfig:
    """A HuBERT config with the preset's shape; conv kernels/strides are HuBERT's (20 ms frames)."""
    layer_norm = cfg.feat_extract_norm == "layer"
    return HubertConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=tuple(cfg.conv_dim),
        feat_extract_norm=cfg.feat_extract_norm,
        do_stable_layer_norm=layer_norm,
        conv_bias=layer_norm,
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        apply_spec_augment=False,
    )


class AudioEncoder(nn.Module):
    """Frozen HuBERT: waveforms [B,S] f32 + lengths [B] i64 -> frames [B,F,Da] + frame_mask [B,F].

    Built with random weights from the config, or loaded from `cfg.path`. It stays in eval mode
    whatever the parent module's mode is and never takes gradients.
    """

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.path:
            self.hubert = HubertModel.from_pretrained(resolve_local_path(cfg.path))
        else:
            self.hubert = HubertModel(hubert_config(cfg))
        self.hubert.requires_grad_(False)
        self.hubert.eval()
        self.conv_kernel = tuple(self.hubert.config.conv_kernel)
        self.conv_stride = tuple(self.hubert.config.conv_stride)
        self.pass_attention_mask = self.hubert.config.feat_extract_norm == "layer"
        self._identity: str | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.hubert.config.hidden_size)

    @property
    def min_samples(self) -> int:
        """Receptive field of one frame; shorter inputs are zero-padded to it (F = 1, masked)."""
        n = 1
        for k, s in reversed(list(zip(self.conv_kernel, self.conv_stride))):
            n = (n - 1) * s + k
        return n

    def train(self, mode: bool = True) -> AudioEncoder:
        """Ignore train(): the encoder is frozen, so dropout/spec-augment must never switch on."""
        return super().train(False)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per row: L -> floor((L - k) / s) + 1 through every conv layer, floored at 0."""
        n = lengths.to(torch.int64)
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp(min=0)

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waveforms = waveforms.to(torch.float32)
        short = torch.sym_max(0, self.min_samples - waveforms.shape[1])
        waveforms = nn.functional.pad(waveforms, (0, short))
        positions = torch.arange(waveforms.shape[1], device=waveforms.device)
        sample_mask = positions[None, :] < lengths[:, None]
        waveforms = waveforms * sample_mask
        attention_mask = None
        if self.pass_attention_mask:
            # HF indexes frame `length - 1` of every row, so a row shorter than one frame (e.g.
            # no audio) is shown a zeroed one-frame window; frame_mask still marks it empty.
            visible = lengths.clamp(min=self.min_samples)
            attention_mask = (positions[None, :] < visible[:, None]).to(torch.int64)
        frames = self.hubert(waveforms, attention_mask=attention_mask).last_hidden_state
        frame_positions = torch.arange(frames.shape[1], device=frames.device)
        frame_mask = frame_positions[None, :] < self.frame_lengths(lengths)[:, None]
        return frames, frame_mask

    def identity(self) -> str:
        """sha256 over the config and every weight: the feature-cache key part for this encoder."""
        if self._identity is None:
            # Provenance fields (_name_or_path, versions, dtype) differ between a built and a
            # reloaded copy of the same encoder; only the architecture and weights count.
            arch = {
                k: v for k, v in self.hubert.config.to_dict().items()
                if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")
            }
            h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.hubert.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face folder (config.json + model.safetensors) that `cfg.path` can load."""
        self.hubert.save_pretrained(str(directory), safe_serialization=True)
