"""The cache trusts nothing it finds (issue 9 item 5), cache list/prune (issue 8 item 11),
a full cache disk (issue 9 item 8), and InRelease freshness (issue 9 item 10)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.inputs.cache import TREES, Cache
from builder.inputs.cache_admin import list_entries, prune
from builder.inputs.debian.archive import DebianArchive
from builder.errors import ArmvmError, SourceError
from builder.inputs.sources import Fetcher
from tests import limits
from tests.debrepo import SUITE, debrepo, debrepo_files, make_deb, sign  # noqa: F401

GENUINE = b"\x7fELF" * 8               # busybox-static's usr/bin/busybox in tests/debrepo.py


def make(debrepo, cache_dir: Path, *, offline=False, lock=None, now=None, vendor=()):
    fetcher = Fetcher(cache=Cache(cache_dir), offline=offline, progress=False, backoff=0.001,
                      sleep=lambda s: None, vendor_dirs=vendor)
    return DebianArchive(fetcher, mirror=debrepo.url, suite=SUITE, components=["main"],
                         arch="arm64", keyring=debrepo.files.keyring, lock=lock,
                         offline=offline, now=now)


def plant_marked_blob(cache_root: Path, pkg, tmp_path: Path) -> Path:
    """Replace the cached busybox .deb with a marked one and remove its extracted tree."""
    marked = tmp_path / "marked.deb"
    make_deb(marked, {"Package": "busybox-static"},
             [("./", "dir", None, 0o755), ("./usr/", "dir", None, 0o755),
              ("./usr/bin/", "dir", None, 0o755),
              ("./usr/bin/busybox", "file", b"MARKED-BUSYBOX", 0o755)])
    blob = cache_root / "sha256" / pkg.sha256[:2] / pkg.sha256
    os.chmod(blob, 0o644)
    shutil.copyfile(marked, blob)
    shutil.rmtree(cache_root / TREES / f"deb-{pkg.sha256}")
    return blob


def test_replaced_blob_is_refetched_online(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    assert (archive.extract(archive.fetch(pkg)) / "usr/bin/busybox").read_bytes() == GENUINE
    plant_marked_blob(tmp_path / "c", pkg, tmp_path)
    before = debrepo.count(pkg.filename)
    again = make(debrepo, tmp_path / "c")
    tree = again.extract(again.fetch(again.resolve("busybox-static")))
    assert (tree / "usr/bin/busybox").read_bytes() == GENUINE
    assert debrepo.count(pkg.filename) == before + 1                # fetched again
    assert any("was corrupt" in p for p in again.cache.problems)


def test_replaced_blob_offline_names_the_corrupt_file(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    archive.extract(archive.fetch(archive.resolve("busybox-static")))
    lock = archive.make_lock(1_700_000_000)
    blob = plant_marked_blob(tmp_path / "c", archive.resolve("busybox-static"), tmp_path)
    debrepo.requests.clear()
    offline = make(debrepo, tmp_path / "c", offline=True, lock=lock)
    with pytest.raises(SourceError) as err:
        offline.extract(offline.fetch(offline.resolve("busybox-static")))
    assert f"the cached file {blob} was corrupt" in str(err.value)
    assert debrepo.requests == []
    assert not blob.exists()                        # evicted, never extracted


def test_tampered_tree_is_detected_and_reextracted(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    tree = archive.extract(archive.fetch(pkg))
    target = tree / "usr/bin/busybox"
    st = target.stat()
    target.chmod(0o755)
    with open(target, "r+b") as f:                  # same size, same mode, mtime restored
        f.write(b"EVIL")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = make(debrepo, tmp_path / "c", offline=True, lock=archive.make_lock(0))
    tree2 = again.extract(again.fetch(again.resolve("busybox-static")))
    assert (tree2 / "usr/bin/busybox").read_bytes() == GENUINE      # re-extracted
    assert any("usr/bin/busybox has sha256" in p for p in again.cache.problems), \
        again.cache.problems
    # an added file is noticed too
    (tree2 / "usr/bin/planted").write_text("x")
    third = Cache(tmp_path / "c")
    assert third.tree(f"deb-{pkg.sha256}", source=pkg.sha256) is None
    assert "unexpected file usr/bin/planted" in third.problems[0]


def test_copied_cache_is_rehashed_not_reextracted(debrepo, tmp_path):
    archive = make(debrepo, tmp_path / "c")
    pkg = archive.resolve("busybox-static")
    archive.extract(archive.fetch(pkg))
    subprocess.run(["cp", "-a", str(tmp_path / "c"), str(tmp_path / "copy")], check=True)
    copy = Cache(tmp_path / "copy")                 # new inodes and ctimes, same contents
    assert copy.tree(f"deb-{pkg.sha256}", source=pkg.sha256) is not None
    assert copy.problems == []
    assert Cache(tmp_path / "copy").tree(f"deb-{pkg.sha256}", source=pkg.sha256) is not None


def test_stamp_ties_tree_to_its_blob(tmp_path):
    cache = Cache(tmp_path / "c")
    cache.put_tree("k1", lambda d: (d / "f").write_text("x"), source="a" * 64)
    assert cache.tree("k1", source="a" * 64) is not None
    other = Cache(tmp_path / "c")
    assert other.tree("k1", source="b" * 64) is None
    assert "extracted from " + "a" * 64 in other.problems[0]


# --- cache list / prune ----------------------------------------------------------------------
def _fill(root: Path) -> Cache:
    cache = Cache(root)
    for i, days in enumerate((40, 10, 1)):
        path, sha = cache.put_stream([bytes([i]) * (1 << 20)], None, what=f"blob{i}")
        os.utime(path, (time.time() - days * 86400,) * 2)
    cache.put_tree("t-old", lambda d: (d / "f").write_bytes(b"t" * (2 << 20)))
    stamp = root / TREES / "t-old" / "stamp.json"
    os.utime(stamp, (time.time() - 50 * 86400,) * 2)
    cache.close()
    return cache


def run_cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)],
                          capture_output=True, text=True, env=e)


def test_cache_list_and_prune_cli(tmp_path):
    root = tmp_path / "c"
    _fill(root)
    env = {"ARMVM_CACHE_DIR": str(root)}
    listed = run_cli("cache", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert 5 << 20 <= data["total_bytes"] < (5 << 20) + 4096      # + the tree's stamp
    assert [e["kind"] for e in data["entries"]] == ["tree", "blob", "blob", "blob"]  # LRU first
    text = run_cli("cache", "list", env=env)
    assert "4 entries, 5.0 MiB" in text.stdout
    dry = run_cli("cache", "prune", "--older-than", "30", "--dry-run", "--json", env=env)
    assert len(json.loads(dry.stdout)["removed"]) == 2
    assert len(list_entries(root)) == 4
    pruned = run_cli("cache", "prune", "--older-than", "30", "--json", env=env)
    result = json.loads(pruned.stdout)
    assert 3 << 20 <= result["freed_bytes"] < (3 << 20) + 4096
    assert result["remaining_bytes"] == 2 << 20
    assert not (root / TREES / "t-old").exists()
    sized = run_cli("cache", "prune", "--max-size", "1.5MiB", env=env)
    assert sized.returncode == 0 and "removed 1 entries" in sized.stdout, sized.stdout
    assert [e.key for e in list_entries(root)] and sum(e.size for e in list_entries(root)) \
        == 1 << 20
    bad = run_cli("cache", "prune", "--max-size", "lots", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_prune_never_removes_what_a_running_build_holds(tmp_path):
    """A build holds every entry it took with a shared flock; prune skips those, whatever
    their age, and removes them once the build is gone."""
    root = tmp_path / "c"
    _fill(root)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from builder.inputs.cache import Cache
c = Cache({str(root)!r})
assert c.tree("t-old") is not None
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "held"
        os.utime(root / TREES / "t-old" / "stamp.json", (time.time() - 50 * 86400,) * 2)
        result = prune(root, older_than_days=0)
        assert [e["key"] for e in result["busy"]] == ["t-old"]
        assert (root / TREES / "t-old" / "tree" / "f").exists()
        assert len(result["removed"]) == 3
    finally:
        holder.kill()
        holder.wait()
    assert [e["key"] for e in prune(root, older_than_days=0)["removed"]] == ["t-old"]


# --- disk full -------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs mounted by the test (root only); unmounted whatever happens."""
    yield from limits.small_tmpfs(tmp_path, 3)


