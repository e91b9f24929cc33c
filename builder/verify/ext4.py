"""Independent read-only ext2/ext3/ext4 reader (Linux Documentation/filesystems/ext4/).

Superblock, 32- and 64-byte group descriptors (meta_bg too), inodes, extent trees (index
nodes up to the kernel's depth limit of 5) and ext2/3 indirect block maps, directories
(linear scan: htree interior blocks look like empty entries), fast and slow symlinks,
path lookup that follows symlinks inside the file system, bounded file reads. Field names
follow the kernel's ext4 documentation (s_magic, s_feature_incompat, bg_inode_table_lo ...).

The image is hostile: every size, count, depth and block number is checked before use or
allocation; every failure is an Ext4Error with a message saying where.
"""
from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import Iterator, Optional
from uuid import UUID

from builder.verify.blob import Blob

SUPERBLOCK_OFFSET = 1024
EXT4_SUPER_MAGIC = 0xEF53
EXT4_ROOT_INO = 2
EXT4_N_BLOCKS = 15                     # i_block[] entries (60 bytes)
EXT4_EXT_MAGIC = 0xF30A
EXT4_MAX_EXTENT_DEPTH = 5              # fs/ext4/ext4_extents.h
EXT_INIT_MAX_LEN = 1 << 15
EXT4_EXTENTS_FL = 0x00080000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_HUGE_FILE_FL = 0x00040000
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
EXT4_ERROR_FS = 0x0002                 # s_state
EXT4_XATTR_MAGIC = 0xEA020000
EXT4_XATTR_INDEX_SYSTEM = 7            # "system.data" holds inline data past i_block
MAXSYMLINKS = 40                       # the kernel's limit on symlink hops
MAX_NAME = 255
MAX_PATH = 4096
MAX_DIR_BYTES = 64 << 20               # directories read (a 1M-entry directory is ~40 MiB)
MAX_DIR_ENTRIES = 1 << 20
MAX_LOOKUP_SCAN = 256 << 20            # directory bytes scanned for one path lookup
MAX_RUNS = 1 << 16                     # extents / contiguous runs mapped for one file
MAX_MAP_BLOCKS = 1 << 14               # extent-tree or indirect blocks read for one file
MAX_MAP_STEPS = 1 << 22                # pointers / extent entries examined for one file
MAX_GROUPS = 1 << 24

# (name, offset, struct format) as in the kernel's struct ext4_super_block.
SB_FIELDS = (
    ("s_inodes_count", 0x0, "I"), ("s_blocks_count_lo", 0x4, "I"),
    ("s_r_blocks_count_lo", 0x8, "I"), ("s_free_blocks_count_lo", 0xC, "I"),
    ("s_free_inodes_count", 0x10, "I"), ("s_first_data_block", 0x14, "I"),
    ("s_log_block_size", 0x18, "I"), ("s_log_cluster_size", 0x1C, "I"),
    ("s_blocks_per_group", 0x20, "I"), ("s_clusters_per_group", 0x24, "I"),
    ("s_inodes_per_group", 0x28, "I"), ("s_mtime", 0x2C, "I"), ("s_wtime", 0x30, "I"),
    ("s_mnt_count", 0x34, "H"), ("s_max_mnt_count", 0x36, "h"), ("s_magic", 0x38, "H"),
    ("s_state", 0x3A, "H"), ("s_errors", 0x3C, "H"), ("s_minor_rev_level", 0x3E, "H"),
    ("s_lastcheck", 0x40, "I"), ("s_checkinterval", 0x44, "I"), ("s_creator_os", 0x48, "I"),
    ("s_rev_level", 0x4C, "I"), ("s_def_resuid", 0x50, "H"), ("s_def_resgid", 0x52, "H"),
    ("s_first_ino", 0x54, "I"), ("s_inode_size", 0x58, "H"), ("s_block_group_nr", 0x5A, "H"),
    ("s_feature_compat", 0x5C, "I"), ("s_feature_incompat", 0x60, "I"),
    ("s_feature_ro_compat", 0x64, "I"), ("s_uuid", 0x68, "16s"),
    ("s_volume_name", 0x78, "16s"), ("s_last_mounted", 0x88, "64s"),
    ("s_reserved_gdt_blocks", 0xCE, "H"), ("s_journal_inum", 0xE0, "I"),
    ("s_desc_size", 0xFE, "H"), ("s_first_meta_bg", 0x104, "I"), ("s_mkfs_time", 0x108, "I"),
    ("s_blocks_count_hi", 0x150, "I"), ("s_min_extra_isize", 0x15C, "H"),
    ("s_want_extra_isize", 0x15E, "H"), ("s_log_groups_per_flex", 0x174, "B"),
    ("s_checksum_type", 0x175, "B"), ("s_checksum_seed", 0x270, "I"),
    ("s_checksum", 0x3FC, "I"),
)
# struct ext4_group_desc (the _hi halves exist when s_desc_size >= 64).
GD_FIELDS = (
    ("bg_block_bitmap_lo", 0x0, "I"), ("bg_inode_bitmap_lo", 0x4, "I"),
    ("bg_inode_table_lo", 0x8, "I"), ("bg_flags", 0x12, "H"), ("bg_checksum", 0x1E, "H"),
    ("bg_block_bitmap_hi", 0x20, "I"), ("bg_inode_bitmap_hi", 0x24, "I"),
    ("bg_inode_table_hi", 0x28, "I"),
)

