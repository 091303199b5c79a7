"""Parity between the trained PyTorch model and the bundle, and `--verify` of a written bundle.

One fixed padded batch of mixed lengths (0.1 s and 8 s clips, an empty transcript, a row with
no audio) runs through the trained model and through the bundle's own serving engine
(`OnnxPipeline`: audio_encoder.onnx, former.onnx, pooling and projector from heads.safetensors,
prompt embeddings from embed_tokens.safetensors, the merged LLM in vLLM or transformers). Each
stage's worst absolute difference goes into the manifest; above tolerance, export fails naming
the exported part that computes the first stage off (a wrong part shifts every stage after it).

Like with like: the reference is the trained model with its LLM as the bundle holds it (LoRA
merged, rounded to the dtype the base checkpoint ships in, bf16 for Qwen2.5), computed in fp32
like the parity run, so the fp32 tolerances (1e-4) test the export and nothing else. What that
rounding costs against the trained fp32 model is measured on the same served outputs and
recorded apart (`parity.trained_model`), with its own tolerance.

The reference's stage outputs are recorded in the bundle (`parity_reference.safetensors`), so
`--verify` checks the serving path against the model itself, not against other files of the
same bundle: a re-hashed bundle with a wrong projector or LLM would agree with itself. The
eager baseline's own files (HF HuBERT folder, former weights) are checked against it too.

Device: the reference and the served path run on the export's device (`emoq export --device`),
the same code on CPU and CUDA; on CUDA TF32 is off for the reference (it is fp32 to compare).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle, BundleError
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.batching import collate
from emoq_serve.data.types import Example
from emoq_serve.device import move_batch
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.model.former import EmoQFormer
from emoq_serve.model.stage2 import EmoQStage2
from emoq_serve.executors.config import BF16_VARIANT, INT8_VARIANT
from emoq_serve.executors.heads import PromptEmbedder, load_heads
from emoq_serve.executors.inputs import text_tokenizer
from emoq_serve.executors.ort import OrtStage

log = logging.getLogger(__name__)


#: The serving path's stages in order, each with the exported part that computes it.
STAGE_PARTS = {
    "audio_frames": names.AUDIO_ENCODER_ONNX,
    "former_states": names.FORMER_ONNX,
    "embedding": f"{names.HEADS} (pool_u)",
    "soft_prompt": f"{names.HEADS} (projector)",
    "prompt_embeds": names.EMBED_TOKENS,
    "posteriors": f"{names.LLM_DIR}/ (the merged LLM)",
}
#: The same for a bundle of the stage-1 model ("aux": its auxiliary head scores z).
AUX_STAGE_PARTS = {
    "audio_frames": names.AUDIO_ENCODER_ONNX,
    "former_states": names.FORMER_ONNX,
    "embedding": f"{names.HEADS} (pool_u)",
    "posteriors": f"{names.HEADS} (aux_head)",
}


def stage_parts(head: str, modality: str = "both") -> dict[str, str]:
    """The stages a bundle with `head` ("llm" or "aux") and `modality` serves, each with its
    exported part: a text-only bundle encodes no audio, so it has no `audio_frames` stage."""
    parts = STAGE_PARTS if head == "llm" else AUX_STAGE_PARTS
    return {k: v for k, v in parts.items() if not (modality == "text" and k == "audio_frames")}

#: The stages the eager baseline engine computes from its own files (it shares the rest).
EAGER_PARTS = {"audio_frames": names.EAGER_AUDIO_ENCODER_DIR, "former_states": names.EAGER_FORMER}


@dataclass(frozen=True)
class Tolerances:
    """Max abs differences per stage that export accepts (fp32 ORT and LLM agree to ~1e-6)."""

    audio_frames: float = 1e-4
    former_states: float = 1e-4
    embedding: float = 1e-4
    soft_prompt: float = 1e-4
    prompt_embeds: float = 1e-4
    posteriors: float = 1e-4


FP32_TOLERANCES = Tolerances()
#: The bundle against the trained fp32 model when its LLM is saved in a 16-bit dtype: bf16 keeps
#: ~3 significant digits of every weight, which moves posteriors by up to a few 1e-2; beyond this
#: the rounding broke the model. Saved in fp32, the bundle must match the trained model exactly.
SAVED_DTYPE_POSTERIOR_TOLERANCE = 0.1
#: The fp16 audio encoder is only checked at the frame level, against the fp32 graph: fp16
#: rounding (~1e-3 relative) over a whole HuBERT leaves ~1e-2 absolute on unit-scale frames.
FP16_FRAME_TOLERANCE = 5e-2

#: Stage name -> output [N, ...] (valid audio frames, prompt rows concatenated) as float32.
Stages = dict[str, np.ndarray]


class ParityError(RuntimeError):
    """The bundle does not reproduce the model within tolerance."""


def verification_examples(seed: int = 0) -> list[Example]:
    """The fixed parity batch: extreme lengths, both missing-modality cases and earlier turns
    (which a bundle with dialogue context must read as the trained model does)."""
    rng = np.random.default_rng(seed)

    def clip(seconds: float) -> np.ndarray:
        return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)

    return [
        Example("short", clip(0.1), "No.", 0, "spk1"),
        Example("long", clip(8.0), "I really cannot believe this happened to us again today.", 1, None),
        Example("no_text", clip(1.5), "", 2, "spk2"),
        Example("no_audio", None, "Well, that is just wonderful news.", 3, None),
        Example("mid", clip(3.0), "It is a calm day at the office.", 0, "spk1",
                context=(("spk2", "Where were you all morning?"), (None, "uh"), ("spk2", "We waited for you."))),
    ]


def _llm_tokenizer(bundle: Bundle):
    from emoq_serve.model.llm import load_tokenizer

    return load_tokenizer(bundle.file(names.LLM_DIR))


def _merged_llm(bundle: Bundle) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bundle.file(names.LLM_DIR)), dtype=torch.float32).eval()


def eager_model_from_bundle(bundle: Bundle) -> EmoQStage1 | EmoQStage2:
    """The eager PyTorch model rebuilt from the bundle's own files (the eager baseline's parts)."""
    cfg = bundle.model_config
    encoder = AudioEncoder(dataclasses.replace(cfg.audio, path=str(bundle.file(names.EAGER_AUDIO_ENCODER_DIR))))
    former_weights = load_file(str(bundle.file(names.EAGER_FORMER)))
    former = EmoQFormer(cfg.former, encoder.hidden_size, former_weights["embeddings.word.weight"].shape[0])
    former.load_state_dict(former_weights)
    if bundle.head == "aux":
        return EmoQStage1.from_parts(cfg, encoder, former.eval(), text_tokenizer(bundle), load_heads(bundle)[1]).eval()
    model = EmoQStage2(cfg, encoder, former.eval(), text_tokenizer(bundle), _merged_llm(bundle), _llm_tokenizer(bundle))
    model.projector.load_state_dict(load_heads(bundle)[1].state_dict())
    return model.eval()


def _numpy(stages: dict[str, Any]) -> Stages:
    return {k: (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32))
            for k, v in stages.items()}


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """`model` on `device` for the block, back where it was after (export writes from the CPU
    copy); on CUDA with TF32 off, so fp32 means fp32. A no-op on the CPU."""
    home = next(model.parameters()).device
    if device == home and device.type == "cpu":
        yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.to(device)
    try:
        yield
    finally:
        model.to(home)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@torch.no_grad()
def model_stages(model: EmoQStage1 | EmoQStage2, examples: list[Example], device: str | torch.device = "cpu") -> Stages:
    """Each stage's output of the PyTorch model (stage 2, or stage 1 with its auxiliary head) on
    one padded batch (the reference), on `device`."""
    device = torch.device(device)
    batch = move_batch(collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens,
                                 model.cfg.former.context_turns), device)
    with on_device(model, device):
        return _model_stages(model, batch)


def _model_stages(model: EmoQStage1 | EmoQStage2, batch: dict[str, Any]) -> Stages:
    frames, frame_mask = model.audio_encoder(batch["waveforms"], batch["lengths"])
    # A text-only stage-2 model masks out every frame (`EmoQStage2.utterance_vector`); the frames
    # are still recorded, for the eager baseline's audio encoder files.
    text_only = isinstance(model, EmoQStage2) and model.cfg.llm.modality == "text"
    states = model.former(frames, torch.zeros_like(frame_mask) if text_only else frame_mask, batch["input_ids"],
                          batch["text_mask"])
    z = model.former.pool(states)
    if isinstance(model, EmoQStage1):
        return _numpy({"audio_frames": frames[frame_mask], "former_states": states, "embedding": z,
                       "posteriors": torch.softmax(model.aux_head(z), dim=-1)})
    soft = model.projector(z)
    # The training side's prompt table is the LLM's own input embeddings.
    prompts = PromptEmbedder(model.prompt, model.llm.get_input_embeddings().weight)
    return _numpy({"audio_frames": frames[frame_mask], "former_states": states, "embedding": z, "soft_prompt": soft,
                   "prompt_embeds": torch.cat(prompts(soft, batch["transcripts"], batch["speakers"])),
                   "posteriors": model.predict(batch)})


def served_stages(bundle: Bundle, examples: list[Example], backend: str = "vllm", device: str = "cpu",
                  **runtime: Any) -> Stages:
    """The same stages through the serving engine itself (`OnnxPipeline` on `device`: the fp32
    graphs, the LLM in fp32, one thread; `runtime` overrides the test preset, e.g. to run a
    precision variant). The optimised graphs are not cached: exports would fill the cache."""
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.pipeline import OnnxPipeline
    from emoq_serve.executors.types import Utterance

    if bundle.head == "llm" and backend not in ("vllm", "transformers"):  # an aux bundle runs no LLM
        raise ValueError(f"unknown parity backend {backend!r}; expected 'vllm' or 'transformers'")
    utterances = [Utterance(np.zeros(0, np.float32) if ex.audio is None else ex.audio, ex.transcript, ex.speaker,
                            ex.context)
                  for ex in examples]

    async def run() -> Stages:
        settings = {"verify_hashes": False, "device": device, "audio_precision": "float32", "graph_cache": False,
                    **({"llm_backend": backend} if bundle.head == "llm" else {}), **runtime}
        pipeline = OnnxPipeline(bundle, runtime_preset("test").replace(**settings))
        try:
            trace: dict[str, torch.Tensor] = {}
            if bundle.head == "aux":
                posteriors, _ = pipeline.classify(utterances, trace)
                return _numpy({**trace, "posteriors": posteriors})
            embeds, _ = pipeline.encode(utterances, trace)
            posteriors = await pipeline.llm.posteriors(embeds, pipeline.prompts.emotion_token_ids)
        finally:
            await pipeline.close()
        return _numpy({**trace, "prompt_embeds": torch.cat(embeds), "posteriors": posteriors})

    return asyncio.run(run())


def save_reference(reference: Stages, root: Path) -> None:
    """Record the trained model's stage outputs in the bundle, for `--verify`."""
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items()},
              str(root / names.PARITY_REFERENCE))


