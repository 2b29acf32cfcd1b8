"""Building and loading the C library (``cbam_dsa.ops.cpu.build``): a verified cache, and atomic builds done once
under a lock by one of several processes, the others waiting with a deadline.

Most tests use a fake compiler (``cpu_build_helpers.FakeCompiler``), a shell script that logs each call and copies a
real library (built once, in the default cache) where a link step would write one: they need no compile and take
about a second. Fresh processes (subprocesses) check what must hold across processes; the test of several processes
at once is marked slow.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cbam_dsa.ops.cpu import build
from cpu_build_helpers import LOAD_AND_REPORT, SRC, libraries, load_recording, report, run_python, sha256

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the fake compilers are POSIX shell scripts")
fcntl = pytest.importorskip("fcntl", reason="the lock test holds an flock")


# ----------------------------------------------------------------------------------------------------------
# The cache: verified before it is loaded.


def test_a_build_writes_the_library_and_its_record_last(fresh, fakecc, prebuilt):
    assert build.library() is not None
    (library,) = libraries(fresh)
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["file"] == library.name
    assert record["size"] == library.stat().st_size == prebuilt.stat().st_size
    assert record["sha256"] == sha256(library) == sha256(prebuilt)
    assert fakecc.calls("compile") == 3 and fakecc.calls("link") == 1  # kernels.c twice, operators.cpp
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
    assert fakecc.calls("compile") == 3 and fakecc.calls("link") == 1, fakecc.log.read_text()
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
