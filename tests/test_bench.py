"""`emoq bench`: FLOPs estimates against torch's FLOP counter, the seeded workload, the matmul
peak, and end-to-end runs over real gRPC (a stand-in engine in-process; the tiny bundle served
by `emoq serve` subprocesses for both engines)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flops
from benchmarks.workload import WorkloadConfig, make_workload
from emoq_serve.cli import main
from emoq_serve.config import SAMPLE_RATE, preset
from emoq_serve.executors.types import STAGES


def counted(fn, *args, **kwargs) -> int:
    """FLOPs torch counts for a call, with attention as plain matmuls so they are counted too."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def test_audio_encoder_and_former_flops_match_the_modules():
    from emoq_serve.model.audio_encoder import AudioEncoder
    from emoq_serve.model.former import EmoQFormer

    cfg = preset("tiny")
    torch.manual_seed(0)
    encoder = AudioEncoder(cfg.audio)
    former = EmoQFormer(cfg.former, encoder.hidden_size, vocab_size=500).eval()
    for seconds, text_tokens in ((1.3, 5), (2.2, 17)):
        samples = int(seconds * SAMPLE_RATE)
        wave, lengths = torch.randn(1, samples), torch.tensor([samples])
        frames, mask = encoder(wave, lengths)
        assert frames.shape[1] == flops.num_frames(samples)
        expected = counted(encoder, wave, lengths)
        # HuBERT's even-kernel positional conv computes one frame more than it keeps.
        assert flops.audio_encoder_flops(cfg.audio, samples) == pytest.approx(expected, rel=2e-3)
        ids, text_mask = torch.randint(0, 500, (1, text_tokens)), torch.ones(1, text_tokens, dtype=torch.bool)
        assert flops.former_flops(cfg.former, encoder.hidden_size, frames.shape[1], text_tokens) == \
            counted(former, frames, mask, ids, text_mask)


def test_llm_flops_match_a_qwen2_prefill_and_the_projector():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from emoq_serve.model.projector import Projector

    c = preset("tiny").llm
    former_dim = preset("tiny").former.hidden_size
    llm = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
    )).eval()
    projector = Projector(former_dim, c.hidden_size, c.num_soft_tokens, c.projector_hidden)
    prompt = 37
    measured = counted(projector, torch.randn(1, former_dim)) + counted(
        llm, input_ids=torch.randint(0, c.vocab_size, (1, prompt)), logits_to_keep=1)
    # The math backend multiplies the full P×P score matrix; the estimate counts the causal half.
    masked_half = c.num_layers * 2 * 2 * c.hidden_size * prompt * (prompt - 1) / 2
    assert flops.llm_flops(c, former_dim, prompt) + masked_half == pytest.approx(measured, rel=1e-6)


def test_workload_is_seeded_with_a_conversational_length_distribution():
    cfg = WorkloadConfig(num_utterances=200, seed=3)
    a, b = make_workload(cfg), make_workload(cfg)
    assert all(np.array_equal(x.audio, y.audio) and x.transcript == y.transcript for x, y in zip(a, b))
    other = make_workload(WorkloadConfig(num_utterances=200, seed=4))
    assert any(len(x.audio) != len(y.audio) for x, y in zip(a, other))
    seconds = np.array([r.seconds for r in a])
    assert seconds.min() >= 1.0 and seconds.max() <= 10.0
    assert 2.0 < np.median(seconds) < 4.5 and seconds.max() > 2 * np.median(seconds)  # right-skewed
    for r in a:
        assert r.audio.dtype == np.float32 and 0.05 < np.abs(r.audio).max() <= 1.0
        assert r.transcript.strip() and r.speaker


def test_matmul_peak_is_positive_and_restores_threads():
    before = torch.get_num_threads()
    peak = flops.matmul_peak(1, "float32", n_max=512, seconds=0.2)
    assert peak.gflops > 0.1 and peak.n in (256, 512) and peak.threads == 1
    assert torch.get_num_threads() == before


