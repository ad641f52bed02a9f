"""Entra ID tokens: the TokenSource seam, refresh timing and the single-flight refresh loop.

Invariants of RefreshingTokenSource:
- at most one token request to Entra is in flight at any time (single flight);
- `token()` never returns a token past its usable-until time (expiry minus a safety margin);
- a failed refresh never discards a still-usable token;
- refreshes happen in the background, well ahead of expiry, with jitter so that a fleet of
  sidecars started together does not refresh together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from mypy_extensions import mypyc_attr

from .errors import NoValidToken, TokenAcquisitionError

log = logging.getLogger(__name__)

# Refresh somewhere between half and three quarters of the token's life: for Entra's usual
# 60-90 minute tokens that is 15+ minutes before azure-identity's own 5-minute window, and it
# still works for tokens that live under 5 minutes (where azure-identity would re-fetch every
# 30 s, see DESIGN.md section 5).
REFRESH_AT_FRACTION = 0.5
REFRESH_JITTER_FRACTION = 0.25
# A token is not handed out in its last 10% of life (at most 60 s): it must still be valid when
# Azure OpenAI checks it, after the request has travelled and clocks have drifted.
EXPIRY_MARGIN_FRACTION = 0.1
EXPIRY_MARGIN_MAX_SECONDS = 60.0
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
# A request finding no usable token may trigger a fetch itself, at most this often; so may an
# upstream 401 (a token revoked or a role changed before its expiry).
DEMAND_FETCH_MIN_INTERVAL_SECONDS = 5.0
RENEW_MIN_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class Token:
    """An access token and its timing, all in seconds since the epoch."""

    value: str = field(repr=False)
    expires_on: float
    fetched_at: float
    refresh_on: float | None = None

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expires_on - self.fetched_at)

    @property
    def usable_until(self) -> float:
        return self.expires_on - min(
            EXPIRY_MARGIN_MAX_SECONDS, self.lifetime * EXPIRY_MARGIN_FRACTION
        )

    def usable(self, now: float) -> bool:
        return now < self.usable_until


# Compiled by mypyc (hatch_build.NATIVE: held() runs for every request). The package exports
# these two; a native class refuses Python subclasses unless it allows them, as these do.
@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class TokenStatus:
    """What readiness and `check` report about the token source."""

    ready: bool
    expires_on: float | None
    last_error: str | None


class TokenSource(Protocol):
    """Hands out a bearer token for the upstream; the one thing forwarding needs from Entra."""

    def start(self) -> None:
        """Begin acquiring tokens in the background (called once the event loop runs)."""
        ...

    async def close(self) -> None: ...

    async def token(self) -> str:
        """A usable token, or raise NoValidToken (carrying Entra's error)."""
        ...

    def held(self) -> str | None:
        """The token `token()` would return now without waiting, or None (then call it)."""
        ...

    async def renew(self, rejected: str) -> bool:
        """The upstream refused `rejected` (401): get a different token if allowed now.
        True when a different usable token is held afterwards."""
        ...

    def may_renew(self, rejected: str) -> bool:
        """Whether renew(rejected) would try at all now (False: rate limited)."""
        ...

    def status(self) -> TokenStatus: ...


class TokenFetcher(Protocol):
    """Gets one new token from Entra; raises TokenAcquisitionError."""

    async def fetch(self) -> Token: ...


def refresh_time(token: Token, jitter: float) -> float:
    """When to fetch the next token; `jitter` is uniform in [0, 1)."""
    fraction = REFRESH_AT_FRACTION + REFRESH_JITTER_FRACTION * jitter
    planned = token.fetched_at + token.lifetime * fraction
    if token.refresh_on is not None:
        planned = min(planned, token.refresh_on)
    return min(planned, token.usable_until)


def retry_delay(failures: int, jitter: float) -> float:
    """Exponential backoff after `failures` consecutive failures (>= 1), jittered to 50-100%."""
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** (failures - 1))
    return ceiling * (0.5 + 0.5 * jitter)


