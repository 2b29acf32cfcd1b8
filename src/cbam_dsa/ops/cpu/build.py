"""The library of the CPU kernels: compiled from ``kernels.c`` and ``operators.cpp`` on first use, cached, verified,
loaded with ctypes.

``kernels.c`` holds the C kernels (OpenMP, ``-O3 -march=native``); ``operators.cpp`` the operators' CPU kernels over
them, against PyTorch's C++ headers and libraries (the ones of the torch that runs, which it registers with the
dispatcher: :mod:`.native`). The library is compiled once per machine with the system compiler (``$CC``, else
``cc``, for both files: gcc and clang compile C++ by the file's suffix; ``$CXX`` for the C++ file where it is set; a
command with arguments such as ``ccache gcc`` is split as build tools split it) and kept in a cache folder
(:func:`cache_dir`), keyed by the sources, the flags, the compiler commands and their versions, the torch version
and the CPU. OpenMP is the one PyTorch already loaded, so both share one thread pool.

The cache folder is ``$CBAM_DSA_CACHE``, else ``$XDG_CACHE_HOME/cbam_dsa``, else ``~/.cache/cbam_dsa``, with
fallbacks where it is not writable (:mod:`.cache`, which also holds the record, the failure marker and the lock).

What the cache guarantees:

* A library is loaded only after it is verified: its size and SHA-256 must match the record
  (``kernels-<key>.json``) written after a complete build. A damaged, partial or foreign file is built again,
  never loaded.
* Builds are atomic (a temporary folder in the cache, then a rename; the record written last) and happen once:
  concurrent first use by several processes (DDP ranks) takes a file lock, one process builds, the others wait for
  it (at most ``CBAM_DSA_LOCK_TIMEOUT`` seconds, default :data:`LOCK_TIMEOUT`) and load its library. What a killed
  build left behind is removed a day later, by the next build in that folder.
* Every external step (the version probe, each compile, the link) is bounded by ``CBAM_DSA_BUILD_TIMEOUT`` seconds
  (default :data:`STEP_TIMEOUT`); a step past it is killed with its whole process group.
* A failed build is remembered (``kernels-<key>.failed``, keyed like the library): later processes do not pay for
  it again; a changed compiler or source has another key and tries again. Delete the file to retry.

Where the library cannot be built, :func:`library` returns ``None``, the CPU operator runs its PyTorch
implementation (the results agree either way, tested), and one :class:`NativeBuildWarning` per process says why and
how to fix or silence it (:func:`why` gives the reason). ``CBAM_DSA_NATIVE=0`` disables the library silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from ..library import OVERLOAD
from .cache import (
    LOCK_TIMEOUT,
    RECORD_FORMAT,
    BuildError,
    _FileLock,
    _remembered_failure,
    _remove_stale,
    _seconds,
    _sha256,
    _verified,
    _write_atomic,
    cache_dir,
)

__all__ = [
    "ENTRY_POINTS",
    "FLAGS",
    "LOCK_TIMEOUT",
    "SCALARS",
    "SOURCE",
    "STEP_TIMEOUT",
    "NativeBuildWarning",
    "cache_dir",
    "enabled",
    "library",
    "registered",
    "why",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
CXX_SOURCE = Path(__file__).with_name("operators.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11")
CXX_FLAGS = ("-O2", "-fPIC", "-std=c++20")
SCALARS = {"f32": "float", "f64": "double"}  # the suffix of each entry point, and its C type
ENTRY_POINTS = (
    *(f"{name}_{suffix}" for name in ("block_forward", "block_backward") for suffix in SCALARS),
    "cbam_dsa_register",
    "cbam_dsa_error",
)
STEP_TIMEOUT = 300.0
"""Seconds each external step (version probe, compile, link) may take; ``CBAM_DSA_BUILD_TIMEOUT`` overrides it."""
_LIBRARY_SUFFIX = ".dll" if os.name == "nt" else ".so"

_lock = threading.Lock()
_state: dict[str, object] = {}
_registered: list[ctypes.CDLL] = []


class NativeBuildWarning(RuntimeWarning):
    """The C kernels could not be built or loaded: the CPU operator runs its (slower) PyTorch implementation."""


def enabled() -> bool:
    """Whether the library may be used: ``CBAM_DSA_NATIVE`` is not ``0`` (read at each call)."""
    return os.environ.get("CBAM_DSA_NATIVE", "1") != "0"


def why() -> str | None:
    """Why :func:`library` returned ``None`` (the last attempt in this process), or ``None`` where it loaded or was
    not tried yet."""
    if not enabled():
        return "disabled by CBAM_DSA_NATIVE=0"
    return _state.get("why")  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# External steps.


def _compiler_command(variable: str = "CC") -> list[str]:
    """The compiler command from ``$CC`` (else ``cc``; ``$CXX`` with ``variable="CXX"``), split as a shell would
    (``ccache gcc``, ``gcc -O2``), its program resolved on ``PATH``.

    Raises:
        BuildError: the variable cannot be split, or its program is not found.
    """
    text = os.environ.get(variable, "").strip() or "cc"
    try:
        parts = shlex.split(text, posix=os.name != "nt")
    except ValueError as error:
        raise BuildError(f"{variable}={text!r} cannot be split into a command ({error})") from None
    found = shutil.which(parts[0]) if parts else None
    if found is None:
        what = "C" if variable == "CC" else "C++"
        raise BuildError(
            f"no {what} compiler found: {parts[0] if parts else text!r} (from {variable}={text!r}) is not on PATH"
        )
    return [found, *parts[1:]]


def _torch_build() -> tuple[list[str], list[str], str]:
    """What ``operators.cpp`` compiles and links against: the flags for PyTorch's headers, those for its libraries,
    and the torch build they belong to (for the key)."""
    import torch

    root = Path(torch.__file__).resolve().parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    lib = str(root / "lib")
    compile_flags = ["-isystem", str(root / "include"), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    link_flags = ["-L", lib, "-lc10", "-ltorch_cpu", "-lstdc++", f"-Wl,-rpath,{lib}"]
    return compile_flags, link_flags, f"torch {torch.__version__} {torch.version.git_version} at {root}"


def _stop(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process it started (its own process group on POSIX), and reap it."""
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except OSError:
        pass
    # a grandchild that left the group may hold the pipes: stop waiting for them then
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        process.communicate(timeout=5)


