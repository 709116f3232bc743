"""The ``ringproxy`` command: run, check, schema, explain, demo (and demo-ctl), and the
remote commands (status, the rollout actions, events, reload, and ``rings`` / ``pools``
for the Rings API) that call a running proxy's admin API through the SDK
(``proxy.client``).  ``--admin``, ``--token`` and ``--json`` may come before or after the
command.

Exit codes: 0 success, 1 an invalid config or a failure to start, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, NoReturn

from proxy import __version__, compiled, processlog
from proxy.client import DEFAULT_URL, Client
from proxy.config import Config, load_config
from proxy.errors import AdminClientError, ConfigError, ConfigIssue


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as JSON on stdout when the command line asks for JSON
    (exit 2 still; subparsers are of this class too)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print(json.dumps({"error": message, "usage": self.format_usage().strip()}))
            self.exit(2)
        super().error(message)


if TYPE_CHECKING:
    # argparse's (typeshed-only generic) type of ``add_subparsers()``.
    Subparsers = argparse._SubParsersAction[_Parser]


def _common() -> _Parser:
    """The options every command accepts before or after its name.  SUPPRESS as default:
    a value given before the command is not overwritten by the subparser's default."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--admin", default=argparse.SUPPRESS, metavar="URL",
        help=f"admin API (default $RINGPROXY_ADMIN_URL or {DEFAULT_URL})")
    common.add_argument(
        "--token", default=argparse.SUPPRESS,
        help="bearer token (default $RINGPROXY_ADMIN_TOKEN)")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print JSON (errors too, as {\"error\": ...})")
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog="ringproxy", parents=[common],
        description="Edge reverse proxy for ring-based progressive delivery.",
    )
    parser.add_argument("--version", action="version",
                        version=f"ringproxy {__version__} ({compiled.describe()})")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="level of the process log on stderr (the access log is separate)",
    )
    parser.add_argument(
        "--log-format", default=None, choices=("text", "json"),
        help="format of the process log: text lines or one JSON object per line "
        "(default: the config's log_format, else text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub, common)
    check = sub.add_parser("check", parents=[common], help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        "--env-optional", action="store_true",
        help="unset environment variables (${VAR}, admin token env) are warnings, not "
        "errors: check a config without its secrets, e.g. in CI")
    check.add_argument("--format", choices=("text", "json"), default="text",
                       help="text (default) or json (also: --json)")
    sub.add_parser("schema", parents=[common],
                   help="print the JSON Schema of the config file (for editors and CI)")
    _add_explain(sub, common)
    _add_remote(sub, common)
    _add_objects(sub, common)
    demo = sub.add_parser("demo", parents=[common],
                          help="a canary rollout in front of two demo upstreams, on loopback")
    demo.add_argument(
        "--ephemeral", action="store_true",
        help="bind every listener to a free port instead of the ports in demo.yaml",
    )
    ctl = sub.add_parser("demo-ctl", parents=[common],
                         help="break or heal a version of a running `ringproxy demo`")
    ctl.add_argument("action", choices=("break", "heal"))
    ctl.add_argument("version", choices=("canary", "stable"))
    ctl.add_argument("--upstream", metavar="URL",
                     help="the demo upstream's URL (default: its address in demo.yaml)")
    return parser


def _add_run(sub: Subparsers, common: _Parser) -> None:
    run = sub.add_parser("run", parents=[common], help="serve the proxy with a config file")
    run.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML config file")
    run.add_argument(
        "--no-watch", action="store_true",
        help="do not reload when the file changes (SIGHUP still reloads)",
    )
    run.add_argument(
        "--fresh-state", action="store_true",
        help="if the rollout state file is unreadable, set it aside and start fresh "
        "(default: refuse to start)",
    )


def _add_explain(sub: Subparsers, common: _Parser) -> None:
    explain = sub.add_parser(
        "explain", parents=[common],
        help="print which ring a request gets, and why: from a config file, or from a "
        "running proxy (its live weights and rollbacks)",
        description="Print the assignment decision for a described request as JSON: with "
        "--config, what a fresh proxy with that file would do; without, what the running "
        "proxy at --admin does now.",
    )
    explain.add_argument("--config", "-c", metavar="FILE",
                         help="decide from this file (default: ask the proxy at --admin)")
    explain.add_argument("--env-optional", action="store_true",
                         help="with --config: unset environment variables are warnings")
    explain.add_argument("--route", required=True, metavar="NAME")
    explain.add_argument("--header", action="append", default=[], metavar="K=V", type=_pair)
    explain.add_argument("--cookie", action="append", default=[], metavar="K=V", type=_pair)
    explain.add_argument("--query", action="append", default=[], metavar="K=V", type=_pair)
    explain.add_argument("--ip", metavar="ADDR", type=_ip, help="the client address")
    explain.add_argument("--path", default="/", help="request path (default /)")
    explain.add_argument("--method", default="GET", type=str.upper, help="default GET")


def _add_remote(sub: Subparsers, common: _Parser) -> None:
    """The commands that call a running proxy's admin API."""

    def remote(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text)

    status = remote("status", "show every route's rings on a running proxy")
    status.add_argument("--watch", "-w", nargs="?", const=2.0, type=_seconds,
                        metavar="SECONDS", help="show it again every SECONDS (default 2) "
                        "until Ctrl-C")
    for action, text in (("promote", "move a ring to its next step now"),
                         ("approve", "approve the step a ring is waiting for"),
                         ("pause", "stop a ring's progression"),
                         ("resume", "resume a paused or rolled-back ring"),
                         ("rollback", "roll a ring back now")):
        cmd = remote(action, text)
        cmd.add_argument("route")
        cmd.add_argument("ring")
        cmd.add_argument("--reason", default="", help="recorded in the audit trail")
    weight = remote("weight", "set a ring's weight (pauses its progression)")
    weight.add_argument("route")
    weight.add_argument("ring")
    weight.add_argument("percent", type=float)
    weight.add_argument("--reason", default="")
    events = remote("events", "show the audit trail")
    events.add_argument("--route")
    events.add_argument(
        "--since", type=_since, metavar="WHEN",
        help="only later events: a duration back from now (10m, 1h30m), an RFC 3339 time "
        "(2026-01-31T12:00:00Z) or a Unix time")
    remote("reload", "reload the config file now")


def _add_objects(sub: Subparsers, common: _Parser) -> None:
    """``rings`` and ``pools``: the Rings API, what the config file holds (written there)."""
    rings = sub.add_parser("rings", parents=[common],
                           help="list, show, create, update or delete a route's rings "
                           "(in the config file)")
    verbs = rings.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(parent: Subparsers, name: str, text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=[common], help=text)

    def writes(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--if-match", metavar="REVISION",
                         help="only if the file is still at this revision (else HTTP 412)")
        cmd.add_argument("--reason", default="", help="recorded in the audit trail")

    listing = verb(verbs, "list", "a route's rings in order")
    listing.add_argument("route")
    listing.add_argument("--pool", help="only rings sent to this pool")
    listing.add_argument("--phase", help="only rings in this rollout phase")
    active = listing.add_mutually_exclusive_group()
    active.add_argument("--active", dest="active", action="store_const", const=True,
                        help="only rings taking traffic (weight above 0, or rules on)")
    active.add_argument("--inactive", dest="active", action="store_const", const=False)
    get = verb(verbs, "get", "one ring: its spec and status")
    get.add_argument("route")
    get.add_argument("ring")
    for name, text in (("create", "add a ring (before the default ring unless --before)"),
                       ("update", "change a ring (the given keys; --replace: all of it)")):
        cmd = verb(verbs, name, text)
        cmd.add_argument("route")
        cmd.add_argument("ring")
        cmd.add_argument("--pool", required=name == "create",
                         help="the pool its requests go to")
        cmd.add_argument("--weight", type=float, metavar="PERCENT",
                         help="its share of sticky buckets (0.01 steps)")
        cmd.add_argument("--spec", type=_spec, metavar="YAML|@FILE",
                         help="more of the ring, as YAML or JSON (or @FILE holding it), "
                         "e.g. '{rules: [{attr: \"header:X-Beta\", exists: true}]}'")
        if name == "create":
            cmd.add_argument("--before", metavar="RING", help="insert before this ring")
        else:
            cmd.add_argument("--replace", action="store_true",
                             help="the ring becomes exactly what is given (PUT)")
        writes(cmd)
    delete = verb(verbs, "delete", "remove a ring")
    delete.add_argument("route")
    delete.add_argument("ring")
    writes(delete)

    pools = sub.add_parser("pools", parents=[common],
                           help="list, show, create, update or delete upstream pools "
                           "(in the config file; writes need an admin token)")
    verbs = pools.add_subparsers(dest="verb", required=True, metavar="VERB")
    verb(verbs, "list", "every pool and the rings it serves")
    verb(verbs, "get", "one pool").add_argument("pool")
    for name, text in (("create", "add a pool"),
                       ("update", "change a pool (the given keys; --replace: all of it)")):
        cmd = verb(verbs, name, text)
        cmd.add_argument("pool")
        cmd.add_argument("--server", action="append", metavar="URL",
                         required=name == "create", help="http(s)://HOST:PORT, repeatable")
        cmd.add_argument("--spec", type=_spec, metavar="YAML|@FILE",
                         help="more of the pool, e.g. '{balance: least_request}'")
        if name == "update":
            cmd.add_argument("--replace", action="store_true",
                             help="the pool becomes exactly what is given (PUT)")
        writes(cmd)
    delete = verb(verbs, "delete", "remove a pool (no ring may use it)")
    delete.add_argument("pool")
    writes(delete)


def _spec(text: str) -> dict[str, object]:
    """``--spec``: YAML or JSON (JSON is YAML), inline or ``@FILE``."""
    import yaml

    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML or JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a mapping, e.g. '{weight: 5}'")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is outside 0.1..3600 seconds")
    return value


