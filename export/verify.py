"""Parity between the trained PyTorch model and the bundle, and `--verify` of a written bundle.

One fixed padded batch of mixed lengths (0.1 s and 8 s clips, an empty transcript, a row with
no audio) runs through eager PyTorch and through the bundle's serving path: ORT graphs, pooling
and projector from `heads.safetensors`, prompt embeddings from `embed_tokens.safetensors`, and
the merged LLM in the real runtime engine (vLLM). The worst absolute differences of the pooled
embeddings and of the posteriors go into the manifest; above tolerance, export fails.

The bundle-side model is `EmoQStage2` itself with its audio encoder and former swapped for the
ORT graphs, so padding, modality ablations and prompt assembly are the training code's, and the
comparison isolates exactly what export changed (graphs, merge, serving engine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.config import SAMPLE_RATE, ModelConfig
from emoq_serve.data.batching import collate
from emoq_serve.data.types import Example
from emoq_serve.kernels import attentive_pool
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.former import EmoQFormer
from emoq_serve.model.stage2 import EmoQStage2
from emoq_serve.runtime.ort import OrtStage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    """Max abs differences that export accepts."""

    embedding: float = 1e-4
    posterior: float = 1e-4


FP32_TOLERANCES = Tolerances()
#: The fp16 audio encoder is only checked at the frame level, against the fp32 graph: fp16
#: rounding (~1e-3 relative) over a whole HuBERT leaves ~1e-2 absolute on unit-scale frames.
FP16_FRAME_TOLERANCE = 5e-2


class ParityError(RuntimeError):
    """The bundle does not reproduce the model within tolerance."""


@dataclass
class Outputs:
    """Pooled embeddings z [B,D] and posteriors [B,C] of one engine on the verification batch."""

    embeddings: np.ndarray
    posteriors: np.ndarray


def verification_examples(seed: int = 0) -> list[Example]:
    """The fixed parity batch: extreme lengths and both missing-modality cases."""
    rng = np.random.default_rng(seed)

    def clip(seconds: float) -> np.ndarray:
        return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)

    return [
        Example("short", clip(0.1), "No.", 0, "spk1"),
        Example("long", clip(8.0), "I really cannot believe this happened to us again today.", 1, None),
        Example("no_text", clip(1.5), "", 2, "spk2"),
        Example("no_audio", None, "Well, that is just wonderful news.", 3, None),
        Example("mid", clip(3.0), "It is a calm day at the office.", 0, "spk1"),
    ]


class OrtAudioEncoder:
    """audio_encoder.onnx with `AudioEncoder.forward`'s signature (swapped into EmoQStage2)."""

    def __init__(self, path: Path, threads: int) -> None:
        self.stage = OrtStage(path, threads)

    def __call__(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.stage.run(waveforms=waveforms.float(), lengths=lengths.long())
        return out["frames"].clone(), out["frame_mask"].clone()


class OrtFormer(nn.Module):
    """former.onnx + pooling with the bundle's `pool_u`, shaped like `EmoQFormer.embed`."""

    def __init__(self, cfg: ModelConfig, path: Path, pool_u: torch.Tensor, threads: int) -> None:
        super().__init__()
        self.cfg = cfg.former
        self.stage = OrtStage(path, threads)
        self.register_buffer("pool_u", pool_u)

    def embed(self, frames: torch.Tensor, frame_mask: torch.Tensor, input_ids: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
        q = self.stage.run(frames=frames.float(), frame_mask=frame_mask.bool(), input_ids=input_ids.long(),
                           text_mask=text_mask.bool())["query_states"]
        return attentive_pool(q.clone(), self.pool_u)


def _llm_tokenizer(bundle: Bundle):
    from emoq_serve.model.llm import load_tokenizer

    return load_tokenizer(bundle.file(names.LLM_DIR))


def _text_tokenizer(bundle: Bundle):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundle.file(names.FORMER_TOKENIZER_DIR)))


def _merged_llm(bundle: Bundle) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bundle.file(names.LLM_DIR)), dtype=torch.float32).eval()


def _with_heads(model: EmoQStage2, heads: dict[str, torch.Tensor]) -> EmoQStage2:
    model.projector.load_state_dict({k[len("projector."):]: v for k, v in heads.items() if k.startswith("projector.")})
    return model.eval()


def eager_model_from_bundle(bundle: Bundle) -> EmoQStage2:
    """The eager PyTorch model rebuilt from the bundle's own files (for `--verify`)."""
    cfg = bundle.model_config
    encoder = AudioEncoder(dataclasses.replace(cfg.audio, path=str(bundle.file(names.EAGER_AUDIO_ENCODER_DIR))))
    former_weights = load_file(str(bundle.file(names.EAGER_FORMER)))
    former = EmoQFormer(cfg.former, encoder.hidden_size, former_weights["embeddings.word.weight"].shape[0])
    former.load_state_dict(former_weights)
    model = EmoQStage2(cfg, encoder, former.eval(), _text_tokenizer(bundle), _merged_llm(bundle), _llm_tokenizer(bundle))
    return _with_heads(model, load_file(str(bundle.file(names.HEADS))))


