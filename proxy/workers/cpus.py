"""How many CPUs this process may use: what ``workers: auto`` starts one worker for.

``os.cpu_count()`` is the machine's count, not this process's share: a container limited
to 2 CPUs on a 64-core host would start 64 workers that the kernel then throttles.  The
share is the smaller of the CPUs in the scheduler affinity mask (``taskset``, cpusets:
``os.sched_getaffinity``) and the cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``:
``QUOTA PERIOD``, rounded up; ``max``: no quota), and at least 1.  cgroup v1 quotas are
not read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_quota(path: Path = CPU_MAX) -> int | None:
    """CPUs allowed by the cgroup v2 quota in ``path`` (None: no quota, or no such file)."""
    try:
        quota, _, period = path.read_text().strip().partition(" ")
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period or "100000")))
    except (OSError, ValueError):
        return None


def usable_cpus(path: Path = CPU_MAX) -> int:
    """The CPUs this process may run on (see the module)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    quota = cgroup_quota(path)
    return max(1, min(count, quota) if quota is not None else count)
