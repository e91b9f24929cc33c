"""Constants from the specifications, shared by writers and readers.

Only numbers and names the specs define live here (UEFI GPT chapter, Microsoft FAT
specification fatgen103, PE/COFF, Linux boot protocols, Discoverable Partitions
Specification) plus this project's own published contracts (ESP layout, initramfs
layout, runtime report). No logic: readers must not reuse writer code paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

# --- GPT (UEFI spec, chapter 5) -------------------------------------------------------
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
GPT_HEADER_SIZE = 92
GPT_ENTRY_SIZE = 128
GPT_ENTRY_COUNT = 128          # 128 x 128 = 16 KiB of entry array
GPT_ENTRY_ARRAY_MIN_BYTES = 16384
PMBR_OS_TYPE = 0xEE
MBR_SIGNATURE = b"\x55\xaa"
SECTOR_SIZES = (512, 4096)
ALIGNMENT_BYTES = 1024 * 1024

ESP_TYPE_GUID = UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
# Discoverable Partitions Specification (uapi-group)
ROOT_AARCH64_TYPE_GUID = UUID("b921b045-1df0-41c3-af44-4c6f280d3fae")
ROOT_ARM_TYPE_GUID = UUID("69dad710-2ce4-4e3c-b16c-21a1d49abed3")
ROOT_X86_TYPE_GUID = UUID("44479540-f297-41b2-9af7-d131d5f0458a")
ROOT_X86_64_TYPE_GUID = UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
USR_AARCH64_TYPE_GUID = UUID("b0e01050-ee5f-4390-949a-9101b17104e9")
USR_ARM_TYPE_GUID = UUID("7d0359a3-02b3-4f0a-865c-654403e70625")
XBOOTLDR_TYPE_GUID = UUID("bc13c2ff-59e6-4262-a352-b275fd6f7172")
LINUX_DATA_TYPE_GUID = UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")

# --- FAT (fatgen103) -------------------------------------------------------------------
FAT12_MAX_CLUSTERS = 4085      # cluster count < 4085  -> FAT12
FAT16_MAX_CLUSTERS = 65525     # cluster count < 65525 -> FAT16, else FAT32
FAT_BYTES_PER_SECTOR = (512, 1024, 2048, 4096)
FAT_MEDIA_BYTES = (0xF0, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF)
FSINFO_LEAD_SIG = 0x41615252
FSINFO_STRUC_SIG = 0x61417272
FSINFO_TRAIL_SIG = 0xAA550000
FAT32_BACKUP_BOOT_SECTOR = 6
FAT32_FSINFO_SECTOR = 1
FAT32_EOC = 0x0FFFFFF8         # >= this is end of chain
FAT32_BAD = 0x0FFFFFF7
FAT_ATTR_READ_ONLY, FAT_ATTR_HIDDEN, FAT_ATTR_SYSTEM = 0x01, 0x02, 0x04
FAT_ATTR_VOLUME_ID, FAT_ATTR_DIRECTORY, FAT_ATTR_ARCHIVE = 0x08, 0x10, 0x20
FAT_ATTR_LONG_NAME = 0x0F
FAT_EPOCH_YEAR, FAT_LAST_YEAR = 1980, 2107

# --- PE/COFF ---------------------------------------------------------------------------
PE_MACHINE_ARM64 = 0xAA64
PE_MACHINE_ARM = 0x01C2        # ARM Thumb mixed: what UEFI loads on AArch32
PE_MACHINE_ARMNT = 0x01C4      # NOT loadable by UEFI firmware
PE_MACHINE_AMD64 = 0x8664
PE_MACHINE_I386 = 0x014C
PE32_MAGIC = 0x10B
PE32PLUS_MAGIC = 0x20B
PE_SUBSYSTEM_EFI_APPLICATION = 10
PE_SUBSYSTEM_EFI_DRIVERS = (11, 12, 13)
UKI_SECTIONS = (".linux", ".initrd", ".cmdline", ".osrel", ".uname")

# --- Linux kernel images -------------------------------------------------------------
ARM64_IMAGE_MAGIC = b"ARM\x64"     # at offset 0x38 of an AArch64 Image
ARM64_IMAGE_MAGIC_OFFSET = 0x38
ZBOOT_MAGIC = b"zimg"              # at offset 4 of an EFI zboot image
ZBOOT_MAGIC_OFFSET = 4
ZIMAGE_MAGIC = 0x016F2818          # little-endian u32 at offset 0x24 of an AArch32 zImage
ZIMAGE_MAGIC_OFFSET = 0x24


@dataclass(frozen=True)
class Arch:
    name: str                  # recipe value
    removable_name: str        # \EFI\BOOT\<name>
    pe_machine: int
    pe_magic: int
    debian_arch: str
    grub_target: str
    systemd_stub: str          # file name in systemd-boot-efi
    qemu: str
    qemu_cpu: str
    firmware_code: str
    firmware_vars: str
    firmware_package: str
    root_type_guid: UUID
    usr_type_guid: UUID


ARCHES = {
    "aarch64": Arch("aarch64", "BOOTAA64.EFI", PE_MACHINE_ARM64, PE32PLUS_MAGIC, "arm64",
                    "arm64-efi", "linuxaa64.efi.stub", "qemu-system-aarch64", "cortex-a57",
                    "/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd",
                    "qemu-efi-aarch64", ROOT_AARCH64_TYPE_GUID, USR_AARCH64_TYPE_GUID),
    "armv7": Arch("armv7", "BOOTARM.EFI", PE_MACHINE_ARM, PE32_MAGIC, "armhf",
                  "arm-efi", "linuxarm.efi.stub", "qemu-system-arm", "cortex-a15",
                  "/usr/share/AAVMF/AAVMF32_CODE.fd", "/usr/share/AAVMF/AAVMF32_VARS.fd",
                  "qemu-efi-arm", ROOT_ARM_TYPE_GUID, USR_ARM_TYPE_GUID),
}
REMOVABLE_DIR = "EFI/BOOT"

# --- This project's published contracts (README documents them) ------------------------
# Where the kernel and initramfs live on the ESP (GRUB chain) and GRUB's config.
ESP_KERNEL_PATH = "vmlinuz"
ESP_INITRD_PATH = "initrd.img"
ESP_GRUB_CFG = "EFI/BOOT/grub.cfg"
# Inside our initramfs: the kernel's config and built-in lists, so verify can judge
# driver requirements from the image alone.
INITRD_MODULES_ROOT = "lib/modules"            # lib/modules/<version>/...
INITRD_KERNEL_CONFIG = "config"                # lib/modules/<version>/config
INITRD_LOAD_LIST = "etc/armvm/modules.load"    # module names in load order, one per line
# Runtime report printed by /init on the console.
REPORT_PREFIX = "ARMVM-REPORT"
BOOT_MARKER = "ARMVM-BOOT-COMPLETE"
# Default timestamp when neither SOURCE_DATE_EPOCH nor the recipe gives one: the FAT epoch.
DEFAULT_SOURCE_DATE_EPOCH = 315532800          # 1980-01-01T00:00:00Z