# Feature bits (s_feature_*), named as in the kernel's ext4 documentation.
COMPAT = {0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr",
          0x10: "resize_inode", 0x20: "dir_index", 0x40: "lazy_bg", 0x80: "exclude_inode",
          0x100: "exclude_bitmap", 0x200: "sparse_super2", 0x400: "fast_commit",
          0x800: "stable_inodes", 0x1000: "orphan_file"}
INCOMPAT = {0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev",
            0x10: "meta_bg", 0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg",
            0x400: "ea_inode", 0x1000: "dirdata", 0x2000: "metadata_csum_seed",
            0x4000: "large_dir", 0x8000: "inline_data", 0x10000: "encrypt",
            0x20000: "casefold"}
RO_COMPAT = {0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file",
             0x10: "uninit_bg", 0x20: "dir_nlink", 0x40: "extra_isize", 0x80: "snapshot",
             0x100: "quota", 0x200: "bigalloc", 0x400: "metadata_csum", 0x800: "replica",
             0x1000: "read-only", 0x2000: "project", 0x4000: "shared_blocks",
             0x8000: "verity", 0x10000: "orphan_present"}
# What Linux's ext4 driver accepts (fs/ext4/ext4.h EXT4_FEATURE_*_SUPP).
LINUX_INCOMPAT = 0x2 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 \
    | 0x8000 | 0x10000 | 0x20000
LINUX_RO_COMPAT = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 \
    | 0x1000 | 0x2000 | 0x8000 | 0x10000
# Features newer than the oldest kernels still around: (kind, bit) -> first Linux version.
MIN_LINUX = {("incompat", 0x2000): (4, 4), ("incompat", 0x4000): (4, 13),
             ("incompat", 0x400): (4, 13), ("incompat", 0x20000): (5, 2),
             ("ro_compat", 0x8000): (5, 4), ("ro_compat", 0x10000): (5, 15)}
INCOMPAT_FILETYPE, INCOMPAT_META_BG, INCOMPAT_EXTENTS, INCOMPAT_64BIT = 0x2, 0x10, 0x40, 0x80
INCOMPAT_CSUM_SEED, INCOMPAT_INLINE_DATA = 0x2000, 0x8000
RO_COMPAT_SPARSE_SUPER, RO_COMPAT_BIGALLOC, RO_COMPAT_METADATA_CSUM = 0x1, 0x200, 0x400
RO_COMPAT_GDT_CSUM = 0x10
FT_NAMES = {1: "file", 2: "dir", 3: "chr", 4: "blk", 5: "fifo", 6: "sock", 7: "symlink"}


class Ext4Error(Exception):
    """The file system cannot be read the way it claims (message says where)."""


def _crc32c_table() -> list:
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC32C = _crc32c_table()


def crc32c_raw(crc: int, data: bytes) -> int:
    """The kernel's crc32c(seed, data): no pre- or post-inversion."""
    t = _CRC32C
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc16(crc: int, data: bytes) -> int:
    """The kernel's crc16() (CRC-16/ARC polynomial 0x8005, reflected as 0xA001)."""
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def feature_names(mask: int, table: dict) -> list:
    out = []
    for bit in range(32):
        if mask & (1 << bit):
            out.append(table.get(1 << bit, f"0x{1 << bit:x}"))
    return out


@dataclass
class Inode:
    ino: int
    mode: int
    size: int
    links: int
    flags: int
    i_block: bytes
    uid: int = 0
    gid: int = 0
    ibody: bytes = b""      # the in-inode extended attribute area (after i_extra_isize)

    @property
    def kind(self) -> int:
        return self.mode & S_IFMT

    @property
    def is_dir(self) -> bool:
        return self.kind == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.kind == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.kind == S_IFLNK


@dataclass
class DirEntry:
    name: str
    ino: int
    file_type: int          # 0 when the file system has no filetype feature


