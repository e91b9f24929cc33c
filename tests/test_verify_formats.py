"""Files that are not raw GPT disks: VM containers made by qemu-img (qcow2, VMDK, VHD,
VHDX, VDI) and images compressed by xz, zstd and gzip get exit 3 from verify and boot (boot
takes a self-contained qcow2), with
what the file is and how to convert it; an MBR disk made by sfdisk + mkfs.fat + mtools is
judged (its 0xEF partition is read as the ESP) and boot says "MBR, not GPT" unless --arch
is given."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.run.boot as boot  # noqa: E402
import builder.verify as verify  # noqa: E402
from builder.errors import NotAnImageError  # noqa: E402
from builder.run.qemu import probe_image  # noqa: E402
from builder.verify.container import NotRawDiskError  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")
needs_qemu_img = pytest.mark.skipif(not g.have_tools("qemu-img"),
                                    reason="qemu-img (qemu-utils) missing")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmt")
    return g.build_image(d, g.ImageSpec(), "good.raw")


CONTAINERS = {   # name: (qemu-img convert options, what verify must call it)
    "qcow2": (["-O", "qcow2"], "qcow2"),
    "vmdk": (["-O", "vmdk"], "VMDK"),
    "vhdx": (["-O", "vhdx"], "VHDX"),
    "vhd": (["-O", "vpc"], "dynamic VHD"),
    "fixed.vhd": (["-O", "vpc", "-o", "subformat=fixed"], "fixed VHD"),
    "vdi": (["-O", "vdi"], "VDI"),
}


@needs_qemu_img
@pytest.mark.parametrize("ext", sorted(CONTAINERS))
def test_containers_are_not_raw_disks(good, tmp_path, ext):
    opts, what = CONTAINERS[ext]
    out = tmp_path / f"disk.{ext}"
    g.run("qemu-img", "convert", "-f", "raw", *opts, good, out)
    p = cli("verify", out)
    assert p.returncode == 3, p.stdout + p.stderr
    assert what in p.stderr and "not a raw disk image" in p.stderr
    assert "qemu-img convert" in p.stderr and "Traceback" not in p.stderr
    assert "gpt." not in p.stdout                       # no misleading GPT failures
    if ext == "qcow2":                                   # boot takes a self-contained qcow2
        assert probe_image(out).format == "qcow2"        # (tests/test_outputs.py boots one)
        return
    with pytest.raises(NotRawDiskError, match=what):
        probe_image(out)
    with pytest.raises(NotRawDiskError):                 # also with --arch: never booted
        boot.boot_image(out, arch="aarch64")


@pytest.mark.parametrize("tool,args,suffix,what,how", [
    ("xz", ["-0", "-k", "-T1"], ".xz", "xz-compressed", "xz -dk"),
    ("zstd", ["-1", "-q", "-k"], ".zst", "zstd-compressed", "zstd -d"),
    ("gzip", ["-1", "-k"], ".gz", "gzip-compressed", "gunzip -k"),
])
def test_compressed_images(good, tmp_path, tool, args, suffix, what, how):
    if not g.have_tools(tool):
        pytest.skip(f"{tool} missing")
    src = g.copy_image(good, tmp_path / "disk.raw")
    g.run(tool, *args, src)
    p = cli("verify", str(src) + suffix)
    assert p.returncode == 3 and what in p.stderr and how in p.stderr, p.stderr
    with pytest.raises(NotRawDiskError, match=what):
        probe_image(Path(str(src) + suffix))


def _mbr_image(tmp_path) -> Path:
    disk, part = tmp_path / "mbr.raw", tmp_path / "mbr.esp"
    g.run("truncate", "-s", "48M", disk)
    g.run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk,
          input=b"label: dos\nstart=2048, size=73728, type=ef\n")
    g.run("truncate", "-s", "36M", part)
    g.run("mkfs.fat", "-F", "32", "-s", "1", "-n", "ESP", part)
    files = g.default_esp("aarch64")
    for d in ("EFI", "EFI/BOOT"):
        g.run("mmd", "-i", part, f"::/{d}")
    for path, data in files.items():
        src = tmp_path / "payload"
        src.write_bytes(data)
        g.run("mcopy", "-i", part, src, f"::/{path}")
    g.run("dd", f"if={part}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc", "status=none")
    return disk


def test_mbr_disk_is_judged_and_boot_names_it(tmp_path, monkeypatch):
    img = _mbr_image(tmp_path)
    r = verify.verify_image(img).by_id()
    assert r["gpt.pmbr"].result == "fail" and r["gpt.primary"].result == "fail"
    assert r["esp.type"].result == "fail" and "0xEF" in r["esp.type"].detail
    for cid in ("esp.fat32", "esp.fat-sane", "boot.path", "boot.pe", "boot.chain",
                "boot.kernel"):
        assert r[cid].result == "pass", (cid, r[cid].detail)
    with pytest.raises(NotAnImageError, match="MBR disk, not GPT"):
        probe_image(img)
    p = cli("boot", img)
    assert p.returncode == 3 and "MBR disk, not GPT" in p.stderr and "--arch" in p.stderr

    class Reached(Exception):
        pass

    def stop(_a):
        raise Reached()
    monkeypatch.setattr(boot, "find_qemu", stop)
    with pytest.raises(Reached):                         # --arch: on to QEMU, MBR is fine
        boot.boot_image(img, arch="aarch64")
