"""The frozen speech encoder: transformers' HuBERT, with a frame mask derived from sample lengths.

Padding invariance for both HuBERT kinds. `feat_extract_norm="layer"` models (HuBERT-large)
normalise each frame on its own, so Hugging Face's attention mask is all they need.
`"group"` models (HuBERT-base) normalise each channel of the first conv layer over *time*, and
HF's GroupNorm averages the padding into those statistics, which is why its processors never
batch them with a mask and why a padded row used to differ from the same clip alone. Here the
first layer's statistics are taken over each row's valid positions only (the same numbers
GroupNorm computes on the unpadded clip), and the encoder gets the frame mask. Either way a
clip encodes to the same frames alone or in any padded batch, which is what the feature cache
(unpadded, one clip at a time) and the batching server both rely on.
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


def masked_group_norm(x: torch.Tensor, valid: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm` (one group per channel) on x [B,C,T] with each row's statistics over its valid [B,T]
    positions only: on an unpadded row exactly what `norm(x)` computes."""
    weights = valid.to(x.dtype)[:, None]
    count = weights.sum(-1, keepdim=True)
    mean = (x * weights).sum(-1, keepdim=True) / count
    var = ((x - mean) ** 2 * weights).sum(-1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight[:, None] + norm.bias[:, None]


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
        self.group_norm = self.hubert.config.feat_extract_norm == "group"
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

    def frame_lengths(self, lengths: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Valid outputs per row: L -> floor((L - k) / s) + 1 through the first `num_layers` conv
        layers (all of them by default: the frames), floored at 0."""
        n = lengths.to(torch.int64)
        for k, s in list(zip(self.conv_kernel, self.conv_stride))[:num_layers]:
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp(min=0)

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waveforms = waveforms.to(torch.float32)
        short = torch.sym_max(0, self.min_samples - waveforms.shape[1])
        waveforms = nn.functional.pad(waveforms, (0, short))
        positions = torch.arange(waveforms.shape[1], device=waveforms.device)
        waveforms = waveforms * (positions[None, :] < lengths[:, None])
        # A row shorter than one frame (e.g. no audio) is shown a zeroed one-frame window, so
        # every row has a valid frame to normalise and attend over; frame_mask still marks it empty.
        visible = lengths.clamp(min=self.min_samples)
        features = self._conv_features(waveforms, visible)
        hidden = self.hubert.feature_projection(features.transpose(1, 2))
        frame_positions = torch.arange(hidden.shape[1], device=hidden.device)
        visible_frames = frame_positions[None, :] < self.frame_lengths(visible)[:, None]
        frames = self.hubert.encoder(hidden, attention_mask=visible_frames).last_hidden_state
        frame_mask = frame_positions[None, :] < self.frame_lengths(lengths)[:, None]
        return frames, frame_mask

    def _conv_features(self, waveforms: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """HuBERT's conv stack [B,S] -> [B,C,F]; a group-norm first layer uses masked statistics.

        Only the first layer needs care: each later valid position reads valid inputs alone (no
        conv padding), so whatever the padded tail computes never reaches a valid frame.
        """
        conv_layers = self.hubert.feature_extractor.conv_layers
        x = waveforms[:, None]
        if self.group_norm:
            first = conv_layers[0]
            x = first.conv(x)
            valid = torch.arange(x.shape[-1], device=x.device)[None, :] < self.frame_lengths(visible, 1)[:, None]
            x = first.activation(masked_group_norm(x, valid, first.layer_norm))
            conv_layers = conv_layers[1:]
        for layer in conv_layers:
            x = layer(x)
        return x

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