def _run(command: list[str], what: str, remember: bool = True) -> str:
    """Run one external step, bounded by ``CBAM_DSA_BUILD_TIMEOUT`` seconds; its output (stdout and stderr).

    Raises:
        BuildError: it could not start, ran too long (killed with its process group) or failed.
    """
    timeout = _seconds("CBAM_DSA_BUILD_TIMEOUT", STEP_TIMEOUT)
    options = {"start_new_session": True} if os.name == "posix" else {}
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", **options,
        )  # fmt: skip
    except OSError as error:
        raise BuildError(f"{what} could not start ({shlex.join(command[:1])}: {error})", remember) from None
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise BuildError(
            f"{what} did not finish within {timeout:g} s and was stopped (CBAM_DSA_BUILD_TIMEOUT sets the limit)",
            remember,
        ) from None
    if process.returncode != 0:
        tail = " ".join(output.split()[-40:]) if output else "no output"
        raise BuildError(f"{what} failed with exit status {process.returncode}: {tail}", remember)
    return output


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _key(command: list[str], version: str) -> str:
    parts = [
        f"record format {RECORD_FORMAT}", SOURCE.read_text(), CXX_SOURCE.read_text(), " ".join(FLAGS),
        " ".join(CXX_FLAGS), shlex.join(command), version, _torch_build()[2], _cpu_flags(), platform.machine(),
        sys.platform,
    ]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------
# Load, build (verified, atomic, under the lock), remember failures.


def _open(library: Path) -> ctypes.CDLL:
    """Load ``library``, check that it has the entry points, and register its operator kernels with PyTorch's
    dispatcher (``cbam_dsa_register``, under the operators' overload name: they take the place of the Python ones for
    the CPU) where no library has yet in this process.

    Raises:
        BuildError: it does not load, lacks an entry point, or its kernels do not register.
    """
    try:
        handle = ctypes.CDLL(str(library))
        for name in ENTRY_POINTS:
            getattr(handle, name)
    except (OSError, AttributeError) as error:
        raise BuildError(f"the library {library} does not load ({error})", remember=True) from None
    if not _registered:  # once per process: a library loaded later (another cache's copy) is not registered
        handle.cbam_dsa_register.restype, handle.cbam_dsa_register.argtypes = ctypes.c_int, [ctypes.c_char_p]
        handle.cbam_dsa_error.restype = ctypes.c_char_p
        if handle.cbam_dsa_register(OVERLOAD.encode()) != 0:
            error = handle.cbam_dsa_error().decode(errors="replace")
            raise BuildError(f"the library {library} loads, but its kernels do not register ({error})", remember=True)
        _registered.append(handle)
    return handle


def registered() -> ctypes.CDLL | None:
    """The library whose kernels the dispatcher runs (the first one loaded in this process), or ``None``."""
    return _registered[0] if _registered else None


def _load_cached(library: Path, key: str) -> ctypes.CDLL | None:
    """The cached library where it verifies; ``None`` where it is missing, damaged or foreign (never loaded then)."""
    if not _verified(library, key):
        if library.exists():
            logger.info("cbam_dsa: %s does not match its record (damaged, partial or foreign); building again", library)
        return None
    return _open(library)


