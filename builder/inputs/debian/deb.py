"""Read .deb files in pure Python: an ar archive of debian-binary, control.tar.*, data.tar.*.

Extraction writes every member itself (no tarfile.extractall) and refuses anything that
could reach outside the destination: absolute names, '..' components, paths that pass
through a symlink, relative symlink targets and hard-link targets that leave the tree.
Device nodes and FIFOs are skipped; owners are not applied; permission bits are kept
without setuid/setgid/sticky, and the owner always keeps read/write (directories rwx).
Absolute symlink targets are kept verbatim (as ``dpkg-deb -x`` does): they point into the
guest's root, so readers must not follow them on the host.

A .deb is untrusted input (a lock file plus a ``--vendor`` folder is enough to deliver one),
so reading is bounded before anything is allocated: GNU long-name/long-link and PAX headers
are capped at MAX_META bytes *before* tarfile reads them, sparse members are refused, the
decompressed stream stops at a budget tied to the compressed size, the xz decoder has a
memory limit and zstd a window limit, the member count is capped, and every OSError or
decoder error becomes a short ArmvmError (names are cut in messages).
"""
from __future__ import annotations

import errno
import io
import os
import posixpath
import stat
import tarfile
from pathlib import Path
from typing import IO, BinaryIO

from builder.errors import ArmvmError

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60
COMPRESSIONS = ("", ".xz", ".gz", ".zst", ".bz2")
# Extracted bytes are bounded by the compressed size: more than this ratio is a bomb.
MAX_EXPANSION = 1000
EXTRA_ALLOWANCE = 64 * 1024 * 1024
TAR_HEADER_COST = 512
MAX_META = 1024 * 1024          # one GNU long name/link or PAX header (PATH_MAX is 4096)
MAX_GLOBAL_META = 1024 * 1024   # all PAX global headers together (tarfile keeps them)
MAX_NAME = 4096                 # a member name or link target, in bytes
MAX_MEMBERS = 1_000_000
XZ_MEMLIMIT = 256 * 1024 * 1024     # dpkg-deb uses xz -6 (8 MiB dictionary); xz -9e needs 64 MiB
ZSTD_MAX_WINDOW = 1 << 27           # zstd's own default limit for streaming (128 MiB)
READ_CHUNK = 1024 * 1024


