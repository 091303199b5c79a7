"""Engine supervision: detect a broken engine, answer UNAVAILABLE while rebuilding it, recover.

Why: a serving process outlives its engine. vLLM's engine thread can die, an onnxruntime session
can start failing, a backend can hang; without supervision every later request fails (or waits
forever) until someone restarts the process. `EngineSupervisor` is itself a `Recognizer`, so the
batcher and the service need no change: it runs each batch under a watchdog, classifies failures,
and on a fatal one closes the engine, rebuilds it with the factory (in a worker thread, so the
event loop keeps answering health checks and refusing calls quickly) and reports its state to a
listener (the server flips gRPC health NOT_SERVING -> SERVING).

Failure classes:
- transient: the batch raised, the engine still looks fine. Those callers get INTERNAL.
- fatal: the batch ran past `engine_timeout_s` (hung), raised an error that names a dead engine
  (`EngineFailure`, `FATAL_ERROR_NAMES`, MemoryError, SystemError), or `max_consecutive_failures`
  batches failed in a row. Those callers get UNAVAILABLE (`EngineUnavailable`) and the engine is
  rebuilt. An engine that `SupportsFailureWatch` (the vLLM engine thread) also reports its own
  breakage, which starts the rebuild at once, even with no batch in flight.
While rebuilding, batches fail at once with UNAVAILABLE (`EngineRestarting`: refused before any
compute, so a cluster front door sends them to another replica) instead of queueing behind a dead
engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from emoq_serve.executors.types import (
    EngineFailure,
    EngineUnavailable,
    Prediction,
    Recognizer,
    SupportsFailureWatch,
    Utterance,
)

log = logging.getLogger(__name__)

#: Exception class names that mean the engine itself is gone (vLLM's dead engine core,
#: onnxruntime's execution-provider and runtime failures), matched by name so that neither
#: library is imported here.
FATAL_ERROR_NAMES = frozenset({"EngineDeadError", "EPFail", "RuntimeException"})


@dataclass
class SupervisorConfig:
    #: A batch running longer than this means a hung engine (fatal).
    engine_timeout_s: float = 60.0
    #: This many failed batches in a row count as fatal even if each looked transient.
    max_consecutive_failures: int = 3
    #: Wait before retrying a failed rebuild; doubles per failed attempt up to the max.
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    #: How long closing a broken engine may take before it is abandoned.
    close_timeout_s: float = 10.0
    #: How long a rebuild waits for the broken engine to be collected (the failed calls' errors
    #: hold it until their handlers finish) before building the new one beside it anyway.
    release_wait_s: float = 2.0

    def __post_init__(self) -> None:
        if self.engine_timeout_s <= 0 or self.max_consecutive_failures < 1 or self.restart_backoff_s <= 0:
            raise ValueError("engine_timeout_s and restart_backoff_s must be > 0, max_consecutive_failures >= 1")


class EngineRestarting(EngineUnavailable):
    """The batch was refused before it reached an engine: the engine is being rebuilt."""


def is_fatal(exc: BaseException) -> bool:
    """Whether `exc` alone shows the engine is broken (as opposed to one bad batch)."""
    return isinstance(exc, EngineFailure | MemoryError | SystemError) or type(exc).__name__ in FATAL_ERROR_NAMES


@dataclass
class SupervisorStats:
    """Counters since start; `recovery_s[i]` = seconds from the i-th fatal failure to serving again."""

    transient_failures: int = 0
    fatal_failures: int = 0
    failed_rebuilds: int = 0
    recovery_s: list[float] = field(default_factory=list)


class EngineSupervisor:
    """A `Recognizer` that owns an engine built by `factory` and rebuilds it after fatal failures.

    `factory` is called once here (a failure at start-up propagates) and again, in a worker
    thread, for every restart. `on_state(serving)` is awaited on every state change.
    """

    def __init__(
        self,
        factory: Callable[[], Recognizer],
        cfg: SupervisorConfig,
        on_state: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_state = on_state
        self.stats = SupervisorStats()
        self._factory = factory
        self._consecutive = 0
        self._restart: asyncio.Task[None] | None = None
        self._closed = False
        # The loop that owns this supervisor: engine threads report failures onto it. Known here
        # when built on the serving loop (as the server does), else from the first batch.
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._engine: Recognizer | None = self._adopt(factory())
        self.labels = self._engine.labels
        self._info = self._engine.info()

    @property
    def serving(self) -> bool:
        return self._engine is not None

    def info(self) -> dict[str, str]:
        return dict(self._info)  # cached: answers GetModelInfo during a restart too

    def _adopt(self, engine: Recognizer) -> Recognizer:
        """Subscribe to `engine`'s own failure reports, if it makes any."""
        if isinstance(engine, SupportsFailureWatch):
            engine.watch_failure(lambda exc: self._reported(engine, exc))
        return engine

    def _reported(self, engine: Recognizer, exc: BaseException) -> None:
        """`engine` says it broke (called from its own thread): rebuild it on the serving loop."""
        loop = self._loop
        if loop is None:  # no batch ran yet: the next one finds the engine broken (EngineFailure)
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to serve
            loop.call_soon_threadsafe(self._fatal, engine, f"{type(exc).__name__}: {exc} (reported by the engine)")

    async def recognize(self, batch: list[Utterance]) -> list[Prediction]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        engine = self._engine
        if engine is None:
            raise EngineRestarting("the engine is restarting after a failure: retry shortly")
        try:
            async with asyncio.timeout(self.cfg.engine_timeout_s) as watchdog:
                predictions = await engine.recognize(batch)
        except TimeoutError as exc:
            if not watchdog.expired():
                raise self._unpinned(self._failed(engine, exc), exc) from exc
            self._fatal(engine, f"no answer within the engine timeout ({self.cfg.engine_timeout_s:g} s)")
            del engine  # the raised error's traceback holds this frame (see `_unpinned`)
            raise self._unpinned(EngineUnavailable(
                f"the engine hung (no answer in {self.cfg.engine_timeout_s:g} s) and is restarting: retry shortly"
            ), exc) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = self._unpinned(self._failed(engine, exc), exc)
            if isinstance(failure, EngineUnavailable):
                del engine
            raise failure from exc
        if engine is self._engine:
            self._consecutive = 0
        return predictions

    @staticmethod
    def _unpinned(failure: Exception, cause: BaseException) -> Exception:
        """For a fatal failure, clear the locals of the finished frames in the cause's traceback
        (the engine's own `self` among them): the error lives on in callers, logs and futures,
        and must not keep the broken engine, and its GPU memory, alive through the rebuild. The
        traceback's lines stay for the logs."""
        if isinstance(failure, EngineUnavailable):
            traceback.clear_frames(cause.__traceback__)
        return failure

    def _failed(self, engine: Recognizer, exc: Exception) -> Exception:
        """Classify a batch failure; returns what the callers should get."""
        self._consecutive += 1
        reason = f"{type(exc).__name__}: {exc}"
        if is_fatal(exc) or self._consecutive >= self.cfg.max_consecutive_failures:
            self._fatal(engine, f"{reason} ({self._consecutive} failed batch(es) in a row)")
            return EngineUnavailable(f"the engine failed ({reason}) and is restarting: retry shortly")
        self.stats.transient_failures += 1
        return exc

    def _fatal(self, engine: Recognizer, reason: str) -> None:
        """Take `engine` out of service and start one rebuild (later reports of it are ignored)."""
        if engine is not self._engine or self._closed:
            return
        log.error("engine failure, restarting: %s", reason)
        self.stats.fatal_failures += 1
        self._engine = None
        self._consecutive = 0
        self._restart = asyncio.get_running_loop().create_task(self._rebuild(engine), name="emoq-engine-restart")

    async def _rebuild(self, broken: Recognizer) -> None:
        started = time.monotonic()
        await self._notify(False)
        try:
            await asyncio.wait_for(broken.close(), self.cfg.close_timeout_s)
        except Exception:  # a broken engine may fail to close too; it is dropped either way
            log.exception("closing the failed engine did not finish cleanly")
        closed = time.monotonic()
        gone = weakref.ref(broken)
        del broken  # this frame's reference, so that only the weak one is left here
        await self._release(gone)
        released = time.monotonic()
        backoff = self.cfg.restart_backoff_s
        while True:
            try:
                engine = self._adopt(await asyncio.to_thread(self._factory))
                if tuple(engine.labels) != tuple(self.labels):
                    await engine.close()
                    raise RuntimeError(f"the rebuilt engine has labels {engine.labels}, expected {self.labels}")
                break
            except Exception:
                self.stats.failed_rebuilds += 1
                log.exception("engine rebuild failed; retrying in %.1f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.cfg.restart_backoff_max_s)
        self._engine = engine
        self._info = engine.info()
        done = time.monotonic()
        self.stats.recovery_s.append(done - started)
        # The phases, so that a slow recovery says which part was slow.
        log.info("engine restarted in %.2f s (close %.2f s, release %.2f s, build %.2f s)",
                 done - started, closed - started, released - closed, done - released)
        await self._notify(True)

    async def _release(self, broken: weakref.ref) -> None:
        """The new engine must not be built beside the old one's GPU memory (ORT sessions,
        weights, KV cache): once nothing holds the old engine (our last reference is the weak
        one; the failed calls' tracebacks hold it until their handlers finish), collect it and
        empty torch's CUDA cache. Bounded by `release_wait_s` in wall time, a collection still
        running included (finalisers of a big process's garbage can block): a leaked reference or
        a slow collection costs memory, not the rebuild."""
        from emoq_serve.device import release_device_memory  # torch: only once an engine is rebuilt

        deadline = time.monotonic() + self.cfg.release_wait_s
        collecting: asyncio.Future[bool] | None = None
        pause = 0.05
        while True:
            if collecting is None or collecting.done():  # never two collections side by side
                began = time.monotonic()
                collecting = asyncio.ensure_future(asyncio.to_thread(release_device_memory))
            try:
                await asyncio.wait_for(asyncio.shield(collecting), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
            except Exception:  # the rebuild must go on: an engine that cannot come back is worse
                log.exception("releasing the failed engine's memory failed; building the new one anyway")
                return
            if broken() is None:
                return
            if time.monotonic() >= deadline:
                running = "" if collecting.done() else f" (a collection running for {time.monotonic() - began:.1f} s)"
                log.warning("the failed engine is still referenced after %.1f s%s; building the new one beside it",
                            self.cfg.release_wait_s, running)
                return
            # A full collection holds the GIL (a second or more in a big process): between two,
            # the process serves at least as long as the last one took.
            pause = max(pause, time.monotonic() - began)
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    async def _notify(self, serving: bool) -> None:
        if self.on_state is not None:
            await self.on_state(serving)

    async def wait_serving(self) -> None:
        """Return once no rebuild is in progress (tests and orderly shutdown)."""
        if self._restart is not None:
            await asyncio.shield(self._restart)

    async def close(self) -> None:
        self._closed = True
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()
