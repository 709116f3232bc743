"""Parsers for the small value types of the config: durations, sizes, addresses, URLs, names.

Each returns the parsed value or raises ``ValueError`` with a message that says what was
expected; the config reader adds the path.  No I/O, no DNS.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Sizes: binary units only.  "KB" means 1000 to some readers and 1024 to others (NGINX's
# "k" is 1024); refusing it costs one edit, guessing wrong costs a limit off by 2.4 %.
_SIZE_RE = re.compile(r"^(\d+)\s*(b|kib|mib|gib)$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_SIZE_FORMS = "a whole number of bytes, or with a binary unit: 512B, 64KiB, 8 KiB, 10MiB, 1GiB"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# RFC 9110 token: what a header field name may be.
TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _describe(value: object) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def parse_duration(value: object) -> float:
    """``"250ms" | "30s" | "5m" | "1h" | "1m30s"`` -> seconds.  Bare numbers are refused:
    units matter.  A composite names each unit once, largest first (``1h30m``, as Go)."""
    if isinstance(value, str) and _DURATION_RE.match(value.strip()):
        parts = _DURATION_PART.findall(value.strip())
        order = [list(_UNITS).index(unit) for _, unit in parts]
        if len(parts) == 1 or order == sorted(set(order), reverse=True):
            return sum(float(n) * _UNITS[unit] for n, unit in parts)
    raise ValueError(
        f"{_describe(value)} is not a duration; expected e.g. 250ms, 30s, 5m, 1h or 7d"
    )


def parse_size(value: object) -> int:
    """Bytes: ``65536 | "64KiB" | "64 KiB" | "10MiB" | "1GiB" | "512B"``; never negative.

    Only binary units (KiB = 1024 bytes): ``KB``/``MB``/``GB`` and NGINX's ``k``/``m`` are
    refused with the forms that are accepted, since readers disagree on what they mean.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative; expected {_SIZE_FORMS}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if re.match(r"^\d+(\.\d+)?\s*[kmgt]i?b?$", value.strip(), re.IGNORECASE):
            raise ValueError(
                f"{value!r} is not a size; expected {_SIZE_FORMS} (KiB/MiB/GiB are 1024-based; "
                "KB/MB/GB, k/m/g and fractions are not accepted)"
            )
    raise ValueError(f"{_describe(value)} is not a size; expected {_SIZE_FORMS}")


def format_size(size: int) -> str:
    """The shortest exact binary form: ``65536`` -> ``64KiB``, ``1000`` -> ``1000B``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_weight(value: object) -> int:
    """A percentage with 0.01 resolution -> basis points: ``5`` -> 500, ``0.25`` -> 25."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_describe(value)} is not a percentage; expected a number from 0 to 100")
    if not 0 <= value <= 100:
        raise ValueError(f"{value} is outside 0..100 (percent)")
    basis_points = round(value * 100)
    if abs(basis_points - value * 100) > 1e-6:
        raise ValueError(f"{value} has more than two decimals; the resolution is 0.01 %")
    return basis_points


@dataclass(frozen=True, slots=True)
class Listen:
    """An address to bind: ``host:port``; ``[v6]:port`` for IPv6; port 0 picks a free one."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: object) -> Listen:
    expected = "expected HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{_describe(value)} is not an address; {expected}")
    host, _, port_s = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. [::1]:8080")
    if not host:
        raise ValueError(f"{value!r} has no host; {expected} (0.0.0.0 for every interface)")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{value!r}: port {port_s!r} is not a number in 0..65535")
    return Listen(host, int(port_s))


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream server, parsed once at load: the request path never re-parses it."""

    url: str  # normalized "scheme://host:port"
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return self.url


def parse_upstream(value: object) -> Upstream:
    expected = "expected http://HOST:PORT or https://HOST:PORT"
    if not isinstance(value, str):
        raise ValueError(f"{_describe(value)} is not a URL; {expected}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL ({exc}); {expected}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r}: scheme must be http or https; {expected}")
    if parts.username or parts.password:
        raise ValueError(f"{value!r}: credentials in the URL are not allowed")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"{value!r}: a server URL has no path, query or fragment "
            "(the request's own path and query are sent)"
        )
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{value!r} has no host; {expected}")
    if ":" in host:
        ipaddress.IPv6Address(host)  # raises ValueError with a clear message
    elif not _HOSTNAME_RE.match(host):
        raise ValueError(f"{value!r}: {host!r} is not a valid host name")
    if port == 0:
        raise ValueError(f"{value!r}: port 0 is not a server port")
    port = port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return Upstream(f"{parts.scheme}://{shown}:{port}", parts.scheme, host, port)


def parse_host_pattern(value: object) -> str:
    """A route's host: exact (``api.example.com``) or one leading wildcard (``*.example.com``)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_describe(value)} is not a host name")
    host = value.lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if not (_HOSTNAME_RE.match(bare) or _is_ip(bare)):
        raise ValueError(
            f"{value!r} is not a host name; expected e.g. api.example.com or *.example.com"
        )
    return host


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True
