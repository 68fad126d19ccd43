"""Progress from inside a long task: `heartbeat()`, so the systemd watchdog can tell slow from stuck.

A task that can run long (a model over a 256-note batch can take a minute on 2 cores) calls `heartbeat()`
between its sub-batches; the pipeline routes those calls to its progress clock with `progress(beat)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_beat: ContextVar[Callable[[], None] | None] = ContextVar("edge_agent_heartbeat", default=None)


def heartbeat() -> None:
    """Report progress from inside a task's process(); a no-op outside the pipeline (CLI, benchmarks)."""
    beat = _beat.get()
    if beat is not None:
        beat()


@contextmanager
def progress(beat: Callable[[], None]) -> Iterator[None]:
    """Route heartbeat() calls made in this thread (and context) to `beat` while the block runs."""
    token = _beat.set(beat)
    try:
        yield
    finally:
        _beat.reset(token)
