"""On-disk cache of frozen-encoder features, so training pays for HuBERT once per utterance.

Key = sha256(float32 audio bytes) + the encoder's identity hash (config + weights), so a cache
shared between runs can never serve features from another encoder. One safetensors file per
utterance holds its valid frames only; a batch is re-padded on the way out, giving the same
[B,F,Da] / [B,F] shapes as `AudioEncoder.forward`. Misses are encoded one utterance at a time
(unpadded), which is the reference result even for padding-sensitive "group"-norm encoders.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emoq_serve.model.audio_encoder import AudioEncoder


class FeatureCache:
    """Wraps an `AudioEncoder` with the same call signature, backed by a folder of features."""

    def __init__(self, encoder: AudioEncoder, directory: str | Path) -> None:
        self.encoder = encoder
        self.directory = Path(directory) / encoder.identity()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, audio: torch.Tensor) -> Path:
        digest = hashlib.sha256(audio.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
        return self.directory / f"{digest}.safetensors"

    def _frames(self, audio: torch.Tensor) -> torch.Tensor:
        path = self._path(audio)
        if path.exists():
            self.hits += 1
            return load_file(path)["frames"]
        self.misses += 1
        device = next(self.encoder.parameters()).device
        frames, mask = self.encoder(audio[None].to(device), torch.tensor([audio.shape[0]], device=device))
        valid = frames[0, : int(mask[0].sum())].cpu().contiguous()
        save_file({"frames": valid}, path)
        return valid

    def __call__(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waveforms = waveforms.detach().cpu()
        rows = [self._frames(waveforms[i, : int(n)]) for i, n in enumerate(lengths.tolist())]
        num_frames = max(int(self.encoder.frame_lengths(torch.tensor(waveforms.shape[1]))), 1)
        frames = torch.zeros(len(rows), num_frames, self.encoder.hidden_size)
        for i, row in enumerate(rows):
            frames[i, : row.shape[0]] = row
        frame_mask = torch.arange(num_frames)[None, :] < self.encoder.frame_lengths(lengths.cpu())[:, None]
        return frames, frame_mask
