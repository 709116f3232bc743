"""A log-linear latency histogram with a bounded relative error, for the analysis.

Pure: standard library only.  The Prometheus buckets (16 of them, for dashboards) cannot
tell 200 ms from 245 ms; the judge needs quantiles and "how many were slower than t" with
a few per cent of error, over the whole range a request can take.

Bucket i holds the values in (LOW * GAMMA^(i-1), LOW * GAMMA^i]; reporting a bucket by
2 LOW GAMMA^i / (1 + GAMMA) is then within (GAMMA - 1) / (GAMMA + 1) = 1.96 % of every value
in it (the DDSketch construction: Masson, Rim, Lee, "DDSketch: a fast and fully-mergeable
quantile sketch with relative-error guarantees", VLDB 2019).  Values at or below LOW share
bucket 0, values above the top edge the last bucket.  A sketch is a fixed list of counts:
recording is one logarithm and an increment, merging adds counts (for several processes).
``proxy.rollout.evidence`` keeps the counts (``Tally``, ``Evidence``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

GAMMA = 1.04
LOW = 1e-5  # 10 microseconds: below anything a proxied request takes
HIGH = 3600.0  # an hour: the last bucket holds everything slower
_LOG_GAMMA = math.log(GAMMA)
SIZE = math.ceil(math.log(HIGH / LOW) / _LOG_GAMMA) + 1
RELATIVE_ERROR = (GAMMA - 1) / (GAMMA + 1)


def index_of(seconds: float) -> int:
    """The bucket of a value: the smallest i with value <= LOW * GAMMA^i."""
    if seconds <= LOW:
        return 0
    i = math.ceil(math.log(seconds / LOW) / _LOG_GAMMA - 1e-9)
    return i if i < SIZE else SIZE - 1


def upper_edge(index: int) -> float:
    return LOW * GAMMA ** index


def representative(index: int) -> float:
    return 2 * upper_edge(index) / (1 + GAMMA)


def slower_than(counts: Sequence[int], index: int) -> int:
    """How many values of a bucket list lie above bucket ``index``'s upper edge."""
    return sum(counts[max(0, index + 1):])


def quantile_index(counts: Sequence[int], q: float) -> int | None:
    """The bucket of the q-quantile: the first bucket where the count reaches ceil(q n)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} must be between 0 and 1")
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            return i
    return len(counts) - 1  # pragma: no cover - the counts add up to total
