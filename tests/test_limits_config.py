"""``limits:``, ``listen_tls:`` and a route's ``max_body``: parsing, defaults, refusals with lines.

Certificates are real files made by the ``openssl`` command (``self_signed``, also used by
``tests/test_listener.py`` and ``tests/test_reload_plan.py``); without it those tests skip.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, Limits, ListenTLS, parse_config
from proxy.config.values import Listen, format_size, parse_size
from proxy.errors import ConfigError
from tests.test_config import MINIMAL


def self_signed(
    directory: Path, name: str = "a", cn: str = "localhost", rsa: bool = False
) -> tuple[Path, Path]:
    """A fresh self-signed certificate for ``cn`` (and 127.0.0.1) and its key: EC P-256,
    or RSA 2048 with ``rsa``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509",
         *(["-newkey", "rsa:2048"] if rsa else
           ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
         "-nodes", "-days", "2", "-subj", f"/CN={cn}",
         "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def encrypted_copy(key: Path, out: Path) -> Path:
    openssl = shutil.which("openssl")
    assert openssl is not None
    subprocess.run([openssl, "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret",
                    "-out", str(out)], check=True, capture_output=True, timeout=30)
    return out


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), source="c.yaml", environ={})


def errors_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="c.yaml", environ=environ or {})
    return str(info.value).splitlines()


