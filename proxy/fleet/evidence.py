"""The members' published evidence and the leader's merged view of it.  Pure.

Every member publishes, about every ``PUBLISH_EVERY`` seconds, the cumulative ``Tally`` of
each of its rings (requests, errors, the latency sketch's counts: ``proxy.rollout.evidence``)
as one JSON document under its member id, with its boot id (new at every start), a sequence
number (one more per document) and, per ring, the fingerprint of the ring's config it
serves (and its step, for the eye), and a generation (new whenever the process starts a new
tally for the ring, e.g. its pool changed, or serves another config of it).  The leader
adds up the entries of the fingerprint its own state of the ring has (``Key``), so during a
rolling config change a version is never judged on traffic another config of the ring
served: the sketch is mergeable by adding counts, so the fleet's evidence is exactly the
sum of its members' of that config.

The merged totals never go down, which the judge's step snapshots rely on (it reads
differences of cumulative totals):

- a member that restarts (new boot id), or whose ring's tally starts over (new generation),
  or whose ring is gone from its document: its previous totals for that ring move into a
  retired base, which stays in the sum;
- a member that vanishes (its document not refreshed for ``STALE_AFTER`` by the leader's
  own clock: ``Seen``, so a skewed clock never hides nor drops a member): its last totals
  stay in the sum (moved to the retired base), and are remembered (boot, generation,
  totals, up to ``GONE_KEPT`` members): if it comes back with the same boot, only what it
  served since is added (its history is never counted twice).

A merge is per leader: a new leader starts from what is published then, and its judge's
evidence starts at its first look (as after a restart of a single process).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.sketch import SIZE

PUBLISH_EVERY = 0.25  # seconds between a member's publications
STALE_AFTER = 30.0  # seconds: a document not refreshed for this long is removed from Redis

GONE_KEPT = 1000  # departed members remembered (oldest forgotten first)

Key = tuple[str, str, str]  # (route, ring, the fingerprint of the ring's config)
_ZERO = (0,) * SIZE


@dataclass(frozen=True, slots=True)
class Published:
    """One member's document: its boot, when it wrote it (its clock: for the eye only), its
    sequence number, and per ring (generation, totals) and the step it serves."""

    boot: str
    at: float
    rings: Mapping[Key, tuple[int, Evidence]]
    seq: int = 0
    steps: Mapping[Key, int | None] = field(default_factory=dict)


def encode(boot: str, at: float, rings: Mapping[Key, tuple[int, Evidence]], seq: int = 0,
           steps: Mapping[Key, int | None] | None = None) -> str:
    """A member's document; the latency counts sparse (index -> count, non-zero only)."""
    steps = steps or {}
    return json.dumps({
        "boot": boot, "at": at, "seq": seq,
        "rings": [[route, ring, gen, ev.requests, ev.errors,
                   {str(i): c for i, c in enumerate(ev.latency) if c}, fingerprint,
                   steps.get((route, ring, fingerprint))]
                  for (route, ring, fingerprint), (gen, ev) in rings.items()],
    }, separators=(",", ":"))


