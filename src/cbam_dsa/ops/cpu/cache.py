"""The cache of the compiled C library (:mod:`.build`): where it lives, the record that verifies it, the marker of
a failed build, and the lock that makes a build happen once.

The cache folder is ``$CBAM_DSA_CACHE``, else ``$XDG_CACHE_HOME/cbam_dsa`` (an absolute ``XDG_CACHE_HOME`` only),
else ``~/.cache/cbam_dsa`` (the home directory looked up only then, and its absence tolerated); where that folder is
not writable, a private per-user folder in the temporary directory; where neither is, no cache (:func:`cache_dir`
returns ``None``, and the library is built in a temporary folder and loaded from there).

A library is loaded only after :func:`_verified` says that its size and SHA-256 match the record
(``kernels-<key>.json``) written after a complete build. A failed build is remembered in ``kernels-<key>.failed``
(:func:`_remembered_failure` raises its reason again). Concurrent builds of one key are serialized by
:class:`_FileLock`, bounded by ``CBAM_DSA_LOCK_TIMEOUT`` seconds (default :data:`LOCK_TIMEOUT`); what killed builds
left behind is removed a day later (:func:`_remove_stale`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_TIMEOUT = 900.0
"""Seconds to wait for another process's build; ``CBAM_DSA_LOCK_TIMEOUT`` overrides it."""
LOCK_POLL = 0.05  # seconds between two tries of the lock
RECORD_FORMAT = 1  # the version of the record's layout, part of the key


class BuildError(Exception):
    """Why the library is unavailable; ``remember``: a build failure to record for later processes."""

    def __init__(self, reason: str, remember: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.remember = reason, remember


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
# The record, the failure marker, the lock.


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


def _remembered_failure(marker: Path, key: str) -> None:
    record = _read_record(marker, key)
    if record is not None:
        raise BuildError(
            f"{record.get('reason')} (an earlier build failed; remembered in {marker}: delete it to retry)"
        )


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
