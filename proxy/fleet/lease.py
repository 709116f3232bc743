"""Leader election: one lease in Redis, taken with ``SET NX PX`` and renewed by its holder.

Every member calls ``Lease.renew`` every ``lease / 3`` seconds: a free lease is taken with a
new fencing token (``INCR``, so tokens only grow), the holder's is extended if its token is
still the current one.  The holder counts itself the leader only while its last renewal is
younger than the lease less one renewal interval (it stops a third of a lease before Redis
would let another member in); a failed or refused renewal ends its leadership at once.
Its writes carry the token and Redis refuses them once another lease was taken
(``store.WRITE``), so even a leader that stalled past its lease cannot write: never a
split brain.  A member that dies holding the lease is replaced within one lease plus one
renewal interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.fleet.store import Store


class Lease:
    """This member's view of the lease: whether it leads, and with which token."""

    def __init__(self, store: Store, member: str, seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.member, self.seconds, self.clock = store, member, seconds, clock
        self.token = 0  # the token of the lease held, 0 when not the leader
        self._until = 0.0  # on ``clock``: when this member stops counting itself leader

    @property
    def every(self) -> float:
        """Seconds between renewals."""
        return self.seconds / 3

    @property
    def leading(self) -> bool:
        return self.token > 0 and self.clock() < self._until

    async def renew(self) -> bool:
        """Take or extend the lease; whether this member leads now.  Redis errors raise
        (the caller counts the member cut off) after ending the leadership."""
        asked = self.clock()
        try:
            token = await self.store.lead(self.member, self.seconds, self.token)
        except BaseException:
            self.lost()
            raise
        if token <= 0:
            self.lost()
            return False
        self.token = token
        self._until = asked + self.seconds - self.every
        return True

    def lost(self) -> None:
        self.token, self._until = 0, 0.0

    async def resign(self) -> None:
        """Let the lease go (a clean stop), so another member leads without waiting."""
        token, self.token = self.token, 0
        if token:
            await self.store.resign(self.member, token)
