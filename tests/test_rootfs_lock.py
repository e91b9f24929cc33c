"""The lock pins the root's whole package set; a locked build makes the root from exactly those
.debs (a local repository for mmdebstrap), online or offline from a vendor export.

Unit tests: the lock's `rootfs` section, the dpkg status reader, the local repository (its
Packages index read back by python-debian). End to end (network + mmdebstrap, arm64
`essential` root, a few minutes under qemu-user): lock -> build with the lock -> vendor ->
offline build with an empty cache and the mirror pointed at a closed port gives the same
image bytes; a wrong root sha256 in the lock and a vendor folder missing a root .deb are
clear errors naming the package.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import ArmvmError
from builder.inputs.lock import LockedPackage, lock_to_json, read_lock
from builder.payload.rootfs.repo import packages_in_tar, parse_status, write_repo
from tests.debrepo import closed_port_url, make_deb

SHA = "ab" * 32


def _lock_data(**rootfs):
    return {"format": 1, "source_date_epoch": 1, "mirror": "http://example.invalid/debian",
            "snapshot_mirror": None, "suite": "trixie", "packages": {}, "rootfs": rootfs}


def test_lock_rootfs_section_round_trips(tmp_path):
    p = tmp_path / "x.lock"
    entry = {"version": "1.0", "filename": "pool/main/b/bash/bash_1.0_arm64.deb", "sha256": SHA,
             "size": 10, "architecture": "arm64", "depends": ""}
    p.write_text(json.dumps(_lock_data(bash=entry)))
    lock = read_lock(p)
    assert lock.rootfs["bash"] == LockedPackage("bash", "1.0", entry["filename"], SHA, 10, "arm64", "")
    assert json.loads(lock_to_json(lock))["rootfs"]["bash"] == entry
    # a lock without a root keeps its old shape
    p.write_text(json.dumps(dict(_lock_data(), rootfs={})))
    assert "rootfs" not in json.loads(lock_to_json(read_lock(p)))


@pytest.mark.parametrize("entry, words", [
    ({"version": "1", "filename": "pool/x.deb", "sha256": "zz", "size": 1}, "rootfs.bash.sha256"),
    ({"version": "1", "filename": "../x.deb", "sha256": SHA, "size": 1}, "rootfs.bash.filename"),
    ({"version": "1", "filename": "pool/x.deb", "sha256": SHA, "size": -1}, "rootfs.bash.size"),
    ("nope", "rootfs.bash: must be an object"),
])
def test_bad_rootfs_lock_entries_are_named(tmp_path, entry, words):
    p = tmp_path / "x.lock"
    p.write_text(json.dumps(_lock_data(bash=entry)))
    with pytest.raises(ArmvmError, match=words.replace(".", r"\.")):
        read_lock(p)


def test_dpkg_status_lists_only_installed_packages():
    text = ("Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: arm64\n\n"
            "Package: b\nStatus: deinstall ok config-files\nVersion: 2\n\n"
            "Package: c\nStatus: install ok installed\nVersion: 1:3\nArchitecture: all\n"
            "Description: x\n more\n")
    assert parse_status(text) == [("a", "1", "arm64"), ("c", "1:3", "all")]


def test_packages_in_tar_reads_the_roots_status(tmp_path):
    import io
    import tarfile
    data = b"Package: dash\nStatus: install ok installed\nVersion: 0.5\nArchitecture: arm64\n"
    with tarfile.open(tmp_path / "r.tar", "w") as tar:
        info = tarfile.TarInfo("./var/lib/dpkg/status")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert packages_in_tar(tmp_path / "r.tar") == [("dash", "0.5", "arm64")]


def _deb(tmp_path, name, version, **extra):
    control = {"Package": name, "Version": version, "Architecture": "arm64", "Maintainer": "t <t@t>",
               "Description": "test\n second line\n .\n third", **extra}
    path = tmp_path / f"{name}.deb"
    blob = make_deb(path, control, [("./usr/", "dir", None, 0o755)])
    return path, hashlib.sha256(blob).hexdigest(), len(blob)


def test_local_repo_has_a_packages_index_apt_can_read(tmp_path):
    from debian.deb822 import Packages
    a, sa, na = _deb(tmp_path, "alpha", "1.0", Essential="yes", Priority="required")
    b, sb, nb = _deb(tmp_path, "beta", "2:3.1-1", Depends="alpha (>= 1.0)")
    repo = tmp_path / "repo"
    write_repo(repo, [("beta", "2:3.1-1", b, sb, nb), ("alpha", "1.0", a, sa, na)], "trixie", "arm64")
    text = (repo / "Packages").read_text()
    paras = list(Packages.iter_paragraphs(text.splitlines(), use_apt_pkg=False))
    assert [p["Package"] for p in paras] == ["alpha", "beta"]
    assert paras[0]["Essential"] == "yes" and paras[0]["Priority"] == "required"
    assert paras[1]["Depends"] == "alpha (>= 1.0)" and paras[1]["SHA256"] == sb
    assert paras[0]["Description"].splitlines()[1:] == [" second line", " .", " third"]
    for p in paras:        # every Filename is in the folder with the listed size and hash
        f = repo / p["Filename"]
        assert f.stat().st_size == int(p["Size"])
        assert hashlib.sha256(f.read_bytes()).hexdigest() == p["SHA256"]
    release = (repo / "Release").read_text()
    assert hashlib.sha256((repo / "Packages").read_bytes()).hexdigest() in release


def test_local_repo_refuses_a_deb_that_is_not_the_pinned_package(tmp_path):
    a, sa, na = _deb(tmp_path, "alpha", "1.0")
    with pytest.raises(ArmvmError, match="names alpha 1.0, but the lock pins alpha 1.1"):
        write_repo(tmp_path / "repo", [("alpha", "1.1", a, sa, na)], "trixie", "arm64")


# --- end to end -----------------------------------------------------------------------------

TINY = """\
name: tiny-root
arch: aarch64
debian:
  suite: trixie
  components: [main]
