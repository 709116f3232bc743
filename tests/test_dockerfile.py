"""What the Dockerfile promises, checked without a Docker engine.

Our machines cannot pull base images, so the image is not built here (the last test builds
it where a Docker engine answers, and skips otherwise). Instead the Dockerfile is parsed
(a small parser below: parser directives, line continuations, comments inside them,
JSON-form vs shell-form arguments, instruction flags, stages and ARG/ENV substitution the
way Docker applies it) and its promises are checked one by one. Where a promise can be
exercised for real it is: the entry command and the HEALTHCHECK command run against a
real ringproxy process, and the build stage's COPYs are replayed from the build context
that `.dockerignore` leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.config.admin import Admin
from tests.conftest import LISTENING, ROOT, cli, write_config

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONFIG_PATH = "/etc/ringproxy/config.yaml"
STATE_DIR = "/var/lib/ringproxy"
ADMIN_PORT = Admin().listen.port  # the admin listener's default, from the config model
ADMIN_LISTENING = re.compile(rb"admin listening on (http://\S+)")


# =========================================================================== the parser


class DockerfileError(ValueError):
    pass


_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}
_WITH_FLAGS = {"FROM", "COPY", "ADD", "RUN", "HEALTHCHECK"}
_MAY_BE_JSON = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME", "HEALTHCHECK"}
# Docker substitutes ${VAR} itself only in these; in RUN/CMD/ENTRYPOINT the shell does.
_SUBSTITUTED = {
    "ADD", "ARG", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}
_DIRECTIVE = re.compile(r"#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(\S*)\s*$")
_FLAG = re.compile(r"--([A-Za-z][A-Za-z0-9_-]*)(?:=(\S*))?(?:\s+|$)")
_REMOTE = re.compile(r"[a-z][a-z0-9+.-]*://|git@")
_HEREDOC = re.compile(r"<<-?\s*[\"']?[A-Za-z_][A-Za-z0-9_]*[\"']?")


@dataclass
class Instruction:
    line: int
    keyword: str
    flags: list[tuple[str, str]]
    rest: str  # the arguments after the flags (and after CMD/NONE for HEALTHCHECK)
    exec_form: list[str] | None  # the JSON array, when the arguments are one
    subcommand: str = ""  # HEALTHCHECK: CMD or NONE

    @property
    def words(self) -> list[str]:
        return self.exec_form if self.exec_form is not None else self.rest.split()

    def flag(self, name: str) -> str | None:
        values = [v for k, v in self.flags if k == name]
        return values[-1] if values else None


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def position(self, ins: Instruction) -> int:
        return next(n for n, i in enumerate(self.instructions) if i is ins)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, ref: str) -> Stage | None:
        """A stage by name or index (what --from= and FROM may refer to)."""
        for s in self.stages:
            if s.name is not None and s.name.lower() == ref.lower():
                return s
        return self.stages[int(ref)] if ref.isdigit() and int(ref) < len(self.stages) else None


def _logical_lines(text: str) -> tuple[str, list[tuple[int, str]]]:
    """(escape character, [(first line number, instruction text)]), continuations joined."""
    lines = text.splitlines()
    escape = "\\"
    n = 0
    # Parser directives: only in the uninterrupted run of them at the very top; anything
    # else (an unknown `# key=value` included) is a comment and ends that run.
    while n < len(lines) and (m := _DIRECTIVE.fullmatch(lines[n].strip())) and (
        m.group(1).lower() in ("syntax", "escape", "check")
    ):
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise DockerfileError(f"line {n + 1}: invalid escape directive {m.group(2)!r}")
            escape = m.group(2)
        n += 1
    out: list[tuple[int, str]] = []
    text_so_far: list[str] = []
    start = 0
    for number, raw in enumerate(lines[n:], start=n + 1):
        stripped = raw.strip()
        if not text_so_far:
            if not stripped or stripped.startswith("#"):
                continue
            start, raw = number, raw.lstrip()
        elif not stripped or stripped.startswith("#"):
            continue  # comments and empty lines inside a continuation are dropped
        body = raw.rstrip(" \t")
        continues = body.endswith(escape)
        text_so_far.append(body[:-1] if continues else raw)
        if not continues:
            out.append((start, "".join(text_so_far)))
            text_so_far = []
    if text_so_far:  # a continuation on the last line ends the instruction
        out.append((start, "".join(text_so_far)))
    return escape, out


def _substitute(value: str, env: dict[str, str], escape: str) -> str:
    """$VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative}; an escaped $ stays literal."""
    pattern = re.escape(escape) + r"\$|\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))"

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == escape + "$":
            return "$"
        name = m.group(1) or m.group(4)
        current = env.get(name, "")
        if m.group(2) == "-":
            return current or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if current else ""
        return current

    return re.sub(pattern, replace, value)


def _exec_form(rest: str) -> list[str] | None:
    """Docker's rule: a JSON array of strings is exec form; anything else is shell form."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _pairs(rest: str) -> list[tuple[str, str | None]]:
    """`k=v k2="v 2"` (ENV, LABEL, ARG); legacy `ENV k some value`; a bare `ARG NAME`."""
    words = shlex.split(rest)
    if len(words) > 1 and "=" not in words[0]:
        key, value = rest.split(None, 1)
        return [(key, value.strip())]
    return [(k, v if sep else None) for k, sep, v in (w.partition("=") for w in words)]


