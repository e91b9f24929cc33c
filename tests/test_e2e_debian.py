"""End to end, with real parts: both ready recipes built from the real Debian archive, judged
by external validators and our verify, booted under QEMU + AAVMF, and rebuilt byte for byte
from a lock (also from a vendor export with an empty cache, offline).

Skipped with ARMVM_OFFLINE_TESTS=1 (no archive) — CI does not set it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import diskcheck

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.network,
              pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1", reason="ARMVM_OFFLINE_TESTS=1")]
RECIPES = {"arm64": "debian-arm64", "armhf": "debian-armhf"}
# The versioned package each recipe's kernel meta-package must resolve to (FIELD-NOTES:
# linux-image-cloud-arm64 -> linux-image-6.12.117+deb13-cloud-arm64, version 6.12.117-1).
KERNEL_ORIGIN = {"arm64": r"debian:linux-image-(\d+\.\d+\.\d+)\+deb\d+-cloud-arm64=\1-\d+",
                 "armhf": r"debian:linux-image-(\d+\.\d+\.\d+)\+deb\d+-armmp-lpae=\1-\d+"}


def kernel_from_deb(cache_dir: Path, deb_sha256: str) -> tuple:
    """(name, sha256) of boot/vmlinuz-* read with dpkg-deb from the cached .deb itself,
    after checking the .deb's own sha256: the expected bytes come from the input, not from
    the builder's manifest."""
    blob = cache_dir / "sha256" / deb_sha256[:2] / deb_sha256
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == deb_sha256
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(blob)], capture_output=True,
                         check=True).stdout
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isfile() and m.name.lstrip("./").startswith("boot/vmlinuz-"):
                return m.name, hashlib.sha256(tf.extractfile(m).read()).hexdigest()
    raise AssertionError(f"no boot/vmlinuz-* in {blob}")


def cli(*args, env=None, cwd=None, timeout=1800):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def built(tmp_path_factory, cache_dir):
    """Build both ready recipes once (copies, so no lock file lands in the repository)."""
    out = {}
    for key, name in RECIPES.items():
        d = tmp_path_factory.mktemp(key)
        shutil.copy(ROOT / "recipes" / f"{name}.yaml", d / f"{name}.yaml")
        res = cli("build", "-q", d / f"{name}.yaml", "-o", d / "out", "--json",
                  env={"ARMVM_CACHE_DIR": str(cache_dir), "SOURCE_DATE_EPOCH": "1700000000"})
        out[key] = (d, res)
    return out


def _result(built, key):
    d, res = built[key]
    assert res.returncode == 0, res.stderr[-3000:]
    return d, json.loads(res.stdout)


@pytest.mark.parametrize("key", sorted(RECIPES))
def test_ready_recipe_builds_and_passes_validators(built, key, cache_dir):
    d, result = _result(built, key)
    name = RECIPES[key]
    image = d / "out" / f"{name}.raw"
    manifest = json.loads((d / "out" / f"{name}.manifest.json").read_text())
    esp = next(p for p in manifest["layout"]["partitions"] if p["kind"] == "esp")
    diskcheck.sfdisk_verify(image)
    diskcheck.fsck_fat(image, esp["offset"], esp["size"])
    loader = "EFI/BOOT/BOOTAA64.EFI" if key == "arm64" else "EFI/BOOT/BOOTARM.EFI"
    assert {loader, "EFI/BOOT/grub.cfg", "vmlinuz", "initrd.img"} <= {f["dest"] for f in esp["files"]}
    kernel = next(i for i in manifest["inputs"] if i["role"] == "kernel")
    assert re.fullmatch(KERNEL_ORIGIN[key], kernel["origin"]), kernel["origin"]
    # the kernel on the ESP is byte for byte the one in Debian's package (from the .deb)
    _, vmlinuz_sha = kernel_from_deb(cache_dir, kernel["sha256"])
    expected = {f["dest"]: f["sha256"] for f in esp["files"]}
    expected["vmlinuz"] = vmlinuz_sha
    diskcheck.mtools_readback(image, esp["offset"], expected)
    report = json.loads((d / "out" / f"{name}.verify.json").read_text())
    by_id = {c["id"]: c for c in report["checks"]}
    for cid in ("gpt.pmbr", "gpt.primary", "gpt.backup", "esp.type", "esp.fat32", "boot.path", "boot.pe",
                "boot.chain", "boot.kernel", "os.console.pl011", "os.gic", "os.rtc-efi"):
        assert by_id[cid]["result"] == "pass", by_id[cid]
    # our images carry the kernel config: driver checks are judged, not skipped
    assert by_id["os.virtio"]["result"] == "pass", by_id["os.virtio"]
    assert by_id["os.xen-pv"]["result"] == "pass", by_id["os.xen-pv"]


