"""os.* on other tools' images: an initramfs without armvm-build's config copy and without
etc/armvm/modules.load (initramfs-tools, dracut) is judged with --kernel-config, and its
modules count as present."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.verify.checks_os import OS_IDS  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd"),
                                reason="needs fdisk, dosfstools and mtools")


def _peer_initramfs() -> bytes:
    """Modules and modules.builtin, but no lib/modules/<v>/config and no modules.load."""
    files = [f for f in g.initramfs_files(config=None) if f[0] != "etc/armvm/modules.load"
             and f[0] != "etc/armvm"]
    return g.make_initramfs(files)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    d = tmp_path_factory.mktemp("peer")
    return g.build_image(d, g.ImageSpec(esp_files={"initrd.img": _peer_initramfs()}))


def test_peer_image_skips_without_a_config(peer):
    r = verify.verify_image(peer).by_id()
    assert r["os.gic"].result == "skip" and "--kernel-config" in r["os.gic"].detail
    assert verify.verify_image(peer).exit_code(strict=True) == 1


def test_peer_image_judged_with_kernel_config(peer, tmp_path):
    cfg = tmp_path / "config-6.1"
    cfg.write_text(g.GOOD_CONFIG)
    rep = verify.verify_image(peer, kernel_config=cfg)
    r = rep.by_id()
    for cid in OS_IDS:
        assert r[cid].result == "pass", (cid, r[cid].detail)
    assert "on demand" in r["os.virtio"].detail and str(cfg) in r["os.gic"].detail
    assert rep.exit_code(strict=True) == 0
    cfg.write_text(g.GOOD_CONFIG.replace("CONFIG_ARM_GIC_V3=y", "# CONFIG_ARM_GIC_V3 is not set"))
    r = verify.verify_image(peer, kernel_config=cfg).by_id()
    assert r["os.gic"].result == "fail" and "ARM_GIC_V3 is not set" in r["os.gic"].detail


def test_kernel_config_without_initramfs(tmp_path):
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={
        "EFI/BOOT/grub.cfg": b"menuentry k {\n linux /vmlinuz root=PARTUUID=x\n}\n",
        "initrd.img": None}))
    cfg = tmp_path / "config"
    cfg.write_text(g.GOOD_CONFIG.replace("CONFIG_RTC_DRV_EFI=y", "CONFIG_RTC_DRV_EFI=m"))
    r = verify.verify_image(img, kernel_config=cfg).by_id()
    assert r["os.gic"].result == "pass" and r["os.psci"].result == "pass"
    assert r["os.rtc-efi"].result == "fail"      # a module, and no initramfs to carry it


def test_kernel_config_bad_input(peer, tmp_path):
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "builder", "verify", *map(str, a)],
                              capture_output=True, text=True, timeout=120)
    p = cli(peer, "--kernel-config", tmp_path / "missing")
    assert p.returncode == 2 and "cannot read" in p.stderr
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    p = cli(peer, "--kernel-config", junk)
    assert p.returncode == 3 and "not a kernel config" in p.stderr
    good = tmp_path / "good"
    good.write_text(g.GOOD_CONFIG)
    p = cli(peer, "--kernel-config", good, "--strict")
    assert p.returncode == 0, p.stdout


def _uki_image(tmp_path, release: str) -> Path:
    """A UKI whose .uname is ``release`` and whose initramfs carries no config."""
    files = [f for f in g.initramfs_files(config=None, ver=release) if "etc/armvm" not in f[0]]
    secs = [(".osrel", b"ID=test\n"), (".cmdline", b"console=ttyAMA0\0"),
            (".uname", release.encode()), (".initrd", g.make_initramfs(files)),
            (".linux", g.make_kernel("aarch64"))]
    uki = g.make_pe(0xAA64, 0x20B, 10, secs)
    return g.build_image(tmp_path, g.ImageSpec(esp_files={
        "EFI/BOOT/grub.cfg": None, "vmlinuz": None, "initrd.img": None,
        "EFI/BOOT/BOOTAA64.EFI": uki}))


def _cli(*a, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "builder", "verify", *map(str, a)],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **(env or {})))


def test_fetch_config_needs_a_debian_release(tmp_path):
    p = _cli(_uki_image(tmp_path, g.KVER), "--fetch-config")
    assert p.returncode == 1 and "not a Debian kernel release" in p.stderr, p.stderr


@pytest.mark.network
def test_fetch_config_from_the_archive(tmp_path, pytestconfig):
    """The booted kernel's linux-image-<release> from the archive gives /boot/config-*."""
    import os
    if os.environ.get("ARMVM_OFFLINE_TESTS") == "1":
        pytest.skip("ARMVM_OFFLINE_TESTS=1")
    from builder.inputs.cache import Cache
    from builder.inputs.debian.archive import DebianArchive
    from builder.inputs.sources import Fetcher
    cache = pytestconfig.cache.mkdir("armvm-debian")
    archive = DebianArchive(Fetcher(cache=Cache(Path(cache)), progress=False), mirror=None,
                            suite="trixie", components=["main"], arch="arm64")
    release = archive.resolve_kernel("linux-image-cloud-arm64").name[len("linux-image-"):]
    img = _uki_image(tmp_path, release)
    p = _cli(img, "--strict")
    assert p.returncode == 1 and "kernel-config" in p.stdout
    p = _cli(img, "--fetch-config", "--json", env={"ARMVM_CACHE_DIR": str(cache)})
    import json
    rep = {c["id"]: c for c in json.loads(p.stdout)["checks"]}
    for cid in OS_IDS:
        assert rep[cid]["result"] == "pass", (cid, rep[cid])
    assert f"config-{release}" in rep["os.gic"]["detail"]
