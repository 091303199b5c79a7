"""Transport security: TLS credentials and bearer-token authentication.

Tokens travel in the `authorization: Bearer <token>` metadata and are compared in constant
time (`hmac.compare_digest`) so response timing reveals nothing about a token. The health
service stays open: orchestrators probe it without credentials.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from emoq_serve.server.config import ServerConfig

#: Environment variable with comma-separated tokens (in addition to `auth_tokens_file`).
TOKENS_ENV = "EMOQ_AUTH_TOKENS"
#: Methods reachable without a token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def load_tokens(cfg: ServerConfig) -> list[str]:
    """Tokens from `cfg.auth_tokens_file` (one per line, `#` comments) and $EMOQ_AUTH_TOKENS."""
    tokens: list[str] = []
    if cfg.auth_tokens_file:
        for line in Path(cfg.auth_tokens_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                tokens.append(line.strip())
        if not tokens:
            raise ValueError(f"{cfg.auth_tokens_file} holds no tokens; refusing to start without any")
    tokens += [t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    return tokens


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files in `cfg`; None = plaintext. A client CA means mTLS."""
    if not cfg.tls_cert:  # ServerConfig refuses half a TLS setting (a client CA alone included)
        return None
    client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without a known bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._expected = [f"Bearer {t}".encode() for t in tokens]

    def _allowed(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        given = next((v for k, v in metadata or () if k == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else given
        # Compare against every token (no early exit) so timing does not depend on which matched.
        return sum(hmac.compare_digest(given_bytes, e) for e in self._expected) > 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or self._allowed(details.invocation_metadata):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
