"""The ``ringproxy`` command: run, check, explain, demo, and the remote commands (status,
the rollout actions, events, reload) that call a running proxy's admin API.

Exit codes: 0 success, 1 an invalid config or a failure to start, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.admin.client import DEFAULT_URL
from proxy.config import load_config
from proxy.errors import ConfigError

if TYPE_CHECKING:
    # argparse's (typeshed-only generic) type of ``add_subparsers()``.
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringproxy",
        description="Edge reverse proxy for ring-based progressive delivery.",
    )
    parser.add_argument("--version", action="version", version=f"ringproxy {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="level of the process log on stderr (the access log is separate)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    _add_explain(sub)
    _add_remote(sub)
    demo = sub.add_parser("demo", help="run the proxy in front of two demo upstreams")
    demo.add_argument(
        "--ephemeral", action="store_true",
        help="bind every listener to a free port instead of the ports in demo.yaml",
    )
    return parser


def _add_run(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="serve the proxy with a config file")
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


def _add_explain(sub: Subparsers) -> None:
    explain = sub.add_parser(
        "explain",
        help="print which ring a request would get, and why, without starting a server",
        description="Print the assignment decision for a described request as JSON.",
    )
    explain.add_argument("--config", "-c", required=True, metavar="FILE")
    explain.add_argument("--route", required=True, metavar="NAME")
    explain.add_argument("--header", action="append", default=[], metavar="K=V", type=_pair)
    explain.add_argument("--cookie", action="append", default=[], metavar="K=V", type=_pair)
    explain.add_argument("--query", action="append", default=[], metavar="K=V", type=_pair)
    explain.add_argument("--ip", metavar="ADDR", type=_ip, help="the client address")
    explain.add_argument("--path", default="/", help="request path (default /)")
    explain.add_argument("--method", default="GET", type=str.upper, help="default GET")


def _add_remote(sub: Subparsers) -> None:
    """The commands that call a running proxy's admin API."""

    def remote(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "--admin", default=os.environ.get("RINGPROXY_ADMIN_URL", DEFAULT_URL),
            metavar="URL", help="admin API (default $RINGPROXY_ADMIN_URL or %(default)s)")
        cmd.add_argument(
            "--token", default=os.environ.get("RINGPROXY_ADMIN_TOKEN"),
            help="bearer token (default $RINGPROXY_ADMIN_TOKEN)")
        cmd.add_argument("--json", action="store_true", help="print the API's JSON")
        return cmd

    remote("status", "show every route's rings on a running proxy")
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
    events.add_argument("--since", type=float, metavar="UNIX_TIME")
    remote("reload", "reload the config file now")


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
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "check":
        return _check(args.file)
    if args.command == "run":
        return _run(args.config, watch=not args.no_watch, fresh_state=args.fresh_state)
    if args.command == "explain":
        return _explain(args)
    if args.command == "demo":
        return _demo(args.ephemeral)
    if args.command in REMOTE_COMMANDS:
        return _remote(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        n = len(exc.issues)
        print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    rings = sum(len(r.rings) for r in config.routes)
    print(f"{path}: OK (revision {config.revision}: {len(config.routes)} routes, "
          f"{rings} rings, {len(config.pools)} pools)")
    return 0


REMOTE_COMMANDS = ("status", "promote", "approve", "pause", "resume", "rollback", "weight",
                   "events", "reload")


def _remote(args: argparse.Namespace) -> int:
    from proxy.admin import client as ac
    from proxy.errors import AdminClientError

    client = ac.AdminClient(args.admin, args.token)
    try:
        if args.command == "status":
            data = client.status()
            text = ac.format_status(data)
        elif args.command == "events":
            data = client.events(args.route, args.since)
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
        print(f"ringproxy {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from proxy.routing.assign import StaticRequest, compile_route
    from proxy.routing.explain import explain

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
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
