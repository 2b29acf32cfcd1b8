"""Building and loading the C library (``cbam_dsa.ops.cpu.build``): a verified cache, atomic builds done once under a
lock, bounded external steps, remembered failures, the cache location's fallbacks, ``CC`` with arguments, and one
warning when the fast path falls back.

Most tests use a fake compiler, a shell script that logs each call and copies a real library (built once, in the
default cache) where a link step would write one: they need no compile and take about a second. Fresh processes
(subprocesses) check what must hold across processes. The tests that compile for real are marked slow.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.ops.cpu import build

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the fake compilers are POSIX shell scripts")
fcntl = pytest.importorskip("fcntl", reason="the lock test holds an flock")

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


# ----------------------------------------------------------------------------------------------------------
# The cache: verified before it is loaded.


def test_a_build_writes_the_library_and_its_record_last(fresh, fakecc, prebuilt):
    assert build.library() is not None
    (library,) = libraries(fresh)
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["file"] == library.name
    assert record["size"] == library.stat().st_size == prebuilt.stat().st_size
    assert record["sha256"] == sha256(library) == sha256(prebuilt)
    assert fakecc.calls("compile") == 2 and fakecc.calls("link") == 1
    assert not list(fresh.glob(".build-*")), "the temporary build folder must be removed"
    build._state.clear()  # a second load (as a new process would) reuses the verified library
    assert build.library() is not None
    assert fakecc.calls("link") == 1


def test_a_truncated_library_is_rebuilt_by_a_fresh_process_and_never_loaded(fresh, fakecc, prebuilt):
    assert build.library() is not None
    (library,) = libraries(fresh)
    data = library.read_bytes()
    library.unlink()  # a new file: the library this process has mapped stays intact
    library.write_bytes(data[: len(data) // 2])  # as an interrupted copy or a full disk leaves it
    result = report(run_python(LOAD_AND_REPORT))
    assert result["loaded"] and result["works"], result
    assert fakecc.calls("link") == 2, "the damaged library must be built again"
    assert sha256(library) == sha256(prebuilt)


DAMAGES = {
    "one_byte_changed": lambda data: data[:4096] + bytes([data[4096] ^ 0xFF]) + data[4097:],
    "foreign_file": lambda data: b"\x7fELF" + b"\0" * 60,
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", [*DAMAGES, "record_missing", "record_of_another_file"])
def test_a_damaged_or_foreign_library_is_built_again_not_loaded(damage, fresh, fakecc, prebuilt):
    assert build.library() is not None
    (library,) = libraries(fresh)
    record = library.with_suffix(".json")
    if damage == "record_missing":
        record.unlink(missing_ok=True)
    elif damage == "record_of_another_file":
        record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    else:
        data = library.read_bytes()
        library.unlink()
        library.write_bytes(DAMAGES[damage](data))
    build._state.clear()
    opened = []
    real_cdll = ctypes.CDLL

    def spy(name, *args, **kwargs):
        opened.append((name, sha256(Path(name))))
        return real_cdll(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ctypes, "CDLL", spy)
        assert build.library() is not None
    assert fakecc.calls("link") == 2, f"{damage}: the library must be built again"
    assert opened and all(digest == sha256(prebuilt) for _, digest in opened), f"{damage}: loaded {opened}"
    assert sha256(library) == sha256(prebuilt)


def test_a_build_removes_what_killed_builds_left_a_day_ago(fresh, fakecc):
    fresh.mkdir(parents=True)
    old_folder, old_record, recent = fresh / ".build-killed", fresh / ".kernels-0123.json-tmp", fresh / ".build-running"
    old_folder.mkdir()
    (old_folder / "kernels_f32.o").write_text("object")
    old_record.write_text("{")
    recent.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (old_folder / "kernels_f32.o", old_folder, old_record):
        os.utime(path, (two_days_ago, two_days_ago))
    assert build.library() is not None
    assert not old_folder.exists() and not old_record.exists()
    assert recent.exists(), "a recent folder may be another build's, still running"


# ----------------------------------------------------------------------------------------------------------
# Bounded steps, remembered failures.


def _state_of(pid: int) -> str:
    """The state letter of process ``pid`` (``Z``: a zombie), or ``""`` where it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("step", ["version", "compile", "link"])
