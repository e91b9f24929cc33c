"""Static image checks: gpt.*, esp.*, boot.* -- from the disk file alone.

``run(blob, arch, profile)`` returns the checks and a Context that the OS checks reuse
(the initramfs the boot chain loads). A check whose input is missing because an earlier
requirement failed reports ``skip`` with the reason, so one defect fails one check.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional
from uuid import UUID

from builder import spec
from builder.verify import gpt as gptmod
from builder.verify.blob import Blob, SliceBlob
from builder.verify.chain import find_chain
from builder.verify.fat import FatError, FatVolume, sanity
from builder.verify.pe import PeError, machine_name, parse_pe, SUBSYSTEM_NAMES

MACHINE_ARCH = {spec.PE_MACHINE_ARM64: "aarch64", spec.PE_MACHINE_ARM: "armv7",
                spec.PE_MACHINE_ARMNT: "armv7"}
FIRMWARE_NAMES = ("QEMU_EFI", "AAVMF", "OVMF")
MBR_ESP_TYPE = 0xEF


@dataclass
class Context:
    profile: str
    blob: Blob
    gpt: Optional[gptmod.Gpt] = None
    esp: Optional[gptmod.Entry] = None
    vol: Optional[FatVolume] = None
    no_fs: str = ""                      # why there is no file system to read
    arch: Optional[str] = None
    loader_path: Optional[str] = None
    loader: Optional[Blob] = None
    loader_pe: object = None
    chain: object = None                 # chain.Chain
    fat_problems: list = field(default_factory=list)
    kernel_config: object = None         # (CONFIG_X -> value, where from) from --kernel-config
    esp_typed: bool = False              # a partition is typed as ESP (GPT GUID or MBR 0xEF)
    initrd: object = None                # (Initramfs, note) once read; see checks_os
    parts: object = None                 # probed partitions (checks_root.Part list)
    kver: object = None                  # (kernel release, where from); see checks_root
    cache: dict = field(default_factory=dict)     # parsed modules and kernel facts, shared
    results: dict = field(default_factory=dict)   # check id -> (result, detail)

    def set(self, cid: str, result: str, detail: str, applicable: bool = True) -> None:
        """``applicable=False``: a conditional requirement whose condition is absent (e.g.
        root.* without a root partition); reported as skip, not held against --strict."""
        self.results[cid] = (result, detail, applicable)


def summarize(problems: list, limit: int = 4) -> str:
    text = "; ".join(problems[:limit])
    return text + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def run_gpt(ctx: Context) -> None:
    g = ctx.gpt = gptmod.analyze(ctx.blob)
    p = g.problems
    bs = g.sector_size
    ok = {
        "gpt.pmbr": "protective MBR record 0xEE from LBA 1",
        "gpt.primary": f"valid header at LBA 1 ({bs}-byte sectors), CRCs match",
        "gpt.backup": f"valid backup header at LBA {g.disk_sectors - 1}, array identical",
        "gpt.partitions": f"{len(g.entries)} partition(s) in the usable range, no overlap, "
                          "unique GUIDs",
        "gpt.alignment": "all partitions start on 1 MiB boundaries",
    }
    for key in ("pmbr", "primary", "backup", "partitions", "alignment"):
        cid = "gpt." + key
        ctx.set(cid, "fail" if p[key] else "pass", summarize(p[key]) if p[key] else ok[cid])
    if not g.entries:
        ctx.set("gpt.alignment", "skip", "no partition entries to check")
    esps = [e for e in g.entries if e.type_guid == spec.ESP_TYPE_GUID]
    if len(esps) == 1:
        ctx.set("esp.type", "pass", f"partition {esps[0].index} has the ESP type GUID")
    elif esps:
        which = ", ".join(str(e.index) for e in esps)
        ctx.set("esp.type", "fail", f"{len(esps)} partitions ({which}) carry the ESP type "
                                    "GUID; exactly one is allowed")
    else:
        types = ", ".join(f"{e.index}: {e.type_guid}" for e in g.entries[:4]) or "none"
        ctx.set("esp.type", "fail", f"no partition has the ESP type GUID (partition types: "
                                    f"{types})")
    mbr_esps = [] if g.entries else mbr_efi_partitions(ctx.blob)
    if mbr_esps:
        which = ", ".join(f"record {e.index - 1} (LBA {e.first_lba})" for e in mbr_esps)
        ctx.set("esp.type", "fail", f"no GPT partition has the ESP type GUID, but the MBR has "
                f"an EFI System partition (type 0xEF): {which}; the firmware boots it, the "
                "spec asks for GPT")
    candidates = esps or mbr_esps[:1] or g.entries[:16]
    ctx.esp_typed = bool(esps or mbr_esps)
    for e in candidates:
        part = _partition(ctx, e)
        try:
            ctx.vol = FatVolume(part)
            ctx.esp = e
            break
        except FatError as err:
            ctx.no_fs = f"partition {e.index}: {err}"
    if ctx.vol is None and not ctx.no_fs:
        ctx.no_fs = "no partition to read"
    if ctx.vol is not None and not esps:
        ctx.results["esp.type"] = ("fail", ctx.results["esp.type"][1] + f"; the other checks "
                                   f"read the FAT file system on partition {ctx.esp.index}",
                                   True)


def mbr_efi_partitions(blob: Blob) -> list:
    """MBR records of type 0xEF (EFI System partition on an MBR disk) as GPT-like entries
    (index = record number + 1, 512-byte sectors)."""
    lba0 = blob.read_at(0, 512)
    if len(lba0) < 512 or lba0[510:512] != spec.MBR_SIGNATURE:
        return []
    out = []
    for i in range(4):
        _, _, os_type, _, start, size = struct.unpack_from(gptmod.MBR_RECORD_FMT, lba0,
                                                           gptmod.MBR_RECORDS_OFFSET + 16 * i)
        if os_type == MBR_ESP_TYPE and size:
            out.append(gptmod.Entry(i + 1, UUID(int=0), UUID(int=0), start, start + size - 1,
                                    0, "MBR 0xEF"))
    return out


def _partition(ctx: Context, e: gptmod.Entry) -> Blob:
    bs = ctx.gpt.sector_size or 512
    return SliceBlob(ctx.blob, e.first_lba * bs, max(0, e.last_lba - e.first_lba + 1) * bs)


def run_fat32(ctx: Context) -> None:
    if ctx.vol is None:
        if ctx.esp_typed:
            ctx.set("esp.fat32", "fail", f"no FAT file system on the ESP ({ctx.no_fs})")
        else:
            ctx.set("esp.fat32", "skip", f"no ESP to read (see esp.type; {ctx.no_fs})")
        return
    v, b = ctx.vol, ctx.vol.bpb
    bpb_bad = [f"{k}={b[k]}" for k in ("BPB_FATSz16", "BPB_RootEntCnt", "BPB_TotSec16")
               if b[k] != 0] + (["BPB_FATSz32=0"] if b["BPB_FATSz32"] == 0 else [])
    size = f"{v.cluster_count} clusters of {v.cluster_bytes} bytes"
    if v.fat_type == 32 and not bpb_bad:
        ctx.set("esp.fat32", "pass", f"FAT32: {size}")
        return
    why = []
    if v.fat_type != 32:
        why.append(f"{size} makes it FAT{v.fat_type} (FAT32 needs >= "
                   f"{spec.FAT16_MAX_CLUSTERS} clusters)")
    if bpb_bad:
        why.append("BPB is not a FAT32 BPB (" + ", ".join(bpb_bad) + ")")
    if v.label_type.strip().upper() == "FAT32":
        why.append("the 'FAT32' label in BS_FilSysType is informational only")
    ctx.set("esp.fat32", "fail", "; ".join(why))


def run_loader(ctx: Context, arch_req: str) -> None:
    if ctx.vol is None:
        for cid in ("boot.path", "boot.pe"):
            ctx.set(cid, "skip", f"no ESP file system to read (see "
                                 f"{'esp.fat32' if ctx.esp_typed else 'esp.type'}; "
                                 f"{ctx.no_fs})")
        return
    vol = ctx.vol
    try:
        present = {a: vol.lookup(f"{spec.REMOVABLE_DIR}/{d.removable_name}")
                   for a, d in spec.ARCHES.items()}
        others = [e for e in _efi_boot_dir(vol) if e.name.upper().endswith(".EFI")]
    except FatError as e:
        ctx.fat_problems.append(str(e))
        ctx.set("boot.path", "fail", f"cannot read \\EFI\\BOOT: {e}")
        ctx.set("boot.pe", "skip", "no loader (see boot.path)")
        return
    present = {a: e for a, e in present.items() if e is not None and not e.is_dir}
    note = ""
    if arch_req != "auto":
        arch = arch_req
    elif len(present) == 1:
        arch = next(iter(present))
    else:
        arch, note = _arch_from_machine(ctx, present, others)
    ctx.arch = arch
    if arch is None:
        names = ", ".join(e.name for e in others) or "no .EFI files"
        ctx.set("boot.path", "fail", f"no \\EFI\\BOOT\\BOOTAA64.EFI or BOOTARM.EFI, and no "
                                     f"loader with an ARM machine type ({names})")
        ctx.set("boot.pe", "skip", "no loader (see boot.path)")
        return
    name = spec.ARCHES[arch].removable_name
    entry = present.get(arch)
    if entry is None:
        names = ", ".join(e.name for e in others) or "no .EFI files"
        ctx.set("boot.path", "fail", f"\\EFI\\BOOT\\{name} is missing for {arch} "
                                     f"(\\EFI\\BOOT holds: {names}){note}")
        ctx.set("boot.pe", "skip", "no loader at the removable path (see boot.path)")
        return
    ctx.loader_path = f"/{spec.REMOVABLE_DIR}/{entry.name}"
    ctx.set("boot.path", "pass", f"\\EFI\\BOOT\\{entry.name} ({entry.size} bytes) for "
                                 f"{arch}{note}")
    try:
        ctx.loader = vol.open(entry, ctx.loader_path)
    except FatError as e:
        ctx.fat_problems.append(str(e))
        ctx.set("boot.pe", "fail", f"cannot read the loader: {e}")
        return
    ctx.set("boot.pe", *_judge_pe(ctx, arch))


def _efi_boot_dir(vol: FatVolume) -> list:
    d = vol.lookup(spec.REMOVABLE_DIR)
    if d is None or not d.is_dir:
        return []
    return vol.list_dir(d.first_cluster or None, "/" + spec.REMOVABLE_DIR)


def _arch_from_machine(ctx: Context, present: dict, others: list):
    """Both or neither removable names present: decide from the loaders' PE machine."""
    found = {}
    for e in (list(present.values()) or others)[:16]:
        try:
            m = parse_pe(ctx.vol.open(e, e.name)).machine
        except PeError:
            continue
        except FatError as err:
            ctx.fat_problems.append(str(err))
            continue
        a = MACHINE_ARCH.get(m)
        if a and (not present or present.get(a) is e):
            found.setdefault(a, e)
    if not found and present:
        arch = "aarch64" if "aarch64" in present else next(iter(present))
        return arch, f" (both removable names exist, neither with its ARM machine type; " \
                     f"judged {arch})"
    if not found:
        return None, ""
    arch = "aarch64" if "aarch64" in found else "armv7"
    if present:
        return arch, (f" (both removable names exist; judged {arch}; pass --arch to check the "
                      "other)" if len(found) > 1 else f" (judged {arch} from the PE machine)")
    return arch, f"; {found[arch].name} has the {arch} machine type (named after the build " \
                 "host's architecture?)"