kernel:
  package: linux-image-cloud-arm64
initramfs:
  compression: gzip
bootloader:
  type: grub
rootfs:
  debian:
    variant: essential
    packages: []
  hostname: tiny
  files: [{file: init.sh, dest: sbin/init, mode: "0755"}]   # essential has no init
disk:
  size: 1GiB
  partitions:
    - {type: esp, name: ESP, size: 256MiB, label: ESP}
    - {type: root, name: root, format: ext4}
"""

def e2e(test):
    for mark in (pytest.mark.network,
                 pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1", reason="ARMVM_OFFLINE_TESTS=1"),
                 pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap is not installed")):
        test = mark(test)
    return test


def cli(*args, env=None, timeout=3600):
    e = dict(os.environ, **(env or {}))
    e.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout)


def write_recipe(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(TINY)
    (folder / "init.sh").write_text("#!/bin/sh\necho tiny root up\nexec /bin/sh\n")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A locked tiny recipe, built once with its lock (normal cache, so reruns are warm), and
    its vendor export."""
    d = tmp_path_factory.mktemp("rootlock")
    recipe = d / "a" / "tiny.yaml"
    write_recipe(recipe.parent)
    res = cli("lock", "-q", recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("build", "-q", "--json", recipe, "-o", d / "out1")
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("vendor", "-q", recipe, d / "vendor")
    assert res.returncode == 0, res.stderr[-3000:]
    return d, recipe, json.loads((recipe.parent / "tiny-root.lock").read_text())


def offline_build(d: Path, lock: dict, vendor: Path, name: str):
    """Build from a copy of the recipe with `lock`, offline, empty cache, the mirror closed."""
    c = d / name
    write_recipe(c)
    (c / "tiny-root.lock").write_text(json.dumps(lock))
    return cli("build", "-q", c / "tiny.yaml", "-o", c / "out", "--offline", "--vendor", vendor,
               env={"ARMVM_CACHE_DIR": str(c / "cache"), "ARMVM_MIRROR": closed_port_url()}), c


@e2e
def test_lock_pins_the_whole_root_and_vendor_rebuilds_it_offline_byte_for_byte(locked):
    d, recipe, lock = locked
    root = lock["rootfs"]
    # the essential set with every file pinned: more than the named packages (none here)
    assert {"base-files", "dpkg", "libc6", "coreutils", "bash"} <= set(root)
    assert all(len(p["sha256"]) == 64 and p["filename"].startswith("pool/") for p in root.values())
    assert "bash" not in lock["packages"]          # the image's own packages stay apart
    vendored = {p.name for p in (d / "vendor").iterdir()}
    assert {os.path.basename(p["filename"]) for p in root.values()} <= vendored
    manifest = json.loads((d / "out1" / "tiny-root.manifest.json").read_text())
    rootpart = next(p for p in manifest["layout"]["partitions"] if p["kind"] == "root")
    assert sorted(p["name"] for p in rootpart["packages"]) == sorted(root)
    pinned = {i["origin"] for i in manifest["inputs"] if i["role"] == "rootfs.debian"}
    assert pinned == {f"debian:{n}={p['version']}" for n, p in root.items()}

    res, c = offline_build(d, lock, d / "vendor", "offline")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sha(c / "out" / "tiny-root.raw") == sha(d / "out1" / "tiny-root.raw")
    assert sha(c / "out" / "tiny-root.manifest.json") == sha(d / "out1" / "tiny-root.manifest.json")
    # the root's apt sources name the lock's mirror, not the build's local repository
    off = next(p for p in json.loads((c / "out" / "tiny-root.manifest.json").read_text())["layout"]
               ["partitions"] if p["kind"] == "root")["offset"]
    sources = subprocess.run(["debugfs", "-R", "cat /etc/apt/sources.list",
                              f"{c / 'out' / 'tiny-root.raw'}?offset={off}"], capture_output=True).stdout
    assert sources.decode().split() == ["deb", lock["mirror"], "trixie", "main"]


@e2e
def test_a_wrong_root_sha256_in_the_lock_is_named(locked):
    d, _, lock = locked
    bad = json.loads(json.dumps(lock))
    bad["rootfs"]["dash"]["sha256"] = "0" * 64
    res, c = offline_build(d, bad, d / "vendor", "badsha")
    assert res.returncode == 3, res.stderr[-2000:]
    assert "dash" in res.stderr and "0" * 64 in res.stderr and "Traceback" not in res.stderr
    assert not (c / "out" / "tiny-root.raw").exists()


@e2e
def test_a_vendor_folder_missing_a_root_deb_is_named(locked):
    d, _, lock = locked
    partial = d / "vendor-partial"
    shutil.copytree(d / "vendor", partial)
    gone = os.path.basename(lock["rootfs"]["grep"]["filename"])
    (partial / gone).unlink()
    res, c = offline_build(d, lock, partial, "missing")
    assert res.returncode != 0
    assert gone in res.stderr and "grep" in res.stderr and "Traceback" not in res.stderr
    assert not (c / "out" / "tiny-root.raw").exists()