def _build(command: list[str], folder: Path, library: Path, key: str) -> None:
    """Compile and link into ``library`` atomically (a temporary folder beside it, then a rename), then write its
    record.

    Raises:
        BuildError: a step failed or ran too long (``remember`` set).
    """
    compile_flags, link_flags, _ = _torch_build()
    cxx = _compiler_command("CXX") if os.environ.get("CXX", "").strip() else command
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-", ignore_cleanup_errors=True) as work:
        objects = []
        for suffix, scalar in SCALARS.items():
            obj = Path(work) / f"kernels_{suffix}.o"
            compile_step = [*command, *FLAGS, f"-DSCALAR={scalar}", f"-DSUFFIX={suffix}", "-c", str(SOURCE)]
            _run([*compile_step, "-o", str(obj)], f"compiling {SOURCE.name} for {scalar}")
            objects.append(str(obj))
        obj = Path(work) / "operators.o"
        _run([*cxx, *CXX_FLAGS, *compile_flags, "-c", str(CXX_SOURCE), "-o", str(obj)], f"compiling {CXX_SOURCE.name}")
        objects.append(str(obj))
        built = Path(work) / library.name
        _run([*command, "-shared", "-fopenmp", *objects, "-o", str(built), *link_flags], "linking the library")
        try:
            size, digest = built.stat().st_size, _sha256(built)
            os.replace(built, library)
        except OSError as error:
            raise BuildError(f"the link step wrote no usable library ({error})", remember=True) from None
    record = {"format": RECORD_FORMAT, "key": key, "file": library.name, "size": size, "sha256": digest,
              "compiler": command, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    _write_atomic(library.with_suffix(".json"), record)


def _load_from(folder: Path, command: list[str], key: str) -> ctypes.CDLL:
    library = folder / f"kernels-{key}{_LIBRARY_SUFFIX}"
    marker = library.with_suffix(".failed")
    found = _load_cached(library, key)
    if found is not None:
        return found
    _remembered_failure(marker, key)
    with _FileLock(library.with_suffix(".lock"), _seconds("CBAM_DSA_LOCK_TIMEOUT", LOCK_TIMEOUT)):
        found = _load_cached(library, key)  # built by another process while this one waited
        if found is not None:
            return found
        _remembered_failure(marker, key)
        _remove_stale(folder)
        try:
            _build(command, folder, library, key)
            return _open(library)
        except BuildError as error:
            if error.remember:
                for stale in (library, library.with_suffix(".json")):
                    stale.unlink(missing_ok=True)
                _write_atomic(marker, {"format": RECORD_FORMAT, "key": key, "reason": error.reason,
                                       "compiler": command})  # fmt: skip
            raise


def _load() -> ctypes.CDLL:
    command = _compiler_command()
    version = _run([*command, "--version"], "the compiler's version probe (--version)", remember=False)
    if os.environ.get("CXX", "").strip():  # the C++ file's own compiler: in the key too
        cxx = _compiler_command("CXX")
        probe = _run([*cxx, "--version"], "the C++ compiler's version probe (--version)", remember=False)
        version = f"{version}\n{shlex.join(cxx)}\n{probe}"
    key = _key(command, version)
    folder = cache_dir()
    if folder is not None:
        return _load_from(folder, command, key)
    try:
        work = Path(tempfile.mkdtemp(prefix="cbam_dsa-build-"))
    except OSError as error:
        raise BuildError(f"no writable folder to build the library in ({error})") from None
    try:  # no cache: build in a private temporary folder, load from there (the loaded copy outlives the file)
        library = work / f"kernels-{key}{_LIBRARY_SUFFIX}"
        _build(command, work, library, key)
        return _open(library)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _announce(reason: str) -> None:
    if _state.get("announced"):
        return
    _state["announced"] = True
    warnings.warn(
        "cbam_dsa: the C kernels of the CPU fast path are unavailable, so the block runs its PyTorch "
        f"implementation (same results, about 2-3x slower on the CPU). Reason: {reason}. To fix it, install a C "
        "and C++ compiler with OpenMP support (e.g. gcc and g++) or point CC at one (CC may hold arguments, e.g. "
        "CC='ccache gcc'; CXX, where set, compiles the C++ file). "
        "To silence this warning, set CBAM_DSA_NATIVE=0.",
        NativeBuildWarning,
        stacklevel=3,
    )


def library() -> ctypes.CDLL | None:
    """The loaded library, built on the first call; ``None`` where it cannot be built (then one
    :class:`NativeBuildWarning` per process; :func:`why` gives the reason) or is disabled (``CBAM_DSA_NATIVE=0``).

    Raises:
        ValueError: ``CBAM_DSA_BUILD_TIMEOUT`` or ``CBAM_DSA_LOCK_TIMEOUT`` is not a positive number.
    """
    if not enabled():
        return None
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                try:
                    _state["library"], _state["why"] = _load(), None
                except (BuildError, OSError) as error:
                    reason = error.reason if isinstance(error, BuildError) else f"{type(error).__name__}: {error}"
                    _state["library"], _state["why"] = None, reason
                    logger.info("cbam_dsa: the C kernels are unavailable: %s", reason)
                    _announce(reason)
    return _state["library"]  # type: ignore[return-value]
