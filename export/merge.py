"""The bundle's PyTorch-side artefacts: merged LLM folder, embedding table, heads, eager weights.

The LoRA adapters are merged into the base weights (peft `merge_and_unload`) so vLLM loads a
plain Qwen2 folder with no adapter machinery; the input-embedding table is also written on its
own so the server builds prompt embeddings (`embed_tokens[ids]` + soft prompt) without holding a
second copy of the LLM. The eager copies (HF HuBERT folder, former weights) let `--verify` and
the eager baseline engine recompute everything from the bundle alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from emoq_serve import bundle as names
from emoq_serve.config import LLMConfig, resolve_local_path
from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.model.stage2 import EmoQStage2


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path))


def write_heads(model: EmoQStage1 | EmoQStage2, out: Path) -> None:
    """heads.safetensors: the pooling vectors and what reads the pooled embedding, applied outside
    the ONNX graphs: the projector (stage 2) or the auxiliary head (stage 1)."""
    heads = {"pool_u": model.former.pool_u}
    name, head = ("aux_head", model.aux_head) if isinstance(model, EmoQStage1) else ("projector", model.projector)
    heads.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    _save(heads, out / names.HEADS)


def write_eager(model: EmoQStage1 | EmoQStage2, out: Path) -> None:
    """Transcript tokenizer, HF HuBERT folder and former weights for eager re-computation."""
    model.text_tokenizer.save_pretrained(str(out / names.FORMER_TOKENIZER_DIR))
    model.audio_encoder.save_pretrained(out / names.EAGER_AUDIO_ENCODER_DIR)
    _save(model.former.state_dict(), out / names.EAGER_FORMER)


def base_checkpoint_dtype(cfg: LLMConfig) -> torch.dtype:
    """The dtype the base LLM checkpoint ships in (its config.json `torch_dtype`, or `dtype` in newer
    transformers): the merged LLM is saved in it, so a bf16 7B model stays ~15 GB, not ~30 GB in fp32.
    Built (random) LLMs have no checkpoint and stay fp32, which keeps export parity at fp32 tolerances;
    a GGUF checkpoint is quantised and loads dequantised to fp32, so it is saved in fp32 too."""
    if cfg.path is None or cfg.gguf_file is not None:
        return torch.float32
    config = json.loads((Path(resolve_local_path(cfg.path)) / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{cfg.path}/config.json: torch_dtype {name!r} is not a floating-point torch dtype")
    return dtype


def write_merged_llm(model: EmoQStage2, out: Path) -> torch.nn.Module:
    """Merge LoRA into the base LM, save it (+ tokenizer, chat template) in the base checkpoint's
    dtype, and its embedding table (fp32, like the other host-side tensors).

    Mutates `model.llm` (peft merges in place), so eager references must be computed before.
    Returns the merged model.
    """
    merged = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
    # Merge in the training precision (fp32), round once when saving.
    merged = merged.to(base_checkpoint_dtype(model.cfg.llm))
    llm_dir = out / names.LLM_DIR
    merged.save_pretrained(str(llm_dir), safe_serialization=True)
    model.llm_tokenizer.save_pretrained(str(llm_dir))
    _save({"weight": merged.get_input_embeddings().weight}, out / names.EMBED_TOKENS)
    return merged
