"""Process state for shutdown: whether draining began, and which requests are still in flight."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol


class Cancellable(Protocol):
    """Something serving a request: a task, or an express exchange (http1.py)."""

    def cancel(self) -> Any: ...


class Lifecycle:
    """The one piece of mutable process state. Invariant: `draining` only ever goes from
    False to True; a waiter in `wait_idle` is woken when the last request in flight leaves."""

    def __init__(self) -> None:
        self.draining = False
        self._inflight: set[Cancellable] = set()
        # Made only while shutdown waits: an asyncio.Event cleared and set around every
        # request costs two calls into asyncio's Python code per request (issue 8).
        self._idle: asyncio.Future[None] | None = None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def enter(self, task: Cancellable) -> None:
        """`task` serves a request from now on (cancelled if still running after the grace)."""
        self._inflight.add(task)

    def leave(self, task: Cancellable) -> None:
        self._inflight.discard(task)
        if not self._inflight and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def wait_idle(self, seconds: float) -> bool:
        """True if every in-flight request finished within `seconds`."""
        if self._inflight:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                # shield: a timed-out wait leaves the future for the next waiter.
                await asyncio.wait_for(asyncio.shield(self._idle), seconds)
        return not self._inflight

    def cancel_inflight(self) -> int:
        """Cancel what is still running (the grace period is over); returns how many."""
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        return len(tasks)
