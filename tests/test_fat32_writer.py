"""FAT32 writer, judged by fsck.fat and mtools (external validators) plus the independent
BPB arithmetic in diskcheck."""
from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import re

import pytest

from builder.disk import fat32, fatnames
from builder.disk.fat32 import FatFile, check_name, min_fat32_bytes, plan_fat32, write_fat32
from builder.errors import ArmvmError
from tests import diskcheck

MIB = 1024 * 1024
GIB = 1024 * MIB
OFFSET = MIB
STAMP = 1700000000                  # 2023-11-14 22:13:20 UTC
SERIAL = 0x1234ABCD


def sources(tmp_path, content: dict):
    """Write each dest's bytes to a host file; return (FatFiles, {dest: sha256})."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    files, expected = [], {}
    for i, (dest, data) in enumerate(content.items()):
        path = src / f"f{i}"
        path.write_bytes(data)
        files.append(FatFile(dest, path, len(data)))
        expected[dest] = hashlib.sha256(data).hexdigest()
    return files, expected


def build(tmp_path, files, volume, sector_size=512, *, dirs=(), label="ARMVM ESP",
          name="esp.img", timestamp=STAMP, offset=OFFSET):
    image = tmp_path / name
    with open(image, "wb") as f:
        f.truncate(offset + volume + MIB)
    with open(image, "r+b") as f:
        result = write_fat32(f, offset=offset, volume_bytes=volume, sector_size=sector_size,
                             files=files, dirs=dirs, label=label, serial=SERIAL,
                             timestamp=timestamp)
    return image, result


def rich_content() -> dict:
    rng = random.Random(1234)
    content = {
        "EFI/BOOT/BOOTAA64.EFI": rng.getrandbits(8 * 3 * MIB + 8 * 12345).to_bytes(
            3 * MIB + 12345, "little"),
        "EFI/BOOT/grub.cfg": b"set timeout=0\nlinux /vmlinuz console=ttyAMA0\n",
        "longfilename1.txt": b"one\n",
        "longfilename2.txt": b"two\n",
        "README": b"an exact 8.3 name\n",
        "empty.bin": b"",
        "Mixed Case Name.Conf": b"mixed\n",
        "a.b.c": b"dots\n",
        ".hidden": b"leading period\n",
        "\u00fcn\u00efc\u00f6d\u00e9 \u2603.txt": b"unicode\n",
        "x" * 200 + ".long": b"200 characters\n",
        "plus+semi;equals=[brackets].txt": b"lfn-only characters\n",
        "fo o.txt": b"basis FOO.TXT with a tail, but not ~1\n",
        "foo~1.txt": b"an 8.3 name in lower case: FOO~1.TXT\n",
        "EFI/BOOT/nested/deeper/deepest/file.txt": b"deep\n",
    }
    for i in range(320):
        content[f"many/entry {i:03d} with a long name.txt"] = f"{i}\n".encode()
    return content


def check_bpb_is_fat32(image, offset, sector_size):
    bpb = diskcheck.fat_bpb(image, offset)
    assert diskcheck.fat_cluster_count(image, offset) >= 65525
    assert (bpb["BPB_FATSz16"], bpb["BPB_RootEntCnt"], bpb["BPB_TotSec16"]) == (0, 0, 0)
    assert bpb["BPB_FATSz32"] > 0 and bpb["BPB_BytsPerSec"] == sector_size
    assert (bpb["BPB_RsvdSecCnt"], bpb["BPB_NumFATs"], bpb["BPB_RootClus"]) == (32, 2, 2)
    assert (bpb["BPB_FSInfo"], bpb["BPB_BkBootSec"], bpb["BPB_Media"]) == (1, 6, 0xF8)
    assert bpb["BPB_HiddSec"] == offset // sector_size
    assert bpb["BS_FilSysType"] == b"FAT32   " and bpb["signature"] == b"\x55\xaa"
    assert bpb["BPB_SecPerClus"] * sector_size <= 32768
    with open(image, "rb") as f:
        f.seek(offset)
        reserved = f.read(8 * sector_size)
    assert reserved[:2 * sector_size] == reserved[6 * sector_size:]     # backups
    assert reserved[sector_size - 2:sector_size] == b"\x55\xaa"
    return bpb


@pytest.mark.parametrize("sector_size,mib", [(512, 33), (4096, 257)])
def test_minimum_size_is_real_fat32(tmp_path, sector_size, mib):
    minimum = min_fat32_bytes(sector_size)
    assert (minimum - 1) // MIB + 1 == mib
    files, expected = sources(tmp_path, {"EFI/BOOT/BOOTAA64.EFI": b"MZ" + bytes(5000)})
    image, result = build(tmp_path, files, minimum, sector_size)
    check_bpb_is_fat32(image, OFFSET, sector_size)
    assert diskcheck.fat_cluster_count(image, OFFSET) == result.geometry.cluster_count
    diskcheck.fsck_fat(image, OFFSET, minimum)
    diskcheck.mtools_readback(image, OFFSET, expected)
    with pytest.raises(ArmvmError, match=rf"ESP too small for FAT32 at {sector_size}-byte "
                                         rf"sectors: at least {mib} MiB needed"):
        plan_fat32(minimum - sector_size, sector_size, files)


@pytest.mark.parametrize("sector_size,volume,cluster_bytes", [
    (512, 256 * MIB, 2048), (512, 64 * GIB, 32768),
    (4096, 1 * GIB, 8192), (4096, 64 * GIB, 32768)])
def test_cluster_size_is_the_largest_that_stays_fat32(tmp_path, sector_size, volume,
                                                      cluster_bytes):
    files, expected = sources(tmp_path, {"a.txt": b"a\n"})
    image, result = build(tmp_path, files, volume, sector_size)
    bpb = check_bpb_is_fat32(image, OFFSET, sector_size)
    assert bpb["BPB_SecPerClus"] * sector_size == cluster_bytes
    # doubling the cluster would leave fewer than 65525 clusters even with no FAT at all
    if cluster_bytes < 32768:
        assert bpb["BPB_TotSec32"] // (2 * bpb["BPB_SecPerClus"]) < 65525 + 64
    diskcheck.fsck_fat(image, OFFSET, volume)
    diskcheck.mtools_readback(image, OFFSET, expected)
    assert os.stat(image).st_blocks * 512 < 4 * MIB        # stays sparse


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_rich_content_reads_back(tmp_path, sector_size):
    content = rich_content()
    files, expected = sources(tmp_path, content)
    volume = max(64 * MIB, min_fat32_bytes(sector_size))
    image, result = build(tmp_path, files, volume, sector_size,
                          dirs=["EFI/Empty Dir", "boot/", "EFI/BOOT"])
    diskcheck.fsck_fat(image, OFFSET, volume)
    diskcheck.mtools_readback(image, OFFSET, expected)
    listing = diskcheck.mdir_text(image, OFFSET, "/", "-/", "-b")
    assert "::/EFI/Empty Dir/" in listing and "::/boot/" in listing
    cluster = result.geometry.cluster_bytes
    extents = {e.dest: e for e in result.files}
    for dest, data in content.items():                    # contiguous, as mtools sees it
        ranges = diskcheck.mshowfat(image, OFFSET, dest)
        if not data:
            assert ranges == [] and extents[dest].first_cluster == 0
            continue
        first, last = ranges[0]
        assert ranges == [(first, last)] and first == extents[dest].first_cluster
        assert last - first + 1 == math.ceil(len(data) / cluster)
    many = diskcheck.mshowfat(image, OFFSET, "many")
    assert len(many) == 1 and many[0][1] > many[0][0]          # a multi-cluster directory


def test_short_names_as_mtools_sees_them(tmp_path):
    files, _ = sources(tmp_path, rich_content())
    image, _ = build(tmp_path, files, 64 * MIB)
    rows = diskcheck.mdir_text(image, OFFSET, "/").splitlines()

    def short_of(long_name):
        hits = [r for r in rows if r.rstrip().endswith(long_name)]
        assert len(hits) == 1, (long_name, rows)
        return hits[0][:12].rstrip()

    assert short_of("longfilename1.txt") == "LONGFI~1 TXT"
    assert short_of("longfilename2.txt") == "LONGFI~2 TXT"
    assert short_of("Mixed Case Name.Conf") == "MIXEDC~1 CON"
    assert short_of("a.b.c") == "A~1      C"
    assert short_of("empty.bin") == "EMPTY    BIN"
    assert short_of("fo o.txt") == "FOO~2    TXT"      # FOO~1.TXT is a long name here
    assert short_of("foo~1.txt") == "FOO~1    TXT"
    assert any(r.startswith("README  ") and r.rstrip().endswith("18 2023-11-14  22:13")
               for r in rows), rows                        # exact 8.3: no long name
    tails = [r[:12] for r in diskcheck.mdir_text(image, OFFSET, "/many").splitlines()
             if r.startswith("ENTR")]
    assert len(tails) == 320 and len(set(tails)) == 320


def test_root_entries_parsed_independently(tmp_path):
    files, _ = sources(tmp_path, {"README": b"12345", "empty.bin": b"", "EFI/x": b"x"})
    image, result = build(tmp_path, files, 40 * MIB, label="armvm esp")
    entries = diskcheck.fat_root_entries(image, OFFSET)
    assert [(e["DIR_Name"], e["DIR_Attr"]) for e in entries] == [
        (b"ARMVM ESP  ", 0x08), (b"EFI        ", 0x10), (b"EMPTY   BIN", 0x20),
        (b"README     ", 0x20)]
    date = ((2023 - 1980) << 9) | (11 << 5) | 14              # 2023-11-14 22:13:20 UTC
    tm = (22 << 11) | (13 << 5) | (20 // 2)
    for e in entries:
        assert (e["DIR_CrtDate"], e["DIR_LstAccDate"], e["DIR_WrtDate"]) == (date,) * 3
        assert (e["DIR_CrtTime"], e["DIR_WrtTime"], e["DIR_CrtTimeTenth"]) == (tm, tm, 0)
    empty, readme = entries[2], entries[3]
    assert (empty["cluster"], empty["DIR_FileSize"]) == (0, 0)
    # LFN: "empty.bin", a 0x0000 terminator, then 0xFFFF padding to 13 units
    assert empty["long_units"] == [ord(c) for c in "empty.bin"] + [0] + [0xFFFF] * 3
    assert readme["long_units"] == [] and entries[1]["long_units"] == []
    assert readme["DIR_FileSize"] == 5 and readme["cluster"] >= 3
    info = diskcheck.fat_fsinfo(image, OFFSET)
    assert (info["FSI_LeadSig"], info["FSI_StrucSig"], info["FSI_TrailSig"]) == (
        0x41615252, 0x61417272, 0xAA550000)
    used = diskcheck.fat_cluster_count(image, OFFSET) - info["FSI_Free_Count"]
    assert used == 4                                  # root, EFI, README, x: no others
    assert info["FSI_Nxt_Free"] == 2 + used           # allocation is contiguous from 2


def test_label_serial_and_timestamps(tmp_path):
    files, _ = sources(tmp_path, {"EFI/BOOT/x.efi": b"x"})
    image, _ = build(tmp_path, files, 40 * MIB, label="armvm esp")
    info = diskcheck.mtools_info(image, OFFSET)
    assert "serial number: 1234ABCD" in info and 'disk label="ARMVM ESP  "' in info
    listing = diskcheck.mdir_text(image, OFFSET, "/EFI/BOOT")
    assert "Volume in drive : is ARMVM ESP" in listing
    assert "Volume Serial Number is 1234-ABCD" in listing
    assert re.search(r"x\.efi$", listing, re.M) and "2023-11-14  22:13" in listing
    for stamp, shown in ((0, "1980-01-01   0:00"), (2 ** 40, "2107-12-31  23:59"),
                         (315532801, "1980-01-01   0:00")):
        image, _ = build(tmp_path, files, 40 * MIB, timestamp=stamp, name=f"{stamp}.img")
        assert shown in diskcheck.mdir_text(image, OFFSET, "/EFI/BOOT")
    image, _ = build(tmp_path, files, 40 * MIB, label="", name="nolabel.img")
    assert 'disk label="NO NAME    "' in diskcheck.mtools_info(image, OFFSET)
    diskcheck.fsck_fat(image, OFFSET, 40 * MIB)


def test_identical_bytes_and_sparse(tmp_path):
    files, _ = sources(tmp_path, rich_content())
    a, _ = build(tmp_path, files, 64 * MIB, name="a.img")
    b, _ = build(tmp_path, files, 64 * MIB, name="b.img")
    assert diskcheck.sha256_file(a) == diskcheck.sha256_file(b)
    data = sum(f.size for f in files)
    assert os.stat(a).st_blocks * 512 < data + 2 * MIB


def test_fat_built_in_small_chunks_is_the_same(tmp_path, monkeypatch):
    files, _ = sources(tmp_path, rich_content())
    a, _ = build(tmp_path, files, 64 * MIB, name="a.img")
    monkeypatch.setattr(fat32, "FAT_CHUNK_ENTRIES", 7)     # chain ends on chunk edges
    b, _ = build(tmp_path, files, 64 * MIB, name="b.img")
    diskcheck.fsck_fat(b, OFFSET, 64 * MIB)
    assert diskcheck.sha256_file(a) == diskcheck.sha256_file(b)


@pytest.mark.parametrize("failure", ["exdev", "missing"])
def test_copy_fallback_gives_the_same_bytes(tmp_path, monkeypatch, failure):
    files, _ = sources(tmp_path, rich_content())
    a, _ = build(tmp_path, files, 64 * MIB, name="a.img")
    if failure == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        def no_kernel_copy(*args, **kwargs):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    b, _ = build(tmp_path, files, 64 * MIB, name="b.img")
    assert diskcheck.sha256_file(a) == diskcheck.sha256_file(b)


def test_bad_names_are_rejected():
    for bad in ("a:b", "a*b", 'q"', "<x>", "a?", "back\\slash", "pi|pe", "tab\tname",
                "trailing.", "trailing ", " leading", "", ".", "..", "con", "CON.txt",
                "lpt1", "x" * 256, "\udc80bad"):
        with pytest.raises(ArmvmError, match="allowed"):
            check_name(bad)
    for good in ("a+b;c=d[e]", "\u00fcn\u00efc\u00f6d\u00e9", "x" * 255, ".bashrc",
                 "name with spaces.tar.gz", "console", "BOOTAA64.EFI", "\U0001F600"):
        check_name(good)


def test_bad_inputs_are_rejected(tmp_path):
    files, _ = sources(tmp_path, {"a/B.txt": b"1", "a/b.TXT": b"2"})
    with pytest.raises(ArmvmError, match="duplicate FAT destination 'a/b.TXT'"):
        plan_fat32(64 * MIB, 512, files)
    files, _ = sources(tmp_path, {"EFI": b"1", "EFI/BOOT/x": b"2"})
    with pytest.raises(ArmvmError, match="to be a directory"):
        plan_fat32(64 * MIB, 512, files)
    files, _ = sources(tmp_path, {"EFI/BOOT/x": b"1", "efi/BOOT/y": b"2"})
    with pytest.raises(ArmvmError, match="also spelled"):
        plan_fat32(64 * MIB, 512, files)
    files, _ = sources(tmp_path, {"EFI/a:b": b"1"})
    with pytest.raises(ArmvmError, match="'EFI/a:b'"):
        plan_fat32(64 * MIB, 512, files)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(40 * MIB)
    with pytest.raises(ArmvmError, match=r"files do not fit: need \d+ bytes, have \d+"):
        plan_fat32(min_fat32_bytes(512), 512, [FatFile("big", big, 40 * MIB)])
    with pytest.raises(ArmvmError, match="at most 65536"):
        plan_fat32(64 * MIB, 512, [FatFile(f"d/F{i}", big, 0) for i in range(65535)])
    with pytest.raises(ArmvmError, match="volume label"):
        build(tmp_path, [], 40 * MIB, label="way too long label")


def test_deep_paths_and_cluster_accounting(tmp_path):
    files, _ = sources(tmp_path, {"/".join(["d"] * 1500) + "/f.txt": b"x"})
    geo = plan_fat32(64 * MIB, 512, files)
    assert geo.clusters_used == 1 + 1500 + 1            # root, 1500 directories, the file
    assert geo.free_clusters == geo.cluster_count - geo.clusters_used


def test_changed_source_is_rejected_before_writing(tmp_path):
    files, _ = sources(tmp_path, {"a.txt": b"12345"})
    files[0].source.write_bytes(b"123")
    with pytest.raises(ArmvmError, match="is 3 bytes, planned 5"):
        build(tmp_path, files, 40 * MIB)
    assert os.stat(tmp_path / "esp.img").st_blocks == 0


def test_short_name_generation():
    names = ["longfilename2.txt", "longfilename1.txt", "LONGFI~1.TXT", "foo.txt",
             "foo bar.txt", "Makefile", ".bashrc", "x.html", "\u00e9t\u00e9.md",
             "fo o.txt", "foo~1.txt"]
    got = {k: v.decode() for k, v in fatnames.assign_short_names(names).items()}
    assert got == {
        "LONGFI~1.TXT": "LONGFI~1TXT",     # 8.3 names (in any case) keep theirs first
        "longfilename1.txt": "LONGFI~2TXT", "longfilename2.txt": "LONGFI~3TXT",
        "foo.txt": "FOO     TXT", "foo bar.txt": "FOOBAR~1TXT", "Makefile": "MAKEFILE   ",
        ".bashrc": "BASHRC~1   ", "x.html": "X~1     HTM", "\u00e9t\u00e9.md": "_T_~1   MD ",
        "fo o.txt": "FOO~2   TXT", "foo~1.txt": "FOO~1   TXT",
    }
