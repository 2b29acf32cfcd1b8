"""Fixtures and helpers shared by the tests of the C library's build (``test_cpu_build*.py``).

:class:`FakeCompiler` is a shell script that logs each call and copies a real library (built once, in the default
cache: the ``prebuilt`` fixture) where a link step would write one, so most tests need no compile. ``fresh`` gives
a test an empty cache and nothing loaded; ``fakecc`` and ``failingcc`` set ``CC`` to a fake compiler that works or
fails. :func:`run_python` and :data:`LOAD_AND_REPORT` check in a fresh process what must hold across processes.
The fixtures are registered for every test file by ``pytest_plugins`` in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from cbam_dsa.ops.cpu import build

SRC = str(Path(build.__file__).resolve().parents[3])  # the folder holding the package, for the subprocesses


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    """A copy of a real library, built once (or found) in the default cache; the fake compilers install it."""
    saved = dict(build._state)
    library = build.library()
    build._state.clear()
    build._state.update(saved)
    if library is None:
        pytest.skip(f"no C library can be built here: {build.why()}")
    copy = tmp_path_factory.mktemp("prebuilt") / "kernels.so"
    shutil.copyfile(library._name, copy)
    return copy


@pytest.fixture
def fresh(monkeypatch, tmp_path) -> Path:
    """Nothing loaded, an empty cache folder (returned), the library enabled, no timeouts set; the real state comes
    back after the test."""
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("CBAM_DSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    for name in ("CBAM_DSA_BUILD_TIMEOUT", "CBAM_DSA_LOCK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


class FakeCompiler:
    """A compiler script: ``--version`` prints :attr:`version`; ``-c`` runs ``on_compile``, ``-shared`` runs
    ``on_link`` (shell lines; ``$out`` is the output file); each compile and link appends a line to :attr:`log`."""

    def __init__(self, folder: Path, prebuilt: Path | None, version: str = "fakecc 1.0") -> None:
        self.path, self.log = folder / "fakecc", folder / "fakecc.log"
        self.prebuilt, self.version = prebuilt, version
        self.on_version, self.on_compile = "", 'echo object > "$out"'
        self.on_link = f'cp "{prebuilt}" "$out"' if prebuilt else "exit 1"
        self.write()

    def write(self) -> FakeCompiler:
        script = f"""\
            #!/bin/sh
            for a in "$@"; do
              if [ "$a" = --version ]; then {self.on_version or ":"}; echo "{self.version}"; exit 0; fi
            done
            out=; link=0
            while [ $# -gt 0 ]; do
              case "$1" in -o) out="$2"; shift;; -shared) link=1;; esac
              shift
            done
            if [ $link = 1 ]; then
              echo "link $out" >> "{self.log}"; {self.on_link}
            else
              echo "compile $out" >> "{self.log}"; {self.on_compile}
            fi
            """
        self.path.write_text(textwrap.dedent(script))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)
        return self

    def calls(self, kind: str) -> int:
        """How many compile or link steps ran so far."""
        if not self.log.exists():
            return 0
        return sum(line.startswith(kind + " ") for line in self.log.read_text().splitlines())


@pytest.fixture
def fakecc(tmp_path, prebuilt, monkeypatch) -> FakeCompiler:
    """A fake compiler that installs the prebuilt library, set as ``CC``."""
    compiler = FakeCompiler(tmp_path, prebuilt)
    monkeypatch.setenv("CC", str(compiler.path))
    return compiler


@pytest.fixture
def failingcc(tmp_path, monkeypatch) -> FakeCompiler:
    """A fake compiler whose compile step fails, set as ``CC`` (needs no real library)."""
    compiler = FakeCompiler(tmp_path, None)
    compiler.on_compile = 'echo "fakecc: error: this compiler cannot compile" >&2; exit 1'
    compiler.write()
    monkeypatch.setenv("CC", str(compiler.path))
    return compiler


def load_recording() -> tuple[object, list[str], float]:
    """``build.library()``, the messages of the fallback warnings it gave, and the seconds it took."""
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # counted here, not deduplicated by the filters
        loaded = build.library()
    messages = [str(w.message) for w in caught if w.category.__name__ == "NativeBuildWarning"]
    return loaded, messages, time.monotonic() - start


def libraries(folder: Path) -> list[Path]:
    return sorted(folder.glob("kernels-*.so"))


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this environment (plus ``env``) and the package on its path."""
    environment = {**os.environ, **env, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


LOAD_AND_REPORT = """
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import cbam_dsa
        from cbam_dsa.ops.cpu import build
        at_import = len(caught)
        lib = build.library()
    why = getattr(build, "why", lambda: None)()
    works = False
    if lib is not None:
        import torch
        block = cbam_dsa.CBAMResidualDynamicSA(4).double()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        block(x).sum().backward()
        fast = x.grad.clone()
        block.fast_path, x.grad = False, None
        block(x).sum().backward()
        works = bool(torch.allclose(fast, x.grad, rtol=1e-9, atol=1e-12))
    print(json.dumps({"loaded": lib is not None, "works": works, "why": why, "at_import": at_import,
                      "warnings": [str(w.message) for w in caught if w.category.__name__ == "NativeBuildWarning"]}))
"""


def report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, f"the fresh process died (status {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])
