"""The self-check's faster paths read the same bytes as the slow ones: FAT files read by
cluster runs, and the kernel banner found across read boundaries."""
from __future__ import annotations

import random

import pytest

from builder.verify import kernelimg
from builder.verify.blob import BytesBlob
from builder.verify.fat import FatFile


class _Vol:
    """What FatFile needs from a volume: cluster size, cluster offsets, the bytes."""

    def __init__(self, data: bytes, cluster_bytes: int):
        self.blob, self.cluster_bytes = BytesBlob(data), cluster_bytes

    def cluster_offset(self, c: int) -> int:
        return (c - 2) * self.cluster_bytes


@pytest.mark.parametrize("seed", range(6))
def test_fat_file_reads_by_runs_match_cluster_by_cluster(seed):
    rnd = random.Random(seed)
    cb, count = 512, 64
    data = bytes(rnd.getrandbits(8) for _ in range(cb * count))
    vol = _Vol(data, cb)
    # a chain mixing contiguous runs, jumps back and single clusters
    chain, c = [], 2
    while len(chain) < 40:
        run = rnd.choice([1, 1, 2, 5, 9])
        chain.extend(range(c, min(c + run, 2 + count)))
        c = rnd.randrange(2, 2 + count - 10)
    chain = chain[:40]
    size = len(chain) * cb - rnd.randrange(cb)
    f = FatFile(vol, chain, size)
    whole = b"".join(data[(x - 2) * cb:(x - 1) * cb] for x in chain)[:size]
    assert f.read_at(0, size) == whole
    for _ in range(200):
        off = rnd.randrange(-5, size + 5)
        n = rnd.randrange(0, 3 * cb)
        want = whole[off:off + n] if 0 <= off < size else b""
        assert f.read_at(off, n) == want, (off, n)
    starts, firsts, counts = f.runs()
    assert sum(counts) == len(chain)
    assert all(firsts[k] + counts[k] != firsts[k + 1] for k in range(len(firsts) - 1))


def test_fat_file_past_the_partition_end_reads_zeros():
    vol = _Vol(b"\x11" * 1024, 512)
    f = FatFile(vol, [2, 3, 4], 1536)               # cluster 4 lies beyond the bytes
    assert f.read_at(0, 1536) == b"\x11" * 1024 + b"\0" * 512


@pytest.mark.parametrize("shift", [-300, -200, -20, -14, -5, 0, 3, 20, 39, 40, 200, 400])
def test_banner_found_across_chunk_boundaries(monkeypatch, shift):
    monkeypatch.setattr(kernelimg, "BANNER_CHUNK", 4096)
    banner = b"Linux version 6.12.9-arm64 (debian-kernel@lists.debian.org) (gcc) #1 SMP\n"
    decoy = b"Linux version %s (%s)\n"                      # a format string, not a banner
    boundary = 3 * 4096 - 2 * kernelimg.BANNER_OVERLAP      # where the third read ends
    at = boundary - 40 + shift
    body = bytearray(b"\xa5" * (6 * 4096))
    body[100:100 + len(decoy)] = decoy
    body[at:at + len(banner)] = banner
    assert kernelimg.banner_version(BytesBlob(bytes(body))) == "6.12.9-arm64"


def test_banner_absent_and_at_the_very_end(monkeypatch):
    monkeypatch.setattr(kernelimg, "BANNER_CHUNK", 4096)
    body = b"\x00" * 10000
    assert kernelimg.banner_version(BytesBlob(body)) is None
    tail = b"Linux version 6.1.0-9-armmp ("
    assert kernelimg.banner_version(BytesBlob(body + tail)) == "6.1.0-9-armmp"
    assert kernelimg.banner_version(BytesBlob(body + tail[:-1])) is None


def test_writer_extents_cover_every_data_byte_and_feed_the_bmap(tmp_path):
    """write_image reports what it wrote: every 4 KiB block outside the extents is zero,
    the extents match SEEK_DATA on this file, and the bmap built from them equals the
    scanned one and lets bmaptool copy the image bit for bit."""
    import hashlib
    import shutil
    import subprocess

    from builder import spec
    from builder.disk.assemble import write_image
    from builder.disk.layout import PlannedFile, plan_layout
    from builder.publish.output import bmap_xml, mapped_ranges
    from builder.recipe.load import load_recipe
    from tests.fixtures import efi_recipe

    r = load_recipe(efi_recipe(tmp_path), environ={})
    files = [PlannedFile("EFI/BOOT/BOOTAA64.EFI", r.bootloader.source.file,
                         r.bootloader.source.file.stat().st_size, "", "loader")]
    for e in r.disk.partitions[0].files:
        files.append(PlannedFile(e.dest, e.source.file, e.source.file.stat().st_size, "", "file"))
    layout = plan_layout(r, files, timestamp=spec.DEFAULT_SOURCE_DATE_EPOCH, seed=r.digest)
    image = tmp_path / "x.raw"
    extents = write_image(layout, image)
    assert extents and extents == sorted(extents)
    assert all(a < b for a, b in extents)
    assert all(extents[i][1] < extents[i + 1][0] for i in range(len(extents) - 1))   # merged
    data = image.read_bytes()
    covered = bytearray(len(data) // 4096 + 1)
    for a, b in extents:
        for blk in range(a // 4096, (b - 1) // 4096 + 1):
            covered[blk] = 1
    zero = bytes(4096)
    for blk in range(len(data) // 4096):
        if not covered[blk]:
            assert data[blk * 4096:(blk + 1) * 4096] == zero, blk
    scanned = bmap_xml(image)
    assert bmap_xml(image, extents) == scanned     # holes on ext4/tmpfs are what we wrote
    assert sum(b - a for a, b in extents) <= sum(b - a for a, b in mapped_ranges(image))
    if shutil.which("bmaptool"):
        (tmp_path / "x.bmap").write_text(bmap_xml(image, extents))
        copy = tmp_path / "copy.raw"
        out = subprocess.run(["bmaptool", "copy", "--bmap", str(tmp_path / "x.bmap"), str(image),
                              str(copy)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
