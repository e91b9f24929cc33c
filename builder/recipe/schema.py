"""The recipe schema: one declarative table that drives validation, `armvm-build schema`
(JSON Schema for editors) and the README's recipe reference.

Custom keywords (ignored by editors, used by our validator):
  x-kind: "size"   a size such as 512MiB, 1GiB, 4096 or 1.5GB
          "source" one of {file}, {url, sha256}, {package, path}
          "dest"   a path on the FAT volume (relative, no '..', FAT-storable)
          "path"   a host path relative to the recipe file, staying inside its folder
"""
from __future__ import annotations

MAX_DISK_BYTES = 16 * 1024 ** 4          # 16 TiB: sparse, but bounded before allocating
MAX_PARTITIONS = 128                     # the GPT entry array we write
MAX_FILES = 10000                        # files per partition
MAX_DRIVERS = 512
MAX_ROOT_PACKAGES = 1000

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

SOURCE_PROPS = {
    "file": {"type": "string", "x-kind": "path",
             "description": "A file relative to the recipe, inside its folder."},
    "url": {"type": "string", "pattern": r"^https?://",
            "description": "An HTTP(S) URL; needs sha256."},
    "sha256": {"type": "string", "pattern": SHA256_PATTERN,
               "description": "Lower-case hex sha256 of the URL's content (mandatory with url)."},
    "package": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9.+-]+$",
                "description": "A Debian package from the recipe's `debian` archive."},
    "path": {"type": "string",
             "description": "With package: the file inside the package, e.g. usr/lib/foo.efi."},
}

