"""Device as configuration: one resolver for training, export and serving, and the release of a
dropped engine's GPU memory.

Every CUDA path has its CPU twin running the same code (`--device cpu`); asking for CUDA on a
machine without it fails here, before any model is built or any file written.
"""

from __future__ import annotations

import gc
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """`auto|cpu|cuda[:N]` as a torch device: auto = CUDA when torch sees a GPU, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda")
    return device


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (lists of strings stay as they are); `index` stays on the
    CPU because it addresses host-side arrays of predictions."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "index" else v
        for k, v in batch.items()
    }


def release_device_memory() -> bool:
    """Collect dropped objects and hand torch's cached CUDA blocks back to the driver, so an
    engine built next (a rebuild after a failure) finds the memory the old one held. ORT's
    arena and vLLM's KV cache go with their owners' collection; torch keeps freed blocks
    cached until asked. Returns whether there was a CUDA cache to empty."""
    gc.collect()
    if not torch.cuda.is_initialized():  # never initialise CUDA just to empty a cache nobody filled
        return False
    torch.cuda.empty_cache()
    return True