@pytest.mark.boot
@pytest.mark.parametrize("key", sorted(RECIPES))
def test_ready_recipe_boots_with_runtime_checks(built, key):
    d, _ = _result(built, key)
    image = d / "out" / f"{RECIPES[key]}.raw"
    res = cli("boot", image, "--checks", "--json", "--timeout", "240", timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    out = json.loads(res.stdout)
    by_id = {c["id"]: c["result"] for c in out["checks"]}
    for cid in ("rt.removable-boot", "rt.userspace", "rt.gic", "rt.efi", "rt.rtc", "rt.console", "rt.virtio",
                "rt.dt"):
        assert by_id.get(cid) == "pass", (cid, by_id)
    if key == "arm64":
        assert by_id.get("rt.acpi") == "pass", by_id


def _digests(out: Path, name: str) -> dict:
    return {s: hashlib.sha256((out / f"{name}{s}").read_bytes()).hexdigest()
            for s in (".raw", ".manifest.json")}


def test_lock_reproduces_bytes_across_dirs_env_and_vendor(tmp_path, cache_dir):
    """Lock the default recipe, build twice from the lock in different folders with a
    different umask, TZ and locale, then again offline from a vendor export with an empty
    cache: identical image, manifest and initramfs."""
    name = RECIPES["arm64"]
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    shutil.copy(ROOT / "recipes" / f"{name}.yaml", a / f"{name}.yaml")
    env = {"ARMVM_CACHE_DIR": str(cache_dir)}
    res = cli("lock", "-q", a / f"{name}.yaml", env=env)
    assert res.returncode == 0, res.stderr
    lock = json.loads((a / f"{name}.lock").read_text())
    assert any(p.startswith("linux-image-") for p in lock["packages"])
    shutil.copy(a / f"{name}.yaml", b / f"{name}.yaml")
    shutil.copy(a / f"{name}.lock", b / f"{name}.lock")
    r1 = subprocess.run(["sh", "-c", f"umask 022; exec {sys.executable} -m builder build -q {name}.yaml -o out"],
                        cwd=a, env=dict(os.environ, **env, TZ="UTC", LC_ALL="C.UTF-8"), capture_output=True, text=True)
    r2 = subprocess.run(["sh", "-c", f"umask 077; exec {sys.executable} -m builder build -q {name}.yaml -o out"],
                        cwd=b, env=dict(os.environ, **env, TZ="Pacific/Chatham", LC_ALL="C"),
                        capture_output=True, text=True)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    da, db = _digests(a / "out", name), _digests(b / "out", name)
    assert da == db
    # vendor export, then an offline build with an empty cache from the export alone
    res = cli("vendor", "-q", a / f"{name}.yaml", tmp_path / "vendor", env=env)
    assert res.returncode == 0, res.stderr
    c = tmp_path / "c"
    c.mkdir()
    shutil.copy(a / f"{name}.yaml", c / f"{name}.yaml")
    shutil.copy(a / f"{name}.lock", c / f"{name}.lock")
    r3 = cli("build", "-q", c / f"{name}.yaml", "-o", c / "out", "--offline", "--vendor", tmp_path / "vendor",
             env={"ARMVM_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert r3.returncode == 0, r3.stderr
    assert _digests(c / "out", name) == da
    initrds = {json.dumps([f["sha256"] for p in json.loads((d / "out" / f"{name}.manifest.json").read_text())
                           ["layout"]["partitions"] if p["kind"] == "esp" for f in p["files"]
                           if f["dest"] == "initrd.img"]) for d in (a, b, c)}
    assert len(initrds) == 1


@pytest.mark.boot
def test_fast_profile_uki_boots_and_direct_boot_works(tmp_path, cache_dir):
    """The fast profile: a UKI at the removable path (no GRUB on the ESP), booted by AAVMF,
    and the same kernel/initramfs started directly with -kernel/-initrd/-append."""
    name = "debian-arm64-fast"
    shutil.copy(ROOT / "recipes" / f"{name}.yaml", tmp_path / f"{name}.yaml")
    res = cli("build", "-q", tmp_path / f"{name}.yaml", "-o", tmp_path / "out",
              env={"ARMVM_CACHE_DIR": str(cache_dir)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    manifest = json.loads((out / f"{name}.manifest.json").read_text())
    dests = {f["dest"] for p in manifest["layout"]["partitions"] if p["kind"] == "esp" for f in p["files"]}
    assert dests == {"EFI/BOOT/BOOTAA64.EFI"}, dests          # kernel and initramfs live inside the UKI
    report = {c["id"]: c for c in json.loads((out / f"{name}.verify.json").read_text())["checks"]}
    assert report["boot.chain"]["result"] == "pass" and "UKI" in report["boot.chain"]["detail"]
    assert (out / f"{name}.vmlinuz").exists() and (out / f"{name}.cmdline").read_text().strip()
    res = cli("boot", out / f"{name}.raw", "--json", "--timeout", "240", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert json.loads(res.stdout)["ok"]
    res = cli("boot", "--direct", out / f"{name}.raw", "--json", "--timeout", "240", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    direct = json.loads(res.stdout)
    assert direct["ok"] and "pflash" not in " ".join(direct["command"])
