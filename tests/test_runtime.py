"""Runtime engines on the real tiny bundle: ORT sessions and IO binding, the ONNX pipeline
(transformers and vLLM backends) and the eager baseline, all against the stage-2 model's own
posteriors."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, save_model

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle, BundleError
from emoq_serve.data.batching import collate
from emoq_serve.data.types import Example
from emoq_serve.executors import load_recognizer
from emoq_serve.executors.heads import prompt_builder
from emoq_serve.executors.config import RuntimeConfig, cpu_has_native_bf16, runtime_preset
from emoq_serve.executors.eager import EagerPipeline
from emoq_serve.executors.openvino import OvStage
from emoq_serve.executors.ort import OrtStage, providers, session_options
from emoq_serve.executors.pipeline import OnnxPipeline
from emoq_serve.executors.types import STAGES, Utterance

TOL = 1e-4
COMPUTE_STAGES = set(STAGES) - {"queue"}  # the batcher adds "queue"


# -- onnxruntime sessions ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_graph(tmp_path_factory):
    """y = where(mask, 2x, 0) and n = count(mask) per row: float, bool and int64 through one graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "F", 3])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", "F"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "F", 3])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, ["B"])
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor("last", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Mul", ["x", "two"], ["x2"]),
             helper.make_node("Unsqueeze", ["mask", "last"], ["m3"]),
             helper.make_node("Where", ["m3", "x2", "zero"], ["y"]),
             helper.make_node("Cast", ["mask"], ["mi"], to=TensorProto.INT64),
             helper.make_node("ReduceSum", ["mi", "last"], ["n"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "toy", [x, mask], [y, n], consts),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    save_model(model, path)
    return path


def test_session_options_are_deliberate():
    opts = session_options(3)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 1)
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError):
        session_options(0)


