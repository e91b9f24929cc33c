"""Root file system tarballs: open (plain, gzip, xz, bzip2, zstd), check every member before
anything is extracted, and extract into an empty staging folder.

A member is refused when its name is absolute or has a `..` component, when it would be
written through a symlink the archive made earlier, when a hard link points outside the
archive, or when it is a device node and the extraction cannot create one (unprivileged
without fakeroot). The checks read the archive once, streaming; nothing is written.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, List

from builder.errors import ArmvmError

MAX_MEMBERS = 2_000_000
MAX_NAME = 4096
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class TarSummary:
    members: int
    data_blocks: int           # 4 KiB blocks of file data
    devices: int
    names: int


class _ZstdReader(io.RawIOBase):
    def __init__(self, f):
        import zstandard
        self._r = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)

    def readable(self):
        return True

    def readinto(self, b):
        data = self._r.read(len(b))
        b[:len(data)] = data
        return len(data)


def open_tar(path: Path):
    """A streaming TarFile over `path`, whatever its compression."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ArmvmError(f"rootfs tarball {path}: {exc.strerror}") from None
    head = f.read(4)
    f.seek(0)
    try:
        if head == ZSTD_MAGIC:
            return tarfile.open(fileobj=io.BufferedReader(_ZstdReader(f), 1 << 20), mode="r|")
        return tarfile.open(fileobj=f, mode="r|*")
    except tarfile.TarError as exc:
        f.close()
        raise ArmvmError(f"rootfs tarball {path}: not a tar archive ({exc})") from None


def clean_member_name(name: str) -> str:
    """'./etc/passwd' -> 'etc/passwd'; '' for the archive's own root ('./')."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    return "/".join(parts)


def check_tar(path: Path, *, can_mknod: bool) -> TarSummary:
    """Read every member header of `path`; raise ArmvmError naming the first bad one."""
    symlinks: set[str] = set()
    files: set[str] = set()
    count = blocks = devices = 0
    tf = open_tar(path)
    try:
        for m in _members(tf, path):
            count += 1
            if count > MAX_MEMBERS:
                raise ArmvmError(f"rootfs tarball {path}: more than {MAX_MEMBERS} members")
            name = m.name
            if len(name) > MAX_NAME or "\0" in name:
                raise ArmvmError(f"rootfs tarball {path}: member name too long or with NUL")
            if name.startswith("/"):
                raise ArmvmError(f"rootfs tarball {path}: member {name!r} has an absolute name "
                                 "(allowed: names relative to the root, e.g. ./etc/passwd)")
            if ".." in PurePosixPath(name).parts:
                raise ArmvmError(f"rootfs tarball {path}: member {name!r} contains '..' "
                                 "(it would be written outside the root)")
            clean = clean_member_name(name)
            parts = clean.split("/") if clean else []
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in symlinks:
                    raise ArmvmError(f"rootfs tarball {path}: member {name!r} lies below the "
                                     f"symlink {'/'.join(parts[:i])!r} (it would be written "
                                     "through the link)")
            if m.islnk():
                target = clean_member_name(m.linkname)
                if m.linkname.startswith("/") or ".." in PurePosixPath(m.linkname).parts \
                        or target not in files:
                    raise ArmvmError(f"rootfs tarball {path}: hard link {name!r} points to "
                                     f"{m.linkname!r}, which is not an earlier file of the archive")
            elif m.issym():
                symlinks.add(clean)
            elif m.isdev():
                devices += 1
                if not can_mknod:
                    raise ArmvmError(f"rootfs tarball {path}: member {name!r} is a device node, "
                                     "which an unprivileged build cannot create; install the Debian "
                                     "package 'fakeroot' or build as root")
            elif not (m.isreg() or m.isdir()):
                raise ArmvmError(f"rootfs tarball {path}: member {name!r} has an unsupported type")
            if m.isreg():
                files.add(clean)
                blocks += -(-m.size // 4096)
            symlinks.discard(clean) if not m.issym() else None
    finally:
        tf.close()
    if count == 0:
        raise ArmvmError(f"rootfs tarball {path}: the archive is empty")
    return TarSummary(count, blocks, devices, count)


def _members(tf, path) -> Iterator[tarfile.TarInfo]:
    try:
        for m in tf:
            yield m
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArmvmError(f"rootfs tarball {path}: damaged archive ({exc})") from None


def extract_tar(path: Path, dest: Path) -> List[str]:
    """Extract a checked tarball into the empty folder `dest`, keeping numeric owners, modes,
    device nodes, hard links and mtimes. Run inside fakeroot when unprivileged."""
    tf = open_tar(path)
    try:
        try:
            # Names were checked by check_tar; keep modes (setuid included) and owners as they are.
            extra = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            tf.extractall(dest, numeric_owner=True, **extra)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArmvmError(f"rootfs tarball {path}: cannot extract ({exc})") from None
    finally:
        tf.close()
    return []

