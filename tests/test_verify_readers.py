"""The independent readers on hostile and unusual input: GPT, FAT, PE, cpio, grub.cfg,
kernel headers, module info. Nothing may raise past the reader's own error type, loop
forever, or allocate by a field's value."""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.verify import cpio, grubcfg, kernelimg  # noqa: E402
from builder.verify.blob import BytesBlob, ConcatBlob, FileBlob  # noqa: E402
from builder.verify.checks_os import judge  # noqa: E402
from builder.verify.fat import FatError, FatVolume, parse_dir, sanity  # noqa: E402
from builder.verify.gpt import analyze  # noqa: E402
from builder.verify.modinfo import KernelFacts, Module, is_wanted, kernel_facts  # noqa: E402
from builder.verify.pe import PeError, parse_pe  # noqa: E402

tools = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                           reason="needs fdisk, dosfstools and mtools")


@pytest.fixture(autouse=True)
def _raise_internal(monkeypatch):
    monkeypatch.setattr(verify, "_RAISE_INTERNAL", True)


# --- GPT ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return g.build_image(tmp_path_factory.mktemp("rd"), g.ImageSpec(), "good.raw")


def _gpt(path):
    with open(path, "rb") as f:
        return analyze(FileBlob(f))


@tools
@pytest.mark.parametrize("field,value,needle", [
    (80, 0xFFFFFFFF, "implausibly large"),          # NumberOfPartitionEntries
    (84, 0x80000000, "implausibly large"),          # SizeOfPartitionEntry
    (84, 100, "128 x 2^n"),
    (12, 0xFFFFFFFF, "HeaderSize"),
    (72, 1 << 60, "past the end"),                  # PartitionEntryLBA
    (8, 0x00020000, "Revision"),
])
def test_gpt_absurd_header_fields(good, tmp_path, field, value, needle):
    img = g.copy_image(good, tmp_path / "x.raw")
    fmt = "<Q" if field == 72 else "<I"
    g.gpt_rewrite(img, edit_header=lambda h, c: struct.pack_into(fmt, h, field, value),
                  copies=("primary",))
    gpt = _gpt(img)
    assert any(needle in p for p in gpt.problems["primary"]), gpt.problems
    # a header that is structurally unusable makes the reader fall back to the backup
    assert gpt.entries_from == ("primary" if field == 8 else "backup")
    assert len(gpt.entries) == 2


@tools
def test_gpt_pmbr_ffffffff_is_accepted(good, tmp_path):
    img = g.copy_image(good, tmp_path / "x.raw")
    g.write_at(img, 446 + 12, b"\xff\xff\xff\xff")
    assert _gpt(img).problems["pmbr"] == []
    g.write_at(img, 446 + 12, b"\x10\x00\x00\x00")
    assert "SizeInLBA" in _gpt(img).problems["pmbr"][0]


@tools
def test_gpt_duplicate_guid_and_out_of_range(good, tmp_path):
    img = g.copy_image(good, tmp_path / "x.raw")

    def edit(a, esize):
        a[esize + 16:esize + 32] = a[16:32]                 # same UniquePartitionGUID
        struct.pack_into("<Q", a, esize + 40, 10 ** 9)       # EndingLBA past LastUsableLBA
    g.gpt_rewrite(img, edit_entries=edit)
    probs = " ".join(_gpt(img).problems["partitions"])
    assert "share UniquePartitionGUID" in probs and "outside the usable range" in probs


@tools
def test_gpt_primary_destroyed_backup_found(good, tmp_path):
    img = g.copy_image(good, tmp_path / "x.raw")
    g.write_at(img, 512, bytes(512))
    gpt = _gpt(img)
    assert gpt.sector_size == 512 and gpt.entries_from == "backup"
    r = verify.verify_image(img).by_id()
    assert r["gpt.primary"].result == "fail" and r["esp.type"].result == "pass"
    assert r["boot.kernel"].result == "pass"


