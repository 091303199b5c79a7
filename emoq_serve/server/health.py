"""gRPC health with a bound on `Watch` streams.

Why: health stays open to unauthenticated callers (orchestrators probe it without tokens), and
each `Watch` is a stream the server holds until the client leaves. Unbounded, anyone who can
reach the port could open them by the thousand; so open watches are counted (a gauge), and one
past `limit` gets RESOURCE_EXHAUSTED at once (counted too). `Check` stays unlimited: it holds
nothing.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health
from prometheus_client import Counter


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer, with at most `limit` `Watch` streams open at once."""

    def __init__(self, limit: int, refused: Counter | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.watching = 0
        self._refused = refused

    async def Watch(self, request, context) -> None:
        if self.watching >= self.limit:
            if self._refused is not None:
                self._refused.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many open health watches (limit {self.limit}): use Check, or retry later")
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