def parse_dockerfile(text: str) -> Dockerfile:
    escape, lines = _logical_lines(text)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    env: dict[str, str] = {}
    for number, line in lines:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword not in _INSTRUCTIONS:
            raise DockerfileError(f"line {number}: unknown instruction {keyword}")
        if keyword in ("RUN", "COPY", "ADD") and _HEREDOC.search(rest):
            raise DockerfileError(f"line {number}: heredocs are not supported by this parser")
        flags: list[tuple[str, str]] = []
        if keyword in _WITH_FLAGS:
            while m := _FLAG.match(rest):
                flags.append((m.group(1), m.group(2) or ""))
                rest = rest[m.end():]
        subcommand = ""
        if keyword == "HEALTHCHECK":
            subcommand, _, rest = rest.partition(" ")
            subcommand, rest = subcommand.upper(), rest.strip()
            if subcommand not in ("CMD", "NONE"):
                raise DockerfileError(f"line {number}: HEALTHCHECK needs CMD or NONE")
        exec_form = _exec_form(rest) if keyword in _MAY_BE_JSON else None
        if keyword in _SUBSTITUTED:
            scope = global_args if keyword == "FROM" or not stages else env
            if exec_form is not None:
                exec_form = [_substitute(w, scope, escape) for w in exec_form]
            else:
                rest = _substitute(rest, scope, escape)
        ins = Instruction(number, keyword, flags, rest, exec_form, subcommand)
        if keyword == "FROM":
            words = rest.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                raise DockerfileError(f"line {number}: expected FROM IMAGE [AS NAME]")
            stages.append(Stage(len(stages), words[0], words[2] if len(words) == 3 else None,
                                number))
            env = {}
        elif not stages:
            if keyword != "ARG":
                raise DockerfileError(f"line {number}: only ARG may come before the first FROM")
            global_args.update((k, v or "") for k, v in _pairs(rest))
        else:
            stages[-1].instructions.append(ins)
            if keyword == "ARG":  # a bare ARG in a stage brings a global one's default in
                env.update((k, global_args.get(k, "") if v is None else v)
                           for k, v in _pairs(rest))
            elif keyword == "ENV":
                env.update((k, v or "") for k, v in _pairs(rest))
    if not stages:
        raise DockerfileError("no FROM: not a Dockerfile")
    return Dockerfile(global_args, stages)


# ------------------------------------------------------------------------ shell commands

_OPERATOR = re.compile(r"[;&|()]+")