def test_gpt_many_overlapping_entries_are_capped():
    # 4096-byte sectors, hand-made: 1024 entries all covering the same range
    bs, n = 4096, 1024
    size = 64 * bs + n * 128 * 2
    disk = bytearray(size)
    last = size // bs - 1
    blocks = n * 128 // bs
    arr = bytearray(n * 128)
    for i in range(n):
        struct.pack_into("<16s16sQQ", arr, 128 * i, b"\x01" * 16, (i + 1).to_bytes(16, "little"),
                         40, 50)
    import zlib
    hdr = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, last,
                                2 + blocks, last - blocks - 1, bytes(16), 2, n, 128,
                                zlib.crc32(arr)))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    disk[bs:bs + 92] = hdr
    disk[2 * bs:2 * bs + len(arr)] = arr
    disk[510:512] = b"\x55\xaa"
    gpt = analyze(BytesBlob(bytes(disk)))
    assert gpt.sector_size == 4096 and len(gpt.entries) == n
    assert len(gpt.problems["partitions"]) <= 51
    assert "overlap" in gpt.problems["partitions"][0]


# --- FAT ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fatimg(tmp_path_factory):
    d = tmp_path_factory.mktemp("fat")
    p = d / "fat.img"
    g.run("truncate", "-s", "36M", p)
    g.run("mkfs.fat", "-F", "32", "-s", "1", p)
    (d / "a.txt").write_bytes(b"A" * 1500)
    g.run("mmd", "-i", p, "::/dir", "::/dir/sub")
    g.run("mcopy", "-i", p, d / "a.txt", "::/a.txt")
    g.run("mcopy", "-i", p, d / "a.txt", "::/dir/sub/A Long File Name.Text")
    return p


def _vol(path):
    return FatVolume(FileBlob(open(path, "rb")))


def _fat_put(path, vol, cluster, value):
    off = vol.bpb["BPB_RsvdSecCnt"] * vol.bps + 4 * cluster
    for i in range(vol.bpb["BPB_NumFATs"]):
        g.write_at(path, off + i * vol.fat_bytes, struct.pack("<I", value))


@tools
def test_fat_long_names_and_case_insensitive(fatimg):
    vol = _vol(fatimg)
    e = vol.lookup("/DIR/SUB/a long file name.text")
    assert e is not None and e.name == "A Long File Name.Text" and e.size == 1500
    assert vol.open(e, "x").read_at(0, 5000) == b"A" * 1500
    assert vol.lookup("dir/sub/" + e.short_name.lower()) is not None
    assert vol.lookup("/dir/nothing") is None and vol.lookup("/a.txt/x") is None
    assert sanity(vol) == []


@tools
@pytest.mark.parametrize("kind", ["cycle", "out-of-range", "free", "short"])
def test_fat_bad_chains(fatimg, tmp_path, kind):
    img = g.copy_image(fatimg, tmp_path / "f.img")
    vol = _vol(img)
    first = vol.lookup("/a.txt").first_cluster
    value = {"cycle": first, "out-of-range": 0x0FFFFFF0, "free": 0, "short": 0x0FFFFFFF}[kind]
    _fat_put(img, vol, first + 1, value)
    vol = _vol(img)
    with pytest.raises(FatError) as e:
        vol.open_path("/a.txt")
    assert {"cycle": "loops", "out-of-range": "outside", "free": "free cluster",
            "short": "needs"}[kind] in str(e.value)


@tools
def test_fat_directory_loop_terminates(fatimg, tmp_path):
    img = g.copy_image(fatimg, tmp_path / "f.img")
    vol = _vol(img)
    dir_cl = vol.lookup("/dir").first_cluster
    sub_cl = vol.lookup("/dir/sub").first_cluster
    # make /dir/sub point back at /dir: find its entry in /dir's cluster and patch FstClusLO
    raw = bytearray(g.read_at(img, vol.cluster_offset(dir_cl), vol.cluster_bytes))
    for off in range(0, len(raw), 32):
        if raw[off + 11] == 0x10 and struct.unpack_from("<H", raw, off + 26)[0] == sub_cl \
                and raw[off] != ord("."):
            struct.pack_into("<H", raw, off + 26, dir_cl)
    g.write_at(img, vol.cluster_offset(dir_cl), bytes(raw))
    problems = []
    paths = [p for p, _ in _vol(img).walk(problems)]
    assert any("loop" in p for p in problems) and len(paths) < 10
    r_problems = []
    assert list(_vol(img).walk(r_problems, max_entries=2)) and "walk stopped" in r_problems[-1]


