"""The int8 precision variant: NNCF post-training quantisation of the audio encoder and the former.

Both graphs are quantised statically (activation ranges calibrated on real inputs) by NNCF on
OpenVINO's model of the bundle's fp32 ONNX graph, and saved as OpenVINO IR beside it
(`emoq_serve.executors.openvino.INT8_GRAPHS`), which `OvStage` runs with `precision="int8"`.
OpenVINO over onnxruntime static QDQ: in one (loaded) probe on the base encoder it was faster at
the same calibration (benchmarks/results/int8/).

Calibration inputs are what serving sees: real speech clips (the synthetic corpus's *train*
split: never the test split the accuracy guard scores) one at a time, as the per-utterance plan
runs them, and export's verification batch (padded, with a row without audio and one without
text). The former is calibrated on the fp32 audio encoder's frames of those same inputs.

Convolutions stay unquantised: HuBERT's waveform front end (conv stack + group norm) has no
useful int8 range on raw samples, and quantising it wrecked the frames (cosine 0.08 against fp32
on the base encoder; 0.9996 with the convolutions left out). SmoothQuant is off: on the same probe
it drifted more than without it. Attention's products of two activations (Q·Kᵀ, softmax·V) stay
in float too (`activation_matmuls`): per-tensor int8 on them is what broke very short clips (a
0.1 s clip's embedding past the guard on the base bundle), and they are a few % of the FLOPs
(benchmarks/results/int8/).

Guards (`export/verify.py`): the variant's per-stage deviation from the fp32 reference
(`variant_parity`, tolerances in `VARIANT_TOLERANCES`) on every bundle; on a trained bundle,
also its held-out accuracy (`accuracy_guard`): within `ACCURACY_POINTS` of the fp32 graphs. A
variant beyond either is recorded in `parity.variants_off` and never served.

`add_int8_variant` writes a copy of an existing bundle with the variant added (`emoq export
--add-variant int8 --bundle B --out B2`): no re-export, the fp32 files untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.data.types import Example
from emoq_serve.executors.config import INT8_VARIANT, cpu_has_int8
from emoq_serve.executors.inputs import model_batch, text_only, text_tokenizer
from emoq_serve.executors.openvino import INT8_GRAPHS, openvino_available
from emoq_serve.executors.ort import OrtStage
from emoq_serve.executors.types import Utterance
from export.bundle_writer import hash_files
from export.verify import load_reference, variant_parity, verification_examples

log = logging.getLogger(__name__)

#: The corpus whose train split calibrates by default (the demo's; cached where it was built).
DEFAULT_CALIBRATION = "synthetic:100"
#: Speech clips calibrated on (spread over the split's classes and voices).
CALIBRATION_CLIPS = 16
#: A trained bundle's int8 variant may lose at most this many points of held-out accuracy (WA).
ACCURACY_POINTS = 1.0

#: One graph's named numpy inputs.
Feed = dict[str, np.ndarray]


def int8_unsupported(bundle: Bundle | None = None) -> str | None:
    """Why this machine (or `bundle`) gets no int8 variant (None: it does)."""
    if bundle is not None and names.AUDIO_ENCODER_ONNX not in bundle.manifest["files"]:
        return "the bundle has no audio encoder graph (text-only): its int8 variant is not built"
    if not cpu_has_int8():
        return "this CPU has no int8 dot-product instructions (avx512_vnni, avx_vnni or amx_int8)"
    if not openvino_available():
        return "OpenVINO is not installed"
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "nncf is not installed"
    return None


def calibration_examples(spec: str = DEFAULT_CALIBRATION, clips: int = CALIBRATION_CLIPS, seed: int = 0) -> list[Example]:
    """`clips` speech clips spread evenly over the train split of corpus `spec` (load_corpus)."""
    from emoq_serve.data import load_corpus

    train = [ex for ex in load_corpus(spec, seed).train if ex.audio is not None]
    return train[:: max(1, len(train) // clips)][:clips]


def _utterances(examples: Iterable[Example]) -> list[Utterance]:
    return [Utterance(np.zeros(0, np.float32) if ex.audio is None else ex.audio, ex.transcript, ex.speaker, ex.context)
            for ex in examples]


def calibration_feeds(bundle: Bundle, speech: list[Example]) -> tuple[list[Feed], list[Feed]]:
    """(audio encoder feeds, former feeds): each speech clip alone, then the verification batch;
    the former's from the fp32 audio encoder's outputs on the same inputs."""
    tokenizer = text_tokenizer(bundle)
    audio = OrtStage(bundle.file(names.AUDIO_ENCODER_ONNX), 1)
    batches = [_utterances([ex]) for ex in speech] + [_utterances(verification_examples())]
    audio_feeds, former_feeds = [], []
    for utterances in batches:
        batch = model_batch(bundle, tokenizer, utterances)
        audio_in = {"waveforms": batch["waveforms"], "lengths": batch["lengths"]}
        out = audio.run(**audio_in)
        audio_feeds.append({k: v.numpy().copy() for k, v in audio_in.items()})
        former_feeds.append({"frames": out["frames"].numpy().copy(),
                             "frame_mask": text_only(bundle, out["frame_mask"]).numpy().copy(),
                             "input_ids": batch["input_ids"].numpy(), "text_mask": batch["text_mask"].numpy()})
    return audio_feeds, former_feeds


def activation_matmuls(model) -> list[str]:
    """Names of the MatMuls of an OpenVINO model whose operands are both activations (attention's
    Q·Kᵀ and softmax·V), as opposed to an activation times a weight."""
    def weight(port) -> bool:
        node = port.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "MatMul" and not any(weight(op.input_value(i)) for i in range(2))]


def quantize_graph(onnx_path: Path, feeds: list[Feed], out: Path) -> Path:
    """NNCF-quantise one fp32 ONNX graph on `feeds` and save it as OpenVINO IR at `out` (.xml)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    model = ov.Core().read_model(str(onnx_path))
    quantized = nncf.quantize(
        model, nncf.Dataset(feeds), subset_size=len(feeds), model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(types=["Convolution", "GroupConvolution"], names=activation_matmuls(model),
                                        validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def write_int8_graphs(bundle: Bundle, speech: list[Example],
                      corrupt: Callable[[list[Feed], list[Feed]], None] | None = None) -> dict[str, Any]:
    """Quantise both graphs of `bundle` into its folder (INT8_GRAPHS); returns what to record.
    `corrupt` (tests only) may alter the calibration feeds in place before quantising."""
    started = time.perf_counter()
    audio_feeds, former_feeds = calibration_feeds(bundle, speech)
    if corrupt is not None:
        corrupt(audio_feeds, former_feeds)
    for graph, feeds in ((names.AUDIO_ENCODER_ONNX, audio_feeds), (names.FORMER_ONNX, former_feeds)):
        quantize_graph(bundle.file(graph), feeds, bundle.path / INT8_GRAPHS[graph])
    return {"quantizer": "nncf (OpenVINO, static, per-channel weights)", "calibration_inputs": len(audio_feeds),
            "calibration_clips": len(speech), "seconds": round(time.perf_counter() - started, 1)}


def build_at_export(bundle: Bundle) -> dict[str, Any]:
    """At export: the int8 graphs written into the bundle being exported where this CPU has
    int8, calibrated on the demo's real speech clips (fast to render, unlike a corpus); returns
    {variant: build record}, or {} (logging why) elsewhere."""
    if why := int8_unsupported(bundle):
        log.info("int8 variant not built: %s", why)
        return {}
    return {INT8_VARIANT: write_int8_graphs(bundle, demo_speech())}


def demo_speech(seed: int = 0) -> list[Example]:
    """The demo's clips in two espeak voices and the Piper voice (when installed): real speech."""
    from emoq_serve.data.speech import PIPER_VOICE, VOICES, piper_available
    from emoq_serve.data.synthetic import demo_utterances

    voices = [VOICES[seed % len(VOICES)], VOICES[(seed + 1) % len(VOICES)]] + ([PIPER_VOICE] if piper_available() else [])
    return [ex for voice in voices for ex in demo_utterances(seed, voice=voice)]


def accuracy(bundle: Bundle, test: list[Example], backend: str, **runtime: Any) -> float:
    """Held-out accuracy (WA, in points) of the served bundle on `test` in one padded batch."""
    from export.verify import served_stages

    posteriors = served_stages(bundle, test, backend, **runtime)["posteriors"]
    return 100.0 * float(np.mean(posteriors.argmax(axis=1) == np.array([ex.label for ex in test])))


def accuracy_guard(bundle: Bundle, test: list[Example], backend: str, variant: dict[str, Any],
                   points: float = ACCURACY_POINTS) -> tuple[dict[str, Any], str | None]:
    """(record, why the variant is off or None): its accuracy on `test` against the fp32 graphs'."""
    fp32 = accuracy(bundle, test, backend)
    reduced = accuracy(bundle, test, backend, **variant)
    record = {"examples": len(test), "fp32_wa": fp32, "variant_wa": reduced, "max_drop_points": points}
    if not fp32 - reduced <= points:
        return record, f"loses {fp32 - reduced:.2f} accuracy points > {points:g} on {len(test)} held-out examples"
    return record, None


def _record(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Re-hash the bundle's files into `manifest` and write it (the bundle id follows the files)."""
    from emoq_serve.hostinfo import library_versions

    manifest["files"] = hash_files(root)
    manifest["versions"].update(library_versions("nncf", "openvino"))
    manifest["bundle_id"] = names.compute_bundle_id(manifest["files"])
    (root / names.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def add_int8_variant(src: str | Path, out: str | Path, calibration: list[Example] | None = None,
                     test: list[Example] | None = None, backend: str = "vllm",
                     corrupt: Callable[[list[Feed], list[Feed]], None] | None = None) -> dict[str, Any]:
    """A copy of bundle `src` at `out` with the int8 variant built, measured against the fp32
    reference the bundle recorded at export, and recorded (on or off) in its manifest. With `test`
    (a trained bundle's held-out examples) the accuracy guard runs too. Returns the manifest."""
    if why := int8_unsupported():
        raise RuntimeError(f"cannot build the int8 variant here: {why}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; --add-variant writes a new bundle folder")
    source = Bundle.open(src, verify_hashes=True)
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(source.path, stage)
        bundle = Bundle(stage, json.loads((stage / names.MANIFEST).read_text()))
        if why := int8_unsupported(bundle):
            raise RuntimeError(f"cannot build the int8 variant: {why}")
        if bundle.head == "aux":
            backend = "none"
        built = write_int8_graphs(bundle, calibration if calibration is not None else calibration_examples(), corrupt)
        measured, off = variant_parity(load_reference(bundle), bundle, verification_examples(), backend,
                                       only=(INT8_VARIANT,))
        parity = bundle.manifest["parity"]
        parity.setdefault("variants", {}).update(measured)
        parity.setdefault("variants_off", {}).pop(INT8_VARIANT, None)
        parity["variants_off"].update(off)
        parity.setdefault("variant_builds", {})[INT8_VARIANT] = built
        if test is not None and INT8_VARIANT not in off:
            from export.verify import VARIANTS

            record, why = accuracy_guard(bundle, test, backend, VARIANTS[INT8_VARIANT])
            parity.setdefault("variant_accuracy", {})[INT8_VARIANT] = record
            if why:
                parity["variants_off"][INT8_VARIANT] = why
                log.warning("int8 variant %s: recorded as off; this bundle serves without it", why)
        manifest = _record(stage, bundle.manifest)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def held_out(spec: str, seed: int = 0) -> list[Example]:
    """The test split of corpus `spec` (what the demo reports its held-out accuracy on)."""
    from emoq_serve.data import load_corpus

    return load_corpus(spec, seed).test


__all__ = ["add_int8_variant", "calibration_examples", "held_out", "int8_unsupported", "write_int8_graphs"]
