"""Refresh timing and the single-flight token source, with a fake fetcher and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from aoai_auth_proxy.credentials import (
    RETRY_MAX_SECONDS,
    RefreshingTokenSource,
    Token,
    refresh_time,
    retry_delay,
)
from aoai_auth_proxy.errors import NoValidToken, TokenAcquisitionError


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeFetcher:
    """Counts fetches; each returns a token of `lifetime` seconds, or fails while `failing`
    (or raises `crash`, an exception no fetcher should raise)."""

    def __init__(self, clock: Callable[[], float], lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.failing: str | None = None
        self.crash: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def fetch(self) -> Token:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.crash is not None:
            raise self.crash
        if self.failing:
            raise TokenAcquisitionError(self.failing)
        now = self.clock()
        return Token(f"token-{self.calls}", now + self.lifetime, fetched_at=now)


def token(lifetime: float, *, refresh_on: float | None = None) -> Token:
    return Token("t", expires_on=1000.0 + lifetime, fetched_at=1000.0, refresh_on=refresh_on)


@pytest.mark.parametrize("lifetime", [90.0, 299.0, 3600.0, 5400.0, 86400.0])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999])
def test_refresh_is_planned_well_before_expiry_for_any_lifetime(
    lifetime: float, jitter: float
) -> None:
    t = token(lifetime)
    at = refresh_time(t, jitter)
    assert t.fetched_at + lifetime * 0.5 <= at <= t.fetched_at + lifetime * 0.75
    assert at < t.usable_until < t.expires_on
    if lifetime >= 3600:
        assert t.expires_on - at > 300  # well before azure-identity's 5-minute window


def test_jitter_spreads_refreshes() -> None:
    t = token(3600.0)
    assert refresh_time(t, 0.0) != refresh_time(t, 0.9)


def test_entra_refresh_hint_is_honoured_when_earlier() -> None:
    t = token(86400.0, refresh_on=1000.0 + 3600.0)
    assert refresh_time(t, 0.5) == 1000.0 + 3600.0


def test_token_is_not_handed_out_in_its_last_moments() -> None:
    t = token(3600.0)
    assert t.usable(t.expires_on - 61)
    assert not t.usable(t.expires_on - 59)
    short = token(90.0)
    assert short.usable(short.expires_on - 10)
    assert not short.usable(short.expires_on - 8)


def test_retry_backoff_grows_and_is_capped() -> None:
    delays = [retry_delay(n, 0.999) for n in range(1, 12)]
    assert delays == sorted(delays)
    assert delays[-1] <= RETRY_MAX_SECONDS
    assert retry_delay(1, 0.0) >= 0.5


async def test_hundred_concurrent_callers_cause_one_token_request() -> None:
    clock = Clock()
    fetcher = FakeFetcher(clock)
    fetcher.gate = asyncio.Event()
    source = RefreshingTokenSource(fetcher, clock=clock)
    waiters = [asyncio.ensure_future(source.token()) for _ in range(100)]
    await asyncio.sleep(0.01)
    fetcher.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert set(tokens) == {"token-1"}
    assert fetcher.calls == 1


async def test_a_failed_refresh_keeps_the_valid_token() -> None:
    clock = Clock()
    fetcher = FakeFetcher(clock, lifetime=100.0)
    source = RefreshingTokenSource(fetcher, clock=clock)
    assert await source.token() == "token-1"
    fetcher.failing = "AADSTS50001: down"
    clock.now += 70  # past the planned refresh
    with pytest.raises(TokenAcquisitionError):
        await source.refresh()
    assert await source.token() == "token-1"
    status = source.status()
    assert status.ready
    assert status.last_error == "AADSTS50001: down"


async def test_an_expired_token_is_never_handed_out() -> None:
    clock = Clock()
    fetcher = FakeFetcher(clock, lifetime=100.0)
    source = RefreshingTokenSource(fetcher, clock=clock)
    await source.token()
    fetcher.failing = "AADSTS7000215: Invalid client secret provided."
    clock.now += 95  # inside the expiry margin: no longer usable
    with pytest.raises(NoValidToken) as raised:
        await source.token()
    assert "AADSTS7000215" in raised.value.message
    assert raised.value.status == 503
    assert not source.status().ready


async def test_requests_without_a_token_do_not_hammer_entra() -> None:
    clock = Clock()
    fetcher = FakeFetcher(clock)
    fetcher.failing = "down"
    source = RefreshingTokenSource(fetcher, clock=clock)
    for _ in range(50):
        with pytest.raises(NoValidToken):
            await source.token()
    assert fetcher.calls == 1
    clock.now += 5
    fetcher.failing = None
    assert await source.token() == "token-2"


async def test_background_loop_refreshes_ahead_of_expiry_and_never_hands_out_an_expired_token() -> (
    None
):
    clock = asyncio.get_running_loop().time
    fetcher = FakeFetcher(clock, lifetime=0.4)  # tokens of 0.4 s, on the real clock
    source = RefreshingTokenSource(fetcher, clock=clock)
    issued: dict[str, float] = {}
    original = fetcher.fetch

    async def recording_fetch() -> Token:
        token = await original()
        issued[token.value] = token.expires_on
        return token

    fetcher.fetch = recording_fetch  # type: ignore[method-assign]
    async with source:
        deadline = clock() + 5.0
        while fetcher.calls < 5 and clock() < deadline:
            value = await source.token()
            assert issued[value] > clock()  # handed out only while unexpired
            await asyncio.sleep(0.02)
    assert fetcher.calls >= 5  # it kept refreshing by itself, in the background
    assert len(issued) == fetcher.calls


async def test_fetch_that_hangs_times_out_with_a_reason() -> None:
    clock = Clock()
    fetcher = FakeFetcher(clock)
    fetcher.gate = asyncio.Event()  # never set
    source = RefreshingTokenSource(fetcher, clock=clock, fetch_timeout=0.05)
    with pytest.raises(NoValidToken) as raised:
        await source.token()
    assert "did not answer within 0.05 s" in raised.value.message


async def test_an_unexpected_fetch_error_is_reported_and_the_loop_survives() -> None:
    clock = asyncio.get_running_loop().time
    fetcher = FakeFetcher(clock)
    fetcher.crash = ValueError("Invalid tenant id provided")
    source = RefreshingTokenSource(fetcher, clock=clock)
    async with source:
        with pytest.raises(NoValidToken) as raised:
            await source.token()
        assert "ValueError: Invalid tenant id provided" in raised.value.message
        assert source.status().last_error == "ValueError: Invalid tenant id provided"
        fetcher.crash = None
        for _ in range(300):  # the loop retries after its backoff (0.5-1 s)
            if source.status().ready:
                break
            await asyncio.sleep(0.01)
        assert source.status().ready
    # close() neither raises nor hangs


async def test_a_token_expired_on_arrival_is_refused_and_backed_off() -> None:
    clock = asyncio.get_running_loop().time
    fetcher = FakeFetcher(clock, lifetime=-10.0)  # e.g. this machine's clock runs ahead
    source = RefreshingTokenSource(fetcher, clock=clock)
    async with source:
        await asyncio.sleep(1.2)
        assert 1 <= fetcher.calls <= 3  # backoff, not a tight loop
        status = source.status()
        assert not status.ready
        assert status.last_error is not None
        assert "clock" in status.last_error