def _show(text, limit: int = 120) -> str:
    """A name or message cut to ``limit`` characters for an error message."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


class _Member:
    """A bounded read-only view of one ar member."""

    def __init__(self, f: BinaryIO, offset: int, size: int):
        self._f, self._offset, self.size, self._pos = f, offset, size, 0

    def read(self, n: int = -1) -> bytes:
        left = self.size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readable(self) -> bool:
        return True


class _Budget(io.RawIOBase):
    """A decompressed stream that fails once more than ``limit`` bytes come out of it."""

    def __init__(self, stream, limit: int, deb: Path, base: str):
        self._s, self.limit, self.used, self._deb, self._base = stream, limit, 0, deb, base

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > READ_CHUNK:
            n = READ_CHUNK                   # never an unbounded read
        data = self._s.read(n)
        self.used += len(data)
        if self.used > self.limit:
            raise ArmvmError(f"{self._deb}: {self._base} expands to more than "
                             f"{MAX_EXPANSION}x its size ({self.limit} bytes); refusing it")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _XzReader(io.RawIOBase):
    """xz/lzma streams decoded with a memory limit (lzma.LZMAFile has none)."""

    def __init__(self, raw):
        import lzma
        self._raw, self._lzma = raw, lzma
        self._dec = lzma.LZMADecompressor(memlimit=XZ_MEMLIMIT)
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > READ_CHUNK:
            n = READ_CHUNK
        while not self._eof:
            if self._dec.eof:                    # concatenated xz streams
                rest = self._dec.unused_data
                if not rest:
                    rest = self._raw.read(64 * 1024)
                if not rest.strip(b"\0"):       # stream padding or the end
                    self._eof = True
                    break
                self._dec = self._lzma.LZMADecompressor(memlimit=XZ_MEMLIMIT)
                data = self._dec.decompress(rest, n)
            elif self._dec.needs_input:
                chunk = self._raw.read(64 * 1024)
                if not chunk:
                    raise EOFError("compressed data ended before the end of the stream")
                data = self._dec.decompress(chunk, n)
            else:
                data = self._dec.decompress(b"", n)
            if data:
                return data
        return b""

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Refused(ArmvmError):
    """A tar header refused before its payload is read."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long name or a PAX header whole into memory, whatever size the
    header declares; refuse oversized ones (and sparse members) before that read."""

    def _proc_member(self, tar):
        meta = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK:
                "GNU long-link", tarfile.XHDTYPE: "PAX", tarfile.XGLTYPE: "PAX global",
                tarfile.SOLARIS_XHDTYPE: "Solaris extended"}.get(self.type)
        if meta is not None:
            if self.size > MAX_META:
                raise _Refused(f"a {meta} header declares {self.size} bytes (allowed: up to "
                               f"{MAX_META}); refusing to extract")
            if self.type == tarfile.XGLTYPE:
                used = getattr(tar, "_armvm_global", 0) + self.size
                if used > MAX_GLOBAL_META:
                    raise _Refused(f"PAX global headers exceed {MAX_GLOBAL_META} bytes; "
                                   "refusing to extract")
                tar._armvm_global = used
        elif self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused("a GNU sparse member; refusing to extract (packages have none)")
        info = super()._proc_member(tar)
        if getattr(info, "sparse", None) is not None:
            raise _Refused("a PAX sparse member; refusing to extract (packages have none)")
        return info


def _tar_members(stream, deb: Path):
    """The members of a tar stream one by one, without tarfile's growing member list."""
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            count = 0
            while True:
                info = tar.next()
                if info is None:
                    return
                tar.members.clear()              # stream mode never needs them again
                count += 1
                if count > MAX_MEMBERS:
                    raise ArmvmError(f"{deb}: more than {MAX_MEMBERS} members; refusing to "
                                     "extract")
                yield tar, info
    except _Refused as e:
        raise ArmvmError(f"{deb}: {e}") from None


def _members(f: BinaryIO, deb: Path) -> dict[str, _Member]:
    f.seek(0, os.SEEK_END)
    total = f.tell()
    f.seek(0)
    if f.read(len(AR_MAGIC)) != AR_MAGIC:
        raise ArmvmError(f"{deb}: not a .deb file (no ar archive signature)")
    members: dict[str, _Member] = {}
    offset = len(AR_MAGIC)
    while offset + AR_HEADER <= total:
        f.seek(offset)
        header = f.read(AR_HEADER)
        if header[58:60] != b"`\n":
            raise ArmvmError(f"{deb}: corrupt ar member header at offset {offset}")
        name = header[0:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip() or "0")
        except ValueError:
            raise ArmvmError(f"{deb}: corrupt ar member size at offset {offset}") from None
        start = offset + AR_HEADER
        if size < 0 or start + size > total:
            raise ArmvmError(f"{deb}: ar member {name!r} runs past the end of the file")
        members.setdefault(name, _Member(f, start, size))
        offset = start + size + (size & 1)
    if "debian-binary" not in members:
        raise ArmvmError(f"{deb}: not a .deb file (no debian-binary member)")
    version = members["debian-binary"].read(16)
    if not version.startswith(b"2."):
        raise ArmvmError(f"{deb}: unsupported .deb format version {version.strip()!r} "
                         "(allowed: 2.x)")
    return members


