"""``ringproxy check``'s PromQL validation: every Prometheus check's query, parsed by
``promtool`` when it is installed (Prometheus's own parser; none is reimplemented here).

The placeholders are filled with a sample ring, route and pool (names are plain words, so
a query that parses with them parses with any), the queries go into one rules file as
recording rules (one group each), and ``promtool check rules`` parses them.  Its
messages come back as config issues at the query's key path.  Without ``promtool`` on
the PATH nothing is checked and ``validate`` says so (``None``); ``promtool`` has
``PROMTOOL_TIMEOUT`` seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from proxy.config import Config
from proxy.config.checks import fill
from proxy.errors import ConfigIssue

PROMTOOL_TIMEOUT = 30.0
_FAILED = re.compile(r'group "q(\d+)", rule \d+, "[^"]*": (.*)$')


def queries(config: Config) -> list[tuple[str, str]]:
    """(key path, query with sample values) of every Prometheus check of ``config``."""
    found = []
    for i, route in enumerate(config.routes):
        if route.analysis is None:
            continue
        for j, check in enumerate(route.analysis.checks):
            if check.prometheus is not None:
                where = f"routes[{i}].analysis.checks[{j}].prometheus.query"
                found.append((where, fill(check.prometheus.query, "ring", "route", "pool")))
    return found


def validate(config: Config, promtool: str | None = None) -> list[ConfigIssue] | None:
    """The queries that do not parse (None: promtool is not installed, nothing checked)."""
    tool = promtool or shutil.which("promtool")
    found = queries(config)
    if tool is None:
        return None
    if not found:
        return []
    rules = {"groups": [{"name": f"q{n}", "rules": [{"record": "ringproxy_check",
                                                      "expr": query}]}
                        for n, (_, query) in enumerate(found)]}
    with tempfile.TemporaryDirectory(prefix="ringproxy-promql-") as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(json.dumps(rules))  # JSON is YAML
        try:
            done = subprocess.run([tool, "check", "rules", str(path)], capture_output=True,
                                  text=True, timeout=PROMTOOL_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [ConfigIssue(found[0][0], f"promtool could not run: {exc}", None)]
    if done.returncode == 0:
        return []
    issues = []
    for line in (done.stdout + done.stderr).splitlines():
        m = _FAILED.search(line)
        if m and int(m.group(1)) < len(found):
            where = found[int(m.group(1))][0]
            issues.append(ConfigIssue(where, f"PromQL does not parse (promtool): "
                                      f"{m.group(2)}", None))
    if not issues:
        text = (done.stdout + done.stderr).strip().splitlines()
        issues.append(ConfigIssue(found[0][0], "promtool rejected the queries: "
                                  + (text[-1] if text else f"exit {done.returncode}"), None))
    return issues
