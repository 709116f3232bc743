"""The config: one YAML file read into a frozen, validated model.  Pure: no I/O but reading
the file.

``source`` (YAML with lines and ``${VAR}``), ``reader`` (the collecting reader), ``values``
(durations, addresses, URLs), ``rules``, ``assignment``, ``rollout`` and ``admin`` (each
area's settings), ``model`` (the whole file), ``load`` (reading and validating it).
"""

from __future__ import annotations

from proxy.config.load import load_config, parse_config
from proxy.config.model import (
    AccessLog,
    Balance,
    Config,
    Metrics,
    Policy,
    Pool,
    Ring,
    Route,
)

__all__ = [
    "AccessLog",
    "Balance",
    "Config",
    "Metrics",
    "Policy",
    "Pool",
    "Ring",
    "Route",
    "load_config",
    "parse_config",
]
