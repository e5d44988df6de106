"""Byte-range copies and positioned writes, with and without the kernel's help."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapterctl import files


def _no_kernel_copy(*args: object) -> int:
    raise OSError(18, "Invalid cross-device link")  # EXDEV: what other filesystems answer


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "read-write"])
def test_copy_range_places_bytes_at_offset(
    kernel: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not kernel:
        monkeypatch.setattr(os, "copy_file_range", _no_kernel_copy, raising=False)
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 1000)
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        files.pwrite_all(fd, b"head", 0)
        files.copy_range(src, 1000, 50_000, fd, 4)
    finally:
        os.close(fd)
    assert dst.read_bytes() == b"head" + src.read_bytes()[1000:51_000]
    fd = os.open(dst, os.O_RDWR)
    try:
        with pytest.raises(EOFError):
            files.copy_range(src, 255_000, 5_000, fd, 0)  # past the source's end
    finally:
        os.close(fd)


@pytest.mark.parametrize("positioned", [True, False], ids=["pwrite", "seek-write"])
def test_pwrite_all_writes_at_offset(
    positioned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "POSITIONED_WRITES", positioned and files.POSITIONED_WRITES)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert files.pwrite_all(fd, memoryview(b"world"), 6) == 5
        assert files.pwrite_all(fd, b"hello ", 0) == 6
    finally:
        os.close(fd)
    assert path.read_bytes() == b"hello world"
