"""verify's verdicts on layouts made by the real tools, the table in the README's verify
section: genimage, mkfs.fat at its FAT16 defaults and as a FAT32 with too few clusters,
and ESPs of exactly 65524 and 65525 clusters (the FAT16/FAT32 boundary of the Microsoft
FAT specification: a volume with fewer than 65525 clusters is FAT16 whatever its BPB)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")

# mkfs.fat -a (no alignment) -F 32 -s 1 -f 2: clusters = TotSec - RsvdSecCnt - 2 * 512
# (FATSz32 = 512 sectors here). 33290 KiB = 66580 sectors, -R 32 -> 65524 clusters;
# 33291 KiB = 66582 sectors, -R 33 -> 65525 clusters.
EXACT = {65524: ("32", 33290), 65525: ("33", 33291)}


@pytest.mark.parametrize("clusters", sorted(EXACT))
def test_fat32_cluster_boundary_built_by_mkfs_fat(tmp_path, clusters):
    rsvd, kib = EXACT[clusters]
    img = g.build_image(tmp_path, g.ImageSpec(
        mkfs_args=("-a", "-F", "32", "-s", "1", "-f", "2", "-R", rsvd), mkfs_blocks=kib,
        populate=False))
    # fsck.fat, an external judge, counts the same clusters
    part = tmp_path / "esp.img"
    subprocess.run(["dd", f"if={img}", f"of={part}", "bs=1M", "skip=1", "count=36",
                    "status=none"], check=True)
    out = subprocess.run(["fsck.fat", "-n", part], capture_output=True, text=True).stdout
    assert f"/{clusters} clusters" in out, out
    r = verify.verify_image(img).by_id()
    if clusters == 65524:
        assert r["esp.fat32"].result == "fail"
        assert "65524 clusters" in r["esp.fat32"].detail and "FAT16" in r["esp.fat32"].detail
    else:
        assert r["esp.fat32"].result == "pass", r["esp.fat32"].detail
        assert "FAT32: 65525 clusters" in r["esp.fat32"].detail
    assert r["esp.fat-sane"].result == "pass", r["esp.fat-sane"].detail


def test_mkfs_fat_fat16_defaults(tmp_path):
    img = g.build_image(tmp_path, g.ImageSpec(fat_bits=16))
    r = verify.verify_image(img).by_id()
    assert r["esp.fat32"].result == "fail" and "FAT16" in r["esp.fat32"].detail
    assert "BPB_FATSz16" in r["esp.fat32"].detail
    others = [c for c in r.values() if c.result == "fail" and c.id != "esp.fat32"]
    assert others == []                        # the firmware reads FAT16: only the rule fails


def test_mkfs_fat_fat32_with_too_few_clusters(tmp_path):
    """-F 32 -s 2 on 36 MiB: a FAT32 BPB and label, ~36800 clusters, FAT16 by count."""
    img = g.build_image(tmp_path, g.ImageSpec(mkfs_args=("-F", "32", "-s", "2"),
                                              populate=False))
    r = verify.verify_image(img).by_id()
    assert r["esp.fat32"].result == "fail"
    assert "makes it FAT16" in r["esp.fat32"].detail
    assert "informational" in r["esp.fat32"].detail


@pytest.mark.parametrize("vfat_args,verdict", [("", "fail"), ("-F 32 -s 1", "pass")],
                         ids=["genimage-vfat-defaults", "genimage-fat32"])
def test_genimage_layouts(tmp_path, vfat_args, verdict):
    r = verify.verify_image(g.genimage_disk(tmp_path, vfat_args)).by_id()
    bad = sorted(c.id for c in r.values() if c.result == "fail")
    assert bad == ([] if verdict == "pass" else ["esp.fat32"]), [
        (c.id, c.detail) for c in r.values() if c.result == "fail"]
    assert r["gpt.primary"].result == "pass" and r["boot.chain"].result == "pass"
