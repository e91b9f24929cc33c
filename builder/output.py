"""Outputs beside the image: the block map (bmaptool's format), checksums, and atomic
publication (temporary name, then rename), so a failed build leaves nothing new under the
final names and an earlier good image stays untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Tuple

from builder.errors import ArmvmError

BMAP_BLOCK = 4096


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


def _block_ranges(path: Path, block: int) -> List[Tuple[int, int]]:
    """Mapped ranges as inclusive block numbers, adjacent ranges merged."""
    out: List[Tuple[int, int]] = []
    for start, end in mapped_ranges(path):
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


def bmap_xml(path: Path) -> str:
    """A bmap file (version 2.0, sha256) for the sparse image at `path`."""
    size = path.stat().st_size
    blocks = -(-size // BMAP_BLOCK)
    ranges = _block_ranges(path, BMAP_BLOCK)
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


class Staging:
    """Files written under temporary names in the output folder, renamed on commit().

    If commit() is never reached (error, interrupt), every temporary file is removed and
    nothing new appears under the final names.
    """

    def __init__(self, out_dir: Path, name: str):
        self.out_dir, self.name = out_dir, name
        self.pending: List[Tuple[Path, Path]] = []
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArmvmError(f"cannot create the output folder {out_dir}: {exc.strerror}")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ArmvmError(f"the output folder {out_dir} is not writable")

    def temp_path(self, final_name: str) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=self.out_dir)
        os.close(fd)
        path = Path(tmp)
        self.pending.append((path, self.out_dir / final_name))
        return path

    def write_text(self, final_name: str, text: str) -> Path:
        path = self.temp_path(final_name)
        path.write_text(text)
        return path

    def commit(self) -> List[Path]:
        done = []
        for tmp, final in self.pending:
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False