def test_fat_endless_lfn_runs_are_bounded():
    lfn = bytearray(32)
    lfn[0], lfn[11], lfn[13] = 0x40 | 20, 0x0F, 0x55
    lfn[1:11] = "abcde".encode("utf-16-le")
    raw = bytes(lfn) * 65536
    assert parse_dir(raw) == []
    short = b"KERNEL     " + bytes([0x20]) + bytes(20)
    assert [e.name for e in parse_dir(bytes(lfn) * 19 + short)] == ["KERNEL"]   # bad checksum


def test_fat_garbage_boot_sector():
    with pytest.raises(FatError):
        FatVolume(BytesBlob(b"\xeb\x3c\x90" + bytes(509)))
    with pytest.raises(FatError):
        FatVolume(BytesBlob(b"short"))
    bs = bytearray(512)
    struct.pack_into("<3s8sHBHBHHBHHHII", bs, 0, b"\xeb\x58\x90", b"X", 512, 1, 32, 2, 0, 0,
                     0xF8, 0, 0, 0, 0, 0xFFFFFFFF)
    struct.pack_into("<I", bs, 36, 0x7FFFFFF)           # FATSz32 absurd, partition tiny
    vol = FatVolume(BytesBlob(bytes(bs) + bytes(4096)))
    probs = " ".join(sanity(vol))
    assert "larger than its partition" in probs


# --- PE ------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,needle", [
    (lambda b: b.__setitem__(slice(0, 2), b"ZM"), "MZ"),
    (lambda b: struct.pack_into("<I", b, 0x3C, 0xFFFFFFF0), "outside the file"),
    (lambda b: b.__setitem__(slice(0x40, 0x44), b"NE\0\0"), "PE"),
    (lambda b: struct.pack_into("<H", b, 0x40 + 6, 0xFFFF), "section table"),
    (lambda b: struct.pack_into("<H", b, 0x40 + 20, 4), "SizeOfOptionalHeader"),
])
def test_pe_hostile_headers(patch, needle):
    img = bytearray(g.make_loader("aarch64"))
    patch(img)
    with pytest.raises(PeError) as e:
        parse_pe(BytesBlob(bytes(img)))
    assert needle in str(e.value)


def test_pe_section_past_end_is_a_problem():
    img = g.make_uki("aarch64", b"x" * 3000)
    pe = parse_pe(BytesBlob(img[:-1024]))
    assert pe.problems and "runs past the end" in pe.problems[0]


# --- kernel headers ---------------------------------------------------------------------
def test_kernel_kinds():
    k64, k32 = g.make_kernel("aarch64"), g.make_kernel("armv7")
    assert kernelimg.judge(BytesBlob(k64), "aarch64", "grub")[0]
    assert kernelimg.judge(BytesBlob(k32), "armv7", "grub")[0]
    ok, why = kernelimg.judge(BytesBlob(k32), "aarch64", "grub")
    assert not ok and "not an aarch64 kernel" in why
    zboot = bytearray(g.make_pe(0xAA64, 0x20B))
    zboot[4:8] = b"zimg"
    assert kernelimg.judge(BytesBlob(bytes(zboot)), "aarch64", "uki")[0]
    gz = gzip.compress(k64)
    ok, why = kernelimg.judge(BytesBlob(gz), "aarch64", "grub")
    assert ok and "gzio" in why
    assert not kernelimg.judge(BytesBlob(gz), "aarch64", "uki")[0]
    assert not kernelimg.judge(BytesBlob(b"\x1f\x8b" + bytes(100)), "aarch64", "grub")[0]
    bad = bytearray(k64)
    struct.pack_into("<H", bad, 0x44, 0x8664)          # stub machine: x86-64
    ok, why = kernelimg.judge(BytesBlob(bytes(bad)), "aarch64", "grub")
    assert not ok and "0x8664" in why


# --- cpio -----------------------------------------------------------------------------
FILES = [("etc", 0o40755, b""), ("etc/a", 0o100644, b"hello"),
         ("etc/link", 0o120777, b"a"), ("big", 0o100644, b"z" * 5000)]