class Ext4:
    """An ext2/3/4 file system on ``blob`` (a partition). Raises Ext4Error when there is
    no usable superblock; softer inconsistencies land in ``problems``."""

    def __init__(self, blob: Blob):
        self.blob = blob
        raw = blob.read_at(SUPERBLOCK_OFFSET, 1024)
        if len(raw) < 1024:
            raise Ext4Error(f"no ext2/3/4 superblock: the partition has only {blob.size} bytes")
        self.raw_sb = raw
        sb = self.sb = {n: struct.unpack_from("<" + f, raw, o)[0] for n, o, f in SB_FIELDS}
        if sb["s_magic"] != EXT4_SUPER_MAGIC:
            raise Ext4Error(f"no ext2/3/4 superblock (s_magic 0x{sb['s_magic']:04X} at byte "
                            f"{SUPERBLOCK_OFFSET + 0x38}, expected 0x{EXT4_SUPER_MAGIC:04X})")
        self.problems: list = []
        if sb["s_log_block_size"] > 6:
            raise Ext4Error(f"s_log_block_size {sb['s_log_block_size']} gives a block size "
                            "above 64 KiB")
        bs = self.block_size = 1024 << sb["s_log_block_size"]
        self.incompat, self.ro_compat = sb["s_feature_incompat"], sb["s_feature_ro_compat"]
        self.compat = sb["s_feature_compat"]
        self.is64 = bool(self.incompat & INCOMPAT_64BIT)
        self.blocks_count = sb["s_blocks_count_lo"] | (
            (sb["s_blocks_count_hi"] << 32) if self.is64 else 0)
        if sb["s_rev_level"] == 0:
            self.inode_size, self.first_ino = 128, 11
        else:
            self.inode_size, self.first_ino = sb["s_inode_size"], sb["s_first_ino"]
        isz = self.inode_size
        if isz < 128 or isz > bs or isz & (isz - 1):
            raise Ext4Error(f"s_inode_size {isz} is not a power of two in 128..{bs}")
        self.desc_size = 32
        if self.is64:
            self.desc_size = sb["s_desc_size"]
            d = self.desc_size
            if d < 64 or d > 1024 or d & (d - 1):
                raise Ext4Error(f"64bit file system with s_desc_size {d} (a power of two in "
                                "64..1024)")
        bpg, ipg = sb["s_blocks_per_group"], sb["s_inodes_per_group"]
        if not 1 <= bpg <= 8 * bs and not (self.ro_compat & RO_COMPAT_BIGALLOC):
            raise Ext4Error(f"s_blocks_per_group {bpg} outside 1..{8 * bs}")
        if not 1 <= ipg <= 8 * bs:
            raise Ext4Error(f"s_inodes_per_group {ipg} outside 1..{8 * bs}")
        if bpg < 1:
            raise Ext4Error("s_blocks_per_group is 0")
        fdb = sb["s_first_data_block"]
        if self.blocks_count <= fdb:
            raise Ext4Error(f"s_blocks_count {self.blocks_count} <= s_first_data_block {fdb}")
        self.group_count = -(-(self.blocks_count - fdb) // bpg)
        if self.group_count > MAX_GROUPS:
            raise Ext4Error(f"{self.group_count} block groups (more than {MAX_GROUPS})")
        self.csum_seed = None
        if self.ro_compat & RO_COMPAT_METADATA_CSUM:
            self.csum_seed = (sb["s_checksum_seed"] if self.incompat & INCOMPAT_CSUM_SEED
                              else crc32c_raw(0xFFFFFFFF, sb["s_uuid"]))
        self._gd_cache: dict = {}

    # --- identity ---------------------------------------------------------------------
    @property
    def uuid(self) -> UUID:
        return UUID(bytes=self.sb["s_uuid"])

    @property
    def label(self) -> str:
        return self.sb["s_volume_name"].split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def kind(self) -> str:
        if self.incompat & ~(INCOMPAT_FILETYPE | 0x4 | INCOMPAT_META_BG) or self.ro_compat & ~0x7:
            return "ext4"
        return "ext3" if self.compat & 0x4 else "ext2"

    # --- blocks -----------------------------------------------------------------------
    def read_block(self, n: int, count: int = 1) -> bytes:
        if n < 0 or count < 1 or n + count > self.blocks_count:
            raise Ext4Error(f"block {n} is outside the file system ({self.blocks_count} "
                            "blocks)")
        want = count * self.block_size
        data = self.blob.read_at(n * self.block_size, want)
        if len(data) < want:
            raise Ext4Error(f"block {n + len(data) // self.block_size} lies beyond the end of "
                            f"the partition ({self.blob.size} bytes)")
        return data

    def _group_first_block(self, g: int) -> int:
        return self.sb["s_first_data_block"] + g * self.sb["s_blocks_per_group"]

    def has_super(self, g: int) -> bool:
        if g <= 1 or not self.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        for p in (3, 5, 7):
            n = p
            while n < g:
                n *= p
            if n == g:
                return True
        return False

    def _desc_location(self, g: int) -> int:
        """Byte offset of group ``g``'s descriptor."""
        per_block = self.block_size // self.desc_size
        if self.incompat & INCOMPAT_META_BG and g // per_block >= self.sb["s_first_meta_bg"]:
            first = (g // per_block) * per_block
            blk = self._group_first_block(first) + (1 if self.has_super(first) else 0)
        else:
            blk = self.sb["s_first_data_block"] + 1 + g // per_block
        return blk * self.block_size + (g % per_block) * self.desc_size

    def group_desc(self, g: int) -> dict:
        if not 0 <= g < self.group_count:
            raise Ext4Error(f"block group {g} does not exist ({self.group_count} groups)")
        if g in self._gd_cache:
            return self._gd_cache[g]
        off = self._desc_location(g)
        raw = self.blob.read_at(off, self.desc_size)
        if len(raw) < self.desc_size:
            raise Ext4Error(f"group descriptor {g} lies beyond the end of the partition")
        d = {n: (struct.unpack_from("<" + f, raw, o)[0] if o + struct.calcsize(f) <= len(raw)
                 else 0) for n, o, f in GD_FIELDS}
        if self.desc_size < 64:
            for k in ("bg_block_bitmap_hi", "bg_inode_bitmap_hi", "bg_inode_table_hi"):
                d[k] = 0
        d["raw"] = raw
        d["inode_table"] = d["bg_inode_table_lo"] | (d["bg_inode_table_hi"] << 32)
        if len(self._gd_cache) < 4096:
            self._gd_cache[g] = d
        return d

    def desc_checksum_ok(self, g: int) -> Optional[bool]:
        """bg_checksum: crc32c (metadata_csum) or crc16 (uninit_bg, a.k.a. gdt_csum) over
        the UUID, the group number and the descriptor; None when the fs has neither."""
        raw = self.group_desc(g)["raw"]
        want = struct.unpack_from("<H", raw, 0x1E)[0]
        if self.csum_seed is not None:
            c = crc32c_raw(self.csum_seed, struct.pack("<I", g))
            c = crc32c_raw(c, raw[:0x1E] + b"\0\0" + raw[0x20:])
            return (c & 0xFFFF) == want
        if self.ro_compat & RO_COMPAT_GDT_CSUM:
            c = crc16(0xFFFF, self.sb["s_uuid"] + struct.pack("<I", g) + raw[:0x1E])
            if self.is64:
                c = crc16(c, raw[0x20:])
            return c == want
        return None

    def superblock_checksum_ok(self) -> Optional[bool]:
        if self.csum_seed is None:
            return None
        return crc32c_raw(0xFFFFFFFF, self.raw_sb[:0x3FC]) == self.sb["s_checksum"]

    # --- inodes -----------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= self.sb["s_inodes_count"]:
            raise Ext4Error(f"inode {ino} outside 1..s_inodes_count "
                            f"({self.sb['s_inodes_count']})")
        ipg = self.sb["s_inodes_per_group"]
        g, idx = divmod(ino - 1, ipg)
        table = self.group_desc(g)["inode_table"]
        off = idx * self.inode_size
        blk = table + off // self.block_size
        raw = self.read_block(blk)[off % self.block_size:][:self.inode_size]
        mode, uid, size_lo = struct.unpack_from("<HHI", raw, 0)
        gid, links = struct.unpack_from("<HH", raw, 0x18)
        flags = struct.unpack_from("<I", raw, 0x20)[0]
        size_hi = struct.unpack_from("<I", raw, 0x6C)[0]
        ibody = b""
        if self.inode_size > 128:
            extra = struct.unpack_from("<H", raw, 0x80)[0]
            if extra % 4 == 0 and 128 + extra + 4 <= self.inode_size:
                ibody = raw[128 + extra:]
        return Inode(ino, mode, size_lo | (size_hi << 32), links, flags, raw[0x28:0x64],
                     uid, gid, ibody)

    @staticmethod
    def inline_xattr(inode: Inode, index: int, name: bytes) -> Optional[bytes]:
        """An extended attribute stored in the inode body (struct ext4_xattr_ibody_header
        0xEA020000, then ext4_xattr_entry records; values offset from the first entry)."""
        body = inode.ibody
        if len(body) < 4 or struct.unpack_from("<I", body, 0)[0] != EXT4_XATTR_MAGIC:
            return None
        entries, off = body[4:], 0
        while off + 16 <= len(entries) and struct.unpack_from("<I", entries, off)[0]:
            nlen, nidx, voff, vinum, vsize = struct.unpack_from("<BBHII", entries, off)
            if off + 16 + nlen > len(entries):
                raise Ext4Error(f"inode {inode.ino}: extended attribute entry runs past the "
                                "inode")
            if nidx == index and entries[off + 16:off + 16 + nlen] == name:
                if vinum or voff + vsize > len(entries):
                    raise Ext4Error(f"inode {inode.ino}: extended attribute value outside "
                                    "the inode")
                return entries[voff:voff + vsize]
            off += (16 + nlen + 3) & ~3
        return None

    def runs(self, inode: Inode) -> list:
        """(logical block, physical block, count, initialized) runs, sorted, for the
        blocks below the file size. Holes are absent."""
        nblocks = -(-inode.size // self.block_size)
        if inode.flags & EXT4_INLINE_DATA_FL or self.is_fast_symlink(inode):
            return []           # the data lives in i_block itself
        if inode.flags & EXT4_EXTENTS_FL:
            out: list = []
            self._extents(inode.i_block, EXT4_MAX_EXTENT_DEPTH + 1, out, [0, 0], inode.ino)
        else:
            out = self._indirect(inode, nblocks)
        out.sort()
        prev_end = 0
        for lo, phys, n, _ in out:
            if lo < prev_end:
                raise Ext4Error(f"inode {inode.ino}: overlapping extents at logical block {lo}")
            if phys < 1 or phys + n > self.blocks_count:
                raise Ext4Error(f"inode {inode.ino}: extent {phys}+{n} outside the file system "
                                f"({self.blocks_count} blocks)")
            prev_end = lo + n
        return out

    def _extents(self, node: bytes, limit: int, out: list, visited: list, ino: int) -> None:
        magic, entries, emax, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXT4_EXT_MAGIC:
            raise Ext4Error(f"inode {ino}: extent header magic 0x{magic:04X}, expected 0xF30A")
        if depth >= limit:
            raise Ext4Error(f"inode {ino}: extent tree depth {depth} (at most "
                            f"{EXT4_MAX_EXTENT_DEPTH}, decreasing by one per level)")
        if entries > emax or 12 + 12 * emax > len(node):
            raise Ext4Error(f"inode {ino}: extent node with eh_entries {entries}, eh_max "
                            f"{emax} does not fit its {len(node)} bytes")
        visited[1] += entries
        if visited[1] > MAX_MAP_STEPS:
            raise Ext4Error(f"inode {ino}: more than {MAX_MAP_STEPS} extent entries")
        for i in range(entries):
            off = 12 + 12 * i
            if depth == 0:
                lblk, ln, hi, lo = struct.unpack_from("<IHHI", node, off)
                init = ln <= EXT_INIT_MAX_LEN
                n = ln if init else ln - EXT_INIT_MAX_LEN
                if n == 0:
                    continue
                if len(out) >= MAX_RUNS:
                    raise Ext4Error(f"inode {ino}: more than {MAX_RUNS} extents")
                out.append((lblk, (hi << 32) | lo, n, init))
            else:
                _, lo, hi = struct.unpack_from("<IIH", node, off)
                visited[0] += 1
                if visited[0] > MAX_MAP_BLOCKS:
                    raise Ext4Error(f"inode {ino}: more than {MAX_MAP_BLOCKS} extent tree "
                                    "blocks")
                self._extents(self.read_block((hi << 32) | lo), depth, out, visited, ino)

    def _indirect(self, inode: Inode, nblocks: int) -> list:
        ptrs = struct.unpack("<15I", inode.i_block)
        per = self.block_size // 4
        out: list = []
        reads = [0, 0]

        def add(lblk, phys):
            if len(out) and out[-1][0] + out[-1][2] == lblk and out[-1][1] + out[-1][2] == phys:
                last = out[-1]
                out[-1] = (last[0], last[1], last[2] + 1, True)
            elif len(out) >= MAX_RUNS:
                raise Ext4Error(f"inode {inode.ino}: more than {MAX_RUNS} block runs")
            else:
                out.append((lblk, phys, 1, True))

        def walk(blk, level, base):
            """Map the ``per**level`` logical blocks from ``base`` via indirect block ``blk``."""
            if blk == 0 or base >= nblocks:
                return
            if level == 0:
                add(base, blk)
                return
            reads[0] += 1
            if reads[0] > MAX_MAP_BLOCKS:
                raise Ext4Error(f"inode {inode.ino}: more than {MAX_MAP_BLOCKS} indirect "
                                "blocks")
            entries = struct.unpack(f"<{per}I", self.read_block(blk))
            span = per ** (level - 1)
            usable = min(per, -(-(nblocks - base) // span))
            reads[1] += usable
            if reads[1] > MAX_MAP_STEPS:
                raise Ext4Error(f"inode {inode.ino}: more than {MAX_MAP_STEPS} block pointers")
            for i in range(usable):
                if entries[i]:
                    walk(entries[i], level - 1, base + i * span)

        for i in range(12):
            walk(ptrs[i], 0, i)
        walk(ptrs[12], 1, 12)
        walk(ptrs[13], 2, 12 + per)
        walk(ptrs[14], 3, 12 + per + per * per)
        return out

    def read(self, inode: Inode, limit: int) -> bytes:
        """The whole content of ``inode`` (at most ``limit`` bytes, else Ext4Error)."""
        size = inode.size
        if size > limit:
            raise Ext4Error(f"inode {inode.ino}: {size} bytes, more than the {limit} this "
                            "reader takes")
        if inode.flags & EXT4_INLINE_DATA_FL:
            data = inode.i_block[:size]
            if size > len(inode.i_block):
                data += self.inline_xattr(inode, EXT4_XATTR_INDEX_SYSTEM, b"data") or b""
            if len(data) < size:
                raise Ext4Error(f"inode {inode.ino}: {size} bytes of inline data, but only "
                                f"{len(data)} in i_block and system.data")
            return data[:size]
        bs = self.block_size
        nblocks = -(-size // bs)
        buf = bytearray(size)
        for lblk, phys, n, init in self.runs(inode):
            if lblk >= nblocks or not init:
                continue
            n = min(n, nblocks - lblk)
            for k in range(0, n, 256):          # at most 16 MiB per read
                m = min(256, n - k)
                start = (lblk + k) * bs
                data = self.read_block(phys + k, m)[:size - start]
                buf[start:start + len(data)] = data
        return bytes(buf)

    # --- directories and paths ----------------------------------------------------------
    def list_dir(self, inode: Inode) -> Iterator[DirEntry]:
        if not inode.is_dir:
            raise Ext4Error(f"inode {inode.ino} is not a directory")
        if inode.size > MAX_DIR_BYTES:
            raise Ext4Error(f"directory inode {inode.ino} is {inode.size} bytes (more than "
                            f"{MAX_DIR_BYTES >> 20} MiB)")
        if inode.flags & EXT4_INLINE_DATA_FL:
            yield from self._inline_dir(inode)
            return
        bs, count = self.block_size, 0
        nblocks = -(-inode.size // bs)
        for lblk, phys, n, init in self.runs(inode):
            if not init:
                continue
            for k in range(min(n, max(0, nblocks - lblk))):
                block = self.read_block(phys + k)
                for e in self._parse_block(block, inode.ino, lblk + k):
                    count += 1
                    if count > MAX_DIR_ENTRIES:
                        raise Ext4Error(f"directory inode {inode.ino}: more than "
                                        f"{MAX_DIR_ENTRIES} entries")
                    yield e

    def _parse_block(self, block: bytes, ino: int, lblk: int) -> Iterator[DirEntry]:
        off, bs = 0, len(block)
        filetype = bool(self.incompat & INCOMPAT_FILETYPE)
        while off + 8 <= bs:
            d_ino, rec_len, name_len, ftype = struct.unpack_from("<IHBB", block, off)
            if rec_len in (0, 65535) and bs == 65536:
                rec_len = 65536
            if not filetype:
                name_len |= ftype << 8
                ftype = 0
            if rec_len < 8 or rec_len % 4 or off + rec_len > bs or 8 + name_len > rec_len:
                raise Ext4Error(f"directory inode {ino}, block {lblk}: corrupt entry at byte "
                                f"{off} (rec_len {rec_len}, name_len {name_len})")
            if d_ino:
                name = block[off + 8:off + 8 + name_len].decode("utf-8", "surrogateescape")
                if name not in (".", ".."):
                    yield DirEntry(name, d_ino, ftype)
            off += rec_len

    def _inline_dir(self, inode: Inode) -> Iterator[DirEntry]:
        """i_block: the parent's inode number, then entries to its end; system.data holds
        more entries (a second 'block')."""
        yield from self._parse_block(inode.i_block[4:], inode.ino, 0)
        more = self.inline_xattr(inode, EXT4_XATTR_INDEX_SYSTEM, b"data")
        if more:
            yield from self._parse_block(more, inode.ino, 1)

    @staticmethod
    def is_fast_symlink(inode: Inode) -> bool:
        """A symlink whose target sits in i_block (shorter than its 60 bytes)."""
        return inode.is_symlink and inode.size < 4 * EXT4_N_BLOCKS and not inode.flags & (
            EXT4_EXTENTS_FL | EXT4_INLINE_DATA_FL)

    def readlink(self, inode: Inode) -> str:
        if not inode.is_symlink:
            raise Ext4Error(f"inode {inode.ino} is not a symlink")
        if inode.size > MAX_PATH:
            raise Ext4Error(f"symlink inode {inode.ino} is {inode.size} bytes long (more than "
                            f"{MAX_PATH})")
        raw = (inode.i_block[:inode.size] if self.is_fast_symlink(inode)
               else self.read(inode, MAX_PATH))
        return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    def find(self, dir_inode: Inode, name: str) -> Optional[int]:
        for e in self.list_dir(dir_inode):
            if e.name == name:
                return e.ino
        return None

    def lookup(self, path: str, follow: bool = True) -> Optional[Inode]:
        """The inode at ``path`` (from the root), following symlinks inside the file
        system (absolute targets start at its root); None when a component is missing or
        not a directory. Ext4Error on a symlink loop or corrupt metadata."""
        if len(path) > MAX_PATH:
            raise Ext4Error(f"path longer than {MAX_PATH} bytes")
        parts = [p for p in path.split("/") if p and p != "."]
        stack = [self.inode(EXT4_ROOT_INO)]     # inodes from the root to the current dir
        hops = steps = scanned = 0
        while parts:
            name = parts.pop(0)
            steps += 1
            if steps > MAX_PATH:
                raise Ext4Error(f"{path}: more than {MAX_PATH} path components walked")
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = stack[-1]
            if not cur.is_dir or len(name) > MAX_NAME:
                return None
            scanned += cur.size
            if scanned > MAX_LOOKUP_SCAN:
                raise Ext4Error(f"{path}: more than {MAX_LOOKUP_SCAN >> 20} MiB of directories "
                                "scanned for one lookup")
            ino = self.find(cur, name)
            if ino is None:
                return None
            node = self.inode(ino)
            if node.is_symlink and (parts or follow):
                hops += 1
                if hops > MAXSYMLINKS:
                    raise Ext4Error(f"{path}: more than {MAXSYMLINKS} symlinks (a loop?)")
                target = self.readlink(node)
                if target.startswith("/"):
                    stack = stack[:1]
                new = [p for p in target.split("/") if p and p != "."]
                if len(new) + len(parts) > MAX_PATH:
                    raise Ext4Error(f"{path}: symlinks expand to a path that is too long")
                parts = new + parts
                continue
            stack.append(node)
        return stack[-1]

    def exists(self, path: str) -> bool:
        return self.lookup(path) is not None


def version_tuple(version: str) -> Optional[tuple]:
    """(major, minor) of a kernel release string like '6.12.117+deb13-cloud-arm64'."""
    head = version.split("-", 1)[0].split("+", 1)[0].split(".")
    try:
        return int(head[0]), int(head[1])
    except (ValueError, IndexError):
        return None


def feature_problems(fs: Ext4, kernel_version: Optional[str] = None) -> list:
    """Features Linux's ext4 driver rejects (unknown incompat: no mount; unknown ro_compat:
    read-only mount only), and features newer than ``kernel_version``."""
    out = []
    bad = fs.incompat & ~LINUX_INCOMPAT
    if bad:
        out.append(f"feature 0x{bad:x} ({', '.join(feature_names(bad, INCOMPAT))}) in "
                   "s_feature_incompat unknown to Linux: the kernel refuses to mount it")
    bad = fs.ro_compat & ~LINUX_RO_COMPAT
    if bad:
        out.append(f"feature 0x{bad:x} ({', '.join(feature_names(bad, RO_COMPAT))}) in "
                   "s_feature_ro_compat unknown to Linux: the kernel mounts it read-only only")
    kv = version_tuple(kernel_version) if kernel_version else None
    if kv:
        for (kind, bit), need in MIN_LINUX.items():
            have = fs.incompat if kind == "incompat" else fs.ro_compat
            if have & bit and kv < need:
                name = (INCOMPAT if kind == "incompat" else RO_COMPAT)[bit]
                out.append(f"feature {name} needs Linux {need[0]}.{need[1]}, the kernel is "
                           f"{kernel_version}")
    return out


def sanity(fs: Ext4, max_groups: int = 4096) -> list:
    """Superblock and group descriptor consistency (what the kernel checks at mount)."""
    sb, out = fs.sb, list(fs.problems)
    bs = fs.block_size
    if fs.blocks_count * bs > fs.blob.size:
        out.append(f"s_blocks_count {fs.blocks_count} x {bs} bytes is larger than the "
                   f"partition ({fs.blob.size} bytes)")
    want_fdb = 1 if bs == 1024 and not fs.ro_compat & RO_COMPAT_BIGALLOC else 0
    if sb["s_first_data_block"] != want_fdb:
        out.append(f"s_first_data_block {sb['s_first_data_block']}, expected {want_fdb} for "
                   f"{bs}-byte blocks")
    if fs.group_count * sb["s_inodes_per_group"] != sb["s_inodes_count"]:
        out.append(f"s_inodes_count {sb['s_inodes_count']} != {fs.group_count} groups x "
                   f"s_inodes_per_group {sb['s_inodes_per_group']}")
    if sb["s_rev_level"] > 1:
        out.append(f"s_rev_level {sb['s_rev_level']} unknown (0 or 1)")
    elif sb["s_rev_level"] == 1 and sb["s_first_ino"] < 11:
        out.append(f"s_first_ino {sb['s_first_ino']} below 11")
    if sb["s_state"] & EXT4_ERROR_FS:
        out.append("s_state has EXT4_ERROR_FS: errors were detected, fsck is needed")
    if fs.superblock_checksum_ok() is False:
        out.append("superblock checksum (s_checksum, metadata_csum) does not match")
    bad_csum, bad_table = [], []
    for g in range(min(fs.group_count, max_groups)):
        try:
            d = fs.group_desc(g)
        except Ext4Error as e:
            out.append(str(e))
            break
        if fs.desc_checksum_ok(g) is False:
            bad_csum.append(g)
        it = d["inode_table"]
        itb = -(-sb["s_inodes_per_group"] * fs.inode_size // bs)
        if it < 1 or it + itb > fs.blocks_count:
            bad_table.append(g)
    if bad_csum:
        out.append(f"group descriptor checksum wrong for group(s) "
                   f"{', '.join(map(str, bad_csum[:5]))}")
    if bad_table:
        out.append(f"inode table outside the file system for group(s) "
                   f"{', '.join(map(str, bad_table[:5]))}")
    try:
        root = fs.inode(EXT4_ROOT_INO)
        if not root.is_dir:
            out.append(f"the root inode 2 is not a directory (i_mode 0o{root.mode:o})")
    except Ext4Error as e:
        out.append(f"the root directory cannot be read: {e}")
    return out


def describe(fs: Ext4) -> str:
    feats = feature_names(fs.incompat, INCOMPAT) + feature_names(fs.ro_compat, RO_COMPAT)
    return (f"{fs.kind}, UUID {fs.uuid}, {fs.blocks_count} blocks of {fs.block_size} bytes, "
            f"features {' '.join(feats) or 'none'}")


class Ext4File(Blob):
    """A regular file of an ext2/3/4 file system as a Blob, read on demand (holes and
    uninitialized extents read as zeros). A read that hits corrupt metadata returns short
    and records why in ``errors``, like the end of a truncated file."""

    MAX_READ = 64 << 20

    def __init__(self, fs: Ext4, inode: Inode):
        self.fs, self.ino, self.size = fs, inode.ino, inode.size
        self.errors: list = []
        self.inline = None
        if inode.flags & EXT4_INLINE_DATA_FL:
            self.inline, self.runs = fs.read(inode, 1 << 16), []
        else:
            self.runs = fs.runs(inode)
        self.starts = [r[0] for r in self.runs]

    def read_at(self, offset: int, length: int) -> bytes:
        n = min(self._clamp(offset, length), self.MAX_READ)
        if not n:
            return b""
        if self.inline is not None:
            return self.inline[offset:offset + n]
        bs, end = self.fs.block_size, offset + n
        out = bytearray(n)
        i = max(0, bisect.bisect_right(self.starts, offset // bs) - 1)
        try:
            for lblk, phys, cnt, init in self.runs[i:]:
                lo, hi = max(offset, lblk * bs), min(end, (lblk + cnt) * bs)
                if lo >= end:
                    break
                if hi <= lo or not init:
                    continue
                first = lo // bs
                data = self.fs.read_block(phys + first - lblk, -(-hi // bs) - first)
                skip = lo - first * bs
                out[lo - offset:hi - offset] = data[skip:skip + hi - lo]
        except Ext4Error as e:
            self.errors.append(str(e))
            return b""
        return bytes(out)
