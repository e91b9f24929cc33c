"""Sources: local files and HTTP(S) downloads with a mandatory sha256.

Lookup order for anything with a known hash: the cache, then vendor directories (by file
name), then the network (unless offline). Downloads stream into the cache and are verified
before they become visible. ``requests`` and ``rich`` are imported only when downloading,
so importing this module stays cheap.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

from builder.inputs.cache import CHUNK, Cache, check_sha256, sha256_file
from builder.errors import ArmvmError, SourceError

USER_AGENT = "armvm-build"
RETRY_STATUS = frozenset({500, 502, 503, 504})
NOT_FOUND_STATUS = frozenset({404, 410})
CONNECT_TIMEOUT, READ_TIMEOUT = 15, 60
T = TypeVar("T")


@dataclass(frozen=True)
class Artifact:
    path: Path
    sha256: str
    size: int
    origin: str            # host path, URL, or "debian:<name>=<version>"


class NotFound(SourceError):
    """The server answered 404/410 (a fallback URL may still have it)."""


def check_url(url: str, what: str = "url") -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ArmvmError(f"{what}: {url!r} is not an HTTP(S) URL (allowed: http://... or "
                         "https://...)")
    return url


def url_basename(url: str) -> str:
    return os.path.basename(unquote(urlsplit(url).path))


class Fetcher:
    def __init__(self, *, cache: Cache, offline: bool = False, vendor_dirs: Sequence[Path] = (),
                 progress: bool | None = None, retries: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.cache = cache
        self.offline = offline
        self.vendor_dirs = [Path(d) for d in vendor_dirs]
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.retries = max(1, retries)
        self.backoff = backoff
        self._sleep = sleep
        self._session = None
        self.requests_made = 0          # network requests issued (for tests and reports)

    # --- public API ------------------------------------------------------------------
    def local(self, path: Path) -> Artifact:
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: file not found")
        if not path.is_file():
            raise SourceError(f"{path}: not a regular file")
        try:
            sha, size = self.cache.file_sha256(path)
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e.strerror}") from None
        return Artifact(path, sha, size, str(path))

    def url(self, url: str, sha256: str) -> Artifact:
        check_url(url)
        sha256 = check_sha256(sha256, f"{url}: sha256")
        return self.blob(sha256, [url], what=url, origin=url, names=[url_basename(url)])

    def blob(self, sha256: str, urls: Sequence[str] | Callable[[], Sequence[str]], *, what: str,
             origin: str | None = None, names: Sequence[str] = (), size: int | None = None,
             hint: str = "", offline: bool = False, verify: bool = True,
             tee: Callable[[Iterator[bytes]], Iterator[bytes]] | None = None) -> Artifact:
        """A file with a known hash: cache, then vendor dirs (by ``names``), then ``urls``
        in order (the next URL is tried only when the previous one answers 404/410).
        ``urls`` may be a callable, called only when the network is actually needed.
        A cached copy is re-hashed first (the cache trusts nothing it finds) unless
        ``verify=False``: then the caller must hash the file before using its bytes.
        ``tee`` sees a download's bytes as they arrive (called again for each retry); they
        are proven only when this returns."""
        origin = origin or what
        seen = len(self.cache.problems)
        path = self.cache.blob(sha256, verify=verify)
        if path is not None:
            return Artifact(path, sha256, path.stat().st_size, origin)
        found = self._from_vendor(sha256, names, size)
        if found is not None:
            return Artifact(found, sha256, found.stat().st_size, origin)
        offline = offline or self.offline
        if not offline and callable(urls):
            urls = urls()
        if offline or not urls:
            where = ", ".join(str(d) for d in self.vendor_dirs) or "no vendor directory given"
            why = "offline mode" if offline else "no download URL"
            corrupt = "".join(f"; {p}" for p in self.cache.problems[seen:])
            raise SourceError(f"{what}: not in the cache ({self.cache.root}) nor in a vendor "
                              f"directory ({where}), and {why}{corrupt}"
                              + (f"; {hint}" if hint else ""))
        last: SourceError | None = None
        for url in urls:  # type: ignore[union-attr]
            try:
                path, _ = self._request(
                    url, what=what, limit=size,
                    consume=lambda chunks: self.cache.put_stream(
                        tee(chunks) if tee else chunks, sha256, what=what, size=size))
            except NotFound as e:
                last = e
                continue
            return Artifact(path, sha256, path.stat().st_size, origin)
        assert last is not None
        raise SourceError(str(last) + (f"; {hint}" if hint else ""))

    def get_bytes(self, url: str, *, what: str, limit: int) -> bytes:
        """A small document without a known hash (e.g. InRelease), at most ``limit`` bytes."""
        if self.offline:
            raise SourceError(f"{what}: cannot download {url} in offline mode")
        return self._request(url, what=what, limit=limit, consume=b"".join)

    # --- internals -------------------------------------------------------------------
    def _from_vendor(self, sha256: str, names: Sequence[str], size: int | None) -> Path | None:
        for directory in self.vendor_dirs:
            for name in names:
                if not name or "/" in name or name in (".", ".."):
                    continue
                candidate = directory / name
                if not candidate.is_file():
                    continue
                if size is not None and candidate.stat().st_size != size:
                    continue
                if sha256_file(candidate)[0] == sha256:
                    return candidate
        return None

    def _get_session(self):
        if self._session is None:
            import requests
            self._session = requests.Session()
            self._session.headers["User-Agent"] = USER_AGENT
            # the bytes on disk must be the file's own bytes: no transparent gzip
            self._session.headers["Accept-Encoding"] = "identity"
        return self._session

    def _request(self, url: str, *, what: str, limit: int | None,
                 consume: Callable[[Iterator[bytes]], T]) -> T:
        """GET ``url`` and hand the body to ``consume``. Connection errors, timeouts, 5xx
        answers and transfers that break midway are retried (``self.retries`` tries in all,
        exponential backoff); ``consume`` then starts again from scratch."""
        import requests
        session = self._get_session()
        problem = ""
        for attempt in range(self.retries):
            if attempt:
                self._sleep(self.backoff * (2 ** (attempt - 1)))
            self.requests_made += 1
            try:
                with session.get(url, stream=True,
                                 timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as response:
                    status = response.status_code
                    if status in NOT_FOUND_STATUS:
                        raise NotFound(f"{what}: {url} answered HTTP {status} (not found)")
                    if status in RETRY_STATUS:
                        problem = f"HTTP {status}"
                        continue
                    if status != 200:
                        raise SourceError(f"{what}: {url} answered HTTP {status}")
                    total = _content_length(response)
                    if limit is not None and total is not None and total > limit:
                        raise SourceError(f"{what}: {url} is {total} bytes, more than the "
                                          f"expected {limit}")
                    return consume(self._chunks(response, what, total, limit))
            except requests.RequestException as e:
                problem = _describe(e)
        raise SourceError(f"{what}: could not download {url}: {problem} (gave up after "
                          f"{self.retries} tries; check the network and the mirror URL)")

    def _chunks(self, response, what: str, total: int | None,
                limit: int | None) -> Iterator[bytes]:
        seen = 0
        bar = task = None
        if self.progress and (total or 0) >= CHUNK:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TransferSpeedColumn)
            bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), console=Console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task(_short(what), total=total)
        try:
            for chunk in response.iter_content(CHUNK):
                seen += len(chunk)
                if limit is not None and seen > limit:
                    raise SourceError(f"{what}: more data than the expected {limit} bytes")
                if bar is not None:
                    bar.update(task, advance=len(chunk))
                yield chunk
        finally:
            if bar is not None:
                bar.stop()


def _content_length(response) -> int | None:
    try:
        return int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None


def _describe(exc: Exception) -> str:
    import requests
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return type(exc).__name__


def _short(what: str) -> str:
    return what if len(what) <= 40 else "..." + what[-37:]
