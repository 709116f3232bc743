"""A token bucket: a ring's ``policy.rate_limit``, per process.  Pure: the clock is passed in.

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
