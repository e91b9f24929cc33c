"""verify follows what the firmware's loader really reads: systemd-boot's loader.conf,
Type #1 entries and Type #2 UKIs; GRUB's grub.cfg beside its image, then $prefix/grub.cfg
with the prefix and embedded config taken from the image's mods section. Layouts are made
with sfdisk, mkfs.fat and mtools; the real-tool tier uses grub-mkimage with trixie's GRUB
modules and trixie's systemd-boot (systemd-boot-efi) fetched with the project's archive
client."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.verify import sdboot  # noqa: E402
from tests.fixtures import debian_tree  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")
SDMAGIC = [(".sdmagic", b"#### LoaderInfo: systemd-boot 257 ####"),
           (".osrel", b"ID=systemd-boot\n")]
NO_GRUB = {"EFI/BOOT/grub.cfg": None, "vmlinuz": None, "initrd.img": None}


@pytest.fixture(autouse=True)
def _raise_internal(monkeypatch):
    monkeypatch.setattr(verify, "_RAISE_INTERNAL", True)


def _verify(tmp_path, files: dict, name="disk.raw", **kw):
    img = g.build_image(tmp_path, g.ImageSpec(esp_files=files, **kw), name)
    return verify.verify_image(img).by_id()


def _sd_files(loader: bytes = None, **extra) -> dict:
    files = dict(NO_GRUB)
    files["EFI/BOOT/BOOTAA64.EFI"] = loader or g.make_loader("aarch64", sections=SDMAGIC,
                                                             mods=False)
    files.update(extra)
    return files


def _entry(linux: str, initrd="/initrd.img", options="console=ttyAMA0", **keys) -> bytes:
    lines = [f"{k.replace('_', '-')} {v}" for k, v in keys.items()]
    lines += [f"linux {linux}"] + ([f"initrd {initrd}"] if initrd else [])
    return ("\n".join(lines + [f"options {options}"]) + "\n").encode()


def _bad(r) -> list:
    return [(c.id, c.result, c.detail) for c in r.values()
            if c.result != "pass" and not (c.result == "skip" and not c.applicable)]


# --- systemd-boot -------------------------------------------------------------------------

def test_systemd_boot_type1_newest_entry_is_default(tmp_path):
    """Without 'default', systemd-boot boots the entry with the highest id by version
    order: 6.12 (whose kernel exists) before 6.9 (lexically larger; its kernel is missing,
    and as it is not the default it is not held against the image)."""
    r = _verify(tmp_path, _sd_files(**{
        "loader/loader.conf": b"timeout 3\n",
        "loader/entries/debian-6.9.conf": _entry("/vmlinuz-6.9.0"),
        "loader/entries/debian-6.12.conf": _entry(f"/vmlinuz-{g.KVER}", title="Debian"),
        f"vmlinuz-{g.KVER}": g.make_kernel("aarch64"), "initrd.img": g.make_initramfs()}))
    assert r["boot.chain"].result == "pass", r["boot.chain"].detail
    assert "'debian-6.12.conf'" in r["boot.chain"].detail
    assert "console=ttyAMA0" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "pass"
    assert r["boot.init"].result == "pass" and r["os.gic"].result == "pass"
    assert _bad(r) == []


def test_systemd_boot_default_glob_picks_the_broken_entry(tmp_path):
    r = _verify(tmp_path, _sd_files(**{
        "loader/loader.conf": b"default debian-6.9*\n",
        "loader/entries/debian-6.9.conf": _entry("/vmlinuz-6.9.0"),
        "loader/entries/debian-6.12.conf": _entry(f"/vmlinuz-{g.KVER}"),
        f"vmlinuz-{g.KVER}": g.make_kernel("aarch64"), "initrd.img": g.make_initramfs()}))
    assert r["boot.chain"].result == "fail"
    assert "'debian-6.9.conf'" in r["boot.chain"].detail
    assert "/vmlinuz-6.9.0 does not exist" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "skip"


def test_systemd_boot_type2_uki(tmp_path):
    uki = g.make_uki("aarch64", g.make_initramfs())
    r = _verify(tmp_path, _sd_files(**{"EFI/Linux/debian-6.12.efi": uki}))
    assert r["boot.chain"].result == "pass", r["boot.chain"].detail
    assert "/EFI/Linux/debian-6.12.efi: UKI" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "pass" and _bad(r) == []


def test_systemd_boot_without_entries_fails(tmp_path):
    r = _verify(tmp_path, _sd_files(**{"loader/loader.conf": b"timeout 0\n",
                                       "EFI/Linux/notes.efi": g.make_loader("aarch64")}))
    assert r["boot.chain"].result == "fail"
    assert "finds no entry" in r["boot.chain"].detail and "not a UKI" in r["boot.chain"].detail


def test_systemd_boot_is_not_a_broken_uki(tmp_path):
    """systemd-boot carries .osrel and .sdmagic, never .linux: it is no UKI."""
    r = _verify(tmp_path, _sd_files())
    assert "UKI without" not in r["boot.chain"].detail
    assert "systemd-boot finds no entry" in r["boot.chain"].detail


def test_systemd_boot_entry_for_another_architecture_is_ignored(tmp_path):
    r = _verify(tmp_path, _sd_files(**{
        "loader/entries/z-x64.conf": _entry("/nope", architecture="x64"),
        "loader/entries/a.conf": _entry("/vmlinuz"), "vmlinuz": g.make_kernel("aarch64"),
        "initrd.img": g.make_initramfs()}))
    assert r["boot.chain"].result == "pass" and "'a.conf'" in r["boot.chain"].detail


XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"


def test_systemd_boot_entries_on_xbootldr(tmp_path):
    """Entries and kernels on the Extended Boot Loader partition (a FAT made by mkfs.fat)."""
    files = {"loader/entries/debian.conf": _entry("/vmlinuz"),
             "vmlinuz": g.make_kernel("aarch64"), "initrd.img": g.make_initramfs()}
    r = _verify(tmp_path, _sd_files(), second_type=XBOOTLDR, second_files=files)
    assert r["boot.chain"].result == "pass", r["boot.chain"].detail
    assert "on the XBOOTLDR partition 2" in r["boot.chain"].detail
    assert r["boot.kernel"].result == "pass" and _bad(r) == []
    del files["vmlinuz"]
    r = _verify(tmp_path, _sd_files(), name="b.raw", second_type=XBOOTLDR,
                second_files=files)
    assert r["boot.chain"].result == "fail"
    assert "/vmlinuz does not exist on the XBOOTLDR partition 2" in r["boot.chain"].detail
    r = _verify(tmp_path, _sd_files(), name="c.raw", second_type=XBOOTLDR)   # no FAT
    assert r["boot.chain"].result == "fail" and "XBOOTLDR partition 2 holds no FAT" in \
        r["boot.chain"].detail


def test_boot_loader_spec_order():
    e = [sdboot.entry_from_conf(n, "", t) for n, t in (
        ("b-1.conf", ""), ("a-2.conf", ""), ("z.conf", "sort-key debian\nversion 6.1\n"),
        ("y.conf", "sort-key debian\nversion 6.12\n"), ("x+0-3.conf", "sort-key aaa\n"))]
    ids = [x.id for x in sdboot.sort_entries(e)]
    # no tries left last; sort-key first; version descending; then id descending
    assert ids == ["y.conf", "z.conf", "b-1.conf", "a-2.conf", "x.conf"]
    assert sdboot.default_entry(e, "A-*")[0].id == "a-2.conf"
    assert sdboot.default_entry(e, "@saved")[0].id == "y.conf"
    assert sdboot.verscmp("6.12", "6.9") > 0 and sdboot.verscmp("1~rc1", "1") < 0


# --- GRUB: the prefix from the binary -----------------------------------------------------

CFG = b"set timeout=0\nmenuentry t {\n linux /vmlinuz console=ttyAMA0\n initrd /initrd.img\n}\n"


@pytest.mark.parametrize("prefix,cfg_at,verdict", [
    ("/EFI/BOOT", "EFI/BOOT/grub.cfg", "pass"),
    ("/EFI/debian", "EFI/debian/grub.cfg", "pass"),
    ("/EFI/debian", "EFI/BOOT/grub.cfg", "pass"),        # beside the image, read first
    ("/EFI/BOOT", "EFI/debian/grub.cfg", "fail"),        # the guest stops at grub>
    ("/boot/grub", "boot/grub/grub.cfg", "pass"),
    ("/boot/grub", "EFI/debian/grub.cfg", "fail"),
])
def test_grub_reads_beside_then_prefix(tmp_path, prefix, cfg_at, verdict):
    r = _verify(tmp_path, {"EFI/BOOT/grub.cfg": None, cfg_at: CFG,
                           "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", prefix=prefix)})
    assert r["boot.chain"].result == verdict, r["boot.chain"].detail
    assert f"prefix '{prefix}'" in r["boot.chain"].detail
    if verdict == "fail":
        assert "grub> prompt" in r["boot.chain"].detail
        assert f"/{cfg_at} exists but this GRUB never reads it" in r["boot.chain"].detail


def test_grub_embedded_config_moves_the_prefix(tmp_path):
    emb = "set prefix=($root)/grub2\n"
    r = _verify(tmp_path, {"EFI/BOOT/grub.cfg": None, "grub2/grub.cfg": CFG,
                           "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", config=emb)})
    assert r["boot.chain"].result == "pass", r["boot.chain"].detail
    assert "embedded config" in r["boot.chain"].detail
    r = _verify(tmp_path, {"EFI/BOOT/grub.cfg": None, "EFI/BOOT/grub2.cfg": CFG,
                           "EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", config=emb)},
                name="b.raw")
    assert r["boot.chain"].result == "fail"


def test_loader_without_mods_and_grub_cfg_beside_is_judged_as_grub(tmp_path):
    r = _verify(tmp_path, {"EFI/BOOT/BOOTAA64.EFI": g.make_loader("aarch64", mods=False)})
    assert r["boot.chain"].result == "pass" and "no GRUB 'mods' section" in \
        r["boot.chain"].detail


# --- real tools: grub-mkimage, trixie's systemd-boot --------------------------------------

@pytest.fixture(scope="module")
def grub_modules(pytestconfig):
    if shutil.which("grub-mkimage") is None:
        pytest.skip("grub-mkimage (grub-common) missing")
    return debian_tree(pytestconfig, "trixie", "arm64", "grub-efi-arm64-bin") / \
        "usr/lib/grub/arm64-efi"


@pytest.mark.network
@pytest.mark.parametrize("prefix,cfg_at,embedded,verdict", [
    ("/EFI/BOOT", "EFI/BOOT/grub.cfg", None, "pass"),
    ("/EFI/debian", "EFI/debian/grub.cfg", None, "pass"),
    ("/EFI/BOOT", "EFI/debian/grub.cfg", None, "fail"),
    ("/EFI/BOOT", "grub2/grub.cfg", "set prefix=($root)/grub2\n", "pass"),
])
def test_real_grub_mkimage_prefixes(tmp_path, grub_modules, prefix, cfg_at, embedded,
                                    verdict):
    out = tmp_path / "grub.efi"
    cmd = ["grub-mkimage", "-O", "arm64-efi", "-d", grub_modules, "-p", prefix, "-o", out]
    if embedded:
        (tmp_path / "emb.cfg").write_text(embedded)
        cmd += ["-c", tmp_path / "emb.cfg"]
    g.run(*cmd, "part_gpt", "fat", "normal", "linux", "configfile")
    r = _verify(tmp_path, {"EFI/BOOT/grub.cfg": None, cfg_at: CFG,
                           "EFI/BOOT/BOOTAA64.EFI": out.read_bytes()})
    assert r["boot.pe"].result == "pass"
    assert r["boot.chain"].result == verdict, r["boot.chain"].detail
    assert f"prefix '{prefix}'" in r["boot.chain"].detail


@pytest.mark.network
@pytest.mark.parametrize("search,verdict", [(True, "pass"), (False, "skip")])
def test_real_grub_mkstandalone_memdisk(tmp_path, grub_modules, search, verdict):
    """grub-mkstandalone: prefix (memdisk)/boot/grub, grub.cfg in a tar memdisk; $root
    starts on the memdisk, so only a config that searches the ESP names files verify reads."""
    cfg = tmp_path / "mem.cfg"
    cfg.write_bytes((b"search --file --set=root /vmlinuz\n" if search else b"") + CFG)
    out = tmp_path / "standalone.efi"
    g.run("grub-mkstandalone", "-O", "arm64-efi", "-d", grub_modules, "-o", out,
          f"boot/grub/grub.cfg={cfg}")
    r = _verify(tmp_path, {"EFI/BOOT/grub.cfg": None, "EFI/BOOT/BOOTAA64.EFI": out.read_bytes()})
    assert r["boot.chain"].result == verdict, r["boot.chain"].detail
    assert "prefix '(memdisk)/boot/grub'" in r["boot.chain"].detail
    assert "memdisk" in r["boot.chain"].detail


@pytest.mark.network
def test_real_grub_mkimage_arm_efi_prefix(pytestconfig, tmp_path):
    """AArch32 GRUB: grub_module_info32 (magic, offset, size) instead of the 64-bit form."""
    if shutil.which("grub-mkimage") is None:
        pytest.skip("grub-mkimage (grub-common) missing")
    mods = debian_tree(pytestconfig, "trixie", "armhf", "grub-efi-arm-bin") / \
        "usr/lib/grub/arm-efi"
    out = tmp_path / "grub.efi"
    g.run("grub-mkimage", "-O", "arm-efi", "-d", mods, "-p", "/EFI/debian", "-o", out,
          "part_gpt", "fat", "normal", "linux", "configfile")
    for cfg_at, verdict in (("EFI/debian/grub.cfg", "pass"), ("grub/grub.cfg", "fail")):
        r = _verify(tmp_path, {"EFI/BOOT/grub.cfg": None, cfg_at: CFG,
                               "EFI/BOOT/BOOTARM.EFI": out.read_bytes()}, arch="armv7",
                    name=f"{verdict}.raw")
        assert r["boot.chain"].result == verdict, r["boot.chain"].detail
        assert "prefix '/EFI/debian'" in r["boot.chain"].detail


@pytest.fixture(scope="module")
def systemd_boot(pytestconfig):
    tree = debian_tree(pytestconfig, "trixie", "arm64", "systemd-boot-efi")
    return (tree / "usr/lib/systemd/boot/efi/systemd-bootaa64.efi").read_bytes()


@pytest.mark.network
def test_real_systemd_boot_type1(tmp_path, systemd_boot):
    r = _verify(tmp_path, _sd_files(systemd_boot, **{
        "loader/loader.conf": b"timeout 0\n",
        "loader/entries/debian.conf": _entry("/vmlinuz"), "vmlinuz": g.make_kernel("aarch64"),
        "initrd.img": g.make_initramfs()}))
    assert r["boot.chain"].result == "pass", r["boot.chain"].detail
    assert r["boot.pe"].result == "pass" and _bad(r) == []


@pytest.mark.network
def test_real_systemd_boot_type2_with_our_uki(tmp_path, systemd_boot, pytestconfig):
    from builder.payload.uki import build_uki, find_systemd_stub
    tree = debian_tree(pytestconfig, "trixie", "arm64", "systemd-boot-efi")
    (tmp_path / "k").write_bytes(g.make_kernel("aarch64"))
    (tmp_path / "i").write_bytes(g.make_initramfs())
    uki = build_uki(stub=find_systemd_stub(tree, "aarch64"), kernel=tmp_path / "k",
                    initrd=tmp_path / "i", cmdline="console=ttyAMA0", osrel="ID=debian\n",
                    uname=g.KVER, out=tmp_path / "uki.efi")
    r = _verify(tmp_path, _sd_files(systemd_boot, **{
        "EFI/Linux/debian.efi": Path(uki).read_bytes()}))
    assert r["boot.chain"].result == "pass", r["boot.chain"].detail
    assert "/EFI/Linux/debian.efi: UKI" in r["boot.chain"].detail and _bad(r) == []
    r = _verify(tmp_path, _sd_files(systemd_boot), name="empty.raw")
    assert r["boot.chain"].result == "fail" and "finds no entry" in r["boot.chain"].detail


# --- verify's verdict agrees with a real boot (QEMU + AAVMF) ------------------------------

def _build_recipe(pytestconfig, tmp_path, recipe: str) -> tuple:
    """Build a ready recipe (cache shared with the fetches above); (image, ESP offset)."""
    import json
    import subprocess
    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "recipes" / f"{recipe}.yaml", tmp_path / f"{recipe}.yaml")
    env = dict(os.environ, ARMVM_CACHE_DIR=str(pytestconfig.cache.mkdir("armvm-debian")))
    res = subprocess.run([sys.executable, "-m", "builder", "build", "-q",
                          tmp_path / f"{recipe}.yaml", "-o", tmp_path / "out"], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / f"{recipe}.manifest.json").read_text())
    esp = next(p for p in manifest["layout"]["partitions"] if p["kind"] == "esp")
    return tmp_path / "out" / f"{recipe}.raw", esp["offset"]


@pytest.mark.network
@pytest.mark.boot
def test_real_boot_systemd_boot_with_our_uki_in_efi_linux(pytestconfig, tmp_path,
                                                          systemd_boot):
    """Our UKI image rearranged with mtools: trixie's systemd-boot at the removable path,
    the UKI as a Type #2 entry. verify passes it, and it boots to the marker."""
    from builder.run.boot import boot_image
    img, off = _build_recipe(pytestconfig, tmp_path, "debian-arm64-fast")
    i = f"{img}@@{off}"
    (tmp_path / "sdboot.efi").write_bytes(systemd_boot)
    (tmp_path / "loader.conf").write_text("timeout 0\n")
    g.run("mmd", "-i", i, "::/EFI/Linux", "::/loader")
    g.run("mcopy", "-i", i, "::/EFI/BOOT/BOOTAA64.EFI", tmp_path / "uki.efi")
    g.run("mcopy", "-i", i, tmp_path / "uki.efi", "::/EFI/Linux/debian.efi")
    g.run("mcopy", "-o", "-i", i, tmp_path / "sdboot.efi", "::/EFI/BOOT/BOOTAA64.EFI")
    g.run("mcopy", "-i", i, tmp_path / "loader.conf", "::/loader/loader.conf")
    r = verify.verify_image(img).by_id()
    assert r["boot.chain"].result == "pass" and "systemd-boot" in r["boot.chain"].detail
    assert [c for c in _bad(r) if c[1] == "fail"] == []
    res = boot_image(img, timeout=240)
    assert res.ok, res.reason


@pytest.mark.network
@pytest.mark.boot
def test_real_boot_grub_cfg_where_grub_never_looks(pytestconfig, tmp_path):
    """Our GRUB (prefix /EFI/BOOT) with grub.cfg moved to /EFI/debian: verify fails
    boot.chain, and the guest indeed stops at the grub> prompt."""
    from builder.run.boot import boot_image
    img, off = _build_recipe(pytestconfig, tmp_path, "debian-arm64")
    i = f"{img}@@{off}"
    g.run("mmd", "-i", i, "::/EFI/debian")
    g.run("mmove", "-i", i, "::/EFI/BOOT/grub.cfg", "::/EFI/debian/grub.cfg")
    r = verify.verify_image(img).by_id()
    assert r["boot.chain"].result == "fail" and "grub> prompt" in r["boot.chain"].detail
    res = boot_image(img, timeout=60)
    assert not res.ok and "grub>" in res.console, res.reason
