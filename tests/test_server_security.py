"""TLS, mutual TLS and bearer tokens: without the right credentials a client is refused.

Throwaway certificates are generated per test module with `cryptography`; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import RunningServer, StandInRecognizer, config, tone

from emoq_serve._proto import emoq_pb2 as pb
from emoq_serve.client.api import EmotionClient


def _cert(name: str, key, issuer_name, issuer_key, ca: bool, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files/bytes."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("emoq test ca", ca_key, None, ca_key, ca=True)
    files = {"ca.pem": _pem(ca)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{who}.pem"] = _pem(_cert(f"emoq {who}", key, ca.subject, ca_key, ca=False, server=who == "server"))
        files[f"{who}.key"] = _pem(key)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out, files


def recognize(address: str, **client_kw) -> grpc.StatusCode:
    async def main() -> grpc.StatusCode:
        async with EmotionClient(address, timeout=5, **client_kw) as client:
            try:
                result = await client.recognize(tone(0.3), 16_000, "hi")
                streamed = [r async for r in client.stream(tone(0.3), 16_000, "hi")]
                assert result.is_final and streamed[-1].is_final
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                return err.code()

    return asyncio.run(main())


def test_bearer_tokens_from_file_and_env(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("# ops team\ns3cret-one\n\ns3cret-two\n")
    monkeypatch.setenv("EMOQ_AUTH_TOKENS", "from-env")
    with RunningServer(StandInRecognizer, config(auth_tokens_file=str(tokens))) as srv:
        assert recognize(srv.address) == grpc.StatusCode.UNAUTHENTICATED
        assert recognize(srv.address, token="s3cret-on") == grpc.StatusCode.UNAUTHENTICATED
        for good in ("s3cret-one", "s3cret-two", "from-env"):
            assert recognize(srv.address, token=good) == grpc.StatusCode.OK
        # Orchestrators probe health without credentials.
        health = health_pb2_grpc.HealthStub(srv.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in err.value.details()


def test_mutual_tls_with_token(pki):
    d, pem = pki
    cfg = config(
        tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"), tls_client_ca=str(d / "ca.pem"),
    )
    with RunningServer(StandInRecognizer, cfg) as srv:
        full = dict(root_cert=pem["ca.pem"], client_cert=pem["client.pem"], client_key=pem["client.key"])
        assert recognize(srv.address, **full) == grpc.StatusCode.OK
        # No client certificate, or no TLS at all: the handshake fails.
        assert recognize(srv.address, root_cert=pem["ca.pem"]) == grpc.StatusCode.UNAVAILABLE
        assert recognize(srv.address) == grpc.StatusCode.UNAVAILABLE


def test_server_only_tls(pki):
    d, pem = pki
    with RunningServer(StandInRecognizer, config(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"))) as srv:
        assert recognize(srv.address, root_cert=pem["ca.pem"]) == grpc.StatusCode.OK
        # A client that trusts another CA refuses the server.
        assert recognize(srv.address, root_cert=pem["client.pem"]) == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_configuration_refuses_to_start(pki):
    """On main 9b76bb9 a client CA without a server certificate served plaintext with no client
    authentication at all; now `emoq serve` refuses to start with the reason."""
    import argparse

    from emoq_serve.server.cli import configs, register

    d, _ = pki
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for flags, reason in ((["--tls-client-ca", str(d / "ca.pem")], "--tls-client-ca .*needs --tls-cert and --tls-key"),
                          (["--tls-client-ca", str(d / "ca.pem"), "--tls-cert", str(d / "server.pem")],
                           "both --tls-cert and --tls-key"),
                          (["--tls-key", str(d / "server.key")], "both --tls-cert and --tls-key")):
        with pytest.raises(SystemExit, match=reason):
            configs(parser.parse_args(["serve", *flags]))
    with pytest.raises(ValueError, match="refusing to serve plaintext"):
        config(tls_client_ca=str(d / "ca.pem"))


def test_tokens_over_plaintext_are_warned_about_at_start(pki, caplog, monkeypatch):
    d, _ = pki
    monkeypatch.setenv("EMOQ_AUTH_TOKENS", "s3cret")
    plaintext = "bearer tokens over plaintext"
    with RunningServer(StandInRecognizer, config()):
        pass
    assert sum(plaintext in r.getMessage() and r.levelname == "WARNING" for r in caplog.records) == 1
    caplog.clear()
    with RunningServer(StandInRecognizer, config(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"))):
        pass
    assert not any(plaintext in r.getMessage() for r in caplog.records)


def test_health_watch_streams_are_bounded_and_counted(monkeypatch):
    """Health is open without a token, so its streams are capped: on main 9b76bb9 any number of
    `Watch` streams stayed open, uncounted."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def samples(port: int) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    monkeypatch.setenv("EMOQ_AUTH_TOKENS", "s3cret")  # watches need no token, so they count here
    with RunningServer(StandInRecognizer, config(max_health_watches=2)) as srv:
        health = health_pb2_grpc.HealthStub(srv.channel)
        request = health_pb2.HealthCheckRequest()
        watches = [health.Watch(request, timeout=30) for _ in range(2)]
        assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 2  # both open
        with pytest.raises(grpc.RpcError) as err:
            next(health.Watch(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in err.value.details()
        metrics = samples(srv.server.metrics_port)
        assert metrics["emoq_health_watches"] == 2 and metrics["emoq_health_watches_refused_total"] == 1
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING  # Check stays open
        watches[0].cancel()  # a closed watch frees its place
        deadline = time.monotonic() + 10
        while samples(srv.server.metrics_port)["emoq_health_watches"] != 1:
            assert time.monotonic() < deadline, "the cancelled watch was not released"
            time.sleep(0.05)
        assert next(health.Watch(request, timeout=30)).status == health_pb2.HealthCheckResponse.SERVING
        watches[1].cancel()