def shell_commands(ins: Instruction) -> list[list[str]]:
    """The simple commands of a RUN: `a && b; c | d` -> [[a], [b], [c], [d]]."""
    if ins.exec_form is not None:
        return [ins.exec_form]
    lexer = shlex.shlex(ins.rest, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if _OPERATOR.fullmatch(token):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _runs(stage: Stage) -> Iterator[tuple[Instruction, list[str]]]:
    for ins in stage.all("RUN"):
        for command in shell_commands(ins):
            yield ins, command


def _pip_install_args(command: list[str]) -> list[str] | None:
    """The arguments of `pip install ...` / `python -m pip install ...`, else None."""
    for n, word in enumerate(command[:-1]):
        is_pip = re.fullmatch(r"pip(3(\.\d+)?)?", posixpath.basename(word)) is not None
        is_module = word == "pip" and n >= 1 and command[n - 1] == "-m"
        if (is_pip or is_module) and command[n + 1] == "install":
            return command[n + 2:]
    return None


def _go_duration(value: str) -> float:
    """Docker's flag durations (Go syntax): 30s, 1m30s, 500ms."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


# ===================================================================== .dockerignore


class DockerIgnore:
    """Docker's .dockerignore semantics (moby/patternmatcher): patterns are relative to the
    context root, `*` and `?` stop at `/`, `**` spans directories, `!` re-includes, the
    last matching pattern wins, and a pattern that matches a parent directory matches
    everything below it."""

    def __init__(self, text: str) -> None:
        self.patterns: list[tuple[re.Pattern[str], bool, str]] = []
        for raw in text.splitlines():
            if raw.startswith("#"):
                continue
            pattern = raw.strip()
            if not pattern:
                continue
            exception = pattern.startswith("!")
            if exception:
                pattern = pattern[1:].strip()
            pattern = posixpath.normpath(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            self.patterns.append((self._compile(pattern), exception, raw))

    @property
    def has_exceptions(self) -> bool:
        return any(exception for _, exception, _ in self.patterns)

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        out, n = "^", 0
        while n < len(pattern):
            ch = pattern[n]
            n += 1
            if ch == "*":
                if pattern[n:n + 1] == "*":
                    n += 1
                    if pattern[n:n + 1] == "/":
                        n += 1
                    out += ".*" if n == len(pattern) else "(.*/)?"
                else:
                    out += "[^/]*"
            elif ch == "?":
                out += "[^/]"
            elif ch == "\\" and n < len(pattern):
                out += re.escape(pattern[n])
                n += 1
            elif ch == "[":
                end = pattern.find("]", n + 1)
                if end == -1:
                    out += re.escape(ch)
                else:
                    body = pattern[n:end]
                    out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                    n = end + 1
            else:
                out += re.escape(ch)
        return re.compile(out + "$")

    def excluded(self, path: str) -> bool:
        path = posixpath.normpath(path)
        parents = path.split("/")[:-1]
        matched = False
        for regex, exception, _ in self.patterns:
            if exception != matched:
                continue
            match = regex.match(path) is not None
            for i in range(len(parents)):
                if match:
                    break
                match = regex.match("/".join(parents[: i + 1])) is not None
            if match:
                matched = not exception
        return matched

    def context(self, root: Path) -> list[str]:
        """Every file of the build context the Docker client would send, relative paths."""
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            rel = "" if rel == "." else rel + "/"
            if not self.has_exceptions:
                dirnames[:] = [d for d in dirnames if not self.excluded(rel + d)]
            files += [rel + f for f in filenames if not self.excluded(rel + f)]
        return sorted(files)


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def df() -> Dockerfile:
    assert DOCKERFILE.is_file(), "there is no Dockerfile at the repository root"
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    assert DOCKERIGNORE.is_file(), "there is no .dockerignore at the repository root"
    return DockerIgnore(DOCKERIGNORE.read_text())


def entry_argv(df: Dockerfile) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as `docker run IMAGE` would execute them."""
    final = df.final
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None, "the final stage has no ENTRYPOINT"
    assert entrypoint.exec_form is not None, (
        f"line {entrypoint.line}: ENTRYPOINT must be exec form (a JSON array) so ringproxy "
        "is PID 1 and receives SIGTERM itself; shell form runs it under /bin/sh -c, which "
        "neither forwards the signal nor passes CMD on"
    )
    assert cmd is not None, "the final stage has no CMD (ENTRYPOINT resets the base image's)"
    assert cmd.exec_form is not None, f"line {cmd.line}: CMD must be exec form (a JSON array)"
    return [*entrypoint.exec_form, *cmd.exec_form]


def health_command(df: Dockerfile) -> Instruction:
    health = df.final.last("HEALTHCHECK")
    assert health is not None, "the final stage has no HEALTHCHECK"
    assert health.subcommand == "CMD", f"line {health.line}: HEALTHCHECK NONE disables it"
    return health


def _final_user(df: Dockerfile) -> Instruction:
    user = df.final.last("USER")
    assert user is not None, "the final stage never sets USER, so the container runs as root"
    return user


# ======================================================================== the parser


def test_parser_reads_continuations_comments_forms_flags_and_variables() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "# escape=\\\n"
        "ARG PY=3.12\n"
        "ARG FLAVOUR\n"
        "\n"
        "# a comment\n"
        "from python:${PY}-${FLAVOUR:-slim} AS build\n"
        "RUN --mount=type=cache,target=/c \\\n"
        "    # a comment inside a continuation is dropped\n"
        "    pip wheel . && \\\n"
        "\n"
        "    echo 'a # b' ; ls | wc -l\n"
        "FROM python:${PY}-slim\n"
        "ARG PY\n"
        "ENV HOME_DIR=/var/lib/x OTHER=\"a b\"\n"
        "COPY --from=build --chown=1:1 /wheels $HOME_DIR/w\n"
        "VOLUME /a ${HOME_DIR}\n"
        "USER ${UID:-10001}\n"
        "HEALTHCHECK --interval=5s CMD [\"python\", \"-c\", \"print(1)\"]\n"
        'ENTRYPOINT ["ringproxy"]\n'
        "CMD [not json\n"
        "LABEL v=$PY x=\\$PY\n"
    )
    parsed = parse_dockerfile(text)
    assert parsed.global_args == {"PY": "3.12", "FLAVOUR": ""}
    build, final = parsed.stages
    assert (build.base, build.name, build.line) == ("python:3.12-slim", "build", 7)
    run = build.instructions[0]
    assert run.line == 8 and run.flags == [("mount", "type=cache,target=/c")]
    assert shell_commands(run) == [["pip", "wheel", "."], ["echo", "a # b"], ["ls"],
                                   ["wc", "-l"]]
    assert final.base == "python:3.12-slim" and final.name is None
    copy = final.all("COPY")[0]
    assert copy.flag("from") == "build" and copy.flag("chown") == "1:1"
    assert copy.words == ["/wheels", "/var/lib/x/w"]
    assert final.all("VOLUME")[0].words == ["/a", "/var/lib/x"]
    assert final.all("USER")[0].rest == "10001"
    health = final.all("HEALTHCHECK")[0]
    assert (health.subcommand, health.flag("interval")) == ("CMD", "5s")
    assert health.exec_form == ["python", "-c", "print(1)"]
    assert final.all("ENTRYPOINT")[0].exec_form == ["ringproxy"]
    cmd = final.all("CMD")[0]
    assert cmd.exec_form is None and cmd.rest == "[not json"  # Docker's shell-form fallback
    assert final.all("LABEL")[0].rest == "v=3.12 x=$PY"
    with pytest.raises(DockerfileError, match="heredoc"):
        parse_dockerfile("FROM x\nRUN <<EOF\necho\nEOF\n")
    with pytest.raises(DockerfileError, match="only ARG"):
        parse_dockerfile("RUN true\nFROM x\n")


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    ignore = DockerIgnore("# c\n.git\n**/__pycache__\n*.md\n!README.md\ndocs/*.txt\n/build\n")
    assert ignore.excluded(".git") and ignore.excluded(".git/HEAD")
    assert ignore.excluded("proxy/__pycache__/x.pyc") and ignore.excluded("__pycache__/y")
    assert ignore.excluded("NOTES.md") and not ignore.excluded("README.md")
    assert not ignore.excluded("proxy/NOTES.md")  # `*` stops at `/`; patterns are rooted
    assert ignore.excluded("docs/a.txt") and not ignore.excluded("docs/sub/a.txt")
    assert ignore.excluded("build/lib/x.py") and not ignore.excluded("proxy/build.py")