EARLY = [("kernel/x86/microcode/x.bin", 0o100644, b"ucode")]


def _read(data, **kw):
    return cpio.read_initramfs(BytesBlob(data), want=lambda p, s: True, **kw)


@pytest.mark.parametrize("compress", [
    lambda d: d, lambda d: gzip.compress(d), lambda d: zstandard.ZstdCompressor().compress(d),
    lambda d: lzma.compress(d), lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    lambda d: bz2.compress(d)], ids=["none", "gzip", "zstd", "xz", "lzma", "bzip2"])
def test_cpio_concatenated_segments(compress):
    data = g.newc(EARLY) + b"\0" * 512 + compress(g.newc(FILES)) + b"\0" * 3
    fs = _read(data)
    assert fs.error is None and fs.unsupported is None, fs.error
    assert fs.members["etc/a"].data == b"hello" and fs.members["big"].data == b"z" * 5000
    assert fs.members["kernel/x86/microcode/x.bin"].data == b"ucode"
    assert fs.resolve("etc/link").data == b"hello"
    assert len(fs.segments) == 2 and fs.segments[0] == "cpio@0"


def test_cpio_two_archives_in_one_compressed_stream_and_two_gzip_members():
    data = gzip.compress(g.newc(EARLY) + b"\0" * 8 + g.newc(FILES)) + gzip.compress(
        g.newc([("last", 0o100644, b"L")]))
    fs = _read(data)
    assert fs.error is None and {"etc/a", "last", "kernel/x86/microcode/x.bin"} <= set(fs.members)


@pytest.mark.parametrize("mangle,needle", [
    (lambda d: d[:-200], "ends"),                                   # truncated
    (lambda d: d.replace(b"%08X" % 5000, b"%08X" % 0x7FFFFFFF, 1), "c_filesize"),  # lying size
    (lambda d: d.replace(b"%08X" % 4, b"FFFFFFFF", 1), "c_namesize"),  # absurd name size
    (lambda d: b"ZZZZ" + d, "invalid magic"),
    (lambda d: d[:14] + b"G" + d[15:], "hexadecimal"),
])
def test_cpio_hostile(mangle, needle):
    fs = _read(mangle(g.newc(FILES)))
    assert fs.error and needle in fs.error, fs.error


def test_cpio_junk_inside_compressed_stream():
    fs = _read(gzip.compress(g.newc(FILES) + b"JUNK"))
    assert "junk" in fs.error


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_cpio_decompression_bomb_is_capped(kind):
    zeros = g.newc([("bomb", 0o100644, bytes(16 << 20))])
    data = {"gzip": lambda: gzip.compress(zeros, 1),
            "zstd": lambda: zstandard.ZstdCompressor().compress(zeros),
            "xz": lambda: lzma.compress(zeros)}[kind]()
    assert len(data) < 1 << 20
    fs = cpio.read_initramfs(BytesBlob(data), max_total=4 << 20)
    assert fs.error and "decompression bomb" in fs.error
    assert fs.total <= (4 << 20) + (1 << 20)


def test_cpio_lz4_is_skipped_without_module():
    try:
        import lz4  # noqa: F401
        pytest.skip("python lz4 is installed here")
    except ImportError:
        pass
    fs = _read(b"\x02\x21\x4c\x18" + bytes(100))
    assert fs.unsupported and "lz4" in fs.unsupported and fs.error is None


def test_cpio_symlink_loop_and_wanted_filter():
    fs = _read(g.newc([("a", 0o120777, b"b"), ("b", 0o120777, b"a")]))
    assert fs.resolve("a/x") is None
    fs = cpio.read_initramfs(BytesBlob(g.newc(FILES)), want=lambda p, s: p == "etc/a")
    assert fs.members["etc/a"].data == b"hello" and fs.members["big"].data is None
    assert fs.members["big"].size == 5000


def test_concat_blob_pads_to_four_bytes():
    b = ConcatBlob([BytesBlob(b"abc"), BytesBlob(b""), BytesBlob(b"defgh")])
    assert b.size == 12 and b.read_at(0, 100) == b"abc\0defgh\0\0\0"
    assert b.read_at(2, 3) == b"c\0d" and b.read_at(5, 2) == b"ef"