def _judge_pe(ctx: Context, arch: str) -> tuple:
    d = spec.ARCHES[arch]
    try:
        pe = ctx.loader_pe = parse_pe(ctx.loader)
    except PeError as e:
        return "fail", f"not a PE/COFF image: {e}"
    bad = []
    if pe.machine != d.pe_machine:
        extra = (" (ARMNT is not loadable by UEFI firmware)"
                 if pe.machine == spec.PE_MACHINE_ARMNT else "")
        bad.append(f"machine {machine_name(pe.machine)}, expected "
                   f"{machine_name(d.pe_machine)}{extra}")
    if pe.magic != d.pe_magic:
        bad.append(f"optional header magic 0x{pe.magic:X}, expected 0x{d.pe_magic:X}")
    if pe.subsystem != spec.PE_SUBSYSTEM_EFI_APPLICATION:
        what = SUBSYSTEM_NAMES.get(pe.subsystem, "not EFI")
        bad.append(f"subsystem {pe.subsystem} ({what}), expected 10 (EFI application)")
    bad += pe.problems
    if bad:
        return "fail", "; ".join(bad)
    kind = "PE32+" if pe.magic == spec.PE32PLUS_MAGIC else "PE32"
    return "pass", f"{kind} EFI application, machine {machine_name(pe.machine)}"


