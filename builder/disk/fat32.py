"""FAT32 formatter and populator, writing in place at a byte offset of an image file.

Follows Microsoft's FAT specification (fatgen103): the FAT type is decided by the
cluster count alone, so the volume always gets >= 65525 (+ a margin) clusters.

Preconditions and guarantees:
- ``f`` is a regular file opened ``'r+b'``, at least ``offset + volume_bytes`` long,
  and the volume's bytes read as zero (a fresh sparse file from ``f.truncate(size)``).
  Only metadata (boot sectors, FSInfo, the used part of both FATs, directories) and
  file data are written; free clusters and free FAT entries stay holes.
- Writes go through ``f.fileno()`` (``os.pwrite``, ``os.copy_file_range``); ``f`` is
  flushed first and its file position is not used.
- Deterministic: the same inputs give identical bytes. Clusters are handed out from
  cluster 2 upwards: the root directory, then every other directory in pre-order, then
  every file in pre-order; each chain is contiguous. Within a directory the entries are
  ".", ".." (or the volume label in the root), then the children sorted by their
  case-folded long name (``fatnames.fold``, Python code-point order).
- Timestamps: ``timestamp`` (seconds since the Unix epoch) is written as UTC with
  2-second resolution, clamped to 1980-01-01 .. 2107-12-31, as the create, write and
  access time of every entry.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from builder import spec
from builder.disk import fatnames, fatrecords, rawio
from builder.disk.fatnames import check_name
from builder.errors import ArmvmError

__all__ = ["FatFile", "FatExtent", "Fat32Geometry", "Fat32Result", "check_name",
           "min_fat32_bytes", "plan_fat32", "write_fat32"]

RESERVED_SECTORS = 32
NUM_FATS = 2
ROOT_CLUSTER = 2
MAX_CLUSTER_BYTES = 32 * 1024
CLUSTER_MARGIN = 16               # clusters kept above 65525 against off-by-few readers
MAX_FAT32_CLUSTERS = 0x0FFFFFF5   # cluster numbers 2..0x0FFFFFF6 must stay below BAD
MAX_FILE_SIZE = 0xFFFFFFFF
MAX_DIR_ENTRIES = 65536           # fatgen103: a directory holds at most 2^16 entries
FAT_CHUNK_ENTRIES = 1 << 18       # FAT entries built per write (1 MiB)


@dataclass(frozen=True)
class FatFile:
    dest: str      # POSIX-style path inside the volume, e.g. "EFI/BOOT/BOOTAA64.EFI"
    source: Path   # host file to copy
    size: int


@dataclass(frozen=True)
class Fat32Geometry:
    sector_size: int
    total_sectors: int        # BPB_TotSec32
    sectors_per_cluster: int  # BPB_SecPerClus
    reserved_sectors: int     # BPB_RsvdSecCnt
    num_fats: int             # BPB_NumFATs
    fat_sectors: int          # BPB_FATSz32
    cluster_count: int        # data clusters (decides the FAT type)
    clusters_used: int = 0    # clusters the planned content occupies (root included)

    @property
    def cluster_bytes(self) -> int:
        return self.sectors_per_cluster * self.sector_size

    @property
    def data_start_sector(self) -> int:
        return self.reserved_sectors + self.num_fats * self.fat_sectors

    @property
    def free_clusters(self) -> int:
        return self.cluster_count - self.clusters_used


@dataclass(frozen=True)
class FatExtent:
    dest: str
    first_cluster: int   # 0 for an empty file
    clusters: int
    offset: int          # absolute byte offset of the data in the image (0 if empty)
    size: int


@dataclass(frozen=True)
class Fat32Result:
    geometry: Fat32Geometry
    files: tuple          # FatExtent per file, in allocation (pre-)order


@dataclass(eq=False)
class _Node:
    name: str
    path: str
    is_dir: bool
    file: FatFile | None = None
    children: dict = field(default_factory=dict)
    short: bytes = b""
    cluster: int = 0
    clusters: int = 0


# --- geometry --------------------------------------------------------------------------

def _fat_sectors(total: int, spc: int, sector_size: int) -> int:
    """BPB_FATSz32 as fatgen103 computes it, generalised from 512-byte sectors
    (TmpVal2 = (256 * SecPerClus + NumFATs) / 2 becomes entries-per-sector * SecPerClus
    + NumFATs / 2), then grown if the FAT cannot map every cluster."""
    per_sector = sector_size // 4
    tmp2 = per_sector * spc + NUM_FATS // 2
    fat = -(-(total - RESERVED_SECTORS) // tmp2)
    while fat * per_sector < (total - RESERVED_SECTORS - NUM_FATS * fat) // spc + 2:
        fat += 1
    return fat


def _geometry_for(total: int, spc: int, sector_size: int) -> Fat32Geometry:
    fat = _fat_sectors(total, spc, sector_size)
    clusters = (total - RESERVED_SECTORS - NUM_FATS * fat) // spc
    return Fat32Geometry(sector_size, total, spc, RESERVED_SECTORS, NUM_FATS, fat, clusters)


def _min_clusters() -> int:
    return spec.FAT16_MAX_CLUSTERS + CLUSTER_MARGIN


@lru_cache(maxsize=None)
def min_fat32_bytes(sector_size: int) -> int:
    """Smallest volume size accepted at this sector size: every size from it upwards
    has >= 65525 + CLUSTER_MARGIN clusters at one sector per cluster."""
    _check_sector_size(sector_size)
    period = (sector_size // 4) + NUM_FATS // 2   # FATSz grows by one every `period`
    total = RESERVED_SECTORS + _min_clusters()
    last_bad = total - 1
    while total - last_bad <= period:
        if _geometry_for(total, 1, sector_size).cluster_count < _min_clusters():
            last_bad = total
        total += 1
    return (last_bad + 1) * sector_size


def _check_sector_size(sector_size: int) -> None:
    if sector_size not in spec.FAT_BYTES_PER_SECTOR:
        raise ArmvmError(f"FAT32: sector size {sector_size} is not supported (allowed: "
                         f"{', '.join(map(str, spec.FAT_BYTES_PER_SECTOR))})")


def _geometry(volume_bytes: int, sector_size: int) -> Fat32Geometry:
    minimum = min_fat32_bytes(sector_size)
    if volume_bytes < minimum:
        mib = -(-minimum // (1024 * 1024))
        raise ArmvmError(f"ESP too small for FAT32 at {sector_size}-byte sectors: at least "
                         f"{mib} MiB needed ({minimum} bytes), got {volume_bytes} bytes")
    total = volume_bytes // sector_size
    if total > 0xFFFFFFFF:
        raise ArmvmError(f"FAT32 volume of {volume_bytes} bytes is too large at "
                         f"{sector_size}-byte sectors (at most 2^32-1 sectors)")
    spc = MAX_CLUSTER_BYTES // sector_size
    while True:
        geo = _geometry_for(total, spc, sector_size)
        if geo.cluster_count >= _min_clusters() or spc == 1:
            break
        spc //= 2
    if geo.cluster_count > MAX_FAT32_CLUSTERS:
        raise ArmvmError(f"FAT32 volume of {volume_bytes} bytes is too large: "
                         f"{geo.cluster_count} clusters (at most {MAX_FAT32_CLUSTERS})")
    assert geo.cluster_count >= spec.FAT16_MAX_CLUSTERS  # guaranteed by min_fat32_bytes
    return geo


# --- the directory tree ----------------------------------------------------------------

def _split(path: str, what: str) -> list[str]:
    if not isinstance(path, str):
        raise ArmvmError(f"FAT {what} path {path!r} is not a string")
    parts = (path[1:] if path.startswith("/") else path).split("/")
    for part in parts:
        try:
            check_name(part)
        except ArmvmError as err:
            raise ArmvmError(f"FAT {what} path {path!r}: {err}") from None
    return parts


def _ensure_dir(root: _Node, parts: list[str], path: str) -> _Node:
    node = root
    for depth, part in enumerate(parts):
        key = fatnames.fold(part)
        child = node.children.get(key)
        prefix = "/".join(parts[:depth + 1])
        if child is None:
            child = node.children[key] = _Node(part, prefix, True)
        elif not child.is_dir:
            raise ArmvmError(f"FAT path {path!r} needs {prefix!r} to be a directory, but "
                             f"{child.path!r} is a file")
        elif child.name != part:
            raise ArmvmError(f"FAT directory {child.path!r} is also spelled {prefix!r} "
                             f"(names are case-insensitive: use one spelling)")
        node = child
    return node


def _build_tree(files: Sequence[FatFile], dirs: Sequence[str]) -> _Node:
    root = _Node("", "", True)
    for d in dirs:
        trimmed = d[:-1] if isinstance(d, str) and d.endswith("/") else d
        _ensure_dir(root, _split(trimmed, "directory"), d)
    for f in files:
        parts = _split(f.dest, "file")
        if not isinstance(f.size, int) or not 0 <= f.size <= MAX_FILE_SIZE:
            raise ArmvmError(f"FAT file {f.dest!r}: size {f.size!r} is not allowed "
                             f"(FAT32 files hold 0..{MAX_FILE_SIZE} bytes)")
        parent = _ensure_dir(root, parts[:-1], f.dest)
        key = fatnames.fold(parts[-1])
        other = parent.children.get(key)
        if other is not None:
            kind = "a directory" if other.is_dir else "a file"
            raise ArmvmError(f"duplicate FAT destination {f.dest!r}: {other.path!r} is "
                             f"already {kind} (names are case-insensitive)")
        parent.children[key] = _Node(parts[-1], f.dest, False, file=f)
    return root


def _sorted_children(node: _Node) -> list[_Node]:
    return [node.children[k] for k in sorted(node.children)]


def _preorder(root: _Node) -> Iterator[_Node]:
    """Every node, each directory before its children, children in sorted order
    (iterative: path depth is bounded only by the input)."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if node.is_dir:
            stack.extend(reversed(_sorted_children(node)))