def test_providers():
    assert providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown device"):
        providers("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            providers("cuda")


def test_cuda_provider_options_use_the_stages_stream_and_search_convs_heuristically(monkeypatch):
    # The options only (no GPU here): the stage's own stream, the device torch reports, and no
    # per-length conv search.
    from emoq_serve.executors import ort as ort_module

    monkeypatch.setattr(ort_module.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    (name, opts), cpu = providers("cuda", stream=1234)
    assert (name, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert opts == {"device_id": "0", "user_compute_stream": "1234", "cudnn_conv_algo_search": "HEURISTIC"}
    with pytest.raises(ValueError, match="needs the stream"):
        providers("cuda")


def test_ort_stage_binds_torch_tensors(toy_graph):
    stage = OrtStage(toy_graph, intra_op_threads=1)
    assert stage.input_names == ("x", "mask") and stage.output_names == ("y", "n")
    x = torch.randn(2, 5, 4)[..., :3]  # non-contiguous view
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = stage.run(x=x, mask=mask)
    assert torch.equal(out["y"], torch.where(mask[..., None], 2 * x, 0.0))
    assert out["n"].dtype == torch.int64 and out["n"].tolist() == [2, 5]
    assert stage.run(x=x[:1, :2], mask=mask[:1, :2])["y"].shape == (1, 2, 3)  # dynamic shapes
    with pytest.raises(ValueError, match="missing inputs"):
        stage.run(x=x)


# -- the per-provider optimised-graph cache --------------------------------------------------------

class SessionSpy:
    """Records each ORT session built: (model path, optimisation level, where it saves the optimised graph)."""

    def __init__(self, monkeypatch) -> None:
        self.built: list[tuple[str, ort.GraphOptimizationLevel, str]] = []
        real = ort.InferenceSession

        def spy(path, sess_options=None, providers=None, **kw):
            self.built.append((str(path), sess_options.graph_optimization_level, sess_options.optimized_model_filepath))
            return real(path, sess_options, providers=providers, **kw)

        monkeypatch.setattr(ort, "InferenceSession", spy)


def former_inputs(tiny_bundle) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    audio = OrtStage(tiny_bundle / names.AUDIO_ENCODER_ONNX, 1).run(
        waveforms=0.1 * torch.randn(2, 16000), lengths=torch.tensor([16000, 9000]))
    return {"frames": audio["frames"].clone(), "frame_mask": audio["frame_mask"].clone(),
            "input_ids": torch.tensor([[101, 7592, 102, 0], [101, 2088, 2003, 102]]),
            "text_mask": torch.tensor([[True, True, True, False], [True] * 4])}


def test_optimised_graph_is_cached_once_and_reused(tiny_bundle, tmp_path, monkeypatch):
    """First load optimises the shipped graph and caches it; the second loads the cached graph
    with optimisation off (no second pass); both compute what an uncached session computes."""
    graph = tiny_bundle / names.FORMER_ONNX
    inputs = former_inputs(tiny_bundle)
    want = OrtStage(graph, 1).run(**inputs)["query_states"].clone()
    spy = SessionSpy(monkeypatch)
    first = OrtStage(graph, 1, "cpu", cache_dir=tmp_path)
    cached = first.cache_entry / graph.name
    assert not first.cache_hit and cached.is_file() and first.cache_entry.parent == tmp_path
    (path, level, saved_to), = spy.built
    assert (path, level) == (str(graph), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert Path(saved_to).name == graph.name and Path(saved_to).parent.parent == tmp_path  # staged, then renamed
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_entry.name]  # no staging folder left behind
    # The cached graph is the optimised one (fused ops), not a copy of the shipped one.
    assert "com.microsoft" in {n.domain for n in onnx.load(str(cached), load_external_data=False).graph.node}
    mtime = cached.stat().st_mtime_ns
    second = OrtStage(graph, 1, "cpu", cache_dir=tmp_path)
    assert second.cache_hit and cached.stat().st_mtime_ns == mtime
    assert spy.built[1] == (str(cached), ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "")
    for stage in (first, second):
        torch.testing.assert_close(stage.run(**inputs)["query_states"], want, atol=1e-5, rtol=0)


def test_changed_graph_or_provider_gets_its_own_cache_entry(tiny_bundle, tmp_path, monkeypatch):
    from emoq_serve.executors import ort as ort_module

    graph = tiny_bundle / names.FORMER_ONNX
    entry = OrtStage(graph, 1, "cpu", cache_dir=tmp_path / "cache").cache_entry
    # Same graph file, other weights (the side .data file): another graph, another entry.
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in ort_module.graph_files(graph):
        shutil.copy(f, changed / f.name)
    data = changed / f"{graph.name}.data"
    raw = bytearray(data.read_bytes())
    raw[-8:] = bytes(8)
    data.write_bytes(bytes(raw))
    other = OrtStage(changed / graph.name, 1, "cpu", cache_dir=tmp_path / "cache")
    assert not other.cache_hit and other.cache_entry != entry
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([entry.name, other.cache_entry.name])
    # Another provider (or GPU architecture, or onnxruntime version) is another key.
    digest = ort_module.graph_digest(graph)
    cpu_key = ort_module.cache_key(digest, "cpu")
    assert cpu_key == entry.name
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    cuda_key = ort_module.cache_key(digest, "cuda")
    monkeypatch.setattr(ort_module.ort, "__version__", "0.0.0")
    assert len({cpu_key, cuda_key, ort_module.cache_key(digest, "cpu")}) == 3
    assert cuda_key.startswith(digest[:24]) and "-cuda-sm90-ort" in cuda_key


def test_unloadable_cache_entry_is_rebuilt(tiny_bundle, tmp_path):
    graph = tiny_bundle / names.FORMER_ONNX
    entry = OrtStage(graph, 1, "cpu", cache_dir=tmp_path).cache_entry
    (entry / graph.name).write_bytes(b"not an onnx graph")
    again = OrtStage(graph, 1, "cpu", cache_dir=tmp_path)
    assert not again.cache_hit and onnx.load(str(entry / graph.name), load_external_data=False).graph.node
    assert OrtStage(graph, 1, "cpu", cache_dir=tmp_path).cache_hit


def test_unwritable_cache_falls_back_to_optimising_in_memory(tiny_bundle, tmp_path):
    graph = tiny_bundle / names.FORMER_ONNX
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("")
    stage = OrtStage(graph, 1, "cpu", cache_dir=blocked / "ort")
    assert stage.cache_entry is None and not stage.cache_hit
    inputs = former_inputs(tiny_bundle)
    torch.testing.assert_close(stage.run(**inputs)["query_states"], OrtStage(graph, 1).run(**inputs)["query_states"])


def test_pipeline_caches_its_graphs_under_emoq_cache(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOQ_CACHE", str(tmp_path))
    cfg = runtime_preset("test").replace(llm_backend="transformers")
    bundle = Bundle.open(tiny_bundle)  # hashes checked: the manifest's sha256s key the cache
    first = OnnxPipeline(bundle, cfg)
    assert not first.audio.cache_hit and not first.former.cache_hit
    assert {p.parent for p in (first.audio.cache_entry, first.former.cache_entry)} == {tmp_path / "ort"}
    second = OnnxPipeline(bundle, cfg)
    assert second.audio.cache_hit and second.former.cache_hit
    assert second.audio.cache_entry == first.audio.cache_entry
    # Unchecked files are hashed, not trusted by their manifest entry: the same key either way.
    unchecked = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), cfg)
    assert unchecked.former.cache_entry == first.former.cache_entry and unchecked.former.cache_hit
    assert second.info()["audio_precision"] == "float32"  # the fp16 graph is for CUDA
    off = OnnxPipeline(bundle, cfg.replace(graph_cache=False))
    assert off.audio.cache_entry is None
    for p in (first, second, unchecked, off):
        asyncio.run(p.close())


@pytest.mark.parametrize(("device", "precision", "has_fp16", "expected"), [
    ("cuda", "auto", True, "float16"),   # the fp16 graph where it was made for
    ("cuda", "auto", False, "float32"),  # not exported with --fp16
    ("cpu", "auto", True, "float32"),    # fp16 on the CPU EP is slow and less exact
    ("cpu", "float16", True, "float16"),  # asked explicitly
])
def test_audio_precision_resolution(device, precision, has_fp16, expected):
    assert RuntimeConfig(device=device, audio_precision=precision).resolved_audio_precision(has_fp16) == expected


def test_fp16_audio_graph_without_it_in_the_bundle_fails_clearly():
    with pytest.raises(ValueError, match="no fp16 audio graph.*--fp16"):
        RuntimeConfig(device="cuda", audio_precision="float16").resolved_audio_precision(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ort_stage_cuda_io_binding_stays_on_gpu(toy_graph):
    stage = OrtStage(toy_graph, intra_op_threads=1, device="cuda")
    x, mask = torch.randn(2, 5, 3, device="cuda"), torch.rand(2, 5, device="cuda") > 0.5
    out = stage.run(x=x, mask=mask)
    assert out["y"].is_cuda
    assert torch.equal(out["y"], torch.where(mask[..., None], 2 * x, 0.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ort_cuda_real_bundle_graphs_from_a_worker_thread_on_its_own_stream(tiny_bundle, tmp_path):
    """The bundle's audio and former graphs on the CUDA EP with IO binding, run from another
    thread whose current stream is not the session's, inputs written by a kernel queued just
    before: ORT must wait for it (the fence), and match the CPU EP. Cached for the CUDA provider."""
    import threading

    audio_cpu, former_cpu = OrtStage(tiny_bundle / names.AUDIO_ENCODER_ONNX, 1), OrtStage(tiny_bundle / names.FORMER_ONNX, 1)
    audio, former = (OrtStage(tiny_bundle / g, 1, "cuda", cache_dir=tmp_path) for g in (names.AUDIO_ENCODER_ONNX, names.FORMER_ONNX))
    assert audio.cache_entry.name.split("-")[1].startswith("cuda")
    waveforms = 0.1 * torch.randn(2, 16000)
    lengths = torch.tensor([16000, 9000])
    want = audio_cpu.run(waveforms=waveforms, lengths=lengths)
    got: dict[str, torch.Tensor] = {}

    def work() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            big = torch.randn(4096, 4096, device="cuda")
            slow = (big @ big @ big).sum() * 0  # keeps this stream busy while the inputs are written after it
            out = audio.run(waveforms=waveforms.cuda() + slow, lengths=lengths.cuda())
            got["frames"], got["mask"] = out["frames"].clone(), out["frame_mask"].clone()
            torch.cuda.current_stream().synchronize()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert got["frames"].is_cuda and torch.equal(got["mask"].cpu(), want["frame_mask"])
    torch.testing.assert_close(got["frames"].cpu(), want["frames"], atol=1e-3, rtol=0)
    inputs = former_inputs(tiny_bundle)
    torch.testing.assert_close(former.run(**{k: v.cuda() for k, v in inputs.items()})["query_states"].cpu(),
                               former_cpu.run(**inputs)["query_states"], atol=1e-3, rtol=0)
    assert OrtStage(tiny_bundle / names.FORMER_ONNX, 1, "cuda", cache_dir=tmp_path).cache_hit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_onnx_pipeline_on_cuda_serves_the_fp16_graph_close_to_the_model(tiny_bundle, reference):
    pipeline = OnnxPipeline(Bundle.open(tiny_bundle), runtime_preset("test").replace(device="cuda", llm_backend="transformers"))
    assert pipeline.audio.path.name == names.AUDIO_ENCODER_FP16_ONNX and pipeline.info()["audio_precision"] == "float16"
    got = posteriors(pipeline, utterances())
    asyncio.run(pipeline.close())
    assert np.abs(got - reference).max() < 0.1


# -- runtime config ------------------------------------------------------------------------------

def test_runtime_presets_are_fresh_copies():
    cfg = runtime_preset("test")
    cfg.max_batch = 999
    assert runtime_preset("test").max_batch != 999
    assert RuntimeConfig(device="auto").resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown runtime preset"):
        runtime_preset("nope")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--runtime", "cuda"], 64),  # the preset's size, which also sizes vLLM's max_num_seqs
    (["--runtime", "cpu"], 8),
    (["--runtime", "cuda", "--max-batch", "8"], 8),  # an explicit flag still wins
    (["--runtime", "test", "--max-batch", "32"], 32),
])
def test_serve_max_batch_is_the_presets_unless_given(flags, expected):
    import argparse

    from emoq_serve.server.cli import configs, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    runtime, server = configs(parser.parse_args(["serve", *flags]))
    # The batcher's batches and the engine's sizing agree.
    assert runtime.max_batch == server.batcher.max_batch == expected


def test_serve_tensor_parallel_and_audio_precision_flags():
    import argparse

    from emoq_serve.server.cli import configs, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    runtime, _ = configs(parser.parse_args(["serve", "--runtime", "cuda"]))
    assert (runtime.tensor_parallel_size, runtime.audio_precision) == (1, "auto")  # the preset's
    runtime, _ = configs(parser.parse_args(["serve", "--runtime", "cuda", "--tensor-parallel-size", "4",
                                            "--audio-precision", "float32"]))
    assert (runtime.tensor_parallel_size, runtime.audio_precision) == (4, "float32")
    for flag, wide in (("wide", True), ("narrow", False)):
        runtime, _ = configs(parser.parse_args(["serve", "--runtime", "test", "--lone-batch", flag]))
        assert runtime.lone_batch_wide is wide
    # Length buckets: the plan's unless the flag is given; 'one' is a single bucket.
    from emoq_serve.engine.batcher import DEFAULT_BUCKET_EDGES_S

    _, server = configs(parser.parse_args(["serve", "--runtime", "test"]))
    assert server.batcher.bucket_edges_s == DEFAULT_BUCKET_EDGES_S
    for flag, edges in (("one", ()), ("2,4.5", (2.0, 4.5)), ("default", DEFAULT_BUCKET_EDGES_S)):
        _, server = configs(parser.parse_args(["serve", "--runtime", "test", "--length-buckets", flag]))
        assert server.batcher.bucket_edges_s == edges
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--length-buckets", "4,2"])
    from emoq_serve.engine.batcher import bucket_edges

    assert bucket_edges(None, (2.0, 6.0)) == {"bucket_edges_s": (2.0, 6.0)}  # no flag: the plan's
    assert bucket_edges((), (2.0, 6.0)) == {"bucket_edges_s": ()}  # the flag wins, even 'one'
    assert bucket_edges(None, None) == {}


# -- pipelines on the tiny bundle ----------------------------------------------------------------

def utterances() -> list[Utterance]:
    """Mixed lengths and both missing-modality cases (no audio, no transcript)."""
    rng = np.random.default_rng(7)

    def clip(seconds: float) -> np.ndarray:
        return (0.1 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32)

    return [
        Utterance(clip(0.2), "No.", "spk1"),
        Utterance(clip(2.5), "I can't believe you did that!", None),
        Utterance(clip(1.0), "", "spk2"),
        Utterance(np.zeros(0, np.float32), "Well, that is just wonderful news.", None),
    ]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> np.ndarray:
    """Posteriors of the stage-2 model itself (EmoQStage2.predict on the padded batch)."""
    from emoq_serve.model.stage2 import EmoQStage2

    model = EmoQStage2.load(tiny_checkpoint)
    examples = [Example(str(i), u.audio if len(u.audio) else None, u.transcript, 0, u.speaker)
                for i, u in enumerate(utterances())]
    with torch.no_grad():
        return model.predict(collate(examples, model.text_tokenizer, model.cfg.former.max_text_tokens)).numpy()


def posteriors(recognizer, batch: list[Utterance]) -> np.ndarray:
    async def run():
        return await recognizer.recognize(batch)

    predictions = asyncio.run(run())
    for p in predictions:
        assert set(p.timings_ms) == COMPUTE_STAGES and all(v >= 0 for v in p.timings_ms.values())
        assert p.label == recognizer.labels[int(np.argmax(p.probabilities))]
    return np.stack([p.probabilities for p in predictions])


@pytest.fixture(scope="module")
def onnx_transformers(tiny_bundle):
    pipeline = OnnxPipeline(Bundle.open(tiny_bundle), runtime_preset("test").replace(llm_backend="transformers"))
    yield pipeline
    asyncio.run(pipeline.close())


def test_eager_pipeline_matches_model(tiny_bundle, reference):
    engine = EagerPipeline(Bundle.open(tiny_bundle, verify_hashes=False), runtime_preset("test"))
    got = posteriors(engine, utterances())
    assert np.abs(got - reference).max() < TOL
    assert engine.info()["engine"] == "eager"
    asyncio.run(engine.close())


def test_eager_pipeline_workers_and_bf16(tiny_bundle, reference, monkeypatch):
    """Workers run utterances side by side, each on a single torch thread; bf16 stays close."""
    bundle = Bundle.open(tiny_bundle, verify_hashes=False)
    engine = EagerPipeline(bundle, runtime_preset("test").replace(eager_workers=2, dtype="bfloat16"))
    seen: list[tuple[str, int]] = []
    run_one = engine.recognize_one

    def spy(utterance):
        import threading
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return run_one(utterance)

    monkeypatch.setattr(engine, "recognize_one", spy)
    got = posteriors(engine, utterances())
    asyncio.run(engine.close())
    assert engine.info()["dtype"] == "bfloat16" and engine.info()["eager_workers"] == "2"
    assert engine.llm.model.dtype == torch.bfloat16
    assert {n for n, _ in seen} <= {"emoq-eager_0", "emoq-eager_1"} and {t for _, t in seen} == {1}
    assert 0 < np.abs(got - reference).max() < 0.05  # bf16 differs from fp32, but only a little
    with pytest.raises(ValueError, match="eager_workers"):
        EagerPipeline(bundle, runtime_preset("test").replace(eager_workers=-1))


def test_onnx_pipeline_transformers_matches_model(onnx_transformers, reference):
    got = posteriors(onnx_transformers, utterances())
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < TOL
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    assert np.abs(reference - reference[0]).max() > 1e-4  # the rows differ, so the check can fail


@pytest.mark.parametrize("graph", [names.AUDIO_ENCODER_ONNX, names.FORMER_ONNX])
def test_openvino_stage_matches_onnxruntime(tiny_bundle, graph):
    """The shipped graph in OpenVINO: f32 equals ORT, bf16 is close (the former) or at least really
    bf16. The tiny preset's random audio encoder (per-frame layer norm after each of 7 narrow
    convs) amplifies bf16 rounding: on an AMX Xeon its frames move by ~30 % RMS, although the
    posteriors stay within 0.05 (test_onnx_pipeline_openvino_matches_model); a bundle whose
    variant moves posteriors too far is served in fp32 (test_export's variant tests)."""
    path = Bundle.open(tiny_bundle, verify_hashes=False).file(graph)
    ort_stage = OrtStage(path, 1)
    torch.manual_seed(0)
    if graph == names.AUDIO_ENCODER_ONNX:
        inputs = {"waveforms": 0.1 * torch.randn(2, 16000), "lengths": torch.tensor([16000, 9000])}
    else:
        audio = OrtStage(Bundle.open(tiny_bundle, verify_hashes=False).file(names.AUDIO_ENCODER_ONNX), 1).run(
            waveforms=0.1 * torch.randn(2, 16000), lengths=torch.tensor([16000, 9000]))
        inputs = {"frames": audio["frames"], "frame_mask": audio["frame_mask"],
                  "input_ids": torch.tensor([[101, 7592, 102, 0], [101, 2088, 2003, 102]]),
                  "text_mask": torch.tensor([[True, True, True, False], [True] * 4])}
    want = ort_stage.run(**inputs)
    f32_diff: dict[str, float] = {}
    bf16_tol = 0.1 if graph == names.FORMER_ONNX else float("inf")
    for precision, tol in (("float32", 1e-4), ("bfloat16", bf16_tol)):
        got = OvStage(path, 1, precision).run(**inputs)
        assert set(got) == set(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape
            if value.dtype == torch.bool:
                assert torch.equal(got[name], value)
            else:
                diff = (got[name] - value).abs().max().item()
                assert diff < tol, (precision, name, diff)
                f32_diff.setdefault(name, diff)
                if precision == "bfloat16" and cpu_has_native_bf16():
                    # Really ran in bf16 (elsewhere OpenVINO may keep f32): bf16 rounding is orders of
                    # magnitude above f32's (~1e-6 here), so "differs at all" would not tell them apart.
                    assert diff > 100 * f32_diff[name], (name, diff, f32_diff[name])
    with pytest.raises(ValueError, match="missing inputs"):
        OvStage(path, 1, "float32").run()


def test_onnx_pipeline_openvino_matches_model(tiny_bundle, reference):
    """OpenVINO in f32 reproduces the model; in bf16 (the CPU preset's choice on AVX512-BF16) it
    stays within bf16's reach."""
    bundle = Bundle.open(tiny_bundle, verify_hashes=False)
    cfg = runtime_preset("test").replace(llm_backend="transformers", graph_runtime="openvino")
    for dtype, tol in (("float32", TOL), ("bfloat16", 0.05)):
        pipeline = OnnxPipeline(bundle, cfg.replace(dtype=dtype))
        got = posteriors(pipeline, utterances())
        assert pipeline.info()["graph_runtime"] == "openvino"
        asyncio.run(pipeline.close())
        assert np.abs(got - reference).max() < tol, dtype
    # Two graph workers run two batches' ONNX stages at once, each thread its own infer request.
    pipeline = OnnxPipeline(bundle, cfg.replace(graph_workers=2))
    threads = []
    encode = pipeline.encode
    pipeline.encode = lambda batch: threads.append(__import__("threading").current_thread().name) or encode(batch)

    async def both():
        batch = utterances()
        return await asyncio.gather(pipeline.recognize(batch[:2]), pipeline.recognize(batch[2:]))

    first, second = asyncio.run(both())
    asyncio.run(pipeline.close())
    got = np.stack([p.probabilities for p in first + second])
    assert np.abs(got - reference).max() < TOL and len(set(threads)) == 2
    assert runtime_preset("test").resolved_graph_runtime() == "onnxruntime"
    with pytest.raises(ValueError, match="CPU only"):
        cfg.replace(device="cuda").resolved_graph_runtime()


def test_lone_batch_runs_wide_only_when_every_compute_slot_is_free(tiny_bundle, reference):
    """With lone_batch_wide, a one-utterance batch that finds the other compute slot free runs the
    graphs' second compilation (one stream of 2 threads) and gives the same posteriors; a batch of
    two, or a lone one while another slot is busy, runs the per-worker single-thread streams."""
    cfg = runtime_preset("test").replace(llm_backend="transformers", graph_runtime="openvino", dtype="float32",
                                         graph_workers=2, compute_slots=2, lone_batch_wide=True)
    pipeline = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), cfg)
    try:
        for stage in (pipeline.audio, pipeline.former):
            assert stage.wide.get_property("INFERENCE_NUM_THREADS") == 2
            assert stage.wide.get_property("NUM_STREAMS") == 1 and stage.compiled.get_property("NUM_STREAMS") == 2
        assert pipeline.info()["lone_batch_threads"] == "2"
        batch = utterances()
        wide_calls = []
        run_wide = pipeline.audio.run_wide
        pipeline.audio.run_wide = lambda **kw: wide_calls.append(kw["waveforms"].shape) or run_wide(**kw)
        lone = np.concatenate([posteriors(pipeline, [u]) for u in batch])
        assert pipeline.wide_batches == len(batch) == len(wide_calls)
        assert np.abs(lone - reference).max() < TOL
        posteriors(pipeline, batch[:2])
        pipeline._compute.acquire()  # another batch computing
        try:
            posteriors(pipeline, batch[:1])
        finally:
            pipeline._compute.release()
        assert pipeline.wide_batches == len(batch) == len(wide_calls)
    finally:
        asyncio.run(pipeline.close())
    narrow = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), cfg.replace(lone_batch_wide=False))
    assert narrow.audio.wide is None and narrow.info()["lone_batch_threads"] == "1"
    asyncio.run(narrow.close())


