"""Cache and Fetcher: local files, URLs with sha256, vendor dirs, offline, atomicity."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from builder.inputs.cache import Cache, default_cache_root
from builder.errors import ArmvmError, SourceError
from builder.inputs.sources import Fetcher
from tests.debrepo import debrepo, debrepo_files  # noqa: F401

BUSYBOX = "busybox-static"


def fetcher(tmp_path, **kw) -> Fetcher:
    kw.setdefault("progress", False)
    return Fetcher(cache=Cache(tmp_path / "cache"), backoff=0.001, sleep=lambda s: None, **kw)


def served(debrepo, name=BUSYBOX) -> tuple[str, bytes]:
    path = debrepo.deb_url_path(name)
    return debrepo.url + path, (debrepo.files.root / path.lstrip("/")).read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blobs(cache_root: Path) -> list[Path]:
    return sorted(p for p in (cache_root / "sha256").rglob("*") if p.is_file()) \
        if (cache_root / "sha256").exists() else []


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ARMVM_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_root() == tmp_path / "a"
    monkeypatch.delenv("ARMVM_CACHE_DIR")
    assert default_cache_root() == tmp_path / "x" / "armvm-build"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "armvm-build"


def test_local_file(tmp_path):
    f = fetcher(tmp_path)
    (tmp_path / "k").write_bytes(b"kernel")
    art = f.local(tmp_path / "k")
    assert (art.sha256, art.size, art.origin) == (sha(b"kernel"), 6, str(tmp_path / "k"))
    with pytest.raises(SourceError, match=f"{tmp_path / 'nope'}: file not found"):
        f.local(tmp_path / "nope")
    with pytest.raises(SourceError, match="not a regular file"):
        f.local(tmp_path)


def test_url_download_cached_then_reused(debrepo, tmp_path):
    url, data = served(debrepo)
    f = fetcher(tmp_path)
    art = f.url(url, sha(data).upper())
    assert art.path.read_bytes() == data and art.origin == url and art.sha256 == sha(data)
    assert f.url(url, sha(data)).path == art.path
    assert debrepo.requests == [debrepo.deb_url_path(BUSYBOX)]           # second: cache hit
    offline = fetcher(tmp_path, offline=True)
    assert offline.url(url, sha(data)).path == art.path


def test_url_sha_mismatch_leaves_nothing(debrepo, tmp_path):
    url, data = served(debrepo)
    wrong = "0" * 64
    with pytest.raises(SourceError) as err:
        fetcher(tmp_path).url(url, wrong)
    assert f"{url}: sha256 mismatch: expected {wrong}, got {sha(data)}" == str(err.value)
    assert blobs(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_url_bad_arguments(tmp_path):
    f = fetcher(tmp_path)
    with pytest.raises(ArmvmError, match="not a sha256"):
        f.url("http://127.0.0.1:9/x", "abc")
    with pytest.raises(ArmvmError, match="not an HTTP"):
        f.url("file:///etc/passwd", "0" * 64)


def test_url_offline_not_cached(tmp_path):
    with pytest.raises(SourceError, match="not in the cache .* and offline mode"):
        fetcher(tmp_path, offline=True).url("http://127.0.0.1:9/x.bin", "0" * 64)


def test_url_from_vendor_dir_without_network(debrepo, tmp_path):
    url, data = served(debrepo)
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / url.rsplit("/", 1)[1]).write_bytes(data)
    art = fetcher(tmp_path, offline=True, vendor_dirs=[vendor]).url(url, sha(data))
    assert art.path.parent == vendor and debrepo.requests == []


def test_url_404_is_not_retried_and_5xx_is(debrepo, tmp_path):
    f = fetcher(tmp_path)
    with pytest.raises(SourceError, match="answered HTTP 404"):
        f.url(debrepo.url + "/missing.bin", "0" * 64)
    assert debrepo.requests == ["/missing.bin"]
    debrepo.overrides["/busy.bin"] = 503
    with pytest.raises(SourceError, match="HTTP 503 .*gave up after 3 tries"):
        f.url(debrepo.url + "/busy.bin", "0" * 64)
    assert debrepo.count("/busy.bin") == 3


def test_put_file_and_verify(tmp_path):
    cache = Cache(tmp_path / "c")
    (tmp_path / "src").write_bytes(b"abc")
    path = cache.put_file(tmp_path / "src", sha(b"abc"))
    assert cache.blob(sha(b"abc")) == path and path.read_bytes() == b"abc"
    with pytest.raises(SourceError, match="sha256 mismatch"):
        cache.put_file(tmp_path / "src", sha(b"abd"))
    path.chmod(0o644)
    path.write_bytes(b"rot")                                   # corrupted on disk
    assert cache.blob(sha(b"abc")) == path                     # cheap lookup trusts it
    assert cache.blob(sha(b"abc"), verify=True) is None        # re-hash drops it
    assert not path.exists()


def test_put_tree_failure_leaves_nothing(tmp_path):
    cache = Cache(tmp_path / "c")

    def broken(d: Path):
        (d / "half").write_text("x")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        cache.put_tree("k1", broken)
    assert cache.tree("k1") is None and list((tmp_path / "c/tmp").iterdir()) == []
    with pytest.raises(ValueError):
        cache.tree("../escape")


def test_concurrent_writers_are_safe(tmp_path):
    cache = Cache(tmp_path / "c")
    data = b"x" * 3_000_000
    start = threading.Barrier(6)
    results, errors = [], []

    def put_blob():
        start.wait()
        results.append(cache.put_stream(iter([data[:10], data[10:]]), sha(data), what="t")[0])

    def put_tree():
        def build(d: Path):
            for i in range(50):
                (d / f"f{i}").write_bytes(bytes([i]) * 1000)
        start.wait()
        results.append(cache.put_tree("tree1", build))

    threads = [threading.Thread(target=lambda fn=fn: _capture(fn, errors))
               for fn in [put_blob] * 3 + [put_tree] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 2
    assert cache.blob(sha(data), verify=True) is not None
    tree = cache.tree("tree1")
    assert sorted(p.name for p in tree.iterdir()) == sorted(f"f{i}" for i in range(50))
    assert list((tmp_path / "c/tmp").iterdir()) == []


def _capture(fn, errors):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - collected for the assertion
        errors.append(e)


def test_imports_stay_lazy():
    code = ("import sys, builder.inputs.sources, builder.inputs.debian.archive, builder.inputs.lock; "
            "print(sorted(m for m in ('requests', 'rich', 'debian', 'sqlite3', 'zstandard') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_download_with_progress_bar(debrepo, tmp_path, capsys, monkeypatch):
    import rich.console
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    data = bytes(range(256)) * 6000                       # 1.5 MB: big enough for a bar
    debrepo.overrides["/big.bin"] = data
    art = fetcher(tmp_path, progress=True).url(debrepo.url + "/big.bin", sha(data))
    assert art.path.read_bytes() == data
    err = capsys.readouterr().err
    assert "big.bin" in err and "1.5" in err and "MB" in err, err[-500:]
    small = fetcher(tmp_path / "q", progress=False).url(debrepo.url + "/big.bin", sha(data))
    assert small.path.read_bytes() == data and capsys.readouterr().err == ""