def _since(text: str) -> float:
    """``10m`` (ago), ``2026-01-31T12:00:00Z`` (RFC 3339) or ``1767225600`` -> Unix time."""
    from datetime import datetime

    from proxy.config.values import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time; expected a duration back from now (10m, 1h30m), an "
            "RFC 3339 time with its offset (2026-01-31T12:00:00Z) or a Unix time")
    return when.timestamp()


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `ringproxy status | head`: the reader left; say nothing more (Python's advice:
        # point stdout at devnull so the interpreter's final flush cannot fail again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = "--json" in words or "--format=json" in words or any(
        pair == ("--format", "json") for pair in itertools.pairwise(words))
    args = _parser().parse_args(words)
    args.admin = getattr(args, "admin", None) or os.environ.get("RINGPROXY_ADMIN_URL",
                                                                 DEFAULT_URL)
    args.token = getattr(args, "token", None) or os.environ.get("RINGPROXY_ADMIN_TOKEN")
    args.json = getattr(args, "json", False)
    processlog.setup(args.log_level, args.log_format)
    if args.command == "check":
        return _check(args.file, args.env_optional, "json" if args.json else args.format)
    if args.command == "schema":
        from proxy.config.schema import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0
    if args.command == "run":
        return _run(args.config, watch=not args.no_watch, fresh_state=args.fresh_state)
    if args.command == "explain":
        if args.config is None:
            return _remote(args)
        return _explain(args)
    if args.command == "demo":
        return _demo(args.ephemeral)
    if args.command == "demo-ctl":
        return _demo_ctl(args)
    if args.command in REMOTE_COMMANDS:
        return _remote(args)
    if args.command in ("rings", "pools"):
        return _objects(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


# Stand-ins for unset variables under --env-optional, tried in turn where one does not fit
# its place: a token's length, distinct per variable (tokens must differ); then a URL (an
# upstream or webhook from the environment).
_PLACEHOLDERS = ("placeholder-for-{}", "http://placeholder-for-{}.invalid:1")


def _load(path: str, env_optional: bool
          ) -> tuple[Config | None, list[ConfigIssue], list[ConfigIssue]]:
    """(config, errors, warnings).  With ``env_optional``, unset variables are warnings: the
    file is read again with placeholders for them, and issues left at the paths they fill
    are not reported."""
    from proxy.config.source import unset_variable

    config: Config | None = None
    errors: list[ConfigIssue] = []
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors = exc.issues
    unset = [i for i in errors if unset_variable(i)] if env_optional else []
    if not unset:
        return config, errors, []
    names = {i.path: name for i in unset if (name := unset_variable(i))}
    choice = dict.fromkeys(names.values(), 0)
    for _ in _PLACEHOLDERS:
        filled = {n: _PLACEHOLDERS[c].format(n.lower().replace("_", "-"))
                  for n, c in choice.items()}
        try:
            return load_config(path, environ={**os.environ, **filled}), [], unset
        except ConfigError as exc:
            config = None
            errors = [i for i in exc.issues if i.path not in names]
            misfits = {names[i.path] for i in exc.issues if i.path in names}
            if not misfits:
                break
            for name in misfits:
                choice[name] = min(choice[name] + 1, len(_PLACEHOLDERS) - 1)
    return config, errors, unset


def _check(path: str, env_optional: bool = False, output: str = "text") -> int:
    config, errors, warnings = _load(path, env_optional)
    if config is not None and not errors:
        errors = _check_promql(path, config)
    if output == "json":
        print(json.dumps(_check_report(path, config, errors, warnings), indent=2))
        return 1 if errors else 0
    for issue in warnings:
        print(f"{issue.format(path)} (a warning: --env-optional)", file=sys.stderr)
    if errors:
        for issue in errors:
            print(issue.format(path), file=sys.stderr)
        n = len(errors)
        print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    notes = f", {len(warnings)} unset variable{'s' if len(warnings) != 1 else ''}" \
        if warnings else ""
    if config is None:
        print(f"{path}: OK{notes} (the values they fill are not checked)")
        return 0
    rings = sum(len(r.rings) for r in config.routes)
    print(f"{path}: OK (revision {config.revision}: {len(config.routes)} routes, "
          f"{rings} rings, {len(config.pools)} pools{notes})")
    return 0


def _check_promql(path: str, config: Config) -> list[ConfigIssue]:
    """The Prometheus checks' queries that promtool cannot parse (when it is installed),
    with their lines; a note on stderr when it is not."""
    from dataclasses import replace

    from proxy.checks.promql import queries, validate
    from proxy.config.source import load_yaml

    issues = validate(config)
    if issues is None:
        if queries(config):
            print(f"{path}: promtool not found: the PromQL of the Prometheus checks is not "
                  "parsed (install Prometheus's promtool to check it)", file=sys.stderr)
        return []
    if issues:
        from pathlib import Path

        lines = load_yaml(Path(path).read_text(encoding="utf-8"), os.environ).lines
        issues = [replace(i, line=lines.get(i.path)) for i in issues]
    return issues


def _issue_json(issue: ConfigIssue) -> dict[str, object]:
    column = re.match(r"YAML syntax error at column (\d+):", issue.message)
    return {"line": issue.line, "column": int(column.group(1)) if column else None,
            "path": issue.path, "message": issue.message}


def _check_report(path: str, config: Config | None, errors: list[ConfigIssue],
                  warnings: list[ConfigIssue]) -> dict[str, object]:
    from proxy.config.source import unset_variable

    report: dict[str, object] = {"file": path, "ok": not errors}
    if config is not None and not errors:
        report.update(revision=config.revision, routes=len(config.routes),
                      rings=sum(len(r.rings) for r in config.routes), pools=len(config.pools))
    report["errors"] = [_issue_json(i) for i in errors]
    report["warnings"] = [{**_issue_json(i), "variable": unset_variable(i)} for i in warnings]
    return report


REMOTE_COMMANDS = ("status", "promote", "approve", "pause", "resume", "rollback", "weight",
                   "events", "reload")


def _fail(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"error": message, "command": args.command}))
    else:
        print(f"ringproxy {args.command}: {message}", file=sys.stderr)
    return 1


