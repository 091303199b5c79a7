"""Fuzzing the gRPC API on 127.0.0.1: property-based requests and streams (hypothesis) and raw
random bytes, against the real server with the stand-in engine (so thousands of cases fit in CI).

Every call must end within its deadline with the status an independent oracle expects (the oracle
restates the documented input contract: config first, LINEAR16/FLOAT32, 8..192 kHz, finite
samples in range, size and length limits); an OK answer must carry finite probabilities that sum
to 1; afterwards the server still answers a normal request with the right result. Statuses seen
are printed at the end of the module.

Size: `EMOQ_FUZZ_EXAMPLES` (default 1000) scales every generator (unary gets that many, streams
half, raw bytes half, cancellation a fifth, half-open streams a fixed 8): a nightly run sets e.g. 20000.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import RunningServer, StandInRecognizer, config, tone

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.client.api import recognize_request
from emoq_serve.executors.types import Utterance
from emoq_serve.server.config import ServerConfig

EXAMPLES = int(os.environ.get("EMOQ_FUZZ_EXAMPLES", "1000"))
CFG = config(
    batcher={"max_batch": 8, "max_queue_delay_ms": 1.0}, max_audio_seconds=2.0, max_message_bytes=256 * 1024,
    max_transcript_chars=300, max_transcript_tokens=40, interim_span_s=0.5,
    # Long enough that a loaded CI machine never idles out a well-behaved fuzz stream.
    stream_idle_timeout_s=1.5,
)
CALL_TIMEOUT_S = 5.0
Code = grpc.StatusCode
#: Statuses whose message must say what went wrong.
EXPLAINED = {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED}


def count_tokens(text: str) -> int:
    return len(text.split())


SEEN: collections.Counter[tuple[str, str]] = collections.Counter()


@pytest.fixture(scope="module")
def server(request):
    with RunningServer(StandInRecognizer, CFG, count_tokens) as srv:
        yield srv
    lines = [f"fuzz: {sum(SEEN.values())} calls"] + [f"  {k:10s} {c:20s} {n}" for (k, c), n in sorted(SEEN.items())]
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=max(1, n), deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# --- the oracle: the documented input contract, restated independently of the server code -----


def config_error(c: pb.RecognitionConfig, cfg: ServerConfig) -> bool:
    return (
        c.encoding not in (pb.LINEAR16, pb.FLOAT32)
        or not cfg.min_sample_rate_hz <= c.sample_rate_hz <= cfg.max_sample_rate_hz
        or len(c.speaker) > cfg.max_speaker_chars
        or transcript_error(c.transcript, cfg)
    )


def transcript_error(text: str, cfg: ServerConfig) -> bool:
    return len(text) > cfg.max_transcript_chars or count_tokens(text) > cfg.max_transcript_tokens


def audio_error(c: pb.RecognitionConfig, data: bytes, cfg: ServerConfig) -> bool:
    width = 2 if c.encoding == pb.LINEAR16 else 4
    seconds = len(data) / width / c.sample_rate_hz
    if not data or len(data) % width or not cfg.min_audio_seconds <= seconds <= cfg.max_audio_seconds:
        return True
    if c.encoding == pb.FLOAT32:
        x = np.frombuffer(data, "<f4")
        return not np.isfinite(x).all() or np.abs(x).max() > cfg.max_abs_sample
    return False


def expected_unary(req: pb.RecognizeRequest) -> Code:
    if req.ByteSize() > CFG.max_message_bytes:
        return Code.RESOURCE_EXHAUSTED
    if not req.HasField("config") or config_error(req.config, CFG) or audio_error(req.config, req.audio_content, CFG):
        return Code.INVALID_ARGUMENT
    return Code.OK


def expected_stream(msgs: list[pb.StreamingRecognizeRequest]) -> Code:
    """The status a half-closed stream of `msgs` must end with."""
    c, transcript, late, data = None, "", False, b""
    for m in msgs:
        if m.ByteSize() > CFG.max_message_bytes:
            return Code.RESOURCE_EXHAUSTED
        kind = m.WhichOneof("streaming_request")
        if kind is None or (c is None and kind != "config"):
            return Code.INVALID_ARGUMENT
        if kind == "config":
            if c is not None or config_error(m.config, CFG):
                return Code.INVALID_ARGUMENT
            c, transcript = m.config, m.config.transcript
        elif kind == "transcript":
            if transcript or late or transcript_error(m.transcript, CFG):
                return Code.INVALID_ARGUMENT
            late = True
        else:
            data += m.audio_content
            width = 2 if c.encoding == pb.LINEAR16 else 4
            if len(data) / width / c.sample_rate_hz > CFG.max_audio_seconds:
                return Code.INVALID_ARGUMENT
    if c is None or audio_error(c, data, CFG):
        return Code.INVALID_ARGUMENT
    return Code.OK


# --- generators ---------------------------------------------------------------------------------

encodings = st.sampled_from([pb.ENCODING_UNSPECIFIED, pb.LINEAR16, pb.FLOAT32]) | st.integers(-(2**31), 2**31 - 1)
rates = st.sampled_from([16_000, 8_000, 44_100, 192_000, 7_999, 192_001, 0, -16_000]) | st.integers(-(2**31), 2**31 - 1)
texts = st.one_of(
    st.just(""), st.text(max_size=40), st.text(min_size=250, max_size=400),  # unicode, some oversized
    st.lists(st.sampled_from(["happy", "😡", "ß", "\u200b", "\x00", "word"]), max_size=60).map(" ".join),
)
speakers = st.just("") | st.text(max_size=80)


@st.composite
def audio_bytes(draw, encoding: int) -> bytes:
    """Garbage, empty, NaN/Inf, out-of-range, too long, oversized for the transport, or plain audio."""
    kind = draw(st.sampled_from(["tone", "tone", "garbage", "empty", "nonfinite", "loud", "long", "huge", "floats"]))
    pcm = encoding == pb.LINEAR16
    if kind == "garbage":
        return draw(st.binary(max_size=3000))
    if kind == "empty":
        return b""
    if kind == "long":  # past max_audio_seconds at 16 kHz, under the message limit
        return (np.zeros(int(16_000 * 2.5), "<i2") if pcm else np.zeros(int(16_000 * 2.5), "<f4")).tobytes()
    if kind == "huge":  # past the transport's message limit
        return bytes(CFG.max_message_bytes + draw(st.integers(1, 4096)))
    if kind == "floats":
        values = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=400))
        return np.array(values, "<f4").tobytes()
    x = tone(draw(st.floats(0.01, 1.5)), amp=draw(st.floats(0.0, 1.0)))
    if kind == "nonfinite":
        x[draw(st.integers(0, len(x) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind == "loud":
        x = x * draw(st.floats(5.0, 1e30)) + 5.0
    return (np.clip(np.nan_to_num(x), -1, 1) * 32767).astype("<i2").tobytes() if pcm else x.astype("<f4").tobytes()


@st.composite
def recognition_configs(draw) -> pb.RecognitionConfig:
    valid = draw(st.booleans())  # half the configs are valid, so the audio paths get exercised
    return pb.RecognitionConfig(
        encoding=draw(st.sampled_from([pb.LINEAR16, pb.FLOAT32]) if valid else encodings),
        sample_rate_hz=draw(st.sampled_from([8_000, 16_000, 22_050, 48_000]) if valid else rates),
        transcript=draw(st.text(max_size=30) if valid else texts),
        speaker=draw(st.text(max_size=10) if valid else speakers),
        interim_results=draw(st.booleans()),
    )


@st.composite
def unary_requests(draw) -> pb.RecognizeRequest:
    if draw(st.integers(0, 9)) == 0:
        return pb.RecognizeRequest(audio_content=draw(st.binary(max_size=64)))  # no config
    cfg = draw(recognition_configs())
    return pb.RecognizeRequest(config=cfg, audio_content=draw(audio_bytes(cfg.encoding)))


@st.composite
def streams(draw) -> list[pb.StreamingRecognizeRequest]:
    """Well-formed streams with random chunking (2 in 5) and fuzzed ones, some with odd messages."""
    if draw(st.integers(0, 4)) < 2:
        cfg = pb.RecognitionConfig(encoding=draw(st.sampled_from([pb.LINEAR16, pb.FLOAT32])),
                                   sample_rate_hz=draw(st.sampled_from([8_000, 16_000, 44_100])),
                                   interim_results=draw(st.booleans()))
        x = tone(draw(st.floats(0.03, 1.9)) * 16_000 / cfg.sample_rate_hz, sr=cfg.sample_rate_hz)
        data = (x * 32767).astype("<i2").tobytes() if cfg.encoding == pb.LINEAR16 else x.astype("<f4").tobytes()
    else:
        cfg = draw(recognition_configs())
        data = draw(audio_bytes(cfg.encoding)) if draw(st.integers(0, 4)) else b""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))  # any split, mid-sample too
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    msgs = [pb.StreamingRecognizeRequest(config=cfg)] + [pb.StreamingRecognizeRequest(audio_content=c) for c in chunks]
    if draw(st.booleans()):
        msgs.append(pb.StreamingRecognizeRequest(transcript=draw(st.text(max_size=30) | texts)))
    if draw(st.integers(0, 4)) == 0:  # a wrong field combination: extra config, empty message, reorder
        extra = draw(st.sampled_from([
            pb.StreamingRecognizeRequest(config=cfg), pb.StreamingRecognizeRequest(),
            pb.StreamingRecognizeRequest(transcript="again"),
        ]))
        msgs.insert(draw(st.integers(0, len(msgs))), extra)
    if draw(st.integers(0, 9)) == 0:
        msgs = draw(st.permutations(msgs))
    return msgs


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def voice_activity_streams(draw, speech: np.ndarray) -> list[pb.StreamingRecognizeRequest]:
    """VOICE_ACTIVITY streams: any VAD settings (defaults, in range, out of range, clashing, non-finite),
    real speech or a tone cut into chunks of at most the server's audio limit, and segment transcripts
    (valid and invalid targets and texts) anywhere after the config."""
    ints = st.sampled_from([0, 1, 31, 100, 150, 250, 701, 1_000, 5_001]) | st.integers(-(2**31), 2**31 - 1)
    va = pb.VoiceActivityConfig(
        speech_threshold=draw(st.sampled_from([0.0, 0.5, 0.99]) | finite_or_not),
        min_silence_ms=draw(ints), min_speech_ms=draw(ints), speech_pad_ms=draw(ints),
        max_segment_s=draw(st.sampled_from([0.0, 1.0, 1.5, 60.0]) | finite_or_not),
    )
    cfg = pb.RecognitionConfig(encoding=pb.FLOAT32, sample_rate_hz=16_000, segmentation=pb.VOICE_ACTIVITY,
                               voice_activity=va, interim_results=draw(st.booleans()))
    audio = speech if draw(st.booleans()) else tone(1.0)
    audio = audio[: draw(st.integers(400, len(audio)))]
    limit = int(CFG.max_audio_seconds * 16_000)  # a chunk is at most one model input
    cuts = sorted(draw(st.lists(st.integers(0, len(audio)), max_size=6)))
    bounds = [0, *cuts, len(audio)]
    msgs = [pb.StreamingRecognizeRequest(config=cfg)]
    for a, b in zip(bounds, bounds[1:]):
        for start in range(a, b, limit):
            msgs.append(pb.StreamingRecognizeRequest(audio_content=audio[start:min(b, start + limit)].astype("<f4").tobytes()))
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            st_msg = pb.SegmentTranscript(segment_index=draw(st.integers(-2, 3)), transcript=draw(texts))
        else:
            st_msg = pb.SegmentTranscript(time_range=pb.TimeRange(start_s=draw(finite_or_not), end_s=draw(finite_or_not)),
                                          transcript=draw(texts))
        msgs.insert(draw(st.integers(1, len(msgs))), pb.StreamingRecognizeRequest(segment_transcript=st_msg))
    return msgs


def expected_voice_activity(msgs: list[pb.StreamingRecognizeRequest]) -> Code:
    """The documented contract: settings are clamped into the server's limits (0 = default), so only
    non-finite values, or a min_speech + 2 * pad that no segment up to the audio limit can hold, are
    refused; a segment transcript needs a valid target and an acceptable text."""
    va = msgs[0].config.voice_activity
    values = (va.speech_threshold, va.min_silence_ms, va.min_speech_ms, va.max_segment_s, va.speech_pad_ms)
    if not all(np.isfinite(v) for v in values):
        return Code.INVALID_ARGUMENT
    silence = 400 if va.min_silence_ms == 0 else min(max(va.min_silence_ms, 100), 5_000)
    speech = 250 if va.min_speech_ms == 0 else min(max(va.min_speech_ms, 0), 5_000)
    pad = min(150 if va.speech_pad_ms == 0 else min(max(va.speech_pad_ms, 0), 1_000), silence)
    if speech + 2 * pad > 1000 * min(CFG.max_segment_s, CFG.max_audio_seconds):
        return Code.INVALID_ARGUMENT
    for m in msgs[1:]:
        if m.WhichOneof("streaming_request") != "segment_transcript":
            continue
        t = m.segment_transcript
        if t.WhichOneof("target") == "segment_index":
            bad_target = t.segment_index < 0
        else:
            a, b = t.time_range.start_s, t.time_range.end_s
            bad_target = not (np.isfinite(a) and np.isfinite(b) and 0 <= a < b)
        if bad_target or transcript_error(t.transcript, CFG):
            return Code.INVALID_ARGUMENT
    return Code.OK


# --- checks -------------------------------------------------------------------------------------


def record(kind: str, code: Code, message: str, started: float) -> None:
    SEEN[(kind, code.name)] += 1
    assert time.monotonic() - started < CALL_TIMEOUT_S + 1.0, "the call outlived its deadline"
    assert code != Code.UNKNOWN and code != Code.INTERNAL, f"{code}: {message}"
    if code in EXPLAINED:
        assert message, f"{code} without a message"


def check_result(result: pb.EmotionResult) -> None:
    p = np.array([s.probability for s in result.scores])
    assert [s.label for s in result.scores] == list(StandInRecognizer.labels)
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-4 and result.label == StandInRecognizer.labels[int(p.argmax())]


def assert_still_serving(server: RunningServer) -> None:
    """The server is up, idle, and answers a normal request exactly as the engine would."""
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    audio = tone(0.7, freq=300)
    got = server.stub.Recognize(recognize_request(audio, 16_000, "after the fuzz"), timeout=5).result
    (want,) = server.run(StandInRecognizer().recognize([Utterance(audio=audio, transcript="after the fuzz")]))
    assert got.label == want.label
    np.testing.assert_allclose([s.probability for s in got.scores], want.probabilities, atol=1e-6)
    deadline = time.monotonic() + 5
    while server.server.service._calls or server.server.batcher.queue_depth:  # nothing leaked
        assert time.monotonic() < deadline, "calls or queue entries left behind"
        time.sleep(0.01)


# --- the fuzz tests -----------------------------------------------------------------------------


def test_fuzz_unary_requests(server):
    @fuzz_settings(EXAMPLES)
    @given(req=unary_requests())
    def case(req: pb.RecognizeRequest) -> None:
        started = time.monotonic()
        try:
            code, message = Code.OK, ""
            check_result(server.stub.Recognize(req, timeout=CALL_TIMEOUT_S).result)
        except grpc.RpcError as err:
            code, message = err.code(), err.details() or ""
        record("unary", code, message, started)
        assert code == expected_unary(req), message

    case()
    assert_still_serving(server)


def run_stream(server: RunningServer, msgs: list[pb.StreamingRecognizeRequest]) -> tuple[Code, str, list]:
    try:
        results = [r.result for r in server.stub.StreamingRecognize(iter(msgs), timeout=CALL_TIMEOUT_S)]
        return Code.OK, "", results
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []


def test_fuzz_streams(server):
    @fuzz_settings(EXAMPLES // 2)
    @given(msgs=streams())
    def case(msgs: list[pb.StreamingRecognizeRequest]) -> None:
        started = time.monotonic()
        code, message, results = run_stream(server, msgs)
        record("stream", code, message, started)
        assert code == expected_stream(msgs), message
        if code == Code.OK:
            assert results[-1].is_final and not any(r.is_final for r in results[:-1])
            for r in results:
                check_result(r)

    case()
    assert_still_serving(server)


def test_fuzz_voice_activity_streams(server):
    """VOICE_ACTIVITY settings and segment transcripts: on main 9b76bb9, settings that clash after
    clamping (min_silence_ms 100 beside the default 150 ms pad; max_segment_s 1 with min_speech_ms
    701) answered INTERNAL. Every stream ends as the contract says, and every result is sound."""
    from emoq_serve.data.speech import Prosody, render

    (speech,) = render([("I can not believe you did that to me.", Prosody(), "m1")], backend="espeak", workers=1)

    @fuzz_settings(EXAMPLES // 5)
    @given(msgs=voice_activity_streams(speech.astype(np.float32)))
    def case(msgs: list[pb.StreamingRecognizeRequest]) -> None:
        started = time.monotonic()
        code, message, results = run_stream(server, msgs)
        record("voice", code, message, started)
        assert code == expected_voice_activity(msgs), message
        for r in results:
            check_result(r)

    case()
    assert_still_serving(server)


def test_fuzz_raw_bytes(server):
    """Arbitrary bytes as the serialized request: garbage protobuf must not reach the engine broken."""
    methods = {
        "Recognize": server.channel.unary_unary("/emoq.v1.EmotionRecognizer/Recognize"),
        "StreamingRecognize": server.channel.stream_stream("/emoq.v1.EmotionRecognizer/StreamingRecognize"),
    }

    @fuzz_settings(EXAMPLES // 2)
    @given(method=st.sampled_from(sorted(methods)), payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
    def case(method: str, payloads: list[bytes]) -> None:
        started = time.monotonic()
        try:
            if method == "Recognize":
                pb.RecognizeResponse.FromString(methods[method](payloads[0], timeout=CALL_TIMEOUT_S))
            else:
                list(methods[method](iter(payloads), timeout=CALL_TIMEOUT_S))
            code, message = Code.OK, ""
        except grpc.RpcError as err:
            code, message = err.code(), err.details() or ""
        record("raw-bytes", code, message, started)
        # Bytes that do not parse as the request message are INVALID_ARGUMENT ("malformed ...").
        parses = True
        try:
            if method == "Recognize":
                pb.RecognizeRequest.FromString(payloads[0])
            for p in payloads if method == "StreamingRecognize" else ():
                pb.StreamingRecognizeRequest.FromString(p)
        except DecodeError:
            parses = False
        if not parses:  # (a stream may be refused for an earlier, parseable message first)
            assert code == Code.INVALID_ARGUMENT, f"{code}: {message}"
            assert "malformed" in message or method == "StreamingRecognize", message
        else:
            assert code in {Code.OK, Code.INVALID_ARGUMENT}, f"{code}: {message}"

    case()
    assert_still_serving(server)


def test_fuzz_client_cancels_mid_stream(server):
    """Cancel at a random moment: the server frees the call (nothing leaks) and keeps serving."""

    @fuzz_settings(EXAMPLES // 5)
    @given(msgs=streams(), sent=st.integers(0, 20), wait_ms=st.integers(0, 15))
    def case(msgs: list[pb.StreamingRecognizeRequest], sent: int, wait_ms: int) -> None:
        release = threading.Event()

        def requests():
            yield from msgs[:sent]
            release.wait(CALL_TIMEOUT_S)  # then stall: the client cancels meanwhile

        started = time.monotonic()
        call = server.stub.StreamingRecognize(requests(), timeout=CALL_TIMEOUT_S)
        time.sleep(wait_ms / 1e3)
        call.cancel()
        release.set()
        try:
            list(call)
            code, message = Code.OK, ""
        except grpc.RpcError as err:
            code, message = err.code(), err.details() or ""
        record("cancel", code, message, started)
        # The server may have refused the stream before the cancel arrived.
        assert code in {Code.CANCELLED, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}, f"{code}: {message}"

    case()
    assert_still_serving(server)


@pytest.mark.parametrize("seed", range(8))
def test_half_open_stream_ends_with_idle_deadline(server, seed):
    """A client that stops sending without half-closing is cut off after the idle timeout."""
    rng = np.random.default_rng(seed)
    audio = tone(float(rng.uniform(0.1, 1.5)))
    msgs = [pb.StreamingRecognizeRequest(config=pb.RecognitionConfig(
        encoding=pb.FLOAT32, sample_rate_hz=16_000, interim_results=bool(seed % 2)))]
    msgs += [pb.StreamingRecognizeRequest(audio_content=c.tobytes()) for c in np.array_split(audio, rng.integers(1, 8))]
    outbox: queue.Queue = queue.Queue()
    for m in msgs[: rng.integers(1, len(msgs) + 1)]:
        outbox.put(m)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.StreamingRecognize(iter(outbox.get, None), timeout=CALL_TIMEOUT_S))
    outbox.put(None)
    elapsed = time.monotonic() - started
    record("half-open", err.value.code(), err.value.details(), started)
    assert err.value.code() == Code.DEADLINE_EXCEEDED and "no stream message" in err.value.details()
    assert CFG.stream_idle_timeout_s <= elapsed < CFG.stream_idle_timeout_s + 1.5
    if seed == 7:
        assert_still_serving(server)
