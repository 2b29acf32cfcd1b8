"""Building and loading the C library (``cbam_dsa.ops.cpu.build``) in its environment: where the cache goes (the
home directory, ``XDG_CACHE_HOME``, a private temporary folder, or none) and ``CC`` with arguments.

Most tests use a fake compiler (``cpu_build_helpers.FakeCompiler``), a shell script that logs each call and copies a
real library (built once, in the default cache) where a link step would write one: they need no compile and take
about a second. The test that compiles for real (``CC`` with arguments) is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from cbam_dsa.ops.cpu import build
from cpu_build_helpers import libraries

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the fake compilers are POSIX shell scripts")


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
