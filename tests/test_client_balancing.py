"""`EmotionClient` over several front doors: calls go round-robin over real servers on 127.0.0.1,
a front door that stops is skipped, and the target/service-config plumbing is checked."""

from __future__ import annotations

import asyncio
import json

import pytest
from server_harness import RunningServer, StandInRecognizer, config, tone

from emoq_serve.client.api import EmotionClient, channel_options, channel_target


def calls_per_server(targets, n: int, **client_kw: object) -> list[str]:
    """Send `n` unary calls one after another; returns their labels."""

    async def main() -> list[str]:
        async with EmotionClient(targets, timeout=30, **client_kw) as client:
            return [(await client.recognize(tone(0.3), 16_000, f"call {i}")).label for i in range(n)]

    return asyncio.run(main())


@pytest.fixture
def doors():
    with RunningServer(StandInRecognizer, config()) as a, RunningServer(StandInRecognizer, config()) as b:
        yield a, b


def submitted(door: RunningServer) -> int:
    return door.server.batcher.stats.submitted


def test_several_addresses_are_served_round_robin(doors):
    a, b = doors
    assert len(calls_per_server([a.address, b.address], 10)) == 10
    # Alternating once both connections are up (the first call or two may find one still connecting).
    assert min(submitted(a), submitted(b)) >= 4 and submitted(a) + submitted(b) == 10
    # gRPC's default policy (pick_first) sends everything to one front door.
    before = submitted(a), submitted(b)
    calls_per_server([a.address, b.address], 10, load_balancing="pick_first")
    assert sorted((submitted(a) - before[0], submitted(b) - before[1])) == [0, 10]


def test_a_front_door_that_stops_is_skipped(doors):
    a, b = doors

    async def main() -> int:
        async with EmotionClient([a.address, b.address], timeout=30) as client:
            await client.recognize(tone(0.3), 16_000, "warm both")
            await client.recognize(tone(0.3), 16_000, "warm both")
            b.run(b.server.stop())  # drains, then the port closes
            results = [await client.recognize(tone(0.3), 16_000, f"after {i}") for i in range(6)]
            return len(results)

    before = submitted(a)
    assert asyncio.run(main()) == 6
    assert submitted(a) - before >= 6  # every later call reached the one still up


def test_channel_target_and_service_config():
    assert channel_target("dns:///emoq.internal:50051") == "dns:///emoq.internal:50051"
    assert channel_target(["10.0.0.1:50051"]) == "10.0.0.1:50051"
    assert channel_target(["10.0.0.1:50051", "10.0.0.2:50051"]) == "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    for bad in (["emoq-a:50051", "emoq-b:50051"], ["10.0.0.1", "10.0.0.2:1"], ["10.0.0.1:1", "[::1]:2"], []):
        with pytest.raises(ValueError):
            channel_target(bad)
    options = dict(channel_options(1 << 20, retries=2, load_balancing="round_robin"))
    config_json = json.loads(options["grpc.service_config"])
    assert config_json["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config_json["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 3 and options["grpc.enable_retries"] == 1
    options = dict(channel_options(1 << 20, retries=0, load_balancing="round_robin"))
    assert "methodConfig" not in json.loads(options["grpc.service_config"]) and options["grpc.enable_retries"] == 0
    assert "grpc.service_config" not in dict(channel_options(1 << 20, retries=0))
