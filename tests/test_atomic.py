"""``lightning_aquila.atomic`` on its own: the directory swap and its fallbacks, the leftovers a
new write removes, and the umask read at import. (Checkpoint files written through it, and a
write killed midway, are in ``test_crash_resume.py``.)"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

import pytest

from lightning_aquila import atomic
from lightning_aquila.atomic import (
    atomic_file,
    exchange_paths,
    partial_files,
    replace_directory,
    write_bytes_atomically,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="renameat2(RENAME_EXCHANGE) is Linux's")


def _tree(path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _directory(path, **files: str):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


# -- exchange_paths ----------------------------------------------------------------------------
@linux_only
def test_exchange_paths_swaps_two_directories_given_relative_to_the_working_directory(
        tmp_path, monkeypatch):
    _directory(tmp_path / "a", one="a")
    _directory(tmp_path / "b", two="b", three="b")
    monkeypatch.chdir(tmp_path)  # relative names resolve against the cwd (AT_FDCWD)
    assert exchange_paths("a", "b") is True
    assert _tree(tmp_path / "a") == {"three": "b", "two": "b"}
    assert _tree(tmp_path / "b") == {"one": "a"}


@linux_only
def test_exchange_paths_of_a_missing_path_raises_with_its_errno_naming_both(tmp_path):
    _directory(tmp_path / "a", one="a")
    with pytest.raises(OSError, match="missing") as raised:
        exchange_paths(tmp_path / "a", tmp_path / "missing")
    assert raised.value.errno == errno.ENOENT
    assert _tree(tmp_path / "a") == {"one": "a"}


@linux_only
def test_an_exchange_the_kernel_refuses_as_invalid_returns_false_and_changes_nothing(tmp_path):
    outer = _directory(tmp_path / "outer", file="outer")
    _directory(outer / "inner", file="inner")
    assert exchange_paths(outer, outer / "inner") is False  # EINVAL: into itself
    assert _tree(outer / "inner") == {"file": "inner"}


def test_exchange_paths_is_unavailable_off_linux_or_without_renameat2(tmp_path, monkeypatch):
    a, b = _directory(tmp_path / "a", one="a"), _directory(tmp_path / "b", two="b")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert exchange_paths(a, b) is False
    monkeypatch.setattr(sys, "platform", "linux")

    def no_library(*args, **kwargs):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert exchange_paths(a, b) is False
    assert _tree(a) == {"one": "a"} and _tree(b) == {"two": "b"}


# -- replace_directory -------------------------------------------------------------------------
def test_replace_directory_creates_the_path_when_it_is_absent(tmp_path):
    staging = _directory(tmp_path / ".new.partial", shard0="new")
    replace_directory(staging, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert _tree(tmp_path / "last.ckpt") == {"shard0": "new"}


def test_replace_directory_replaces_a_file_of_that_name(tmp_path):
    (tmp_path / "last.ckpt").write_text("a single-file checkpoint")
    staging = _directory(tmp_path / ".new.partial", shard0="new")
    replace_directory(staging, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert _tree(tmp_path / "last.ckpt") == {"shard0": "new"}


def test_replace_directory_replaces_a_link_and_leaves_its_target_alone(tmp_path):
    target = _directory(tmp_path / "elsewhere", shard0="kept")
    (tmp_path / "last.ckpt").symlink_to(target)
    staging = _directory(tmp_path / ".new.partial", shard0="new")
    replace_directory(staging, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert _tree(tmp_path / "last.ckpt") == {"shard0": "new"}
    assert _tree(target) == {"shard0": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "last.ckpt"]


def test_without_the_exchange_the_old_directory_is_renamed_aside_then_deleted(
        tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    _directory(tmp_path / "last.ckpt", shard0="old", shard1="old")
    (tmp_path / ".last.ckpt.old").write_text("left by an earlier interrupted replace")
    staging = _directory(tmp_path / ".new.partial", shard0="new")
    replace_directory(staging, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert _tree(tmp_path / "last.ckpt") == {"shard0": "new"}


@linux_only
def test_with_the_exchange_an_existing_directory_is_never_renamed_aside(tmp_path, monkeypatch):
    """The swap is one system call: at no instant is there no ``last.ckpt``."""
    _directory(tmp_path / "last.ckpt", shard0="old")
    staging = _directory(tmp_path / ".new.partial", shard0="new")

    def no_rename(*args):
        raise AssertionError(f"renamed aside: {args}")

    monkeypatch.setattr(os, "replace", no_rename)
    replace_directory(staging, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert _tree(tmp_path / "last.ckpt") == {"shard0": "new"}


# -- leftovers, umask --------------------------------------------------------------------------
def test_a_new_write_removes_the_leftovers_of_its_own_name_only(tmp_path):
    """Names with glob characters match themselves only: ``a[1].json``'s write must not take
    ``a1.json``'s leftovers (nor the other way round)."""
    for name in ("a[1].json", "a1.json", "a*.json"):
        (tmp_path / f".{name}.x1{atomic.PARTIAL_SUFFIX}").write_text("left")
    assert [p.name for p in partial_files(tmp_path / "a[1].json")] == [
        f".a[1].json.x1{atomic.PARTIAL_SUFFIX}"]
    write_bytes_atomically(tmp_path / "a*.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".a1.json.x1{atomic.PARTIAL_SUFFIX}", f".a[1].json.x1{atomic.PARTIAL_SUFFIX}",
        "a*.json"]
    assert partial_files(tmp_path / "missing-dir" / "x.json") == []


def test_atomic_file_creates_missing_parents_and_refuses_a_non_writing_mode(tmp_path):
    path = tmp_path / "new" / "deeper" / "report.json"
    with atomic_file(path, "w") as handle:
        handle.write("{}")
    assert path.read_text() == "{}"
    with pytest.raises(ValueError, match="'rb'"), atomic_file(path, "rb"):
        pass
    assert path.read_text() == "{}"


def test_the_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert atomic._read_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still in force
    finally:
        os.umask(before)