def _open_tar_member(members: dict[str, _Member], base: str, deb: Path) -> tuple[IO[bytes], int]:
    """A decompressed stream for control.tar* / data.tar*, and the compressed size."""
    for name in sorted(members):
        if not name.startswith(base):
            continue
        suffix = name[len(base):]
        raw = members[name]
        if suffix == "":
            return raw, raw.size  # type: ignore[return-value]
        if suffix == ".xz":
            return _XzReader(raw), raw.size
        if suffix == ".gz":
            import gzip
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw.size  # type: ignore[arg-type]
        if suffix == ".bz2":
            import bz2
            return bz2.BZ2File(raw), raw.size  # type: ignore[arg-type]
        if suffix == ".zst":
            import zstandard
            return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
                raw, read_across_frames=True), raw.size
        raise ArmvmError(f"{deb}: member {name!r} uses an unsupported compression "
                         f"'{suffix.lstrip('.')}' (allowed: {base}, "
                         + ", ".join(base + c for c in COMPRESSIONS if c) + ")")
    raise ArmvmError(f"{deb}: no {base} member (allowed: {base}"
                     + "".join(", " + base + c for c in COMPRESSIONS if c) + ")")


def read_control(deb: Path) -> dict:
    """The fields of the package's control file (DEBIAN/control), as a plain dict."""
    from debian.deb822 import Deb822
    deb = Path(deb)
    try:
        with open(deb, "rb") as f:
            stream, compressed = _open_tar_member(_members(f, deb), "control.tar", deb)
            stream = _Budget(stream, compressed * MAX_EXPANSION + EXTRA_ALLOWANCE, deb,
                             "control.tar")
            for tar, info in _tar_members(stream, deb):
                if _clean_name(info.name, deb) == "control" and info.isreg():
                    if info.size > 16 * 1024 * 1024:
                        raise ArmvmError(f"{deb}: control file is too large")
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    return dict(Deb822(data.decode("utf-8", "replace").splitlines()))
    except _decompress_errors() as e:
        raise ArmvmError(f"{deb}: corrupt control archive: {_show(e, 200)}") from None
    except MemoryError:
        raise ArmvmError(f"{deb}: control archive needs more memory than allowed") from None
    except OSError as e:
        raise ArmvmError(f"{deb}: cannot read: {e.strerror or _show(e, 200)}") from None
    raise ArmvmError(f"{deb}: control archive has no 'control' file")


def _clean_name(name: str, deb: Path) -> str:
    """A member name relative to the tree root ('' for the root itself), or an error."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise ArmvmError(f"{deb}: member {_show(name)} has a name longer than {MAX_NAME} "
                         "bytes; refusing to extract")
    if name.startswith("/"):
        raise ArmvmError(f"{deb}: member {_show(name)} has an absolute path; refusing to "
                         "extract")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArmvmError(f"{deb}: member {_show(name)} contains '..'; refusing to extract")
    return "/".join(parts)


def _safe_parent(dest: Path, rel: str, deb: Path, what: str) -> Path:
    """Create the parent directories of ``rel`` under ``dest``, never through a symlink."""
    current = dest
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise ArmvmError(f"{deb}: member {_show(what)} passes through the symlink "
                             f"{current.relative_to(dest)}; refusing to extract")
        if not stat.S_ISDIR(st.st_mode):
            raise ArmvmError(f"{deb}: member {_show(what)} needs {current.relative_to(dest)} to be a "
                             "directory, but it is a file")
    return current


def _replace(path: Path, deb: Path, what: str) -> None:
    """Remove a non-directory at ``path`` (a later member replaces it); never a directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ArmvmError(f"{deb}: member {_show(what)} would replace a directory; refusing to "
                         "extract")
    os.unlink(path)


def _no_symlink_on_path(dest: Path, rel: str) -> bool:
    current = dest
    for part in rel.split("/"):
        current = current / part
        if os.path.islink(current):
            return False
    return True


def _mode(info: tarfile.TarInfo, directory: bool) -> int:
    return (info.mode & 0o777) | (0o700 if directory else 0o600)


