"""Test helpers that judge disk images with external validators (and small independent
parsers that share no code with builder/disk).

- sfdisk_verify(image)                  `sfdisk --verify` is clean (512-byte sectors only:
                                        Debian 12's sfdisk reads files as 512-byte sectors)
- sfdisk_json(image)                    the `sfdisk --json` partition table as a dict
- sgdisk_verify(image)                  `sgdisk -v` finds no problems (512-byte sectors)
- fsck_fat(image, offset, size)         copies the partition out (sparse) and runs
                                        `fsck.fat -n`: exit 0 and nothing but the summary
- mtools_readback(image, offset, expected)
                                        `mdir -/ -b` lists exactly the expected files
                                        (long names), `mcopy` of each has the expected sha256
- mtools_info(image, offset)            `minfo` output; mdir_text(image, offset, path)
- fat_bpb(image, offset) / fat_cluster_count(image, offset)
                                        BPB fields and cluster count, parsed here
- fat_fsinfo(image, offset)             FSInfo fields, parsed here
- fat_root_entries(image, offset)       root directory short entries (+ LFN units), parsed
- mshowfat(image, offset, path)         cluster ranges of a file/directory per `mshowfat`
- extract(image, offset, size, out)     sparse copy of a partition to its own file
- read_gpt(image, sector_size)          headers + entries parsed here, CRCs checked
- sha256_file(path)                     reads the whole file (holes included)

mtools runs with LC_ALL=C.UTF-8 (long names as UTF-8) and without MTOOLS_SKIP_CHECK.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from uuid import UUID

MIB = 1024 * 1024


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C.UTF-8")
    env.pop("MTOOLS_SKIP_CHECK", None)          # mtools must apply its own sanity checks
    return subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)


def _require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (Makefile system-deps installs it)"
    return path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- GPT ---------------------------------------------------------------------------------

def sfdisk_verify(image) -> str:
    res = _run([_require("sfdisk"), "--verify", str(image)])
    out = (res.stdout + res.stderr).replace(str(image), "IMAGE")
    assert res.returncode == 0, out
    assert "No errors detected." in out, out
    for bad in ("error:", "warning", "mismatch", "corrupt", "invalid"):
        assert bad not in out.lower().replace("no errors detected", ""), out
    return out


def sfdisk_json(image) -> dict:
    import json
    res = _run([_require("sfdisk"), "--json", str(image)])
    assert res.returncode == 0, res.stderr
    assert "mismatch" not in res.stderr.lower(), res.stderr
    return json.loads(res.stdout)["partitiontable"]


def sgdisk_verify(image) -> str:
    res = _run([_require("sgdisk"), "-v", str(image)])
    out = (res.stdout + res.stderr).replace(str(image), "IMAGE")
    assert res.returncode == 0, out
    assert "No problems found." in out, out
    assert "Creating new GPT entries" not in out, out      # i.e. it found our GPT
    return out


def read_gpt(image, sector_size: int) -> dict:
    """Parse PMBR, both headers and both entry arrays; assert the CRCs and mirroring."""
    with open(image, "rb") as f:
        def block(lba: int, count: int = 1) -> bytes:
            f.seek(lba * sector_size)
            return f.read(count * sector_size)

        disk_sectors = os.path.getsize(image) // sector_size
        mbr = block(0)
        assert mbr[510:512] == b"\x55\xaa"
        records = [mbr[446 + 16 * i:462 + 16 * i] for i in range(4)]
        boot, start_chs, os_type, end_chs, start, size = struct.unpack("<B3sB3sII",
                                                                       records[0])
        assert (boot, start_chs, os_type, start) == (0, b"\x00\x02\x00", 0xEE, 1)
        assert size == min(disk_sectors - 1, 0xFFFFFFFF)
        assert all(r == bytes(16) for r in records[1:])
        headers = {}
        for name, lba in (("primary", 1), ("backup", disk_sectors - 1)):
            raw = block(lba)
            (sig, rev, hsize, hcrc, _res, my, alt, first, last, guid, entry_lba, count,
             esize, acrc) = struct.unpack("<8sIIIIQQQQ16sQIII", raw[:92])
            assert (sig, rev, hsize) == (b"EFI PART", 0x00010000, 92)
            assert raw[92:] == bytes(sector_size - 92)
            assert zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:92]) == hcrc
            array = block(entry_lba, -(-count * esize // sector_size))[:count * esize]
            assert zlib.crc32(array) == acrc
            assert count * esize >= 16384 and esize >= 128 and esize & (esize - 1) == 0
            headers[name] = dict(MyLBA=my, AlternateLBA=alt, FirstUsableLBA=first,
                                 LastUsableLBA=last, DiskGUID=UUID(bytes_le=guid),
                                 PartitionEntryLBA=entry_lba, array=array,
                                 NumberOfPartitionEntries=count, SizeOfPartitionEntry=esize)
        p, b = headers["primary"], headers["backup"]
        assert (p["MyLBA"], p["AlternateLBA"]) == (1, disk_sectors - 1)
        assert (b["MyLBA"], b["AlternateLBA"]) == (disk_sectors - 1, 1)
        assert p["array"] == b["array"]
        assert b["PartitionEntryLBA"] + len(b["array"]) // sector_size == disk_sectors - 1
        entries = []
        for i in range(p["NumberOfPartitionEntries"]):
            e = p["array"][i * 128:(i + 1) * 128]
            tguid, uguid, s, e_lba, attrs, name = struct.unpack("<16s16sQQQ72s", e)
            if tguid == bytes(16):
                continue
            entries.append(dict(type=UUID(bytes_le=tguid), uuid=UUID(bytes_le=uguid),
                                first=s, last=e_lba, attributes=attrs,
                                name=name.decode("utf-16-le").split("\0", 1)[0]))
        ordered = sorted(entries, key=lambda e: e["first"])
        for e in ordered:
            assert p["FirstUsableLBA"] <= e["first"] <= e["last"] <= p["LastUsableLBA"], e
        for x, y in zip(ordered, ordered[1:]):
            assert x["last"] < y["first"], (x, y)
        assert len({e["uuid"] for e in entries}) == len(entries)
        assert p["PartitionEntryLBA"] >= 2
        assert p["FirstUsableLBA"] >= p["PartitionEntryLBA"] + 16384 // sector_size
        return dict(primary=p, backup=b, partitions=entries, disk_sectors=disk_sectors)


# --- FAT ---------------------------------------------------------------------------------

def fat_bpb(image, offset: int) -> dict:
    with open(image, "rb") as f:
        f.seek(offset)
        bs = f.read(512)
    names = ("BPB_BytsPerSec", "BPB_SecPerClus", "BPB_RsvdSecCnt", "BPB_NumFATs",
             "BPB_RootEntCnt", "BPB_TotSec16", "BPB_Media", "BPB_FATSz16", "BPB_SecPerTrk",
             "BPB_NumHeads", "BPB_HiddSec", "BPB_TotSec32")
    bpb = dict(zip(names, struct.unpack_from("<HBHBHHBHHHII", bs, 11)))
    bpb.update(zip(("BPB_FATSz32", "BPB_ExtFlags", "BPB_FSVer", "BPB_RootClus", "BPB_FSInfo",
                    "BPB_BkBootSec"), struct.unpack_from("<IHHIHH", bs, 36)))
    bpb.update(BS_BootSig=bs[66], BS_VolID=struct.unpack_from("<I", bs, 67)[0],
               BS_VolLab=bs[71:82], BS_FilSysType=bs[82:90], signature=bs[510:512])
    return bpb


def fat_cluster_count(image, offset: int) -> int:
    """fatgen103's count of data clusters, from the BPB alone."""
    b = fat_bpb(image, offset)
    root_dir_sectors = (b["BPB_RootEntCnt"] * 32 + b["BPB_BytsPerSec"] - 1) \
        // b["BPB_BytsPerSec"]
    fat_size = b["BPB_FATSz16"] or b["BPB_FATSz32"]
    total = b["BPB_TotSec16"] or b["BPB_TotSec32"]
    data = total - (b["BPB_RsvdSecCnt"] + b["BPB_NumFATs"] * fat_size + root_dir_sectors)
    return data // b["BPB_SecPerClus"]


