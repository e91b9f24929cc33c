"""DebianArchive against a tiny signed repository served on 127.0.0.1 (tests/debrepo.py)."""
from __future__ import annotations

import lzma
import os
from pathlib import Path

import pytest

from builder.inputs.cache import Cache
from builder.inputs.debian.archive import DebianArchive, kernel_dependency
from builder.errors import ArmvmError, SourceError
from builder.inputs.lock import export_vendor, read_lock, write_lock
from builder.inputs.sources import Fetcher
from tests.debrepo import SUITE, closed_port_url, debrepo, debrepo_files  # noqa: F401

KERNEL = "linux-image-9.9.9-test-arm64"


def make(debrepo, cache_dir: Path, *, arch="arm64", offline=False, lock=None, keyring=None,
         vendor=(), mirror=None, sleeps=None, suite=SUITE):
    fetcher = Fetcher(cache=Cache(cache_dir), offline=offline, vendor_dirs=vendor,
                      progress=False, backoff=0.001,
                      sleep=(sleeps.append if sleeps is not None else lambda s: None))
    return DebianArchive(fetcher, mirror=mirror or debrepo.url, suite=suite,
                         components=["main"], arch=arch,
                         keyring=keyring or debrepo.files.keyring, lock=lock, offline=offline)


def cache_is_empty(root: Path) -> bool:
    """No blob, tree or ref anywhere (tmp/ may exist but must be empty)."""
    leftovers = [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    trees = list((root / "trees").glob("*")) if (root / "trees").exists() else []
    return not leftovers and not trees


def test_resolve_fetch_extract(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    assert (pkg.name, pkg.version, pkg.architecture) == ("busybox-static", "1.0-1", "arm64")
    art = archive.fetch(pkg)
    served = debrepo.files.root / pkg.filename
    assert art.path.read_bytes() == served.read_bytes() and art.sha256 == pkg.sha256
    assert art.origin == "debian:busybox-static=1.0-1" and art.size == served.stat().st_size
    tree = archive.extract(pkg)                           # data.tar.zst
    busybox = tree / "usr/bin/busybox"
    assert busybox.read_bytes() == b"\x7fELF" * 8
    assert busybox.stat().st_mode & 0o7777 == 0o755      # setuid dropped

    kernel = archive.extract(archive.resolve(KERNEL))     # data.tar.xz
    mod = kernel / "usr/lib/modules/9.9.9-test-arm64"
    assert (kernel / "boot/vmlinuz-9.9.9-test-arm64").read_bytes().startswith(b"MZ fake")
    assert os.path.samefile(mod / "modules.order", mod / "modules.builtin")
    assert os.readlink(mod / "config") == "../../../../boot/config-9.9.9-test-arm64"
    assert (mod / "config").read_text() == "CONFIG_ARM64=y\n"
    assert not os.path.lexists(kernel / "dev-null")       # device node skipped
    assert [p.name for p in archive.pinned()] == ["busybox-static", KERNEL]


def test_meta_package_resolves_to_versioned_kernel(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    assert archive.resolve_kernel("linux-image-test-arm64").name == KERNEL
    assert archive.resolve_kernel(KERNEL).name == KERNEL
    with pytest.raises(ArmvmError, match="neither a versioned linux-image"):
        archive.resolve_kernel("busybox-static")
    assert kernel_dependency("kmod, linux-image-6.1.0-9-arm64 (= 6.1.27-1) | foo") == \
        "linux-image-6.1.0-9-arm64"


def test_unknown_package_suggests_close_match(debrepo, tmp_path):
    with pytest.raises(ArmvmError) as err:
        make(debrepo, tmp_path / "c").resolve("busybox-statc")
    assert "'busybox-statc' not found" in str(err.value)
    assert "did you mean: busybox-static" in str(err.value)
    with pytest.raises(ArmvmError, match="not a Debian package name"):
        make(debrepo, tmp_path / "c").resolve("Bad Name")


def test_virtual_package_names_providers(debrepo, tmp_path):
    with pytest.raises(ArmvmError, match="virtual package.*busybox-static"):
        make(debrepo, tmp_path / "c").resolve("sh-test")


def test_wrong_architecture_names_known_arches(debrepo, tmp_path):
    # Unknown for arm64 while no other architecture's index is known: plain "not found".
    with pytest.raises(ArmvmError, match="'amd64-only-tool' not found"):
        make(debrepo, tmp_path / "c").resolve("amd64-only-tool")
    # Once the amd64 index is in the cache, the message says where the package exists.
    assert make(debrepo, tmp_path / "c", arch="amd64").resolve("amd64-only-tool")
    with pytest.raises(ArmvmError, match="not built for arm64.*exists for: amd64"):
        make(debrepo, tmp_path / "c").resolve("amd64-only-tool")


def test_arch_all_and_gz_fallback(debrepo, tmp_path):
    assert make(debrepo, tmp_path / "c").resolve("tzdata-test").architecture == "all"
    assert debrepo.count("binary-all/Packages.xz") == 1
    armhf = make(debrepo, tmp_path / "c", arch="armhf")
    tree = armhf.extract(armhf.resolve("busybox-static"))
    assert (tree / "bin/busybox").read_bytes() == b"ARM" * 5
    assert debrepo.count("binary-armhf/Packages.gz") == 1


def test_bad_signature_is_refused_and_nothing_cached(debrepo, tmp_path):
    data = bytearray((debrepo.files.root / f"dists/{SUITE}/InRelease").read_bytes())
    at = data.index(b"Architectures: amd64")
    data[at + len("Architectures: ")] = ord("b")          # one byte of signed text
    debrepo.overrides[f"/dists/{SUITE}/InRelease"] = bytes(data)
    with pytest.raises(ArmvmError, match="signature check failed"):
        make(debrepo, tmp_path / "c").resolve("busybox-static")
    assert cache_is_empty(tmp_path / "c")
    assert debrepo.count("Packages.xz") == 0


def test_missing_keyring(debrepo, tmp_path):
    with pytest.raises(ArmvmError, match="keyring .*nope.gpg not found.*debian-archive-keyring"):
        make(debrepo, tmp_path / "c", keyring=tmp_path / "nope.gpg").resolve("busybox-static")
    assert debrepo.requests == []                         # checked before downloading


def test_inrelease_for_another_suite_is_refused(debrepo, tmp_path):
    signed = (debrepo.files.root / f"dists/{SUITE}/InRelease").read_bytes()
    debrepo.overrides["/dists/othersuite/InRelease"] = signed
    with pytest.raises(ArmvmError, match="not 'othersuite'"):
        make(debrepo, tmp_path / "c", suite="othersuite").resolve("busybox-static")


def test_packages_index_sha_mismatch(debrepo, tmp_path):
    path = "/dists/testsuite/main/binary-arm64/Packages.xz"
    real = (debrepo.files.root / path.lstrip("/")).read_bytes()
    forged = lzma.compress(lzma.decompress(real).replace(b"1.0-1", b"6.6-6"))
    debrepo.overrides[path] = forged
    archive = make(debrepo, tmp_path / "c")
    with pytest.raises(SourceError, match="Packages.xz: sha256 mismatch: expected"):
        archive.resolve("busybox-static")
    release = archive._release_info()["files"]["main/binary-arm64/Packages.xz"]
    assert archive.cache.blob(release[0]) is None
    assert not list((tmp_path / "c/trees").glob("*")) if (tmp_path / "c/trees").exists() else True
    assert not list((tmp_path / "c/tmp").iterdir())


def test_deb_sha_mismatch(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    real = bytearray((debrepo.files.root / pkg.filename).read_bytes())
    real[-1] ^= 0xFF                                      # same size, other bytes
    debrepo.overrides[debrepo.deb_url_path("busybox-static")] = bytes(real)
    with pytest.raises(SourceError, match=f"sha256 mismatch: expected {pkg.sha256}, got"):
        archive.extract(pkg)
    assert archive.cache.blob(pkg.sha256) is None
    assert archive.cache.tree(f"deb-{pkg.sha256}") is None


def test_traversal_member_refused(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("evil-traversal")
    with pytest.raises(ArmvmError, match="contains '..'; refusing"):
        archive.extract(pkg)
    assert archive.cache.tree(f"deb-{pkg.sha256}") is None
    assert not list((tmp_path / "c").rglob("escaped"))


def test_unsupported_compression(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    with pytest.raises(ArmvmError, match="data.tar.lzma.*unsupported compression 'lzma'"):
        archive.extract(archive.resolve("lzma-data"))


def test_mirror_unreachable_retries_then_clear_message(debrepo, tmp_path):
    sleeps: list = []
    url = closed_port_url()
    with pytest.raises(SourceError) as err:
        make(debrepo, tmp_path / "c", mirror=url, sleeps=sleeps).resolve("busybox-static")
    assert f"could not download {url}/dists/{SUITE}/InRelease: connection failed" in \
        str(err.value)
    assert "gave up after 3 tries" in str(err.value)
    assert sleeps == [0.001, 0.002]                       # exponential backoff, 3 tries


def test_server_errors_are_retried(debrepo, tmp_path):
    debrepo.fail_first[f"/dists/{SUITE}/InRelease"] = 2
    assert make(debrepo, tmp_path / "c").resolve("busybox-static")
    assert debrepo.count("/InRelease") == 3


def test_offline_with_empty_cache(debrepo, tmp_path):
    with pytest.raises(SourceError, match="offline and no InRelease"):
        make(debrepo, tmp_path / "c", offline=True).resolve("busybox-static")
    assert debrepo.requests == []


def test_warm_rebuild_downloads_only_inrelease_and_offline_works(debrepo, tmp_path):
    first = make(debrepo, tmp_path / "c")
    first.extract(first.resolve_kernel("linux-image-test-arm64"))
    assert debrepo.count(".deb") == 1 and debrepo.count("Packages.xz") == 1
    debrepo.requests.clear()
    again = make(debrepo, tmp_path / "c")
    tree = again.extract(again.resolve_kernel("linux-image-test-arm64"))
    assert debrepo.requests == [f"/dists/{SUITE}/InRelease"]
    debrepo.requests.clear()
    offline = make(debrepo, tmp_path / "c", offline=True)
    assert offline.extract(offline.resolve_kernel("linux-image-test-arm64")) == tree
    assert debrepo.requests == []


def test_lock_round_trip_and_locked_build_makes_no_request(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    kernel = archive.resolve_kernel("linux-image-test-arm64")
    archive.fetch(kernel)
    archive.fetch(archive.resolve("busybox-static"))
    lock = archive.make_lock(1_700_000_000, snapshot_mirror="http://snapshot.invalid/x")
    write_lock(tmp_path / "armvm.lock", lock)
    again = read_lock(tmp_path / "armvm.lock")
    assert again == lock and again.path == str(tmp_path / "armvm.lock")
    assert sorted(again.packages) == ["busybox-static", KERNEL, "linux-image-test-arm64"]
    write_lock(tmp_path / "again.lock", again)
    assert (tmp_path / "again.lock").read_bytes() == (tmp_path / "armvm.lock").read_bytes()

    debrepo.requests.clear()
    locked = make(debrepo, tmp_path / "c", lock=again, keyring=tmp_path / "no-keyring")
    assert locked.resolve_kernel("linux-image-test-arm64") == kernel
    assert (locked.extract(kernel) / "boot/vmlinuz-9.9.9-test-arm64").is_file()
    assert locked.fetch(locked.resolve("busybox-static")).sha256 == again.packages[
        "busybox-static"].sha256
    assert debrepo.requests == []
    with pytest.raises(ArmvmError, match="'tzdata-test' is not pinned in the lock file"):
        locked.resolve("tzdata-test")
    with pytest.raises(ArmvmError, match="pinned for arm64, but this build is for armhf"):
        make(debrepo, tmp_path / "c", lock=again, arch="armhf").resolve("busybox-static")


def test_vendor_export_then_build_from_vendor_with_empty_cache(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    archive.fetch(archive.resolve_kernel("linux-image-test-arm64"))
    lock = archive.make_lock(0)
    vendor = tmp_path / "vendor"
    written = export_vendor(lock, archive.cache, archive.fetcher, vendor)
    assert sorted(p.name for p in written) == sorted(
        os.path.basename(p.filename) for p in lock.packages.values())
    assert debrepo.count(".deb") == 2                     # the meta .deb came from the mirror

    debrepo.requests.clear()
    fresh = make(debrepo, tmp_path / "empty", lock=lock, vendor=[vendor], offline=True)
    tree = fresh.extract(fresh.resolve_kernel("linux-image-test-arm64"))
    assert (tree / "boot/config-9.9.9-test-arm64").read_text() == "CONFIG_ARM64=y\n"
    assert debrepo.requests == []

    (vendor / os.path.basename(lock.packages[KERNEL].filename)).unlink()
    nothing = make(debrepo, tmp_path / "empty2", lock=lock, vendor=[vendor], offline=True)
    with pytest.raises(SourceError) as err:
        nothing.fetch(nothing.resolve(KERNEL))
    message = str(err.value)
    assert lock.packages[KERNEL].filename in message and "offline" in message
    assert "armvm-build vendor" in message and "--vendor DIR" in message
    assert "snapshot_mirror" in message


def test_snapshot_mirror_used_when_mirror_404s(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    lock = archive.make_lock(0)
    lock = type(lock)(source_date_epoch=0, mirror=debrepo.url + "/gone",
                      snapshot_mirror=debrepo.url, suite=SUITE, packages=lock.packages)
    debrepo.requests.clear()
    locked = make(debrepo, tmp_path / "empty", lock=lock, mirror=debrepo.url + "/gone")
    assert locked.fetch(locked.resolve("busybox-static")).sha256 == pkg.sha256
    assert debrepo.requests == ["/gone/" + pkg.filename, "/" + pkg.filename]


def test_cached_tree_is_not_extracted_again(debrepo, tmp_path, monkeypatch):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    tree = archive.extract(pkg)
    import builder.inputs.debian.archive as archive_module

    def no_extract(*args):
        raise AssertionError("extracted again")
    monkeypatch.setattr(archive_module, "extract_deb", no_extract)
    debrepo.requests.clear()
    assert make(debrepo, tmp_path / "c").extract(pkg) == tree
    assert archive.extract(archive.fetch(pkg)) == tree
    assert debrepo.requests == []


def test_gz_index_preferred_over_xz(debrepo, tmp_path):
    """Both listed in InRelease: the .gz is taken (it decompresses several times faster)."""
    archive = make(debrepo, tmp_path / "c")
    files = archive._release_info()["files"]
    files["main/binary-arm64/Packages.gz"] = ("a" * 64, 10)
    assert archive._index_entry("main", "arm64") == (".gz", "a" * 64, 10)
    del files["main/binary-arm64/Packages.gz"]
    assert archive._index_entry("main", "arm64")[0] == ".xz"
