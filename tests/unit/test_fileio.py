"""distvit.fileio: atomic writes keep the old file on error and leave no .tmp; file_digest is hashlib's."""

from __future__ import annotations

import hashlib

import pytest

from distvit.fileio import atomic_open, atomic_write_bytes, file_digest


def test_atomic_open_replaces_the_file_on_success(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with atomic_open(path) as handle:
        handle.write(b"new ")
        handle.write(b"content")
        assert path.read_bytes() == b"old"  # readers still see the old file while the new one is written
        assert (tmp_path / "state.json.tmp").exists()
    assert path.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_error_inside_the_block_keeps_the_old_file_and_removes_the_tmp(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_error_before_the_first_write_creates_nothing(tmp_path):
    path = tmp_path / "fresh.bin"
    with pytest.raises(KeyError):
        with atomic_open(path):
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_bytes_creates_and_overwrites(tmp_path):
    path = tmp_path / "blob"
    atomic_write_bytes(path, b"\x00\x01first")
    assert path.read_bytes() == b"\x00\x01first"
    atomic_write_bytes(str(path), b"second")  # a str path works as well
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


def test_file_digest_equals_hashlib_over_the_bytes(tmp_path):
    payload = bytes(range(256)) * 9000  # 2.2 MiB: more than one 1 MiB block
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    assert file_digest(path) == hashlib.sha256(payload).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(payload).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_digest(empty) == hashlib.sha256(b"").hexdigest()
