"""The client's gRPC retry policy against the real server on 127.0.0.1: a call the server refuses
with UNAVAILABLE or RESOURCE_EXHAUSTED is retried (bounded, with backoff) and succeeds; with
retries off it fails; other statuses and streams past their first response are not retried.

The refusals are injected where they really come from: the server's batcher `submit` raises
`QueueFull` (a full queue) or `EngineUnavailable` (an engine restarting) for the planned attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import grpc
import pytest
from server_harness import RunningServer, StandInRecognizer, config, tone

from emoq_serve.client.api import EmotionClient, retry_service_config
from emoq_serve.engine.batcher import QueueFull
from emoq_serve.executors.types import Utterance
from emoq_serve.engine.supervisor import EngineUnavailable

AUDIO = tone(0.5)
REFUSALS = {
    "RESOURCE_EXHAUSTED": lambda: QueueFull("injected: the queue is full, retry later"),
    "UNAVAILABLE": lambda: EngineUnavailable("injected: the engine is restarting, retry shortly"),
    "INTERNAL": lambda: ValueError("injected: this batch cannot be computed"),
}


class Refusals:
    """Wraps the server batcher's `submit`: the i-th attempt raises `plan[i]` if it is set."""

    def __init__(self, server: RunningServer) -> None:
        self.plan: list[str | None] = []
        self.attempts = 0
        batcher = server.server.batcher
        real_submit = batcher.submit

        async def submit(utterance: Utterance, deadline: float | None = None):
            i, self.attempts = self.attempts, self.attempts + 1
            if i < len(self.plan) and self.plan[i] is not None:
                raise REFUSALS[self.plan[i]]()
            return await real_submit(utterance, deadline)

        batcher.submit = submit


@pytest.fixture
def refusing():
    with RunningServer(StandInRecognizer, config(interim_span_s=0.2)) as server:
        yield server, Refusals(server)


def expected_label(transcript: str) -> str:
    (pred,) = asyncio.run(StandInRecognizer().recognize([Utterance(audio=AUDIO, transcript=transcript)]))
    return pred.label


def outcome(address: str, stream: bool, **client_kw: object) -> tuple[str, list[str]]:
    """(status name, labels received) of one call; the fast backoff keeps the test short."""

    async def main() -> list[str]:
        async with EmotionClient(address, timeout=30, retry_backoff_s=0.01, **client_kw) as client:
            if stream:
                return [r.label async for r in client.stream(AUDIO, 16_000, "retry me", chunk_ms=100)]
            return [(await client.recognize(AUDIO, 16_000, "retry me")).label]

    received: list[str] = []
    try:
        received = asyncio.run(main())
    except grpc.aio.AioRpcError as err:
        return err.code().name, received
    return "OK", received


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "UNAVAILABLE"])
def test_refused_once_succeeds_with_retries_and_fails_without(refusing, code, stream):
    server, refusals = refusing
    refusals.plan = [code]
    assert outcome(server.address, stream) == ("OK", [expected_label("retry me")])  # default: retries on
    assert refusals.attempts == 2
    refusals.plan, refusals.attempts = [code], 0
    assert outcome(server.address, stream, retries=0) == (code, [])
    assert refusals.attempts == 1


def test_retries_are_bounded(refusing):
    server, refusals = refusing
    refusals.plan = ["UNAVAILABLE"] * 10
    assert outcome(server.address, False, retries=2) == ("UNAVAILABLE", [])
    assert refusals.attempts == 3  # the first attempt and two retries


def test_other_statuses_are_not_retried(refusing):
    server, refusals = refusing
    refusals.plan = ["INTERNAL"]
    assert outcome(server.address, False)[0] == "INTERNAL"
    assert refusals.attempts == 1


def test_stream_is_not_retried_after_its_first_response(refusing):
    """gRPC commits a stream once a response arrived: a refusal after an interim result reaches
    the caller (as documented), and the interim result is not sent twice."""
    server, refusals = refusing

    async def main() -> tuple[list[bool], str]:
        finals: list[bool] = []
        async with EmotionClient(server.address, timeout=30, retry_backoff_s=0.01) as client:
            try:
                async for r in client.stream(tone(0.5), 16_000, "retry me", chunk_ms=100, interim=True):
                    finals.append(r.is_final)
            except grpc.aio.AioRpcError as err:
                return finals, err.code().name
        return finals, "OK"

    refusals.plan = [None, "UNAVAILABLE"]  # the interim result passes, the final one is refused
    assert asyncio.run(main()) == ([False], "UNAVAILABLE")
    assert refusals.attempts == 2


def test_client_command_retries_flag(refusing, tmp_path, capsys):
    import soundfile as sf

    from emoq_serve.client import register

    server, refusals = refusing
    wav = tmp_path / "a.wav"
    sf.write(wav, AUDIO, 16_000)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def run(*flags: str) -> int:
        args = parser.parse_args(["client", str(wav), "--server", server.address, "--text", "retry me", *flags])
        refusals.plan, refusals.attempts = ["RESOURCE_EXHAUSTED"], 0
        return args.func(args)

    assert run() == 0 and refusals.attempts == 2
    assert expected_label("retry me") in capsys.readouterr().out
    assert run("--retries", "0") == 1 and refusals.attempts == 1
    assert "RESOURCE_EXHAUSTED: injected: the queue is full" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["client", str(wav), "--retries", "9"])  # gRPC allows at most 5 attempts


def test_retry_config_rejects_out_of_range_values():
    assert retry_service_config(0) is None
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="between 0 \\(off\\) and 4"):
            retry_service_config(bad)
    with pytest.raises(ValueError, match="initial_backoff_s"):
        retry_service_config(2, initial_backoff_s=0)
    (method,) = json.loads(retry_service_config(2))["methodConfig"]
    assert method["name"] == [{"service": "emoq.v1.EmotionRecognizer"}]
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
