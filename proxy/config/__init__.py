"""The config: one YAML file read into a frozen, validated model.  Pure: no I/O but reading
the file (and the certificate files ``listen_tls`` names, to refuse a bad pair at load).

``source`` (YAML with lines and ``${VAR}``), ``reader`` (the collecting reader), ``values``
(durations, sizes, addresses, URLs), ``rules``, ``assignment``, ``rollout``, ``admin`` and
``limits`` (each area's settings), ``model`` (the whole file), ``load`` (reading and
validating it).
"""

from __future__ import annotations

from proxy.config.limits import Limits, ListenTLS
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
    "Limits",
    "ListenTLS",
    "Metrics",
    "Policy",
    "Pool",
    "Ring",
    "Route",
    "load_config",
    "parse_config",
]