# ========================================================================= the stages


def test_is_multi_stage_with_a_slim_python_final_stage(df: Dockerfile) -> None:
    assert len(df.stages) >= 2, (
        f"expected a multi-stage build (a wheel-building stage, then the runtime), "
        f"found {len(df.stages)} FROM"
    )
    final = df.final
    assert df.stage(final.base) is None, (
        f"line {final.line}: the final stage must start from a clean base image, not from "
        f"the build stage {final.base!r}"
    )
    m = re.fullmatch(
        r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?"
        r"(?:@sha256:[0-9a-f]{64})?",
        final.base,
    )
    assert m, f"line {final.line}: final stage base {final.base!r} is not a python:X.Y-slim image"
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert floor, "pyproject's requires-python is not of the form >=X.Y"
    have = (int(m.group(1)), int(m.group(2)))
    need = (int(floor.group(1)), int(floor.group(2)))
    assert have >= need >= (3, 11), (
        f"final stage runs Python {have[0]}.{have[1]}; the project needs >={need[0]}.{need[1]}"
    )


def test_build_stage_builds_wheels_that_the_final_stage_installs_offline(df: Dockerfile) -> None:
    final = df.final
    builders = [s for s in df.stages[:-1]
                if any(c[:2] == ["pip", "wheel"] or (c[1:3] == ["-m", "pip"] and "wheel" in c)
                       for _, c in _runs(s))]
    assert builders, "no earlier stage runs `pip wheel` to build the wheels"
    installs = [(ins, args) for ins, c in _runs(final)
                if (args := _pip_install_args(c)) is not None]
    assert len(installs) == 1, f"expected one `pip install` in the final stage, got {installs}"
    ins, args = installs[0]
    assert "--no-index" in args, (
        f"line {ins.line}: the final stage's pip install must use --no-index, so it installs "
        "exactly the wheels built in the build stage and reaches no package index"
    )
    links = [a.split("=", 1)[1] if "=" in a else args[n + 1]
             for n, a in enumerate(args) if a.split("=", 1)[0] in ("--find-links", "-f")]
    assert links, f"line {ins.line}: pip install needs --find-links=DIR (the wheel directory)"
    # The wheel directory must come from a build stage: a bind mount for this very RUN
    # (nothing of it stays in the image), or a COPY --from= before it.
    origins: dict[str, str] = {}  # directory in the final stage -> the stage it comes from
    for name, value in ins.flags:
        if name == "mount":
            options = dict(o.partition("=")[::2] for o in value.split(","))
            target = options.get("target") or options.get("dst") or options.get("destination")
            if target and "from" in options:
                origins[target.rstrip("/")] = options["from"]
    for copy in final.all("COPY"):
        if (source := copy.flag("from")) and final.position(copy) < final.position(ins):
            origins[copy.words[-1].rstrip("/")] = source
    for link in links:
        origin = origins.get(link.rstrip("/"))
        assert origin is not None and df.stage(origin) in builders, (
            f"line {ins.line}: --find-links {link} is not the wheel directory of a build stage "
            f"(directories from other stages: {origins})"
        )