def extract_deb(deb: Path, dest: Path) -> None:
    """Extract the data archive of ``deb`` into the existing directory ``dest``."""
    deb, dest = Path(deb), Path(dest)
    try:
        with open(deb, "rb") as f:
            stream, compressed = _open_tar_member(_members(f, deb), "data.tar", deb)
            budget = compressed * MAX_EXPANSION + EXTRA_ALLOWANCE
            stream = _Budget(stream, budget, deb, "data.tar")
            for tar, info in _tar_members(stream, deb):
                budget -= TAR_HEADER_COST + max(info.size, 0)
                if budget < 0:
                    raise ArmvmError(f"{deb}: data archive expands to more than "
                                     f"{MAX_EXPANSION}x its size; refusing to extract")
                _extract_member(tar, info, dest, deb)
    except _decompress_errors() as e:
        raise ArmvmError(f"{deb}: corrupt data archive: {_show(e, 200)}") from None
    except MemoryError:
        raise ArmvmError(f"{deb}: data archive needs more memory than allowed") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ArmvmError(f"{deb}: cannot extract into {dest}: {e.strerror} (the package "
                             f"holds up to {_mib(compressed * MAX_EXPANSION)}; free space "
                             "there or set ARMVM_CACHE_DIR to a larger disk)") from None
        where = f" ({_show(e.filename)})" if getattr(e, "filename", None) else ""
        raise ArmvmError(f"{deb}: cannot extract into {dest}: "
                         f"{e.strerror or _show(e, 200)}{where}") from None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _decompress_errors() -> tuple:
    import lzma
    import zlib
    errors = [tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, ValueError,
              UnicodeError]
    try:
        import gzip
        errors.append(gzip.BadGzipFile)
    except AttributeError:                       # Python < 3.8 has no BadGzipFile
        pass
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _extract_member(tar: tarfile.TarFile, info: tarfile.TarInfo, dest: Path, deb: Path) -> None:
    rel = _clean_name(info.name, deb)
    if rel == "":                                # "./" itself
        if info.isdir():
            os.chmod(dest, _mode(info, True))
        return
    if info.ischr() or info.isblk() or info.isfifo():
        return                                   # device nodes and FIFOs are skipped
    parent = _safe_parent(dest, rel, deb, info.name)
    target = parent / rel.rsplit("/", 1)[-1]
    if info.isdir():
        if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink()):
            _replace(target, deb, info.name)
        if not os.path.lexists(target):
            os.mkdir(target, 0o700)
        os.chmod(target, _mode(info, True))
        return
    _replace(target, deb, info.name)
    if info.issym():
        link = info.linkname
        if not link:
            raise ArmvmError(f"{deb}: symlink {_show(info.name)} has an empty target")
        if not link.startswith("/"):
            if len(link.encode("utf-8", "surrogateescape")) > MAX_NAME:
                raise ArmvmError(f"{deb}: symlink {_show(info.name)} has a target longer than "
                                 f"{MAX_NAME} bytes; refusing to extract")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
            if resolved == ".." or resolved.startswith("../"):
                raise ArmvmError(f"{deb}: symlink {_show(info.name)} -> {_show(link)} points outside "
                                 "the package tree; refusing to extract")
        os.symlink(link, target)
        return
    if info.islnk():
        source_rel = _clean_name(info.linkname, deb)
        source = dest / source_rel
        if not source_rel or not _no_symlink_on_path(dest, source_rel) or \
                not os.path.isfile(source):
            raise ArmvmError(f"{deb}: hard link {_show(info.name)} -> {_show(info.linkname)} does not "
                             "name a regular file extracted earlier; refusing to extract")
        os.link(source, target)
        return
    if not info.isreg():
        return                                   # other special types: skipped
    src = tar.extractfile(info)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    with os.fdopen(fd, "wb") as out:
        if src is not None:
            while True:
                chunk = src.read(1024 * 1024)
                if not chunk:
                    break
                out.write(chunk)
    os.chmod(target, _mode(info, False))
    os.utime(target, (info.mtime, info.mtime))
