"""Failures as gRPC statuses: one table from exception type to status code, used by every call.

The servicer aborts a call with `status_for`'s code and message; a conversation stream reports a
segment that failed with the same code and message in that segment's result and goes on.
An INTERNAL answer carries a fixed message with a request id, never the exception's text (which
may hold paths or data); the server logs the detail under the same id.
"""

from __future__ import annotations

import grpc

from emoq_serve.engine.batcher import BatcherClosed, DeadlineExpired, QueueFull
from emoq_serve.executors.types import EngineUnavailable
from emoq_serve.server.limits import ServerBusy
from emoq_serve.server.validation import InvalidRequest
from emoq_serve.speech.asr import AsrBusy, AsrDeadlineExpired, AsrStalled


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


#: Trailing metadata key of the id an INTERNAL answer and its server log line share.
REQUEST_ID_KEY = "emoq-request-id"


def status_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-facing message for a failure (`request_id` names an INTERNAL one)."""
    for kind, code in _STATUS.items():
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, (f"internal error (request id {request_id}): the server could not compute "
                                      "this result; its log has the details under this id")
