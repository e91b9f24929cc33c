"""The broken-image corpus: each image breaks ONE requirement of a good image and must fail
exactly that check; every other check keeps the good image's result, except checks that
need the broken part as input, which must say 'skip' (never pass, never a second fail)."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")
ROOT_IDS = ("root.type", "root.fs", "root.found", "root.init")
OS_IDS = ("os.console.pl011", "os.gic", "os.rtc-efi", "os.console.virtio", "os.console.xen",
          "os.virtio", "os.xen-pv", "os.acpi", "os.psci")
GRUB_CFG = "EFI/BOOT/grub.cfg"


@pytest.fixture(autouse=True)
def _raise_internal(monkeypatch):
    monkeypatch.setattr(verify, "_RAISE_INTERNAL", True)


def uki_files(**kw):
    return {GRUB_CFG: None, "vmlinuz": None, "initrd.img": None,
            "EFI/BOOT/BOOTAA64.EFI": g.make_uki("aarch64", g.make_initramfs(), **kw)}


def bpb(path):
    """(offset of the ESP, bytes/sector, reserved sectors, FAT size in sectors) -- test-side."""
    off = g.MIB
    boot = g.read_at(path, off, 64)
    bps, rsvd = struct.unpack_from("<H", boot, 11)[0], struct.unpack_from("<H", boot, 14)[0]
    fatsz = struct.unpack_from("<H", boot, 22)[0] or struct.unpack_from("<I", boot, 36)[0]
    return off, bps, rsvd, fatsz


def zero_backup(p):
    size = p.stat().st_size
    g.write_at(p, size - 33 * 512, bytes(33 * 512))


def bad_header_crc(p):
    crc = g.read_at(p, 512 + 16, 4)
    g.write_at(p, 512 + 16, bytes([crc[0] ^ 0xFF]) + crc[1:])


def bad_array_crc(p):
    g.gpt_rewrite(p, edit_header=lambda h, c: struct.pack_into("<I", h, 88, 0xDEADBEEF),
                  copies=("primary",))


def overlap(p):
    def edit(array, esize):      # partition 2 starts at 36 MiB, inside the ESP (1..37 MiB)
        struct.pack_into("<Q", array, esize + 32, 36 * 2048)
    g.gpt_rewrite(p, edit_entries=edit)


def misalign(p):
    def edit(array, esize):
        first = struct.unpack_from("<Q", array, esize + 32)[0]
        struct.pack_into("<Q", array, esize + 32, first + 1)
    g.gpt_rewrite(p, edit_entries=edit)


def pmbr_type(p):
    g.write_at(p, 446 + 4, b"\x83")


def fat32_label_on_fat16(p):
    g.write_at(p, g.MIB + 54, b"FAT32   ")


def fat_copies_differ(p):
    off, bps, rsvd, fatsz = bpb(p)
    g.write_at(p, off + (rsvd + fatsz) * bps + 4000, b"\x07\x00\x00\x00")


def backup_boot_differs(p):
    off, bps, _, _ = bpb(p)
    g.write_at(p, off + 6 * bps + 3, b"NOTMKFS!")


def config(text_from, text_to, builtin=None):
    return g.make_initramfs(g.initramfs_files(config=g.GOOD_CONFIG.replace(text_from, text_to),
                                              builtin=builtin))


def unknown_incompat(fs_img):
    incompat = struct.unpack("<I", g.read_at(fs_img, 1024 + 0x60, 4))[0]
    g.ext4_set_super(fs_img, 0x60, "I", incompat | 0x80000000)


ROOT = g.RootSpec()
ROOT_CMD = g.root_cmdline(ROOT)
OTHER_UUID = "0badc0de-0000-4000-8000-000000000000"


def root_image(cmdline: str = ROOT_CMD, **kw) -> g.ImageSpec:
    return g.ImageSpec(root=g.RootSpec(**kw), cmdline=cmdline)


NO_FAILOVER = dict((k, v) for k, v in g.GOOD_MODULES.items() if k != "failover")
LOAD_NO_FAILOVER = [m for m in g.GOOD_LOAD if m != "failover"]
LOAD_NET_FIRST = ["virtio_net"] + [m for m in g.GOOD_LOAD if m != "virtio_net"]

# name: (base, image spec, patch, failing check, checks that must become 'skip')
CASES = {
    "wrong-esp-type": ("aarch64", g.ImageSpec(esp_type="EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
                       None, "esp.type", ()),
    "fat16-esp": ("aarch64", g.ImageSpec(fat_bits=16), None, "esp.fat32", ()),
    "fat32-label-on-fat16": ("aarch64", g.ImageSpec(fat_bits=16), fat32_label_on_fat16,
                             "esp.fat32", ()),
    "no-backup-gpt": ("aarch64", g.ImageSpec(), zero_backup, "gpt.backup", ()),
    "bad-header-crc": ("aarch64", g.ImageSpec(), bad_header_crc, "gpt.primary", ()),
    "bad-entry-array-crc": ("aarch64", g.ImageSpec(), bad_array_crc, "gpt.primary", ()),
    "overlapping-partitions": ("aarch64", g.ImageSpec(), overlap, "gpt.partitions", ()),
    "x86-64-loader": ("aarch64", g.ImageSpec(esp_files={
        "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", machine=0x8664)}), None, "boot.pe",
        ()),
    "armnt-loader": ("armv7", g.ImageSpec(arch="armv7", esp_files={
        "EFI/BOOT/BOOTARM.EFI": g.make_loader("armv7", machine=0x01C4)}), None, "boot.pe", ()),
    "driver-subsystem": ("aarch64", g.ImageSpec(esp_files={
        "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", subsystem=11)}), None, "boot.pe", ()),
    "grub-cfg-missing-kernel": ("aarch64", g.ImageSpec(esp_files={
        GRUB_CFG: b"menuentry x {\n linux /vmlinuz-6.1 ro\n initrd /initrd.img\n}\n"}), None,
        "boot.chain", ("boot.kernel", "boot.init")),
    # without .linux it is no UKI: an unknown loader, so the initramfs is not followed either
    "uki-without-linux": ("uki", g.ImageSpec(esp_files=uki_files(drop=(".linux",))), None,
                          "boot.chain", ("boot.kernel", "boot.init", "boot.modules") + OS_IDS),
    # net_failover's depends= names the missing module: both checks see it
    "initramfs-missing-failover": ("aarch64", g.ImageSpec(esp_files={
        "initrd.img": g.make_initramfs(g.initramfs_files(modules=NO_FAILOVER,
                                                         load=LOAD_NO_FAILOVER))}),
        None, ("os.virtio", "boot.modules"), ()),
    "firmware-in-esp": ("aarch64", g.ImageSpec(esp_files={"QEMU_EFI.fd": b"\xff" * 4096}),
                        None, "boot.no-nvram", ()),
    # more than the brief's list
    "grub-relative-kernel-path": ("aarch64", g.ImageSpec(esp_files={
        GRUB_CFG: b"linux vmlinuz\ninitrd /initrd.img\nboot\n"}), None, "boot.chain",
        ("boot.kernel", "boot.init")),
    "aavmf-in-subdir": ("aarch64", g.ImageSpec(esp_files={
        "EFI/firmware/aavmf_code.img": b"\0" * 100}), None, "boot.no-nvram", ()),
    "pmbr-not-protective": ("aarch64", g.ImageSpec(), pmbr_type, "gpt.pmbr", ()),
    "misaligned-partition": ("aarch64", g.ImageSpec(), misalign, "gpt.alignment", ()),
    "fat-copies-differ": ("aarch64", g.ImageSpec(), fat_copies_differ, "esp.fat-sane", ()),
    "backup-boot-sector-differs": ("aarch64", g.ImageSpec(), backup_boot_differs,
                                   "esp.fat-sane", ()),
    "wrong-arch-kernel": ("aarch64", g.ImageSpec(esp_files={"vmlinuz": g.make_kernel("armv7")}),
                          None, "boot.kernel", ()),
    "plain-image-without-efi-stub": ("aarch64", g.ImageSpec(esp_files={
        "vmlinuz": b"\0" * 0x38 + b"ARM\x64" + b"\0" * 4000}), None, "boot.kernel", ()),
    "host-arch-loader-name": ("aarch64", g.ImageSpec(esp_files={
        "EFI/BOOT/BOOTAA64.EFI": None, "EFI/BOOT/BOOTX64.EFI": g.make_loader("aarch64")}),
        None, "boot.path", ("boot.pe", "boot.chain", "boot.kernel", "boot.init",
                            "boot.modules") + OS_IDS),
    "pl011-as-module": ("aarch64", g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_SERIAL_AMBA_PL011=y", "CONFIG_SERIAL_AMBA_PL011=m", builtin="")}), None,
        "os.console.pl011", ()),
    "no-gicv3": ("aarch64", g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_ARM_GIC_V3=y", "# CONFIG_ARM_GIC_V3 is not set")}), None, "os.gic", ()),
    "no-rtc-efi": ("aarch64", g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_RTC_DRV_EFI=y", "", builtin="")}), None, "os.rtc-efi", ()),
    "no-psci": ("aarch64", g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_ARM_PSCI_FW=y", "")}), None, "os.psci", ()),
    "no-acpi": ("aarch64", g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_ACPI=y", "")}), None, "os.acpi", ()),
    "no-xen-console": ("aarch64", g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_HVC_XEN_FRONTEND=y", "")}), None, "os.console.xen", ()),
    "virtio-net-loaded-before-its-deps": ("aarch64", g.ImageSpec(esp_files={
        "initrd.img": g.make_initramfs(g.initramfs_files(load=LOAD_NET_FIRST))}), None,
        "os.virtio", ()),
    "xen-netfront-not-in-initramfs": ("aarch64", g.ImageSpec(esp_files={
        "initrd.img": g.make_initramfs(g.initramfs_files(modules={
            k: v for k, v in g.GOOD_MODULES.items() if k != "xen-netfront"}))}), None,
        "os.xen-pv", ()),
    # userspace and the root file system
    "no-init-and-no-root": ("aarch64", g.ImageSpec(esp_files={
        "initrd.img": g.make_initramfs(g.initramfs_files(init=False))}), None, "boot.init", ()),
    "module-wrong-vermagic": ("aarch64", g.ImageSpec(esp_files={
        "initrd.img": g.make_initramfs(g.initramfs_files(
            vermagic={"virtio_balloon": "5.10.0-99-other"}))}), None, "boot.modules", ()),
    "module-dependency-missing": ("aarch64", g.ImageSpec(esp_files={
        "initrd.img": g.make_initramfs(g.initramfs_files(
            modules=dict(g.GOOD_MODULES, extra_mod=["missing_dep"])))}), None, "boot.modules",
        ()),
    "root-wrong-type-guid": ("root", root_image(type_guid=g.LINUX_DATA_GUID), None,
                             "root.type", ()),
    "root-x86-64-type-guid": ("root", root_image(type_guid="4F68BCE3-E8CD-4DB1-96E7-"
                                                           "FBCAF984B709"), None, "root.type", ()),
    "root-device-name": ("root", root_image("console=ttyAMA0 root=/dev/vda2 ro"), None,
                         "root.found", ()),
    "root-uuid-not-on-disk": ("root", root_image(f"console=ttyAMA0 root=UUID={OTHER_UUID}"),
                              None, "root.found", ()),
    "root-partuuid-not-on-disk": ("root", root_image(f"root=PARTUUID={OTHER_UUID}"), None,
                                  "root.found", ()),
    "root-no-sbin-init": ("root", root_image(tree={"usr/sbin/init": None}), None,
                          "root.init", ()),
    "root-init-dangling": ("root", root_image(tree={"usr/lib/systemd/systemd": None}), None,
                           "root.init", ()),
    "root-no-lib-modules": ("root", root_image(tree={
        f"usr/lib/modules/{g.KVER}/modules.order": None}), None, "root.init", ()),
    "root-unknown-incompat-feature": ("root", root_image(patch=unknown_incompat), None,
                                      "root.fs", ()),
    "root-ext4-module-not-in-initramfs": ("root", g.ImageSpec(
        root=g.RootSpec(), cmdline=ROOT_CMD, esp_files={"initrd.img": config(
            "CONFIG_EXT4_FS=y", "CONFIG_EXT4_FS=m")}), None, "root.fs", ()),
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    specs = {"aarch64": g.ImageSpec(), "armv7": g.ImageSpec(arch="armv7"),
             "uki": g.ImageSpec(esp_files=uki_files()), "root": root_image()}
    out = {}
    for name, s in specs.items():
        r = verify.verify_image(g.build_image(d, s, name + ".raw"))
        skipped = () if name == "root" else ROOT_IDS      # no root partition: nothing to judge
        assert all(c.result == ("skip" if c.id in skipped else "pass") for c in r.checks), \
            [(c.id, c.result, c.detail) for c in r.checks if c.result != "pass"]
        out[name] = {c.id: c.result for c in r.checks}
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_image_fails_exactly_its_check(baseline, tmp_path, case):
    base, spec, patch, target, dependents = CASES[case]
    targets = (target,) if isinstance(target, str) else target
    img = g.build_image(tmp_path, spec)
    if patch:
        patch(img)
    r = verify.verify_image(img)
    got = {c.id: c for c in r.checks}
    levels = {got[t].level for t in targets}
    for t in targets:
        assert got[t].result == ("fail" if got[t].level == "MUST" else "warn"), \
            (t, got[t].detail)
        assert got[t].detail
    for cid, good in baseline[base].items():
        if cid in targets:
            continue
        want = "skip" if cid in dependents else good
        assert got[cid].result == want, (cid, got[cid].result, got[cid].detail)
    assert r.exit_code() == (1 if "MUST" in levels else 0)
    assert r.exit_code(strict=True) == 1
    assert all(c.applicable == (c.id not in ROOT_IDS or base == "root") for c in r.checks)


def test_broken_details_explain(tmp_path):
    """Spot-check that the failure says what is wrong, in the spec's terms."""
    cases = {"fat32-label-on-fat16": ("esp.fat32", "informational"),
             "armnt-loader": ("boot.pe", "ARMNT"),
             "driver-subsystem": ("boot.pe", "subsystem 11"),
             "initramfs-missing-failover": ("os.virtio", "failover"),
             "grub-cfg-missing-kernel": ("boot.chain", "/vmlinuz-6.1"),
             "host-arch-loader-name": ("boot.path", "BOOTX64.EFI"),
             "overlapping-partitions": ("gpt.partitions", "overlap"),
             "bad-entry-array-crc": ("gpt.primary", "PartitionEntryArrayCRC32"),
             "no-init-and-no-root": ("boot.init", "no root="),
             "module-wrong-vermagic": ("boot.modules", "vermagic 5.10.0-99-other"),
             "module-dependency-missing": ("boot.modules", "extra_mod depends on missing_dep"),
             "root-wrong-type-guid": ("root.type", "b921b045-1df0-41c3-af44-4c6f280d3fae"),
             "root-device-name": ("root.found", "root=/dev/vda2 names a device, not "
                                                "UUID=/PARTUUID="),
             "root-uuid-not-on-disk": ("root.found", f"no file system with UUID {OTHER_UUID} "
                                                     f"on this disk (found: "),
             "root-no-sbin-init": ("root.init", "/sbin/init does not exist"),
             "root-init-dangling": ("root.init", "/sbin/init -> ../lib/systemd/systemd does "
                                                 "not resolve"),
             "root-no-lib-modules": ("root.init", f"no /lib/modules/{g.KVER}"),
             "root-unknown-incompat-feature": ("root.fs", "feature 0x80000000"),
             "root-ext4-module-not-in-initramfs": ("root.fs", "EXT4_FS=m but module ext4")}
    for case, (cid, text) in cases.items():
        _, spec, patch, _, _ = CASES[case]
        img = g.build_image(tmp_path, spec, case + ".raw")
        if patch:
            patch(img)
        detail = verify.verify_image(img).by_id()[cid].detail
        assert text in detail, (case, detail)


def test_missing_virtio_console_depends_on_profile(baseline, tmp_path):
    """VIRTIO_CONSOLE is needed by os.console.virtio and by os.virtio (which lists all virtio
    devices), so both report it: a warning under v2.0, a MUST failure under RFC v2 / v1.0."""
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={"initrd.img": config(
        "CONFIG_VIRTIO_CONSOLE=y", "")}))
    for profile, result in (("vmspec-2.0", "warn"), ("rfc-v2", "fail"), ("vmspec-1.0", "fail")):
        r = verify.verify_image(img, profile=profile)
        got = {c.id: c.result for c in r.checks}
        assert got["os.console.virtio"] == result
        assert got["os.virtio"] == "warn"
        assert {k for k, v in got.items() if v != "pass" and k not in ROOT_IDS} == \
            {"os.console.virtio", "os.virtio"}
        assert r.exit_code() == (1 if result == "fail" else 0)
