"""verify on good images made by external tools (sfdisk, mkfs.fat, mtools), both arches,
GRUB and UKI chains, 512- and 4096-byte sectors; readers cross-checked with the tools."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.errors import ArmvmError, NotAnImageError  # noqa: E402
from builder.verify import catalog  # noqa: E402
from builder.verify.blob import FileBlob  # noqa: E402
from builder.verify.fat import FatVolume  # noqa: E402
from builder.verify.gpt import analyze  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")
ALL_IDS = list(catalog.STATIC_IDS)
ROOT_IDS = ("root.type", "root.fs", "root.found", "root.init")


@pytest.fixture(autouse=True)
def _raise_internal(monkeypatch):
    monkeypatch.setattr(verify, "_RAISE_INTERNAL", True)


def _uki_spec(arch: str, **kw) -> g.ImageSpec:
    return g.ImageSpec(arch=arch, esp_files={
        "EFI/BOOT/grub.cfg": None, "vmlinuz": None, "initrd.img": None,
        f"EFI/BOOT/{g.REMOVABLE[arch]}": g.make_uki(arch, g.make_initramfs())}, **kw)


GOOD = {
    "aarch64-grub": lambda: g.ImageSpec(),
    "armv7-grub": lambda: g.ImageSpec(arch="armv7"),
    "aarch64-uki": lambda: _uki_spec("aarch64"),
    "armv7-uki": lambda: _uki_spec("armv7"),
    "aarch64-4k": lambda: g.ImageSpec(sector_size=4096, esp_mib=260, disk_mib=270),
}


@pytest.fixture(scope="module")
def good_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return {name: g.build_image(d, make(), name + ".raw") for name, make in GOOD.items()}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_image_passes_everything(good_images, name):
    r = verify.verify_image(good_images[name])
    bad = [(c.id, c.result, c.detail) for c in r.checks if c.result != "pass"
           and not (c.result == "skip" and not c.applicable)]
    assert bad == []
    assert {c.id for c in r.checks if not c.applicable} == set(ROOT_IDS)   # no root here
    assert [c.id for c in r.checks] == ALL_IDS
    assert r.arch == name.split("-")[0]
    assert r.exit_code() == 0 and r.exit_code(strict=True) == 0


def test_detail_names_what_was_found(good_images):
    r = verify.verify_image(good_images["aarch64-grub"]).by_id()
    assert "BOOTAA64.EFI" in r["boot.path"].detail
    assert "/vmlinuz" in r["boot.chain"].detail and "/initrd.img" in r["boot.chain"].detail
    assert "AArch64 Image" in r["boot.kernel"].detail
    assert "net_failover" in r["os.virtio"].detail
    r7 = verify.verify_image(good_images["armv7-grub"]).by_id()
    assert "AArch32 zImage" in r7["boot.kernel"].detail
    assert "not applicable" in r7["os.acpi"].detail
    r4 = verify.verify_image(good_images["aarch64-4k"]).by_id()
    assert "4096-byte sectors" in r4["gpt.primary"].detail


def test_explicit_arch_mismatch_fails_boot_path(good_images):
    r = verify.verify_image(good_images["aarch64-grub"], arch="armv7").by_id()
    assert r["boot.path"].result == "fail" and "BOOTARM.EFI" in r["boot.path"].detail
    assert r["boot.pe"].result == "skip"


def test_profiles_change_console_levels(good_images):
    img = good_images["aarch64-grub"]
    for profile, level in (("vmspec-2.0", "SHOULD"), ("vmspec-1.0", "MUST"), ("rfc-v2", "MUST")):
        r = verify.verify_image(img, profile=profile).by_id()
        assert r["os.console.virtio"].level == level
        assert r["os.console.xen"].level == level
        assert r["os.gic"].level == "MUST" and r["os.virtio"].level == "SHOULD"
    assert "RFC v2" in verify.verify_image(img, profile="rfc-v2").by_id()["gpt.pmbr"].source
    assert "v2.0" in verify.verify_image(img).by_id()["esp.fat32"].source
    with pytest.raises(ArmvmError) as e:
        verify.verify_image(img, profile="vmspec-3")
    assert e.value.exit_code == 2 and "vmspec-2.0" in str(e.value)
    with pytest.raises(ArmvmError):
        verify.verify_image(img, arch="x86_64")


def test_json_and_table(good_images):
    r = verify.verify_image(good_images["aarch64-grub"])
    j = json.loads(json.dumps(r.to_json()))
    assert j["arch"] == "aarch64" and j["profile"] == "vmspec-2.0"
    assert [c["id"] for c in j["checks"]] == ALL_IDS
    assert set(j["checks"][0]) == {"id", "level", "requirement", "source", "result", "detail",
                                   "applicable"}
    assert j["summary"]["counts"]["pass"] == len(ALL_IDS) - len(ROOT_IDS)
    assert j["exit_code"] == 0
    table = r.format_table()
    assert "gpt.pmbr" in table and "PASS" in table and \
        f"{len(ALL_IDS) - len(ROOT_IDS)} passed" in table


@pytest.mark.parametrize("content", [None, b"", b"hello world" * 100, bytes(4096)])
def test_not_an_image(tmp_path, content):
    p = tmp_path / "x.raw"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(NotAnImageError) as e:
        verify.verify_image(p)
    assert e.value.exit_code == 3


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(NotAnImageError):
        verify.verify_image(tmp_path)


def test_mbr_only_disk_is_an_image_that_fails(tmp_path):
    p = tmp_path / "mbr.raw"
    subprocess.run(["truncate", "-s", "8M", p], check=True)
    subprocess.run(["sfdisk", "-q", p], input=b"label: dos\nstart=2048, type=83\n", check=True)
    r = verify.verify_image(p).by_id()
    assert r["gpt.pmbr"].result == "fail" and r["gpt.primary"].result == "fail"
    # one cause, one failure: without an ESP the checks that need one skip
    assert r["esp.type"].result == "fail" and "0xEF" not in r["esp.type"].detail
    for cid in ("esp.fat32", "esp.fat-sane", "boot.path", "boot.pe", "boot.chain"):
        assert r[cid].result == "skip", (cid, r[cid].detail)
    assert verify.verify_image(p).exit_code() == 1


# --- the readers agree with the external tools ------------------------------------------
def test_gpt_reader_matches_sfdisk(good_images):
    img = good_images["aarch64-grub"]
    out = json.loads(subprocess.run(["sfdisk", "-J", img], capture_output=True, check=True,
                                    text=True).stdout)["partitiontable"]
    with open(img, "rb") as f:
        gpt = analyze(FileBlob(f))
    assert gpt.sector_size == out["sectorsize"] == 512
    theirs = [(p["start"], p["size"], p["type"].lower(), p["uuid"].lower(), p["name"])
              for p in out["partitions"]]
    ours = [(e.first_lba, e.last_lba - e.first_lba + 1, str(e.type_guid), str(e.unique_guid),
             e.name) for e in gpt.entries]
    assert ours == theirs
    assert gpt.primary["FirstUsableLBA"] == out["firstlba"]
    assert gpt.primary["LastUsableLBA"] == out["lastlba"]


def _extract_esp(img: Path, dst: Path, bs: int = 512) -> Path:
    with open(img, "rb") as f:
        e = analyze(FileBlob(f)).entries[0]
    subprocess.run(["dd", f"if={img}", f"of={dst}", f"bs={bs}", f"skip={e.first_lba}",
                    f"count={e.last_lba - e.first_lba + 1}", "conv=sparse", "status=none"],
                   check=True)
    return dst


@pytest.mark.parametrize("name,bs", [("aarch64-grub", 512), ("aarch64-4k", 4096)])
def test_fat_reader_matches_mtools(good_images, tmp_path, name, bs):
    esp = _extract_esp(good_images[name], tmp_path / "esp.img", bs)
    fsck = subprocess.run(["fsck.fat", "-n", esp], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["mdir", "-i", esp, "-/", "-b", "::/"], capture_output=True,
                             text=True, check=True).stdout.split()
    theirs = sorted(p.split("::", 1)[-1].strip("/").upper() for p in listing)
    with open(esp, "rb") as f:
        vol = FatVolume(FileBlob(f))
        problems = []
        ours = sorted(p.lstrip("/").upper() for p, _ in vol.walk(problems))
        assert problems == []
        assert ours == theirs
        kernel = vol.open_path("/vmlinuz")
        want = subprocess.run(["mtype", "-i", esp, "::/vmlinuz"], capture_output=True,
                              check=True).stdout
        assert kernel.read_at(0, kernel.size) == want
        assert vol.open_path("efi/boot/BOOTaa64.efi") is not None      # case-insensitive
    assert vol.bps == bs and vol.fat_type == 32


def test_pe_reader_matches_pefile(tmp_path):
    pefile = pytest.importorskip("pefile")
    from builder.verify.blob import BytesBlob
    from builder.verify.pe import parse_pe
    for data in (g.make_uki("aarch64", b"initrd"), g.make_kernel("armv7"),
                 g.make_loader("aarch64", subsystem=11)):
        theirs = pefile.PE(data=data)
        ours = parse_pe(BytesBlob(data))
        assert ours.machine == theirs.FILE_HEADER.Machine
        assert ours.magic == theirs.OPTIONAL_HEADER.Magic
        assert ours.subsystem == theirs.OPTIONAL_HEADER.Subsystem
        assert [s.name for s in ours.sections] == \
            [s.Name.rstrip(b"\0").decode() for s in theirs.sections]
        assert [s.PointerToRawData for s in ours.sections] == \
            [s.PointerToRawData for s in theirs.sections]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_cpio_reader_matches_gnu_cpio(tmp_path):
    from builder.verify.blob import BytesBlob
    from builder.verify.cpio import read_initramfs
    files = g.initramfs_files()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=g.newc(files),
                             capture_output=True, check=True).stdout.decode().split()
    fs = read_initramfs(BytesBlob(g.make_initramfs(files)))
    assert fs.error is None and sorted(fs.members) == sorted(listing)
    # and GNU cpio's own newc output reads back identically
    src = tmp_path / "tree"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "x.txt").write_bytes(b"abc" * 1000)
    (src / "link").symlink_to("lib/x.txt")
    gnu = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=src, capture_output=True,
                         input=b"lib\nlib/x.txt\nlink\n", check=True).stdout
    fs = read_initramfs(BytesBlob(gnu), want=lambda p, s: True)
    assert fs.error is None
    assert fs.members["lib/x.txt"].data == b"abc" * 1000
    assert fs.resolve("link").data == b"abc" * 1000


def test_modinfo_from_gcc_object(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    from builder.verify.modinfo import modinfo_from_elf
    c = tmp_path / "m.c"
    c.write_text('__attribute__((section(".modinfo"), used)) static const char a[] = '
                 '"depends=failover,virtio";\n__attribute__((section(".modinfo"), used)) '
                 'static const char b[] = "license=GPL";\n')
    subprocess.run(["gcc", "-c", "-o", tmp_path / "m.o", c], check=True)
    info = modinfo_from_elf((tmp_path / "m.o").read_bytes())
    assert info["depends"] == ["failover,virtio"] and info["license"] == ["GPL"]


def test_both_removable_loaders(tmp_path):
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={
        "EFI/BOOT/BOOTARM.EFI": g.make_loader("armv7")}))
    r = verify.verify_image(img)
    assert r.arch == "aarch64" and "both removable names" in r.by_id()["boot.path"].detail
    r7 = verify.verify_image(img, arch="armv7").by_id()
    assert r7["boot.path"].result == "pass" and r7["boot.pe"].result == "pass"
    assert r7["boot.kernel"].result == "fail"          # grub.cfg names an AArch64 kernel


def test_efi_stub_kernel_as_loader(tmp_path):
    img = g.build_image(tmp_path, g.ImageSpec(arch="armv7", esp_files={
        "EFI/BOOT/grub.cfg": None, "vmlinuz": None, "initrd.img": None,
        "EFI/BOOT/BOOTARM.EFI": g.make_kernel("armv7")}))
    r = verify.verify_image(img).by_id()
    assert r["boot.chain"].result == "pass" and "EFI-stub kernel" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "pass"
    assert r["os.gic"].result == "skip" and "initrd" in r["os.gic"].detail


def test_unknown_loader(tmp_path):
    """No mods section, no grub.cfg beside it, no .linux, no .sdmagic: nothing to follow."""
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={
        "EFI/BOOT/grub.cfg": None, "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64",
                                                                          mods=False)}))
    r = verify.verify_image(img).by_id()
    assert r["boot.chain"].result == "fail" and "neither GRUB" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "skip"


def _builder_imports(package):
    """(file name, imported builder module) for every import in the package's modules
    (`from builder import x` counts as builder.x)."""
    import ast
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                         if node.module == "builder"]
            for n in names:
                if n.startswith("builder."):
                    yield path.name, n


def test_readers_are_independent_of_the_writers():
    """verify may share builder/spec.py and builder/errors.py, never writer code."""
    allowed = ("builder.spec", "builder.errors", "builder.verify")
    for name, n in _builder_imports(verify):
        assert n.startswith(allowed), (name, n)


def test_runners_import_no_writer():
    """run/ (QEMU, the boot runner, the Xen runner) reads images with verify's readers and
    imports no writer (DATAFLOW.md): what it boots from is built by payload/ and handed in."""
    import builder.run as run
    allowed = ("builder.spec", "builder.errors", "builder.console", "builder.verify", "builder.run")
    for name, n in _builder_imports(run):
        assert n.startswith(allowed), (name, n)