def test_onnx_pipeline_audio_per_utterance_matches_model(tiny_bundle, reference):
    """Each clip encoded alone (no padding) gives the padded batch's posteriors."""
    cfg = runtime_preset("test").replace(llm_backend="transformers", audio_per_utterance=True)
    pipeline = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), cfg)
    calls = []
    run = pipeline.audio.run
    pipeline.audio.run = lambda **kw: calls.append(kw["waveforms"].shape) or run(**kw)
    batch = utterances()
    got = posteriors(pipeline, batch)
    asyncio.run(pipeline.close())
    assert np.abs(got - reference).max() < TOL
    assert [s[0] for s in calls] == [1] * len(batch)  # one clip per run, each at its own length
    assert sorted(s[1] for s in calls) == sorted(max(len(u.audio), 1) for u in batch)


def test_onnx_pipeline_is_batch_invariant(onnx_transformers, reference):
    """Each utterance alone gives its row of the padded batch (the batcher may split anyhow)."""
    batch = utterances()
    alone = np.concatenate([posteriors(onnx_transformers, [u]) for u in batch])
    assert np.abs(alone - reference).max() < TOL
    assert asyncio.run(onnx_transformers.recognize([])) == []


def test_load_recognizer_and_info(tiny_bundle):
    cfg = runtime_preset("test").replace(llm_backend="transformers")
    engine = load_recognizer(tiny_bundle, cfg, "onnx")
    info = engine.info()
    assert info["bundle_id"] == Bundle.open(tiny_bundle).bundle_id
    assert info["engine"] == "onnx" and info["onnxruntime"] == ort.__version__
    assert engine.labels == Bundle.open(tiny_bundle).labels
    asyncio.run(engine.close())
    with pytest.raises(ValueError, match="unknown engine"):
        load_recognizer(tiny_bundle, cfg, "tensorrt")