def test_final_stage_has_no_compilers_or_package_caches(df: Dockerfile) -> None:
    dev = re.compile(
        r"(gcc|g\+\+|cc|c\+\+|clang|make|cmake|build-essential|build-base|gcc-\d+|"
        r".+-dev|.+-devel)(=.*)?"
    )
    for ins, command in _runs(df.final):
        text = " ".join(command)
        if m := re.search(r"\b(apt-get|apt|apk|yum|dnf|microdnf)\s+(install|add)\b", text):
            packages = [w for w in text[m.end():].split() if not w.startswith("-")]
            bad = [p for p in packages if dev.fullmatch(p)]
            assert not bad, f"line {ins.line}: the final stage installs build tools {bad}"
            script = ins.rest
            assert "rm -rf /var/lib/apt/lists" in script or "--no-cache" in script, (
                f"line {ins.line}: a package install must clean its index in the same RUN"
            )
        if (args := _pip_install_args(command)) is not None:
            assert "--no-cache-dir" in args, (
                f"line {ins.line}: `pip install` in the final stage needs --no-cache-dir, "
                "else the wheels stay in ~/.cache/pip inside the image"
            )


# ================================================================= user and runtime


def test_runs_as_a_fixed_non_root_uid_set_after_every_install(df: Dockerfile) -> None:
    final = df.final
    user = _final_user(df)
    uid = user.rest.split(":")[0]
    assert uid not in ("root", "0", ""), f"line {user.line}: USER {user.rest} is root"
    assert uid.isdigit(), (
        f"line {user.line}: USER {user.rest}: use a numeric UID (e.g. 10001) so Kubernetes' "
        "runAsNonRoot can verify it and volume ownership is predictable"
    )
    at = final.position(user)
    late = [i.line for i in final.all("RUN") if final.position(i) > at]
    assert not late, f"USER (line {user.line}) must come after every RUN; RUN on lines {late}"
    for keyword in ("ENTRYPOINT", "CMD"):
        ins = final.last(keyword)
        assert ins is not None and final.position(ins) > at, (
            f"USER (line {user.line}) must come before {keyword}"
        )


def test_the_runtime_user_is_created_with_that_uid(df: Dockerfile) -> None:
    uid = _final_user(df).rest.split(":")[0]
    created = [
        ins.line for ins, command in _runs(df.final)
        if posixpath.basename(command[0]) in ("useradd", "adduser")
        and any(re.fullmatch(rf"(--uid|-u)(=?){uid}", a)
                or (a in ("--uid", "-u") and command[n + 1:n + 2] == [uid])
                for n, a in enumerate(command))
    ]
    assert created, (
        f"no RUN in the final stage creates user {uid} (useradd --uid {uid}); a UID without "
        "a passwd entry has no name and no home"
    )


def test_environment_is_unbuffered(df: Dockerfile) -> None:
    env: dict[str, str] = {}
    for ins in df.final.all("ENV"):
        env.update((k, v or "") for k, v in _pairs(ins.rest))
    assert env.get("PYTHONUNBUFFERED") == "1", (
        "the final stage must set ENV PYTHONUNBUFFERED=1 so logs reach `docker logs` at once"
    )


def test_labels_match_the_project(df: Dockerfile) -> None:
    labels: dict[str, str] = {}
    for ins in df.final.all("LABEL"):
        labels.update((k, v or "") for k, v in _pairs(ins.rest))
    project = PYPROJECT["project"]
    expected = {
        "org.opencontainers.image.title": project["name"],
        "org.opencontainers.image.version": project["version"],
        "org.opencontainers.image.licenses": project["license"]["text"],
    }
    wrong = {k: labels.get(k) for k, v in expected.items() if labels.get(k) != v}
    assert not wrong, f"image labels {wrong} do not match pyproject.toml: expected {expected}"


# ====================================================================== the entry command


def test_entry_command_is_exec_form_and_runs_the_config_file(df: Dockerfile) -> None:
    argv = entry_argv(df)
    assert argv == ["ringproxy", "run", "--config", CONFIG_PATH], (
        f"ENTRYPOINT + CMD resolve to {argv}, expected ringproxy run --config {CONFIG_PATH}"
    )
    assert argv[0] in PYPROJECT["project"]["scripts"], (
        f"{argv[0]!r} is not a console script the wheel installs "
        f"({sorted(PYPROJECT['project']['scripts'])})"
    )