@mypyc_attr(allow_interpreted_subclasses=True)  # exported: see TokenStatus
class RefreshingTokenSource:
    """A TokenSource that keeps one token fresh in the background (see module invariants)."""

    def __init__(
        self,
        fetcher: TokenFetcher,
        *,
        fetch_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        on_fetch: Callable[[str | None], None] | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._on_fetch = on_fetch or (lambda error: None)
        self._last_renewal = float("-inf")
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._jitter = jitter
        self._token: Token | None = None
        self._next_refresh = float("-inf")
        self._last_error: str | None = None
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[Token] | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RefreshingTokenSource:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Begin acquiring the first token in the background; readiness waits for it."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._refresh_loop(), name="token-refresh")

    async def close(self) -> None:
        """Stop refreshing; the held token is simply forgotten."""
        for task in (self._loop_task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TokenAcquisitionError):
                    await task
        self._loop_task = self._inflight = None

    def status(self) -> TokenStatus:
        token = self._token
        return TokenStatus(
            ready=self._usable(self._clock()),
            expires_on=token.expires_on if token else None,
            last_error=self._last_error,
        )

    def held(self) -> str | None:
        token = self._token
        return token.value if token is not None and token.usable(self._clock()) else None

    async def token(self) -> str:
        token = self._token
        if token is not None and token.usable(self._clock()):
            return token.value
        # No usable token: join the fetch under way (start-up), or fetch on demand if the last
        # attempt is old enough that this cannot hammer Entra; never wait beyond one fetch.
        if self._inflight is not None or (
            self._clock() - self._last_attempt >= DEMAND_FETCH_MIN_INTERVAL_SECONDS
        ):
            with contextlib.suppress(TokenAcquisitionError):
                token = await self.refresh()
                if token.usable(self._clock()):
                    return token.value
        reason = self._last_error or "the first token has not been acquired yet"
        raise NoValidToken(f"No valid Entra ID token for the upstream: {reason}")

    def may_renew(self, rejected: str) -> bool:
        held = self._token
        if held is not None and held.value != rejected and held.usable(self._clock()):
            return True
        return self._clock() - self._last_renewal >= RENEW_MIN_INTERVAL_SECONDS

    async def renew(self, rejected: str) -> bool:
        held = self._token
        if held is not None and held.value != rejected and held.usable(self._clock()):
            return True  # another request already renewed it
        if self._clock() - self._last_renewal < RENEW_MIN_INTERVAL_SECONDS:
            return False  # an upstream that rejects every token must not hammer Entra
        self._last_renewal = self._clock()
        log.warning("the upstream refused the current token (401); fetching a new one")
        try:
            token = await self.refresh()
        except TokenAcquisitionError:
            return False
        return token.value != rejected

    async def refresh(self) -> Token:
        """Fetch a new token now, joining a fetch already in flight (single flight)."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name="token-fetch")
        return await asyncio.shield(self._inflight)

    def _usable(self, now: float) -> bool:
        return self._token is not None and self._token.usable(now)

    async def _fetch(self) -> Token:
        self._last_attempt = self._clock()
        try:
            async with asyncio.timeout(self._fetch_timeout):
                token = await self._fetcher.fetch()
            now = self._clock()
            if not token.usable(now):
                # Already expired on arrival: clocks disagree, or the lifetime is absurdly
                # short. Refused, so the loop backs off instead of re-fetching in a tight loop.
                raise TokenAcquisitionError(
                    f"Entra ID returned a token expiring {iso_utc(token.expires_on)}, already "
                    "(nearly) expired by this machine's clock: check the clock (NTP)"
                )
        except TimeoutError:
            self._failed(f"Entra ID did not answer within {self._fetch_timeout:g} s")
            raise TokenAcquisitionError(self._last_error) from None
        except TokenAcquisitionError as exc:
            self._failed(str(exc))
            raise
        except Exception as exc:
            # A fetcher bug or an unexpected library error must not end the refresh loop;
            # it is reported like any other failure, with its cause chain in the log.
            log.error("token fetch failed unexpectedly", exc_info=exc)
            self._failed(f"{type(exc).__name__}: {exc}")
            raise TokenAcquisitionError(self._last_error) from exc
        finally:
            self._inflight = None
        self._on_fetch(None)
        self._token = token
        self._last_error = None
        self._next_refresh = refresh_time(token, self._jitter())
        log.info(
            "token acquired, expires %s, next refresh in %.0f s",
            iso_utc(token.expires_on),
            self._next_refresh - self._clock(),
        )
        self._wake.set()  # the loop re-plans its sleep around the new token
        return token

    def _failed(self, error: str) -> None:
        self._last_error = error
        self._on_fetch(error)

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            now = self._clock()
            if now >= self._next_refresh or not self._usable(now):
                try:
                    await self.refresh()
                except TokenAcquisitionError as exc:
                    failures += 1
                    delay = retry_delay(failures, self._jitter())
                    self._next_refresh = self._clock() + delay
                    if self._usable(self._clock()):
                        log.warning(
                            "token refresh failed; the current token stays in use until %s; "
                            "retry in %.1f s: %s",
                            iso_utc(self._token.usable_until if self._token else 0.0),
                            delay,
                            exc,
                        )
                    else:
                        log.error("token acquisition failed; retry in %.1f s: %s", delay, exc)
            else:
                failures = 0
            self._wake.clear()
            sleep = max(0.0, self._next_refresh - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)


def iso_utc(epoch: float) -> str:
    """Seconds since the epoch as an ISO 8601 UTC time, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
