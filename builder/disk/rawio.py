"""Positional writes into an image file descriptor, and kernel-side file copies."""
from __future__ import annotations

import errno
import os

from builder.errors import ArmvmError

COPY_CHUNK = 1 << 20          # fallback read()/pwrite() buffer
_KERNEL_COPY_MAX = 1 << 30    # bytes per copy_file_range call
# copy_file_range errors that mean "not here" (other file systems, old kernels).
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)
_recorders: dict = {}         # fd -> Extents being recorded (see record())


class Extents:
    """The byte ranges written into one image file, as the writers wrote them: every byte
    outside them is a hole (zero). Feeds the block map without scanning the file."""

    def __init__(self):
        self._spans: list = []

    def add(self, offset: int, length: int) -> None:
        if length > 0:
            self._spans.append((offset, offset + length))

    def merged(self) -> list:
        """Sorted (start, end) byte ranges, overlapping or touching ones joined."""
        out: list = []
        for start, end in sorted(self._spans):
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        return out


class record:
    """``with record(fd) as extents:`` notes every pwrite_all/copy_file_into into ``fd``."""

    def __init__(self, fd: int):
        self.fd, self.extents = fd, Extents()

    def __enter__(self) -> Extents:
        _recorders[self.fd] = self.extents
        return self.extents

    def __exit__(self, *exc) -> None:
        _recorders.pop(self.fd, None)


def _note(fd: int, offset: int, length: int) -> None:
    ext = _recorders.get(fd)
    if ext is not None:
        ext.add(offset, length)


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until every byte of ``data`` is written at ``offset``."""
    view = memoryview(data)
    _note(fd, offset, view.nbytes)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def copy_file_into(fd: int, offset: int, source, size: int, what: str, src_start: int = 0) -> None:
    """Copy ``size`` bytes of file ``source`` (from ``src_start``) into ``fd`` at ``offset``.

    Uses os.copy_file_range (no data through user space), falling back to 1 MiB
    pread/pwrite chunks; never holds the whole file in memory. ``what`` names the file
    in error messages.
    """
    try:
        src = os.open(source, os.O_RDONLY)
    except OSError as err:
        raise ArmvmError(f"{what}: cannot read {str(source)!r}: {err.strerror}") from None
    _note(fd, offset, size)
    try:
        kernel = hasattr(os, "copy_file_range")
        done = 0
        while done < size:
            want = size - done
            got = None
            if kernel:
                try:
                    got = os.copy_file_range(src, fd, min(want, _KERNEL_COPY_MAX),
                                             src_start + done, offset + done)
                except OSError as err:
                    if err.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
            if got is None:
                chunk = os.pread(src, min(want, COPY_CHUNK), src_start + done)
                pwrite_all(fd, chunk, offset + done)
                got = len(chunk)
            if got == 0:
                raise ArmvmError(f"{what}: {str(source)!r} shrank while being copied "
                                 f"({done} of {size} bytes)")
            done += got
    finally:
        os.close(src)


def copy_sparse_into(fd: int, offset: int, source, size: int, what: str) -> None:
    """Copy the data ranges of the sparse file ``source`` (exactly ``size`` bytes) into
    ``fd`` at ``offset``; its holes stay holes in the image."""
    actual = os.stat(source).st_size
    if actual != size:
        raise ArmvmError(f"{what}: {source} has {actual} bytes, the partition {size}")
    ranges = []
    src = os.open(source, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole remains
                break
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            pos = end
    finally:
        os.close(src)
    for start, end in ranges:
        copy_file_into(fd, offset + start, source, end - start, what, src_start=start)