def load_reference(bundle: Bundle) -> Stages:
    if names.PARITY_REFERENCE not in bundle.manifest["files"]:
        raise BundleError(f"bundle {bundle.bundle_id} has no {names.PARITY_REFERENCE} (the model's outputs that "
                          "--verify checks against; bundles exported before it was recorded lack it): re-export it")
    return _numpy(load_file(str(bundle.file(names.PARITY_REFERENCE))))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Worst absolute difference; infinite when the shapes differ (e.g. another frame count)."""
    return float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")


def parity_report(reference: Stages, served: Stages, tolerances: Tolerances, backend: str,
                  parts: dict[str, str] = STAGE_PARTS) -> dict[str, Any]:
    """The manifest's `parity` section; raises ParityError naming the part of the first stage off."""
    diffs = {stage: max_abs_diff(reference[stage], served[stage]) for stage in parts}
    off = [stage for stage in parts if not diffs[stage] <= getattr(tolerances, stage)]  # `not <=` catches NaN
    if off:
        first = off[0]
        later = f"; later stages off as a consequence: {', '.join(off[1:])}" if off[1:] else ""
        raise ParityError(f"{parts[first]} does not reproduce the model: {first} max abs diff {diffs[first]:.3g} "
                          f"> tolerance {getattr(tolerances, first):g}{later}")
    report: dict[str, Any] = {"stages": diffs}
    if "posteriors" in diffs:  # the headline figures (a full served-path report)
        report.update(embedding_max_abs=diffs["embedding"], posterior_max_abs=diffs["posteriors"])
    return {**report, "tolerances": dataclasses.asdict(tolerances), "backend": backend,
            "cases": int(reference["posteriors"].shape[0])}


