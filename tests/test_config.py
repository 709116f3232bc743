"""Config parsing and validation: pure, no sockets."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config import (
    AccessLog,
    Balance,
    Config,
    Metrics,
    Pool,
    Ring,
    Route,
    load_config,
    parse_config,
)
from proxy.config.assignment import AnonymousCookie, DecisionHeaders, Override
from proxy.config.rules import Attr
from proxy.config.values import Listen, parse_duration, parse_listen, parse_upstream
from proxy.errors import ConfigError

MINIMAL = """
listen: 127.0.0.1:8080
pools:
  stable:
    servers: [http://127.0.0.1:9001]
routes:
  - name: api
    rings:
      - name: stable
        pool: stable
"""


def errors_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="c.yaml", environ=environ or {})
    return str(info.value).splitlines()


def test_minimal_config_and_defaults() -> None:
    config = parse_config(MINIMAL, environ={})
    assert config.listen == Listen("127.0.0.1", 8080)
    assert config.admin.listen == Listen("127.0.0.1", 9901)
    assert config.access_log.enabled and config.access_log.path == "-"
    assert config.shutdown_grace == 30.0
    (pool,) = config.pools
    assert pool.balance is Balance.ROUND_ROBIN
    assert pool.servers[0].url == "http://127.0.0.1:9001"
    (route,) = config.routes
    assert route.hosts == () and route.path_prefix == "/"
    assert route.default_ring.name == "stable"
    assert route.default_ring.policy.timeout == 30.0
    assert len(config.revision) == 12


def test_what_the_file_leaves_out_takes_the_model_defaults() -> None:
    # The defaults are written once, on the model classes: the reader must agree with them.
    text = MINIMAL.replace("listen: 127.0.0.1:8080\n", "") + textwrap.indent(textwrap.dedent("""
        sticky: {key: header:X-User-Id, anonymous: {}}
        override: {header: X-Ring, cidrs: [10.0.0.0/8]}
        decision: {}
    """), "    ")
    config = parse_config(text, environ={})
    assert config.listen == Config().listen == Listen("127.0.0.1", 8080)
    assert config.shutdown_grace == Config().shutdown_grace
    assert (config.access_log, config.metrics) == (AccessLog(), Metrics())
    (pool,) = config.pools
    assert pool == Pool("stable", pool.servers)
    (route,) = config.routes
    assert route.path_prefix == Route("api", route.rings).path_prefix
    assert route.decision == DecisionHeaders()
    assert route.sticky is not None and route.sticky.anonymous == AnonymousCookie()
    assert route.override is not None
    assert route.override.allow_rolled_back is Override().allow_rolled_back
    assert route.default_ring == Ring("stable", "stable")


def test_config_objects_are_immutable() -> None:
    config = parse_config(MINIMAL, environ={})
    with pytest.raises(AttributeError):
        config.listen = Listen("0.0.0.0", 1)  # type: ignore[misc]


def test_revision_is_a_hash_of_the_file() -> None:
    a = parse_config(MINIMAL, environ={})
    b = parse_config(MINIMAL + "\n# a comment\n", environ={})
    assert a.revision != b.revision
    assert parse_config(MINIMAL, environ={}).revision == a.revision


def test_full_config_round_trip(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        listen: "[::1]:8443"
        admin: {listen: 127.0.0.1:9999}
        access_log: {enabled: false, path: /var/log/rp.log}
        shutdown_grace: 1m
        pools:
          canary:
            servers: [https://canary.internal, "http://[fd00::1]:81"]
            balance: least_request
            connect_timeout: 250ms
            max_connections: 50
            keepalive_timeout: 5s
            preserve_host: false
          stable: {servers: [http://stable.internal:8080]}
        routes:
          - name: api
            match: {host: [api.example.com, "*.api.example.com"], path_prefix: /v1}
            policy: {timeout: 2s, add_headers: {X-Route: "{route}"}}
            rings:
              - name: beta
                pool: canary
                rules:
                  - {attr: "header:X-Beta", equals: "yes", ignore_case: true}
                  - all:
                      - {attr: "cookie:plan", equals: pro}
                      - {attr: method, equals: GET}
                policy: {timeout: 500ms, max_concurrency: 10, add_headers: {X-Feat: "{ring}"}}
              - name: stable
                pool: stable
    """))
    config = load_config(path, environ={})
    assert config.listen == Listen("::1", 8443)
    assert str(config.listen) == "[::1]:8443"
    assert config.shutdown_grace == 60.0
    canary = config.pool("canary")
    assert [s.url for s in canary.servers] == ["https://canary.internal:443", "http://[fd00::1]:81"]
    assert canary.connect_timeout == 0.25 and canary.max_connections == 50
    assert not canary.preserve_host
    route = config.routes[0]
    assert route.hosts == ("api.example.com", "*.api.example.com")
    beta, stable = route.rings
    assert beta.policy.timeout == 0.5 and beta.policy.max_concurrency == 10
    assert dict(beta.policy.add_headers) == {"X-Route": "api", "X-Feat": "beta"}
    assert stable.policy.timeout == 2.0  # inherited from the route
    assert dict(stable.policy.add_headers) == {"X-Route": "api"}
    first, second = beta.rules
    assert first[0].attr is Attr.HEADER and first[0].name == "x-beta" and first[0].ignore_case
    assert [r.attr for r in second] == [Attr.COOKIE, Attr.METHOD]
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_durations(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["30", 30, "5 minutes", "-1s", "1w", "", None, "s"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "not an address"),
        (":8080", "has no host"),
        ("127.0.0.1:70000", "not a number in 0..65535"),
        ("127.0.0.1:http", "not a number"),
        ("::1:80", "brackets"),
        ("[nothost]:80", "not an IPv6 address"),
    ],
)
def test_bad_listen(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:80", "scheme must be http or https"),
        ("ftp://h", "scheme must be http or https"),
        ("http://h:99999", "not a valid URL"),
        ("http://h/path", "no path, query or fragment"),
        ("http://h?x=1", "no path, query or fragment"),
        ("http://user:pw@h", "credentials"),
        ("http://bad_host!:80", "not a valid host name"),
        ("http://h:0", "port 0"),
        ("http://", "has no host"),
    ],
)
def test_bad_upstream_urls(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_upstream(value)


def test_every_error_is_reported_with_path_and_line() -> None:
    errors = errors_of("""
        listen: 127.0.0.1:99999
        pools:
          stable:
            servers: [http://127.0.0.1:9001/x]
            balanse: round_robin
          bad name: {servers: [http://h]}
        routes:
          - name: api
            rings:
              - name: beta
                pool: v3
                rules:
                  - {attr: "header:X-Beta", equals: "1"}
                policy: {timeout: 30, max_concurrency: 0}
              - name: beta
                pool: stable
    """)
    assert errors == [
        "c.yaml:2: listen: '127.0.0.1:99999': port '99999' is not a number in 0..65535",
        "c.yaml:5: pools.stable.servers[0]: 'http://127.0.0.1:9001/x': a server URL has no "
        "path, query or fragment (the request's own path and query are sent)",
        "c.yaml:6: pools.stable.balanse: unknown key (known keys: auth, balance, "
        "connect_timeout, environment, health, keepalive_timeout, max_connections, outlier, "
        "preserve_host, retries, servers, tls); did you mean 'balance'?",
        "c.yaml:7: pools.bad name: 'bad name' is not a valid pool name; use letters, digits, "
        "'_', '.', '-'",
        "c.yaml:12: routes[0].rings[0].pool: unknown pool 'v3' (pools: bad name, stable)",
        "c.yaml:15: routes[0].rings[0].policy.timeout: 30 (int) is not a duration; "
        "expected e.g. 250ms, 30s, 5m, 1h or 7d",
        "c.yaml:15: routes[0].rings[0].policy.max_concurrency: 0 is outside 1..10000000",
        "c.yaml:16: routes[0].rings[1].name: duplicate ring name 'beta' in route 'api'",
    ]


def test_yaml_syntax_error_names_the_line() -> None:
    (error,) = errors_of("listen: 127.0.0.1:8080\npools: [\n  a: b\n")
    assert error.startswith("c.yaml:")
    assert "YAML syntax error" in error


def test_duplicate_yaml_keys_are_errors() -> None:
    errors = errors_of(MINIMAL + "listen: 127.0.0.1:8081\n")
    assert any("listen: duplicate key" in e for e in errors)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "expected a mapping, got a list"),
        ("listen: 127.0.0.1:1\n", "pools: is required"),
    ],
)
def test_structural_errors(text: str, expected: str) -> None:
    assert any(expected in e for e in errors_of(text))


