"""The ``workers`` key: read, validated, in the schema; pure (no processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.config.schema import config_schema
from proxy.errors import ConfigError
from proxy.workers.cpus import cgroup_quota, usable_cpus

BASE = """
pools:
  app: {servers: [http://127.0.0.1:9001]}
routes:
  - name: api
    rings: [{name: stable, pool: app}]
"""


def test_workers_default_to_one_and_take_a_number_or_auto() -> None:
    assert parse_config(BASE).workers == 1
    assert parse_config(BASE + "workers: 4\n").workers == 4
    assert parse_config(BASE + "workers: auto\n").workers == usable_cpus()
    assert usable_cpus() <= len(os.sched_getaffinity(0))


def test_auto_counts_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    mine = len(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")  # no quota: the affinity mask
    assert cgroup_quota(cpu_max) is None and usable_cpus(cpu_max) == mine
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: 2 workers
    assert cgroup_quota(cpu_max) == 2 and usable_cpus(cpu_max) == min(mine, 2)
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one
    assert usable_cpus(cpu_max) == 1
    assert cgroup_quota(tmp_path / "absent") is None  # cgroup v1, not Linux


@pytest.mark.parametrize(("value", "message"), [
    ("0", "workers: 0 is outside 1..256"),
    ("257", "workers: 257 is outside 1..256"),
    ("two", "workers: 'two' is not a number of processes; write a whole number 1..256 or "
            "auto (one per CPU)"),
    ("2.5", "workers: expected a whole number, got 2.5"),
    ("true", "workers: expected a whole number, got True"),
])
def test_a_bad_workers_value_names_the_key_and_what_to_write(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f"workers: {value}\n", source="f.yaml")
    assert [i.format("f.yaml") for i in info.value.issues] == [f"f.yaml:7: {message}"]


def test_the_schema_knows_workers() -> None:
    workers = config_schema()["properties"]["workers"]
    assert {"type": "integer", "minimum": 1, "maximum": 256}.items() <= \
        workers["anyOf"][0].items()
    assert workers["anyOf"][1]["const"] == "auto"