# --- grub.cfg ---------------------------------------------------------------------------
def _grub(text, files=("/vmlinuz", "/initrd.img"), extra=None):
    extra = extra or {}
    return grubcfg.read_grub_cfg(
        text, "/EFI/BOOT/grub.cfg", esp_part=1, fs_uuid="1234-ABCD", label="ESP",
        exists=lambda p: p in files or p in extra, read=lambda p: extra.get(p), prefix="/EFI/BOOT")


def test_grub_debian_style_config():
    cfg = """
insmod part_gpt
search --no-floppy --fs-uuid --set=root 1234-abcd
set default="Debian GNU/Linux, rescue"
if [ x$feature_timeout_style = xy ] ; then
  set timeout_style=menu
fi
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple' {
    linux   ($root)/vmlinuz root=UUID=x ro quiet
    initrd  /initrd.img
}
menuentry "Debian GNU/Linux, rescue" {
    echo 'Loading Linux ...'
    linux (hd0,gpt1)/vmlinuz single; initrd (hd0,1)/early.img /initrd.img
}
"""
    r = _grub(cfg)
    assert r.entry_title == "Debian GNU/Linux, rescue"
    assert r.kernel.on_esp and r.kernel.path == "/vmlinuz"
    assert [i.path for i in r.initrds] == ["/early.img", "/initrd.img"]
    assert len(r.refs) == 5 and all(x.on_esp for x in r.refs)


def test_grub_search_elsewhere_and_configfile():
    stub = "search.fs_uuid 0000-1111 root\nset prefix=($root)'/boot/grub'\n" \
           "configfile $prefix/grub.cfg\n"
    r = _grub(stub)
    assert r.kernel is None and "configfile $prefix/grub.cfg" in r.elsewhere[0]
    r = _grub("configfile /EFI/BOOT/real.cfg\n", extra={
        "/EFI/BOOT/real.cfg": "linux /vmlinuz\ninitrd /initrd.img\nboot\n"})
    assert r.kernel.path == "/vmlinuz" and r.entry_title == "(top level)"
    r = _grub("search --file --set=r /vmlinuz\nlinux ($r)/vmlinuz\n")
    assert r.kernel.on_esp
    r = _grub("search -f /nope --set root\nlinux /vmlinuz\n")
    assert not r.kernel.on_esp


def test_grub_recursion_and_garbage_are_bounded():
    loop = {"/EFI/BOOT/a.cfg": "source /EFI/BOOT/a.cfg\n"}
    r = _grub("source /EFI/BOOT/a.cfg\n", extra=loop)
    assert any("nested" in p for p in r.problems)
    r = _grub("{\n" * 5000 + "linux /vmlinuz\n" + "}\n" * 10 + "'unterminated \\")
    assert r.kernel is not None
    r = _grub("menuentry 'x' {\n linux\n}\n")
    assert r.kernel is None and any("without a file" in p for p in r.problems)


@tools
def test_debian_signed_grub_location_and_concatenated_initrds(tmp_path):
    cfg = b"menuentry d {\n linux /vmlinuz\n initrd /early.img /initrd.img\n}\n"
    early = g.newc([("kernel/x86/microcode/GenuineIntel.bin", 0o100644, b"u" * 7)])
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={
        "EFI/BOOT/grub.cfg": None, "EFI/debian/grub.cfg": cfg, "early.img": early,
        "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", prefix="/EFI/debian")}))
    r = verify.verify_image(img).by_id()
    assert "/EFI/debian/grub.cfg" in r["boot.chain"].detail
    assert all(c.result == "pass" or not c.applicable for c in r.values()), [
        (c.id, c.detail) for c in r.values() if c.result != "pass"]


@tools
def test_other_tools_initramfs_without_config_is_skip(tmp_path):
    files = [f for f in g.initramfs_files() if not f[0].endswith(("config", "modules.builtin"))]
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={"initrd.img": g.make_initramfs(files)}))
    r = verify.verify_image(img)
    os_checks = [c for c in r.checks if c.id.startswith("os.")]
    assert os_checks and all(c.result == "skip" for c in os_checks)
    assert "no config or modules.builtin" in os_checks[0].detail
    assert r.exit_code() == 0 and r.exit_code(strict=True) == 1