def _remote(args: argparse.Namespace) -> int:
    from proxy.admin import client as ac

    client = Client(args.admin, args.token)
    try:
        if args.command == "status" and args.watch:
            return _watch(args, client)
        if args.command == "status":
            data = client.status()
            text = ac.format_status(data)
        elif args.command == "explain":
            data = client.explain(args.route, headers=args.header, cookies=args.cookie,
                                  query=args.query, ip=args.ip, path=args.path,
                                  method=args.method)
            text = json.dumps(data, indent=2)
        elif args.command == "events":
            data = {"events": client.events(args.route, args.since)}
            text = ac.format_events(data)
        elif args.command == "reload":
            data = client.reload()
            text = (f"reloaded: revision {data['revision']}" if data["changed"]
                    else f"unchanged: revision {data['revision']}")
        else:
            body: dict[str, object] = {"reason": args.reason}
            if args.command == "weight":
                body["weight"] = args.percent
            data = client.act(args.route, args.ring, args.command, body)
            text = ac.format_action(data)
    except AdminClientError as exc:
        return _fail(args, str(exc))
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _objects(args: argparse.Namespace) -> int:
    """``rings`` and ``pools``, through the SDK."""
    from proxy.admin import client as ac

    client = Client(args.admin, args.token)
    data: object
    try:
        if args.command == "rings":
            data, text = _rings(args, client)
        else:
            data, text = _pools(args, client)
    except AdminClientError as exc:
        return _fail(args, str(exc))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text if text is not None else ac.format_written(
            f"{args.verb} {_what(args)}", data if isinstance(data, dict) else {}))
    return 0