def ort_model_from_bundle(bundle: Bundle, threads: int = 1) -> EmoQStage2:
    """EmoQStage2 whose audio encoder and former are the bundle's ONNX graphs (transformers LLM)."""
    cfg = bundle.model_config
    heads = load_file(str(bundle.file(names.HEADS)))
    former = OrtFormer(cfg, bundle.file(names.FORMER_ONNX), heads["pool_u"], threads)
    encoder = AudioEncoder(dataclasses.replace(cfg.audio, path=str(bundle.file(names.EAGER_AUDIO_ENCODER_DIR))))
    model = EmoQStage2(cfg, encoder, former, _text_tokenizer(bundle), _merged_llm(bundle), _llm_tokenizer(bundle))
    model.encode_audio = OrtAudioEncoder(bundle.file(names.AUDIO_ENCODER_ONNX), threads)
    return _with_heads(model, heads)


@torch.no_grad()
def model_outputs(model: EmoQStage2, examples: list[Example]) -> Outputs:
    """z and posteriors of a (possibly ORT-backed) stage-2 model on one padded batch."""
    batch = collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens)
    return Outputs(model.utterance_vector(batch).float().numpy(), model.predict(batch).float().numpy())


def runtime_posteriors(bundle: Bundle, examples: list[Example]) -> np.ndarray:
    """Posteriors from the serving engine itself: ORT + pooling + projector + vLLM (fp32, 1 thread)."""
    from emoq_serve.runtime.config import runtime_preset
    from emoq_serve.runtime.pipeline import OnnxPipeline
    from emoq_serve.runtime.types import Utterance

    utterances = [Utterance(np.zeros(0, np.float32) if ex.audio is None else ex.audio, ex.transcript, ex.speaker)
                  for ex in examples]

    async def run() -> np.ndarray:
        pipeline = OnnxPipeline(bundle, runtime_preset("test").replace(llm_backend="vllm", verify_hashes=False))
        try:
            return np.stack([p.probabilities for p in await pipeline.recognize(utterances)])
        finally:
            await pipeline.close()

    return asyncio.run(run())


def parity_report(reference: Outputs, bundle_embeddings: np.ndarray, bundle_posteriors: np.ndarray,
                  tolerances: Tolerances, backend: str) -> dict[str, Any]:
    """The manifest's `parity` section; raises ParityError naming what is off and by how much."""
    report = {
        "embedding_max_abs": float(np.abs(reference.embeddings - bundle_embeddings).max()),
        "posterior_max_abs": float(np.abs(reference.posteriors - bundle_posteriors).max()),
        "tolerances": dataclasses.asdict(tolerances),
        "backend": backend,
        "cases": int(reference.posteriors.shape[0]),
    }
    failures = [
        f"{what} max abs diff {report[key]:.3g} > tolerance {tol:g}"
        for what, key, tol in (("pooled embedding", "embedding_max_abs", tolerances.embedding),
                               ("posterior", "posterior_max_abs", tolerances.posterior))
        if not report[key] <= tol  # `not <=` also catches NaN
    ]
    if failures:
        raise ParityError("bundle does not reproduce the model: " + "; ".join(failures))
    return report


def measure_parity(reference: Outputs, bundle: Bundle, examples: list[Example], backend: str = "vllm",
                   tolerances: Tolerances = FP32_TOLERANCES) -> dict[str, Any]:
    """Embeddings through the ORT graphs; posteriors through the serving engine (`backend`
    "vllm") or through the ORT graphs + the merged LLM in transformers ("transformers")."""
    ort_side = model_outputs(ort_model_from_bundle(bundle), examples)
    if backend == "vllm":
        posteriors = runtime_posteriors(bundle, examples)
    elif backend == "transformers":
        posteriors = ort_side.posteriors
    else:
        raise ValueError(f"unknown parity backend {backend!r}; expected 'vllm' or 'transformers'")
    return parity_report(reference, ort_side.embeddings, posteriors, tolerances, backend)


def fp16_frame_diff(bundle_dir: Path, waveforms: torch.Tensor, lengths: torch.Tensor) -> float:
    """Max abs difference of valid frames between the fp16 and fp32 audio graphs (ORT CPU)."""
    frames, valid = OrtAudioEncoder(bundle_dir / names.AUDIO_ENCODER_ONNX, 1)(waveforms, lengths)
    frames16, _ = OrtAudioEncoder(bundle_dir / names.AUDIO_ENCODER_FP16_ONNX, 1)(waveforms, lengths)
    return float((frames - frames16).abs()[valid].max())


def verify_bundle(path: str | Path, backend: str = "vllm",
                  tolerances: Tolerances = FP32_TOLERANCES) -> dict[str, Any]:
    """`emoq export --verify`: schema + hashes, then eager-from-bundle vs the serving path."""
    bundle = Bundle.open(path, verify_hashes=True)
    examples = verification_examples()
    reference = model_outputs(eager_model_from_bundle(bundle), examples)
    return measure_parity(reference, bundle, examples, backend, tolerances)
