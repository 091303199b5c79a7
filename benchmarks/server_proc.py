"""Start `emoq serve` as a subprocess for a benchmark and stop it afterwards.

A subprocess, not an in-process server: the load generator and the server must not share one
Python interpreter (GIL, event loop, thread pools), or the client's own overhead would show up
as server latency. Readiness is the standard gRPC health check, the same signal an orchestrator
uses; the server's output goes to a log file that is quoted when startup fails.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config import ENGINE_FLAGS

log = logging.getLogger(__name__)

#: Server starts tried when a picked port was taken before the server could bind it.
PORT_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until SERVING; RuntimeError if `proc` exits or time runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"server at {address} not SERVING after {timeout_s:.0f} s")


@dataclass
class ServerProcess:
    """`emoq serve --bundle ... --engine ...` on free local ports; use as a context manager."""

    bundle: Path
    engine: str
    log_path: Path
    extra_args: str = ""
    startup_timeout_s: float = 900.0
    host: str = "127.0.0.1"
    #: Environment variables set for the server on top of this process's own.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port(self.host)
        self.metrics_port = free_port(self.host)
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id (for sampling its memory), None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "emoq_serve.cli", "serve", "--bundle", str(self.bundle), *ENGINE_FLAGS[self.engine],
            "--host", self.host, "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            *shlex.split(self.extra_args),
        ]

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._log = open(self.log_path, "w")
            cmd = self.command()
            log.info("starting %s", shlex.join(cmd))
            self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                          env={**os.environ, **self.env})
            try:
                wait_serving(self.address, self.startup_timeout_s, self._proc)
                return self
            except BaseException as e:
                self.__exit__(None, None, None)
                text = self.log_path.read_text()
                # A port free when picked can be taken before the server binds it (the LLM engine's
                # own ephemeral ports open first): pick fresh ones and start again. "already in
                # use": `emoq serve`'s own check at start, or a bind failing later.
                if isinstance(e, RuntimeError) and "already in use" in text and attempt < PORT_ATTEMPTS:
                    log.warning("port %d or %d was taken before the server bound it; retrying on fresh ports",
                                self.port, self.metrics_port)
                    self.port, self.metrics_port = free_port(self.host), free_port(self.host)
                    continue
                tail = "".join(text.splitlines(keepends=True)[-30:])
                raise RuntimeError(f"{e}; command: {shlex.join(cmd)}; log {self.log_path}:\n{tail}") from e
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        """SIGTERM (the server drains), then SIGKILL if it does not exit in time."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
        self._proc = self._log = None
