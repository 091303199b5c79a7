"""ONNX export of the audio encoder and the EmoQ-Former, and the offline onnxruntime pass.

Both graphs go through `torch.onnx.export(dynamo=True)`: it keeps batch and sequence lengths
symbolic for HuBERT and for SDPA attention (ARCHITECTURE.md), which the legacy exporter does not.
The ONNX graphs carry exactly the PyTorch modules' signatures, so the runtime feeds them the
same padded tensors the eager model sees and parity is a like-for-like comparison.

The graphs ship unoptimised: onnxruntime's fusions are provider-specific (the CPU EP's fused
ops pin a graph to the CPU), so the runtime optimises each graph for the provider that loads it
and caches the result under `$EMOQ_CACHE/ort` (`emoq_serve/executors/ort.py`). `optimize_offline`
remains for the encoder benchmarks, which time the CPU-optimised graph.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.former import EmoQFormer
from emoq_serve.executors.ort import save_optimised_to

log = logging.getLogger(__name__)

OPSET = 20
AUDIO_INPUTS = ("waveforms", "lengths")
AUDIO_OUTPUTS = ("frames", "frame_mask")
FORMER_INPUTS = ("frames", "frame_mask", "input_ids", "text_mask")
FORMER_OUTPUTS = ("query_states",)


@dataclass
class OptimizationReport:
    """What the offline pass did (the encoder benchmarks record it)."""

    level: str
    nodes_before: int
    nodes_after: int
    fused_ops: dict[str, int]  # op types the pass introduced, with counts

    def to_dict(self) -> dict:
        return {"level": self.level, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "fused_ops": self.fused_ops}


def _export(module: nn.Module, args: tuple, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...],
            dynamic_shapes: dict) -> Path:
    """Export with symbolic dims and save; weights go to `<name>.data` beside the graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        module.eval(), args, dynamo=True, input_names=list(inputs), output_names=list(outputs),
        dynamic_shapes=dynamic_shapes, opset_version=OPSET, verbose=False,
    )
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_audio_encoder(encoder: AudioEncoder, path: Path) -> Path:
    """(waveforms [B,S] f32, lengths [B] i64) -> (frames [B,F,Da] f32, frame_mask [B,F] bool)."""
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples")
    n = 16_000
    args = (torch.randn(2, n), torch.tensor([n, n // 2]))
    return _export(encoder, args, path, AUDIO_INPUTS, AUDIO_OUTPUTS,
                   {"waveforms": {0: batch, 1: samples}, "lengths": {0: batch}})


def export_former(former: EmoQFormer, audio_dim: int, path: Path) -> Path:
    """(frames, frame_mask, input_ids [B,T] i64, text_mask [B,T] bool) -> query_states [B,Nq,D].

    Text length is bounded by the position table (`max_text_tokens`); pooling stays outside.
    """
    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames")
    text = torch.export.Dim("text", max=former.cfg.max_text_tokens)
    vocab = former.embeddings.word.num_embeddings
    args = (torch.randn(2, 10, audio_dim), torch.ones(2, 10, dtype=torch.bool),
            torch.randint(0, vocab, (2, 7)), torch.ones(2, 7, dtype=torch.bool))
    shapes = {"frames": {0: batch, 1: frames}, "frame_mask": {0: batch, 1: frames},
              "input_ids": {0: batch, 1: text}, "text_mask": {0: batch, 1: text}}
    return _export(former, args, path, FORMER_INPUTS, FORMER_OUTPUTS, shapes)


def _op_histogram(path: Path) -> collections.Counter:
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node)


def optimize_offline(path: Path) -> OptimizationReport:
    """Replace `path` (and its `.data`) with onnxruntime's extended-level optimised graph."""
    import onnxruntime as ort

    before = _op_histogram(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        save_optimised_to(opts, staged)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        data = path.with_name(f"{path.name}.data")
        data.unlink(missing_ok=True)
        os.replace(staged, path)
        if (staged_data := Path(tmp) / data.name).exists():
            os.replace(staged_data, data)
    after = _op_histogram(path)
    onnx.checker.check_model(str(path))
    fused = {op: n for op, n in sorted(after.items()) if op not in before}
    report = OptimizationReport("ORT_ENABLE_EXTENDED", sum(before.values()), sum(after.values()), fused)
    log.info("%s: %d -> %d nodes, fused %s", path.name, report.nodes_before, report.nodes_after, fused)
    return report


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 copy of an (unoptimised) graph for the CUDA EP, fp32 inputs/outputs kept so the
    runtime feeds it exactly what it feeds the fp32 graph."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.topological_sort()  # the converter appends the input casts after their consumers
    model.save_model_to_file(str(dst), use_external_data_format=True)
    onnx.checker.check_model(str(dst), full_check=True)
    return dst
