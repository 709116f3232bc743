"""Per-pool credentials in the config (pure): ``auth``, ``tls``, ``environment``; the
isolation rules checked at load, each with its path and a message that never shows a
secret; secrets printed as ``***``; the head's credential lines built once per config."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, parse_config
from proxy.config.credentials import Credential, Secret, UpstreamTLS
from proxy.dataplane.decide import Forward, decide
from proxy.dataplane.request import parse_request
from proxy.errors import ConfigError
from proxy.runtime import Runtime
from tests.test_limits_config import encrypted_copy, self_signed

PROD = "prod-secret-7f3a9c1e55"
STAGE = "stage-secret-0b8d2f4a66"
ENV = {"PROD_TOKEN": PROD, "STAGE_TOKEN": STAGE, "OTHER": "other-secret-11111111"}


def text(pools: str, rings: str = "") -> str:
    rings = rings or """
      - name: canary
        pool: canary
        rules: [{attr: "header:X-Beta", exists: true}]
      - name: main
        pool: prod
    """
    return ("listen: 127.0.0.1:0\npools:\n" + textwrap.indent(textwrap.dedent(pools), "  ")
            + "routes:\n  - name: api\n    rings:\n"
            + textwrap.indent(textwrap.dedent(rings), "    "))


def parse(pools: str, rings: str = "", environ: dict[str, str] | None = None) -> Config:
    return parse_config(text(pools, rings), source="c.yaml",
                        environ=ENV if environ is None else environ)


def errors_of(pools: str, rings: str = "", environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(pools, rings, environ)
    lines = str(info.value).splitlines()
    for secret in (PROD, STAGE, ENV["OTHER"]):
        assert secret not in str(info.value), "a config error showed a secret"
    return lines


GOOD = """
prod:
  environment: production
  servers: ["http://127.0.0.1:9001"]
  auth: {header: Authorization, value: "Bearer ${PROD_TOKEN}"}
canary:
  environment: staging
  servers: ["http://127.0.0.1:9002"]
  auth:
    - {header: Authorization, value: "Bearer ${STAGE_TOKEN}"}
    - {header: X-Api-Key, value: "${OTHER}"}