def run_nvram(ctx: Context) -> None:
    if ctx.vol is None:
        ctx.set("boot.no-nvram", "skip", f"no ESP file system to read ({ctx.no_fs})")
        return
    walk_problems, found, n = [], [], 0
    for path, e in ctx.vol.walk(walk_problems):
        n += 1
        up = e.name.upper()
        if not e.is_dir and (up.endswith(".FD") or any(k in up for k in FIRMWARE_NAMES)):
            found.append(path)
    ctx.fat_problems += walk_problems
    if found:
        ctx.set("boot.no-nvram", "fail", "UEFI firmware shipped in the ESP: " +
                ", ".join(found[:5]))
    elif walk_problems:
        ctx.set("boot.no-nvram", "skip", "the ESP could not be walked completely (see "
                                         "esp.fat-sane)")
    else:
        ctx.set("boot.no-nvram", "pass", f"no firmware images among {n} ESP entries; the "
                                         "removable path needs no boot variables")


def run_fat_sane(ctx: Context) -> None:
    if ctx.vol is None:
        ctx.set("esp.fat-sane", "skip", f"no FAT file system ({ctx.no_fs})")
        return
    problems = list(dict.fromkeys(sanity(ctx.vol) + ctx.fat_problems +
                                  ctx.vol.read_problems))
    if problems:
        ctx.set("esp.fat-sane", "fail", summarize(problems))
    else:
        v = ctx.vol
        extra = ", FSInfo and backup boot sector valid" if v.fat_type == 32 else ""
        ctx.set("esp.fat-sane", "pass", f"FAT{v.fat_type}, {v.bps}-byte sectors, "
                f"{v.bpb['BPB_NumFATs']} identical FATs{extra}, chains of files read are sound")


def run(ctx: Context, arch: str, guard) -> None:
    """All static image checks into ``ctx.results``; ``guard`` turns verifier bugs into
    failed checks (NotAnImageError still propagates: not a disk image)."""
    guard(ctx, ("gpt.pmbr", "gpt.primary", "gpt.backup", "gpt.partitions", "gpt.alignment",
                "esp.type"), lambda: run_gpt(ctx))
    guard(ctx, ("esp.fat32",), lambda: run_fat32(ctx))
    guard(ctx, ("boot.path", "boot.pe"), lambda: run_loader(ctx, arch))
    guard(ctx, ("boot.chain", "boot.kernel"), lambda: find_chain(ctx))
    guard(ctx, ("boot.no-nvram",), lambda: run_nvram(ctx))
    guard(ctx, ("esp.fat-sane",), lambda: run_fat_sane(ctx))
