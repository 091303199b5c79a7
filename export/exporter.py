"""`emoq export`: a stage-2 checkpoint in, a verified serving bundle out.

The bundle is assembled in a staging folder beside the destination and moved into place only
after parity passed, so a bundle directory that exists is one that verified (or was explicitly
exported with verification off, which its manifest says).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.data.batching import collate
from emoq_serve.model.stage2 import EmoQStage2
from export import merge, onnx_export
from export.bundle_writer import write_manifest
from export.verify import (FP16_FRAME_TOLERANCE, FP32_TOLERANCES, VARIANT_POSTERIOR_TOLERANCE, ParityError,
                           fp16_frame_diff, measure_parity, model_stages, save_reference, variant_parity,
                           verification_examples)

log = logging.getLogger(__name__)

#: The parity section of a bundle exported with verification off.
UNVERIFIED = {"embedding_max_abs": None, "posterior_max_abs": None, "tolerances": {}, "backend": "unverified",
              "cases": 0}


def export_bundle(model: EmoQStage2, out: str | Path, fp16: bool = False, verify: bool = True,
                  backend: str = "vllm") -> dict[str, Any]:
    """Export `model` (eval mode; its LoRA gets merged, so it is consumed) to `out`.

    Returns the manifest. Raises ParityError (leaving nothing at `out`) when the bundle does not
    reproduce the model within the fp32 tolerances.
    """
    if model.former is None or model.cfg.llm.modality != "both":
        raise ValueError("export serves full models only (use_former=True, modality='both'); "
                         "ablation checkpoints are for evaluation")
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
        # Recorded even unverified, so `--verify` can check the bundle later.
        reference = model_stages(model, examples)
        audio = onnx_export.export_audio_encoder(model.audio_encoder, stage / names.AUDIO_ENCODER_ONNX)
        if fp16:
            onnx_export.convert_fp16(audio, stage / names.AUDIO_ENCODER_FP16_ONNX)
        former = onnx_export.export_former(model.former, model.audio_encoder.hidden_size, stage / names.FORMER_ONNX)
        optimizations = {p.name: onnx_export.optimize_offline(p).to_dict() for p in (audio, former)}
        merge.write_heads(model, stage)
        merge.write_eager(model, stage)
        merge.write_merged_llm(model, stage)
        save_reference(reference, stage)
        manifest = write_manifest(stage, model.cfg, model.prompt, dict(UNVERIFIED), optimizations)
        if verify:
            parity = measure_parity(reference, Bundle.open(stage), examples, backend)
            if fp16:
                batch = collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens)
                parity["fp16_frames_max_abs"] = fp16_frame_diff(stage, batch["waveforms"], batch["lengths"])
                parity["tolerances"]["fp16_frames"] = FP16_FRAME_TOLERANCE
                if not parity["fp16_frames_max_abs"] <= FP16_FRAME_TOLERANCE:
                    raise ParityError(f"fp16 audio encoder frames differ by {parity['fp16_frames_max_abs']:.3g} "
                                      f"> tolerance {FP16_FRAME_TOLERANCE:g}")
            parity["variants"] = variant_parity(reference, Bundle.open(stage), examples, backend)
            parity["tolerances"]["variant_posteriors"] = VARIANT_POSTERIOR_TOLERANCE
            manifest = write_manifest(stage, model.cfg, model.prompt, parity, optimizations)
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
