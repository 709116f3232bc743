"""Secrets never leak through config errors, and a secret is caught under any name
(pure).  An error about a value that came from ``${VAR}`` says "the value from ${VAR}",
whichever reader wrote it; a non-production pool or any header outside ``pools.*.auth``
holding a production credential's variable value under another name is refused; a pool
that sends its credentials in the clear is warned about."""

from __future__ import annotations

import logging
import textwrap

import pytest

from proxy.config import credentials, parse_config
from proxy.config.credentials import plaintext_credentials
from proxy.errors import ConfigError

SECRET = "s3cr3t-prod-value"
ENV = {"PROD_TOK": SECRET, "PROD_HDR": "X-Api-Key", "STAGE_TOK": SECRET,
       "OTHER_TOK": "a-different-secret", "SHORT": "yes", "PORT": "not-a-port"}


def config(pools: str, routes: str = "") -> str:
    routes = routes or """
        - name: api
          rings:
            - {name: canary, pool: staging, rules: [{attr: "header:X-Beta", exists: true}]}
            - {name: main, pool: prod}
        """
    return ("listen: 127.0.0.1:0\npools:\n" + textwrap.indent(textwrap.dedent(pools), "  ")
            + "routes:\n" + textwrap.indent(textwrap.dedent(routes), "  "))


def errors(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.yaml", environ=ENV)
    shown = str(info.value)
    assert SECRET not in shown and "s3cr3t" not in shown, shown
    return shown


PROD = """
        prod:
          environment: production
          servers: ["https://127.0.0.1:9001"]
          auth: {header: Authorization, value: "Bearer ${PROD_TOK}"}"""


def test_an_error_about_an_expanded_value_names_its_variable_never_the_value() -> None:
    # Keys swapped (the secret in the header name), the secret in a flag and a number.
    shown = errors(config("""
        prod:
          environment: production
          servers: ["https://127.0.0.1:9001"]
          auth: {header: "Bearer ${PROD_TOK}", value: "${PROD_HDR}", shared: "${PROD_TOK}"}
          max_connections: "${PROD_TOK}"
          preserve_host: "${SHORT}"
        staging:
          servers: ["http://127.0.0.1:9002"]
        """))
    assert "pools.prod.auth.header: the value from ${PROD_TOK} is not a valid header name" \
        in shown
    assert "pools.prod.auth.shared: expected true or false, got the value from ${PROD_TOK}" \
        in shown
    assert "pools.prod.max_connections: expected a whole number, got the value from " \
        "${PROD_TOK}" in shown
    # A short value is not quoted either (at its own path).
    assert "pools.prod.preserve_host: expected true or false, got the value from ${SHORT}" \
        in shown


def test_a_value_written_in_the_file_is_still_quoted() -> None:
    shown = errors(config(PROD + """
        staging:
          servers: ["http://127.0.0.1:9002"]
          max_connections: "lots"
        """))
    assert "expected a whole number, got 'lots'" in shown


def test_a_staging_pool_with_a_production_variables_value_under_another_name() -> None:
    # The header values differ ("Bearer ..." and the bare value); the variables are equal.
    shown = errors(config(PROD + """
        staging:
          environment: staging
          servers: ["http://127.0.0.1:9002"]
          auth: {header: X-Api-Key, value: "${STAGE_TOK}"}
        """))
    assert "the value of STAGE_TOK equals that of PROD_TOK, a credential of production " \
        "pool prod; pool staging must never send it" in shown


def test_a_different_value_passes() -> None:
    parse_config(config(PROD + """
        staging:
          environment: staging
          servers: ["https://127.0.0.1:9002"]
          auth: {header: X-Api-Key, value: "${OTHER_TOK}"}
        """), environ=ENV)


@pytest.mark.parametrize("where", [
    "add_headers: {X-Key: '${STAGE_TOK}'}",
    "health_checks: [{name: db, path: /h, headers: {X-Key: 'k ${STAGE_TOK}'}}]",
])
def test_a_credentials_value_under_another_name_in_other_headers(where: str) -> None:
    routes = f"""
        - name: api
          analysis: {{interval: 1s, pre_advance: {{url: "http://127.0.0.1:1/g"}}}}
          rings:
            - {{name: canary, pool: staging, weight: 10, {where}}}
            - {{name: main, pool: prod}}
        """
    shown = errors(config(PROD + """
        staging:
          servers: ["http://127.0.0.1:9002"]
        """, routes))
    assert "the value of STAGE_TOK equals that of PROD_TOK, a credential of pool prod" in shown


def test_a_hooks_header_with_a_credentials_value_is_refused() -> None:
    routes = """
        - name: api
          analysis:
            interval: 1s
            post_rollback: {url: "http://127.0.0.1:1/after", headers: {X-Key: "${STAGE_TOK}"}}
          rings:
            - {name: canary, pool: staging, weight: 10}
            - {name: main, pool: prod}
        """
    shown = errors(config(PROD + """
        staging:
          servers: ["http://127.0.0.1:9002"]
        """, routes))
    assert "analysis.post_rollback.headers.X-Key: the value of STAGE_TOK equals that of " \
        "PROD_TOK" in shown


def test_credentials_in_the_clear_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    pools = """
        prod:
          environment: production
          servers: ["http://127.0.0.1:9001"]
          auth: {header: Authorization, value: "Bearer ${PROD_TOK}"}
        staging:
          servers: ["https://127.0.0.1:9002"]
          tls: {verify: false}
          auth: {header: X-Api-Key, value: "${OTHER_TOK}"}
        """
    credentials._warned.clear()
    with caplog.at_level(logging.WARNING, logger="ringproxy.config"):
        parsed = parse_config(config(pools), environ=ENV)
        parse_config(config(pools), environ=ENV)  # loaded again: not repeated
    shown = plaintext_credentials(parsed.pools)
    assert shown == [
        "pool prod sends its credentials (Authorization) over plain http:// to 1 of 1 "
        "servers: anyone on the path can read them; use https:// servers",
        "pool staging sends its credentials (X-Api-Key) to https:// servers it does not "
        "verify (tls.verify: false): anyone on the path can take them; give the pool a "
        "tls.ca instead"]
    assert [r.getMessage() for r in caplog.records] == shown
    verified = parse_config(config(PROD + """
        staging:
          servers: ["https://127.0.0.1:9002"]
          auth: {header: X-Api-Key, value: "${OTHER_TOK}"}
        """), environ=ENV)
    assert plaintext_credentials(verified.pools) == []