def test_emotion_token_ids_must_match_manifest(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / names.MANIFEST).read_text())
    manifest["prompt"]["emotion_token_ids"] = manifest["prompt"]["emotion_token_ids"][::-1]
    (copy / names.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="emotion words"):
        prompt_builder(Bundle.open(copy, verify_hashes=False))


@pytest.mark.slow
def test_onnx_pipeline_vllm_matches_model_with_overlapping_batches(tiny_bundle, reference):
    """The serving configuration: vLLM in-process, two batches in flight at once."""
    batch = utterances()

    async def run():
        pipeline = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), runtime_preset("test"))
        try:
            first, second = await asyncio.gather(pipeline.recognize(batch[:2]), pipeline.recognize(batch[2:]))
            return pipeline.info(), [p.probabilities for p in first + second]
        finally:
            await pipeline.close()

    info, rows = asyncio.run(run())
    assert info["llm_backend"] == "vllm"
    assert np.abs(np.stack(rows) - reference).max() < TOL


def test_length_grid_bounds_padding_and_makes_shapes_recur():
    from emoq_serve.executors.pipeline import GRID_QUANTUM, grid_length

    lengths = range(16_000, 160_000, 97)  # 1-10 s
    points = {grid_length(n, 1.08) for n in lengths}
    assert all(n <= grid_length(n, 1.08) <= 1.09 * n + GRID_QUANTUM for n in lengths)
    assert all(p % GRID_QUANTUM == 0 for p in points) and len(points) < 40  # ~1500 lengths, a few dozen shapes
    assert grid_length(48_001, 1.0) == 48_001 and grid_length(1, 1.08) == GRID_QUANTUM


