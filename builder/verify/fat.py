"""Independent FAT12/16/32 reader (Microsoft FAT Specification, fatgen103).

The FAT type is decided by the cluster count alone. Every chain walk is bounded (by the
file size, or by the 65536-entry directory limit) and detects cycles and out-of-range
clusters; directory walks track visited clusters; LFN runs are at most 20 entries.
"""
from __future__ import annotations

import array
import bisect
import struct
import sys
from dataclasses import dataclass
from typing import Optional

from builder import spec
from builder.verify.blob import Blob

# fatgen103 "Boot Sector and BPB Structure" (offsets 0..35), field names as in the spec.
BPB_FMT = "<3s8sHBHBHHBHHHII"
BPB_FIELDS = ("BS_jmpBoot", "BS_OEMName", "BPB_BytsPerSec", "BPB_SecPerClus", "BPB_RsvdSecCnt",
              "BPB_NumFATs", "BPB_RootEntCnt", "BPB_TotSec16", "BPB_Media", "BPB_FATSz16",
              "BPB_SecPerTrk", "BPB_NumHeads", "BPB_HiddSec", "BPB_TotSec32")
FAT32_FMT = "<IHHIHH12sBBBI11s8s"      # from offset 36
FAT32_FIELDS = ("BPB_FATSz32", "BPB_ExtFlags", "BPB_FSVer", "BPB_RootClus", "BPB_FSInfo",
                "BPB_BkBootSec", "BPB_Reserved", "BS_DrvNum", "BS_Reserved1", "BS_BootSig",
                "BS_VolID", "BS_VolLab", "BS_FilSysType")
FAT16_FMT = "<BBBI11s8s"               # from offset 36
FAT16_FIELDS = ("BS_DrvNum", "BS_Reserved1", "BS_BootSig", "BS_VolID", "BS_VolLab",
                "BS_FilSysType")
# fatgen103 "FAT 32 Byte Directory Entry Structure" and "Long Directory Entries".
DIR_FMT = "<11sBBBHHHHHHHI"
LDIR_FMT = "<B10sBBB12sH4s"            # LDIR_Ord Name1 Attr Type Chksum Name2 FstClusLO Name3
FSI_LEAD, FSI_STRUC, FSI_TRAIL = 0, 484, 508
DIR_ENTRY = 32
MAX_DIR_ENTRIES = 65536                # fatgen103: a directory holds at most 65536 entries
MAX_LFN_ENTRIES = 20
MAX_DEPTH = 32
BLOCK = 64 << 10


class FatError(Exception):
    """The file system cannot be read the way it claims (message says where)."""


@dataclass
class DirEntry:
    name: str            # long name when a valid LFN run precedes it, else the 8.3 name
    short_name: str
    attr: int
    first_cluster: int
    size: int

    @property
    def is_dir(self) -> bool:
        return bool(self.attr & spec.FAT_ATTR_DIRECTORY)


def lfn_checksum(short: bytes) -> int:
    s = 0
    for b in short:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def _short_name(raw: bytes, ntres: int) -> str:
    base, ext = raw[:8].rstrip(b" "), raw[8:11].rstrip(b" ")
    if base[:1] == b"\x05":
        base = b"\xe5" + base[1:]
    b, e = base.decode("cp437", "replace"), ext.decode("cp437", "replace")
    b = b.lower() if ntres & 0x08 else b
    e = e.lower() if ntres & 0x10 else e
    return f"{b}.{e}" if e else b


def parse_dir(raw: bytes) -> list:
    """Directory entries (without '.', '..', volume labels and deleted entries)."""
    out, lfn = [], None
    for off in range(0, len(raw) - DIR_ENTRY + 1, DIR_ENTRY):
        rec = raw[off:off + DIR_ENTRY]
        if rec[0] == 0x00:
            break
        if rec[0] == 0xE5:
            lfn = None
            continue
        if rec[11] & 0x3F == spec.FAT_ATTR_LONG_NAME:
            ordn, n1, _, _, chk, n2, _, n3 = struct.unpack(LDIR_FMT, rec)
            seq = ordn & 0x1F
            if ordn & 0x40 and 1 <= seq <= MAX_LFN_ENTRIES:
                lfn = {"chk": chk, "next": seq - 1, "parts": {seq: n1 + n2 + n3}}
            elif lfn is not None and seq == lfn["next"] and seq >= 1 and chk == lfn["chk"]:
                lfn["parts"][seq] = n1 + n2 + n3
                lfn["next"] -= 1
            else:
                lfn = None
            continue
        f = struct.unpack(DIR_FMT, rec)
        name_raw, attr, ntres = f[0], f[1], f[2]
        run, lfn = lfn, None
        if attr & spec.FAT_ATTR_VOLUME_ID:
            continue
        short = _short_name(name_raw, ntres)
        if short in (".", ".."):
            continue
        name = short
        if run is not None and run["next"] == 0 and run["chk"] == lfn_checksum(name_raw):
            chars = b"".join(run["parts"][i] for i in sorted(run["parts"]))
            long = chars.decode("utf-16-le", "replace").split("\0", 1)[0]
            name = long or short
        out.append(DirEntry(name, short, attr, (f[7] << 16) | f[10], f[11]))
    return out