def test_entry_command_is_a_real_cli_subcommand(df: Dockerfile, tmp_path: Path) -> None:
    argv = entry_argv(df)
    subcommand = argv[1]
    helped = cli(subcommand, "--help")
    assert helped.returncode == 0, f"`ringproxy {subcommand} --help` failed: {helped.stderr}"
    assert "--config" in helped.stdout, f"`ringproxy {subcommand}` has no --config option"
    # The image's exact arguments go through the real CLI parser: a usage error would exit 2;
    # a config file that does not exist exits 1 after the arguments were accepted.
    missing = str(tmp_path / "missing.yaml")
    result = cli(*[missing if a == CONFIG_PATH else a for a in argv[1:]])
    assert result.returncode == 1 and "cannot read the file" in result.stderr, (
        f"the CLI did not accept the image's arguments {argv[1:]}: "
        f"exit {result.returncode}, {result.stderr.strip()}"
    )


# ================================================================== ports and volumes


def test_exposes_the_proxy_and_admin_ports(df: Dockerfile) -> None:
    exposed = {int(w.split("/")[0]) for ins in df.final.all("EXPOSE") for w in ins.words
               if w.split("/")[-1] in ("tcp", w)}
    example = load_config(ROOT / "config" / "example.yaml")
    wanted = {
        "config/example.yaml listen": example.listen.port,
        "config/example.yaml admin.listen": example.admin.listen.port,
        "the admin listener's default": ADMIN_PORT,
    }
    missing = {what: port for what, port in wanted.items() if port not in exposed}
    assert not missing, f"EXPOSE {sorted(exposed)} lacks {missing}"


def test_config_and_state_directories_are_volumes(df: Dockerfile) -> None:
    final = df.final
    volumes = {w.rstrip("/") for ins in final.all("VOLUME") for w in ins.words}
    config_dir = posixpath.dirname(CONFIG_PATH)
    missing = {config_dir, STATE_DIR} - volumes
    assert not missing, f"VOLUME {sorted(volumes)} lacks {sorted(missing)}"
    assert posixpath.dirname(entry_argv(df)[-1]) in volumes, (
        "the default --config file is not inside a VOLUME, so mounting a config directory "
        "would not reach it"
    )


def test_the_state_volume_is_owned_by_the_runtime_user(df: Dockerfile) -> None:
    final = df.final
    uid = _final_user(df).rest.split(":")[0]
    chowns = [ins for ins, c in _runs(final)
              if c[0] == "chown" and STATE_DIR in [a.rstrip("/") for a in c]
              and any(re.fullmatch(rf"({uid}|ringproxy)(:\w+)?", a) for a in c)]
    assert chowns, f"no RUN in the final stage chowns {STATE_DIR} to the runtime user {uid}"
    volume = next(v for v in final.all("VOLUME")
                  if STATE_DIR in [w.rstrip("/") for w in v.words])
    assert final.position(chowns[-1]) < final.position(volume), (
        f"the chown of {STATE_DIR} (line {chowns[-1].line}) must come before its VOLUME "
        f"(line {volume.line}): changes to a declared volume's path are discarded"
    )


# ========================================================================= HEALTHCHECK


def test_healthcheck_probes_the_admin_healthz_with_the_stdlib(df: Dockerfile) -> None:
    health = health_command(df)
    text = " ".join(health.words)
    assert "/healthz" in text, f"line {health.line}: the HEALTHCHECK does not probe /healthz"
    assert text.count(f"127.0.0.1:{ADMIN_PORT}") == 1, (
        f"line {health.line}: the HEALTHCHECK must probe the admin default 127.0.0.1:"
        f"{ADMIN_PORT} (loopback works: it runs inside the container)"
    )
    assert not {"curl", "wget"} & {posixpath.basename(w) for w in health.words}, (
        f"line {health.line}: slim images have neither curl nor wget; use Python's urllib"
    )
    for name in ("interval", "timeout"):
        if (value := health.flag(name)) is not None:
            _go_duration(value)


async def _run_health(df: Dockerfile, base_url: str) -> tuple[int, str]:
    """The image's HEALTHCHECK command, run here, pointed at base_url instead of the default."""
    health = health_command(df)
    default, target = f"127.0.0.1:{ADMIN_PORT}", base_url.removeprefix("http://")
    env = dict(os.environ)
    if health.exec_form is not None:
        argv = [a.replace(default, target) for a in health.exec_form]
        if re.fullmatch(r"python(3(\.\d+)?)?", argv[0]):
            argv[0] = sys.executable  # the image's `python` is this project's interpreter
    else:
        argv = ["/bin/sh", "-c", health.rest.replace(default, target)]
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    timeout = _go_duration(health.flag("timeout") or "30s")
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout + 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout}s"
    return proc.returncode or 0, out.decode(errors="replace")


