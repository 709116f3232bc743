"""Round-trip editing of the config file (proxy.config.edit): pure, text in and text out.

Each edit changes only what it names: every other line, comment and blank line of the file
comes back as it was, and the result is what the proxy's own loader reads back."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.config.edit import (
    Document,
    file_diff,
    guess_indent,
    merge_patch,
    read_back,
    revision,
)
from proxy.errors import ApiError

ROOT = Path(__file__).resolve().parent.parent

FILE = textwrap.dedent("""\
    # The shop's edge.
    x-timeouts: &timeouts {timeout: 5s, idle_timeout: 30s}
    pools:
      stable: {servers: ["http://127.0.0.1:9001"]}   # v41
      canary:
        servers:
          - http://127.0.0.1:9002   # v42

    routes:
      - name: api
        sticky: {key: ["header:X-User-Id"]}
        rings:
          # QA and employees
          - name: internal
            pool: canary
            rules:
              - {attr: "header:X-Employee", exists: true}
            policy: *timeouts
          # The default: everyone else.
          - name: stable        # keep last
            pool: stable
            policy:
              <<: *timeouts
              timeout: 10s
    """)


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "#" in line]


def loads(text: str) -> None:
    parse_config(text, environ={})


def test_an_untouched_document_dumps_byte_for_byte_the_shipped_configs_too() -> None:
    for text in (FILE, (ROOT / "config/example.yaml").read_text(),
                 (ROOT / "config/demo.yaml").read_text()):
        assert Document(text).dump() == text


@pytest.mark.parametrize(("text", "indent"), [
    ("a:\n  b: 1\n  c:\n    - 1\n", (2, 2)),
    ("a:\n    b: 1\nc:\n- 1\n", (4, 0)),
    ("k: v\n", (2, 0)),
])
def test_guess_indent(text: str, indent: tuple[int, int]) -> None:
    assert guess_indent(text) == indent


def test_a_new_ring_goes_before_the_default_with_the_files_indentation() -> None:
    doc = Document(FILE)
    at = doc.create_ring("api", {"name": "beta", "pool": "canary", "weight": 5,
                                 "rules": [{"attr": "header:X-Beta", "equals": "yes"}]})
    text = doc.dump()
    assert at == 1
    assert file_diff(FILE, text, "f.yaml").splitlines()[2:] == [
        "@@ -17,4 +17,9 @@",
        '           - {attr: "header:X-Employee", exists: true}',
        "         policy: *timeouts",
        "+      - name: beta",
        "+        pool: canary",
        "+        weight: 5",
        "+        rules:",
        '+          - {attr: header:X-Beta, equals: "yes"}',  # quoted: YAML 1.1 reads yes as true
        "       # The default: everyone else.",
        "       - name: stable        # keep last",
    ]
    loads(text)
    assert read_back(text, "api", "beta") == doc.ring("api", "beta")


def test_a_ring_before_another_and_a_duplicate() -> None:
    doc = Document(FILE)
    assert doc.create_ring("api", {"name": "first", "pool": "stable"}, before="internal") == 0
    assert [r["name"] for r in doc.rings("api")] == ["first", "internal", "stable"]
    with pytest.raises(ApiError) as exc:
        doc.create_ring("api", {"name": "internal", "pool": "stable"})
    assert exc.value.status == 409
    with pytest.raises(ApiError) as exc:
        doc.create_ring("api", {"name": "bad name", "pool": "stable"})
    assert exc.value.status == 400 and "not a valid ring name" in exc.value.message


def test_a_patch_changes_only_its_keys_and_keeps_their_comments() -> None:
    doc = Document(FILE)
    spec = doc.patch_ring("api", "stable", {"pool": "canary"})
    assert spec["pool"] == "canary"
    text = doc.dump()
    assert comments(text) == comments(FILE)
    assert [line for line in file_diff(FILE, text, "f").splitlines() if line[:1] in "+-"
            and not line.startswith(("+++", "---"))] == [
        "-        pool: stable", "+        pool: canary"]


def test_merge_patch_is_rfc_7396() -> None:
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]},
                       {"a": None, "b": {"c": 4}, "e": [2]}) == {"b": {"c": 4, "d": 3}, "e": [2]}


def test_an_aliased_value_is_replaced_never_changed_in_place() -> None:
    # internal's policy is *timeouts: changing it must not change the anchor (or stable).
    doc = Document(FILE)
    doc.patch_ring("api", "internal", {"policy": {"timeout": "1s"}})
    text = doc.dump()
    assert "x-timeouts: &timeouts {timeout: 5s, idle_timeout: 30s}" in text
    assert read_back(text, "api", "internal")["policy"] == {"timeout": "1s",
                                                            "idle_timeout": "30s"}
    assert read_back(text, "api", "stable")["policy"] == {"timeout": "10s",
                                                          "idle_timeout": "30s"}
    loads(text)


def test_a_put_replaces_a_mapping_with_a_merge_key_as_asked() -> None:
    # stable's policy merges *timeouts; a PUT without idle_timeout means without it.
    doc = Document(FILE)
    doc.replace_ring("api", "stable", {"pool": "stable", "policy": {"timeout": "1s"}})
    text = doc.dump()
    assert read_back(text, "api", "stable") == {"name": "stable", "pool": "stable",
                                                "policy": {"timeout": "1s"}}
    assert read_back(text, "api", "internal")["policy"] == {"timeout": "5s",
                                                            "idle_timeout": "30s"}


def test_deleting_keeps_the_comment_of_what_follows() -> None:
    doc = Document(FILE)
    doc.delete_ring("api", "internal")
    text = doc.dump()
    assert "# The default: everyone else." in text and "# QA and employees" in text
    assert "name: internal" not in text
    loads(text)


def test_a_new_pool_goes_before_the_blank_line_that_ends_the_section() -> None:
    doc = Document(FILE)
    doc.create_pool("next", {"servers": ["http://127.0.0.1:9003"], "balance": "least_request"})
    text = doc.dump()
    assert "      - http://127.0.0.1:9002   # v42\n  next:\n" \
           "    servers: [http://127.0.0.1:9003]\n    balance: least_request\n\nroutes:" in text
    doc = Document(text)
    doc.delete_pool("next")
    assert doc.dump() == FILE


def test_unknown_names_are_404_and_a_file_that_is_not_yaml_is_422() -> None:
    doc = Document(FILE)
    for call in (lambda: doc.ring("api", "nope"), lambda: doc.rings("web"),
                 lambda: doc.pool("nope"), lambda: doc.delete_pool("nope")):
        with pytest.raises(ApiError) as exc:
            call()
        assert exc.value.status == 404
    with pytest.raises(ApiError) as exc:
        Document("a: [1\n")
    assert exc.value.status == 422


@pytest.mark.parametrize("text", ["---\n# top\na: 1\n", "a: 1\r\nb: [1, 2]  # x\r\n",
                                  "a: 1", "\ufeffa: 1\n"])
def test_document_start_crlf_bom_and_no_final_newline_come_back(text: str) -> None:
    Document(text).check_round_trip()
    assert Document(text).dump() == text


def test_a_file_that_would_be_reformatted_is_refused() -> None:
    mixed = "pools:\n    a: {servers: [x]}\n    b: {servers: [y]}\nroutes:\n  - name: r\n" \
            "    rings:\n      - {name: s, pool: a}\nlisten: 1\nadmin:\n  x: 1\n"
    with pytest.raises(ApiError) as exc:
        Document(mixed).check_round_trip()
    assert exc.value.status == 422 and "without reformatting it: line 10" in exc.value.message


def test_the_revision_is_the_loaders() -> None:
    assert revision(FILE.encode()) == parse_config(FILE, environ={}).revision
