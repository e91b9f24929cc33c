"""boot.init, boot.modules and root.*: images with a real root file system (mke2fs -d), read
back through GPT -> ext4 -> symlinks, the command line from grub.cfg or the UKI."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.verify import kernelimg  # noqa: E402
from builder.verify.blob import BytesBlob  # noqa: E402
from builder.verify.checks_root import cmdline_args, param  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd", "mke2fs"),
                                reason="needs fdisk, dosfstools, mtools and e2fsprogs")
ROOT_IDS = ("root.type", "root.fs", "root.found", "root.init")
ROOT = g.RootSpec()


@pytest.fixture(autouse=True)
def _raise_internal(monkeypatch):
    monkeypatch.setattr(verify, "_RAISE_INTERNAL", True)


def check(tmp_path, spec: g.ImageSpec, name: str = "disk.raw") -> dict:
    return verify.verify_image(g.build_image(tmp_path, spec, name)).by_id()


def all_pass(r: dict) -> None:
    assert [(c.id, c.detail) for c in r.values() if c.result != "pass"] == []


def test_root_by_uuid_passes_with_details(tmp_path):
    r = check(tmp_path, g.ImageSpec(root=ROOT, cmdline=g.root_cmdline(ROOT)))
    all_pass(r)
    assert "partition 2" in r["root.type"].detail and "b921b045" in r["root.type"].detail
    assert f"root=UUID={ROOT.fs_uuid} is partition 2 (ext4" in r["root.found"].detail
    assert "/sbin/init -> ../lib/systemd/systemd" in r["root.init"].detail
    assert f"/lib/modules/{g.KVER}" in r["root.init"].detail
    assert "ext4" in r["root.fs"].detail and "EXT4_FS=y" in r["root.fs"].detail
    assert "executable /init" in r["boot.init"].detail
    assert "8 module(s)" in r["boot.modules"].detail


def test_root_by_partuuid_in_a_uki(tmp_path):
    cmd = f"console=ttyAMA0 root=PARTUUID={ROOT.part_uuid.upper()} rw"
    uki = g.make_uki("aarch64", g.make_initramfs(), cmdline=cmd)
    r = check(tmp_path, g.ImageSpec(root=ROOT, esp_files={
        "EFI/BOOT/grub.cfg": None, "vmlinuz": None, "initrd.img": None,
        "EFI/BOOT/BOOTAA64.EFI": uki}))
    all_pass(r)
    assert "PARTUUID" in r["root.found"].detail
    assert "UKI .uname" in r["boot.modules"].detail


def test_kernel_mounts_partuuid_root_without_an_init(tmp_path):
    """No /init in the initramfs: the kernel mounts root=PARTUUID= by itself, but root=UUID=
    needs userspace to find the file system."""
    initrd = g.make_initramfs(g.initramfs_files(init=False))
    r = check(tmp_path, g.ImageSpec(root=ROOT, cmdline=f"root=PARTUUID={ROOT.part_uuid}",
                                    esp_files={"initrd.img": initrd}), "a.raw")
    assert r["boot.init"].result == "pass" and "the kernel mounts" in r["boot.init"].detail
    r = check(tmp_path, g.ImageSpec(root=ROOT, cmdline=g.root_cmdline(ROOT),
                                    esp_files={"initrd.img": initrd}), "b.raw")
    assert r["boot.init"].result == "fail" and "needs an initramfs" in r["boot.init"].detail
    assert all(r[c].result == "pass" for c in ROOT_IDS)


def test_rdinit_names_the_init(tmp_path):
    files = g.initramfs_files(init=False) + [("sbin/myinit", 0o100755, b"#!/bin/sh\n")]
    r = check(tmp_path, g.ImageSpec(cmdline="console=ttyAMA0 rdinit=/sbin/myinit",
                                    esp_files={"initrd.img": g.make_initramfs(files)}))
    assert r["boot.init"].result == "pass" and "/sbin/myinit" in r["boot.init"].detail
    files = g.initramfs_files(init=False) + [("init", 0o100644, b"#!/bin/sh\n")]
    r = check(tmp_path, g.ImageSpec(esp_files={"initrd.img": g.make_initramfs(files)}), "x.raw")
    assert r["boot.init"].result == "fail" and "not an executable" in r["boot.init"].detail


def test_ext2_and_merged_usr_free_roots(tmp_path):
    """An ext2 root with a plain /sbin/init (no symlinks) on a 4 KiB-block file system."""
    tree = {"sbin": ("dir",), "sbin/init": b"\x7fELF init\n", "usr/sbin/init": None,
            "lib": ("dir",), f"lib/modules/{g.KVER}/modules.order": b"",
            f"usr/lib/modules/{g.KVER}/modules.order": None}
    spec = g.RootSpec(tree=tree, mkfs_args=("-t", "ext2", "-b", "4096"))
    r = check(tmp_path, g.ImageSpec(root=spec, cmdline=g.root_cmdline(spec)))
    all_pass(r)
    assert r["root.fs"].detail.startswith("partition 2: ext2")
    assert r["root.init"].detail == f"partition 2: /sbin/init (10 bytes), /lib/modules/{g.KVER}"


def test_root_without_root_parameter_is_judged_by_type(tmp_path):
    r = check(tmp_path, g.ImageSpec(root=ROOT, cmdline="console=ttyAMA0"))
    assert r["root.type"].result == "pass" and "by its root type GUID" in r["root.type"].detail
    assert r["root.found"].result == "skip" and "no root=" in r["root.found"].detail
    assert r["root.found"].applicable                    # a root exists: strict counts it
    assert r["root.init"].result == "pass"


def test_banner_version_rules_vermagic_and_lib_modules(tmp_path):
    """The kernel's own 'Linux version' banner wins over the initramfs's tree name: modules
    built for another release and a root without its lib/modules/<release> both fail."""
    other = "6.1.0-98-other"
    banner = f"Linux version {other} (builder@host) (gcc) #1 SMP\n".encode()
    kernel = g.make_pe(0xAA64, 0x20B, 10, [(".data", banner * 4)],
                       patch=lambda img: img.__setitem__(slice(0x38, 0x3C), b"ARM\x64"))
    assert kernelimg.banner_version(BytesBlob(kernel)) == other
    r = check(tmp_path, g.ImageSpec(root=ROOT, cmdline=g.root_cmdline(ROOT),
                                    esp_files={"vmlinuz": kernel}))
    assert r["boot.kernel"].result == "pass"
    assert r["boot.modules"].result == "fail"
    assert f"the kernel is {other} (from the banner in /vmlinuz)" in r["boot.modules"].detail
    assert r["root.init"].result == "fail" and f"no /lib/modules/{other}" in \
        r["root.init"].detail


def test_kernel_too_old_for_a_feature(tmp_path):
    """large_dir needs Linux 4.13: a 4.9 kernel cannot mount such a root."""
    banner = b"Linux version 4.9.0-13-arm64 (x@y) (gcc) #1 SMP\n"
    kernel = g.make_pe(0xAA64, 0x20B, 10, [(".data", banner)],
                       patch=lambda img: img.__setitem__(slice(0x38, 0x3C), b"ARM\x64"))
    tree = {f"usr/lib/modules/4.9.0-13-arm64/modules.order": b""}
    spec = g.RootSpec(tree=tree, mkfs_args=("-t", "ext4", "-O", "large_dir"))
    initrd = g.make_initramfs(g.initramfs_files(ver="4.9.0-13-arm64"))
    r = check(tmp_path, g.ImageSpec(root=spec, cmdline=g.root_cmdline(spec), esp_files={
        "vmlinuz": kernel, "initrd.img": initrd}))
    assert r["root.fs"].result == "fail"
    assert "large_dir needs Linux 4.13, the kernel is 4.9.0-13-arm64" in r["root.fs"].detail
    assert r["boot.modules"].result == "pass" and r["root.init"].result == "pass"


def test_not_ext4_root(tmp_path):
    """A root partition holding something this verifier cannot read fails root.fs and skips
    root.init; the command line still has to name it."""
    def zap(p):
        g.write_at(p, 1024 + 0x38, b"\0\0")           # s_magic
    spec = g.RootSpec(patch=zap)
    r = check(tmp_path, g.ImageSpec(root=spec, cmdline=f"root=PARTUUID={spec.part_uuid}"))
    assert r["root.fs"].result == "fail" and "s_magic" in r["root.fs"].detail
    assert r["root.init"].result == "skip"
    assert r["root.found"].result == "pass" and r["root.type"].result == "pass"


def test_grub_cmdline_expands_top_level_variables(tmp_path):
    cfg = (f"set rootuuid={ROOT.fs_uuid}\nset timeout=0\nmenuentry 'other' {{\n linux /vmlinuz "
           "root=/dev/sda1\n initrd /initrd.img\n}\nmenuentry 'test' {\n linux /vmlinuz "
           "console=ttyAMA0 root=UUID=$rootuuid ro\n initrd /initrd.img\n}\nset default=1\n")
    r = check(tmp_path, g.ImageSpec(root=ROOT, esp_files={"EFI/BOOT/grub.cfg": cfg.encode()}))
    assert r["root.found"].result == "pass", r["root.found"].detail


def test_cmdline_parsing_follows_the_kernel():
    assert cmdline_args('a "b c" d=" e" -- root=/dev/x') == ["a", "b c", "d= e"]
    assert param("root=/dev/a ro root=UUID=x", "root") == "UUID=x"     # last one wins
    assert param("rootwait", "root") is None and param(None, "root") is None


def test_ext4_superblock_re_signed_by_the_test_helper(tmp_path):
    """The broken corpus edits superblock fields with a test-side CRC-32C; e2fsprogs must
    accept the result (dumpe2fs reads the primary superblock only)."""
    import subprocess
    img = g.make_root_fs(tmp_path / "fs.img", g.RootSpec())
    g.ext4_set_super(img, 0x78, "16s", b"relabelled")         # s_volume_name
    out = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True)
    assert out.returncode == 0 and "relabelled" in out.stdout
    assert struct.unpack("<H", g.read_at(img, 1024 + 0x38, 2))[0] == 0xEF53


HANG_SECONDS = 30


@pytest.fixture(scope="module")
def root_target(tmp_path_factory):
    from builder.verify import ext4
    from builder.verify.blob import FileBlob
    d = tmp_path_factory.mktemp("rootfuzz")
    img = g.build_image(d, g.ImageSpec(root=ROOT, cmdline=g.root_cmdline(ROOT)), "fuzz.raw")
    base = (1 + g.ImageSpec().esp_mib) * g.MIB
    with open(img, "rb") as f:
        fs = ext4.Ext4(FileBlob(f, base, ROOT.size_mib * g.MIB))
        regions = [(base + 1024, base + 1024 + 0x180),
                   (base + fs._desc_location(0), base + fs._desc_location(0) + fs.desc_size)]
        for path in ("/", "/sbin", "/usr", "/usr/sbin", "/usr/sbin/init", "/usr/lib",
                     "/usr/lib/systemd", "/usr/lib/systemd/systemd", "/usr/lib/modules"):
            node = fs.lookup(path, follow=False)
            grp, idx = divmod(node.ino - 1, fs.sb["s_inodes_per_group"])
            at = base + fs.group_desc(grp)["inode_table"] * fs.block_size + idx * fs.inode_size
            regions.append((at, at + fs.inode_size))
            for _, phys, _, _ in fs.runs(node)[:1]:
                regions.append((base + phys * fs.block_size,
                                base + (phys + 1) * fs.block_size))
    return img, regions


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGALRM"), reason="needs SIGALRM")
def test_damaged_root_partition_never_crashes_verify(root_target):
    """Random damage to the root partition's metadata: verify never raises (verifier bugs
    are raised here, _RAISE_INTERNAL) nor hangs; root.* say fail/skip/pass with details."""
    import os
    import signal
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    img, regions = root_target
    mutation = st.tuples(st.integers(0, len(regions) - 1), st.integers(0, 2 ** 32),
                         st.sampled_from(["bytes", "xor", "ff", "zero"]),
                         st.binary(min_size=1, max_size=8))

    def on_alarm(signum, frame):
        raise TimeoutError(f"verify_image ran longer than {HANG_SECONDS} s")

    @settings(max_examples=60, deadline=None, database=None,
              derandomize=not os.environ.get("ARMVM_FUZZ_RANDOM"),
              suppress_health_check=list(HealthCheck))
    @given(muts=st.lists(mutation, min_size=1, max_size=6))
    def run(muts):
        saved = []
        try:
            for region, pos, kind, data in muts:
                lo, hi = regions[region]
                off = lo + pos % max(1, hi - lo - len(data))
                orig = g.read_at(img, off, len(data))
                saved.append((off, orig))
                new = {"bytes": data, "xor": bytes(a ^ (b or 1) for a, b in zip(orig, data)),
                       "ff": b"\xff" * len(orig), "zero": bytes(len(orig))}[kind]
                g.write_at(img, off, new[:len(orig)])
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(HANG_SECONDS)
            try:
                r = verify.verify_image(img).by_id()
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            assert all(r[c].detail for c in ROOT_IDS)
            assert all(r[c].result in ("pass", "fail", "skip") for c in ROOT_IDS)
        finally:
            for off, orig in reversed(saved):
                g.write_at(img, off, orig)

    run()


def grub_install_layout(kernel_path: str = f"/boot/vmlinuz-{g.KVER}") -> g.ImageSpec:
    """What grub-install + update-grub leave: a stub on the ESP that finds the root file
    system by UUID and hands over to /boot/grub/grub.cfg there; kernel and initrd in /boot."""
    stub = (f"search.fs_uuid {ROOT.fs_uuid} root hd0,gpt2\nset prefix=($root)'/boot/grub'\n"
            "configfile $prefix/grub.cfg\n").encode()
    cfg = (f"search --no-floppy --fs-uuid --set=root {ROOT.fs_uuid}\nset default=0\n"
           f"menuentry 'Debian GNU/Linux' {{\n  linux {kernel_path} root=UUID={ROOT.fs_uuid} "
           f"ro console=ttyAMA0\n  initrd /boot/initrd.img-{g.KVER}\n}}\n").encode()
    tree = {"boot/grub/grub.cfg": cfg, f"boot/vmlinuz-{g.KVER}": g.make_kernel("aarch64"),
            f"boot/initrd.img-{g.KVER}": g.make_initramfs()}
    return g.ImageSpec(root=g.RootSpec(tree=tree), esp_files={
        "EFI/BOOT/grub.cfg": stub, "vmlinuz": None, "initrd.img": None})


def test_grub_install_layout_is_followed_onto_the_root(tmp_path):
    r = check(tmp_path, grub_install_layout())
    all_pass(r)
    assert "continues on partition 2 (ext4) with /boot/grub/grub.cfg" in r["boot.chain"].detail
    assert f"/boot/vmlinuz-{g.KVER}" in r["boot.chain"].detail
    assert "AArch64 Image" in r["boot.kernel"].detail
    assert "net_failover" in r["os.virtio"].detail                 # the initrd read from ext4
    assert f"from the kernel's file name /boot/vmlinuz-{g.KVER}" in r["boot.modules"].detail
    assert f"root=UUID={ROOT.fs_uuid} is partition 2" in r["root.found"].detail


def test_grub_install_layout_missing_kernel_fails_the_chain(tmp_path):
    r = check(tmp_path, grub_install_layout("/boot/vmlinuz-9.9.9"))
    assert r["boot.chain"].result == "fail"
    assert "/boot/vmlinuz-9.9.9 does not exist on partition 2" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "skip" and r["boot.init"].result == "skip"
    assert r["root.found"].result == "pass"            # the command line is still known


def test_ext4_file_blob_reads_ranges_like_the_whole_file(tmp_path):
    import os
    from builder.verify import ext4
    from builder.verify.blob import FileBlob
    data = os.urandom(300 * 1024 + 5)
    spec = g.RootSpec(tree={"big": data, "tiny": b"abc"}, mkfs_args=("-t", "ext4", "-O",
                                                                     "inline_data"))
    img = g.make_root_fs(tmp_path / "fs.img", spec)
    with open(img, "rb") as f:
        fs = ext4.Ext4(FileBlob(f))
        blob = ext4.Ext4File(fs, fs.lookup("/big"))
        for off, n in ((0, 10), (1000, 5000), (4095, 2), (len(data) - 3, 100), (0, len(data))):
            assert blob.read_at(off, n) == data[off:off + n]
        assert b"".join(blob.chunks(chunk=7777)) == data
        assert ext4.Ext4File(fs, fs.lookup("/tiny")).read_at(1, 10) == b"bc"


def _modular_ext4(with_crc32c: bool) -> bytes:
    cfg = g.GOOD_CONFIG.replace("CONFIG_EXT4_FS=y", "CONFIG_EXT4_FS=m\nCONFIG_CRYPTO_CRC32C=m")
    mods = dict(g.GOOD_MODULES, jbd2=[], mbcache=[], ext4=["jbd2", "mbcache"])
    load = g.GOOD_LOAD + ["jbd2", "mbcache", "ext4"]
    if with_crc32c:
        mods["crc32c_generic"] = []
        load = ["crc32c_generic"] + load
    return g.make_initramfs(g.initramfs_files(config=cfg, modules=mods, load=load))


def test_modular_ext4_needs_crc32c_for_metadata_csum(tmp_path):
    """FIELD-NOTES: on armmp-lpae ext4 is a module whose crc32c need is a softdep."""
    spec = g.ImageSpec(root=ROOT, cmdline=g.root_cmdline(ROOT),
                       esp_files={"initrd.img": _modular_ext4(True)})
    r = check(tmp_path, spec, "good.raw")
    all_pass(r)
    assert "EXT4_FS=m, module ext4 with" in r["root.fs"].detail
    spec.esp_files = {"initrd.img": _modular_ext4(False)}
    r = check(tmp_path, spec, "bad.raw")
    assert r["root.fs"].result == "fail"
    assert "no crc32c module is in the initramfs" in r["root.fs"].detail
    assert [c for c, v in r.items() if v.result != "pass"] == ["root.fs"]


@pytest.mark.parametrize("guid, result", [(g.ROOT_ARM64_GUID, "fail"),
                                          ("69DAD710-2CE4-4E3C-B16C-21A1D49ABED3", "pass")])
def test_armv7_root_type(tmp_path, guid, result):
    spec = g.RootSpec(type_guid=guid)
    r = check(tmp_path, g.ImageSpec(arch="armv7", root=spec, cmdline=g.root_cmdline(spec)))
    assert r["root.type"].result == result
    if result == "fail":
        assert "armv7 needs 69dad710-2ce4-4e3c-b16c-21a1d49abed3" in r["root.type"].detail
    assert all(r[c].result == "pass" for c in ROOT_IDS if c != "root.type")