def test_onnx_pipeline_on_the_length_grid_matches_model(tiny_bundle, reference):
    """Clips padded up to the length grid and transcripts to a token multiple give the exact
    lengths' posteriors, with one graph worker per core sharing the compute slots with the LLM."""
    cfg = runtime_preset("test").replace(llm_backend="transformers", audio_per_utterance=True, audio_length_ratio=1.1,
                                         text_length_multiple=16, graph_workers=2, compute_slots=1)
    pipeline = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), cfg)
    audio_shapes, text_widths, running, most = [], [], [0], [0]
    run_audio, run_former, encode = pipeline.audio.run, pipeline.former.run, pipeline.encode

    def counted_encode(batch):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            return encode(batch)
        finally:
            running[0] -= 1

    pipeline.audio.run = lambda **kw: audio_shapes.append(kw["waveforms"].shape[1]) or run_audio(**kw)
    pipeline.former.run = lambda **kw: text_widths.append(kw["input_ids"].shape[1]) or run_former(**kw)
    pipeline.encode = counted_encode

    async def both():
        batch = utterances()
        return await asyncio.gather(pipeline.recognize(batch[:2]), pipeline.recognize(batch[2:]))

    first, second = asyncio.run(both())
    asyncio.run(pipeline.close())
    assert np.abs(np.stack([p.probabilities for p in first + second]) - reference).max() < TOL
    from emoq_serve.executors.pipeline import grid_length

    assert audio_shapes and all(w == grid_length(w, 1.1) for w in audio_shapes)  # every width a grid point
    assert text_widths and all(w % 16 == 0 for w in text_widths)
    assert most[0] == 1  # one compute slot: the two workers never encoded at once