FILE_ENTRY = {
    "type": "object", "x-kind": "source", "additionalProperties": False,
    "required": ["dest"],
    "properties": {**SOURCE_PROPS,
                   "dest": {"type": "string", "x-kind": "dest",
                            "description": "Destination path on the ESP (e.g. EFI/BOOT/grub.cfg) or in the initramfs."}},
    "description": "A file to place on the ESP: one source (file | url+sha256 | package+path) and a dest.",
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "armvm-build recipe",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "arch", "disk"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN,
                 "description": "Image name: output/<name>.raw and friends."},
        "arch": {"type": "string", "enum": ["aarch64", "armv7"],
                 "description": "Target architecture; decides \\EFI\\BOOT\\BOOTAA64.EFI or BOOTARM.EFI (never the host's)."},
        "source_date_epoch": {"type": "integer", "minimum": 0, "maximum": 4354819199,
                              "description": "Timestamp for every file (SOURCE_DATE_EPOCH in the environment wins; default 315532800 = 1980-01-01)."},
        "seed": {"type": "string", "maxLength": 256,
                 "description": "Seed for disk/partition GUIDs and the FAT serial (default: the recipe digest)."},
        "vars": {"type": "object", "maxProperties": 256,
                 "description": "Template variables (literal values, never templated). Overridden by ARMVM_VAR_<name> and --set name=value."},
        "debian": {
            "type": "object", "additionalProperties": False, "required": ["suite"],
            "description": "The Debian archive that `package:` sources come from.",
            "properties": {
                "suite": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9.-]*$",
                          "description": "Suite, e.g. trixie or bookworm."},
                "components": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z0-9-]+$"},
                               "maxItems": 8, "default": ["main"],
                               "description": "Archive components (default [main])."},
                "mirror": {"type": "string", "pattern": r"^https?://",
                           "description": "Mirror URL (default: --mirror, ARMVM_MIRROR, then the host's apt sources)."},
            },
        },
        "kernel": {
            "type": "object", "x-kind": "source", "additionalProperties": False,
            "description": "The Linux kernel: a Debian package (meta-packages resolve to the versioned one) or a file.",
            "properties": {**{k: v for k, v in SOURCE_PROPS.items() if k != "path"},
                           "cmdline": {"type": "string", "maxLength": 4096, "default": "",
                                       "description": "Kernel command line (GRUB and UKI)."}},
        },
        "initramfs": {
            "type": "object", "additionalProperties": False,
            "description": "The initramfs built from the kernel package's modules and busybox-static.",
            "properties": {
                "compression": {"type": "string", "enum": ["gzip", "zstd", "xz", "none"], "default": "gzip",
                                "description": "Compression of the initramfs."},
                "drivers": {"type": "array", "items": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"},
                            "maxItems": MAX_DRIVERS, "default": [],
                            "description": "Kernel modules to load at boot; dependencies are added, built-ins skipped."},
                "decompress_modules": {"type": "boolean", "default": False,
                                       "description": "Store modules uncompressed (.ko) so the guest need not unpack .ko.xz at boot."},
                "busybox": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9.+-]+$", "default": "busybox-static",
                            "description": "Debian package providing a static busybox."},
                "init": {"type": "string", "x-kind": "path",
                         "description": "A Jinja2 template replacing the default /init."},
                "payload": {"type": "string", "maxLength": 65536,
                            "description": "Shell commands /init runs before the runtime report."},
                "files": {"type": "array", "maxItems": MAX_FILES, "default": [],
                          "description": "Extra files for the initramfs (dest is the path inside it).",
                          "items": {**FILE_ENTRY, "description": "A file to add to the initramfs."}},
            },
        },
        "bootloader": {
            "type": "object", "x-kind": "source", "additionalProperties": False, "required": ["type"],
            "description": "What goes to the removable path: a prebuilt EFI binary, GRUB2 or a unified kernel image.",
            "properties": {
                "type": {"type": "string", "enum": ["efi", "grub", "uki"],
                         "description": "efi: a prebuilt loader (give a source); grub: grub-mkimage from Debian's GRUB modules; uki: systemd-boot stub + kernel + initramfs."},
                **{k: v for k, v in SOURCE_PROPS.items()},
                "signed": {"type": "boolean", "default": False,
                           "description": "grub: use Debian's signed monolithic GRUB (AArch64) instead of grub-mkimage."},
                "shim": {"type": "boolean", "default": False,
                         "description": "grub with signed: true (AArch64): Debian's Microsoft-signed shim at BOOTAA64.EFI, "
                                        "grubaa64.efi and mmaa64.efi beside it, the signed Debian kernel (Secure Boot with the Microsoft CA)."},
                "sign": {"type": "object", "additionalProperties": False, "required": ["key", "cert"],
                         "description": "uki or efi: sign the loader (Authenticode, SHA-256) with your own db key; an existing signature is replaced.",
                         "properties": {
                             "key": {"type": "string", "x-kind": "path",
                                     "description": "RSA private key (PEM or DER), relative to the recipe; never copied into the image or manifest."},
                             "cert": {"type": "string", "x-kind": "path",
                                      "description": "The key's X.509 certificate (PEM or DER); the firmware's db must hold it."},
                             "passphrase_env": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
                                                "description": "Name of the environment variable holding an encrypted key's passphrase (never the passphrase itself)."},
                         }},
                "modules": {"type": "array", "items": {"type": "string", "pattern": r"^[a-z0-9_]+$"},
                            "maxItems": 64, "default": [],
                            "description": "grub: extra GRUB modules to embed."},
                "config": {"type": "string", "x-kind": "path",
                           "description": "grub: a Jinja2 template replacing the default grub.cfg."},
            },
        },
        "rootfs": {
            "type": "object", "additionalProperties": False,
            "description": "The root file system of a real OS image: built from Debian packages, a tarball or a folder, "
                           "written into the partition of type root (with format: ext4); the kernel command line gets root=UUID=.",
            "properties": {
                "debian": {
                    "type": "object", "additionalProperties": False,
                    "description": "Build the root with mmdebstrap from the recipe's debian: archive (foreign arches via qemu-user-static).",
                    "properties": {
                        "variant": {"type": "string", "enum": ["extract", "essential", "apt", "required", "minbase",
                                                               "buildd", "important", "standard"],
                                    "default": "minbase", "description": "mmdebstrap variant."},
                        "packages": {"type": "array", "maxItems": MAX_ROOT_PACKAGES, "default": [],
                                     "items": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9.+-]+$"},
                                     "description": "Packages to install on top of the variant."},
                    },
                },
                "tar": {"type": "string", "x-kind": "path",
                        "description": "A root tarball (plain, gzip, xz, bzip2 or zstd): mmdebstrap, debootstrap, docker export."},
                "dir": {"type": "string", "x-kind": "path",
                        "description": "A root folder; ownership on disk is taken as the truth."},
                "hostname": {"type": "string", "pattern": r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                             "description": "/etc/hostname (default: the recipe name, lower case)."},
                "password_hash": {"type": "string", "pattern": r"^\$[0-9a-z]+\$[^:\s]+$",
                                  "description": "root's crypt(3) password hash (e.g. from mkpasswd); without it or a key root stays locked."},
                "network": {"type": "string", "enum": ["dhcp", "none"], "default": "none",
                            "description": "dhcp: systemd-networkd DHCP on every Ethernet NIC (needs systemd-networkd in the root)."},
                "enable": {"type": "array", "maxItems": 64, "default": [],
                           "items": {"type": "string", "pattern": r"^[A-Za-z0-9@._-]+\.(service|socket|timer|path|target)$"},
                           "description": "systemd units to enable (wants/ links from their [Install] section)."},
                "files": {"type": "array", "maxItems": MAX_FILES, "default": [],
                          "description": "Files to place in the root (dest is the path inside it, e.g. root/.ssh/authorized_keys).",
                          "items": {"type": "object", "additionalProperties": False, "required": ["file", "dest"],
                                    "properties": {
                                        "file": SOURCE_PROPS["file"],
                                        "dest": {"type": "string", "description": "Path inside the root."},
                                        "mode": {"type": "string", "pattern": r"^0?[0-7]{3,4}$", "default": "0644",
                                                 "description": "Octal mode, e.g. \"0600\"."}}}},
            },
        },
        "disk": {
            "type": "object", "additionalProperties": False, "required": ["size", "partitions"],
            "description": "The raw disk.",
            "properties": {
                "size": {"type": "string", "x-kind": "size",
                         "description": "Disk size, e.g. 512MiB (M = MiB; MB = 10^6 bytes; at most 16 TiB)."},
                "sector_size": {"type": "integer", "enum": [512, 4096], "default": 512,
                                "description": "Logical sector size."},
                "partitions": {
                    "type": "array", "minItems": 1, "maxItems": MAX_PARTITIONS,
                    "description": "Partitions in disk order, each starting on a 1 MiB boundary.",
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["type"],
                        "properties": {
                            "type": {"type": "string",
                                     "pattern": r"^(esp|root|usr|xbootldr|linux|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$",
                                     "description": "esp, root, usr, xbootldr, linux (Discoverable Partitions types for the arch) or a type GUID."},
                            "name": {"type": "string", "maxLength": 36,
                                     "description": "GPT partition name (default: the type in upper case)."},
                            "size": {"type": "string", "x-kind": "size",
                                     "description": "Size; the last partition may omit it to fill the disk."},
                            "format": {"type": "string", "enum": ["ext4"],
                                       "description": "root: the file system written from the rootfs: section."},
                            "label": {"type": "string", "pattern": r"^[A-Z0-9 _!#$%&'()@^`{}~-]{1,11}$",
                                      "description": "esp: FAT volume label (upper case, up to 11 characters; default ESP)."},
                            "files": {"type": "array", "maxItems": MAX_FILES, "items": FILE_ENTRY, "default": [],
                                      "description": "esp: extra files to place on the ESP."},
                        },
                    },
                },
            },
        },
        "output": {
            "type": "object", "additionalProperties": False,
            "description": "What is written beside output/<name>.raw.",
            "properties": {
                "bmap": {"type": "boolean", "default": True, "description": "Write <name>.bmap (bmaptool block map)."},
                "checksum": {"type": "boolean", "default": False,
                             "description": "Write <name>.raw.sha256 of the whole image (also --checksum)."},
                "direct": {"type": "boolean", "default": False,
                           "description": "Also write <name>.vmlinuz, <name>.initrd and <name>.cmdline for direct kernel boot (outside the spec's image contract)."},
                "formats": {"type": "array", "x-kind": "one-or-list", "minItems": 1, "maxItems": 4,
                            "items": {"type": "string", "enum": ["raw", "qcow2", "raw.zst", "raw.xz"]},
                            "default": ["raw"],
                            "description": "Image files to publish: <name>.raw, <name>.qcow2 (qcow2 v3), <name>.raw.zst, <name>.raw.xz (also --format)."},
                "sbom": {"type": "array", "x-kind": "one-or-list", "maxItems": 2, "default": [],
                         "items": {"type": "string", "enum": ["spdx", "cyclonedx"]},
                         "description": "Software bill of materials from the manifest: <name>.spdx.json (SPDX 2.3) and/or <name>.cdx.json (CycloneDX 1.5); one name or a list."},
            },
        },
    },
}
