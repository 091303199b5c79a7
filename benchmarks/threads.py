"""Per-thread CPU time of a server process, sampled before and after a load point.

Why: throughput alone cannot tell an engine whose stages overlap from one whose stages take
turns. /proc/<pid>/task/<tid>/stat holds each thread's user+system CPU ticks and its name; the
engine names its compute threads by stage (`emoq-graph`, `vllm-engine`, `emoq-eager`, ...; threads
a library starts inherit the name of the thread that started them), so the difference of two
samples says how many cores each stage kept busy and how many of its threads did the work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

#: A thread that used at least this share of one core over the window counts as running.
BUSY_SHARE = 0.05
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ThreadSample:
    """One thread's name and its CPU seconds (user + system) so far."""

    name: str
    cpu_s: float


def sample(pid: int) -> dict[int, ThreadSample]:
    """Every thread of `pid` now: thread id -> (name, CPU seconds); {} if the process is gone."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:  # the thread ended between listing and reading
            continue
        # The name sits in parentheses and may hold spaces; the fields after it are fixed.
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(tid)] = ThreadSample(name=name, cpu_s=(int(fields[11]) + int(fields[12])) / _TICKS)
    return out


def group_of(name: str) -> str:
    """A thread's stage: its name without the pool index (`emoq-graph_1` -> `emoq-graph`)."""
    return re.sub(r"[_-]?\d+$", "", name) or name


def busy(before: dict[int, ThreadSample], after: dict[int, ThreadSample], wall_s: float) -> dict[str, object]:
    """Cores kept busy over `wall_s` by the process and by each thread group, and how many
    threads of each group ran (used >= BUSY_SHARE of a core) out of how many existed."""
    groups: dict[str, dict[str, float]] = {}
    total = 0.0
    for tid, now in after.items():
        used = now.cpu_s - (before[tid].cpu_s if tid in before else 0.0)
        total += used
        g = groups.setdefault(group_of(now.name), {"cores": 0.0, "threads": 0, "running": 0})
        g["cores"] += used / wall_s
        g["threads"] += 1
        g["running"] += int(used / wall_s >= BUSY_SHARE)
    ranked = dict(sorted(((k, {**v, "cores": round(v["cores"], 3)}) for k, v in groups.items()),
                         key=lambda kv: -kv[1]["cores"]))
    return {"cores_busy": round(total / wall_s, 3), "cpu_util": round(total / wall_s / (os.cpu_count() or 1), 3),
            "threads": len(after), "threads_running": sum(int(v["running"]) for v in groups.values()),
            "groups": ranked}