# --- driver rules ----------------------------------------------------------------------
def _kf(config=None, builtin=None, modules=None, load=None):
    kf = KernelFacts("6.1", "lib/modules/6.1", config, builtin)
    kf.modules = {n: Module(n, f"{n}.ko", deps) for n, deps in (modules or {}).items()}
    kf.load_order = load
    return kf


def test_driver_rules():
    cfg = {"CONFIG_SERIAL_AMBA_PL011": "y", "CONFIG_SERIAL_AMBA_PL011_CONSOLE": "y"}
    assert judge("os.console.pl011", _kf(cfg))[0] == "pass"
    # modules.builtin without config: tristates are judged, bool-only symbols are unknown
    kf = _kf(None, {"virtio_pci", "virtio_mmio", "virtio_blk", "virtio_console"},
             {"virtio_net": ["net_failover"], "net_failover": ["failover"], "failover": [],
              "virtio_balloon": []}, ["failover", "net_failover", "virtio_net",
                                      "virtio_balloon"])
    assert judge("os.virtio", kf)[0] == "pass"
    assert judge("os.gic", kf)[0] == "skip"
    kf.load_order = ["virtio_net", "failover", "net_failover", "virtio_balloon"]
    res, why = judge("os.virtio", kf)
    assert res == "fail" and "after" in why
    kf.load_order = None            # another tool's initramfs: its init loads on demand
    res, why = judge("os.virtio", kf)
    assert res == "pass" and "module virtio_net with net_failover, failover in the " \
        "initramfs (its init loads it on demand)" in why
    del kf.modules["failover"]
    res, why = judge("os.virtio", kf)
    assert res == "fail" and "failover (needed by net_failover) is not in the initramfs" in why
    kf.modules["failover"] = Module("failover", "failover.ko", [])
    kf.own_layout = True            # ours (our config copy is there): modules.load is required
    assert "modules.load is missing" in judge("os.virtio", kf)[1]
    kf = _kf({"CONFIG_RTC_DRV_EFI": "m"}, set(), {"rtc_efi": []}, ["rtc_efi"])
    assert judge("os.rtc-efi", kf)[0] == "pass"
    kf = _kf({"CONFIG_RTC_DRV_EFI": "m"}, set(), {"rtc_efi": ["cycle_a"], "cycle_a":
                                                  ["rtc_efi"]}, ["cycle_a", "rtc_efi"])
    assert judge("os.rtc-efi", kf)[0] == "fail"          # a dependency cycle cannot be ordered


def test_kernel_facts_from_initramfs_layouts():
    fs = cpio.read_initramfs(BytesBlob(g.make_initramfs(g.initramfs_files(
        prefix="usr/lib/modules"))), want=is_wanted)
    kf = kernel_facts(fs)
    assert kf.version == g.KVER and kf.config["CONFIG_ARM_GIC"] == "y"
    assert kf.modules["net_failover"].depends == ["failover"]
    assert kf.modules["xen_blkfront"].path.endswith("xen-blkfront.ko")
    assert "amba_pl011" in kf.builtin and kf.load_order[0] == "virtio_mmio"
    xz = [(p, m, lzma.compress(d) if p.endswith(".ko") else d)
          for p, m, d in g.initramfs_files()]
    xz = [(p + ".xz" if p.endswith(".ko") else p, m, d) for p, m, d in xz]
    fs = cpio.read_initramfs(BytesBlob(g.newc(xz)), want=is_wanted)
    kf = kernel_facts(fs)
    assert kf.modules["virtio_net"].depends == ["net_failover"]
    assert kf.modules["virtio_net"].error is None
    broken = [(p, m, b"\x7fELF garbage" if p.endswith("failover.ko") else d)
              for p, m, d in g.initramfs_files()]
    kf = kernel_facts(cpio.read_initramfs(BytesBlob(g.newc(broken)), want=is_wanted))
    assert kf.modules["failover"].error and judge("os.virtio", kf)[0] == "fail"


@tools
def test_genimage_image_is_read(tmp_path):
    """An image assembled by another tool (genimage: FirstUsableLBA 2048, its own layout)."""
    disk = g.genimage_disk(tmp_path, "-F 32 -s 1")
    r = verify.verify_image(disk)
    bad = [(c.id, c.detail) for c in r.checks if c.result != "pass" and c.applicable]
    assert bad == []


