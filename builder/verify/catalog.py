"""The checks ``verify`` knows: stable IDs, levels per profile, requirement text and sources.

IDs and levels follow REQUIREMENTS.md. Levels differ between profiles only for the virtio
and Xen PV consoles (MUST under the 2014 RFC v2 and v1.0, SHOULD under v2.0).
"""
from __future__ import annotations

from dataclasses import dataclass

from builder.errors import EXIT_USAGE, ArmvmError
from builder.verify.report import Check

PROFILES = ("vmspec-2.0", "vmspec-1.0", "rfc-v2")
DEFAULT_PROFILE = "vmspec-2.0"

SPEC_NAME = {
    "vmspec-2.0": "VM System Spec v2.0",
    "vmspec-1.0": "VM System Spec v1.0",
    "rfc-v2": "ARM VM System Spec RFC v2 (2014)",
}
# Section names of each specification version ({image}, {firmware}, {hw}, {images}).
SECTIONS = {
    "vmspec-2.0": {"image": "VM Image Format", "firmware": "Virtual Firmware",
                   "hw": "Hardware Description", "images": "VM Images",
                   "platform": "The VM Platform"},
    "vmspec-1.0": {"image": "VM Image Format", "firmware": "Virtual Firmware",
                   "hw": "Hardware Description", "images": "VM Images",
                   "platform": "VM Platform"},
    "rfc-v2": {"image": "Image format", "firmware": "Virtual Firmware",
               "hw": "Hardware Description", "images": "VM Platform",
               "platform": "VM Platform"},
}
GPT = "UEFI 2.6 §5.2.3, §5.3"
FATSPEC = "Microsoft FAT Specification (fatgen103)"


@dataclass(frozen=True)
class CheckDef:
    id: str
    level: str                  # level under vmspec-2.0
    requirement: str
    source: str                 # template: {spec} and section keys of SECTIONS
    must_under: tuple = ()      # profiles where a SHOULD becomes MUST

    def level_for(self, profile: str) -> str:
        return "MUST" if profile in self.must_under else self.level

    def source_for(self, profile: str) -> str:
        return self.source.format(spec=SPEC_NAME[profile], **SECTIONS[profile])