def test_closed_loop_holds_the_concurrency_and_drops_warmup():
    import asyncio

    from benchmarks.loadgen import Budget, CallResult, run_closed
    from benchmarks.stats import steady_throughput

    workload = make_workload(WorkloadConfig(num_utterances=3))
    inflight, peak, issued = 0, 0, []

    async def call(req):
        nonlocal inflight, peak
        issued.append(req.index)
        inflight += 1
        peak = max(peak, inflight)
        sent = asyncio.get_running_loop().time()
        await asyncio.sleep(0.01)
        inflight -= 1
        return CallResult(req.index, sent, asyncio.get_running_loop().time(), "OK", req.seconds)

    run = asyncio.run(run_closed(call, workload, 4, Budget(requests=20, warmup=5)))
    assert peak == 4 and len(issued) == 25 and len(run.results) == 20
    # measuring restarts at the first workload item, so every engine sees the same sequence
    assert issued[:5] == [0, 1, 2, 0, 1] and issued[5:9] == [0, 1, 2, 0]
    assert run.t0 < run.issue_end < max(r.done for r in run.results)
    utt_s, _ = steady_throughput(run)
    assert 0 < utt_s <= 4 / 0.01 * 1.05  # never above concurrency / service time


def check_point(p: dict) -> None:
    lat = p["latency_ms"]
    assert p["ok"] == p["requests"] > 0 and p["errors"] == {}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert p["throughput_utt_s"] > 0 and p["throughput_audio_s_s"] >= p["throughput_utt_s"]  # clips >= 1 s
    assert p["mean_batch_size"] is not None and p["mean_batch_size"] >= 1.0
    assert p["server_ms"]["total"] > 0 and set(STAGES) <= set(p["server_ms"])