@tools
def test_fat_chain_longer_than_file_is_readable_but_noted(fatimg, tmp_path):
    img = g.copy_image(fatimg, tmp_path / "f.img")
    vol = _vol(img)
    first = vol.lookup("/a.txt").first_cluster          # 1500 bytes: 3 clusters of 512
    spare = vol.max_cluster - 5
    _fat_put(img, vol, first + 2, spare)
    _fat_put(img, vol, spare, 0x0FFFFFFF)
    vol = _vol(img)
    assert vol.open_path("/a.txt").read_at(0, 2000) == b"A" * 1500
    assert "longer than the 3 clusters" in vol.read_problems[0]


def test_grub_relative_path_is_reported():
    r = _grub("linux vmlinuz\n")
    assert r.kernel is not None and not r.kernel.absolute


@tools
def test_fat32_bpb_with_fat16_cluster_count(tmp_path):
    """mkfs.fat -F 32 with big clusters on a small ESP: the BPB says FAT32, the cluster
    count says FAT16 -- by the spec's rule it is FAT16, and readers following the rule
    cannot find the files (mtools misreads it too)."""
    img = g.build_image(tmp_path, g.ImageSpec(mkfs_args=("-F", "32", "-s", "8"),
                                              populate=False))
    r = verify.verify_image(img).by_id()
    assert r["esp.fat32"].result == "fail" and "makes it FAT16" in r["esp.fat32"].detail
    assert r["boot.path"].result == "fail"
    assert r["gpt.primary"].result == "pass"


def test_cpio_entry_flood_is_capped(monkeypatch):
    monkeypatch.setattr(cpio, "MAX_ENTRIES", 1000)
    one = g.newc([("a", 0o100644, b"")])[:-124]          # an entry without the trailer
    fs = _read(zstandard.ZstdCompressor().compress(one * 5000 + g.newc([])))
    assert fs.error and "more than 1000 cpio entries" in fs.error
    assert list(fs.members) == ["a"]


def test_grub_default_with_unicode_digit():
    r = _grub("set default=1\u00b2\nmenuentry a {\n linux /vmlinuz\n}\n")
    assert r.entry_title == "a" and any("matches no menu entry" in p for p in r.problems)


@tools
def test_debian_installed_stub_config_is_skip(tmp_path):
    """Debian's installed layout: an ESP stub config that continues on the root file system."""
    stub = (b"search.fs_uuid 5f2c0d6e-0000-4000-8000-000000000000 root hd0,gpt2\n"
            b"set prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n")
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={
        "EFI/BOOT/grub.cfg": None, "EFI/debian/grub.cfg": stub, "vmlinuz": None,
        "initrd.img": None, "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64",
                                                                     prefix="/EFI/debian")}))
    r = verify.verify_image(img).by_id()
    assert r["boot.chain"].result == "skip" and "outside the ESP" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "skip" and r["os.gic"].result == "skip"
    assert r["boot.pe"].result == "pass"


@tools
def test_fat_contiguous_runs_taken_in_one_step_agree_with_the_entry_walk(fatimg, tmp_path):
    """chain() follows contiguous runs in bulk: same clusters as walking fat_entry one by
    one, a loop back into a run is still found, and the limit still holds."""
    img = g.copy_image(fatimg, tmp_path / "f.img")
    big = tmp_path / "big.bin"
    big.write_bytes(b"B" * (300 * 512 + 7))                 # 301 contiguous clusters
    g.run("mcopy", "-i", img, big, "::/big.bin")
    vol = _vol(img)
    first = vol.lookup("/big.bin").first_cluster
    walk, c = [], first
    while c < vol.eoc:
        walk.append(c)
        c = vol.fat_entry(c)
    assert len(walk) == 301 and vol.chain(first, 1000, "big") == walk
    with pytest.raises(FatError, match="longer than 100"):
        vol.chain(first, 100, "big")
    _fat_put(img, vol, first + 200, first + 50)             # loop back into the run
    with pytest.raises(FatError, match="loops"):
        _vol(img).chain(first, 1000, "big")