def decode(body: bytes | str) -> Published:
    """A member's document; ValueError naming what is wrong (a document is input)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    boot, at, items = data.get("boot"), data.get("at"), data.get("rings")
    seq = data.get("seq", 0)
    if not isinstance(boot, str) or not isinstance(at, int | float) or not isinstance(
            items, list) or not _count(seq):
        raise ValueError("boot (string), at (number), seq (count) and rings (list) are "
                         "required")
    rings: dict[Key, tuple[int, Evidence]] = {}
    steps: dict[Key, int | None] = {}
    for item in items:
        if not (isinstance(item, list) and len(item) in (6, 8)):
            raise ValueError(f"a ring entry must be [route, ring, gen, requests, errors, "
                             f"latency, fingerprint, step], got {item!r:.80}")
        # An earlier version's entry (6 values) has no fingerprint: never merged.
        route, ring, gen, requests, errors, sparse, fingerprint, step = (
            item if len(item) == 8 else [*item, "", None])
        if not (isinstance(route, str) and isinstance(ring, str) and _count(gen)
                and _count(requests) and _count(errors) and isinstance(sparse, dict)
                and isinstance(fingerprint, str) and (step is None or _count(step))):
            raise ValueError(f"ring entry {item!r:.80} has a value of the wrong type")
        latency = [0] * SIZE
        for index, count in sparse.items():
            if not (isinstance(index, str) and index.isdigit() and int(index) < SIZE
                    and _count(count)):
                raise ValueError(f"latency bucket {index!r}: {count!r} is not a count")
            latency[int(index)] = count
        rings[route, ring, fingerprint] = (gen, Evidence(requests, errors, tuple(latency)))
        steps[route, ring, fingerprint] = step
    return Published(boot, float(at), rings, seq, steps)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def add(a: Evidence, b: Evidence) -> Evidence:
    return Evidence(a.requests + b.requests, a.errors + b.errors,
                    tuple(x + y for x, y in zip(a.latency, b.latency, strict=True)))


def subtract(a: Evidence, b: Evidence) -> Evidence:
    """``a - b`` for cumulative totals ``a`` taken after ``b`` (never below zero)."""
    return Evidence(max(0, a.requests - b.requests), max(0, a.errors - b.errors),
                    tuple(max(0, x - y) for x, y in zip(a.latency, b.latency, strict=True)))


class Seen:
    """When the leader last saw each member's document change, by the leader's own clock
    (``now``: monotonic seconds), so staleness never depends on the members' clocks."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[tuple[str, int, float], float]] = {}

    def saw(self, member: str, doc: Published, now: float) -> None:
        mark = (doc.boot, doc.seq, doc.at)
        held = self.marks.get(member)
        if held is None or held[0] != mark:
            self.marks[member] = (mark, now)

    def stale(self, now: float, after: float = STALE_AFTER) -> list[str]:
        """Members whose document has not changed for ``after`` seconds (forgotten here)."""
        old = [m for m, (_, since) in self.marks.items() if now - since > after]
        for member in old:
            del self.marks[member]
        return old


class Merger:
    """The leader's sum over members, robust to restarts and departures (see the module)."""

    def __init__(self) -> None:
        self.members: dict[str, Published] = {}
        self.retired: dict[Key, Evidence] = {}
        self.gone: dict[str, Published] = {}  # forgotten members' last documents

    def update(self, published: Mapping[str, Published]) -> None:
        """Take the members' documents read now; members not in it stay counted."""
        for member, new in published.items():
            old = self.members.get(member)
            if old is None:
                back = self.gone.pop(member, None)
                if back is not None and back.boot == new.boot:
                    # Back after being forgotten, same boot: its totals of the same
                    # generation go on from the retired ones (counted once).
                    for key, (gen, totals) in back.rings.items():
                        now = new.rings.get(key)
                        if now is not None and now[0] == gen:
                            self.retired[key] = subtract(self.retired[key], totals)
            elif old is not new:
                for key, (gen, totals) in old.rings.items():
                    now = new.rings.get(key)
                    if old.boot != new.boot or now is None or now[0] != gen:
                        self._retire(key, totals)
            self.members[member] = new

    def forget(self, members: Iterable[str]) -> None:
        """Members whose documents were removed: their last totals stay counted."""
        for member in members:
            gone = self.members.pop(member, None)
            if gone is not None:
                for key, (_, totals) in gone.rings.items():
                    self._retire(key, totals)
                self.gone[member] = gone
                while len(self.gone) > GONE_KEPT:
                    del self.gone[next(iter(self.gone))]

    def _retire(self, key: Key, totals: Evidence) -> None:
        base = self.retired.get(key)
        self.retired[key] = totals if base is None else add(base, totals)

    def total(self, key: Key) -> Evidence:
        """The fleet's cumulative evidence of one ring (never less than before)."""
        requests, errors = 0, 0
        latency = list(_ZERO)
        parts = [self.retired.get(key)]
        parts.extend(p.rings[key][1] for p in self.members.values() if key in p.rings)
        for part in parts:
            if part is None:
                continue
            requests += part.requests
            errors += part.errors
            for i, c in enumerate(part.latency):
                if c:
                    latency[i] += c
        return Evidence(requests, errors, tuple(latency))

    def keys(self) -> set[Key]:
        out = set(self.retired)
        for p in self.members.values():
            out.update(p.rings)
        return out


class MergedTallies:
    """One ``Tally`` per ring holding the fleet's totals: the same object for the life of
    the leadership, so the controller's evidence snapshots (``proxy.control.looks``, which
    compare tallies by identity) stay valid between merges."""

    def __init__(self) -> None:
        self.tallies: dict[Key, Tally] = {}

    def refresh(self, merger: Merger) -> None:
        for key in merger.keys() | set(self.tallies):
            total = merger.total(key)
            tally = self.tallies.get(key)
            if tally is None:
                tally = self.tallies[key] = Tally()
            tally.requests, tally.errors = total.requests, total.errors
            tally.latency = list(total.latency)

    def get(self, key: Key) -> Tally:
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = Tally()
        return tally
