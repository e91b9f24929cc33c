"""Outputs beside the image: the block map (bmaptool's format), checksums, and atomic
publication (temporary name, then rename), so a failed build leaves nothing new under the
final names and an earlier good image stays untouched.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator, List, Tuple

from builder.errors import ArmvmError

BMAP_BLOCK = 4096
LEGACY_STALE_SECONDS = 24 * 3600


def mapped_ranges(path: Path) -> Iterator[Tuple[int, int]]:
    """(start, end) byte ranges that hold data, from SEEK_DATA/SEEK_HOLE: the cost grows
    with the payload, not the disk size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: no data after pos
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, min(end, size)
            pos = end


def _block_ranges(path: Path, block: int, extents=None) -> List[Tuple[int, int]]:
    """Mapped ranges as inclusive block numbers, adjacent ranges merged: the (start, end)
    byte ``extents`` the writer reports, else what SEEK_DATA/SEEK_HOLE find."""
    out: List[Tuple[int, int]] = []
    for start, end in (mapped_ranges(path) if extents is None else extents):
        first, last = start // block, (end - 1) // block
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _hash_range(f, h, start: int, end: int) -> None:
    """Feed bytes [start, end) of the open file `f` into the hash `h`, 1 MiB at a time."""
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)


def bmap_xml(path: Path, extents=None) -> str:
    """A bmap file (version 2.0, sha256) for the sparse image at `path`. ``extents``: the
    (start, end) byte ranges the image writer wrote (bytes outside them are zero); then the
    map does not depend on how the file system reports holes, and no scan is needed."""
    size = path.stat().st_size
    blocks = -(-size // BMAP_BLOCK)
    ranges = _block_ranges(path, BMAP_BLOCK, extents)
    lines, mapped = [], 0
    with open(path, "rb") as f:
        for first, last in ranges:
            h = hashlib.sha256()
            _hash_range(f, h, first * BMAP_BLOCK, min((last + 1) * BMAP_BLOCK, size))
            mapped += last - first + 1
            span = f"{first}" if first == last else f"{first}-{last}"
            lines.append(f'        <Range chksum="{h.hexdigest()}"> {span} </Range>\n')
    text = ('<?xml version="1.0" ?>\n'
            '<!-- Block map of a sparse raw image written by armvm-build; copy it with\n'
            '     `bmaptool copy <image> <device>`. -->\n'
            '<bmap version="2.0">\n'
            f"    <ImageSize> {size} </ImageSize>\n"
            f"    <BlockSize> {BMAP_BLOCK} </BlockSize>\n"
            f"    <BlocksCount> {blocks} </BlocksCount>\n"
            f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n"
            "    <ChecksumType> sha256 </ChecksumType>\n"
            f"    <BmapFileChecksum> {'0' * 64} </BmapFileChecksum>\n"
            "    <BlockMap>\n" + "".join(lines) + "    </BlockMap>\n</bmap>\n")
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text.replace("0" * 64, digest, 1)


def sha256_sparse(path: Path) -> str:
    """Whole-image sha256 that feeds holes from a zero buffer instead of reading them."""
    h, pos, zeros = hashlib.sha256(), 0, bytes(1 << 20)
    size = path.stat().st_size
    with open(path, "rb") as f:
        for start, end in list(mapped_ranges(path)) + [(size, size)]:
            gap = start - pos
            while gap > 0:
                n = min(gap, len(zeros))
                h.update(zeros[:n] if n < len(zeros) else zeros)
                gap -= n
            _hash_range(f, h, start, end)
            pos = end
    return h.hexdigest()


def canonical_json(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _space_error(folder: Path, what: str, needed: int, exc: OSError) -> ArmvmError:
    """A clean message for ENOSPC/EDQUOT/EFBIG naming the folder and the space needed."""
    if exc.errno == errno.EFBIG:
        why = "the file size limit (ulimit -f) was reached"
    else:
        why = exc.strerror or "no space left on device"
    return ArmvmError(f"{folder}: {why} while writing {what}; about {_mib(needed)} are needed "
                      "there (free space or choose another folder with -o)")


def disk_full_error(exc: OSError, work: Path) -> BaseException:
    """A full disk anywhere in a build (e.g. the initramfs in the work folder) as a clean
    error naming the file's folder; any other OSError is returned unchanged."""
    if exc.errno not in DISK_FULL:
        return exc
    where = Path(exc.filename).parent if getattr(exc, "filename", None) else work
    if where == work or work in where.parents:
        where = work.parent                      # the output folder, not our scratch one
    why = ("the file size limit (ulimit -f) was reached" if exc.errno == errno.EFBIG
           else exc.strerror or "no space left on device")
    return ArmvmError(f"{where}: {why} while building; free space there or choose another "
                      "output folder with -o (ARMVM_CACHE_DIR for the cache); nothing was "
                      "published")


def _mib(n: int) -> str:
    return f"{max(n, 0) / (1 << 20):.1f} MiB"


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Staging:
    """Files written under temporary names in the output folder, renamed on commit().

    If commit() is never reached (error, interrupt), every temporary file is removed and
    nothing new appears under the final names. Renames replace a symlink planted at a final
    name instead of following it; temporary files are created with O_EXCL|O_NOFOLLOW.

    A build that is SIGKILLed cannot clean up, so every build holds an flock on its own
    ``.<name>.<token>.lock`` for its lifetime, and its temporary files and work folder carry
    the token (``.<name>.raw.<token>.tmp``, ``.<name>.work.<token>.tmp``). The next build of
    the same recipe in the same folder removes the files of every token whose lock it can
    take (its owner is dead); a live build's lock is held, so its files are never touched.
    """

    def __init__(self, out_dir: Path, name: str):
        self.out_dir, self.name = Path(out_dir), name
        self.pending: List[Tuple[Path, Path]] = []
        self.token = secrets.token_hex(8)
        self._count = 0
        self._work: Path | None = None
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArmvmError(f"cannot create the output folder {out_dir}: {exc.strerror}")
        if not os.access(self.out_dir, os.W_OK | os.X_OK):
            raise ArmvmError(f"the output folder {out_dir} is not writable")
        self._lock_fd = self._take_lock()
        self.swept = self.sweep_stale()

    # --- liveness ------------------------------------------------------------------------
    def _lock_path(self, token: str) -> Path:
        return self.out_dir / f".{self.name}.{token}.lock"

    def _take_lock(self) -> int:
        """Create, flock, then rename into place: a sweeper never sees our lock unlocked."""
        tmp = self.out_dir / f".{self.name}.{self.token}.lock-new"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.replace(tmp, self._lock_path(self.token))
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise _space_error(self.out_dir, "the build lock", 4096, exc) from None
            raise ArmvmError(f"cannot create a file in the output folder {self.out_dir}: "
                             f"{exc.strerror}") from None
        return fd

    def _leftover_re(self, token: str) -> "re.Pattern[str]":
        return re.compile(rf"\.{re.escape(self.name)}\..*\.{token}(?:-[0-9]+)?\.tmp")

    def sweep_stale(self) -> List[str]:
        """Remove the temporary files and work folders of dead builds of this recipe."""
        lock_re = re.compile(rf"\.{re.escape(self.name)}\.([0-9a-f]{{16}})\.lock")
        removed: List[str] = []
        try:
            names = os.listdir(self.out_dir)
        except OSError:
            return removed
        for lock_name in names:
            m = lock_re.fullmatch(lock_name)
            if not m or m.group(1) == self.token:
                continue
            try:
                fd = os.open(self.out_dir / lock_name, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue                                  # gone meanwhile, or not ours
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue                              # a live build holds it
                leftover = self._leftover_re(m.group(1))
                for other in os.listdir(self.out_dir):
                    if leftover.fullmatch(other):
                        _remove(self.out_dir / other)
                        removed.append(other)
                try:
                    os.unlink(self.out_dir / lock_name)
                except OSError:
                    pass
            finally:
                os.close(fd)
        return removed + self._sweep_legacy(names)

    def _sweep_legacy(self, names: List[str]) -> List[str]:
        """Leftovers of builds before the lock scheme (random mkstemp names, no lock to
        ask): removed once older than a day, when no build can still be writing them."""
        legacy = re.compile(rf"\.{re.escape(self.name)}\.(?:(?:failed\.)?raw|manifest\.json|"
                            r"(?:failed\.)?verify\.json|bmap|raw\.sha256|vmlinuz|initrd|"
                            r"cmdline)\.[a-z0-9_]{8}\.tmp|"
                            rf"\.{re.escape(self.name)}\.work-[a-z0-9_]{{8}}")
        removed, old = [], time.time() - LEGACY_STALE_SECONDS
        for other in names:
            if legacy.fullmatch(other):
                try:
                    if os.lstat(self.out_dir / other).st_mtime < old:
                        _remove(self.out_dir / other)
                        removed.append(other)
                except OSError:
                    pass
        return removed

    # --- temporary outputs ---------------------------------------------------------------
    def _new_name(self, final_name: str) -> Path:
        self._count += 1
        return self.out_dir / f".{final_name}.{self.token}-{self._count}.tmp"

    def work_dir(self) -> Path:
        """A scratch folder for this build, removed on exit (or by the next build)."""
        if self._work is None:
            path = self.out_dir / f".{self.name}.work.{self.token}.tmp"
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                raise ArmvmError(f"cannot create a work folder in {self.out_dir}: "
                                 f"{exc.strerror}") from None
            self._work = path
        return self._work

    def temp_path(self, final_name: str) -> Path:
        path = self._new_name(final_name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            os.fchmod(fd, 0o644)                      # whatever the umask
            os.close(fd)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise _space_error(self.out_dir, final_name, 4096, exc) from None
            raise ArmvmError(f"cannot create {path}: {exc.strerror}") from None
        self.pending.append((path, self.out_dir / final_name))
        return path

    def retarget(self, tmp: Path, final_name: str) -> None:
        """Publish the pending ``tmp`` under another final name (e.g. <name>.failed.raw)."""
        self.pending = [(t, self.out_dir / final_name if t == tmp else f)
                        for t, f in self.pending]

    def write_text(self, final_name: str, text: str) -> Path:
        path = self.temp_path(final_name)
        data = text.encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise _space_error(self.out_dir, final_name, len(data), exc) from None
            raise ArmvmError(f"cannot write {path}: {exc.strerror}") from None
        return path

    def drop(self, tmp: Path) -> None:
        """Remove the pending ``tmp`` without publishing it."""
        self.pending = [(t, f) for t, f in self.pending if t != tmp]
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass

    def commit(self) -> List[Path]:
        done = []
        for tmp, final in self.pending:
            os.replace(tmp, final)           # rename(2) replaces a symlink, never follows it
            done.append(final)
        self.pending = []
        return done

    def discard(self) -> None:
        for tmp, _ in self.pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self.pending = []

    def close(self) -> None:
        self.discard()
        if self._work is not None:
            _remove(self._work)
            self._work = None
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path(self.token))
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _remove(path: Path) -> None:
    """Remove a file, symlink or folder without following symlinks."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
