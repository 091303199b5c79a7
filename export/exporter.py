"""`emoq export`: a checkpoint in, a verified serving bundle out. A stage-2 checkpoint gives the
full model (the LLM scores the soft prompt); a stage-1 checkpoint gives an "aux" bundle of the
former and its auxiliary head, served without an LLM. A text-only stage-2 checkpoint (trained with
`modality="text"`, e.g. the MELD recipes) gives a bundle without the audio graph: it answers from
the transcript alone.

The bundle is assembled in a staging folder beside the destination and moved into place only
after parity passed, so a bundle directory that exists is one that verified (or was explicitly
exported with verification off, which its manifest says).

`device` (`--device auto|cpu|cuda`) is where the reference model and the parity run compute; the
ONNX export, the merge and the files are made from the CPU copy either way, so the same code runs
on both and the CPU tests exercise it. The graphs ship unoptimised: onnxruntime optimises them
for the provider that loads them (`emoq_serve/executors/ort.py`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.data.batching import collate
from emoq_serve.device import resolve_device
from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.model.stage2 import EmoQStage2
from export import merge, onnx_export, quantize
from export.bundle_writer import write_manifest
from export.verify import (FP16_FRAME_TOLERANCE, FP32_TOLERANCES, VARIANT_POSTERIOR_TOLERANCE, ParityError,
                           fp16_frame_diff, model_stages, parity_report, save_reference, served_stages, stage_parts,
                           trained_model_deviation, variant_parity, verification_examples)

log = logging.getLogger(__name__)

#: The parity section of a bundle exported with verification off.
UNVERIFIED = {"embedding_max_abs": None, "posterior_max_abs": None, "tolerances": {}, "backend": "unverified",
              "cases": 0}
#: The manifest's `onnx_optimizations`: what ships, and where the optimisation happens instead.
SHIPPED_UNOPTIMISED = {"shipped": "unoptimised", "at_load": "ORT_ENABLE_ALL for the loading provider, "
                                                             "cached under $EMOQ_CACHE/ort"}


def export_bundle(model: EmoQStage1 | EmoQStage2, out: str | Path, fp16: bool = False, verify: bool = True,
                  backend: str = "vllm", device: str = "cpu", int8: bool = False) -> dict[str, Any]:
    """Export `model` (eval mode, on the CPU; a stage-2 model's LoRA gets merged, so it is consumed) to `out`.

    `int8` (with `verify`): also build the int8 variant where this CPU has int8 (export/quantize.py);
    `emoq export` asks for it unless --no-int8.

    Returns the manifest. Raises ParityError (leaving nothing at `out`) when the bundle does not
    reproduce the model within the fp32 tolerances, or its saved LLM dtype moves the trained
    model's posteriors beyond that dtype's tolerance.
    """
    on = resolve_device(device)  # an unusable device fails before anything is written
    aux = isinstance(model, EmoQStage1)
    text_only = not aux and model.cfg.llm.modality == "text"
    if aux:
        backend = "none"  # no LLM to run
    elif model.former is None or model.cfg.llm.modality not in ("both", "text"):
        raise ValueError(f"export serves former models that read both modalities or the transcript alone "
                         f"(use_former=True, modality 'both' or 'text'); this checkpoint has use_former="
                         f"{model.former is not None}, modality {model.cfg.llm.modality!r}: an ablation for evaluation")
    if text_only and fp16:
        raise ValueError("--fp16 adds an fp16 audio graph, and a text-only model's bundle has no audio graph: "
                         "drop --fp16")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; export writes a fresh bundle directory")
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    started = time.perf_counter()
    try:
        model.eval()
        examples = verification_examples()
        trained = model_stages(model, examples, on)  # before the merge rounds anything
        if not text_only:  # a text-only model never reads the frames: no graph to serve them
            audio = onnx_export.export_audio_encoder(model.audio_encoder, stage / names.AUDIO_ENCODER_ONNX)
            if fp16:
                onnx_export.convert_fp16(audio, stage / names.AUDIO_ENCODER_FP16_ONNX)
        onnx_export.export_former(model.former, model.audio_encoder.hidden_size, stage / names.FORMER_ONNX)
        optimizations = {graph: dict(SHIPPED_UNOPTIMISED) for graph in sorted(p.name for p in stage.glob("*.onnx"))}
        merge.write_heads(model, stage)
        merge.write_eager(model, stage)
        prompt, reference = None, trained  # an aux bundle holds the trained model's weights as they are
        if not aux:
            merged = merge.write_merged_llm(model, stage)
            llm_dtype = str(merged.dtype).removeprefix("torch.")
            # Like with like: the reference holds the LLM the bundle holds (merged, in its saved dtype),
            # computed in fp32 like the parity run. Recorded even unverified, for `--verify` later.
            model.llm = merged.to(torch.float32)
            prompt, reference = model.prompt, model_stages(model, examples, on)
        save_reference(reference, stage)
        manifest = write_manifest(stage, model.cfg, prompt, dict(UNVERIFIED), optimizations)
        if verify:
            bundle = Bundle.open(stage)
            served = served_stages(bundle, examples, backend, on.type)
            parts = stage_parts(bundle.head, bundle.modality)
            parity = {**parity_report(reference, served, FP32_TOLERANCES, backend, parts), "device": on.type}
            if not aux:
                parity["trained_model"] = trained_model_deviation(trained, served, llm_dtype)
            if fp16:
                batch = collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens,
                                model.cfg.former.context_turns)
                parity["fp16_frames_max_abs"] = fp16_frame_diff(stage, batch["waveforms"], batch["lengths"], on.type)
                parity["tolerances"]["fp16_frames"] = FP16_FRAME_TOLERANCE
                if not parity["fp16_frames_max_abs"] <= FP16_FRAME_TOLERANCE:
                    raise ParityError(f"fp16 audio encoder frames differ by {parity['fp16_frames_max_abs']:.3g} "
                                      f"> tolerance {FP16_FRAME_TOLERANCE:g}")
            # The variant's graphs, measured with the others just below. Not yet for a text-only
            # bundle: quantize.py calibrates and builds the audio graph, which it does not have.
            if int8 and not text_only:
                parity["variant_builds"] = quantize.build_at_export(bundle)
            parity["variants"], parity["variants_off"] = variant_parity(reference, bundle, examples, backend, on.type)
            parity["tolerances"]["variant_posteriors"] = VARIANT_POSTERIOR_TOLERANCE
            manifest = write_manifest(stage, model.cfg, prompt, parity, optimizations)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("exported %s (bundle %s) in %.1f s; parity %s", out, manifest["bundle_id"],
             time.perf_counter() - started, manifest["parity"])
    return manifest


def bundle_size_bytes(path: str | Path) -> int:
    """Total size of a bundle's files (what a deployment copies)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


__all__ = ["FP32_TOLERANCES", "ParityError", "bundle_size_bytes", "export_bundle"]
