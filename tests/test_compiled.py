"""The compiled request path (proxy/compiled.py, setup.py): which modules, the pure-Python
switch, stale extensions.  Real subprocesses; the installed package as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy import compiled

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env}, check=True)
    return done.stdout.strip()


def test_every_listed_module_is_a_source_file_of_the_package() -> None:
    paths = compiled.source_paths()
    assert len(paths) == len(set(paths)) == len(compiled.MODULES)
    for path in paths:
        assert (ROOT / path).is_file(), path
    # setup.py reads the same list (the one place), without importing the package.
    assert "_compiled_list()" in (ROOT / "setup.py").read_text()


def test_the_pure_python_switch_imports_every_module_from_its_source() -> None:
    origins = _run(
        "import proxy.compiled as c, importlib\n"
        "for m in c.MODULES: print(importlib.import_module(m).__file__)\n"
        "print(c.describe())",
        RINGPROXY_PURE_PYTHON="1",
    ).splitlines()
    assert all(o.endswith(".py") for o in origins[:-1]), origins
    assert origins[-1] == "data plane: interpreted (RINGPROXY_PURE_PYTHON is set)"


def test_version_says_which_data_plane_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    cli = shutil.which("ringproxy", path=str(Path(sys.executable).parent))
    assert cli is not None
    out = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=60,
                         env=env, check=True).stdout
    assert out.strip() == f"ringproxy 0.1.0 ({compiled.describe()})"
    if compiled.compiled():
        assert "compiled (mypyc)" in out


def test_a_source_newer_than_its_extension_is_stale(tmp_path: Path) -> None:
    """A copy of the package whose extension predates an edited source: ``stale`` names
    it (the test suite and the start-up log act on that)."""
    done = compiled.compiled()
    if not done:
        pytest.skip("the data plane is not compiled here (no extension to be stale)")
    name = done[0]
    module = sys.modules.get(name) or __import__(name, fromlist=["_"])
    extension = Path(module.__file__ or "")
    package = tmp_path / "copy"
    shutil.copytree(ROOT / "proxy", package / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for lib in ROOT.glob("proxy_compiled__mypyc*"):
        shutil.copy2(lib, package / lib.name)
    source = package / (name.replace(".", "/") + ".py")
    copied = source.with_name(extension.name)
    assert copied.is_file()
    now = time.time()
    os.utime(copied, (now - 60, now - 60))
    os.utime(source, (now, now))
    code = ("import proxy.compiled as c; print(c.stale())")
    out = subprocess.run([sys.executable, "-c", code], cwd=package, capture_output=True,
                         text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(package)}).stdout
    assert str(source) in out
    os.utime(copied, (now + 60, now + 60))
    out = subprocess.run([sys.executable, "-c", code], cwd=package, capture_output=True,
                         text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(package)}).stdout
    assert out.strip() == "[]"