def _what(args: argparse.Namespace) -> str:
    return f"ring {args.route}/{args.ring}" if args.command == "rings" else f"pool {args.pool}"


def _changes(args: argparse.Namespace, **given: object) -> dict[str, object]:
    """The options given, then the rest of ``--spec`` (an option wins over ``--spec``)."""
    spec = {k: v for k, v in given.items() if v is not None}
    for key, value in (args.spec or {}).items():
        spec.setdefault(key, value)
    return spec


def _rings(args: argparse.Namespace, client: Client) -> tuple[object, str | None]:
    from proxy.admin import client as ac

    if args.verb == "list":
        rings = client.rings.list(args.route, pool=args.pool, phase=args.phase,
                                  active=args.active)
        return {"rings": rings}, ac.format_rings([dict(r) for r in rings])
    if args.verb == "get":
        ring = client.rings.get(args.route, args.ring)
        return ring, ac.format_resource("ring", dict(ring))
    if args.verb == "delete":
        return client.rings.delete(args.route, args.ring, args.if_match, args.reason), None
    weight = int(args.weight) if args.weight is not None and args.weight.is_integer() \
        else args.weight
    spec = _changes(args, pool=args.pool, weight=weight)
    if args.verb == "create":
        ring = client.rings.create(args.route, {"name": args.ring, **spec}, args.before,
                                   args.if_match, args.reason)
        return ring, f"created ring {args.route}/{args.ring} at position " \
                     f"{ring['position']} (revision {ring['revision']})"
    if not spec:
        raise AdminClientError("nothing to change: give --pool, --weight or --spec")
    return client.rings.update(args.route, args.ring, spec, args.if_match, args.replace,
                               args.reason), None


