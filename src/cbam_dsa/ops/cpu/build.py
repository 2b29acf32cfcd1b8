"""The C library of the CPU kernels: compiled from ``kernels.c`` on first use, cached, verified, loaded with ctypes.

The library is compiled once per machine with the system C compiler (``$CC``, else ``cc``; a command with arguments
such as ``ccache gcc`` is split as build tools split it; OpenMP, ``-O3 -march=native``) and kept in a cache folder
(:func:`cache_dir`), keyed by the source, the flags, the compiler command and its version, and the CPU. OpenMP is the
one PyTorch already loaded, so both share one thread pool.

The cache folder is ``$CBAM_DSA_CACHE``, else ``$XDG_CACHE_HOME/cbam_dsa`` (an absolute ``XDG_CACHE_HOME`` only),
else ``~/.cache/cbam_dsa`` (the home directory looked up only then, and its absence tolerated); where that folder is
not writable, a private per-user folder in the temporary directory; where neither is, no cache (the library is built
in a temporary folder and loaded from there).

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
import errno
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

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
    "why",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11")
SCALARS = {"f32": "float", "f64": "double"}  # the suffix of each entry point, and its C type
ENTRY_POINTS = tuple(f"{name}_{suffix}" for name in ("block_forward", "block_backward") for suffix in SCALARS)
STEP_TIMEOUT = 300.0
"""Seconds each external step (version probe, compile, link) may take; ``CBAM_DSA_BUILD_TIMEOUT`` overrides it."""
LOCK_TIMEOUT = 900.0
"""Seconds to wait for another process's build; ``CBAM_DSA_LOCK_TIMEOUT`` overrides it."""
LOCK_POLL = 0.05  # seconds between two tries of the lock
RECORD_FORMAT = 1  # the version of the record's layout, part of the key
_LIBRARY_SUFFIX = ".dll" if os.name == "nt" else ".so"

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeBuildWarning(RuntimeWarning):
    """The C kernels could not be built or loaded: the CPU operator runs its (slower) PyTorch implementation."""


class BuildError(Exception):
    """Why the library is unavailable; ``remember``: a build failure to record for later processes."""

    def __init__(self, reason: str, remember: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.remember = reason, remember


def enabled() -> bool:
    """Whether the library may be used: ``CBAM_DSA_NATIVE`` is not ``0`` (read at each call)."""
    return os.environ.get("CBAM_DSA_NATIVE", "1") != "0"


def why() -> str | None:
    """Why :func:`library` returned ``None`` (the last attempt in this process), or ``None`` where it loaded or was
    not tried yet."""
    if not enabled():
        return "disabled by CBAM_DSA_NATIVE=0"
    return _state.get("why")  # type: ignore[return-value]


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive, finite number of seconds, but got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Where the library lives.


def _home() -> Path | None:
    """The home directory, or ``None`` where it cannot be determined (HOME unset and no passwd entry) or is not an
    absolute path."""
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):
        return None
    return home if home.is_absolute() else None


