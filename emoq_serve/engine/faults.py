"""Test-only fault injection: make a named engine stage sleep or fail, locally or in a replica.

Why: the supervisor's watchdog, a replica's health check and the front door's retries are only
proven by an engine that really hangs or fails in the middle of a batch. `EMOQ_FAULT_INJECT`
(read when an engine is built; never set in production) wraps the engine's graph stages so that
the named one sleeps or raises on its worker thread, exactly where a stuck or broken onnxruntime
session would. Comma-separated `key=value` pairs:

- `stage=audio|former` (default audio), `mode=sleep|fail` (default fail), `seconds=S` (sleep, default 30)
- `armed=PATH`: act only while PATH exists; PATH may hold more pairs that override these (tests
  arm, change and disarm a fault under running replicas)
- `claim=PATH`: only one engine acts, the first to run the armed stage (it creates PATH with its
  token): the rest of the cluster, and that engine's own rebuild, stay healthy.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

FAULT_ENV = "EMOQ_FAULT_INJECT"
#: The engine attributes a fault can name: `OnnxPipeline`'s graph stages (each has `run(**inputs)`).
FAULT_STAGES = ("audio", "former")
_engines = itertools.count()
R = TypeVar("R")


class InjectedFault(RuntimeError):
    """The failure a `mode=fail` fault raises."""


@dataclass(frozen=True)
class FaultSpec:
    stage: str = "audio"
    mode: str = "fail"
    seconds: float = 30.0
    armed: str | None = None
    claim: str | None = None

    @classmethod
    def parse(cls, text: str, base: FaultSpec | None = None) -> FaultSpec:
        """`key=value,...` over `base` (or the defaults); unknown keys and values are errors."""
        pairs = dict(item.split("=", 1) for item in text.replace("\n", ",").split(",") if item.strip())
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(pairs) - fields:
            raise ValueError(f"{FAULT_ENV}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
        changes: dict[str, Any] = {k.strip(): v.strip() for k, v in pairs.items()}
        if "seconds" in changes:
            changes["seconds"] = float(changes["seconds"])
        spec = dataclasses.replace(base or cls(), **changes)
        if spec.stage not in FAULT_STAGES or spec.mode not in ("sleep", "fail"):
            raise ValueError(f"{FAULT_ENV}: stage must be one of {FAULT_STAGES} and mode sleep or fail, got {text!r}")
        return spec


class FaultyStage:
    """A graph stage that sleeps or raises while its fault is active, then runs the real stage."""

    def __init__(self, stage: Any, name: str, spec: FaultSpec, token: str) -> None:
        self._stage, self._name, self._spec, self._token = stage, name, spec, token

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._stage, attr)

    def run(self, **inputs: Any) -> Any:
        spec = self._active()
        if spec is not None:
            log.warning("injected fault in stage %s: %s", self._name, spec.mode)
            if spec.mode == "fail":
                raise InjectedFault(f"injected fault: the {self._name} stage failed")
            time.sleep(spec.seconds)
        return self._stage.run(**inputs)

    def _active(self) -> FaultSpec | None:
        spec = self._spec
        if spec.armed is not None:
            try:
                spec = FaultSpec.parse(Path(spec.armed).read_text(), spec)
            except FileNotFoundError:
                return None
        if spec.stage != self._name or (spec.claim is not None and not self._claimed(Path(spec.claim))):
            return None
        return spec

    def _claimed(self, path: Path) -> bool:
        try:
            with open(path, "x") as f:  # exclusive create: one engine wins
                f.write(self._token)
            return True
        except FileExistsError:
            return path.read_text().strip() == self._token


def inject_faults(engine: R) -> R:
    """`engine` with its stages wrapped per `EMOQ_FAULT_INJECT` (unchanged when it is unset)."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return engine
    spec = FaultSpec.parse(text)
    stages = [name for name in FAULT_STAGES if getattr(engine, name, None) is not None]
    if spec.stage not in stages:
        raise ValueError(f"{FAULT_ENV}: this engine ({type(engine).__name__}) has no stage {spec.stage!r}")
    token = f"{os.getpid()}-{next(_engines)}"  # names this engine in a claim file
    log.warning("%s is set (tests only): engine %s gets faults %s", FAULT_ENV, token, spec)
    for name in stages:
        setattr(engine, name, FaultyStage(getattr(engine, name), name, spec, token))
    return engine
