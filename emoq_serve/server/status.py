"""Failures as gRPC statuses: one table from exception type to status code, used by every call.

The servicer aborts a call with `status_for`'s code and message; a conversation stream reports a
segment that failed with the same code and message in that segment's result and goes on.
A failure inside the engine (INTERNAL, and UNAVAILABLE from a broken, hung or restarting engine,
local or a replica) is answered with a fixed message and a request id, never the exception's text
(which may hold paths, data or another process's address); `status_for` logs the detail under the
same id. The other statuses carry messages written for the client (what to fix or when to retry).
"""

from __future__ import annotations

import logging

import grpc

from emoq_serve.engine.batcher import BatcherClosed, DeadlineExpired, QueueFull
from emoq_serve.executors.types import EngineUnavailable
from emoq_serve.server.limits import ServerBusy
from emoq_serve.server.validation import InvalidRequest
from emoq_serve.speech.asr import AsrBusy, AsrDeadlineExpired, AsrStalled

log = logging.getLogger(__name__)


class StreamIdle(Exception):
    """No stream message arrived within the idle timeout."""


class ShuttingDown(Exception):
    """The server is draining: it finishes accepted calls and takes no new ones."""


_STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ServerBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    StreamIdle: grpc.StatusCode.DEADLINE_EXCEEDED,
    BatcherClosed: grpc.StatusCode.UNAVAILABLE,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
    AsrBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AsrDeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    AsrStalled: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


#: Failures whose text comes from the engine (its exceptions' text, a replica's): the client gets
#: a fixed message for their status instead.
_WITHHELD: tuple[type[Exception], ...] = (EngineUnavailable,)

#: Trailing metadata key of the id a withheld answer and its server log line share.
REQUEST_ID_KEY = "emoq-request-id"


def withheld(code: grpc.StatusCode, exc: Exception) -> bool:
    """Whether the answer to `exc` (status `code`) is a fixed message naming a request id."""
    return code == grpc.StatusCode.INTERNAL or isinstance(exc, _WITHHELD)


def status_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-facing message for a failure. A withheld one (see `withheld`)
    names `request_id`; an UNAVAILABLE one is logged here under it (callers log INTERNAL ones,
    with the traceback)."""
    code = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INTERNAL:
        return code, (f"internal error (request id {request_id}): the server could not compute this result; "
                      "its log has the details under this id")
    if not withheld(code, exc):
        return code, str(exc)
    # Formatted here, not as a record argument: a kept record (pytest's, a buffering handler) would
    # hold the exception, its traceback and so the failed engine the supervisor is releasing.
    log.warning("unavailable (request id %s): %s", request_id, f"{type(exc).__name__}: {exc}")
    return code, (f"engine unavailable (request id {request_id}): retry shortly or on another server; "
                  "the server log has the details under this id")
