"""Content-addressed cache: verified blobs by sha256, extracted trees by key, small refs.

Layout under the cache root (every entry appears by one atomic rename, so readers never see
half-written data and concurrent writers of the same entry are harmless):

    sha256/<first two hex>/<sha256>   blobs, verified when they enter the cache, read-only
    trees/<key>/                      derived directories (extracted .debs, parsed indexes)
    refs/<name>                       one line of text (e.g. the last verified InRelease)
    tmp/                              temporary files and directories, same file system
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from builder.errors import ArmvmError, SourceError

CHUNK = 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


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


class Cache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    # --- paths -----------------------------------------------------------------------
    def _blob_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def _tmpdir(self) -> Path:
        path = self.root / "tmp"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArmvmError(f"cannot create the cache directory {path}: {e.strerror} "
                             "(set ARMVM_CACHE_DIR to a writable directory)") from None
        return path

    # --- blobs -----------------------------------------------------------------------
    def blob(self, sha256: str, *, verify: bool = False) -> Path | None:
        """The cached file with this sha256, if present.

        Blobs are verified when they enter the cache; ``verify=True`` re-hashes the file and
        drops it when it no longer matches (disk corruption, manual edits).
        """
        sha256 = check_sha256(sha256)
        path = self._blob_path(sha256)
        if not path.is_file():
            return None
        if verify and sha256_file(path)[0] != sha256:
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return path

    def put_file(self, src: Path, sha256: str) -> Path:
        """Copy ``src`` into the cache, verifying it hashes to ``sha256``."""
        with open(src, "rb") as f:
            path, _ = self.put_stream(iter(lambda: f.read(CHUNK), b""), sha256, what=str(src))
        return path

    def put_stream(self, chunks: Iterable[bytes], expected_sha256: str | None, *,
                   what: str) -> tuple[Path, str]:
        """Write ``chunks`` to a temporary file, hash them, and rename into place.

        On a mismatch with ``expected_sha256`` nothing stays in the cache and SourceError
        names ``what``, the expected and the actual hash. Returns (path, sha256).
        """
        if expected_sha256 is not None:
            expected_sha256 = check_sha256(expected_sha256, f"{what}: sha256")
        fd, tmp = tempfile.mkstemp(prefix="blob-", dir=self._tmpdir())
        try:
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
            return final, got
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    # --- trees -----------------------------------------------------------------------
    def tree(self, key: str) -> Path | None:
        path = self.root / "trees" / _check_key(key)
        return path if path.is_dir() else None

    def put_tree(self, key: str, build: Callable[[Path], None]) -> Path:
        """Run ``build(tmpdir)`` and rename the directory to ``trees/<key>`` atomically.

        If another process finished the same key first, its tree is kept and ours dropped.
        When ``build`` raises, nothing stays in the cache.
        """
        final = self.root / "trees" / _check_key(key)
        if final.is_dir():
            return final
        work = Path(tempfile.mkdtemp(prefix="tree-", dir=self._tmpdir()))
        try:
            build(work)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, final)
            except OSError:
                if not final.is_dir():
                    raise
            return final
        finally:
            if os.path.lexists(work):
                _rmtree(work)

    # --- refs ------------------------------------------------------------------------
    def get_ref(self, name: str) -> str | None:
        try:
            return (self.root / "refs" / _check_key(name)).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None

    def set_ref(self, name: str, value: str) -> None:
        path = self.root / "refs" / _check_key(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="ref-", dir=self._tmpdir())
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _rmtree(path: Path) -> None:
    """Remove a temporary tree (extraction keeps owner rwx on directories, so this works)."""
    shutil.rmtree(path, ignore_errors=True)