_OLD = ("vmspec-1.0", "rfc-v2")
_DEFS = [
    CheckDef("gpt.pmbr", "MUST", "Protective MBR at LBA 0: one 0xEE record from LBA 1 covering "
             "the disk (or 0xFFFFFFFF), other records zero, 0x55AA signature",
             "{spec}, {image}; UEFI 2.6 §5.2.3"),
    CheckDef("gpt.primary", "MUST", "Primary GPT header at LBA 1: signature, revision, header "
             "size, header and entry-array CRC32, MyLBA, >= 16 KiB entry array",
             "{spec}, {image}; UEFI 2.6 §5.3.2"),
    CheckDef("gpt.backup", "MUST", "Backup GPT header at the last LBA with valid CRCs, its entry "
             "array just before it and identical to the primary's",
             "{spec}, {image}; UEFI 2.6 §5.3.2"),
    CheckDef("gpt.partitions", "MUST", "Partitions within FirstUsableLBA..LastUsableLBA, not "
             "overlapping, with unique partition GUIDs", "{spec}, {image}; UEFI 2.6 §5.3.3"),
    CheckDef("gpt.alignment", "SHOULD", "Partitions start on 1 MiB boundaries",
             "UEFI 2.6 §5.3.1 (alignment to physical blocks); 1 MiB convention"),
    CheckDef("esp.type", "MUST", "Exactly one partition with the EFI System Partition type GUID "
             "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "{spec}, {image}; UEFI 2.6 §5.3.3"),
    CheckDef("esp.fat32", "MUST", "The ESP is FAT32 by cluster count (>= 65525) with a FAT32 BPB",
             "{spec}, {image}; UEFI 2.6 §12.3.1.1; " + FATSPEC),
    CheckDef("esp.fat-sane", "MUST", "FAT structures consistent: boot signature, sector size, "
             "media byte, FSInfo, backup boot sector, size within the partition, identical "
             "FATs, acyclic in-range cluster chains", FATSPEC + "; UEFI 2.6 §12.3.1.1"),
    CheckDef("boot.path", "MUST", "The loader is at the removable media path of the target "
             "architecture (\\EFI\\BOOT\\BOOTAA64.EFI or \\EFI\\BOOT\\BOOTARM.EFI)",
             "{spec}, {image}; UEFI 2.6 §3.5.1.1"),
    CheckDef("boot.pe", "MUST", "The loader is a PE/COFF EFI application for the target "
             "(AArch64: machine 0xAA64, PE32+; AArch32: machine 0x01C2, PE32; subsystem 10)",
             "{spec}, {image}; UEFI 2.6 §2.1.1, §2.3; Microsoft PE/COFF Specification"),
    CheckDef("boot.no-nvram", "MUST", "Boots from the removable path alone; no UEFI firmware "
             "binary (QEMU_EFI/AAVMF/OVMF .fd) shipped in the image",
             "{spec}, {firmware}; UEFI 2.6 §3.5.1.1"),
    CheckDef("boot.chain", "MUST", "Everything the loader needs is present (GRUB: grub.cfg where "
             "the binary reads it -- beside its image, then $prefix/grub.cfg from its mods "
             "section -- and every kernel/initrd it names; systemd-boot: the files of the "
             "entry it boots by default; UKI: .linux, .initrd and .cmdline sections)",
             "{spec}, {image}; Boot Loader Specification (uapi-group)"),
    CheckDef("boot.kernel", "MUST", "The kernel is bootable by the chain (AArch64 Image 'ARM\\x64' "
             "at 0x38 or EFI zboot; AArch32 zImage 0x016F2818 at 0x24; EFI stub machine = target)",
             "{spec}, {hw}; Linux Documentation/arch/arm64/booting.rst, arch/arm/booting.rst"),
    CheckDef("boot.init", "MUST", "The chain can start userspace: the initramfs has an "
             "executable /init, or the command line names a root= that exists on this disk",
             "{spec}, {images}; Linux Documentation/admin-guide/initrd.rst, "
             "filesystems/ramfs-rootfs-initramfs.rst"),
    CheckDef("boot.modules", "MUST", "Modules in the initramfs match the kernel (vermagic) and "
             "their depends= are present or built in",
             "{spec}, {images}; Linux Documentation/kbuild/modules.rst"),
    CheckDef("os.console.pl011", "MUST", "Console driver for the SBSA UART and PL011 built in "
             "(SERIAL_AMBA_PL011, SERIAL_AMBA_PL011_CONSOLE)", "{spec}, {images}"),
    CheckDef("os.gic", "MUST", "GICv2 and GICv3 support (ARM_GIC, ARM_GIC_V3)",
             "{spec}, {images}"),
    CheckDef("os.rtc-efi", "MUST", "Uses the UEFI RTC API for real time (RTC_DRV_EFI)",
             "{spec}, {images}"),
    CheckDef("os.console.virtio", "SHOULD", "virtio-console support (VIRTIO_CONSOLE over "
             "VIRTIO_PCI or VIRTIO_MMIO)", "{spec}, {images}", _OLD),
    CheckDef("os.console.xen", "SHOULD", "Xen PV console support (HVC_XEN, HVC_XEN_FRONTEND)",
             "{spec}, {images}", _OLD),
    CheckDef("os.virtio", "SHOULD", "virtio over PCI and MMIO for block, network, console and "
             "balloon (VIRTIO_PCI, VIRTIO_MMIO, VIRTIO_BLK, VIRTIO_NET, VIRTIO_CONSOLE, "
             "VIRTIO_BALLOON)", "{spec}, {images}"),
    CheckDef("os.xen-pv", "SHOULD", "Xen PV block, network, console and balloon "
             "(XEN_BLKDEV_FRONTEND, XEN_NETDEV_FRONTEND, HVC_XEN, XEN_BALLOON)",
             "{spec}, {images}"),
    CheckDef("os.acpi", "SHOULD", "AArch64: can boot from ACPI as well as from a device tree "
             "(ACPI)", "VM System Spec v2.0, Hardware Description"),
    CheckDef("os.psci", "SHOULD", "PSCI for secondary CPUs, shutdown and reboot (ARM_PSCI_FW)",
             "VM System Spec v2.0, ARM Server Architecture (PSCI 0.2)"),
    CheckDef("root.type", "MUST", "When a root partition exists: it carries the Discoverable "
             "Partitions root type GUID of the target arch (AArch64 "
             "B921B045-1DF0-41C3-AF44-4C6F280D3FAE, ARM 69DAD710-2CE4-4E3C-B16C-21A1D49ABED3)",
             "Discoverable Partitions Specification (uapi-group); UEFI 2.6 §5.3.3"),
    CheckDef("root.fs", "MUST", "When a root partition exists: its file system's superblock is "
             "sane and uses only features the kernel supports",
             "Linux Documentation/filesystems/ext4/ (superblock, group descriptors)"),
    CheckDef("root.found", "MUST", "When a root partition exists: root=UUID=/PARTUUID= on the "
             "command line names a file system or partition on this disk, never a device name",
             "Linux Documentation/admin-guide/kernel-parameters.txt (root=)"),
    CheckDef("root.init", "MUST", "When a root partition exists: it has /sbin/init and "
             "lib/modules/<kernel version>", "{spec}, {images}; Linux "
             "Documentation/admin-guide/kernel-parameters.txt (init=)"),
    # Secure Boot: when the loader carries a signature, or with verify --secure-boot.
    CheckDef("sb.signed", "MUST", "With Secure Boot: every PE the firmware or shim verifies "
             "(loader; shim's grub<arch>.efi; the kernel GRUB or systemd-boot starts) carries an "
             "Authenticode certificate table (data directory 4, WIN_CERTIFICATE revision "
             "0x0200, type 2, 8-byte aligned)", "UEFI 2.6 §32.2.4, §32.5.3.3; Microsoft "
             "Authenticode PE Signature Format"),
    CheckDef("sb.digest", "MUST", "With Secure Boot: the recomputed Authenticode SHA-256 of "
             "each signed image equals the digest in its signature",
             "Microsoft Authenticode PE Signature Format (image hash); UEFI 2.6 §32.5.3.3"),
    CheckDef("sb.chain", "MUST", "With Secure Boot: each signer chains to a trusted cert (the "
             "loader to db: --db, --vars or Microsoft's UEFI CA 2011/2023 for shim; GRUB and "
             "the kernel to shim's .vendor_cert when shim is in the chain)",
             "UEFI 2.6 §32.5.3.3 (db, dbx); shim README (vendor_cert)"),
    CheckDef("sb.sbat", "SHOULD", "With Secure Boot and shim: .sbat present and parseable in "
             "shim and what it starts; its generations meet shim's .sbatlevel",
             "shim SBAT.md (UEFI Secure Boot Advanced Targeting)"),
    # Runtime: observed by booting the image under QEMU + AAVMF.
    CheckDef("rt.removable-boot", "MUST", "With an empty variable store the firmware loads the "
             "removable-path loader and it reaches the kernel",
             "{spec}, {firmware}; UEFI 2.6 §3.5.1.1"),
    CheckDef("rt.userspace", "MUST", "The guest reaches its init, reports the marker and powers "
             "off cleanly (PSCI)", "{spec}, {images}"),
    CheckDef("rt.gic", "MUST", "Boots with the GIC version the VM provides (gic-version=2 and 3)",
             "{spec}, {platform}"),
    CheckDef("rt.efi", "MUST", "The guest sees EFI (/sys/firmware/efi)", "{spec}, {firmware}"),
    CheckDef("rt.acpi", "SHOULD", "AArch64 with ACPI firmware tables: the guest boots with ACPI "
             "(/sys/firmware/acpi/tables)", "VM System Spec v2.0, Hardware Description"),
    CheckDef("rt.dt", "MUST", "Without ACPI (and on AArch32 always) the guest boots from the "
             "device tree (/sys/firmware/fdt)", "{spec}, {hw}"),
    CheckDef("rt.rtc", "MUST", "rtc-efi is registered", "{spec}, {images}"),
    CheckDef("rt.console", "MUST", "The console runs on a PL011/SBSA ttyAMA port",
             "{spec}, {images}"),
    CheckDef("rt.virtio", "SHOULD", "virtio block, network, console and balloon devices bound "
             "to drivers over virtio-pci and virtio-mmio", "{spec}, {images}"),
    CheckDef("rt.secureboot", "MUST", "With --secure-boot: the firmware enforces Secure Boot, "
             "accepts the signed chain and the guest reports SecureBoot=1 (efivarfs)",
             "UEFI 2.10 §32 (Secure Boot and Driver Signing), §3.3 (SecureBoot variable)"),
    # Xen: observed by booting the image as a Xen DomU (`boot --xen`; builder/run/xen.py).
    CheckDef("rt.xen-boot", "MUST", "The image's kernel and initramfs boot as a Xen DomU "
             "(hypervisor=xen) and reach the marker", "{spec}, {images}"),
    CheckDef("rt.xen-console", "SHOULD", "Under Xen the console runs on the Xen PV console "
             "(hvc0)", "{spec}, {images}", must_under=_OLD),
    CheckDef("rt.xen-block", "MUST", "Under Xen the disk is bound by xen-blkfront",
             "{spec}, {images}"),
    CheckDef("rt.xen-net", "SHOULD", "Under Xen the network device (vif) is bound by "
             "xen-netfront", "{spec}, {images}"),
]
CHECKS = {d.id: d for d in _DEFS}
STATIC_IDS = tuple(d.id for d in _DEFS if not d.id.startswith(("rt.", "sb.")))
# Secure Boot: reported when the loader is signed or verify is asked (--secure-boot)
SB_IDS = tuple(d.id for d in _DEFS if d.id.startswith("sb."))
# Xen: joined to the runtime checks by boot --xen only
XEN_IDS = tuple(d.id for d in _DEFS if d.id.startswith("rt.xen-"))
RUNTIME_IDS = tuple(d.id for d in _DEFS if d.id.startswith("rt.") and d.id not in XEN_IDS)


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ArmvmError(f"verify: profile '{profile}' is not known "
                         f"(allowed: {', '.join(PROFILES)})", exit_code=EXIT_USAGE)
    return profile


def make_check(check_id: str, profile: str, result: str, detail: str,
               applicable: bool = True) -> Check:
    """Build a Check; a SHOULD that fails becomes 'warn'."""
    d = CHECKS[check_id]
    level = d.level_for(profile)
    if result == "fail" and level == "SHOULD":
        result = "warn"
    return Check(check_id, level, d.requirement, d.source_for(profile), result, detail,
                 applicable if result == "skip" else True)