def extract(image, offset: int, size: int, out) -> None:
    """Copy image[offset:offset+size] to ``out``, keeping holes (SEEK_DATA/SEEK_HOLE)."""
    with open(image, "rb") as src, open(out, "wb") as dst:
        dst.truncate(size)
        fd, pos, end = src.fileno(), offset, offset + size
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                       # ENXIO: only a hole remains
                break
            if pos >= end:
                break
            stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            while pos < stop:
                n = min(stop - pos, 1 << 20)
                os.pwrite(dst.fileno(), os.pread(fd, n, pos), pos - offset)
                pos += n


def fsck_fat(image, offset: int, size: int) -> str:
    """`fsck.fat -n` on a copy of the partition: exit 0 and only the summary line."""
    tool = _require("fsck.fat")
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "part.img")
        extract(image, offset, size, part)
        res = _run([tool, "-n", part])
    out = (res.stdout + res.stderr).replace(part, "PART")   # temp names are random
    assert res.returncode == 0, out
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("fsck.fat ")]
    assert len(lines) == 1 and lines[0].startswith("PART: ") and " files, " in lines[0], out
    for bad in ("differ", "error", "wrong", "invalid", "bad", "dirty"):
        assert bad not in out.lower(), out
    return out


def _image_spec(image, offset: int) -> str:
    return f"{image}@@{offset}"