def measure_parity(reference: Stages, bundle: Bundle, examples: list[Example], backend: str = "vllm",
                   tolerances: Tolerances = FP32_TOLERANCES, device: str = "cpu") -> dict[str, Any]:
    """The serving path (its LLM in `backend`: "vllm" or "transformers") against the reference."""
    report = parity_report(reference, served_stages(bundle, examples, backend, device), tolerances, backend,
                           stage_parts(bundle.head, bundle.modality))
    return {**report, "device": device}


def trained_model_deviation(trained: Stages, served: Stages, llm_dtype: str) -> dict[str, Any]:
    """The bundle's served outputs against the trained fp32 model's (LoRA unmerged, nothing
    rounded): the cost of saving the LLM in `llm_dtype`, with its own tolerance."""
    stages = {stage: max_abs_diff(trained[stage], served[stage]) for stage in STAGE_PARTS if stage in served}
    tolerance = FP32_TOLERANCES.posteriors if llm_dtype == "float32" else SAVED_DTYPE_POSTERIOR_TOLERANCE
    if not stages["posteriors"] <= tolerance:
        raise ParityError(f"the bundle's LLM saved in {llm_dtype} moves the trained model's posteriors by "
                          f"{stages['posteriors']:.3g} > tolerance {tolerance:g}")
    return {"llm_dtype": llm_dtype, "stages": stages, "tolerances": {"posteriors": tolerance}}