def _preferred_dir() -> Path | None:
    """``$CBAM_DSA_CACHE``, else ``$XDG_CACHE_HOME/cbam_dsa`` (absolute only, as the XDG specification says), else
    ``~/.cache/cbam_dsa``; ``None`` without a home directory."""
    root = os.environ.get("CBAM_DSA_CACHE", "")
    if root:
        return Path(root).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "cbam_dsa"
    home = _home()
    return None if home is None else home / ".cache" / "cbam_dsa"


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and a file can be created in it (tried: permission bits do not
    tell for root, read-only mounts or ACLs)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def _user_temp_dir() -> Path | None:
    """A per-user folder in the temporary directory, created private (0700); refused where it is not a directory
    of this user's that only they can write (another user could plant a library there)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / f"cbam_dsa-{uid if uid is not None else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return None
    if uid is not None and (info.st_uid != uid or info.st_mode & 0o022):
        return None
    return folder if _writable(folder) else None


def cache_dir() -> Path | None:
    """The folder of the compiled library: the preferred one (``$CBAM_DSA_CACHE``, else ``$XDG_CACHE_HOME/cbam_dsa``,
    else ``~/.cache/cbam_dsa``) where it is writable, else a private per-user folder in the temporary directory,
    else ``None`` (then the library is built in a temporary folder and not kept)."""
    preferred = _preferred_dir()
    if preferred is not None and _writable(preferred):
        return preferred
    fallback = _user_temp_dir()
    logger.info("cbam_dsa: the cache folder %s is not usable; using %s", preferred, fallback or "no cache")
    return fallback


# ----------------------------------------------------------------------------------------------------------
# External steps.


def _compiler_command() -> list[str]:
    """The compiler command from ``$CC`` (else ``cc``), split as a shell would (``ccache gcc``, ``gcc -O2``), its
    program resolved on ``PATH``.

    Raises:
        BuildError: ``CC`` cannot be split, or its program is not found.
    """
    text = os.environ.get("CC", "").strip() or "cc"
    try:
        parts = shlex.split(text, posix=os.name != "nt")
    except ValueError as error:
        raise BuildError(f"CC={text!r} cannot be split into a command ({error})") from None
    found = shutil.which(parts[0]) if parts else None
    if found is None:
        raise BuildError(f"no C compiler found: {parts[0] if parts else text!r} (from CC={text!r}) is not on PATH")
    return [found, *parts[1:]]


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
        f"record format {RECORD_FORMAT}", SOURCE.read_text(), " ".join(FLAGS), shlex.join(command), version,
        _cpu_flags(), platform.machine(), sys.platform,
    ]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------
# The cache: verify, build, remember failures.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: dict) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(data, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_record(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or record.get("key") != key:
        return None
    return record


def _verified(library: Path, key: str) -> bool:
    """Whether ``library`` is the complete file its record describes (same size, same SHA-256)."""
    record = _read_record(library.with_suffix(".json"), key)
    if record is None or record.get("file") != library.name:
        return False
    try:
        if library.stat().st_size != record.get("size"):
            return False
        return _sha256(library) == record.get("sha256")
    except OSError:
        return False


def _open(library: Path) -> ctypes.CDLL:
    """Load ``library`` and check that it has the entry points.

    Raises:
        BuildError: it does not load, or lacks an entry point.
    """
    try:
        handle = ctypes.CDLL(str(library))
        for name in ENTRY_POINTS:
            getattr(handle, name)
    except (OSError, AttributeError) as error:
        raise BuildError(f"the library {library} does not load ({error})", remember=True) from None
    return handle


def _load_cached(library: Path, key: str) -> ctypes.CDLL | None:
    """The cached library where it verifies; ``None`` where it is missing, damaged or foreign (never loaded then)."""
    if not _verified(library, key):
        if library.exists():
            logger.info("cbam_dsa: %s does not match its record (damaged, partial or foreign); building again", library)
        return None
    return _open(library)


def _remembered_failure(marker: Path, key: str) -> None:
    record = _read_record(marker, key)
    if record is not None:
        raise BuildError(
            f"{record.get('reason')} (an earlier build failed; remembered in {marker}: delete it to retry)"
        )


def _build(command: list[str], folder: Path, library: Path, key: str) -> None:
    """Compile and link into ``library`` atomically (a temporary folder beside it, then a rename), then write its
    record.

    Raises:
        BuildError: a step failed or ran too long (``remember`` set).
    """
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-", ignore_cleanup_errors=True) as work:
        objects = []
        for suffix, scalar in SCALARS.items():
            obj = Path(work) / f"kernels_{suffix}.o"
            compile_step = [*command, *FLAGS, f"-DSCALAR={scalar}", f"-DSUFFIX={suffix}", "-c", str(SOURCE)]
            _run([*compile_step, "-o", str(obj)], f"compiling {SOURCE.name} for {scalar}")
            objects.append(str(obj))
        built = Path(work) / library.name
        _run([*command, "-shared", "-fopenmp", *objects, "-o", str(built)], "linking the library")
        try:
            size, digest = built.stat().st_size, _sha256(built)
            os.replace(built, library)
        except OSError as error:
            raise BuildError(f"the link step wrote no usable library ({error})", remember=True) from None
    record = {"format": RECORD_FORMAT, "key": key, "file": library.name, "size": size, "sha256": digest,
              "compiler": command, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    _write_atomic(library.with_suffix(".json"), record)


STALE_AFTER = 24 * 3600.0  # seconds after which a build's leftovers (a killed process's) are removed


def _remove_stale(folder: Path) -> None:
    """Remove what killed builds left in ``folder`` (temporary build folders and records) a day or more ago; a
    build that still runs holds the lock of its own key, and is younger."""
    now = time.time()
    for leftover in [*folder.glob(".build-*"), *folder.glob(".kernels-*")]:
        try:
            if now - leftover.lstat().st_mtime < STALE_AFTER:
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()
        except OSError:
            pass


class _FileLock:
    """An exclusive ``flock`` on ``path``, polled until a deadline; a no-op where ``fcntl`` is missing (Windows) or
    the file system refuses locks (the build is atomic either way, only not shared)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self) -> _FileLock:
        try:
            import fcntl
        except ImportError:
            return self
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return self
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return self  # no locking on this file system
            if time.monotonic() >= deadline:
                os.close(self.fd)
                self.fd = None
                raise BuildError(
                    f"another process has been building the library for more than {self.timeout:g} s (lock file "
                    f"{self.path}; CBAM_DSA_LOCK_TIMEOUT sets the wait)"
                )
            time.sleep(LOCK_POLL)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


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
        "compiler with OpenMP support (e.g. gcc) or point CC at one (CC may hold arguments, e.g. CC='ccache gcc'). "
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