def _dir_entry_count(node: _Node, has_label: bool) -> int:
    names = [c.name for c in node.children.values()]
    shorts = fatnames.assign_short_names(names)
    count = (1 if has_label else 0) if node.path == "" else 2   # label, or "." and ".."
    for child in node.children.values():
        child.short = shorts[child.name]
        count += 1
        if fatnames.needs_long_name(child.name):
            count += fatnames.long_entry_count(child.name)
    if count > MAX_DIR_ENTRIES:
        raise ArmvmError(f"FAT directory {node.path or '/'!r} needs {count} entries "
                         f"(at most {MAX_DIR_ENTRIES}); spread the files over more directories")
    return count


def _layout(volume_bytes: int, sector_size: int, files: Sequence[FatFile],
            dirs: Sequence[str], has_label: bool):
    geo = _geometry(volume_bytes, sector_size)
    root = _build_tree(files, dirs)
    order = list(_preorder(root))
    next_cluster = ROOT_CLUSTER
    needed_bytes = 0
    for node in [n for n in order if n.is_dir] + [n for n in order if not n.is_dir]:
        size = _dir_entry_count(node, has_label) * 32 if node.is_dir else node.file.size
        node.clusters = -(-size // geo.cluster_bytes)
        node.cluster = next_cluster if node.clusters else 0
        next_cluster += node.clusters
        needed_bytes += node.clusters * geo.cluster_bytes
    used = next_cluster - ROOT_CLUSTER
    if used > geo.cluster_count:
        raise ArmvmError(f"files do not fit: need {needed_bytes} bytes, have "
                         f"{geo.cluster_count * geo.cluster_bytes} (FAT32 data area of "
                         f"{geo.cluster_count} clusters of {geo.cluster_bytes} bytes)")
    return replace(geo, clusters_used=used), root, order


def plan_fat32(volume_bytes: int, sector_size: int, files: Sequence[FatFile],
               dirs: Sequence[str] = ()) -> Fat32Geometry:
    """Validate names, sizes and fit; return the geometry write_fat32 will use.

    Raises ArmvmError for a volume below min_fat32_bytes(), a name FAT cannot store, a
    duplicate destination or files that do not fit. The plan counts a volume-label entry
    in the root directory; with an empty label write_fat32 may use one cluster less.
    """
    geo, _, _ = _layout(volume_bytes, sector_size, files, dirs, has_label=True)
    return geo


# --- writing -----------------------------------------------------------------------------

def _write_fats(fd: int, base: int, geo: Fat32Geometry, chain_ends: list[int]) -> None:
    """FAT entries 0 .. last used cluster into every FAT, one 1 MiB chunk at a time."""
    end = ROOT_CLUSTER + geo.clusters_used
    fat_bytes = geo.fat_sectors * geo.sector_size
    for start in range(0, end, FAT_CHUNK_ENTRIES):
        chunk = fatrecords.fat_entries(start, min(end, start + FAT_CHUNK_ENTRIES), chain_ends)
        for copy in range(geo.num_fats):
            rawio.pwrite_all(fd, chunk, base + copy * fat_bytes + start * 4)


def _directory_bytes(node: _Node, parent: _Node | None, label: bytes | None,
                     stamp: tuple[int, int]) -> bytes:
    entry = fatrecords.short_entry
    out = []
    if parent is None:
        if label is not None:
            out.append(entry(label, spec.FAT_ATTR_VOLUME_ID, 0, 0, stamp))
    else:
        up = 0 if parent.path == "" else parent.cluster          # ".." to the root is 0
        out.append(entry(b".".ljust(11), spec.FAT_ATTR_DIRECTORY, node.cluster, 0, stamp))
        out.append(entry(b"..".ljust(11), spec.FAT_ATTR_DIRECTORY, up, 0, stamp))
    for child in _sorted_children(node):
        if fatnames.needs_long_name(child.name):
            out.append(fatnames.long_entries(child.name, child.short))
        attr = spec.FAT_ATTR_DIRECTORY if child.is_dir else spec.FAT_ATTR_ARCHIVE
        size = 0 if child.is_dir else child.file.size
        out.append(entry(child.short, attr, child.cluster, size, stamp))
    return b"".join(out)


def _check_source(f: FatFile) -> None:
    try:
        st = os.stat(f.source)
    except OSError as err:
        raise ArmvmError(f"FAT file {f.dest!r}: cannot read {str(f.source)!r}: "
                         f"{err.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
        what = f"{st.st_size} bytes" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise ArmvmError(f"FAT file {f.dest!r}: {str(f.source)!r} is {what}, planned "
                         f"{f.size} bytes")


def write_fat32(f, *, offset: int, volume_bytes: int, sector_size: int,
                files: Sequence[FatFile], dirs: Sequence[str] = (), label: str,
                serial: int, timestamp: int) -> Fat32Result:
    """Format a FAT32 volume at ``offset`` and fill it (see the module docstring)."""
    label_raw = fatrecords.label_bytes(label)
    has_label = label_raw.strip(b" ") != b""
    if not isinstance(serial, int) or not 0 <= serial <= 0xFFFFFFFF:
        raise ArmvmError(f"FAT volume serial {serial!r} is not allowed (0..0xFFFFFFFF)")
    _check_sector_size(sector_size)
    if offset < 0 or offset % sector_size or offset // sector_size > 0xFFFFFFFF:
        raise ArmvmError(f"FAT32 offset {offset} is not allowed (a multiple of the "
                         f"{sector_size}-byte sector size, below 2^32 sectors)")
    geo, root, order = _layout(volume_bytes, sector_size, files, dirs, has_label)
    for node in order:
        if not node.is_dir:
            _check_source(node.file)
    f.flush()
    fd = f.fileno()
    image_size = os.fstat(fd).st_size
    if image_size < offset + volume_bytes:
        raise ArmvmError(f"FAT32 volume at {offset} of {volume_bytes} bytes does not fit "
                         f"the image file of {image_size} bytes")

    boot = fatrecords.boot_sector(
        sector_size=sector_size, sectors_per_cluster=geo.sectors_per_cluster,
        reserved_sectors=geo.reserved_sectors, num_fats=geo.num_fats,
        hidden_sectors=offset // sector_size, total_sectors=geo.total_sectors,
        fat_sectors=geo.fat_sectors, root_cluster=ROOT_CLUSTER, serial=serial,
        label=label_raw if has_label else fatrecords.NO_LABEL)
    first_free = ROOT_CLUSTER + geo.clusters_used
    fsinfo = fatrecords.fsinfo_sector(
        sector_size=sector_size, free_count=geo.free_clusters,
        next_free=first_free if first_free < geo.cluster_count + 2 else 0xFFFFFFFF)
    for first in (0, spec.FAT32_BACKUP_BOOT_SECTOR):
        rawio.pwrite_all(fd, boot, offset + first * sector_size)
        rawio.pwrite_all(fd, fsinfo, offset + (first + spec.FAT32_FSINFO_SECTOR) * sector_size)
    chain_ends = sorted(n.cluster + n.clusters - 1 for n in order if n.clusters)
    _write_fats(fd, offset + geo.reserved_sectors * sector_size, geo, chain_ends)

    def cluster_offset(cluster: int) -> int:
        sector = geo.data_start_sector + (cluster - ROOT_CLUSTER) * geo.sectors_per_cluster
        return offset + sector * sector_size

    stamp = fatrecords.fat_datetime(timestamp)
    parents = {id(child): node for node in order if node.is_dir
               for child in node.children.values()}
    extents = []
    for node in order:
        if node.is_dir:
            data = _directory_bytes(node, parents.get(id(node)),
                                    label_raw if has_label else None, stamp)
            rawio.pwrite_all(fd, data, cluster_offset(node.cluster))
    for node in order:
        if not node.is_dir:
            where = cluster_offset(node.cluster) if node.clusters else 0
            if node.clusters:
                rawio.copy_file_into(fd, where, node.file.source, node.file.size,
                                     f"FAT file {node.file.dest!r}")
            extents.append(FatExtent(node.file.dest, node.cluster, node.clusters, where,
                                     node.file.size))
    return Fat32Result(geo, tuple(extents))