#: Precision variants the runtime may pick per device (`RuntimeConfig`), measured at export
#: against the same reference, each on its device: the cpu preset on CPUs with native bf16 runs
#: the graphs in OpenVINO bf16 and the LLM in bf16; where selected (`--precision int8`, or a CPU
#: class whose plan says int8), the NNCF-quantised graphs with the LLM in the preset's dtype; the
#: cuda preset runs the fp16 audio graph (when exported with --fp16) and the LLM in bf16.
VARIANTS = {
    BF16_VARIANT: {"device": "cpu", "graph_runtime": "openvino", "dtype": "bfloat16"},
    INT8_VARIANT: {"device": "cpu", "graph_runtime": "openvino", "graph_precision": "int8", "dtype": "auto"},
    "cuda_fp16": {"device": "cuda", "audio_precision": "float16", "dtype": "bfloat16"},
}
#: 16-bit floats keep ~3 significant digits, so posteriors move by up to a few 1e-2; a variant
#: beyond this bound is broken, not rounding.
VARIANT_POSTERIOR_TOLERANCE = 0.1
#: int8 is also held to the pooled embedding (unit norm, so an absolute bound): the posteriors of
#: an untrained bundle (near-uniform) hardly move whatever the graphs do, the embedding does.
#: bf16 moves it by ~3e-3 on the demo and base bundles; int8 a few times more. Beyond this the
#: quantisation broke the encoder (a wrong calibration range moves it by ~1).
INT8_EMBEDDING_TOLERANCE = 0.1


def variant_tolerances(name: str) -> dict[str, float]:
    """Stage -> max abs difference a variant may have from the fp32 reference (read at call time)."""
    if name == INT8_VARIANT:
        return {"embedding": INT8_EMBEDDING_TOLERANCE, "posteriors": VARIANT_POSTERIOR_TOLERANCE}
    return {"posteriors": VARIANT_POSTERIOR_TOLERANCE}


def _variant_applies(name: str, bundle: Bundle) -> bool:
    """Measured where a preset would serve it: openvino_bf16 where the cpu preset picks OpenVINO
    (native bf16 and OpenVINO installed; elsewhere bf16 is emulated, slow, never picked);
    openvino_int8 when the bundle's folder has the int8 graphs (built only on CPUs with int8);
    cuda_fp16 when the bundle has the fp16 audio graph."""
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.openvino import INT8_GRAPHS

    if name == BF16_VARIANT:
        return runtime_preset("cpu").resolved_graph_runtime() == "openvino"
    if name == INT8_VARIANT:
        return all((bundle.path / graph).is_file() for graph in INT8_GRAPHS.values())
    return names.AUDIO_ENCODER_FP16_ONNX in bundle.manifest["files"]


def _as_measured(bundle: Bundle, name: str) -> Bundle:
    """`bundle` with `name` provisionally recorded on, so the runtime serves it for measuring
    (it refuses a variant the manifest does not record)."""
    parity = bundle.manifest.get("parity", {})
    manifest = {**bundle.manifest, "parity": {**parity, "variants": {**parity.get("variants", {}), name: {}},
                                              "variants_off": {k: v for k, v in parity.get("variants_off", {}).items()
                                                               if k != name}}}
    return Bundle(bundle.path, manifest, bundle.hashes_verified)