async def test_healthcheck_command_passes_on_a_live_proxy_and_fails_otherwise(
    df: Dockerfile, spawn, tmp_path: Path
) -> None:
    # The image's own entry command, its config path pointed at a real config.
    config = write_config(tmp_path, "http://127.0.0.1:1")  # admin on a free port; no upstream
    args = [str(config) if a == CONFIG_PATH else a for a in entry_argv(df)[1:]]
    running = await spawn(*args)
    admin_url = (await running.wait_listening(ADMIN_LISTENING)).group(1).decode()
    proxy = LISTENING.search(running.stderr)
    assert proxy is not None, running.stderr.decode()

    code, out = await _run_health(df, admin_url)
    assert code == 0, f"the HEALTHCHECK command failed against a live admin listener: {out}"

    # The proxy listener answers /healthz with a 502 (nothing upstream): must be unhealthy.
    code, out = await _run_health(df, proxy.group(1).decode())
    assert code != 0, "the HEALTHCHECK command passed on an HTTP 502"

    exit_code, _, err = await running.finish(signal.SIGTERM)
    assert exit_code == 0, err
    code, out = await _run_health(df, admin_url)
    assert code != 0, "the HEALTHCHECK command passed with the proxy stopped"


# ====================================================================== build context


def test_every_copy_source_exists_and_is_in_the_build_context(
    df: Dockerfile, ignore: DockerIgnore
) -> None:
    checked, context = 0, ignore.context(ROOT)
    for stage in df.stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            if ins.flag("from") is not None:
                continue
            *sources, _dest = ins.words
            assert sources, f"line {ins.line}: {ins.keyword} needs a source and a destination"
            for source in sources:
                if ins.keyword == "ADD" and _REMOTE.match(source):
                    continue  # test_no_add_of_remote_urls
                rel = posixpath.normpath(source.lstrip("/"))
                assert not rel.startswith(".."), f"line {ins.line}: {source} leaves the context"
                matches = [ROOT] if rel == "." else sorted(ROOT.glob(rel))
                assert matches, f"line {ins.line}: {ins.keyword} source {source!r} does not exist"
                for path in matches:
                    name = path.relative_to(ROOT).as_posix()
                    assert name == "." or not ignore.excluded(name), (
                        f"line {ins.line}: {ins.keyword} source {name!r} is excluded by "
                        ".dockerignore, so the build would fail"
                    )
                    if path.is_dir():
                        prefix = "" if name == "." else name + "/"
                        assert any(f.startswith(prefix) for f in context), (
                            f"line {ins.line}: everything under {name!r} is excluded"
                        )
                checked += 1
    assert checked, "no COPY from the build context at all"


def test_no_add_of_remote_urls(df: Dockerfile) -> None:
    remote = [(ins.line, w) for s in df.stages for ins in s.all("ADD") for w in ins.words[:-1]
              if _REMOTE.match(w)]
    assert not remote, f"ADD of remote sources (unpinned, unverified downloads): {remote}"


def test_dockerignore_keeps_out_what_the_image_must_not_see(ignore: DockerIgnore) -> None:
    kept_out = [".venv/bin/python", ".git/HEAD", "tests/test_x.py", "loadtests/bench.py",
                "proxy/__pycache__/cli.cpython-312.pyc", ".pytest_cache/v/x",
                ".mypy_cache/x.json", ".ruff_cache/x", "ringproxy.egg-info/PKG-INFO",
                "build/lib/proxy/cli.py", "dist/ringproxy-0.1.0.tar.gz", ".env"]
    leaked = [p for p in kept_out if not ignore.excluded(p)]
    assert not leaked, f".dockerignore lets these into the build context: {leaked}"
    needed = ["pyproject.toml", "README.md", "proxy/__init__.py", "proxy/py.typed",
              "proxy/demo/demo.yaml"]
    dropped = [p for p in needed if ignore.excluded(p)]
    assert not dropped, f".dockerignore keeps out files the wheel build needs: {dropped}"


