"""Building and loading the C library (``cbam_dsa.ops.cpu.build``) when things go wrong: bounded external steps,
remembered failures, one warning when the fast path falls back, and the entry points' failures reported as a status.

Most tests use a fake compiler (``cpu_build_helpers.FakeCompiler``), a shell script that logs each call and copies a
real library (built once, in the default cache) where a link step would write one, or fails: they need no compile.
Fresh processes (subprocesses) check what must hold across processes.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from cbam_dsa import CBAMResidualDynamicSA
from cbam_dsa.ops.cpu import build
from cpu_build_helpers import LOAD_AND_REPORT, load_recording, report, run_python

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the fake compilers are POSIX shell scripts")


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
    assert "install a C and C++ compiler" in message and "CC" in message  # how to fix it
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
        for dims in ([-1] + [1] * 15, [1] * 13 + [2, 1, 0], [1] * 5 + [1 << 20, 1 << 30] + [1] * 8 + [0]):
            d = (ctypes.c_int64 * 16)(*dims)
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
    # a negative batch or chunks of 2 samples in a batch of 1: a bad argument; 2^50 mixing entries: no memory
    bad, no_memory = 2, 1
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [bad, bad, bad, bad, no_memory, no_memory] * 2


@pytest.mark.parametrize(
    ("entry_point", "status", "error", "words"),
    [
        ("block_forward", 1, torch.OutOfMemoryError, "out of memory"),
        ("block_forward", 2, RuntimeError, "invalid dimensions"),
        ("block_backward", 1, torch.OutOfMemoryError, "out of memory"),
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
    block = CBAMResidualDynamicSA(4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    kernels.fail_next(entry_point, status)
    try:
        with pytest.raises(error, match=f"{entry_point} failed: {words}"):
            block(x).sum().backward()
    finally:
        kernels.fail_next(entry_point, 0)
