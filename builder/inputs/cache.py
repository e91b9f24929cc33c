"""Content-addressed cache: verified blobs by sha256, extracted trees by key, small refs.

Layout under the cache root (every entry appears by one atomic rename, so readers never see
half-written data and concurrent writers of the same entry are harmless):

    sha256/<first two hex>/<sha256>   blobs, verified when they enter the cache, read-only
    trees-v2/<key>/tree/              derived directories (extracted .debs, parsed indexes)
    trees-v2/<key>/stamp.json         ... each with its stamp: source blob, every file's sha256
    refs/<name>                       one line of text (e.g. the last verified InRelease)
    tmp/                              temporary files and directories, same file system

The cache trusts nothing it finds: a blob is re-hashed whenever a build takes it
(``blob(verify=True)``, what the Fetcher does), and a tree is checked against its stamp on
every use: the file list, kinds, modes and symlink targets, and for every file its inode,
size, mtime and ctime as recorded right after extraction (a change of content changes
ctime, which user space cannot set back); when only the stat data differ (a copied cache)
the files are re-hashed against the stamp's sha256. A mismatch evicts the entry and
records why (``problems``), so the caller re-extracts or re-fetches, or says offline which
file was corrupt.

Last use is the mtime of the blob or of the tree's stamp (touched on every use). Every
entry a process takes is held with a shared flock until the process ends (``close()``);
``prune`` removes an entry only under an exclusive non-blocking flock, so it never deletes
something a running build holds.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from builder.errors import ArmvmError, SourceError

CHUNK = 1024 * 1024
STAT_SETTLE_NS = 2_000_000_000      # see Cache.file_sha256
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")
TREES = "trees-v2"
STAMP = "stamp.json"
STAMP_FORMAT = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
TMP_STALE_SECONDS = 24 * 3600         # prune: tmp/ leftovers older than this are dead


def default_cache_root() -> Path:
    """$ARMVM_CACHE_DIR, else $XDG_CACHE_HOME/armvm-build, else ~/.cache/armvm-build."""
    explicit = os.environ.get("ARMVM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "armvm-build"
    return Path.home() / ".cache" / "armvm-build"


def check_sha256(value: str, what: str = "sha256") -> str:
    """Return ``value`` lower-cased if it is 64 hex digits, else raise ArmvmError."""
    if not isinstance(value, str) or not _SHA256_RE.match(value.lower()):
        raise ArmvmError(f"{what}: {value!r} is not a sha256 (allowed: 64 hexadecimal digits)")
    return value.lower()


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"bad cache key {key!r}")
    return key


def _space_error(root: Path, what: str, needed: Optional[int], exc: OSError) -> ArmvmError:
    why = ("the file size limit (ulimit -f) was reached" if exc.errno == errno.EFBIG
           else exc.strerror or "no space left on device")
    need = f"; about {needed / (1 << 20):.1f} MiB are needed" if needed else ""
    return ArmvmError(f"cache {root}: {why} while writing {what}{need} (free space, run "
                      "`armvm-build cache prune`, or set ARMVM_CACHE_DIR to a larger disk)")


def _write_error(root: Path, what: str, needed: Optional[int], exc: OSError,
                 failed: Optional[str] = None) -> ArmvmError:
    """The error for an OSError while writing ``what`` into the cache: a full disk (or file
    size limit) says how to make room; anything else says what could not be done."""
    if exc.errno in DISK_FULL:
        return _space_error(root, what, needed, exc)
    return ArmvmError(f"cache {root}: {failed or 'cannot write ' + what}: {exc.strerror}")


class Cache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()
        self.problems: list[str] = []        # corrupt entries found (and evicted) so far
        self._held: dict[str, int] = {}      # path -> fd holding a shared flock

    # --- paths -----------------------------------------------------------------------
    def _blob_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def _tree_dir(self, key: str) -> Path:
        return self.root / TREES / _check_key(key)

    def _tmpdir(self) -> Path:
        path = self.root / "tmp"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArmvmError(f"cannot create the cache directory {path}: {e.strerror} "
                             "(set ARMVM_CACHE_DIR to a writable directory)") from None
        return path

    # --- holding entries -------------------------------------------------------------
    def _hold(self, path: Path) -> bool:
        """Take (once) a shared flock on ``path`` for this process's lifetime; False when
        the file is gone (e.g. pruned while we waited)."""
        key = str(path)
        if key in self._held:
            return True
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)       # waits while prune holds it exclusively
            if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                raise FileNotFoundError          # replaced or removed meanwhile
        except OSError:
            os.close(fd)
            return False
        self._held[key] = fd
        return True

    def close(self) -> None:
        """Release every entry this process holds."""
        for fd in self._held.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._held = {}

    def __del__(self):
        self.close()

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)                       # last use, for `cache list` and `prune`
        except OSError:
            pass

    # --- blobs -----------------------------------------------------------------------
    def blob(self, sha256: str, *, verify: bool = False) -> Path | None:
        """The cached file with this sha256, if present.

        Blobs are verified when they enter the cache; ``verify=True`` re-hashes the file and
        evicts it when it no longer matches (disk corruption, manual edits, a planted file),
        recording the problem in ``problems``.
        """
        sha256 = check_sha256(sha256)
        path = self._blob_path(sha256)
        if not path.is_file() or not self._hold(path):
            return None
        if verify:
            try:
                got = sha256_file(path)[0]
            except OSError as e:
                got = f"unreadable ({e.strerror})"
            if got != sha256:
                self.problems.append(f"the cached file {path} was corrupt (sha256 {got}, "
                                     f"expected {sha256}) and was removed")
                self._evict_file(path)
                return None
        self._touch(path)
        return path

    def _evict_file(self, path: Path) -> None:
        fd = self._held.pop(str(path), None)
        if fd is not None:
            os.close(fd)
        try:
            path.unlink()
        except OSError:
            pass

    def put_file(self, src: Path, sha256: str) -> Path:
        """Copy ``src`` into the cache, verifying it hashes to ``sha256``."""
        with open(src, "rb") as f:
            path, _ = self.put_stream(iter(lambda: f.read(CHUNK), b""), sha256, what=str(src))
        return path

    def put_stream(self, chunks: Iterable[bytes], expected_sha256: str | None, *,
                   what: str, size: int | None = None) -> tuple[Path, str]:
        """Write ``chunks`` to a temporary file, hash them, and rename into place.

        On a mismatch with ``expected_sha256`` nothing stays in the cache and SourceError
        names ``what``, the expected and the actual hash. A full disk is a clean error that
        names the cache folder and ``size``. Returns (path, sha256).
        """
        if expected_sha256 is not None:
            expected_sha256 = check_sha256(expected_sha256, f"{what}: sha256")
        tmpdir = self._tmpdir()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix="blob-", dir=tmpdir)
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if expected_sha256 is not None and got != expected_sha256:
                raise SourceError(f"{what}: sha256 mismatch: expected {expected_sha256}, "
                                  f"got {got}")
            final = self._blob_path(got)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            self._hold(final)
            return final, got
        except OSError as e:
            raise _write_error(self.root, what, size, e) from None
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)

    # --- trees -----------------------------------------------------------------------
    def tree(self, key: str, source: str | None = None) -> Path | None:
        """The checked content of ``trees-v2/<key>``, or None (missing, or corrupt: then it
        is evicted and the reason added to ``problems``)."""
        top = self._tree_dir(key)
        stamp_path, content = top / STAMP, top / "tree"
        if not stamp_path.is_file() or not self._hold(stamp_path):
            if top.exists():
                self._evict_tree(top, f"the cached tree {top} has no stamp")
            return None
        problem = check_stamp(content, stamp_path, key, source)
        if problem:
            self._evict_tree(top, f"the cached tree {top} was corrupt ({problem}) and was "
                                  "removed")
            return None
        held = self._held.get(str(stamp_path))
        if held is not None and os.fstat(held).st_ino != os.stat(stamp_path).st_ino:
            os.close(self._held.pop(str(stamp_path)))   # the stamp was refreshed: hold it
            self._hold(stamp_path)
        self._touch(stamp_path)
        return content

    def _evict_tree(self, top: Path, why: str) -> None:
        self.problems.append(why)
        fd = self._held.pop(str(top / STAMP), None)
        if fd is not None:
            os.close(fd)
        try:
            away = Path(tempfile.mkdtemp(prefix="evicted-", dir=self._tmpdir()))
            os.rename(top, away / "x")
            _rmtree(away)
        except OSError:
            _rmtree(top)

    def put_tree(self, key: str, build: Callable[[Path], None], source: str | None = None) -> Path:
        """Run ``build(tmpdir)``, stamp the result (file list and hashes, tied to the
        ``source`` blob's sha256) and rename it to ``trees-v2/<key>`` atomically; returns
        the tree. If another process finished the same key first, its tree is kept and
        ours dropped. When ``build`` raises, nothing stays in the cache.
        """
        found = self.tree(key, source)
        if found is not None:
            return found
        top = self._tree_dir(key)
        work = None
        try:
            work = Path(tempfile.mkdtemp(prefix="tree-", dir=self._tmpdir()))
            (work / "tree").mkdir()
            build(work / "tree")
            stamp = make_stamp(work / "tree", key, source)
            (work / STAMP).write_text(json.dumps(stamp, separators=(",", ":")))
            top.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, top)
            except OSError:
                if not top.is_dir():
                    raise
            got = self.tree(key, source)
            if got is None:
                raise ArmvmError(f"cache {self.root}: the tree {key} changed while it was "
                                 "being stored: " + "; ".join(self.problems[-1:]))
            return got
        except OSError as e:
            raise _write_error(self.root, f"the tree {key}", None, e,
                               failed=f"cannot store the tree {key}") from None
        finally:
            if work is not None and os.path.lexists(work):
                _rmtree(work)

    # --- input hashes ----------------------------------------------------------------
    def file_sha256(self, path: Path) -> tuple[str, int]:
        """(sha256, size) of a local input file, remembered under ``refs/stat-<key>`` where
        the key covers its absolute path, device, inode, size, mtime and ctime in ns (what
        the tree stamps trust too: writing to a file changes its ctime, which no one can set
        back). A file changed within the last STAT_SETTLE_NS of hashing is not remembered
        (a write in the same clock tick would keep the same times)."""
        path = Path(path)
        st = os.stat(path)
        key = self._stat_key(path, st)
        known = self.get_ref(key)
        if known and _SHA256_RE.match(known):
            return known, st.st_size
        sha, size = sha256_file(path)
        after = os.stat(path)
        if self._stat_key(path, after) == key and size == st.st_size and \
                time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > STAT_SETTLE_NS:
            try:
                self.set_ref(key, sha)
            except ArmvmError:
                pass                       # a read-only or full cache only costs time
        return sha, size

    @staticmethod
    def _stat_key(path: Path, st: os.stat_result) -> str:
        ident = f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0" \
                f"{st.st_mtime_ns}\0{st.st_ctime_ns}"
        return "stat-" + hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()

    # --- refs ------------------------------------------------------------------------
    def get_ref(self, name: str) -> str | None:
        try:
            return (self.root / "refs" / _check_key(name)).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def set_ref(self, name: str, value: str) -> None:
        path = self.root / "refs" / _check_key(name)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="ref-", dir=self._tmpdir())
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(self.root, f"refs/{name}", None, e) from None
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)


# --- stamps ------------------------------------------------------------------------------
def _walk(root: Path):
    """(relative path, lstat) of everything under ``root``, sorted, never following links."""
    out = []
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                st = e.stat(follow_symlinks=False)
                out.append((r, st))
                if stat.S_ISDIR(st.st_mode):
                    stack.append((r, e.path))
    out.sort(key=lambda x: x[0])
    return out


def _kind(mode: int) -> str:
    return "d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode) else \
        "f" if stat.S_ISREG(mode) else "?"


def make_stamp(root: Path, key: str, source: str | None) -> dict:
    """The stamp of a finished tree: every entry with its kind and mode, each file's
    sha256 and stat data, each symlink's target."""
    entries = []
    for rel, st in _walk(root):
        kind, path = _kind(st.st_mode), root / rel
        extra = (sha256_file(path)[0] if kind == "f" else os.readlink(path) if kind == "l"
                 else "")
        entries.append([rel, kind, stat.S_IMODE(st.st_mode), st.st_size if kind == "f" else 0,
                        extra, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return {"format": STAMP_FORMAT, "key": key, "source": source, "entries": entries}


def check_stamp(root: Path, stamp_path: Path, key: str, source: str | None) -> str:
    """'' when the tree matches its stamp, else what differs (the first problem)."""
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        entries = stamp["entries"]
        if stamp.get("format") != STAMP_FORMAT or stamp.get("key") != key:
            return "stamp of another format or key"
        if source is not None and stamp.get("source") != source:
            return f"extracted from {stamp.get('source')}, not {source}"
        found = _walk(root)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable stamp or tree: {getattr(e, 'strerror', None) or e}"
    if len(found) != len(entries):
        names = {e[0] for e in entries}
        extra = [r for r, _ in found if r not in names]
        return f"unexpected file {extra[0]}" if extra else "files are missing"
    rehash = []
    for (rel, st), want in zip(found, entries):
        w_rel, w_kind, w_mode, w_size, w_extra, w_ino, w_mtime, w_ctime = want
        kind = _kind(st.st_mode)
        if rel != w_rel:
            return f"{w_rel} is missing"
        if kind != w_kind or stat.S_IMODE(st.st_mode) != w_mode:
            return f"{rel} changed kind or mode"
        if kind == "l" and os.readlink(root / rel) != w_extra:
            return f"symlink {rel} changed target"
        if kind == "f":
            if st.st_size != w_size:
                return f"{rel} changed size"
            if (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) != (w_ino, w_mtime, w_ctime):
                rehash.append((rel, w_extra))
    for rel, want in rehash:                    # copied or touched: compare the contents
        try:
            got = sha256_file(root / rel)[0]
        except OSError as e:
            return f"{rel} unreadable: {e.strerror}"
        if got != want:
            return f"{rel} has sha256 {got}, stamped {want}"
    if rehash:                                  # same content: refresh the stat data
        try:
            fresh = make_stamp(root, key, stamp.get("source"))
            tmp = stamp_path.with_name(STAMP + ".new")
            tmp.write_text(json.dumps(fresh, separators=(",", ":")))
            os.replace(tmp, stamp_path)
        except OSError:
            pass
    return ""


def _rmtree(path: Path) -> None:
    """Remove a temporary tree (extraction keeps owner rwx on directories, so this works)."""
    shutil.rmtree(path, ignore_errors=True)