def test_cpu_preset_follows_the_plan_of_this_cpu_class(monkeypatch):
    from emoq_serve.executors.config import CPU_PLAN_ENV, CPU_PLANS_FILE, cpu_plan

    table = json.loads(CPU_PLANS_FILE.read_text())
    cores = __import__("os").cpu_count()
    for klass, entry in table["classes"].items():
        name, fields = cpu_plan(klass)
        assert name == entry["plan"] and name in table["plans"]
        # "cores" resolved; JSON lists (bucket edges) become tuples, as RuntimeConfig holds them
        assert all(isinstance(v, int | float | bool | tuple) for v in fields.values())
    name, fields = cpu_plan("a-class-nobody-measured")
    assert name == table["default"]
    monkeypatch.setenv(CPU_PLAN_ENV, "worker-per-core")
    assert cpu_plan("amx") == ("worker-per-core", {"graph_workers": cores, "compute_slots": cores,
                                                   "inflight_batches": 3,
                                                   **{k: v for k, v in table["plans"]["worker-per-core"].items()
                                                      if k not in ("about", "graph_workers", "compute_slots",
                                                                   "inflight_batches")}})
    monkeypatch.setenv(CPU_PLAN_ENV, "nope")
    with pytest.raises(ValueError, match="unknown CPU plan"):
        cpu_plan("amx")