def test_cache_disk_full_is_a_clean_error(small_tmpfs):
    cache = Cache(small_tmpfs / "c")
    with pytest.raises(ArmvmError) as err:
        cache.put_stream(iter([b"\xff" * (1 << 20)] * 8), None, what="big.deb", size=8 << 20)
    msg = str(err.value)
    assert str(small_tmpfs / "c") in msg and "No space left on device" in msg
    assert "8.0 MiB are needed" in msg
    assert list((small_tmpfs / "c" / "tmp").iterdir()) == []          # nothing half-written
    assert not (small_tmpfs / "c" / "sha256").exists() or \
        not any((small_tmpfs / "c" / "sha256").rglob("*"))
    with pytest.raises(ArmvmError, match="No space left on device"):
        cache.put_tree("t", lambda d: (d / "f").write_bytes(b"\xff" * (8 << 20)))
    assert not (small_tmpfs / "c" / TREES / "t").exists()


def test_index_sqlite_disk_full_is_a_clean_error(small_tmpfs):
    """sqlite3.OperationalError (database or disk is full) becomes a clean error."""
    import lzma
    from builder.inputs.debian.index import build_index
    packages = small_tmpfs.parent / "Packages.xz"
    stanza = "".join(f"Package: p{i}\nVersion: 1\nArchitecture: arm64\nFilename: pool/p{i}.deb\n"
                     f"SHA256: {'a' * 64}\nSize: 1\nDepends: {'x' * 300}\n\n"
                     for i in range(20000))
    packages.write_bytes(lzma.compress(stanza.encode()))
    (small_tmpfs / "t").mkdir()
    with pytest.raises(ArmvmError) as err:
        build_index(packages, ".xz", small_tmpfs / "t", 1 << 30, "test/Packages.xz")
    assert str(small_tmpfs / "t") in str(err.value) and "full" in str(err.value)


