"""The input hash cache (Cache.file_sha256): remembered by path, inode, size, mtime and
ctime; any write, even one that restores size and mtime, is hashed again."""
from __future__ import annotations

import hashlib
import os
import time

from builder.inputs import cache as cache_mod
from builder.inputs.cache import Cache


def _old(path, seconds=10):
    t = time.time_ns() - seconds * 1_000_000_000
    os.utime(path, ns=(t, t))


def test_remembered_then_rehashed_after_any_write(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "c")
    f = tmp_path / "payload.bin"
    f.write_bytes(b"A" * 5000)
    _old(f)
    monkeypatch.setattr(cache_mod, "STAT_SETTLE_NS", 0)     # ctime is "now" in a test
    want = hashlib.sha256(b"A" * 5000).hexdigest()
    assert cache.file_sha256(f) == (want, 5000)
    refs = list((tmp_path / "c" / "refs").glob("stat-*"))
    assert len(refs) == 1 and refs[0].read_text().strip() == want

    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    assert cache.file_sha256(f) == (want, 5000) and calls == []      # from the ref

    st = os.stat(f)
    f.write_bytes(b"B" * 5000)                    # same size, mtime put back: ctime moves
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.file_sha256(f) == (hashlib.sha256(b"B" * 5000).hexdigest(), 5000)
    assert calls == [f]


def test_a_file_changed_just_now_is_not_remembered(tmp_path):
    cache = Cache(tmp_path / "c")
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x")
    assert cache.file_sha256(f)[0] == hashlib.sha256(b"x").hexdigest()
    assert not list((tmp_path / "c").glob("refs/stat-*"))


def test_a_garbage_ref_is_not_trusted(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "c")
    f = tmp_path / "p.bin"
    f.write_bytes(b"y" * 10)
    monkeypatch.setattr(cache_mod, "STAT_SETTLE_NS", 0)
    cache.file_sha256(f)
    ref = next((tmp_path / "c" / "refs").glob("stat-*"))
    os.chmod(ref, 0o644)
    ref.write_text("not a hash\n")
    assert cache.file_sha256(f)[0] == hashlib.sha256(b"y" * 10).hexdigest()