def test_build_stage_copies_a_complete_project(
    df: Dockerfile, ignore: DockerIgnore, tmp_path: Path
) -> None:
    """Replay the wheel stage's COPYs from the filtered context; what `pip wheel` sees must
    be the whole project: pyproject, its readme, every package file, and it must run."""
    stage = next(s for s in df.stages[:-1]
                 if any("wheel" in c and any("pip" in w for w in c) for _, c in _runs(s)))
    context = ignore.context(ROOT)
    image = tmp_path / "image"
    workdir, build_dir = "/", None
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, ins.rest)
        elif ins.keyword == "COPY" and ins.flag("from") is None:
            *sources, dest = ins.words
            target = posixpath.join(workdir, dest)
            for source in sources:
                rel = posixpath.normpath(source.lstrip("/"))
                for path in [ROOT] if rel == "." else sorted(ROOT.glob(rel)):
                    name = path.relative_to(ROOT).as_posix()
                    if path.is_dir():  # a directory's contents are copied, not the directory
                        prefix = "" if name == "." else name + "/"
                        pairs = [(f, posixpath.join(target, f[len(prefix):]))
                                 for f in context if f.startswith(prefix)]
                    elif dest.endswith("/") or len(sources) > 1:
                        pairs = [(name, posixpath.join(target, path.name))]
                    else:
                        pairs = [(name, target)]
                    for src, dst in pairs:
                        out = image / dst.lstrip("/")
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(ROOT / src, out)
        elif ins.keyword == "RUN" and build_dir is None:
            for command in shell_commands(ins):
                if "wheel" in command and any("pip" in w for w in command):
                    build_dir = posixpath.join(workdir, command[-1])
                    break
    assert build_dir is not None, "the build stage never runs `pip wheel`"
    project = image / build_dir.lstrip("/")
    assert (project / "pyproject.toml").is_file(), f"pyproject.toml is not copied to {build_dir}"
    # setup.py compiles the data plane (mypyc): without it the image would run it interpreted.
    assert (project / "setup.py").is_file(), f"setup.py is not copied to {build_dir}"
    readme = PYPROJECT["project"].get("readme")
    if isinstance(readme, str):
        assert (project / readme).is_file(), f"pyproject's readme {readme} is not copied"
    package_files = [f for f in context if f.startswith("proxy/")]
    missing = [f for f in package_files if not (project / f).is_file()]
    assert not missing, f"package files not copied into the build stage: {missing}"
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = project.joinpath(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"package data {package}/{pattern} not copied"
    # The copied package runs on its own (not the checkout's): it loads its demo config.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, proxy, proxy.cli; print(proxy.__file__); "
         "sys.exit(proxy.cli.main(['check', sys.argv[1]]))",
         str(project / "proxy" / "demo" / "demo.yaml")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(project)},
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(project)), (
        f"imported the checkout's package instead of the copy: {probe.stdout}"
    )


# ======================================================== a real build, where possible


def _docker_unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not on PATH"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30s"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`docker info` failed, no Docker engine reachable ({last})"
    return None


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(1500)
def test_image_builds_and_runs_as_promised(df: Dockerfile, tmp_path: Path) -> None:
    if reason := _docker_unavailable():
        pytest.skip(f"building the image needs a Docker engine: {reason}")
    tag, container = f"ringproxy-test:{os.getpid()}", f"ringproxy-test-{os.getpid()}"
    try:
        build = _docker("build", "-t", tag, str(ROOT), timeout=1200)
        assert build.returncode == 0, f"docker build failed:\n{build.stderr[-6000:]}"
        config = json.loads(_docker("image", "inspect", tag).stdout)[0]["Config"]
        assert config["User"] == _final_user(df).rest
        assert [*config["Entrypoint"], *config["Cmd"]] == entry_argv(df)
        assert {"8080/tcp", f"{ADMIN_PORT}/tcp"} <= set(config["ExposedPorts"])
        assert config["Healthcheck"]["Test"][0] in ("CMD", "CMD-SHELL")
        version = _docker("run", "--rm", tag, "--version")
        assert version.stdout.strip() == f"ringproxy {PYPROJECT['project']['version']}"
        probe = _docker("run", "--rm", "--entrypoint", "python", tag, "-c",
                        "import os, shutil; print(os.getuid(), "
                        "[c for c in ('gcc', 'cc', 'make') if shutil.which(c)])")
        assert probe.stdout.strip().split(maxsplit=1) == [_final_user(df).rest.split(":")[0], "[]"]
        # Serve with a config mounted as a directory, and wait for Docker to call it healthy.
        conf_dir = tmp_path / "conf"
        conf_dir.mkdir()
        (conf_dir / "config.yaml").write_text(
            "listen: 0.0.0.0:8080\npools: {app: {servers: ['http://127.0.0.1:1']}}\n"
            "routes: [{name: api, rings: [{name: stable, pool: app}]}]\n"
        )
        conf_dir.chmod(0o755)
        (conf_dir / "config.yaml").chmod(0o644)
        started = _docker("run", "-d", "--name", container,
                          "-v", f"{conf_dir}:{posixpath.dirname(CONFIG_PATH)}:ro", tag)
        assert started.returncode == 0, started.stderr
        status = ""
        for _ in range(60):
            status = _docker("inspect", "--format", "{{.State.Health.Status}}",
                             container).stdout.strip()
            if status != "starting":
                break
            time.sleep(1)
        logs = _docker("logs", container)
        assert status == "healthy", f"container health is {status!r}:\n{logs.stderr}"
        stopped = _docker("stop", container, timeout=60)
        assert stopped.returncode == 0
        exit_code = _docker("inspect", "--format", "{{.State.ExitCode}}", container)
        assert exit_code.stdout.strip() == "0", "ringproxy did not exit 0 on SIGTERM"
    finally:
        _docker("rm", "-f", container)
        _docker("rmi", "-f", tag)