"""


def test_credentials_are_read_from_the_environment_and_printed_as_stars() -> None:
    config = parse(GOOD)
    prod, canary = config.pools
    assert prod.environment == "production" and canary.environment == "staging"
    assert prod.auth == (Credential("Authorization", Secret(f"Bearer {PROD}"),
                                    ("PROD_TOKEN",)),)
    assert [c.header for c in canary.auth] == ["Authorization", "X-Api-Key"]
    assert canary.auth[1].value.reveal() == ENV["OTHER"]
    for shown in (repr(config), str(config), repr(prod), f"{prod.auth[0].value}"):
        assert PROD not in shown and STAGE not in shown
    assert "***" in repr(prod)


def test_the_head_carries_the_pools_credential_and_drops_the_clients() -> None:
    runtime = Runtime(parse(GOOD))
    for raw, pool, secret in (
        (b"GET / HTTP/1.1\r\nHost: x\r\nauthorization: Bearer mine\r\nX-API-KEY: k\r\n"
         b"X-Beta: 1\r\n\r\n", "canary", STAGE),
        (b"GET / HTTP/1.1\r\nHost: x\r\nAUTHORIZATION: Bearer mine\r\n\r\n", "prod", PROD),
    ):
        step = decide(runtime, parse_request(raw), "rid")
        assert isinstance(step, Forward) and step.ring.pool.config.name == pool
        head = step.head.decode()
        assert head.lower().count("authorization:") == 1
        assert f"Authorization: Bearer {secret}\r\n" in head
        assert "mine" not in head
        if pool == "canary":
            assert head.lower().count("x-api-key:") == 1 and "X-Api-Key: other-secret" in head
            assert PROD not in head


def test_a_variable_used_by_two_pools_needs_shared_on_every_use() -> None:
    pools = """
        a:
          servers: ["http://127.0.0.1:9001"]
          auth: {header: Authorization, value: "${OTHER}"}
        b:
          servers: ["http://127.0.0.1:9002"]
          auth: {header: Authorization, value: "${OTHER}", shared: true}
    """
    rings = "- {name: main, pool: a}\n"
    errors = errors_of(pools, rings)
    assert errors == [
        "c.yaml:6: pools.a.auth.shared: OTHER is also a credential of pool b; a credential "
        "variable belongs to one pool unless every pool using it says shared: true"]
    shared = parse(pools.replace('"${OTHER}"}', '"${OTHER}", shared: true}', 1), rings)
    assert all(p.auth[0].shared for p in shared.pools)


def test_a_non_production_pool_never_carries_a_production_credential_even_shared() -> None:
    pools = """
        prod:
          environment: production
          servers: ["http://127.0.0.1:9001"]
          auth: [{header: Authorization, value: "${PROD_TOKEN}", shared: true}]
        canary:
          environment: staging
          servers: ["http://127.0.0.1:9002"]
          auth: [{header: Authorization, value: "Bearer ${PROD_TOKEN}", shared: true}]
    """
    assert errors_of(pools) == [
        "c.yaml:11: pools.canary.auth[0].value: PROD_TOKEN is a credential of production "
        "pool prod; pool canary (environment: staging) must never send it, shared or not: "
        "give it a variable of its own"]
    # Without an environment a pool is not production either.
    no_env = re.sub(r"\n *environment: staging", "", pools)
    assert "(environment: not set)" in errors_of(no_env)[0]
    # Two production pools may share it.
    both = pools.replace("environment: staging", "environment: production")
    assert len(parse(both).pools) == 2


def test_the_production_secret_under_another_name_is_caught_without_showing_it() -> None:
    environ = {**ENV, "COPY": PROD}
    errors = errors_of("""
        prod:
          environment: production
          servers: ["http://127.0.0.1:9001"]
          auth: {header: Authorization, value: "${PROD_TOKEN}"}
        canary:
          servers: ["http://127.0.0.1:9002"]
          auth: {header: Authorization, value: "${COPY}"}
    """, environ=environ)
    assert errors == [
        "c.yaml:10: pools.canary.auth.value: the value of COPY equals that of PROD_TOKEN, a "
        "credential of production pool prod; pool canary must never send it"]


def test_a_credential_variable_is_used_only_in_pools_auth() -> None:
    errors = errors_of(GOOD, """
        - name: canary
          pool: canary
          rules: [{attr: "header:X-Beta", exists: true}]
          policy: {add_headers: {X-Sneak: "${PROD_TOKEN}"}}
        - name: main
          pool: prod
          policy: {add_headers: {authorization: "x"}}
    """)
    assert errors == [
        "c.yaml:21: routes[0].rings[0].policy.add_headers.X-Sneak: PROD_TOKEN is a credential "
        "of pool prod; a credential variable is used only in pools.*.auth (where it is kept "
        "out of logs, views and other pools)",
        "c.yaml:24: routes[0].rings[1].policy.add_headers.authorization: authorization is a "
        "credential of pool prod (its auth sets it); add_headers cannot set it too",
    ]


@pytest.mark.parametrize(("auth", "expected"), [
    ('{header: Authorization, value: "Bearer abc123"}',
     "pools.prod.auth.value: a credential comes from the environment: write ${VAR} (e.g. "
     "'Bearer ${API_TOKEN}'), never the secret itself (the value is not shown)"),
    ('{header: Authorization, value: "${PROD_TOKEN:-fallback}"}',
     "pools.prod.auth.value: ${PROD_TOKEN:-...}: a credential has no default (it would put "
     "a secret in the file); write ${PROD_TOKEN}"),
    ("{header: Authorization, value: 12345}",
     "pools.prod.auth.value: expected a string naming an environment variable, e.g. "
     "${API_TOKEN}, got a int"),
    ('{header: "Bad Header", value: "${PROD_TOKEN}"}',
     "pools.prod.auth.header: 'Bad Header' is not a valid header name"),
    ('{header: X-Forwarded-For, value: "${PROD_TOKEN}"}',
     "pools.prod.auth.header: X-Forwarded-For is set or removed by the proxy itself; it "
     "cannot be a credential"),
    ('[{header: X-Key, value: "${PROD_TOKEN}"}, {header: x-key, value: "${PROD_TOKEN}"}]',
     "pools.prod.auth[1].header: x-key is set twice in this pool's auth"),
    ("[]", "pools.prod.auth: an empty list; leave auth out for no credentials"),
    ('{header: X-Key, valu: "${PROD_TOKEN}"}',
     "pools.prod.auth.valu: unknown key (known keys: header, shared, value); did you mean "
     "'value'?"),
    ('{header: X-Key, value: "${EMPTY}"}', "pools.prod.auth.value: EMPTY is empty"),
    ('{header: X-Key, value: "${NEWLINE}"}',
     "pools.prod.auth.value: the value of NEWLINE holds a control character"),
])
def test_auth_errors(auth: str, expected: str) -> None:
    environ = {**ENV, "EMPTY": "", "NEWLINE": "abc\r\nX-Injected: 1"}
    errors = errors_of(f"""
        prod:
          servers: ["http://127.0.0.1:9001"]
          auth: {auth}
    """, "- {name: main, pool: prod}\n", environ)
    assert any(expected in e for e in errors), errors
    assert "abc123" not in "\n".join(errors) and "fallback" not in "\n".join(errors)


@pytest.mark.parametrize(("environment", "expected"), [
    ("prod", "'prod': write production (the one word the credential isolation protects)"),
    ("Production", "'Production': write production"),
    ("'two words'", "'two words' is not an environment name"),
])
def test_environment_errors(environment: str, expected: str) -> None:
    errors = errors_of(f"""
        prod:
          environment: {environment}
          servers: ["http://127.0.0.1:9001"]
    """, "- {name: main, pool: prod}\n")
    assert any(expected in e for e in errors), errors


def test_tls_is_read_and_checked_at_load(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "client")
    ca, _ = self_signed(tmp_path, "ca")
    config = parse(f"""
        prod:
          servers: ["https://127.0.0.1:9001"]
          tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: api.internal}}
    """, "- {name: main, pool: prod}\n")
    assert config.pools[0].tls == UpstreamTLS(str(ca), str(cert), str(key), "api.internal")

    def error(tls: str, servers: str = '"https://127.0.0.1:9001"') -> str:
        errors = errors_of(f"""
            prod:
              servers: [{servers}]
              tls: {tls}
        """, "- {name: main, pool: prod}\n")
        assert len(errors) == 1, errors
        return errors[0]

    assert error("{verify: false}", '"http://127.0.0.1:9001"').endswith(
        "pools.prod.tls: tls applies to https:// servers; this pool has none")
    assert error(f'{{cert: "{cert}"}}').endswith(
        "pools.prod.tls.key: a client certificate needs both cert and key")
    assert "cannot load the CA bundle" in error(f'{{ca: "{tmp_path / "none.pem"}"}}')
    assert f"the private key {ca.with_suffix('.key')} does not match" in error(
        f'{{cert: "{cert}", key: "{ca.with_suffix(".key")}"}}')
    assert "is encrypted" in error(
        f'{{cert: "{cert}", key: "{encrypted_copy(key, tmp_path / "enc.key")}"}}')
    assert error('{cert: "-----BEGIN CERTIFICATE----- x", key: k}').endswith(
        "write the path of the PEM file, never its contents")


def test_unset_credential_variables_are_reported_as_unset_only(tmp_path: Path) -> None:
    """Two unset variables leave equal texts ('Bearer '): not a shared production secret
    (``check --env-optional`` turns the unset ones into warnings and passes)."""
    from tests.conftest import cli

    pools = """
        prod:
          environment: production
          servers: ["http://127.0.0.1:9001"]
          auth: {header: Authorization, value: "Bearer ${CR_UNSET_A}"}
        canary:
          servers: ["http://127.0.0.1:9002"]
          auth: {header: Authorization, value: "Bearer ${CR_UNSET_B}"}
    """
    assert [e.split(": ", 2)[2] for e in errors_of(pools, environ={})] == [
        "environment variable CR_UNSET_A is not set",
        "environment variable CR_UNSET_B is not set"]
    path = tmp_path / "c.yaml"
    path.write_text(text(pools))
    done = cli("check", "--env-optional", str(path))
    assert done.returncode == 0, done.stderr
    assert "2 unset variables" in done.stdout
