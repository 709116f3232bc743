"""The build's one step beyond pyproject.toml: the request path compiled by mypyc.

The modules ``proxy/compiled.py`` names (the data plane, the per-request metrics and assignment) are
compiled to C extensions by mypyc (mypy's compiler, as black and mypy itself ship): the
same type-checked Python source, run without the interpreter's dispatch, about a fifth of
the data plane's CPU per request (``loadtests/bench.py``).  The ``.py`` files stay in the
package and are what runs wherever the extensions are not there.

- Needs a C compiler and Python's headers (Debian: ``gcc`` and ``python3-dev``; the
  official Python images have the headers).  Without them the build says so and installs
  the pure-Python package, which behaves the same, slower.
- ``RINGPROXY_PURE_PYTHON=1`` skips compiling (the interpreted data plane, e.g. to debug it
  with pdb).
- ``ringproxy version`` and the start-up log say which data plane runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _compiled_list() -> list[str]:
    """``proxy/compiled.py``'s modules (the one list; loaded alone, not the package, whose
    dependencies the build environment does not have)."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "_ringproxy_compiled", os.path.join(here, "proxy", "compiled.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths: list[str] = module.source_paths()
    return paths



class OptionalBuildExt(build_ext):
    """A failed compile is a warning and the pure-Python package, never a failed install.

    All or nothing: the compiled modules share one library (``proxy_compiled__mypyc``), so
    after a failure every output already built is removed (a module without its library
    would not import)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            _say(f"compiling the data plane failed ({exc}); installing it as pure Python "
                 "(slower; install gcc and the Python headers to compile it)")


def _say(message: str) -> None:
    print(f"ringproxy: {message}", file=sys.stderr)


def ext_modules() -> list[object]:
    if os.environ.get("RINGPROXY_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not installed; the data plane stays pure Python")
        return []
    # The build environment has the compiled modules' typed dependencies (pyproject's
    # build-system.requires: httptools, mmh3, prometheus-client), not the rest: the types
    # of the others are Any, and the strict checks that Any trips are off here (CI's
    # `mypy --strict` checks the code; this step only compiles it).
    relaxed = ["--ignore-missing-imports", "--no-warn-return-any", "--no-warn-unused-ignores",
               "--allow-subclassing-any", "--allow-untyped-decorators",
               "--allow-untyped-calls"]
    try:
        return list(mypycify([*relaxed, *_compiled_list()], opt_level="3",
                             group_name="proxy_compiled"))
    except (Exception, SystemExit) as exc:
        _say(f"mypyc could not translate the data plane ({exc!r}); it stays pure Python")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
