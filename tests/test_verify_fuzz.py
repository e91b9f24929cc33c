"""Property: random byte damage to a valid image never makes verify crash or hang.

Mutations are biased toward metadata (PMBR, both GPT copies, FAT boot/FSInfo/backup
sectors, both FATs, the first data clusters with directories, loader, kernel and the
initramfs). Each run is bounded by SIGALRM as a hang detector. Verifier bugs are raised
(``_RAISE_INTERNAL``), so an exception inside any check fails this test.
"""
from __future__ import annotations

import gzip
import os
import signal
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.errors import NotAnImageError  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")
HANG_SECONDS = 20


class Hang(Exception):
    pass


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    early = g.newc([("kernel/x86/microcode/AuthenticAMD.bin", 0o100644, b"u" * 64)])
    initrd = early + gzip.compress(g.newc(g.initramfs_files()), mtime=0)
    img = g.build_image(d, g.ImageSpec(esp_files={"initrd.img": initrd}), "fuzz.raw")
    r = verify.verify_image(img)
    assert all(c.result == "pass" or not c.applicable for c in r.checks)
    size = img.stat().st_size
    boot = g.read_at(img, g.MIB, 64)
    bps, rsvd = struct.unpack_from("<HxxH", boot, 11)
    fatsz = struct.unpack_from("<I", boot, 36)[0]
    fat1 = g.MIB + rsvd * bps
    data = fat1 + 2 * fatsz * bps
    regions = [
        (0, 512), (512, 34 * 512), (size - 33 * 512, size),          # PMBR, GPT copies
        (g.MIB, g.MIB + 8 * bps),                                      # boot, FSInfo, backup
        (fat1, fat1 + 2048), (fat1 + fatsz * bps, fat1 + fatsz * bps + 2048),   # both FATs
        (data, data + 16 * 1024),                                      # directories, loader
        (data, data + 160 * 1024),                                     # kernel, initramfs
        (0, size),
    ]
    return img, regions


mutation = st.tuples(st.integers(0, 8), st.integers(0, 2 ** 32),
                     st.sampled_from(["bytes", "xor", "ff", "zero"]),
                     st.binary(min_size=1, max_size=8))


def _on_alarm(signum, frame):
    raise Hang(f"verify_image ran longer than {HANG_SECONDS} s")


@settings(max_examples=100, deadline=None, database=None,
          derandomize=not os.environ.get("ARMVM_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(muts=st.lists(mutation, min_size=1, max_size=6))
def test_damaged_image_never_crashes(target, muts):
    img, regions = target
    saved = []
    old_raise = verify._RAISE_INTERNAL
    try:
        for region, pos, kind, data in muts:
            lo, hi = regions[region]
            off = lo + pos % max(1, hi - lo - len(data))
            orig = g.read_at(img, off, len(data))
            saved.append((off, orig))
            new = {"bytes": data, "xor": bytes(a ^ (b or 1) for a, b in zip(orig, data)),
                   "ff": b"\xff" * len(orig), "zero": bytes(len(orig))}[kind]
            g.write_at(img, off, new[:len(orig)])
        verify._RAISE_INTERNAL = True
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(HANG_SECONDS)
        try:
            report = verify.verify_image(img)
            code = report.exit_code()
            assert len(report.checks) == len(verify.STATIC_IDS)
            assert all(c.result in ("pass", "fail", "warn", "skip") for c in report.checks)
            assert all(c.detail for c in report.checks)
        except NotAnImageError as e:
            code = e.exit_code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert code in (0, 1, 3)
    finally:
        verify._RAISE_INTERNAL = old_raise
        for off, orig in reversed(saved):
            g.write_at(img, off, orig)


TEXT_SETTINGS = settings(max_examples=100, deadline=None, database=None,
                         derandomize=not os.environ.get("ARMVM_FUZZ_RANDOM"))
KEYWORDS = st.sampled_from(["ARMVM-REPORT ", "virtio=", " id=", "gic=", "efi=", "\x1b[", "\n",
                            "menuentry ", "linux ", "initrd ", "{", "}", "'", '"', "$root",
                            "(hd0,gpt1)", "set default=", "search --fs-uuid --set=root ",
                            "configfile ", "/vmlinuz", ";", "\\"])


@TEXT_SETTINGS
@given(parts=st.lists(st.one_of(KEYWORDS, st.text(max_size=12)), max_size=40))
def test_text_parsers_never_crash(parts):
    from builder.verify.grubcfg import read_grub_cfg
    from builder.verify.runtime import parse_runtime_report, runtime_checks
    text = "".join(parts)
    facts = parse_runtime_report(text)
    assert len(runtime_checks(facts, arch="aarch64", scenario={"gic": 3, "acpi": True,
                                                               "virtio_transports": ["pci"]})) == 9
    r = read_grub_cfg(text, "/grub.cfg", esp_part=1, fs_uuid="1234-ABCD", label="ESP",
                      exists=lambda p: p == "/vmlinuz", read=lambda p: text)
    assert r.kernel is None or r.kernel.path.startswith("/")


@TEXT_SETTINGS
@given(data=st.binary(max_size=600), compress=st.sampled_from(["none", "gzip", "zstd"]))
def test_cpio_reader_never_crashes(data, compress):
    import zstandard
    from builder.verify.blob import BytesBlob
    from builder.verify.cpio import read_initramfs
    from builder.verify.modinfo import is_wanted, kernel_facts
    blob = g.newc([("lib/modules/1/config", 0o100644, b"CONFIG_A=y\n")])[:200] + data
    blob = {"none": blob, "gzip": gzip.compress(blob),
            "zstd": zstandard.ZstdCompressor().compress(blob)}[compress]
    fs = read_initramfs(BytesBlob(blob), want=is_wanted)
    # the complete first member is kept whatever follows it, and the reader stays bounded
    kf = kernel_facts(fs)
    assert kf is not None and kf.version == "1" and kf.config == {"CONFIG_A": "y"}
    assert fs.entries <= 1 + len(data) // 110 + 1 and fs.total <= 200 + len(data)


@TEXT_SETTINGS
@given(objs=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1 << 32 - 1),
                               st.binary(max_size=40)), max_size=12),
       info_size=st.integers(0, 1 << 63), tail=st.binary(max_size=64))
def test_grub_mods_reader_never_crashes(objs, info_size, tail):
    """A hostile mods section: object sizes and the info size may point anywhere."""
    from builder.verify.blob import BytesBlob
    from builder.verify.grubimg import read_mods
    from builder.verify.pe import parse_pe
    body = b"".join(struct.pack("<II", t, n) + d for t, n, d in objs) + tail
    mods = struct.pack("<IIQQ", 0x676D696D, 0, 24, info_size) + body
    img = g.make_pe(0xAA64, 0x20B, 10, [("mods", mods)])
    blob = BytesBlob(img)
    gi = read_mods(blob, parse_pe(blob))
    assert gi is not None and gi.modules <= len(objs)
    assert gi.prefix is None or len(gi.prefix) <= 4096
    gi.memdisk_file("/boot/grub/grub.cfg")


@TEXT_SETTINGS
@given(text=st.text(max_size=400), name=st.text(max_size=30))
def test_boot_loader_entries_never_crash(text, name):
    from builder.verify import sdboot
    e = sdboot.entry_from_conf(name + ".conf", "/loader/entries/x.conf", text)
    u = sdboot.entry_from_osrel(name + ".efi", "/EFI/Linux/x.efi", text)
    chosen, how = sdboot.default_entry([e, u], text[:20] or None)
    assert chosen in (e, u) and how
    assert sdboot.verscmp(text, name) == -sdboot.verscmp(name, text)
