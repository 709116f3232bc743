"""Micro-benchmark: the cost of one ring decision (pure Python, no I/O).

A route with 4 rings and 10 rules (header, cookie, query, ip/cidr, path, method, regex,
version), a sticky key and two percentage rings; requests are a mix that ends in every
kind of decision.  Reports nanoseconds per decision per mix and overall, best of N runs.

    .venv/bin/python loadtests/assign_bench.py [--number 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import timeit

from multidict import CIMultiDict

from proxy.config import parse_config
from proxy.routing.assign import StaticRequest, assign, compile_route

CONFIG = """
pools: {p: {servers: ["http://127.0.0.1:9"]}}
routes:
  - name: api
    sticky: {key: ["header:X-User-Id", "cookie:uid"]}
    rings:
      - name: internal
        pool: p
        rules:
          - {attr: "header:X-Employee", exists: true}
          - {attr: ip, cidr: ["10.0.0.0/8", "192.168.0.0/16"]}
          - {attr: "cookie:staff", equals: "yes", ignore_case: true}
      - name: beta
        pool: p
        rules:
          - all:
              - {attr: "header:X-App-Version", version_gte: "7.10"}
              - {attr: method, in: [GET, HEAD]}
          - {attr: "query:beta", equals: "1"}
          - {attr: path, prefix: /beta/}
          - {attr: "header:User-Agent", regex: "BetaBot/[0-9]+"}
      - name: canary
        pool: p
        weight: 5
        rules:
          - {attr: "header:X-Canary", in: ["1", "true", "yes"]}
          - {attr: "header:X-Region", not_in: [eu-west-1, eu-central-1]}
      - name: stable
        pool: p
"""


def requests() -> dict[str, StaticRequest]:
    def h(**headers: str) -> CIMultiDict[str]:
        return CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items())

    base = {"remote": "203.0.113.7", "path": "/api/items", "method": "GET"}
    return {
        "first rule": StaticRequest(headers=h(X_Employee="1"), **base),  # type: ignore[arg-type]
        "bucket (no rule matches)": StaticRequest(
            headers=h(X_User_Id="user-42", X_Region="eu-west-1", User_Agent="curl/8"),
            **base,  # type: ignore[arg-type]
        ),
        "version rule": StaticRequest(
            headers=h(X_App_Version="7.12.1", X_Region="eu-west-1"), **base  # type: ignore[arg-type]
        ),
        "default (no key)": StaticRequest(
            headers=h(X_Region="eu-west-1", User_Agent="Mozilla/5.0"), **base  # type: ignore[arg-type]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    config = parse_config(CONFIG, environ={})
    route = compile_route(config.routes[0], config.revision)
    rules = sum(len(g) for ring in config.routes[0].rings for g in ring.rules)
    print(f"route: {len(config.routes[0].rings)} rings, {rules} rules; "
          f"best of {args.repeat} x {args.number:,} decisions")
    total = 0.0
    cases = requests()
    for name, request in cases.items():
        decision = assign(route, request)
        best = min(timeit.repeat(lambda r=request: assign(route, r),
                                 number=args.number, repeat=args.repeat))
        per = best / args.number * 1e9
        total += per
        print(f"  {name:26} -> {decision.ring:9} ({decision.reason.value:7}) {per:8.0f} ns")
    print(f"  {'mean of the mixes':26}    {'':21} {total / len(cases):8.0f} ns")


if __name__ == "__main__":
    main()