def test_stream_open_loop_against_a_running_server(tmp_path):
    """Streaming + open loop + metrics scraping over real gRPC, with a cheap stand-in engine."""
    from server_harness import RunningServer, StandInRecognizer, config

    with RunningServer(StandInRecognizer, config(max_audio_seconds=15.0)) as srv:
        url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
        assert main(["bench", "--server", srv.address, "--metrics-url", url, "--mode", "open", "--rate", "20,40",
                     "--api", "stream", "--chunk-ms", "250", "--requests", "12", "--warmup", "2",
                     "--utterances", "6", "--peak-seconds", "0.1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [p["rate"] for p in report["points"]] == [20.0, 40.0]
    for p in report["points"]:
        check_point(p)
        assert p["api"] == "stream" and p["max_send_lag_ms"] >= 0
    assert report["bundle_id"] == "standin" and report["ratios"] == {} and report["flops_per_request"] == {}


@pytest.mark.slow
def test_bench_both_engines_on_the_tiny_bundle(tiny_bundle, tmp_path, monkeypatch, caplog):
    import logging
    import socket

    from benchmarks import server_proc
    from emoq_serve.bundle import Bundle

    # The first server's gRPC port is taken between the harness picking it and the server binding
    # it (an acceptance run lost a port so): the harness must start that server again on fresh ports.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    picks = iter([squatter.getsockname()[1]])
    free_port = server_proc.free_port
    monkeypatch.setattr(server_proc, "free_port", lambda host="127.0.0.1": next(picks, None) or free_port(host))
    out = tmp_path / "bench"
    with squatter, caplog.at_level(logging.WARNING, logger="benchmarks.server_proc"):
        assert main(["bench", "--bundle", str(tiny_bundle), "--engine", "both", "--concurrency", "1,2",
                     "--requests", "6", "--warmup", "1", "--utterances", "4", "--peak-seconds", "0.1",
                     "--serve-args=--no-verify --graph-runtime onnxruntime", "--out", str(out)]) == 0
    assert sum("retrying on fresh ports" in r.getMessage() for r in caplog.records) == 1
    report = json.loads((out / "bench.json").read_text())
    assert report["bundle_id"] == Bundle.open(tiny_bundle).bundle_id and report["preset"] == "tiny"
    assert [(p["engine"], p["concurrency"]) for p in report["points"]] == \
        [("eager", 1), ("eager", 2), ("eager-bf16", 1), ("eager-bf16", 2), ("onnx", 1), ("onnx", 2)]
    for p in report["points"]:
        check_point(p)
        assert set(p["extra"]["efficiency"]) == {"audio_encoder", "former", "pooling", "llm"}
        cpu, batches = p["extra"]["server_cpu"], p["extra"]["batches"]
        assert cpu["cores_busy"] > 0 and cpu["threads_running"] >= 1 and cpu["groups"]
        assert batches["batches"] >= 1 and batches["mean_batch"] >= 1 and 0 <= batches["padding_fraction"] < 1
        want = "bf16_1t" if p["engine"] == "eager-bf16" else "fp32_1t"  # the test preset's graphs: ORT fp32
        assert p["extra"]["efficiency_peak"] == want
    assert set(report["ratios"]) == {"eager", "eager-bf16"}
    for r in report["ratios"].values():
        assert set(r["throughput"]) == {"1", "2"} and r["p50_at_c1"] > 0
    assert report["threads"]["eager"]["runtime"]["dtype"] == "float32"
    assert report["threads"]["eager-bf16"]["runtime"]["dtype"] == "bfloat16"
    assert {e: i["versions"]["dtype"] for e, i in report["model_info"].items()} == \
        {"eager": "float32", "eager-bf16": "bfloat16", "onnx": report["model_info"]["onnx"]["versions"]["dtype"]}
    assert all(report["flops_per_request"][s] > 0 for s in ("audio_encoder", "former", "pooling", "llm"))
    computed = report["flops_per_request_computed"]  # vLLM's prefix cache serves template blocks
    assert computed["eager"] == report["flops_per_request"] and computed["onnx"]["llm"] <= computed["eager"]["llm"]
    assert len(report["summary"]) == 6 and report["repeats"] == 1
    assert any(g.startswith("emoq-eager") for g in report["points"][0]["extra"]["server_cpu"]["groups"])
    assert report["machine"]["logical_cores"] >= 1 and report["machine"]["cpu_model"]
    assert report["threads"]["onnx"]["runtime"]["audio_threads"] >= 1
    assert "torch" in report["versions"]["bench"] and report["peak_fp32_gflops"] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| eager | 1 |" in (out / "bench.md").read_text()
    assert "## Optimized (onnx) / eager-bf16" in (out / "bench.md").read_text()


def test_conversation_bench_reports_segment_latency_memory_and_sustained_streams(tmp_path):
    """`--api conversation` against a stand-in server process (real gRPC, real Silero VAD): real-time
    paced streams of short generated conversations, every turn answered, the server's RSS sampled
    through its pid; the same run under an unmeetable latency bound is reported as not sustained."""
    from server_harness import spawn_server

    proc, port = spawn_server(max_audio_seconds=30.0)
    try:
        def bench(out, *flags):
            assert main(["bench", "--server", f"127.0.0.1:{port}", "--server-pid", str(proc.pid),
                         "--api", "conversation", "--conversation-seconds", "10", "--chunk-ms", "100",
                         "--out", str(out), *flags]) == 0
            return json.loads((out / "bench.json").read_text())

        # Bounds no loaded machine misses: this run checks what is measured; the bound and slope
        # checks are shown by the next run and by the test below.
        report = bench(tmp_path / "ok", "--concurrency", "1,2", "--realtime", "--latency-bound-ms", "600000",
                       "--max-slope-ms-per-min", "1e9")
        slow = bench(tmp_path / "bound", "--concurrency", "1", "--latency-bound-ms", "1")
    finally:
        proc.kill()
        proc.wait(10)
    assert [p["streams"] for p in report["points"]] == [1, 2]
    for p in report["points"]:
        assert p["api"] == "conversation" and p["errors"] == {} and p["turns_missing"] == 0
        assert p["turns"] == p["streams"] * report["conversation"]["turns_per_stream"] >= 2 * p["streams"]
        assert p["segments_ok"] == p["turns"] and p["false_segments"] == 0
        lat = p["latency_ms"]
        # from the end of speech the segment only closes after the segmenter's minimum silence
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert p["realtime_factor"] <= 1.0  # paced: no stream outruns its audio
        assert p["memory"]["before_mb"] > 10 and p["memory"]["peak_mb"] >= p["memory"]["before_mb"]
        assert p["sustained"] and p["why_not"] == []
    assert report["sustained_streams"] == {"onnx": 2}
    md = (tmp_path / "ok" / "bench.md").read_text()
    assert "**onnx: 2 real-time stream(s) sustained**" in md and "| onnx | 2 |" in md
    assert (tmp_path / "ok" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (point,) = slow["points"]
    assert not point["sustained"] and point["why_not"] == ["p95 above 1 ms"]
    assert slow["sustained_streams"] == {"onnx": 0} and any("not paced" in n for n in slow["notes"])


def test_conversation_latency_that_grows_over_the_stream_is_not_sustained():
    """An overloaded server falls behind real time: latency grows with the stream even while p95 is
    under the bound; a missing turn and a failed stream are each disqualifying too."""
    from benchmarks.conversation import Segment, StreamRun, summarize_point, sustained_streams

    def point(streams, latencies, turns=None, code="OK"):
        segs = [Segment(0, 10.0 * i, 10.0 * i + 2, i, lat) for i, lat in enumerate(latencies)]
        runs = [StreamRun(segs, turns or len(segs), code)] + [StreamRun([], 0, "OK")] * (streams - 1)
        return summarize_point("onnx", runs, 60.0, None, 60.0 * streams, 3000.0, 500.0)

    flat = point(1, [0.5, 0.6, 0.5, 0.6, 0.5, 0.6])
    growing = point(2, [0.5, 0.7, 0.9, 1.1, 1.3, 1.5])  # +0.2 s per 10 s of stream = 1200 ms/min
    assert flat["sustained"] and abs(flat["latency_slope_ms_per_min"]) < 100
    assert not growing["sustained"] and growing["why_not"] == ["latency grows 1200 ms/min"]
    assert growing["latency_ms"]["p95"] < 3000
    assert point(1, [0.5] * 4, turns=5)["why_not"] == ["1 turn(s) without a result"]
    assert point(1, [0.5] * 4, code="DEADLINE_EXCEEDED")["why_not"] == ["failed streams {'DEADLINE_EXCEEDED': 1}"]
    assert sustained_streams([flat, growing, {**flat, "streams": 4}]) == {"onnx": 1}


def test_llm_flops_after_prefix_caching_skip_the_shared_template_blocks():
    cfg = preset("base").llm
    prompts = [[1, 2, 3, 4, 5, 9, 9], [1, 2, 3, 4, 6, 9], [1, 2, 3, 4, 5, 8, 8, 8]]
    assert flops.cached_prefix_tokens(prompts, 2) == 4 and flops.cached_prefix_tokens(prompts, 3) == 3
    assert flops.cached_prefix_tokens(prompts, 8) == 0 and flops.cached_prefix_tokens([], 2) == 0
    full = flops.llm_flops(cfg, 384, 70)
    assert flops.llm_flops(cfg, 384, 70, cached_tokens=0) == full
    cached = flops.llm_flops(cfg, 384, 70, cached_tokens=32)
    assert 0.4 * full < cached < 0.6 * full  # 38 of 70 positions computed; they attend to all 70
    # the last position is computed even when the whole prompt is cached (its logits are the answer)
    assert flops.llm_flops(cfg, 384, 70, cached_tokens=70) == flops.llm_flops(cfg, 384, 70, cached_tokens=69) > 0


def test_thread_cpu_groups_count_cores_and_running_threads():
    from benchmarks.threads import ThreadSample, busy, group_of

    assert group_of("emoq-graph_1") == "emoq-graph" and group_of("vllm-engine") == "vllm-engine"
    before = {1: ThreadSample("emoq-graph_0", 1.0), 2: ThreadSample("emoq-graph_1", 1.0),
              3: ThreadSample("vllm-engine", 0.0), 4: ThreadSample("python", 5.0)}
    after = {1: ThreadSample("emoq-graph_0", 3.0), 2: ThreadSample("emoq-graph_1", 1.01),
             3: ThreadSample("vllm-engine", 1.5), 4: ThreadSample("python", 5.2), 5: ThreadSample("vllm-engine", 0.5)}
    out = busy(before, after, wall_s=2.0)
    assert out["cores_busy"] == pytest.approx((2.0 + 0.01 + 1.5 + 0.2 + 0.5) / 2)
    assert out["threads"] == 5 and out["threads_running"] == 4  # emoq-graph_1 used 0.5 % of a core
    assert out["groups"]["emoq-graph"] == {"cores": 1.005, "threads": 2, "running": 1}
    assert out["groups"]["vllm-engine"] == {"cores": 1.0, "threads": 2, "running": 2}
    assert list(out["groups"])[0] in ("emoq-graph", "vllm-engine")  # busiest first


def test_thread_sample_names_a_busy_thread_of_this_process():
    import os
    import threading
    import time

    from benchmarks.threads import busy, sample
    from emoq_serve.executors.threads import name_os_thread

    stop = threading.Event()

    def spin():
        name_os_thread("emoq-spin")
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    first = sample(os.getpid())
    t.start()
    time.sleep(0.5)
    out = busy(first, sample(os.getpid()), 0.5)
    stop.set()
    t.join()
    assert out["groups"]["emoq-spin"]["running"] == 1 and out["groups"]["emoq-spin"]["cores"] > 0.2
    assert sample(-1) == {}


def test_batch_trace_gives_mean_batch_and_padding_inside_the_window(tmp_path):
    from benchmarks.stats import batch_trace

    path = tmp_path / "batches.jsonl"
    lines = [{"start": 1.0, "end": 1.5, "samples": [100]},  # warm-up: before the window
             {"start": 10.0, "end": 10.5, "samples": [100, 50]},
             {"start": 11.0, "end": 11.2, "samples": [40, 40, 40, 40]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = batch_trace(path, 5.0, 20.0)
    assert out["batches"] == 2 and out["mean_batch"] == 3.0
    assert out["padding_fraction"] == pytest.approx(50 / (200 + 160))
    assert batch_trace(path, 30.0, 40.0) is None and batch_trace(tmp_path / "none.jsonl", 0, 1) is None


def _point(engine, concurrency, utt_s, p50, repeat, batch=2.0):
    return {"engine": engine, "mode": "closed", "api": "unary", "concurrency": concurrency, "rate": None,
            "requests": 4, "ok": 4, "errors": {}, "throughput_utt_s": utt_s, "throughput_audio_s_s": 3 * utt_s,
            "latency_ms": {"p50": p50, "p99": 2 * p50}, "server_ms": {"total": p50 / 2},
            "mean_batch_size": batch, "repeat": repeat,
            "extra": {"server_cpu": {"cores_busy": utt_s, "cpu_util": utt_s / 2, "threads": 3, "threads_running": 1,
                                     "groups": {"emoq-graph": {"cores": utt_s, "threads": 1, "running": 1}}}}}


def test_repeats_report_medians_spread_and_same_run_ratios():
    from benchmarks.report import markdown, ratios
    from benchmarks.stats import median_points

    runs = [_point("eager", 16, t, 100.0 * (r + 1), r) for r, t in enumerate((1.0, 3.0, 2.0))]
    runs += [_point("onnx", 16, t, 50.0, r) for r, t in enumerate((3.0, 3.0, 4.0))]
    runs += [_point("onnx", 1, 1.0, 10.0 * (r + 1), r) for r in range(3)]
    runs += [_point("eager", 1, 0.5, 40.0, r) for r in range(3)]
    summary = median_points(runs)
    eager16 = next(p for p in summary if p["engine"] == "eager" and p["concurrency"] == 16)
    assert eager16["throughput_utt_s"] == 2.0 and eager16["repeats"] == 3
    assert eager16["spread"] == {"throughput_utt_s": [1.0, 3.0], "p50_ms": [100.0, 300.0]}
    assert eager16["latency_ms"] == {"p50": 200.0, "p99": 400.0} and eager16["ok"] == 12
    assert eager16["extra"]["server_cpu"]["cores_busy"] == 2.0  # the median run's record
    r = ratios(summary, baseline="eager", runs=runs)
    assert r["throughput"]["16"] == 3.0 / 2.0 and r["p50_at_c1"] == 20.0 / 40.0
    # within each repeat: 3/1, 3/3, 4/2
    assert r["spread"]["throughput_c16"] == [1.0, 3.0] and r["spread"]["p50_at_c1"] == [0.25, 0.75]
    report = {"machine": {"cpu_model": "x", "logical_cores": 2, "memory_gib": 1, "load_average": [0, 0, 0]},
              "bundle_id": "b", "preset": "base", "command": "emoq bench", "repeats": 3, "api": "unary",
              "mode": "closed", "workload": {"num_utterances": 1, "mean_seconds": 1.0, "seed": 0}, "threads": {},
              "peak_gflops": {}, "stages": ["total"], "flops_per_request": {}, "points": runs, "summary": summary,
              "ratios": {"eager": r}}
    text = markdown(report)
    assert "| eager | 16 | – | 12/12 | 2.00 [1.00–3.00] |" in text and "| 16 | 1.50× [1.00–3.00] |" in text
    assert "- onnx 16: 3.00 cores (150 % of the machine): emoq-graph 3.00 (1/1)" in text


def test_bench_cli_takes_repeats_and_refuses_none():
    import argparse

    from benchmarks.cli import register
    from benchmarks.config import BenchConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--bundle", "b", "--repeats", "3"])
    assert args.repeats == 3 and "--repeats 3" in __import__("benchmarks.cli").cli.canonical_command(args)
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(bundle="b", repeats=0)

