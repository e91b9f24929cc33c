"""Deterministic cpio "newc" (SVR4 without CRC, magic "070701") writer.

Format (cpio(5), the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
a 110-byte ASCII header (magic + 13 eight-digit hex fields), the NUL-terminated name padded
so header + name is a multiple of 4, then the data padded to a multiple of 4; the archive
ends with an entry named "TRAILER!!!".

Everything that could depend on the host is fixed: entries sorted by path (bytes), parents
created, uid/gid 0, one mtime, inodes numbered in sorted order, c_devmajor/c_devminor 0.
Device nodes are just headers, so no root is needed to write them.
"""
from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from builder.errors import ArmvmError

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
TRAILER_NAME = "TRAILER!!!"
NEWC_FIELDS = ("c_ino", "c_mode", "c_uid", "c_gid", "c_nlink", "c_mtime", "c_filesize",
               "c_devmajor", "c_devminor", "c_rdevmajor", "c_rdevminor", "c_namesize", "c_check")
MAX_FIELD = 0xFFFFFFFF
MAX_PATH = 4096

Data = Union[bytes, Path]


@dataclass(frozen=True)
class Entry:
    path: str          # relative, normalised, no leading '/'
    mode: int          # full st_mode (type | permissions)
    data: Data = b""   # file contents (bytes or a file to read at write time), symlink target
    rdev: tuple[int, int] = (0, 0)

    def size(self) -> int:
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)


def clean_path(path: str) -> str:
    """Normalise an archive path; reject absolute escapes and '..'."""
    if not isinstance(path, str) or not path.strip("/") or "\0" in path or len(path) > MAX_PATH:
        raise ArmvmError(f"initramfs path {path!r} is not a valid path")
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ArmvmError(f"initramfs path {path!r} must stay inside the archive "
                         f"(no '..', not the root)")
    return "/".join(parts)


def _header(fields: dict[str, int]) -> bytes:
    for name, value in fields.items():
        if not 0 <= value <= MAX_FIELD:
            raise ArmvmError(f"cpio field {name}={value} does not fit newc's 32 bits")
    return NEWC_MAGIC + b"".join(b"%08X" % fields[name] for name in NEWC_FIELDS)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class NewcArchive:
    """Collect entries, then ``write`` them sorted. Paths are archive-relative."""

    def __init__(self, mtime: int):
        if not 0 <= int(mtime) <= MAX_FIELD:
            raise ArmvmError(f"SOURCE_DATE_EPOCH {mtime} is out of range for cpio (0..{MAX_FIELD})")
        self.mtime = int(mtime)
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: str) -> bool:
        return clean_path(path) in self._entries

    def paths(self) -> list[str]:
        return sorted(self._entries, key=lambda p: p.encode())

    def _add(self, entry: Entry) -> None:
        parent = posixpath.dirname(entry.path)
        if parent:
            self.add_dir(parent)
        old = self._entries.get(entry.path)
        if old is not None:
            if stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode):
                return
            raise ArmvmError(f"initramfs path /{entry.path} is added twice")
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = clean_path(path)
        old = self._entries.get(path)
        if old is not None and not stat.S_ISDIR(old.mode):
            raise ArmvmError(f"initramfs path /{path} is both a file and a directory")
        self._add(Entry(path, stat.S_IFDIR | (mode & 0o7777)))

    def add_file(self, path: str, data: Data, mode: int = 0o644) -> None:
        if isinstance(data, Path) and not data.is_file():
            raise ArmvmError(f"initramfs file /{path}: source {data} is not a regular file")
        self._add(Entry(clean_path(path), stat.S_IFREG | (mode & 0o7777), data))

    def add_symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target or len(target) > MAX_PATH:
            raise ArmvmError(f"initramfs symlink /{path}: bad target {target!r}")
        self._add(Entry(clean_path(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(Entry(clean_path(path), stat.S_IFCHR | (mode & 0o7777), b"", (major, minor)))

    def _chunks(self) -> Iterator[bytes]:
        for ino, path in enumerate(self.paths(), start=1):
            e = self._entries[path]
            size = e.size()
            name = path.encode() + b"\0"
            fields = dict(c_ino=ino, c_mode=e.mode, c_uid=0, c_gid=0,
                          c_nlink=2 if stat.S_ISDIR(e.mode) else 1, c_mtime=self.mtime,
                          c_filesize=size, c_devmajor=0, c_devminor=0,
                          c_rdevmajor=e.rdev[0], c_rdevminor=e.rdev[1],
                          c_namesize=len(name), c_check=0)
            yield _header(fields) + name + _pad(NEWC_HEADER_SIZE + len(name))
            if isinstance(e.data, Path):
                written = 0
                with open(e.data, "rb") as f:
                    while written < size:
                        block = f.read(min(1 << 20, size - written))
                        if not block:
                            break
                        written += len(block)
                        yield block
                if written != size:
                    raise ArmvmError(f"initramfs file /{path}: {e.data} changed while writing")
            else:
                yield e.data
            yield _pad(size)
        name = TRAILER_NAME.encode() + b"\0"
        trailer = {f: 0 for f in NEWC_FIELDS}
        trailer.update(c_nlink=1, c_namesize=len(name))
        yield _header(trailer) + name + _pad(NEWC_HEADER_SIZE + len(name))

    def write(self, out: BinaryIO) -> int:
        """Write the archive to ``out``; returns the number of bytes written."""
        total = 0
        for chunk in self._chunks():
            out.write(chunk)
            total += len(chunk)
        return total

    def to_bytes(self) -> bytes:
        return b"".join(self._chunks())


def file_mode(source: Path) -> int:
    """0o755 when the owner may execute ``source``, else 0o644 (independent of umask)."""
    return 0o755 if os.stat(source).st_mode & stat.S_IXUSR else 0o644
