"""Shutdown's wait for the requests in flight: woken by the last to leave, bounded by its grace."""

from __future__ import annotations

import asyncio

from aoai_auth_proxy.lifecycle import Lifecycle


class _Request:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def test_nothing_in_flight_is_idle_at_once() -> None:
    lifecycle = Lifecycle()
    assert await asyncio.wait_for(lifecycle.wait_idle(60), 1)
    first = _Request()
    lifecycle.enter(first)
    lifecycle.leave(first)
    assert lifecycle.inflight == 0
    assert await asyncio.wait_for(lifecycle.wait_idle(60), 1)


async def test_the_wait_ends_when_the_last_request_leaves() -> None:
    lifecycle = Lifecycle()
    first, second = _Request(), _Request()
    lifecycle.enter(first)
    lifecycle.enter(second)
    waiting = asyncio.create_task(lifecycle.wait_idle(60))
    await asyncio.sleep(0)
    lifecycle.leave(first)
    await asyncio.sleep(0)
    assert not waiting.done()  # one is still in flight
    lifecycle.leave(second)
    assert await asyncio.wait_for(waiting, 1)


async def test_a_wait_past_its_grace_says_so_and_a_later_wait_still_ends() -> None:
    lifecycle = Lifecycle()
    stuck = _Request()
    lifecycle.enter(stuck)
    assert not await lifecycle.wait_idle(0.01)
    assert lifecycle.cancel_inflight() == 1
    assert stuck.cancelled
    waiting = asyncio.create_task(lifecycle.wait_idle(60))
    await asyncio.sleep(0)
    lifecycle.leave(stuck)  # as a cancelled request does when it unwinds
    assert await asyncio.wait_for(waiting, 1)
    # A new request after the drain starts from a clean state.
    late = _Request()
    lifecycle.enter(late)
    assert not await lifecycle.wait_idle(0.01)
    lifecycle.leave(late)
    assert await lifecycle.wait_idle(0.01)
