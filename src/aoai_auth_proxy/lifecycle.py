"""Process state for shutdown: whether draining began, and which requests are still in flight."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol


class Cancellable(Protocol):
    """Something serving a request: a task, or an express exchange (http1.py)."""

    def cancel(self) -> Any: ...


class Lifecycle:
    """The one piece of mutable process state. Invariant: `idle` is set exactly when no
    request is in flight; `draining` only ever goes from False to True."""

    def __init__(self) -> None:
        self.draining = False
        self._inflight: set[Cancellable] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def enter(self, task: Cancellable) -> None:
        """`task` serves a request from now on (cancelled if still running after the grace)."""
        self._inflight.add(task)
        self._idle.clear()

    def leave(self, task: Cancellable) -> None:
        self._inflight.discard(task)
        if not self._inflight:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """True if every in-flight request finished within `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        return self._idle.is_set()

    def cancel_inflight(self) -> int:
        """Cancel what is still running (the grace period is over); returns how many."""
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        return len(tasks)