def variant_parity(reference: Stages, bundle: Bundle, examples: list[Example], backend: str = "vllm",
                   device: str = "cpu", only: tuple[str, ...] | None = None,
                   ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(per-stage max abs differences of each precision variant of `device` (or of those in
    `only`) against the fp32 reference, {variant: why it is off} for those beyond their
    `variant_tolerances`). A variant that is off is not served from this bundle: the runtime's
    `auto` choices fall back to the exact fp32 path, an explicit choice of it is refused
    (`RuntimeConfig.for_bundle`); the bundle itself, which passed the fp32 parity, is still good."""
    out, off = {}, {}
    for name, runtime in VARIANTS.items():
        if runtime["device"] != device or (only is not None and name not in only) or not _variant_applies(name, bundle):
            continue
        served = served_stages(_as_measured(bundle, name), examples, backend, **runtime)
        out[name] = {stage: max_abs_diff(reference[stage], served[stage])
                     for stage in stage_parts(bundle.head, bundle.modality)}
        beyond = [(stage, tol) for stage, tol in variant_tolerances(name).items() if not out[name][stage] <= tol]
        if beyond:
            off[name] = "; ".join(f"moves {'posteriors' if stage == 'posteriors' else stage} by "
                                  f"{out[name][stage]:.3g} > {tol:g}" for stage, tol in beyond) + f" on this bundle ({runtime})"
            log.warning("precision variant %s %s: recorded as off; this bundle serves without it", name, off[name])
    return out, off


def fp16_frame_diff(bundle_dir: Path, waveforms: torch.Tensor, lengths: torch.Tensor, device: str = "cpu") -> float:
    """Max abs difference of valid frames between the fp16 and fp32 audio graphs (ORT on `device`:
    the CUDA EP is where the fp16 graph serves)."""
    def frames(graph: str) -> np.ndarray:
        out = OrtStage(bundle_dir / graph, 1, device).run(waveforms=waveforms.float(), lengths=lengths.long())
        return out["frames"][out["frame_mask"]].cpu().numpy()

    return max_abs_diff(frames(names.AUDIO_ENCODER_ONNX), frames(names.AUDIO_ENCODER_FP16_ONNX))


def verify_bundle(path: str | Path, backend: str = "vllm", tolerances: Tolerances = FP32_TOLERANCES,
                  device: str = "cpu") -> dict[str, Any]:
    """`emoq export --verify`: schema, hashes and no unlisted file; then the serving path and the
    eager baseline's files (both on `device`) against the model's outputs recorded at export."""
    bundle = Bundle.open(path, verify_hashes=True)
    if bundle.head == "aux":
        backend = "none"  # no LLM to run
    examples = verification_examples()
    reference = load_reference(bundle)
    with _naming_former_tensors(bundle):
        report = measure_parity(reference, bundle, examples, backend, tolerances, device)
        eager = parity_report(reference, model_stages(eager_model_from_bundle(bundle), examples, device), tolerances,
                              "transformers", EAGER_PARTS)
    return {**report, "eager_baseline": eager["stages"]}


def former_tensor_mismatches(bundle: Bundle) -> list[str]:
    """The former weights (by name, e.g. `relative_attention_bias.weight`) whose values differ
    between former.onnx and the eager former file. The two are written from the same module, so
    when the former stage is off this says which tensor of which file changed."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(bundle.file(names.FORMER_ONNX)))
    eager = load_file(str(bundle.file(names.EAGER_FORMER)))
    out = []
    for init in graph.graph.initializer:
        if init.name in eager:
            value, saved = numpy_helper.to_array(init), eager[init.name].numpy()
            if value.shape == saved.shape and not np.array_equal(value, saved):
                out.append(init.name)
    return sorted(out)


@contextlib.contextmanager
def _naming_former_tensors(bundle: Bundle) -> Iterator[None]:
    """A ParityError that names a former file gets the differing tensors' names appended."""
    try:
        yield
    except ParityError as error:
        part = str(error).split(" does not reproduce", 1)[0]
        if part not in (names.FORMER_ONNX, names.EAGER_FORMER):
            raise
        try:
            differ = former_tensor_mismatches(bundle)
        except Exception as e:  # noqa: BLE001 -- a diagnostic must not hide the parity failure
            log.warning("could not compare the former's tensors: %s", e)
            raise error from None
        if not differ:
            raise
        raise ParityError(f"{error}; tensors differing between {names.FORMER_ONNX} and {names.EAGER_FORMER}: "
                          f"{', '.join(differ)}") from error
