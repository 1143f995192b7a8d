"""A tower that fails gracefully: retries, one time budget, a circuit breaker, a concurrency cap.

`ResilientTower` wraps another `Tower` (the remote client). Faults that may fix
themselves (timeout, refused, 5xx, transport errors) are retried with capped
exponential backoff and full jitter, all inside one time budget per `validate`.
After `breaker_threshold` consecutive faults the breaker opens and `validate`
fails at once with `TowerFault("circuit_open")`, so the identity layer answers
503 or a stale identity in milliseconds instead of piling requests onto a
dying tower. Once `breaker_reset` seconds (half a second by default) have
passed since it opened, the next call that needs the tower is let through as
the one probe; its outcome closes the breaker or opens it for another period.
Probes are driven by demand, never by a timer: a tower that comes back is
found by the first request after it does (within `breaker_reset`), while an
idle gateway sends nothing, and only one probe is ever in flight, so a
recovering tower sees one call, then the backlog bounded by `max_concurrency`.

    closed --(threshold consecutive faults)--> open
    open --(breaker_reset elapsed, next call)--> half_open (one probe in flight)
    half_open --(probe answered)--> closed
    half_open --(probe fault)--> open
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from gateway.config import TowerConfig
from gateway.errors import TowerFault
from gateway.tower import Tower, TowerAnswer

log = logging.getLogger("tower_gateway.tower")

CircuitState = Literal["closed", "open", "half_open"]
StateHook = Callable[[CircuitState], None]
Jitter = Callable[[float], float]

DEFAULT_RETRIES: Final = 2
DEFAULT_BASE_DELAY: Final = 0.05
DEFAULT_MAX_DELAY: Final = 0.5
DEFAULT_BUDGET: Final = 2.0
DEFAULT_BREAKER_THRESHOLD: Final = 5
DEFAULT_BREAKER_RESET: Final = 0.5
DEFAULT_MAX_CONCURRENCY: Final = 64

# Faults that a second attempt may not see. `malformed`, `tower_auth` and
# `redirect` are answers the tower will give again; retrying only adds load.
RETRYABLE: Final = frozenset({"timeout", "refused", "server_error", "error"})

# A retry is started only if this much budget (or as long as the failed attempt
# took, if longer) is left after the backoff: an attempt that cannot finish
# would only add load and turn a clear fault into a timeout.
MIN_ATTEMPT_SECONDS: Final = 0.02


def full_jitter(cap: float) -> float:
    """Uniform in [0, cap]: spreads retries of many clients so they do not synchronise."""
    return random.uniform(0.0, cap)


@dataclass(frozen=True, slots=True)
class _Ticket:
    """Permission for one tower call; `generation` ties its outcome to the state it began in."""

    generation: int
    probe: bool


class CircuitBreaker:
    """Consecutive-fault breaker with a single half-open probe; no I/O, driven by `clock`."""

    def __init__(
        self,
        *,
        threshold: int,
        reset: float,
        clock: Callable[[], float],
        on_state_change: StateHook | None = None,
    ) -> None:
        assert threshold > 0 and reset > 0
        self._threshold = threshold
        self._reset = reset
        self._clock = clock
        self._on_state_change = on_state_change
        self._state: CircuitState = "closed"
        self._faults = 0
        self._opened_at = 0.0
        self._probing = False
        # Bumped on every transition: an outcome of a call admitted under an
        # earlier state (a slow call finishing after the breaker opened) is
        # stale evidence and must not close or re-open the breaker.
        self._generation = 0

    @property
    def state(self) -> CircuitState:
        return self._state

    def admit(self) -> _Ticket | None:
        """A ticket for one call, or None when the call must fail fast."""
        if self._state == "open":
            if self._clock() - self._opened_at < self._reset:
                return None
            self._transition("half_open")
        if self._state == "half_open":
            if self._probing:
                return None
            self._probing = True
            return _Ticket(self._generation, probe=True)
        return _Ticket(self._generation, probe=False)

    def succeeded(self, ticket: _Ticket) -> None:
        if ticket.generation != self._generation:
            return
        if ticket.probe:
            self._transition("closed")
        else:
            self._faults = 0

    def failed(self, ticket: _Ticket) -> None:
        if ticket.generation != self._generation:
            return
        if ticket.probe:
            self._open()
            return
        self._faults += 1
        if self._faults >= self._threshold:
            self._open()

    def release(self, ticket: _Ticket) -> None:
        """The call ended without a verdict on the tower (cancelled, no free slot)."""
        if ticket.probe and ticket.generation == self._generation:
            self._probing = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._transition("open")

    def _transition(self, state: CircuitState) -> None:
        self._state = state
        self._generation += 1
        self._faults = 0
        self._probing = False
        if state == "open":
            log.warning("tower circuit open: failing fast for %.1fs", self._reset)
        else:
            log.info("tower circuit %s", state)
        if self._on_state_change is not None:
            self._on_state_change(state)


class ResilientTower:
    """A `Tower` that retries, bounds time and concurrency, and breaks the circuit."""

    def __init__(
        self,
        inner: Tower,
        *,
        retries: int = DEFAULT_RETRIES,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        budget: float = DEFAULT_BUDGET,
        breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD,
        breaker_reset: float = DEFAULT_BREAKER_RESET,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: StateHook | None = None,
        jitter: Jitter = full_jitter,
    ) -> None:
        assert retries >= 0 and base_delay >= 0 and max_delay >= 0
        assert budget > 0 and max_concurrency > 0
        self.name = inner.name
        self.inner = inner
        self._retries = retries
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._budget = budget
        self._jitter = jitter
        self._slots = asyncio.Semaphore(max_concurrency)
        self._breaker = CircuitBreaker(
            threshold=breaker_threshold,
            reset=breaker_reset,
            clock=clock,
            on_state_change=on_state_change,
        )

    @classmethod
    def from_config(
        cls,
        inner: Tower,
        config: TowerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: StateHook | None = None,
    ) -> ResilientTower:
        return cls(
            inner,
            retries=config.retries,
            base_delay=config.retry_backoff,
            max_delay=config.retry_backoff_max,
            budget=config.budget if config.budget is not None else config.timeout,
            breaker_threshold=config.breaker_threshold,
            breaker_reset=config.breaker_reset,
            max_concurrency=config.max_concurrency,
            clock=clock,
            on_state_change=on_state_change,
        )

    @property
    def state(self) -> CircuitState:
        """The breaker's state; `open` turns `half_open` lazily, on the next call."""
        return self._breaker.state

    async def validate(self, api_key: str) -> TowerAnswer:
        # The budget runs on the loop's clock because asyncio timeouts do; the
        # breaker's periods run on `clock` so tests can move them without sleeping.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        attempt = 0
        last: TowerFault | None = None
        while True:
            ticket = self._breaker.admit()
            if ticket is None:
                # Mid-retry, the fault that was seen says more than "circuit_open".
                if last is not None:
                    raise last
                raise TowerFault("circuit_open", "the tower keeps failing; not calling it")
            started = loop.time()
            try:
                answer = await self._call(api_key, deadline)
            except _NoSlot:
                self._breaker.release(ticket)
                if last is not None:
                    raise last from None
                raise TowerFault(
                    "timeout", "no free slot for a tower call within the budget"
                ) from None
            except TowerFault as fault:
                if fault.key_specific:
                    # A probe it was, the tower still answered: a verdict on the key only.
                    self._breaker.release(ticket)
                else:
                    self._breaker.failed(ticket)
                last = fault
            except Exception:
                self._breaker.failed(ticket)
                raise
            except BaseException:
                self._breaker.release(ticket)
                raise
            else:
                # A Rejection is an answer too: the tower is working.
                self._breaker.succeeded(ticket)
                return answer

            if ticket.probe or attempt >= self._retries or last.kind not in RETRYABLE:
                raise last
            delay = self._jitter(min(self._max_delay, self._base_delay * 2**attempt))
            needed = max(MIN_ATTEMPT_SECONDS, loop.time() - started)
            if loop.time() + delay + needed > deadline:
                raise last
            log.debug("tower fault (%s), retry %d in %.3fs", last.kind, attempt + 1, delay)
            await asyncio.sleep(delay)
            attempt += 1

    async def _call(self, api_key: str, deadline: float) -> TowerAnswer:
        """One attempt: a concurrency slot, then the inner call, both before `deadline`."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise _NoSlot from None
        if asyncio.get_running_loop().time() >= deadline:
            # The slot came with no budget left: an attempt would only be cancelled.
            self._slots.release()
            raise _NoSlot
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await self.inner.validate(api_key)
        except TimeoutError:
            if scope.expired():
                raise TowerFault(
                    "timeout", f"no answer within the {self._budget}s budget"
                ) from None
            raise
        finally:
            self._slots.release()

    async def start(self) -> None:
        start = getattr(self.inner, "start", None)
        if start is not None:
            await start()

    async def ping(self) -> bool:
        # Readiness asks whether the tower answers at all; it bypasses the
        # breaker so /readyz reports the tower, not the breaker's memory of it.
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


class _NoSlot(Exception):
    """The budget ran out while waiting for a concurrency slot (not the tower's fault)."""