def _pools(args: argparse.Namespace, client: Client) -> tuple[object, str | None]:
    from proxy.admin import client as ac

    if args.verb == "list":
        pools = client.pools.list()
        return {"pools": pools}, ac.format_pools([dict(p) for p in pools])
    if args.verb == "get":
        pool = client.pools.get(args.pool)
        return pool, ac.format_resource("pool", dict(pool))
    if args.verb == "delete":
        return client.pools.delete(args.pool, args.if_match, args.reason), None
    spec = _changes(args, servers=args.server)
    if args.verb == "create":
        pool = client.pools.create(args.pool, spec, args.if_match, args.reason)
        return pool, f"created pool {args.pool} (revision {pool['revision']})"
    if not spec:
        raise AdminClientError("nothing to change: give --server or --spec")
    return client.pools.update(args.pool, spec, args.if_match, args.replace, args.reason), None


def _watch(args: argparse.Namespace, client: Client) -> int:
    """``status --watch``: the table again every few seconds, in place on a terminal."""
    from proxy.admin import client as ac

    clear = sys.stdout.isatty()
    try:
        while True:
            # A proxy that restarts or is briefly unreachable shows as a line, and the
            # watch goes on (as watch(1) would).
            try:
                data = client.status()
                shown = json.dumps(data) if args.json else ac.format_status(data)
            except AdminClientError as exc:
                shown = json.dumps({"error": str(exc)}) if args.json else f"error: {exc}"
            stamp = time.strftime("%H:%M:%S")
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(shown if args.json else f"{stamp}  {args.admin}  (Ctrl-C to stop)\n{shown}\n",
                  flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _demo_ctl(args: argparse.Namespace) -> int:
    from proxy.admin.client import post_json
    from proxy.demo.run import demo_config

    url = args.upstream
    if url is None:
        pool = next(p for p in demo_config().pools if p.name == args.version)
        url = pool.servers[0].url
    try:
        answer = post_json(url.rstrip("/") + f"/demo/{args.action}")
    except AdminClientError as exc:
        return _fail(args, f"{exc} (is `ringproxy demo` running? with --ephemeral, use the "
                     "--upstream it printed)")
    if args.json:
        print(json.dumps(answer))
    else:
        state = "broken" if answer.get("broken") else "healthy"
        print(f"{answer.get('version', args.version)} at {url} is now {state}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from proxy.routing.assign import StaticRequest, compile_route
    from proxy.routing.explain import explain

    config, errors, warnings = _load(args.config, args.env_optional)
    for issue in warnings:
        print(f"{issue.format(args.config)} (a warning: --env-optional)", file=sys.stderr)
    if errors or config is None:
        print(ConfigError(errors, args.config), file=sys.stderr)
        return 1
    route = next((r for r in config.routes if r.name == args.route), None)
    if route is None:
        names = ", ".join(r.name for r in config.routes)
        print(f"ringproxy explain: unknown route {args.route!r} (routes: {names})",
              file=sys.stderr)
        return 2
    request = StaticRequest(
        headers={k.lower(): v for k, v in args.header}, cookies=dict(args.cookie),
        query=dict(args.query), remote=args.ip, path=args.path, method=args.method,
    )
    # The configured weights: the file says what a fresh proxy would do (the API's explain
    # answers with the live weights of a running one).
    print(json.dumps(explain(compile_route(route, config.revision), request), indent=2))
    return 0


def _run(path: str, watch: bool = True, fresh_state: bool = False) -> int:
    from proxy.server import serve

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return _serve_guarded(lambda: serve(config, watch=watch, fresh_state=fresh_state))


def _demo(ephemeral: bool) -> int:
    from proxy.demo.run import run_demo

    return _serve_guarded(lambda: run_demo(ephemeral))


def _serve_guarded(main: Callable[[], Coroutine[object, object, None]]) -> int:
    from proxy.errors import StateError
    from proxy.server import run

    try:
        run(main)
    except StateError as exc:
        print(f"ringproxy: {exc}; fix or remove it, or start with --fresh-state",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ringproxy: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 1
    return 0