def mdir_text(image, offset: int, path: str = "/", *args: str) -> str:
    res = _run([_require("mdir"), *args, "-i", _image_spec(image, offset), "::" + path])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr
    return res.stdout


def mtools_info(image, offset: int) -> str:
    res = _run([_require("minfo"), "-i", _image_spec(image, offset), "::"])
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def mtools_readback(image, offset: int, expected: dict, exact: bool = True) -> str:
    """Every expected dest (long name, '/'-separated) is listed by `mdir -/ -b` and reads
    back with `mcopy` with the expected sha256; with ``exact`` no other file exists."""
    listing = mdir_text(image, offset, "/", "-/", "-b")
    files = {ln[3:] for ln in listing.splitlines()
             if ln.startswith("::/") and not ln.endswith("/")}
    want = {d.lstrip("/") for d in expected}
    missing = want - files
    assert not missing, f"not listed by mdir: {sorted(missing)}\n{listing}"
    assert not exact or files == want, f"unexpected files: {sorted(files - want)}"
    with tempfile.TemporaryDirectory() as tmp:
        for i, (dest, digest) in enumerate(sorted(expected.items())):
            out = os.path.join(tmp, f"out{i}")
            res = _run([_require("mcopy"), "-n", "-i", _image_spec(image, offset),
                        "::/" + _mtools_literal(dest.lstrip("/")), out])
            assert res.returncode == 0, f"mcopy {dest}: {res.stdout}{res.stderr}"
            assert sha256_file(out) == digest, f"{dest}: content differs"
            os.unlink(out)
    return listing


def _mtools_literal(path: str) -> str:
    """mtools expands * ? [ ] in source names; a backslash makes them literal."""
    return re.sub(r"([*?\[\]])", r"\\\1", path)


def mshowfat(image, offset: int, path: str) -> list:
    """Cluster ranges of a file or directory per `mshowfat`: [(first, last), ...];
    [] for an empty file."""
    res = _run([_require("mshowfat"), "-i", _image_spec(image, offset),
                "::/" + _mtools_literal(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout.strip()
    if text.endswith("Root directory or empty file"):
        return []
    ranges = []
    for part in text[text.rindex("<") + 1:text.rindex(">")].split():
        first, _, last = part.partition("-")
        ranges.append((int(first), int(last or first)))
    return ranges


def fat_fsinfo(image, offset: int) -> dict:
    bpb = fat_bpb(image, offset)
    with open(image, "rb") as f:
        f.seek(offset + bpb["BPB_FSInfo"] * bpb["BPB_BytsPerSec"])
        raw = f.read(512)
    lead, struc, free, nxt, trail = struct.unpack_from("<I480xIII12xI", raw)
    return dict(FSI_LeadSig=lead, FSI_StrucSig=struc, FSI_Free_Count=free,
                FSI_Nxt_Free=nxt, FSI_TrailSig=trail)


def fat_root_entries(image, offset: int) -> list:
    """Short entries of the root directory's first cluster, parsed here. Each carries
    ``long_units``: the UTF-16 code units of the LFN entries before it (in name order,
    padding included; [] if none) after checking their order numbers and checksum."""
    b = fat_bpb(image, offset)
    sector = b["BPB_RsvdSecCnt"] + b["BPB_NumFATs"] * b["BPB_FATSz32"] \
        + (b["BPB_RootClus"] - 2) * b["BPB_SecPerClus"]
    with open(image, "rb") as f:
        f.seek(offset + sector * b["BPB_BytsPerSec"])
        raw = f.read(b["BPB_SecPerClus"] * b["BPB_BytsPerSec"])
    out, lfn = [], []
    for pos in range(0, len(raw), 32):
        e = raw[pos:pos + 32]
        if e[0] == 0:
            break
        if e[11] == 0x0F:
            lfn.append(e)
            continue
        (name, attr, ntres, tenth, ctime, cdate, adate, hi, wtime, wdate, lo,
         size) = struct.unpack("<11sBBBHHHHHHHI", e)
        checksum = 0
        for byte in name:
            checksum = (((checksum & 1) << 7) + (checksum >> 1) + byte) & 0xFF
        units = []
        for i, le in enumerate(reversed(lfn)):
            assert le[0] & 0x3F == i + 1 and bool(le[0] & 0x40) == (i == len(lfn) - 1)
            assert le[13] == checksum and le[12] == 0 and le[26:28] == b"\0\0"
            part = le[1:11] + le[14:26] + le[28:32]
            units += struct.unpack("<13H", part)
        out.append(dict(DIR_Name=name, DIR_Attr=attr, DIR_NTRes=ntres,
                        DIR_CrtTimeTenth=tenth, DIR_CrtTime=ctime, DIR_CrtDate=cdate,
                        DIR_LstAccDate=adate, DIR_WrtTime=wtime, DIR_WrtDate=wdate,
                        cluster=(hi << 16) | lo, DIR_FileSize=size, long_units=units))
        lfn = []
    return out