# --- sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "size"), [
    (0, 0), (65536, 65536), ("512B", 512), ("64KiB", 65536), ("64 KiB", 65536),
    ("8kib", 8192), ("10MiB", 10 << 20), ("1GiB", 1 << 30), (" 2 MiB ", 2 << 20),
])
def test_sizes_take_bytes_or_binary_units(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(("value", "hint"), [
    ("64KB", "KB/MB/GB, k/m/g and fractions are not accepted"),
    ("10MB", "KB/MB/GB"), ("64k", "KB/MB/GB"), ("1.5MiB", "fractions"),
    ("1TiB", "KB/MB/GB"),
    ("lots", "expected a whole number of bytes, or with a binary unit: 512B, 64KiB"),
    (-1, "-1 is negative"), (True, "True (bool) is not a size"), (1.5, "1.5 (float)"),
    ("65536", "is not a size"),
])
def test_ambiguous_or_wrong_sizes_are_refused_naming_the_forms(value: object, hint: str) -> None:
    with pytest.raises(ValueError, match="512B, 64KiB") as info:
        parse_size(value)
    assert hint in str(info.value)


def test_format_size_is_the_shortest_exact_form() -> None:
    assert [format_size(n) for n in (0, 1000, 1024, 65536, 10 << 20, 1 << 30, 1536)] == [
        "0B", "1000B", "1KiB", "64KiB", "10MiB", "1GiB", "1536B"]


# --- limits ---------------------------------------------------------------------------------

def test_without_limits_the_defaults_hold() -> None:
    config = parse(MINIMAL)
    assert config.limits == Limits() == Config().limits
    assert config.listen_tls is None
    assert config.routes[0].max_body is None
    d = Limits()
    assert (d.head_timeout, d.body_timeout, d.keepalive_timeout) == (10.0, 30.0, 75.0)
    assert (d.max_request_line, d.max_head_size, d.max_headers) == (8192, 32768, 100)
    assert (d.max_connections, d.request_buffer, d.underscores_in_headers) == (
        None, 65536, False)


def test_every_limit_is_read() -> None:
    config = parse(MINIMAL + textwrap.dedent("""
        limits:
          head_timeout: 5s
          body_timeout: 1m
          keepalive_timeout: 500ms
          max_request_line: 4 KiB
          max_head_size: 64KiB
          max_headers: 50
          max_connections: 20000
          request_buffer: 0
          underscores_in_headers: true
    """))
    assert config.limits == Limits(5.0, 60.0, 0.5, 4096, 65536, 50, 20000, 0, True)


def test_an_empty_limits_section_is_the_defaults() -> None:
    assert parse(MINIMAL + "limits: {}\n").limits == Limits()


def test_limit_errors_name_path_line_and_what_is_expected() -> None:
    text = MINIMAL + textwrap.dedent("""
        limits:
          head_timeout: 10
          body_timeout: 0s
          max_request_line: 64KB
          max_head_size: 2MiB
          max_headers: 0
          max_connections: -5
          request_buffer: 100MiB
          underscores_in_headers: "yes"
          keepalive: 75s
    """)
    assert errors_of(text) == [
        "c.yaml:13: limits.head_timeout: 10 (int) is not a duration; "
        "expected e.g. 250ms, 30s, 5m, 1h or 7d",
        "c.yaml:14: limits.body_timeout: '0s' is below the minimum 0.001s",
        "c.yaml:15: limits.max_request_line: '64KB' is not a size; expected a whole number of "
        "bytes, or with a binary unit: 512B, 64KiB, 8 KiB, 10MiB, 1GiB (KiB/MiB/GiB are "
        "1024-based; KB/MB/GB, k/m/g and fractions are not accepted)",
        "c.yaml:16: limits.max_head_size: '2MiB' is outside 1KiB..1MiB",
        "c.yaml:17: limits.max_headers: 0 is outside 1..10000",
        "c.yaml:18: limits.max_connections: -5 is outside 1..10000000",
        "c.yaml:19: limits.request_buffer: '100MiB' is outside 0B..64MiB",
        "c.yaml:20: limits.underscores_in_headers: expected true or false, got 'yes'",
        "c.yaml:21: limits.keepalive: unknown key (known keys: body_timeout, head_timeout, "
        "keepalive_timeout, max_connections, max_head_size, max_headers, max_request_line, "
        "request_buffer, tunnel_idle_timeout, underscores_in_headers); "
        "did you mean 'keepalive_timeout'?",
    ]


def test_the_request_line_cannot_exceed_the_head() -> None:
    text = MINIMAL + "limits:\n  max_head_size: 4KiB\n  max_request_line: 8KiB\n"
    assert errors_of(text) == [
        "c.yaml:13: limits.max_request_line: 8192 bytes is above max_head_size (4096 bytes), "
        "which includes the request line"]


def test_limits_must_be_a_mapping() -> None:
    assert errors_of(MINIMAL + "limits: [1]\n") == [
        "c.yaml:11: limits: expected a mapping, got a list"]


# --- a route's max_body ---------------------------------------------------------------------

def test_max_body_per_route() -> None:
    config = parse(MINIMAL.replace("  - name: api\n", "  - name: api\n    max_body: 10MiB\n"))
    assert config.routes[0].max_body == 10 << 20
    config = parse(MINIMAL.replace("  - name: api\n", "  - name: api\n    max_body: 1\n"))
    assert config.routes[0].max_body == 1


@pytest.mark.parametrize(("value", "message"), [
    ("0", "0 is not a limit; leave max_body out for no limit "
          "(NGINX's client_max_body_size 0 means unlimited)"),
    ("0KiB", "0 is not a limit; leave max_body out"),
    ("10MB", "'10MB' is not a size"),
    ("-1", "-1 is negative"),
    ("2048GiB", "'2048GiB' is outside 1B..1024GiB"),
])
def test_bad_max_body_is_refused_with_its_line(value: str, message: str) -> None:
    text = MINIMAL.replace("  - name: api\n", f"  - name: api\n    max_body: {value}\n")
    (line,) = errors_of(text)
    assert line.startswith("c.yaml:8: routes[0].max_body: ")
    assert message in line


# --- listen_tls -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def tls_config(listen: str, cert: object, key: object) -> str:
    return MINIMAL + f"listen_tls:\n  listen: {listen}\n  cert: {cert}\n  key: {key}\n"


def test_listen_tls_loads_the_pair(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    config = parse(tls_config("0.0.0.0:8443", cert, key))
    assert config.listen_tls == ListenTLS(Listen("0.0.0.0", 8443), str(cert), str(key))


def test_listen_tls_paths_can_come_from_the_environment(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    text = tls_config("127.0.0.1:8443", "${TLS_CERT}", "${TLS_KEY}")
    config = parse_config(text, environ={"TLS_CERT": str(cert), "TLS_KEY": str(key)})
    assert config.listen_tls is not None and config.listen_tls.cert == str(cert)


def test_a_missing_certificate_file_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    missing = tmp_path / "nope.crt"
    assert errors_of(tls_config("127.0.0.1:8443", missing, pair[1])) == [
        f"c.yaml:11: listen_tls: cannot read the certificate file {missing}: "
        "No such file or directory"]


def test_files_that_hold_no_pem_are_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    cert, key = pair
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert errors_of(tls_config("127.0.0.1:8443", empty, key)) == [
        f"c.yaml:11: listen_tls: {empty} holds no PEM certificate "
        "('-----BEGIN CERTIFICATE-----' not found)"]
    assert errors_of(tls_config("127.0.0.1:8443", cert, cert)) == [
        f"c.yaml:11: listen_tls: {cert} holds no PEM private key "
        "('PRIVATE KEY-----' not found)"]


@pytest.mark.parametrize("rsa", [False, True], ids=["same-type", "rsa-key-for-ec"])
def test_a_key_of_another_certificate_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], rsa: bool
) -> None:
    _, other_key = self_signed(tmp_path, "other", rsa=rsa)
    assert errors_of(tls_config("127.0.0.1:8443", pair[0], other_key)) == [
        f"c.yaml:11: listen_tls: the private key {other_key} does not match the certificate "
        f"{pair[0]}"]


def test_an_encrypted_key_is_refused_saying_so(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    locked = encrypted_copy(pair[1], tmp_path / "locked.key")
    # Never a prompt on the terminal: the load fails at once.
    assert errors_of(tls_config("127.0.0.1:8443", pair[0], locked)) == [
        f"c.yaml:11: listen_tls: the private key {locked} is encrypted; ringproxy takes an "
        "unencrypted key (readable only by its user), never a passphrase"]


def test_pem_contents_in_the_file_are_refused(pair: tuple[Path, Path]) -> None:
    text = MINIMAL + textwrap.dedent(f"""
        listen_tls:
          listen: 127.0.0.1:8443
          cert: {pair[0]}
          key: "-----BEGIN PRIVATE KEY-----\\nMIG..."
    """)
    assert errors_of(text) == [
        "c.yaml:15: listen_tls.key: write the path of the PEM file, never its contents"]


def test_listen_tls_needs_all_three_keys_and_no_others(pair: tuple[Path, Path]) -> None:
    text = MINIMAL + f"listen_tls: {{cert: {pair[0]}, port: 8443}}\n"
    assert errors_of(text) == [
        "c.yaml:11: listen_tls.listen: is required",
        "c.yaml:11: listen_tls.key: is required",
        "c.yaml:11: listen_tls.port: unknown key (known keys: cert, key, listen)",
    ]


def test_listen_tls_needs_its_own_address(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    assert errors_of(tls_config("127.0.0.1:8080", cert, key)) == [
        "c.yaml:12: listen_tls.listen: 127.0.0.1:8080 is also the listen address"]
    assert errors_of(tls_config("127.0.0.1:9901", cert, key)) == [
        "c.yaml:12: listen_tls.listen: 127.0.0.1:9901 is also the admin.listen address"]
    assert errors_of(tls_config("127.0.0.1:99999", cert, key)) == [
        "c.yaml:12: listen_tls.listen: '127.0.0.1:99999': port '99999' is not a number in "
        "0..65535"]
    # Port 0 picks a free port each time: never the same address.
    assert parse(tls_config("127.0.0.1:0", cert, key)).listen_tls is not None