def test_route_errors() -> None:
    errors = errors_of("""
        pools: {p: {servers: [http://h]}}
        routes:
          - name: a
            match: {host: "bad host", path_prefix: v1}
            rings: []
          - name: a
            rings:
              - {name: x, pool: p, rules: [{attr: "header:X", equals: "1"}]}
          - name: c
            rings: [{name: y, pool: p}]
    """)
    text = "\n".join(errors)
    assert "routes[0].match.host: 'bad host' is not a host name" in text
    assert "routes[0].match.path_prefix: 'v1' must start with '/'" in text
    assert "routes[0].rings: a route needs at least one ring" in text
    assert "routes[1].name: duplicate route name 'a' (also routes[0])" in text
    assert "routes[1].rings[0]: the last ring ('x') is the default" in text
    assert "routes[2].match: same as routes[1]" not in text  # reported as "same match as"
    assert "routes[2].match: same match as routes[1], which comes first" in text


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('{attr: "header:X", equals: "1", prefix: "a"}', "needs exactly one operator"),
        ('{attr: "header:X", starts: "a"}', "unknown rule operator"),
        ('{attr: "header:X"}', "needs exactly one operator"),
        ('{attr: "header", equals: "1"}', "needs a name"),
        ('{attr: "ip:x", equals: "1"}', "takes no name"),
        ('{attr: "body", equals: "1"}', "is not an attribute"),
        ('{attr: "header:X Y", equals: "1"}', "is not a valid header name"),
        ('{attr: "header:X", exists: "yes"}', "expected true or false"),
        ('{attr: "header:X", equals: [1]}', "expected a string, got a list"),
        ('{attr: "header:X", equals: "1", ignore_case: maybe}', "expected true or false"),
        ("{all: []}", "a rule group needs at least one rule"),
        ('"header:X"', "expected a mapping, got a string"),
    ],
)
def test_rule_errors(rule: str, expected: str) -> None:
    errors = errors_of(f"""
        pools: {{p: {{servers: [http://h]}}}}
        routes:
          - name: a
            rings:
              - {{name: x, pool: p, rules: [{rule}]}}
              - {{name: y, pool: p}}
    """)
    assert any("routes[0].rings[0].rules[0]" in e and expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ('{"Bad Header": "x"}', "'Bad Header' is not a valid header name"),
        ('{X-A: "{user}"}', "unknown placeholder user"),
        ('{X-A: "{ring"}', "literal braces"),
        ("{X-A: [1]}", "expected a string, got a list"),
        ('[X-A]', "expected a mapping of header to value"),
    ],
)
def test_add_headers_errors(headers: str, expected: str) -> None:
    errors = errors_of(f"""
        pools: {{p: {{servers: [http://h]}}}}
        routes:
          - name: a
            rings:
              - name: y
                pool: p
                policy: {{add_headers: {headers}}}
    """)
    assert any("policy.add_headers" in e and expected in e for e in errors), errors