def test_warm_up_runs_every_grid_length_on_every_graph_worker(tiny_bundle, monkeypatch):
    import threading

    from emoq_serve.executors.pipeline import GRID_QUANTUM, grid_length

    seen = []
    run = OrtStage.run
    monkeypatch.setattr(OrtStage, "run", lambda self, **kw: seen.append(
        (threading.current_thread().name, kw["waveforms"].shape[1])) or run(self, **kw))
    cfg = runtime_preset("test").replace(llm_backend="transformers", audio_per_utterance=True, audio_length_ratio=1.2,
                                         warmup_audio_s=0.2, graph_workers=2)
    pipeline = OnnxPipeline(Bundle.open(tiny_bundle, verify_hashes=False), cfg)
    asyncio.run(pipeline.close())
    grid = sorted({grid_length(n, 1.2) for n in range(GRID_QUANTUM, 3200 + 1, GRID_QUANTUM)})
    workers = {name for name, _ in seen}
    assert len(workers) == 2 and all(sorted(w for n, w in seen if n == name) == grid for name in workers)


def test_serve_refuses_a_port_in_use_before_loading_anything(tmp_path):
    import socket
    import subprocess
    import sys

    from emoq_serve.server.cli import ports_in_use

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        assert ports_in_use("127.0.0.1", [port, 0, None]) == [port]
        # No such bundle: the port check must come first, before anything is read or loaded.
        done = subprocess.run([sys.executable, "-m", "emoq_serve.cli", "serve", "--bundle", str(tmp_path / "none"),
                               "--port", str(port), "--metrics-port", "-1", "--asr", "off"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert ports_in_use("127.0.0.1", [port]) == []  # closed: free again
