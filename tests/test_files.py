"""Atomic writes: whole file or nothing, ordinary permissions."""

from __future__ import annotations

import os

import pytest

from ttsr.files import atomic_write


def test_atomic_write_gives_umask_permissions_not_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.bin", lambda stream: stream.write(b"data"))
    finally:
        os.umask(previous)
    assert path.read_bytes() == b"data"
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_neither_partial_file_nor_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing(stream):
        stream.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