def test_environment_variables_fill_values_and_missing_ones_are_errors() -> None:
    text = MINIMAL.replace("http://127.0.0.1:9001", '"${UPSTREAM}"')
    config = parse_config(text, environ={"UPSTREAM": "http://10.1.2.3:80"})
    assert config.pools[0].servers[0].url == "http://10.1.2.3:80"
    defaulted = MINIMAL.replace("http://127.0.0.1:9001", '"${UPSTREAM:-http://h:81}"')
    assert parse_config(defaulted, environ={}).pools[0].servers[0].url == "http://h:81"
    errors = errors_of(text)
    assert errors[0] == (
        "c.yaml:5: pools.stable.servers[0]: environment variable UPSTREAM is not set"
    )


def test_dollar_dollar_is_a_literal_dollar() -> None:
    policy = "\n        policy: {add_headers: {X-P: 'costs $$5'}}"
    text = MINIMAL.replace("pool: stable", "pool: stable" + policy)
    config = parse_config(text, environ={})
    assert dict(config.routes[0].rings[0].policy.add_headers) == {"X-P": "costs $5"}


def test_admin_cannot_share_the_proxy_address() -> None:
    errors = errors_of(MINIMAL + "admin: {listen: 127.0.0.1:8080}\n")
    assert any("admin.listen: 127.0.0.1:8080 is also the proxy's listen address" in e
               for e in errors)


def test_pool_errors() -> None:
    errors = errors_of("""
        pools:
          a: {servers: []}
          b: {servers: [http://h:1, "http://h:1"], balance: random, max_connections: 0}
          c: nope
        routes: [{name: r, rings: [{name: x, pool: a}]}]
    """)
    text = "\n".join(errors)
    assert "pools.a.servers: a pool needs at least one server" in text
    assert "pools.b.servers: http://h:1 is listed twice" in text
    assert "pools.b.balance: 'random' is not one of: round_robin, least_request" in text
    assert "pools.b.max_connections: 0 is outside 1..1000000" in text
    assert "pools.c: expected a mapping, got a string" in text


def test_unreadable_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
