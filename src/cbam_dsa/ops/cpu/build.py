"""The C library of the CPU kernels: compiled from ``kernels.c`` on first use, cached, loaded with ctypes.

The library is compiled once per machine with the system C compiler (``$CC``, else ``cc``; OpenMP, ``-O3
-march=native``) into a cache folder (``$CBAM_DSA_CACHE``, else ``~/.cache/cbam_dsa``), keyed by the source, the
compiler and the CPU, and loaded with :mod:`ctypes`; OpenMP is the one PyTorch already loaded, so both share one
thread pool. Where no compiler works, or with ``CBAM_DSA_NATIVE=0`` in the environment, :func:`library` returns
``None`` and the CPU operator runs its PyTorch implementation instead: the results agree either way (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["FLAGS", "SCALARS", "SOURCE", "enabled", "library"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11")
SCALARS = {"f32": "float", "f64": "double"}  # the suffix of each entry point, and its C type
_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether the library may be used: ``CBAM_DSA_NATIVE`` is not ``0`` (read at each call)."""
    return os.environ.get("CBAM_DSA_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    root = os.environ.get("CBAM_DSA_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cbam_dsa"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    """Compile the source once per scalar type into one shared library at ``target`` (atomically)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        for suffix, scalar in SCALARS.items():
            obj = Path(tmp) / f"kernels_{suffix}.o"
            command = [compiler, *FLAGS, f"-DSCALAR={scalar}", f"-DSUFFIX={suffix}", "-c", str(SOURCE), "-o", str(obj)]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            objects.append(str(obj))
        built = Path(tmp) / target.name
        subprocess.run([compiler, "-shared", "-fopenmp", *objects, "-o", str(built)], check=True, capture_output=True)
        os.replace(built, target)


def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.info("cbam_dsa: no C compiler found; the CPU operator runs its PyTorch implementation")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags(), platform.machine()]).encode()
    ).hexdigest()[:20]
    target = _cache_dir() / f"kernels-{key}.so"
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError:  # a damaged cached library: build it again
            target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _compile(compiler, target)
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
    """The loaded library, compiling it on the first call; ``None`` where it cannot be built or is disabled."""
    if not enabled():
        return None
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                try:
                    _state["library"] = _load()
                except (OSError, subprocess.SubprocessError) as error:
                    logger.info("cbam_dsa: the C kernels are unavailable (%s); using the PyTorch implementation", error)
                    _state["library"] = None
    return _state["library"]  # type: ignore[return-value]