# --- freshness -------------------------------------------------------------------------------
def _signed_release(debrepo, tmp_path: Path, extra: str) -> bytes:
    """The test repository's Release with extra fields, signed by its key."""
    dists = debrepo.files.root / "dists" / SUITE
    text = (dists / "Release").read_text().replace("Components: main\n",
                                                   "Components: main\n" + extra)
    release = tmp_path / f"Release-{abs(hash(extra))}"
    release.write_text(text)
    out = release.with_suffix(".signed")
    sign(debrepo.files.gnupghome, release, out)
    return out.read_bytes()


NOW = 1_790_000_000.0                     # 2026-09-21


def test_expired_valid_until_is_refused_online_only(debrepo, tmp_path, monkeypatch):
    monkeypatch.delenv("ARMVM_IGNORE_VALID_UNTIL", raising=False)
    url = f"/dists/{SUITE}/InRelease"
    debrepo.overrides[url] = _signed_release(
        debrepo, tmp_path, "Date: Sat, 01 Aug 2026 00:00:00 UTC\n"
                           "Valid-Until: Sat, 08 Aug 2026 00:00:00 UTC\n")
    with pytest.raises(SourceError) as err:
        make(debrepo, tmp_path / "c", now=NOW).resolve("busybox-static")
    assert "expired: Valid-Until 2026-08-08 00:00:00 UTC is past" in str(err.value)
    assert "ARMVM_IGNORE_VALID_UNTIL=1" in str(err.value)
    assert debrepo.count("Packages") == 0
    assert not any((tmp_path / "c").rglob("refs/*"))             # the expired one not kept
    # before its Valid-Until it is accepted, and then cached
    archive = make(debrepo, tmp_path / "c", now=NOW - 60 * 86400)
    pkg = archive.resolve("busybox-static")
    # offline and lock builds never look at the clock: the same cached state still works
    assert make(debrepo, tmp_path / "c", offline=True, now=NOW).resolve("busybox-static") == pkg
    # the override, for snapshot mirrors
    monkeypatch.setenv("ARMVM_IGNORE_VALID_UNTIL", "1")
    assert make(debrepo, tmp_path / "d", now=NOW).resolve("busybox-static") == pkg


def test_rollback_to_an_older_inrelease_is_refused(debrepo, tmp_path, monkeypatch):
    """Suites without Valid-Until (trixie, bookworm): an InRelease older than the one this
    cache verified before is a replay."""
    monkeypatch.delenv("ARMVM_IGNORE_VALID_UNTIL", raising=False)
    url = f"/dists/{SUITE}/InRelease"
    debrepo.overrides[url] = _signed_release(debrepo, tmp_path,
                                             "Date: Sat, 21 Nov 2026 09:15:44 UTC\n")
    make(debrepo, tmp_path / "c", now=NOW).resolve("busybox-static")
    debrepo.overrides[url] = _signed_release(debrepo, tmp_path,
                                             "Date: Sat, 11 Jul 2026 10:16:37 UTC\n")
    with pytest.raises(SourceError, match="signed on 2026-07-11 10:16:37 UTC, older than the "
                                          "InRelease of 2026-11-21 09:15:44 UTC"):
        make(debrepo, tmp_path / "c", now=NOW).resolve("busybox-static")
    monkeypatch.setenv("ARMVM_IGNORE_VALID_UNTIL", "1")
    assert make(debrepo, tmp_path / "c", now=NOW).resolve("busybox-static")


def test_prune_keeps_a_blob_and_its_tree_together(tmp_path):
    """A .deb blob and the tree extracted from it are one unit: the later last use counts,
    and they go together (an offline build needs both)."""
    root = tmp_path / "c"
    cache = Cache(root)
    path, sha = cache.put_stream([b"deb" * 1000], None, what="x.deb")
    cache.put_tree(f"deb-{sha}", lambda d: (d / "f").write_text("x"), source=sha)
    lone, _ = cache.put_stream([b"lone" * 1000], None, what="y")
    cache.close()
    old = time.time() - 40 * 86400
    os.utime(path, (old, old))                       # the blob is old, its tree fresh
    os.utime(lone, (old, old))
    result = prune(root, older_than_days=30)
    assert [e["kind"] for e in result["removed"]] == ["blob"] and path.exists()
    os.utime(root / TREES / f"deb-{sha}" / "stamp.json", (old, old))
    result = prune(root, older_than_days=30)
    assert sorted(e["kind"] for e in result["removed"]) == ["blob", "tree"]
    assert list_entries(root) == []