def test_a_hanging_step_is_stopped_within_the_timeout(step, fresh, fakecc, monkeypatch, tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    setattr(fakecc, f"on_{step}", f'sleep 30 & echo $! > "{pid_file}"; wait')
    fakecc.write()
    monkeypatch.setenv("CBAM_DSA_BUILD_TIMEOUT", "1")
    loaded, messages, seconds = load_recording()
    assert seconds < 15, f"the {step} step ran {seconds:.0f} s"
    assert loaded is None
    assert len(messages) == 1 and "did not finish within 1 s" in messages[0], messages
    assert "CBAM_DSA_BUILD_TIMEOUT" in build.why()
    # SIGKILL is delivered at once, but a loaded machine may take a moment to schedule the child's exit
    sleeper, deadline = int(pid_file.read_text()), time.monotonic() + 5
    while _state_of(sleeper) not in ("", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state_of(sleeper) in ("", "Z"), "the step's children must be killed too"


def test_a_failed_build_is_remembered_across_processes_and_retried_for_another_compiler(fresh, failingcc, monkeypatch):
    loaded, messages, _ = load_recording()
    assert loaded is None and failingcc.calls("compile") == 1
    result = report(run_python(LOAD_AND_REPORT))  # a fresh process does not try again
    assert failingcc.calls("compile") == 1, "a fresh process must not retry a build that failed"
    assert len(messages) == 1 and "cannot compile" in messages[0], messages
    assert not result["loaded"], result
    (marker,) = fresh.glob("kernels-*.failed")
    assert "cannot compile" in result["why"] and str(marker) in result["why"]
    assert result["at_import"] == 0 and len(result["warnings"]) == 1, "one warning, at first use, not at import"
    failingcc.version = "fakecc 2.0"  # another compiler: tried again
    failingcc.write()
    build._state.clear()
    assert load_recording()[0] is None
    assert failingcc.calls("compile") == 2


def test_a_changed_source_tries_a_failed_build_again(fresh, failingcc, monkeypatch, tmp_path):
    assert load_recording()[0] is None
    build._state.clear()
    assert load_recording()[0] is None
    assert failingcc.calls("compile") == 1, "the same source and compiler: not tried again"
    changed = tmp_path / "kernels.c"
    changed.write_text(build.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(build, "SOURCE", changed)
    build._state.clear()
    assert load_recording()[0] is None
    assert failingcc.calls("compile") == 2


@pytest.mark.parametrize("name", ["CBAM_DSA_BUILD_TIMEOUT", "CBAM_DSA_LOCK_TIMEOUT"])
@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_timeout_setting_is_a_value_error_naming_it(name, value, fresh, fakecc, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        build.library()


# ----------------------------------------------------------------------------------------------------------
# Concurrent first use: one build, the others wait for it, with a deadline.


@pytest.mark.slow
def test_concurrent_first_use_by_several_processes_builds_once(fresh, fakecc, tmp_path):
    fakecc.on_link = f'sleep 2; cp "{fakecc.prebuilt}" "$out"'  # a slow build: the others arrive while it runs
    fakecc.write()
    go = tmp_path / "go"
    code = f"""
        import json, os, pathlib, sys, time
        from cbam_dsa.ops.cpu import build
        pathlib.Path(sys.argv[1]).touch()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print(json.dumps({{"loaded": build.library() is not None}}))
    """
    environment = {**os.environ, "PYTHONPATH": SRC}
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    processes = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(flag)], env=environment,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for flag in ready
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()  # all three start loading together
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["loaded"], out
    assert fakecc.calls("compile") == 2 and fakecc.calls("link") == 1, fakecc.log.read_text()
    assert len(libraries(fresh)) == 1


def test_waiting_for_another_build_has_a_deadline(fresh, fakecc, monkeypatch):
    assert build.library() is not None
    (library,) = libraries(fresh)
    library.unlink()  # a build is due again (the mapped copy stays intact)
    monkeypatch.setenv("CBAM_DSA_LOCK_TIMEOUT", "0.5")
    with open(library.with_suffix(".lock"), "a") as held:  # another process is building
        fcntl.flock(held, fcntl.LOCK_EX)
        build._state.clear()
        loaded, messages, seconds = load_recording()
        assert loaded is None and fakecc.calls("link") == 1, "this process must wait for the other one's build"
        assert seconds < 10
        assert len(messages) == 1 and "another process has been building" in messages[0], messages
    assert not list(fresh.glob("*.failed")), "waiting too long is not a failed build"
    build._state.clear()  # the lock released: this process builds
    assert build.library() is not None and fakecc.calls("link") == 2


# ----------------------------------------------------------------------------------------------------------
# The environment: where the cache goes, CC with arguments.


@pytest.fixture
def no_home(monkeypatch):
    """HOME unset and no passwd entry for the user: the home directory cannot be determined."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("CBAM_DSA_CACHE", raising=False)

    def nowhere(cls=None):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(nowhere))
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)


@pytest.fixture
def private_tmp(monkeypatch, tmp_path) -> Path:
    """An empty temporary directory for the test (``tempfile.gettempdir()``)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def user_temp(private_tmp: Path) -> Path:
    return private_tmp / f"cbam_dsa-{os.getuid()}"


@pytest.mark.parametrize("xdg", [True, False], ids=["with_xdg", "without_xdg"])
def test_no_home_directory(xdg, fresh, fakecc, no_home, private_tmp, monkeypatch, tmp_path):
    if xdg:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    else:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    expected = tmp_path / "xdg" / "cbam_dsa" if xdg else user_temp(private_tmp)
    assert build.library() is not None
    assert len(libraries(expected)) == 1


@pytest.mark.parametrize("xdg", ["", "relative/cache"], ids=["empty", "relative"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(xdg, fresh, fakecc, monkeypatch, tmp_path):
    monkeypatch.delenv("CBAM_DSA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert build.library() is not None
    assert len(libraries(tmp_path / "home" / ".cache" / "cbam_dsa")) == 1
    assert not list(cwd.rglob("*")), "nothing may be written to the current directory"


def unwritable_cache(kind: str, tmp_path: Path) -> Path:
    if kind == "read_only_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    blocker = tmp_path / "a-file"  # a path below a regular file: no one can create it, root neither
    blocker.write_text("")
    return blocker / "cache"


@pytest.mark.parametrize("kind", ["read_only_dir", "below_a_file"])
def test_an_unwritable_cache_falls_back_to_a_private_temporary_folder(kind, fresh, fakecc, private_tmp, monkeypatch,
                                                                     tmp_path):  # fmt: skip
    monkeypatch.setenv("CBAM_DSA_CACHE", str(unwritable_cache(kind, tmp_path)))
    assert build.library() is not None
    folder = user_temp(private_tmp)
    assert len(libraries(folder)) == 1
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_without_any_writable_folder_the_library_is_built_without_a_cache(fresh, fakecc, private_tmp, monkeypatch,
                                                                          tmp_path):  # fmt: skip
    monkeypatch.setenv("CBAM_DSA_CACHE", str(unwritable_cache("below_a_file", tmp_path)))
    user_temp(private_tmp).write_text("not a folder")  # the per-user temporary folder is not usable either
    assert build.library() is not None
    assert build.cache_dir() is None
    assert fakecc.calls("link") == 1
    assert sorted(p.name for p in private_tmp.iterdir()) == [user_temp(private_tmp).name], "no build folder left"


def test_a_temporary_folder_others_can_write_is_not_used(fresh, fakecc, private_tmp, monkeypatch, tmp_path):
    monkeypatch.setenv("CBAM_DSA_CACHE", str(unwritable_cache("below_a_file", tmp_path)))
    folder = user_temp(private_tmp)
    folder.mkdir()
    folder.chmod(0o777)  # writable by anyone: someone could plant a library there
    assert build.library() is not None
    assert not list(folder.iterdir()), "nothing may be loaded from or written to a folder others can write"
    assert build.cache_dir() is None


@pytest.mark.slow
def test_cc_with_arguments_builds_the_real_library(fresh, monkeypatch):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", f"{compiler} -O2")
    library = build.library()
    assert library is not None, getattr(build, "why", lambda: None)()
    for name in build.ENTRY_POINTS:
        assert getattr(library, name)
    (built,) = libraries(fresh)
    assert json.loads(built.with_suffix(".json").read_text())["compiler"] == [compiler, "-O2"]


# ----------------------------------------------------------------------------------------------------------
# The fallback is announced once; the switch silences it.


def test_the_fallback_warning_is_given_once_with_the_reason_and_the_fix(fresh, failingcc, monkeypatch):
    block = CBAMResidualDynamicSA(4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the count is the library's own doing, not the filters'
        for _ in range(3):
            block(x)
            build.library()
    messages = [str(w.message) for w in caught if w.category.__name__ == "NativeBuildWarning"]
    assert len(messages) == 1, messages
    (message,) = messages
    assert "cannot compile" in message and "exit status 1" in message  # why
    assert "install a C compiler" in message and "CC" in message  # how to fix it
    assert "CBAM_DSA_NATIVE=0" in message  # how to silence it
    assert build.why() in message
    build._state.clear()  # as a new process: the switch silences it, and nothing is compiled
    monkeypatch.setenv("CBAM_DSA_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.library() is None
        block(x)
    assert failingcc.calls("compile") == 1
    assert build.why() == "disabled by CBAM_DSA_NATIVE=0"


# ----------------------------------------------------------------------------------------------------------
# The entry points report failures as a status, never a crash.


ENTRY_POINT_STATUS = """
    import ctypes, json
    from cbam_dsa.ops.cpu import build
    lib = build.library()
    results = []
    for suffix in build.SCALARS:
        for dims in ([-1] + [1] * 14, [1] * 5 + [1 << 20, 1 << 30] + [1] * 8):
            d = (ctypes.c_int64 * 15)(*dims)
            scal = (ctypes.c_double * 2)(1.0, 1.0)
            f = getattr(lib, "block_forward_" + suffix)
            f.argtypes, f.restype = [ctypes.c_void_p] * 5 + [ctypes.c_int], ctypes.c_int
            results.append(f(None, None, None, ctypes.addressof(d), ctypes.addressof(scal), 1))
            b = getattr(lib, "block_backward_" + suffix)
            b.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int]
            b.restype = ctypes.c_int
            results.append(b(None, None, None, None, None, None, 0, ctypes.addressof(d), ctypes.addressof(scal), 1))
    print(json.dumps(results))
"""


def test_the_entry_points_return_a_status_for_bad_dimensions_and_failed_allocations(fresh, fakecc):
    result = run_python(ENTRY_POINT_STATUS)
    assert result.returncode == 0, f"the process died (status {result.returncode}): {result.stderr[-2000:]}"
    bad, no_memory = 2, 1  # a negative batch: a bad argument; 2^50 mixing entries: the allocation fails
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [bad, bad, no_memory, no_memory] * 2


@pytest.mark.parametrize(
    ("entry_point", "status", "error", "words"),
    [
        ("block_forward", 1, MemoryError, "out of memory"),
        ("block_forward", 2, RuntimeError, "invalid dimensions"),
        ("block_backward", 1, MemoryError, "out of memory"),
        ("block_backward", 7, RuntimeError, "unknown error code 7"),
    ],
)
def test_a_failing_entry_point_raises_through_the_block(entry_point, status, error, words, monkeypatch):
    """A nonzero status from the C code reaches the caller of the block as an exception that says what failed."""
    from cbam_dsa.ops.cpu import native

    monkeypatch.setenv("CBAM_DSA_NATIVE", "1")
    kernels = native.library()
    if kernels is None:
        pytest.skip(f"the C kernels are unavailable here: {build.why()}")
    real = kernels._functions[entry_point, torch.float64]
    monkeypatch.setitem(kernels._functions, (entry_point, torch.float64), lambda *args: (real(*args), status)[1])
    block = CBAMResidualDynamicSA(4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(error, match=f"{entry_point} failed: {words}"):
        block(x).sum().backward()