class FatVolume:
    """A FAT file system in ``blob`` (a partition). Raises FatError if it is not FAT at all."""

    def __init__(self, blob: Blob):
        self.blob = blob
        self.boot = boot = blob.read_at(0, 512)
        if len(boot) < 512:
            raise FatError(f"the partition is too small for a boot sector ({blob.size} bytes)")
        b = self.bpb = dict(zip(BPB_FIELDS, struct.unpack_from(BPB_FMT, boot)))
        b.update(zip(FAT32_FIELDS, struct.unpack_from(FAT32_FMT, boot, 36)))
        self.ext16 = dict(zip(FAT16_FIELDS, struct.unpack_from(FAT16_FMT, boot, 36)))
        bps, spc = b["BPB_BytsPerSec"], b["BPB_SecPerClus"]
        if bps not in spec.FAT_BYTES_PER_SECTOR:
            raise FatError(f"not a FAT file system: BPB_BytsPerSec is {bps}")
        if spc == 0 or spc & (spc - 1):
            raise FatError(f"not a FAT file system: BPB_SecPerClus is {spc}")
        if b["BPB_RsvdSecCnt"] == 0 or b["BPB_NumFATs"] == 0:
            raise FatError("not a FAT file system: BPB_RsvdSecCnt or BPB_NumFATs is 0")
        self.fat_sz = b["BPB_FATSz16"] or b["BPB_FATSz32"]
        self.tot_sec = b["BPB_TotSec16"] or b["BPB_TotSec32"]
        root_dir_sectors = (b["BPB_RootEntCnt"] * 32 + bps - 1) // bps
        self.first_root = b["BPB_RsvdSecCnt"] + b["BPB_NumFATs"] * self.fat_sz
        self.first_data = self.first_root + root_dir_sectors
        data_sec = self.tot_sec - self.first_data
        if self.fat_sz == 0 or data_sec <= 0:
            raise FatError(f"not a FAT file system: FAT size {self.fat_sz}, total sectors "
                           f"{self.tot_sec}, data starts at sector {self.first_data}")
        self.bps, self.spc, self.cluster_bytes = bps, spc, bps * spc
        self.cluster_count = data_sec // spc
        if self.cluster_count < spec.FAT12_MAX_CLUSTERS:
            self.fat_type = 12
        elif self.cluster_count < spec.FAT16_MAX_CLUSTERS:
            self.fat_type = 16
        else:
            self.fat_type = 32
        # the extended boot record sits where the BPB's layout puts it (a FAT32 BPB has
        # BPB_FATSz16 = 0), also on a volume that is FAT16 by its cluster count
        ext = b if self.fat_type == 32 or b["BPB_FATSz16"] == 0 else self.ext16
        self.label_type = ext["BS_FilSysType"].decode("ascii", "replace")
        self.volume_id = ext["BS_VolID"]
        self.volume_label = ext["BS_VolLab"].decode("cp437", "replace").rstrip()
        self.fat32_bpb = (b["BPB_FATSz16"] == 0 and b["BPB_RootEntCnt"] == 0
                          and b["BPB_TotSec16"] == 0 and b["BPB_FATSz32"] > 0)
        self.max_cluster = self.cluster_count + 1
        self.eoc = {12: 0xFF8, 16: 0xFFF8, 32: spec.FAT32_EOC}[self.fat_type]
        self.bad = {12: 0xFF7, 16: 0xFFF7, 32: spec.FAT32_BAD}[self.fat_type]
        self.fat_bytes = self.fat_sz * bps
        self.read_problems = []      # chain/directory problems met while reading files
        self._blocks = {}
        self._dirs = {}

    # --- FAT entries and cluster chains ------------------------------------------------
    def _fat_bytes_at(self, off: int, n: int) -> bytes:
        out = b""
        base = self.bpb["BPB_RsvdSecCnt"] * self.bps
        while len(out) < n:
            blk, inner = divmod(off + len(out), BLOCK)
            data = self._blocks.get(blk)
            if data is None:
                if len(self._blocks) >= 64:
                    self._blocks.clear()
                data = self._blocks[blk] = self.blob.read_at(
                    base + blk * BLOCK, min(BLOCK, self.fat_bytes - blk * BLOCK))
            piece = data[inner:inner + n - len(out)]
            if not piece:
                raise FatError(f"FAT entry at byte {off} of the FAT lies outside the partition")
            out += piece
        return out

    def fat_entry(self, n: int) -> int:
        off = {12: n + n // 2, 16: 2 * n, 32: 4 * n}[self.fat_type]
        width = 4 if self.fat_type == 32 else 2
        if off + width > self.fat_bytes:
            raise FatError(f"cluster {n} has no entry in a FAT of {self.fat_bytes} bytes")
        blk, inner = divmod(off, BLOCK)
        data = self._blocks.get(blk)
        if data is not None and inner + width <= len(data):     # fast path: cached block
            v = int.from_bytes(data[inner:inner + width], "little")
        else:
            v = int.from_bytes(self._fat_bytes_at(off, width), "little")
        if self.fat_type == 12:
            return v >> 4 if n & 1 else v & 0xFFF
        return v & 0x0FFFFFFF if self.fat_type == 32 else v

    def chain(self, start: int, limit: int, what: str, exact: bool = False) -> list:
        """Clusters of a chain; FatError if it leaves 2..max, loops, or exceeds ``limit``.
        With ``exact`` (a file of known size) a longer chain is only noted in read_problems
        and the first ``limit`` clusters are returned."""
        clusters, seen, c = [], set(), start
        while True:
            if not 2 <= c <= self.max_cluster:
                raise FatError(f"{what}: cluster {c} outside 2..{self.max_cluster}")
            if c in seen:
                raise FatError(f"{what}: cluster chain loops back to cluster {c}")
            if len(clusters) >= limit:
                if exact:
                    self.read_problems.append(f"{what}: cluster chain is longer than the "
                                              f"{limit} clusters its size needs")
                    return clusters
                raise FatError(f"{what}: cluster chain is longer than {limit} clusters")
            seen.add(c)
            clusters.append(c)
            v = self.fat_entry(c)
            if v >= self.eoc:
                return clusters
            if v == self.bad:
                raise FatError(f"{what}: chain reaches a bad-cluster mark after cluster {c}")
            if v < 2:
                raise FatError(f"{what}: chain reaches a free cluster after cluster {c}")
            if v == c + 1:                     # a contiguous run: take it in one step
                m = self._run_length(v, min(limit - len(clusters) - 1, self.max_cluster - v))
                run = range(v, v + m)
                if m and seen.isdisjoint(run):
                    clusters.extend(run)
                    seen.update(run)
                    v += m
            c = v

    def _run_length(self, v: int, cap: int) -> int:
        """How many clusters from ``v`` on point each to the next one (entry n == n + 1),
        at most ``cap``, looked at within one cached FAT block (FAT16/32 only)."""
        if cap <= 0 or self.fat_type == 12:
            return 0
        width = 4 if self.fat_type == 32 else 2
        off = v * width
        if off + width > self.fat_bytes:
            return 0
        blk, inner = divmod(off, BLOCK)
        data = self._blocks.get(blk)
        if data is None:
            return 0
        n = min(cap, (len(data) - inner) // width)
        if n <= 0:
            return 0
        got = int.from_bytes(data[inner:inner + n * width], "little")
        expected = array.array("I" if width == 4 else "H", range(v + 1, v + 1 + n))
        if sys.byteorder == "big":
            expected.byteswap()
        want = int.from_bytes(expected.tobytes(), "little")
        diff = got ^ want
        if not diff:
            return n
        return ((diff & -diff).bit_length() - 1) // (8 * width)   # entries before the first difference

    def cluster_offset(self, c: int) -> int:
        return (self.first_data + (c - 2) * self.spc) * self.bps

    # --- directories ---------------------------------------------------------------------
    def _dir_raw(self, first_cluster: Optional[int], what: str) -> bytes:
        limit_bytes = MAX_DIR_ENTRIES * DIR_ENTRY
        if first_cluster is None and self.fat_type != 32:
            n = min(self.bpb["BPB_RootEntCnt"] * DIR_ENTRY, limit_bytes)
            return self.blob.read_at(self.first_root * self.bps, n)
        start = self.bpb["BPB_RootClus"] if first_cluster is None else first_cluster
        limit = -(-limit_bytes // self.cluster_bytes)
        clusters = self.chain(start, limit, what)
        return b"".join(self.blob.read_at(self.cluster_offset(c), self.cluster_bytes)
                        for c in clusters)

    def list_dir(self, first_cluster: Optional[int] = None, what: str = "/") -> list:
        key = first_cluster or 0
        if key not in self._dirs:
            if len(self._dirs) > 4096:
                self._dirs.clear()
            self._dirs[key] = parse_dir(self._dir_raw(first_cluster, f"directory {what}"))
        return self._dirs[key]

    def lookup(self, path: str) -> Optional[DirEntry]:
        """Case-insensitive lookup of a '/' or '\\' separated path; None if absent."""
        parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts:
            return None
        cur, where = None, ""
        for i, part in enumerate(parts):
            key = part.upper()
            found = None
            for e in self.list_dir(cur, where or "/"):
                if e.name.upper() == key or e.short_name.upper() == key:
                    found = e
                    break
            if found is None:
                return None
            where += "/" + found.name
            if i < len(parts) - 1:
                if not found.is_dir:
                    return None
                cur = found.first_cluster or None
        return found

    def walk(self, problems: list, max_entries: int = 200000):
        """Yield (path, DirEntry) for every entry; problems are appended, not raised."""
        stack, seen, count = [(None, "", 0)], set(), 0
        while stack:
            cl, path, depth = stack.pop()
            try:
                entries = self.list_dir(cl, path or "/")
            except FatError as e:
                problems.append(str(e))
                continue
            for e in entries:
                count += 1
                if count > max_entries:
                    problems.append(f"more than {max_entries} directory entries; walk stopped")
                    return
                p = f"{path}/{e.name}"
                yield p, e
                if e.is_dir:
                    if e.first_cluster in seen or e.first_cluster < 2:
                        problems.append(f"directory {p} points at cluster {e.first_cluster}, "
                                        "already visited or invalid (directory loop)")
                    elif depth >= MAX_DEPTH:
                        problems.append(f"directory {p} nested deeper than {MAX_DEPTH} levels")
                    else:
                        seen.add(e.first_cluster)
                        stack.append((e.first_cluster, p, depth + 1))

    # --- files ---------------------------------------------------------------------------
    def open(self, entry: DirEntry, what: str) -> "FatFile":
        if entry.is_dir:
            raise FatError(f"{what} is a directory")
        if entry.size == 0:
            return FatFile(self, [], 0)
        needed = -(-entry.size // self.cluster_bytes)
        clusters = self.chain(entry.first_cluster, needed, what, exact=True)
        if len(clusters) < needed:
            raise FatError(f"{what}: cluster chain has {len(clusters)} clusters, the file size "
                           f"{entry.size} needs {needed}")
        return FatFile(self, clusters, entry.size)

    def open_path(self, path: str) -> Optional["FatFile"]:
        e = self.lookup(path)
        return None if e is None else self.open(e, path)


class FatFile(Blob):
    def __init__(self, vol: FatVolume, clusters: list, size: int):
        self.vol, self.clusters, self.size = vol, clusters, size
        self._runs = None

    def runs(self) -> tuple:
        """(file offsets, first clusters, lengths) of the physically contiguous cluster runs,
        found once, so a read walks runs instead of single clusters."""
        if self._runs is None:
            starts, firsts, counts, c = [], [], [], self.clusters
            i, n = 0, len(c)
            while i < n:
                j = i + 1
                while j < n and c[j] == c[j - 1] + 1:
                    j += 1
                starts.append(i * self.vol.cluster_bytes)
                firsts.append(c[i])
                counts.append(j - i)
                i = j
            self._runs = (starts, firsts, counts)
        return self._runs

    def read_at(self, offset: int, length: int) -> bytes:
        n = self._clamp(offset, length)
        out, pos, cb = [], offset, self.vol.cluster_bytes
        starts, firsts, counts = self.runs() if n > 0 else ((), (), ())
        k = bisect.bisect_right(starts, pos) - 1
        while n > 0:
            inner = pos - starts[k]
            take = min(n, counts[k] * cb - inner)
            data = self.vol.blob.read_at(self.vol.cluster_offset(firsts[k]) + inner, take)
            out.append(data + b"\0" * (take - len(data)) if len(data) < take else data)
            pos += take
            n -= take
            k += 1
        return out[0] if len(out) == 1 else b"".join(out)


def sanity(vol: FatVolume) -> list:
    """fatgen103 consistency problems of ``vol`` (empty list: sane)."""
    p, b, boot, bps = [], vol.bpb, vol.boot, vol.bps
    if boot[510:512] != spec.MBR_SIGNATURE:
        p.append(f"boot sector signature is {boot[510:512].hex()}, expected 55aa")
    if not (boot[0] == 0xEB and boot[2] == 0x90) and boot[0] != 0xE9:
        p.append(f"BS_jmpBoot is {boot[:3].hex()}, expected EB ?? 90 or E9 ?? ??")
    if b["BPB_Media"] not in spec.FAT_MEDIA_BYTES:
        p.append(f"BPB_Media is 0x{b['BPB_Media']:02X}")
    if vol.tot_sec * bps > vol.blob.size:
        p.append(f"the file system ({vol.tot_sec * bps} bytes) is larger than its partition "
                 f"({vol.blob.size} bytes)")
    bits = {12: 12, 16: 16, 32: 32}[vol.fat_type]
    if vol.fat_bytes * 8 // bits < vol.cluster_count + 2:
        p.append(f"a FAT of {vol.fat_bytes} bytes cannot map {vol.cluster_count} clusters")
    try:
        if vol.fat_entry(0) & 0xFF != b["BPB_Media"]:
            p.append("FAT[0] does not carry the media byte")
    except FatError as e:
        p.append(str(e))
    if vol.fat_type == 32:
        _fat32_sanity(vol, p)
    fat0 = b["BPB_RsvdSecCnt"] * bps
    for i in range(1, b["BPB_NumFATs"]):
        other = fat0 + i * vol.fat_bytes
        for pos in range(0, min(vol.fat_bytes, max(0, vol.blob.size - fat0)), 1 << 20):
            n = min(1 << 20, vol.fat_bytes - pos)
            a, b2 = vol.blob.read_at(fat0 + pos, n), vol.blob.read_at(other + pos, n)
            if a != b2:
                at = next((k for k, (x, y) in enumerate(zip(a, b2)) if x != y),
                          min(len(a), len(b2)))
                p.append(f"FAT copy {i + 1} differs from FAT 1 at byte {pos + at} of the FAT")
                break
    return p


def _fat32_sanity(vol: FatVolume, p: list) -> None:
    b, bps, rsvd = vol.bpb, vol.bps, vol.bpb["BPB_RsvdSecCnt"]
    fsi = b["BPB_FSInfo"]
    if not 1 <= fsi < rsvd:
        p.append(f"BPB_FSInfo is {fsi}, not a reserved sector")
    else:
        s = vol.blob.read_at(fsi * bps, 512)
        sigs = [int.from_bytes(s[o:o + 4], "little") for o in (FSI_LEAD, FSI_STRUC, FSI_TRAIL)]
        want = [spec.FSINFO_LEAD_SIG, spec.FSINFO_STRUC_SIG, spec.FSINFO_TRAIL_SIG]
        for name, got, exp in zip(("FSI_LeadSig", "FSI_StrucSig", "FSI_TrailSig"), sigs, want):
            if got != exp:
                p.append(f"FSInfo {name} is 0x{got:08X}, expected 0x{exp:08X}")
    bk = b["BPB_BkBootSec"]
    if not 1 <= bk < rsvd:
        p.append(f"BPB_BkBootSec is {bk}: no backup boot sector")
    elif vol.blob.read_at(bk * bps, bps) != vol.blob.read_at(0, bps):
        p.append(f"the backup boot sector (sector {bk}) differs from sector 0")
    if not 2 <= b["BPB_RootClus"] <= vol.max_cluster:
        p.append(f"BPB_RootClus {b['BPB_RootClus']} outside 2..{vol.max_cluster}")
