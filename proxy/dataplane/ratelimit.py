"""A token bucket: a ring's ``policy.rate_limit``, per process, and a log line budget.
Pure: the clock is passed in.

The bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; a request
takes one.  ``take(now)`` answers 0.0 when it took a token, else the seconds until one
will be there (what ``Retry-After`` says, rounded up).  A refused request takes nothing,
so clients that retry early do not push the next token further away.  No lock: one event
loop thread per process.
"""

from __future__ import annotations

import math

# A token is there at 1.0 less float noise: 0.1 s at 10/s must give a whole token, not
# 0.99999999999999 of one (and a Retry-After for the rounding).
_ONE = 1.0 - 1e-9


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)  # starts full
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is one."""
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        if self.tokens >= _ONE:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.2f}/{self.burst:g} at {self.rate:g}/s>"


def retry_after(wait: float) -> int:
    """Whole seconds for ``Retry-After``: the wait rounded up, at least 1."""
    return max(1, math.ceil(wait))


class LogBudget:
    """At most ``burst`` lines at once and ``rate`` a second after that, for a log line a
    client can cause once per request (a flood of bad requests must not flood the log).
    ``allow(now)``: ``None`` when this line is to be dropped, else how many were dropped
    since the last one written (for the line to say so)."""

    __slots__ = ("bucket", "dropped")

    def __init__(self, rate: float, burst: int) -> None:
        self.bucket = TokenBucket(rate, burst, 0.0)
        self.dropped = 0

    def allow(self, now: float) -> int | None:
        if self.bucket.take(now) > 0.0:
            self.dropped += 1
            return None
        dropped, self.dropped = self.dropped, 0
        return dropped

    def refill(self) -> None:
        """The whole burst again, nothing dropped (a fresh start: tests)."""
        self.bucket.tokens = self.bucket.burst
        self.dropped = 0
