"""The int8 precision variant (export/quantize.py): built on a copy of the tiny bundle, recorded in
its manifest with its deviation from the fp32 reference, served when on, refused when its guard
fails, and skipped cleanly (saying why) on a CPU without int8 instructions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emoq_serve.bundle import Bundle
from emoq_serve.executors.config import INT8_VARIANT, RuntimeConfig

quantize = pytest.importorskip("export.quantize")

WHY_NOT = quantize.int8_unsupported()
needs_int8 = pytest.mark.skipif(WHY_NOT is not None, reason=f"no int8 variant on this machine: {WHY_NOT}")


def _calibration():
    """Few real speech clips (the demo's, one espeak voice): enough for the tiny model's ranges."""
    from emoq_serve.data.synthetic import demo_utterances

    return demo_utterances(0, voice="m1")


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory) -> Path:
    if WHY_NOT is not None:
        pytest.skip(f"no int8 variant on this machine: {WHY_NOT}")
    out = tmp_path_factory.mktemp("int8") / "bundle"
    quantize.add_int8_variant(tiny_bundle, out, calibration=_calibration(), backend="transformers")
    return out


@needs_int8
def test_int8_variant_is_built_recorded_and_measured(int8_bundle, tiny_bundle):
    from emoq_serve.executors.openvino import INT8_GRAPHS
    from export.verify import INT8_EMBEDDING_TOLERANCE, VARIANT_POSTERIOR_TOLERANCE

    bundle = Bundle.open(int8_bundle, verify_hashes=True)  # every new file listed and hashed
    for graph in INT8_GRAPHS.values():
        assert graph in bundle.manifest["files"] and graph.replace(".xml", ".bin") in bundle.manifest["files"]
    parity = bundle.manifest["parity"]
    measured = parity["variants"][INT8_VARIANT]
    assert INT8_VARIANT not in parity["variants_off"], parity["variants_off"]
    # Quantised, so the frames move; within the guard, so the embedding and posteriors barely do.
    assert 1e-4 < measured["audio_frames"] and 0 < measured["embedding"] <= INT8_EMBEDDING_TOLERANCE, measured
    assert measured["posteriors"] <= VARIANT_POSTERIOR_TOLERANCE
    assert parity["variant_builds"][INT8_VARIANT]["calibration_clips"] == 5
    # The source bundle is left as it was.
    assert INT8_VARIANT not in json.loads((tiny_bundle / "manifest.json").read_text())["parity"]["variants"]
    assert not any((tiny_bundle / g).exists() for g in INT8_GRAPHS.values())


@needs_int8
def test_attention_products_of_two_activations_stay_unquantised(int8_bundle):
    """Q·Kᵀ and softmax·V keep float inputs (quantised, a 0.1 s clip's embedding moved by 0.15 on
    the base bundle); the weight matmuls get int8 inputs."""
    import openvino as ov

    from emoq_serve.executors.openvino import INT8_GRAPHS

    for onnx, xml in INT8_GRAPHS.items():
        products = set(quantize.activation_matmuls(ov.Core().read_model(str(int8_bundle / onnx))))
        matmuls = [op for op in ov.Core().read_model(str(int8_bundle / xml)).get_ordered_ops()
                   if op.get_type_name() == "MatMul"]
        quantised = {op.get_friendly_name() for op in matmuls
                     if any(op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(2))}
        assert products and products <= {op.get_friendly_name() for op in matmuls}, onnx
        assert not products & quantised and quantised, (onnx, sorted(products & quantised))


@needs_int8
def test_int8_variant_is_served_when_on(int8_bundle):
    from export.verify import load_reference, served_stages, verification_examples

    bundle = Bundle.open(int8_bundle)
    cfg = RuntimeConfig(device="cpu", graph_runtime="auto", graph_precision="int8").for_bundle(bundle.manifest)
    assert (cfg.resolved_graph_runtime(), cfg.resolved_graph_precision()) == ("openvino", "int8")
    auto = RuntimeConfig(device="cpu", graph_runtime="auto", auto_int8=True).for_bundle(bundle.manifest)
    assert auto.resolved_graph_precision() == "int8"  # the preset's pick on a class measured faster in int8
    served = served_stages(bundle, verification_examples(), "transformers", graph_runtime="openvino",
                           graph_precision="int8", dtype="float32")
    reference = load_reference(bundle)
    assert 1e-4 < np.abs(served["audio_frames"] - reference["audio_frames"]).max() < 1.0  # int8 ran, not fp32
    assert np.abs(served["posteriors"] - reference["posteriors"]).max() <= 0.1


@needs_int8
def test_the_pipeline_builds_int8_stages_itself(int8_bundle):
    from emoq_serve.executors.pipeline import OnnxPipeline

    pipeline = OnnxPipeline(Bundle.open(int8_bundle), RuntimeConfig(device="cpu", llm_backend="transformers", graph_runtime="auto",
                                                                    graph_precision="int8", verify_hashes=False))
    assert pipeline.audio.precision == pipeline.former.precision == "int8" and pipeline.audio.path.name.endswith(".int8.xml")


@needs_int8
def test_int8_beyond_its_guard_is_recorded_off_and_not_served(int8_bundle, tiny_bundle, tmp_path, monkeypatch):
    from export import verify

    # A corrupted calibration: the former's frames scaled down 1000x give it ranges that clip
    # every real activation.
    def corrupt(audio_feeds, former_feeds):
        for feed in former_feeds:
            feed["frames"] *= 1e-3

    manifest = quantize.add_int8_variant(tiny_bundle, tmp_path / "broken", calibration=_calibration(),
                                         backend="transformers", corrupt=corrupt)
    why = manifest["parity"]["variants_off"][INT8_VARIANT]
    assert "embedding by" in why, why
    with pytest.raises(ValueError, match="int8 variant is off"):
        RuntimeConfig(device="cpu", graph_runtime="auto", graph_precision="int8").for_bundle(manifest)
    auto = RuntimeConfig(device="cpu", graph_runtime="auto", auto_int8=True).for_bundle(manifest)
    assert auto.resolved_graph_precision() != "int8"
    # A tolerance of 0 turns the good variant off too.
    monkeypatch.setattr(verify, "INT8_EMBEDDING_TOLERANCE", 0.0)
    bundle = Bundle.open(int8_bundle)
    _, off = verify.variant_parity(verify.load_reference(bundle), bundle, verify.verification_examples(),
                                   "transformers", only=(INT8_VARIANT,))
    assert "moves embedding by" in off[INT8_VARIANT]


def test_accuracy_guard_refuses_a_variant_losing_more_than_a_point(monkeypatch):
    """Trained bundles: the variant's held-out accuracy within ACCURACY_POINTS of the fp32 graphs'."""
    scores = {}
    monkeypatch.setattr(quantize, "accuracy", lambda bundle, test, backend, **runtime: scores["int8" if runtime else "fp32"])
    scores.update(fp32=88.0, int8=87.0)
    record, why = quantize.accuracy_guard(None, [None] * 100, "vllm", {"graph_precision": "int8"})
    assert why is None and record["variant_wa"] == 87.0
    scores.update(int8=86.0)
    assert "loses 2.00 accuracy points" in quantize.accuracy_guard(None, [None] * 100, "vllm", {"x": 1})[1]


def test_no_int8_cpu_skips_the_build_and_says_why(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "cpu_has_int8", lambda: False)
    assert "no int8 dot-product instructions" in quantize.int8_unsupported()
    assert quantize.build_at_export(Bundle.open(tiny_bundle)) == {}
    with pytest.raises(RuntimeError, match="cannot build the int8 variant here"):
        quantize.add_int8_variant(tiny_bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bundles_without_the_variant_refuse_an_explicit_int8(tmp_path, monkeypatch):
    from emoq_serve.executors import config

    with pytest.raises(ValueError, match="has no int8 variant"):
        RuntimeConfig(device="cpu", graph_runtime="auto", graph_precision="int8").for_bundle({"parity": {"variants": {}}})
    with pytest.raises(ValueError, match="runs on OpenVINO"):
        RuntimeConfig(device="cpu", graph_runtime="onnxruntime", graph_precision="int8").resolved_graph_runtime()
    # The cpu preset's auto picks int8 only on a class whose cpu_plans.json entry says so.
    monkeypatch.delenv(config.CPU_PLAN_ENV, raising=False)
    table = json.loads(config.CPU_PLANS_FILE.read_text())
    assert not any(entry.get("int8") for entry in table["classes"].values())  # no class measured int8 faster yet
    table["classes"]["avx512_bf16"]["int8"] = True
    (tmp_path / "plans.json").write_text(json.dumps(table))
    monkeypatch.setattr(config, "CPU_PLANS_FILE", tmp_path / "plans.json")
    assert config.cpu_plan("avx512_bf16")[1]["auto_int8"] is True
    assert "auto_int8" not in config.cpu_plan("avx2")[1]


@needs_int8
def test_eval_scores_the_int8_graphs_when_asked(int8_bundle, tmp_path):
    """`emoq eval --bundle B --precision int8` scores what `emoq serve --precision int8` serves (how a
    MELD head bundle's int8 variant is held to its dev split)."""
    from emoq_serve.cli import main

    out = tmp_path / "int8"
    assert main(["eval", "--bundle", str(int8_bundle), "--data", "synthetic:2", "--split", "dev", "--out", str(out),
                 "--precision", "int8"]) == 0
    assert json.loads((out / "eval_dev.json").read_text())["source"]["graph_precision"] == "int8"
